#!/usr/bin/env bash
# Shared body of slurm/*.sbatch: check everything that can be checked before a rank starts, then launch the CLI.
#
#   _launch.sh dist   STAGE  [CLI args]         all nodes of the allocation, one rank per GPU (or per task on CPU);
#                                               STAGE `first`: the recipe's strategy's first stage (estimate for
#                                               Light-PEFT, calibrate for APT, search for PrunePEFT), as `lightpeft run`
#   _launch.sh single STAGE[,STAGE...] [args]   one process on the batch host, stages in order (plan, prune, evaluate)
#   _launch.sh node   STAGE  [CLI args]         internal: what srun runs on each node in `dist` mode
#
# Rendezvous: one torchrun per node (srun --ntasks-per-node=1), ranks per node = GPUs per node, static rendezvous at
# the first host of the allocation, node rank = SLURM_NODEID. Chosen over one srun task per rank because
#  - `sbatch -N 2 --gpus-per-node 8 slurm/estimate.sbatch ...` then works as typed: Slurm's default is one task per
#    node, and the rank count comes from the GPUs instead of a second, easily mismatched --ntasks-per-node;
#  - torchrun exports exactly the contract the CLI reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the
#    same as a plain torchrun or deepspeed launch, so Slurm adds no code path of its own to the CLI;
#  - ranks are deterministic (node 0 holds rank 0, which writes the run directory), and when a rank dies torchrun stops
#    its siblings and exits non-zero, after which srun --kill-on-bad-exit ends the other nodes: a dead rank ends the job.
# Collectives time out after LIGHTPEFT_DIST_TIMEOUT_S (default 1800 s), so a rank stuck in a collective with a dead
# peer also ends instead of hanging.
#
# Environment: LIGHTPEFT_PYTHON (default: <repo>/.venv/bin/python if present, else python3), LIGHTPEFT_GPUS_PER_NODE
# (default: from the allocation), LIGHTPEFT_DIST_TIMEOUT_S, LIGHTPEFT_MASTER_PORT (default 20000 + job id % 20000).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[lightpeft-slurm] $*" >&2; }

[[ $# -ge 2 ]] || die "usage: _launch.sh dist|single|node STAGE [--config R.yaml] --run-dir D [--section.key=value ...]"
MODE=$1 STAGES=$2
shift 2
HOME_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$HOME_DIR/slurm/_launch.sh"

if [[ -n "${LIGHTPEFT_PYTHON:-}" ]]; then PY=$LIGHTPEFT_PYTHON
elif [[ -x "$HOME_DIR/.venv/bin/python" ]]; then PY="$HOME_DIR/.venv/bin/python"
else PY=python3; fi
command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found; set LIGHTPEFT_PYTHON to the interpreter with lightpeft_dist installed"
# Run this checkout's code even where the interpreter has no (or another) lightpeft_dist installed.
export PYTHONPATH="$HOME_DIR${PYTHONPATH:+:$PYTHONPATH}"

# --- on each node (inside srun): check the GPUs this node really has, then start torchrun -------------------------
if [[ $MODE == node ]]; then
  if (( LP_GPUS > 0 )); then
    seen=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || die "$(hostname): cannot run torch with $PY"
    [[ $seen == "$LP_GPUS" ]] || die "$(hostname): $LP_GPUS GPUs per node requested but torch sees $seen CUDA" \
      "devices (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}); request as many GPUs as the node exposes" \
      "(sbatch --gpus-per-node N) or set LIGHTPEFT_GPUS_PER_NODE to match"
  fi
  exec "$PY" -m torch.distributed.run --nnodes="$LP_NNODES" --nproc-per-node="$LP_NPROC" \
    --node-rank="${SLURM_NODEID:-0}" --master-addr="$LP_HEAD" --master-port="$LP_PORT" --max-restarts=0 \
    -m lightpeft_dist "$STAGES" "$@"
fi

# --- arguments: a run directory and a recipe must exist before anything is queued or started ---------------------
CONFIG="" RUN_DIR="" OVERRIDES=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --config) CONFIG=${args[i + 1]:-} ;;
    --config=*) CONFIG=${args[i]#--config=} ;;
    --run-dir) RUN_DIR=${args[i + 1]:-} ;;
    --run-dir=*) RUN_DIR=${args[i]#--run-dir=} ;;
    --*.*=*) OVERRIDES+=("${args[i]}") ;;
  esac
done
[[ -n $RUN_DIR ]] || die "no --run-dir; usage: sbatch slurm/<stage>.sbatch --config R.yaml --run-dir D"
if [[ $STAGES != report ]]; then  # every other stage reads the recipe
  if [[ -n $CONFIG ]]; then
    [[ -f $CONFIG ]] || die "recipe '$CONFIG' not found (relative paths are taken from $(pwd))"
  elif [[ ! -f $RUN_DIR/recipe.yaml ]]; then
    die "no recipe: pass --config R.yaml, or a --run-dir that already holds recipe.yaml ($RUN_DIR/recipe.yaml not found)"
  fi
  # The CLI's own recipe check, once, before any rank starts: a typo fails here with the CLI's one-line message.
  # It prints the strategy's first stage (what STAGE `first` means).
  first=$("$PY" - "$RUN_DIR" "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} <<'EOF'
import sys
from pathlib import Path
try:
    from lightpeft_dist.errors import LightPeftError
    from lightpeft_dist.pipeline.stages import resolve_recipe
    from lightpeft_dist.strategies.registry import strategy_for
except ImportError as exc:
    sys.exit(f"error: cannot import lightpeft_dist with {sys.executable} ({exc}); set LIGHTPEFT_PYTHON")
try:
    print(strategy_for(resolve_recipe(Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3:])).stages[0].name)
except LightPeftError as exc:
    sys.exit(f"error: {exc}")
EOF
  ) || exit 2
  [[ $STAGES != first ]] || STAGES=${first##*$'\n'}  # its last line
fi
[[ $STAGES != first ]] || die "stage 'first' needs the recipe; pass --config R.yaml or a --run-dir holding recipe.yaml"

export LIGHTPEFT_DIST_TIMEOUT_S=${LIGHTPEFT_DIST_TIMEOUT_S:-1800}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a timed-out NCCL op aborts the rank
log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}: $MODE $STAGES" \
  "with $PY in $(pwd)"

if [[ $MODE == single ]]; then
  IFS=, read -r -a stage_list <<<"$STAGES"
  for stage in "${stage_list[@]}"; do
    log "stage $stage"
    if [[ $stage == report ]]; then "$PY" -m lightpeft_dist report --run-dir "$RUN_DIR"  # takes no recipe
    else "$PY" -m lightpeft_dist "$stage" "$@"; fi
  done
  exit 0
fi
[[ $MODE == dist ]] || die "unknown mode '$MODE' (dist, single or node)"
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm allocation; submit with sbatch (or use torchrun directly)"

# --- shape of the job: nodes, ranks per node, GPUs per node --------------------------------------------------------
first_count() {  # "8", "a100:8", "gpu:a100:8", "72(x2)", "72,64" -> the first count
  local v=${1%%,*}
  v=${v%%(*}
  echo "${v##*:}"
}
min_count() {  # SLURM_JOB_CPUS_PER_NODE "72(x2),64" -> 64
  local m="" v
  IFS=, read -r -a parts <<<"$1"
  for v in "${parts[@]}"; do v=${v%%(*}; [[ -z $m || $v -lt $m ]] && m=$v; done
  echo "$m"
}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
ALLOC_GPUS=0
if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then ALLOC_GPUS=$SLURM_GPUS_ON_NODE
elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then ALLOC_GPUS=$(first_count "$SLURM_GPUS_PER_NODE")
elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then IFS=, read -r -a ids <<<"$SLURM_JOB_GPUS"; ALLOC_GPUS=${#ids[@]}; fi
GPUS=$ALLOC_GPUS
if [[ -n ${LIGHTPEFT_GPUS_PER_NODE:-} ]]; then
  [[ $LIGHTPEFT_GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "LIGHTPEFT_GPUS_PER_NODE='$LIGHTPEFT_GPUS_PER_NODE' is not a number"
  if (( ALLOC_GPUS > 0 && LIGHTPEFT_GPUS_PER_NODE != ALLOC_GPUS )); then
    die "LIGHTPEFT_GPUS_PER_NODE=$LIGHTPEFT_GPUS_PER_NODE but the allocation has $ALLOC_GPUS GPUs per node;" \
      "submit with --gpus-per-node $LIGHTPEFT_GPUS_PER_NODE or drop the variable"
  fi
  GPUS=$LIGHTPEFT_GPUS_PER_NODE
fi
if (( GPUS > 0 )); then
  NPROC=$GPUS  # one rank per GPU
else
  tpn=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
  [[ $tpn != *,* ]] || die "tasks differ between nodes (SLURM_TASKS_PER_NODE=$tpn); submit with --ntasks-per-node N"
  NPROC=$(first_count "$tpn")
fi
CPUS=$(min_count "${SLURM_JOB_CPUS_PER_NODE:-$NPROC}")
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${LIGHTPEFT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
if (( GPUS == 0 )) && [[ -z ${OMP_NUM_THREADS:-} ]]; then
  export OMP_NUM_THREADS=$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))
fi
export LP_NNODES=$NNODES LP_NPROC=$NPROC LP_GPUS=$GPUS LP_HEAD=$HEAD LP_PORT=$PORT
log "$NNODES node(s) x $NPROC rank(s) = world size $((NNODES * NPROC)); GPUs per node $GPUS; CPUs per node $CPUS;" \
  "rendezvous $HEAD:$PORT; collective timeout ${LIGHTPEFT_DIST_TIMEOUT_S}s"

# srun in the background so the batch shell can take USR1 (sbatch --signal=B:USR1@SECONDS, sent before the time
# limit) and requeue the job; the requeued job reruns this script and the stage (estimate or train) resumes from its
# last checkpoint, `$RUN_DIR/$STAGE.ckpt` (the latest; RunDir.checkpoint, which keeps older ones beside it).
# Only when this run wrote a checkpoint: otherwise a stage too long for the time limit would restart forever.
STARTED=$(date +%s)
CKPT="$RUN_DIR/$STAGES.ckpt"
requeue() {  # shellcheck disable=SC2317  # called by the USR1 trap
  if [[ -d $CKPT ]] && (( $(stat -c %Y "$CKPT") >= STARTED )); then
    log "time limit near: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint in $CKPT"
    scontrol requeue "$SLURM_JOB_ID"
  else
    log "time limit near but this run wrote no checkpoint ($CKPT); not requeueing (set $STAGES.checkpoint_every)"
  fi
}
trap requeue USR1
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
  bash "$SELF" node "$STAGES" "$@" &
pid=$!
while true; do
  rc=0
  wait "$pid" || rc=$?
  kill -0 "$pid" 2>/dev/null || break  # otherwise wait was interrupted by USR1 and srun is still running
done
(( rc == 0 )) || log "stage $STAGES failed with exit code $rc"
exit "$rc"
