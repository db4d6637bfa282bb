"""Position embeddings for another token grid (fine-tuning at another resolution).

A learned embedding [1, prefix + g*g, d] is resampled to [1, prefix + g'*g', d]: the
prefix (class token) rows are kept as they are, the grid is resized bilinearly with
half-pixel centres and no antialiasing, as timm's `resample_abs_pos_embed` and
big_vision's `resample_posemb` do (PyTorch's align_corners=False). So a constant
embedding stays constant, and a linear ramp stays the same ramp between the outermost
old patch centres and is held at its end values beyond them. Fixed sin-cos encodings
are not resampled: the model recomputes them for its grid.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from convstem_jax import errors


def grid_of(tokens: int, prefix: int) -> int | None:
  """The side of a square grid of `tokens - prefix` positions, or None."""
  side = math.isqrt(max(tokens - prefix, 0))
  return side if side * side == tokens - prefix and side else None


def resample_posemb(posemb: np.ndarray, new_tokens: int, prefix: int) -> np.ndarray:
  """[1, prefix + g*g, d] -> [1, new_tokens, d]; raises UserError if not square grids."""
  old, new = grid_of(posemb.shape[1], prefix), grid_of(new_tokens, prefix)
  if old is None or new is None:
    raise errors.UserError(
        f"Cannot resample a position embedding of {posemb.shape[1]} tokens to "
        f"{new_tokens} with {prefix} class token(s): both must be square grids plus the "
        "class token; check the model's pool ('token' has a class token, 'gap' none).")
  d = posemb.shape[-1]
  head, grid = posemb[:, :prefix], posemb[0, prefix:].reshape(old, old, d)
  resized = jax.image.resize(grid.astype(np.float32), (new, new, d), "bilinear",
                             antialias=False)
  return np.concatenate([head, np.asarray(resized).reshape(1, new * new, d)], axis=1)
