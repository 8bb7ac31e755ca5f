#!/usr/bin/env bash
# Submit the whole pipeline as dependent Slurm jobs: the strategy's own stages (Light-PEFT: estimate; APT: calibrate,
# then its plan; PrunePEFT: search), then plan+prune -> train -> evaluate, in the order `lightpeft run` takes them.
#
#   slurm/pipeline.sh [SBATCH OPTIONS --] --config R.yaml --run-dir D [--section.key=value ...]
#   slurm/pipeline.sh -N 2 --gpus-per-node 8 -p gpu -t 12:00:00 -- --config recipes/R.yaml --run-dir runs/big
#
# Shape options (-N/--nodes, -n/--ntasks, --ntasks-per-node, --gpus-per-node, -G/--gpus, --gres, -c/--cpus-per-task,
# --cpus-per-gpu, --gpus-per-task, --exclusive) apply to the collective stages (estimate or the strategy's first
# stage, train); every other option (partition, time, account, qos, mem, ...) goes to all jobs. Consecutive
# single-process stages (plan+prune, evaluate) run as one job of one task on one node (with one GPU when GPUs were
# asked for), named after its last stage. Each job starts only after the previous one succeeded (--dependency=afterok); when one
# fails the later ones are cancelled (--kill-on-invalid-dep=yes) rather than left pending. Logs: D/logs/<name>-<id>.out.
# Prints one line per job, "<stage> <job id>", so a script can wait on the last one.
set -euo pipefail
die() { echo "error: $*" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v sbatch >/dev/null 2>&1 || die "sbatch not found; run this on a Slurm login node"

sb=() cli=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $1 != -- ]]; do sb+=("$1"); shift; done
  shift
fi
cli=("$@")

shape=() common=() gpus=0
for ((i = 0; i < ${#sb[@]}; i++)); do
  a=${sb[i]}
  case $a in
    -N | -n | -G | -c | --nodes | --ntasks | --ntasks-per-node | --gpus-per-node | --gpus | --gres | --cpus-per-task | \
      --cpus-per-gpu | --gpus-per-task)
      (( i + 1 < ${#sb[@]} )) || die "sbatch option $a needs a value"
      shape+=("$a" "${sb[i + 1]}")
      [[ $a == *gpu* || $a == -G || ($a == --gres && ${sb[i + 1]} == *gpu*) ]] && gpus=1
      i=$((i + 1)) ;;
    --nodes=* | --ntasks=* | --ntasks-per-node=* | --gpus-per-node=* | --gpus=* | --gres=* | --cpus-per-task=* | \
      --cpus-per-gpu=* | --gpus-per-task=* | --exclusive | --exclusive=* | -N?* | -n?* | -G?* | -c?*)
      shape+=("$a")
      [[ $a == --gpu* || $a == --cpus-per-gpu=* || $a == -G* || $a == --gres=*gpu* ]] && gpus=1 ;;
    *) common+=("$a") ;;
  esac
done

# The same early checks the jobs make, here at the terminal before anything is queued.
config="" run_dir="" single_cli=()
for ((i = 0; i < ${#cli[@]}; i++)); do
  case ${cli[i]} in
    --config) config=${cli[i + 1]:-} ;;
    --config=*) config=${cli[i]#--config=} ;;
    --run-dir) run_dir=${cli[i + 1]:-} ;;
    --run-dir=*) run_dir=${cli[i]#--run-dir=} ;;
  esac
  # plan, prune and evaluate take no --deepspeed
  if [[ ${cli[i]} == --deepspeed ]]; then i=$((i + 1)); elif [[ ${cli[i]} != --deepspeed=* ]]; then
    single_cli+=("${cli[i]}"); fi
done
[[ -n $run_dir ]] || die "no --run-dir; usage: slurm/pipeline.sh [SBATCH OPTIONS --] --config R.yaml --run-dir D"
if [[ -n $config ]]; then
  [[ -f $config ]] || die "recipe '$config' not found (relative paths are taken from $(pwd))"
elif [[ ! -f $run_dir/recipe.yaml ]]; then
  die "no recipe: pass --config R.yaml, or a --run-dir that already holds recipe.yaml"
fi
mkdir -p "$run_dir/logs"
single=(--nodes=1 --ntasks=1)
(( gpus == 0 )) || single+=(--gpus-per-node=1)

submit() {  # submit NAME [sbatch args...] -> prints the job id
  local name=$1
  shift
  sbatch --parsable --job-name="lightpeft-$name" --output="$run_dir/logs/%x-%j.out" --kill-on-invalid-dep=yes \
    ${common[@]+"${common[@]}"} "$@" | cut -d';' -f1
}

# The stages in order, "NAME COLLECTIVE" per line: the strategy's (read from the recipe without the overrides, which
# cannot change the strategy), then the shared ones up to evaluate (export and report are left to the user).
if [[ -n ${LIGHTPEFT_PYTHON:-} ]]; then py=$LIGHTPEFT_PYTHON
elif [[ -x "$HERE/../.venv/bin/python" ]]; then py="$HERE/../.venv/bin/python"
else py=python3; fi
plan=$(PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$run_dir" "$config" <<'EOF'
import sys
from pathlib import Path
try:
    from lightpeft_dist.errors import LightPeftError
    from lightpeft_dist.pipeline.stages import resolve_recipe, stage_named
    from lightpeft_dist.strategies.registry import strategy_for
except ImportError as exc:
    sys.exit(f"error: cannot import lightpeft_dist with {sys.executable} ({exc}); set LIGHTPEFT_PYTHON")
try:
    recipe = resolve_recipe(Path(sys.argv[1]), sys.argv[2] or None, [])
    own = [s.name for s in strategy_for(recipe).stages]
    for name in own + [n for n in ("plan", "prune", "train", "evaluate") if n not in own]:
        print("STAGE", name, int(stage_named(name, recipe).collective))
except LightPeftError as exc:
    sys.exit(f"error: {exc}")
EOF
) || exit 2

previous="" group=""
chain() {  # chain NAME [sbatch args...]: submit after the previous job, print "NAME ID"
  local name=$1 id
  shift
  id=$(submit "$name" ${previous:+--dependency="afterok:$previous"} "$@")
  echo "$name $id"
  previous=$id
}
flush() {  # the pending single-process stages as one job
  [[ -n $group ]] || return 0
  chain "${group##*,}" "${single[@]}" "$HERE/stage.sbatch" "$group" "${single_cli[@]}"
  group=""
}
while read -r tag name collective; do
  [[ $tag == STAGE ]] || continue
  if (( collective )); then
    flush
    if [[ $name == train ]]; then chain train ${shape[@]+"${shape[@]}"} "$HERE/train.sbatch" "${cli[@]}"
    else chain "$name" ${shape[@]+"${shape[@]}"} "$HERE/estimate.sbatch" "$name" "${cli[@]}"; fi
  else
    group=${group:+$group,}$name
  fi
done <<<"$plan"
flush
