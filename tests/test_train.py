"""The training loop in-process on 8 fake CPU devices, with tiny models and synthetic data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import config as config_lib
from convstem_jax import data as data_lib
from convstem_jax import errors
from convstem_jax import evaluate as eval_lib
from convstem_jax import sharding as shd
from convstem_jax import train
from convstem_jax.models import model_from_config


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.model_name = "vitc_1gf"  # conv stem, so BatchNorm state is exercised
  c.model = dict(depth=1)
  c.dataset = "synthetic"
  c.eval_splits = ("test",)
  c.image_size = 32
  c.num_classes = 4
  c.batch_size = c.eval_batch_size = 16
  c.synthetic_train_examples = 160
  c.synthetic_eval_examples = 40
  c.total_steps, c.total_epochs = 6, 0.0
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.eval_every_epochs = 0.0
  c.checkpoint_every_steps = 3
  c.lr, c.lr_batch_base = 1e-3, 0
  c.schedule.update(warmup_steps=2, warmup_epochs=0.0)
  c.checkpoint_every_epochs = 0.0
  c.update(overrides)
  return c


def read_metrics(workdir):
  return [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]


def restore(workdir, config, step=None):
  ckpt, step = ckpt_lib.resolve(str(workdir), step)
  model = model_from_config(config)
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  return ckpt.restore_model(step, jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), x)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  config = tiny_config(ema_decay=0.5)
  results = train.train_and_evaluate(config, str(workdir))
  return workdir, config, results


def test_trains_logs_and_checkpoints(uninterrupted):
  workdir, _, results = uninterrupted
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ("train/loss", "train/lr", "train/grad_norm"):
    assert all(np.isfinite(r[key]) for r in rows)
  # Throughput from the second logged step on (the first one is compilation).
  assert "train/images_per_sec" not in rows[0]
  assert all(r["train/images_per_sec"] > 0 for r in rows[1:])
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert rows[-1]["test/count"] == 40 and "test_ema/accuracy" in rows[-1]
  assert set(results) >= {"test/accuracy", "test/loss", "test_ema/accuracy"}
  assert "test/top5" not in results  # 4 classes: top-5 would always be 1.0
  assert ckpt_lib.Checkpointer(str(workdir)).all_steps() == [3, 6]
  assert json.load(open(workdir / "config.json"))["model_name"] == "vitc_1gf"
  assert list(workdir.glob("events.out.tfevents*"))


def test_resume_continues_the_same_loss_sequence(uninterrupted, tmp_path):
  full_dir, config, _ = uninterrupted
  first = tiny_config(ema_decay=0.5, total_steps=3)
  train.train_and_evaluate(first, str(tmp_path))
  train.train_and_evaluate(config, str(tmp_path))  # resumes at 3, runs to 6
  resumed = read_metrics(tmp_path)
  full = read_metrics(full_dir)
  assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([r["train/loss"] for r in resumed],
                             [r["train/loss"] for r in full], rtol=1e-5)
  np.testing.assert_allclose(resumed[-1]["test/loss"], full[-1]["test/loss"], rtol=1e-5)


def test_rerun_on_finished_workdir_trains_nothing(uninterrupted, tmp_path):
  _, config, _ = uninterrupted
  c = tiny_config(total_steps=2, checkpoint_every_steps=0)
  train.train_and_evaluate(c, str(tmp_path))
  again = train.train_and_evaluate(c, str(tmp_path))
  assert again == {} and len(read_metrics(tmp_path)) == 2


def test_fixed_batch_overfits(tmp_path):
  c = tiny_config(synthetic_train_examples=16, total_steps=60, log_every_steps=20,
                  checkpoint_every_steps=0, label_smoothing=0.0, weight_decay=0.0,
                  synthetic_noise=3.0)
  c.model = dict(depth=1, init_style="pycls")
  train.train_and_evaluate(c, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert rows[-1]["train/loss"] < 0.05 and rows[-1]["train/accuracy"] == 1.0


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  # Patchify model (no BatchNorm), so micro-batches see the same function.
  base = dict(model_name="vit_ti16", total_steps=2, checkpoint_every_steps=0,
              optimizer="sgd", lr=0.1, weight_decay=0.0)
  base["model"] = dict(depth=1, patch_size=8)
  train.train_and_evaluate(tiny_config(**base), str(tmp_path / "one"))
  train.train_and_evaluate(tiny_config(grad_accum_steps=2, **base), str(tmp_path / "acc"))
  one, acc = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "acc")
  np.testing.assert_allclose([r["train/loss"] for r in acc],
                             [r["train/loss"] for r in one], rtol=1e-4)
  np.testing.assert_allclose(acc[-1]["train/grad_norm"], one[-1]["train/grad_norm"],
                             rtol=1e-4)


def test_gradient_accumulation_advances_batchnorm_statistics_once_per_step(tmp_path):
  """With BatchNorm (conv stem) and 2 micro-batches, the first BN layer's running mean
  moves once per step with momentum 0.9, by the big batch's mean: the same as without
  accumulation (each micro-batch updating it in turn would move it by 1 - 0.9^2)."""
  base = dict(total_steps=1, checkpoint_every_steps=1, lr=0.0, weight_decay=0.0)
  runs = {}
  for accum in (1, 2):
    c = tiny_config(grad_accum_steps=accum, **base)
    train.train_and_evaluate(c, str(tmp_path / str(accum)))
    runs[accum] = restore(tmp_path / str(accum), c)["batch_stats"]
  one, acc = runs[1]["stem"]["norm_0"], runs[2]["stem"]["norm_0"]
  fresh_mean = 0.0  # a fresh BatchNorm's running mean
  moved_one = np.abs(np.asarray(one["mean"]) - fresh_mean).max()
  assert moved_one > 1e-3  # the batch moved the statistics
  np.testing.assert_allclose(acc["mean"], one["mean"], rtol=1e-5, atol=1e-7)
  # Variance: the mean of the micro-batches' variances, not the big batch's.
  assert not np.allclose(acc["var"], one["var"], rtol=1e-7, atol=0)


def test_fsdp_shards_parameters_and_trains_the_same(tmp_path):
  mesh = shd.make_mesh()
  big = jax.ShapeDtypeStruct((192, 576), jnp.float32)
  small = jax.ShapeDtypeStruct((192,), jnp.float32)
  specs = shd.state_shardings({"big": big, "small": small}, mesh, fsdp=True)
  assert specs["big"].spec == jax.sharding.PartitionSpec(None, "data")
  assert specs["small"].spec == jax.sharding.PartitionSpec()
  c = dict(total_steps=2, checkpoint_every_steps=0)
  train.train_and_evaluate(tiny_config(**c), str(tmp_path / "dp"))
  train.train_and_evaluate(tiny_config(fsdp=True, **c), str(tmp_path / "fsdp"))
  np.testing.assert_allclose([r["train/loss"] for r in read_metrics(tmp_path / "fsdp")],
                             [r["train/loss"] for r in read_metrics(tmp_path / "dp")],
                             rtol=1e-4)


def test_eval_counts_every_example_once(uninterrupted):
  workdir, config, _ = uninterrupted
  config = tiny_config(synthetic_eval_examples=37, eval_batch_size=8)
  variables = restore(workdir, config)
  mesh = shd.make_mesh()
  model = model_from_config(config)
  evaluator = eval_lib.Evaluator(config, model, mesh)
  got = evaluator.evaluate_split("test", variables["params"], variables["batch_stats"])
  assert got["count"] == 37
  # The same numbers from one plain forward pass over all 37 examples.
  source = data_lib.get_source(config, "test")
  batches = list(source.eval_batches(37))
  assert len(batches) == 1 and batches[0]["mask"].all()
  logits, _ = model.apply(variables, batches[0]["image"])
  labels = batches[0]["label"]
  np.testing.assert_allclose(got["accuracy"], np.mean(np.argmax(logits, -1) == labels),
                             atol=1e-6)
  loss = -jax.nn.log_softmax(logits)[np.arange(37), labels].mean()
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)


def test_eval_padding_batches_are_masked(uninterrupted):
  config = tiny_config(synthetic_eval_examples=37)
  batches = list(data_lib.get_source(config, "test").eval_batches(16))
  assert len(batches) == 3
  assert [int(b["mask"].sum()) for b in batches] == [16, 16, 5]


def test_precise_bn_matches_the_first_layer_statistics(uninterrupted):
  workdir, config, _ = uninterrupted
  config = tiny_config(precise_bn_images=32)
  variables = restore(workdir, config)
  model = model_from_config(config)
  mesh = shd.make_mesh()
  source = data_lib.get_source(config, "train")
  evaluator = eval_lib.Evaluator(config, model, mesh, train_source=source)
  stats = evaluator.precise_bn(variables["params"], variables["batch_stats"])
  # The first conv's output over the same 32 images, by hand.
  batches = source.train_batches(16, start_step=10**8)
  images = np.concatenate([next(batches)["image"] for _ in range(2)])
  _, inter = model.apply(variables, images, capture_intermediates=True,
                         mutable=["intermediates"])
  conv0 = np.asarray(inter["intermediates"]["stem"]["conv_0"]["__call__"][0])
  flat = conv0.reshape(-1, conv0.shape[-1])
  np.testing.assert_allclose(stats["stem"]["norm_0"]["mean"], flat.mean(0), atol=1e-4)
  # Variance: E[per-batch unbiased var] + Var[batch means]; close to the pooled one.
  np.testing.assert_allclose(stats["stem"]["norm_0"]["var"], flat.var(0), rtol=2e-2)
  assert not np.allclose(stats["stem"]["norm_0"]["var"],
                         variables["batch_stats"]["stem"]["norm_0"]["var"], rtol=1e-2)


def test_init_from_keeps_the_body_and_resets_a_new_head(uninterrupted, tmp_path):
  workdir, _, _ = uninterrupted
  c = tiny_config(num_classes=6, init_from=str(workdir), total_steps=1,
                  checkpoint_every_steps=0, lr=0.0)
  train.train_and_evaluate(c, str(tmp_path))
  source = restore(workdir, tiny_config())
  new = restore(tmp_path, c)
  np.testing.assert_array_equal(new["params"]["block_0"]["mlp"]["fc1"]["kernel"],
                                source["params"]["block_0"]["mlp"]["fc1"]["kernel"])
  assert new["params"]["head"]["kernel"].shape == (192, 6)
  np.testing.assert_array_equal(new["params"]["head"]["kernel"], 0)


def test_init_from_rejects_another_architecture(uninterrupted, tmp_path):
  workdir, _, _ = uninterrupted
  c = tiny_config(init_from=str(workdir), model_name="vitc_4gf")
  with pytest.raises(ValueError, match="does not fit this model") as e:
    train.train_and_evaluate(c, str(tmp_path))
  assert "params/block_0/attn/qkv/kernel (192, 576) in the file, (384, 1152) here" in str(
      e.value)


def test_nan_stops_the_run_naming_the_step_and_checkpoint(tmp_path):
  c = tiny_config(total_steps=6, checkpoint_every_steps=2)
  train.train_and_evaluate(c, str(tmp_path))  # a good checkpoint at 2, 4, 6
  bad = tiny_config(total_steps=9, checkpoint_every_steps=2, lr=float("nan"))
  with pytest.raises(FloatingPointError, match=r"diverged at step 7 \(loss .*, parameter norm "
                                               r"nan\); the last good checkpoint is step 6"):
    train.train_and_evaluate(bad, str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps()[-1] == 6


def test_bad_batch_size_and_mesh_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    train.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))
  with pytest.raises(ValueError, match="do not split evenly over 8 devices"):
    train.train_and_evaluate(tiny_config(grad_accum_steps=4), str(tmp_path))
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    shd.make_mesh((("data", 3), ("data", -1)))
  # An axis the trainer does not implement is refused, not used as data parallelism.
  with pytest.raises(errors.UserError, match="axis 'model', which this trainer does not "
                                             "implement"):
    shd.make_mesh((("data", -1), ("model", 2)))


def test_durations_in_steps_or_epochs_never_both():
  c = tiny_config(total_steps=0, total_epochs=2.5, batch_size=16, eval_every_steps=0,
                  eval_every_epochs=0.5)
  run = train.durations(c, 160)  # 10 steps per epoch
  assert (run.steps_per_epoch, run.total_steps, run.eval_every) == (10, 25, 5)
  c.total_steps = 7  # both units: one clear error, not a silent precedence
  with pytest.raises(errors.UserError, match=r"total_steps=7 and config.total_epochs=2.5 "
                                             r"are both set"):
    train.durations(c, 160)
  with pytest.raises(errors.UserError, match="fewer than one batch of 16"):
    train.durations(tiny_config(), 15)


def test_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=1), "runs/rel")
  assert ckpt_lib.Checkpointer("runs/rel").all_steps() == [1]


def test_train_step_compiles_once(tmp_path, caplog):
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level("WARNING"):
      train.train_and_evaluate(tiny_config(total_steps=5, eval_every_steps=2,
                                           checkpoint_every_steps=2), str(tmp_path))
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r.getMessage() for r in caplog.records
              if "Finished XLA compilation of jit(train_step)" in r.getMessage()]
  assert len(compiles) == 1, compiles


def test_eta_of_a_multi_day_run_does_not_wrap():
  from convstem_jax import metrics  # pylint: disable=g-import-not-at-top
  assert metrics.format_duration(3 * 86400 + 2 * 3600 + 5) == "3d 02:00:05"
  assert metrics.format_duration(59) == "00:00:59"
  assert metrics.format_duration(float("inf")) == "?"
