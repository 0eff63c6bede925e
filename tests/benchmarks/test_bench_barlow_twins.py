"""Barlow Twins loss: fused Triton (auto, gram, cross) vs the reference as the official code runs
it (eager, bf16 inputs under torch.autocast(bf16)) vs torch.compile of that reference.

    python -m pytest tests/benchmarks/test_bench_barlow_twins.py --benchmark-only \
        --benchmark-json bt.json

bf16 inputs, D = 8192, N in {256, 1024, 2048}, forward + backward (torch.autograd.grad of the loss
with respect to both inputs, so no .grad accumulation is timed); the timed callable ends with
torch.cuda.synchronize() and rotates over 4 input pairs (fresh data, as from a projector, rather
than the same 8 MiB staying in L2). extra_info: peak extra memory (MiB above what was allocated
before the call, the returned gradients included), the flops floor min(8 N^2 D, 6 N D^2) over the
bf16 matmul rate and the bytes floor (z1, z2 read, dz1, dz2 written) over the copy rate, both
rates measured in the same session, and measured / floor for the median.

``host_floor`` is not a loss: an autograd Function with the fused op's call pattern (allocate
the outputs, one Triton launch forward, one backward, gradients returned) that does no
arithmetic. Its time is what any fused op, however fast its kernels, costs on this host per
call (Python, autograd, launch, synchronize): the floor under the speed bar at small N.

``fused_graph`` is ``barlow_twins_loss(..., cuda_graphs=True)``: the same launchers replayed from
one CUDA graph per input address (captured at an address's second call, so its warm-up covers
every input set twice). ``torch_compile_graphs`` is its like-for-like baseline: torch.compile of
the reference with mode="reduce-overhead" (inductor's kernels replayed from CUDA graphs). The
peaks of both count the graphs' resident memory too (fused_graph: one graph per input set, 4).
"""
import pytest
import torch
import triton
import triton.language as tl

from helpers import (compile_static, device_copy_rate, device_matmul_rate, peak_extra_mib,
                     rel_err)
from kernels.barlow_twins import barlow_twins_loss, barlow_twins_loss_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="benchmarks time CUDA kernels; no CUDA device here")

D = 8192
BATCHES = [256, 1024, 2048]
PROVIDERS = ["fused_auto", "fused_gram", "fused_cross", "torch", "torch_compile", "host_floor",
             "fused_graph", "torch_compile_graphs"]
GRAPHED = ("fused_graph", "torch_compile_graphs")  # replayed from CUDA graphs
ROUNDS = 20
SETS = 4

_compiled = {}


def _ref_autocast(z1, z2):
    """The official code's arithmetic: BN and C = a^T b / N under bf16 autocast."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return barlow_twins_loss_ref(z1, z2)


def _ref_compiled(mode=None):
    if mode not in _compiled:
        _compiled[mode] = compile_static(_ref_autocast, recompile_limit=16, mode=mode)
    return _compiled[mode]


@triton.jit
def _touch_kernel(a_ptr, b_ptr):
    """Writes one element of each output: a launch that does no work."""
    tl.store(a_ptr, 0.0)
    tl.store(b_ptr, 0.0)


class _HostFloor(torch.autograd.Function):
    """One launch forward (the loss), one backward (both gradients), no arithmetic."""

    @staticmethod
    def forward(ctx, z1, z2):
        loss = torch.empty((), device=z1.device, dtype=torch.float32)
        _touch_kernel[(1,)](loss, loss)
        ctx.shape, ctx.dtype = z1.shape, z1.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dz1 = torch.empty(ctx.shape, device=grad.device, dtype=ctx.dtype)
        dz2 = torch.empty(ctx.shape, device=grad.device, dtype=ctx.dtype)
        _touch_kernel[(1,)](dz1, dz2)
        return dz1, dz2


def _loss_fn(provider):
    if provider == "host_floor":
        return _HostFloor.apply
    if provider == "fused_graph":
        return lambda z1, z2: barlow_twins_loss(z1, z2, cuda_graphs=True)
    if provider.startswith("fused_"):
        method = provider.split("_", 1)[1]
        return lambda z1, z2: barlow_twins_loss(z1, z2, method=method)
    if provider == "torch_compile_graphs":
        return _ref_compiled("reduce-overhead")
    return _ref_compiled() if provider == "torch_compile" else _ref_autocast


@pytest.fixture(scope="module")
def rates():
    """(bf16 matmul flop/s on random 8192^3 data, copy bytes/s counting read + write)."""
    return device_matmul_rate(), device_copy_rate()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", BATCHES, ids=[f"N{n}" for n in BATCHES])
def test_bench_barlow_twins(benchmark, n, provider, rates):
    benchmark.group = f"barlow_twins fwd+bwd bf16 N={n} D={D}"
    fn = _loss_fn(provider)
    g = torch.Generator(device="cuda").manual_seed(n)
    sets = [tuple(torch.randn(n, D, device="cuda", generator=g, dtype=torch.bfloat16)
                  .requires_grad_() for _ in range(2)) for _ in range(SETS)]
    # the providers compute the same function (bf16: far inside the eager reference's own error)
    z1, z2 = sets[0]
    ref = barlow_twins_loss_ref(z1.detach().double(), z2.detach().double())
    resident0 = torch.cuda.memory_allocated()  # before fused_graph builds its graphs
    if provider != "host_floor":  # the floor computes nothing
        assert rel_err(fn(z1, z2).detach(), ref) < 5e-2
    it = [0]

    def run():
        a, b = sets[it[0] % SETS]
        it[0] += 1
        grads = torch.autograd.grad(fn(a, b), (a, b))
        torch.cuda.synchronize()
        return grads

    for _ in range(3 if provider not in GRAPHED else 2 * SETS + 1):
        run()  # compile (Triton / inductor) and capture the graphs outside the timing
    peak = peak_extra_mib(run)
    if provider in GRAPHED:
        # the graphs' memory pools stay allocated between calls: count them
        peak += (torch.cuda.memory_allocated() - resident0) / 2**20
    if provider == "fused_graph":
        want = torch.autograd.grad(barlow_twins_loss(z1, z2), (z1, z2))
        got = torch.autograd.grad(fn(z1, z2), (z1, z2))
        assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-5  # the same kernels
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    flop_rate, copy_rate = rates
    flops = min(8 * n * n * D, 6 * n * D * D)
    n_bytes = 4 * n * D * 2  # z1, z2 read; dz1, dz2 written (bf16)
    floor_ms = max(flops / flop_rate, n_bytes / copy_rate) * 1e3
    info = dict(provider=provider, n=n, d=D, dtype="bf16", peak_extra_mib=round(peak, 1),
                flops=flops, bytes=n_bytes, matmul_tflop_s=round(flop_rate / 1e12, 1),
                copy_rate_tb_s=round(copy_rate / 1e12, 3), floor_ms=round(floor_ms, 4))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarking is disabled (plain pytest)
        median_ms = stats.stats.median * 1e3
        info.update(median_ms=round(median_ms, 4), x_floor=round(median_ms / floor_ms, 2))
    benchmark.extra_info.update(info)
