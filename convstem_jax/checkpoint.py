"""What survives: orbax checkpoints of the train state, restorable onto any topology.

Layout: `<workdir>/checkpoints/<step>/{model, train}`. `model` holds what evaluation
needs (params, batch_stats, ema); `train` the rest of the run (step, opt_state,
rng). Saving is asynchronous and committed atomically by orbax, so a preempted save
leaves the previous checkpoint intact. Restores always target abstract arrays carrying
the *current* shardings, so a run saved on 8 devices resumes on 4, or on another host
count.
"""

from __future__ import annotations

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
    out = self.manager.restore(step, args=ocp.args.Composite(
        model=_restore_args(model), train=_restore_args(rest)))
    return {**out["model"], **out["train"]}

  def restore_model(self, step: int, abstract_model: dict[str, Any]) -> dict[str, Any]:
    """Only the model part (params, batch_stats, ema, or a subset)."""
    return self.manager.restore(step, args=ocp.args.Composite(
        model=_restore_args(abstract_model)))["model"]

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
