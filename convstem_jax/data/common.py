"""Helpers every source shares, without TensorFlow: process slices, seeds, eval padding."""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import jax
import numpy as np


def process_slice(num_examples: int, count: int | None = None,
                  index: int | None = None) -> np.ndarray:
  """Indices of the examples process `index` of `count` reads: every count-th one.

  Strided, so a list sorted by class gives every process every class; the slices are
  disjoint, cover the split, and differ in size by at most one.
  """
  count = jax.process_count() if count is None else count
  index = jax.process_index() if index is None else index
  return np.arange(index, num_examples, count)


def eval_num_batches(num_examples: int, local_batch_size: int,
                     count: int | None = None) -> int:
  """Batches every process yields for one eval pass (same on all processes)."""
  count = jax.process_count() if count is None else count
  largest = -(-num_examples // count)
  return max(1, -(-largest // local_batch_size))


def seed_for(*parts) -> int:
  """A stable 63-bit seed from (config.seed, purpose, process, ...)."""
  digest = hashlib.sha256(repr(parts).encode()).digest()
  return int.from_bytes(digest[:8], "little") >> 1


def pad_batches(batches: Iterable[dict[str, np.ndarray]], local_batch_size: int,
                num_batches: int, template: dict[str, tuple[tuple, np.dtype]]
                ) -> Iterator[dict[str, np.ndarray]]:
  """Whole batches with a float32 `mask` (0 = padding), exactly `num_batches` of them.

  `batches` may end with a short batch; `template` gives each key's per-example shape and
  dtype for the all-padding batches a process with fewer examples adds.
  """
  done = 0
  for batch in batches:
    n = len(batch["label"])
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if n < local_batch_size:
        v = np.concatenate([v, np.zeros((local_batch_size - n, *v.shape[1:]), v.dtype)])
      out[k] = v
    out["mask"] = (np.arange(local_batch_size) < n).astype(np.float32)
    done += 1
    yield out
  for _ in range(num_batches - done):
    out = {k: np.zeros((local_batch_size, *shape), dtype)
           for k, (shape, dtype) in template.items()}
    out["mask"] = np.zeros(local_batch_size, np.float32)
    yield out
