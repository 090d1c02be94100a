#!/usr/bin/env bash
# The test command: sets up .venv when missing, lints (ruff, configured in pyproject.toml), then runs
# the whole pytest suite. A lint finding fails it before any test runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash setup.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
