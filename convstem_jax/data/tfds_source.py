"""tensorflow-datasets sources: imagenet2012, imagenet_v2, cifar10, cifar100, svhn_cropped.

Data directory: `config.data_dir`, else $TFDS_DATA_DIR, else tfds' default
(~/tensorflow_datasets); local or gs://. Nothing is ever downloaded here: a dataset that
is not prepared in that directory fails at once with a sentence saying how to prepare it.

Each process reads `tfds.even_splits(split, process_count)[process_index]`. Images stay
encoded until the preprocessing pipeline, so `inception_crop` can decode just the crop.

Train stream: shuffled files (seeded), a shuffle buffer (`config.shuffle_buffer`, default
50,000 or the split size) before `repeat`, augmentation seeded by (config.seed, process,
position). Resuming: a big tfds split cannot be skipped into cheaply, so
`train_batches(b, start_step=s)` starts a fresh stream seeded by (config.seed, process,
s): deterministic for a given resume step, but not the continuation of the
uninterrupted stream (file sources such as ELPV and folders resume exactly).

Repeated augmentation (`config.repeated_aug` = r > 1, DeiT's): each source example is
read once and appears r times in a row, each copy with its own augmentation seed (its
stream position). The epoch length stays the split size n (this process's share): an
epoch is the next ceil(n / r) examples of the shuffled, repeated source stream, the last
of them repeated only n - (ceil(n / r) - 1) r times. The source stream runs on across
epochs, so each epoch reads a fresh part of the split and r epochs read it about once
(unlike restarting the read each epoch, which with a buffered shuffle would favour the
first files). Epochs count from the start of the stream, i.e. from `start_step` on resume.
"""

from __future__ import annotations

import os

from convstem_jax.data import common
from convstem_jax.data.files import (eval_batches_of, import_tf, pp_spec,
                                     train_batches_of)
from convstem_jax import config as config_lib
from convstem_jax import errors

_PREPARE = {
    "imagenet2012": "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                    "image-net.org into {dir}/downloads/manual, then run "
                    "`tfds build imagenet2012 --data_dir={dir}`",
}


def data_dir_for(config) -> str | None:
  return config_lib.get(config, "data_dir") or os.environ.get("TFDS_DATA_DIR") or None


class TfdsSource:

  def __init__(self, config, split: str, name: str):
    import jax  # pylint: disable=g-import-not-at-top
    import_tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.tfds = tfds
    self.config, self.split, self.name = config, split, name
    self.seed = int(config.seed)
    self.data_dir = data_dir_for(config)
    try:
      self.builder = tfds.builder(name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise errors.UserError(f"tensorflow-datasets has no dataset '{name}'; check the name in "
                       "config.dataset.") from e
    self.count, self.index = jax.process_count(), jax.process_index()
    self.local_split = tfds.even_splits(split, n=self.count)[self.index]
    self._dataset(shuffle=False)  # fails now, not at the first batch, if data is missing
    self.num_examples = self._count(split)
    self._local_examples = None

  def _dataset(self, shuffle: bool, seed: int = 0):
    tfds = self.tfds
    decoders = ({"image": tfds.decode.SkipDecoding()}
                if "image" in self.builder.info.features else None)
    try:
      return self.builder.as_dataset(
          split=self.local_split, shuffle_files=shuffle, decoders=decoders,
          read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=False))
    except (AssertionError, FileNotFoundError) as e:
      where = self.data_dir or os.path.dirname(os.path.dirname(self.builder.data_dir))
      how = _PREPARE.get(self.name, "prepare it with `tfds build {name} --data_dir={dir}` "
                         "on a machine with internet access").format(dir=where,
                                                                      name=self.name)
      raise errors.MissingInputError(
          f"Dataset '{self.name}' (split '{self.split}') was not found in {where}: {how}, "
          "or point --config.data_dir (or TFDS_DATA_DIR) at the directory that holds "
          "it.") from e

  def _count(self, split: str) -> int:
    try:
      n = self.builder.info.splits[split].num_examples
      if n:
        return int(n)
    except (KeyError, ValueError, TypeError):
      pass
    # No split metadata (e.g. under tfds.testing.mock_data): count this slice's records
    # and assume equal slices, which holds for even_splits up to one example.
    ds = self._dataset(shuffle=False)
    n = int(ds.cardinality())
    if n < 0:
      n = int(ds.reduce(0, lambda c, _: c + 1))
    return n * self.count

  def local_examples(self) -> int:
    """Examples in this process's slice of the split."""
    if self._local_examples is None:
      n = 0
      try:
        n = int(self.builder.info.splits[self.local_split].num_examples)
      except (KeyError, ValueError, TypeError, AttributeError):
        pass
      if not n:
        ds = self._dataset(shuffle=False)
        n = int(ds.cardinality())
        if n < 0:
          n = int(ds.reduce(0, lambda c, _: c + 1))
      self._local_examples = n
    return self._local_examples

  def _repeat_each(self, tf, ds, repeats: int):
    """Each example of the (infinite) stream `ds` `repeats` times in a row, in epochs of
    exactly local_examples() (see the module docstring)."""
    n = self.local_examples()
    per_epoch = -(-n // repeats)
    last = n - (per_epoch - 1) * repeats  # copies of an epoch's last example, 1..repeats

    def copies(k, f):
      times = tf.where(k % per_epoch == per_epoch - 1, tf.constant(last, tf.int64),
                       tf.constant(repeats, tf.int64))
      return tf.data.Dataset.from_tensors(f).repeat(times)
    return ds.enumerate().flat_map(copies)

  def train_batches(self, local_batch_size: int, start_step: int = 0):
    tf = import_tf()
    from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
    fn = pp.build(pp_spec(self.config, train=True))
    order_seed = common.seed_for(self.seed, "order", self.split, self.index, start_step)
    aug_seed = common.seed_for(self.seed, "augment", self.split, self.index, start_step)
    ds = self._dataset(shuffle=True, seed=order_seed % 2 ** 31)
    buffer = int(config_lib.get(self.config, "shuffle_buffer"))
    ds = ds.shuffle(max(1, min(buffer, self.num_examples // self.count + 1)),
                    seed=order_seed % 2 ** 31, reshuffle_each_iteration=True).repeat()
    repeats = max(1, int(config_lib.get(self.config, "repeated_aug")))
    if repeats > 1:
      ds = self._repeat_each(tf, ds, repeats)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(2 ** 62), ds).map(
        lambda p, f: fn({"image": f["image"], "label": f["label"]},
                        tf.stack([tf.constant(aug_seed, tf.int64), p])),
        num_parallel_calls=tf.data.AUTOTUNE)
    return train_batches_of(tf, ds, local_batch_size, self.config)

  def eval_batches(self, local_batch_size: int):
    tf = import_tf()
    from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
    fn = pp.build(pp_spec(self.config, train=False))
    ds = self._dataset(shuffle=False).map(
        lambda f: fn({"image": f["image"], "label": f["label"]}, None),
        num_parallel_calls=tf.data.AUTOTUNE)
    return eval_batches_of(tf, ds, local_batch_size, self.config,
                           common.eval_num_batches(self.num_examples, local_batch_size,
                                                   self.count))
