#!/usr/bin/env bash
# GPU check of the profiling package (issue 5). Run on a CUDA machine from anywhere:
#
#   OUT=/some/dir bash scripts/gpu_profile_check.sh
#
# Parts (PARTS, default all, in this order; about 7 minutes on an H100 in total):
#   tests        CUDA paths of tests/test_energy.py, test_memory.py, test_profiler.py
#   energy       per-call overheads; >= 10 s windows measured by the NVML counter and by power
#                integration at once (and by nvidia-smi): pass if within 10 %
#   compare      python -m profiling compare, ResNet-50, 224 px, batch 256, projector
#                8192-8192-8192, bf16, STEPS measured steps after WARMUP (sequential: per block)
#   independent  the same trainer steps timed in a plain loop with CUDA events,
#                max_memory_allocated and nvidia-smi power (another process): pass if memory and
#                throughput within 10 %, energy per image within 15 % of the compare report
#   maxbatch     largest batch per mode: ResNet-50, 224 px, the same projector, bf16; coarse on
#                purpose to stay in the time budget: from 256, multiples of 64, MB_PROBES probes
#                per mode (a fresh trainer process each, 2 steps; sequential 2 per block)
#
# Results: $OUT/summary.txt (everything printed, tables last), compare_report.md/.json,
# maxbatch.md, and profile_check.tar.gz (all reports, plots, JSON, trainer logs; no weights).
# Exit code 0 only if every part that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_profile_check_out}"
WORK="${WORK:-/tmp/gpu_profile_check}"
STEPS="${STEPS:-15}"
WARMUP="${WARMUP:-5}"
MB_PROBES="${MB_PROBES:-3}"
PROJECTOR="${PROJECTOR:-8192-8192-8192}"
PARTS="${PARTS:-tests energy compare independent maxbatch}"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/summary.txt"
: > "$LOG"
status=0
t0=$SECONDS

say() { echo "$@" | tee -a "$LOG"; }
part() { [[ " $PARTS " == *" $1 "* ]]; }
stamp() { say "-- $1: exit $2, $((SECONDS - t0)) s elapsed"; [ "$2" -eq 0 ] || status=1; }

say "== scripts/gpu_profile_check.sh $(date -u +%FT%TZ) on $(hostname) =="
nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total,clocks.max.sm \
    --format=csv 2>&1 | tee -a "$LOG"
python -c "import torch, platform, importlib.metadata as m; print('python', \
platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
m.version('triton'), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
    2>&1 | tee -a "$LOG"
say "settings: STEPS=$STEPS WARMUP=$WARMUP MB_PROBES=$MB_PROBES PROJECTOR=$PROJECTOR PARTS='$PARTS'"

if part tests; then
    say "== tests =="
    python -m pytest -q -p no:cacheprovider tests/test_energy.py tests/test_memory.py \
        tests/test_profiler.py 2>&1 | tail -6 | tee -a "$LOG"
    stamp tests "${PIPESTATUS[0]}"
fi

if part energy; then
    say "== energy: counter vs power integration =="
    python scripts/gpu_profile_energy.py --out "$WORK" 2>&1 | tee -a "$LOG"
    stamp energy "${PIPESTATUS[0]}"
fi

if part compare; then
    say "== compare =="
    python -m profiling compare --modes e2e,simultaneous,sequential --arch resnet50 \
        --image-size 224 --batch-size 256 --steps "$STEPS" --warmup "$WARMUP" \
        --projector "$PROJECTOR" --device cuda --out "$WORK/compare" --overwrite \
        -- --precision bf16 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    cp "$WORK/compare/report.md" "$OUT/compare_report.md" 2>/dev/null
    cp "$WORK/compare/report.json" "$OUT/compare_report.json" 2>/dev/null
    stamp compare "$rc"
fi

if part independent; then
    say "== independent measurement =="
    if [ -f "$WORK/compare/report.json" ]; then
        python scripts/gpu_profile_independent.py --report "$WORK/compare/report.json" \
            --out "$WORK" 2>&1 | tee -a "$LOG"
        stamp independent "${PIPESTATUS[0]}"
    else
        say "no compare report: run the compare part first"
        stamp independent 1
    fi
fi

if part maxbatch; then
    say "== maxbatch =="
    python -m profiling maxbatch --modes e2e,simultaneous,sequential --arch resnet50 \
        --image-size 224 --projector "$PROJECTOR" --device cuda --start 256 --granularity 64 \
        --max-probes "$MB_PROBES" --max-batch 4096 --out "$WORK/maxbatch" \
        -- --precision bf16 --workers 4 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    cp "$WORK/maxbatch/maxbatch.md" "$OUT/maxbatch.md" 2>/dev/null
    stamp maxbatch "$rc"
fi

# the tables again, last, so that the end of the output holds them
if [ -f "$WORK/compare/report.md" ]; then
    say ""
    sed -n '/^## Summary/,/^!\[/p' "$WORK/compare/report.md" | grep '^|' | tee -a "$LOG"
    sed -n '/^## Per block/,/^Sequential per-image/p' "$WORK/compare/report.md" | grep '^|' \
        | tee -a "$LOG"
fi
[ -f "$WORK/maxbatch/maxbatch.md" ] && grep '^|' "$WORK/maxbatch/maxbatch.md" | tee -a "$LOG"
grep -h -E "^(ENERGY CHECK|INDEPENDENT CHECK)" "$LOG" | sort -u
tar czf "$OUT/profile_check.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' . 2>/dev/null
say "== done in $((SECONDS - t0)) s, exit $status =="
exit $status
