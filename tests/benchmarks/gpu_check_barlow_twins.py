"""One GPU session for kernels.barlow_twins: accuracy against float64 at D=8192, timing variants,
the pytest-benchmark suite, the CUDA tests, and a compact table last.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python tests/benchmarks/gpu_check_barlow_twins.py

Writes under $OUT (default /tmp/bt_gpu): accuracy.json, bt.json (pytest-benchmark), bench.txt,
tests.txt. Each stage has its own time limit so that one slow stage cannot starve the rest
(total budget BT_BUDGET_S, default 285 s). BT_STAGES (default "accuracy,variants,bench,tests")
picks stages: ``BT_STAGES=accuracy`` is the issue's accuracy line alone (scripts/gpu_session.sh
part bt_accuracy): loss and gradient error against float64 at D=8192, bf16 inputs, default
precision, N in {256, 1024, 2048}, independent and correlated (rho 0.9) views, one
PASS/MISS line each (bar: loss 1e-3, gradient 2e-3).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

T0 = time.time()
OUT = os.environ.get("OUT") or "/tmp/bt_gpu"
BUDGET = float(os.environ.get("BT_BUDGET_S", "285"))
os.makedirs(OUT, exist_ok=True)
SUMMARY = []
VALID_STAGES = ("accuracy", "variants", "bench", "tests")
STAGES = {x.strip() for x in os.environ.get("BT_STAGES", ",".join(VALID_STAGES)).split(",")}
if not STAGES <= set(VALID_STAGES) or ("variants" in STAGES and "accuracy" not in STAGES):
    sys.exit(f"BT_STAGES={os.environ.get('BT_STAGES')!r}: valid stages are {', '.join(VALID_STAGES)}"
             " (variants runs after accuracy, so it needs it)")


def left() -> float:
    return BUDGET - (time.time() - T0)


def stamp(msg: str) -> None:
    print(f"== {msg} ({time.time() - T0:.0f} s)", flush=True)


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def accuracy_and_variants():
    import torch
    import triton.testing

    import kernels.barlow_twins as bt
    from kernels.barlow_twins import barlow_twins_loss, barlow_twins_loss_ref

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from helpers import device_copy_rate, device_matmul_rate  # tests/helpers.py

    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton",
          __import__("triton").__version__, flush=True)
    res = {"device": torch.cuda.get_device_name()}
    res["matmul_bf16_tflop_s"] = device_matmul_rate() / 1e12
    res["copy_tb_s"] = device_copy_rate() / 1e12
    SUMMARY.append(f"rates: bf16 matmul {res['matmul_bf16_tflop_s']:.0f} TFLOP/s, "
                   f"copy {res['copy_tb_s']:.2f} TB/s")
    print(SUMMARY[-1], flush=True)

    def rel(x, y):
        return ((x.double() - y.double()).norm() / y.double().norm()).item()

    def kernel_run(z1, z2, grad_precision=None, method="gram"):
        loss, st = bt.barlow_twins_fwd(z1, z2, 0.0051, 1.0, 1e-5, method,
                                       grad_precision=grad_precision)
        g1, g2 = bt.barlow_twins_bwd(st, torch.ones((), device="cuda"))
        return loss, g1, g2

    D = 8192
    rows = []
    for n in (256, 1024, 2048):
        for data in ("randn", "rho0.9"):
            g = torch.Generator(device="cuda").manual_seed(7 + n)
            z1 = torch.randn(n, D, device="cuda", generator=g)
            z2 = torch.randn(n, D, device="cuda", generator=g)
            if data != "randn":
                z2 = 0.9 * z1 + (1 - 0.81) ** 0.5 * z2
            z1, z2 = z1.bfloat16(), z2.bfloat16()
            x = z1.double().requires_grad_()
            y = z2.double().requires_grad_()
            ref = barlow_twins_loss_ref(x, y)
            r1, r2 = torch.autograd.grad(ref, (x, y))
            del x, y
            row = {"n": n, "data": data}
            for name, gd in (("fused", None), ("fused_tf32grad", "tf32")):
                loss, g1, g2 = kernel_run(z1, z2, gd)
                row[name] = (rel(loss, ref), max(rel(g1, r1), rel(g2, r2)))
            if n == 256:
                loss, g1, g2 = kernel_run(z1, z2, None, "cross")
                row["fused_cross"] = (rel(loss, ref), max(rel(g1, r1), rel(g2, r2)))
            p = z1.clone().requires_grad_()
            q = z2.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                el = barlow_twins_loss_ref(p, q)
            e1, e2 = torch.autograd.grad(el, (p, q))
            row["eager_autocast"] = (rel(el, ref), max(rel(e1, r1), rel(e2, r2)))
            row["bf16_rounding_of_exact_grad"] = max(rel(r1.bfloat16(), r1), rel(r2.bfloat16(), r2))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ref, r1, r2
            torch.cuda.empty_cache()
    res["accuracy_bf16"] = rows
    # fp32 inputs (IEEE dots), vs float64
    g = torch.Generator(device="cuda").manual_seed(3)
    z1 = torch.randn(256, D, device="cuda", generator=g)
    z2 = 0.5 * z1 + torch.randn(256, D, device="cuda", generator=g)
    x, y = z1.double().requires_grad_(), z2.double().requires_grad_()
    ref = barlow_twins_loss_ref(x, y)
    r1, r2 = torch.autograd.grad(ref, (x, y))
    for method in ("gram", "cross"):
        loss, g1, g2 = kernel_run(z1, z2, None, method)
        res[f"fp32_{method}"] = (rel(loss, ref), max(rel(g1, r1), rel(g2, r2)))
        print(f"fp32 inputs {method}: loss rel {res[f'fp32_{method}'][0]:.2e}, "
              f"grad rel {res[f'fp32_{method}'][1]:.2e}", flush=True)
    for row in rows:
        ok = row["fused"][0] <= 1e-3 and row["fused"][1] <= 2e-3
        SUMMARY.append(
            f"accuracy N={row['n']} {row['data']}: loss {row['fused'][0]:.1e} grad "
            f"{row['fused'][1]:.2e} (bf16 rounding of the exact grad "
            f"{row['bf16_rounding_of_exact_grad']:.2e}; tf32-grad mode "
            f"{row['fused_tf32grad'][1]:.2e}; eager autocast loss {row['eager_autocast'][0]:.1e} "
            f"grad {row['eager_autocast'][1]:.1e}) {'PASS' if ok else 'MISS'} bar 1e-3 / 2e-3")
    if "variants" not in STAGES:
        _write_json(os.path.join(OUT, "accuracy.json"), res)
        return

    # timing variants (do_bench medians with L2 flush, fwd+bwd, one input pair), the GPU-only
    # time (a CUDA graph of the launcher calls, replayed) and a per-kernel profile
    var = {}
    one = torch.ones((), device="cuda")

    def fb(z1, z2, gp=None):
        loss, st = bt.barlow_twins_fwd(z1, z2, 0.0051, 1.0, 1e-5, "gram", grad_precision=gp)
        return bt.barlow_twins_bwd(st, one)

    for n in (256, 1024, 2048):
        z1 = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
        z2 = torch.randn(n, D, device="cuda", dtype=torch.bfloat16)
        t = {}
        t["fwd"] = triton.testing.do_bench(
            lambda: bt.barlow_twins_fwd(z1, z2, 0.0051, 1.0, 1e-5, "gram"), warmup=20, rep=100,
            return_mode="median")
        t["fwd_bwd"] = triton.testing.do_bench(lambda: fb(z1, z2), warmup=20, rep=100,
                                               return_mode="median")
        t["fwd_bwd_tf32grad"] = triton.testing.do_bench(lambda: fb(z1, z2, "tf32"), warmup=20,
                                                        rep=100, return_mode="median")
        z1g, z2g = z1.detach().requires_grad_(), z2.detach().requires_grad_()
        t["autograd_api"] = triton.testing.do_bench(
            lambda: torch.autograd.grad(barlow_twins_loss(z1g, z2g), (z1g, z2g)),
            warmup=20, rep=100, return_mode="median")
        try:  # GPU time alone: the same launches captured in a CUDA graph
            fb(z1, z2)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fb(z1, z2)
            t["graph_gpu_only"] = triton.testing.do_bench(graph.replay, warmup=20, rep=100,
                                                          return_mode="median")
            del graph
        except Exception as e:
            t["graph_gpu_only"] = repr(e)[:120]
        # host time of the autograd call with no sync in between (= max(CPU, GPU) per call)
        for _ in range(5):
            torch.autograd.grad(barlow_twins_loss(z1g, z2g), (z1g, z2g))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            torch.autograd.grad(barlow_twins_loss(z1g, z2g), (z1g, z2g))
        t["host_loop_per_call"] = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        t["host_loop_synced"] = (time.perf_counter() - t0) / 50 * 1e3
        if n == 2048:
            orig = bt._gram_fwd_candidates
            bt._gram_fwd_candidates = lambda dt: ((128, 32, 8, 3, 1.0),)
            bt._gram_fwd_plan.cache_clear()
            try:
                t["fwd_BM128"] = triton.testing.do_bench(
                    lambda: bt.barlow_twins_fwd(z1, z2, 0.0051, 1.0, 1e-5, "gram"), warmup=20,
                    rep=100, return_mode="median")
            except Exception as e:  # a variant only
                t["fwd_BM128"] = repr(e)[:200]
            finally:
                bt._gram_fwd_candidates = orig
                bt._gram_fwd_plan.cache_clear()
        plan = bt._gram_fwd_plan(n, n, D, torch.bfloat16, bt._sm_count(z1.device))
        t["plan"] = f"BM{plan.bm} split{plan.split}"
        var[n] = t
        print(f"variants N={n}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()),
            flush=True)
        if n in (256, 2048):
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    torch.autograd.grad(barlow_twins_loss(z1g, z2g), (z1g, z2g))
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=9,
                                            max_name_column_width=40), flush=True)
    res["variants_ms"] = var
    for n, t in var.items():
        SUMMARY.append(
            f"variants N={n} (ms): fwd {t['fwd']:.3f} fwd+bwd {t['fwd_bwd']:.3f} tf32grad "
            f"{t['fwd_bwd_tf32grad']:.3f} autograd {t['autograd_api']:.3f} graph(GPU only) "
            f"{t['graph_gpu_only'] if isinstance(t['graph_gpu_only'], str) else round(t['graph_gpu_only'], 4)}"
            f" host/call {t['host_loop_per_call']:.3f} synced {t['host_loop_synced']:.3f}"
            + (f" fwd_BM128 {t['fwd_BM128']}" if "fwd_BM128" in t else "") + f" {t['plan']}")
    _write_json(os.path.join(OUT, "accuracy.json"), res)


def bench():
    path = os.path.join(OUT, "bt.json")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/benchmarks/test_bench_barlow_twins.py", "--benchmark-only",
           "--benchmark-json", path, "--benchmark-columns=median,iqr,rounds",
           "--benchmark-sort=name"]
    limit = max(30, min(120, left() - 45))
    with open(os.path.join(OUT, "bench.txt"), "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"bench rc={rc}", flush=True)
    if not os.path.exists(path):
        SUMMARY.append(f"benchmarks: no JSON (rc={rc}); see bench.txt")
        os.system(f"tail -n 30 {os.path.join(OUT, 'bench.txt')}")
        return
    data = json.load(open(path))
    table = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        table[(e["n"], e["provider"])] = e
    SUMMARY.append("benchmark N provider: median ms | IQR ms | peak extra MiB | x floor")
    for b in data["benchmarks"]:
        e = b["extra_info"]
        SUMMARY.append(f"  N={e['n']:5d} {e['provider']:14s} {e.get('median_ms', float('nan')):8.4f} | "
                       f"{b['stats']['iqr'] * 1e3:7.4f} | {e['peak_extra_mib']:7.1f} | "
                       f"{e.get('x_floor', float('nan'))}")
    for n, speed in ((256, 10.0), (1024, None), (2048, 2.0)):
        f, c = table.get((n, "fused_auto")), table.get((n, "torch_compile"))
        if f and c:
            sp = c["median_ms"] / f["median_ms"]
            mem = f["peak_extra_mib"] / c["peak_extra_mib"]
            bar = "" if speed is None else f" (bar {speed}x: {'PASS' if sp >= speed else 'MISS'})"
            SUMMARY.append(f"N={n}: fused_auto {sp:.2f}x faster than torch.compile{bar}; memory "
                           f"{mem:.3f} of compile's ({'PASS' if mem <= 0.25 else 'MISS'} <= 0.25)")


def tests():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_barlow_twins.py", "tests/test_barlow_twins_ddp.py"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "8"]
    except ImportError:
        pass
    limit = max(20, left() - 12)
    with open(os.path.join(OUT, "tests.txt"), "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    lines = open(os.path.join(OUT, "tests.txt")).read().splitlines()
    fails = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    last = [ln for ln in lines if " passed" in ln or " failed" in ln or " error" in ln]
    SUMMARY.append(f"CUDA tests rc={rc}: {last[-1] if last else '(no summary)'}")
    SUMMARY.extend(fails[:12])
    if rc not in (0, "timeout") and not fails:
        SUMMARY.extend(lines[-15:])


def main():
    for name, fn, stage in (("accuracy + variants", accuracy_and_variants, "accuracy"),
                            ("benchmarks", bench, "bench"), ("CUDA tests", tests, "tests")):
        if stage not in STAGES:
            continue
        stamp(name)
        try:
            fn()
        except Exception:
            traceback.print_exc()
            SUMMARY.append(f"{name}: crashed, see traceback above")
    stamp("summary")
    print("\n".join(SUMMARY), flush=True)
    with open(os.path.join(OUT, "summary.txt"), "w") as f:
        f.write("\n".join(SUMMARY) + "\n")


if __name__ == "__main__":
    main()
