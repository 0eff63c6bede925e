#!/usr/bin/env bash
# One device call that measures what the README and docs/performance.md quote, part by part, in
# the order PARTS gives, each part under a time guard so that a slow part cannot starve the rest
# (a device call has a hard limit of 600 s; a session has 30 minutes of device time):
#
#   cuda_tests       the CUDA paths of the kernel tests (sqrt_pool, Barlow Twins, ExpanderPool
#                    kernels) and of the expander / trainer tests: new kernel code first
#                    (40 tests passed in 150 s on an H100 in one process, before the graphs
#                    tests: Triton compiles; now 8 processes where pytest-xdist is installed)
#   cuda_only        only the tests that skip without CUDA (real CUDA graphs, the trainer with
#                    --loss-cuda-graphs and checkpointing on CUDA, memory and profiler peaks)
#   compare_default  python -m profiling compare: ResNet-50, 224 px, batch 256, projector
#                    8192-8192-8192, bf16, LARS, --fused; e2e / simultaneous / sequential with the
#                    default heads (expander 2048 at every block, as the paper)
#   compare_noexp    the same with --expander 0 (the issue's prototype had no expander)
#   compare_split    the same with --split-views (each view back-propagated on its own)
#   compare_ckpt     the same with --activation-checkpointing (each residual unit recomputed)
#   compare_ckpt_split  with --activation-checkpointing --split-views (the least memory)
#   compare_ckpt1_split  --activation-checkpointing --checkpoint-blocks 1 --split-views (only
#                    block 1 recomputed: it holds most of the activations, for the least compute)
#   compare_noexp_ckpt_split  --expander 0 --activation-checkpointing --split-views
#                    (the memory-option parts also run e2e without the options first: the
#                    ratio baseline of their report, as the issue's bars are against plain e2e)
#   compare_store    the same with --no-expander-recompute (the expander's map stored)
#   independent      compare_default's steps (else compare_noexp's) timed in a plain loop
#                    (scripts/gpu_profile_independent.py)
#   energy           NVML counter vs power integration on >= 10 s windows
#   maxbatch         python -m profiling maxbatch, the compare settings, one process per mode
#                    (maxbatch_e2e/, maxbatch_simultaneous/, maxbatch_sequential/): 4 probes of
#                    30-48 s each per mode, about 450-500 s for the three
#   bt_bench         the Barlow Twins loss benchmark (fused vs eager autocast vs torch.compile,
#                    host_floor: one empty launch each way, the host's cost per call;
#                    fused_graph: the loss with cuda_graphs=True, replayed from CUDA graphs;
#                    torch_compile_graphs: torch.compile mode="reduce-overhead", its baseline)
#   bt_accuracy      the Barlow Twins loss against float64 at D=8192, bf16, N 256/1024/2048,
#                    random and correlated views: issue 3's accuracy line, PASS/MISS per row
#   expander_bench   the ExpanderPool benchmark (fused kernels vs torch path vs the plain head)
#   step_bench       one training step per mode (ResNet-50 224 px bf16, batch 128), peak memory
#                    and energy per pair, torch and fused: a second, pytest-benchmark measurement
#                    of the compare figures (table with ratios to e2e)
#   learning         the learning check on a CIFAR-10-layout folder (scripts/gpu_learning_check.sh)
#
#   OUT=dir DATA=cifar_dir BUDGET_S=570 PARTS="cuda_tests compare_default" bash scripts/gpu_session.sh
#
# $OUT gets two files (the device returns few): summary.txt (every part's status, the tables and
# a PASS/MISS line per issue bar, scripts/issue_bars.py)
# and session.tar.gz (logs, reports, plots, benchmark JSON; no weights).
# Suggested split of one session's 30 minutes of device time (each call also pays the machine's
# start-up, ~30 s on an H100; a task may be lent a machine for one call only, as the fifth
# session was: put first what no earlier session measured). Guards in seconds:
#   1. PARTS="cuda_only bt_bench bt_accuracy energy compare_noexp"  (150 + 150 + 90 + 75 + 170;
#      each compare run took 30-47 s wall on the H100 in the fifth session, mostly process
#      start-up, so a three-mode compare needs ~140 s; the last part gets what is left):
#      the CUDA-graph tests, every line of issue 3's bar on the current loss code, counter vs
#      integration, the throughput bar without expanders
#   2. PARTS="independent compare_ckpt1_split" (120 + 210; independent reads call 1's
#      compare_noexp/ when $WORK survived on a still-warm machine, else SEED=<dir holding it>), or
#      PARTS="compare_default independent compare_ckpt1_split" when nothing is carried;
#      PARTS="maxbatch" in a call of its own (3 x 200)
#   3. PARTS="cuda_tests compare_noexp_ckpt_split step_bench expander_bench"
#   measured in the fifth session (commit b352a4d): compare_default, compare_ckpt_split (reports
#      in docs/reports/h100_session5_*); cuda_tests passed 40 tests before its guard
#   later: PARTS="learning" EPOCHS=80 PARALLEL=1 (e2e and simultaneous at the same time, one
#      process each: ResNet-18 at 32 px does not fill the GPU); without PARALLEL one mode per
#      call at 80 epochs (MODES=e2e, then MODES=simultaneous); DATA needed only here;
#      scripts/learning_summary.py puts calls together; ablations in one call:
#      MODES=simultaneous PARALLEL=1 VARIANTS="simultaneous_sqrt:--mode simultaneous --pool sqrt;
#      simultaneous_noise:--mode simultaneous --noise-std 0.25;simultaneous_exp:--mode
#      simultaneous --expander 512"
# STEPS (measured steps per run, default 20, as the README's compare command): at 10 the e2e
# window was 1.4 s on the H100 and two identical e2e runs differed by 8% in energy per pair
# (0.4% in throughput); 20 adds about 15 s to a three-mode compare.
# Settings for a CPU dry run of the script itself: ARCH=resnet18 IMG=16 BATCH=8 PROJ=32-32
# DEVICE=cpu STEPS=2 WARMUP=1 EPOCHS=1 PARTS="compare_default learning".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session_out}; WORK=${WORK:-/tmp/gpu_session}
DATA=${DATA:-}
BUDGET_S=${BUDGET_S:-570}; ARCH=${ARCH:-resnet50}; IMG=${IMG:-224}; BATCH=${BATCH:-256}
PROJ=${PROJ:-8192-8192-8192}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-20}; WARMUP=${WARMUP:-3}
EPOCHS=${EPOCHS:-25}; LEARN_ARGS=${LEARN_ARGS:-}
PARTS=${PARTS:-cuda_tests compare_default compare_split compare_noexp}
VALID="cuda_tests cuda_only compare_default compare_split compare_noexp compare_store compare_ckpt
       compare_ckpt_split compare_ckpt1_split compare_noexp_ckpt_split independent energy maxbatch bt_bench bt_accuracy
       expander_bench step_bench learning"
for part in $PARTS; do  # a typo must not cost a device call: check every name first
    case " $(echo $VALID) " in *" $part "*) ;; *)
        echo "gpu_session.sh: unknown part '$part'; valid: $(echo $VALID)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT" "$WORK"; LOG="$OUT/summary.txt"; : > "$LOG"
# SEED=dir: an earlier call's parts (e.g. compare_default, carried back) copied into $WORK
# first, so that a part that reads them (independent) can run in a later call
[ -n "${SEED:-}" ] && cp -r "$SEED"/. "$WORK"/
t0=$SECONDS
say() { echo "$@" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - (SECONDS - t0) )); }
guard() {  # guard NAME MAX_S cmd...: run under min(MAX_S, time left - 5 s)
    local name=$1 max=$2; shift 2
    local t=$(( $(left) - 5 )); [ "$t" -gt "$max" ] && t=$max
    if [ "$t" -lt 20 ]; then say "-- $name: skipped (only $(left) s left)"; return 1; fi
    say "== $name (guard ${t} s, $(( SECONDS - t0 )) s elapsed) =="
    timeout --signal=INT --kill-after=10 "$t" "$@" 2>&1 | tee -a "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    say "-- $name: exit $rc, $(( SECONDS - t0 )) s elapsed"
    return $rc
}
nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv 2>&1 | tee -a "$LOG"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$LOG"

# --overwrite: a part run again on a machine whose $WORK survived (or that SEED filled)
# replaces that part's earlier report, as the part means (compare refuses it otherwise)
COMPARE=(python -m profiling compare --modes e2e,simultaneous,sequential --arch "$ARCH"
         --image-size "$IMG" --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
         --projector "$PROJ" --device "$DEVICE" --fused on --overwrite)
bench_table() {  # bench_table NAME BASELINE: the benchmark JSON as tables in summary.txt
    [ -f "$WORK/$1.json" ] && python -m profiling bench "$WORK/$1.json" --baseline "$2" \
        --out "$WORK/$1.md" | tee -a "$LOG"
}
MEMOPTS=activation-checkpointing,split-views  # the option runs' e2e baseline runs without them
# the kernel tests' time on a GPU machine is Triton compiling: spread it over 8 processes
# where pytest-xdist is installed (the H100 image has it)
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
BENCH=(python -m pytest -q -p no:cacheprovider --benchmark-only
       --benchmark-columns=median,iqr,rounds)

for part in $PARTS; do
    case $part in
        cuda_tests)
            guard cuda_tests 150 python -m pytest -q -p no:cacheprovider -x $XDIST \
                tests/test_expander_pool_kernel.py tests/test_barlow_twins.py \
                tests/test_sqrt_pool.py tests/test_expander.py tests/test_trainer.py \
                tests/test_barlow_twins_graphs.py ;;  # last: -x stops at the first failure
        cuda_only)
            guard cuda_only 150 python -m pytest -q -p no:cacheprovider -rs \
                tests/test_barlow_twins_graphs.py::test_real_cuda_graphs \
                tests/test_trainer.py::test_loss_cuda_graphs_same_trajectory_on_cuda \
                tests/test_trainer.py::test_activation_checkpointing_on_cuda_lowers_the_peak_with_the_same_gradients \
                tests/test_memory.py::test_real_cuda_nested_peaks \
                tests/test_profiler.py::test_real_cuda_profile ;;
        compare_default)
            guard compare_default 170 "${COMPARE[@]}" --out "$WORK/compare_default" ;;
        compare_split)
            guard compare_split 200 "${COMPARE[@]}" --out "$WORK/compare_split" \
                --baseline-without split-views -- --split-views ;;
        compare_ckpt)
            guard compare_ckpt 210 "${COMPARE[@]}" --out "$WORK/compare_ckpt" \
                --baseline-without activation-checkpointing -- --activation-checkpointing ;;
        compare_ckpt_split)
            guard compare_ckpt_split 210 "${COMPARE[@]}" --out "$WORK/compare_ckpt_split" \
                --baseline-without "$MEMOPTS" -- --activation-checkpointing --split-views ;;
        compare_ckpt1_split)
            guard compare_ckpt1_split 210 "${COMPARE[@]}" --out "$WORK/compare_ckpt1_split" \
                --baseline-without "$MEMOPTS,checkpoint-blocks" -- --activation-checkpointing \
                --checkpoint-blocks 1 --split-views ;;
        compare_noexp_ckpt_split)
            guard compare_noexp_ckpt_split 210 "${COMPARE[@]}" --out "$WORK/compare_noexp_ckpt_split" \
                --baseline-without "$MEMOPTS" -- --expander 0 --activation-checkpointing --split-views ;;
        compare_noexp)
            guard compare_noexp 170 "${COMPARE[@]}" --out "$WORK/compare_noexp" -- --expander 0 ;;
        compare_store)
            guard compare_store 150 "${COMPARE[@]}" --out "$WORK/compare_store" \
                -- --no-expander-recompute ;;
        independent)
            # compare_default's report, else compare_noexp's: both at issue 5's settings
            rep=""
            for r in compare_default compare_noexp; do
                [ -f "$WORK/$r/report.json" ] && { rep="$WORK/$r/report.json"; break; }
            done
            if [ -n "$rep" ]; then
                guard independent 120 python scripts/gpu_profile_independent.py \
                    --report "$rep" --out "$WORK/independent"
            else
                say "-- independent: skipped (needs compare_default or compare_noexp in this call or in SEED)"
            fi ;;
        energy)
            guard energy 75 python scripts/gpu_profile_energy.py --out "$WORK/energy" --no-overheads ;;
        maxbatch)
            # one process per mode: maxbatch writes its report only at its end, so a guard that
            # stops a mode's search loses that mode alone (each probe is a fresh trainer, 30-48 s)
            for m in e2e simultaneous sequential; do
                guard "maxbatch_$m" 200 python -m profiling maxbatch --modes "$m" \
                    --arch "$ARCH" --image-size "$IMG" --projector "$PROJ" --device "$DEVICE" \
                    --fused on --start "$BATCH" --granularity 64 --max-probes 4 --max-batch 4096 \
                    --out "$WORK/maxbatch_$m" -- --precision bf16
            done ;;
        bt_bench)
            guard bt_bench 150 "${BENCH[@]}" tests/benchmarks/test_bench_barlow_twins.py \
                -k "not fused_cross" --benchmark-json "$WORK/bt_bench.json"
            bench_table bt_bench torch_compile ;;
        bt_accuracy)
            guard bt_accuracy 90 env OUT="$WORK/bt_accuracy" BT_STAGES=accuracy \
                BT_BUDGET_S=80 python tests/benchmarks/gpu_check_barlow_twins.py ;;
        expander_bench)
            guard expander_bench 90 "${BENCH[@]}" tests/benchmarks/test_bench_expander.py \
                --benchmark-json "$WORK/expander_bench.json"
            bench_table expander_bench torch ;;
        step_bench)
            guard step_bench 240 "${BENCH[@]}" tests/benchmarks/test_bench_train_step.py \
                --benchmark-json "$WORK/step_bench.json"
            bench_table step_bench e2e ;;
        learning)
            if [ -z "$DATA" ]; then say "-- learning: skipped (DATA not set)"; continue; fi
            export MODES=${MODES:-e2e simultaneous}  # MODES, PARALLEL, VARIANTS, TAG: read by
            export PARALLEL=${PARALLEL:-0} VARIANTS=${VARIANTS:-}  # gpu_learning_check.sh
            guard learning 560 bash scripts/gpu_learning_check.sh "$DATA" "$EPOCHS" \
                "$WORK/learning" $LEARN_ARGS ;;
    esac
done

say ""; say "== tables =="
for r in compare_default compare_split compare_noexp compare_store compare_ckpt compare_ckpt_split \
         compare_ckpt1_split compare_noexp_ckpt_split; do
    if [ -f "$WORK/$r/report.md" ]; then
        say "## $r"; grep '^|' "$WORK/$r/report.md" | head -40 | tee -a "$LOG"
    fi
done
for f in "$WORK"/maxbatch_*/maxbatch.md; do [ -f "$f" ] && grep '^|' "$f" | tee -a "$LOG"; done
grep -h -E "^(ENERGY CHECK|INDEPENDENT CHECK|PASS|FAIL|accuracy N=)" "$WORK"/*.log 2>/dev/null | tee -a "$LOG"
say ""; say "== issue bars (scripts/issue_bars.py) =="
BARS=()
for f in "$WORK"/compare_*/report.json; do [ -f "$f" ] && BARS+=(--compare "$f"); done
[ -f "$WORK/bt_bench.json" ] && BARS+=(--bt-bench "$WORK/bt_bench.json")
[ ${#BARS[@]} -gt 0 ] && python scripts/issue_bars.py "${BARS[@]}" 2>&1 | tee -a "$LOG"
tar czf "$OUT/session.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*.tmp' . 2>/dev/null
say "== done in $(( SECONDS - t0 )) s =="
