"""The command line end to end, in child processes on fake CPU devices.

One workdir goes through the whole life of a run, in order: train 4 steps on 8 devices,
resume to step 8 on 4 devices, evaluate the latest and an older checkpoint. Then two
processes train together over a local coordinator, and bad arguments fail clearly.

Each runlocal child takes ~15-35 s on a 2-core CPU machine; the file about 2 minutes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import pytest

from cli_util import FIRST_STEP_LINE, RESUMED_LINE, RUNLOCAL, free_port, read_metrics
from cli_util import run_cli, run_cli_processes

TRAIN_KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec")
EVAL_KEYS = ("test/accuracy", "test/loss", "test/top5")


def snapshot(workdir: pathlib.Path) -> dict:
  """What a run left behind, read before the next run on the workdir changes it."""
  events = sorted(workdir.glob("events.out.tfevents*"))
  return {
      "files": sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")),
      "events": {p.name: p.read_bytes() for p in events},
      "config": (json.loads((workdir / "config.json").read_text())
                 if (workdir / "config.json").exists() else None),
      "metrics": (read_metrics(workdir) if (workdir / "metrics.jsonl").exists()
                  else None),
  }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("cli") / "run"  # main.py creates it


@pytest.fixture(scope="module")
def first_run(workdir):
  """8 devices, the documented smoke command with total_steps=4."""
  result = run_cli(RUNLOCAL, f"--workdir={workdir}", "--config.total_steps=4",
                   num_devices=8)
  return result, snapshot(workdir) if workdir.exists() else None


@pytest.fixture(scope="module")
def resumed_run(workdir, first_run):
  """The same command on 4 devices with total_steps=8: resumes from step 4."""
  assert first_run[0].returncode == 0, f"the first run failed:\n{first_run[0]}"
  result = run_cli(RUNLOCAL, f"--workdir={workdir}", "--config.total_steps=8",
                   num_devices=4)
  return result, snapshot(workdir)


def assert_metric_line(line: dict, *, with_eval: bool) -> None:
  assert isinstance(line["step"], int), line
  for k in TRAIN_KEYS + (EVAL_KEYS if with_eval else ()):
    assert k in line, f"{k} missing from metrics line {line}"
    assert math.isfinite(line[k]), f"{k} not finite in {line}"
  assert line["train/images_per_sec"] > 0, line
  assert line["train/grad_norm"] > 0, line
  if with_eval:
    assert 0 <= line["test/accuracy"] <= line["test/top5"] <= 1, line
    assert line["test/loss"] > 0, line


# ------------------------------------------------------------------- train, resume


def test_train_writes_tensorboard_metrics_config_and_checkpoint(workdir, first_run):
  result, snap = first_run
  assert result.returncode == 0, str(result)
  assert "8 local / 8 global devices" in result.stderr, str(result)

  assert snap["events"], f"no events.out.tfevents* in {workdir}: {snap['files']}"
  for name, data in snap["events"].items():
    assert b"train/loss" in data and b"test/accuracy" in data, (
        f"{name} ({len(data)} bytes) lacks train/loss or test/accuracy summaries")

  config = snap["config"]
  assert config is not None, f"no config.json in {workdir}: {snap['files']}"
  assert config["total_steps"] == 4 and config["dataset"] == "synthetic", config

  metrics = snap["metrics"]
  assert metrics, f"metrics.jsonl missing or empty: {snap['files']}"
  for line in metrics:
    assert_metric_line(line, with_eval="test/accuracy" in line)
  assert [m["step"] for m in metrics] == sorted({m["step"] for m in metrics}), metrics
  last = metrics[-1]
  assert last["step"] == 4, metrics
  assert_metric_line(last, with_eval=True)  # the last step always evaluates

  # The final evaluation is also printed, one `key: value` per line.
  printed = result.printed()
  for k in EVAL_KEYS:
    assert printed[k] == pytest.approx(last[k], abs=1e-4), (k, printed, last)

  assert "checkpoints/4/model" in snap["files"], snap["files"]
  assert "checkpoints/4/train" in snap["files"], snap["files"]
  leftovers = [f for f in snap["files"] if "tmp" in f.lower()]
  assert not leftovers, f"unfinished checkpoint files: {leftovers}"


def test_resume_on_four_devices_continues_to_step_8(workdir, first_run, resumed_run):
  result, snap = resumed_run
  assert result.returncode == 0, str(result)
  assert "4 local / 4 global devices" in result.stderr, str(result)
  assert "Resumed from checkpoint" in result.stderr, str(result)
  resumed = RESUMED_LINE.search(result.stderr)
  assert resumed, f"cannot parse the 'Resumed from checkpoint' line:\n{result}"
  assert resumed[1].endswith("checkpoints") and int(resumed[2]) == 4, resumed[0]
  assert int(resumed[4]) == 4, resumed[0]

  assert "checkpoints/8/model" in snap["files"], snap["files"]
  assert "checkpoints/4/model" in snap["files"], "max_to_keep=3 keeps step 4"
  metrics = snap["metrics"]
  assert [m["step"] for m in metrics] == [4, 8], metrics  # appended, not rewritten
  assert metrics[0] == first_run[1]["metrics"][-1]
  assert_metric_line(metrics[-1], with_eval=True)
  # 4 more steps of cosine decay from step 4's learning rate.
  assert metrics[-1]["train/lr"] < metrics[0]["train/lr"], metrics
  # config.json stays the run's start; the resumed run's change is recorded beside it.
  assert snap["config"]["total_steps"] == 4, snap["config"]
  changed = json.loads((workdir / "config.4.json").read_text())
  assert changed["total_steps"] == 8, changed
  assert re.search(r"differs from config\.json.*total_steps: 4 -> 8", result.stderr), str(result)


# ------------------------------------------------------------------------- eval


def test_eval_latest_prints_accuracy_equal_to_the_training_eval(workdir, resumed_run):
  result = run_cli(RUNLOCAL, f"--workdir={workdir}", "--mode=eval", num_devices=8)
  assert result.returncode == 0, str(result)
  lines = [l for l in result.stdout.splitlines() if l.startswith("test/accuracy: ")]
  assert len(lines) == 1, str(result)
  accuracy = float(lines[0].split(": ")[1])
  assert 0 <= accuracy <= 1

  # Checkpoint 8 (saved on 4 devices, read on 8) scores what the training run measured.
  at_8 = resumed_run[1]["metrics"][-1]
  printed = result.printed()
  assert printed["test/accuracy"] == pytest.approx(at_8["test/accuracy"], abs=0.015)
  assert printed["test/loss"] == pytest.approx(at_8["test/loss"], rel=1e-3)
  saved = json.loads((workdir / "eval_8.json").read_text())
  assert saved["step"] == 8 and saved["test/count"] == 100, saved


def test_eval_of_step_4_writes_eval_4_json(workdir, first_run, resumed_run):
  result = run_cli(RUNLOCAL, f"--workdir={workdir}", "--mode=eval", "--checkpoint=4",
                   num_devices=8)
  assert result.returncode == 0, str(result)
  assert "test/accuracy: " in result.stdout, str(result)
  path = workdir / "eval_4.json"
  assert path.exists(), f"--checkpoint=4 wrote no {path}:\n{result}"
  saved = json.loads(path.read_text())
  assert saved["step"] == 4, saved
  # The same weights the first run evaluated at its last step.
  at_4 = first_run[1]["metrics"][-1]
  assert saved["test/accuracy"] == pytest.approx(at_4["test/accuracy"], abs=0.015)
  assert saved["test/loss"] == pytest.approx(at_4["test/loss"], rel=1e-3)


def test_eval_of_a_missing_step_names_the_available_steps(workdir, resumed_run):
  result = run_cli(RUNLOCAL, f"--workdir={workdir}", "--mode=eval", "--checkpoint=99",
                   num_devices=8)
  assert result.returncode != 0, str(result)
  assert "No checkpoint for step 99" in result.stderr, str(result)
  assert "available steps: [4, 8]" in result.stderr, str(result)
  assert not (workdir / "eval_99.json").exists()


@pytest.mark.parametrize("change,word", [
    ("--config=configs/vit_b_srelu.py:runlocal,variant=s", "as (768,) where this config has (384,)"),
    ("--config.model.depth=3", "it has no 'params/block_2"),
])
def test_resuming_with_another_model_is_one_clear_error(workdir, resumed_run, change, word):
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  args = [change] if change.startswith("--config=") else [RUNLOCAL, change]
  result = run_cli(*args, f"--workdir={workdir}", "--config.total_steps=12",
                   num_devices=4)
  assert result.returncode != 0, str(result)
  assert "was written by a different model" in result.stderr, str(result)
  assert word in result.stderr and "config.json" in result.stderr, str(result)
  assert "Traceback" not in result.stderr, str(result)  # no orbax reader threads dying
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


# ----------------------------------------------------------------- two processes


def test_two_processes_train_together_and_agree(tmp_path):
  workdir = tmp_path / "mp"
  port = free_port()
  common = [RUNLOCAL, f"--workdir={workdir}", "--config.total_steps=3",
            "--config.log_every_steps=1", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2"]
  results = run_cli_processes([common + [f"--process_id={i}"] for i in range(2)],
                              tmp_path, num_devices=2)
  for i, result in enumerate(results):
    assert result.returncode == 0, f"process {i} failed:\n{result}"
    assert f"Process {i}/2, 2 local / 4 global devices" in result.stderr, str(result)
  assert (workdir / "checkpoints" / "3" / "model").is_dir(), sorted(
      str(p) for p in workdir.rglob("*"))

  losses = [r.step_losses() for r in results]
  for i, l in enumerate(losses):
    assert sorted(l) == [1, 2, 3], f"process {i} logged steps {sorted(l)}:\n{results[i]}"
    assert all(math.isfinite(v) for v in l.values()), l
  assert losses[0][3] == losses[1][3], f"final losses differ: {losses}"
  assert losses[0] == losses[1], losses
  assert results[0].printed() == results[1].printed(), [r.printed() for r in results]

  metrics = read_metrics(workdir)  # written by process 0 only
  assert [m["step"] for m in metrics] == [1, 2, 3], metrics
  assert metrics[-1]["test/count"] == 100, "each eval example counts exactly once"


# ---------------------------------------------------------------- errors


def _error_line(text: str) -> str:
  return ([l for l in text.splitlines() if l.startswith("error: ")] or [""])[-1]


def test_unknown_model_is_one_clear_error(tmp_path):
  workdir = tmp_path / "w"
  result = run_cli(RUNLOCAL, f"--workdir={workdir}", "--config.model_name=vit_huge",
                   num_devices=1, timeout=120)
  assert result.returncode != 0, str(result)
  assert "Traceback" not in result.stderr, str(result)
  line = _error_line(result.stderr)
  assert "Unknown model 'vit_huge'; valid names: " in line, str(result)
  names = line.split("valid names: ")[1].rstrip(".").split(", ")
  assert {"vit_ti16", "vit_s16", "vit_b16"} <= set(names), names
  assert not workdir.exists(), "a bad model must fail before anything is written"


def test_unknown_config_argument_is_a_clear_error(tmp_path):
  workdir = tmp_path / "w"
  result = run_cli("--config=configs/vit_b_srelu.py:runlocal,bogus",
                   f"--workdir={workdir}", num_devices=1, timeout=120)
  assert result.returncode != 0, str(result)
  assert ("Unknown config argument 'bogus'; valid: variant, stem, epochs, runlocal."
          in result.stderr), str(result)
  assert not workdir.exists(), "a bad config must fail before anything is written"


def test_partial_multiprocess_flags_are_a_usage_error(tmp_path):
  result = run_cli(RUNLOCAL, f"--workdir={tmp_path / 'w'}", "--num_processes=2",
                   num_devices=1, timeout=120)
  assert result.returncode != 0, str(result)
  assert ("Multi-process runs need all of --coordinator_address, --num_processes and "
          "--process_id.") in result.stderr, str(result)


def test_logs_report_compile_and_step_times(first_run, resumed_run):
  """Not a speed test: the timing lines the README points users to are there."""
  for result, _ in (first_run, resumed_run):
    assert FIRST_STEP_LINE.search(result.stderr), str(result)
    assert result.step_losses(), str(result)


def test_out_of_memory_becomes_one_sentence_with_the_fixes():
  from convstem_jax import main  # pylint: disable=g-import-not-at-top
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                     "19.2GiB.\nBufferAssignment ...")
  message = main.user_error(oom)
  assert "allocate 19.2GiB" in message and "BufferAssignment" not in message
  for fix in ("--config.batch_size", "--config.grad_accum_steps", "--config.model.remat",
              "--config.fsdp", "resumes"):
    assert fix in message
  from convstem_jax import errors  # pylint: disable=g-import-not-at-top
  assert main.user_error(errors.UserError("Unknown model 'x'.")) == "Unknown model 'x'."
  # Faults that are not the user's keep their traceback, a ValueError from JAX included.
  assert main.user_error(RuntimeError("an internal bug")) is None
  assert main.user_error(ValueError("Incompatible shapes for broadcasting")) is None


def test_a_cpu_host_trains_on_one_device_per_core(tmp_path):
  """No device count given: main.py makes one JAX CPU device per core this process may
  use, as many as the runlocal batch of 16 splits over."""
  cores = len(os.sched_getaffinity(0))
  expected = max(d for d in range(1, cores + 1) if 16 % d == 0)
  result = run_cli(RUNLOCAL, f"--workdir={tmp_path / 'run'}", "--config.total_steps=2",
                   num_devices=None)
  assert result.returncode == 0, str(result)
  assert f"0/1, {expected} local / {expected} global devices (cpu)" in result.stderr, \
      str(result)


@pytest.mark.parametrize("requested, batches, cores, expected", [
    (0, [64, 64], 2, 2),     # one per core
    (0, [64, 64], 3, 2),     # lowered until the batch splits
    (0, [12, 8], 8, 4),      # the eval batch counts too
    (0, [7, 7], 4, 1),       # a prime batch: one device
    (3, [16, 16], 64, 2),    # an explicit count is lowered the same way
    (1, [64, 64], 16, 1),    # cpu_devices=1: the single device of before
])
def test_cpu_device_count(requested, batches, cores, expected):
  from convstem_jax import sharding  # pylint: disable=g-import-not-at-top
  assert sharding.cpu_device_count(requested, batches, cores) == expected
