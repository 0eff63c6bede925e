"""The elementwise part of the head's expander + global pooling (blockwise/expander.py), fused.

``blockwise.expander.ExpanderPool`` computes p = pool_global(ReLU(BN(conv1x1(x)))) chunk by chunk
without storing the Cout x H x W map. Per chunk of m whole images the conv is one matmul,
h = x_pix @ W^T ((m*hw) x Cout, rows image-major: image i owns rows i*hw .. (i+1)*hw - 1), and
everything else is elementwise over h plus per-(image, channel) sums. Those are these two ops:

Forward sums (``expander_pool_fwd``), per image i and channel c, over its hw pixels:
    hhat = (h - mu) * rstd,  a = gamma * hhat + beta,  y = relu(a)
    avg:  out = sum y / hw,                    sa = sum [a > 0],  sb = sum hhat * [a > 0]
    sqrt: out = sqrt(sum y^2 + eps_pool)  (0 where that is 0),  sa = sum y,  sb = sum y * hhat
Backward map (``expander_pool_bwd``), per pixel, with wsc the per-(image, channel) factor
(avg: gp / hw; sqrt: gp / p, 0 where p = 0) and c0, c1 the BN reductions (mean dhhat and mean
dhhat * hhat, per channel):
    dhhat = gamma * wsc * [a > 0]  (avg)   or   gamma * wsc * relu(a)  (sqrt)
    dh = rstd * (dhhat - c0 - hhat * c1)   (batch statistics)   or   rstd * dhhat   (eval mode)
written in h's dtype *in place* into h: h is scratch recomputed for the backward, so dh needs
no second map-sized buffer, and dx = dh @ W, dW += dh^T x_pix follow as matmuls.

Design
------
Both ops are memory bound (a handful of flops per element), so each reads the map once in its
own dtype (bf16 under autocast: h from a bf16 matmul is already bf16-rounded, so keeping it in
bf16 loses nothing) and does all arithmetic in fp32 registers (fp64 for fp64 maps). The unfused
PyTorch version (the ``*_ref`` functions below, which ExpanderPool's torch path calls) converts
h to fp32 and runs ~5 fp32 passes forward and ~8 backward, each reading/writing 4-8 bytes per
map element.
* Forward: one program per (image, channel tile) loops over the image's pixels in
  [BLOCK_P, BLOCK_C] tiles, loads coalesced along the contiguous channel axis, accumulates in
  registers and writes three m x Cout sums. When that grid is too small to fill the GPU (a few
  large images per chunk, as at block 1), the pixels are split over several programs that
  write partial sums (SPLITS x 3 x m x Cout, small) added by PyTorch: no atomics, so the
  result is deterministic.
* Backward: one program per (pixel tile, channel tile) over the flattened rows; the image of
  each row picks its row of wsc (a small gather that stays in cache).
The few Cout- and m x Cout-sized vectors (mu, rstd, gamma, beta, wsc, c0, c1) come in
precomputed in the accumulation dtype.

Floor: forward reads the map once (2 bytes per element in bf16); backward reads and writes it
once (4 bytes per element in bf16), over the device's copy rate. Not measured on a GPU yet.

Non-finite h: a NaN reaches the same outputs as in the reference (relu keeps it, [a > 0] drops
it, hhat * [a > 0] keeps it; the sqrt pool's output is 0 only where the sum is exactly 0, so a NaN
sum stays NaN, and so do its sa and sb: a broken map is never hidden behind a 0).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from kernels._runtime import cast_for_store, check_float, check_triton_device

_OP = "expander_pool"
POOLS = ("avg", "sqrt")


# ---------------------------------------------------------------------------------------------
# PyTorch references (ExpanderPool's torch path runs exactly these)


def expander_pool_fwd_ref(h: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor,
                          gamma: torch.Tensor, beta: torch.Tensor, hw: int, pool: str,
                          eps_pool: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, sa, sb), each m x Cout in the accumulation dtype, from h ((m*hw) x Cout).

    The vectors are in the accumulation dtype (fp32, fp64 for an fp64 h), as h is converted to.
    """
    acc = torch.promote_types(h.dtype, torch.float32)
    cout = h.shape[1]
    m = h.shape[0] // hw
    # in place on fresh buffers, the same operations in the same order as the plain expression
    # (bit for bit): at most three map-sized buffers alive instead of five
    hhat = h.to(acc, copy=True).view(m, hw, cout).sub_(mu).mul_(rstd)
    a = (hhat * gamma).add_(beta)
    if pool == "avg":
        mask = (a > 0).to(acc)
        y = a.clamp_min_(0)
        return (_finish(y.sum(1), hw, pool, eps_pool), mask.sum(1),
                hhat.mul_(mask).sum(1))
    y = a.clamp_min_(0)
    so = (y * y).sum(1)
    return _finish(so, hw, pool, eps_pool), y.sum(1), hhat.mul_(y).sum(1)


def _finish(so: torch.Tensor, hw: int, pool: str, eps_pool: float) -> torch.Tensor:
    """out from the per-(image, channel) sum of y (avg) or of y^2 (sqrt); 0, not NaN, where
    the sqrt pool's sum is 0 (its gradient is then 0 as well)."""
    if pool == "avg":
        return so / hw
    sq = so + eps_pool
    return torch.where(sq == 0, torch.zeros_like(sq), sq.sqrt())  # NaN stays NaN


def expander_pool_bwd_ref(h: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor,
                          gamma: torch.Tensor, beta: torch.Tensor, wsc: torch.Tensor,
                          c0: Optional[torch.Tensor], c1: Optional[torch.Tensor], hw: int,
                          pool: str) -> torch.Tensor:
    """dh ((m*hw) x Cout, accumulation dtype); c0 = c1 = None without batch statistics."""
    acc = torch.promote_types(h.dtype, torch.float32)
    cout = h.shape[1]
    m = h.shape[0] // hw
    # in place on fresh buffers, the same operations in the same order as the plain expression
    # dh = (dhhat - c0 - hhat * c1) * rstd (bit for bit): at most two map-sized buffers and a
    # mask alive instead of about six (the PyTorch path's transient at block 1 of a ResNet-50)
    hhat = h.to(acc, copy=True).view(m, hw, cout).sub_(mu).mul_(rstd)
    a = (hhat * gamma).add_(beta)
    wg = wsc[:, None, :] * gamma
    if pool == "avg":
        mask = a > 0
        del a
        dhhat = mask.to(acc).mul_(wg)
        del mask
    else:
        dhhat = a.clamp_min_(0).mul_(wg)
        del a
    if c0 is not None:
        dhhat.sub_(c0).sub_(hhat.mul_(c1))
    del hhat
    return dhhat.mul_(rstd).reshape(m * hw, cout)


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _expander_pool_fwd_kernel(
    h_ptr,  # (m*hw) x COUT map, contiguous; image i owns rows i*HW .. (i+1)*HW - 1
    mu_ptr, rstd_ptr, g_ptr, b_ptr,  # COUT vectors, accumulation dtype
    out_ptr, sa_ptr, sb_ptr,  # m x COUT outputs, contiguous, accumulation dtype; written once
    # (not FINAL: out_ptr is a SPLITS x 3 x m x COUT buffer of partial sums, the others unused)
    M, HW, COUT,  # images, pixels per image, channels
    PPS,  # pixels per split (a multiple of BLOCK_P; HW when the pixels are not split)
    eps_pool,  # sqrt pool: added to every sum of squares
    AVG: tl.constexpr,  # True: average pooling; False: square-root pooling
    FINAL: tl.constexpr,  # one program per (image, channel tile) sees all pixels: write out/sa/sb
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 maps
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    p_lo = split * PPS
    p_hi = tl.minimum(p_lo + PPS, HW)
    cm = cc < COUT
    mu = tl.load(mu_ptr + cc, mask=cm, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + cc, mask=cm, other=0.0)[None, :]
    g = tl.load(g_ptr + cc, mask=cm, other=0.0)[None, :]
    b = tl.load(b_ptr + cc, mask=cm, other=0.0)[None, :]
    base = h_ptr + n.to(tl.int64) * HW * COUT + cc[None, :]
    acc_o = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)  # avg: sum y;      sqrt: sum y^2
    acc_a = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)  # avg: sum [a>0];  sqrt: sum y
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)  # avg: sum hhat [a>0]; sqrt: sum y hhat
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P))[:, None]
        m = (p < p_hi) & cm[None, :]
        hv = tl.load(base + p.to(tl.int64) * COUT, mask=m, other=0.0).to(ACC)
        hhat = (hv - mu) * rstd
        a = hhat * g + b
        pos = (a > 0) & m  # padding rows must not count (their a need not be <= 0)
        # relu that keeps a NaN (as clamp_min in the reference): a <= 0 is false for NaN
        y = tl.where(m, tl.where(a <= 0, 0.0, a), 0.0)
        if AVG:
            acc_o += y
            acc_a += pos.to(ACC)
            acc_b += hhat * pos.to(ACC)  # not where(): a NaN hhat gives NaN, as in the ref
        else:
            acc_o += y * y
            acc_a += y
            acc_b += y * hhat
    so = tl.sum(acc_o, axis=0)
    o_off = n.to(tl.int64) * COUT + cc
    if FINAL:  # the same finish as _finish (for split pixels) and the reference
        if AVG:
            res = so / HW
        else:
            sq = so + eps_pool
            res = tl.where(sq == 0, 0.0, tl.sqrt(tl.where(sq == 0, 1.0, sq)))  # 0 at 0; NaN stays
        tl.store(out_ptr + o_off, res, mask=cm)
        tl.store(sa_ptr + o_off, tl.sum(acc_a, axis=0), mask=cm)
        tl.store(sb_ptr + o_off, tl.sum(acc_b, axis=0), mask=cm)
    else:  # partial sums of this split: part[split, k, n, c]
        k0 = (split * 3).to(tl.int64)
        tl.store(out_ptr + (k0 * M + n) * COUT + cc, so, mask=cm)
        tl.store(out_ptr + ((k0 + 1) * M + n) * COUT + cc, tl.sum(acc_a, axis=0), mask=cm)
        tl.store(out_ptr + ((k0 + 2) * M + n) * COUT + cc, tl.sum(acc_b, axis=0), mask=cm)


@triton.jit
def _expander_pool_bwd_kernel(
    h_ptr,  # (m*hw) x COUT map, contiguous: read, then overwritten with dh (same tile)
    mu_ptr, rstd_ptr, g_ptr, b_ptr,  # COUT vectors, accumulation dtype
    wsc_ptr,  # m x COUT per-(image, channel) factor, contiguous, accumulation dtype
    c0_ptr, c1_ptr,  # COUT vectors (BN reductions); read only when BATCH_STATS
    ROWS, HW, COUT,  # m*hw, pixels per image, channels
    AVG: tl.constexpr,  # True: average pooling; False: square-root pooling
    BATCH_STATS: tl.constexpr,  # the statistics depend on h: subtract c0 + hhat*c1
    ACC: tl.constexpr,  # fp32, or fp64 for fp64 maps
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < COUT
    mu = tl.load(mu_ptr + cc, mask=cm, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + cc, mask=cm, other=0.0)[None, :]
    g = tl.load(g_ptr + cc, mask=cm, other=0.0)[None, :]
    b = tl.load(b_ptr + cc, mask=cm, other=0.0)[None, :]
    row = r[:, None]
    c = cc[None, :]
    m = (row < ROWS) & cm[None, :]
    off = row.to(tl.int64) * COUT + c
    hv = tl.load(h_ptr + off, mask=m, other=0.0).to(ACC)
    img = row // HW
    wv = tl.load(wsc_ptr + img.to(tl.int64) * COUT + c, mask=m, other=0.0)
    hhat = (hv - mu) * rstd
    a = hhat * g + b
    gw = wv * g
    if AVG:
        dhhat = tl.where(a > 0, gw, 0.0)
    else:
        dhhat = tl.where(a <= 0, 0.0, a) * gw  # relu keeping a NaN, as the reference
    if BATCH_STATS:
        c0 = tl.load(c0_ptr + cc, mask=cm, other=0.0)[None, :]
        c1 = tl.load(c1_ptr + cc, mask=cm, other=0.0)[None, :]
        dh = (dhhat - c0 - hhat * c1) * rstd
    else:
        dh = dhhat * rstd
    tl.store(h_ptr + off, cast_for_store(dh, h_ptr, RTNE_BF16), mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check(h, mu, rstd, gamma, beta, hw, pool, name_vecs=("mu", "rstd", "gamma", "beta"),
           vecs=None):
    """Shared validation; returns (m, cout, acc torch dtype)."""
    check_float(_OP, "h", h)
    if h.dim() != 2:
        raise ValueError(f"{_OP}: h must be 2-D ((m*hw) x Cout), got shape {tuple(h.shape)}")
    if not h.is_contiguous():
        raise ValueError(f"{_OP}: h must be contiguous ((m*hw) x Cout, rows image-major), got "
                         f"strides {h.stride()}")
    if isinstance(hw, bool) or not isinstance(hw, int) or hw <= 0:
        raise ValueError(f"{_OP}: hw (pixels per image) must be a positive int, got {hw!r}")
    if pool not in POOLS:
        raise ValueError(f"{_OP}: unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    rows, cout = h.shape
    if rows % hw:
        raise ValueError(f"{_OP}: h has {rows} rows, not a multiple of hw={hw} (whole images)")
    acc = torch.promote_types(h.dtype, torch.float32)
    for name, v in zip(name_vecs, vecs if vecs is not None else (mu, rstd, gamma, beta)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(v).__name__}")
        if v.dtype != acc:
            raise TypeError(f"{_OP}: {name} must be {acc} for an h of dtype {h.dtype} (the "
                            f"accumulation dtype), got {v.dtype}")
        if tuple(v.shape) != (cout,) or not v.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be a contiguous vector of Cout={cout} values, "
                             f"got shape {tuple(v.shape)}")
    return rows // hw, cout, acc


def _check_mat(name: str, t, m: int, cout: int, acc: torch.dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (m, cout) or t.dtype != acc or t.device != device or \
            not t.is_contiguous():
        raise ValueError(f"{_OP}: {name} must be a contiguous {m} x {cout} {acc} tensor on "
                         f"{device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's for the launch."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _tiles(cout: int, tile: int) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C): a channel block of up to 64 (128 contiguous bf16 bytes per row)."""
    bc = min(_next_pow2(cout), 64)
    return max(1, tile // bc), bc


def expander_pool_fwd(h: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor,
                      beta: torch.Tensor, hw: int, pool: str, eps_pool: float = 0.0, *,
                      out: Optional[torch.Tensor] = None, sa: Optional[torch.Tensor] = None,
                      sb: Optional[torch.Tensor] = None, split: Optional[int] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward sums (out, sa, sb), each m x Cout in the accumulation dtype (module docstring).

    h: (m*hw) x Cout, contiguous, fp32/bf16/fp16/fp64, image-major rows. mu, rstd, gamma, beta:
    Cout vectors in the accumulation dtype (fp32; fp64 for an fp64 h). out, sa, sb, if given,
    must be contiguous m x Cout tensors of that dtype (e.g. row slices of a batch-sized
    buffer); every element is written. ``split``: programs per (image, channel tile), each over
    a range of the pixels (partial sums, added in a few m x Cout torch ops); None picks it from
    the grid size and the device (1 off CUDA). A tuning knob; the result does not depend on it
    beyond the summation order.
    """
    m, cout, acc = _check(h, mu, rstd, gamma, beta, hw, pool)
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise ValueError(f"{_OP}: split must be None (automatic) or a positive int, got {split!r}")
    if isinstance(eps_pool, bool) or not isinstance(eps_pool, (int, float)) or not eps_pool >= 0:
        raise ValueError(f"{_OP}: eps_pool must be a float >= 0, got {eps_pool!r}")
    check_triton_device(_OP, h, mu, rstd, gamma, beta)
    res = []
    for name, t in (("out", out), ("sa", sa), ("sb", sb)):
        if t is None:
            t = torch.empty(m, cout, dtype=acc, device=h.device)
        else:
            _check_mat(name, t, m, cout, acc, h.device)
        res.append(t)
    if m == 0 or cout == 0:
        return tuple(res)
    bp, bc = _tiles(cout, 2048)
    bp = min(bp, _next_pow2(hw))
    tiles_c, tiles_p = triton.cdiv(cout, bc), triton.cdiv(hw, bp)
    if split is None:
        split = _auto_split(h.device, m * tiles_c, tiles_p)
    pps = triton.cdiv(tiles_p, min(split, tiles_p)) * bp  # pixels per split, whole tiles
    split = triton.cdiv(hw, pps)  # no empty split
    final = split == 1
    # split pixels: deterministic partial sums (no atomics), SPLITS x 3 x m x Cout
    part = res[0] if final else torch.empty(split, 3, m, cout, dtype=acc, device=h.device)
    with _on_device(h):
        _expander_pool_fwd_kernel[(m, tiles_c, split)](
            h, mu, rstd, gamma, beta, part, res[1], res[2], m, hw, cout, pps, float(eps_pool),
            AVG=pool == "avg", FINAL=final,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_P=bp, BLOCK_C=bc, num_warps=4)
    if not final:
        so, sa_, sb_ = part.sum(0).unbind(0)
        res[0].copy_(_finish(so, hw, pool, eps_pool))
        res[1].copy_(sa_)
        res[2].copy_(sb_)
    return tuple(res)


def _auto_split(device: torch.device, programs: int, tiles_p: int) -> int:
    """Pixel splits so that the forward grid has ~8 programs per SM (a streaming reduction
    needs many loads in flight), each split keeping at least 4 pixel tiles. 1 off CUDA.

    An estimate, not measured yet: block 1 of ResNet-50 (10 images of 56 x 56 x 2048 per default
    chunk) has only 10 x 32 (image, channel tile) programs, too few to fill an H100's 132 SMs.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles_p // 4, triton.cdiv(8 * sms, programs)))


def expander_pool_bwd(h: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor,
                      beta: torch.Tensor, wsc: torch.Tensor, c0: Optional[torch.Tensor],
                      c1: Optional[torch.Tensor], hw: int, pool: str) -> torch.Tensor:
    """Overwrite h with dh (module docstring) in h's dtype; returns h.

    h, mu, rstd, gamma, beta as in :func:`expander_pool_fwd`; wsc: contiguous m x Cout in the
    accumulation dtype; c0, c1: Cout vectors (batch statistics) or both None (eval mode).
    """
    if (c0 is None) != (c1 is None):
        raise ValueError(f"{_OP}: pass both c0 and c1 (batch statistics) or neither")
    stats = c0 is not None
    names = ("mu", "rstd", "gamma", "beta") + (("c0", "c1") if stats else ())
    vecs = (mu, rstd, gamma, beta) + ((c0, c1) if stats else ())
    m, cout, acc = _check(h, mu, rstd, gamma, beta, hw, pool, names, vecs)
    check_triton_device(_OP, h, *vecs)
    _check_mat("wsc", wsc, m, cout, acc, h.device)
    rows = m * hw
    if rows == 0 or cout == 0:
        return h
    bp, bc = _tiles(cout, 4096)
    bp = min(bp, _next_pow2(rows))
    grid = (triton.cdiv(rows, bp), triton.cdiv(cout, bc))
    with _on_device(h):
        _expander_pool_bwd_kernel[grid](
            h, mu, rstd, gamma, beta, wsc, c0 if stats else mu, c1 if stats else mu, rows, hw,
            cout, AVG=pool == "avg", BATCH_STATS=stats,
            ACC=tl.float64 if acc == torch.float64 else tl.float32,
            RTNE_BF16=h.device.type == "cpu" and h.dtype == torch.bfloat16,  # interpreter
            BLOCK_P=bp, BLOCK_C=bc, num_warps=4)
    return h
