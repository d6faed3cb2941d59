#!/usr/bin/env bash
# Multi-GPU / multi-node pretraining with torchrun (DDP, one process per GPU).
#
#   scripts/launch_torchrun.sh configs/simclr/imagefolder.yaml [--key value ...]
#
# Environment (defaults for one node):
#   NPROC_PER_NODE  GPUs per node (default: all visible GPUs)
#   NNODES          number of nodes (1);  NODE_RANK  this node's rank (0)
#   MASTER_ADDR     address of node 0 (127.0.0.1);  MASTER_PORT (29500)
#   SSLPIPE_RUN_ID  names the run directory; on several nodes set the SAME value on each (default: the time,
#                   which only agrees on one node)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [--key value ...]" >&2; exit 2; }
config=$1; shift
./scripts/setup_env.sh
nproc=${NPROC_PER_NODE:-$(.venv/bin/python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
nnodes=${NNODES:-1}
export SSLPIPE_RUN_ID=${SSLPIPE_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
export WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/torchrun \
  --nnodes "$nnodes" --nproc_per_node "$nproc" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m sslpipe.cli pretrain --config "$config" \
  --trainer.devices "$nproc" --trainer.num_nodes "$nnodes" --trainer.strategy ddp "$@"
