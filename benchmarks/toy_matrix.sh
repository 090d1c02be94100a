#!/usr/bin/env bash
# The toy-suite comparison behind the README's results: every method on cartpole-mt and
# cartpole-conflict, VarShare on cartpole-identical, L2Soft (matched penalty) on
# cartpole-conflict; seeds 1-3; 200k env steps over all tasks (40k per task).
# Usage: bash benchmarks/toy_matrix.sh [RUNS_DIR] [METHOD...]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=${1:-runs/toy}
shift || true
METHODS=${*:-ppo_mtl_embed ppo_varshare l2soft ppo_pcgrad ppo_softmod ppo_single ppo_paco}
COMMON="--total-timesteps 200000 --eval-every 50000 --runs-dir $RUNS"
run() {  # run SCRIPT ENV SEED [SUFFIX] [FLAGS...], unless that run already finished (summary.json)
  local script=$1 env=$2 seed=$3 suffix=${4:-}; shift 4 || shift $#
  local pattern="$RUNS/${env}__${script}__${seed}__*${suffix:+__$suffix}/summary.json"
  if compgen -G "$pattern" > /dev/null; then echo "done already: $pattern"; return; fi
  .venv/bin/python "algos/$script.py" --env-id "$env" --seed "$seed" $COMMON ${suffix:+--run-name-suffix $suffix} "$@"
}
for method in $METHODS; do
  for seed in 1 2 3; do
    case $method in
      l2soft) run ppo_varshare cartpole-conflict $seed l2soft --residual l2 ;;
      ppo_varshare) for env in cartpole-mt cartpole-conflict cartpole-identical; do run ppo_varshare $env $seed ""; done ;;
      *) for env in cartpole-mt cartpole-conflict; do run $method $env $seed ""; done ;;
    esac
  done
done 2>&1 | grep -vi warn
