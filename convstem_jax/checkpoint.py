"""What survives: orbax checkpoints of the train state, restorable onto any topology.

Layout: `<workdir>/checkpoints/<step>/{model, train}`. `model` holds what evaluation
needs (params, batch_stats, ema); `train` the rest of the run (step, opt_state,
rng). Saving is asynchronous and committed atomically by orbax, so a preempted save
leaves the previous checkpoint intact; leftover `<step>.orbax-checkpoint-tmp-*`
directories of an interrupted save are never counted as steps (and are removed when a
manager that writes starts). Restores always target abstract arrays carrying the *current* shardings, so a
run saved on 8 devices resumes on 4, or on another host count. Before any array is read,
names and shapes are checked against the checkpoint's metadata: a checkpoint of another
model is the user's mistake (`CheckpointMismatchError`), one whose files do not read back
is damaged (`DamagedCheckpointError`); a resuming run skips damaged ones
(`restore_newest_readable`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from convstem_jax import errors

MODEL_KEYS = ("params", "batch_stats", "ema")


class CheckpointMismatchError(errors.UserError):
  """The checkpoint holds another model or optimizer than the config builds."""


class DamagedCheckpointError(errors.UserError):
  """The checkpoint's files do not read back (truncated, corrupted or missing)."""


def checkpoint_dir(workdir: str) -> epath.Path:
  # orbax wants absolute paths; gs:// and other URLs already are.
  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / "checkpoints"


class _Manager(ocp.CheckpointManager):
  """orbax's manager, kept away from JAX's preemption service.

  orbax asks `reached_preemption_sync_point(step)` from `save` and again from the thread
  that finalizes an async save. That call sets the service's step counter, so a save of
  step 35 finalizing while the loop is at step 40 moves it back to 35; a notice then is
  agreed on step 36, which the loop has passed, and the signal is lost. The trainer's
  `preemption.Watcher` decides preemption saves and is the service's only caller.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)


class Checkpointer:
  """A CheckpointManager for one workdir: save, latest step, restore."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    # Handlers named up front, so a fresh manager can read metadata of old steps.
    handlers = {k: ocp.PyTreeCheckpointHandler() for k in ("model", "train")}
    self.manager = _Manager(
        self.directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            read_only=read_only, enable_async_checkpointing=True,
            cleanup_tmp_directories=not read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict[str, Any]) -> None:
    """Starts an asynchronous save of a state dict (see train.TrainState.as_dict)."""
    model = {k: state[k] for k in MODEL_KEYS}
    rest = {k: v for k, v in state.items() if k not in MODEL_KEYS}
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.PyTreeSave(model), train=ocp.args.PyTreeSave(rest)))

  def restore(self, step: int, abstract_state: dict[str, Any]) -> dict[str, Any]:
    """The whole train state, onto the shardings of `abstract_state`.

    Raises `CheckpointMismatchError` for a checkpoint of another model or optimizer,
    `DamagedCheckpointError` for one whose files do not read back.
    """
    model = {k: abstract_state[k] for k in MODEL_KEYS}
    rest = {k: v for k, v in abstract_state.items() if k not in MODEL_KEYS}
    self._check_shapes(step, "model", model)
    self._check_shapes(step, "train", rest)
    with self._damaged_if_unreadable(step):
      out = self.manager.restore(step, args=ocp.args.Composite(
          model=_restore_args(model), train=_restore_args(rest)))
    return {**out["model"], **out["train"]}

  def restore_newest_readable(self, abstract_state: dict[str, Any]
                              ) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest checkpoint that reads back whole; None if there is none.

    A damaged checkpoint is reported by name and moved aside to `<step>.damaged` (kept
    for inspection, never deleted, and out of the way of the resumed run's own save of
    that step); then the next older one is tried. A checkpoint of another model is the
    user's mistake and stops the run.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state)
      except DamagedCheckpointError as e:
        logging.warning("%s; trying the next older checkpoint.", e)
        damaged.append(self.set_aside(step))
    if damaged:
      raise DamagedCheckpointError(
          f"No readable checkpoint in {self.directory}: every one was damaged (moved aside "
          f"to {', '.join(damaged)}); restore them from a copy, or start over with a new "
          "--workdir.")
    return None

  def set_aside(self, step: int) -> str:
    """Renames checkpoint `step` to `<step>.damaged[.N]` (process 0); returns the name."""
    source = self.directory / str(step)
    name, n = f"{step}.damaged", 1
    while (self.directory / name).exists():
      n += 1
      name = f"{step}.damaged.{n}"
    if jax.process_index() == 0:
      source.rename(self.directory / name)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self.manager.reload()
    return name

  def restore_model(self, step: int, abstract_model: dict[str, Any]) -> dict[str, Any]:
    """Only the model part (params, batch_stats, ema, or a subset)."""
    self._check_shapes(step, "model", abstract_model)
    with self._damaged_if_unreadable(step):
      return self.manager.restore(step, args=ocp.args.Composite(
          model=_restore_args(abstract_model)))["model"]

  def _metadata(self, step: int, item: str):
    """The stored tree of `item` ('model' or 'train'), without reading any array."""
    try:
      meta = self.manager.item_metadata(step)[item]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(self._damage(step, e)) from e
    tree = getattr(meta, "tree", meta)
    if not tree:  # e.g. its _METADATA file is gone
      raise DamagedCheckpointError(self._damage(step, f"no metadata for '{item}'"))
    return tree

  def _damage(self, step: int, why) -> str:
    why = str(why).strip().splitlines()[0][:160] if str(why).strip() else type(why).__name__
    return f"Checkpoint {self.directory / str(step)} is damaged ({why})"

  def _check_shapes(self, step: int, item: str, wanted_tree: dict[str, Any]) -> None:
    """Compares names and shapes with the checkpoint's metadata before reading arrays.

    A restore that fails half-way leaves orbax's reader threads printing tracebacks, and a
    partial restore would silently leave new parameters abstract; both are caught here.
    """
    stored = _flat_shapes(self._metadata(step, item))
    wanted = _flat_shapes(wanted_tree)
    for key in sorted(wanted, key=lambda k: (k[0] != "params", k)):  # params first
      shape = wanted[key]
      name = "/".join(key)
      if key not in stored:
        what = f"it has no '{name}'"
      elif stored[key] != shape:
        what = f"it stores '{name}' as {stored[key]} where this config has {shape}"
      else:
        continue
      raise CheckpointMismatchError(
          f"Checkpoint {step} in {self.manager.directory} was written by a different "
          f"model or optimizer than this config builds ({what}); use a new --workdir for "
          "a new model, or the config the run was started with (saved as config.json in "
          "the workdir).")

  @contextlib.contextmanager
  def _damaged_if_unreadable(self, step: int):
    """Names and shapes were checked against the metadata: a failure now is damage."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(self._damage(step, e)) from e

  def model_shapes(self, step: int) -> dict[str, Any]:
    """Shapes of the saved model part, without reading any array."""
    return jax.tree.map(lambda m: tuple(m.shape), self._metadata(step, "model"),
                        is_leaf=lambda m: hasattr(m, "shape"))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{('params', 'block_0', ...): shape} for arrays, abstract arrays or orbax metadata."""
  def is_leaf(x):  # an array, its metadata, or a shape tuple (not an optax NamedTuple)
    return hasattr(x, "shape") or (type(x) is tuple and all(isinstance(d, int) for d in x))
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(_key(k) for k in path):
          tuple(getattr(leaf, "shape", leaf)) for path, leaf in leaves}


def _key(entry) -> str:
  """A path entry as stored in orbax metadata: dict key, list index or field name."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def resolve(path_or_workdir: str, step: int | None = None) -> tuple[Checkpointer, int]:
  """A checkpoint given as a workdir, a checkpoints dir or a step dir -> (manager, step).

  `step=None` means the latest. Raises a clear error when there is nothing to restore.
  """
  path = epath.Path(path_or_workdir)
  if path.name.isdigit() and (path / "model").exists():  # .../checkpoints/<step>
    step = int(path.name) if step is None else step
    path = path.parent.parent
  elif path.name == "checkpoints":
    path = path.parent
  if not checkpoint_dir(str(path)).exists():
    raise errors.MissingInputError(
        f"No checkpoints under {path}; pass a workdir that a training run wrote, or its "
        "checkpoints/<step> directory.")
  ckpt = Checkpointer(str(path), read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise errors.MissingInputError(f"{ckpt.directory} holds no finished checkpoint; train "
                                   "first or point at another run.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise errors.MissingInputError(f"No checkpoint for step {step} in {ckpt.directory}; "
                                   f"available steps: {steps}.")
  logging.info("Using checkpoint %s/%d", ckpt.directory, step)
  return ckpt, step
