#!/usr/bin/env bash
# CUDA checks of the trainer (the CPU tests cover the logic; this runs the CUDA-only paths:
# bf16 autocast, channels_last, the fused kernels, the side-stream batch copy, per-block peak
# memory, the profiler on a GPU, the OOM exit code), then the memory / throughput table of the
# three modes for ResNet-50 at 224 px, projector 8192-8192-8192, batch 256, bf16, LARS, --fused.
#
#   scripts/gpu_trainer_check.sh [OUT_DIR] [smoke|bar|all]      (default: all, ~8 min on an H100)
#
# The table gives, per mode and variant, the profiler's peak allocated memory and throughput over
# the measured steps, and both as a ratio to e2e of the same variant. Variants: the default heads
# (expander 2048 at every block, as the paper); --split-views (each view back-propagated on its
# own: half the activations for one extra forward); --expander 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_trainer_check-$(date +%Y%m%d-%H%M%S)}
WHAT=${2:-all}
PY=${PYTHON:-python}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
mkdir -p "$OUT"
fail=0
run() {
    echo "+ $*"
    "$@" 2>&1 | tee -a "$OUT/all.log" > "$OUT/last.log"
    local code=${PIPESTATUS[0]}
    tail -n 4 "$OUT/last.log"
    if [ $code -ne 0 ]; then echo "FAILED (exit $code): $*"; tail -n 30 "$OUT/last.log"; fail=1; fi
    return $code
}

if [ "$WHAT" = smoke ] || [ "$WHAT" = all ]; then
    SMALL=(--dataset synthetic --synthetic-augment --image-size 32 --synthetic-size 2048
           --batch-size 128 --projector 256-256 --fused --probe-epochs 5 --log-interval 4
           ${SMOKE_ARGS:-})  # SMOKE_ARGS: extra flags (e.g. a CPU dry run of this script)
    for mode in e2e simultaneous sequential; do
        if [ $mode = sequential ]; then steps=(--steps-per-block 6); else steps=(--max-steps 12); fi
        run "$PY" -m blockwise.train --mode $mode "${SMALL[@]}" "${steps[@]}" --profile \
            --profile-warmup 2 --out "$OUT/smoke_$mode"
        run "$PY" -m blockwise.train --mode $mode "${SMALL[@]}" "${steps[@]}" --split-views \
            --noise-std 0.25 --pool sqrt --out "$OUT/split_$mode"
    done
    # resume: stop after 5 steps, continue to 16 (one epoch); compare with an uninterrupted run
    run "$PY" -m blockwise.train "${SMALL[@]}" --epochs 1 --out "$OUT/resume_full"
    run "$PY" -m blockwise.train "${SMALL[@]}" --epochs 1 --max-steps 5 --out "$OUT/resume_cut"
    run "$PY" -m blockwise.train --resume "$OUT/resume_cut"
    "$PY" - "$OUT" <<'EOF' || fail=1
import json, sys, torch
out = sys.argv[1]
a = torch.load(f"{out}/resume_full/checkpoint.pt", weights_only=False, map_location="cpu")
b = torch.load(f"{out}/resume_cut/checkpoint.pt", weights_only=False, map_location="cpu")
assert a["state"] == b["state"], (a["state"], b["state"])
worst = max(((a["blocks"][k].float() - b["blocks"][k].float()).abs().max().item(), k)
            for k in a["blocks"] if a["blocks"][k].is_floating_point())
print(f"resume on CUDA: same state {a['state']}; largest weight difference vs uninterrupted "
      f"{worst[0]:.3g} ({worst[1]}; cuDNN/bf16 are not bit-reproducible, the CPU test is exact)")
for mode in ("e2e", "simultaneous", "sequential"):
    p = json.load(open(f"{out}/smoke_{mode}/profile.json"))
    names = sorted(p["windows"])
    s = json.load(open(f"{out}/smoke_{mode}/summary.json"))
    print(f"{mode}: profile windows {names}; run peak {p['run']['peak_allocated_gib']} GiB, "
          f"energy {p['run']['energy_j']} J, {p['run']['throughput_img_s']} pairs/s; "
          f"summary: peak {s['peak_memory_gib']} GiB, {s['pairs_per_s']:.0f} pairs/s, loader "
          f"capacity {s['loader_capacity_pairs_per_s']:.0f} pairs/s")
EOF
    # CUDA out of memory: exit code 3 and one line on stderr
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -m blockwise.train --dataset synthetic --arch resnet50 --batch-size 4096 \
        --synthetic-size 4096 --max-steps 1 --probe-epochs 0 --no-checkpoint --fused \
        --out "$OUT/oom" > "$OUT/oom.log" 2> "$OUT/oom.err"
    code=$?
    echo "OOM run: exit code $code (expected 3); stderr: $(tail -n 1 "$OUT/oom.err")"
    [ $code -eq 3 ] || fail=1
    fi
fi

if [ "$WHAT" = bar ] || [ "$WHAT" = all ]; then
    BAR=(--dataset synthetic --arch resnet50 --image-size 224 --batch-size 256
         --synthetic-size 6400 --projector 8192-8192-8192 --optimizer lars --precision bf16
         --fused --probe-epochs 0 --profile --profile-warmup 5 --log-interval 5)
    variants=("default" "split" "noexp")
    for v in "${variants[@]}"; do
        case $v in
            default) extra=();;
            split) extra=(--split-views);;
            noexp) extra=(--expander 0);;
        esac
        for mode in e2e simultaneous sequential; do
            if [ $mode = sequential ]; then steps=(--steps-per-block 15); else steps=(--max-steps 25); fi
            run "$PY" -m blockwise.train --mode $mode "${BAR[@]}" "${steps[@]}" "${extra[@]}" \
                --out "$OUT/bar_${v}_$mode"
        done
    done
    "$PY" - "$OUT" "${variants[@]}" <<'EOF' || fail=1
import json, os, sys
out, variants = sys.argv[1], sys.argv[2:]
print(f"\nResNet-50 224 px, batch 256, projector 8192-8192-8192, bf16, LARS, --fused "
      f"(measured steps after 5 warm-up; sequential: 10 per block)")
print(f"{'variant':>8} {'mode':>13} {'peak GiB':>9} {'x e2e':>6} {'pairs/s':>8} {'x e2e':>6}  per-block peak GiB")
for v in variants:
    base = None
    for mode in ("e2e", "simultaneous", "sequential"):
        path = f"{out}/bar_{v}_{mode}/profile.json"
        if not os.path.exists(path):
            print(f"{v:>8} {mode:>13}   (no profile.json: failed or out of memory)")
            continue
        p = json.load(open(path))
        peak, thr = p["run"]["peak_allocated_gib"], p["run"]["throughput_img_s"]
        if mode == "e2e":
            base = (peak, thr)
        if mode == "sequential":  # one measured segment per block: its own peak
            blocks = {s["label"]: round(s["peak_allocated_gib"], 2) for s in p["run"]["segments"]}
        else:
            blocks = {k: round(w["peak_allocated_gib"], 2) for k, w in sorted(p["windows"].items())
                      if k.count("/") == 0 and k.startswith("block") and w["peak_allocated_gib"]}
        rp = f"{peak / base[0]:6.2f}" if base else "     -"
        rt = f"{thr / base[1]:6.2f}" if base else "     -"
        print(f"{v:>8} {mode:>13} {peak:9.2f} {rp} {thr:8.0f} {rt}  {blocks}")
EOF
fi
echo "gpu_trainer_check: $([ $fail -eq 0 ] && echo OK || echo FAILURES) (outputs in $OUT)"
exit $fail
