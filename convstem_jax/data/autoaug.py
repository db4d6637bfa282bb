"""AutoAugment, the ImageNet policy, in TensorFlow (for pp.py's `autoaug`).

The policy is the AutoAugment paper's (Cubuk et al. 2018, arXiv:1805.09501) 25 ImageNet
sub-policies, as timm's `original` policy (timm/data/auto_augment.py,
`auto_augment_policy_original`, i.e. `auto_augment_transform('original')`):
  - per image, one sub-policy is drawn uniformly;
  - its two (op, probability, magnitude) steps run in order, each applied with its
    probability;
  - magnitude m in 0..10 (fixed per step; `mstd` > 0 adds timm's N(0, mstd^2) noise,
    clipped to [0, 10], as 'original-mstd0.5'), level = m / 10.

Op arguments (timm's level functions for this policy; level in [0, 1]):
  PosterizeOriginal    keep int(4 level) + 4 high bits (4..8: weaker as m grows)
  Solarize             invert pixels >= min(256, int(256 level)) (weaker as m grows)
  Rotate               +-30 level degrees, sign uniform
  ShearX               +-0.3 level, sign uniform
  Color, Contrast, Sharpness
                       PIL ImageEnhance with factor 1.8 level + 0.1 (0.1..1.9; no sign)
  AutoContrast, Equalize, Invert
                       no argument
The ops themselves are randaug.py's (PIL-equal pixel ops; geometric ops bilinear with the
ImageNet mean fill). Input: one HWC 3-channel image in [0, 255]; output uint8.
"""

from __future__ import annotations

import tensorflow as tf

from convstem_jax.data import randaug as ra

# (op, probability, magnitude) pairs, in the paper's order (timm's `original`).
POLICY = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)
STEPS = 2


def _factor(level):
  return tf.cast(1.8 * level + 0.1, tf.float32)


def _signed(level, sign, scale):
  return tf.cast(sign * scale * level, tf.float32)


def _bits(level):
  return tf.cast(tf.floor(level * 4.0), tf.int32) + 4


def _threshold(level):
  return tf.cast(tf.minimum(tf.floor(level * 256.0), 256.0), tf.float32)


# name -> fn(image, level (float64 scalar in [0, 1]), sign (+-1 float64))
OPS = {
    "AutoContrast": lambda x, l, s: ra.auto_contrast(x),
    "Equalize": lambda x, l, s: ra.equalize(x),
    "Invert": lambda x, l, s: ra.invert(x),
    "PosterizeOriginal": lambda x, l, s: ra.posterize(x, _bits(l)),
    "Solarize": lambda x, l, s: ra.solarize(x, _threshold(l)),
    "Rotate": lambda x, l, s: ra.rotate(x, _signed(l, s, 30.0)),
    "ShearX": lambda x, l, s: ra.shear_x(x, _signed(l, s, 0.3)),
    "Color": lambda x, l, s: ra.color(x, _factor(l)),
    "Contrast": lambda x, l, s: ra.contrast(x, _factor(l)),
    "Sharpness": lambda x, l, s: ra.sharpness(x, _factor(l)),
}


def draw(seed, mstd: float = 0.0, policy=POLICY):
  """The random choices for one image: (sub-policy index int32 [], apply bool [2],
  level float64 [2] in [0, 1], sign float64 [2] of +-1)."""
  s = [tf.random.experimental.stateless_fold_in(seed, j) for j in range(4)]
  index = tf.random.stateless_uniform([], s[0], 0, len(policy), dtype=tf.int32)
  probs = tf.constant([[p for _, p, _ in sub] for sub in policy], tf.float64)
  mags = tf.constant([[m for _, _, m in sub] for sub in policy], tf.float64)
  # timm skips a step when random() > p: applied with probability p (never for p = 0).
  apply = tf.random.stateless_uniform([STEPS], s[1], dtype=tf.float64) < probs[index]
  m = mags[index]
  if mstd > 0:
    m = m + mstd * tf.random.stateless_normal([STEPS], s[2], dtype=tf.float64)
  level = tf.clip_by_value(m, 0.0, 10.0) / 10.0
  sign = tf.where(tf.random.stateless_uniform([STEPS], s[3]) < 0.5,
                  tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64))
  return index, apply, level, sign


def apply_sub_policy(index, image, apply, level, sign, policy=POLICY):
  """Sub-policy number `index` (int32 scalar tensor) on a float [0, 255] image, with the
  given per-step apply flags, levels and signs."""
  def branch(sub):
    def run():
      x = image
      for j, (name, _, _) in enumerate(sub):
        fn = OPS[name]
        x = tf.cond(apply[j], lambda x=x, fn=fn, j=j: fn(x, level[j], sign[j]),
                    lambda x=x: x)
      return x
    return run

  out = tf.switch_case(index, [branch(sub) for sub in policy])
  out.set_shape(image.shape)
  return out


def autoaugment(image, seed, mstd: float = 0.0):
  """AutoAugment (ImageNet policy) on one HWC 3-channel image in [0, 255]; uint8 out."""
  index, apply, level, sign = draw(seed, mstd)
  x = apply_sub_policy(index, tf.cast(image, tf.float32), apply, level, sign)
  return tf.cast(x, tf.uint8)
