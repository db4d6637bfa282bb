r"""Input pipeline throughput: the ImageNet training preprocessing on generated JPEGs,
against a PyTorch-style PIL loop on the same JPEGs.

    python -m convstem_jax.tools.bench_input [--images 512] [--seconds 20] \
        [--pp "inception_crop(224)|flip_lr|randaug(2, 9, 0.5)|normalize"] [--trainer] \
        [--no_pil]

Generates JPEGs of ImageNet-like sizes (sides 300-500 px, quality 90, smooth content so
they compress like photos), runs them through tf.data with the given pipeline (JPEG
decode fused with the random-resized crop, flip, RandAugment, normalisation), discards a
warm-up, and prints images/s and `<N> images/s per core`. `--trainer` also runs the real
trainer on those images (an image folder, a tiny ViT) and prints its end-to-end
images/s, which includes the model step.

The PIL reference (skip it with `--no_pil`) is what one PyTorch DataLoader worker does
for the default pipeline, one image at a time in this process (one core): PIL decode,
torchvision's RandomResizedCrop sampling (scale 0.08-1, ratio 3/4-4/3, 10 tries, then a
centre crop) with a bilinear resize to 224, a horizontal flip with probability 0.5,
timm's RandAugment 'rand-m9-n2-mstd0.5-inc1' (timm's own PIL ops, from timm's
data/auto_augment.py; needs timm: pip install -e ".[parity]"), then float32 in [0, 1]
and the ImageNet mean/std. It prints its images/s per core and the ratio of ours to it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

DEFAULT_PP = "inception_crop(224)|flip_lr|randaug(2, 9, 0.5)|normalize"


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
  """n JPEGs, sides 300-500 px: upsampled random colour fields plus fine noise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    h, w = rng.integers(300, 501, size=2)
    coarse = rng.uniform(0, 255, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (h, w), method="bicubic").numpy()
    image += rng.normal(0, 12, size=image.shape)
    out.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)
               .numpy())
  return out


def pipeline_rate(jpegs: list[bytes], pp_spec: str, seconds: float, batch: int = 64,
                  warmup_batches: int = 4) -> float:
  """Images/s of tf.data running `pp_spec` over `jpegs` (repeated), after a warm-up."""
  from convstem_jax.data import files, pp  # pylint: disable=g-import-not-at-top
  tf = files.import_tf()
  fn = pp.build(pp_spec)
  data = tf.data.Dataset.from_tensor_slices(jpegs).repeat()
  ds = tf.data.Dataset.zip(tf.data.Dataset.range(2 ** 62), data).map(
      lambda i, b: fn({"image": b, "label": 0}, tf.stack([tf.constant(0, tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  it = iter(ds.batch(batch).prefetch(4).as_numpy_iterator())
  for _ in range(warmup_batches):
    next(it)
  count, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    count += len(next(it)["image"])
  return count / (time.perf_counter() - t0)


def timm_auto_augment():
  """timm's data/auto_augment.py on its own: it needs PIL only, not torch/torchvision."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("timm")
  if spec is None or not spec.origin:
    raise SystemExit("error: the PIL reference uses timm's RandAugment; install it with "
                     "pip install -e \".[parity]\", or pass --no_pil.")
  path = os.path.join(os.path.dirname(spec.origin), "data", "auto_augment.py")
  module_spec = importlib.util.spec_from_file_location("_timm_auto_augment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  original = module.posterize

  def posterize(image, bits, **kwargs):
    # Pillow >= 10 refuses 0 bits, which timm's increasing posterize reaches at high
    # magnitudes; older Pillow returned black, as this does.
    return image.point(lambda _: 0) if bits <= 0 else original(image, bits, **kwargs)

  for name, op in module.NAME_TO_OP.items():
    if op is original:
      module.NAME_TO_OP[name] = posterize
  return module


def _crop_box(rng, width: int, height: int) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: (left, top, w, h)."""
  import math  # pylint: disable=g-import-not-at-top
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  w = h = min(width, height)  # the fallback: a centre crop
  return (width - w) // 2, (height - h) // 2, w, h


def pil_rate(jpegs: list[bytes], seconds: float, size: int = 224,
             warmup_images: int = 32) -> float:
  """Images/s of the PIL reference (module docstring) in this process, one image at a
  time, after a warm-up."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
  timm_aa = timm_auto_augment()
  randaug = timm_aa.rand_augment_transform(
      "rand-m9-n2-mstd0.5-inc1",
      {"translate_const": int(size * 0.45),
       "img_mean": tuple(round(255 * m) for m in pp.IMAGENET_MEAN)})
  mean = np.asarray(pp.IMAGENET_MEAN, np.float32)
  std = np.asarray(pp.IMAGENET_STD, np.float32)
  rng = np.random.default_rng(0)

  def one(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    left, top, w, h = _crop_box(rng, *image.size)
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = randaug(image)
    return (np.asarray(image, np.float32) / 255.0 - mean) / std

  for i in range(warmup_images):
    one(jpegs[i % len(jpegs)])
  count, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    out = one(jpegs[count % len(jpegs)])
    count += 1
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  return count / (time.perf_counter() - t0)


def trainer_rate(jpegs: list[bytes], pp_spec: str, steps: int = 30) -> float:
  """End-to-end images/s of the trainer on an image folder of `jpegs`, tiny ViT."""
  import json  # pylint: disable=g-import-not-at-top
  from convstem_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from convstem_jax import train  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    for i, data in enumerate(jpegs):
      d = os.path.join(tmp, "data", "train" if i % 8 else "test", f"c{i % 2}")
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, f"{i}.jpg"), "wb") as f:
        f.write(data)
    c = config_lib.base_config()
    c.dataset, c.data_dir = "folder", os.path.join(tmp, "data")
    c.eval_splits, c.num_classes, c.image_size = ("test",), 2, 224
    c.pp_train, c.pp_eval = pp_spec, "decode|resize(224)|normalize"
    c.model_name = "vit_ti16"
    c.model.update(width=64, num_heads=2, mlp_dim=128, depth=1)
    c.batch_size = c.eval_batch_size = 64
    c.total_steps, c.total_epochs, c.log_every_steps = steps, 0.0, steps // 2
    c.checkpoint_every_steps, c.eval_every_epochs = 0, 0.0
    workdir = os.path.join(tmp, "work")
    train.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return json.loads(f.readlines()[-1])["train/images_per_sec"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512, help="distinct JPEGs generated")
  parser.add_argument("--seconds", type=float, default=20.0, help="timed window")
  parser.add_argument("--pp", default=DEFAULT_PP, help="preprocessing ops")
  parser.add_argument("--trainer", action="store_true",
                      help="also time the trainer end to end with a tiny ViT")
  parser.add_argument("--no_pil", action="store_true",
                      help="skip the PIL reference (the PyTorch-style loop)")
  args = parser.parse_args(argv)
  jpegs = make_jpegs(args.images)
  print(f"{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB; "
        f"pipeline: {args.pp}")
  if args.trainer:
    print(f"trainer end to end (tiny ViT, batch 64): "
          f"{trainer_rate(jpegs, args.pp):.1f} images/s")
  rate = pipeline_rate(jpegs, args.pp, args.seconds)
  print(f"pipeline: {rate:.1f} images/s on {cores()} cores")
  print(f"{rate / cores():.1f} images/s per core")
  if not args.no_pil:
    if args.pp != DEFAULT_PP:
      print(f"note: the PIL reference runs the default pipeline ({DEFAULT_PP}), not --pp.")
    reference = pil_rate(jpegs, args.seconds)
    print(f"PIL reference (one process, one image at a time): {reference:.1f} images/s "
          "per core")
    print(f"ours / PIL per core: {rate / cores() / reference:.2f}")


if __name__ == "__main__":
  main()
