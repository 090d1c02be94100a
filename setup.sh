#!/usr/bin/env bash
# Creates .venv from requirements.txt when it is missing (or incomplete). Sourced by run_all.sh
# and tests/run.sh; safe to run on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.requirements-installed ] || ! cmp -s requirements.txt .venv/.requirements-installed; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/pip check
  cp requirements.txt .venv/.requirements-installed
fi
