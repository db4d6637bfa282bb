"""Named models: the papers' tables as data, and `create_model(name, **overrides)`.

Sources (see ../shared/reference/papers.md): DeiT / ViT sizes (Ti/S/B/L at patch 16,
class token); Xiao et al. 2021 Table 1 (ViT_P at 1/4/18/36GF; ViT_C = conv stem and one
block fewer; MLP ratio 3 at 1/4GF); Xiao Table 3 stem ablations S1-S4 at 4GF; Wang et
al. 2022 scaled-ReLU stem on ViT-Ti/S/B (same depth as the patchify model); Zheng et al.
2024 CIFAR model (32 px, patch 2, global average pooling, fixed sin-cos encoding).
"""

from __future__ import annotations

from convstem_jax.models.vit import ViT
from convstem_jax import errors

_SIZES = {  # width, depth, heads, mlp
    "ti": (192, 12, 3, 768), "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072), "l": (1024, 24, 16, 4096),
    "1gf": (192, 12, 3, 576), "4gf": (384, 12, 6, 1152),
    "18gf": (768, 12, 12, 3072), "36gf": (1024, 14, 16, 4096),
}


def _size(key: str, **kw) -> dict:
  width, depth, heads, mlp = _SIZES[key]
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, **kw)


VARIANTS: dict[str, dict] = {}
for _s in ("ti", "s", "b", "l"):
  VARIANTS[f"vit_{_s}16"] = _size(_s, stem="patchify")
for _s in ("ti", "s", "b"):
  VARIANTS[f"vit_{_s}16_srelu"] = _size(_s, stem="srelu")
for _gf in ("1gf", "4gf", "18gf", "36gf"):
  VARIANTS[f"vitp_{_gf}"] = _size(_gf, stem="patchify")
  VARIANTS[f"vitc_{_gf}"] = dict(_size(_gf, stem=f"conv_{_gf}"),
                                 depth=_SIZES[_gf][1] - 1)
for _i in range(1, 5):
  VARIANTS[f"vitc_4gf_s{_i}"] = dict(VARIANTS["vitc_4gf"], stem=f"conv_4gf_s{_i}")
VARIANTS["vit_ti2_32"] = _size("ti", img_size=32, patch_size=2, stem="patchify",
                               pool="gap", posemb="sincos2d")


def model_names() -> list[str]:
  return list(VARIANTS)


def model_kwargs(name: str, **overrides) -> dict:
  """The keyword arguments `create_model` would pass to `ViT`."""
  if name not in VARIANTS:
    raise errors.UserError(f"Unknown model '{name}'; valid names: {', '.join(VARIANTS)}.")
  unknown = set(overrides) - set(ViT.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise errors.UserError(f"Unknown model override(s) {sorted(unknown)}; valid: "
                     f"{', '.join(f for f in ViT.__dataclass_fields__ if f not in ('parent', 'name'))}.")
  return {**VARIANTS[name], **overrides}


def create_model(name: str, **overrides) -> ViT:
  """Build a named model, e.g. create_model('vitc_4gf', num_classes=10, dtype='bfloat16')."""
  return ViT(**model_kwargs(name, **overrides))


def model_from_config(config) -> ViT:
  """The model an experiment config describes: `config.model_name` with `config.model`
  overrides, and the class count and image size of its data."""
  overrides = {k: v for k, v in dict(config.get("model", {})).items() if v is not None}
  overrides.setdefault("num_classes", config.num_classes)
  overrides.setdefault("img_size", config.image_size)
  return create_model(config.model_name, **overrides)
