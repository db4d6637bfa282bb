r"""Input pipeline throughput: our ImageNet training and eval preprocessing on generated
JPEGs, against a PyTorch-style PIL loop on the same JPEGs, side by side in one run.

    python -m convstem_jax.tools.bench_input [--images 512] [--seconds 20] \
        [--pp "inception_crop(224)|flip_lr|randaug(2, 9, 0.5)|normalize|random_erasing(0.25)"] \
        [--pp_eval "decode|resize_small(256)|central_crop(224)|normalize"] \
        [--trainer] [--no_pil] [--pil_processes 1] [--data_workers 0]

Generates JPEGs of ImageNet-like sizes (sides 300-500 px, quality 90, smooth content so
they compress like photos) and writes them as an image folder. Ours is the trainer's own
input: the folder source's `train_batches` (JPEG decode fused with the random-resized
crop, flip, RandAugment, normalisation, random erasing; the trainer's tf.data options,
deterministic order) and `eval_batches`, batches of 64, timed after a warm-up; it
prints images/s on all the cores this process may use and per core. `--trainer` also
runs the real trainer on that folder with a tiny ViT and prints its end-to-end
images/s, which includes the model step. `--data_workers N` makes our train and eval
streams in N worker processes each, pinned one per core (`config.data_workers`,
data/workers.py; -1 = one per core; the eval workers are started by the first pass and
kept for the next ones).

The PIL reference (skip it with `--no_pil`) is what one PyTorch DataLoader worker does,
one image at a time in this process (one core); `--pil_processes N` runs N such
workers at once, as a DataLoader does on N cores, and reports images/s per process (the
per-core figure when cores are shared alike). Train, for the default --pp: PIL decode,
torchvision's RandomResizedCrop sampling (scale 0.08-1, ratio 3/4-4/3, 10 tries, then a
centre crop) with a bilinear resize to 224, a horizontal flip with probability 0.5,
timm's RandAugment 'rand-m9-n2-mstd0.5-inc1' (timm's own PIL ops, from timm's
data/auto_augment.py), float32 in [0, 1] and the ImageNet mean/std, then timm's
RandomErasing (probability 0.25, mode 'pixel', on the CHW tensor as timm's loader does
without its GPU prefetcher). Eval, for the default --pp_eval: PIL decode,
torchvision's Resize(256) (bilinear, shorter side) and CenterCrop(224), normalise. Both
need timm and torch: pip install -e ".[parity]". It prints the reference's images/s per
core and the ratio of ours to it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import tempfile
import time

import numpy as np

DEFAULT_PP = "inception_crop(224)|flip_lr|randaug(2, 9, 0.5)|normalize|random_erasing(0.25)"
DEFAULT_PP_EVAL = "decode|resize_small(256)|central_crop(224)|normalize"
BATCH = 64
EVAL_PASS = 4096  # eval images per pass (the JPEGs repeated): 64 batches


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


def write_folder(root: str, jpegs: list[bytes], test_every: int = 1,
                 test_copies: int = 1) -> None:
  """`jpegs` as an image folder of two classes: every image in train/, and every
  `test_every`-th in test/, `test_copies` times (hard links), so that one eval pass is
  long enough to time without restarting its stream every few batches."""
  for i, data in enumerate(jpegs):
    d = os.path.join(root, "train", f"c{i % 2}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{i}.jpg")
    with open(path, "wb") as f:
      f.write(data)
    if i % test_every == 0:
      d = os.path.join(root, "test", f"c{i % 2}")
      os.makedirs(d, exist_ok=True)
      for k in range(test_copies):
        os.link(path, os.path.join(d, f"{i}_{k}.jpg"))


def folder_config(root: str, pp_train: str, pp_eval: str, data_workers: int = 0):
  from convstem_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.dataset, c.data_dir = "folder", root
  c.eval_splits, c.num_classes, c.image_size = ("test",), 2, 224
  c.pp_train, c.pp_eval = pp_train, pp_eval
  c.batch_size = c.eval_batch_size = BATCH
  c.data_workers = data_workers
  return c


def real_images(batch) -> int:
  """The images of a batch, less eval padding (mask 0)."""
  return int(np.sum(batch["mask"])) if "mask" in batch else len(batch["image"])


def _per_second(step, seconds: float, warmup: int) -> float:
  """Images/s of calling `step()` (it returns the images it made) for `seconds`, after
  `warmup` untimed calls."""
  for _ in range(warmup):
    step()
  count, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    count += step()
  return count / (time.perf_counter() - t0)


def _rate(batches, seconds: float, warmup_batches: int) -> float:
  """Images/s of an iterator of batches."""
  return _per_second(lambda: real_images(next(batches)), seconds, warmup_batches)


def pipeline_rates(root: str, pp_train: str, pp_eval: str, seconds: float,
                   warmup_batches: int = 4, data_workers: int = 0) -> tuple[float, float]:
  """(train, eval) images/s of the folder source at `root`: the trainer's streams."""
  from convstem_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  c = folder_config(root, pp_train, pp_eval, data_workers)
  train = _rate(data_lib.get_source(c, "train").train_batches(BATCH), seconds,
                warmup_batches)
  source = data_lib.get_source(c, "test")

  def eval_forever():  # one pass is the whole split; time as many passes as fit
    while True:
      yield from source.eval_batches(BATCH)
  return train, _rate(eval_forever(), seconds, warmup_batches)


def _timm_data_module(name: str):
  """timm's data/<name>.py on its own, without importing timm whole (which needs
  torchvision)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("timm")
  if spec is None or not spec.origin:
    raise SystemExit("error: the PIL reference uses timm's augmentations; install timm "
                     "with pip install -e \".[parity]\", or pass --no_pil.")
  path = os.path.join(os.path.dirname(spec.origin), "data", f"{name}.py")
  module_spec = importlib.util.spec_from_file_location(f"_timm_{name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def timm_auto_augment():
  """timm's data/auto_augment.py (it needs PIL only, not torch/torchvision)."""
  module = _timm_data_module("auto_augment")
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


def _timed(one, jpegs: list[bytes], seconds: float, warmup_images: int = 32,
           sync=lambda: None) -> float:
  """Images/s of `one(jpeg)` over the JPEGs in turn; `sync()` between the warm-up and
  the timed window (other processes' windows start together)."""
  cycle = itertools.cycle(jpegs)

  def step() -> int:
    one(next(cycle))
    return 1
  for _ in range(warmup_images):
    step()
  sync()
  return _per_second(step, seconds, 0)


def pil_rates(jpegs: list[bytes], seconds: float, size: int = 224,
              eval_resize: int = 256, sync=lambda: None) -> tuple[float, float]:
  """(train, eval) images/s of the PIL reference (module docstring) in this process,
  one image at a time, after a warm-up."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
  timm_aa = timm_auto_augment()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # one DataLoader worker: one core
  erasing = _timm_data_module("random_erasing").RandomErasing(0.25, mode="pixel", device="cpu")
  randaug = timm_aa.rand_augment_transform(
      "rand-m9-n2-mstd0.5-inc1",
      {"translate_const": int(size * 0.45),
       "img_mean": tuple(round(255 * m) for m in pp.IMAGENET_MEAN)})
  mean = np.asarray(pp.IMAGENET_MEAN, np.float32)
  std = np.asarray(pp.IMAGENET_STD, np.float32)
  rng = np.random.default_rng(0)

  def normalise(image) -> np.ndarray:
    return (np.asarray(image, np.float32) / 255.0 - mean) / std

  def train(data: bytes):
    image = Image.open(io.BytesIO(data)).convert("RGB")
    left, top, w, h = _crop_box(rng, *image.size)
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = randaug(image)
    out = erasing(torch.from_numpy(normalise(image).transpose(2, 0, 1)))
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    return out

  def evaluate(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size  # torchvision Resize(int): the shorter side to eval_resize
    short, long = (w, h) if w <= h else (h, w)
    long = int(eval_resize * long / short)
    image = image.resize((eval_resize, long) if w <= h else (long, eval_resize),
                         Image.BILINEAR)
    w, h = image.size  # torchvision CenterCrop
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    out = normalise(image.crop((left, top, left + size, top + size)))
    assert out.shape == (size, size, 3)
    return out

  return (_timed(train, jpegs, seconds, sync=sync),
          _timed(evaluate, jpegs, seconds, sync=sync))


def _pil_process(jpegs, seconds, barrier, results) -> None:
  results.put(pil_rates(jpegs, seconds, sync=barrier.wait))


def pil_rates_together(jpegs: list[bytes], seconds: float,
                       processes: int) -> tuple[float, float]:
  """(train, eval) images/s per process of the PIL reference in `processes` processes at
  once (as a DataLoader's workers run, one per core), their timed windows aligned."""
  if processes == 1:
    return pil_rates(jpegs, seconds)
  import multiprocessing  # pylint: disable=g-import-not-at-top
  ctx = multiprocessing.get_context("spawn")  # not a fork of a process running TF
  barrier, results = ctx.Barrier(processes, timeout=600), ctx.Queue()
  workers = [ctx.Process(target=_pil_process, args=(jpegs, seconds, barrier, results))
             for _ in range(processes)]
  for w in workers:
    w.start()
  rates = []
  try:
    while len(rates) < processes:
      try:
        rates.append(results.get(timeout=5))
      except queue.Empty:  # a worker that died (its traceback is on stderr) never reports
        failed = [w.exitcode for w in workers if w.exitcode]
        if failed:
          raise RuntimeError(f"a PIL reference process exited with {failed[0]}") from None
  finally:
    for w in workers:
      if len(rates) < processes:
        w.terminate()
      w.join()
  return tuple(float(np.mean([r[i] for r in rates])) for i in range(2))


def trainer_rate(jpegs: list[bytes], pp_spec: str, steps: int = 30,
                 data_workers: int = 0) -> float:
  """End-to-end images/s of the trainer on an image folder of `jpegs`, tiny ViT."""
  import json  # pylint: disable=g-import-not-at-top
  from convstem_jax import train  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    write_folder(os.path.join(tmp, "data"), jpegs, test_every=8)
    c = folder_config(os.path.join(tmp, "data"), pp_spec, "decode|resize(224)|normalize",
                      data_workers)
    c.model_name = "vit_ti16"
    c.model.update(patch_size=32, width=16, num_heads=1, mlp_dim=32, depth=1)
    c.total_steps, c.total_epochs, c.log_every_steps = steps, 0.0, steps // 2
    c.checkpoint_every_steps, c.eval_every_epochs = 0, 0.0
    workdir = os.path.join(tmp, "work")
    from convstem_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.configure_cpu_devices(c)  # as main.py: a device per core
    train.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return json.loads(f.readlines()[-1])["train/images_per_sec"]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512, help="distinct JPEGs generated")
  parser.add_argument("--seconds", type=float, default=20.0, help="each timed window")
  parser.add_argument("--pp", default=DEFAULT_PP, help="training preprocessing ops")
  parser.add_argument("--pp_eval", default=DEFAULT_PP_EVAL, help="eval preprocessing ops")
  parser.add_argument("--trainer", action="store_true",
                      help="also time the trainer end to end with a tiny ViT")
  parser.add_argument("--no_pil", action="store_true",
                      help="skip the PIL reference (the PyTorch-style loop)")
  parser.add_argument("--pil_processes", type=int, default=1,
                      help="run the PIL reference in this many processes at once (as "
                      "DataLoader workers on that many cores) and report per process")
  parser.add_argument("--data_workers", type=int, default=0,
                      help="ours in this many pinned worker processes (config.data_workers;"
                      " -1 = one per core, 0 = tf.data in this process)")
  args = parser.parse_args(argv)
  if args.pil_processes < 1:
    parser.error(f"--pil_processes must be at least 1, not {args.pil_processes}")
  jpegs = make_jpegs(args.images)
  from convstem_jax.data import files  # pylint: disable=g-import-not-at-top
  n = files.cores()
  print(f"{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB, "
        f"in an image folder; {n} cores")
  if args.trainer:
    print(f"trainer end to end (tiny ViT, batch {BATCH}): "
          f"{trainer_rate(jpegs, args.pp, data_workers=args.data_workers):.1f} images/s")
  with tempfile.TemporaryDirectory() as tmp:
    write_folder(tmp, jpegs, test_copies=-(-EVAL_PASS // len(jpegs)))
    ours = pipeline_rates(tmp, args.pp, args.pp_eval, args.seconds,
                          data_workers=args.data_workers)
  reference = None
  if not args.no_pil:
    for given, default in ((args.pp, DEFAULT_PP), (args.pp_eval, DEFAULT_PP_EVAL)):
      if given != default:
        print(f"note: the PIL reference runs the default pipeline ({default}), not {given}.")
    reference = pil_rates_together(jpegs, args.seconds, args.pil_processes)
  for i, (what, spec) in enumerate((("train", args.pp), ("eval", args.pp_eval))):
    print(f"{what}: {spec}")
    print(f"  ours: {ours[i]:.1f} images/s on {n} cores, {ours[i] / n:.1f} per core")
    if reference:
      together = ("one process" if args.pil_processes == 1 else
                  f"{args.pil_processes} processes at once")
      print(f"  PIL reference ({together}, one image at a time): {reference[i]:.1f} "
            "images/s per core")
      print(f"  ours / PIL per core: {ours[i] / n / reference[i]:.2f}")


if __name__ == "__main__":
  main()
