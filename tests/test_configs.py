"""Every experiment config builds, documents itself, and its runlocal form trains.

The runlocal check is the one a user runs: `python -m convstem_jax.main
--config=configs/X.py:runlocal --config.total_steps=2` must exit 0.
"""

import importlib.util
import json
import math

import pytest

from cli_util import REPO, run_cli
from convstem_jax.models import model_from_config

CONFIGS = sorted((REPO / "configs").glob("*.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_configs_for_every_paper():
  names = {p.stem for p in CONFIGS}
  assert {"vit_b_srelu", "early_conv", "elpv", "folder"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_documents_command_hardware_and_expected_result(path):
  doc = load(path).__doc__
  assert f"--config=configs/{path.stem}.py" in doc
  assert "runlocal" in doc
  assert "Expected" in doc or "expected" in doc


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_config_builds_a_model(path, arg):
  if path.stem == "folder" and arg is None:
    arg = "classes=10"  # the full form reads its class count from a data_dir
  if path.stem == "finetune" and arg is None:
    arg = "init=/weights.npz,model=vit_b16"  # the full form needs its weights
  c = load(path).get_config(arg)
  model = model_from_config(c)
  assert model.num_classes == c.num_classes
  assert c.total_steps > 0 or c.total_epochs > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_runlocal_trains_two_steps(path, tmp_path):
  r = run_cli(f"--config=configs/{path.stem}.py:runlocal", "--config.total_steps=2",
              f"--workdir={tmp_path}", num_devices=2)
  assert r.returncode == 0, r
  assert (tmp_path / "metrics.jsonl").exists(), r


# ---- configs/early_conv.py: the conv-stem paper's tables as data ----

early_conv = load(REPO / "configs" / "early_conv.py")


@pytest.mark.parametrize("model,opt,lr,wd", [
    ("vitp_1gf", "adamw", 2e-3, 0.20), ("vitc_1gf", "adamw", 2.5e-3, 0.19),
    ("vitc_4gf", "adamw", 1e-3, 0.24), ("vitp_18gf", "sgd", 1.1, 1.2e-5),
    ("vitc_4gf", "sgd", 1.3, 2.2e-5), ("vitc_18gf", "sgd", 1.1, 2.7e-5),
    ("vitc_4gf_s3", "sgd", 1.3, 2.2e-5),    # S1-S4 take C-4GF's values
    ("vitp_36gf", "adamw", 6e-4, 0.28),     # the text's 36GF values
])
def test_early_conv_uses_table4(model, opt, lr, wd):
  c = early_conv.get_config(f"model={model},opt={opt}")
  assert (c.lr, c.weight_decay, c.lr_batch_base, c.batch_size) == (lr, wd, 2048, 2048)
  assert c.optimizer == opt


def test_early_conv_model_and_ablations():
  # The schedule and EMA as the trainer runs them: tests/test_recipes.py.
  c = early_conv.get_config("model=vitc_18gf,epochs=400")
  assert c.model_name == "vitc_18gf" and c.model.init_style == "pycls"
  assert c.total_epochs == 400
  assert early_conv.get_config("model=vitc_4gf_s1").total_epochs == 50  # Table 3
  assert early_conv.get_config("opt=sgd").optimizer_kw.nesterov
  ln = model_from_config(early_conv.get_config("model=vitc_4gf_ln"))
  assert ln.stem_norm == "layer"


def test_stability_sweep_is_64_log_uniform_pairs_inside_the_paper_intervals():
  for opt, (lr_lo, lr_hi), (wd_lo, wd_hi) in [("adamw", (2.5e-4, 8e-3), (0.02, 0.8)),
                                             ("sgd", (0.1, 3.2), (4e-6, 1.2e-4))]:
    sweep = early_conv.get_sweep(f"opt={opt}")
    assert len(sweep) == 64 and sweep == early_conv.get_sweep(f"opt={opt}")
    lrs = [t["lr"] for t in sweep]
    assert all(lr_lo <= t["lr"] <= lr_hi and wd_lo <= t["weight_decay"] <= wd_hi
               for t in sweep)
    # Log-uniform: about half the draws below the geometric midpoint.
    assert 20 <= sum(lr < math.sqrt(lr_lo * lr_hi) for lr in lrs) <= 44
    c = early_conv.get_config(f"model=vitp_18gf,opt={opt},trial=17")
    assert (c.lr, c.weight_decay) == (sweep[17]["lr"], sweep[17]["weight_decay"])
    assert c.total_epochs == 50


@pytest.mark.parametrize("arg,word", [("model=vit_x", "vit_x"), ("opt=adam", "adam"),
                                      ("trial=64", "trial=64"),
                                      ("opt=sgd,hp=recipe", "hp=recipe")])
def test_early_conv_bad_arguments_say_what_is_valid(arg, word):
  with pytest.raises(ValueError, match=word):
    early_conv.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_speed_knobs_exist_on_every_config(path):
  c = load(path).get_config({"folder": "classes=10",
                              "finetune": "init=/w.npz,model=vit_b16"}.get(path.stem))
  for key in ("dtype", "attention_impl", "remat", "scan_blocks"):
    assert key in c.model, f"{path.stem}: --config.model.{key}= would be rejected"
  assert "mu_dtype" in c


def test_speed_knobs_from_the_command_line(tmp_path):
  r = run_cli("--config=configs/vit_b_srelu.py:runlocal", "--config.total_steps=2",
              "--config.model.remat=full", "--config.model.scan_blocks=True",
              "--config.mu_dtype=bfloat16", f"--workdir={tmp_path}", num_devices=2)
  assert r.returncode == 0, r
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["remat"] == "full" and saved["mu_dtype"] == "bfloat16", saved
