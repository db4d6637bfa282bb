"""tools/diagnose on real runs: JSON values in range, figures that open, --compare."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

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
                         "--labels=conv stem,patchify"],
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
              "attention_entropy", "attention_maps", "curves"]:
    with Image.open(conv / "diagnostics" / "3" / f"{png}.png") as im:
      assert im.size[0] > 300 and im.size[1] > 100
  for png in ["token_similarity", "attention_entropy", "curves"]:
    with Image.open(root / "cmp" / f"{png}.png") as im:
      assert im.size[0] > 300
  assert json.loads((root / "cmp" / "patchify" / "diagnostics.json").read_text())[
      "model"] == "vitp_1gf"


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
