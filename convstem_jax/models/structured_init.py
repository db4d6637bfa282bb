"""Structured attention initialisations: impulse (fitted and closed form) and mimetic.

papers.md section 3. Every procedure returns query/key kernels in the layout of our fused
`qkv` Dense: a (D, D) block per projection whose columns are head-major (head h owns
columns h*r:(h+1)*r, r = D / heads), so `x @ q_kernel` and `x @ k_kernel` are the
queries and keys, and block 0's logits on a blank image are
(X Q_h)(X K_h^T)^T / sqrt(r) with X = LayerNorm(position encoding).

- impulse{3,5} [SI]/[CI]: one offset per head drawn uniformly from the f x f window,
  target maps with zero padding, Q/K fitted so softmax(X Q K X^T / sqrt r) matches the
  targets by MSE (Adam, lr 1e-4, 10,000 steps, column norms reset every 100 steps).
- impulse{3,5}_closed [SIV]: target logits 1000 H + noise, rank-r pseudo-inverse of X,
  SVD of X+ W X+^T, each factor Frobenius-normalised and scaled by 7; fixed offsets.
- mimetic (Trockman & Kolter 2023): W_q W_k^T ~ 0.7 Z + 0.7 I per head (rank-r SVD
  truncation) and W_v W_o ~ 0.4 Z - 0.4 I (full SVD); Z ~ U with variance 1/D.

The impulse solutions depend only on the pseudo-input, so the model computes one and
shares it by every layer (papers.md step 6); mimetic draws fresh matrices per layer.

Choices where the references leave room (ViT enforces the errors at construction):
- impulse kinds need pool='gap' (the maps are over patch tokens; a class token is an
  error) and a position encoding (posemb='none' is an error); a grid smaller than the
  window is an error. posemb='learn' fits through the encoding's initial value, as
  [SIV] does with its learned pos_embed.
- V and the output projection keep the style's default for every impulse kind
  ([SI]). [SIV]'s code also gives its closed form mimetic V/O and multiplies the
  position embedding by 18; neither is adopted here, so the kinds differ only in Q/K.
- The closed form's pseudo-inverse drops near-null directions (CLOSED_RCOND), and
  impulse5_closed's fixed offsets are ours; see `closed_impulse` / `closed_offsets`.
- The fit is a jitted `fori_loop` (about 12 s for vit_ti2_32 on 2 CPU cores); the
  closed form and mimetic are SVDs (well under a second, ~3 s for mimetic's 12 layers).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from convstem_jax import errors
import optax

KINDS = ("default", "mimetic", "impulse3", "impulse5", "impulse3_closed",
         "impulse5_closed")
FIT_STEPS = 10_000
FIT_LR = 1e-4
RENORM_EVERY = 100
CLOSED_SCALE = 7.0       # [SIV] norm_q: each factor's Frobenius norm
CLOSED_PEAK = 1000.0     # [SIV] target logit at the impulse
CLOSED_RCOND = 0.03      # ours, see closed_impulse
CLOSED_NOISE = 3.0       # [SIV] noise on the other logits: 3 * trunc_normal(std 0.6, +-2)
# [SIV] offsets, centre first, as indices k of the 3x3 window, (m, n) = (k//3-1, k%3-1).
CLOSED_ORDER_3 = (4, 1, 5, 3, 7, 0, 2, 6, 8)


def is_impulse(kind: str) -> bool:
  return kind.startswith("impulse")


def window(kind: str) -> int:
  """Side of the offset window of an impulse kind (3 or 5)."""
  return int(kind[len("impulse")])


def closed_offsets(heads: int, f: int) -> np.ndarray:
  """Fixed per-head offsets [heads, 2] of the closed form, repeating past f*f heads.

  3x3 is [SIV]'s order. [SIV] has no 5x5 variant; ours keeps its centre-first order
  and directions but puts the ring at distance 2 first (a dilated 3x3, so a 5x5 model
  with few heads differs from the 3x3 one), then the distance-1 ring, then the rest.
  """
  ring = [(k // 3 - 1, k % 3 - 1) for k in CLOSED_ORDER_3]
  if f == 3:
    order = ring
  else:
    order = [(0, 0)] + [(2 * m, 2 * n) for m, n in ring[1:]] + ring[1:]
    order += [(m, n) for m in range(-2, 3) for n in range(-2, 3) if (m, n) not in order]
  return np.array([order[h % len(order)] for h in range(heads)], np.int32)


def random_offsets(key, heads: int, f: int) -> jax.Array:
  """[SI] step 1: k ~ U{0..f^2-1} per head, (m, n) = (k//f - f//2, k%f - f//2)."""
  k = jax.random.randint(key, (heads,), 0, f * f)
  return jnp.stack([k // f - f // 2, k % f - f // 2], axis=1)


def impulse_targets(offsets, grid: int) -> jax.Array:
  """[heads, N, N] maps: query (r, c) -> key (r+m, c+n) when inside the grid (zero
  padding: queries whose key falls outside have an all-zero row)."""
  r, c = np.divmod(np.arange(grid * grid), grid)
  m = offsets[:, 0, None, None]
  n = offsets[:, 1, None, None]
  hit = (r[None, None, :] == r[None, :, None] + m) & (c[None, None, :] == c[None, :, None] + n)
  return hit.astype(jnp.float32)


def pseudo_input(pos_embedding, eps: float) -> jax.Array:
  """LayerNorm without affine of the [N, D] position encoding: what block 0's norm1
  makes of the tokens of a blank image (the stem's output is zero there)."""
  pe = jnp.asarray(pos_embedding, jnp.float32)
  mean = pe.mean(-1, keepdims=True)
  var = jnp.square(pe - mean).mean(-1, keepdims=True)
  return (pe - mean) * jax.lax.rsqrt(var + eps)


def attention_maps(x, q, k):
  """softmax(x Q_h (x K_h)^T / sqrt r) for Q, K as [heads, D, r]."""
  xq = jnp.einsum("nd,hdr->hnr", x, q)
  xk = jnp.einsum("nd,hdr->hnr", x, k)
  return jax.nn.softmax(jnp.einsum("hnr,hmr->hnm", xq, xk) / math.sqrt(q.shape[-1]), -1)


@functools.partial(jax.jit, static_argnames=("heads", "f", "steps"))
def fit_impulse(key, x, *, heads: int, f: int, steps: int = FIT_STEPS):
  """[SI] steps 1-5 on the pseudo-input x [N, D]. Returns (Q, K) as [heads, D, r] and
  the offsets [heads, 2]."""
  n_tok, d = x.shape
  r = d // heads
  grid = math.isqrt(n_tok)
  k_off, k_q, k_k = jax.random.split(key, 3)
  offsets = random_offsets(k_off, heads, f)
  target = impulse_targets(offsets, grid)
  bound = math.sqrt(1.0 / (r * heads))
  q = jax.random.uniform(k_q, (heads, d, r), jnp.float32, -bound, bound)
  k = jax.random.uniform(k_k, (heads, d, r), jnp.float32, -bound, bound)
  # [CI]: the target norm is Q's mean column norm (columns of Q_h in R^{D x r}); K_h in
  # R^{r x D} is rescaled along r for each of its D columns, i.e. our [D, r] rows.
  norm = jnp.linalg.norm(q, axis=1).mean()

  def renorm(q, k):
    q = q * (norm / jnp.linalg.norm(q, axis=1, keepdims=True))
    k = k * (norm / jnp.linalg.norm(k, axis=2, keepdims=True))
    return q, k

  def loss(qk):
    return jnp.mean(jnp.square(attention_maps(x, *qk) - target))

  tx = optax.adam(FIT_LR)

  def step(i, carry):
    qk, state = carry
    qk = jax.lax.cond(i % RENORM_EVERY == 0, lambda p: renorm(*p), lambda p: p, qk)
    grads = jax.grad(loss)(qk)
    updates, state = tx.update(grads, state, qk)
    return optax.apply_updates(qk, updates), state

  qk = (q, k)
  qk, _ = jax.lax.fori_loop(0, steps, step, (qk, tx.init(qk)))
  return qk[0], qk[1], offsets


@functools.partial(jax.jit, static_argnames=("heads", "f"))
def closed_impulse(key, x, *, heads: int, f: int):
  """[SIV]: Q, K [heads, D, r] whose bilinear form through x reproduces the target
  logits 1000 H + noise as well as rank r allows."""
  n_tok, d = x.shape
  r = d // heads
  offsets = jnp.asarray(closed_offsets(heads, f))
  target = impulse_targets(offsets, math.isqrt(n_tok))
  noise = jax.random.truncated_normal(key, -2 / 0.6, 2 / 0.6, target.shape) * 0.6
  w = CLOSED_PEAK * target + CLOSED_NOISE * noise * (target == 0)
  # Rank-r pseudo-inverse of x through (x^T x)'s top-r eigenpairs, also dropping
  # directions below CLOSED_RCOND of x's largest singular value: a sin-cos encoding of
  # a small grid is numerically low-rank (~20 directions for 16x16), and inverting its
  # float32 noise would swamp A, whose Frobenius normalisation then flattens the maps.
  u, s, vt = jnp.linalg.svd(x.T @ x)
  keep = (jnp.arange(d) < r) & (s > CLOSED_RCOND ** 2 * s[0])
  s_inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  x_inv = (vt.T * s_inv) @ u.T @ x.T                          # [D, N]
  a = jnp.einsum("dn,hnm,em->hde", x_inv, w, x_inv)           # [heads, D, D]
  u, s, vt = jnp.linalg.svd(a)
  root = jnp.sqrt(s[:, None, :r])
  q = u[:, :, :r] * root
  k = jnp.swapaxes(vt[:, :r], 1, 2) * root
  fro = lambda m: m / jnp.linalg.norm(m, axis=(1, 2), keepdims=True)
  return CLOSED_SCALE * fro(q), CLOSED_SCALE * fro(k), offsets


def _ortho_like(key, d: int, alpha: float, beta: float):
  """SVD factors (L, R), L R = alpha Z + beta I, Z ~ U with variance 1/d (the [SIV]
  default distribution)."""
  z = jax.random.uniform(key, (d, d), jnp.float32, -1.0, 1.0) * math.sqrt(3.0 / d)
  u, s, vt = jnp.linalg.svd(alpha * z + beta * jnp.eye(d))
  root = jnp.sqrt(s)
  return u * root, root[:, None] * vt


def mimetic_qk(key, d: int, heads: int):
  """Per head a fresh 0.7 Z + 0.7 I, truncated to rank r; returns Q, K [heads, D, r]."""
  r = d // heads
  factors = jax.vmap(lambda kk: _ortho_like(kk, d, 0.7, 0.7))(jax.random.split(key, heads))
  return factors[0][:, :, :r], jnp.swapaxes(factors[1][:, :r], 1, 2)


def mimetic_vo(key, d: int):
  """W_v (D, D) and W_o (D, D) with W_v W_o = 0.4 Z - 0.4 I."""
  return _ortho_like(key, d, 0.4, -0.4)


def heads_to_kernel(m):
  """[heads, D, r] -> (D, heads*r), head-major columns."""
  h, d, r = m.shape
  return jnp.transpose(m, (1, 0, 2)).reshape(d, h * r)


def impulse_qk(kind: str, key, pos_embedding, heads: int, eps: float,
               steps: int = FIT_STEPS):
  """The shared (q_kernel, k_kernel) of an impulse kind, each (D, D)."""
  x = pseudo_input(pos_embedding, eps)
  if kind.endswith("_closed"):
    q, k, _ = closed_impulse(key, x, heads=heads, f=window(kind))
  else:
    q, k, _ = fit_impulse(key, x, heads=heads, f=window(kind), steps=steps)
  return heads_to_kernel(q), heads_to_kernel(k)


def layer_kernels(kind: str, key, d: int, heads: int, shared_qk=None) -> dict:
  """One layer's structured kernels: 'q', 'k' (D, D) and, for mimetic, 'v' and 'out'.
  Impulse kinds reuse the model's shared solution; mimetic draws from `key`."""
  if kind == "mimetic":
    k_qk, k_vo = jax.random.split(key)
    q, k = (heads_to_kernel(m) for m in mimetic_qk(k_qk, d, heads))
    v, out = mimetic_vo(k_vo, d)
    return {"q": q, "k": k, "v": v, "out": out}
  if shared_qk is None:
    raise errors.UserError(f"attention_init '{kind}' needs the model's shared query/key "
                     "solution; build it through ViT, which computes it.")
  return {"q": shared_qk[0], "k": shared_qk[1]}


def qkv_kernel_init(base_init, parts: dict | None):
  """The style's fused-qkv initialiser with the q / k (and v) columns replaced; v keeps
  the style's draw unless given (papers.md step 6)."""
  if not parts:
    return base_init

  def init(key, shape, dtype=jnp.float32):
    d = shape[0]
    v = parts.get("v")
    if v is None:
      v = base_init(key, shape, jnp.float32)[:, 2 * d:]
    return jnp.concatenate([parts["q"], parts["k"], v], axis=1).astype(dtype)
  return init


def out_kernel_init(base_init, parts: dict | None):
  if not parts or "out" not in parts:
    return base_init
  return lambda key, shape, dtype=jnp.float32: parts["out"].astype(dtype)
