"""Comparison helpers shared by the test files (imported as ``from helpers import ...``)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0,
                 name: str = "tensor") -> None:
    """Like torch.testing.assert_close but says where and how much the tensors differ."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite values"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {bad.sum().item()}/{bad.numel()} elements differ; worst abs diff "
            f"{diff.max().item():.3e}; first at {idx}: got {a[tuple(idx)].item():.6e}, "
            f"expected {e[tuple(idx)].item():.6e} (rtol={rtol}, atol={atol})"
        )


def assert_three_way(kernel: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
                     atol: float = 1e-6, name: str = "tensor") -> None:
    """bf16/fp16 rule: err(kernel vs fp64) <= 2 * err(torch same dtype vs fp64) + atol (relative norms)."""
    k = rel_err(kernel, ref64)
    t = rel_err(torch_same_dtype, ref64)
    assert k <= 2 * t + atol, f"{name}: kernel rel err {k:.3e} > 2 * torch rel err {t:.3e} + {atol:g}"


#: the smallest CPU training run the CLI accepts: tests of the trainer's CLI and probe start here
TINY_TRAIN_ARGS = ["--dataset", "synthetic", "--image-size", "8", "--synthetic-size", "32",
                   "--num-classes", "4", "--batch-size", "8", "--projector", "16-16",
                   "--epochs", "1", "--workers", "0", "--device", "cpu", "--log-interval", "1"]


def compile_static(fn, recompile_limit: int, mode=None):
    """torch.compile(fn, dynamic=False, mode=mode) with room for one compile per benchmarked
    shape (mode "reduce-overhead": inductor's code replayed from CUDA graphs)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), recompile_limit))
    return torch.compile(fn, dynamic=False, mode=mode)


# ----------------------------------------------------------------------------------------------
# GPU benchmark measurements (tests/benchmarks): one definition for every benchmark and sweep


def _median_ms(fn, warmup: int = 25, rep: int = 200) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _rate(measure) -> float:
    """measure() with its buffers released (they go out of scope) before the cache is emptied."""
    rate = measure()
    torch.cuda.empty_cache()
    return rate


def device_copy_rate(device="cuda") -> float:
    """Device copy rate in bytes/s, counting bytes read plus bytes written (1 GiB bf16 each way,
    ``do_bench`` median)."""
    def measure():
        src = torch.randn(2 ** 29, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return 2 * src.nbytes / (_median_ms(lambda: dst.copy_(src)) * 1e-3)
    return _rate(measure)


def device_matmul_rate(device="cuda") -> float:
    """bf16 matmul rate in flop/s on random 8192^3 operands (``do_bench`` median, 300 ms)."""
    def measure():
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        return 2 * 8192 ** 3 / (_median_ms(lambda: a @ b, warmup=50, rep=300) * 1e-3)
    return _rate(measure)


def peak_extra_mib(fn) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before it, MiB
    (its returned tensors included while they exist)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2 ** 20
