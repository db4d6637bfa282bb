"""What goes in: datasets behind one interface the trainer consumes.

`get_source(config, split)` returns a `Source`:
  - `num_examples`: examples in the split (all hosts together);
  - `train_batches(local_batch_size, start_step)`: an endless iterator of this process's
    share of each global batch, as numpy dicts {"image": float32 NHWC, "label": int32},
    starting after `start_step` (see "Resuming" below);
  - `eval_batches(local_batch_size)`: one pass over this process's slice of the split,
    padded to whole batches; {"image", "label", "mask"} where mask=0 marks padding. Every
    process yields the same number of batches, so each real example counts once.

`config.dataset` names the source:
  - 'synthetic'                  class-coloured noise (synthetic.py), no TensorFlow;
  - 'elpv'                       the bundled solar-cell dataset (elpv.py);
  - 'folder'                     a user's image folder at config.data_dir (folder.py);
  - 'tfds:<name>' or a plain     a tensorflow-datasets dataset read from config.data_dir
    name of TFDS_NAMES           or $TFDS_DATA_DIR (tfds_source.py); any other tfds name
                                 works with the 'tfds:' prefix.
Preprocessing comes from `config.pp_train` / `config.pp_eval` (pp.py); when unset, an
inception crop + flip for training and resize + central crop for eval, to [-1, 1].

Config fields read here, each optional (default): pp_train, pp_eval (above); data_dir
(tfds: $TFDS_DATA_DIR or tfds' default; folder: the root; elpv: the installed package);
data_threads (tf.data's thread pool and parallel calls, 0 = the cores this process may
use); data_autotune (tf.data's autotuner, off); data_workers (file sources' train and eval
streams in worker processes pinned one per core, workers.py; 0 = off); shuffle_buffer (tfds, 50,000);
folder_test_fraction (0.2) and folder_split_seed (0) for single-tree folders.

Resuming: every source computes each step's batch from (config.seed, process index,
process count, step), so a resumed run sees exactly the batches, augmentations
included, that it would have seen: a run resumed from a checkpoint ends bitwise equal to
one never interrupted (tests/test_resilience.py). File sources (synthetic, elpv, folder)
jump straight to the step; tfds streams start at the step's epoch and skip that epoch's
earlier records (tfds_source.py).

TensorFlow (tf.data / tfds sources) is imported inside the sources that need it, never
by `import convstem_jax.data`, the models, the train step or the benchmark.
"""

from __future__ import annotations

import importlib

from convstem_jax.data.synthetic import SyntheticSource
from convstem_jax import errors

TFDS_NAMES = ("imagenet2012", "imagenet_v2", "cifar10", "cifar100", "svhn_cropped")


def _lazy(module: str, cls: str):
  """A source class imported on first use (its module may import TensorFlow)."""
  def make(config, split):
    return getattr(importlib.import_module(f"convstem_jax.data.{module}"), cls)(config,
                                                                               split)
  make.__name__ = cls
  return make


def _tfds(name: str):
  def make(config, split):
    from convstem_jax.data.tfds_source import TfdsSource  # pylint: disable=g-import-not-at-top
    return TfdsSource(config, split, name)
  return make


SOURCES = {
    "synthetic": SyntheticSource,
    "elpv": _lazy("elpv", "ElpvSource"),
    "folder": _lazy("folder", "FolderSource"),
    **{name: _tfds(name) for name in TFDS_NAMES},
}


def get_source(config, split: str):
  """The source named by `config.dataset`, reading `split` for this process."""
  name = config.dataset
  if name.startswith("tfds:") and len(name) > 5:
    return _tfds(name[5:])(config, split)
  if name not in SOURCES:
    raise errors.UserError(f"Unknown dataset '{name}'; available here: {', '.join(SOURCES)}, "
                     "or 'tfds:<name>' for any tensorflow-datasets dataset.")
  return SOURCES[name](config, split)
