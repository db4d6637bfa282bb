"""Weights in and out (convstem_jax/weights, tools/export): round trips, strict imports,
resampling, init_from and eval of imported weights. The PyTorch side (timm loading our
export, pycls names) is in test_weights_torch.py."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convstem_jax import checkpoint as ckpt_lib
from convstem_jax import errors
from convstem_jax import evaluate as eval_lib
from convstem_jax import train
from convstem_jax.models import ViT, create_model, model_from_config
from convstem_jax.weights import big_vision, core, files, load, resample, timm
from convstem_jax.tools import export as export_tool

from cli_util import run_cli
from test_train import restore, tiny_config

MODELS = {  # every stem family, both poolings, both position encodings
    "conv": lambda: create_model("vitc_1gf", depth=2, img_size=32, num_classes=5),
    "patchify": lambda: create_model("vit_ti16", depth=2, img_size=32, num_classes=5),
    "srelu": lambda: create_model("vit_ti16_srelu", depth=2, img_size=32, num_classes=5),
    "srelu_ln": lambda: create_model("vit_ti16", stem="srelu_ln", depth=1, img_size=32),
    "gap_sincos": lambda: ViT(img_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                              mlp_dim=64, num_classes=3, pool="gap", posemb="sincos2d"),
    "ablation_s2": lambda: create_model("vitc_4gf_s2", depth=1, img_size=32),
}


def random_variables(model, seed=0):
  """Every variable random (no zeros or ones to agree by accident), BN var positive."""
  shapes = core.expected_shapes(model)
  rng = np.random.default_rng(seed)
  flat = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
  for n in flat:
    if n.endswith("/var"):
      flat[n] = np.abs(flat[n]) + 0.5
  return flat


def assert_bitwise(a: dict, b: dict):
  assert set(a) == set(b), set(a) ^ set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_npz_round_trip_is_bitwise(name, tmp_path):
  model = MODELS[name]()
  flat = random_variables(model)
  path = tmp_path / "w.npz"
  np.savez(path, **big_vision.to_npz(flat, model))
  assert_bitwise(load.import_weights(str(path), model), flat)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_round_trip_is_bitwise(name, tmp_path):
  from safetensors.numpy import save
  model = MODELS[name]()
  flat = random_variables(model)
  state, code = timm.to_timm(flat, model)
  assert "create_model" in code
  path = tmp_path / "w.safetensors"
  path.write_bytes(save(state))  # keys come back sorted: order must not matter
  assert_bitwise(load.import_weights(str(path), model), flat)


def test_npz_uses_big_vision_names_and_folds_the_class_position():
  model = MODELS["patchify"]()
  flat = random_variables(model)
  npz = big_vision.to_npz(flat, model)
  d, h = model.width, model.num_heads
  blk = "params/Transformer/encoderblock_1/"
  assert npz[blk + "MultiHeadDotProductAttention_0/query/kernel"].shape == (d, h, d // h)
  assert npz[blk + "MultiHeadDotProductAttention_0/out/kernel"].shape == (h, d // h, d)
  assert npz[blk + "MlpBlock_0/Dense_1/kernel"].shape == (model.mlp_dim, d)
  np.testing.assert_array_equal(npz[blk + "MultiHeadDotProductAttention_0/value/bias"],
                                flat["params/block_1/attn/qkv/bias"][2 * d:].reshape(h, -1))
  pe = flat["params/pos_embedding"]
  np.testing.assert_array_equal(npz["params/pos_embedding"], pe[:, 1:])
  np.testing.assert_array_equal(npz["params/cls"], flat["params/cls"] + pe[:, :1])
  # A big_vision file (no exact-round-trip extras) imports with a zero class position:
  # the same function, since the class token then carries its position.
  plain = {k: v for k, v in npz.items() if not k.startswith("convstem/")}
  got = load.match(big_vision.from_npz(plain, model), model)
  np.testing.assert_array_equal(got["params/pos_embedding"][:, 0], 0)
  np.testing.assert_array_equal(got["params/cls"], npz["params/cls"])


def test_vit_jax_and_scanned_npz_import():
  model = MODELS["patchify"]()
  flat = random_variables(model)
  npz = big_vision.to_npz(flat, model)
  # vit_jax names: another submodule numbering, the class row inside the embedding.
  vit_jax = {}
  for k, v in npz.items():
    if k.startswith("convstem/") or k == "params/pos_embedding":
      continue
    k = k.removeprefix("params/").replace("MultiHeadDotProductAttention_0",
                                         "MultiHeadDotProductAttention_1")
    k = k.replace("MlpBlock_0", "MlpBlock_3").replace("LayerNorm_1", "LayerNorm_2")
    vit_jax[k] = v
  vit_jax["cls"] = flat["params/cls"]
  vit_jax["Transformer/posembed_input/pos_embedding"] = flat["params/pos_embedding"]
  assert_bitwise(load.match(big_vision.from_npz(vit_jax, model), model), flat)
  # big_vision's scanned layout: one encoderblock stacked over depth.
  scanned = {k: v for k, v in npz.items() if "encoderblock_" not in k}
  for leaf in {k.split("/", 3)[3] for k in npz if "encoderblock_" in k}:
    scanned["params/Transformer/encoderblock/" + leaf] = np.stack(
        [npz[f"params/Transformer/encoderblock_{i}/{leaf}"] for i in range(model.depth)])
  assert_bitwise(load.match(big_vision.from_npz(scanned, model), model), flat)


def test_scanned_and_unrolled_layouts_convert_both_ways(tmp_path):
  unrolled = MODELS["conv"]()
  scanned = unrolled.clone(scan_blocks=True)
  flat = random_variables(unrolled)
  path = tmp_path / "w.npz"
  np.savez(path, **big_vision.to_npz(flat, unrolled))
  got = load.import_weights(str(path), scanned)
  assert got["params/blocks/mlp/fc1/kernel"].shape[0] == 2
  np.testing.assert_array_equal(got["params/blocks/mlp/fc1/kernel"][1],
                                flat["params/block_1/mlp/fc1/kernel"])
  back = load.match(load.convert(files.Source("ours", got, "w"), unrolled), unrolled)
  assert_bitwise(back, flat)


def test_strict_import_names_every_missing_unexpected_and_reshaped_key(tmp_path):
  model = MODELS["conv"]()
  flat = random_variables(model)
  deeper = create_model("vitc_1gf", depth=3, img_size=32, num_classes=5)
  path = tmp_path / "w.npz"
  np.savez(path, **big_vision.to_npz(flat, model))
  with pytest.raises(errors.UserError) as e:
    load.import_weights(str(path), deeper)
  missing = [n for n in core.expected_shapes(deeper) if n.startswith("params/block_2/")]
  assert len(missing) == 12 and all(n in str(e.value) for n in missing)
  # Patterns name what may start fresh; then the same file loads.
  got = load.import_weights(str(path), deeper, fresh=[r"params/block_2/.*"])
  assert not any(n.startswith("params/block_2/") for n in got)
  # A shallower model: the file's extra block is named, as the file names it.
  shallower = create_model("vitc_1gf", depth=1, img_size=32, num_classes=5)
  with pytest.raises(errors.UserError, match="Transformer/encoderblock_1/LayerNorm_0/scale"):
    load.import_weights(str(path), shallower)
  # Another head count: npz files record it (timm and our files cannot).
  with pytest.raises(errors.UserError, match="the file has 3 attention heads, the model 4"):
    load.import_weights(str(path), model.clone(num_heads=4))
  # Another width: each reshaped variable with both shapes.
  narrow = ViT(img_size=32, patch_size=16, width=96, depth=2, num_heads=3, mlp_dim=576,
               stem="patchify", num_classes=5)
  np.savez(path, **big_vision.to_npz(random_variables(MODELS["patchify"]()),
                                     MODELS["patchify"]()))
  with pytest.raises(errors.UserError,
                     match=r"params/block_1/mlp/fc2/kernel \(params/Transformer/encoderblock_1"
                           r"/MlpBlock_0/Dense_1/kernel\) \(768, 192\) in the file, "
                           r"\(576, 96\) here"):
    load.import_weights(str(path), narrow)


def test_a_head_of_another_class_count_starts_fresh(tmp_path):
  model = MODELS["conv"]()
  flat = random_variables(model)
  path = tmp_path / "w.npz"
  np.savez(path, **big_vision.to_npz(flat, model))
  got = load.import_weights(str(path), model.clone(num_classes=7))
  assert "params/head/kernel" not in got and "params/head/bias" not in got
  assert_bitwise({k: v for k, v in flat.items() if not k.startswith("params/head/")}, got)


def test_resampling_keeps_constants_and_ramps():
  d = 3
  const = np.full((1, 1 + 16, d), 0.7, np.float32)
  out = resample.resample_posemb(const, 1 + 36, prefix=1)
  np.testing.assert_allclose(out, 0.7, rtol=0, atol=1e-6)
  # A ramp along x over patch centres (i + 0.5) / g stays that ramp wherever the new
  # centres lie between the old outermost ones, and holds its end values beyond.
  g, n = 4, 7
  x = (np.arange(g) + 0.5) / g
  ramp = np.broadcast_to(x[None, :, None], (g, g, d)).reshape(1, g * g, d)
  cls = np.full((1, 1, d), -5.0, np.float32)
  out = resample.resample_posemb(np.concatenate([cls, ramp], 1), 1 + n * n, prefix=1)
  np.testing.assert_array_equal(out[:, :1], cls)  # the class row is kept apart
  want_x = np.clip((np.arange(n) + 0.5) / n, x[0], x[-1])
  got = out[0, 1:].reshape(n, n, d)
  np.testing.assert_allclose(got, np.broadcast_to(want_x[None, :, None], (n, n, d)),
                             atol=1e-6)
  with pytest.raises(errors.UserError, match="square"):
    resample.resample_posemb(np.zeros((1, 1 + 15, d)), 1 + 36, prefix=1)


def test_fine_tuning_at_another_resolution_resamples_and_trains(tmp_path):
  source, config = tmp_path / "src", tiny_config(total_steps=3, checkpoint_every_steps=3)
  train.train_and_evaluate(config, str(source))
  big = tiny_config(image_size=64, init_from=str(source), total_steps=2,
                    checkpoint_every_steps=2, num_classes=6)
  train.train_and_evaluate(big, str(tmp_path / "ft"))
  before, after = restore(source, config), restore(tmp_path / "ft", big)
  assert after["params"]["pos_embedding"].shape == (1, 1 + 16, 192)
  assert before["params"]["pos_embedding"].shape == (1, 1 + 4, 192)
  # the body arrived (then moved by 2 steps), the grid was resampled, not started fresh
  np.testing.assert_allclose(after["params"]["block_0"]["mlp"]["fc1"]["kernel"],
                             before["params"]["block_0"]["mlp"]["fc1"]["kernel"], atol=0.02)
  want = resample.resample_posemb(np.asarray(before["params"]["pos_embedding"]), 17, 1)
  np.testing.assert_allclose(after["params"]["pos_embedding"], want, atol=0.02)
  odd = tiny_config(image_size=40, init_from=str(source))
  with pytest.raises(errors.UserError, match="not divisible by the stem's total stride 16"):
    train.train_and_evaluate(odd, str(tmp_path / "odd"))


def test_init_from_ema_switch_takes_the_sources_ema(tmp_path):
  source = tmp_path / "src"
  config = tiny_config(total_steps=3, checkpoint_every_steps=3, ema_decay=0.5)
  train.train_and_evaluate(config, str(source))
  model = model_from_config(config)
  raw = load.import_weights(str(source), model)
  ema = load.import_weights(str(source), model, ema=True)
  ckpt, step = ckpt_lib.resolve(str(source))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 32, 32, 3))))
  saved = ckpt.restore_model(step, {"params": shapes["params"], "ema": {
      "params": shapes["params"], "batch_stats": shapes["batch_stats"]}})
  np.testing.assert_array_equal(raw["params/head/kernel"], saved["params"]["head"]["kernel"])
  np.testing.assert_array_equal(ema["params/head/kernel"],
                                saved["ema"]["params"]["head"]["kernel"])
  assert not np.array_equal(raw["params/head/kernel"], ema["params/head/kernel"])
  npz = tmp_path / "x.npz"
  np.savez(npz, **big_vision.to_npz(raw, model))
  with pytest.raises(errors.UserError, match="no EMA"):
    files.read(str(npz), ema=True)


def test_export_cli_and_eval_of_imported_weights(tmp_path):
  """A run exported by the CLI (a real process) imports back bit for bit; --mode=eval
  with init_from scores the imported weights exactly as the run's own checkpoint."""
  run = tmp_path / "run"
  config = tiny_config(total_steps=3, checkpoint_every_steps=3)
  train.train_and_evaluate(config, str(run))
  outs = {}
  for fmt, name in (("npz", "w.npz"), ("timm", "w.safetensors")):
    proc = subprocess.run([sys.executable, "-m", "convstem_jax.tools.export",
                           f"--workdir={run}", f"--format={fmt}", f"--out={tmp_path / name}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outs[fmt] = tmp_path / name
  assert "strict=True" in proc.stdout and "ConvStem(" in proc.stdout
  model_flat = files.read(str(run)).tensors
  assert files.model_of(str(run))[0] == "vitc_1gf"
  for path in outs.values():  # the files say which model they hold
    assert files.model_of(str(path)) == files.model_of(str(run))
  # ... so a fine-tune at another resolution starts from a file without naming it.
  r = run_cli(f"--config=configs/finetune.py:init={outs['timm']},runlocal,size=64",
              "--config.total_steps=2", f"--workdir={tmp_path / 'ft'}", num_devices=2)
  assert r.returncode == 0, r
  assert "Resampling the position embedding from (1, 5, 192) to (1, 17, 192)" in r.stderr
  for path in outs.values():
    got = load.import_weights(str(path), model_from_config(config))
    assert_bitwise(got, model_flat)
  own = eval_lib.evaluate_checkpoint(config, str(run))
  imported = eval_lib.evaluate_checkpoint(tiny_config(init_from=str(outs["npz"])),
                                          str(tmp_path / "eval"))
  assert imported["test/accuracy"] == own["test/accuracy"]
  np.testing.assert_allclose(imported["test/loss"], own["test/loss"], rtol=1e-6)
  assert json.loads((tmp_path / "eval" / "eval_init_from.json").read_text())["init_from"]
  with pytest.raises(errors.UserError, match="class count differs"):
    eval_lib.evaluate_checkpoint(tiny_config(init_from=str(outs["npz"]), num_classes=9),
                                 str(tmp_path / "eval9"))
  proc = subprocess.run([sys.executable, "-m", "convstem_jax.tools.export",
                         f"--workdir={tmp_path}", "--format=npz", f"--out={tmp_path}/x.npz"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stderr.strip().startswith("error:")
  assert "Traceback" not in proc.stderr and "config.json" in proc.stderr


def test_unknown_files_are_refused_in_one_sentence(tmp_path):
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(errors.UserError, match=r"\.npz, \.safetensors"):
    files.read(str(tmp_path / "w.h5"))
  with pytest.raises(errors.MissingInputError):
    files.read(str(tmp_path / "none.npz"))
