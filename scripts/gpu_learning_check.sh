#!/usr/bin/env bash
# Learning check on one GPU: end-to-end vs simultaneous blockwise Barlow Twins, ResNet-18 with the
# small stem on a CIFAR-10-layout ImageFolder (DATA_DIR/train/<class>/*.png, DATA_DIR/val/...),
# 32x32, batch 512, projector 2048-2048-2048, LARS, bf16 autocast, --fused kernels, EPOCHS epochs
# per mode; then the linear probe of every block next to its random-initialisation control.
#
#   scripts/gpu_learning_check.sh DATA_DIR [EPOCHS=20] [OUT_DIR] [extra train flags...]
#
# Pass criteria (printed, exit status 1 when one fails):
#   - every block of the simultaneous run probes at least MARGIN (default 3) points above the
#     same block at random initialisation;
#   - the best simultaneous block is within 2 points of e2e's block 4 (equal epochs).
# Runs of several calls: the run directories come back with the call's files; put them under one
# folder and run `python scripts/learning_summary.py FOLDER` (this script ends with the same).
# Budget: about 4 minutes on an H100 for 10,000 training images at 20 epochs per mode (the
# summary of each run prints the step rate, the loader's capacity and the time spent waiting
# for data: if "waiting for data" is large, raise --workers).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/gpu_learning_check.sh DATA_DIR [EPOCHS] [OUT_DIR] [extra flags]}
EPOCHS=${2:-20}
OUT=${3:-runs/learning_check-$(date +%Y%m%d-%H%M%S)}
shift $(( $# < 3 ? $# : 3 ))
PY=${PYTHON:-python}
MARGIN=${MARGIN:-3}
MODES=${MODES:-e2e simultaneous}   # one mode per device call for long runs (80 epochs)
TAG=${TAG:-}                       # run-directory suffix for ablations, e.g. TAG=_sqrt --pool sqrt
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

COMMON=(--dataset imagefolder --data-dir "$DATA" --image-size 32 --arch resnet18 --small-stem
        --expander 0 --batch-size 512 --projector 2048-2048-2048 --optimizer lars
        --precision bf16 --channels-last --fused --epochs "$EPOCHS" --probe-epochs 100
        --no-checkpoint --log-interval 10 "$@")

for mode in $MODES; do
    start=$(date +%s)
    "$PY" -m blockwise.train --mode "$mode" "${COMMON[@]}" --out "$OUT/$mode$TAG"
    echo "== $mode$TAG: $(( $(date +%s) - start )) s wall (process start to probe end)"
done

"$PY" scripts/learning_summary.py "$OUT" --margin "$MARGIN"
