"""What survives: orbax checkpoints of the train state, restorable onto any topology.

Layout: `<workdir>/checkpoints/<step>/{model, train}`. `model` holds what evaluation
needs (params, batch_stats, ema); `train` the rest of the run (step, opt_state,
rng). Saving is asynchronous and committed atomically by orbax, so a preempted save
leaves the previous checkpoint intact. Restores always target abstract arrays carrying
the *current* shardings, so a run saved on 8 devices resumes on 4, or on another host
count.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

MODEL_KEYS = ("params", "batch_stats", "ema")


def checkpoint_dir(workdir: str) -> epath.Path:
  # orbax wants absolute paths; gs:// and other URLs already are.
  if "://" not in str(workdir):
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / "checkpoints"


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
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            read_only=read_only, enable_async_checkpointing=True))

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
    """The whole train state, onto the shardings of `abstract_state`."""
    model = {k: abstract_state[k] for k in MODEL_KEYS}
    rest = {k: v for k, v in abstract_state.items() if k not in MODEL_KEYS}
    self._check_model_shapes(step, model)
    with self._explain_mismatch(step):
      out = self.manager.restore(step, args=ocp.args.Composite(
          model=_restore_args(model), train=_restore_args(rest)))
    return {**out["model"], **out["train"]}

  def restore_model(self, step: int, abstract_model: dict[str, Any]) -> dict[str, Any]:
    """Only the model part (params, batch_stats, ema, or a subset)."""
    self._check_model_shapes(step, abstract_model)
    with self._explain_mismatch(step):
      return self.manager.restore(step, args=ocp.args.Composite(
          model=_restore_args(abstract_model)))["model"]

  def _check_model_shapes(self, step: int, abstract_model: dict[str, Any]) -> None:
    """Compares shapes with the checkpoint's metadata before reading any array.

    A restore that fails half-way leaves orbax's reader threads printing tracebacks, and a
    partial restore would silently leave new parameters abstract; both are caught here.
    """
    stored = _flat_shapes(self.model_shapes(step))
    wanted = _flat_shapes(abstract_model)
    for key in sorted(wanted, key=lambda k: (k[0] != "params", k)):  # params first
      shape = wanted[key]
      name = "/".join(key)
      if key not in stored:
        what = f"it has no '{name}'"
      elif stored[key] != shape:
        what = f"it stores '{name}' as {stored[key]} where this config has {shape}"
      else:
        continue
      raise ValueError(
          f"Checkpoint {step} in {self.manager.directory} was written by a different "
          f"model than this config builds ({what}); use a new --workdir for a new model, "
          f"or the config the run was started with (saved as config.json in the "
          f"workdir).")

  @contextlib.contextmanager
  def _explain_mismatch(self, step: int):
    """orbax's shape/structure errors suggest restore flags; say what really happened."""
    try:
      yield
    except (ValueError, KeyError) as e:
      text = str(e)
      if not any(w in text for w in ("shape", "structure", "not found", "missing")):
        raise
      raise ValueError(
          f"Checkpoint {step} in {self.manager.directory} does not match the state this "
          f"config builds ({text.splitlines()[0][:120]}...); use a new --workdir, or "
          f"the config the run was started with (saved as config.json in the "
          f"workdir).") from e

  def model_shapes(self, step: int) -> dict[str, Any]:
    """Shapes of the saved model part, without reading any array."""
    meta = self.manager.item_metadata(step)["model"]
    tree = getattr(meta, "tree", meta)
    return jax.tree.map(lambda m: tuple(m.shape), tree,
                        is_leaf=lambda m: hasattr(m, "shape"))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flat_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{('params', 'block_0', ...): shape} for arrays, abstract arrays or orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") or isinstance(x, tuple))[0]
  return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
          tuple(getattr(leaf, "shape", leaf)) for path, leaf in leaves}


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
    raise FileNotFoundError(f"No checkpoints under {path}; pass a workdir that a training "
                            "run wrote, or its checkpoints/<step> directory.")
  ckpt = Checkpointer(str(path), read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"{ckpt.directory} holds no finished checkpoint; train first "
                            "or point at another run.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"No checkpoint for step {step} in {ckpt.directory}; "
                            f"available steps: {steps}.")
  logging.info("Using checkpoint %s/%d", ckpt.directory, step)
  return ckpt, step
