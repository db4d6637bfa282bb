"""Augmentations of the papers' recipes: mixup / CutMix on device (data/mixup.py) and the
random-erasing, PCA-lighting and RandAugment preprocessing ops (data/pp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convstem_jax.data import mixup


def batch(b=8, h=16, w=12, k=5, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(b, h, w, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, k, size=b))
  return images, jax.nn.one_hot(labels, k)


_mix = jax.jit(mixup.mix, static_argnames=("mixup_alpha", "cutmix_alpha", "switch_prob",
                                           "prob", "smoothing"))


def test_mixup_lambda_distribution():
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  lam, use_cutmix, apply = jax.vmap(lambda r: mixup.sample_params(
      r, mixup_alpha=0.8, cutmix_alpha=1.0))(keys)
  lam, use_cutmix = np.asarray(lam), np.asarray(use_cutmix)
  assert np.asarray(apply).all()                         # prob 1.0
  assert 0.45 < use_cutmix.mean() < 0.55                 # switch_prob 0.5
  assert ((lam >= 0) & (lam <= 1)).all()
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
  for sel, a in ((~use_cutmix, 0.8), (use_cutmix, 1.0)):
    assert abs(lam[sel].mean() - 0.5) < 0.03
    assert abs(lam[sel].var() - 1 / (4 * (2 * a + 1))) < 0.012
  _, _, apply = jax.vmap(lambda r: mixup.sample_params(
      r, mixup_alpha=0.8, cutmix_alpha=0.0, prob=0.3))(keys)
  assert 0.25 < np.asarray(apply).mean() < 0.35
  with pytest.raises(ValueError):
    mixup.sample_params(keys[0], mixup_alpha=0.0, cutmix_alpha=0.0)


def test_mixup_images_and_targets():
  images, y = batch()
  out, targets, info = _mix(jax.random.PRNGKey(1), images, y, mixup_alpha=0.8,
                            cutmix_alpha=0.0, smoothing=0.0)
  lam = float(info["lam"])
  assert 0 < lam < 1 and not bool(info["cutmix"])
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-5)
  np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_box_area_is_the_label_weight(seed):
  images, y = batch(h=16, w=12, seed=seed)
  out, targets, info = _mix(jax.random.PRNGKey(seed), images, y, mixup_alpha=0.0,
                            cutmix_alpha=1.0, smoothing=0.0)
  assert bool(info["cutmix"])
  out, images = np.asarray(out), np.asarray(images)
  pasted = np.all(out == images[::-1], axis=-1)          # [B, H, W]
  kept = np.all(out == images, axis=-1)
  assert (pasted | kept).all()
  # Every image got the same box (one per batch); the kept share is exactly lam.
  box = pasted[0]
  assert (pasted == box).all()
  rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
  if box.any():  # a rectangle
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  lam = float(info["lam"])
  assert lam == pytest.approx(1 - box.sum() / box.size, abs=1e-6)
  np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], atol=1e-6)


def test_cutmix_box_is_timms_rand_bbox():
  # Centred box of side floor(sqrt(1 - lam) * size), clipped at the borders.
  for lam in (0.0, 0.3, 0.75, 1.0):
    t, b, l, r = (int(v) for v in mixup.cutmix_box(jax.random.PRNGKey(3), lam, 100, 60))
    cut_h, cut_w = int(100 * np.sqrt(1 - lam)), int(60 * np.sqrt(1 - lam))
    assert 0 <= t <= b <= 100 and 0 <= l <= r <= 60
    assert b - t <= cut_h and r - l <= cut_w
    if lam == 1.0:
      assert (b - t) * (r - l) == 0


def test_label_smoothing_folded_into_mixed_targets():
  images, y = batch(k=10)
  s = 0.1
  for cut in (0.0, 1.0):
    _, targets, info = _mix(jax.random.PRNGKey(7), images, y, mixup_alpha=1.0 - cut,
                            cutmix_alpha=cut, smoothing=s)
    lam = float(info["lam"])
    ys = y * (1 - s) + s / 10  # timm's on = 1 - s + s/K, off = s/K
    np.testing.assert_allclose(targets, lam * ys + (1 - lam) * ys[::-1], atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    assert float(targets.min()) >= s / 10 - 1e-7


def test_both_branches_and_no_mix_over_seeds():
  images, y = batch()
  seen = set()
  for seed in range(16):
    out, _, info = _mix(jax.random.PRNGKey(seed), images, y, mixup_alpha=0.8,
                        cutmix_alpha=1.0, smoothing=0.1)
    seen.add(bool(info["cutmix"]))
  assert seen == {True, False}
  # prob 0: nothing changes, targets are the smoothed labels.
  out, targets, info = _mix(jax.random.PRNGKey(0), images, y, mixup_alpha=0.8,
                            cutmix_alpha=1.0, prob=0.0, smoothing=0.1)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, y * 0.9 + 0.1 / 5, atol=1e-6)
  assert float(info["lam"]) == 1.0


def test_mix_is_deterministic_and_jits_once():
  images, y = batch()
  traces = []

  @jax.jit
  def f(rng, x, t):
    traces.append(1)
    return mixup.mix(rng, x, t, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1)

  a = f(jax.random.PRNGKey(5), images, y)
  b = f(jax.random.PRNGKey(5), images, y)
  f(jax.random.PRNGKey(6), images, y)
  assert len(traces) == 1
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].dtype == images.dtype and a[0].shape == images.shape


def test_trainer_with_mixup_and_cutmix_stays_finite(tmp_path):
  from test_train import read_metrics, tiny_config  # pylint: disable=g-import-not-at-top
  from convstem_jax import train  # pylint: disable=g-import-not-at-top
  c = tiny_config(total_steps=3, checkpoint_every_steps=0, mixup_alpha=0.8,
                  cutmix_alpha=1.0, grad_accum_steps=2)  # targets split into micro-batches
  train.train_and_evaluate(c, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    for key in ("train/loss", "train/grad_norm", "train/accuracy", "train/mix_lam"):
      assert np.isfinite(r[key]), (key, r)
    assert 0 <= r["train/mix_lam"] <= 1 and r["train/cutmix"] in (0.0, 1.0)
  assert np.isfinite(rows[-1]["test/accuracy"])


# ------------------------------------------------------------------ pp ops

def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _run_both(spec, image, seed=(1, 2)):
  from test_data import run_both  # eagerly and inside tf.data, equal  # pylint: disable=g-import-not-at-top
  return run_both(spec, {"image": _tf().constant(image), "label": 0}, seed)


def _many(spec, image, seeds):
  """The pipeline on one image under many seeds, inside tf.data (one pipeline)."""
  from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
  tf = _tf()
  fn = pp.build(spec)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64)).map(
      lambda s: fn({"image": tf.constant(image), "label": 0}, s)["image"])
  return np.stack(list(ds.as_numpy_iterator()))


def test_random_erasing_box_and_noise():
  img = np.zeros((40, 50, 3), np.float32) + 7.0  # a normalised image would be float too
  _run_both("random_erasing(prob=1.0)", img, seed=(0, 1))  # eager == tf.data
  fractions = []
  for out in _many("random_erasing(prob=1.0)", img, [(0, s) for s in range(40)]):
    erased = np.any(out != 7.0, axis=-1)
    if not erased.any():
      continue
    rows, cols = np.nonzero(erased.any(1))[0], np.nonzero(erased.any(0))[0]
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert erased.sum() == h * w                    # one rectangle
    assert 0.3 - 0.1 <= h / w <= 3.3 + 0.7          # aspect range, up to rounding
    box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert abs(box.mean()) < 0.6 and 0.6 < box.std() < 1.4   # N(0, 1) per pixel
    fractions.append(h * w / (40 * 50))
  assert len(fractions) >= 35
  assert min(fractions) >= 0.02 - 0.01 and max(fractions) <= 1 / 3 + 0.03
  # prob 0.25: erased in about a quarter of the images.
  outs = _many("random_erasing", img, [(1, s) for s in range(200)])
  assert 0.15 < np.mean(np.any(outs != 7.0, axis=(1, 2, 3))) < 0.35
  out = _run_both("random_erasing(prob=1.0, mode='const')", img, seed=(0, 1))
  assert set(np.unique(out)) == {0.0, 7.0}
  with pytest.raises(ValueError, match="after 'normalize'"):
    _run_both("random_erasing", img.astype(np.uint8))


def test_pca_lighting_adds_one_colour_offset():
  img = np.random.default_rng(0).integers(0, 256, (6, 7, 3)).astype(np.uint8)
  out = _run_both("pca_lighting(0.1)|value_range(0, 255)", img, seed=(3, 4))
  offset = out - img.astype(np.float32)
  np.testing.assert_allclose(offset, np.broadcast_to(offset[0, 0], offset.shape),
                             atol=1e-3)                # the same RGB shift everywhere
  assert 0 < np.abs(offset[0, 0]).max() < 255 * 0.2175 * 0.1 * 5
  # Its distribution: V diag(eigval) alpha with alpha ~ N(0, 0.1^2), on the [0, 255] scale.
  from convstem_jax.data import pp  # pylint: disable=g-import-not-at-top
  fn = pp.build("pca_lighting(0.1, scale=1.0)")
  zero = {"image": _tf().zeros((1, 1, 3)), "label": 0}
  shifts = np.stack([fn(dict(zero), _tf().constant([0, s], _tf().int64))["image"].numpy()
                     .reshape(3) for s in range(300)])
  v, lam = np.array(pp.IMAGENET_EIGVEC), np.array(pp.IMAGENET_EIGVAL)
  alpha = np.linalg.solve(v, shifts.T).T / lam        # recover the draws
  assert np.allclose(alpha.std(0), 0.1, rtol=0.2) and np.abs(alpha.mean(0)).max() < 0.03


def test_randaug_deterministic_shapes_and_range():
  img = np.random.default_rng(0).integers(0, 256, (24, 20, 3)).astype(np.uint8)
  a = _run_both("randaug(num_ops=2, magnitude=9, mstd=0.5)", img, seed=(4, 5))
  b = _many("randaug(num_ops=2, magnitude=9, mstd=0.5)", img, [(4, 5)])[0]
  np.testing.assert_array_equal(a, b)
  assert a.shape == (24, 20, 3) and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1 and np.allclose(a * 255, np.round(a * 255),
                                                       atol=1e-3)
  outs = _many("randaug", img, [(4, s) for s in range(8)])
  assert len({o.tobytes() for o in outs}) >= 5        # different per seed
  gray = _run_both("randaug", img[..., :1], seed=(1, 1))
  assert gray.shape == (24, 20, 3)


def test_randaug_draws_timms_distribution():
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top
  tf = _tf()
  draws = [ra.draw(tf.constant([7, s], tf.int64), 2, 9.0, 0.5, 0.5) for s in range(400)]
  index = np.array([[int(l[0]) for l in d] for d in draws]).ravel()
  apply = np.array([[bool(l[1]) for l in d] for d in draws]).ravel()
  level = np.array([[float(l[2]) for l in d] for d in draws]).ravel()
  assert set(index) == set(range(15))                # every op of the 'inc1' set
  assert 0.43 < apply.mean() < 0.57                  # timm's p = 0.5
  assert abs(level.mean() - 0.9) < 0.01 and abs(level.std() - 0.05) < 0.01
  assert level.max() <= 1.0


def test_randaug_every_sub_op_eagerly_and_in_tf_data():
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top
  tf = _tf()
  img = tf.constant(np.random.default_rng(1).integers(20, 230, (16, 18, 3)), tf.float32)
  ds = tf.data.Dataset.range(len(ra.OP_NAMES)).map(
      lambda i: ra.apply_op(tf.cast(i, tf.int32), img, tf.constant(0.9), tf.constant(1.0)))
  for i, graph in enumerate(ds):
    eager = ra.apply_op(tf.constant(i), img, tf.constant(0.9), tf.constant(1.0))
    np.testing.assert_array_equal(eager.numpy(), graph.numpy(), err_msg=ra.OP_NAMES[i])
    out = eager.numpy()
    assert out.shape == (16, 18, 3) and out.min() >= 0 and out.max() <= 255
    assert np.array_equal(out, np.round(out))
    if ra.OP_NAMES[i] != "AutoContrast":   # noise already spans nearly 0..255
      assert not np.array_equal(out, img.numpy()), ra.OP_NAMES[i]


def test_ops_give_the_same_images_whatever_the_shape_known_at_trace_time():
  """Per-channel values are spread over the image as a constant when its shape is
  static and by tiling when it is not (randaug.per_channel); both give the same image.
  Values of another length than the channels broadcast as plain TensorFlow would."""
  from convstem_jax.data import pp, randaug as ra  # pylint: disable=g-import-not-at-top
  tf = _tf()
  img = np.random.default_rng(3).integers(0, 256, (16, 18, 3)).astype(np.float32)
  unknown = [tf.TensorSpec([None, None, 3], tf.float32)]

  def both(fn):
    return (tf.function(fn)(tf.constant(img)).numpy(),
            tf.function(fn, input_signature=unknown)(tf.constant(img)).numpy())

  for i, name in enumerate(ra.OP_NAMES):
    static, dynamic = both(
        lambda x, i=i: ra.apply_op(tf.constant(i), x, tf.constant(0.7), tf.constant(-1.0)))
    assert np.array_equal(static, dynamic), name
  seed = tf.constant([1, 2], tf.int64)
  for spec in ("normalize", "pca_lighting(0.5)"):
    static, dynamic = both(lambda x, spec=spec: pp.build(spec)({"image": x}, seed)["image"])
    np.testing.assert_allclose(static, dynamic, rtol=1e-6, atol=1e-6, err_msg=spec)
  gray = img[..., :1].astype(np.uint8)
  out = pp.build("normalize")({"image": tf.constant(gray)})["image"].numpy()
  mean, std = np.asarray(pp.IMAGENET_MEAN), np.asarray(pp.IMAGENET_STD)
  np.testing.assert_allclose(out, (gray / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_randaug_ops_match_pil():
  """Pixel ops equal PIL's; geometric ops agree away from the border (PIL does not blend
  edge pixels with the fill colour)."""
  from PIL import Image, ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top
  tf = _tf()
  base = np.random.default_rng(0).integers(30, 220, (8, 10, 3)).astype(np.uint8)
  arr = np.asarray(Image.fromarray(base).resize((40, 32), Image.BILINEAR))
  im, x = Image.fromarray(arr), tf.constant(arr, tf.float32)

  def diff(mine, pil):
    return np.abs(mine.numpy() - np.asarray(pil, np.float32))

  lut = [min(255, i + 50) if i < 128 else i for i in range(256)] * 3
  exact = [(ra.auto_contrast(x), ImageOps.autocontrast(im)),
           (ra.equalize(x), ImageOps.equalize(im)),
           (ra.invert(x), ImageOps.invert(im)),
           (ra.posterize(x, 2), ImageOps.posterize(im, 2)),
           (ra.solarize(x, 100.0), ImageOps.solarize(im, 100)),
           (ra.solarize_add(x, 50.0), im.point(lut))]
  for f in (0.3, 1.7):
    exact += [(ra.contrast(x, f), ImageEnhance.Contrast(im).enhance(f)),
              (ra.brightness(x, f), ImageEnhance.Brightness(im).enhance(f)),
              (ra.sharpness(x, f), ImageEnhance.Sharpness(im).enhance(f))]
    assert diff(ra.color(x, f), ImageEnhance.Color(im).enhance(f)).max() <= 1
  for mine, pil in exact:
    assert diff(mine, pil).max() == 0
  kw = dict(resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in ra.FILL))
  geometric = [(ra.rotate(x, 20.0), im.rotate(20, **kw)),
               (ra.shear_x(x, 0.2), im.transform(im.size, Image.AFFINE,
                                                 (1, 0.2, 0, 0, 1, 0), **kw)),
               (ra.translate_x(x, 0.3), im.transform(im.size, Image.AFFINE,
                                                     (1, 0, 12, 0, 1, 0), **kw))]
  for mine, pil in geometric:
    d = diff(mine, pil)
    assert np.median(d) <= 1 and d.mean() < 1.5


def test_shears_and_translations_equal_the_general_affine_but_for_near_ties():
  """Shears gather each row's / column's window (randaug._shift_lines) and translations
  slice a one-side padded image (randaug._translate) rather than run TensorFlow's
  projective transform (randaug.affine): the same image but for near-ties of .5, also
  where lines move wholly out of the image (all fill)."""
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top
  tf = _tf()
  x = tf.constant(np.random.default_rng(5).integers(0, 256, (48, 56, 3)), tf.float32)
  for factor in (0.05, 0.2, -0.3, 0.29, 3.0, -7.0):
    for mine, general in ((ra.shear_x(x, factor), (1.0, factor, 0.0, 0.0, 1.0, 0.0)),
                          (ra.shear_y(x, factor), (1.0, 0.0, 0.0, factor, 1.0, 0.0))):
      d = np.abs(mine.numpy() - ra.affine(x, general).numpy())
      assert d.max() <= 1 and (d > 0).mean() < 0.05, (factor, general, (d > 0).mean())
  for fraction in (0.013, 0.3, -0.45, 0.98, -1.2, 3.0):  # translations: slices, padded
    for mine, general in ((ra.translate_x(x, fraction), (1, 0, 56 * fraction, 0, 1, 0)),
                          (ra.translate_y(x, fraction), (1, 0, 0, 0, 1, 48 * fraction))):
      d = np.abs(mine.numpy() - ra.affine(x, general).numpy())
      assert d.max() <= 1 and (d > 0).mean() < 0.05, (fraction, general, (d > 0).mean())
  # Rows 2.. of a shear by 7 start beyond the 56-pixel width: all fill.
  far = ra.shear_x(x, 7.0).numpy()[8:]
  assert np.array_equal(far, np.broadcast_to(np.asarray(ra.FILL, np.float32), far.shape))


def test_repeated_augmentation_in_file_sources(tmp_path):
  from test_data import identities, make_config, write_folder  # pylint: disable=g-import-not-at-top
  from convstem_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  n = write_folder(tmp_path / "all", per_class=(4, 4, 4))
  c = make_config(dataset="folder", data_dir=str(tmp_path / "all"),
                  folder_test_fraction=0.0, repeated_aug=3)
  c.pp_train = "decode|resize(8)|value_range(0, 1)"
  src = data_lib.get_source(c, "train")
  ids = np.concatenate([identities(next(src.train_batches(6, start_step=s)))
                        for s in range(4)])              # 2 epochs of 12
  for epoch in ids.reshape(2, n):
    assert (epoch.reshape(4, 3) == epoch.reshape(4, 3)[:, :1]).all()  # 3 copies in a row
    assert len(set(epoch)) == 4
  assert set(ids[:n]) != set(ids[n:])                    # another subset next epoch


# ------------------------------------------------------------------ AutoAugment

def _timm_auto_augment():
  """timm's auto_augment.py as a standalone module (bench_input's loader: PIL only, not
  torch), with its `random` replaced so every step applies and signed arguments stay
  positive."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from convstem_jax.tools import bench_input  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed")
  module = bench_input.timm_auto_augment()
  module.random = types.SimpleNamespace(random=lambda: 0.0, gauss=lambda m, s: m,
                                        uniform=lambda a, b: b, choice=lambda s: s[0])
  return module


def test_autoaug_deterministic_shapes_and_range():
  img = np.random.default_rng(0).integers(0, 256, (24, 20, 3)).astype(np.uint8)
  a = _run_both("autoaug", img, seed=(4, 5))            # eager == tf.data
  assert a.shape == (24, 20, 3) and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1 and np.allclose(a * 255, np.round(a * 255),
                                                       atol=1e-3)
  outs = _many("autoaug", img, [(4, 5)] + [(4, s) for s in range(12)])
  np.testing.assert_array_equal(outs[0], a)             # the same per seed
  assert len({o.tobytes() for o in outs[1:]}) >= 6      # different across seeds
  assert _run_both("autoaug", img[..., :1], seed=(1, 1)).shape == (24, 20, 3)
  assert _many("autoaug(mstd=0.5)", img, [(4, 5)]).shape == (1, 24, 20, 3)


def test_autoaug_draws_the_policy_distribution():
  from convstem_jax.data import autoaug as aa  # pylint: disable=g-import-not-at-top
  tf = _tf()
  n = 6000
  ds = tf.data.Dataset.range(n).map(
      lambda s: aa.draw(tf.stack([tf.constant(11, tf.int64), s])))
  index, apply, level, sign = (np.stack(v) for v in zip(*ds.as_numpy_iterator()))
  k = len(aa.POLICY)
  counts = np.bincount(index, minlength=k)
  assert counts.size == k and (counts > 0).all()        # every sub-policy reachable
  assert np.abs(counts - n / k).max() < 5 * np.sqrt(n / k)   # uniform
  probs = np.array([[p for _, p, _ in sub] for sub in aa.POLICY])
  mags = np.array([[m for _, _, m in sub] for sub in aa.POLICY], np.float64)
  rate = np.stack([apply[index == i].mean(0) for i in range(k)])
  assert (rate[probs == 0.0] == 0).all() and (rate[probs == 1.0] == 1).all()
  sigma = np.sqrt(probs * (1 - probs) / counts[:, None])
  assert (np.abs(rate - probs) <= 4 * sigma + 1e-9).all()    # each step's probability
  pooled = apply.mean(0)                                # over all steps: E[p]
  assert np.abs(pooled - probs.mean(0)).max() < 0.03
  np.testing.assert_array_equal(level, mags[index] / 10)   # mstd 0: fixed magnitudes
  assert set(np.unique(sign)) == {-1.0, 1.0} and abs(sign.mean()) < 0.05
  _, _, noisy, _ = aa.draw(tf.constant([0, 1], tf.int64), mstd=0.5)
  assert ((noisy.numpy() >= 0) & (noisy.numpy() <= 1)).all()


def test_autoaug_every_sub_policy_eagerly_and_in_tf_data():
  from convstem_jax.data import autoaug as aa  # pylint: disable=g-import-not-at-top
  tf = _tf()
  img = tf.constant(np.random.default_rng(1).integers(20, 230, (16, 18, 3)), tf.float32)
  on = tf.constant([True, True])
  ones = tf.constant([1.0, 1.0], tf.float64)

  def run(i):
    level = tf.gather(tf.constant([[m / 10 for _, _, m in sub] for sub in aa.POLICY],
                                  tf.float64), i)
    return aa.apply_sub_policy(i, img, on, level, ones)

  ds = tf.data.Dataset.range(len(aa.POLICY)).map(lambda i: run(tf.cast(i, tf.int32)))
  for i, graph in enumerate(ds):
    eager = run(tf.constant(i)).numpy()
    np.testing.assert_allclose(eager, graph.numpy(), atol=1e-4, err_msg=str(i))
    assert eager.shape == (16, 18, 3) and eager.min() >= 0 and eager.max() <= 255
    assert np.array_equal(eager, np.round(eager))
    assert not np.array_equal(eager, img.numpy()), i


def test_autoaug_policy_and_ops_match_timm():
  """The policy is timm's 'original'; every step of every sub-policy, on the image timm
  gives the step before, agrees with timm's PIL op (pixel ops exactly, Color up to its
  rounding; geometric ones away from the border, as for RandAugment)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from convstem_jax.data import autoaug as aa  # pylint: disable=g-import-not-at-top
  from convstem_jax.data import randaug as ra  # pylint: disable=g-import-not-at-top
  timm_aa = _timm_auto_augment()
  fill = tuple(int(v) for v in ra.FILL)
  hparams = dict(img_mean=fill, interpolation=Image.BILINEAR)
  theirs = timm_aa.auto_augment_policy_original(hparams)
  assert [[(o.name, o.prob, o.magnitude) for o in sub] for sub in theirs] == \
      [list(sub) for sub in aa.POLICY]
  tf = _tf()
  base = np.random.default_rng(0).integers(30, 220, (8, 10, 3)).astype(np.uint8)
  arr = np.asarray(Image.fromarray(base).resize((40, 32), Image.BILINEAR))
  ones = tf.constant([1.0, 1.0], tf.float64)
  for i, sub in enumerate(aa.POLICY):
    level = tf.constant([m / 10 for _, _, m in sub], tf.float64)
    im = Image.fromarray(arr)
    for j, (name, _, magnitude) in enumerate(sub):
      only_j = tf.constant([k == j for k in range(len(sub))])
      mine = aa.apply_sub_policy(tf.constant(i), tf.constant(np.asarray(im), tf.float32),
                                 only_j, level, ones).numpy()
      im = timm_aa.AugmentOp(name, 1.0, magnitude, hparams=hparams)(im)
      d = np.abs(mine - np.asarray(im, np.float32))
      if name in ("Rotate", "ShearX"):
        assert np.median(d) <= 1 and d.mean() < 1.5, (i, j, d.mean())
      else:
        assert d.max() <= (1 if name == "Color" else 0), (i, j, name, d.max())


# ------------------------------------------------------------------ repeated augmentation

def test_repeated_augmentation_in_tfds_source(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from test_data import make_config  # pylint: disable=g-import-not-at-top
  from convstem_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  n, r = 10, 3
  c = make_config(dataset="cifar10", image_size=32, num_classes=10,
                  data_dir=str(tmp_path), repeated_aug=r)
  # pca_lighting: one RGB offset per image, so the copies of an example differ by a
  # constant (their augmentation) and different examples by much more.
  c.pp_train = "decode|pca_lighting(0.5)"
  with tfds.testing.mock_data(num_examples=n):
    src = data_lib.get_source(c, "train")
    assert src.num_examples == n and src.local_examples() == n
    it = src.train_batches(5)
    images = np.concatenate([next(it)["image"] for _ in range(6)])   # 3 epochs
  flat = images.reshape(len(images), -1, 3)

  def same_example(a, b):
    offset = flat[a] - flat[b]
    return np.abs(offset - offset.mean(0)).max() < 1e-3

  # Groups: per epoch the first ceil(10 / 3) = 4 examples of its order, 3 + 3 + 3 + 1
  # copies (epoch length 10).
  sizes = [3, 3, 3, 1] * 3
  starts = np.cumsum([0] + sizes[:-1])
  for start, size in zip(starts, sizes):
    for j in range(1, size):
      assert same_example(start, start + j)                   # a copy ...
      assert not np.array_equal(images[start], images[start + j])  # ... augmented anew
  firsts = list(starts)
  for epoch in range(3):  # an epoch's 4 groups are 4 different examples (DeiT's sampler)
    group = firsts[4 * epoch:4 * epoch + 4]
    for a in range(4):
      for b in range(a + 1, 4):
        assert not same_example(group[a], group[b]), (epoch, a, b)
