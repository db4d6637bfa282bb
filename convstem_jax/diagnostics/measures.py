"""Per-layer measures of patch tokens and attention maps, as numpy functions.

Definitions (../shared/reference/diagnostics.md has the sources):

- `token_similarity(tokens)`: Gong et al. 2021 ("Vision Transformers with Patch
  Diversification", arXiv 2104.12753): for the n patch tokens of one image, the mean
  over pairs i != j of |cos(h_i, h_j)|, then averaged over images. Wang et al. (scaled
  ReLU) publish no formula for their "token diversity", so this is the one used; the
  diagonal is left out and the absolute value taken (the public Diverse-ViT code keeps
  the diagonal and the sign; we follow the paper's formula).
- `rank_collapse_ratio(tokens)`: Dong et al. 2021: ||X - 1 x̄ᵀ||_F / ||X||_F per image
  (x̄ the mean token), averaged over images; 0 when all tokens are equal.
- `mean_attention_distance(weights, grid, patch, prefix)`: Dosovitskiy et al. 2021
  (Fig. 7): per head, the attention-weighted distance in pixels between the query's and
  each key's patch centre, averaged over queries and images. With class (prefix)
  tokens their rows and columns are dropped and each query's row renormalised over the
  patch keys (public implementations slice without renormalising, which biases the
  distance down); `class_token_mass` reports what the renormalisation removed.
- `attention_entropy(weights, prefix)`: per head, the mean over patch queries of the
  entropy (nats) of the renormalised patch-to-patch row; 0 for one-hot rows, log(n) for
  uniform ones.

Inputs: tokens [images, n, d] (patch tokens only); weights [images, heads, T, T] with
T = prefix + grid^2, rows the queries.
"""

from __future__ import annotations

import numpy as np


def token_similarity(tokens: np.ndarray) -> float:
  x = np.asarray(tokens, np.float64)
  unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = np.abs(np.einsum("bid,bjd->bij", unit, unit))
  n = x.shape[1]
  off_diagonal = cos.sum((1, 2)) - np.trace(cos, axis1=1, axis2=2)
  return float(np.mean(off_diagonal / (n * (n - 1))))


def rank_collapse_ratio(tokens: np.ndarray) -> float:
  x = np.asarray(tokens, np.float64)
  residual = x - x.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(x.reshape(len(x), -1), axis=1)
  return float(np.mean(np.linalg.norm(residual.reshape(len(x), -1), axis=1) /
                       np.maximum(norms, 1e-12)))


def patch_attention(weights: np.ndarray, prefix: int) -> np.ndarray:
  """[images, heads, n, n] patch-to-patch rows, renormalised to sum to 1."""
  w = np.asarray(weights, np.float64)[:, :, prefix:, prefix:]
  return w / np.maximum(w.sum(-1, keepdims=True), 1e-30)


def class_token_mass(weights: np.ndarray, prefix: int) -> np.ndarray:
  """[heads]: mean attention of the patch queries on the prefix keys (0 without)."""
  w = np.asarray(weights, np.float64)
  return w[:, :, prefix:, :prefix].sum(-1).mean((0, 2)) if prefix else np.zeros(w.shape[1])


def patch_distances(grid: int, patch: float) -> np.ndarray:
  """[n, n] pixel distances between patch centres on a grid x grid layout."""
  y, x = np.divmod(np.arange(grid * grid), grid)
  return patch * np.hypot(y[:, None] - y[None], x[:, None] - x[None])


def mean_attention_distance(weights: np.ndarray, grid: int, patch: float,
                            prefix: int = 0) -> np.ndarray:
  """[heads] mean attention distance in pixels (module docstring)."""
  w = patch_attention(weights, prefix)
  if w.shape[-1] != grid * grid:
    raise ValueError(f"{w.shape[-1]} patch keys is not a {grid}x{grid} grid")
  return np.einsum("bhqk,qk->bhq", w, patch_distances(grid, patch)).mean((0, 2))


def attention_entropy(weights: np.ndarray, prefix: int = 0) -> np.ndarray:
  """[heads] mean entropy in nats of the renormalised patch rows."""
  w = patch_attention(weights, prefix)
  return -(w * np.log(np.where(w > 0, w, 1.0))).sum(-1).mean((0, 2))
