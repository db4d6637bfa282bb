"""Mixup and CutMix on device, inside the jitted train step (pure jnp, no TensorFlow).

timm's `Mixup(mode='batch')`, as DeiT and the conv-stem paper use it: one draw per batch.
With probability `prob` the batch is mixed, else left alone (lam = 1). When both alphas
are > 0, CutMix is chosen with probability `switch_prob`, else mixup; with one alpha > 0
only that one is used. Every image is mixed with its partner in the reversed batch
(`x[::-1]`, timm's `flip(0)`), which under data sharding is one collective permute.

  mixup  (alpha a):  lam ~ Beta(a, a);  x = lam * x + (1 - lam) * x[::-1]
  CutMix (alpha a):  lam ~ Beta(a, a);  a box of side sqrt(1 - lam) * (H, W) (truncated
                     to whole pixels, centred anywhere, clipped at the borders) is pasted
                     from x[::-1]; lam is then *corrected* to 1 - box area / (H W), the
                     exact share of pixels kept (timm's correct_lam=True).
  targets            lam * y + (1 - lam) * y[::-1], y one-hot smoothed as timm's
                     mixup_target: (1 - s) * onehot + s / num_classes. Smoothing is linear
                     and each row sums to 1, so smoothing before or after mixing is the same.

`mix(rng, images, one_hot, ...)` -> (images, targets, info) with info = {"lam",
"cutmix"} scalars for logging. Shapes and control flow are static, so it jits and
vmaps; both branches are computed and selected with `jnp.where` (cheap elementwise work
next to the model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convstem_jax import config as config_lib
from convstem_jax import optim


def cutmix_box(rng, lam, height: int, width: int):
  """timm's rand_bbox: (top, bottom, left, right), half-open, clipped to the image."""
  ry, rx = jax.random.split(rng)
  ratio = jnp.sqrt(jnp.clip(1.0 - lam, 0.0, 1.0))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ry, (), 0, height)
  cx = jax.random.randint(rx, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  return top, bottom, left, right


def box_mask(box, height: int, width: int):
  """[H, W, 1] boolean mask, True inside the box."""
  top, bottom, left, right = box
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  return inside[:, :, None]


def sample_params(rng, *, mixup_alpha: float, cutmix_alpha: float,
                  switch_prob: float = 0.5, prob: float = 1.0):
  """(lam before correction, use_cutmix, apply) for one batch, as jnp scalars."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError("mix: set mixup_alpha > 0 or cutmix_alpha > 0.")
  r_apply, r_switch, r_mix, r_cut = jax.random.split(rng, 4)
  apply = jax.random.uniform(r_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(r_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = (jax.random.beta(r_mix, mixup_alpha, mixup_alpha)
             if mixup_alpha > 0 else jnp.float32(1.0))
  lam_cut = (jax.random.beta(r_cut, cutmix_alpha, cutmix_alpha)
             if cutmix_alpha > 0 else jnp.float32(1.0))
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  return lam, use_cutmix, apply


def mix(rng, images, one_hot, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5, prob: float = 1.0, smoothing: float = 0.0):
  """Mixes a batch [B, H, W, C] with its reverse; returns (images, targets, info).

  `one_hot` is [B, K] (hard labels); targets are the smoothed, mixed soft labels, each
  row summing to 1. `info["lam"]` is the weight of each image's own label (after the
  CutMix area correction; 1 when the batch was left unmixed).
  """
  r_params, r_box = jax.random.split(rng)
  lam, use_cutmix, apply = sample_params(
      r_params, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      switch_prob=switch_prob, prob=prob)
  height, width = images.shape[1], images.shape[2]
  partner = images[::-1]

  box = cutmix_box(r_box, lam, height, width)
  inside = box_mask(box, height, width)
  area = (box[1] - box[0]) * (box[3] - box[2])
  lam_cut = 1.0 - area.astype(jnp.float32) / float(height * width)
  cut_images = jnp.where(inside[None], partner, images)

  lam_mix = lam.astype(images.dtype)
  mix_images = lam_mix * images + (1 - lam_mix) * partner

  new_images = jnp.where(use_cutmix, cut_images, mix_images)
  lam = jnp.where(use_cutmix, lam_cut, lam)
  lam = jnp.where(apply, lam, 1.0)
  new_images = jnp.where(apply, new_images, images).astype(images.dtype)

  y = optim.smooth_labels(one_hot.astype(jnp.float32), smoothing)
  targets = lam * y + (1.0 - lam) * y[::-1]
  info = {"lam": lam, "cutmix": jnp.logical_and(apply, use_cutmix)}
  return new_images, targets, info


def enabled(config) -> bool:
  return config_lib.get(config, "mixup_alpha") > 0 or config_lib.get(config, "cutmix_alpha") > 0


def mix_from_config(config, rng, images, one_hot):
  """`mix` with the config's alphas, switch and apply probabilities and label smoothing."""
  return mix(rng, images, one_hot,
             mixup_alpha=float(config_lib.get(config, "mixup_alpha")),
             cutmix_alpha=float(config_lib.get(config, "cutmix_alpha")),
             switch_prob=float(config_lib.get(config, "mixup_switch_prob")),
             prob=float(config_lib.get(config, "mixup_prob")),
             smoothing=float(config_lib.get(config, "label_smoothing")))
