#!/usr/bin/env bash
# The main job: the experiment matrix, then the report (the logic is shared/matrix.py).
#   bash run_all.sh              the quick matrix: every method plus the capacity-matched (wide) and
#                                L2Soft rows on cartpole-mt, seeds 1-2, about 5 minutes on 2 cores;
#                                report in report/quick/README.md
#   bash run_all.sh --suite mt10 --seeds 1-5 --launcher slurm            the study on a cluster
#   bash run_all.sh --suite mt10 --seeds 1-5 --launcher slurm --status   where its tasks are
#   bash run_all.sh --suite mt10 --seeds 1-5 --loo all --launcher slurm   plus leave-one-out transfer
#   bash run_all.sh --help       every option; flags after -- go to every script
# A rerun skips finished runs, resumes interrupted ones and starts the missing ones.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
exec .venv/bin/python -m shared.matrix "$@"
