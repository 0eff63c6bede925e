"""kernels.sqrt_pool: values and gradients of the Triton kernels against the PyTorch reference.

Runs on CUDA when present, otherwise on CPU under Triton's interpreter (shapes kept small).
"""
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import assert_close, assert_three_way, rel_err
from kernels import SqrtPool2d, sqrt_pool2d, sqrt_pool2d_ref
from kernels import _runtime
from kernels import sqrt_pool as sp

LAYOUTS = ("nchw", "channels_last")
FORMAT = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# (shape, pooling arguments): odd and prime sizes, batch 1, asymmetric windows, overlapping
# windows (k > s), gaps (s > k), padding, ceil_mode, eps, and the whole-map (global) paths
CASES = [
    ((2, 3, 8, 8), dict(kernel_size=2)),
    ((1, 5, 11, 13), dict(kernel_size=3, stride=2)),
    ((3, 2, 7, 9), dict(kernel_size=(3, 2), stride=(2, 1))),
    ((2, 3, 9, 7), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 3, 10, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 3, 8, 9), dict(kernel_size=2, ceil_mode=True)),
    ((2, 4, 7, 7), dict(kernel_size=3, stride=1, eps=0.5)),
    ((2, 3, 9, 9), dict(kernel_size=2, stride=3)),
    ((2, 3, 6, 5), dict(kernel_size=None)),
    ((2, 3, 6, 5), dict(kernel_size=None, eps=0.25)),
    ((2, 3, 6, 5), dict(kernel_size=(6, 5), stride=(6, 5))),
    ((1, 3, 5, 5), dict(kernel_size=5, padding=2)),
    # the NCHW "pair" path (column stride 2, no column padding, KW 2 or 3) with row padding,
    # row stride 1, odd widths and ceil_mode
    ((2, 3, 9, 11), dict(kernel_size=3, stride=(1, 2), padding=(1, 0))),
    ((1, 4, 9, 11), dict(kernel_size=3, stride=2, ceil_mode=True)),
    ((2, 3, 7, 10), dict(kernel_size=(2, 3), stride=2, eps=0.3)),
    # the NCHW "quad" backward (stride 2 x 2) with row padding and a 3 x 2 window
    ((2, 3, 9, 10), dict(kernel_size=3, stride=2, padding=(1, 0))),
    ((1, 3, 10, 9), dict(kernel_size=(3, 2), stride=2)),
]


def _ids(cases):
    return [f"{'x'.join(map(str, s))}-" + "-".join(f"{k}={v}" for k, v in kw.items())
            for s, kw in cases]


def _input(shape, dtype, device, layout, requires_grad=True):
    x = torch.randn(shape, device=device).to(dtype)
    x = x.contiguous(memory_format=FORMAT[layout])
    return x.requires_grad_(requires_grad)


def _value_and_grad(fn, x, dy=None, **kw):
    """(y, dx, dy) of fn(x, **kw); a fresh random dy when none is given."""
    x = x.detach().clone().requires_grad_(True)  # clone keeps the memory format
    y = fn(x, **kw)
    if dy is None:
        dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx, dy


def _ref64(x, dy, **kw):
    """Reference value and gradient in float64 on the CPU."""
    y, dx, _ = _value_and_grad(sqrt_pool2d_ref, x.detach().double().cpu(), dy.double().cpu(), **kw)
    return y, dx


def _check_format(t, layout, name):
    assert t.is_contiguous(memory_format=FORMAT[layout]), \
        f"{name}: not {layout}-contiguous (strides {t.stride()})"


def _assert_fp32_close(actual, expected, name):
    # 1e-5 relative: elementwise against the largest magnitude, and in norm
    assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), name=name)
    assert rel_err(actual, expected) <= 1e-5, f"{name}: rel err {rel_err(actual, expected):.2e}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,kw", CASES, ids=_ids(CASES))
def test_values_and_grads_fp32(shape, kw, layout, device):
    x = _input(shape, torch.float32, device, layout)
    y, dx, dy = _value_and_grad(sqrt_pool2d, x, **kw)
    y_ref, dx_ref = _ref64(x, dy, **kw)
    assert y.dtype == dx.dtype == torch.float32
    _check_format(y, layout, "y")
    _check_format(dx, layout, "dx")
    _assert_fp32_close(y, y_ref, "y")
    _assert_fp32_close(dx, dx_ref, "dx")


def test_values_and_grads_fp64(device):
    x = _input((2, 3, 9, 7), torch.float64, device, "nchw")
    kw = dict(kernel_size=3, stride=2, padding=1)
    y, dx, dy = _value_and_grad(sqrt_pool2d, x, **kw)
    y_ref, dx_ref = _ref64(x, dy, **kw)
    assert y.dtype == dx.dtype == torch.float64
    assert_close(y, y_ref, rtol=1e-12, name="y")
    assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12, name="dx")


LOW_CASES = [
    ((2, 8, 14, 14), dict(kernel_size=2)),
    ((2, 8, 13, 11), dict(kernel_size=3, stride=2)),
    ((2, 4, 9, 9), dict(kernel_size=3, stride=2, padding=1, eps=0.1)),
    ((2, 8, 7, 7), dict(kernel_size=None)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,kw", LOW_CASES, ids=_ids(LOW_CASES))
def test_values_and_grads_low_precision(shape, kw, layout, dtype, device):
    """Three-way rule. "torch same dtype" is the reference run on the low-precision input (fp32
    sums, one rounding to the dtype): stricter than F.lp_pool2d in that dtype, which rounds
    every intermediate and does not take padding or eps."""
    x = _input(shape, dtype, device, layout)
    y, dx, dy = _value_and_grad(sqrt_pool2d, x, **kw)
    y_t, dx_t, _ = _value_and_grad(sqrt_pool2d_ref, x, dy, **kw)
    y_ref, dx_ref = _ref64(x, dy, **kw)
    assert y.dtype == dx.dtype == dtype
    _check_format(y, layout, "y")
    _check_format(dx, layout, "dx")
    assert_three_way(y, y_t, y_ref, name="y")
    assert_three_way(dx, dx_t, dx_ref, name="dx")


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 1), ((2, 3), (1, 2))])
def test_equals_lp_pool2d(k, s, device):
    x = _input((2, 3, 9, 10), torch.float32, device, "nchw")
    y, dx, dy = _value_and_grad(sqrt_pool2d, x, kernel_size=k, stride=s)
    y_lp, dx_lp, _ = _value_and_grad(F.lp_pool2d, x, dy, norm_type=2, kernel_size=k, stride=s)
    _assert_fp32_close(y, y_lp, "y vs F.lp_pool2d")
    _assert_fp32_close(dx, dx_lp, "dx vs F.lp_pool2d")


def test_fp16_sums_in_fp32(device):
    """A 64 x 64 map of 8.0 sums to 262144 (fp16 max is 65504); the root, 512, fits fp16."""
    x = torch.full((1, 2, 64, 64), 8.0, device=device, dtype=torch.float16)
    y = sqrt_pool2d(x)
    assert torch.equal(y.float().cpu(), torch.full((1, 2, 1, 1), 512.0))
    y = sqrt_pool2d(x[:, :1, :48, :48], kernel_size=48)  # the stencil kernel: 147456 in one window
    assert torch.equal(y.float().cpu(), torch.full((1, 1, 1, 1), 384.0))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1),
                                dict(kernel_size=None)], ids=["k2", "k3s1p1", "global"])
def test_all_zero_windows_give_zero_gradient(kw, layout, device):
    x = torch.randn(2, 3, 8, 8, device=device)
    x[:, :, :4, :4] = 0.0  # whole windows of zeros (k=2; k=3 s=1: the windows around (1, 1))
    x[1, 2] = 0.0  # a whole plane of zeros (global pooling: y = 0 there)
    x = x.contiguous(memory_format=FORMAT[layout])
    y, dx, dy = _value_and_grad(sqrt_pool2d, x, **kw)
    y_ref, dx_ref = _ref64(x, dy, **kw)
    assert (y == 0).any(), "the input has no all-zero window: the test checks nothing"
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    zero = (x == 0)
    assert torch.equal(dx[zero], torch.zeros_like(dx[zero]))  # exactly 0, not NaN or inf
    _assert_fp32_close(y, y_ref, "y")
    _assert_fp32_close(dx, dx_ref, "dx")


def test_all_zero_input(device):
    x = torch.zeros(1, 2, 5, 5, device=device, requires_grad=True)
    y = sqrt_pool2d(x, 3, 2, 1)
    y.backward(torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf * 0
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
                                dict(kernel_size=None)], ids=["k3s2p1", "k2", "global"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_input(bad, kw, layout, device):
    """Documented behaviour (module docstring): a window holding a NaN (inf) gives NaN (inf),
    the other windows are unaffected, the non-finite input gets a NaN gradient and its window
    passes no gradient to its finite inputs; kernel and reference agree; nothing raises."""
    x = torch.randn(2, 3, 9, 8, device=device)
    x[1, 2, 4, 3] = bad
    x = x.contiguous(memory_format=FORMAT[layout])
    y, dx, dy = _value_and_grad(sqrt_pool2d, x, **kw)
    y_ref, dx_ref = _ref64(x, dy, **kw)
    y, dx, x = y.cpu(), dx.cpu(), x.cpu()
    # the windows that hold the bad element, from pooling its indicator
    hit = sqrt_pool2d_ref((~torch.isfinite(x)).double(), **kw) > 0
    assert hit.any() and not hit.all()
    assert (torch.isnan(y[hit]) if math.isnan(bad) else torch.isposinf(y[hit])).all()
    assert torch.isfinite(y[~hit]).all()
    # the reference has the same non-finite outputs (it does not hide a NaN window as 0)
    assert torch.equal(torch.isnan(y_ref), torch.isnan(y))
    assert torch.equal(torch.isinf(y_ref), torch.isinf(y))
    _assert_fp32_close(y[~hit], y_ref[~hit], "y (finite windows)")
    finite = torch.isfinite(x)
    assert torch.isnan(dx[~finite]).all() and torch.isnan(dx_ref[~finite]).all()
    assert torch.isfinite(dx[finite]).all()
    _assert_fp32_close(dx[finite], dx_ref[finite], "dx (finite inputs)")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=None)],
                         ids=["k3s2p1", "global"])
def test_every_output_element_is_written(kw, layout, device):
    """Launch into NaN-poisoned buffers: any element a kernel skips stays NaN."""
    x = _input((2, 5, 9, 11), torch.float32, device, layout, requires_grad=False)
    y_ref = sqrt_pool2d_ref(x, **kw)
    y = torch.full_like(y_ref, math.nan).contiguous(memory_format=FORMAT[layout])
    out = sp.sqrt_pool2d_fwd(x, **kw, out=y)
    assert out is y
    _assert_fp32_close(y, y_ref, "y")
    dy = torch.randn_like(y)
    dx = torch.full_like(x, math.nan)
    sp.sqrt_pool2d_bwd(x, y, dy, **kw, out=dx)
    _, dx_ref = _ref64(x, dy, **kw)
    _assert_fp32_close(dx, dx_ref, "dx")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=2), dict(kernel_size=None)],
                         ids=["k3s2p1", "k3s2", "global"])
def test_every_launch_candidate(kw, layout, device):
    """On CUDA the launcher may pick any candidate (timed once per shape): each must be right."""
    if layout == "channels_last" and kw == dict(kernel_size=3, stride=2):
        pytest.skip("the same channels_last candidates as k3s2p1 (this case is for NCHW pair)")
    x = _input((3, 20, 13, 12), torch.float32, device, layout, requires_grad=False)
    g = sp._geometry(x, sp._check_params(kw.get("kernel_size"), kw.get("stride"),
                                         kw.get("padding", 0), 0.0, False))
    if g.whole:
        fwd_cands = bwd_cands = sp._GLOBAL
    elif layout == "nchw" and sp._quad_ok(g, False):
        fwd_cands, bwd_cands = sp._FWD_PAIR, sp._BWD_QUAD + sp._BWD_PAIR[2:]
    elif layout == "nchw":
        fwd_cands, bwd_cands = sp._FWD_NCHW, sp._BWD_NCHW
    else:
        fwd_cands, bwd_cands = sp._FWD_CL, sp._BWD_CL
    y_ref = sqrt_pool2d_ref(x.double().cpu(), **kw)
    dy = torch.randn(y_ref.shape, device=device).contiguous(memory_format=FORMAT[layout])
    _, dx_ref = _ref64(x, dy, **kw)
    for cand in fwd_cands:
        _assert_fp32_close(sp._fwd(x, g, candidates=(cand,)), y_ref, f"y {cand}")
    y = sp._fwd(x, g)
    for cand in bwd_cands:
        _assert_fp32_close(sp._bwd(x, y, dy, g, candidates=(cand,)), dx_ref, f"dx {cand}")


@pytest.mark.parametrize("shape,kw,layout,variants", [
    ((2, 3, 8, 8), dict(kernel_size=2), "nchw", ("pair", "quad")),
    ((2, 3, 8, 9), dict(kernel_size=3, stride=2), "nchw", ("pair", "quad")),
    ((2, 3, 8, 9), dict(kernel_size=3, stride=(1, 2)), "nchw", ("pair", "pair")),
    ((2, 3, 8, 8), dict(kernel_size=3, stride=2, padding=1), "nchw", ("flat", "flat")),
    ((2, 3, 8, 8), dict(kernel_size=2), "channels_last", ("3d", "3d")),
    ((2, 3, 8, 8), dict(kernel_size=(8, 8)), "nchw", ("2d", "2d")),
])
def test_default_variant(shape, kw, layout, variants, device):
    """Which tiling a shape gets by default (the one small problems and the interpreter run)."""
    x = _input(shape, torch.float32, device, layout, requires_grad=False)
    g = sp._geometry(x, sp._check_params(kw["kernel_size"], kw.get("stride"),
                                         kw.get("padding", 0), 0.0, False))
    for kind, variant in zip(("fwd", "bwd"), variants):
        plan = sp._plan(kind, x, layout == "channels_last", g, None)
        assert plan.specs[0].name[0] == variant, kind



@pytest.mark.parametrize("shape,k,s", [((1, 1, 1448, 1449), 2, 2), ((1, 1, 2900, 2900), 3, (1, 2))],
                         ids=["quad-bwd", "pair-fwd-bwd"])
def test_large_map_plans_have_no_flat_candidate(shape, k, s):
    """A pair-eligible geometry on a map of >= 2**21 pixels (input for the backward, output for
    the forward) must still build its plan: the flat tiling is not exact there, so it is left
    out of the candidates instead of raising (only the plan is built: no launch, no tensor)."""
    g = sp._geometry(torch.empty(shape, device="meta"), sp._check_params(k, s, 0, 0.0, False))
    for kind, pixels in (("fwd", g.oh * g.ow), ("bwd", shape[2] * shape[3])):
        specs = sp._specs(kind, shape, torch.float32, torch.device("cuda"), False, g, None)
        assert specs and specs[0].name[0] in ("pair", "quad"), kind
        if pixels >= sp._FLAT_MAX:
            assert all(c.name[0] != "flat" for c in specs), kind

@pytest.mark.parametrize("cols", [1, 3, 7, 28, 56, 97, 1447, 2047])
def test_flat_row_col_is_exact(cols):
    """The flat tiling's q // cols via fp32 (q + 0.5) * (1 / cols), for every q < 2**21, emulated
    with numpy's IEEE fp32 (the kernel's multiply rounds the same way)."""
    np = pytest.importorskip("numpy")
    q = np.arange(sp._FLAT_MAX, dtype=np.int64)
    row = ((q.astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / cols)).astype(np.int32)
    assert np.array_equal(row, q // cols)


@pytest.mark.parametrize("kw,layout", [
    (dict(kernel_size=3, stride=2, padding=1), "nchw"),
    (dict(kernel_size=2, stride=1, eps=0.1), "channels_last"),
    (dict(kernel_size=(3, 2), stride=(1, 2), ceil_mode=True), "nchw"),
    (dict(kernel_size=None), "channels_last"),
    (dict(kernel_size=3, stride=2, padding=(1, 0)), "nchw"),
], ids=["k3s2p1", "k2s1eps-cl", "k32s12ceil", "global-cl", "k3s2p10-quad"])
def test_gradcheck_fp64(kw, layout, device):
    # fast_mode (random projections of the Jacobian) keeps this to ~1 s under the interpreter;
    # with rtol 1e-6 (default 1e-3) a backward scaled by 1.0001 fails it
    x = _input((1, 2, 5, 6), torch.float64, device, layout)
    assert torch.autograd.gradcheck(lambda t: sqrt_pool2d(t, **kw), (x,), eps=1e-6, atol=1e-8,
                                    rtol=1e-6, fast_mode=True)


def test_module_equals_function(device):
    x = _input((2, 3, 9, 7), torch.float32, device, "channels_last")
    m = SqrtPool2d(3, stride=2, padding=1, eps=0.1)
    y_m, dx_m, dy = _value_and_grad(m, x)
    y_f, dx_f, _ = _value_and_grad(sqrt_pool2d, x, dy, kernel_size=3, stride=2, padding=1, eps=0.1)
    assert torch.equal(y_m, y_f) and torch.equal(dx_m, dx_f)
    assert "kernel_size=3" in repr(m) and "eps=0.1" in repr(m)
    assert list(m.parameters()) == []
    g = SqrtPool2d()  # global
    assert torch.equal(g(x), sqrt_pool2d(x))
    assert g(x).shape == (2, 3, 1, 1)


def test_exported_from_kernels():
    assert kernels.sqrt_pool2d is sqrt_pool2d and kernels.SqrtPool2d is SqrtPool2d
    assert kernels.sqrt_pool2d_ref is sqrt_pool2d_ref
    assert {"sqrt_pool2d", "SqrtPool2d", "sqrt_pool2d_ref"} <= set(kernels.__all__)


def test_non_dense_input_and_expanded_grad(device):
    base = torch.randn(2, 3, 9, 14, device=device)
    x = base[:, :, :, ::2].requires_grad_(True)  # neither NCHW- nor channels_last-contiguous
    y = sqrt_pool2d(x, 3, 2)
    y.sum().backward()  # dy is an expanded (stride-0) tensor
    xr = x.detach().double().cpu().requires_grad_(True)
    yr = sqrt_pool2d_ref(xr, 3, 2)
    yr.sum().backward()
    _assert_fp32_close(y, yr, "y")
    _assert_fp32_close(x.grad, xr.grad, "dx")


def test_empty_batch(device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    y = sqrt_pool2d(x, 2)
    assert y.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape


# (input and arguments, exception, message, whether SqrtPool2d(...) already raises when built)
BAD = [
    (dict(x=(3, 8, 8)), ValueError, "4-D", False),
    (dict(x=(1, 1, 8, 8), dtype=torch.int64), TypeError, "floating point", False),
    (dict(x=(1, 1, 0, 8)), ValueError, "spatial size", False),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1", True),
    (dict(kernel_size=(2, 0)), ValueError, "kernel_size must be >= 1", True),
    (dict(kernel_size=2.0), TypeError, "int or a pair", True),
    (dict(kernel_size=9), ValueError, "larger than the padded input", False),
    (dict(kernel_size=(3, 11), padding=1), ValueError, "larger than the padded input", False),
    (dict(kernel_size=3, stride=0), ValueError, "stride must be >= 1", True),
    (dict(kernel_size=3, padding=-1), ValueError, "padding must be >= 0", True),
    (dict(kernel_size=3, padding=2), ValueError, "at most half the window", True),
    (dict(kernel_size=3, eps=-1e-3), ValueError, "eps", True),
    (dict(kernel_size=3, eps=math.nan), ValueError, "eps", True),
    (dict(kernel_size=3, eps="0"), TypeError, "eps", True),
    (dict(kernel_size=3, ceil_mode=1), TypeError, "ceil_mode", True),
    (dict(kernel_size=None, padding=1), ValueError, "whole map", True),
    (dict(kernel_size=None, stride=2), ValueError, "whole map", True),
]


@pytest.mark.parametrize("args,exc,match,at_build", BAD,
                         ids=[",".join(f"{k}={v}" for k, v in b[0].items()) for b in BAD])
def test_bad_input(args, exc, match, at_build, device):
    args = dict(args)
    shape, dtype = args.pop("x", (1, 2, 8, 8)), args.pop("dtype", torch.float32)
    x = torch.ones(shape, device=device, dtype=dtype)
    kw = dict(kernel_size=args.pop("kernel_size", 2), **args)
    with pytest.raises(exc, match=match):
        sqrt_pool2d(x, **kw)
    with pytest.raises(exc, match=match):
        sp.sqrt_pool2d_fwd(x, **kw)
    if at_build:
        with pytest.raises(exc, match=match):
            SqrtPool2d(**kw)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        sqrt_pool2d([[1.0]], 2)


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.setattr(_runtime, "INTERPRETER", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sqrt_pool2d(torch.randn(1, 2, 4, 4), 2)


def _run_without_interpreter(code: str) -> str:
    """stdout of ``code`` in a fresh process with neither TRITON_INTERPRET nor a visible GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cpu_tensor_without_interpreter_in_a_fresh_process():
    """The real case rather than a patched flag: ``import kernels`` works on a CPU-only machine
    without TRITON_INTERPRET, the kernel raises the ValueError naming the options, the reference
    still runs."""
    out = _run_without_interpreter(
        "import torch, kernels\n"
        "x = torch.randn(1, 2, 4, 4)\n"
        "for f in (kernels.sqrt_pool2d, kernels.SqrtPool2d(2)):\n"
        "    try:\n"
        "        f(x, 2) if f is kernels.sqrt_pool2d else f(x)\n"
        "    except ValueError as e:\n"
        "        print('ValueError:', e)\n"
        "print('ref', tuple(kernels.sqrt_pool2d_ref(x, 2).shape))\n")
    assert out.count("ValueError: sqrt_pool2d: got a CPU tensor") == 2, out
    assert "TRITON_INTERPRET=1" in out and "sqrt_pool2d_ref" in out, out
    assert "ref (1, 2, 2, 2)" in out, out


def test_interpreter_shim_squeezes_scalar_arguments(monkeypatch):
    """kernels._runtime applies Triton 3.8's ``__index__`` (squeeze, then int) to Triton 3.6's
    interpreter, whose ``int(array)`` on a 1-element array numpy 2 rejects: without it a
    ``range`` over a runtime bound (the global pooling kernel's loop) fails under 3.6."""
    itp = pytest.importorskip("triton.runtime.interpreter")
    if _runtime.INTERPRETER:  # applied at import, for every kernel module
        assert getattr(itp._patch_lang_tensor, "_squeezes_index", False)

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    def patch_3_6(tensor, scope):  # what Triton 3.6 installs
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(itp, "_patch_lang_tensor", patch_3_6)
    _runtime._interpreter_compat()
    patched = itp._patch_lang_tensor
    assert patched is not patch_3_6 and patched._squeezes_index
    _runtime._interpreter_compat()  # idempotent: no second wrapper
    assert itp._patch_lang_tensor is patched
    Tensor = type("Tensor", (), {})
    patched(Tensor, Scope())
    t = Tensor()
    t.handle = types.SimpleNamespace(data=np.array([7], dtype=np.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's deprecation of int() on a 1-element array
        assert list(range(0, t, 3)) == [0, 3, 6]  # range() calls __index__


def test_backward_launcher_checks(device):
    x = torch.randn(1, 2, 8, 8, device=device)
    y = sqrt_pool2d(x, 2)
    with pytest.raises(ValueError, match="output shape"):
        sp.sqrt_pool2d_bwd(x, y, torch.randn(1, 2, 3, 3, device=device), 2)
    with pytest.raises(TypeError, match="dtype of x"):
        sp.sqrt_pool2d_bwd(x, y, torch.randn_like(y, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="out must be"):
        sp.sqrt_pool2d_fwd(x, 2, out=torch.empty(1, 2, 3, 3, device=device))
