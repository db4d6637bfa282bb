"""tensorflow-datasets sources: imagenet2012, imagenet_v2, cifar10, cifar100, svhn_cropped.

Data directory: `config.data_dir`, else $TFDS_DATA_DIR, else tfds' default
(~/tensorflow_datasets); local or gs://. Nothing is ever downloaded here: a dataset that
is not prepared in that directory fails at once with a sentence saying how to prepare it.

Each process reads `tfds.even_splits(split, process_count)[process_index]`. Images stay
encoded until the preprocessing pipeline, so `inception_crop` can decode just the crop.

Train stream, a function of (config.seed, process index, process count, step), as for
file sources: epoch e of this process is its slice read once in an order drawn from
(seed, process, count, e) - its shards (tfds file instructions) shuffled and read
interleaved, then a shuffle buffer (`config.shuffle_buffer`, default 50,000, at most the
slice) - and augmentation is seeded by the example's position in the stream. So
`train_batches(b, start_step=s)` starts at epoch s*b // n and skips the s*b mod n
records before it (raw records, read but not decoded or augmented): a resumed run sees
exactly the batches of the uninterrupted one. Resuming costs reading at most one epoch of
this process's slice (for ImageNet, one pass over its training records split over the
processes, read in parallel; not timed here). With another process count the slices
differ: the run continues on a stream as deterministic, but not the same one (the
partial epoch may repeat or miss examples).
Datasets stored in another format than TFRecord, and tfds.testing.mock_data, keep
one fixed read order that the per-epoch buffer shuffles.

Repeated augmentation (`config.repeated_aug` = r > 1, DeiT's): an epoch is the first
ceil(n / r) examples of the epoch's order, each r times in a row with its own
augmentation (the last one only n - (ceil(n / r) - 1) r times): the epoch length stays
the slice size n, as DeiT's RASampler, and as file sources do.
"""

from __future__ import annotations

import os

from convstem_jax.data import common
from convstem_jax.data.files import (eval_batches_of, import_tf, parallelism, pp_spec,
                                     train_batches_of)
from convstem_jax import config as config_lib
from convstem_jax import errors

_PREPARE = {
    "imagenet2012": "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                    "image-net.org into {dir}/downloads/manual, then run "
                    "`tfds build imagenet2012 --data_dir={dir}`",
}


def tf_exists(path: str) -> bool:
  return import_tf().io.gfile.exists(path)


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

  def _shards(self):
    """This process's (file, skip, take) reading instructions, or None when the records
    cannot be read file by file (another file format, or tfds.testing.mock_data)."""
    try:
      if self.builder.info.file_format != self.tfds.core.FileFormat.TFRECORD:
        return None
      instructions = self.builder.info.splits[self.local_split].file_instructions
    except (KeyError, ValueError, TypeError, AttributeError):
      return None
    rows = [(f.filename, f.skip, f.take) for f in instructions if f.take != 0]
    if not rows or not all(tf_exists(f) for f, _, _ in rows[:1]):
      return None
    return rows

  def _epoch(self, tf, seed, shards, fixed_order):
    """One pass over this process's slice in an order that is a function of `seed` (an
    int64 tensor): `shards` shuffled and interleaved, else `fixed_order` (a dataset)."""
    if shards is None:
      ds = fixed_order
    else:
      files, skips, takes = (list(x) for x in zip(*shards))
      decoders = ({"image": self.tfds.decode.SkipDecoding()}
                  if "image" in self.builder.info.features else None)
      features = self.builder.info.features
      order = tf.data.Dataset.from_tensor_slices(
          (files, tf.constant(skips, tf.int64), tf.constant(takes, tf.int64)))
      order = order.shuffle(len(files), seed=seed)
      ds = order.interleave(
          lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take),
          cycle_length=min(16, len(files)), block_length=1,
          num_parallel_calls=parallelism(tf, self.config), deterministic=True)
      ds = ds.map(lambda r: features.deserialize_example(r, decoders=decoders),
                  num_parallel_calls=parallelism(tf, self.config), deterministic=True)
    buffer = int(config_lib.get(self.config, "shuffle_buffer"))
    return ds.shuffle(max(1, min(buffer, self.local_examples())), seed=seed,
                      reshuffle_each_iteration=False)

  def train_batches(self, local_batch_size: int, start_step: int = 0):
    tf = import_tf()
    from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
    fn = pp.build(pp_spec(self.config, train=True))
    n = self.local_examples()
    if n == 0:
      raise errors.UserError(f"Split '{self.split}' has {self.num_examples} examples, too "
                             f"few for {self.count} processes.")
    me = (self.split, self.index, self.count)
    order_seed = common.seed_for(self.seed, "order", *me) % 2 ** 31
    aug_seed = common.seed_for(self.seed, "augment", *me)
    start = int(start_step) * local_batch_size
    first_epoch, offset = divmod(start, n)
    repeats = max(1, int(config_lib.get(self.config, "repeated_aug")))
    per_epoch = -(-n // repeats)
    last = n - (per_epoch - 1) * repeats  # copies of an epoch's last example, 1..repeats

    shards = self._shards()
    fixed_order = self._dataset(shuffle=False) if shards is None else None

    def epoch(e):
      ds = self._epoch(tf, tf.constant(order_seed, tf.int64) * 1_000_003 + e, shards,
                       fixed_order)
      ds = ds.take(per_epoch)
      if repeats > 1:
        ds = ds.enumerate().flat_map(lambda k, f: tf.data.Dataset.from_tensors(f).repeat(
            tf.where(k == per_epoch - 1, tf.constant(last, tf.int64),
                     tf.constant(repeats, tf.int64))))
      return ds

    examples = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, 2 ** 62), examples).map(
        lambda p, f: fn({"image": f["image"], "label": f["label"]},
                        tf.stack([tf.constant(aug_seed, tf.int64), p])),
        num_parallel_calls=parallelism(tf, self.config))
    return train_batches_of(tf, ds, local_batch_size, self.config)

  def eval_batches(self, local_batch_size: int):
    tf = import_tf()
    from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
    fn = pp.build(pp_spec(self.config, train=False))
    ds = self._dataset(shuffle=False).map(
        lambda f: fn({"image": f["image"], "label": f["label"]}, None),
        num_parallel_calls=parallelism(tf, self.config))
    return eval_batches_of(tf, ds, local_batch_size, self.config,
                           common.eval_num_batches(self.num_examples, local_batch_size,
                                                   self.count))
