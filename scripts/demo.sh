#!/usr/bin/env bash
# The main job on the embedded default data (scikit-learn's digits): pretrain SimCLR, then evaluate the
# backbone and the same backbone at a standard random init with kNN and a linear probe, and print the table
# (kNN first: the linear probe saturates on digits).
# Sets up ./.venv on first use. Extra arguments go to `sslpipe pretrain` (e.g. --trainer.max_epochs 5).
set -euo pipefail
start=$SECONDS
source "$(dirname "$0")/common.sh"
root=${SSLPIPE_DEMO_ROOT:-runs/demo}

echo "== pretraining SimCLR on digits (configs/simclr/digits.yaml) =="
pre=$(last_line $sslpipe pretrain --config configs/simclr/digits.yaml --trainer.default_root_dir "$root" "$@")
ckpt=$pre/checkpoints/last.ckpt
echo "== evaluating: kNN and linear probe, trained vs random-init backbone =="
runs=("$pre")
for init in false true; do
  for cmd in knn linear; do
    runs+=("$(last_line $sslpipe $cmd --checkpoint "$ckpt" --random_init $init --trainer.default_root_dir "$root")")
  done
done

echo
echo "== digits (360 held-out images): SimCLR backbone vs the same ResNet-18 at random init =="
$sslpipe report --merge --columns method knn_top1 linear_top1 knn_top5 linear_top5 epochs train_images_per_second -- "${runs[@]}"
echo "kNN top-1 is the headline: a linear probe on 1,437 digits saturates (a random ResNet-18 already reaches ~96%); each method is followed by its <method>-random twin (same architecture, standard init, no zeroed residual branches)."
echo
echo "runs: $pre (pretraining), evaluations beside it in $root"
echo "total time (set-up included): $((SECONDS - start)) s"
