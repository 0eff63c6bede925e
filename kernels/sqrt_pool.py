"""Square-root (L2) spatial pooling.

Forward:  y[n, c, i, j] = sqrt( sum_{(h, w) in window(i, j)} x[n, c, h, w]^2 + eps )
Backward: dx[n, c, h, w] = sum_{windows w containing (h, w)} dy_w * x[n, c, h, w] / y_w,
          and 0 where y_w == 0 (an all-zero window with eps == 0): never NaN or inf.

Padding adds zeros. With eps = 0, padding = 0 and ceil_mode=False this equals
``F.lp_pool2d(x, 2, k, s)`` (lp_pool2d rescales a window clipped by ceil_mode; this is its sum).

Non-finite inputs (documented behaviour, the same in the kernels and ``sqrt_pool2d_ref``; nothing
raises): every window holding a NaN gives y = NaN and one holding an inf (and no NaN) y = inf.
In the backward such a window passes no gradient to its other, finite inputs (NaN: the
``y > 0`` guard is false; inf: dy / y = 0), and the non-finite input itself gets a NaN gradient.
Check ``torch.isfinite`` on the output or the loss as for any op.

Design
------
The op is a pure memory-bound stencil, so the kernels are built around moving each byte once:
forward reads x once and writes y once; backward reads x, y, dy once and writes dx once, as a
gather over the windows covering each input (no atomics, no zeroed buffer, no intermediate).
Squares are summed in fp32 (fp64 for fp64 inputs) and cast to the input dtype on store. y is
the op's output, which the caller holds anyway, so saving it for backward costs no memory;
recomputing it would re-read k^2 neighbours per window (the y read is 1/s^2 of the x read).

Four tilings, chosen per shape (the launcher times the eligible ones once per shape on CUDA):
* "3d", any layout: tile [channels, rows, cols], strides as arguments. For channels_last the
  channel axis is contiguous (Triton specializes a stride of 1 and vectorizes along it), so
  every window offset is one coalesced load of a channel vector: ~1.0-1.1x the floor for k = s.
* "flat", NCHW: tile [planes, flattened pixels]; row and column from an fp32 reciprocal that is
  exact below 2^21 pixels per plane (_flat_row_col) instead of an integer division.
* "pair" (forward and backward), NCHW with column stride 2, no column padding, KW 2 or 3: NCHW
  rows are W long and the window columns are strided, which gives 2-byte loads at half
  efficiency (the 3d/flat versions measured 1.6-6x the floor on an H100). Here whole input rows
  are loaded as contiguous vectors and split into even/odd columns in registers (tl.reshape +
  tl.split / tl.join); H, W, OH, OW are constexpr (compiled once per map size) so the compiler
  can prove row alignment and issue 16-byte loads. KW = 3 adds a strided load of column 2j+2.
* "quad" (backward), NCHW, stride 2 x 2, KH and KW 2 or 3: a tile of windows, each loading its
  dy / y once and writing the 2 x 2 inputs it owns (plus the previous window's term on the
  even row/column when k = 3): 2 y/dy loads per input instead of 8 for k = 3.
A window covering the whole map (``kernel_size=None``, the global pooling of a block head, or
k = (H, W) without padding) is a reduction over H*W per (n, c) with its own kernels ("2d"): a
chunked row reduction forward and an elementwise scale backward.

Floor: bytes moved (forward: x read + y written; backward: x, y, dy read + dx written) over the
device's measured copy rate; the flops are negligible. docs/performance.md holds the figures.

Autotune hazard: on CUDA, a large problem times its candidate launches once per shape (see
``_run``) on the real output buffers. That is safe because every launch overwrites all of its
output and accumulates nothing, so nothing needs zeroing in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._runtime import cast_for_store, check_float, check_triton_device


def _pair(v, name: str):
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"sqrt_pool2d: {name} must be an int or a pair of ints, got {v!r}")


def sqrt_pool2d_ref(x: torch.Tensor, kernel_size=None, stride=None, padding=0, eps: float = 0.0,
                    ceil_mode: bool = False) -> torch.Tensor:
    """PyTorch reference: squares summed in at least fp32, output in the input dtype.

    ``kernel_size=None`` pools the whole map to N x C x 1 x 1. The gradient is 0 (not NaN) where
    a window is all zeros and eps is 0.
    """
    if kernel_size is None:
        kernel_size = (x.shape[-2], x.shape[-1])
        stride, padding, ceil_mode = kernel_size, 0, False
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    p = _pair(padding, "padding")
    acc = x.to(torch.promote_types(x.dtype, torch.float32))
    # divisor_override=1 turns the average into an exact window sum, padding counted as zeros
    sq = F.avg_pool2d(acc * acc, k, s, p, ceil_mode=ceil_mode, count_include_pad=True,
                      divisor_override=1) + eps
    pos = sq > 0
    # where() on both sides keeps d sqrt / d sq finite: all-zero windows get gradient 0. sq is
    # >= 0 or NaN, so where it is not positive it is 0 (all-zero window) or NaN (a NaN in the
    # window): passing it through (detached: gradient 0, as in the kernel) keeps y = 0 for the
    # former and propagates the NaN for the latter instead of hiding it as 0.
    y = torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), sq.detach())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tile_ids(TILES_C, TILES_H, TILES_W):
    """Program id -> (n, channel tile, row tile, col tile), col tile fastest."""
    pid = tl.program_id(0)
    tw = pid % TILES_W
    t = pid // TILES_W
    th = t % TILES_H
    t = t // TILES_H
    tc = t % TILES_C
    n = t // TILES_C
    return n, tc, th, tw


@triton.jit
def _flat_row_col(q, INV_COLS, COLS):
    """(q // COLS, q % COLS) for 0 <= q < 2**21 without an integer division.

    (q + 0.5) / COLS lies at least 0.5 / COLS away from an integer; fp32's relative error here
    (< 2**-22) stays below that while q < 2**21 (the launcher guarantees it), so truncation is
    exact (tests/test_sqrt_pool.py checks every q for a range of COLS).
    """
    row = ((q.to(tl.float32) + 0.5) * INV_COLS).to(tl.int32)
    return row, q - row * COLS


@triton.jit
def _sqrt_pool_fwd_kernel(
    x_ptr,  # input: element (n, c, h, w) at n*sxn + c*sxc + h*sxh + w*sxw
    y_ptr,  # output, written once: (n, c, oh, ow) at n*syn + c*syc + oh*syh + ow*syw
    PLANES, H, W, OH, OW,  # PLANES: extent of the tile's channel axis (N*C NCHW, C channels_last)
    PH, PW,  # zero padding before row 0 / col 0
    sxn, sxc, sxh, sxw,  # strides of x, in elements
    syn, syc, syh, syw,  # strides of y, in elements
    eps,  # added to every window's sum of squares (fp32 scalar)
    INV_OW,  # 1 / OW in fp32 (FLAT only)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    FLAT: tl.constexpr,  # NCHW only: tile [planes, BLOCK_W flattened output pixels]
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    if FLAT:
        # NCHW with n folded into the planes (sxn, syn unused); syc = OH*OW
        pid = tl.program_id(0)
        tiles_q = tl.cdiv(syc, BLOCK_W)
        tc = pid // tiles_q
        c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
        q = ((pid % tiles_q) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
        oh, ow = _flat_row_col(q, INV_OW, OW)
        out_mask = (c < PLANES) & (q < syc)
        x_base = x_ptr + c.to(tl.int64) * sxc
        y_off = c.to(tl.int64) * syc + q  # contiguous along q: vectorized stores
    else:
        n, tc, th, tw = _tile_ids(tl.cdiv(PLANES, BLOCK_C), tl.cdiv(OH, BLOCK_H),
                                  tl.cdiv(OW, BLOCK_W))
        c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
        oh = (th * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
        ow = (tw * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
        out_mask = (c < PLANES) & (oh < OH) & (ow < OW)
        # 64-bit only for the (n, c) base: spatial offsets stay 32-bit
        x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
        y_off = n.to(tl.int64) * syn + c.to(tl.int64) * syc + oh * syh + ow * syw
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    acc = tl.zeros(out_mask.shape, dtype=ACC)
    for kh in range(KH):
        h = h0 + kh
        row_ok = out_mask & (h >= 0) & (h < H)
        for kw in tl.static_range(KW):
            w = w0 + kw
            m = row_ok & (w >= 0) & (w < W)  # padding reads as zero
            v = tl.load(x_base + h * sxh + w * sxw, mask=m, other=0.0).to(ACC)
            acc += v * v
    y = tl.sqrt(acc + eps)  # acc + eps >= 0 (eps >= 0 is checked by the launcher)
    tl.store(y_ptr + y_off, cast_for_store(y, y_ptr, RTNE_BF16), mask=out_mask)


@triton.jit
def _sqrt_pool_bwd_kernel(
    x_ptr,  # input of the forward, same layout as dx
    y_ptr,  # output of the forward (saved), layout of dy
    dy_ptr,  # upstream gradient, shape and layout of y
    dx_ptr,  # gradient of x, written once
    PLANES, H, W, OH, OW,  # as in the forward
    PH, PW,  # zero padding before row 0 / col 0
    sxn, sxc, sxh, sxw,  # strides of x and dx
    syn, syc, syh, syw,  # strides of y and dy
    INV_W,  # 1 / W in fp32 (FLAT only)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    NH: tl.constexpr, NW: tl.constexpr,  # ceil(KH / SH), ceil(KW / SW): windows per input and axis
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    FLAT: tl.constexpr,  # NCHW only: tile [planes, BLOCK_W flattened input pixels]
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    if FLAT:
        # NCHW with n folded into the planes (sxn, syn unused); sxc = H*W
        pid = tl.program_id(0)
        tiles_p = tl.cdiv(sxc, BLOCK_W)
        tc = pid // tiles_p
        c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
        p = ((pid % tiles_p) * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]
        h, w = _flat_row_col(p, INV_W, W)
        in_mask = (c < PLANES) & (p < sxc)
        x_off = c.to(tl.int64) * sxc + p  # contiguous along p: vectorized loads and stores
        y_base = c.to(tl.int64) * syc
    else:
        n, tc, th, tw = _tile_ids(tl.cdiv(PLANES, BLOCK_C), tl.cdiv(H, BLOCK_H),
                                  tl.cdiv(W, BLOCK_W))
        c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
        h = (th * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
        w = (tw * BLOCK_W + tl.arange(0, BLOCK_W))[None, None, :]
        in_mask = (c < PLANES) & (h < H) & (w < W)
        x_off = n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + h * sxh + w * sxw
        y_base = n.to(tl.int64) * syn + c.to(tl.int64) * syc
    xv = tl.load(x_ptr + x_off, mask=in_mask, other=0.0).to(ACC)
    # position in the padded map, >= 0, so // and % by the constexpr stride are exact and cheap
    hp = h + PH
    wp = w + PW
    g = tl.zeros(in_mask.shape, dtype=ACC)
    for i in tl.static_range(NH):
        oh = hp // SH - i  # the i-th window (from the last) whose rows may cover h
        ok_h = in_mask & (oh >= 0) & (oh < OH) & (hp - oh * SH < KH)
        for j in tl.static_range(NW):
            ow = wp // SW - j
            ok = ok_h & (ow >= 0) & (ow < OW) & (wp - ow * SW < KW)
            off = y_base + oh * syh + ow * syw
            yv = tl.load(y_ptr + off, mask=ok, other=0.0).to(ACC)
            dyv = tl.load(dy_ptr + off, mask=ok, other=0.0).to(ACC)
            # y == 0 only for an all-zero window with eps == 0: its gradient is 0, never NaN
            pos = yv > 0
            g += tl.where(pos, dyv / tl.where(pos, yv, 1.0), 0.0)
    tl.store(dx_ptr + x_off, cast_for_store(xv * g, dx_ptr, RTNE_BF16), mask=in_mask)


@triton.jit
def _sqrt_pool_fwd_pair_kernel(
    x_ptr,  # input, NCHW-contiguous
    y_ptr,  # output, NCHW-contiguous, written once
    PLANES,  # N*C
    PH,  # zero padding before row 0 (none along columns on this path)
    eps,  # added to every window's sum of squares (fp32 scalar)
    H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,  # constexpr: the
    # compiler then knows each row's alignment and vectorizes the row loads
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,  # column stride is 2, KW is 2 or 3
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """NCHW, column stride 2: tile [planes, output rows, output cols]. Output column j covers
    input columns 2j, 2j+1 (one contiguous row load, split into even/odd in registers) and, for
    KW = 3, 2j+2 (a strided load that hits L1)."""
    pid = tl.program_id(0)
    tiles_p = tl.cdiv(OW, BLOCK_P)
    tiles_h = tl.cdiv(OH, BLOCK_H)
    tp = pid % tiles_p
    t = pid // tiles_p
    th = t % tiles_h
    tc = t // tiles_h
    c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
    oh = (th * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    j = (tp * BLOCK_P + tl.arange(0, BLOCK_P))[None, None, :]
    col2 = (tp * 2 * BLOCK_P + tl.arange(0, 2 * BLOCK_P))[None, None, :]  # input columns
    cm = c < PLANES
    x_plane = x_ptr + c.to(tl.int64) * (H * W)
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_P], dtype=ACC)
    for kh in range(KH):
        h = oh * SH - PH + kh
        rm = cm & (h >= 0) & (h < H)
        v = tl.load(x_plane + h * W + col2, mask=rm & (col2 < W), other=0.0).to(ACC)
        ev, od = tl.split(tl.reshape(v, [BLOCK_C, BLOCK_H, BLOCK_P, 2]))
        acc += ev * ev + od * od
        if KW == 3:
            c3 = 2 * j + 2
            v3 = tl.load(x_plane + h * W + c3, mask=rm & (c3 < W), other=0.0).to(ACC)
            acc += v3 * v3
    y = tl.sqrt(acc + eps)
    y_off = c.to(tl.int64) * (OH * OW) + oh * OW + j
    tl.store(y_ptr + y_off, cast_for_store(y, y_ptr, RTNE_BF16),
             mask=cm & (oh < OH) & (j < OW))


@triton.jit
def _sqrt_pool_bwd_pair_kernel(
    x_ptr,  # input of the forward, NCHW-contiguous, as dx
    y_ptr,  # output of the forward (saved), NCHW-contiguous, as dy
    dy_ptr,  # upstream gradient
    dx_ptr,  # gradient of x, written once
    PLANES,  # N*C
    PH,  # zero padding before row 0 (none along columns on this path)
    H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,  # as in the forward
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,  # column stride is 2, KW is 2 or 3
    NH: tl.constexpr,  # ceil(KH / SH): windows per input along rows
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """NCHW, column stride 2: tile [planes, input rows, column pairs (2j, 2j+1)]. Both columns
    of pair j lie in window j (offsets 0, 1); for KW = 3 column 2j is also offset 2 of window
    j - 1. x and dx move as contiguous rows, y and dy as rows of windows."""
    pid = tl.program_id(0)
    tiles_p = tl.cdiv(W, 2 * BLOCK_P)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tp = pid % tiles_p
    t = pid // tiles_p
    th = t % tiles_h
    tc = t // tiles_h
    c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
    h = (th * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
    j = (tp * BLOCK_P + tl.arange(0, BLOCK_P))[None, None, :]
    col2 = (tp * 2 * BLOCK_P + tl.arange(0, 2 * BLOCK_P))[None, None, :]
    rm = (c < PLANES) & (h < H)
    x_off = c.to(tl.int64) * (H * W) + h * W + col2
    xm = rm & (col2 < W)
    xv = tl.load(x_ptr + x_off, mask=xm, other=0.0).to(ACC)
    xe, xo = tl.split(tl.reshape(xv, [BLOCK_C, BLOCK_H, BLOCK_P, 2]))
    y_plane = c.to(tl.int64) * (OH * OW)
    ge = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_P], dtype=ACC)  # sum of dy/y over windows of col 2j
    go = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_P], dtype=ACC)  # ... of col 2j+1
    hp = h + PH
    for i in tl.static_range(NH):
        oh = hp // SH - i
        ok = rm & (oh >= 0) & (oh < OH) & (hp - oh * SH < KH)
        y_row = y_plane + oh * OW
        okj = ok & (j < OW)
        yv = tl.load(y_ptr + y_row + j, mask=okj, other=0.0).to(ACC)
        dyv = tl.load(dy_ptr + y_row + j, mask=okj, other=0.0).to(ACC)
        pos = yv > 0  # an all-zero window (y == 0) contributes 0, never NaN
        g = tl.where(pos, dyv / tl.where(pos, yv, 1.0), 0.0)
        ge += g
        go += g
        if KW == 3:
            jm = j - 1
            okm = ok & (jm >= 0) & (jm < OW)
            yv = tl.load(y_ptr + y_row + jm, mask=okm, other=0.0).to(ACC)
            dyv = tl.load(dy_ptr + y_row + jm, mask=okm, other=0.0).to(ACC)
            pos = yv > 0
            ge += tl.where(pos, dyv / tl.where(pos, yv, 1.0), 0.0)
    dxv = tl.reshape(tl.join(xe * ge, xo * go), [BLOCK_C, BLOCK_H, 2 * BLOCK_P])
    tl.store(dx_ptr + x_off, cast_for_store(dxv, dx_ptr, RTNE_BF16), mask=xm)


@triton.jit
def _window_g(y_ptr, dy_ptr, off, ok, ACC: tl.constexpr):
    """dy / y of the windows at ``off`` (0 where masked off or where y == 0: never NaN)."""
    yv = tl.load(y_ptr + off, mask=ok, other=0.0).to(ACC)
    dyv = tl.load(dy_ptr + off, mask=ok, other=0.0).to(ACC)
    pos = yv > 0
    return tl.where(pos, dyv / tl.where(pos, yv, 1.0), 0.0)


@triton.jit
def _sqrt_pool_bwd_quad_kernel(
    x_ptr,  # input of the forward, NCHW-contiguous, as dx
    y_ptr,  # output of the forward (saved), NCHW-contiguous, as dy
    dy_ptr,  # upstream gradient
    dx_ptr,  # gradient of x, written once
    PLANES,  # N*C
    PH,  # zero padding before row 0 (none along columns on this path)
    H: tl.constexpr, W: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,  # as in the forward
    KH: tl.constexpr, KW: tl.constexpr,  # 2 or 3 each; the stride is 2 x 2
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """NCHW, stride 2 x 2: tile [planes, row pairs r, column pairs j]. Window (r, j) owns input
    rows 2r - PH + {0, 1} and columns 2j + {0, 1}; with KH = 3 the even row is also offset 2 of
    window r - 1, with KW = 3 the even column of window j - 1. So each window's dy / y is loaded
    about once per 4 inputs (the per-input gather loads it up to 4 times per input)."""
    pid = tl.program_id(0)
    tiles_p = tl.cdiv(W, 2 * BLOCK_P)
    tiles_r = tl.cdiv(H + PH, 2 * BLOCK_R)
    tp = pid % tiles_p
    t = pid // tiles_p
    tr = t % tiles_r
    tc = t // tiles_r
    c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None, None]
    r = (tr * BLOCK_R + tl.arange(0, BLOCK_R))[None, :, None]
    j = (tp * BLOCK_P + tl.arange(0, BLOCK_P))[None, None, :]
    col2 = (tp * 2 * BLOCK_P + tl.arange(0, 2 * BLOCK_P))[None, None, :]
    cm = c < PLANES
    y_off = c.to(tl.int64) * (OH * OW) + r * OW + j
    ok_r = cm & (r < OH)
    g = _window_g(y_ptr, dy_ptr, y_off, ok_r & (j < OW), ACC)  # window (r, j): every owned input
    g_even_col = g
    if KW == 3:  # window (r, j - 1) reaches the even column 2j
        ok_l = ok_r & (j >= 1) & (j - 1 < OW)
        g_even_col = g_even_col + _window_g(y_ptr, dy_ptr, y_off - 1, ok_l, ACC)
    g_even_row = g
    g_even_both = g_even_col
    if KH == 3:  # window (r - 1, j) reaches the even row
        ok_u = cm & (r >= 1) & (r - 1 < OH)
        g_up = _window_g(y_ptr, dy_ptr, y_off - OW, ok_u & (j < OW), ACC)
        g_even_row = g_even_row + g_up
        g_even_both = g_even_both + g_up
        if KW == 3:  # window (r - 1, j - 1) reaches the even row and column
            g_even_both = g_even_both + _window_g(y_ptr, dy_ptr, y_off - OW - 1,
                                     ok_u & (j >= 1) & (j - 1 < OW), ACC)
    x_plane = c.to(tl.int64) * (H * W) + col2
    for a in tl.static_range(2):  # the window's two owned rows
        h = 2 * r - PH + a
        m = cm & (h >= 0) & (h < H) & (col2 < W)
        off = x_plane + h * W
        xv = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
        xe, xo = tl.split(tl.reshape(xv, [BLOCK_C, BLOCK_R, BLOCK_P, 2]))
        if a == 0:
            dxv = tl.join(xe * g_even_both, xo * g_even_row)
        else:
            dxv = tl.join(xe * g_even_col, xo * g)
        dxv = tl.reshape(dxv, [BLOCK_C, BLOCK_R, 2 * BLOCK_P])
        tl.store(dx_ptr + off, cast_for_store(dxv, dx_ptr, RTNE_BF16), mask=m)


@triton.jit
def _sqrt_pool_global_fwd_kernel(
    x_ptr,  # input: element (n, c, p) at n*sxn + c*sxc + p*sxp, p = h*W + w
    y_ptr,  # output N x C x 1 x 1: (n, c) at n*syn + c*syc
    PLANES, HW,  # channel-axis extent (N*C NCHW, C channels_last); pixels per map
    sxn, sxc, sxp,  # strides of x; sxp is the stride of the flattened pixel index
    syn, syc,  # strides of y
    eps,  # added to every sum of squares (fp32 scalar)
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(PLANES, BLOCK_C)
    tc = pid % tiles_c
    n = pid // tiles_c
    cc = tc * BLOCK_C + tl.arange(0, BLOCK_C)
    c = cc[:, None]
    base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P))[None, :]
        v = tl.load(base + p * sxp, mask=(c < PLANES) & (p < HW), other=0.0).to(ACC)
        acc += v * v
    y = tl.sqrt(tl.sum(acc, axis=1) + eps)
    y_off = n.to(tl.int64) * syn + cc.to(tl.int64) * syc
    tl.store(y_ptr + y_off, cast_for_store(y, y_ptr, RTNE_BF16), mask=cc < PLANES)


@triton.jit
def _sqrt_pool_global_bwd_kernel(
    x_ptr,  # input of the forward, same layout as dx
    y_ptr,  # output of the forward (saved), N x C x 1 x 1
    dy_ptr,  # upstream gradient, layout of y
    dx_ptr,  # gradient of x, written once
    PLANES, HW,  # as in the forward
    sxn, sxc, sxp,  # strides of x and dx
    syn, syc,  # strides of y and dy
    ACC: tl.constexpr,  # accumulator dtype: fp32, or fp64 for fp64 inputs
    RTNE_BF16: tl.constexpr,  # interpreter only: see kernels._runtime.cast_for_store
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n, tc, _unused, tp = _tile_ids(tl.cdiv(PLANES, BLOCK_C), 1, tl.cdiv(HW, BLOCK_P))
    c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
    p = (tp * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
    cm = c < PLANES
    y_off = n.to(tl.int64) * syn + c.to(tl.int64) * syc
    yv = tl.load(y_ptr + y_off, mask=cm, other=0.0).to(ACC)
    dyv = tl.load(dy_ptr + y_off, mask=cm, other=0.0).to(ACC)
    pos = yv > 0
    g = tl.where(pos, dyv / tl.where(pos, yv, 1.0), 0.0)  # 0 for an all-zero map, never NaN
    m = cm & (p < HW)
    x_off = n.to(tl.int64) * sxn + c.to(tl.int64) * sxc + p * sxp
    xv = tl.load(x_ptr + x_off, mask=m, other=0.0).to(ACC)
    tl.store(dx_ptr + x_off, cast_for_store(xv * g, dx_ptr, RTNE_BF16), mask=m)


# ---------------------------------------------------------------------------------------------
# Geometry and validation

_OP = "sqrt_pool2d"


@dataclass(frozen=True)
class _Params:
    """Validated arguments that do not depend on x; kernel is None for global pooling."""

    kernel: Optional[Tuple[int, int]]
    stride: Optional[Tuple[int, int]]
    padding: Tuple[int, int]
    eps: float
    ceil_mode: bool


@dataclass(frozen=True)
class _Geometry:
    """Window geometry resolved against an input of H x W pixels."""

    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    oh: int
    ow: int
    eps: float
    whole: bool  # one window covers the whole unpadded map: the reduction kernels


def _check_params(kernel_size, stride, padding, eps, ceil_mode) -> _Params:
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"{_OP}: ceil_mode must be a bool, got {ceil_mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{_OP}: eps must be a float >= 0, got {eps!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{_OP}: eps must be a finite float >= 0, got {eps!r}")
    p = _pair(padding, "padding")
    if kernel_size is None:
        if stride is not None or p != (0, 0):
            raise ValueError(
                f"{_OP}: kernel_size=None pools the whole map, so stride and padding do not "
                f"apply; pass stride=None and padding=0 (got stride={stride!r}, "
                f"padding={padding!r})")
        return _Params(None, None, (0, 0), eps, ceil_mode)
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None else _pair(stride, "stride")
    if min(k) < 1:
        raise ValueError(f"{_OP}: kernel_size must be >= 1 (or None for global pooling), got "
                         f"{kernel_size!r}")
    if min(s) < 1:
        raise ValueError(f"{_OP}: stride must be >= 1 (or None for stride = kernel_size), got "
                         f"{stride!r}")
    if min(p) < 0:
        raise ValueError(f"{_OP}: padding must be >= 0, got {padding!r}")
    if 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        raise ValueError(f"{_OP}: padding must be at most half the window (2 * padding <= "
                         f"kernel_size per axis), got padding={p} for kernel_size={k}")
    return _Params(k, s, p, eps, ceil_mode)


def _out_size(n: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (the last window must start inside the input or left pad)."""
    out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _check_input(x) -> None:
    check_float(_OP, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be 4-D (N x C x H x W), got shape {tuple(x.shape)}")
    check_triton_device(_OP, x)


def _geometry(x: torch.Tensor, prm: _Params) -> _Geometry:
    _, _, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"{_OP}: the spatial size must be at least 1 x 1, got {H} x {W}")
    if prm.kernel is None:
        return _Geometry(H, W, H, W, 0, 0, 1, 1, prm.eps, True)
    (kh, kw), (sh, sw), (ph, pw) = prm.kernel, prm.stride, prm.padding
    if kh > H + 2 * ph or kw > W + 2 * pw:
        raise ValueError(
            f"{_OP}: the window {kh} x {kw} is larger than the padded input "
            f"{H + 2 * ph} x {W + 2 * pw} (H x W = {H} x {W}, padding {ph}, {pw}); valid: "
            f"kernel_size <= input size + 2 * padding per axis")
    oh = _out_size(H, kh, sh, ph, prm.ceil_mode)
    ow = _out_size(W, kw, sw, pw, prm.ceil_mode)
    whole = (kh, kw, ph, pw) == (H, W, 0, 0)
    return _Geometry(kh, kw, sh, sw, ph, pw, oh, ow, prm.eps, whole)


# ---------------------------------------------------------------------------------------------
# Launchers


def _dense(x: torch.Tensor) -> Tuple[torch.Tensor, torch.memory_format]:
    """x as NCHW- or channels_last-contiguous (copying only when it is neither), and which."""
    if x.is_contiguous():
        return x, torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last
    return x.contiguous(), torch.contiguous_format


def _strides(N: int, C: int, H: int, W: int, cl: bool) -> Tuple[int, int, int, int, int, int]:
    """(NB, PLANES, sn, sc, sh, sw) of a dense tensor, computed from its shape.

    Computed rather than read from .stride(): a dense tensor may carry arbitrary strides on
    size-1 dimensions. NCHW folds (n, c) into one channel axis of N*C planes (n stays 0).
    """
    if cl:
        return N, C, H * W * C, 1, W * C, C
    return 1, N * C, 0, H * W, W, 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _fit(n: int, cap: int) -> int:
    """Largest power of two <= cap (and <= next_pow2(n)) whose tiles pad n by at most 15%."""
    best, b = 1, 2
    while b <= min(cap, _next_pow2(n)):
        if -(-n // b) * b <= 1.15 * n:
            best = b
        b *= 2
    return best


def _tile_3d(planes: int, rows: int, cols: int, tile: int, cl: bool) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_H, BLOCK_W) holding about ``tile`` elements."""
    if cl:  # channels are the contiguous axis: a wide channel block, pixels fill the rest
        bc = min(_next_pow2(planes), 64)
        rest = max(1, tile // bc)
        bw = _fit(cols, rest)
        bh = _fit(rows, max(1, rest // bw))
    else:  # whole rows (the contiguous axis) when they fit, then rows, then planes
        bw = min(_next_pow2(cols), 64)
        bh = _fit(rows, max(1, tile // bw))
        bc = min(_next_pow2(planes), max(1, tile // (bh * bw)))
    return bc, bh, bw


def _tile_flat(planes: int, plane: int, tile: int) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for a tile of whole planes' flattened pixels (FLAT and global NCHW)."""
    bp = _fit(plane, tile)
    if bp < 32:  # tiny maps: one masked block per plane beats short scattered rows
        bp = min(_next_pow2(plane), tile)
    return min(_next_pow2(planes), max(1, tile // bp)), bp


def _tile_2d(planes: int, hw: int, tile: int, cl: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) for the global kernels."""
    if cl:
        bc = min(_next_pow2(planes), 64)
        return bc, min(_next_pow2(hw), max(1, tile // bc))
    if _next_pow2(hw) <= 1024:  # the whole map in one block: no loop
        return min(_next_pow2(planes), max(1, tile // _next_pow2(hw))), _next_pow2(hw)
    return _tile_flat(planes, hw, min(tile, 1024))


# Candidate launch configurations: (variant, elements per program, num_warps); the variants are
# described in the module docstring. The first is the default, used for small problems, under the
# interpreter and during CUDA graph capture; on CUDA a large problem times them all once per
# shape (_run). The lists keep what won somewhere in the H100 sweeps (docs/performance.md):
# for the benchmark shapes the tuner kept pair (forward) and pair or quad (backward) every time.
_FWD_PAIR = (("pair", 1024, 4), ("flat", 1024, 4), ("3d", 1024, 4))
_BWD_PAIR = (("pair", 2048, 4), ("flat", 1024, 4), ("3d", 2048, 4))
_BWD_QUAD = (("quad", 2048, 4), ("pair", 2048, 4), ("flat", 1024, 4))
_FWD_NCHW = (("flat", 1024, 4), ("3d", 1024, 4), ("flat", 2048, 4), ("3d", 2048, 8))
_BWD_NCHW = (("flat", 2048, 4), ("3d", 2048, 4), ("flat", 4096, 8), ("flat", 1024, 4))
_FWD_CL = (("3d", 1024, 4), ("3d", 2048, 4), ("3d", 4096, 8))
_BWD_CL = (("3d", 2048, 4), ("3d", 4096, 8), ("3d", 1024, 4))
_GLOBAL = (("2d", 2048, 4), ("2d", 4096, 8), ("2d", 1024, 4))
_FLAT_MAX = 1 << 21  # _flat_row_col is exact below this many pixels per plane
_TUNE_MIN_NUMEL = 1 << 22  # below ~4M inputs a launch takes microseconds: not worth timing


@dataclass
class _Spec:
    """One candidate launch with everything but the tensors resolved."""

    name: tuple
    kernel: object
    grid: tuple
    args: tuple  # runtime arguments after the tensors
    kwargs: dict  # constexprs and num_warps

    def __call__(self, *tensors):
        self.kernel[self.grid](*tensors, *self.args, **self.kwargs)


@dataclass
class _Plan:
    specs: list
    best: Optional[_Spec] = None


# (kind, shape, dtype, device, channels_last, geometry) -> _Plan: a call on a known shape skips
# tiling arithmetic and re-tuning. Small: a model has a handful of shapes.
_PLANS: Dict[tuple, _Plan] = {}


def _time_ms(launch: Callable[[], None], reps: int = 5) -> float:
    launch()  # compile and warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(2):  # best of two: one slow trial (clock ramp, a neighbour) does not decide
        start.record()
        for _ in range(reps):
            launch()
        end.record()
        end.synchronize()  # host-device sync: only on the first call for a shape
        best = min(best, start.elapsed_time(end) / reps)
    return best


def _run(plan: _Plan, tensors: tuple, x: torch.Tensor) -> None:
    """Launch the plan's default, or on CUDA for a large problem its fastest candidate.

    The choice is timed once per plan on the real buffers; see the module docstring for why
    that is safe. No memory is allocated for it.
    """
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device
            return _run(plan, tensors, x)
    spec = plan.best
    if spec is None:
        if (len(plan.specs) == 1 or x.device.type != "cuda" or x.numel() < _TUNE_MIN_NUMEL
                or torch.cuda.is_current_stream_capturing()):
            spec = plan.specs[0]
        else:
            times = [_time_ms(lambda c=c: c(*tensors)) for c in plan.specs]
            spec = plan.best = plan.specs[min(range(len(times)), key=times.__getitem__)]
    spec(*tensors)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_out(out: Optional[torch.Tensor], shape, like: torch.Tensor, fmt, name: str):
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or \
            out.dtype != like.dtype or out.device != like.device or \
            not out.is_contiguous(memory_format=fmt):
        raise ValueError(
            f"{_OP}: {name} must be a {tuple(shape)} {like.dtype} tensor on {like.device}, "
            f"contiguous in {fmt}, got "
            + (f"{tuple(out.shape)} {out.dtype} on {out.device}"
               if isinstance(out, torch.Tensor) else type(out).__name__))
    return out


def _pair_ok(g: _Geometry, cl: bool) -> bool:
    return not cl and not g.whole and g.sw == 2 and g.pw == 0 and g.kw in (2, 3)


def _quad_ok(g: _Geometry, cl: bool) -> bool:
    return _pair_ok(g, cl) and g.sh == 2 and g.kh in (2, 3)


def _specs(kind: str, shape, dtype: torch.dtype, device: torch.device, cl: bool, g: _Geometry,
           candidates: Optional[Sequence[tuple]]) -> list:
    """Every candidate launch of ``kind`` ("fwd" or "bwd") for this problem, default first."""
    N, C, H, W = shape
    nb, planes, sxn, sxc, sxh, sxw = _strides(N, C, H, W, cl)
    _, _, syn, syc, syh, syw = _strides(N, C, g.oh, g.ow, cl)
    fwd = kind == "fwd"
    if candidates is None:
        if g.whole:
            candidates = _GLOBAL
        elif _pair_ok(g, cl):
            candidates = _FWD_PAIR if fwd else (_BWD_QUAD if _quad_ok(g, cl) else _BWD_PAIR)
            if (g.oh * g.ow if fwd else H * W) >= _FLAT_MAX:  # too large for the flat tiling
                candidates = tuple(c for c in candidates if c[0] != "flat")
        elif cl or (g.oh * g.ow if fwd else H * W) >= _FLAT_MAX:
            candidates = _FWD_CL if fwd else _BWD_CL  # "3d" only
        else:
            candidates = _FWD_NCHW if fwd else _BWD_NCHW
    common = dict(ACC=_acc_dtype(dtype),
                  RTNE_BF16=device.type == "cpu" and dtype == torch.bfloat16)  # interpreter
    nh, nw = -(-g.kh // g.sh), -(-g.kw // g.sw)
    specs = []
    for cand in candidates:
        variant, tile, warps = cand
        kw = dict(common, num_warps=warps)
        if variant == "2d":
            if not g.whole:
                raise ValueError(f"{_OP}: the 2d variant is for global pooling only")
            bc, bp = _tile_2d(planes, H * W, tile, cl)
            kw.update(BLOCK_C=bc, BLOCK_P=bp)
            if fwd:
                specs.append(_Spec(cand, _sqrt_pool_global_fwd_kernel,
                                   (nb * triton.cdiv(planes, bc),),
                                   (planes, H * W, sxn, sxc, sxw, syn, syc, g.eps), kw))
            else:
                specs.append(_Spec(cand, _sqrt_pool_global_bwd_kernel,
                                   (nb * triton.cdiv(planes, bc) * triton.cdiv(H * W, bp),),
                                   (planes, H * W, sxn, sxc, sxw, syn, syc), kw))
            continue
        if g.whole:
            raise ValueError(f"{_OP}: global pooling runs the 2d variant only, got {cand}")
        if variant == "quad":
            if fwd or not _quad_ok(g, cl):
                raise ValueError(f"{_OP}: the quad variant is a backward for NCHW, stride 2 x 2, "
                                 f"no column padding and a window of 2 or 3 per axis")
            bp = min(_next_pow2(-(-W // 2)), 64)
            rows2 = -(-(H + g.ph) // 2)  # row pairs
            br = _fit(rows2, max(1, tile // (4 * bp)))
            bc = min(_next_pow2(planes), max(1, tile // (4 * br * bp)))
            grid = (triton.cdiv(planes, bc) * triton.cdiv(rows2, br) * triton.cdiv(W, 2 * bp),)
            kw.update(H=H, W=W, OH=g.oh, OW=g.ow, KH=g.kh, KW=g.kw, BLOCK_C=bc, BLOCK_R=br,
                      BLOCK_P=bp)
            specs.append(_Spec(cand, _sqrt_pool_bwd_quad_kernel, grid, (planes, g.ph), kw))
            continue
        if variant == "pair":
            if not _pair_ok(g, cl):
                raise ValueError(f"{_OP}: the pair variant needs NCHW, column stride 2, no column "
                                 f"padding and a window 2 or 3 columns wide")
            kw.update(H=H, W=W, OH=g.oh, OW=g.ow, KH=g.kh, KW=g.kw, SH=g.sh)
            if fwd:
                bp = min(_next_pow2(g.ow), 64)
                bh = _fit(g.oh, max(1, tile // bp))
                bc = min(_next_pow2(planes), max(1, tile // (bh * bp)))
                grid = (triton.cdiv(planes, bc) * triton.cdiv(g.oh, bh) * triton.cdiv(g.ow, bp),)
                kw.update(BLOCK_C=bc, BLOCK_H=bh, BLOCK_P=bp)
                specs.append(_Spec(cand, _sqrt_pool_fwd_pair_kernel, grid,
                                   (planes, g.ph, g.eps), kw))
            else:
                bp = min(_next_pow2(-(-W // 2)), 64)
                bh = _fit(H, max(1, tile // (2 * bp)))
                bc = min(_next_pow2(planes), max(1, tile // (bh * 2 * bp)))
                grid = (triton.cdiv(planes, bc) * triton.cdiv(H, bh) * triton.cdiv(W, 2 * bp),)
                kw.update(NH=nh, BLOCK_C=bc, BLOCK_H=bh, BLOCK_P=bp)
                specs.append(_Spec(cand, _sqrt_pool_bwd_pair_kernel, grid, (planes, g.ph), kw))
            continue
        rows, cols = (g.oh, g.ow) if fwd else (H, W)
        if variant == "flat":
            if cl or rows * cols >= _FLAT_MAX:
                raise ValueError(f"{_OP}: the flat variant needs NCHW and < {_FLAT_MAX} pixels "
                                 f"per map")
            bc, bp = _tile_flat(planes, rows * cols, tile)
            grid = (triton.cdiv(planes, bc) * triton.cdiv(rows * cols, bp),)
            bh, bw, flat = 1, bp, True
        elif variant == "3d":
            bc, bh, bw = _tile_3d(planes, rows, cols, tile, cl)
            grid = (nb * triton.cdiv(planes, bc) * triton.cdiv(rows, bh) * triton.cdiv(cols, bw),)
            flat = False
        else:
            raise ValueError(f"{_OP}: unknown launch variant {variant!r}")
        kw.update(KH=g.kh, KW=g.kw, SH=g.sh, SW=g.sw, FLAT=flat, BLOCK_C=bc, BLOCK_H=bh,
                  BLOCK_W=bw)
        geo = (planes, H, W, g.oh, g.ow, g.ph, g.pw, sxn, sxc, sxh, sxw, syn, syc, syh, syw)
        if fwd:
            specs.append(_Spec(cand, _sqrt_pool_fwd_kernel, grid,
                               geo + (g.eps, 1.0 / g.ow), kw))
        else:
            kw.update(NH=nh, NW=nw)
            specs.append(_Spec(cand, _sqrt_pool_bwd_kernel, grid, geo + (1.0 / W,), kw))
    return specs


def _plan(kind: str, x: torch.Tensor, cl: bool, g: _Geometry,
          candidates: Optional[Sequence[tuple]]) -> _Plan:
    if candidates is not None:  # explicit candidates (tests, sweeps): not cached
        return _Plan(_specs(kind, x.shape, x.dtype, x.device, cl, g, candidates))
    key = (kind, x.shape, x.dtype, x.device, cl, g)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(_specs(kind, x.shape, x.dtype, x.device, cl, g, None))
    return plan


def _fwd(x: torch.Tensor, g: _Geometry, out: Optional[torch.Tensor] = None,
         candidates: Optional[Sequence[tuple]] = None) -> torch.Tensor:
    x, fmt = _dense(x)
    cl = fmt is torch.channels_last
    N, C = x.shape[0], x.shape[1]
    y = _check_out(out, (N, C, g.oh, g.ow), x, fmt, "out")
    if y.numel() == 0:
        return y
    _run(_plan("fwd", x, cl, g, candidates), (x, y), x)
    return y


def _bwd(x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor, g: _Geometry,
         out: Optional[torch.Tensor] = None,
         candidates: Optional[Sequence[tuple]] = None) -> torch.Tensor:
    x, fmt = _dense(x)
    cl = fmt is torch.channels_last
    N, C = x.shape[0], x.shape[1]
    y_shape = (N, C, g.oh, g.ow)
    for name, t in (("y", y), ("dy", dy)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != y_shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{_OP}: {name} must have the output shape {y_shape}, got {got}")
        if t.dtype != x.dtype:
            raise TypeError(f"{_OP}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if y.device != x.device or dy.device != x.device:
        check_triton_device(_OP, x, y, dy)
    # y and dy in x's layout: no copy for the forward's own y and an ordinary dy; an expanded dy
    # (e.g. from .sum()) becomes a y-sized dense copy, small next to x
    y = y.contiguous(memory_format=fmt)
    dy = dy.contiguous(memory_format=fmt)
    dx = _check_out(out, x.shape, x, fmt, "out")
    if dx.numel() == 0:
        return dx
    _run(_plan("bwd", x, cl, g, candidates), (x, y, dy, dx), x)
    return dx


def sqrt_pool2d_fwd(x: torch.Tensor, kernel_size=None, stride=None, padding=0, eps: float = 0.0,
                    ceil_mode: bool = False, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward launcher: y (N x C x OH x OW, x's dtype and memory format).

    ``out``, if given, must be a dense tensor of y's shape, dtype and memory format; every
    element is written.
    """
    prm = _check_params(kernel_size, stride, padding, eps, ceil_mode)
    _check_input(x)
    return _fwd(x, _geometry(x, prm), out)


def sqrt_pool2d_bwd(x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor, kernel_size=None,
                    stride=None, padding=0, eps: float = 0.0, ceil_mode: bool = False, *,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Backward launcher: dx from the forward's input x, its output y and the gradient dy."""
    prm = _check_params(kernel_size, stride, padding, eps, ceil_mode)
    _check_input(x)
    return _bwd(x, y, dy, _geometry(x, prm), out)


# ---------------------------------------------------------------------------------------------
# autograd and modules


class _SqrtPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, geometry):
        y = _fwd(x, geometry)
        ctx.geometry = geometry
        ctx.save_for_backward(x, y)  # y is the output: saving it costs no memory
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        return _bwd(x, y, dy, ctx.geometry), None


def sqrt_pool2d(x: torch.Tensor, kernel_size=None, stride=None, padding=0, eps: float = 0.0,
                ceil_mode: bool = False) -> torch.Tensor:
    """Square-root pooling y = sqrt(sum_window x^2 + eps), Triton forward and backward.

    kernel_size, stride, padding: int or (h, w); stride defaults to kernel_size; padding adds
    zeros, at most half the window. ``kernel_size=None`` pools the whole map (N x C x 1 x 1).
    fp32/bf16/fp16/fp64, NCHW or channels_last (the output keeps the input's format).
    Equals ``F.lp_pool2d(x, 2, kernel_size, stride)`` when eps = 0, padding = 0 and ceil_mode is
    False (with ceil_mode a window clipped at the edge is its true sum here, while lp_pool2d
    rescales it by the full window's size over the clipped one's), except that
    an all-zero window gets gradient 0 instead of NaN. A NaN (inf) input makes every output
    whose window holds it NaN (inf) and its own gradient NaN; nothing raises (module docstring).
    """
    prm = _check_params(kernel_size, stride, padding, eps, ceil_mode)
    _check_input(x)
    return _SqrtPool2dFunction.apply(x, _geometry(x, prm))


class SqrtPool2d(torch.nn.Module):
    """Module form of :func:`sqrt_pool2d` (no parameters); arguments are checked at construction."""

    def __init__(self, kernel_size=None, stride=None, padding=0, eps: float = 0.0,
                 ceil_mode: bool = False):
        super().__init__()
        _check_params(kernel_size, stride, padding, eps, ceil_mode)
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.eps = eps
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sqrt_pool2d(x, self.kernel_size, self.stride, self.padding, self.eps,
                           self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"eps={self.eps}, ceil_mode={self.ceil_mode}")
