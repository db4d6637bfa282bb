"""tools/sweep: Xiao's (lr, wd) draws for any config, run resumably or printed; and
tools/stability reading the sweep (unfinished trials count as failures)."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from cli_util import REPO, child_env
from convstem_jax import main as main_lib
from convstem_jax.tools import stability, sweep

ELPV = f"{REPO}/configs/elpv.py:runlocal"


def test_search_spaces_are_table4_or_the_same_ratios_around_the_configs_values():
  early = f"{REPO}/configs/early_conv.py:model=vitc_4gf,opt=sgd"
  assert sweep.search_space(early, main_lib.config_from_args(early)) == {
      "lr": (0.1, 3.2), "weight_decay": (4e-6, 1.2e-4)}
  config = main_lib.config_from_args(ELPV, ["--config.lr=0.002"])
  assert sweep.search_space(ELPV, config) == {"lr": (0.002 / 8, 0.008),
                                              "weight_decay": (0.05 / 8, 0.2)}
  pairs = sweep.draw(sweep.search_space(ELPV, config), 200, seed=0)
  assert pairs == sweep.draw(sweep.search_space(ELPV, config), 200, seed=0)
  assert all(0.00025 <= p["lr"] <= 0.008 for p in pairs)
  below = sum(p["lr"] < math.sqrt(0.00025 * 0.008) for p in pairs)  # log-uniform
  assert 70 <= below <= 130


def test_print_commands_gives_one_runnable_command_per_trial(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "convstem_jax.tools.sweep", f"--config={ELPV}",
                         "--trials=3", f"--workdir={tmp_path}", "--print_commands",
                         "--config.total_steps=7"], capture_output=True, text=True,
                        cwd=REPO, env=child_env(1), timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3 and len({l.split("--workdir=")[1] for l in lines}) == 3
  assert all("--config.total_steps=7" in l and "--config.lr=" in l and
             "--config.weight_decay=" in l for l in lines)
  assert not (tmp_path / "trial_000").exists()  # printed, not run


def test_a_sweep_runs_resumes_and_reads_back(tmp_path):
  args = [sys.executable, "-m", "convstem_jax.tools.sweep", f"--config={ELPV}", "--trials=2",
          f"--workdir={tmp_path}", "--config.total_steps=3", "--config.eval_every_steps=3"]
  run = lambda: subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                               env=child_env(1), timeout=600)
  proc = run()
  assert proc.returncode == 0, proc.stderr
  record = json.loads((tmp_path / "sweep.json").read_text())
  assert [t["status"] for t in record["trials"]] == ["finished", "finished"]
  errors = stability.sweep_errors(tmp_path)
  assert len(errors) == 2 and all(math.isfinite(e) for e in errors)
  # An interrupted trial (status not finished) is resumed by a rerun; finished ones are
  # skipped, so their records stay as they were.
  first = (tmp_path / "trial_000" / "metrics.jsonl").read_text()
  record["trials"][1]["status"] = "pending"
  (tmp_path / "sweep.json").write_text(json.dumps(record))
  assert math.isinf(stability.sweep_errors(tmp_path)[1])  # unfinished counts as failed
  proc = run()
  assert proc.returncode == 0, proc.stderr
  assert "trial 0/2" not in proc.stdout and "trial 1/2" in proc.stdout
  assert (tmp_path / "trial_000" / "metrics.jsonl").read_text() == first
  assert all(math.isfinite(e) for e in stability.sweep_errors(tmp_path))
  moved = tmp_path.parent / f"{tmp_path.name}_moved"  # e.g. copied off the machine
  shutil.copytree(tmp_path, moved)
  assert stability.sweep_errors(moved) == stability.sweep_errors(tmp_path)
  shutil.rmtree(tmp_path / "trial_001")
  assert math.isinf(stability.sweep_errors(tmp_path)[1])  # no workdir, no result
  assert math.isfinite(stability.sweep_errors(moved)[1])
  # Other settings in the same directory are refused.
  bad = subprocess.run(args[:-1] + ["--config.eval_every_steps=1"], capture_output=True,
                       text=True, cwd=REPO, env=child_env(1), timeout=120)
  assert bad.returncode == 1 and bad.stderr.strip().startswith("error:")
