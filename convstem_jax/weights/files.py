"""Reading weight files: what a path holds, as named numpy arrays, never code.

  read(path, ema=False) -> Source(kind, tensors, path)

- a directory: one of our runs (a workdir, its checkpoints/ dir or a checkpoints/<step>
  dir); `ema` takes the run's EMA weights. kind 'ours', names as in `core`.
- `.npz`: big_vision / vit_jax (kind 'big_vision'), read with allow_pickle=False.
- `.safetensors`: a timm or pycls state dict (no torch needed).
- `.pth` / `.pt` / `.bin` / `.pyth`: a torch file, read with `weights_only=True` (tensors
  and plain containers only: a file that needs more is refused). Containers are
  unwrapped: pycls's {'model_state', 'ema_state'}, timm's {'state_dict',
  'state_dict_ema'}, {'model', 'model_ema'}; a DistributedDataParallel 'module.' prefix
  is dropped. kind 'timm' or 'pycls', told apart by the names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import config as config_lib
from convstem_jax import errors
from convstem_jax.weights import core
from convstem_jax.weights import pycls

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pyth")
# Our exports name the model they hold (model_name and its overrides, JSON), so a
# fine-tune can rebuild it: an npz key beside the weights, a safetensors metadata entry.
MODEL_KEY = "convstem/model"
_WRAPPERS = (("model_state", "ema_state"), ("state_dict", "state_dict_ema"),
             ("model", "model_ema"))


@dataclasses.dataclass
class Source:
  kind: str                       # 'ours' | 'big_vision' | 'timm' | 'pycls'
  tensors: dict[str, Any]         # the file's names -> arrays (or torch tensors)
  path: str


def read(path: str, ema: bool = False) -> Source:
  """The weights at `path` (see the module docstring)."""
  p = epath.Path(path)
  if not p.exists():
    raise errors.MissingInputError(
        f"init_from: {path} does not exist; give a workdir or checkpoint of a run, or a "
        ".npz / .safetensors / .pth / .pyth weight file.")
  if p.is_dir():
    return Source("ours", _read_ours(path, ema), path)
  suffix = p.suffix.lower()
  if suffix == ".npz":
    if ema:
      raise errors.UserError(f"{path}: npz files hold one set of weights, no EMA; set "
                             "init_from_ema=False.")
    with p.open("rb") as f, np.load(f, allow_pickle=False) as npz:
      return Source("big_vision", {k: npz[k] for k in npz.files if k != MODEL_KEY}, path)
  if suffix == ".safetensors":
    return _state_dict_source(safetensors.numpy.load(p.read_bytes()), path, ema)
  if suffix in TORCH_SUFFIXES:
    return _state_dict_source(_read_torch(p), path, ema)
  raise errors.UserError(
      f"init_from: cannot tell the format of {path} from its suffix '{suffix}'; give a "
      "run's workdir or checkpoint dir, or a .npz, .safetensors, .pth / .pt or .pyth file.")


def describe_model(model_name: str, overrides: dict) -> str:
  return json.dumps({"model_name": model_name,
                     "model": {k: v for k, v in overrides.items() if v is not None}})


def model_of(path: str) -> tuple[str, dict] | None:
  """(model_name, model overrides) that the weights at `path` were trained with: from a
  run's config.json, or from our export's own record; None when the file does not say."""
  p = epath.Path(path)
  text = None
  if p.is_dir():
    run = next((d for d in (p, *p.parents) if (d / "config.json").exists()), None)
    if run is None:
      return None
    config = config_lib.run_config(run)
    return config.model_name, {k: v for k, v in dict(config.model).items() if v is not None}
  if p.suffix == ".npz" and p.exists():
    with p.open("rb") as f, np.load(f, allow_pickle=False) as npz:
      text = str(npz[MODEL_KEY]) if MODEL_KEY in npz.files else None
  elif p.suffix == ".safetensors" and p.exists():
    with safetensors.safe_open(str(p), framework="numpy") as f:
      text = (f.metadata() or {}).get(MODEL_KEY)
  if not text:
    return None
  record = json.loads(text)
  return record["model_name"], {k: v for k, v in record.get("model", {}).items()
                                if v is not None}


def _read_ours(path: str, ema: bool) -> dict[str, np.ndarray]:
  ckpt, step = ckpt_lib.resolve(path)
  shapes = ckpt.model_shapes(step)
  if ema and not shapes.get("ema"):
    raise errors.UserError(f"init_from: {path} step {step} has no EMA weights (the run had "
                           "ema_decay 0); set init_from_ema=False.")
  part = shapes["ema"] if ema else {k: shapes[k] for k in core.COLLECTIONS if shapes.get(k)}
  device = jax.local_devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding),
                        part, is_leaf=lambda x: isinstance(x, tuple))
  restored = ckpt.restore_model(step, {"ema": target} if ema else target)
  if ema:
    restored = restored["ema"]
  logging.info("Read %s step %d%s", ckpt.directory, step, " (EMA weights)" if ema else "")
  return core.flatten(jax.device_get(restored))


def _read_torch(p: epath.Path) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(
        f"Reading {p.name} needs PyTorch (CPU is enough): pip install torch, or convert "
        "the file to .safetensors.") from e
  try:
    with p.open("rb") as f:
      return torch.load(f, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise errors.UserError(
        f"{p} stores Python objects beyond tensors and plain containers, which would run "
        "code to load; refused (a weight file is data): re-save its state dict alone, "
        "e.g. torch.save(model.state_dict(), path), or as .safetensors.") from e


def _state_dict_source(obj: Any, path: str, ema: bool) -> Source:
  """Unwraps training checkpoints to the (EMA) state dict; tells timm from pycls."""
  if not isinstance(obj, dict):
    raise errors.UserError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  for raw, averaged in _WRAPPERS:
    if raw in obj and isinstance(obj[raw], dict):
      key = averaged if ema else raw
      if key not in obj or not isinstance(obj[key], dict):
        raise errors.UserError(f"{path} has no EMA weights ('{averaged}'); set "
                               "init_from_ema=False.")
      obj = obj[key]
      break
  else:
    if ema:
      raise errors.UserError(f"{path} is a bare state dict with no EMA weights; set "
                             "init_from_ema=False.")
  tensors = {k.removeprefix("module."): v for k, v in obj.items()}
  if not tensors or not all(hasattr(v, "shape") for v in tensors.values()):
    raise errors.UserError(f"{path} is not a state dict of tensors (keys: "
                           f"{', '.join(list(obj)[:6])}).")
  if pycls.is_pycls(tensors):
    return Source("pycls", tensors, path)
  if any(k.startswith(("patch_embed.", "blocks.")) for k in tensors):
    return Source("timm", tensors, path)
  raise errors.UserError(
      f"{path} is neither a timm nor a pycls ViT state dict (first keys: "
      f"{', '.join(list(tensors)[:5])}); rename its keys to timm's VisionTransformer names.")
