"""What goes in: datasets behind one interface the trainer consumes.

`get_source(config, split, train)` returns a `Source`:
  - `num_examples`: examples in the split (all hosts together);
  - `train_batches(local_batch_size, start_step)`: an endless iterator of this process's
    share of each global batch, as numpy dicts {"image": float32 NHWC, "label": int32},
    deterministic in (config.seed, step) so a resumed run sees the batches it would
    have seen;
  - `eval_batches(local_batch_size)`: one pass over this process's slice of the split,
    padded to whole batches; {"image", "label", "mask"} where mask=0 marks padding. Every
    process yields the same number of batches, so each real example counts once.

TensorFlow (tf.data / tfds sources) is imported inside the sources that need it, never
by the models, the train step or the benchmark.
"""

from __future__ import annotations

from convstem_jax.data.synthetic import SyntheticSource

SOURCES = {"synthetic": SyntheticSource}


def get_source(config, split: str):
  """The source named by `config.dataset`, reading `split` for this process."""
  name = config.dataset
  if name not in SOURCES:
    raise ValueError(f"Unknown dataset '{name}'; available here: {', '.join(SOURCES)}.")
  return SOURCES[name](config, split)
