"""Weights in and out: files, name mappings, resampling (one home for all three).

  core.py        our variable names ('params/block_0/attn/qkv/kernel'), tensor layouts
  files.py       what a path holds (our runs, .npz, .safetensors, .pth/.pyth), as data
  timm.py        timm VisionTransformer names, both ways
  big_vision.py  big_vision / vit_jax npz names, both ways
  pycls.py       pycls ViT names (Xiao et al.'s released models), in
  resample.py    position embeddings for another grid
  load.py        strict matching against a model; the trainer's init_from

Export: `python -m convstem_jax.tools.export`.
"""

from convstem_jax.weights.load import import_weights, init_from, load_variables
from convstem_jax.weights.timm import timm_to_flax
