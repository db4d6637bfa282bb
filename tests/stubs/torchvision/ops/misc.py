"""Stand-in for torchvision.ops.misc: a small working FrozenBatchNorm2d.

timm imports it at module level and checks isinstance() against it; a real (if minimal)
module keeps those code paths honest should a test ever build one.
"""
import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
  """BatchNorm2d with fixed statistics and affine parameters (all buffers)."""

  def __init__(self, num_features: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.register_buffer("weight", torch.ones(num_features))
    self.register_buffer("bias", torch.zeros(num_features))
    self.register_buffer("running_mean", torch.zeros(num_features))
    self.register_buffer("running_var", torch.ones(num_features))

  def forward(self, x):
    scale = self.weight * (self.running_var + self.eps).rsqrt()
    shift = self.bias - self.running_mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]
