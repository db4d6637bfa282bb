#!/usr/bin/env bash
# Cloud TPU VM launcher for convstem_jax: create / setup / run / logs / delete / keep-running.
# Run `launch/tpu.sh --help` for usage.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu.sh [OPTIONS] COMMAND [COMMAND OPTIONS] [-- MAIN ARGS]

Commands:
  create   Create the TPU VM (or a queued resource with --queued).
  setup    Copy this checkout to every worker (~/convstem_jax) and install a
           virtual environment (.venv) with the `tpu` extra on every worker.
  run      Run `python -m convstem_jax.main ARGS` on all workers (--worker=all)
           with CONVSTEM_JAX_DISTRIBUTED=1 and TFDS_DATA_DIR set. Every argument
           that is not a launcher option (or everything after `--`) is passed
           through, e.g. --config=configs/vit_b_srelu.py --workdir=gs://BUCKET/run
  logs     Tail the run's log file on worker 0 (or --worker=all).
  delete   Delete the TPU VM (or the queued resource with --queued).
  keep-running
           Keep a Spot or queued run going unattended, with the create options and
           the run arguments (which must include --workdir=gs://...). Loop: make
           sure the slice is READY (queued: ACTIVE); if it is absent, PREEMPTED,
           SUSPENDED, FAILED or otherwise lost, delete it (if present), create it
           again, wait for it and run `setup`; then `run`. The trainer's exit code
           decides: 0 -> done (exit 0); 75 (preempted: it saved a checkpoint) or a
           failure while the slice is no longer READY -> go round again, resuming
           from the checkpoint in the same workdir; anything else -> stop with
           that exit code. `setup` also runs on the first round, so the workers
           get this checkout. With --dry-run: the commands of one round, once.

Common options (flag, or environment variable):
  --name NAME            TPU name                (TPU_NAME)   required
  --zone ZONE            zone, e.g. us-central2-b (ZONE)      required
  --project PROJECT      GCP project             (PROJECT)    default: gcloud's configured project
  --dry-run              print the gcloud commands instead of running them
  -h, --help             show this help

create options:
  --accelerator-type T   e.g. v4-32, v5litepod-16 (ACCELERATOR_TYPE, default v4-8)
  --version V            TPU runtime version   (RUNTIME_VERSION, default tpu-ubuntu2204-base)
  --spot                 use Spot capacity
  --queued               request through queued resources (also for delete)

run options:
  --data-dir DIR         TFDS data dir on the workers, e.g. gs://BUCKET/tensorflow_datasets
                         (DATA_DIR; unset: tfds' default ~/tensorflow_datasets)
  --log FILE             remote log file the output is appended to (default train.log, relative to ~/convstem_jax)

keep-running options (and the create and run options above):
  --max-restarts N       give up after N reruns or re-creations (default 100);
                         exits with the last exit code
  --poll-seconds S       seconds between state checks while waiting for the slice,
                         and before retrying after a lost slice (default 60)

logs options:
  --worker W             0 (default), another index, or all
  --log FILE             remote log file (default train.log, relative to ~/convstem_jax)
  --lines N              lines to show before following (default 100)

Example:
  export TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project
  launch/tpu.sh create --accelerator-type v4-32 --spot
  launch/tpu.sh setup
  launch/tpu.sh run --data-dir gs://my-bucket/tfds -- \
      --config=configs/vit_b_srelu.py --workdir=gs://my-bucket/runs/vit_b_srelu
  launch/tpu.sh logs
  launch/tpu.sh delete

Unattended (Spot or queued; reruns after preemption until training finishes):
  launch/tpu.sh keep-running --accelerator-type v4-32 --spot --data-dir gs://my-bucket/tfds -- \
      --config=configs/vit_b_srelu.py --workdir=gs://my-bucket/runs/vit_b_srelu
USAGE
}

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

NAME="${TPU_NAME:-}"
ZONE_ARG="${ZONE:-}"
PROJECT_ARG="${PROJECT:-}"
ACCELERATOR_TYPE_ARG="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION_ARG="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
DATA_DIR_ARG="${DATA_DIR:-}"
LOG_FILE="train.log"  # relative to ~/convstem_jax on the workers
WORKER="0"
LINES="100"
DRY_RUN=0
SPOT=0
QUEUED=0
MAX_RESTARTS=100
POLL_SECONDS=60
COMMAND=""
PASS=()

need_value() {
  # $1: option name, $2: number of remaining arguments
  [[ "$2" -ge 2 ]] || die "option $1 needs a value."
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --name|--zone|--project|--accelerator-type|--version|--data-dir|--log|--worker|--lines|\
    --max-restarts|--poll-seconds)
      need_value "$1" "$#"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE_ARG="$2" ;;
        --project) PROJECT_ARG="$2" ;;
        --accelerator-type) ACCELERATOR_TYPE_ARG="$2" ;;
        --version) RUNTIME_VERSION_ARG="$2" ;;
        --data-dir) DATA_DIR_ARG="$2" ;;
        --log) LOG_FILE="$2" ;;
        --worker) WORKER="$2" ;;
        --lines) LINES="$2" ;;
        --max-restarts) MAX_RESTARTS="$2" ;;
        --poll-seconds) POLL_SECONDS="$2" ;;
      esac
      shift ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE_ARG="${1#*=}" ;;
    --project=*) PROJECT_ARG="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE_ARG="${1#*=}" ;;
    --version=*) RUNTIME_VERSION_ARG="${1#*=}" ;;
    --data-dir=*) DATA_DIR_ARG="${1#*=}" ;;
    --log=*) LOG_FILE="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --lines=*) LINES="${1#*=}" ;;
    --max-restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --poll-seconds=*) POLL_SECONDS="${1#*=}" ;;
    --) shift; PASS+=("$@"); break ;;
    create|setup|run|logs|delete|keep-running)
      if [[ -z "$COMMAND" ]]; then COMMAND="$1"; else PASS+=("$1"); fi ;;
    *)
      [[ -n "$COMMAND" ]] || die "unknown command or option '$1' (see --help)."
      PASS+=("$1") ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || { usage >&2; die "no command given (create, setup, run, logs, delete or keep-running)."; }
if [[ "$COMMAND" != "run" && "$COMMAND" != "keep-running" && ${#PASS[@]} -gt 0 ]]; then
  die "unexpected arguments for '$COMMAND': ${PASS[*]} (see --help)."
fi
[[ -n "$NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME."
[[ -n "$ZONE_ARG" ]] || die "no zone: pass --zone ZONE or set ZONE."
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts needs a whole number, not '$MAX_RESTARTS'."
[[ "$POLL_SECONDS" =~ ^[0-9]+$ ]] || die "--poll-seconds needs a whole number, not '$POLL_SECONDS'."

# Code is copied from the repository root, whatever the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LOC=(--zone="$ZONE_ARG")
if [[ -n "$PROJECT_ARG" ]]; then LOC+=(--project="$PROJECT_ARG"); fi

shell_quote() {
  # Readable quoting for --dry-run output: bare when safe, else single quotes.
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

gc() {
  if [[ "$DRY_RUN" -eq 1 ]]; then
    local out="gcloud" arg
    for arg in "$@"; do out+=" $(shell_quote "$arg")"; done
    echo "$out"
  else
    gcloud "$@"
  fi
}

ssh_workers() {
  # $1: worker selector, $2: remote bash command
  gc compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2" ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"}
}

do_create() {
  local args
  if [[ "$QUEUED" -eq 1 ]]; then
    args=(compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}"
          --accelerator-type="$ACCELERATOR_TYPE_ARG" --runtime-version="$RUNTIME_VERSION_ARG")
  else
    args=(compute tpus tpu-vm create "$NAME" "${LOC[@]}"
          --accelerator-type="$ACCELERATOR_TYPE_ARG" --version="$RUNTIME_VERSION_ARG")
  fi
  if [[ "$SPOT" -eq 1 ]]; then args+=(--spot); fi
  gc "${args[@]}"
}

do_setup() {
  gc compute tpus tpu-vm scp --recurse . "$NAME":~/convstem_jax "${LOC[@]}" --worker=all &&
    ssh_workers all "set -e; cd ~/convstem_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
}

do_run() {
  local arg remote
  [[ ${#PASS[@]} -gt 0 ]] || die "$COMMAND needs arguments for convstem_jax.main, e.g. -- --config=configs/vit_b_srelu.py --workdir=gs://BUCKET/run."
  for arg in "${PASS[@]}"; do
    if [[ "$arg" == --workdir=* && "$arg" != --workdir=gs://* ]]; then
      echo "tpu.sh: warning: the workdir should be a gs:// path every worker can reach." >&2
    fi
  done
  remote="set -o pipefail; cd ~/convstem_jax && CONVSTEM_JAX_DISTRIBUTED=1"
  if [[ -n "$DATA_DIR_ARG" ]]; then remote+=" TFDS_DATA_DIR=$(printf '%q' "$DATA_DIR_ARG")"; fi
  remote+=" .venv/bin/python -m convstem_jax.main"
  for arg in "${PASS[@]}"; do remote+=" $(printf '%q' "$arg")"; done
  remote+=" 2>&1 | tee -a $(printf '%q' "$LOG_FILE")"
  ssh_workers all "$remote"
}

do_delete() {
  if [[ "$QUEUED" -eq 1 ]]; then
    gc compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

# ---------------------------------------------------------------- keep-running
EX_PREEMPTED=75  # the trainer's "preempted: checkpoint saved, rerun me on the same workdir"

say() {
  echo "tpu.sh: [$(date '+%Y-%m-%d %H:%M:%S')] $*" >&2
}

describe_args() {
  if [[ "$QUEUED" -eq 1 ]]; then
    printf '%s\n' compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
  else
    printf '%s\n' compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)'
  fi
}

slice_state() {
  # Prints the slice's state, or nothing when it does not exist (or cannot be described).
  local args
  mapfile -t args < <(describe_args)
  gcloud "${args[@]}" 2>/dev/null || true
}

state_class() {
  # ready | pending (wait for it) | absent | lost (delete and create again)
  if [[ -z "$1" ]]; then echo absent; return; fi
  if [[ "$QUEUED" -eq 1 ]]; then
    case "$1" in
      ACTIVE) echo ready ;;
      CREATING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|DELETING) echo pending ;;
      *) echo lost ;;  # SUSPENDING, SUSPENDED, FAILED, ...
    esac
  else
    case "$1" in
      READY) echo ready ;;
      CREATING|STARTING|RESTARTING|REPAIRING|DELETING) echo pending ;;
      *) echo lost ;;  # PREEMPTED, TERMINATED, STOPPED, STOPPING, HIDDEN, ...
    esac
  fi
}

ensure_ready() {
  # Returns 0 once the slice is ready; creates it (at most once per call) when it
  # is absent or lost, and sets NEED_SETUP then. Non-zero: a gcloud call failed, or
  # the slice it created was lost before it became ready.
  local state class created=0
  while :; do
    state="$(slice_state)"
    class="$(state_class "$state")"
    case "$class" in
      ready) return 0 ;;
      pending)
        say "$NAME is $state; checking again in ${POLL_SECONDS}s."
        sleep "$POLL_SECONDS"
        continue ;;
      lost|absent)
        if [[ "$created" -eq 1 ]]; then
          say "$NAME is ${state:-gone} before it became ready."
          return 1
        fi
        if [[ "$class" == lost ]]; then
          say "$NAME is $state: deleting it."
          do_delete || return
        fi ;;
    esac
    say "creating $NAME."
    do_create || return
    created=1
    NEED_SETUP=1
  done
}

workdir_of_pass() {
  # Prints the value of --workdir=X or --workdir X in the run arguments.
  local i
  for ((i = 0; i < ${#PASS[@]}; i++)); do
    case "${PASS[i]}" in
      --workdir=*) echo "${PASS[i]#--workdir=}"; return ;;
      --workdir) if ((i + 1 < ${#PASS[@]})); then echo "${PASS[i + 1]}"; return; fi ;;
    esac
  done
}

keep_running() {
  local workdir restarts=0 rc state reason step
  workdir="$(workdir_of_pass)"
  [[ -n "$workdir" ]] || die "keep-running needs --workdir=gs://BUCKET/run among the run arguments: reruns resume from its checkpoint."
  [[ "$workdir" == gs://* ]] ||
    die "keep-running needs a gs:// workdir (not '$workdir'): a re-created slice starts with empty disks."
  # A dead VM can leave ssh waiting for output forever; make it notice within ~5 minutes.
  SSH_EXTRA=(--ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=10)

  if [[ "$DRY_RUN" -eq 1 ]]; then
    echo "# keep-running: one round of a loop (at most $MAX_RESTARTS restarts). 1. state check;"
    echo "# ready means READY (queued: ACTIVE). Absent, PREEMPTED, SUSPENDED, FAILED or otherwise"
    echo "# lost -> delete (if present), create, wait for ready (checking every ${POLL_SECONDS}s), setup."
    echo "# 2. run on the same workdir ($workdir): exit 0 -> done; exit $EX_PREEMPTED (preempted,"
    echo "# checkpoint saved) or a non-zero exit while the slice is no longer ready -> next round"
    echo "# (resumes from the checkpoint); any other exit code -> stop with it."
    echo "# state check:"
    local args
    mapfile -t args < <(describe_args)
    gc "${args[@]}"
    echo "# if absent or lost (delete only if present):"
    do_delete
    do_create
    echo "# wait until ready, then (also on the first round):"
    do_setup
    echo "# run:"
    do_run
    return 0
  fi

  NEED_SETUP=1  # the first round puts this checkout on the workers
  while :; do
    rc=0
    step="getting $NAME ready"
    ensure_ready || rc=$?
    if [[ "$rc" -eq 0 && "$NEED_SETUP" -eq 1 ]]; then
      step="setup"
      say "setup on $NAME."
      do_setup || rc=$?
      if [[ "$rc" -eq 0 ]]; then NEED_SETUP=0; fi
    fi
    if [[ "$rc" -eq 0 ]]; then
      step="run"
      say "run on $NAME (workdir $workdir; restart $restarts of at most $MAX_RESTARTS)."
      do_run || rc=$?
      if [[ "$rc" -eq 0 ]]; then
        say "training finished (exit 0)."
        return 0
      fi
    fi

    state="$(slice_state)"
    if [[ "$step" == run && "$rc" -eq "$EX_PREEMPTED" ]]; then
      reason="the trainer was preempted (exit $EX_PREEMPTED; checkpoint saved)"
    elif [[ "$(state_class "$state")" != ready ]]; then
      reason="$step failed (exit code $rc) and $NAME is ${state:-gone}"
    elif [[ "$step" != run && "$step" != setup ]]; then
      reason="$step failed (exit code $rc)"  # e.g. no capacity for create: try again later
    else
      say "stopping: $step failed with exit code $rc while $NAME is $state: a real failure," \
          "not a preemption. Look at the output (launch/tpu.sh logs), fix the cause and" \
          "start keep-running again: it resumes from $workdir."
      exit "$rc"
    fi
    if [[ "$restarts" -ge "$MAX_RESTARTS" ]]; then
      say "giving up: $reason, and all $MAX_RESTARTS restarts (--max-restarts) are used." \
          "Start keep-running again to resume from $workdir."
      exit "$rc"
    fi
    restarts=$((restarts + 1))
    say "$reason: going round again (restart $restarts of at most $MAX_RESTARTS)."
    if [[ "$step" != run || "$rc" -ne "$EX_PREEMPTED" ]]; then sleep "$POLL_SECONDS"; fi
  done
}

SSH_EXTRA=()
NEED_SETUP=1

case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs)
    ssh_workers "$WORKER" "cd ~/convstem_jax && tail -n $(printf '%q' "$LINES") -F $(printf '%q' "$LOG_FILE")"
    ;;
  delete) do_delete ;;
  keep-running) keep_running ;;
esac
