"""What every weight format shares: our variable names, and converted weights.

Our names are the flat paths of a model's variables joined by '/', collection first:
`params/stem/embedding/kernel`, `params/block_3/attn/qkv/bias`,
`batch_stats/stem/norm_0/mean`. A format module renames a file's tensors into these
(`Converted`), and `load.match` checks them strictly against a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass
class Converted:
  """A file's tensors renamed to this library's variable names."""
  tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  origin: dict[str, str] = dataclasses.field(default_factory=dict)  # ours -> their key
  unused: list[str] = dataclasses.field(default_factory=list)  # their keys, no place here
  problems: list[str] = dataclasses.field(default_factory=list)  # structural, sentences

  def add(self, name: str, value: np.ndarray, origin: str) -> None:
    if name in self.tensors:
      self.problems.append(f"{self.origin[name]} and {origin} both map to {name}")
      return
    self.tensors[name], self.origin[name] = value, origin


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (no torch import needed), jax or numpy array -> numpy, floats as
  float32 (numpy has no bfloat16), integers as they are."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if value.dtype.kind == "f" else value


def flatten(variables: dict) -> dict[str, np.ndarray]:
  """{'params': {...}, 'batch_stats': {...}} -> {'params/a/b': array}."""
  flat = traverse_util.flatten_dict({k: variables[k] for k in COLLECTIONS
                                     if variables.get(k)}, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(flat: dict[str, Any]) -> dict:
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return {k: tree[k] for k in COLLECTIONS if k in tree}


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
  """The model's variables and shapes, without running any initialiser."""
  images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      {c: shapes[c] for c in COLLECTIONS if c in shapes}, sep="/").items()}


# Tensor layouts: torch conv OIHW <-> flax HWIO; torch Linear (out, in) <-> Dense (in, out).
def conv_to_ours(w):
  return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(w):
  return np.transpose(w, (3, 2, 0, 1))


def linear_swap(w):
  return np.transpose(w)
