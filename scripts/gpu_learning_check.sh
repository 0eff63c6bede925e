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
# PARALLEL=1: all runs at the same time; VARIANTS: more runs (see below)
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

COMMON=(--dataset imagefolder --data-dir "$DATA" --image-size 32 --arch resnet18 --small-stem
        --expander 0 --batch-size 512 --projector 2048-2048-2048 --optimizer lars
        --precision bf16 --channels-last --fused --epochs "$EPOCHS" --probe-epochs 100
        --no-checkpoint --log-interval 10 "$@")

# The runs: one per mode (directory <mode><TAG>), then one per VARIANTS entry
# ("name:flags;name:flags", e.g. VARIANTS="simultaneous_sqrt:--mode simultaneous --pool sqrt;
# simultaneous_noise:--mode simultaneous --noise-std 0.25"); a variant's flags come last, so
# they override the common ones.
names=(); flags=()
for mode in $MODES; do names+=("$mode$TAG"); flags+=("--mode $mode"); done
IFS=';' read -ra specs <<< "${VARIANTS:-}"
for spec in "${specs[@]}"; do
    [ -z "${spec// /}" ] && continue
    case $spec in *:*) ;; *) echo "VARIANTS entry '$spec' is not name:flags" >&2; exit 2 ;; esac
    name=$(echo "${spec%%:*}" | tr -d ' '); names+=("$name"); flags+=("${spec#*:}")
done

if [ "${PARALLEL:-0}" = 1 ]; then
    # All runs at once, one process each, sharing the GPU (a ResNet-18 at 32 px does not fill an
    # H100) and the CPU cores (loader workers split between them); logs in $OUT/<run>.log.
    # Step rates of concurrent runs are not those of a run alone: use them for learning only.
    count=${#names[@]}
    workers=$(( ($(nproc) - 1) / count )); [ "$workers" -lt 1 ] && workers=1
    mkdir -p "$OUT"; pids=()
    for k in "${!names[@]}"; do
        # shellcheck disable=SC2086  # a run's flags are words
        "$PY" -m blockwise.train "${COMMON[@]}" ${flags[$k]} --workers "$workers" \
            --out "$OUT/${names[$k]}" > "$OUT/${names[$k]}.log" 2>&1 &
        pids+=($!)
    done
    start=$(date +%s); failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    for name in "${names[@]}"; do tail -n 25 "$OUT/$name.log"; done
    echo "== ${names[*]} in parallel: $(( $(date +%s) - start )) s wall"
    [ "$failed" = 0 ] || { echo "a run failed (logs in $OUT)" >&2; exit 1; }
else
    for k in "${!names[@]}"; do
        start=$(date +%s)
        # shellcheck disable=SC2086
        "$PY" -m blockwise.train "${COMMON[@]}" ${flags[$k]} --out "$OUT/${names[$k]}"
        echo "== ${names[$k]}: $(( $(date +%s) - start )) s wall (process start to probe end)"
    done
fi

"$PY" scripts/learning_summary.py "$OUT" --margin "$MARGIN"
