"""big_vision / vit_jax `.npz` files, both ways.

Export writes big_vision's ViT names as flat `params/...` keys, which big_vision's
`vit.load` and timm's npz loader (`load_pretrained`) read for patchify models:

  params/embedding/{kernel,bias}                    <- stem/embedding
  params/cls, params/pos_embedding                  <- cls, pos_embedding (see below)
  params/Transformer/encoderblock_{i}/LayerNorm_0   <- block_i/norm1
    .../MultiHeadDotProductAttention_0/{query,key,value}/kernel [d, heads, d/heads]
    .../MultiHeadDotProductAttention_0/out/kernel [heads, d/heads, d] <- block_i/attn
    .../LayerNorm_1, .../MlpBlock_0/Dense_{0,1}     <- block_i/norm2, block_i/mlp
  params/Transformer/encoder_norm, params/head      <- encoder_norm, head

big_vision adds its position embedding to the patch tokens only and then prepends the
class token; ours (vit_jax, pycls, timm) adds it after. So `params/cls` holds our class
token plus its position row and `params/pos_embedding` the patch rows: big_vision, and
timm with `no_embed_class=True`, compute the same outputs. For an exact round trip the
file also keeps `convstem/cls` and `convstem/cls_pos_embedding` (ignored by those
loaders, which read only `params/`), and our import prefers them.

Our extension for conv stems (no counterpart in big_vision): `params/stem/conv_i/*`,
`params/stem/norm_i/{scale,bias}` and BatchNorm statistics `batch_stats/stem/norm_i/
{mean,var}`; the projection stays `params/embedding`.

What weights cannot say: big_vision's MLP uses the tanh approximation of GELU (ours and
timm's are exact), and its 'gap' pooling averages after the final norm (ours before).
Import also reads vit_jax files (`Transformer/posembed_input/pos_embedding` with the
class row, `MultiHeadDotProductAttention_1`, `MlpBlock_3`, `LayerNorm_2`), files with an
`opt/target/` prefix, and scanned `Transformer/encoderblock/...` stacks.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import numpy as np

from convstem_jax.models.vit import ViT
from convstem_jax.weights import core

_EXTRA = "convstem/"  # our exact-round-trip keys, outside `params/`
# (attention, mlp, second norm) submodule names: big_vision, vit_jax.
_SUBS = {"big_vision": ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1"),
         "vit_jax": ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")}
_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)$")


def _block_names(sub: tuple[str, str, str]) -> dict[str, str]:
  """Their per-block leaf path -> ours, for everything but query/key/value/out."""
  attn, mlp, ln2 = sub
  names = {}
  for leaf in ("scale", "bias"):
    names[f"LayerNorm_0/{leaf}"] = f"norm1/{leaf}"
    names[f"{ln2}/{leaf}"] = f"norm2/{leaf}"
  for leaf in ("kernel", "bias"):
    names[f"{mlp}/Dense_0/{leaf}"] = f"mlp/fc1/{leaf}"
    names[f"{mlp}/Dense_1/{leaf}"] = f"mlp/fc2/{leaf}"
  return names


def to_npz(flat: Mapping[str, np.ndarray], model: ViT) -> dict[str, np.ndarray]:
  """Our variables (flat names) -> big_vision npz keys and arrays."""
  out: dict[str, np.ndarray] = {}
  attn, _, _ = _SUBS["big_vision"]
  ours_of = {v: k for k, v in _block_names(_SUBS["big_vision"]).items()}
  h = model.num_heads
  for name, value in flat.items():
    value = np.asarray(value)
    coll, path = name.split("/", 1)
    if m := re.fullmatch(r"block_(\d+)/(.+)", path):
      i, leaf = m.groups()
      prefix = f"params/Transformer/encoderblock_{i}/"
      if leaf.startswith("attn/qkv/"):
        d = value.shape[0] if leaf.endswith("kernel") else value.shape[0] // 3
        parts = value.reshape((d, 3, h, d // h) if leaf.endswith("kernel") else (3, h, d // h))
        for j, which in enumerate(("query", "key", "value")):
          part = parts[:, j] if leaf.endswith("kernel") else parts[j]
          out[f"{prefix}{attn}/{which}/{leaf.rsplit('/', 1)[1]}"] = part
      elif leaf == "attn/out/kernel":
        out[f"{prefix}{attn}/out/kernel"] = value.reshape(h, -1, value.shape[-1])
      elif leaf == "attn/out/bias":
        out[f"{prefix}{attn}/out/bias"] = value
      else:
        out[prefix + ours_of[leaf]] = value
    elif path.startswith("stem/embedding/"):
      out[f"params/embedding/{path.rsplit('/', 1)[1]}"] = value
    elif path.startswith("stem/"):
      out[f"{coll}/{path}"] = value
    elif path.startswith(("encoder_norm/", "head/")):
      out[f"params/{'Transformer/' if path.startswith('enc') else ''}{path}"] = value
    elif path not in ("cls", "pos_embedding"):
      raise ValueError(f"no npz name for {name}")
  pe = flat.get("params/pos_embedding")
  if model.pool == "token":
    cls = np.asarray(flat["params/cls"])
    out["params/cls"] = cls + (pe[:, :1] if pe is not None else 0)
    if pe is not None:
      out["params/pos_embedding"] = np.asarray(pe[:, 1:])
      out[_EXTRA + "cls"] = cls
      out[_EXTRA + "cls_pos_embedding"] = np.asarray(pe[:, :1])
  elif pe is not None:
    out["params/pos_embedding"] = np.asarray(pe)
  return out


def _unstack(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Scanned `Transformer/encoderblock/...` [depth, ...] -> `encoderblock_{i}/...`."""
  out = {}
  for key, value in w.items():
    if key.startswith("Transformer/encoderblock/"):
      for i in range(value.shape[0]):
        out[key.replace("encoderblock/", f"encoderblock_{i}/", 1)] = value[i]
    else:
      out[key] = value
  return out


def from_npz(npz: Mapping[str, np.ndarray], model: ViT) -> core.Converted:
  """A big_vision or vit_jax npz renamed to `model`'s variables (unchecked)."""
  out = core.Converted()
  prefix = next((p for p in ("params/", "opt/target/", "") if f"{p}embedding/kernel" in npz),
                "params/")
  raw = {k[len(prefix):]: core.to_numpy(v) for k, v in npz.items()
         if k.startswith(prefix) and not k.startswith((_EXTRA, "batch_stats/"))}
  extra = {k[len(_EXTRA):]: core.to_numpy(v) for k, v in npz.items() if k.startswith(_EXTRA)}
  stats = {k: core.to_numpy(v) for k, v in npz.items() if k.startswith("batch_stats/")}
  other = [k for k in npz if not k.startswith((prefix, _EXTRA, "batch_stats/"))]
  if other:  # e.g. a vit_jax file's optimizer state: not model weights
    logging.info("Not model weights, ignored: %s", ", ".join(other[:5]) +
                 (f" and {len(other) - 5} more" if len(other) > 5 else ""))
  raw = _unstack(raw)
  flavour = "vit_jax" if "Transformer/posembed_input/pos_embedding" in raw else "big_vision"
  attn, _, _ = _SUBS[flavour]
  blocks = _block_names(_SUBS[flavour])
  qkv: dict[str, dict[str, np.ndarray]] = {}
  for key, value in raw.items():
    origin = prefix + key
    if m := _BLOCK.fullmatch(key):
      i, leaf = m.groups()
      if leaf in blocks:
        out.add(f"params/block_{i}/{blocks[leaf]}", value, origin)
      elif mm := re.fullmatch(rf"{attn}/(query|key|value)/(kernel|bias)", leaf):
        qkv.setdefault(f"params/block_{i}/attn/qkv/{mm.group(2)}", {})[mm.group(1)] = value
      elif leaf == f"{attn}/out/kernel":
        out.add(f"params/block_{i}/attn/out/kernel", value.reshape(-1, value.shape[-1]),
                origin)
      elif leaf == f"{attn}/out/bias":
        out.add(f"params/block_{i}/attn/out/bias", value, origin)
      else:
        out.unused.append(origin)
    elif key.startswith("embedding/"):
      out.add(f"params/stem/{key}", value, origin)
    elif key.startswith("stem/"):
      out.add(f"params/{key}", value, origin)
    elif key.startswith(("Transformer/encoder_norm/", "head/")):
      out.add(f"params/{key.removeprefix('Transformer/')}", value, origin)
    elif key not in ("cls", "pos_embedding", "Transformer/posembed_input/pos_embedding"):
      out.unused.append(origin)
  for name, parts in qkv.items():
    if set(parts) != {"query", "key", "value"}:
      out.problems.append(f"{name} needs query, key and value; the file has "
                          f"{', '.join(sorted(parts))}")
      continue
    heads = parts["query"].shape[-2]
    if heads != model.num_heads:  # the one place a file records the head count
      out.problems.append(f"{name}: the file has {heads} attention heads, the model "
                          f"{model.num_heads}")
      continue
    if name.endswith("kernel"):  # [d, heads, d/heads] each -> [d, 3d]
      value = np.concatenate([parts[w].reshape(parts[w].shape[0], -1)
                              for w in ("query", "key", "value")], axis=1)
    else:
      value = np.concatenate([parts[w].reshape(-1) for w in ("query", "key", "value")])
    out.add(name, value, f"{name.rsplit('/', 3)[0].replace('params/', prefix)} q/k/v")
  for key, value in stats.items():
    out.add(key, value, key)
  _position(raw, extra, prefix, flavour, model, out)
  return out


def _position(raw, extra, prefix, flavour, model: ViT, out: core.Converted) -> None:
  """Class token and position embedding into our convention (added after the class
  token is prepended)."""
  if flavour == "vit_jax":  # already ours
    if "cls" in raw:
      out.add("params/cls", raw["cls"], prefix + "cls")
    key = "Transformer/posembed_input/pos_embedding"
    out.add("params/pos_embedding", raw[key], prefix + key)
    return
  pe, cls = raw.get("pos_embedding"), raw.get("cls")
  if cls is not None and "cls" in extra and "cls_pos_embedding" in extra and pe is not None:
    # Our own export: the exact values.
    out.add("params/cls", extra["cls"], _EXTRA + "cls")
    out.add("params/pos_embedding",
            np.concatenate([extra["cls_pos_embedding"], pe], axis=1),
            f"{_EXTRA}cls_pos_embedding + {prefix}pos_embedding")
    return
  if cls is not None:
    out.add("params/cls", cls, prefix + "cls")
  if pe is not None:
    if cls is not None:  # big_vision's class token has no position: a zero row
      pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    out.add("params/pos_embedding", pe, prefix + "pos_embedding")
