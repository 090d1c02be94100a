#!/usr/bin/env bash
# The main job. For now: the quick-start comparison on a small default (VarShare against the
# shared-MTL baseline on cartpole-mt, one seed, 300k steps: a few minutes on 2 CPU cores).
# Override the budget with TOTAL_TIMESTEPS=..., the suite with ENV_ID=..., the seed with SEED=...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
ENV_ID=${ENV_ID:-cartpole-mt}
SEED=${SEED:-1}
TOTAL_TIMESTEPS=${TOTAL_TIMESTEPS:-300000}
for algo in ppo_mtl_embed ppo_varshare; do
  .venv/bin/python "algos/${algo}.py" --env-id "$ENV_ID" --seed "$SEED" --total-timesteps "$TOTAL_TIMESTEPS"
done
.venv/bin/python -m shared.summarize runs
