"""Square-root pooling: fused Triton kernels vs F.lp_pool2d (eager) vs torch.compile(F.lp_pool2d).

    python -m pytest tests/benchmarks/test_bench_sqrt_pool.py --benchmark-only \
        --benchmark-json sqrt.json

bf16, batch 256, the ResNet-50 block shapes, k=2 s=2 and k=3 s=2; modes "forward" and "full"
(forward + backward through torch.autograd.grad, so no .grad accumulation is timed). The timed
callable ends with torch.cuda.synchronize(). extra_info holds the peak extra memory (MiB above
what was allocated before the call), the bytes the op must move, the bandwidth floor (those
bytes over the copy rate measured in the same session) and measured / floor for the median.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import compile_static, device_copy_rate, peak_extra_mib, rel_err
from kernels import sqrt_pool2d, sqrt_pool2d_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="benchmarks time CUDA kernels; no CUDA device here")

BATCH = 256
SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]  # C x H x W
WINDOWS = [(2, 2), (3, 2)]  # (kernel, stride)
PROVIDERS = ["fused", "torch", "torch_compile"]
MODES = ["forward", "full"]
ROUNDS = 25

_compiled = {}


def _lp_compiled():
    """One torch.compile of F.lp_pool2d, static shapes, enough recompiles for every case."""
    if "fn" not in _compiled:
        _compiled["fn"] = compile_static(F.lp_pool2d, recompile_limit=64)
    return _compiled["fn"]


@pytest.fixture(scope="module")
def copy_rate() -> float:
    return device_copy_rate()


def _op(provider):
    if provider == "fused":
        return lambda x, k, s: sqrt_pool2d(x, k, s)
    lp = _lp_compiled() if provider == "torch_compile" else F.lp_pool2d
    return lambda x, k, s: lp(x, 2, k, s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("k,s", WINDOWS, ids=[f"k{k}s{s}" for k, s in WINDOWS])
@pytest.mark.parametrize("chw", SHAPES, ids=["x".join(map(str, c)) for c in SHAPES])
def test_bench_sqrt_pool(benchmark, chw, k, s, provider, mode, copy_rate):
    C, H, W = chw
    benchmark.group = f"sqrt_pool {mode} {C}x{H}x{W} k{k}s{s} bf16 N={BATCH}"
    op = _op(provider)
    x = torch.randn(BATCH, C, H, W, device="cuda", dtype=torch.bfloat16)
    y0 = op(x, k, s)
    # the providers compute the same function as the reference (tolerance: a few bf16 roundings)
    assert rel_err(y0, sqrt_pool2d_ref(x, k, s)) < 1e-2
    if mode == "forward":
        def run():
            op(x, k, s)
            torch.cuda.synchronize()
        n_bytes = x.nbytes + y0.nbytes
    else:
        xg = x.detach().requires_grad_(True)
        dy = torch.randn_like(y0)
        if provider == "fused":
            (dx,) = torch.autograd.grad(op(xg, k, s), xg, dy)
            (dx_ref,) = torch.autograd.grad(sqrt_pool2d_ref(xg, k, s), xg, dy)
            assert rel_err(dx, dx_ref) < 1e-2
            del dx, dx_ref

        def run():
            torch.autograd.grad(op(xg, k, s), xg, dy)
            torch.cuda.synchronize()
        # forward: x read, y written; backward: x, y, dy read, dx written
        n_bytes = 3 * x.nbytes + 3 * y0.nbytes
    del y0
    for _ in range(3):  # compile (Triton / inductor), the fused launcher's one-time tuning
        run()
    peak = peak_extra_mib(run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    floor_ms = n_bytes / copy_rate * 1e3
    info = dict(provider=provider, mode=mode, shape=[BATCH, C, H, W], kernel=k, stride=s,
                dtype="bf16", peak_extra_mib=round(peak, 1), bytes=n_bytes,
                copy_rate_tb_s=round(copy_rate / 1e12, 3), floor_ms=round(floor_ms, 4))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarking is disabled (plain pytest)
        median_ms = stats.stats.median * 1e3
        info.update(median_ms=round(median_ms, 4), x_floor=round(median_ms / floor_ms, 3))
    if provider == "fused":  # which launch candidate the one-time tuning kept
        from kernels import sqrt_pool as sp
        for key, plan in sp._PLANS.items():
            kind, shape, _, _, _, g = key
            if shape == x.shape and (g.kh, g.sh) == (k, s) and (kind == "fwd" or mode == "full"):
                name = (plan.best or plan.specs[0]).name
                info[f"{kind}_variant"] = f"{name[0]}{name[1]}/{name[2]}"
    benchmark.extra_info.update(info)
