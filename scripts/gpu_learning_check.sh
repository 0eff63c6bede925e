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
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

COMMON=(--dataset imagefolder --data-dir "$DATA" --image-size 32 --arch resnet18 --small-stem
        --expander 0 --batch-size 512 --projector 2048-2048-2048 --optimizer lars
        --precision bf16 --channels-last --fused --epochs "$EPOCHS" --probe-epochs 100
        --no-checkpoint --log-interval 10 "$@")

for mode in e2e simultaneous; do
    start=$(date +%s)
    "$PY" -m blockwise.train --mode "$mode" "${COMMON[@]}" --out "$OUT/$mode"
    echo "== $mode: $(( $(date +%s) - start )) s wall (process start to probe end)"
done

"$PY" - "$OUT" "$MARGIN" <<'EOF'
import json, sys
out, margin = sys.argv[1], float(sys.argv[2])
runs = {m: (json.load(open(f"{out}/{m}/probe.json")), json.load(open(f"{out}/{m}/summary.json")))
        for m in ("e2e", "simultaneous")}
print(f"\nlinear probe top-1 (%), {runs['e2e'][0]['num_test']} test images, "
      f"{runs['e2e'][0]['probe_epochs']} probe epochs on cached features")
print(f"{'block':>6} {'e2e':>8} {'simult.':>8} {'random':>8}")
for k in range(1, 5):
    b = f"block{k}"
    print(f"{k:>6} {runs['e2e'][0]['top1'][b]:8.2f} {runs['simultaneous'][0]['top1'][b]:8.2f} "
          f"{runs['simultaneous'][0]['control_top1'][b]:8.2f}")
for mode, (_, s) in runs.items():
    mem = s.get("peak_memory_gib_per_block") or {}
    print(f"{mode}: {s['steps']} steps, {s['time_s']:.1f} s training, {s['pairs_per_s']:.0f} pairs/s;"
          f" loader capacity {s['loader_capacity_pairs_per_s'] or 0:.0f} pairs/s, waiting for data "
          f"{100 * (s['data_wait_share'] or 0):.1f}%; peak memory "
          + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()))
sim, ctrl = runs["simultaneous"][0]["top1"], runs["simultaneous"][0]["control_top1"]
ok = True
for b in sim:
    good = sim[b] - ctrl[b] >= margin
    ok &= good
    print(f"{'PASS' if good else 'FAIL'}: simultaneous {b} {sim[b]:.2f} vs random init "
          f"{ctrl[b]:.2f} (need +{margin:g})")
best = max(sim.values())
e2e4 = runs["e2e"][0]["top1"]["block4"]
good = best >= e2e4 - 2
ok &= good
print(f"{'PASS' if good else 'FAIL'}: best simultaneous block {best:.2f} vs e2e block 4 "
      f"{e2e4:.2f} (need >= {e2e4 - 2:.2f})")
sys.exit(0 if ok else 1)
EOF
