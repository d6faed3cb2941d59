#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the default (non-slow) test suite on the CPU.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m slow   or   ./scripts/test.sh tests/test_losses.py
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
export WANDB_MODE=offline WANDB_SILENT=true PYTHONHASHSEED=0
exec .venv/bin/python -m pytest "$@"
