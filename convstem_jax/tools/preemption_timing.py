r"""How long a preemption takes on your machine and storage: SIGTERM -> committed
checkpoint -> exit, and restart -> first step.

    python -m convstem_jax.tools.preemption_timing --workdir=/local/disk/or/gs/path \
        [--signal_after_steps=3] [--signal=SIGTERM] -- \
        --config=configs/vit_b_srelu.py:runlocal --config.model_name=vit_b16 ...

Runs `python -m convstem_jax.main` with the given flags (and `--workdir`) in a child,
sends the signal once the step after `--signal_after_steps` is logged, and prints the
seconds from the signal to the child's exit (the agreed step finished, its checkpoint
saved and committed, the writers closed), which must fit the preemption grace period
(30 s on spot Cloud TPU / GCE VMs; SLURM: the `--signal=USR1@N` lead time). It then
reruns the same command to measure restart -> first step (imports, restore, compilation;
a persistent JAX compilation cache shortens it) and stops that one too. The workdir is
left as the runs left it; use a fresh one. Default model for a quick look: ViT-B/16 with
its AdamW state on synthetic 32 px images (the checkpoint is as large as at 224 px).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

from convstem_jax import preemption

DEFAULT_FLAGS = ["--config=configs/vit_b_srelu.py:runlocal,variant=b,stem=patchify",
                 "--config.model.depth=12", "--config.model.dtype=float32",
                 "--config.batch_size=8", "--config.total_steps=1000",
                 "--config.log_every_steps=1", "--config.checkpoint_every_steps=0"]
STEP = re.compile(r"step (\d+)/\d+  loss")


def run_until_signalled(flags, workdir, after_steps, sig, log_path):
  """(seconds start -> first step, seconds signal -> exit, exit code, log text)."""
  with open(log_path, "w") as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "convstem_jax.main", *flags,
                             f"--workdir={workdir}"], stdout=log, stderr=subprocess.STDOUT)
    first = None
    steps = 0
    while proc.poll() is None:
      text = open(log_path).read()
      found = [int(s) for s in STEP.findall(text)]
      if found and first is None:
        first = time.perf_counter() - t0
      if len(found) > after_steps:
        break
      time.sleep(0.01)
    if proc.poll() is not None:
      raise SystemExit(f"error: the run ended (exit {proc.returncode}) before its step "
                       f"{after_steps + 1}; see {log_path}.")
    t_signal = time.perf_counter()
    proc.send_signal(sig)
    rc = proc.wait()
    return first, time.perf_counter() - t_signal, rc, open(log_path).read()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--signal_after_steps", type=int, default=3)
  parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGUSR1"])
  parser.add_argument("flags", nargs="*", help="main's flags (after --)")
  args = parser.parse_args(argv)
  flags = args.flags or DEFAULT_FLAGS
  sig = getattr(signal, args.signal)
  os.makedirs(args.workdir, exist_ok=True) if "://" not in args.workdir else None
  for attempt in ("first run", "restart"):
    log_path = f"{args.workdir.rstrip('/')}.{attempt.replace(' ', '_')}.log" \
        if "://" not in args.workdir else f"/tmp/preemption_timing.{attempt}.log"
    first, to_exit, rc, text = run_until_signalled(flags, args.workdir,
                                                   args.signal_after_steps, sig, log_path)
    stopped = re.search(r"stopped at step (\d+)", text)
    saved = re.search(r"Checkpoint (\d+) started in ([\d.]+)s", text)
    print(f"{attempt}: start -> first step {first:.1f}s; {args.signal} -> exit "
          f"{to_exit:.1f}s (exit {rc}, "
          f"{'stopped at step ' + stopped[1] if stopped else 'no stop line'}"
          f"{', save started in ' + saved[2] + 's' if saved else ''}); log {log_path}")
    if rc != preemption.PREEMPTED_EXIT_CODE:
      raise SystemExit(f"error: exit {rc}, not {preemption.PREEMPTED_EXIT_CODE}; see "
                       f"{log_path}.")


if __name__ == "__main__":
  main()
