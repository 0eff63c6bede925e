"""The head's expander + global average pooling, forward + backward, bf16 autocast, batch 512:

* ``fused``: ExpanderPool(fused=True), the map never stored, elementwise work in
  kernels/expander_pool.py on the bf16 map;
* ``torch``: ExpanderPool's torch path (same chunking, elementwise work in fp32 PyTorch);
* ``plain``: nn.Sequential(conv1x1, BatchNorm2d, ReLU) + mean, which stores the map.

Each is ``BlockHead(..., projector="none").pooled`` as the trainer builds it (fp32 parameters,
autocast bf16, channels_last bf16 input that needs a gradient, as a block's output does).

    python -m pytest tests/benchmarks/test_bench_expander.py --benchmark-only \
        --benchmark-json expander.json

Shapes: ResNet-50 block 1 (256 x 56 x 56 -> 2048) and block 4 (2048 x 7 x 7 -> 2048). The timed
callable is one forward and torch.autograd.grad for x and the parameters (no .grad
accumulation), ending with torch.cuda.synchronize(). extra_info: peak extra memory (MiB above
what was allocated before the call), ms per image pair, and the floor: max(flops / matmul rate,
bytes / copy rate) with flops = 6*M*Cin*Cout (the conv, dx and dW matmuls, M = pixels) and
bytes = 3 x the size of x (read forward, read and dx written backward), i.e. no map traffic at
all; both rates measured in the same session.
"""
import pytest
import torch

from helpers import device_copy_rate, device_matmul_rate, peak_extra_mib, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="benchmarks time CUDA kernels; no CUDA device here")

BATCH = 512  # images (256 image pairs)
SHAPES = {"block1": (256, 56, 56, 2048), "block4": (2048, 7, 7, 2048)}  # Cin, H, W, Cout
PROVIDERS = ["fused", "torch", "plain"]
ROUNDS = 10


@pytest.fixture(scope="module")
def rates():
    """(copy rate, matmul rate), measured once per session."""
    return device_copy_rate(), device_matmul_rate()


def _head(provider: str, cin: int, cout: int):
    from blockwise.models import BlockHead

    head = BlockHead(cin, cout, "avg", None, "none", fused=provider == "fused",
                     expander_recompute=provider != "plain")
    return head.to("cuda", memory_format=torch.channels_last)


def _grads(head, x, gp):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = head.pooled(x)
    return out, torch.autograd.grad(out, [x, *head.parameters()], gp)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("block", list(SHAPES))
def test_bench_expander(benchmark, block, provider, rates):
    cin, hgt, wid, cout = SHAPES[block]
    benchmark.group = f"expander+avgpool full {block} {cin}x{hgt}x{wid}->{cout} bf16 N={BATCH}"
    torch.manual_seed(0)
    head = _head(provider, cin, cout)
    x = torch.randn(BATCH, cin, hgt, wid, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    gp = torch.randn(BATCH, cout, device="cuda")
    if provider == "fused":  # same function as the torch path (a few bf16 roundings apart)
        ref = _head("torch", cin, cout)
        ref.load_state_dict(head.state_dict())
        got, want = _grads(head, x, gp), _grads(ref, x, gp)
        assert rel_err(got[0], want[0]) < 1e-2
        for g, w in zip(got[1], want[1]):
            assert rel_err(g, w) < 2e-2
        del ref, got, want

    def run():
        _grads(head, x, gp)
        torch.cuda.synchronize()

    for _ in range(3):  # Triton compile, cuBLAS / cuDNN heuristics
        run()
    peak = peak_extra_mib(run)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    copy_rate, mm_rate = rates
    flops = 6 * BATCH * hgt * wid * cin * cout
    n_bytes = 3 * x.nbytes
    floor_ms = max(flops / mm_rate, n_bytes / copy_rate) * 1e3
    info = dict(provider=provider, block=block, shape=[BATCH, cin, hgt, wid], cout=cout,
                dtype="bf16 autocast", peak_extra_mib=round(peak, 1),
                copy_rate_tb_s=round(copy_rate / 1e12, 3),
                matmul_tflop_s=round(mm_rate / 1e12, 1), floor_ms=round(floor_ms, 3),
                gpu=torch.cuda.get_device_name())
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarking is disabled (plain pytest)
        median_ms = stats.stats.median * 1e3
        info.update(median_ms=round(median_ms, 3),
                    ms_per_image_pair=round(median_ms / (BATCH // 2), 4),
                    x_floor=round(median_ms / floor_ms, 2))
    benchmark.extra_info.update(info)
