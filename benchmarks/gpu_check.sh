#!/usr/bin/env bash
# The GPU check of the speed work, as one command for a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. benchmarks/throughput.py on MT10 with async envs: every method, 3 iterations (the first is
#    warm-up), on the GPU;
# 2. the same with the sync vector env for shared MTL and VarShare (async against sync);
# 3. one short shared-MTL learning run on MT10 with async envs on the GPU (400k env steps).
#
# Writes at most 6 files to OUT_DIR: machine.txt, throughput_async.md, throughput_sync.md,
# gpu_check.log (everything the commands printed), learning_run.tar.gz (the run's folder without
# its checkpoint). A python3 with a CUDA build of torch must be on the PATH; the project's other
# packages come from wheels in ./.whl when that folder exists (installed into /tmp/site), else from
# that python. ENV_ID, ITERATIONS and LEARN_STEPS override the defaults (a CPU dry run uses a toy
# suite).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
ENV_ID=${ENV_ID:-mt10}
ITERATIONS=${ITERATIONS:-3}
LEARN_STEPS=${LEARN_STEPS:-400000}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1 WANDB_MODE=offline  # no MUJOCO_GL: nothing is rendered
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the wheels in .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    echo "cpu cores: $(nproc)"
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$OUT/machine.txt" | tee -a "$LOG"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to the log, say how it ended
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

step throughput-async 300 bash -c "'$PY' benchmarks/throughput.py --env-id $ENV_ID --async-envs \
    --iterations $ITERATIONS > '$OUT/throughput_async.md' 2>> '$LOG'"
cat "$OUT/throughput_async.md"
step throughput-sync 150 bash -c "'$PY' benchmarks/throughput.py --env-id $ENV_ID --iterations 2 \
    --methods ppo_mtl_embed ppo_varshare > '$OUT/throughput_sync.md' 2>> '$LOG'"
cat "$OUT/throughput_sync.md"

RUNS=$(mktemp -d)
step learning-run 200 bash -c "'$PY' algos/ppo_mtl_embed.py --env-id $ENV_ID --seed 1 --async-envs \
    --total-timesteps $LEARN_STEPS --eval-every $((LEARN_STEPS / 2)) --eval-episodes 5 --final-eval-episodes 10 \
    --runs-dir '$RUNS' >> '$LOG' 2>&1"
tar -czf "$OUT/learning_run.tar.gz" -C "$RUNS" --exclude checkpoint.pt . 2>> "$LOG"
grep -h . "$RUNS"/*/eval.jsonl 2>/dev/null | tail -n 3
