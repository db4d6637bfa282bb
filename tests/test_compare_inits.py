"""configs/structured_init.py and the init-comparison driver (tools/compare_inits.py)."""

import json
import re
import subprocess
import sys

import pytest

from cli_util import REPO, child_env
from convstem_jax.tools import compare_inits

ROW = re.compile(r"\| (\S+) \| ([\d.]+) \| ([\d.]+) ± ([\d.]+) \| ([\d.]+) / ([\d.]+) \| "
                 r"(\d+) s \|")


def run_driver(*args):
  """The driver as a user runs it, in a child with one CPU device (in this pytest
  process, with 8 fake devices, a train step on 2 busy cores has hung)."""
  cmd = [sys.executable, "-m", "convstem_jax.tools.compare_inits", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=child_env(1), capture_output=True, text=True,
                        timeout=240, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def test_driver_trains_each_init_and_prints_a_table(tmp_path):
  printed = run_driver("--dataset=elpv", "--inits=default,impulse3_closed", "--seeds=0",
                       "--config_args=runlocal", "--steps=2", f"--workdir={tmp_path}")
  out = (tmp_path / "table.md").read_text().strip()
  assert printed.rstrip().endswith(out)
  lines = out.splitlines()
  assert lines[0].startswith("| init | seed 0 | mean ± half range |"), lines[0]
  rows = [ROW.fullmatch(line) for line in lines[2:]]
  assert all(rows) and [r.group(1) for r in rows] == ["default", "impulse3_closed"], lines
  for r in rows:
    acc, mean, half, block0, score = (float(r.group(i)) for i in (2, 3, 4, 5, 6))
    assert 0 <= acc <= 100 and mean == acc and half == 0
    assert 0 <= block0 <= 1 and 0 <= score <= 1
  # The closed-form impulse init still looks like impulses after 2 steps; default not.
  assert float(rows[1].group(5)) > 0.5 > float(rows[0].group(5))
  rec = json.loads((tmp_path / "default_s0" / "compare_inits.json").read_text())
  assert rec["step"] == 2
  # A rerun skips finished runs and reads their numbers back.
  again = run_driver("--dataset=elpv", "--inits=default", "--seeds=0",
                     "--config_args=runlocal", "--steps=2", "--noscore",
                     f"--workdir={tmp_path}")
  row = [line for line in again.splitlines() if line.startswith("| default |")][-1]
  assert row.startswith(f"| default | {rows[0].group(2)} |"), row
  assert row.endswith(f"| {rows[0].group(7)} s |"), row  # the first run's training time


def test_table_mean_and_half_range():
  results = [{"init": "a", "seed": 0, "accuracy": 0.70, "wall_s": 10, "score": (1, 0.5)},
             {"init": "a", "seed": 1, "accuracy": 0.74, "wall_s": 20, "score": (0.8, 0.7)}]
  out = compare_inits.table(results, ["a", "b"], [0, 1], score=True)
  assert "| a | 70.0 | 74.0 | 72.0 ± 2.0 | 0.90 / 0.60 | 15 s |" in out
  assert "| b | - | - | - | - | - |" in out


def test_config_arguments():
  module = compare_inits.load_config_module(compare_inits.DEFAULT_CONFIG)
  c = module.get_config("dataset=svhn,init=impulse5,seed=3")
  assert (c.dataset, c.num_classes, c.seed) == ("svhn_cropped", 10, 3)
  assert c.model.attention_init == "impulse5" and c.model.depth == 12
  assert c.batch_size == 512 and c.total_epochs == 200 and c.optimizer_kw.eps == 1e-3
  assert "randaug(2, 9, 0.5)" in c.pp_train and "inception_crop" not in c.pp_train
  cpu = module.get_config("dataset=elpv,cpu")
  assert (cpu.model.depth, cpu.batch_size, cpu.total_steps) == (2, 32, 300)
  assert cpu.schedule.warmup_steps == 15
  for arg, word in (("init=xavier", "impulse3_closed"), ("dataset=mnist", "cifar100")):
    with pytest.raises(ValueError, match=word):
      module.get_config(arg)
