"""tools/diagnose on real runs: JSON values in range, figures that open, --compare."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convstem_jax import metrics as metrics_lib
from convstem_jax import train
from convstem_jax.diagnostics import report
from convstem_jax.models import model_from_config

from test_train import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("diag")
  out = {}
  for stem, model in (("conv", "vitc_1gf"), ("patchify", "vitp_1gf")):
    config = tiny_config(model_name=model, total_steps=3, checkpoint_every_steps=3,
                         image_size=64)
    train.train_and_evaluate(config, str(root / stem))
    out[stem] = (root / stem, config)
  return root, out


def test_diagnose_and_compare_write_json_in_range_and_figures(runs):
  root, out = runs
  conv = out["conv"][0]
  proc = subprocess.run([sys.executable, "-m", "convstem_jax.tools.diagnose",
                         f"--workdir={conv}", "--images=20", "--compare", str(conv),
                         str(out["patchify"][0]), f"--out={root / 'cmp'}",
                         "--labels=conv stem,patchify", "--heads=2,0", "--query=0,3"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  result = json.loads((conv / "diagnostics" / "3" / "diagnostics.json").read_text())
  depth, g = 1, 4
  assert result["images"] == 20 and result["grid"] == g and result["layers"] == [
      "stem", "block_0"]
  assert all(0 <= v <= 1 for v in result["token_similarity"] + result["rank_collapse_ratio"])
  far = 16 * np.hypot(g - 1, g - 1)
  assert all(0 <= d <= far for d in result["mean_attention_distance_px"][0])
  assert all(0 <= e <= np.log(g * g) + 1e-9 for e in result["attention_entropy"][0])
  assert len(result["class_token_mass"]) == depth
  for png in ["token_similarity", "rank_collapse_ratio", "mean_attention_distance_px",
              "attention_entropy", "attention_maps_0", "attention_maps_1", "curves"]:
    with Image.open(conv / "diagnostics" / "3" / f"{png}.png") as im:
      assert im.size[0] > 300 and im.size[1] > 100
  for png in ["token_similarity", "attention_entropy", "curves"]:
    with Image.open(root / "cmp" / f"{png}.png") as im:
      assert im.size[0] > 300
  assert json.loads((root / "cmp" / "patchify" / "diagnostics.json").read_text())[
      "model"] == "vitp_1gf"
  bad = subprocess.run([sys.executable, "-m", "convstem_jax.tools.diagnose",
                        f"--workdir={conv}", "--images=2", "--query=4,0",
                        f"--out={root / 'bad'}"], capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: query (4, 0) is outside the 4x4 patch grid"), bad.stderr


def test_measures_are_batch_weighted_means(runs):
  _, out = runs
  workdir, config = out["conv"]
  model = model_from_config(config)
  from convstem_jax.weights import load
  variables = load.load_variables(str(workdir), model)
  images = np.random.default_rng(0).normal(size=(5, 64, 64, 3)).astype(np.float32)
  result = report.analyse(model, variables, images, batch=2)  # uneven last batch
  assert result["images"] == 5
  # A batch-weighted mean: the same as measuring all five images at once.
  whole = report.analyse(model, variables, images, batch=5)
  np.testing.assert_allclose(result["token_similarity"], whole["token_similarity"],
                             rtol=1e-6)


def _tb_summaries(workdir):
  """{(tag, step)} of every TensorBoard summary in a run's event files."""
  from convstem_jax.data.files import import_tf
  tf = import_tf()
  from tensorboard.compat.proto import event_pb2
  out = set()
  for path in workdir.glob("events.out.tfevents*"):
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = event_pb2.Event.FromString(raw)
      out |= {(v.tag, event.step) for v in event.summary.value}
  return out


def test_diagnostics_during_training(tmp_path):
  """At eval steps: scalars in range in metrics.jsonl and TensorBoard, attention maps as
  TensorBoard images and PNG, the same JSON tools/diagnose writes for that checkpoint
  (a scanned model, so the layout conversion is exercised), and the training itself
  unchanged."""
  kw = dict(total_steps=4, eval_every_steps=2, checkpoint_every_steps=2, image_size=64,
            model=dict(depth=2, scan_blocks=True))
  train.train_and_evaluate(tiny_config(**kw), str(tmp_path / "plain"))
  train.train_and_evaluate(tiny_config(diagnostics_images=8, **kw), str(tmp_path / "diag"))
  rows = {r["step"]: r for r in metrics_lib.read_records(tmp_path / "diag")}
  plain = {r["step"]: r for r in metrics_lib.read_records(tmp_path / "plain")}
  assert [rows[s]["train/loss"] for s in range(1, 5)] == [
      plain[s]["train/loss"] for s in range(1, 5)]
  layers = ["stem", "block_0", "block_1"]
  for step in (2, 4):
    for layer in layers:
      assert 0 <= rows[step][f"diagnostics/token_similarity/{layer}"] <= 1
      assert 0 <= rows[step][f"diagnostics/rank_collapse_ratio/{layer}"] <= 1
    for layer in layers[1:]:
      assert 0 <= rows[step][f"diagnostics/attention_entropy/{layer}"] <= np.log(16) + 1e-6
      assert 0 < rows[step][f"diagnostics/mean_attention_distance_px/{layer}"] <= 16 * np.hypot(3, 3)
      assert 0 <= rows[step][f"diagnostics/class_token_mass/{layer}"] <= 1
    with Image.open(tmp_path / "diag" / "diagnostics" / str(step) / "attention_maps.png") as im:
      assert im.size[0] > 200
  assert not any(k.startswith("diagnostics/") for r in plain.values() for k in r)
  assert {1, 3}.isdisjoint(s for s, r in rows.items() if "diagnostics/token_similarity/stem" in r)
  tb = _tb_summaries(tmp_path / "diag")
  assert {("diagnostics/attention_maps", 2), ("diagnostics/attention_maps", 4),
          ("diagnostics/token_similarity/block_1", 4)} <= tb
  during = json.loads((tmp_path / "diag" / "diagnostics" / "4" / "diagnostics.json").read_text())
  subprocess.run([sys.executable, "-m", "convstem_jax.tools.diagnose",
                  f"--workdir={tmp_path / 'diag'}", "--images=8", f"--out={tmp_path / 'after'}"],
                 check=True, capture_output=True, timeout=600)
  after = json.loads((tmp_path / "after" / "diagnostics.json").read_text())
  for measure in ("token_similarity", "mean_attention_distance_px", "attention_entropy"):
    np.testing.assert_allclose(during[measure], after[measure], rtol=1e-5, atol=1e-6)
