"""Synthetic, learnable images: for smoke runs, tests and compute benchmarks.

Class c is a fixed random 4x4 colour pattern, upsampled to the image size, plus Gaussian
noise, so a model can learn it (loss falls, accuracy rises) and a broken trainer shows.
Example i of a split depends only on (config.seed, split, i), and train batch s holds
examples s*B .. s*B+B-1 (mod the split size): any process count and any resume point see
the same data.
"""

from __future__ import annotations

import jax
import numpy as np

from convstem_jax import config as config_lib
from convstem_jax.data import common

_SPLIT_IDS = {"train": 0}


class SyntheticSource:

  def __init__(self, config, split: str):
    self.split = split
    self.seed = int(config.seed)
    self.image_size = int(config.image_size)
    self.num_classes = int(config.num_classes)
    self.noise = float(config_lib.get(config, "synthetic_noise"))
    key = "synthetic_train_examples" if split == "train" else "synthetic_eval_examples"
    self.num_examples = int(config.get(key, 50_000 if split == "train" else 1_000))
    templates = np.random.default_rng([self.seed, 12345]).normal(
        size=(self.num_classes, 4, 4, 3)).astype(np.float32)
    rep = -(-self.image_size // 4)
    self.templates = templates.repeat(rep, 1).repeat(rep, 2)[
        :, :self.image_size, :self.image_size]
    self.split_id = _SPLIT_IDS.get(split, 1 + sum(map(ord, split)))

  def _examples(self, index: np.ndarray):
    rngs = [np.random.default_rng([self.seed, self.split_id, int(i)]) for i in index]
    labels = np.array([r.integers(self.num_classes) for r in rngs], np.int32)
    noise = np.stack([r.normal(size=self.templates.shape[1:]) for r in rngs])
    images = self.templates[labels] + self.noise * noise.astype(np.float32)
    return {"image": images.astype(np.float32), "label": labels}

  def train_batches(self, local_batch_size: int, start_step: int = 0):
    """This process's slice of global batch `step`, for step = start_step, ..."""
    global_bs = local_batch_size * jax.process_count()
    first = jax.process_index() * local_batch_size
    step = start_step
    while True:
      # Indices wrap at the split size: with num_examples = batch size every step sees
      # the same batch (the overfitting test).
      index = (np.arange(first, first + local_batch_size) + step * global_bs) % \
          self.num_examples
      yield self._examples(index)
      step += 1

  def eval_batches(self, local_batch_size: int):
    """One padded, masked pass over this process's slice of the split."""
    index = common.process_slice(self.num_examples)
    chunks = (self._examples(index[i:i + local_batch_size])
              for i in range(0, len(index), local_batch_size))
    template = {"image": (self.templates.shape[1:], np.float32), "label": ((), np.int32)}
    return common.pad_batches(chunks, local_batch_size,
                              common.eval_num_batches(self.num_examples, local_batch_size),
                              template)
