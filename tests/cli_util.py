"""Run `python -m convstem_jax.main` in child processes, as a user would.

The child environment is built explicitly: tests/conftest.py sets XLA_FLAGS for the
pytest process (8 fake devices), and each child here chooses its own device count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNLOCAL = "--config=configs/vit_b_srelu.py:runlocal"
TIMEOUT_S = 300

# absl progress line, e.g. "step 3/3  loss 2.2870  14.5 img/s  ETA 00:00:00".
STEP_LINE = re.compile(r"step (\d+)/(\d+)  loss ([-\d.naif]+)(?:  ([\d.]+) img/s)?")
RESUMED_LINE = re.compile(
    r"Resumed from checkpoint (\S+)/(\d+) \(([\d.]+)s\) on (\d+) devices")
FIRST_STEP_LINE = re.compile(r"First step \(compilation included\) done in ([\d.]+)s")


def child_env(num_devices: int | None) -> dict[str, str]:
  """num_devices fake CPU devices, or (None) no device count: the trainer's own choice."""
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "CUDA_VISIBLE_DEVICES": "",
      "PYTHONUNBUFFERED": "1",
  })
  if num_devices is None:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env.pop("CONVSTEM_JAX_DISTRIBUTED", None)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def command(*args: str) -> list[str]:
  return [sys.executable, "-m", "convstem_jax.main", *args]


@dataclasses.dataclass
class Result:
  args: Sequence[str]
  returncode: int
  stdout: str
  stderr: str
  seconds: float

  def __str__(self) -> str:  # what a failing assert shows
    return (f"$ {' '.join(self.args)}\n-> exit {self.returncode} after "
            f"{self.seconds:.1f}s\n--- stdout\n{self.stdout[-4000:]}\n"
            f"--- stderr\n{self.stderr[-8000:]}")

  def step_losses(self) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in STEP_LINE.finditer(self.stderr)}

  def printed(self) -> dict[str, float]:
    """The `key: value` lines main.py prints to stdout."""
    return {m[1]: float(m[2]) for m in
            re.finditer(r"^(\S+/\w+): ([-\d.naif]+)$", self.stdout, re.M)}


def run_cli(*args: str, num_devices: int | None = 8, timeout: float = TIMEOUT_S) -> Result:
  """Runs main.py to completion (killed after `timeout` seconds)."""
  cmd = command(*args)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=child_env(num_devices), capture_output=True,
                        text=True, timeout=timeout, check=False)
  return Result(cmd, proc.returncode, proc.stdout, proc.stderr,
                time.perf_counter() - t0)


def run_cli_processes(per_process_args: Sequence[Sequence[str]], logdir: pathlib.Path,
                      num_devices: int, timeout: float = TIMEOUT_S) -> list[Result]:
  """Starts one child per argument list at once; kills them all if any is stuck.

  Output goes to files, not pipes, so a chatty process can never block on a full pipe
  while its peers wait for it in a collective.
  """
  procs, files = [], []
  t0 = time.perf_counter()
  try:
    for i, args in enumerate(per_process_args):
      out = open(logdir / f"proc{i}.out", "w+")
      err = open(logdir / f"proc{i}.err", "w+")
      files.append((out, err))
      procs.append(subprocess.Popen(command(*args), cwd=REPO, env=child_env(num_devices),
                                    stdout=out, stderr=err, text=True))
    deadline = t0 + timeout
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.perf_counter()))
  except subprocess.TimeoutExpired:
    pass  # the stuck processes are killed below; their exit code (-9) fails the test
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for p, (out, err) in zip(procs, files):
    out.seek(0)
    err.seek(0)
    results.append(Result(p.args, p.returncode, out.read(), err.read(),
                          time.perf_counter() - t0))
    out.close()
    err.close()
  return results


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
