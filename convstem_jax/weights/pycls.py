"""pycls ViT state dicts (`.pyth`, the format of Xiao et al.'s released models).

Names from facebookresearch/pycls `pycls/models/vit.py` and `blocks.py`:

  stem.patchify.{weight,bias}                 -> stem/embedding (patchify stem)
  stem.cstem{i}_conv.weight                   -> stem/conv_i (3x3, no bias)
  stem.cstem{i}_bn.{weight,bias,running_*}    -> stem/norm_i
  stem.cstem_last_conv.{weight,bias}          -> stem/embedding (the 1x1 projection)
  class_token [1, 1, d]                       -> cls
  pos_embedding [tokens, 1, d] (sequence first) -> pos_embedding [1, tokens, d]
  encoder.block_{i}.ln_1 / ln_2               -> block_i/norm1 / norm2
  encoder.block_{i}.self_attention.block.in_proj_{weight,bias}  (torch MultiheadAttention)
                                              -> block_i/attn/qkv
  encoder.block_{i}.self_attention.block.out_proj.*  -> block_i/attn/out
  encoder.block_{i}.mlp_block.linear_{1,2}    -> block_i/mlp/fc{1,2}
  encoder.ln                                  -> encoder_norm
  head.head_fc                                -> head

pycls's conventions that weights do not carry: LayerNorm eps 1e-5 (cfg.LN.EPS; set
`model.layer_norm_eps=1e-5` to reproduce its outputs), BatchNorm eps 1e-5 (ours too), and
'pooled' classification averaging after the final norm (ours: 'gap' averages before).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import numpy as np

from convstem_jax.models.vit import ViT
from convstem_jax.weights import core

_LEAF = {"weight": "scale", "bias": "bias"}
_BN = {"weight": "params/{}/scale", "bias": "params/{}/bias",
       "running_mean": "batch_stats/{}/mean", "running_var": "batch_stats/{}/var"}
_BLOCK_LINEAR = {"self_attention.block.out_proj": "attn/out", "mlp_block.linear_1": "mlp/fc1",
                 "mlp_block.linear_2": "mlp/fc2"}


def is_pycls(keys) -> bool:
  return any(k.startswith(("encoder.block_", "stem.patchify.", "stem.cstem")) for k in keys)


def _rename(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  linear = lambda n, leaf: ((f"params/{n}/kernel", core.linear_swap(value)) if leaf == "weight"
                            else (f"params/{n}/bias", value))
  conv = lambda n, leaf: ((f"params/{n}/kernel", core.conv_to_ours(value)) if leaf == "weight"
                          else (f"params/{n}/bias", value))
  if m := re.fullmatch(r"stem\.(patchify|cstem_last_conv)\.(weight|bias)", key):
    return conv("stem/embedding", m.group(2))
  if m := re.fullmatch(r"stem\.cstem(\d+)_conv\.(weight|bias)", key):
    return conv(f"stem/conv_{m.group(1)}", m.group(2))
  if m := re.fullmatch(r"stem\.cstem(\d+)_bn\.(weight|bias|running_mean|running_var)", key):
    return _BN[m.group(2)].format(f"stem/norm_{m.group(1)}"), value
  if key == "class_token":
    return "params/cls", value
  if key == "pos_embedding":  # [tokens, 1, d] (or [1, tokens, d] in older pycls)
    return "params/pos_embedding", (value.transpose(1, 0, 2) if value.shape[1] == 1
                                    and value.shape[0] != 1 else value)
  if m := re.fullmatch(r"encoder\.block_(\d+)\.(.+)\.(weight|bias)", key):
    i, module, leaf = m.groups()
    if module in ("ln_1", "ln_2"):
      return f"params/block_{i}/norm{module[-1]}/{_LEAF[leaf]}", value
    if module in _BLOCK_LINEAR:
      return linear(f"block_{i}/{_BLOCK_LINEAR[module]}", leaf)
  if m := re.fullmatch(r"encoder\.block_(\d+)\.self_attention\.block\.in_proj_(weight|bias)",
                       key):
    return linear(f"block_{m.group(1)}/attn/qkv", m.group(2))
  if m := re.fullmatch(r"encoder\.ln\.(weight|bias)", key):
    return f"params/encoder_norm/{_LEAF[m.group(1)]}", value
  if m := re.fullmatch(r"head\.head_fc\.(weight|bias)", key):
    return linear("head", m.group(1))
  return None


def from_pycls(state_dict: Mapping[str, Any], model: ViT) -> core.Converted:
  """A pycls ViT state dict renamed to `model`'s variables (unchecked)."""
  out = core.Converted()
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    renamed = _rename(key, core.to_numpy(value))
    if renamed is None:
      out.unused.append(key)
    else:
      out.add(*renamed, key)
  if model.layer_norm_eps != 1e-5:
    logging.warning("pycls models use LayerNorm eps 1e-5 and this model %g: outputs will "
                    "differ slightly; set --config.model.layer_norm_eps=1e-5 to match.",
                    model.layer_norm_eps)
  if "class_token" not in state_dict and model.pool == "gap":
    logging.warning("pycls's 'pooled' models average the tokens after the final norm; "
                    "this model's 'gap' averages before it, so outputs differ until "
                    "fine-tuned.")
  return out
