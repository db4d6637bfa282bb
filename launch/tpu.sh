#!/usr/bin/env bash
# Cloud TPU VM launcher for convstem_jax: create / setup / run / logs / delete.
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
    --name|--zone|--project|--accelerator-type|--version|--data-dir|--log|--worker|--lines)
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
    --) shift; PASS+=("$@"); break ;;
    create|setup|run|logs|delete)
      if [[ -z "$COMMAND" ]]; then COMMAND="$1"; else PASS+=("$1"); fi ;;
    *)
      [[ -n "$COMMAND" ]] || die "unknown command or option '$1' (see --help)."
      PASS+=("$1") ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || { usage >&2; die "no command given (create, setup, run, logs or delete)."; }
if [[ "$COMMAND" != "run" && ${#PASS[@]} -gt 0 ]]; then
  die "unexpected arguments for '$COMMAND': ${PASS[*]} (see --help)."
fi
[[ -n "$NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME."
[[ -n "$ZONE_ARG" ]] || die "no zone: pass --zone ZONE or set ZONE."

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
  gc compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

case "$COMMAND" in
  create)
    if [[ "$QUEUED" -eq 1 ]]; then
      args=(compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}"
            --accelerator-type="$ACCELERATOR_TYPE_ARG" --runtime-version="$RUNTIME_VERSION_ARG")
    else
      args=(compute tpus tpu-vm create "$NAME" "${LOC[@]}"
            --accelerator-type="$ACCELERATOR_TYPE_ARG" --version="$RUNTIME_VERSION_ARG")
    fi
    if [[ "$SPOT" -eq 1 ]]; then args+=(--spot); fi
    gc "${args[@]}"
    ;;
  setup)
    gc compute tpus tpu-vm scp --recurse . "$NAME":~/convstem_jax "${LOC[@]}" --worker=all
    ssh_workers all "set -e; cd ~/convstem_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    [[ ${#PASS[@]} -gt 0 ]] || die "run needs arguments for convstem_jax.main, e.g. -- --config=configs/vit_b_srelu.py --workdir=gs://BUCKET/run."
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
    ;;
  logs)
    ssh_workers "$WORKER" "cd ~/convstem_jax && tail -n $(printf '%q' "$LINES") -F $(printf '%q' "$LOG_FILE")"
    ;;
  delete)
    if [[ "$QUEUED" -eq 1 ]]; then
      gc compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
    else
      gc compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
    fi
    ;;
esac
