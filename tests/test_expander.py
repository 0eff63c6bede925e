"""ExpanderPool (blockwise/expander.py) against the plain conv + BN + ReLU + global pooling."""
import pytest
import torch
import torch.nn as nn

import kernels
from blockwise.expander import ExpanderPool
from blockwise.models import BlockHead
from helpers import assert_close, rel_err


def _plain(ep: ExpanderPool) -> nn.Sequential:
    """The plain expander with the same parameters/buffers (loaded through the state dict)."""
    seq = nn.Sequential(nn.Conv2d(ep.conv.in_channels, ep.conv.out_channels, 1, bias=False),
                        nn.BatchNorm2d(ep.conv.out_channels, eps=ep.bn.eps, momentum=ep.bn.momentum),
                        nn.ReLU()).to(ep.conv.weight.dtype)
    seq.load_state_dict(ep.state_dict(), strict=True)
    return seq


def _pool_ref(y: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "avg":
        return y.mean(dim=(2, 3))
    return kernels.sqrt_pool2d_ref(y).flatten(1)


def _make(cin, cout, pool, dtype, chunk_bytes, seed=0):
    torch.manual_seed(seed)
    ep = ExpanderPool(cin, cout, pool, chunk_bytes=chunk_bytes).to(dtype)
    with torch.no_grad():  # non-trivial affine so that some ReLUs are off and gamma matters
        ep.bn.weight.uniform_(0.5, 1.5)
        ep.bn.bias.uniform_(-0.5, 0.5)
    return ep


def _run(module, x, gp, pool=None):
    x = x.detach().clone().requires_grad_(True)
    out = module(x) if pool is None else _pool_ref(module(x), pool)
    out.backward(gp)
    return out.detach(), x.grad


def _grads(module, seq):
    conv, bn = (module.conv, module.bn) if isinstance(module, ExpanderPool) else (seq[0], seq[1])
    return [conv.weight.grad, bn.weight.grad, bn.bias.grad]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("pool", ["avg", "sqrt"])
@pytest.mark.parametrize("chunk_bytes,channels_last", [(1, False), (16 * 5 * 5 * 4 * 2, True),
                                                       (256 << 20, False)])
def test_matches_plain(dtype, tol, pool, chunk_bytes, channels_last):
    # N=5 with 2 images per chunk (and 1 per chunk): chunks that split the batch unevenly
    ep = _make(6, 16, pool, dtype, chunk_bytes)
    seq = _plain(ep)
    torch.manual_seed(1)
    x = torch.randn(5, 6, 5, 5, dtype=dtype) + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gp = torch.randn(5, 16, dtype=dtype)
    errs = []
    for step in range(3):  # running statistics after a few steps
        ep.zero_grad(), seq.zero_grad()
        out, dx = _run(ep, x * (1 + step), gp)
        ref, dx_ref = _run(seq, x * (1 + step), gp, pool)
        assert out.dtype == dtype and out.shape == (5, 16)
        errs += [rel_err(out, ref), rel_err(dx, dx_ref)]
        errs += [rel_err(a, b) for a, b in zip(_grads(ep, None), _grads(None, seq))]
        assert_close(ep.bn.running_mean, seq[1].running_mean, rtol=tol, atol=tol)
        assert_close(ep.bn.running_var, seq[1].running_var, rtol=tol, atol=tol)
        assert ep.bn.num_batches_tracked.item() == seq[1].num_batches_tracked.item() == step + 1
    assert max(errs) < tol, errs
    if channels_last:
        assert dx.is_contiguous(memory_format=torch.channels_last)
    # eval mode: running statistics, gradients without the statistics' terms
    ep.eval(), seq.eval()
    ep.zero_grad(), seq.zero_grad()
    out, dx = _run(ep, x, gp)
    ref, dx_ref = _run(seq, x, gp, pool)
    assert max(rel_err(out, ref), rel_err(dx, dx_ref),
               *[rel_err(a, b) for a, b in zip(_grads(ep, None), _grads(None, seq))]) < tol


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(pool, training):
    ep = _make(3, 4, pool, torch.float64, chunk_bytes=4 * 3 * 3 * 8)  # 2 images per chunk, N=3
    ep.train(training)
    ep.bn.momentum = 0.0  # gradcheck calls forward many times: keep the running stats fixed
    torch.manual_seed(2)
    x = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = ep.conv.weight.detach().clone().requires_grad_(True)
    g = ep.bn.weight.detach().clone().requires_grad_(True)
    b = ep.bn.bias.detach().clone().requires_grad_(True)

    # functional_call makes w, g, b the leaves gradcheck perturbs
    def fn(x, w, g, b):
        return torch.func.functional_call(ep, {"0.weight": w, "1.weight": g, "1.bias": b}, (x,))

    assert torch.autograd.gradcheck(fn, (x, w, g, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sqrt_zero_output_gradient_is_zero():
    ep = _make(2, 3, "sqrt", torch.float64, chunk_bytes=1)
    with torch.no_grad():
        ep.bn.bias.fill_(-100.0)  # every ReLU off: p = 0
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = ep(x)
    out.sum().backward()
    assert torch.all(out == 0)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad == 0)
    assert torch.all(ep.bn.weight.grad == 0) and torch.all(ep.conv.weight.grad == 0)


def _saved_numels(module, x):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sizes


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
def test_saves_nothing_of_map_size(pool):
    n, cin, cout, h, w = 4, 3, 8, 6, 6
    ep = _make(cin, cout, pool, torch.float32, chunk_bytes=2 * cout * h * w * 4)
    seq = _plain(ep)
    x = torch.randn(n, cin, h, w, requires_grad=True)
    big = n * cout * h * w
    sizes = _saved_numels(ep, x)
    assert sizes and max(sizes) < big, sizes
    assert max(sizes) == x.numel()  # x itself is the largest thing kept
    ref = _saved_numels(lambda t: _pool_ref(seq(t), pool), x)
    assert max(ref) >= big  # the plain path does save the map: this test can fail


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
def test_autocast_bf16_cpu(pool):
    ep = _make(8, 16, pool, torch.float32, chunk_bytes=1)
    seq = _plain(ep)
    x = torch.randn(4, 8, 5, 5) + 0.2
    gp = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dx = _run(ep, x, gp)
        out_bf, dx_bf = _run(seq, x, gp, pool)  # the plain path in bf16: the error allowed
    exact = _plain(ep).double()
    ref, dx_ref = _run(exact, x.double(), gp.double(), pool)
    assert out.dtype == torch.float32 and dx.dtype == torch.float32
    assert ep.conv.weight.grad.dtype == torch.float32
    for mine, plain, exact in ((out, out_bf, ref), (dx, dx_bf, dx_ref),
                               (ep.conv.weight.grad, seq[0].weight.grad, exact[0].weight.grad)):
        assert rel_err(mine.double(), exact) <= 2 * rel_err(plain.double(), exact) + 1e-3
    assert rel_err(out.double(), ref) < 1e-2  # bf16 matmuls really ran, but not garbage


def test_autocast_leaves_fp64_alone():
    """Autocast does not cast fp64 tensors (the plain conv stays fp64 under it): neither does
    ExpanderPool, whose output is fp64 for fp64 inputs "also under autocast"."""
    ep = _make(3, 4, "sqrt", torch.float64, chunk_bytes=1)
    seq = _plain(ep)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    gp = torch.randn(2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dx = _run(ep, x, gp)
        ref, dx_ref = _run(seq, x, gp, "sqrt")
    assert out.dtype == dx.dtype == ref.dtype == torch.float64
    assert max(rel_err(out, ref), rel_err(dx, dx_ref)) < 1e-12


def test_bad_input():
    ep = ExpanderPool(3, 4)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        ep(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="unknown pool"):
        ExpanderPool(3, 4, "max")
    with pytest.raises(ValueError, match="more than 1 value"):
        ep(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("kw", [dict(eps_pool=-1.0), dict(eps_pool=float("nan")),
                                dict(eps_bn=0.0), dict(eps_bn=float("nan"))],
                         ids=["eps_pool<0", "eps_pool=nan", "eps_bn=0", "eps_bn=nan"])
def test_bad_eps_rejected_at_construction(kw):
    """A NaN eps would make every output NaN on the torch path (the fused launcher raises only
    at the first forward): rejected when built, as a negative one."""
    with pytest.raises(ValueError, match="need eps_bn > 0 and eps_pool >= 0"):
        ExpanderPool(3, 4, "sqrt", **kw)


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
def test_blockhead_flag_matches_plain(pool):
    torch.manual_seed(3)
    plain = BlockHead(6, 16, pool, None, "12-8", fused=False, expander_recompute=False)
    fast = BlockHead(6, 16, pool, None, "12-8", fused=False, expander_recompute=True)
    assert isinstance(fast.expander, ExpanderPool) and not isinstance(plain.expander, ExpanderPool)
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(4, 6, 5, 5)
    outs = []
    for head in (plain, fast):
        xi = x.clone().requires_grad_(True)
        head(xi).square().sum().backward()
        outs.append([head(x).detach(), xi.grad] + [p.grad for p in head.parameters()])
    errs = [rel_err(a, b) for a, b in zip(*outs)]
    assert max(errs) < 1e-4, errs
    # window pooling keeps the plain path
    assert not isinstance(BlockHead(6, 16, pool, 2, "none", fused=False,
                                    expander_recompute=True).expander, ExpanderPool)


def test_trainer_heads_follow_the_config_flag():
    from blockwise.config import Config
    from blockwise.trainer import initial_head
    kw = dict(dataset="synthetic", image_size=8, projector="16-16", expander=16, device="cpu")
    on, off = Config(**kw), Config(expander_recompute=False, **kw)
    assert on.expander_recompute is True  # the default
    a, b = initial_head(on, 0, fused=False), initial_head(off, 0, fused=False)
    assert isinstance(a.expander, ExpanderPool) and not isinstance(b.expander, ExpanderPool)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)  # same init
