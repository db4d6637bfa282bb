"""A real tfds dataset on disk for tests: prepared offline, read back by name."""

import numpy as np
import tensorflow_datasets as tfds


class IdentityImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """`train` / `test` splits of 8x8 images; train image i is the constant 10 i + 5 (its
  identity) with label i mod 10."""
  VERSION = tfds.core.Version("1.0.0")
  TRAIN, TEST = 20, 12

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(self.TRAIN)),
            "test": self._generate_examples(range(self.TRAIN, self.TRAIN + self.TEST))}

  def _generate_examples(self, ids):
    for i in ids:
      value = 10 * i + 5 if i < self.TRAIN else 10 * (i - self.TRAIN) + 6
      yield i, {"image": np.full((8, 8, 3), value % 256, np.uint8), "label": i % 10}


def prepare(root, shards: int = 4) -> str:
  """Builds `identity_images` under `root` (TFRecords, `shards` per split); returns the
  data_dir to pass as --config.data_dir with dataset 'tfds:identity_images'."""
  IdentityImages(data_dir=str(root)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=shards))
  return str(root)
