"""Initialisers, chosen by the model's `init` knob.

- "jax": the JAX-ViT style of big_vision / timm `weight_init='jax'`: convs lecun-normal,
  linears xavier-uniform (q, k and v each as its own d x d matrix), MLP biases
  N(0, 1e-6^2), other biases zero, learned position embedding trunc-normal(0.02), class
  token and head zero.
- "pycls": the conv-stem reference (facebookresearch/pycls `pycls/models/vit.py`,
  `init_weights_vit`, read at commit 206d0db): patchify conv normal std sqrt(1/fan_in)
  (torch's trunc_normal_ cuts at +-2 absolute, which never binds at these stds); the
  stem's hidden 3x3 convs keep PyTorch's default U(+-1/sqrt(fan_in)); the stem's last
  conv normal std sqrt(2/out_channels); the fused qkv projection xavier-uniform over
  (d, 3d) as torch.nn.MultiheadAttention's in_proj, its output projection PyTorch's
  default U(+-1/sqrt(d)); attention biases zero; MLP xavier-uniform with N(0, 1e-6^2)
  biases; position embedding N(0, 0.02^2); class token and head zero.
  (papers.md section 1 lists N(0, 2/out_ch) for the hidden stem convs; the code read
  above leaves them at PyTorch's default, and we follow the code.)

Attention initialisation (`attention_init`) is a separate knob, applied on top of the
style: see `structured_init.py` (default, mimetic, impulse3/5 and their closed forms).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from convstem_jax.models.structured_init import KINDS as ATTENTION_INITS
from convstem_jax import errors

INIT_STYLES = ("jax", "pycls")

zeros = nn.initializers.zeros
xavier = nn.initializers.xavier_uniform()
# PyTorch's default for nn.Linear / nn.Conv2d weights: kaiming_uniform(a=sqrt(5)),
# which is U(+-1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
torch_default = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def check_style(style: str) -> None:
  if style not in INIT_STYLES:
    raise errors.UserError(f"Unknown init '{style}'; valid: {', '.join(INIT_STYLES)}.")


def _fan_out_normal(scale: float):
  """normal with std sqrt(scale / out_channels) for an HWIO kernel (pycls cstem_last)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * jnp.sqrt(scale / shape[-1]).astype(dtype)
  return init


def stem_conv_init(style: str):
  return nn.initializers.lecun_normal() if style == "jax" else torch_default


def stem_projection_init(style: str, after_layers: bool):
  if style == "jax":
    return nn.initializers.lecun_normal()
  if after_layers:  # pycls "cstem_last"
    return _fan_out_normal(2.0)
  return nn.initializers.variance_scaling(1.0, "fan_in", "normal")  # pycls patchify


def qkv_kernel_init(style: str):
  """Fused (d, 3d) kernel, columns ordered [q | k | v], each head-major."""
  if style == "pycls":
    return xavier

  def per_projection_xavier(key, shape, dtype=jnp.float32):
    d, three_d = shape
    keys = jax.random.split(key, 3)
    return jnp.concatenate([xavier(k, (d, three_d // 3), dtype) for k in keys], axis=1)
  return per_projection_xavier


def attn_out_init(style: str):
  return xavier if style == "jax" else torch_default


def mlp_kernel_init(style: str):
  del style  # both references use xavier-uniform
  return xavier


def mlp_bias_init(style: str):
  del style
  return nn.initializers.normal(1e-6)


def posemb_init(style: str):
  if style == "jax":
    return nn.initializers.truncated_normal(0.02)
  return nn.initializers.normal(0.02)
