"""Long runs survive preemption and crashes exactly, in real `main` processes.

One ELPV run (the bundled file source) with everything that draws random numbers or
depends on the step on: dropout, attention dropout, drop-path, mixup/CutMix, repeated
augmentation, gradient accumulation, EMA, the per-epoch schedule and an epoch boundary
(61 steps per epoch, 70 steps), evals every 20 steps. An uninterrupted run is the reference; runs that are
signalled (SIGTERM / SIGUSR1, plain and with a one-process distributed runtime) or
SIGKILLed at random moments and restarted on their workdir must end with the same
parameters, optimizer state, BatchNorm statistics and EMA weights, bit for bit, and
with records (metrics.jsonl, TensorBoard) that hold each step exactly once.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_util import REPO, child_env, command, free_port, read_metrics

NUM_DEVICES = 2
TOTAL_STEPS = 70
EVAL_EVERY = 20
ELPV = [
    "--config=configs/elpv.py:runlocal", "--config.batch_size=32",
    f"--config.total_steps={TOTAL_STEPS}", "--config.schedule.per_epoch=True",
    "--config.schedule.warmup_epochs=0.5", "--config.schedule.warmup_init=0.1",
    f"--config.eval_every_steps={EVAL_EVERY}",
    "--config.checkpoint_every_steps=5", "--config.log_every_steps=1",
    "--config.repeated_aug=2", "--config.mixup_alpha=0.8", "--config.cutmix_alpha=1.0",
    "--config.model.dropout=0.1", "--config.model.attention_dropout=0.1",
    "--config.model.drop_path=0.1", "--config.ema_decay=0.9",
    "--config.grad_accum_steps=2"]
PREEMPTED = 75
TIMEOUT_S = 240
STOPPED = re.compile(r"stopped at step (\d+); checkpoint (\d+) is committed")


class Child:
  """`python -m convstem_jax.main` in the background, its stderr in a file to poll."""

  def __init__(self, workdir: pathlib.Path, *extra: str, base: tuple[str, ...] = tuple(ELPV)):
    self.log = workdir.parent / f"{workdir.name}.{time.time_ns()}.log"
    self.file = open(self.log, "w")
    self.t0 = time.perf_counter()
    self.proc = subprocess.Popen(command(*base, f"--workdir={workdir}", *extra), cwd=REPO,
                                 env=child_env(NUM_DEVICES), stdout=self.file,
                                 stderr=subprocess.STDOUT)

  def text(self) -> str:
    return self.log.read_text()

  def wait_for(self, pattern: str, timeout: float = TIMEOUT_S) -> re.Match | None:
    """The first match of `pattern` in the output; None if the process ended first."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
      m = re.search(pattern, self.text())
      if m:
        return m
      if self.proc.poll() is not None:
        return re.search(pattern, self.text())
      time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} after {timeout}s:\n{self.text()[-3000:]}")

  def send(self, sig: int) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)

  def finish(self) -> int:
    try:
      rc = self.proc.wait(timeout=TIMEOUT_S)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
      self.file.close()
    return rc

  def __str__(self) -> str:
    return f"$ {' '.join(self.proc.args)}\n{self.text()[-6000:]}"


def run_to_end(workdir, *extra, base: tuple[str, ...] = tuple(ELPV)) -> Child:
  child = Child(workdir, *extra, base=base)
  assert child.finish() == 0, str(child)
  return child


def distributed_flags() -> list[str]:
  return [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=1",
          "--process_id=0"]


def saved(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  """Every array of checkpoint `step` (model and train state) by path, on the host."""
  out = {}
  for item in ("model", "train"):
    path = workdir / "checkpoints" / str(step) / item
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    arrays = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    for key, value in jax.tree_util.tree_leaves_with_path(arrays):
      out[item + jax.tree_util.keystr(key)] = np.asarray(value)
  return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for groups in ("params", "opt_state", "batch_stats", "ema"):
    assert any(groups in k for k in a), f"no {groups} in the checkpoint"
  differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
            or a[k].tobytes() != b[k].tobytes()]
  assert not differ, f"{len(differ)} of {len(a)} arrays differ, e.g. {differ[:5]}"


def tensorboard_steps(workdir: pathlib.Path, tag: str = "train/loss") -> list[int]:
  """The steps of every `tag` scalar in all the workdir's event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps = []
  for path in sorted(workdir.glob("**/events.out.tfevents.*")):
    for raw in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(raw.numpy())
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def assert_records_hold_every_step_once(workdir, reference) -> None:
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
  ref = {r["step"]: r for r in read_metrics(reference)}
  # A resumed run redoes the steps after its checkpoint exactly: the same losses.
  assert [r["train/loss"] for r in rows] == [ref[s]["train/loss"] for s in ref]
  assert tensorboard_steps(workdir) == list(range(1, TOTAL_STEPS + 1))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, shared by this module's children: a restart
  loads the step instead of compiling it (10 s -> 3 s here), as users are advised to do
  for preemptible runs (README). The executables are the same, so is every bit."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resilience") / "uninterrupted"
  run_to_end(workdir)
  return workdir


def test_uninterrupted_records_hold_every_step_once(reference):
  assert tensorboard_steps(reference) == list(range(1, TOTAL_STEPS + 1))
  rows = read_metrics(reference)
  assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
  assert "test/accuracy" in rows[EVAL_EVERY - 1] and "test/accuracy" in rows[-1]
  assert rows[-1]["test/count"] == 654  # every ELPV test image once


def test_sigkill_at_random_moments_then_restart_is_bitwise_equal(reference, tmp_path):
  """SIGKILL during startup or compilation, during training, during a save; each time
  the same command is rerun on the workdir, until it finishes."""
  seed = int(time.time())
  rng = random.Random(seed)
  workdir = tmp_path / "killed"
  moments = [("after start", None, rng.uniform(0.5, 12.0)),
             ("during training", r"step (\d+)/", rng.uniform(0.0, 2.0)),
             ("during a save", r"Checkpoint (\d+) started", rng.uniform(0.0, 0.05))]
  rng.shuffle(moments)
  history = []
  for name, pattern, delay in moments:
    child = Child(workdir)
    if pattern:
      child.wait_for(pattern)
    time.sleep(delay if pattern else max(0.0, delay - (time.perf_counter() - child.t0)))
    child.send(signal.SIGKILL)
    history.append(f"{name} (+{delay:.2f}s): exit {child.finish()}")
  final = run_to_end(workdir)
  why = f"seed {seed}: {history}\n{final}"
  assert_bitwise_equal(saved(workdir, TOTAL_STEPS), saved(reference, TOTAL_STEPS)), why
  assert_records_hold_every_step_once(workdir, reference)


STAGES = [  # (signal, when, distributed runtime)
    (signal.SIGTERM, "compilation", False),
    (signal.SIGTERM, "training", True),
    (signal.SIGTERM, "eval", False),
    (signal.SIGTERM, "save", False),
    (signal.SIGTERM, "compilation", True),
    (signal.SIGTERM, "training", False),
    (signal.SIGUSR1, "save", True),   # SLURM's --signal, with the runtime up
    (signal.SIGTERM, "save", True),
]
WHEN = {"compilation": r"Parameters|Resumed from checkpoint",
        "training": r"step (\d+)/\d+  loss .* img/s", "save": r"Checkpoint (\d+) started"}


def test_preemption_saves_the_step_reached_and_resumes_bitwise(reference, tmp_path):
  """Each stage signals a rerun of the same command at one moment; each must save the
  step it reached, commit it, and exit 75; the last rerun finishes."""
  workdir = tmp_path / "preempted"
  last = 0
  for sig, when, distributed in STAGES:
    child = Child(workdir, *(distributed_flags() if distributed else []))
    eval_step = (last // EVAL_EVERY + 1) * EVAL_EVERY
    # The step line of an eval step is logged just before its eval starts.
    child.wait_for(rf"step {eval_step}/" if when == "eval" else WHEN[when])
    seen = child.text()
    child.send(sig)
    rc = child.finish()
    where = f"{signal.Signals(sig).name} during {when}, distributed={distributed}\n{child}"
    assert rc == PREEMPTED, where
    if when == "compilation":
      assert "First step" not in seen, where  # the signal did come before the first step
    if when == "eval":  # the eval finished, then the next step was saved
      assert f"step {eval_step} eval:" not in seen, where
      assert f"step {eval_step} eval:" in child.text(), where
    stopped = STOPPED.search(child.text())
    assert stopped and stopped[1] == stopped[2], where
    step = int(stopped[1])
    assert last < step < TOTAL_STEPS, where
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()
               if p.name.isdigit()) == step, where
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists() or \
        (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists(), where
    assert "Traceback" not in child.text(), where
    last = step
  run_to_end(workdir)
  assert_bitwise_equal(saved(workdir, TOTAL_STEPS), saved(reference, TOTAL_STEPS))
  assert_records_hold_every_step_once(workdir, reference)


def test_damaged_newest_checkpoint_is_skipped_and_tmp_dirs_never_count(reference,
                                                                         tmp_path):
  workdir = tmp_path / "damaged"
  shutil.copytree(reference, workdir)
  # Bit rot in the newest checkpoint: its array files cut short.
  for f in (workdir / "checkpoints" / str(TOTAL_STEPS) / "train").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  # A save interrupted by a crash leaves a temporary directory behind.
  tmp = workdir / "checkpoints" / f"{TOTAL_STEPS + 5}.orbax-checkpoint-tmp-1764000000"
  (tmp / "model").mkdir(parents=True)
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())

  child = run_to_end(workdir)
  out = child.text()
  assert re.search(rf"checkpoints/{TOTAL_STEPS} is damaged", out), child
  assert "different model" not in out, child
  assert f"Resumed from checkpoint {workdir / 'checkpoints'}/65 " in out, child
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert f"{TOTAL_STEPS}.damaged" in names, names  # kept for inspection, not deleted
  assert not any("tmp" in n for n in names), (before, names)
  assert_bitwise_equal(saved(workdir, TOTAL_STEPS), saved(reference, TOTAL_STEPS))
  assert_records_hold_every_step_once(workdir, reference)


def test_a_tfds_run_preempted_mid_epoch_resumes_bitwise(tmp_path):
  """The same for a tfds source (a real dataset in 4 TFRecord shards): the stream after
  the restart continues the uninterrupted one, mid-epoch, with repeated augmentation."""
  import tfds_util  # pylint: disable=g-import-not-at-top
  data_dir = tfds_util.prepare(tmp_path / "tfds")
  base = ("--config=configs/elpv.py:runlocal", "--config.dataset=tfds:identity_images",
          f"--config.data_dir={data_dir}", "--config.num_classes=10",
          "--config.batch_size=8", "--config.total_steps=24",  # 20 examples: 2.5 steps/epoch
          "--config.checkpoint_every_steps=4", "--config.log_every_steps=1",
          "--config.repeated_aug=2", "--config.eval_every_steps=0",
          "--config.model.dropout=0.1", "--config.ema_decay=0.9")
  reference = tmp_path / "uninterrupted"
  run_to_end(reference, base=base)
  workdir = tmp_path / "preempted"
  child = Child(workdir, base=base)
  child.wait_for(r"step (9|1\d)/24 ")  # past the first checkpoints, mid-epoch
  child.send(signal.SIGTERM)
  assert child.finish() == PREEMPTED, str(child)
  stopped = int(STOPPED.search(child.text())[1])
  assert 9 <= stopped < 24 and stopped % 4, str(child)  # not a periodic checkpoint step
  run_to_end(workdir, base=base)
  assert_bitwise_equal(saved(workdir, 24), saved(reference, 24))


LATE_FINALIZE = """
import os, signal, sys, time
from convstem_jax import preemption
preemption.install()
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], num_processes=1, process_id=0)
from jax._src import distributed
from convstem_jax import checkpoint
watcher = preemption.Watcher(0)
assert not any(watcher.reached(step) for step in range(1, 11))
ckpt = checkpoint.Checkpointer(sys.argv[2])
ckpt.save(5, {k: np.zeros(3) for k in checkpoint.MODEL_KEYS + ("opt_state",)})
ckpt.wait()  # an earlier step's save finalizing in the background, the loop at step 10
os.kill(os.getpid(), signal.SIGUSR1)
client, deadline = distributed.global_state.client, time.monotonic() + 60
while not client.key_value_dir_get("PREEMPTION_CURRENT_COUNTER/"):  # protocol started
  assert time.monotonic() < deadline, "the preemption service never got the notice"
  time.sleep(0.05)
print("agreed on step 11:", watcher.reached(11))  # waits for the protocol to finish
ckpt.close()
"""


def test_a_save_finalizing_late_does_not_lose_the_preemption_signal(tmp_path):
  """orbax's finalize thread must not move the preemption service's step counter back
  to the saved step: the notice would be agreed on a step the loop has passed (the run
  trained to the end and exited 0, seen under a loaded full suite)."""
  out = subprocess.run(
      [sys.executable, "-c", LATE_FINALIZE, f"127.0.0.1:{free_port()}",
       str(tmp_path / "checkpoints")], cwd=REPO, env=child_env(1), capture_output=True,
      text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0 and "agreed on step 11: True" in out.stdout, \
      out.stdout + out.stderr[-3000:]


def test_a_signal_between_log_steps_is_honoured_within_a_few_steps(tmp_path):
  """Between log steps the host queues steps ahead of the device. A signal must not wait
  for the whole queue (up to the next log step: minutes for slow steps, longer than a
  preemption's grace period): the saved step is at most a few steps past the last one the
  device had finished when the signal came, estimated from the run's own step rate.
  Known limit: the host only gets ahead when its input outpaces the device. With another
  training job sharing the 2 cores, the code without the bound passed this test too
  (stopped 9, 7.9 steps done); on the idle VM the same run without the bound had not
  stopped 150 s after the signal."""
  # The scaled-ReLU stem at 64 px: seconds per step on a CPU, so steps are dispatched
  # asynchronously (smaller steps ran in lockstep with the host and never showed this).
  base = ("--config=configs/elpv.py:stem=srelu", "--config.total_steps=1000",
          "--config.log_every_steps=1000", "--config.eval_every_steps=0",
          "--config.checkpoint_every_steps=0")
  workdir = tmp_path / "run"
  child = Child(workdir, base=base)
  child.wait_for(r"First step")
  t_first = time.perf_counter()
  time.sleep(8.0)  # the host queues steps while the device works through them
  t_signal = time.perf_counter()
  child.send(signal.SIGTERM)
  assert child.finish() == PREEMPTED, str(child)
  stopped = int(STOPPED.search(child.text())[1])
  rate = read_metrics(workdir)[-1]["train/steps_per_sec"]
  done = 1 + rate * (t_signal - t_first)  # steps the device had finished at the signal
  assert stopped <= done * 1.2 + 5, f"{stopped} vs {done:.1f} done\n{child}"
