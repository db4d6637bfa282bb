"""timm `VisionTransformer` state dicts, both ways.

    converted = from_timm(state_dict, model)        # names -> ours (load.match checks)
    state, code = to_timm(variables, model)         # ours -> a strict-loadable state dict

The state dict may hold torch tensors or numpy arrays; torch is never imported here.
Layouts:

- patchify: `patch_embed.proj` (timm's PatchEmbed) <-> `stem/embedding`;
- conv stems: `patch_embed.backbone.*` (timm's HybridEmbed around a ConvStem or any
  Sequential of Conv2d / BatchNorm2d / LayerNorm2d / activations). Its convs and norms,
  in module order, are `stem/conv_i` and `stem/norm_i`; the projection is
  `patch_embed.proj` when HybridEmbed has one (proj=True) and otherwise the backbone's
  last conv (proj=False, as timm's ConvStem ends in a biased conv). Export writes
  Xiao et al.'s stems as a ConvStem (their layout exactly: 3x3 convs, BN, ReLU, a biased
  1x1 conv) and every other stem as a Sequential plus HybridEmbed's projection.

Weights do not record everything: the head count, paddings, activations, norm epsilons
and timm's `no_embed_class` (a class-free `pos_embed` shows up as a shape mismatch) must
match the `ViT` settings; `to_timm` prints the constructor that matches, and the parity
tests check the layouts end to end.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from convstem_jax import errors
from convstem_jax.models import stems
from convstem_jax.models.vit import LN_EPS, ViT, sincos2d
from convstem_jax.weights import core

_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                    r"\.(weight|bias)$")
_BLOCK_NAMES = {"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn/qkv",
                "attn.proj": "attn/out", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
_BACKBONE = "patch_embed.backbone."

# A rule: their leaf -> (our name, to-ours transform, to-timm transform).
_SAME = (lambda w: w, lambda w: w)
_LINEAR = (core.linear_swap, core.linear_swap)
_CONV = (core.conv_to_ours, core.conv_to_torch)


def _linear(module: str, leaf: str):
  if leaf == "weight":
    return f"params/{module}/kernel", *_LINEAR
  return f"params/{module}/bias", *_SAME


def _conv(module: str, leaf: str):
  if leaf == "weight":
    return f"params/{module}/kernel", *_CONV
  return f"params/{module}/bias", *_SAME


def _norm(module: str, leaf: str):
  return f"params/{module}/{'scale' if leaf == 'weight' else 'bias'}", *_SAME


def _batchnorm(module: str, leaf: str):
  if leaf in ("weight", "bias"):
    return _norm(module, leaf)
  return (f"batch_stats/{module}/{ {'running_mean': 'mean', 'running_var': 'var'}[leaf]}",
          *_SAME)


_RULES = {"conv": _conv, "batch": _batchnorm, "layer": _norm, "linear": _linear}
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def _top_rules(pool: str) -> dict[str, tuple]:
  final = "norm" if pool == "token" else "fc_norm"  # timm: fc_norm with average pooling
  return {"cls_token": ("params/cls", *_SAME), "pos_embed": ("params/pos_embedding", *_SAME),
          "patch_embed.proj.weight": _conv("stem/embedding", "weight"),
          "patch_embed.proj.bias": _conv("stem/embedding", "bias"),
          "head.weight": _linear("head", "weight"), "head.bias": _linear("head", "bias"),
          f"{final}.weight": _norm("encoder_norm", "weight"),
          f"{final}.bias": _norm("encoder_norm", "bias")}


_RANK = {"conv": 0, "bn": 1, "norm": 1}  # inside one of ConvStem's ConvNormAct blocks


def _module_order(module: str):
  """timm module names in forward order: ConvStem's '0.conv', '0.bn', '1.conv', ... and
  a Sequential's '0', '1', ..., '10' (a safetensors file stores its keys sorted as text,
  so their order in the file says nothing)."""
  def part(c):
    m = re.fullmatch(r"([a-z]*)(\d+)", c)
    return (int(m.group(2)), m.group(1), 0, "") if m else (-1, "", _RANK.get(c, 9), c)
  return tuple(part(c) for c in module[len(_BACKBONE):].split("."))


def _backbone_modules(state: Mapping[str, np.ndarray]) -> list[tuple[str, str, list[str]]]:
  """`patch_embed.backbone.*` keys as (module, kind, leaves), in forward order."""
  modules: dict[str, list[str]] = {}
  for key in state:
    if key.startswith(_BACKBONE):
      module, leaf = key.rsplit(".", 1)
      modules.setdefault(module, []).append(leaf)
  out = []
  for module in sorted(modules, key=_module_order):
    leaves, weight = modules[module], state.get(f"{module}.weight")
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
    plan.append(("conv", f"stem/conv_{i}"))
    if layer.norm != "none":
      plan.append((layer.norm, f"stem/norm_{i}"))
  if not has_proj:  # HybridEmbed(proj=False): the backbone's last conv is the projection
    plan.append(("conv", "stem/embedding"))
  return plan


def _map_backbone(state, model: ViT, out: core.Converted) -> dict[str, tuple]:
  found = _backbone_modules(state)
  if not found:
    if model.stem_spec().layers:
      out.problems.append(
          f"the timm model has a patchify embedding (no {_BACKBONE}* keys) but the "
          f"model's stem has {len(model.stem_spec().layers)} conv layers; build the ViT "
          "with stem='patchify'")
    return {}
  plan = _stem_plan(model, "patch_embed.proj.weight" in state)
  if [k for _, k, _ in found] != [k for k, _ in plan]:
    out.problems.append(
        "the timm stem's layers (" + ", ".join(f"{m[len(_BACKBONE):]}:{k}"
                                               for m, k, _ in found) +
        f") do not match the model's stem ({', '.join(f'{n}:{k}' for k, n in plan)}); "
        "build the ViT with the matching stem")
    return {}
  rules = {}
  for (module, kind, leaves), (_, name) in zip(found, plan):
    for leaf in leaves:
      rules[f"{module}.{leaf}"] = _RULES[kind](name, leaf)
  return rules


def from_timm(state_dict: Mapping[str, Any], model: ViT) -> core.Converted:
  """A timm VisionTransformer state dict renamed to `model`'s variables (unchecked)."""
  state = {k: core.to_numpy(v) for k, v in state_dict.items()
           if not k.endswith("num_batches_tracked")}
  out = core.Converted()
  rules = _map_backbone(state, model, out)
  stem_failed = bool(out.problems)  # then its keys are already reported as a mismatch
  top = _top_rules(model.pool)
  for key in state:
    if key in top:
      rules[key] = top[key]
    elif m := _BLOCK.match(key):
      i, module, leaf = m.groups()
      path = f"block_{i}/{_BLOCK_NAMES[module]}"
      rules[key] = (_norm if module.startswith("norm") else _linear)(path, leaf)
  for key, value in state.items():
    if key in rules:
      name, to_ours, _ = rules[key]
      out.add(name, to_ours(value), key)
    elif not (stem_failed and key.startswith(_BACKBONE)):
      out.unused.append(key)
  return out


def timm_to_flax(state_dict: Mapping[str, Any], model: ViT) -> dict:
  """timm state dict -> {'params': ..., 'batch_stats': ...} for `model`, strictly.

  `batch_stats` is present exactly when the model has BatchNorm (conv stems). Raises a
  UserError (a ValueError) naming every unexpected or missing key and every shape
  mismatch.
  """
  from convstem_jax.weights import load  # pylint: disable=g-import-not-at-top
  flat = load.match(from_timm(state_dict, model), model, source="the timm state dict")
  return core.unflatten(flat)


# ------------------------------------------------------------------------ export

def _timm_pad(layer: stems.ConvLayer) -> int:
  """timm's create_conv2d(padding='') symmetric padding, as ConvStem builds it."""
  return ((layer.stride - 1) + (layer.kernel - 1)) // 2


def _is_convstem(spec: stems.StemSpec) -> bool:
  """Xiao et al.'s layout, which timm's ConvStem builds exactly."""
  return bool(spec.layers) and spec.proj_kernel == spec.proj_stride == 1 and all(
      l.norm == "batch" and l.act == "relu" and not l.bias and l.pad == _timm_pad(l)
      for l in spec.layers) and spec.proj_bias


def _export_plan(model: ViT) -> tuple[list[tuple[str, str, Any]], list[str]]:
  """[(timm key, our name or None, to-timm transform)] for every timm tensor, and the
  lines of Python that build the matching timm model's patch embedding."""
  spec = model.stem_spec()
  plan: list[tuple[str, str | None, Any]] = []

  def module(kind, ours, theirs, leaves):
    for leaf in leaves:
      name, _, to_timm = _RULES[kind](ours, leaf)
      plan.append((f"{theirs}.{leaf}", name, to_timm))
    if kind == "batch":
      plan.append((f"{theirs}.num_batches_tracked", None, None))

  embed = []
  conv_leaves = lambda bias: ("weight", "bias") if bias else ("weight",)
  if not spec.layers:
    module("conv", "stem/embedding", "patch_embed.proj", conv_leaves(spec.proj_bias))
  elif _is_convstem(spec):
    for i in range(len(spec.layers)):  # ConvNormAct blocks named conv, bn
      module("conv", f"stem/conv_{i}", f"{_BACKBONE}{i}.conv", ("weight",))
      module("batch", f"stem/norm_{i}", f"{_BACKBONE}{i}.bn", _BN_LEAVES)
    module("conv", "stem/embedding", f"{_BACKBONE}{len(spec.layers)}.conv",
           ("weight", "bias"))
    kernels = tuple(l.kernel for l in spec.layers) + (1,)
    strides = tuple(l.stride for l in spec.layers) + (1,)
    channels = tuple(l.channels for l in spec.layers) + (model.width,)
    embed = [f"backbone = ConvStem(in_chans=3, depth={len(kernels)}, channels={channels}, "
             f"kernel_size={kernels}, stride={strides})",
             "embed_layer = partial(HybridEmbed, backbone=backbone, proj=False)"]
  else:
    if not (spec.proj_kernel == spec.proj_stride and spec.projection.pad == 0
            and spec.proj_bias):
      raise errors.UserError(
          "timm's HybridEmbed projects with a biased conv of kernel = stride; this stem's "
          "projection is not one, so it has no timm equivalent; export to npz instead.")
    layers, j, c_in = [], 0, 3
    for i, l in enumerate(spec.layers):
      module("conv", f"stem/conv_{i}", f"{_BACKBONE}{j}", conv_leaves(l.bias))
      layers.append(f"nn.Conv2d({c_in}, {l.channels}, {l.kernel}, {l.stride}, {l.pad}, "
                    f"bias={l.bias})")
      j, c_in = j + 1, l.channels
      if l.norm != "none":
        kind = l.norm
        module(kind, f"stem/norm_{i}", f"{_BACKBONE}{j}",
               _BN_LEAVES if kind == "batch" else ("weight", "bias"))
        layers.append(f"nn.BatchNorm2d({l.channels})" if kind == "batch"
                      else f"LayerNorm2d({l.channels}, eps=1e-6)")
        j += 1
      if l.act != "none":
        layers.append({"relu": "nn.ReLU()", "gelu": "nn.GELU()"}[l.act])
        j += 1
    module("conv", "stem/embedding", "patch_embed.proj", ("weight", "bias"))
    embed = ["backbone = nn.Sequential(\n    " + ",\n    ".join(layers) + ")",
             "embed_layer = partial(HybridEmbed, backbone=backbone, proj=True)"]
  if model.pool == "token":
    plan.append(("cls_token", "params/cls", None))
  if model.posemb != "none":  # sin-cos exports as the values of a learned embedding
    plan.append(("pos_embed", "params/pos_embedding", None))
  for i in range(model.depth):
    for leaf in ("weight", "bias"):
      plan.append((f"blocks.{i}.norm1.{leaf}", *_norm(f"block_{i}/norm1", leaf)[::2]))
      if leaf == "weight" or model.qkv_bias:
        plan.append((f"blocks.{i}.attn.qkv.{leaf}",
                     *_linear(f"block_{i}/attn/qkv", leaf)[::2]))
      plan.append((f"blocks.{i}.attn.proj.{leaf}", *_linear(f"block_{i}/attn/out", leaf)[::2]))
      plan.append((f"blocks.{i}.norm2.{leaf}", *_norm(f"block_{i}/norm2", leaf)[::2]))
      for fc in ("fc1", "fc2"):
        plan.append((f"blocks.{i}.mlp.{fc}.{leaf}", *_linear(f"block_{i}/mlp/{fc}", leaf)[::2]))
  final = "norm" if model.pool == "token" else "fc_norm"
  for leaf in ("weight", "bias"):
    plan.append((f"{final}.{leaf}", *_norm("encoder_norm", leaf)[::2]))
    if model.num_classes:
      plan.append((f"head.{leaf}", *_linear("head", leaf)[::2]))
  return plan, embed


def _posemb_table(model: ViT) -> np.ndarray:
  table = sincos2d(model.grid, model.width)
  if model.pool == "token":
    table = np.concatenate([np.zeros((1, model.width), np.float32), table])
  return table[None]


def create_model_code(model: ViT, embed: list[str]) -> str:
  """Python that builds the timm model matching `model` (for `to_timm`'s output)."""
  spec = model.stem_spec()
  args = [f"img_size={model.img_size}",
          f"patch_size={spec.proj_kernel if spec.layers else model.patch_size}",
          f"embed_dim={model.width}", f"depth={model.depth}",
          f"num_heads={model.num_heads}", f"mlp_ratio={model.mlp_dim / model.width!r}",
          f"qkv_bias={model.qkv_bias}", f"num_classes={model.num_classes}"]
  if model.pool == "gap":
    args += ["class_token=False", "global_pool='avg'"]
  if model.posemb == "none":
    args.append("pos_embed='none'")
  if model.layer_norm_eps != LN_EPS:
    args.append(f"norm_layer=partial(nn.LayerNorm, eps={model.layer_norm_eps!r})")
  lines = ["from functools import partial", "import timm", "import torch.nn as nn",
           "from safetensors.torch import load_file"]
  if embed:
    lines += ["from timm.layers import HybridEmbed, LayerNorm2d",
              "from timm.models.vision_transformer_hybrid import ConvStem", *embed]
    args.append("embed_layer=embed_layer")
  lines.append("model = timm.create_model('vit_base_patch16_224', pretrained=False,\n    "
               + ",\n    ".join(args) + ")")
  lines.append("model.load_state_dict(load_file(PATH), strict=True)")
  return "\n".join(lines)


def to_timm(flat: Mapping[str, np.ndarray], model: ViT) -> tuple[dict[str, np.ndarray], str]:
  """Our variables (flat names) -> (timm state dict of numpy arrays, Python that builds
  the timm model that loads it with strict=True; PATH stands for the file)."""
  plan, embed = _export_plan(model)
  state = {}
  for key, name, to_timm in plan:
    if name is None:  # BatchNorm2d's counter: not a weight, but strict loading wants it
      state[key] = np.zeros((), np.int64)
    elif name == "params/pos_embedding" and model.posemb == "sincos2d":
      state[key] = _posemb_table(model)
    else:
      state[key] = np.ascontiguousarray((to_timm or (lambda w: w))(flat[name]))
  return state, create_model_code(model, embed)


def fixed_posemb(model: ViT) -> np.ndarray | None:
  """The fixed sin-cos table as timm holds it (None for other encodings)."""
  return _posemb_table(model) if model.posemb == "sincos2d" else None
