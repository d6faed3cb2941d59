#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, checks format and lint (ruff), then runs the default (non-slow)
# test suite on the CPU.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m slow   or   ./scripts/test.sh tests/test_losses.py
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
export WANDB_MODE=offline WANDB_SILENT=true PYTHONHASHSEED=0
# Style is part of the suite: a formatting or lint violation fails CI like a failing test.
.venv/bin/ruff format --check --quiet . || { echo "ruff format: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
