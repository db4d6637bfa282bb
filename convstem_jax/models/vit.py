"""The Vision Transformer: a stem, position encoding, pre-LN blocks, pooling, a head.

`ViT.apply(variables, images, train=bool)` takes NHWC float images and returns
`(logits, out)`; `out` holds named intermediates: `stem` (NHWC stem output), `tokens`
(after position encoding), `block_{i}` (each block's output tokens), `encoded` (after the
final norm, token models) and `pre_logits`. With `capture_attention=True` every block
sows `attention_weights` [batch, heads, queries, keys] into `intermediates`.
`attention_init` sets query/key (and for mimetic value/output) kernels at init time:
see `structured_init.py`; `convstem_jax.diagnostics` scores the resulting maps.

Parameter names (stable, checkpoints depend on them):
  stem/{conv_i, norm_i, embedding}  cls  pos_embedding
  block_i/{norm1, attn/{qkv, out}, norm2, mlp/{fc1, fc2}}  encoder_norm  head
With `scan_blocks=True` the blocks are one `nn.scan` and their parameters are stacked
along a new leading depth axis under `blocks/{norm1, attn/{qkv, out}, ...}` instead of
`block_i/...`: checkpoints of the two layouts are not interchangeable as they stand;
`stack_blocks` / `unstack_blocks` convert a params tree from one to the other.

Speed switches (all off by default; see docs/benchmarks.md):
  scan_blocks  compile one block and loop it (nn.scan): compile time and program size
               stop growing with depth; the step's own speed may move a little either
               way (to be measured on accelerators).
  remat        rematerialise each block in the backward pass (jax.checkpoint) with a
               policy from REMAT_POLICIES: less activation memory, more compute.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convstem_jax.models import init as inits
from convstem_jax.models import stems
from convstem_jax.models import structured_init
from convstem_jax import errors

POOLS = ("token", "gap")
POSEMBS = ("learn", "sincos2d", "none")
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
# remat policy -> what the backward pass may keep from the forward of each block
# (jax.checkpoint_policies); everything else is recomputed. 'none' = no remat at all.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,    # keep only the block input
    "dots": jax.checkpoint_policies.dots_saveable,       # keep every matmul output
    # keep the projections' / MLP's matmuls, recompute the attention matmuls (batched)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LN_EPS = 1e-6


def sincos2d(grid: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos encoding [grid*grid, dim], laid out as timm's
  `build_sincos2d_pos_embed` (the structured-init code's): [sin y, sin x, cos y, cos x]."""
  if dim % 4:
    raise errors.UserError(f"A 2-D sin-cos position encoding needs a width divisible by 4, "
                     f"got {dim}; use posemb='learn'.")
  bands = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
  y, x = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  pos = np.stack([y.ravel(), x.ravel()], 1)[:, :, None] * bands[None, None]
  return np.concatenate([np.sin(pos).reshape(len(pos), -1),
                         np.cos(pos).reshape(len(pos), -1)], 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
  logging.warning(msg)


def attention(q, k, v, impl: str):
  """softmax(q k^T / sqrt(d)) v through jax.nn.dot_product_attention; q,k,v [B,T,H,D].

  'cudnn' asks for the fused cuDNN kernel and falls back to XLA (with one warning) when
  the backend or the shape is not supported; 'auto' lets JAX pick.
  """
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError) as e:
      _warn_once(f"cuDNN attention unavailable ({str(e).splitlines()[0]}); using XLA.")
      impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, implementation=None if impl == "auto"
                                      else impl)


class Attention(nn.Module):
  num_heads: int
  init_style: str = "jax"
  impl: str = "xla"
  dropout: float = 0.0
  capture: bool = False
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  attention_init: str = "default"

  @nn.compact
  def __call__(self, x, train: bool, shared_qk=None):
    b, t, d = x.shape
    h = self.num_heads
    parts = None  # structured kernels, only computed while initialising
    if self.attention_init != "default" and self.is_initializing():
      parts = structured_init.layer_kernels(self.attention_init, self.make_rng("params"),
                                            d, h, shared_qk)
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype,
                   kernel_init=structured_init.qkv_kernel_init(
                       inits.qkv_kernel_init(self.init_style), parts), name="qkv")(x)
    q, k, v = (qkv.reshape(b, t, 3, h, d // h)[:, :, i] for i in range(3))
    if self.capture or (train and self.dropout > 0):
      # Explicit path: the weights are needed (sown) or dropped out.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(q.dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      self.sow("intermediates", "attention_weights", weights)
      weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
      y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    else:
      y = attention(q, k, v, self.impl)
    out_init = structured_init.out_kernel_init(inits.attn_out_init(self.init_style), parts)
    return nn.Dense(d, dtype=self.dtype, kernel_init=out_init, name="out")(y.reshape(b, t, d))


class Mlp(nn.Module):
  hidden: int
  init_style: str = "jax"
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=inits.mlp_kernel_init(self.init_style),
                              bias_init=inits.mlp_bias_init(self.init_style))
    d = x.shape[-1]
    x = stems.gelu(dense(self.hidden, name="fc1")(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return dense(d, name="fc2")(x)


def drop_path(x, rate: float, rng):
  """Stochastic depth: drop the whole residual branch per example, rescale survivors."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  num_heads: int
  mlp_dim: int
  init_style: str = "jax"
  attention_impl: str = "xla"
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  capture_attention: bool = False
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  attention_init: str = "default"
  layer_norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x, train: bool, shared_qk=None, rate=None):
    # `rate` overrides `drop_path` for this call (under scan_blocks it is the traced
    # per-layer rate); stochastic depth is on only when `drop_path` > 0.
    rate = self.drop_path if rate is None else rate

    def residual(x, y):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      if train and self.drop_path > 0:
        y = drop_path(y, rate, self.make_rng("dropout"))
      return x + y

    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
    y = Attention(self.num_heads, self.init_style, self.attention_impl,
                  self.attention_dropout, self.capture_attention, self.qkv_bias,
                  self.dtype, attention_init=self.attention_init, name="attn")(
                      y, train, shared_qk)
    x = residual(x, y)
    y = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
    y = Mlp(self.mlp_dim, self.init_style, self.dropout, self.dtype, name="mlp")(y, train)
    return residual(x, y)


class ViT(nn.Module):
  """Vision Transformer with a configurable stem. See `variants.py` for named models."""
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  stem: Any = "patchify"          # a stem name, a StemSpec or a list of layer dicts
  stem_norm: str | None = None    # override every hidden stem layer's norm
  stem_act: str | None = None     # ... activation
  stem_width: int | None = None   # ... channels (e.g. the scaled-ReLU stem's 64)
  pool: str = "token"             # 'token' (class token) | 'gap' (mean, then norm)
  posemb: str = "learn"           # 'learn' | 'sincos2d' (fixed) | 'none'
  qkv_bias: bool = True
  # LayerNorm epsilon of the blocks and the final norm: 1e-6 as timm and big_vision;
  # pycls (Xiao et al.'s released models) used 1e-5.
  layer_norm_eps: float = LN_EPS
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0          # stochastic depth, linear in depth up to this rate
  dtype: str = "float32"          # compute dtype; parameters are always float32
  attention_impl: str = "xla"     # 'xla' | 'cudnn' (falls back to XLA) | 'auto'
  init_style: str = "jax"         # 'jax' | 'pycls' (see models/init.py)
  attention_init: str = "default"  # see structured_init.py; impulse* need pool='gap'
  bn_group_size: int = 0          # BatchNorm examples per statistics group; 0 = all
  capture_attention: bool = False
  # Speed switches, default off (module docstring, docs/benchmarks.md). scan_blocks
  # changes the parameter layout (stacked under `blocks/`; see stack_blocks).
  scan_blocks: bool = False       # one nn.scan over the identical blocks
  remat: str = "none"             # block rematerialisation policy, see REMAT_POLICIES
  # How the stem convs' kernel gradient is computed: 'xla' | 'taps' (one matmul per
  # kernel tap; on CPU 3x faster steps for the scaled-ReLU stem, none for Xiao's
  # small convs; docs/benchmarks.md) | 'auto' (taps on CPU only); same
  # parameters, same gradients up to float rounding (stems.py docstring). 'xla' by
  # default so that runs measured before the switch existed repeat bit for bit.
  stem_weight_grad: str = "xla"

  def __post_init__(self):
    super().__post_init__()
    self.stem_spec()  # validates the stem
    checks = [
        (self.pool in POOLS, f"pool '{self.pool}' is not one of {POOLS}"),
        (self.posemb in POSEMBS, f"posemb '{self.posemb}' is not one of {POSEMBS}"),
        (self.dtype in DTYPES, f"dtype '{self.dtype}' is not one of {tuple(DTYPES)}"),
        (self.attention_impl in ATTENTION_IMPLS,
         f"attention_impl '{self.attention_impl}' is not one of {ATTENTION_IMPLS}"),
        (self.attention_init in inits.ATTENTION_INITS,
         f"attention_init '{self.attention_init}' is not one of {inits.ATTENTION_INITS}"),
        (self.num_heads > 0 and self.width % self.num_heads == 0,
         f"num_heads {self.num_heads} does not divide the width {self.width}; choose a "
         f"head count that divides it"),
        (self.stem_weight_grad in stems.WEIGHT_GRADS,
         f"stem_weight_grad '{self.stem_weight_grad}' is not one of {stems.WEIGHT_GRADS}"),
        (self.remat in REMAT_POLICIES,
         f"remat '{self.remat}' is not one of {tuple(REMAT_POLICIES)}"),
        (not (self.scan_blocks and self.capture_attention),
         "capture_attention sows per-block attention maps, which scan_blocks does not "
         "support; build the model with scan_blocks=False (unstack_blocks converts "
         "scanned parameters)"),
    ]
    for ok, msg in checks:
      if not ok:
        raise errors.UserError(msg + ".")
    inits.check_style(self.init_style)
    self._check_attention_init()

  def _check_attention_init(self) -> None:
    """Impulse inits fit maps over the token grid through the position encoding."""
    kind = self.attention_init
    if not structured_init.is_impulse(kind):
      return
    if self.pool == "token":
      # The target maps are over patch tokens; a class token has no place in them.
      raise errors.UserError(f"attention_init '{kind}' needs a model without a class token; "
                       "set pool='gap'.")
    if self.posemb == "none":
      raise errors.UserError(f"attention_init '{kind}' builds its maps from the position "
                       "encoding; set posemb='sincos2d' or 'learn'.")
    f, g = structured_init.window(kind), self.grid
    if g < f:
      raise errors.UserError(f"attention_init '{kind}' needs a token grid of at least {f}x{f}, "
                       f"got {g}x{g}; use a larger image, a smaller patch, or impulse3.")

  def stem_spec(self) -> stems.StemSpec:
    spec = stems.resolve_stem(self.stem, width=self.width, patch=self.patch_size)
    spec = spec.with_overrides(self.stem_norm, self.stem_act, self.stem_width)
    stems.validate(spec, patch=self.patch_size, img_size=self.img_size)
    return spec

  @property
  def grid(self) -> int:
    return self.stem_spec().grid(self.img_size)

  @property
  def num_tokens(self) -> int:
    return self.grid ** 2 + (self.pool == "token")

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[1:3] != (self.img_size, self.img_size):
      raise errors.UserError(f"Expected NHWC images of {self.img_size}x{self.img_size}, got "
                       f"shape {images.shape}; resize the input or set img_size.")
    dtype = DTYPES[self.dtype]
    out = {}
    x = stems.Stem(self.stem_spec(), self.width, self.init_style, self.bn_group_size, dtype,
                   self.stem_weight_grad, name="stem")(images.astype(dtype), train)
    out["stem"] = x
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.pool == "token":
      cls = self.param("cls", inits.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
    # Class token first, then the position embedding over all tokens (pycls / timm).
    pe = None
    if self.posemb == "learn":
      pe = self.param("pos_embedding", inits.posemb_init(self.init_style),
                      (1, x.shape[1], d), jnp.float32)[0]
    elif self.posemb == "sincos2d":
      pe = jnp.asarray(sincos2d(gh, d))
      if self.pool == "token":  # the class token gets no position
        pe = jnp.concatenate([jnp.zeros((1, d)), pe])
    if pe is not None:
      x = x + pe[None].astype(dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    out["tokens"] = x

    # Impulse inits: one query/key solution for every block (papers.md section 3, step
    # 6), fitted to what block 0 sees on a blank image: LayerNorm(position encoding).
    # A learned encoding contributes its initial value (as [SIV] does).
    shared_qk = None
    if (structured_init.is_impulse(self.attention_init) and self.depth
        and self.is_initializing()):
      shared_qk = structured_init.impulse_qk(self.attention_init, self.make_rng("params"),
                                             pe, self.num_heads,
                                             self.layer_norm_eps)

    rates = np.linspace(0, self.drop_path, self.depth) if self.depth else []
    block = Block
    if self.remat != "none":
      # static_argnums counts `self`: argument 2 is `train`.
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], static_argnums=(2,),
                       prevent_cse=not self.scan_blocks)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, init_style=self.init_style,
              attention_impl=self.attention_impl, dropout=self.dropout,
              attention_dropout=self.attention_dropout,
              capture_attention=self.capture_attention, qkv_bias=self.qkv_bias,
              dtype=dtype, attention_init=self.attention_init,
              layer_norm_eps=self.layer_norm_eps)
    if self.scan_blocks and self.depth:
      # One block body, looped: parameters (and per-layer init / dropout rngs) get a
      # leading depth axis; each layer's drop-path rate is scanned in with its input.
      def body(blk, x, rate):
        x = blk(x, train, shared_qk, rate)
        return x, x
      scan = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True, "dropout": True}, length=self.depth)
      x, per_block = scan(block(drop_path=self.drop_path, name="blocks", **kw), x,
                          jnp.asarray(rates, jnp.float32))
      out.update({f"block_{i}": per_block[i] for i in range(self.depth)})
    for i in range(0 if self.scan_blocks else self.depth):
      x = block(drop_path=float(rates[i]), name=f"block_{i}", **kw)(x, train, shared_qk)
      out[f"block_{i}"] = x

    norm = nn.LayerNorm(self.layer_norm_eps, dtype=dtype, name="encoder_norm")
    if self.pool == "token":
      x = norm(x)
      out["encoded"] = x
      x = x[:, 0]
    else:  # global average pooling, then its norm (timm's fc_norm)
      x = norm(x.mean(axis=1))
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=inits.zeros, dtype=dtype,
                   name="head")(x)
    out["logits"] = x
    return x.astype(jnp.float32), out


# ------------------------------------------------- scan_blocks parameter layout


def stack_blocks(params: dict, depth: int) -> dict:
  """An unrolled params tree (`block_0` ... `block_{depth-1}`) -> the scan_blocks layout
  (one `blocks` subtree, each leaf stacked along a new leading depth axis). Works on
  any tree keyed like params (e.g. EMA params), not on optimizer state."""
  missing = [f"block_{i}" for i in range(depth) if f"block_{i}" not in params]
  if missing:
    raise errors.UserError(f"Expected unrolled parameters block_0..block_{depth - 1}, but "
                     f"{', '.join(missing)} are missing; pass the model's depth and an "
                     "unrolled (scan_blocks=False) params tree.")
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"block_{i}"] for i in range(depth)])
  return out


def unstack_blocks(params: dict) -> dict:
  """The scan_blocks layout (`blocks`, leading depth axis) -> `block_0` ... `block_{n-1}`."""
  if "blocks" not in params:
    raise errors.UserError("Expected scanned parameters with a 'blocks' entry; these are "
                     "already unrolled.")
  out = {k: v for k, v in params.items() if k != "blocks"}
  depth = jax.tree.leaves(params["blocks"])[0].shape[0]
  for i in range(depth):
    out[f"block_{i}"] = jax.tree.map(lambda x: x[i], params["blocks"])
  return out
