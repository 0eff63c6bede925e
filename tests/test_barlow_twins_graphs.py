"""barlow_twins_loss(..., cuda_graphs=True): the op replayed from a graph per input address.

On the CPU the capture backend is replaced by a fake with the same contract (capture computes
nothing: its outputs are poisoned with NaN; replay recomputes them in place from the current
inputs), which tests the cache, the call-order handling and the fallbacks. The real CUDA graphs
are tested at the end (skipped without CUDA).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import kernels.barlow_twins as bt
from kernels.barlow_twins import BarlowTwinsLoss, barlow_twins_loss


class FakeGraphs:
    def __init__(self):
        self.captured = self.replayed = 0

    @staticmethod
    def usable(z):
        return True

    def capture(self, fn, z1, z2):
        loss, dz = fn(z1, z2)  # a real capture records without computing: poison the outputs
        for t in (loss, *dz):
            t.fill_(math.nan)
        self.captured += 1

        def replay(a, b):
            new_loss, new_dz = fn(a, b)
            loss.copy_(new_loss)
            dz[0].copy_(new_dz[0])
            dz[1].copy_(new_dz[1])
            self.replayed += 1

        return replay, (loss, dz)


@pytest.fixture
def fake(monkeypatch):
    cache = bt._GraphCache()
    cache.backend = FakeGraphs()
    monkeypatch.setattr(bt, "_GRAPHS", cache)
    calls = {"n": 0}
    orig = bt._loss_and_grads

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(bt, "_loss_and_grads", counted)
    cache.calls = calls
    return cache


def _views(n=8, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    z2 = 0.6 * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)
    return (z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_())


def _plain(z1, z2, **kw):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = barlow_twins_loss(a, b, **kw)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b)))


def _graphed(z1, z2, scale_grad=1.0, **kw):
    loss = barlow_twins_loss(z1, z2, cuda_graphs=True, **kw)
    return (loss.detach(), *torch.autograd.grad(loss * scale_grad, (z1, z2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_to_the_direct_launchers_eager_capture_replay(fake, device, dtype):
    if device.type == "cuda":
        pytest.skip("the fake backend is for the CPU; CUDA runs the real graphs below")
    z1, z2 = _views(dtype=dtype)
    want = _plain(z1, z2, lambd=0.02, scale=0.5)
    for i in range(3):  # 1st: direct (compiles); 2nd: captured, replayed; 3rd: replayed
        got = _graphed(z1, z2, lambd=0.02, scale=0.5)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), i
    assert (fake.backend.captured, fake.backend.replayed) == (1, 2)
    # other settings are another graph
    _graphed(z1, z2, lambd=0.03)
    _graphed(z1, z2, lambd=0.03)
    assert fake.backend.captured == 2


def test_replay_reads_the_current_values(fake, device):
    if device.type == "cuda":
        pytest.skip("fake backend: CPU only")
    z1, z2 = _views()
    _graphed(z1, z2)
    _graphed(z1, z2)  # captured
    with torch.no_grad():  # new values at the same addresses
        z1.mul_(-1.5).add_(0.2)
    want = _plain(z1, z2)
    got = _graphed(z1, z2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert fake.backend.replayed == 2


def test_backward_after_a_later_replay_recomputes(fake, device):
    if device.type == "cuda":
        pytest.skip("fake backend: CPU only")
    z1, z2 = _views()
    want = _plain(z1, z2)
    _graphed(z1, z2)
    _graphed(z1, z2)  # captured
    loss_a = barlow_twins_loss(z1, z2, cuda_graphs=True)
    loss_b = barlow_twins_loss(z1, z2, cuda_graphs=True)  # replays: the static dz is b's now
    before = fake.calls["n"]
    ga = torch.autograd.grad(loss_a, (z1, z2))
    assert fake.calls["n"] == before + 1  # a's gradients were recomputed, not read from b's
    gb = torch.autograd.grad(loss_b, (z1, z2), retain_graph=True)
    gb2 = torch.autograd.grad(loss_b, (z1, z2))  # a retained graph: b still owns the buffers
    assert fake.calls["n"] == before + 1
    for g in (ga, gb, gb2):
        assert all(torch.equal(x, w) for x, w in zip(g, want[1:]))


def test_grad_loss_scales_the_gradients(fake, device):
    if device.type == "cuda":
        pytest.skip("fake backend: CPU only")
    z1, z2 = _views(dtype=torch.bfloat16)
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    want = torch.autograd.grad(barlow_twins_loss(a, b) * 3.0, (a, b))  # 3 * dz, rounded once
    for _ in range(3):
        got = _graphed(z1, z2, scale_grad=3.0)
        for g, w in zip(got[1:], want):
            # 3 * (dz in fp32), rounded once to bf16: the direct path's value up to fp32 rounding
            assert torch.allclose(g.float(), w.float(), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("path", ["gram", "cross", "gram-chunked"])
def test_fp16_gradients_neither_underflow_nor_overflow(fake, device, path, monkeypatch):
    """The graph computes the gradients at grad_loss = 1. Stored in fp16 there they underflowed
    (a GradScaler's grad_loss of 2^16 then multiplied subnormals: 4.8% error) or overflowed to
    inf where grad_loss * dz is finite (94.75 here); the direct path rounds grad_loss * dz once.
    "gram-chunked": the multi-tile backward whose K-loop operands are the forward's a, b."""
    if device.type == "cuda":
        pytest.skip("fake backend: CPU only")
    if path == "gram-chunked":
        monkeypatch.setattr(bt, "_FINAL_MAX_ROWS", 0)
        monkeypatch.setattr(bt, "_FP32_MAX_ROWS", 0)  # fp16 operands: the forward's a, b kept
    z1, z2 = _views(d=64, dtype=torch.float16)
    method = "cross" if path == "cross" else "gram"
    for scale, grad in ((1e-6, 2.0 ** 16), (1e5, 2.0 ** -10)):
        a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        want = torch.autograd.grad(barlow_twins_loss(a, b, scale=scale, method=method) * grad,
                                   (a, b))
        for _ in range(3):  # direct, captured and replayed, replayed
            got = _graphed(z1, z2, scale_grad=grad, scale=scale, method=method)
            for g, w in zip(got[1:], want):
                assert g.dtype == torch.float16 and torch.isfinite(g).all(), (scale, path)
                assert torch.allclose(g.float(), w.float(), rtol=2 ** -10, atol=0), (scale, path)


def test_falls_back_to_the_direct_path(fake, device):
    if device.type == "cuda":
        pytest.skip("fake backend: CPU only")
    z1, z2 = _views()
    for _ in range(3):
        loss = barlow_twins_loss(z1.detach(), z2, cuda_graphs=True)  # z1 needs no grad
        torch.autograd.grad(loss, z2)
        with torch.no_grad():
            barlow_twins_loss(z1, z2, cuda_graphs=True)
        t1, t2 = z1.detach().t().contiguous().t(), z2.detach().t().contiguous().t()
        t1.requires_grad_()
        t2.requires_grad_()
        loss = barlow_twins_loss(t1, t2, cuda_graphs=True)  # not contiguous
        torch.autograd.grad(loss, (t1, t2))
    assert fake.backend.captured == 0 and fake.calls["n"] == 0


def test_cache_bounds_and_switches_off_when_addresses_change():
    cache = bt._GraphCache(max_graphs=2, max_captures=3)
    cache.backend = FakeGraphs()
    one = torch.ones(())

    def fn(a, b):
        return one.clone(), (a.clone(), b.clone())

    x = torch.zeros(2)
    for k in range(3):
        assert not cache.want_capture(("k", k))
        assert cache.want_capture(("k", k))
        assert cache.capture(("k", k), fn, x, x) is not None
    assert list(cache.graphs) == [("k", 1), ("k", 2)]  # least recently used dropped
    assert cache.lookup(("k", 1)) is not None and list(cache.graphs)[-1] == ("k", 1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cache.capture(("k", 3), fn, x, x) is None  # 3 captures, 1 replay: thrashing
    assert cache.disabled and "replayed" in cache.disabled
    assert len(w) == 1 and "switched off" in str(w[0].message)
    assert not cache.want_capture(("k", 4)) and not cache.graphs


def test_a_failed_capture_switches_graphs_off(fake, device):
    if device.type == "cuda":
        pytest.skip("fake backend: CPU only")

    def broken(fn, z1, z2):
        raise RuntimeError("operation not permitted when stream is capturing")

    fake.backend.capture = broken
    z1, z2 = _views()
    want = _plain(z1, z2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            got = _graphed(z1, z2)
            assert all(torch.equal(g, x) for g, x in zip(got, want))
    assert len(w) == 1 and "capture failed (RuntimeError: operation not permitted" in str(w[0].message)
    assert fake.disabled and not fake.graphs


def test_module_and_real_backend_on_cpu(device):
    m = BarlowTwinsLoss(lambd=0.02, cuda_graphs=True)
    assert "cuda_graphs=True" in repr(m)
    z1, z2 = _views()
    z1, z2 = z1.detach().to(device).requires_grad_(), z2.detach().to(device).requires_grad_()
    want = _plain(z1, z2, lambd=0.02)
    for _ in range(3):
        loss = m(z1, z2)
        got = (loss.detach(), *torch.autograd.grad(loss, (z1, z2)))
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-6, atol=0)
    if device.type != "cuda":  # the real backend does not capture CPU tensors
        assert not bt._GRAPHS.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need CUDA")
@pytest.mark.parametrize("n", [256, 1024])
def test_real_cuda_graphs(n):
    bt._GRAPHS.clear()
    g = torch.Generator(device="cuda").manual_seed(n)
    sets = [tuple(torch.randn(n, 8192, device="cuda", generator=g, dtype=torch.bfloat16)
                  .requires_grad_() for _ in range(2)) for _ in range(2)]
    wants = [_plain(a, b) for a, b in sets]
    for _ in range(3):
        for (a, b), want in zip(sets, wants):
            got = _graphed(a, b)
            for x, w in zip(got, want):
                assert torch.equal(x, w)
    # round 1 runs directly, round 2 captures (and replays once), round 3 finds the graphs
    assert len(bt._GRAPHS.graphs) == 2 and bt._GRAPHS.captures == 2 and bt._GRAPHS.replays == 2
    # interleaved forwards on the same inputs, backward in the other order
    a, b = sets[0]
    la = barlow_twins_loss(a, b, cuda_graphs=True)
    lb = barlow_twins_loss(a, b, cuda_graphs=True)
    for loss in (lb, la):
        got = torch.autograd.grad(loss, (a, b))
        assert all(torch.equal(x, w) for x, w in zip(got, wants[0][1:]))
    # fresh tensors each call, as a projector's outputs in training: the caching allocator
    # hands out the same addresses again, so the graph is found with new values
    bt._GRAPHS.clear()
    for i in range(5):
        a, b = (torch.randn(n, 8192, device="cuda", generator=g, dtype=torch.bfloat16)
                .requires_grad_() for _ in range(2))
        want = _plain(a, b)
        got = _graphed(a, b)
        assert all(torch.equal(x, w) for x, w in zip(got, want)), i
        del a, b, got, want
    assert bt._GRAPHS.replays >= 1, (bt._GRAPHS.captures, bt._GRAPHS.replays)
    bt._GRAPHS.clear()
