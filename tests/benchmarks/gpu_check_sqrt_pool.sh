#!/usr/bin/env bash
# One GPU session for kernels.sqrt_pool: the CUDA tests, the pytest-benchmark suite (fused vs
# eager vs torch.compile), the launch-candidate sweep, then the compact tables last.
#   PYTHONUNBUFFERED=1 PYTHONPATH=. bash tests/benchmarks/gpu_check_sqrt_pool.sh
# Writes under $OUT (default /tmp/sqrt_pool_gpu): tests.txt, sqrt.json, bench.txt, sweep.json,
# sweep.txt. Each stage has its own time limit so that one slow stage cannot starve the rest:
# TEST_S, BENCH_S, TOTAL_S (seconds; the sweep gets what is left), SWEEP_LAYOUTS (nchw,cl).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/sqrt_pool_gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-.}"
T0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

stamp "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv 2>&1 | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

stamp "tests on CUDA"
if python -c "import xdist" 2>/dev/null; then XDIST=(-n 8); else XDIST=(); fi
timeout "${TEST_S:-70}" python -m pytest -q -x "${XDIST[@]}" -p no:cacheprovider tests/test_sqrt_pool.py \
    > "$OUT/tests.txt" 2>&1
echo "tests rc=$?"; tail -n 15 "$OUT/tests.txt"

stamp "benchmarks"
timeout "${BENCH_S:-170}" python -m pytest -q -p no:cacheprovider tests/benchmarks/test_bench_sqrt_pool.py \
    --benchmark-only --benchmark-json "$OUT/sqrt.json" --benchmark-columns=median,iqr,rounds \
    --benchmark-sort=name > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"; grep -E "passed|failed|error" "$OUT/bench.txt" | tail -n 5

stamp "sweep"
LEFT=$(( ${TOTAL_S:-275} - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 20 ]; then
    timeout "$LEFT" python tests/benchmarks/sweep_sqrt_pool.py sweep --out "$OUT/sweep.json" \
        --deadline-s $(( LEFT - 15 )) --layouts "${SWEEP_LAYOUTS:-nchw,cl}" > "$OUT/sweep.txt" 2>&1
    echo "sweep rc=$?"
fi

stamp "summary"
cat "$OUT/sweep.txt" 2>/dev/null | tail -n 30
[ -f "$OUT/sqrt.json" ] && python tests/benchmarks/sweep_sqrt_pool.py summarize "$OUT/sqrt.json" \
    | tee "$OUT/summary.txt"
stamp "done"
