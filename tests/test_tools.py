"""Command-line tools run and print what their users read."""

import json
import math
import re

import pytest

from convstem_jax.tools import bench_input
from convstem_jax.tools import stability


_OURS = r"^  ours: ([\d.]+) images/s on (\d+) cores, ([\d.]+) per core$"


def test_bench_input_times_the_train_and_eval_streams(capsys):
  bench_input.main(["--images", "4", "--seconds", "0.5", "--no_pil"])
  out = capsys.readouterr().out
  assert "4 JPEGs" in out.splitlines()[0]
  assert re.search(r"^train: .*random_erasing", out, re.M)
  assert re.search(r"^eval: decode\|resize_small", out, re.M)
  rates = re.findall(_OURS, out, re.M)
  assert len(rates) == 2, out
  for total, n, per_core in rates:
    assert float(total) > 0
    assert float(per_core) == pytest.approx(float(total) / int(n), abs=0.1)


def test_bench_input_compares_with_the_pil_reference(capsys):
  import importlib.util
  if importlib.util.find_spec("timm") is None:  # (importing timm whole needs torchvision)
    pytest.skip("timm is not installed: the PIL reference uses timm's RandAugment ops")
  bench_input.main(["--images", "4", "--seconds", "0.5"])
  out = capsys.readouterr().out
  ours = [float(m[2]) for m in re.findall(_OURS, out, re.M)]
  pil = [float(m) for m in re.findall(r"^  PIL reference .*: ([\d.]+) images/s per core$",
                                      out, re.M)]
  ratio = [float(m) for m in re.findall(r"^  ours / PIL per core: ([\d.]+)$", out, re.M)]
  assert len(ours) == len(pil) == len(ratio) == 2, out
  for o, p, r in zip(ours, pil, ratio):
    assert o > 0 and p > 0
    assert r == pytest.approx(o / p, abs=0.01, rel=0.01)


def test_bench_input_pil_reference_in_processes_at_once(capsys):
  """--pil_processes 2: two spawned PIL workers, timed windows aligned by a barrier."""
  import importlib.util
  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed: the PIL reference uses timm's RandAugment ops")
  bench_input.main(["--images", "4", "--seconds", "0.5", "--pil_processes", "2"])
  out = capsys.readouterr().out
  pil = re.findall(r"^  PIL reference \(2 processes at once, one image at a time\): "
                   r"([\d.]+) images/s per core$", out, re.M)
  assert len(pil) == 2 and all(float(p) > 0 for p in pil), out
  # A worker that fails (here on bytes PIL cannot open) is an error, not a hang.
  with pytest.raises(RuntimeError, match="PIL reference process exited with 1"):
    bench_input.pil_rates_together([b"not a jpeg"], 0.2, 2)
  with pytest.raises(SystemExit):
    bench_input.main(["--pil_processes", "0", "--no_pil"])
  assert "error: --pil_processes must be at least 1" in capsys.readouterr().err


def test_bench_input_counts_real_images_not_eval_padding():
  import numpy as np
  assert bench_input.real_images({"image": np.zeros((4, 2)),
                                  "mask": np.array([1, 1, 0, 0], np.float32)}) == 2
  assert bench_input.real_images({"image": np.zeros((4, 2))}) == 4


def test_pil_reference_crops_like_torchvision():
  import numpy as np
  rng = np.random.default_rng(0)
  fractions = []
  for _ in range(500):
    left, top, w, h = bench_input._crop_box(rng, 400, 300)
    assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
    fractions.append(w * h / (400 * 300))
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (w, h) == (300, 300)
  assert min(fractions) >= 0.08 * 0.9 and max(fractions) <= 1.0
  assert 0.4 < np.mean(fractions) < 0.65  # uniform area in [0.08, 1], less the misses
  assert bench_input._crop_box(rng, 1000, 10) == (495, 0, 10, 10)  # no fit: centre crop


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


def _configured_trial(sweep, name, model, opt, steps, accuracy):
  _trial(sweep, name, accuracy, key="test/accuracy")
  rows = (sweep / name / "metrics.jsonl").read_text().replace('"step": 10', f'"step": {steps}')
  (sweep / name / "metrics.jsonl").write_text(rows)
  (sweep / name / "config.json").write_text(json.dumps({"model_name": model,
                                                        "optimizer": opt}))


def test_stability_optimizer_gap_length_tables_and_edf_figure(tmp_path, capsys):
  from PIL import Image
  for model, opt, steps, accs in (("vitc", "adamw", 200, (0.80, 0.79, 0.70)),
                                  ("vitc", "sgd", 200, (0.78, 0.60)),
                                  ("vitp", "adamw", 200, (0.75,)),
                                  ("vitp", "sgd", 200, (0.65, float("nan"))),
                                  ("vitc", "adamw", 400, (0.82, 0.81))):
    for i, a in enumerate(accs):
      _configured_trial(tmp_path / f"{model}_{opt}_{steps}", str(i), model, opt, steps, a)
  run = tmp_path / "vitc_sgd_200" / "0"  # a single run's workdir is a sweep of one
  sweep = stability.read_sweep(str(run))
  assert sweep.errors == pytest.approx([22.0]) and (sweep.model, sweep.steps) == ("vitc", 200)
  paths = [str(p) for p in sorted(tmp_path.iterdir())]
  stability.main(paths + [f"--out={tmp_path / 'out'}"])
  text = capsys.readouterr().out
  assert "| vitc @ 200 steps | 20.00 | 22.00 | +2.00 |" in text
  assert "| vitp @ 200 steps | 25.00 | 35.00 | +10.00 |" in text
  assert "vitc @ 400 steps" not in text  # no SGD run at 400 steps
  assert "| error (gap) | 20.00 (+2.00) | 18.00 (+0.00) |" in text  # vitc adamw 200 vs 400
  saved = json.loads((tmp_path / "out" / "stability.json").read_text())
  vitp_sgd = next(s for s in saved["sweeps"] if s["label"] == "vitp_sgd_200")
  assert vitp_sgd["errors"] == [pytest.approx(35.0), None] and vitp_sgd["edf"]["4.0"] == 0.5
  assert saved["training_length"] == {"vitc adamw": {"200": pytest.approx(20.0),
                                                     "400": pytest.approx(18.0)}}
  with Image.open(tmp_path / "out" / "edf.png") as im:
    assert im.size[0] > 400 and im.size[1] > 250
  with pytest.raises(SystemExit, match="error: 1 labels for 5 paths"):
    stability.main(paths + ["--labels=a"])


def test_plot_draws_runs_and_sweeps_and_refuses_empty_dirs(tmp_path, capsys):
  from PIL import Image
  from convstem_jax.tools import plot
  for name, accs in (("run", (0.5, 0.7)), ("sweep/trial_000", (0.6,)), ("sweep/trial_001", (0.4,))):
    _trial(tmp_path, name, *accs, key="test/accuracy")
  assert plot.workdirs_of(str(tmp_path / "sweep")) == [str(tmp_path / "sweep" / "trial_000"),
                                                     str(tmp_path / "sweep" / "trial_001")]
  plot.main([str(tmp_path / "run"), str(tmp_path / "sweep"), f"--out={tmp_path / 'c.png'}"])
  assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")
  with Image.open(tmp_path / "c.png") as im:
    assert im.size[0] > 800
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit, match="error: .*empty has no metrics.jsonl"):
    plot.main([str(tmp_path / "empty"), f"--out={tmp_path / 'd.png'}"])


def test_bench_input_trainer_rate_runs_the_real_trainer():
  jpegs = bench_input.make_jpegs(80)  # 70 training images: one batch of 64
  assert bench_input.trainer_rate(jpegs, "inception_crop(224)|flip_lr|normalize", steps=4) > 0
