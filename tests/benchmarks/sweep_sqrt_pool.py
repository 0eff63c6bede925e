"""GPU sweep for kernels.sqrt_pool, and the summary table of the pytest-benchmark run.

    python tests/benchmarks/sweep_sqrt_pool.py sweep --out sweep.json   # needs CUDA
    python tests/benchmarks/sweep_sqrt_pool.py summarize sqrt.json      # any machine
    python tests/benchmarks/sweep_sqrt_pool.py ptx                      # no GPU needed

``sweep`` times every launch candidate of the forward and backward kernels (both layouts, the
benchmark shapes, bf16, batch 256) and the global-pooling kernels with triton.testing.do_bench
(median, CUDA events), checks each candidate's result against the reference, and prints
measured / floor, the floor being bytes moved over the copy rate measured in the same process.
``summarize`` prints fused vs eager vs torch.compile from a --benchmark-json file and checks
the speed bar of issue 2. ``ptx`` compiles every launch candidate of the benchmark shapes for
sm_90 on this machine (Triton's frontend and ptxas need no GPU; TRITON_INTERPRET must be unset)
and counts the global loads/stores by width: a cheap check that row loads still vectorize.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/helpers.py
from helpers import device_copy_rate, rel_err  # noqa: E402

BATCH = 256
SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
WINDOWS = [(2, 2), (3, 2)]
GLOBAL_SHAPES = [(2048, 7, 7), (512, 4, 4), (1024, 14, 14), (256, 56, 56)]
DEVICE = "cuda"  # a dry run of the script logic may set "cpu" (with TRITON_INTERPRET=1)


def _c(cand) -> str:
    """('flat', 1024, 4) -> 'flat1024/4'"""
    return f"{cand[0]}{cand[1]}/{cand[2]}"


def _bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def sweep(out_path: str, deadline_s: float, layouts=("nchw", "cl")) -> None:
    from kernels import sqrt_pool as sp
    from kernels import sqrt_pool2d_ref
    t_end = time.time() + deadline_s
    rate = device_copy_rate(DEVICE)
    print(f"copy rate {rate / 1e12:.3f} TB/s (read + write, 1 GiB bf16 copy, do_bench median)")
    rows = []
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE

    def save():  # after every row: a stage killed by its time limit keeps what it measured
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(copy_rate_tb_s=rate / 1e12, device=device, torch=torch.__version__,
                           rows=rows), f, indent=1)
        os.replace(tmp, out_path)

    print("global pooling (kernel_size=None), bf16, batch 256: fused fwd / bwd vs eager reference")
    for C, H, W in GLOBAL_SHAPES:
        for layout in ("nchw", "cl"):
            if time.time() > t_end:
                break
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            x = torch.randn(BATCH, C, H, W, device=DEVICE, dtype=torch.bfloat16)
            x = x.contiguous(memory_format=fmt)
            g = sp._geometry(x, sp._check_params(None, None, 0, 0.0, False))
            xg = x.detach().requires_grad_(True)
            y_ref = sqrt_pool2d_ref(xg)
            dy = torch.randn_like(y_ref)
            (dx_ref,) = torch.autograd.grad(y_ref, xg, dy)
            y = sp._fwd(x, g)
            dx = sp._bwd(x, y, dy, g)
            err = max(rel_err(y, y_ref), rel_err(dx, dx_ref))
            ms_f = _bench_ms(lambda: sp._fwd(x, g, out=y))
            ms_b = _bench_ms(lambda: sp._bwd(x, y, dy, g, out=dx))
            ms_e = _bench_ms(lambda: sqrt_pool2d_ref(x))
            fl_f = (x.nbytes + y.nbytes) / rate * 1e3
            fl_b = (2 * x.nbytes + 2 * y.nbytes) / rate * 1e3
            rows.append(dict(shape=[BATCH, C, H, W], k=None, layout=layout, fwd_ms=ms_f,
                             bwd_ms=ms_b, ref_fwd_ms=ms_e, fwd_floor_ms=fl_f, bwd_floor_ms=fl_b,
                             rel_err=err))
            save()
            print(f"{'x'.join(map(str, (BATCH, C, H, W))):>16} {layout:>6} | fwd {ms_f:.4f} ms "
                  f"({ms_f / fl_f:.2f}x floor)  bwd {ms_b:.4f} ms ({ms_b / fl_b:.2f}x floor)  "
                  f"ref fwd {ms_e:.4f} ms  err {err:.1e}")
            del x, xg, y, dy, dx, y_ref, dx_ref
    if time.time() > t_end:
        print("sweep: deadline reached")
    hdr = (f"{'shape':>16} {'win':>5} {'layout':>6} | {'fwd best':>12} {'ms':>7} {'xfl':>5} "
           f"{'fwd all (ms)':>30} | {'bwd best':>12} {'ms':>7} {'xfl':>5} {'bwd all (ms)':>30}")
    print(hdr)
    for C, H, W in SHAPES:
        for k, s in WINDOWS:
            for layout in layouts:
                if time.time() > t_end:
                    break
                fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
                x = torch.randn(BATCH, C, H, W, device=DEVICE, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=fmt)
                g = sp._geometry(x, sp._check_params(k, s, 0, 0.0, False))
                if layout == "cl":
                    fwd_c, bwd_c = sp._FWD_CL, sp._BWD_CL
                elif sp._pair_ok(g, False):
                    fwd_c = sp._FWD_PAIR
                    bwd_c = sp._BWD_QUAD if sp._quad_ok(g, False) else sp._BWD_PAIR
                else:
                    fwd_c, bwd_c = sp._FWD_NCHW, sp._BWD_NCHW
                xg = x.detach().requires_grad_(True)
                y_ref = sqrt_pool2d_ref(xg, k, s)
                dy = torch.randn_like(y_ref)
                (dx_ref,) = torch.autograd.grad(y_ref, xg, dy)
                y_ref = y_ref.detach()
                fwd, bwd = {}, {}
                y = torch.empty_like(y_ref)
                for cand in fwd_c:
                    sp._fwd(x, g, out=y, candidates=(cand,))
                    err = rel_err(y, y_ref)
                    ms = _bench_ms(lambda: sp._fwd(x, g, out=y, candidates=(cand,)))
                    fwd[cand] = (ms, err)
                dx = torch.empty_like(x)
                for cand in bwd_c:
                    sp._bwd(x, y, dy, g, out=dx, candidates=(cand,))
                    err = rel_err(dx, dx_ref)
                    ms = _bench_ms(lambda: sp._bwd(x, y, dy, g, out=dx, candidates=(cand,)))
                    bwd[cand] = (ms, err)
                fl_f = (x.nbytes + y.nbytes) / rate * 1e3
                fl_b = (2 * x.nbytes + 2 * y.nbytes) / rate * 1e3
                bf = min(fwd, key=lambda c: fwd[c][0])
                bb = min(bwd, key=lambda c: bwd[c][0])
                worst_err = max(e for _, e in list(fwd.values()) + list(bwd.values()))
                row = dict(shape=[BATCH, C, H, W], k=k, s=s, layout=layout,
                           fwd={_c(c): v for c, v in fwd.items()},
                           bwd={_c(c): v for c, v in bwd.items()},
                           fwd_floor_ms=fl_f, bwd_floor_ms=fl_b, worst_rel_err=worst_err)
                rows.append(row)
                save()
                f_all = " ".join(f"{fwd[c][0]:.3f}" for c in fwd_c)
                b_all = " ".join(f"{bwd[c][0]:.3f}" for c in bwd_c)
                print(f"{'x'.join(map(str, (BATCH, C, H, W))):>16} {f'k{k}s{s}':>5} {layout:>6} | "
                      f"{_c(bf):>12} {fwd[bf][0]:7.3f} {fwd[bf][0] / fl_f:5.2f} {f_all:>30} | "
                      f"{_c(bb):>12} {bwd[bb][0]:7.3f} {bwd[bb][0] / fl_b:5.2f} {b_all:>30}"
                      f"  err<={worst_err:.1e}{'  BAD' if worst_err > 1e-2 else ''}")
                del x, xg, y, dy, dx, y_ref, dx_ref
    save()


def summarize(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    res = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = (tuple(e["shape"]), e["kernel"], e["stride"], e["mode"])
        res.setdefault(key, {})[e["provider"]] = (b["stats"]["median"] * 1e3,
                                                  b["stats"]["iqr"] * 1e3, e)
    dev = data.get("machine_info", {}).get("node", "?")
    print(f"sqrt_pool benchmarks ({path}, host {dev}); medians in ms (IQR); bf16")
    print(f"{'shape':>16} {'win':>5} {'mode':>7} | {'fused':>15} {'eager':>15} {'compile':>15} | "
          f"{'vs cmp':>6} {'vs eag':>6} | {'floor':>6} {'xfl':>5} | {'MiB f/e/c':>17} | bar  "
          f"fused variant fwd/bwd")
    ok_all = True
    for key in sorted(res, key=lambda k: (-k[0][2], k[1], k[3])):
        shape, k, s, mode = key
        r = res[key]
        if not all(p in r for p in ("fused", "torch", "torch_compile")):
            continue
        f, e, c = r["fused"], r["torch"], r["torch_compile"]
        floor = f[2]["floor_ms"]
        vc, ve, xfl = c[0] / f[0], e[0] / f[0], f[0] / floor
        mem = (f[2]["peak_extra_mib"], e[2]["peak_extra_mib"], c[2]["peak_extra_mib"])
        bar = ""
        if mode == "full":
            ok = vc >= 1.5 and ve >= 6 and mem[0] <= mem[2] and (shape[2] != 56 or xfl <= 1.3)
            ok_all &= ok
            bar = "ok" if ok else "MISS"
        print(f"{'x'.join(map(str, shape)):>16} {f'k{k}s{s}':>5} {mode:>7} | "
              f"{f[0]:7.4f} ({f[1]:5.3f}) {e[0]:7.4f} ({e[1]:5.3f}) {c[0]:7.4f} ({c[1]:5.3f}) | "
              f"{vc:6.2f} {ve:6.2f} | {floor:6.4f} {xfl:5.2f} | "
              f"{mem[0]:5.0f}/{mem[1]:5.0f}/{mem[2]:5.0f} | {bar:4} "
              f"{f[2].get('fwd_variant', '-')}/{f[2].get('bwd_variant', '-')}")
    any_e = next(iter(res.values()))
    print(f"copy rate {next(iter(any_e.values()))[2]['copy_rate_tb_s']} TB/s; bar (full): "
          f">=1.5x compile, >=6x eager, peak <= compile, 56x56 within 1.3x floor: "
          f"{'all ok' if ok_all else 'MISSED'}")
    return 0


def ptx() -> int:
    import re
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import sqrt_pool as sp
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("ptx: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", 90, 32)
    for C, H, W in SHAPES:
        for k, s in WINDOWS:
            x = torch.empty(BATCH, C, H, W, dtype=torch.bfloat16, device="meta")
            g = sp._geometry(x, sp._check_params(k, s, 0, 0.0, False))
            for kind, n_tensors in (("fwd", 2), ("bwd", 4)):
                for spec in sp._specs(kind, x.shape, x.dtype, torch.device("cuda"), False, g, None):
                    # the specialization Triton applies at launch: pointers and ints divisible
                    # by 16 get tt.divisibility, ints equal to 1 become constants
                    sig, consts, attrs = {}, {}, {}
                    vals = [None] * n_tensors + list(spec.args)
                    for i, name in enumerate(spec.kernel.arg_names):
                        v = spec.kwargs.get(name, vals[i] if i < len(vals) else None)
                        if name in spec.kwargs or (i >= n_tensors and v == 1
                                                   and not isinstance(v, float)):
                            sig[name], consts[(i,)] = "constexpr", v
                        elif i < n_tensors:
                            sig[name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
                        elif isinstance(v, float):
                            sig[name] = "fp32"
                        else:
                            sig[name] = "i32"
                            if v % 16 == 0:
                                attrs[(i,)] = [["tt.divisibility", 16]]
                    src = ASTSource(spec.kernel, sig, constexprs=consts, attrs=attrs)
                    asm = triton.compile(src, target=target,
                                         options={"num_warps": spec.kwargs["num_warps"]}).asm
                    ld = Counter(re.findall(r"ld\.global((?:\.[a-z0-9]+)*)", asm["ptx"]))
                    st = Counter(re.findall(r"st\.global((?:\.[a-z0-9]+)*)", asm["ptx"]))
                    print(f"{C}x{H}x{W} k{k}s{s} {kind} {_c(spec.name):>12}  ld {dict(ld)}  "
                          f"st {dict(st)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sweep")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline-s", type=float, default=1e9)
    p.add_argument("--layouts", default="nchw,cl", help="stencil layouts to sweep: nchw, cl")
    p = sub.add_parser("summarize")
    p.add_argument("json")
    sub.add_parser("ptx")
    a = ap.parse_args()
    if a.cmd == "ptx":
        return ptx()
    if a.cmd == "sweep":
        if not torch.cuda.is_available():
            print("sweep needs CUDA", file=sys.stderr)
            return 2
        sweep(a.out, a.deadline_s, tuple(a.layouts.split(",")))
        return 0
    return summarize(a.json)


if __name__ == "__main__":
    sys.exit(main())
