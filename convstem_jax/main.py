r"""Command line: train or evaluate one experiment config.

    python -m convstem_jax.main --config=configs/vit_b_srelu.py:runlocal \
        --workdir=/tmp/vit [--config.total_steps=100] [--mode=eval [--checkpoint=STEP|PATH]]

Multi-host: set CONVSTEM_JAX_DISTRIBUTED=1 where JAX can discover the cluster itself
(Cloud TPU VM pod slices, SLURM), or pass --coordinator_address, --num_processes and
--process_id. Single-host runs never initialise the distributed runtime.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/<name>.py[:arg1,arg2].", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resumes) or evaluate.")
flags.DEFINE_string("checkpoint", "", "--mode=eval: a step or a checkpoint path "
                    "(default: the workdir's latest).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])

DISTRIBUTED_ENV = "CONVSTEM_JAX_DISTRIBUTED"


def initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("Multi-process runs need all of --coordinator_address, "
                           "--num_processes and --process_id.")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif os.environ.get(DISTRIBUTED_ENV, "") == "1":
    jax.distributed.initialize()  # cluster auto-detection: TPU pod slice, SLURM, ...


def quiet_library_logs():
  """orbax logs every checkpoint step at INFO through absl; keep its warnings only."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  noisy = ("/orbax/", "/jax/_src/distributed", "/clu/")

  class Filter(py_logging.Filter):
    def filter(self, record):
      return record.levelno >= py_logging.WARNING or not any(
          n in record.pathname for n in noisy)

  for handler in py_logging.getLogger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(Filter())


OUT_OF_MEMORY_HINT = (
    "the device ran out of memory ({what}). Lower --config.batch_size, or keep the batch "
    "and raise --config.grad_accum_steps, or recompute activations "
    "(--config.model.remat=full), or shard the weights (--config.fsdp=True); the "
    "workdir's checkpoints are untouched and the run resumes from the latest one.")


def user_error(e: Exception) -> str | None:
  """The one-sentence message for an error a user can cause and fix, else None."""
  if isinstance(e, (ValueError, FileNotFoundError, FloatingPointError)):
    return str(e)
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return OUT_OF_MEMORY_HINT.format(what=first[:200])
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  initialize_distributed()
  # Imports after the distributed runtime is up (no JAX op may run before it).
  from convstem_jax import evaluate  # pylint: disable=g-import-not-at-top
  from convstem_jax import train  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  try:
    if FLAGS.mode == "eval":
      results = evaluate.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
    else:
      results = train.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    # Errors a user can cause end in their one sentence, not a traceback.
    message = user_error(e)
    if message is None or os.environ.get("CONVSTEM_JAX_DEBUG") == "1":
      raise
    logging.error("%s", message)
    sys.exit(f"error: {message}\n(set CONVSTEM_JAX_DEBUG=1 for the traceback)")
  for key in sorted(results):
    if key.endswith(("/accuracy", "/top5", "/loss")):
      print(f"{key}: {results[key]:.4f}")


if __name__ == "__main__":
  app.run(main)
