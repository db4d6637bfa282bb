#!/usr/bin/env bash
# GPU launcher for convstem_jax: one node (all local GPUs) or several nodes.
# Run `launch/gpu.sh --help` for usage.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu.sh [OPTIONS] [--] MAIN ARGS

One node: runs `python -m convstem_jax.main MAIN ARGS` once; JAX uses every local GPU
(restrict with CUDA_VISIBLE_DEVICES).

Several nodes: run this once per node with the same coordinator and process count and
that node's process id (0 on the coordinator's node):
  --coordinator HOST:PORT   address of process 0 (-> --coordinator_address)
  --num-processes N         number of nodes/processes (-> --num_processes)
  --process-id I            this process's index, 0..N-1 (-> --process_id)
Under SLURM (or any cluster JAX discovers itself) set CONVSTEM_JAX_DISTRIBUTED=1
instead; see launch/slurm_example.sbatch.

Options:
  --python PATH             interpreter (PYTHON, default: python)
  --dry-run                 print the command instead of running it
  -h, --help                show this help

Every other argument (and everything after `--`) goes to convstem_jax.main.

Examples:
  launch/gpu.sh --config=configs/vit_b_srelu.py --workdir=/ckpt/vit_b_srelu
  launch/gpu.sh --coordinator node0:12345 --num-processes 2 --process-id 1 \
      --config=configs/vit_b_srelu.py --workdir=/shared/ckpt/vit_b_srelu
USAGE
}

die() {
  echo "gpu.sh: $*" >&2
  exit 2
}

PY="${PYTHON:-python}"
COORD=""
NPROC=""
PID=""
DRY_RUN=0
PASS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --coordinator|--num-processes|--process-id|--python)
      [[ $# -ge 2 ]] || die "option $1 needs a value."
      case "$1" in
        --coordinator) COORD="$2" ;;
        --num-processes) NPROC="$2" ;;
        --process-id) PID="$2" ;;
        --python) PY="$2" ;;
      esac
      shift ;;
    --coordinator=*) COORD="${1#*=}" ;;
    --num-processes=*) NPROC="${1#*=}" ;;
    --process-id=*) PID="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --) shift; PASS+=("$@"); break ;;
    *) PASS+=("$1") ;;
  esac
  shift
done

CMD=("$PY" -m convstem_jax.main)
if [[ -n "$COORD$NPROC$PID" ]]; then
  [[ -n "$COORD" && -n "$NPROC" && -n "$PID" ]] ||
    die "several nodes need all of --coordinator, --num-processes and --process-id."
  CMD+=(--coordinator_address="$COORD" --num_processes="$NPROC" --process_id="$PID")
fi
if [[ ${#PASS[@]} -gt 0 ]]; then CMD+=("${PASS[@]}"); fi

# The package is imported from the repository root, whatever the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "$DRY_RUN" -eq 1 ]]; then
  out=""
  for arg in "${CMD[@]}"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $arg"; else out+=" '${arg//\'/\'\\\'\'}'"; fi
  done
  echo "${out# }"
else
  exec "${CMD[@]}"
fi
