"""Stems: every layer between the image and the first transformer block.

All stems are one structure, a `StemSpec`: a list of conv layers (kernel, stride,
channels, norm, activation, bias) followed by a projection conv to the model width d
(named `embedding`, so patchify and conv-stem checkpoints share every name after it).

- patchify (ViT/DeiT): no layers, projection kernel = stride = patch.
- Xiao et al. 2021 conv stems: 3x3 convs (no bias) -> BatchNorm -> ReLU, then a 1x1
  projection with bias. The paper tables live in `XIAO_STEMS` as data.
- Wang et al. 2022 scaled-ReLU stem: 7x7/2 -> 3x3 -> 3x3 at width 64, each conv without
  bias followed by BatchNorm and ReLU, then a projection with kernel = stride = patch/2.

Padding is explicit (PyTorch's symmetric k//2), never 'SAME', so weights and outputs
match the PyTorch references.

The stem's convs compute their kernel gradient one of three ways (`weight_grad`), with
the same parameters, the same forward pass and input gradient, and the same kernel
gradient up to float rounding: 'xla' lets XLA transpose the convolution; 'taps' is one
matmul per kernel tap (the tap's strided window of the input against the output
gradient); 'im2col' stacks the k*k windows along the channels and makes it one matmul.
XLA:CPU runs the transposed convolution far below its matmul speed (measured on 2 cores,
batch 64, the scaled-ReLU stem's 3x3 convolution at 32x32x64: 91 ms forward, 1.9 s for
its kernel gradient, 0.23 s as taps). On the 2-core AMD EPYC VM (2026-12-07, the train
step at batch 64, 64 px, 6 blocks of width 192), the Xiao stem's small 3x3 stride-2
convs train 3-7% faster with 'im2col' than with 'xla' (four alternating pairs; 'taps' is
slower than 'xla' there), and the scaled-ReLU stem gave 73.8 images/s with 'im2col'
against 71.1 with 'taps' (one run each, within that VM's noise). 'auto' picks 'taps' on
CPU and 'xla' on GPU and TPU, where cuDNN / the TPU compiler transpose convs at full
speed. The default stays 'xla' (`ViT.stem_weight_grad`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convstem_jax.models import init as inits
from convstem_jax import errors

NORMS = ("batch", "layer", "none")
WEIGHT_GRADS = ("auto", "xla", "taps", "im2col")
ACTIVATIONS = ("relu", "gelu", "none")


@dataclasses.dataclass(frozen=True)
class ConvLayer:
  """One stem layer: conv(kernel, stride, channels, bias) -> norm -> activation."""
  kernel: int
  stride: int
  channels: int
  norm: str = "batch"
  act: str = "relu"
  bias: bool = False
  # None: k//2 when the kernel overlaps its neighbours (k > stride), else 0.
  padding: int | None = None

  @property
  def pad(self) -> int:
    if self.padding is not None:
      return self.padding
    return self.kernel // 2 if self.kernel > self.stride else 0

  def out_size(self, size: int) -> int:
    return (size + 2 * self.pad - self.kernel) // self.stride + 1


@dataclasses.dataclass(frozen=True)
class StemSpec:
  """Conv layers, then a projection conv (with its own kernel/stride) to width d."""
  layers: tuple[ConvLayer, ...]
  proj_kernel: int
  proj_stride: int
  proj_bias: bool = True

  @property
  def projection(self) -> ConvLayer:
    # The projection is a plain conv: its output channels are the model width.
    return ConvLayer(self.proj_kernel, self.proj_stride, -1, "none", "none",
                     self.proj_bias)

  @property
  def stride(self) -> int:
    return math.prod(l.stride for l in self.layers) * self.proj_stride

  def grid(self, img_size: int) -> int:
    """Token grid side for a square image of `img_size` pixels."""
    for layer in (*self.layers, self.projection):
      img_size = layer.out_size(img_size)
    return img_size

  def with_overrides(self, norm: str | None = None, act: str | None = None,
                     width: int | None = None) -> "StemSpec":
    """Same stem with every hidden layer's norm / activation / channels replaced."""
    def upd(l):
      return dataclasses.replace(l, norm=norm or l.norm, act=act or l.act,
                                 channels=width or l.channels)
    return dataclasses.replace(self, layers=tuple(upd(l) for l in self.layers))


def _xiao(kernels, strides, channels) -> StemSpec:
  """Xiao et al. table row: every entry but the last is 3x3-style conv+BN+ReLU."""
  *hidden, (k_last, s_last) = list(zip(kernels, strides))
  layers = tuple(ConvLayer(k, s, c) for (k, s), c in zip(hidden, channels[:-1]))
  return StemSpec(layers, k_last, s_last)


# Xiao et al. 2021, Table 1 and Appendix; the last channel entry is the model width d.
XIAO_STEMS = {
    "conv_1gf": ((3, 3, 3, 3, 1), (2, 2, 2, 2, 1), (24, 48, 96, 192, 192)),
    "conv_4gf": ((3, 3, 3, 3, 1), (2, 2, 2, 2, 1), (48, 96, 192, 384, 384)),
    "conv_18gf": ((3, 3, 3, 3, 3, 3, 1), (2, 2, 1, 2, 1, 2, 1),
                  (64, 128, 128, 256, 256, 512, 768)),
    "conv_36gf": ((3, 3, 3, 3, 3, 3, 1), (2, 2, 1, 2, 1, 2, 1),
                  (64, 128, 128, 256, 256, 512, 1024)),
    # Table 3 stem ablations at 4GF: the last strided conv grows to 2/4/8/16.
    "conv_4gf_s1": ((3, 3, 3, 2, 1), (2, 2, 2, 2, 1), (42, 104, 208, 416, 384)),
    "conv_4gf_s2": ((3, 3, 3, 4, 1), (2, 2, 1, 4, 1), (32, 64, 128, 256, 384)),
    "conv_4gf_s3": ((3, 3, 3, 8, 1), (2, 1, 1, 8, 1), (17, 34, 68, 136, 384)),
    "conv_4gf_s4": ((3, 3, 3, 16, 1), (1, 1, 1, 16, 1), (8, 16, 32, 64, 384)),
}


def _srelu(patch: int, width: int = 64, norm: str = "batch", act: str = "relu"):
  """Wang et al. 2022 scaled-ReLU stem (VOLO-style layout, see papers.md section 2)."""
  if patch % 2:
    raise errors.UserError(f"The scaled-ReLU stem needs an even patch size, got {patch}.")
  layers = (ConvLayer(7, 2, width, norm, act), ConvLayer(3, 1, width, norm, act),
            ConvLayer(3, 1, width, norm, act))
  return StemSpec(layers, patch // 2, patch // 2)


def stem_names() -> list[str]:
  return sorted(["patchify", "patchify_srelu", "srelu", "srelu_nonorm", "srelu_norelu",
                 "srelu_ln", *XIAO_STEMS])


def resolve_stem(stem: Any, *, width: int, patch: int) -> StemSpec:
  """A stem name, a StemSpec, or a list of layer dicts (then projection = 1x1) -> StemSpec."""
  if isinstance(stem, StemSpec):
    return stem
  if isinstance(stem, (list, tuple)):
    return StemSpec(tuple(l if isinstance(l, ConvLayer) else ConvLayer(**l) for l in stem),
                    1, 1)
  if stem == "patchify":
    return StemSpec((), patch, patch)
  if stem == "patchify_srelu":
    # Xiao et al.'s "patchify + BN + ReLU" / Wang et al.'s patchify + scaled ReLU:
    # patch conv -> BatchNorm -> ReLU -> 1x1 projection.
    return StemSpec((ConvLayer(patch, patch, width),), 1, 1)
  if stem in XIAO_STEMS:
    kernels, strides, channels = XIAO_STEMS[stem]
    if channels[-1] != width:
      raise errors.UserError(f"Stem '{stem}' ends at width {channels[-1]} but the model width "
                       f"is {width}; use the matching vitc_* variant or another stem.")
    return _xiao(kernels, strides, channels)
  ablations = {"srelu": {}, "srelu_nonorm": {"norm": "none"},
               "srelu_norelu": {"act": "none"}, "srelu_ln": {"norm": "layer"}}
  if stem in ablations:
    return _srelu(patch, **ablations[stem])
  raise errors.UserError(f"Unknown stem '{stem}'; valid stems: {', '.join(stem_names())}.")


class BatchNorm(nn.Module):
  """BatchNorm over N, H, W with optional per-group ("ghost") statistics.

  `group_size` > 0 normalises each consecutive group of that many examples with its
  own statistics, as the PyTorch references did with per-GPU BatchNorm; 0 uses the
  whole (global, under a data-sharded jit) batch. Running statistics average the groups'
  statistics and, as in PyTorch, keep the unbiased variance. They are updated only when
  `train=True` (and not during `init`).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    mean_ra = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var_ra = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if train:
      b = x.shape[0]
      g = self.group_size if 0 < self.group_size < b else b
      if b % g:
        raise errors.UserError(f"BatchNorm group size {g} does not divide the batch of {b}; "
                         "choose a group size that divides the per-device batch.")
      xg = xf.reshape(b // g, g, *x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      mean = xg.mean(axes, keepdims=True)
      var = jnp.square(xg - mean).mean(axes, keepdims=True)
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        n = math.prod(xg.shape[1:-1])
        m = self.momentum
        mean_ra.value = m * mean_ra.value + (1 - m) * mean.mean(axes + (0,)).reshape(c)
        unbiased = var.mean(axes + (0,)).reshape(c) * n / max(n - 1, 1)
        var_ra.value = m * var_ra.value + (1 - m) * unbiased
    else:
      y = (xf - mean_ra.value) * jax.lax.rsqrt(var_ra.value + self.epsilon)
    return (y * scale + bias).astype(self.dtype)


def _conv(x, kernel, stride: int, pad: int):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_tap_grad(x, kernel, stride: int, pad: int):
  """`_conv` whose kernel gradient is one matmul per tap (see the module docstring)."""
  return _conv(x, kernel, stride, pad)


def _conv_tap_grad_fwd(x, kernel, stride, pad):
  return _conv(x, kernel, stride, pad), (x, kernel)


def _input_grad_and_windows(stride, pad, x, kernel, g):
  """XLA's input gradient of `_conv` (unused for the image, so it is compiled away) and
  the k*k strided windows of the padded input that meet the output positions, tap-major."""
  dx = jax.vjp(lambda x: _conv(x, kernel, stride, pad), x)[1](g)[0]
  n, ho, wo, c = g.shape[0], g.shape[1], g.shape[2], x.shape[3]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = kernel.shape[0]
  return dx, [jax.lax.slice(xp, (0, i, j, 0),
                            (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                            (1, stride, stride, 1)) for i in range(k) for j in range(k)]


def _conv_tap_grad_bwd(stride, pad, residuals, g):
  x, kernel = residuals
  dx, windows = _input_grad_and_windows(stride, pad, x, kernel, g)
  # The contraction runs over every output position; cut into 8 batched matmuls whose
  # sum is taken after, it spreads over the CPU's threads (1.5-1.8x faster on 2 cores).
  chunks = 8 if g[..., 0].size % 8 == 0 else 1
  g = g.reshape(chunks, -1, g.shape[-1])
  taps = [jnp.einsum("bmc,bmo->bco", w.reshape(chunks, -1, x.shape[3]), g,
                     preferred_element_type=kernel.dtype).sum(0) for w in windows]
  return dx, jnp.stack(taps).reshape(kernel.shape)


_conv_tap_grad.defvjp(_conv_tap_grad_fwd, _conv_tap_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col_grad(x, kernel, stride: int, pad: int):
  """`_conv` whose kernel gradient is one matmul over the stacked windows (see the module
  docstring)."""
  return _conv(x, kernel, stride, pad)


def _conv_im2col_grad_bwd(stride, pad, residuals, g):
  x, kernel = residuals
  dx, windows = _input_grad_and_windows(stride, pad, x, kernel, g)
  # Stacked tap-major, then input channel: the row order of the HWIO kernel in 2D.
  patches = jnp.concatenate(windows, -1).reshape(-1, kernel[..., 0].size)
  dk = jax.lax.dot_general(patches, g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())),
                           preferred_element_type=kernel.dtype)
  return dx, dk.reshape(kernel.shape)


_conv_im2col_grad.defvjp(_conv_tap_grad_fwd, _conv_im2col_grad_bwd)


class Conv(nn.Module):
  """A square NHWC conv with `nn.Conv`'s parameters (kernel HWIO, bias; same names and
  initialisers, so checkpoints and init draws are unchanged) and a choice of how its
  kernel gradient is computed (`weight_grad`, module docstring)."""
  features: int
  kernel: int
  stride: int
  pad: int
  use_bias: bool
  kernel_init: Any
  weight_grad: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    how = self.weight_grad
    if how == "auto":
      how = "taps" if jax.default_backend() == "cpu" else "xla"
    if how == "taps":
      y = _conv_tap_grad(x, kernel, self.stride, self.pad)
    elif how == "im2col":
      y = _conv_im2col_grad(x, kernel, self.stride, self.pad)
    else:
      y = _conv(x, kernel, self.stride, self.pad)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


def gelu(x):
  """Exact GELU written as PyTorch's nn.GELU is, x/2 (1 + erf(x/sqrt 2)): the same function
  as jax.nn.gelu(approximate=False) (within 1e-6 in float32), whose erfc form is about 3x
  slower on XLA:CPU (docs/benchmarks.md)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))


def _act(name: str):
  return {"relu": nn.relu, "gelu": gelu, "none": lambda x: x}[name]


class Stem(nn.Module):
  """Runs a StemSpec on NHWC images; returns NHWC features of width `width`."""
  spec: StemSpec
  width: int
  init_style: str = "jax"
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  weight_grad: str = "xla"        # see WEIGHT_GRADS and the module docstring

  @nn.compact
  def __call__(self, x, train: bool):
    for i, l in enumerate(self.spec.layers):
      x = Conv(l.channels, l.kernel, l.stride, l.pad, l.bias,
               inits.stem_conv_init(self.init_style), self.weight_grad, self.dtype,
               name=f"conv_{i}")(x)
      if l.norm == "batch":
        x = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype, name=f"norm_{i}")(
            x, train)
      elif l.norm == "layer":  # LayerNorm over channels at each position
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm_{i}")(x)
      x = _act(l.act)(x)
    p = self.spec.projection
    return Conv(self.width, p.kernel, p.stride, p.pad, p.bias,
                inits.stem_projection_init(self.init_style, bool(self.spec.layers)),
                self.weight_grad, self.dtype, name="embedding")(x)


def validate(spec: StemSpec, *, patch: int, img_size: int) -> None:
  """The pycls invariants, as sentences: stride product = patch, image divisible."""
  for l in (*spec.layers, spec.projection):
    if l.norm not in NORMS or l.act not in ACTIVATIONS:
      raise errors.UserError(f"Stem layer {l} has norm '{l.norm}' / activation '{l.act}'; "
                       f"norm must be one of {NORMS} and activation one of {ACTIVATIONS}.")
  if spec.stride != patch:
    raise errors.UserError(f"The stem's strides multiply to {spec.stride}, not the patch size "
                     f"{patch}; change the stem strides or set patch_size={spec.stride}.")
  if img_size % spec.stride:
    raise errors.UserError(f"Image size {img_size} is not divisible by the stem's total stride "
                     f"{spec.stride}; use an image size that is a multiple of "
                     f"{spec.stride}.")


def describe(spec: StemSpec, width: int) -> Sequence[str]:
  """One line per layer, for logs and the complexity report."""
  rows = [f"conv {l.kernel}x{l.kernel}/{l.stride} -> {l.channels} "
          f"{'+bias ' if l.bias else ''}{l.norm} {l.act}" for l in spec.layers]
  rows.append(f"embedding {spec.proj_kernel}x{spec.proj_kernel}/{spec.proj_stride} -> "
              f"{width}{' +bias' if spec.proj_bias else ''}")
  return rows
