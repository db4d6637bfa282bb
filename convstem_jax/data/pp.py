"""Preprocessing ops, composed from a config string (TensorFlow; imported lazily).

A pipeline is a '|'-separated string (or a list of op strings), big_vision style:

    "decode|inception_crop(224)|flip_lr|normalize"
    "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"

Each op is `name` or `name(args)` with Python literal arguments. Ops map a features dict
({"image", "label"}) to a features dict. Random ops are stateless: they take a per-example
seed (an int64 [2] tensor) that the source derives from `config.seed`, the process and the
example's position in the stream, so a pipeline gives the same output eagerly and inside
`tf.data`, and the same batches after a restart. Op i of a pipeline gets its own seed,
folded from the example seed with i.

Pixel convention: images are uint8 or float in [0, 255] until `value_range` or
`normalize`; the pipeline's output image is float32 HWC (an image still uint8 at the end
is scaled to [0, 1]), the label int32.

Ops:
  decode(channels=3)            encoded bytes (JPEG, PNG, GIF, BMP, WebP; other formats
                                such as TIFF through PIL) -> uint8; grayscale -> 3 channels
  inception_crop(size, area_min=0.08, area_max=1.0, ratio_min=3/4, ratio_max=4/3)
                                random-resized crop (alias random_resized_crop); on JPEG
                                bytes the decode is fused with the crop
  flip_lr(prob=0.5), flip_ud(prob=0.5)
  resize(size), resize_small(size), central_crop(size)
                                `[decode|]resize_small(S)|central_crop(C)` (C <= S) runs
                                as one op that resamples only the kept pixels (and
                                decodes only their window of a JPEG)
  value_range(vmin=-1, vmax=1)  [0, 255] -> [vmin, vmax]
  normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)   means/stds in [0, 1] units
  gray_to_rgb                   1 channel -> 3 (decode already does it)
  randaug(num_ops=2, magnitude=9, mstd=0.5, prob=0.5)
                                timm's rand-m9-mstd0.5-inc1 (randaug.py); [0, 255] in,
                                uint8 out: after the crop, before normalize
  autoaug(mstd=0)               AutoAugment, the paper's ImageNet policy (timm's
                                'original'; autoaug.py): one of 25 two-step sub-policies
                                per image; same conventions as randaug
  pca_lighting(alpha_std=0.1, scale=255)
                                AlexNet / pycls PCA colour noise; scale = the input's
                                pixel scale (255 before normalize, 1 for [0, 1] images)
  random_erasing(prob=0.25, area_min=0.02, area_max=1/3, ratio_min=0.3, mode='pixel')
                                timm / DeiT random erasing, AFTER normalize (float input)

Mixup / CutMix are not pp ops: they mix across the batch on device, in the train step
(mixup.py; config.mixup_alpha, config.cutmix_alpha).
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
from convstem_jax import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Op = Callable[[dict, Any], dict]
OPS: dict[str, Callable[..., Op]] = {}


def register(*names):
  def wrap(factory):
    for n in names:
      OPS[n] = factory
    return factory
  return wrap


# ------------------------------------------------------------------ parsing

def parse(spec: str | Sequence[str]) -> list[tuple[str, tuple, dict]]:
  """'a|b(1, x=2)' -> [('a', (), {}), ('b', (1,), {'x': 2})]."""
  parts = spec.split("|") if isinstance(spec, str) else list(spec)
  out = []
  for part in (p.strip() for p in parts):
    if not part:
      continue
    try:
      node = ast.parse(part, mode="eval").body
    except SyntaxError as e:
      raise errors.UserError(f"Bad preprocessing op '{part}': write name or name(args).") from e
    if isinstance(node, ast.Name):
      name, args, kwargs = node.id, (), {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
      name = node.func.id
      try:
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
      except ValueError as e:
        raise errors.UserError(f"Bad preprocessing op '{part}': arguments must be literals.") from e
    else:
      raise errors.UserError(f"Bad preprocessing op '{part}': write name or name(args).")
    if name not in OPS:
      raise errors.UserError(f"Unknown preprocessing op '{name}'; known: {', '.join(sorted(OPS))}.")
    out.append((name, args, kwargs))
  return out


def build(spec: str | Sequence[str]) -> Callable[[dict, Any], dict]:
  """The pipeline `fn(features, seed) -> features` a spec describes."""
  ops = _fused(parse(spec))

  def fn(features: dict, seed=None) -> dict:
    features = dict(features)
    seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
    for i, op in ops:
      features = op(features, tf.random.experimental.stateless_fold_in(seed, i))
    image = features["image"]
    if image.dtype == tf.string:
      raise errors.UserError("The preprocessing pipeline leaves encoded images; start it with "
                       "'decode' (or a fused op such as inception_crop).")
    features["image"] = (tf.image.convert_image_dtype(image, tf.float32)
                         if image.dtype == tf.uint8 else tf.cast(image, tf.float32))
    if "label" in features:
      features["label"] = tf.cast(features["label"], tf.int32)
    return features
  return fn


def _fused(parsed) -> list[tuple[int, Op]]:
  """(seed index, op) of each step: `[decode|]resize_small(S)|central_crop(C)` becomes one
  op that resizes only the pixels the crop keeps (and decodes only those of a JPEG).
  Every op keeps the seed index of its place in the spec."""
  steps, i = [], 0
  while i < len(parsed):
    decode_first = parsed[i][0] == "decode"
    j = i + int(decode_first)
    if [name for name, _, _ in parsed[j:j + 2]] == ["resize_small", "central_crop"]:
      channels = _call(lambda channels=3: channels, parsed[i]) if decode_first else None
      size = _call(lambda size: size, parsed[j])
      crop = _size2(_call(lambda size: size, parsed[j + 1]))
      if isinstance(size, int) and max(crop) <= size:
        steps.append((i, resize_small_central_crop(size, crop, channels)))
        i = j + 2
        continue
    name, args, kwargs = parsed[i]
    steps.append((i, OPS[name](*args, **kwargs)))
    i += 1
  return steps


def _call(signature, step):
  """The arguments of a parsed step, bound as `signature` binds them."""
  _, args, kwargs = step
  return signature(*args, **kwargs)


# ------------------------------------------------------------------ decoding

_TF_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")  # + WebP: RIFF....WEBP


def _tf_decodable(data):
  head = tf.strings.substr(data, 0, 4)
  ok = tf.reduce_any([tf.strings.substr(data, 0, len(m)) == m for m in _TF_MAGIC])
  webp = tf.logical_and(head == b"RIFF", tf.strings.substr(data, 8, 4) == b"WEBP")
  return tf.logical_or(ok, webp)


def _pil_decode(data: bytes, channels: int) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(data, np.ndarray):  # numpy_function hands a 0-d object array
    data = data.item()
  with Image.open(io.BytesIO(data)) as im:
    im = im.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(im, np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def decode_bytes(data, channels: int = 3):
  """Encoded image bytes -> uint8 [h, w, channels], any common format."""
  def with_tf():
    return tf.io.decode_image(data, channels=channels, expand_animations=False)

  def with_pil():
    return tf.numpy_function(lambda d: _pil_decode(d, channels), [data], tf.uint8)

  image = tf.cond(_tf_decodable(data), with_tf, with_pil)
  image.set_shape([None, None, channels])
  return image


def _to_channels(image, channels: int):
  if channels == 3 and image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  if channels == 1 and image.shape[-1] == 3:
    return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))),
                   image.dtype)
  return image


@register("decode")
def decode(channels: int = 3) -> Op:
  def op(f, seed):
    del seed
    image = f["image"]
    f["image"] = (decode_bytes(image, channels) if image.dtype == tf.string
                  else _to_channels(image, channels))
    return f
  return op


@register("gray_to_rgb")
def gray_to_rgb() -> Op:
  def op(f, seed):
    del seed
    f["image"] = _to_channels(f["image"], 3)
    return f
  return op


# ------------------------------------------------------------------ geometry

def _size2(size):
  return (size, size) if isinstance(size, int) else tuple(size)


def _resize(image, size):
  """Bilinear, antialiased as PIL's resize is (tf.image.resize). Where neither axis
  shrinks the triangle's support is one pixel either way, and the plain bilinear op gives
  the antialiased op's pixels (up to float rounding: one level on about 0.1% of them) in
  half its time on CPU (0.55-0.6 against 1.2-1.3 ms to 224 px, one core of the 2-core
  AMD EPYC VM, 2026-12-07), so it runs there: for about a quarter of the random-resized
  crops of ImageNet-sized images to 224 (23% for 500 x 375). uint8 in, uint8 (rounded)
  out."""
  dtype = image.dtype
  hw = _size2(size)
  grows = tf.reduce_all(tf.shape(image)[:2] <= tf.cast(tf.stack(hw), tf.int32))
  out = tf.cond(grows, lambda: tf.image.resize(image, hw, method="bilinear"),
                lambda: tf.image.resize(image, hw, method="bilinear", antialias=True))
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), dtype) if dtype == tf.uint8 else out


def _crop_box(shape, seed, area, ratio):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=area,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin, size


@register("inception_crop", "random_resized_crop")
def inception_crop(size, area_min: float = 0.08, area_max: float = 1.0,
                   ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                   channels: int = 3) -> Op:
  area, ratio = (area_min, area_max), (ratio_min, ratio_max)

  def crop_decoded(image, seed):
    begin, crop = _crop_box(tf.shape(image), seed, area, ratio)
    return tf.slice(image, begin, crop)

  def op(f, seed):
    image = f["image"]
    if image.dtype == tf.string:  # fuse decode and crop for JPEG: decode the crop only
      data = image

      def jpeg():
        shape = tf.io.extract_jpeg_shape(data)
        begin, crop = _crop_box(shape, seed, area, ratio)
        window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
        return tf.io.decode_and_crop_jpeg(data, window, channels=channels)

      def other():
        return crop_decoded(decode_bytes(data, channels), seed)

      image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
      image.set_shape([None, None, channels])
    else:
      image = crop_decoded(image, seed)
    f["image"] = _resize(image, size)
    return f
  return op


def _random_flip(axis: int, prob: float) -> Op:
  def op(f, seed):
    flip = tf.random.stateless_uniform([], seed) < prob
    f["image"] = tf.cond(flip, lambda: tf.reverse(f["image"], [axis]), lambda: f["image"])
    return f
  return op


@register("flip_lr")
def flip_lr(prob: float = 0.5) -> Op:
  return _random_flip(1, prob)


@register("flip_ud")
def flip_ud(prob: float = 0.5) -> Op:
  return _random_flip(0, prob)


@register("resize")
def resize(size) -> Op:
  def op(f, seed):
    del seed
    f["image"] = _resize(f["image"], size)
    return f
  return op


@register("resize_small")
def resize_small(size: int) -> Op:
  """Shorter side to `size`, aspect ratio kept."""
  def op(f, seed):
    del seed
    image = f["image"]
    f["image"] = _resize(image, _small_side_sizes(tf.shape(image)[0], tf.shape(image)[1],
                                                  size))
    return f
  return op


@register("central_crop")
def central_crop(size) -> Op:
  ch, cw = _size2(size)

  def op(f, seed):
    del seed
    image = f["image"]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (h - ch) // 2, (w - cw) // 2
    image = tf.slice(image, [top, left, 0], [ch, cw, -1])
    image.set_shape([ch, cw, f["image"].shape[-1]])
    f["image"] = image
    return f
  return op


def _small_side_sizes(h, w, size: int):
  """resize_small's output size (new_h, new_w) for an h x w image."""
  scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
  return new_h, new_w


def resize_small_central_crop(size: int, crop, channels: int | None = None) -> Op:
  """`[decode(channels)|]resize_small(size)|central_crop(crop)` in one op (build() puts
  it in their place): the resampling is computed only for the output pixels, from the
  input window under their filter support, and a JPEG is decoded only over that window.

  The scale per axis and the sample positions are those of tf.image.resize (one
  ScaleAndTranslate, triangle kernel, antialiased), with the crop's offset as a
  translation, so the pixels are those of the three ops up to float rounding in the
  sample positions (tests/test_data.py bounds the difference). For a 500 x 375 JPEG
  and 256 / 224 it resamples 224 x 224 pixels instead of 341 x 256 and decodes about
  half of the image."""
  ch, cw = crop

  def window(shape):
    """(begin, extent, scale, translation) of the input rows and columns needed."""
    h, w = shape[0], shape[1]
    new_h, new_w = _small_side_sizes(h, w, size)
    begins, extents, scales, shifts = [], [], [], []
    for n, new_n, c in ((h, new_h, ch), (w, new_w, cw)):
      scale = tf.cast(new_n, tf.float32) / tf.cast(n, tf.float32)
      inv = 1.0 / scale
      support = tf.maximum(inv, 1.0)  # the triangle's radius, in input pixels
      first = tf.cast((new_n - c) // 2, tf.float32)  # the crop's offset, output pixels
      lo = tf.cast(tf.floor((first + 0.5) * inv - support - 0.5), tf.int32) - 1
      hi = tf.cast(tf.math.ceil((first + c - 0.5) * inv + support - 0.5), tf.int32) + 2
      lo, hi = tf.maximum(lo, 0), tf.minimum(hi, n)
      begins.append(lo)
      extents.append(hi - lo)
      scales.append(scale)
      shifts.append(tf.cast(lo, tf.float32) * scale - first)
    return begins, extents, tf.stack(scales), tf.stack(shifts)

  def resample(image, scale, shift):
    dtype = image.dtype
    out = tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(image, tf.float32)[None], size=tf.constant([ch, cw], tf.int32),
        scale=scale, translation=shift, kernel_type="triangle", antialias=True)[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), dtype) if dtype == tf.uint8 else out

  def from_pixels(image):
    begins, extents, scale, shift = window(tf.shape(image))
    part = tf.slice(image, [begins[0], begins[1], 0], [extents[0], extents[1], -1])
    return resample(part, scale, shift)

  def op(f, seed):
    del seed
    image = f["image"]
    if image.dtype == tf.string:
      if channels is None:
        raise errors.UserError("The preprocessing pipeline leaves encoded images; start it "
                               "with 'decode' (or a fused op such as inception_crop).")
      data = image

      def jpeg():
        begins, extents, scale, shift = window(tf.io.extract_jpeg_shape(data))
        part = tf.io.decode_and_crop_jpeg(
            data, tf.stack([begins[0], begins[1], extents[0], extents[1]]),
            channels=channels)
        return resample(part, scale, shift)

      image = tf.cond(tf.io.is_jpeg(data), jpeg,
                      lambda: from_pixels(decode_bytes(data, channels)))
    else:
      image = from_pixels(image if channels is None else _to_channels(image, channels))
    image.set_shape([ch, cw, channels or f["image"].shape[-1]])
    f["image"] = image
    return f
  return op


# ------------------------------------------------------------------ values

@register("value_range")
def value_range(vmin: float = -1.0, vmax: float = 1.0) -> Op:
  def op(f, seed):
    del seed
    x = tf.cast(f["image"], tf.float32) / 255.0
    f["image"] = vmin + x * (vmax - vmin)
    return f
  return op


@register("normalize")
def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Op:
  """(x / 255 - mean) / std, with mean and std in [0, 1] units (timm's convention)."""
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top

  def op(f, seed):
    del seed
    x = tf.cast(f["image"], tf.float32)
    # Same-shape operands: broadcasting [3] over the image was 7x slower on CPU
    # (randaug.py's docstring).
    f["image"] = (x / 255.0 - ra.per_channel(mean, x)) / ra.per_channel(std, x)
    return f
  return op


# ------------------------------------------------------------------ augmentation

# ImageNet RGB PCA of pixels in [0, 1] (AlexNet; fb.resnet.torch, pycls, timm): eigenvalues
# and eigenvectors (columns).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


@register("pca_lighting")
def pca_lighting(alpha_std: float = 0.1, scale: float = 255.0,
                 eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC) -> Op:
  """AlexNet-style PCA colour noise, pycls' `lighting` (the conv-stem recipe's 0.1).

  alpha ~ N(0, alpha_std^2) per eigenvector; each pixel gets + V (alpha * eigval), the
  same RGB offset everywhere. The eigenvalues are for pixels in [0, 1]; `scale` is the
  pixel scale of the input: 255 (default) for uint8 or [0, 255] floats, i.e. before
  `normalize` / `value_range`, or 1 for images already in [0, 1]. Output float32,
  not clipped (as pycls).
  """
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top
  eigval = tf.constant(eigval, tf.float32)
  eigvec = tf.constant(eigvec, tf.float32)

  def op(f, seed):
    alpha = tf.random.stateless_normal([3], seed, stddev=alpha_std)
    rgb = tf.linalg.matvec(eigvec, alpha * eigval) * scale
    x = tf.cast(f["image"], tf.float32)
    f["image"] = x + ra.per_channel(rgb, x)   # same-shape: broadcasting is slow on CPU
    return f
  return op


def erase_box(shape, seed, area_min, area_max, log_ratio, attempts: int = 10):
  """timm's box search: up to `attempts` (area, aspect) draws, the first that fits.

  Returns (top, left, h, w) int32; h = w = 0 when no draw fits (nothing erased).
  """
  height, width = shape[0], shape[1]
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s = [tf.random.experimental.stateless_fold_in(seed, i) for i in range(4)]
  area = tf.random.stateless_uniform([attempts], s[0], area_min, area_max) * hf * wf
  ratio = tf.exp(tf.random.stateless_uniform([attempts], s[1], log_ratio[0], log_ratio[1]))
  h = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = (w < width) & (h < height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  ok = tf.reduce_any(fits)
  h = tf.where(ok, h[first], 0)
  w = tf.where(ok, w[first], 0)
  u = tf.random.stateless_uniform([2], s[2])
  top = tf.minimum(tf.cast(u[0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
  left = tf.minimum(tf.cast(u[1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
  return top, left, h, w


@register("random_erasing")
def random_erasing(prob: float = 0.25, area_min: float = 0.02, area_max: float = 1 / 3,
                   ratio_min: float = 0.3, ratio_max: float | None = None,
                   mode: str = "pixel") -> Op:
  """timm's RandomErasing (DeiT: prob 0.25, mode 'pixel', one box), on a float image
  AFTER `normalize`: with probability `prob`, one box of area_min..area_max of the image
  and aspect ratio_min..ratio_max (log-uniform; max defaults to 1 / min) is replaced by
  N(0, 1) noise per pixel ('pixel'), per channel ('rand') or zeros ('const').
  """
  if mode not in ("pixel", "rand", "const"):
    raise errors.UserError(f"random_erasing: mode must be 'pixel', 'rand' or 'const', not {mode!r}.")
  ratio_max = ratio_max or 1 / ratio_min
  log_ratio = (float(np.log(ratio_min)), float(np.log(ratio_max)))

  def op(f, seed):
    image = f["image"]
    if image.dtype == tf.uint8:
      raise errors.UserError("random_erasing works on normalised float images: put it after "
                       "'normalize' (or 'value_range').")
    image = tf.cast(image, tf.float32)
    s_apply, s_box, s_noise = (tf.random.experimental.stateless_fold_in(seed, i)
                               for i in range(3))
    shape = tf.shape(image)
    top, left, h, w = erase_box(shape, s_box, area_min, area_max, log_ratio)
    h = tf.where(tf.random.stateless_uniform([], s_apply) < prob, h, 0)

    def erase():
      # Noise for the box only, padded into place (cheaper than a full-image draw).
      if mode == "pixel":
        noise = tf.random.stateless_normal(tf.stack([h, w, shape[2]]), s_noise)
      elif mode == "rand":
        noise = (tf.random.stateless_normal([1, 1, shape[2]], s_noise) +
                 tf.zeros(tf.stack([h, w, shape[2]])))
      else:
        noise = tf.zeros(tf.stack([h, w, shape[2]]))
      pad = [[top, shape[0] - top - h], [left, shape[1] - left - w], [0, 0]]
      # image * 0 + noise inside the box, image * 1 + 0 outside: exact, and same-shape
      # ops (tf.where and broadcasting are several times slower on CPU).
      outside = tf.pad(tf.zeros(tf.stack([h, w, shape[2]])), pad, constant_values=1.0)
      return image * outside + tf.pad(noise, pad)

    out = tf.cond(h > 0, erase, lambda: image)
    out.set_shape(image.shape)
    f["image"] = out
    return f
  return op


@register("randaug")
def randaug(num_ops: int = 2, magnitude: float = 9, mstd: float = 0.5,
            prob: float = 0.5) -> Op:
  """RandAugment as timm's 'rand-m9-mstd0.5-inc1' (data/randaug.py): `num_ops` ops of
  the 15 increasing-severity ones, each applied with probability `prob` (timm's 0.5) at
  magnitude N(magnitude, mstd^2) clipped to [0, 10]. On [0, 255] images (after the
  crop, before `normalize`); returns uint8."""
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top

  def op(f, seed):
    image = f["image"]
    if image.shape[-1] == 1:
      image = tf.tile(image, [1, 1, 3])
    f["image"] = ra.randaugment(image, seed, num_ops, magnitude, mstd, prob)
    return f
  return op


@register("autoaug")
def autoaug(mstd: float = 0.0) -> Op:
  """AutoAugment with the paper's ImageNet policy, as timm's 'original' (data/autoaug.py):
  one of the 25 sub-policies drawn uniformly per image, each of its two steps applied
  with its probability at its magnitude (+ N(0, mstd^2) noise if mstd > 0, timm's
  'original-mstd0.5'). On [0, 255] images (after the crop, before `normalize`); returns
  uint8."""
  from convstem_jax.data import autoaug as aa  # pylint: disable=g-import-not-at-top

  def op(f, seed):
    image = f["image"]
    if image.shape[-1] == 1:
      image = tf.tile(image, [1, 1, 3])
    f["image"] = aa.autoaugment(image, seed, mstd)
    return f
  return op
