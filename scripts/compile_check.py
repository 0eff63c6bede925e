"""Compile, without a GPU, every Triton kernel configuration our launchers start, for a CUDA target.

The CPU tests run the kernels under Triton's interpreter, which checks their arithmetic but not
that they compile for a GPU: a construct the NVIDIA backend rejects, or a tile configuration that
needs more shared memory than the device has, would only show on the GPU. This script runs the
launchers (Barlow Twins loss, square-root pooling, ExpanderPool) on CPU tensors standing in for
CUDA ones, with a stand-in for Triton's active driver that names the target, and turns every
launch into a compile (``warmup``): Triton's own NVIDIA backend and its bundled ptxas build the
cubin for that target. Nothing runs.

    python scripts/compile_check.py [--arch 90] [--max-shared 232448]

Exit status: 0 every configuration compiled and fits the shared-memory limit; 1 one did not
(each failure is printed); 3 this Triton version's internals do not allow the stand-in driver
(nothing was checked). TRITON_INTERPRET must not be set (the script removes it for itself).
Checked with triton 3.6 and 3.8. tests/test_compile_check.py runs it in CI.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402


def install_fake_driver(arch: int) -> dict:
    """Make every JIT launch a compile for cuda:sm_<arch>; returns {config: shared bytes}."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    class _Driver:  # what JITFunction.run asks the active driver before compiling
        target = GPUTarget("cuda", arch, 32)

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

        def get_device_interface(self):
            return torch.cuda

    triton.runtime.driver.set_active(_Driver())
    compiled: dict = {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        k = run(self, *args, grid=grid, warmup=True, **kwargs)
        key = (self.fn.__name__, kwargs.get("num_warps"), kwargs.get("num_stages"),
               tuple(sorted((n, str(v)) for n, v in kwargs.items()
                            if n not in ("num_warps", "num_stages"))))
        compiled[key] = k.metadata.shared
        return k

    JITFunction.run = compile_only
    return compiled


def launches():
    """(name, callable) for every launcher configuration worth compiling."""
    import kernels
    import kernels.barlow_twins as bt
    import kernels.sqrt_pool as sp

    one = torch.ones(())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, d, gp, method in ((256, 8192, None, "gram"), (1024, 8192, None, "gram"),
                                 (2048, 8192, None, "gram"), (256, 8192, "input", "gram"),
                                 (1024, 8192, "tf32", "gram"), (64, 512, None, "cross"),
                                 (512, 512, "input", "cross")):
            if dtype == torch.float32 and gp is not None:
                continue

            def bt_run(n=n, d=d, gp=gp, method=method, dtype=dtype):
                z1 = torch.randn(n, d).to(dtype)
                z2 = torch.randn(n, d).to(dtype)
                _, st = bt.barlow_twins_fwd(z1, z2, 0.0051, 1.0, 1e-5, method, grad_precision=gp)
                bt.barlow_twins_bwd(st, one)
            yield f"barlow_twins {dtype} N={n} D={d} {method} {gp}", bt_run
    for c, s in ((256, 56), (2048, 7)):
        for k in (2, 3):
            def pool(c=c, s=s, k=k, cl=False):
                x = torch.randn(2, c, s, s, dtype=torch.bfloat16)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = sp.sqrt_pool2d_fwd(x, k, 2)
                sp.sqrt_pool2d_bwd(x, y, torch.ones_like(y), k, 2)
            yield f"sqrt_pool2d {c}x{s} k={k}", pool
            yield f"sqrt_pool2d {c}x{s} k={k} channels_last", lambda f=pool: f(cl=True)
        yield f"sqrt_pool2d {c}x{s} global", lambda c=c, s=s: sp.sqrt_pool2d_fwd(
            torch.randn(2, c, s, s, dtype=torch.bfloat16), None)
    for cout, hw, m in ((2048, 3136, 10), (2048, 49, 512)):
        for pool in ("avg", "sqrt"):
            def ep(cout=cout, hw=hw, m=m, pool=pool):
                h = torch.randn(m * hw, cout, dtype=torch.bfloat16)
                v = [torch.randn(cout) for _ in range(4)]
                wsc = torch.randn(m, cout)
                kernels.expander_pool_fwd(h, *v, hw, pool, 0.0)
                kernels.expander_pool_bwd(h, *v, wsc, v[0], v[1], hw, pool)
                kernels.expander_pool_bwd(h, *v, wsc, None, None, hw, pool)
            yield f"expander_pool C={cout} HW={hw} {pool}", ep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100)")
    ap.add_argument("--max-shared", type=int, default=232448,
                    help="shared memory per block in bytes (H100: 227 KiB)")
    a = ap.parse_args(argv)
    try:
        compiled = install_fake_driver(a.arch)
        import kernels._runtime as rt
        rt.triton_can_run_on = lambda device: True  # CPU tensors stand in for CUDA ones
    except Exception as e:  # noqa: BLE001 - this Triton's internals differ: nothing checked
        print(f"compile_check: cannot install the stand-in driver on triton {triton.__version__}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 3
    failures = 0
    for name, fn in launches():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report every failing configuration
            failures += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e)[:500]}")
    if not compiled and not failures:
        print("compile_check: no launch reached the compiler", file=sys.stderr)
        return 3
    for (kname, warps, stages, _), shared in sorted(compiled.items()):
        if shared > a.max_shared:
            failures += 1
            print(f"FAILED {kname} (num_warps={warps}, num_stages={stages}): {shared} bytes of "
                  f"shared memory > {a.max_shared}")
    print(f"compile_check: triton {triton.__version__}, cuda sm_{a.arch}: {len(compiled)} kernel "
          f"configurations compiled, largest shared memory {max(compiled.values(), default=0)} "
          f"bytes, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
