#!/usr/bin/env bash
# One device call that measures everything the README and docs/performance.md quote for the
# trainer and the profiling reports, in priority order, each part under a time guard so that a
# slow part cannot starve the rest (the device call has a hard limit):
#   1. python -m profiling compare: ResNet-50, 224 px, batch 256, projector 8192-8192-8192, bf16,
#      LARS, --fused; e2e / simultaneous / sequential (default heads: expander 2048 as the paper)
#   2. the learning check on a CIFAR-10-layout folder (scripts/gpu_learning_check.sh)
#   3. the Barlow Twins loss benchmark (fused auto/gram vs eager autocast vs torch.compile)
#   4. NVML counter vs power integration on >= 10 s windows (scripts/gpu_profile_energy.py)
#   5. the same compare with --no-expander-recompute (the expander's map stored for backward)
#   6. the independent measurement of run 1 (scripts/gpu_profile_independent.py)
#
#   OUT=dir DATA=cifar_dir BUDGET_S=560 bash scripts/gpu_session.sh
# Settings for a CPU dry run of the script itself: ARCH=resnet18 IMG=16 BATCH=8 PROJ=32-32
# DEVICE=cpu STEPS=2 WARMUP=1 EPOCHS=1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session_out}; WORK=${WORK:-/tmp/gpu_session}
DATA=${DATA:?DATA=<ImageFolder dir with train/ and val/>}
BUDGET_S=${BUDGET_S:-560}; ARCH=${ARCH:-resnet50}; IMG=${IMG:-224}; BATCH=${BATCH:-256}
PROJ=${PROJ:-8192-8192-8192}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-10}; WARMUP=${WARMUP:-3}
EPOCHS=${EPOCHS:-25}; LEARN_ARGS=${LEARN_ARGS:-}
mkdir -p "$OUT" "$WORK"; LOG="$OUT/summary.txt"; : > "$LOG"
t0=$SECONDS
say() { echo "$@" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - (SECONDS - t0) )); }
guard() {  # guard NAME MAX_S cmd...: run under min(MAX_S, time left - 5 s)
    local name=$1 max=$2; shift 2
    local t=$(( $(left) - 5 )); [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 20 ]; then say "-- $name: skipped (only $(left) s left)"; return 1; fi
    say "== $name (guard ${t} s, $(( SECONDS - t0 )) s elapsed) =="
    timeout --signal=INT --kill-after=10 "$t" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    say "-- $name: exit $rc, $(( SECONDS - t0 )) s elapsed"
    return $rc
}
nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv 2>&1 | tee -a "$LOG"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

COMPARE=(python -m profiling compare --modes e2e,simultaneous,sequential --arch "$ARCH"
         --image-size "$IMG" --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
         --projector "$PROJ" --device "$DEVICE" --fused on)
guard compare_default 200 "${COMPARE[@]}" --out "$WORK/compare_default"
guard learning 190 bash scripts/gpu_learning_check.sh "$DATA" "$EPOCHS" "$WORK/learning" $LEARN_ARGS
guard bt_bench 75 python -m pytest -q -p no:cacheprovider tests/benchmarks/test_bench_barlow_twins.py \
    --benchmark-only -k "not fused_cross" --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$OUT/bt_bench.json"
guard energy 60 python scripts/gpu_profile_energy.py --out "$WORK/energy" --no-overheads
guard compare_store 150 "${COMPARE[@]}" --out "$WORK/compare_store" -- --no-expander-recompute
if [ -f "$WORK/compare_default/report.json" ]; then
    guard independent 90 python scripts/gpu_profile_independent.py \
        --report "$WORK/compare_default/report.json" --out "$WORK/independent"
fi

for r in compare_default compare_store; do
    [ -f "$WORK/$r/report.md" ] && cp "$WORK/$r/report.md" "$OUT/$r.md"
done
say ""; say "== tables =="
for r in compare_default compare_store; do
    [ -f "$WORK/$r/report.md" ] && { say "## $r"; grep '^|' "$WORK/$r/report.md" | head -40 | tee -a "$LOG"; }
done
grep -h -E "^(ENERGY CHECK|INDEPENDENT CHECK|PASS|FAIL)" "$OUT"/*.log 2>/dev/null | tee -a "$LOG"
tar czf "$OUT/session.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' . 2>/dev/null
say "== done in $(( SECONDS - t0 )) s =="
