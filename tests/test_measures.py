"""The diagnostics' measures against closed forms (convstem_jax/diagnostics/measures)."""

import numpy as np
import pytest

from convstem_jax.diagnostics import measures


def test_token_similarity_of_identical_and_orthogonal_tokens():
  rng = np.random.default_rng(0)
  same = np.repeat(rng.normal(size=(3, 1, 16)), 9, axis=1)
  assert measures.token_similarity(same) == pytest.approx(1.0, abs=1e-12)
  flipped = same * np.where(np.arange(9) % 2, -1, 1)[None, :, None]  # |cos| ignores sign
  assert measures.token_similarity(flipped) == pytest.approx(1.0, abs=1e-12)
  orthogonal = np.eye(16)[None, :9] * rng.uniform(1, 3, size=(2, 9, 1))
  assert measures.token_similarity(orthogonal) == 0.0


def test_rank_collapse_ratio():
  rng = np.random.default_rng(1)
  same = np.repeat(rng.normal(size=(2, 1, 8)), 5, axis=1)
  assert measures.rank_collapse_ratio(same) == pytest.approx(0.0, abs=1e-12)
  centred = rng.normal(size=(2, 6, 8))
  centred -= centred.mean(1, keepdims=True)
  assert measures.rank_collapse_ratio(centred) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("grid,patch,want", [(14, 16, 116.5), (16, 2, 16.7)])
def test_uniform_attention_distance_is_the_grids_mean_pair_distance(grid, patch, want):
  n = grid * grid
  uniform = np.full((1, 2, n, n), 1.0 / n)
  got = measures.mean_attention_distance(uniform, grid, patch)
  y, x = np.divmod(np.arange(n), grid)  # mean over all ordered pairs, self included
  pairs = np.hypot(y[:, None] - y, x[:, None] - x).mean() * patch
  np.testing.assert_allclose(got, pairs, rtol=1e-12)
  assert got[0] == pytest.approx(want, abs=0.05)  # diagnostics.md calibration
  assert measures.attention_entropy(uniform) == pytest.approx(np.log(n), rel=1e-12)


def test_impulse_at_one_patch_gives_the_patch_size_and_zero_entropy():
  grid, patch = 6, 16
  n = grid * grid
  w = np.zeros((1, 1, 1 + n, 1 + n))
  w[0, 0, 0, 0] = 1.0  # the class token's own row: dropped
  for q in range(n):
    y, x = divmod(q, grid)
    target = q + 1 if x + 1 < grid else q - 1  # one patch to the right (left at the edge)
    w[0, 0, 1 + q, 1 + target] = 0.7
    w[0, 0, 1 + q, 0] = 0.3  # mass on the class token, removed by renormalising
  assert measures.mean_attention_distance(w, grid, patch, prefix=1)[0] == patch
  assert measures.attention_entropy(w, prefix=1)[0] == 0.0
  assert measures.class_token_mass(w, prefix=1)[0] == pytest.approx(0.3)
  # Slicing without renormalising (the common bug) would report 0.7 x 16 px.
  assert (w[0, 0, 1:, 1:] * measures.patch_distances(grid, patch)).sum(-1).mean() == \
      pytest.approx(0.7 * patch)
