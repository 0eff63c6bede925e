"""kernels/expander_pool.py: the launchers against their references, and ExpanderPool(fused=True)
against ExpanderPool's torch path (which runs those references).

On CPU the kernels run under Triton's interpreter: shapes are tiny, chunk_bytes forces several
chunks per batch.
"""
import pytest
import torch

import kernels
from blockwise.expander import ExpanderPool
from blockwise.models import BlockHead
from helpers import assert_close, assert_three_way, rel_err

OFF = 3  # channels 0..OFF-1 get beta = -50: a <= 0 at every pixel (avg: no ReLU on; sqrt: p = 0)


@pytest.fixture
def calls(monkeypatch):
    """Counts the launcher calls made through ``kernels`` (as ExpanderPool makes them)."""
    n = {"fwd": 0, "bwd": 0}
    for kind in n:
        real = getattr(kernels, f"expander_pool_{kind}")

        def counted(*a, _real=real, _kind=kind, **k):
            n[_kind] += 1
            return _real(*a, **k)
        monkeypatch.setattr(kernels, f"expander_pool_{kind}", counted)
    return n


def _modules(cin, cout, pool, chunk_bytes, eps_pool, device, dtype=torch.float32):
    """(torch path, fused) ExpanderPools with the same parameters."""
    torch.manual_seed(0)
    ref = ExpanderPool(cin, cout, pool, chunk_bytes=chunk_bytes, eps_pool=eps_pool)
    with torch.no_grad():  # non-trivial affine; some channels off everywhere
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-0.5, 0.5)
        ref.bn.bias[:OFF] = -50.0
    ref = ref.to(device, dtype)
    fused = ExpanderPool(cin, cout, pool, chunk_bytes=chunk_bytes, eps_pool=eps_pool,
                         fused=True).to(device, dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


def _step(module, x, gp):
    """Output, x grad and parameter grads of one forward + backward."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(gp)
    return [out.detach(), x.grad, module.conv.weight.grad, module.bn.weight.grad,
            module.bn.bias.grad]


NAMES = ("out", "dx", "dweight", "dgamma", "dbeta")


def _close(got, want, rtol, name):
    """rtol relative to each element, with an absolute floor of rtol * max |want|."""
    assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), name=name)


# (n, H, W, images per chunk, channels_last, eps_pool): several chunks, an uneven last chunk,
# a map smaller than one pixel tile, and one chunk for the whole batch
CASES = [(3, 5, 7, 2, False, 0.0), (3, 5, 7, 1, True, 0.25), (5, 3, 1, 5, False, 0.0)]


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
@pytest.mark.parametrize("n,hgt,wid,per_chunk,channels_last,eps_pool", CASES,
                         ids=["5x7-nchw", "5x7-cl-eps", "3x1-one-chunk"])
def test_fused_matches_torch_path(device, calls, pool, n, hgt, wid, per_chunk, channels_last,
                                  eps_pool):
    cin, cout = 8, 37
    ref, fused = _modules(cin, cout, pool, per_chunk * cout * hgt * wid * 4, eps_pool, device)
    torch.manual_seed(1)
    x = torch.randn(n, cin, hgt, wid, device=device) + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gp = torch.randn(n, cout, device=device)
    for step in range(2):  # training mode: batch statistics, running statistics updated
        got, want = _step(fused, x * (1 + step), gp), _step(ref, x * (1 + step), gp)
        for g, w, name in zip(got, want, NAMES):
            _close(g, w, 1e-5, f"train step {step} {name}")
        for buf in ("running_mean", "running_var"):
            assert_close(getattr(fused.bn, buf), getattr(ref.bn, buf), rtol=1e-6, name=buf)
    # the channels that are off everywhere: output 0 (sqrt with eps_pool = 0: p = 0) and
    # finite gradients (no 0/0), exactly 0 for gamma and beta
    assert torch.all(got[0][:, :OFF] == (eps_pool ** 0.5 if pool == "sqrt" else 0.0))
    assert torch.all(got[3][:OFF] == 0) and torch.all(got[4][:OFF] == 0)
    assert calls["fwd"] == 2 * -(-n // per_chunk) and calls["bwd"] == 2 * -(-n // per_chunk)
    if channels_last:
        assert got[1].is_contiguous(memory_format=torch.channels_last)
    fused.eval(), ref.eval()  # eval mode: running statistics, no statistics' terms in dh
    got, want = _step(fused, x, gp), _step(ref, x, gp)
    for g, w, name in zip(got, want, NAMES):
        _close(g, w, 1e-5, f"eval {name}")


@pytest.mark.parametrize("pool,mode", [("avg", "autocast"), ("sqrt", "autocast"),
                                       ("avg", "bf16"), ("sqrt", "bf16")])
def test_bf16_three_way(device, calls, pool, mode):
    """bf16 matmuls (autocast over fp32 parameters, or bf16 input and parameters): fused error
    vs the fp64 torch path at most twice the bf16 torch path's."""
    cin, cout, n, hgt, wid = 8, 37, 3, 5, 7
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    ref, fused = _modules(cin, cout, pool, 2 * cout * hgt * wid * 4, 0.0, device, dtype)
    exact = ExpanderPool(cin, cout, pool, chunk_bytes=1 << 30).to(device, torch.float64)
    exact.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    x = torch.randn(n, cin, hgt, wid, device=device) + 0.3
    gp = torch.randn(n, cout, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
        got = _step(fused, x.to(dtype), gp)
        same = _step(ref, x.to(dtype), gp)
    want = _step(exact, x.double(), gp.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert calls["fwd"] == 2 and calls["bwd"] == 2
    for g, s, w, name in zip(got, same, want, NAMES):
        assert_three_way(g, s, w, name=name)
    assert rel_err(got[0], want[0]) < 3e-2  # bf16 really ran, but not garbage


@pytest.mark.parametrize("pool,training", [("avg", True), ("sqrt", True), ("sqrt", False)])
def test_gradcheck_fused(device, calls, pool, training):
    torch.manual_seed(0)
    ep = ExpanderPool(2, 3, pool, chunk_bytes=2 * 3 * 2 * 2 * 8, fused=True)  # 2 images/chunk
    with torch.no_grad():
        ep.bn.weight.uniform_(0.5, 1.5)
        ep.bn.bias.uniform_(-0.5, 0.5)
    ep = ep.to(device, torch.float64).train(training)
    ep.bn.momentum = 0.0  # gradcheck calls forward many times: keep the running stats fixed
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True)
              for p in (ep.conv.weight, ep.bn.weight, ep.bn.bias)]

    def fn(x, w, g, b):
        return torch.func.functional_call(ep, {"0.weight": w, "1.weight": g, "1.bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert calls["fwd"] > 0 and calls["bwd"] > 0


def _inputs(m, hw, cout, dtype, device):
    """h and the per-channel vectors of a realistic forward: h's batch statistics, channels
    0..OFF-1 off everywhere."""
    acc = torch.promote_types(dtype, torch.float32)
    h = (torch.randn(m * hw, cout, device=device, dtype=acc) * 2 + 0.5).to(dtype)
    hf = h.to(acc)
    mu = hf.mean(0)
    rstd = torch.rsqrt(hf.var(0, unbiased=False) + 1e-5)
    gamma = torch.rand(cout, device=device, dtype=acc) + 0.5
    beta = torch.rand(cout, device=device, dtype=acc) - 0.5
    beta[:OFF] = -50.0
    return h, mu, rstd, gamma, beta


# (dtype, hw, cout): fp32/bf16 over 2/3 pixel tiles of 32 (the last one partial); fp64 with two
# channel tiles and a map smaller than a pixel tile
LAUNCH = [(torch.float32, 35, 37), (torch.bfloat16, 70, 37), (torch.float64, 9, 130)]


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
@pytest.mark.parametrize("dtype,hw,cout", LAUNCH, ids=["fp32", "bf16", "fp64"])
def test_launchers_match_ref(device, pool, dtype, hw, cout):
    m = 3
    h, mu, rstd, gamma, beta = _inputs(m, hw, cout, dtype, device)
    acc = mu.dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    eps_pool = 0.0
    ref = kernels.expander_pool_fwd_ref(h, mu, rstd, gamma, beta, hw, pool, eps_pool)
    # forward into row slices of NaN-poisoned batch buffers: the slice is written, nothing else;
    # the pixels in one program (split 1) or in several (partial sums; more than there are tiles)
    for split in (1, 2, 8):
        bufs = [torch.full((m + 2, cout), float("nan"), dtype=acc, device=device)
                for _ in range(3)]
        got = kernels.expander_pool_fwd(h, mu, rstd, gamma, beta, hw, pool, eps_pool,
                                        out=bufs[0][1:m + 1], sa=bufs[1][1:m + 1],
                                        sb=bufs[2][1:m + 1], split=split)
        for g, r, buf, name in zip(got, ref, bufs, ("out", "sa", "sb")):
            _close(g, r, tol, f"fwd split {split} {name}")
            assert g.data_ptr() == buf[1].data_ptr()
            assert torch.isnan(buf[0]).all() and torch.isnan(buf[-1]).all(), \
                f"{name}: wrote outside its rows"
            assert torch.all(g[:, :OFF] == 0), f"{name}: channels with a <= 0 everywhere"
    assert all(t.dtype == acc and t.shape == (m, cout) for t in kernels.expander_pool_fwd(
        h, mu, rstd, gamma, beta, hw, pool))  # allocated outputs
    # backward: the weights of a real backward (sqrt: p = 0 gives wsc = 0, not 0/0)
    out = ref[0]
    gp = torch.randn(m, cout, device=device, dtype=acc)
    if pool == "avg":
        wsc = gp / hw
    else:
        wsc = torch.where(out > 0, gp / torch.where(out > 0, out, torch.ones_like(out)),
                          torch.zeros_like(out))
    c0, c1 = torch.randn(2, cout, device=device, dtype=acc).unbind(0)
    for stats in ((c0, c1), (None, None)):
        want = kernels.expander_pool_bwd_ref(h, mu, rstd, gamma, beta, wsc, *stats, hw, pool)
        hk = h.clone()
        dh = kernels.expander_pool_bwd(hk, mu, rstd, gamma, beta, wsc, *stats, hw, pool)
        assert dh is hk and dh.dtype == dtype  # in place, in h's dtype
        if dtype == torch.bfloat16:  # the fp32 values may differ in the last bits: 1 bf16 ulp
            _close(dh, want.to(dtype), 2 ** -8, "bwd dh (bf16)")
            # rounded to nearest like .to(bf16), not truncated (which would miss about half)
            assert (dh != want.to(dtype)).float().mean().item() < 0.02
        else:
            _close(dh, want, tol, "bwd dh")
        if stats[0] is None:  # eval mode: no gradient at all where a <= 0 everywhere
            assert torch.all(dh[:, :OFF] == 0)


def test_launchers_bad_input(device, monkeypatch):
    m, hw, cout = 2, 4, 5
    h, mu, rstd, gamma, beta = _inputs(m, hw, cout, torch.float32, device)
    vecs = (mu, rstd, gamma, beta)
    fwd, bwd = kernels.expander_pool_fwd, kernels.expander_pool_bwd
    wsc = torch.zeros(m, cout, device=device)
    with pytest.raises(TypeError, match="h must be floating point"):
        fwd(h.int(), *vecs, hw, "avg")
    with pytest.raises(ValueError, match="2-D"):
        fwd(h.view(m, hw, cout), *vecs, hw, "avg")
    with pytest.raises(ValueError, match="contiguous"):
        fwd(h.t(), *vecs, cout, "avg")
    with pytest.raises(ValueError, match="not a multiple of hw=3"):
        fwd(h, *vecs, 3, "avg")
    with pytest.raises(ValueError, match="positive int"):
        fwd(h, *vecs, 0, "avg")
    with pytest.raises(ValueError, match="unknown pool 'max'; valid: avg, sqrt"):
        fwd(h, *vecs, hw, "max")
    with pytest.raises(TypeError, match="mu must be torch.float32"):
        fwd(h, mu.double(), *vecs[1:], hw, "avg")
    with pytest.raises(TypeError, match="rstd must be torch.float64 for an h of dtype"):
        fwd(h.double(), mu.double(), rstd, gamma.double(), beta.double(), hw, "avg")
    with pytest.raises(ValueError, match="gamma must be a contiguous vector of Cout=5"):
        fwd(h, mu, rstd, gamma[:4], beta, hw, "avg")
    with pytest.raises(ValueError, match="split must be None"):
        fwd(h, *vecs, hw, "avg", split=0)
    with pytest.raises(ValueError, match="eps_pool"):
        fwd(h, *vecs, hw, "sqrt", -1.0)
    with pytest.raises(ValueError, match="sa must be a contiguous 2 x 5"):
        fwd(h, *vecs, hw, "avg", sa=torch.empty(3, cout, device=device))
    with pytest.raises(ValueError, match="out must be a contiguous 2 x 5 torch.float32"):
        fwd(h, *vecs, hw, "avg", out=torch.empty(m, cout, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device"):
        fwd(h, mu.to("meta"), *vecs[1:], hw, "avg")
    with pytest.raises(ValueError, match="wsc must be a contiguous 2 x 5"):
        bwd(h, *vecs, wsc[:1], None, None, hw, "avg")
    with pytest.raises(ValueError, match="both c0 and c1"):
        bwd(h, *vecs, wsc, mu, None, hw, "avg")
    with pytest.raises(TypeError, match="c1 must be torch.float32"):
        bwd(h, *vecs, wsc, mu, mu.half(), hw, "avg")
    with pytest.raises(ValueError, match="one device"):
        bwd(h, *vecs, wsc, mu, rstd.to("meta"), hw, "avg")
    # a CPU tensor without the interpreter: the error names the options
    from kernels import _runtime
    monkeypatch.setattr(_runtime, "INTERPRETER", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fwd(h.cpu(), *(v.cpu() for v in vecs), hw, "avg")


def test_fused_flag_plumbing(calls, monkeypatch):
    assert "fused=True" in repr(ExpanderPool(3, 4, fused=True))
    assert "fused=False" in repr(ExpanderPool(3, 4))
    head = BlockHead(6, 16, "sqrt", None, "8", fused=True, expander_recompute=True)
    assert isinstance(head.expander, ExpanderPool) and head.expander.fused
    assert not BlockHead(6, 16, "sqrt", None, "8", fused=False,
                         expander_recompute=True).expander.fused
    # where Triton cannot run, fused=True is the torch path (no kernel call, same result)
    ref, fused = _modules(4, 6, "avg", 1, 0.0, torch.device("cpu"))
    monkeypatch.setattr(kernels, "triton_can_run_on", lambda device: False)
    x = torch.randn(2, 4, 3, 3)
    gp = torch.randn(2, 6)
    for g, w, name in zip(_step(fused, x, gp), _step(ref, x, gp), NAMES):
        assert torch.equal(g, w), name
    assert calls == {"fwd": 0, "bwd": 0}


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
def test_nan_in_h_as_reference(device, pool):
    """A NaN in the map reaches the same outputs (and dh elements) as in the reference."""
    m, hw, cout = 2, 6, 8
    h, mu, rstd, gamma, beta = _inputs(m, hw, cout, torch.float32, device)
    h[3, 4] = float("nan")  # image 0, channel 4 (ReLU on there)
    beta[4] = 1.0
    got = kernels.expander_pool_fwd(h, mu, rstd, gamma, beta, hw, pool)
    want = kernels.expander_pool_fwd_ref(h, mu, rstd, gamma, beta, hw, pool)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan())
    assert got[0].isnan().any()  # both pools: a NaN in the map is never hidden behind a 0
    wsc = torch.randn(m, cout, device=device)
    dh = kernels.expander_pool_bwd(h.clone(), mu, rstd, gamma, beta, wsc, None, None, hw, pool)
    want = kernels.expander_pool_bwd_ref(h, mu, rstd, gamma, beta, wsc, None, None, hw, pool)
    assert torch.equal(dh.isnan(), want.isnan())


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
def test_reference_path_holds_few_map_sized_buffers(pool):
    """The PyTorch path (ExpanderPool without Triton) works in place on fresh buffers: at most
    about three fp32 map-sized buffers in the forward and two in the backward (the plain
    expressions held five and six: 1.5 GiB per chunk at block 1 of a ResNet-50), and h is left
    as it was."""
    from profiling.tensor_bytes import TensorBytesMeter

    m, hw, c = 4, 196, 256
    g = torch.Generator().manual_seed(0)
    h = torch.randn(m * hw, c, generator=g).to(torch.bfloat16)
    mu, rstd = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
    gamma, beta = torch.randn(c, generator=g), torch.randn(c, generator=g)
    wsc, c0, c1 = torch.randn(m, c, generator=g), torch.randn(c, generator=g), torch.randn(c, generator=g)
    h0 = h.clone()
    fp32_map = m * hw * c * 4
    with TensorBytesMeter() as fwd:
        out = kernels.expander_pool_fwd_ref(h, mu, rstd, gamma, beta, hw, pool)
    with TensorBytesMeter() as bwd:
        dh = kernels.expander_pool_bwd_ref(h, mu, rstd, gamma, beta, wsc, c0, c1, hw, pool)
    assert fwd.peak <= 3.3 * fp32_map and bwd.peak <= 2.3 * fp32_map, (fwd.peak, bwd.peak)
    assert torch.equal(h, h0)
    # the plain expressions, evaluated here, give the same bits
    hh = (h.float().view(m, hw, c) - mu) * rstd
    a = hh * gamma + beta
    wg = wsc[:, None, :] * gamma
    dhhat = (a > 0).float() * wg if pool == "avg" else a.clamp_min(0) * wg
    assert torch.equal(dh, ((dhhat - c0 - hh * c1) * rstd).reshape(m * hw, c))
    y = a.clamp_min(0)
    if pool == "avg":
        mask = (a > 0).float()
        assert torch.equal(out[1], mask.sum(1)) and torch.equal(out[2], (hh * mask).sum(1))
    else:
        assert torch.equal(out[1], y.sum(1)) and torch.equal(out[2], (y * hh).sum(1))
