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
for method in $METHODS; do
  for seed in 1 2 3; do
    case $method in
      l2soft) .venv/bin/python algos/ppo_varshare.py --env-id cartpole-conflict --residual l2 --seed $seed $COMMON --run-name-suffix l2soft ;;
      ppo_varshare)
        for env in cartpole-mt cartpole-conflict cartpole-identical; do
          .venv/bin/python algos/ppo_varshare.py --env-id $env --seed $seed $COMMON
        done ;;
      *)
        for env in cartpole-mt cartpole-conflict; do
          .venv/bin/python algos/$method.py --env-id $env --seed $seed $COMMON
        done ;;
    esac
  done
done 2>&1 | grep -vi warn
