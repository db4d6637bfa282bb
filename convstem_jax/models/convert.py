"""Convert timm `VisionTransformer` weights into this library's flax variables.

    variables = timm_to_flax(timm_model.state_dict(), create_model("vit_ti16"))
    logits, _ = model.apply(variables, images_nhwc, train=False)

The state dict may hold torch tensors or numpy arrays; torch is never imported here.
Supported timm layouts:

- patchify: `patch_embed.proj` (timm's PatchEmbed) -> `stem/embedding`;
- conv stems: `patch_embed.backbone.*` (timm's HybridEmbed around a ConvStem or any
  Sequential of Conv2d / BatchNorm2d / LayerNorm2d / activations). Its convs and norms,
  in state-dict order, become `stem/conv_i` and `stem/norm_i`; the projection is
  `patch_embed.proj` when HybridEmbed has one (proj=True) and otherwise the backbone's
  last conv (proj=False, as timm's ConvStem ends in a biased conv).

Weights do not record everything: the head count, paddings, activations, norm epsilons
and timm's `no_embed_class` (a class-free `pos_embed` shows up as a shape mismatch) must
match the `ViT` settings; the parity tests check the supported layouts end to end.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convstem_jax.models.vit import ViT

# torch layouts -> ours: conv OIHW -> HWIO, Linear (out, in) -> Dense (in, out).
_CONV = lambda w: np.transpose(w, (2, 3, 1, 0))
_LINEAR = lambda w: np.transpose(w)
_SAME = lambda w: w

_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                    r"\.(weight|bias)$")
_BLOCK_NAMES = {"norm1": ("norm1",), "norm2": ("norm2",), "attn.qkv": ("attn", "qkv"),
                "attn.proj": ("attn", "out"), "mlp.fc1": ("mlp", "fc1"),
                "mlp.fc2": ("mlp", "fc2")}
_BACKBONE = "patch_embed.backbone."


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; no torch import needed
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      value = value.float()
    value = value.numpy()
  return np.asarray(value, dtype=np.float32)


def _linear(path, leaf):
  """Leaf of a Linear (weight/bias) -> (collection, path, transform)."""
  return ("params", *path, "kernel" if leaf == "weight" else "bias"), (
      _LINEAR if leaf == "weight" else _SAME)


def _norm(path, leaf):
  return ("params", *path, "scale" if leaf == "weight" else "bias"), _SAME


def _conv(path, leaf):
  return ("params", *path, "kernel" if leaf == "weight" else "bias"), (
      _CONV if leaf == "weight" else _SAME)


def _batchnorm(path, leaf):
  if leaf in ("weight", "bias"):
    return _norm(path, leaf)
  return ("batch_stats", *path, {"running_mean": "mean", "running_var": "var"}[leaf]), _SAME


_TOP = {  # timm key -> (our flat path, transform)
    "cls_token": (("params", "cls"), _SAME),
    "pos_embed": (("params", "pos_embedding"), _SAME),
    "patch_embed.proj.weight": _conv(("stem", "embedding"), "weight"),
    "patch_embed.proj.bias": _conv(("stem", "embedding"), "bias"),
    "head.weight": _linear(("head",), "weight"),
    "head.bias": _linear(("head",), "bias"),
    # timm's final norm is `norm` with token pooling and `fc_norm` with average pooling;
    # ours is `encoder_norm` either way.
    "norm.weight": _norm(("encoder_norm",), "weight"),
    "norm.bias": _norm(("encoder_norm",), "bias"),
    "fc_norm.weight": _norm(("encoder_norm",), "weight"),
    "fc_norm.bias": _norm(("encoder_norm",), "bias"),
}


def _backbone_modules(state: Mapping[str, np.ndarray]) -> list[tuple[str, str, list[str]]]:
  """Group `patch_embed.backbone.*` keys into (module, kind, leaves), in state-dict order."""
  modules: dict[str, list[str]] = {}
  for key in state:
    if key.startswith(_BACKBONE):
      module, leaf = key.rsplit(".", 1)
      modules.setdefault(module, []).append(leaf)
  out = []
  for module, leaves in modules.items():
    weight = state.get(f"{module}.weight")
    if "running_mean" in leaves:
      kind = "batch"
    elif weight is not None and weight.ndim == 4:
      kind = "conv"
    elif weight is not None and weight.ndim == 1 and set(leaves) <= {"weight", "bias"}:
      kind = "layer"
    else:
      kind = "unknown"
    out.append((module, kind, leaves))
  return out


def _stem_plan(model: ViT, has_proj: bool) -> list[tuple[str, str]]:
  """Our stem's modules in forward order, as (kind, name)."""
  plan = []
  for i, layer in enumerate(model.stem_spec().layers):
    plan.append(("conv", f"conv_{i}"))
    if layer.norm != "none":
      plan.append((layer.norm, f"norm_{i}"))
  if not has_proj:  # HybridEmbed(proj=False): the backbone's last conv is the projection
    plan.append(("conv", "embedding"))
  return plan


def _map_backbone(state, model: ViT, errors: list[str]) -> dict[str, tuple]:
  found = _backbone_modules(state)
  if not found:
    if model.stem_spec().layers:
      errors.append(f"the timm model has a patchify embedding (no {_BACKBONE}* keys) but "
                    f"the model's stem has {len(model.stem_spec().layers)} conv layers; "
                    "build the ViT with stem='patchify'")
    return {}
  plan = _stem_plan(model, "patch_embed.proj.weight" in state)
  got = [kind for _, kind, _ in found]
  want = [kind for kind, _ in plan]
  if got != want:
    errors.append(
        "the timm stem's layers (" + ", ".join(f"{m[len(_BACKBONE):]}:{k}"
                                               for m, k, _ in found) +
        f") do not match the model's stem ({', '.join(f'{n}:{k}' for k, n in plan)}); "
        "build the ViT with the matching stem")
    return {}
  out = {}
  for (module, kind, leaves), (_, name) in zip(found, plan):
    rule = {"conv": _conv, "batch": _batchnorm, "layer": _norm}[kind]
    for leaf in leaves:
      if leaf == "num_batches_tracked":
        continue
      out[f"{module}.{leaf}"] = rule(("stem", name), leaf)
  return out


def _expected(model: ViT) -> dict[tuple, tuple]:
  """Our variables' flat paths and shapes, without running any initialiser."""
  images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(shapes)).items()}


def _name(path: tuple) -> str:
  return path[0] + ":" + "/".join(path[1:])


def timm_to_flax(state_dict: Mapping[str, Any], model: ViT) -> dict:
  """timm VisionTransformer state dict -> {'params': ..., 'batch_stats': ...} for `model`.

  `batch_stats` is present exactly when the model has BatchNorm (conv stems), matching
  `model.init`. Raises ValueError naming every unexpected or missing key and every shape
  mismatch.
  """
  state = {k: _to_numpy(v) for k, v in state_dict.items()
           if not k.endswith("num_batches_tracked")}
  errors: list[str] = []
  rules = _map_backbone(state, model, errors)
  stem_failed = bool(errors)  # then its keys are already reported as a layer mismatch
  for key in state:
    if key in _TOP:
      rules[key] = _TOP[key]
    elif m := _BLOCK.match(key):
      i, module, leaf = m.groups()
      path = (f"block_{i}", *_BLOCK_NAMES[module])
      rules[key] = (_norm if module.startswith("norm") else _linear)(path, leaf)

  expected = _expected(model)
  flat: dict[tuple, np.ndarray] = {}
  source: dict[tuple, str] = {}
  mismatched: set[tuple] = set()
  unexpected = []
  for key, value in state.items():
    if key not in rules:
      if not (stem_failed and key.startswith(_BACKBONE)):
        unexpected.append(key)
      continue
    path, transform = rules[key]
    if path not in expected:
      unexpected.append(f"{key} (-> {_name(path)}, which the model does not have)")
      continue
    if path in flat:
      errors.append(f"{source[path]} and {key} both map to {_name(path)}")
      continue
    value = transform(value)
    if value.shape != expected[path]:
      mismatched.add(path)
      errors.append(f"{key} {tuple(state[key].shape)} -> {_name(path)} has shape "
                    f"{value.shape}, the model expects {expected[path]}")
      continue
    flat[path], source[path] = value, key
  if unexpected:
    errors.append("unexpected timm keys: " + ", ".join(unexpected))
  # A variable with a shape error is reported once, as a mismatch, not also as missing.
  missing = [_name(p) for p in expected if p not in flat and p not in mismatched]
  if missing:
    errors.append("model variables with no timm weight: " + ", ".join(missing))
  if errors:
    raise ValueError("Cannot convert the timm state dict to this model:\n  - " +
                     "\n  - ".join(errors))

  variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
  return {k: variables[k] for k in ("params", "batch_stats") if k in variables}
