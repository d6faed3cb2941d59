# Sourced by demo.sh and compare_methods.sh: set up ./.venv, W&B offline, and the run-directory helper.
set -euo pipefail  # last_line relies on pipefail: a failing command must not hide behind tee's success
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
sslpipe=.venv/bin/sslpipe

# Run a command, showing its output as it runs, and print its last line (every sslpipe command's run
# directory). tee writes to the inherited stderr descriptor: `tee /dev/stderr` would re-open, and
# truncate, a redirected log file.
last_line() {
  local log; log=$(mktemp)
  "$@" | tee -a "$log" >&2 || { rm -f "$log"; return 1; }
  tail -n 1 "$log"; rm -f "$log"
}
