r"""Command line: train or evaluate one experiment config.

    python -m convstem_jax.main --config=configs/vit_b_srelu.py:runlocal \
        --workdir=/tmp/vit [--config.total_steps=100] [--mode=eval [--checkpoint=STEP|PATH]]

Multi-host: set CONVSTEM_JAX_DISTRIBUTED=1 where JAX can discover the cluster itself
(Cloud TPU VM pod slices, SLURM), or pass --coordinator_address, --num_processes and
--process_id. Single-host runs never initialise the distributed runtime.

Exit codes: 0 finished; 75 preempted (SIGTERM or SIGUSR1: the agreed step is saved and
committed; rerun the same command to resume); 1 a mistake, printed as one `error:` line
with the fix (no traceback; set CONVSTEM_JAX_DEBUG=1 for it) or a fault that is not the
user's, with its traceback.

On the command line, giving one unit of a steps/epochs pair
(`--config.checkpoint_every_epochs=1`) clears the other one the config file set.
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from convstem_jax import config as config_lib
from convstem_jax import errors
from convstem_jax import preemption

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


def initialize_distributed(config):
  """Starts JAX's distributed runtime for a multi-process run; a single-process run sets
  its CPU device count instead (config.cpu_devices). Before any JAX backend starts."""
  import jax  # pylint: disable=g-import-not-at-top
  from convstem_jax import sharding  # pylint: disable=g-import-not-at-top
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise errors.UserError("Multi-process runs need all of --coordinator_address, "
                             "--num_processes and --process_id.")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise errors.UserError(f"--process_id={FLAGS.process_id} must be in 0.."
                             f"{FLAGS.num_processes - 1} (--num_processes).")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif os.environ.get(DISTRIBUTED_ENV, "") == "1":
    jax.distributed.initialize()  # cluster auto-detection: TPU pod slice, SLURM, ...
  else:
    sharding.configure_cpu_devices(config)  # on a CPU host, one device per core
  preemption.after_distributed_init()


# ------------------------------------------------------------------ flags and config


def parse_flags(argv):
  """absl's parser, with a bad flag or config file ending in one `error:` line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(flag_error(e, argv))
  except Exception as e:  # pylint: disable=broad-except
    message = unknown_field(e, argv)
    if message is None and (isinstance(e, SyntaxError) or "get_config" in str(e)
                            or _raised_in(e, _config_path(argv))):
      message = config_error(e, argv)  # the config file's own fault
    if message is None or os.environ.get("CONVSTEM_JAX_DEBUG") == "1":
      raise
    fail(message)


def unknown_field(e: Exception, argv) -> str | None:
  """ml_collections raises AttributeError / KeyError for an unknown field given on the
  command line (--config.model.dropuot=0.1); None for any other error."""
  if not isinstance(e, (AttributeError, KeyError)):
    return None
  text = str(e)
  name = re.search(r"\w+", text)
  given = [a.split("=", 1)[0][len("--config."):] for a in argv if name and
           re.fullmatch(rf"--config\.([\w.]*\.)?{name[0]}", a.split("=", 1)[0])]
  if not given:
    return None
  hint = re.search(r'Did you mean \\?"(\w+)\\?"', text)
  return (f"Unknown config field '{given[0]}'"
          + (f"; did you mean '{hint[1]}'?" if hint else "; check its spelling against "
             f"the config file {_config_path(argv)}.")
          + " (--helpfull lists the fields)")


def _raised_in(e: BaseException, path: str) -> bool:
  """True if a frame of the exception's traceback is in the file `path`."""
  target = os.path.abspath(path)
  tb = e.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
      return True
    tb = tb.tb_next
  return isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == target


def _root(e: BaseException) -> BaseException:
  """The innermost exception of a chain (a config file's own error)."""
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    nxt = e.__cause__ or e.__context__
    if nxt is None:
      break
    e = nxt
  return e


def _config_path(argv) -> str:
  for a in argv:
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":", 1)[0]
  return "the config file"


def config_error(e: BaseException, argv) -> str:
  """One sentence for a config file that does not load or an override that does not fit."""
  root = _root(e)
  path = _config_path(argv)
  text = str(root).strip()
  if isinstance(root, errors.UserError) or (isinstance(root, ValueError) and
                                            "Error whilst parsing" not in text):
    return text.splitlines()[0] if text else f"{path}: {type(root).__name__}"
  if isinstance(root, FileNotFoundError) or "No such file" in text:
    shipped = sorted(p[:-3] for p in os.listdir(os.path.join(_repo(), "configs"))
                     if p.endswith(".py")) if os.path.isdir(os.path.join(_repo(),
                                                                         "configs")) else []
    return (f"Config file '{path}' does not exist; pass --config=configs/<name>.py"
            + (f" (shipped: {', '.join(shipped)})." if shipped else "."))
  if isinstance(root, SyntaxError):
    return (f"Config file {root.filename or path} has a syntax error at line "
            f"{root.lineno}: {root.msg}; fix the file.")
  message = unknown_field(root, argv)
  if message:
    return message
  if isinstance(root, (AttributeError, KeyError)) and "get_config" in text:
    return f"Config file {path} defines no get_config(arg=None); add one."
  if isinstance(root, (AttributeError, KeyError)) and not _raised_in(root, path):
    name = text.strip("'\"").splitlines()[0]
    return (f"Unknown config field {name}; check the spelling against the config "
            f"file {path}.")
  where = ""
  tb = root.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_filename.endswith(os.path.basename(path)):
      where = f" (line {tb.tb_lineno})"
    tb = tb.tb_next
  return (f"Config file {path} failed{where}: {type(root).__name__}: "
          f"{text.splitlines()[0] if text else ''}; fix the file.")


def flag_error(e: flags.Error, argv) -> str:
  text = str(e).strip()
  first = text.splitlines()[0] if text else type(e).__name__
  if text.startswith("flag --config="):
    return config_error(e, argv)
  if text.startswith("flag --config."):
    return f"{first.rstrip('.')}; give the field a value of its type."
  return f"{first} (see --helpfull)."


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(argv):
  """FLAGS.config, with a config that fails to load or override as one `error:` line."""
  try:
    config = FLAGS.config
    if config is not None:
      config.get("model_name")  # a file that failed to load raises on first access
  except Exception as e:  # pylint: disable=broad-except
    fail(config_error(e, argv))
  if config is None:
    fail("No config; pass --config=configs/<name>.py.")
  clear_other_units(config, argv)
  return config


def config_from_args(config_arg: str, overrides=()):
  """The config `main --config=<config_arg> <overrides>` trains with (for tools/tests)."""
  argv = ["main", f"--config={config_arg}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  config = fv.config
  clear_other_units(config, argv)
  return config


def clear_other_units(config, argv) -> None:
  """`--config.X_epochs=...` alone clears the file's X_steps, and the other way round."""
  given = {m[1] for a in argv for m in [re.match(r"--config\.([\w.]+)=", a)] if m}
  with config.unlocked():
    for container, name in config_lib.DURATIONS:
      node = config[container] if container else config
      prefix = f"{container}." if container else ""
      for unit, other, zero in (("steps", "epochs", 0.0), ("epochs", "steps", 0)):
        key, other_key = f"{prefix}{name}_{unit}", f"{prefix}{name}_{other}"
        if key in given and other_key not in given and f"{name}_{other}" in node:
          node[f"{name}_{other}"] = zero


def fail(message: str):
  logging.error("%s", message)
  sys.exit(f"error: {message}\n(set CONVSTEM_JAX_DEBUG=1 for the traceback)")


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
    "and raise --config.grad_accum_steps (a BatchNorm stem then normalises each smaller "
    "micro-batch on its own statistics), or recompute activations "
    "(--config.model.remat=full), or shard the weights (--config.fsdp=True); the "
    "workdir's checkpoints are untouched and the run resumes from the latest one.")


def user_error(e: Exception) -> str | None:
  """The one-sentence message for an error a user can cause and fix, else None.

  Only `errors.UserError` and running out of device memory; every other exception,
  a ValueError from JAX, XLA or orbax included, is a fault that keeps its traceback.
  """
  if isinstance(e, errors.UserError):
    return str(e)
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return OUT_OF_MEMORY_HINT.format(what=first[:200])
  return None


def main(argv):
  if len(argv) > 1:
    fail(f"Unexpected arguments {argv[1:]}; flags are written --name=value.")
  config = load_config(sys.argv)
  quiet_library_logs()
  try:
    initialize_distributed(config)
    # Imports after the distributed runtime is up (no JAX op may run before it).
    from convstem_jax import evaluate  # pylint: disable=g-import-not-at-top
    from convstem_jax import train  # pylint: disable=g-import-not-at-top
    if FLAGS.mode == "eval":
      results = evaluate.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint)
    else:
      results = train.train_and_evaluate(config, FLAGS.workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    # Errors a user can cause end in their one sentence, not a traceback.
    message = user_error(e)
    if message is None or os.environ.get("CONVSTEM_JAX_DEBUG") == "1":
      raise
    fail(message)
  for key in sorted(results):
    if key.endswith(("/accuracy", "/top5", "/loss")):
      print(f"{key}: {results[key]:.4f}")


if __name__ == "__main__":
  preemption.install()  # first: a signal during imports or restore is not lost
  app.run(main, flags_parser=parse_flags)
