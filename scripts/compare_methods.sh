#!/usr/bin/env bash
# Every method on the embedded digits data at the demo's budget: pretrain with configs/<method>/digits.yaml,
# then kNN and linear probe on the trained backbone and on the same architecture at a standard random init
# (its <method>-random twin, no zeroed residual branches), and print
# one table. Usage: scripts/compare_methods.sh [METHOD ...]   (default: all; e.g. `moco_v2 pirl`).
# Extra pretraining flags go in SSLPIPE_PRETRAIN_ARGS, split on spaces (e.g. "--trainer.max_epochs 5").
set -euo pipefail
start=$SECONDS
source "$(dirname "$0")/common.sh"
root=${SSLPIPE_COMPARE_ROOT:-runs/compare}
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(simclr moco_v2 moco_v3 pirl mae simmim dae)
read -r -a extra <<< "${SSLPIPE_PRETRAIN_ARGS:-}"

runs=()
for m in "${methods[@]}"; do
  cfg=configs/$m/digits.yaml
  [ -f "$cfg" ] || { echo "no config $cfg: methods are the folders under configs/" >&2; exit 2; }
  echo "== $m: pretraining ($cfg) =="
  t0=$SECONDS
  pre=$(last_line $sslpipe pretrain --config "$cfg" --trainer.default_root_dir "$root" ${extra[@]+"${extra[@]}"})
  echo "$m: pretraining took $((SECONDS - t0)) s" >&2
  runs+=("$pre")
  for init in false true; do
    for cmd in knn linear; do
      runs+=("$(last_line $sslpipe $cmd --checkpoint "$pre/checkpoints/last.ckpt" --random_init $init \
                 --trainer.default_root_dir "$root")")
    done
  done
done

echo
echo "== digits (360 held-out images): each method's backbone vs the same architecture at random init =="
$sslpipe report --merge --columns method knn_top1 linear_top1 online_linear_top1 epochs train_images_per_second -- "${runs[@]}"
echo "kNN top-1 is the headline: a linear probe on 1,437 digits saturates (a random ResNet-18 already reaches ~96%); each method is followed by its <method>-random twin (same architecture, standard init, no zeroed residual branches)."
echo
echo "runs in $root; total time (set-up included): $((SECONDS - start)) s"
