"""A split held as a list of image files and labels, read with tf.data (ELPV, folders).

Train stream (per process): this process's slice of the files (every count-th one), in a
fresh permutation each epoch (shuffle before repeat), seeded by (config.seed, process,
epoch); augmentation seeded by (config.seed, process, position in the stream). Position
and epoch follow from the step, so `train_batches(b, start_step=s)` skips straight to
batch s without reading the earlier ones (with `config.repeated_aug` = r > 1, DeiT's
repeated augmentation, an epoch is ceil(n / r) examples each r times in a row, with
different augmentations; the epoch length stays n): a resumed run sees exactly the batches the
uninterrupted run would have seen (for the same process count and batch size).
"""

from __future__ import annotations

import os
import weakref
from typing import Sequence

import numpy as np

from convstem_jax.data import common
from convstem_jax import config as config_lib
from convstem_jax import errors


def import_tf():
  """TensorFlow for tf.data only: never let it claim an accelerator."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass  # already initialised, or no such device type
  return tf


DEFAULT_PP_TRAIN = "decode|inception_crop({size})|flip_lr|value_range(-1, 1)"
DEFAULT_PP_EVAL = "decode|resize_small({eval_resize})|central_crop({size})|value_range(-1, 1)"


def pp_spec(config, train: bool) -> str:
  """config.pp_train / pp_eval (or the defaults above) with the run's sizes filled in.

  `{size}` is config.image_size and `{eval_resize}` the short side an eval image is
  resized to before its central crop (size / 0.875, ImageNet's 224 -> 256), so a spec
  written with them follows --config.image_size.
  """
  spec = config.get("pp_train" if train else "pp_eval", "") or (
      DEFAULT_PP_TRAIN if train else DEFAULT_PP_EVAL)
  size = int(config.image_size)
  if size <= 0:
    raise errors.UserError(f"config.image_size must be positive, got {size}.")
  return spec.replace("{size}", str(size)).replace("{eval_resize}",
                                                    str(int(round(size / 0.875))))


def cores() -> int:
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _threads(config) -> int:
  """config.data_threads, or (0) the cores."""
  return int(config_lib.get(config, "data_threads")) or cores()


def parallelism(tf, config) -> int:
  """num_parallel_calls of every map / interleave: tf.data.AUTOTUNE with
  config.data_autotune, else one call per thread of the pool. (With the autotuner off,
  AUTOTUNE would mean min(16, threads): too few on a large host.)"""
  return tf.data.AUTOTUNE if config_lib.get(config, "data_autotune") else _threads(config)


def options(tf, config):
  opts = tf.data.Options()
  opts.deterministic = True
  # The autotuner is off by default: on the 2-core VM of docs/benchmarks.md it held the
  # eval stream to 200 images/s on one core with the core 40% idle (335 without it),
  # and the train stream 5% below a fixed parallelism. Results do not depend on it.
  opts.autotune.enabled = bool(config_lib.get(config, "data_autotune"))
  if int(config_lib.get(config, "data_threads")):
    opts.threading.private_threadpool_size = _threads(config)
  return opts


class FileSource:
  """`Source` over `paths[i]` with integer `labels[i]` (the whole split, all processes)."""

  def __init__(self, config, split: str, paths: Sequence[str], labels: Sequence[int]):
    self.config, self.split = config, split
    self.seed = int(config.seed)
    self.paths = np.asarray([str(p) for p in paths])
    self.labels = np.asarray(labels, np.int32)
    self.num_examples = len(self.paths)
    self.local = common.process_slice(self.num_examples)

  def __getstate__(self):  # what a worker gets (data/workers.py): not the eval workers
    return {k: v for k, v in self.__dict__.items() if k != "_eval_pool"}

  def _pipeline(self, tf, train: bool):
    from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
    fn = pp.build(pp_spec(self.config, train))
    paths = tf.constant(self.paths[self.local])
    labels = tf.constant(self.labels[self.local])

    def load(i, seed):
      data = tf.io.read_file(tf.gather(paths, i))
      return fn({"image": data, "label": tf.gather(labels, i)}, seed)
    return load

  def train_dataset(self, tf, local_batch_size: int, start_step: int, process: int,
                    rows: tuple[int, int] | None = None):
    """The preprocessed examples of process `process`'s train stream from batch
    `start_step` on; with `rows` = (lo, hi), only rows lo..hi-1 of each batch (the share
    of one input worker, data/workers.py), with the same seeds."""
    n = len(self.local)
    order_seed = common.seed_for(self.seed, "order", self.split, process)
    aug_seed = common.seed_for(self.seed, "augment", self.split, process)
    start = int(start_step) * local_batch_size
    first_epoch, offset = divmod(start, n)

    repeats = max(1, int(config_lib.get(self.config, "repeated_aug")))

    def epoch(e):
      perm = tf.random.experimental.stateless_shuffle(
          tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(order_seed, tf.int64), e]))
      if repeats > 1:  # DeiT's repeated augmentation: ceil(n / r) examples, r times each
        perm = tf.reshape(tf.tile(perm[:-(-n // repeats), None], [1, repeats]), [-1])[:n]
      return tf.data.Dataset.from_tensor_slices(perm)

    index = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)
    position = tf.data.Dataset.range(start, 2 ** 62)
    ds = tf.data.Dataset.zip(position, index)
    if rows is not None:
      ds = ds.filter(lambda p, i: _in_rows(p, local_batch_size, rows))
    load = self._pipeline(tf, train=True)
    return ds.map(lambda p, i: load(i, tf.stack([tf.constant(aug_seed, tf.int64), p])),
                  num_parallel_calls=parallelism(tf, self.config))

  def train_batches(self, local_batch_size: int, start_step: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    if len(self.local) == 0:
      raise errors.UserError(f"Split '{self.split}' has {self.num_examples} examples, too few "
                       f"for {jax.process_count()} processes.")
    process = jax.process_index()
    workers = data_workers(self.config)
    if workers:
      from convstem_jax.data import workers as workers_lib  # pylint: disable=g-import-not-at-top
      task = dict(source=self, batch_size=local_batch_size,
                  start_step=int(start_step), process=process)
      return workers_lib.batches(task, workers)
    tf = import_tf()
    ds = self.train_dataset(tf, local_batch_size, start_step, process)
    return train_batches_of(tf, ds, local_batch_size, self.config)

  def eval_dataset(self, tf, local_batch_size: int, rows: tuple[int, int] | None = None):
    """This process's preprocessed eval examples in order; with `rows` = (lo, hi), only
    rows lo..hi-1 of each batch of `local_batch_size` (one input worker's share)."""
    ds = tf.data.Dataset.range(len(self.local))
    if rows is not None:
      ds = ds.filter(lambda p: _in_rows(p, local_batch_size, rows))
    load = self._pipeline(tf, train=False)
    return ds.map(lambda i: load(i, None), num_parallel_calls=parallelism(tf, self.config))

  def eval_batches(self, local_batch_size: int):
    num_batches = common.eval_num_batches(self.num_examples, local_batch_size)
    workers = data_workers(self.config)
    if workers and len(self.local):
      pool = self._eval_workers(local_batch_size, workers)
      return common.pad_batches(pool.one_pass(), local_batch_size, num_batches,
                                pool.template())
    tf = import_tf()
    return eval_batches_of(tf, self.eval_dataset(tf, local_batch_size), local_batch_size,
                           self.config, num_batches)

  def _eval_workers(self, local_batch_size: int, workers: int):
    """The eval workers of this source for this batch size and count, started once and
    kept for the next passes (data/workers.py); they end with the source."""
    from convstem_jax.data import workers as workers_lib  # pylint: disable=g-import-not-at-top
    key = (local_batch_size, workers)
    pool = self.__dict__.get("_eval_pool")
    if pool is None or pool.closed or pool.key != key:
      if pool is not None:
        pool.close()
      pool = workers_lib.EvalWorkers(dict(source=self, batch_size=local_batch_size),
                                     workers)
      self._eval_pool = pool
      weakref.finalize(self, pool.close)
    return pool


def _in_rows(position, batch_size: int, rows: tuple[int, int]):
  """Whether stream position `position` falls in rows [lo, hi) of its batch."""
  row = position % batch_size
  return (row >= rows[0]) & (row < rows[1])


def data_workers(config) -> int:
  """config.data_workers: processes making the train stream (0 = none, tf.data in this
  process; -1 = one per core)."""
  n = int(config_lib.get(config, "data_workers"))
  if n < -1:
    raise errors.UserError(f"config.data_workers must be -1 (one per core), 0 (none) or a "
                           f"count, not {n}.")
  return cores() if n == -1 else n


def one_thread(config):
  """`config` with one tf.data thread and no autotuner: an input worker's."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data_threads, config.data_autotune = 1, False
  return config


def train_batches_of(tf, ds, local_batch_size: int, config):
  """Preprocessed examples -> an endless stream of whole numpy batches."""
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(2)
  ds = ds.with_options(options(tf, config))
  return (_keep(b) for b in ds.as_numpy_iterator())


def eval_batches_of(tf, ds, local_batch_size: int, config, num_batches: int):
  """Preprocessed examples -> `num_batches` numpy batches, padded and masked."""
  ds = ds.batch(local_batch_size).prefetch(2).with_options(options(tf, config))
  return common.pad_batches((_keep(b) for b in ds.as_numpy_iterator()), local_batch_size,
                            num_batches, _template(ds))


def _keep(batch):
  return {"image": batch["image"], "label": batch["label"]}


def _template(ds):
  spec = ds.element_spec
  return {k: (tuple(spec[k].shape[1:]), spec[k].dtype.as_numpy_dtype)
          for k in ("image", "label")}
