"""RandAugment with timm's `rand-m9-mstd0.5-inc1` meaning, in TensorFlow (for pp.py).

timm (timm/data/auto_augment.py, `rand_augment_transform`), as DeiT uses it:
  - `num_ops` (n, 2) ops per image, each drawn uniformly WITH replacement from the 15
    'increasing' ops below ('inc1': every op gets stronger as the magnitude grows);
  - each drawn op is applied with probability `prob` (timm's default p = 0.5);
  - each application draws its magnitude m ~ N(magnitude, mstd^2), clipped to [0, 10]
    ('m9-mstd0.5'), and level = m / 10; signed ops flip the sign with probability 1/2.

The op set and argument ranges (level in [0, 1]):
  AutoContrast                     per channel, min..max -> 0..255
  Equalize                         per-channel histogram equalisation (PIL's)
  Invert                           255 - x
  Rotate                           +-30 level degrees about the centre
  PosterizeIncreasing              keep 4 - int(4 level) high bits
  SolarizeIncreasing               invert pixels >= 256 - int(256 level)
  SolarizeAdd                      + int(110 level) to pixels < 128 (clipped at 255)
  Color/Contrast/Brightness/SharpnessIncreasing
                                   PIL ImageEnhance with factor max(0.1, 1 +- 0.9 level)
  ShearX, ShearY                   +-0.3 level
  TranslateXRel, TranslateYRel     +-0.45 level of the width / height
Geometric ops fill with the ImageNet mean colour (124, 116, 104), as timm's
create_transform sets `img_mean`; they interpolate bilinearly (timm picks bilinear or
bicubic in PIL; TensorFlow's projective transform has no bicubic). Each op rounds and
clips to uint8 values, as PIL does between ops.

Input: an image with values in [0, 255] (uint8, or float); output uint8. This is an
independent TensorFlow implementation, not a port of timm's PIL code.

Speed (tools/bench_input): on CPU, TensorFlow's broadcasting binary ops and `tf.where`
run several times slower than same-shape and scalar ones (2-7 ns against 0.1-0.3 ns per
element on one core of the 2-core AMD EPYC development VM, 2026-12-06;
docs/benchmarks.md), so the ops below spread per-channel values over the image once
(`per_channel`) and select with 0/1 masks. On the integer values every op keeps, the
pixel ops give exactly the numbers of the plain forms and the geometric ones the same
but for near-ties of .5 (tests/test_augment.py holds them to PIL and timm).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

FILL = (124.0, 116.0, 104.0)  # round(255 * IMAGENET_MEAN)

OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")


def _u8(x):
  """Round and clip to uint8 values, kept as float32."""
  return tf.clip_by_value(tf.round(x), 0.0, 255.0)


def per_channel(values, image):
  """`values` (one per channel) at the image's full shape, so that the op using it is
  same-shape (fast) rather than broadcasting (slow on CPU). A constant when both are
  static; when their lengths differ, the values as they are (broadcasting, as before)."""
  n = int(values.shape[0]) if tf.is_tensor(values) else len(values)
  if image.shape[-1] != n:
    return tf.cast(values, image.dtype)
  if image.shape.is_fully_defined() and not tf.is_tensor(values):
    return tf.constant(np.broadcast_to(np.asarray(values, image.dtype.as_numpy_dtype),
                                       image.shape))
  shape = tf.shape(image)
  return tf.reshape(tf.tile(tf.cast(values, image.dtype), [shape[0] * shape[1]]), shape)


def _select(mask, a, b):
  """tf.where(mask, a, b) for finite a, b: b + m (a - b) with m in {0, 1}, which is exact
  when a - b is (integer values), and same-shape, unlike SelectV2."""
  return b + tf.cast(mask, b.dtype) * (a - b)


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor): truncates towards zero, then clips
  (truncating and clipping to [0, 255] is flooring and clipping: negatives become 0)."""
  out = degenerate + factor * (image - degenerate)
  return tf.clip_by_value(tf.floor(out), 0.0, 255.0)


def _gray(image):
  """PIL's RGB -> L (ITU-R 601-2 luma), [h, w, 1]."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  return tf.round(r * 0.299 + g * 0.587 + b * 0.114)[..., None]


# ------------------------------------------------------------------ pixel ops

def _channel_index(image):
  """Pixel value v of channel c as index 256 c + v into a flattened [3, 256] table."""
  return tf.cast(image, tf.int32) + tf.cast(per_channel((0, 256, 512), image), tf.int32)


def _lookup(lut, index):
  """lut ([3, 256]) at `index` (_channel_index), float32; gather_nd with a trailing index
  axis runs about 1.5x faster than tf.gather on CPU (0.77 against 1.1-1.4 ms for 150k
  values, one core of the 2-core AMD EPYC VM, docs/benchmarks.md)."""
  return tf.gather_nd(tf.cast(tf.reshape(lut, [-1]), tf.float32), index[..., None])


def _channel_min_max(image):
  """Per-channel min and max; two single-axis reductions each, 4x faster on CPU than one
  over axes [0, 1] (0.22 against 0.9 ms at 224 px, same VM)."""
  return (tf.reduce_min(tf.reduce_min(image, 0), 0),
          tf.reduce_max(tf.reduce_max(image, 0), 0))


def auto_contrast(image):
  # PIL's lut, int(x * scale - lo * scale), in double precision as PIL computes it (a
  # float32 or (x - lo) * scale version is off by one where the product is near an
  # integer), on the 256 values of each channel, then looked up.
  # A flat channel (hi == lo) keeps its values: scale 1, offset 0 is the identity here.
  lo, hi = (tf.cast(v, tf.float64) for v in _channel_min_max(image))
  flat = hi <= lo
  scale = tf.where(flat, tf.ones_like(lo), 255.0 / tf.maximum(hi - lo, 1.0))
  offset = tf.where(flat, tf.zeros_like(lo), -lo * scale)
  values = tf.range(256, dtype=tf.float64)[None]
  lut = tf.clip_by_value(tf.floor(values * scale[:, None] + offset[:, None]), 0.0, 255.0)
  return _lookup(lut, _channel_index(image))


def equalize(image):
  """PIL ImageOps.equalize, per channel; the three channels' histograms and look-ups
  in one bincount and one gather (channel c's values offset by 256 c)."""
  index = _channel_index(image)
  hist = tf.reshape(tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768,
                                     dtype=tf.int32), [3, 256])
  # PIL: step = (sum of the histogram less its last non-empty bin) // 255, and
  # lut[i] = (step // 2 + sum(hist[:i])) // step; a channel with step 0 is kept.
  last_bin = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [1]), axis=1,
                             output_type=tf.int32)
  step = (tf.reduce_sum(hist, 1) - tf.gather(hist, last_bin, batch_dims=1)) // 255
  before = tf.concat([tf.zeros([3, 1], tf.int32), tf.cumsum(hist, 1)[:, :-1]], 1)
  lut = tf.minimum((step[:, None] // 2 + before) // tf.maximum(step, 1)[:, None], 255)
  lut = tf.where((step > 0)[:, None], lut, tf.range(256)[None])
  return _lookup(lut, index)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  """Keep the `bits` high bits (bits in 0..8): one uint8 AND with a scalar mask."""
  shift = tf.cast(8 - bits, tf.int32)
  mask = tf.cast(tf.bitwise.left_shift(255, shift) % 256, tf.uint8)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.uint8), mask), tf.float32)


def solarize(image, threshold):
  return _select(image >= threshold, 255.0 - image, image)


def solarize_add(image, add, threshold=128.0):
  return _select(image < threshold, tf.minimum(image + add, 255.0), image)


def color(image, factor):
  gray = _gray(image)
  return _blend(tf.tile(gray, [1, 1, 3]), image, factor)  # tile: 0.27 ms, concat 1.0 (same VM)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_gray(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL: blend with the SMOOTH-filtered image ([[1,1,1],[1,5,1],[1,1,1]] / 13), whose
  one-pixel border is the original."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = _u8(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
  # The image with its inner pixels replaced by the smoothed ones (exact: integers).
  degenerate = image + tf.pad(smooth - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, factor)


# ------------------------------------------------------------------ geometric ops

def affine(image, matrix, fill=FILL):
  """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f) (PIL's convention),
  bilinear, points outside filled with `fill`."""
  a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
  # PIL maps pixel centres (x + 1/2, y + 1/2); TensorFlow maps pixel indices.
  c, f = c + 0.5 * (a + b - 1.0), f + 0.5 * (d + e - 1.0)
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  # Bilinear with a fill colour: sum_i w_i x_i over the neighbours inside the image plus
  # (1 - sum_i w_i) fill, which is sum_i w_i (x_i - fill) + fill: transform the image
  # less the fill with a zero fill, then add the fill back.
  fill = per_channel(fill, image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform, output_shape=tf.stack([h, w]),
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return _u8(out + fill)


def rotate(image, degrees):
  """Counter-clockwise about the centre (PIL's Image.rotate)."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = w / 2.0, h / 2.0
  # input = R (output - centre) + centre
  return affine(image, (cos, sin, cx - cos * cx - sin * cy,
                        -sin, cos, cy + sin * cx - cos * cy))


def _whole_and_fraction(shift, n):
  """A shift of up to n + 1 pixels (beyond that all is fill) as int32 whole pixels and a
  fraction rounded to 1/4096 pixel, so that the two-tap blend of integer values is exact
  in float32: the same numbers whatever order TensorFlow's graph rewrites evaluate it in
  (eager and tf.data agree), ties at .5 included."""
  nf = tf.cast(n, tf.float32)
  shift = tf.round(tf.clip_by_value(tf.cast(shift, tf.float32), -nf - 1.0, nf + 1.0) * 4096.0)
  whole = tf.floor(shift / 4096.0)
  return tf.cast(whole, tf.int32), shift / 4096.0 - whole


def _shift_lines(image, shift, axis: int, fill=FILL):
  """Line i of the image (a row for axis=1, a column for axis=0) moved along `axis`:
  output position j samples input position j + shift[i], bilinear, fill outside.

  This is affine() for shears at a third to a half of its cost on CPU (same VM,
  2026-12-07): one gather of each line's window of n + 1 pixels from the flattened image
  less the fill, with one zero pixel appended for every index outside, then the two-tap
  blend. About 2% of pixels come out one level from affine()'s, where the blend lands
  near a .5 that affine's float rounding and this exact blend round differently
  (tests/test_augment.py). For a translation, where every line moves alike,
  _translate's slices are cheaper.
  """
  h, w, c = tf.shape(image)[0], tf.shape(image)[1], tf.shape(image)[2]
  n = (h, w)[axis]
  k, frac = _whole_and_fraction(shift, n)
  fill = per_channel(fill, image)
  pixels = tf.concat([tf.reshape(image - fill, tf.stack([-1, c])), tf.zeros(tf.stack([1, c]))],
                     0)
  if axis == 1:  # the gathered windows laid out as the output: [h, w + 1] and [h + 1, w]
    source = tf.range(w + 1)[None] + k[:, None]
    flat = tf.range(h)[:, None] * w + source
  else:
    source = tf.range(h + 1)[:, None] + k[None]
    flat = source * w + tf.range(w)[None]
  window = tf.gather(pixels, tf.where((source >= 0) & (source < n), flat, h * w))
  lo, hi = (window[:, :-1], window[:, 1:]) if axis == 1 else (window[:-1], window[1:])
  # Each line's fraction at every pixel (same-shape ops: broadcasting is slow on CPU).
  if axis == 1:
    frac = tf.reshape(tf.repeat(frac, w * c), tf.shape(image))
  else:
    frac = tf.reshape(tf.tile(tf.repeat(frac, c), [h]), tf.shape(image))
  out = (1.0 - frac) * lo + frac * hi
  out.set_shape(image.shape)
  return _u8(out + fill)


def shear_x(image, factor):
  """affine (1, factor, 0, 0, 1, 0): row y moves by factor (y + 1/2) (pixel centres)."""
  h = tf.shape(image)[0]
  return _shift_lines(image, factor * (tf.cast(tf.range(h), tf.float32) + 0.5), axis=1)


def shear_y(image, factor):
  """affine (1, 0, 0, factor, 1, 0): column x moves by factor (x + 1/2)."""
  w = tf.shape(image)[1]
  return _shift_lines(image, factor * (tf.cast(tf.range(w), tf.float32) + 0.5), axis=0)


def _translate(image, pixels, axis: int, fill=FILL):
  """affine() for a pure translation along `axis` (output x samples input x + pixels),
  as two shifted slices of the image less the fill, zero-padded on the side it moves
  from: the same bilinear weights without the general transform op, which costs 3-5x
  more on CPU (same VM; 0.4-0.6 ms against 2.0-2.5 at 224 px; padding one side by the
  shift only, not both by n, took a third off translate_x)."""
  n = tf.shape(image)[axis]
  k, frac = _whole_and_fraction(pixels, n)
  fill = per_channel(fill, image)
  before, after = tf.maximum(-k, 0), tf.maximum(k + 1, 0)
  padded = tf.pad(image - fill, tf.stack([tf.stack([before, after]) if a == axis
                                          else tf.zeros([2], tf.int32) for a in range(3)]))
  begin = [0, 0, 0]
  begin[axis] = before + k
  size = [-1, -1, -1]
  size[axis] = n
  lo = tf.slice(padded, tf.stack(begin), size)
  begin[axis] += 1
  hi = tf.slice(padded, tf.stack(begin), size)
  out = (1.0 - frac) * lo + frac * hi
  out.set_shape(image.shape)
  return _u8(out + fill)


def translate_x(image, fraction):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return _translate(image, pixels, axis=1)


def translate_y(image, fraction):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return _translate(image, pixels, axis=0)


# ------------------------------------------------------------------ level -> op

def _enhance(level, sign):
  return tf.maximum(0.1, 1.0 + sign * 0.9 * level)


def _ops():
  """(name, fn(image, level, sign)) in OP_NAMES order; level in [0, 1], sign +-1."""
  return (
      ("AutoContrast", lambda x, l, s: auto_contrast(x)),
      ("Equalize", lambda x, l, s: equalize(x)),
      ("Invert", lambda x, l, s: invert(x)),
      ("Rotate", lambda x, l, s: rotate(x, s * 30.0 * l)),
      ("PosterizeIncreasing",
       lambda x, l, s: posterize(x, 4 - tf.cast(tf.floor(l * 4.0), tf.int32))),
      ("SolarizeIncreasing",
       lambda x, l, s: solarize(x, 256.0 - tf.minimum(256.0, tf.floor(l * 256.0)))),
      ("SolarizeAdd", lambda x, l, s: solarize_add(x, tf.minimum(128.0,
                                                                tf.floor(l * 110.0)))),
      ("ColorIncreasing", lambda x, l, s: color(x, _enhance(l, s))),
      ("ContrastIncreasing", lambda x, l, s: contrast(x, _enhance(l, s))),
      ("BrightnessIncreasing", lambda x, l, s: brightness(x, _enhance(l, s))),
      ("SharpnessIncreasing", lambda x, l, s: sharpness(x, _enhance(l, s))),
      ("ShearX", lambda x, l, s: shear_x(x, s * 0.3 * l)),
      ("ShearY", lambda x, l, s: shear_y(x, s * 0.3 * l)),
      ("TranslateXRel", lambda x, l, s: translate_x(x, s * 0.45 * l)),
      ("TranslateYRel", lambda x, l, s: translate_y(x, s * 0.45 * l)),
  )


def apply_op(index, image, level, sign):
  """Op number `index` of OP_NAMES (a scalar int32 tensor) on a float [0, 255] image."""
  branches = [lambda fn=fn: fn(image, level, sign) for _, fn in _ops()]
  out = tf.switch_case(index, branches)
  out.set_shape(image.shape)
  return out


def draw(seed, num_ops: int, magnitude: float, mstd: float, prob: float):
  """The random choices for one image: per layer (op index, apply?, level, sign)."""
  layers = []
  for i in range(num_ops):
    s = [tf.random.experimental.stateless_fold_in(seed, 4 * i + j) for j in range(4)]
    index = tf.random.stateless_uniform([], s[0], 0, len(OP_NAMES), dtype=tf.int32)
    apply = tf.random.stateless_uniform([], s[1]) < prob
    m = magnitude
    if mstd > 0:
      m = magnitude + mstd * tf.random.stateless_normal([], s[2])
    level = tf.clip_by_value(tf.cast(m, tf.float32), 0.0, 10.0) / 10.0
    sign = tf.where(tf.random.stateless_uniform([], s[3]) < 0.5, -1.0, 1.0)
    layers.append((index, apply, level, sign))
  return layers


def randaugment(image, seed, num_ops: int = 2, magnitude: float = 9.0, mstd: float = 0.5,
                prob: float = 0.5):
  """RandAugment on one HWC (3-channel) image in [0, 255]; returns uint8."""
  x = tf.cast(image, tf.float32)
  for index, apply, level, sign in draw(seed, num_ops, magnitude, mstd, prob):
    x = tf.cond(apply, lambda x=x, i=index, l=level, s=sign: apply_op(i, x, l, s),
                lambda x=x: x)
  return tf.cast(x, tf.uint8)
