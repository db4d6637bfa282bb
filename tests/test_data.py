"""Input pipeline: preprocessing ops, ELPV, image folders, tfds (mock data), per-process
slices, eval padding and resumable train streams. Small generated images only."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import tfds_util
from convstem_jax import config as config_lib
from convstem_jax import data as data_lib
from convstem_jax import errors
from convstem_jax.data import common, elpv, pp


def make_config(**kw):
  c = config_lib.base_config()
  c.update(dict(image_size=8, num_classes=3, batch_size=4, eval_batch_size=4, seed=0))
  c.pp_train = "decode|inception_crop(8)|flip_lr|value_range(0, 1)"
  c.pp_eval = "decode|resize(8)|value_range(0, 1)"
  c.update(kw)
  return c


def fake_processes(monkeypatch, count, index):
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(jax, "process_index", lambda: index)


def write_folder(root, per_class=(5, 4, 3), size=12, modes=("L", "RGB", "L")):
  """Class c, image i is a constant image of value 10*(global index)+5: its identity."""
  k = 0
  for c, n in enumerate(per_class):
    d = root / f"class_{c}"
    d.mkdir(parents=True)
    for i in range(n):
      value = 10 * k + 5
      ext = ("png", "jpg", "bmp")[i % 3] if modes[c] == "L" else "png"
      Image.new(modes[c], (size + i, size), value if modes[c] == "L" else
                (value,) * 3).save(d / f"img_{i}.{ext}")
      k += 1
  return k


def identities(batch):
  """Each image's constant value -> the index write_folder gave it."""
  return np.rint((batch["image"].mean(axis=(1, 2, 3)) * 255 - 5) / 10).astype(int)


# ------------------------------------------------------------------ ops

def encoded(fmt="png", shape=(20, 30, 3), seed=0):
  img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  enc = tf.io.encode_png(img) if fmt == "png" else tf.io.encode_jpeg(img, quality=95)
  return img, enc


def run_both(spec, features, seed=(1, 2)):
  """The pipeline eagerly and inside tf.data on the same input and seed."""
  fn = pp.build(spec)
  eager = fn(dict(features), tf.constant(seed, tf.int64))
  ds = tf.data.Dataset.from_tensors(features).map(
      lambda f: fn(f, tf.constant(seed, tf.int64)))
  graph = next(iter(ds))
  np.testing.assert_allclose(eager["image"].numpy(), graph["image"].numpy(), atol=1e-6)
  assert eager["image"].dtype == tf.float32 and graph["label"].dtype == tf.int32
  return eager["image"].numpy()


def test_parse_and_errors():
  assert pp.parse("decode|inception_crop(8, area_min=0.5)|flip_lr") == [
      ("decode", (), {}), ("inception_crop", (8,), {"area_min": 0.5}), ("flip_lr", (), {})]
  with pytest.raises(ValueError, match="Unknown preprocessing op 'nope'"):
    pp.parse("decode|nope")
  with pytest.raises(ValueError, match="arguments must be literals"):
    pp.parse("resize(x)")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_decode_gray_and_rgb_to_three_channels(fmt):
  img, enc = encoded(fmt, (10, 14, 1))
  out = run_both("decode", {"image": enc, "label": 1})
  assert out.shape == (10, 14, 3)
  np.testing.assert_allclose(out[..., 0], out[..., 2])
  if fmt == "png":
    np.testing.assert_allclose(out[..., 0] * 255, img[..., 0], atol=1e-3)


def test_decode_tiff_through_pil(tmp_path):
  arr = np.arange(48, dtype=np.uint8).reshape(6, 8)
  Image.fromarray(arr).save(tmp_path / "x.tif")
  out = run_both("decode", {"image": tf.io.read_file(str(tmp_path / "x.tif")), "label": 0})
  np.testing.assert_allclose(out[..., 1] * 255, arr, atol=1e-3)


def test_flip_lr_and_ud():
  img, _ = encoded(shape=(6, 5, 3))
  f = {"image": tf.constant(img), "label": 0}
  np.testing.assert_allclose(run_both("flip_lr(1.0)", f) * 255, img[:, ::-1], atol=1e-3)
  np.testing.assert_allclose(run_both("flip_lr(0.0)", f) * 255, img, atol=1e-3)
  np.testing.assert_allclose(run_both("flip_ud(1.0)", f) * 255, img[::-1], atol=1e-3)
  # prob 0.5: both outcomes over seeds.
  flips = {bool(np.allclose(run_both("flip_lr", f, seed=(0, s)) * 255, img[:, ::-1],
                            atol=1e-3)) for s in range(16)}
  assert flips == {True, False}


@pytest.mark.parametrize("area", [(0.08, 1.0), (0.5, 0.6)])
def test_inception_crop_area_within_range(area):
  ratios = []
  for s in range(40):
    begin, size = pp._crop_box(tf.constant([100, 160, 3]), tf.constant([3, s], tf.int64),
                               area, (3 / 4, 4 / 3))
    h, w = int(size[0]), int(size[1])
    assert 0 <= int(begin[0]) <= 100 - h and 0 <= int(begin[1]) <= 160 - w
    ratios.append(h * w / (100 * 160))
  assert min(ratios) >= area[0] - 0.02 and max(ratios) <= area[1] + 0.02
  assert len(set(ratios)) > 5  # random


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_inception_crop_on_bytes_and_pixels(fmt):
  img, enc = encoded(fmt, (40, 50, 3))
  spec = "inception_crop(16, area_min=0.3)"
  a = run_both(spec, {"image": enc, "label": 0}, seed=(5, 6))  # fused decode for JPEG
  b = run_both(spec, {"image": tf.constant(img), "label": 0}, seed=(5, 6))
  assert a.shape == b.shape == (16, 16, 3)
  if fmt == "png":  # same crop box from the same seed
    np.testing.assert_allclose(a, b, atol=1e-6)
  c = run_both(spec, {"image": enc, "label": 0}, seed=(5, 7))
  assert not np.allclose(a, c)


def test_resize_small_central_crop_and_values():
  img = np.full((30, 60, 3), 255, np.uint8)
  f = {"image": tf.constant(img), "label": 2}
  out = run_both("resize_small(10)|central_crop(10)|value_range(-1, 1)", f)
  assert out.shape == (10, 10, 3)
  np.testing.assert_allclose(out, 1.0)
  fn = pp.build("resize_small(10)")
  assert fn(dict(f))["image"].shape == (10, 20, 3)
  out = run_both("normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))", f)
  np.testing.assert_allclose(out, 2.0, atol=1e-6)
  out = run_both("normalize", f)
  np.testing.assert_allclose(out[0, 0], (1 - np.array(pp.IMAGENET_MEAN)) /
                             np.array(pp.IMAGENET_STD), rtol=1e-5)
  gray = {"image": tf.zeros((4, 4, 1), tf.uint8), "label": 0}
  assert run_both("gray_to_rgb", gray).shape == (4, 4, 3)


@pytest.mark.parametrize("shape", [(150, 180), (200, 210), (224, 100), (111, 37),
                                   (224, 224), (300, 200), (350, 300)])
def test_resize_is_the_antialiased_bilinear(shape):
  """resize (and the crops, resize_small) is tf.image.resize's antialiased bilinear, as
  PIL resizes; where no axis shrinks it runs the plain bilinear op (faster, the same
  filter), which may move a pixel by one level through float rounding."""
  img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3)).astype(np.uint8)
  out = run_both("resize(224)|value_range(0, 255)", {"image": tf.constant(img), "label": 0})
  ref = tf.image.resize(img, (224, 224), method="bilinear", antialias=True).numpy()
  diff = np.abs(np.rint(out).astype(np.int32) - np.clip(np.round(ref), 0, 255).astype(int))
  assert out.shape == (224, 224, 3)
  assert diff.max() <= 1 and (diff > 0).mean() < 2e-3, (diff.max(), (diff > 0).mean())


def unfused(spec, features, seed):
  """The ops of `spec` applied one by one, as build() did before it fused any."""
  f, seed = dict(features), tf.constant(seed, tf.int64)
  for i, (name, args, kwargs) in enumerate(pp.parse(spec)):
    f = pp.OPS[name](*args, **kwargs)(f, tf.random.experimental.stateless_fold_in(seed, i))
  return f["image"].numpy()


@pytest.mark.parametrize("fmt,shape,size,crop", [
    ("jpeg", (375, 500, 3), 256, 224),  # the ImageNet eval recipe on a typical photo
    ("jpeg", (601, 333, 3), 73, (64, 41)),  # odd offsets, a non-square crop
    ("png", (90, 47, 3), 40, 40),
    ("jpeg", (30, 20, 3), 64, 60),  # upscaling
    ("pixels", (123, 77, 1), 50, 33),  # already decoded, grayscale to 3 channels
])
def test_resize_small_central_crop_fused_as_the_three_ops(fmt, shape, size, crop):
  img, enc = encoded("jpeg" if fmt == "jpeg" else "png", shape, seed=sum(shape))
  image = tf.constant(img) if fmt == "pixels" else enc
  spec = f"decode|resize_small({size})|central_crop({crop})|flip_lr"
  assert len(pp._fused(pp.parse(spec))) == 2
  flips = set()
  for seed in [(0, s) for s in range(6)]:
    ref = unfused(spec, {"image": image, "label": 0}, seed).astype(np.int32)
    out = pp.build(spec)({"image": image, "label": 0}, tf.constant(seed, tf.int64))
    out = np.rint(out["image"].numpy() * 255).astype(np.int32)
    assert out.shape == ref.shape == (*pp._size2(crop), 3)
    diff = np.abs(out - ref)
    # float rounding in the sample positions moves a pixel by one level, rarely
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    # flip_lr keeps its seed (index 3 of the spec), so out flipped where ref did
    flips.add(not np.array_equal(ref, unfused(spec.rsplit("|", 1)[0], {"image": image},
                                              seed).astype(np.int32)))
  assert flips == {True, False}  # both cases seen


def test_resize_small_central_crop_not_fused_when_the_crop_is_wider():
  assert len(pp._fused(pp.parse("decode|resize_small(20)|central_crop(24)"))) == 3
  assert len(pp._fused(pp.parse("resize_small(20)|central_crop(16)"))) == 1


def test_pipeline_must_decode():
  with pytest.raises(ValueError, match="start it with 'decode'"):
    pp.build("flip_lr")({"image": tf.constant(b"x"), "label": 0})


def test_parallelism_fixed_per_core_unless_autotuned(monkeypatch):
  from convstem_jax.data import files
  monkeypatch.setattr(files, "cores", lambda: 5)
  c = make_config()
  assert files.parallelism(tf, c) == 5 and not files.options(tf, c).autotune.enabled
  assert files.options(tf, c).threading.private_threadpool_size in (None, 0)
  c.data_threads = 3
  assert files.parallelism(tf, c) == 3
  assert files.options(tf, c).threading.private_threadpool_size == 3
  c.data_autotune = True
  assert files.parallelism(tf, c) == tf.data.AUTOTUNE and files.options(tf, c).autotune.enabled


# ------------------------------------------------------------------ ELPV

def test_elpv_split_is_stratified_stable_and_disjoint():
  paths, labels, types = elpv.read_table()
  assert len(paths) == 2624 and set(labels.tolist()) == {0, 1, 2, 3}
  assert np.isclose(np.mean(labels == 0), 0.575, atol=0.001)
  split = elpv.split_indices(labels, types)
  train, test = split["train"], split["test"]
  assert len(train) == 1970 and len(test) == 654
  assert not set(train) & set(test) and len(set(train) | set(test)) == 2624
  for c in range(4):
    for t in ("mono", "poly"):
      n = np.sum((labels == c) & (types == t))
      assert abs(np.sum((labels[test] == c) & (types[test] == t)) - 0.25 * n) <= 0.5
  # Stable: the same split every time, whatever the training seed (a fixed fingerprint).
  again = elpv.split_indices(*elpv.read_table()[1:])
  np.testing.assert_array_equal(again["test"], test)
  assert test[:8].tolist() == [0, 12, 16, 19, 20, 22, 26, 31] and test.sum() == 866473


def test_elpv_source_batches():
  c = make_config(dataset="elpv", num_classes=4)
  train = data_lib.get_source(c, "train")
  test = data_lib.get_source(c, "test")
  assert (train.num_examples, test.num_examples) == (1970, 654)
  b = next(train.train_batches(4))
  assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and set(b["label"]) <= {0, 1, 2, 3}
  np.testing.assert_allclose(b["image"][..., 0], b["image"][..., 2])  # gray -> 3 ch
  with pytest.raises(ValueError, match="num_classes = 4"):
    data_lib.get_source(make_config(dataset="elpv"), "train")


# ------------------------------------------------------------------ image folders

def test_folder_processes_disjoint_complete_and_padded(tmp_path, monkeypatch):
  n = write_folder(tmp_path / "all")
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"),
                  folder_test_fraction=0.0)
  seen, batches_per_process = [], []
  for me in range(2):
    fake_processes(monkeypatch, 2, me)
    src = data_lib.get_source(c, "train")
    assert src.num_examples == n
    batches = list(src.eval_batches(4))
    batches_per_process.append(len(batches))
    for b in batches:
      assert b["image"].shape == (4, 8, 8, 3) and b["mask"].dtype == np.float32
      seen.extend(identities(b)[b["mask"] > 0].tolist())
  assert batches_per_process == [2, 2]          # 12 examples: 6 each, padded to 8
  assert sorted(seen) == list(range(n))         # disjoint and complete


def test_eval_padding_uneven_processes(tmp_path, monkeypatch):
  write_folder(tmp_path / "all", per_class=(4, 3, 2))  # 9 examples over 2 processes
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"),
                  folder_test_fraction=0.0)
  counts = []
  for me in range(2):
    fake_processes(monkeypatch, 2, me)
    bs = list(data_lib.get_source(c, "train").eval_batches(2))
    assert len(bs) == 3                          # ceil(5 / 2) on both processes
    counts.append(int(sum(b["mask"].sum() for b in bs)))
  assert counts == [5, 4]


def test_train_stream_shuffles_per_epoch_and_resumes_exactly(tmp_path, monkeypatch):
  n = write_folder(tmp_path / "all", per_class=(4, 4, 4))
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"),
                  folder_test_fraction=0.0)
  c.pp_train = "decode|resize(8)|flip_lr|value_range(0, 1)"
  fake_processes(monkeypatch, 2, 1)
  src = data_lib.get_source(c, "train")
  stream = src.train_batches(3)
  ids = [identities(next(stream)) for _ in range(6)]   # 3 epochs of this process's 6
  epochs = np.concatenate(ids).reshape(3, 6)
  for e in epochs:
    assert sorted(e) == list(range(1, n, 2))     # every example once per epoch
  assert not (epochs[0] == epochs[1]).all()      # reshuffled each epoch
  resumed = src.train_batches(3, start_step=3)
  full = src.train_batches(3)
  for _ in range(3):
    next(full)
  for _ in range(3):
    a, b = next(resumed), next(full)
    np.testing.assert_array_equal(a["image"], b["image"])
  c.seed = 1
  other = data_lib.get_source(c, "train").train_batches(3)
  assert not all(np.array_equal(identities(next(other)), i) for i in ids[:3])


def _worker_pids():
  """This test process's input workers (data/workers.py)."""
  pids = []
  for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as f:
      pids += [int(p) for p in f.read().split()]
  def cmdline(pid):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
    except OSError:
      return b""
  return [p for p in pids if b"convstem_jax.data.workers" in cmdline(p)]


def _assert_workers_end(seconds: float = 10) -> None:
  deadline = time.time() + seconds
  while _worker_pids() and time.time() < deadline:
    time.sleep(0.1)
  assert not _worker_pids()


def _noise_jpegs(root, shape_of, seed: int, n: int = 14) -> None:
  """n noise JPEGs of shape_of(i), alternately in class_0/ and class_1/ under root."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    d = root / f"class_{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*shape_of(i), 3), np.uint8)).save(d / f"{i}.jpg")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_worker_processes_make_the_in_process_stream_bitwise(tmp_path, monkeypatch):
  _noise_jpegs(tmp_path / "all", lambda i: (30 + i, 40), seed=0)
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"), num_classes=2,
                  folder_test_fraction=0.0, repeated_aug=2, image_size=16)
  c.pp_train = ("decode|inception_crop(16)|flip_lr|randaug(2, 9, 0.5)|normalize|"
                "random_erasing(0.5)")
  fake_processes(monkeypatch, 2, 1)  # the parent's process index reaches the workers
  src = data_lib.get_source(c, "train")
  for workers, start, batch in ((2, 0, 5), (3, 4, 5)):
    c.data_workers = 0
    ours = src.train_batches(batch, start_step=start)
    c.data_workers = workers
    theirs = src.train_batches(batch, start_step=start)
    for step in range(6):
      a, b = next(ours), next(theirs)
      assert a.keys() == b.keys()
      for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (workers, step, k)
      if step == 2:  # preemption signals go to the trainer; its workers carry on
        pids = _worker_pids()
        assert len(pids) == workers
        for pid in pids:
          os.kill(pid, signal.SIGTERM)
          os.kill(pid, signal.SIGINT)
    theirs.close()
    _assert_workers_end()  # closing the stream ends its workers


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_eval_workers_make_the_in_process_passes_bitwise_and_persist(tmp_path, monkeypatch):
  _noise_jpegs(tmp_path / "all", lambda i: (30 + i, 40 - i), seed=1)
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"), num_classes=2,
                  folder_test_fraction=0.0, image_size=16)
  c.pp_eval = "decode|resize_small(18)|central_crop(16)|normalize"
  fake_processes(monkeypatch, 2, 1)  # this process's 7 of the 14 examples
  src = data_lib.get_source(c, "train")
  # (batch, workers): last batches of 3 rows over 2 workers, of 1 row over 3 (only the
  # first has rows in it), and one short batch of 7 rows over 4 workers.
  for batch, workers in ((4, 2), (6, 3), (8, 4)):
    c.data_workers = 0
    ours = list(src.eval_batches(batch))
    c.data_workers = workers
    passes = [list(src.eval_batches(batch))]
    pids = sorted(_worker_pids())
    assert len(pids) == min(workers, 7)
    broken = src.eval_batches(batch)
    next(broken)  # a pass broken off after its first batch
    del broken
    passes.append(list(src.eval_batches(batch)))
    assert sorted(_worker_pids()) == pids  # the same workers, pass after pass
    for theirs in passes:
      assert len(theirs) == len(ours) == -(-7 // batch)
      for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in a:
          assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (batch, k)
  del src
  _assert_workers_end()  # they end with their source


def test_a_failing_worker_raises_in_the_parent(tmp_path):
  write_folder(tmp_path / "all", per_class=(4, 4))
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"), num_classes=2,
                  folder_test_fraction=0.0, data_workers=2)
  src = data_lib.get_source(c, "train")
  shutil.rmtree(tmp_path / "all")  # the workers cannot read the files any more
  with pytest.raises(RuntimeError, match="Input worker process .* exited"):
    next(src.train_batches(4))
  for _ in range(2):  # eval workers too, pass after pass
    with pytest.raises(RuntimeError, match="Input worker process .* exited"):
      list(src.eval_batches(4))
  c.data_workers = -2
  with pytest.raises(errors.UserError, match="data_workers"):
    src.train_batches(4)


def test_folder_corrupt_and_stray_files(tmp_path, caplog):
  root = tmp_path / "data"
  n_train = write_folder(root / "train")
  n_test = write_folder(root / "val", per_class=(1, 1, 1))
  (root / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  (root / "train" / "class_1" / "truncated.png").write_bytes(
      (root / "train" / "class_1" / "img_0.png").read_bytes()[:40])
  (root / "train" / "class_2" / "notes.txt").write_text("not an image")
  (root / "train" / ".DS_Store").write_bytes(b"\0")
  c = make_config(dataset="folder", data_dir=str(root))
  with caplog.at_level(logging.WARNING):
    train = data_lib.get_source(c, "train")
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "skipped 2 " in warning and "broken.jpg" in warning
  assert "notes.txt" not in warning
  assert train.num_examples == n_train and train.classes == ["class_0", "class_1",
                                                            "class_2"]
  test = data_lib.get_source(c, "test")
  assert test.num_examples == n_test
  b = next(train.train_batches(4))
  assert b["image"].shape == (4, 8, 8, 3) and set(b["label"]) <= {0, 1, 2}


def test_folder_single_tree_split_and_errors(tmp_path):
  n = write_folder(tmp_path / "all", per_class=(10, 10, 10))
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"))
  train, test = (data_lib.get_source(c, s) for s in ("train", "test"))
  assert (train.num_examples, test.num_examples) == (24, 6)
  assert not set(train.paths) & set(test.paths)
  assert np.bincount(test.labels).tolist() == [2, 2, 2]
  with pytest.raises(FileNotFoundError, match=r"Image folder '.*nowhere' does not exist; "
                     r"set --config.data_dir to a folder laid out as root/train/<class>"):
    data_lib.get_source(make_config(dataset="folder",
                                    data_dir=str(tmp_path / "nowhere")), "train")
  with pytest.raises(ValueError, match="has 3 classes but config.num_classes is 2"):
    data_lib.get_source(make_config(dataset="folder", data_dir=str(tmp_path / "all"),
                                    num_classes=2), "train")
  assert n == 30


# ------------------------------------------------------------------ tfds

@pytest.mark.parametrize("name,size", [("cifar10", 32), ("imagenet2012", 16)])
def test_tfds_mock_through_the_pipeline(name, size, tmp_path):
  num_classes = {"cifar10": 10, "imagenet2012": 1000}[name]
  c = make_config(dataset=name, image_size=size, num_classes=num_classes,
                  data_dir=str(tmp_path))
  c.pp_train = f"decode|inception_crop({size})|flip_lr|normalize"
  c.pp_eval = f"decode|resize_small({size})|central_crop({size})|normalize"
  with tfds.testing.mock_data(num_examples=10):
    src = data_lib.get_source(c, "train")
    assert src.num_examples == 10
    b = next(src.train_batches(4))
    assert b["image"].shape == (4, size, size, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32
    assert ((0 <= b["label"]) & (b["label"] < num_classes)).all()
    ev = list(data_lib.get_source(c, "validation" if name == "imagenet2012" else "test")
              .eval_batches(4))
    assert len(ev) == 3 and sum(int(e["mask"].sum()) for e in ev) == 10
    assert ev[0]["image"].shape == (4, size, size, 3)


def test_tfds_reads_this_process_even_split(tmp_path, monkeypatch):
  fake_processes(monkeypatch, 2, 1)
  c = make_config(dataset="cifar10", num_classes=10, data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=4):
    src = data_lib.get_source(c, "train")
  assert src.local_split == tfds.even_splits("train", n=2)[1]


def test_tfds_prefix_and_unknown_names(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    c = make_config(dataset="tfds:cifar100", image_size=8, num_classes=100,
                    data_dir=str(tmp_path))
    assert data_lib.get_source(c, "train").num_examples == 4
  with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
    data_lib.get_source(make_config(dataset="nope"), "train")


def test_missing_tfds_dataset_fails_at_once(tmp_path):
  c = make_config(dataset="imagenet2012", data_dir=str(tmp_path))
  t0 = time.perf_counter()
  with pytest.raises(FileNotFoundError) as e:
    data_lib.get_source(c, "train")
  assert time.perf_counter() - t0 < 10
  msg = str(e.value)
  assert "'imagenet2012'" in msg and str(tmp_path) in msg and "downloads/manual" in msg
  c = make_config(dataset="cifar10", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"'cifar10'.*tfds build cifar10"):
    data_lib.get_source(c, "train")


# ------------------------------------------------------------------ boundaries

def test_importing_data_does_not_import_tensorflow():
  code = ("import sys, convstem_jax.data as d; "
          "c = __import__('convstem_jax.config', fromlist=['x']).base_config(); "
          "c.dataset = 'synthetic'; d.get_source(c, 'train'); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env)


def load_config_module(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                     f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("size,grid", [(28, 7), (32, 8), (64, 8)])
def test_folder_config_reads_classes_and_builds_a_small_grid_model(tmp_path, size, grid):
  from convstem_jax.models import model_from_config  # pylint: disable=g-import-not-at-top
  write_folder(tmp_path / "all")
  c = load_config_module("folder").get_config(f"data_dir={tmp_path / 'all'},"
                                              f"image_size={size}")
  assert c.num_classes == 3 and c.dataset == "folder"
  model = model_from_config(c)
  assert model.stem_spec().grid(size) == grid
  b = next(data_lib.get_source(c, "train").train_batches(4))
  assert b["image"].shape == (4, size, size, 3)


def test_folder_checks_each_image_once_and_remembers(tmp_path, caplog, monkeypatch):
  """The manifest: a restart decodes nothing it has seen at the same size and mtime,
  still reports the skipped files, and rechecks a changed one; a tree it cannot write
  to keeps its manifest in the cache."""
  from convstem_jax.data import folder
  root = tmp_path / "data"
  write_folder(root / "train")
  write_folder(root / "test", per_class=(1, 1, 1))
  broken = root / "train" / "class_0" / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff garbage")
  c = make_config(dataset="folder", data_dir=str(root))
  decoded = []
  real = folder._readable
  monkeypatch.setattr(folder, "_readable", lambda p: decoded.append(p) or real(p))

  def build():
    folder.scan.cache_clear()  # a new process
    decoded.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO):
      source = data_lib.get_source(c, "train")
    return source, " ".join(r.getMessage() for r in caplog.records)

  first, log = build()
  assert len(decoded) == first.num_examples + 1 and "skipped 1 " in log
  assert (root / "train" / folder.MANIFEST).exists()
  again, log = build()
  assert decoded == [] and "skipped 1 " in log and "broken.jpg" in log
  assert list(again.paths) == list(first.paths)
  shutil.copy(root / "train" / "class_0" / "img_0.png", broken)  # now readable
  fixed, log = build()
  assert decoded == [str(broken)] and "skipped" not in log
  assert fixed.num_examples == first.num_examples + 1
  # Read-only tree: the manifest goes to $XDG_CACHE_HOME instead.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  (root / "test" / folder.MANIFEST).mkdir()  # a manifest that cannot be written there
  data_lib.get_source(c, "test")
  cached = folder.manifest_paths(str(root / "test"))[1]
  assert cached.startswith(str(tmp_path / "cache")) and os.path.exists(cached)
  folder.scan.cache_clear()
  decoded.clear()
  assert data_lib.get_source(c, "test").num_examples == 3 and decoded == []


@pytest.fixture(scope="module")
def dummy_tfds(tmp_path_factory):
  return tfds_util.prepare(tmp_path_factory.mktemp("tfds"))


def _stream(c, start_step, count):
  batches = data_lib.get_source(c, "train").train_batches(4, start_step=start_step)
  return [next(batches) for _ in range(count)]


def _assert_resumes_exactly(c):
  whole = _stream(c, 0, 14)  # 14 batches of 4 over slices of 10 and 20: epoch edges mid-batch
  for s in (3, 5, 11):
    for a, b in zip(whole[s:], _stream(c, s, 14 - s)):
      assert a["image"].tobytes() == b["image"].tobytes() and np.array_equal(
          a["label"], b["label"]), s
  return whole


@pytest.mark.parametrize("repeated_aug", [1, 3])
def test_tfds_stream_resumes_exactly_mock(tmp_path, repeated_aug):
  c = make_config(dataset="cifar10", num_classes=10, data_dir=str(tmp_path),
                  repeated_aug=repeated_aug)
  with tfds.testing.mock_data(num_examples=10):
    whole = _assert_resumes_exactly(c)
  assert not np.array_equal(whole[0]["image"], whole[5]["image"])


@pytest.mark.parametrize("processes", [1, 2])
def test_tfds_stream_resumes_exactly_from_shards(dummy_tfds, monkeypatch, processes):
  fake_processes(monkeypatch, processes, processes - 1)
  c = make_config(dataset="tfds:identity_images", num_classes=10, data_dir=dummy_tfds,
                  repeated_aug=2)
  assert data_lib.get_source(c, "train")._shards() is not None  # the shard-shuffling path
  _assert_resumes_exactly(c)


def test_tfds_each_process_reads_its_slice_once_per_epoch_in_a_new_order(dummy_tfds,
                                                                       monkeypatch):
  c = make_config(dataset="tfds:identity_images", num_classes=10, data_dir=dummy_tfds,
                  pp_train="decode|resize(8)")  # no randomness: an image is its identity
  epochs = {}
  for index in (0, 1):
    fake_processes(monkeypatch, 2, index)
    batches = data_lib.get_source(c, "train").train_batches(5)  # 10 per slice: 2 batches
    images = [bytes(x.tobytes()) for _ in range(6) for x in next(batches)["image"]]
    epochs[index] = [images[k:k + 10] for k in range(0, 30, 10)]
  for index in (0, 1):
    for epoch in epochs[index]:
      assert sorted(epoch) == sorted(epochs[index][0])  # the same slice every epoch
    assert len({tuple(e) for e in epochs[index]}) == 3  # in a new order each epoch
  assert len(set(epochs[0][0])) == 10 and not set(epochs[0][0]) & set(epochs[1][0])
