"""ELPV: 2,624 real 300x300 grayscale electroluminescence images of solar cells.

Installed offline with `pip install elpv-dataset` (images and labels.csv inside the
package; licence CC BY-NC-SA 4.0; Deitsch et al., Solar Energy 2019). Four classes from
the defect probability: p in {0, 1/3, 2/3, 1} -> class round(3 p). Images are grayscale;
`decode` makes them 3 channels.

Split: a fixed stratified split, 25% test, stratified by (class, cell type mono/poly),
drawn with numpy seed `SPLIT_SEED` = 0 whatever `config.seed` is, so every run and every
seed is scored on the same 654 test images (1,970 train; 25% of each stratum, rounded).
Splits: 'train', 'test'.
"""

from __future__ import annotations

import os

import numpy as np

from convstem_jax.data.files import FileSource
from convstem_jax import config as config_lib
from convstem_jax import errors

SPLIT_SEED = 0
TEST_FRACTION = 0.25
NUM_CLASSES = 4


def package_dir() -> str:
  try:
    import elpv_dataset  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingInputError(
        "Dataset 'elpv' is not installed in this Python environment; install it with "
        "`pip install elpv-dataset` (about 90 MB, no other downloads).") from e
  return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def read_table(data_dir: str | None = None):
  """(paths, labels, cell types) of all 2,624 images, in labels.csv order."""
  data_dir = data_dir or package_dir()
  csv = os.path.join(data_dir, "labels.csv")
  if not os.path.exists(csv):
    raise errors.MissingInputError(f"Dataset 'elpv': no labels.csv in {data_dir}; reinstall it "
                            "with `pip install --force-reinstall elpv-dataset`.")
  paths, probs, types = [], [], []
  with open(csv) as f:
    for line in f:
      if line.strip():
        path, prob, kind = line.split()
        paths.append(os.path.join(data_dir, path))
        probs.append(float(prob))
        types.append(kind)
  labels = np.rint(np.asarray(probs) * 3).astype(np.int32)
  return np.asarray(paths), labels, np.asarray(types)


def split_indices(labels, types, test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Stratified by (class, cell type): round(fraction x stratum) of each go to test."""
  rng = np.random.default_rng(seed)
  test = []
  for stratum in sorted(set(zip(labels.tolist(), types.tolist()))):
    members = np.flatnonzero((labels == stratum[0]) & (types == stratum[1]))
    members = rng.permutation(members)
    test.extend(members[:int(round(test_fraction * len(members)))].tolist())
  test = np.sort(np.asarray(test, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {"train": train, "test": test}


class ElpvSource(FileSource):

  def __init__(self, config, split: str):
    if split not in ("train", "test"):
      raise errors.UserError(f"ELPV has splits 'train' and 'test', not '{split}'.")
    if int(config.num_classes) != NUM_CLASSES:
      raise errors.UserError(f"ELPV has {NUM_CLASSES} classes; set config.num_classes = 4 "
                       f"(it is {config.num_classes}).")
    paths, labels, types = read_table(config_lib.get(config, "data_dir") or None)
    index = split_indices(labels, types)[split]
    super().__init__(config, split, paths[index], labels[index])
