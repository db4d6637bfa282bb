"""Command-line tools run and print what their users read."""

import json
import math
import re

import pytest

from convstem_jax.tools import bench_input
from convstem_jax.tools import stability


def test_bench_input_prints_per_core_rate_last(capsys):
  bench_input.main(["--images", "4", "--seconds", "0.5"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert re.fullmatch(r"\d+\.\d images/s per core", lines[-1]), lines
  assert float(lines[-1].split()[0]) > 0
  assert "4 JPEGs" in lines[0]


def test_generated_jpegs_have_imagenet_like_sizes():
  import tensorflow as tf
  for data in bench_input.make_jpegs(3):
    h, w, c = tf.io.decode_jpeg(data).shape
    assert 300 <= h <= 500 and 300 <= w <= 500 and c == 3


# ---- convstem_jax.tools.stability: Xiao et al.'s error distribution of a sweep ----


def _trial(sweep, name, *accuracies, key="validation_ema/accuracy"):
  d = sweep / name
  d.mkdir(parents=True)
  rows = [{"step": 10 * (i + 1), "train/loss": 1.0, key: a, "validation/accuracy": 0.01}
          for i, a in enumerate(accuracies)]
  (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_stability_edf_counts_runs_within_delta_of_the_best(tmp_path, capsys):
  sweep = tmp_path / "stab_vitc_18gf_sgd"
  _trial(sweep, "0", 0.50, 0.80)        # last eval counts: error 20
  _trial(sweep, "1", 0.79)              # 21
  _trial(sweep, "2", 0.77)              # 23
  _trial(sweep, "3", 0.70)              # 30
  _trial(sweep, "4", float("nan"))      # diverged: never within any delta
  (sweep / "5").mkdir()                 # never evaluated: likewise
  errors = stability.sweep_errors(sweep)
  assert errors[:4] == pytest.approx([20.0, 21.0, 23.0, 30.0])
  assert errors[4:] == [math.inf, math.inf]
  fractions = stability.edf(errors)
  assert fractions[1.0] == pytest.approx(2 / 6) and fractions[4.0] == pytest.approx(3 / 6)
  assert fractions[16.0] == pytest.approx(4 / 6)
  stability.main([str(sweep)])
  row = capsys.readouterr().out.strip().splitlines()[-1]
  assert row.startswith("| stab_vitc_18gf_sgd | 6 | 20.00 |") and "| 50% |" in row


def test_stability_metric_choice_and_missing_sweep(tmp_path):
  _trial(tmp_path / "s", "0", 0.9, key="test/accuracy")
  assert stability.final_metric(tmp_path / "s" / "0") == pytest.approx(0.9)  # no EMA
  assert stability.final_metric(tmp_path / "s" / "0", "validation/accuracy") == 0.01
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit, match="No trial directories under .*empty"):
    stability.main([str(tmp_path / "empty")])
