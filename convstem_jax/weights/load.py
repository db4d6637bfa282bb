"""Weights into a model, strictly: `import_weights` and the trainer's `init_from`.

Every model variable must come from the source at its shape and every source weight
must find a place, or one error lists all the missing, unexpected and reshaped names.
Exceptions, all logged: names matching `fresh` (regexes, full match, over our
variable names or the source's keys) start fresh or stay unused; a head of another
class count starts fresh; a learned position embedding of another grid is resampled
(`resample.py`); a fixed sin-cos encoding the source stores is checked, not loaded;
scanned (`blocks/`) and unrolled (`block_i/`) layouts convert either way.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util

from convstem_jax import config as config_lib
from convstem_jax import errors
from convstem_jax.models.vit import ViT
from convstem_jax.weights import big_vision, core, files, pycls, resample, timm

_CONVERTERS = {"big_vision": big_vision.from_npz, "timm": timm.from_timm,
               "pycls": pycls.from_pycls}


def convert(source: files.Source, model: ViT) -> core.Converted:
  """A source's tensors under our names (unchecked), in `model`'s block layout."""
  if source.kind == "ours":
    out = core.Converted(dict(source.tensors), {k: k for k in source.tensors})
  else:
    out = _CONVERTERS[source.kind](source.tensors, model)
  to_layout(out, scanned=model.scan_blocks, depth=model.depth)
  return out


def to_layout(conv: core.Converted, scanned: bool, depth: int) -> None:
  """Stacks `block_i/...` into `blocks/...` (scan_blocks) or splits it back."""
  unrolled = {n for n in conv.tensors if re.match(r"params/block_\d+/", n)}
  stacked = {n for n in conv.tensors if n.startswith("params/blocks/")}
  if scanned and unrolled:
    for leaf in {n.split("/", 2)[2] for n in unrolled}:
      names = [f"params/block_{i}/{leaf}" for i in range(depth)]
      if all(n in conv.tensors for n in names) and (
          f"params/block_{depth}/{leaf}" not in conv.tensors):  # else: depths differ,
        conv.tensors[f"params/blocks/{leaf}"] = np.stack(     # reported by name
            [conv.tensors.pop(n) for n in names])
        conv.origin[f"params/blocks/{leaf}"] = (
            f"{conv.origin[names[0]]} and the other {depth - 1} blocks'")
        for n in names[1:]:
          conv.origin.pop(n)
  elif not scanned and stacked:
    for name in stacked:
      value, leaf = conv.tensors.pop(name), name.split("/", 2)[2]
      origin = conv.origin.pop(name)
      for i in range(value.shape[0]):
        conv.tensors[f"params/block_{i}/{leaf}"] = value[i]
        conv.origin[f"params/block_{i}/{leaf}"] = f"{origin}[{i}]"


def match(conv: core.Converted, model: ViT, fresh: Sequence[str] = (),
          source: str = "the source") -> dict[str, np.ndarray]:
  """Checks converted weights against `model` (see the module docstring); returns the
  variables to load, by name. Names it leaves out start fresh."""
  patterns = [re.compile(p) for p in fresh]
  chosen = lambda name: any(p.fullmatch(name) for p in patterns)
  expected = core.expected_shapes(model)
  tensors = dict(conv.tensors)
  _drop_fixed_posemb(tensors, model, expected)
  loaded, kept_fresh, missing, reshaped = {}, [], [], []
  for name, shape in expected.items():
    if chosen(name):
      kept_fresh.append(name)
      continue
    if name not in tensors:
      missing.append(name)
      continue
    value = tensors[name]
    if name == "params/pos_embedding" and value.shape != shape:
      prefix = 1 if model.pool == "token" else 0
      if value.shape[2:] == shape[2:] and resample.grid_of(value.shape[1], prefix):
        logging.info("Resampling the position embedding from %s to %s.", value.shape, shape)
        value = resample.resample_posemb(value, shape[1], prefix)
    if value.shape != shape:
      if name.startswith("params/head/"):  # another class count: a new head
        kept_fresh.append(name)
        continue
      origin = "" if conv.origin[name] == name else f" ({conv.origin[name]})"
      reshaped.append(f"{name}{origin} {tuple(value.shape)} in the file, {shape} here")
      continue
    loaded[name] = value.astype(np.float32)
  unexpected = [k for k in conv.unused if not chosen(k)] + [
      f"{conv.origin[n]} (-> {n})" if conv.origin[n] != n else n
      for n in tensors if n not in expected and not chosen(n) and not chosen(conv.origin[n])]
  problems = list(conv.problems)
  if missing:
    problems.append("missing from the file: " + ", ".join(missing))
  if unexpected:
    problems.append("not in the model: " + ", ".join(unexpected))
  if reshaped:
    problems.append("other shapes: " + "; ".join(reshaped))
  if problems:
    raise errors.UserError(
        f"{source} does not fit this model ({'; '.join(problems)}). Build the model the "
        "weights were trained with (depth, width, stem, pool, scan_blocks converts "
        "itself), or name what may start fresh in config.init_from_fresh (regexes).")
  if kept_fresh:
    logging.info("Starting fresh (not loaded from %s): %s", source, ", ".join(kept_fresh))
  return loaded


def _drop_fixed_posemb(tensors, model: ViT, expected) -> None:
  """A fixed sin-cos encoding exported as values (timm) is checked, not loaded."""
  table = timm.fixed_posemb(model)
  value = tensors.get("params/pos_embedding")
  if table is None or value is None or "params/pos_embedding" in expected:
    return
  if value.shape == table.shape and np.allclose(value, table, atol=1e-6):
    del tensors["params/pos_embedding"]


def import_weights(path: str, model: ViT, *, ema: bool = False,
                   fresh: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The weights at `path` for `model`, by our variable names (a subset when `fresh`
  or a new head leaves some out)."""
  return match(convert(files.read(path, ema), model), model, fresh, source=path)


def load_variables(path: str, model: ViT, *, ema: bool = False) -> dict:
  """{'params', 'batch_stats'} for `model.apply`, every variable from `path`."""
  flat = import_weights(path, model, ema=ema)
  fresh = sorted(set(core.expected_shapes(model)) - set(flat))
  if fresh:
    raise errors.UserError(
        f"{path} has no weights for {', '.join(fresh)} (its class count differs); build "
        "the model with the file's class count, or fine-tune it first.")
  return core.unflatten(flat)


def put(value: np.ndarray, sharding) -> jax.Array:
  """A host array (every process holds all of it) laid out as `sharding` wants."""
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def place(flat: dict[str, np.ndarray], tree: dict, shardings: dict, collection: str) -> dict:
  """`tree` (a sharded params or batch_stats tree) with the loaded leaves replaced,
  each laid out as its current sharding wants (every process holds the whole file)."""
  leaves = traverse_util.flatten_dict(tree)
  shards = traverse_util.flatten_dict(shardings)
  for key, leaf in leaves.items():
    value = flat.get("/".join((collection, *key)))
    if value is not None:
      leaves[key] = put(value.astype(leaf.dtype), shards[key])
  return traverse_util.unflatten_dict(leaves)


def init_from(config, model: ViT, state, state_sharding):
  """The trainer's start from `config.init_from`: loaded weights in a fresh state; the
  EMA (if any) starts as a copy of them."""
  flat = import_weights(config.init_from, model,
                        ema=config_lib.get(config, "init_from_ema"),
                        fresh=tuple(config_lib.get(config, "init_from_fresh")))
  merged = {c: place(flat, getattr(state, c), getattr(state_sharding, c), c)
            for c in core.COLLECTIONS}
  logging.info("Initialised from %s: %d of %d variables loaded.", config.init_from,
               len(flat), sum(len(traverse_util.flatten_dict(m)) for m in merged.values()))
  return state.replace(**merged, ema=dict(merged) if state.ema else state.ema)
