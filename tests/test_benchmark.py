"""tools/benchmark.py (CLI, MFU arithmetic, timm comparison) and the model's speed
switches (scan_blocks, remat): same outputs and gradients as the plain model."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convstem_jax.models import create_model
from convstem_jax.models import complexity
from convstem_jax.models.vit import stack_blocks, unstack_blocks
from convstem_jax.tools import benchmark
from stub_util import ensure_importable

TINY = dict(img_size=32, depth=2, width=64, num_heads=2, mlp_dim=128, num_classes=10)
TINY_FLAGS = ["--model", "vit_ti16", "--batch_size", "8", "--dtype", "float32",
              "--img_size", "32", "--num_classes", "10", "--warmup", "1", "--steps", "3",
              "--override", "depth=2,width=64,num_heads=2,mlp_dim=128"]


# ----------------------------------------------------------------- MFU arithmetic


def test_mfu_matches_the_complexity_report():
  macs = complexity.analytic(create_model("vit_b16"))[1]
  assert macs / 1e9 == pytest.approx(17.58, abs=0.005)
  assert benchmark.flops_per_image(macs) / 1e9 == pytest.approx(105.5, abs=0.05)
  assert benchmark.flops_per_image(macs, train=False) == pytest.approx(2 * macs)
  # 4,700 training images/s on one H100 (989 TFLOP/s bf16 dense) is about 50% MFU.
  peak = benchmark.device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")
  assert benchmark.mfu(macs, 4700, peak) == pytest.approx(0.501, abs=0.001)
  assert benchmark.mfu(macs, 4700, peak, train=False) == pytest.approx(0.501 / 3,
                                                                       abs=0.001)
  assert benchmark.mfu(macs, 4700, None) is None


def test_peak_table_lookup_by_device_kind():
  peak = benchmark.device_peak_tflops
  assert peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989
  assert peak("NVIDIA H100 80GB HBM3", "float32") == 67
  assert peak("NVIDIA H100 PCIe", "bfloat16") == 756
  assert peak("NVIDIA H200", "bfloat16") == 989
  assert peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312
  assert peak("TPU v4", "bfloat16") == 275
  assert peak("TPU v5 lite", "bfloat16") == 197
  assert peak("TPU v5p", "bfloat16") == 459
  assert peak("TPU v3", "bfloat16") == 61.5  # 123 per chip, two devices per chip
  assert peak("TPU v4", "float32") is None
  assert peak("cpu", "bfloat16") is None


# ------------------------------------------------------------------------ the CLI


def test_cli_prints_its_figures_on_cpu(capsys, tmp_path):
  record = benchmark.main(TINY_FLAGS + ["--eval", "--json", str(tmp_path / "b.json")])
  out = capsys.readouterr().out
  print(out)
  for line in ("jax train:", "jax eval:"):
    (row,) = [l for l in out.splitlines() if l.startswith(line)]
    for figure in ("images/s", "step", "compile", "peak memory n/a", "MFU n/a"):
      assert figure in row
  assert "8 x cpu" in out
  saved = json.loads((tmp_path / "b.json").read_text())
  assert saved["train"]["images_per_sec"] == pytest.approx(record["train"]["images_per_sec"])
  assert saved["train"]["images_per_sec"] > 0 and saved["eval"]["images_per_sec"] > 0
  assert np.isfinite(saved["train"]["extra"]["loss"])
  assert saved["train"]["mfu"] is None


def test_profile_names_where_the_step_time_goes(capsys):
  """--profile traces the train step and attributes its ops to the stem, the blocks
  (fwd and bwd, block indices folded) and the rest, from the ops' own names."""
  flags = [f.replace("vit_ti16", "vitc_1gf").replace(",width=64,num_heads=2,mlp_dim=128",
                                                    "") for f in TINY_FLAGS]
  record = benchmark.main(flags + ["--profile", "2"])
  out = capsys.readouterr().out
  profile = record["train"]["extra"]["profile"]
  assert all(ms >= 0 for ms in profile.values()) and sum(profile.values()) > 0
  for key in ("stem: fwd stem/conv_0/conv_general_dilated",
              "stem: bwd stem/conv_3/conv_general_dilated",
              "blocks: fwd block_*/mlp/fc1/dot_general",
              "blocks: bwd block_*/attn/qkv/dot_general"):
    assert profile.get(key, 0) > 0, (key, sorted(profile))
  assert not any("block_1" in k for k in profile)
  (head,) = [l for l in out.splitlines() if l.startswith("profile:")]
  assert "stem" in head and "blocks" in head


def test_op_labels():
  assert benchmark._op_label("jit(train_step)/transpose(jvp(ViT))/block_11/mlp/fc1/"
                             "dot_general") == ("blocks", "bwd block_*/mlp/fc1/dot_general")
  assert benchmark._op_label("jit(train_step)/jvp(ViT)/stem/norm_0/mul") == (
      "stem", "fwd stem/norm_0/mul")
  assert benchmark._op_label("jit(train_step)/add") == ("other", "step add")


def test_benchmark_imports_neither_tensorflow_nor_torch():
  # Benchmark hosts may have no TensorFlow; torch is loaded only for --compare-timm.
  code = ("import sys; from convstem_jax.tools import benchmark; "
          "from convstem_jax import train, evaluate, config; "
          "benchmark.parse_args(['--model', 'vit_b16']); "
          "bad = {'tensorflow', 'torch', 'timm'} & set(sys.modules); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_rejects_unknown_model():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--model", "vit_nope"])


# ------------------------------------------------------------------------- timm


@pytest.fixture
def timm_available():
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None:
    pytest.skip('needs PyTorch and timm: pip install -e ".[parity]"')
  ensure_importable("torchvision")


def test_timm_models_match_our_architectures(timm_available):
  for name, kw in (("vit_ti16", {}), ("vitc_1gf", dict(depth=2, img_size=64)),
                   ("vit_ti16_srelu", dict(depth=2, img_size=64))):
    ours = create_model(name, **kw)
    net, desc = benchmark.build_timm(ours)
    assert sum(p.numel() for p in net.parameters()) == complexity.analytic(ours)[0], desc
  assert benchmark.build_timm(create_model("vit_ti16"))[1] == "timm vit_tiny_patch16_224"


def test_compare_timm_on_cpu(capsys, timm_available):
  record = benchmark.main(TINY_FLAGS + ["--compare-timm", "--torch_compile", "off",
                                        "--scan_blocks", "--remat", "dots",
                                        "--mu_dtype", "bfloat16", "--peak_tflops", "0.5"])
  out = capsys.readouterr().out
  print(out)
  assert "timm train:" in out and "jax / timm train images/s:" in out
  assert record["timm"]["images_per_sec"] > 0 and record["timm"]["ratio"] > 0
  assert record["train"]["mfu"] > 0 and "MFU n/a" not in out  # --peak_tflops given


# ------------------------------------------------------- scan_blocks and remat


def _perturbed(variables):
  """Random values everywhere (the head is zero-initialised), so outputs depend on all."""
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda l: jnp.asarray(l + 0.05 * rng.standard_normal(l.shape), jnp.float32),
      variables)


def _init(model, x):
  return jax.jit(model.init)(jax.random.PRNGKey(0), x)


@pytest.fixture(scope="module")
def tiny():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  model = create_model("vit_ti16", **TINY)
  return model, _perturbed(_init(model, x)), x


def test_scan_blocks_gives_the_unrolled_outputs(tiny):
  model, variables, x = tiny
  scanned = create_model("vit_ti16", scan_blocks=True, **TINY)
  stacked = {"params": stack_blocks(variables["params"], model.depth)}
  assert stacked["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 64, 192)
  # The layouts line up: the scanned model's own init has the stacked shapes.
  shapes = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, stacked)
  want, want_out = jax.jit(model.apply)(variables, x)
  got, got_out = jax.jit(scanned.apply)(stacked, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_out["block_1"], want_out["block_1"], atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(want).max()) > 0.1  # not vacuous
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stacked["params"]),
               variables["params"])
  with pytest.raises(ValueError, match="block_1"):
    stack_blocks({"block_0": {}}, 2)


def test_scan_blocks_drop_path_and_dropout_train(tiny):
  _, variables, x = tiny
  model = create_model("vit_ti16", scan_blocks=True, drop_path=0.5, dropout=0.1, **TINY)
  stacked = {"params": stack_blocks(variables["params"], 2)}
  run = jax.jit(lambda v, r: model.apply(v, x, train=True, rngs={"dropout": r})[0])
  a, b = run(stacked, jax.random.PRNGKey(1)), run(stacked, jax.random.PRNGKey(2))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)


def test_remat_gives_the_same_gradients(tiny):
  model, variables, x = tiny
  params = variables["params"]

  def grads(m, p):
    loss = lambda p: jnp.sum(m.apply({"params": p}, x, train=True)[0] ** 2)
    return jax.jit(jax.grad(loss))(p)

  want = grads(model, params)
  for kw in (dict(remat="full"), dict(remat="dots_no_batch", scan_blocks=True)):
    m = create_model("vit_ti16", **kw, **TINY)
    p = stack_blocks(params, model.depth) if kw.get("scan_blocks") else params
    got = grads(m, p)
    if kw.get("scan_blocks"):
      got = unstack_blocks(got)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4),
                 got, want)


def test_speed_switches_are_validated():
  with pytest.raises(ValueError, match="remat 'some' is not one of"):
    create_model("vit_ti16", remat="some")
  with pytest.raises(ValueError, match="scan_blocks=False"):
    create_model("vit_ti16", scan_blocks=True, capture_attention=True)


def test_structured_attention_init_under_scan_blocks():
  # The impulse solution is shared by all blocks: each scanned layer's query / key
  # columns are exactly the unrolled model's.
  kw = dict(TINY, patch_size=4, pool="gap", posemb="sincos2d",
            attention_init="impulse3_closed")
  x = jnp.zeros((1, 32, 32, 3))
  init = lambda m: _init(m, x)["params"]
  unrolled = init(create_model("vit_ti16", **kw))
  scanned = unstack_blocks(init(create_model("vit_ti16", scan_blocks=True, **kw)))
  for i in range(2):
    qk = lambda p: p[f"block_{i}"]["attn"]["qkv"]["kernel"][:, :128]
    np.testing.assert_allclose(qk(scanned), qk(unrolled), atol=1e-6)
