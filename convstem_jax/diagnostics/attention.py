"""How much attention maps look like impulse filters (papers.md section 3).

`score_attention(weights, grid, window)` scores maps [batch, heads, queries, keys] over a
g x g token grid: per head the offset (m, n) inside the window that is most often the
argmax over interior queries (those whose whole window lies inside the grid), how often
it is (`argmax_fraction`), the mean attention on it (`mass`; uniform is 1/g^2), and the
mean attention of every query on itself (`self_attention`).

`score_model(model, variables)` runs a model, built with `capture_attention=True`, on a
blank (zero) image and scores every block. At initialisation the stem's output is then
zero (patchify and conv-stem projections start with zero bias, BatchNorm in eval mode
with fresh statistics and LayerNorm map zeros to zeros), so the tokens are the position
encoding alone. On a trained checkpoint the stem's biases and BatchNorm statistics add a
constant token, so the maps are those of "position plus a blank image".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class HeadScore:
  offset: tuple[int, int]   # (rows, columns) from query to key
  argmax_fraction: float
  mass: float
  self_attention: float


def _window_offsets(window: int) -> list[tuple[int, int]]:
  half = window // 2
  return [(m, n) for m in range(-half, half + 1) for n in range(-half, half + 1)]


def score_attention(weights, grid: int, window: int = 5) -> list[HeadScore]:
  """Scores [batch, heads, N, N] maps (N = grid^2, no class token) per head."""
  w = np.asarray(weights, np.float32)
  if w.ndim != 4 or w.shape[2] != grid * grid or w.shape[3] != grid * grid:
    raise ValueError(f"Expected attention maps [batch, heads, {grid * grid}, "
                     f"{grid * grid}] for a {grid}x{grid} grid, got {w.shape}; a model "
                     "with a class token has one more token (drop it first).")
  half = window // 2
  if grid <= 2 * half:
    raise ValueError(f"A {grid}x{grid} grid has no interior queries for a {window}x"
                     f"{window} window; use a smaller window.")
  r, c = np.divmod(np.arange(grid * grid), grid)
  inner = np.flatnonzero((r >= half) & (r < grid - half) & (c >= half) & (c < grid - half))
  argmax = w[:, :, inner].argmax(-1)                                   # [B, H, Q]
  self_att = np.diagonal(w, axis1=2, axis2=3).mean((0, 2))             # [H]
  scores = []
  for h in range(w.shape[1]):
    best = None
    for m, n in _window_offsets(window):
      key = inner + m * grid + n
      frac = float((argmax[:, h] == key).mean())
      mass = float(w[:, h, inner, key].mean())
      if best is None or (frac, mass) > (best.argmax_fraction, best.mass):
        best = HeadScore((m, n), frac, mass, float(self_att[h]))
    scores.append(best)
  return scores


def blank_image_attention(model, variables, batch: int = 1) -> list[jax.Array]:
  """Block-by-block attention maps [batch, heads, N, N] of `model` on a zero image.

  `variables` are the model's variables ({'params': ..., 'batch_stats': ...}) or bare
  params, from `model.init` or a checkpoint."""
  if "params" not in variables:
    variables = {"params": variables}
  model = model.clone(capture_attention=True)
  x = jnp.zeros((batch, model.img_size, model.img_size, 3), jnp.float32)
  _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  inter = state["intermediates"]
  return [inter[f"block_{i}"]["attn"]["attention_weights"][0] for i in range(model.depth)]


def score_model(model, variables=None, window: int = 5, seed: int = 0,
                blocks=None) -> dict[int, list[HeadScore]]:
  """Scores of each block (or of `blocks`) on a blank image; with no `variables`, those
  of `model.init` with `seed`, i.e. the initialisation itself."""
  if model.pool == "token":
    raise ValueError("score_model needs a model without a class token (pool='gap').")
  if variables is None:
    x = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
    variables = model.init(jax.random.PRNGKey(seed), x, train=False)
  maps = blank_image_attention(model, variables)
  blocks = range(model.depth) if blocks is None else blocks
  return {i: score_attention(maps[i], model.grid, window) for i in blocks}
