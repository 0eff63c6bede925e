"""Fused Barlow Twins loss.

a = BN(z1), b = BN(z2) (batch statistics, biased variance, eps, no affine); C = a^T b / N;
L = scale * [ sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 ].

Math
----
d_i = C_ii = (1/N) sum_n a_ni b_ni. Two ways to evaluate the loss, same value:

* Gram (N x N) form. ||C||_F^2 = <a a^T, b b^T> / N^2, so with G_a = a a^T, G_b = b b^T:
      L = scale * [ sum_i (d_i - 1)^2 + lambd (<G_a, G_b> / N^2 - sum_i d_i^2) ]
      dL/da = scale * [ (1/N) b * v + (2 lambd / N^2) G_b a ],   v_i = 2 (1 - lambd) d_i - 2
  and symmetrically for b (swap a <-> b, G_b -> G_a).
* Cross (D x D) form. M = dL/dC = 2 scale m(C), m(C)_ij = lambd C_ij off the diagonal and
  C_ii - 1 on it; dL/da = (1/N) b M^T, dL/db = (1/N) a M. C is evaluated in tiles that never
  leave the chip (forward) or in row panels of at most 16 MiB (backward): no D x D buffer exists.

BatchNorm backward (g = dL/da, x = a, r = 1/sqrt(var + eps) per feature):
      dL/dz = r * (g - mean_n(g) - x * mean_n(g * x)).
mean_n(g) is identically zero here: g is linear in the columns of b (resp. in b M^T) and every
column of a BatchNorm output sums to zero, sum_n b_n = 0, so that term is dropped (exactly, not
approximately: it is zero for every input, which gradcheck confirms). The projection term
s2 = sum_n g * x is a D-vector: in the cross form s2_i = sum_j C_ij M_ij falls out of the forward
tiles for free; in the Gram form it needs the finished column of G_b a, so for N > 256 the
gradient is computed per column chunk into an fp32 scratch (at most 32 MiB per chunk, both sides
in one chunk when that fits 32 MiB) and finalised by a second, elementwise kernel.

Kernels (Gram method, single process: 4 launches and one torch sum for forward + backward at
N=256, D=8192)
---------------------------------------------------------------------------------------------
1. ``_bt_stats_kernel``: one pass over z1 and z2 (Chan's parallel merge of per-tile centred sums,
   robust to a large mean): per-feature mean and rstd of both inputs, d, and the on-diagonal part
   of the loss; for N <= 512 a second pass over its (L2-resident) columns writes a = BN(z1) and
   b = BN(z2) in the input dtype. For larger N ``_bt_normalize_kernel`` writes them instead (an
   elementwise grid; the column-loop kernel would be latency bound).
2. ``_bt_gram_fwd_kernel``: both N x N products in one pass (each program feeds two
   accumulators), upper-triangular tiles only (G is symmetric, the lower triangle is a mirrored
   store), split over D when there are too few tiles to fill the device (then
   ``_bt_gram_reduce_kernel`` sums the split partials, with no atomics, so results are
   deterministic). Tile size and split come from a wave-quantisation model (``_gram_fwd_plan``).
   The epilogue writes the per-tile <G_a, G_b> partial of the loss from the fp32 accumulators and
   stores G / D in the input dtype (D keeps fp16 in range) with a zero diagonal, the diagonal going
   to a [2, R] vector in fp32 (Numerics); the loss is one sum over the partials of kernels 1 and 2.
3. ``_bt_gram_bwd_kernel``: W = G_b a (and G_a b; the GEMM skips the diagonal, which the
   epilogue adds in fp32) and the pre-BN gradient g. When one row tile
   holds the whole batch (N <= 256) the BatchNorm backward's column sum s2 is complete inside the
   program and the kernel writes dz directly: one launch for the whole backward. Otherwise it
   writes g to the fp32 scratch and per-row-tile partial sums of g * x, and
   ``_bt_gram_finalize_kernel`` applies the BatchNorm backward and writes dz in the input dtype;
   the last finalise launch of side 0 also writes BN(z2) for side 1 (extra programs on its grid),
   so the sides share their BatchNorm launches. Launches per forward + backward at D=8192 bf16
   (the H100 plan; tests/test_barlow_twins.py counts them): 4 / 8 / 12 at N = 256 / 1024 / 2048
   (4 / 22 / 37 with the earlier 8 MiB chunks, one finalise per chunk and a BatchNorm launch per
   side). Wall time at these sizes is mostly host launch overhead (docs/performance.md).
   ``cuda_graphs=True`` (opt-in, not yet measured on a GPU) replays forward and backward
   launchers from one CUDA graph per input address instead: one replay in the forward (the
   gradients at grad_loss = 1 computed there), one multiply per gradient in the backward
   (``_GraphedLossFn``; correct in any call order, see its docstring).
Why a and b are materialised: a first version normalised z inside the GEMM K-loops, and with
that elementwise transform between load and dot its GEMMs ran at 60-140 TFLOP/s on the H100
(most likely the loads were not software-pipelined; not checked in SASS); as plain GEMMs on
16-bit buffers they run at 280-315 TFLOP/s (docs/performance.md). The buffer costs no extra peak
memory where it matters: in the backward for N > 256 BN(z) of one side is written into that
side's own gradient buffer (a column chunk of it is overwritten by the gradient only after the
chunk's last read), and the forward's [2, N, D] copy is released at the end of the forward (kept
for the backward when N <= 256, where it is small, and when 256 < N <= D / 8 with both gradients
wanted: then it *is* dz1, dz2 (``_reuse_ab``), which saves the backward's BatchNorm launch for
the price of holding it from forward to backward and a peak higher by one G). The epilogues
still recompute BN(z) from z in fp32, so only the GEMM operands are rounded.
Saved for backward: the inputs (references, no copy), mean and rstd (2 x D each), d (D),
G_a / D, G_b / D (two N x N buffers in the input dtype; they are what makes the backward a pair
of GEMMs instead of a recomputation of the forward) and their diagonals (2 x N, fp32). When the two
sides are processed one after the other (large N), G_b is released as soon as dz1 is done and
dz2 is allocated only then: the peak is max(G_a + G_b + dz1, G_a + dz1 + dz2) + one scratch
chunk (G_a + G_b + dz1 + dz2 + one chunk when the forward's a, b are reused).

Numerics
--------
All accumulation is fp32 (fp64 for fp64 inputs), the loss is returned in fp32 (fp64 for fp64).
On a GPU, compiled Triton passes every float scalar (eps, lambd, scale and the coefficients made
of them) as fp32, so fp64 inputs see them rounded to fp32 (about 1e-8 relative; Triton's
interpreter keeps them exact). They are not annotated ``tl.float64``: such float annotations
were ignored or passed wrong bits in Triton releases of 2025 (triton-lang/triton#7408, #7439),
which would hit the fp32/bf16 path too; the fixed releases (setup.py pins triton >= 3.6) could
take them, but that has not been checked on a GPU.
Dot operands: a, b and G / D in the input dtype (bf16/fp16); fp32 inputs use IEEE fp32 dots
(not tf32: torch's own fp32 matmul does not use tf32 by default either) and fp32 G.
``barlow_twins_fwd(..., grad_precision="tf32")`` keeps G in fp32 and runs the backward Gram dots
in tf32, at 1.7x the backward GPU time at N=2048 (H100, before the diagonal split below).

G's diagonal is kept out of the backward GEMM. With strongly correlated views (as in training)
the gradient is a small remainder. G_b a = N b C is small next to its diagonal part G_nn a_n (a
factor ||b_n||^2 ~ D against about N), which the off-diagonal part cancels almost entirely, and
most of what survives lies along a's columns, which the BatchNorm projection removes. The bf16
rounding of G_nn and a_n in that term (an error of about 2^-9 D |a_n| per row) was therefore
amplified, while the off-diagonal entries' rounding errors are random over the batch and add up
to about 2^-9 sqrt(N D) |a| only. So the forward epilogue stores G with a zero diagonal and
writes the diagonal (the accumulator values scaled like G) to an fp32 [2, R] buffer (fp64 for
fp64), and the backward epilogue adds diag_n * BN(z)_n with BN(z) recomputed from z in fp32, in
every path (one kernel; scratch + finalise; the row blocks of DDP, where row n's entry is at
column row0 + n), at no extra launch. The loss partial is read from the accumulators before the
store: the loss is unchanged. fp32 / fp64 inputs, whose G and a are not rounded, change only in
rounding order.

Measured on the H100 (before the diagonal split) against a float64 reference, bf16 inputs,
D=8192, N in {256, 1024, 2048}: loss relative error <= 1.1e-6 and gradient relative error <=
1.71e-3 on independent random views (the bf16 rounding of the exact gradient alone is 1.66e-3;
eager bf16 autocast: 3.4e-3), fp32 inputs 5.9e-8 / 1.4e-7 (N=256); at correlation 0.9 (z2 = 0.9
z1 + 0.44 noise) the gradient error was 7.8e-3 / 2.9e-3 / 2.1e-3 (grad_precision="tf32": 5.6e-3
/ 2.4e-3 / 1.9e-3; eager autocast 1.2e-2; loss error <= 4e-5).

With the split, measured on CPU only, under TRITON_INTERPRET=1 (triton 3.8; this module emulates
there the round-to-nearest bf16 stores and, in "tf32" mode, the truncation of the backward dot
operands to tf32; with the split disabled it gives 7.66e-3 / 5.48e-3 for the H100's 7.8e-3 /
5.6e-3), D=8192: at correlation 0.9 the gradient error goes from 7.66e-3 to 2.49e-3 ("input")
and from 5.48e-3 to 2.33e-3 ("tf32") at N=256, from 2.84e-3 to 1.96e-3 and from 2.36e-3 to
1.89e-3 at N=1024 (H100 before: 2.90e-3 / 2.39e-3); on independent views (N=256) from 1.71e-3 /
1.69e-3 to 1.66e-3 / 1.66e-3 (the rounding alone: 1.66e-3); loss error 1.1e-5 / 3.3e-6,
unchanged (docs/performance.md has the command). Not yet measured on a GPU. What remains at
correlation 0.9 (above the issue's 2e-3 at N=256) is the bf16 rounding of the off-diagonal G, of
the backward's K operand a and of the forward's operand b (about 1e-3 each before the output's
own rounding, in a float64 simulation).

Default precision for 16-bit inputs (``grad_precision=None``): up to 256 rows of the global
batch the op runs with fp32 operands ("fp32": a, b and G in fp32, 3xTF32 dots on the GPU
(``_FP32_MODE_DOTS``; IEEE fp32 under the interpreter), the gradient rounded once to the input
dtype at its store). There the op is launch bound (0.06 ms of GPU time under ~0.8 ms of host
time at N=256 on the H100 VM, docs/performance.md), so the slower fp32 dots should cost no wall
time (not yet measured on a GPU), and the gradient is as accurate as its own rounding: under the
interpreter, N=256, D=8192, correlation 0.9, bf16: gradient error 1.659e-3 for both methods
against 1.659e-3 for the bf16 rounding of the exact gradient, loss error 1.3e-8. Above 256 rows
the default is "input" (the 16-bit GEMMs above).

The cross backward multiplies m(C) in fp32 with an fp32 BN(z) (IEEE dots): tf32 there was
measured at 3.6x the fp16 reference's error (IEEE made the cross method about 6x slower at
D=8192: 9.4 -> 54 ms at N=256; it is not what "auto" picks there). Its C tiles come from the
16-bit a, b, except the diagonal: C_ii is taken from d (the statistics kernel's fp32 sums over z),
forward and backward, because m(C)_ii = C_ii - 1 is small when the views agree and the operands'
rounding of C_ii (0.5% of 1 - C_ii at N=64, D=1024, correlation 0.9) is amplified there: the bf16
gradient error goes from 3.1x to 1.9x the bf16 rounding of the exact gradient at that shape
(interpreter; tests/test_barlow_twins.py::test_cross_correlated_views_diagonal_from_statistics).

Distributed
-----------
With torch.distributed initialised (or ``group`` given) and a world size > 1, every rank gathers
z1 and z2 (O(N D) communication, in the input dtype: the same bytes as gathering a and b), so the
batch statistics and d are computed locally on the global batch (identical on every rank, no
D-vector all-reduce needed in forward). Gram: each rank computes only its rows of G_a and G_b and
all-reduces one scalar; in backward it computes the gradient of its own rows and all-reduces the
D-vector s2 (the BatchNorm backward's projection term). Cross: the D x D tiles are recomputed on
every rank (no communication at all after the gather); only the gradient is restricted to the own
rows. The result equals the single-process loss on the concatenated batch (rank-major order).

Gradient convention under DDP: the gradient returned for this rank's z1 and z2 is the gradient of
the *global* loss with respect to this rank's rows (exactly what the official code gets from
all-reducing C and from SyncBatchNorm). DistributedDataParallel then *averages* parameter
gradients over ranks, so the parameters receive (1 / world_size) * dL/dtheta. The official Barlow
Twins code accepts that factor (its learning rates are tuned with it); to get the exact gradient
of the global loss instead, multiply the loss (or ``scale``) by the world size.

Floor: flops min(8 N^2 D, 6 N D^2) over the measured bf16 matmul rate, bytes (z1, z2 read once,
dz1, dz2 written once) over the measured copy rate; docs/performance.md holds the figures.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from kernels._runtime import INTERPRETER, check_float, check_triton_device, round_bf16

try:  # triton >= 3.0
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    OutOfResources = RuntimeError

_OP = "barlow_twins_loss"
METHODS = ("auto", "gram", "cross")


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The D*(D-1) off-diagonal entries of a square matrix, as in the official code."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def barlow_twins_loss_ref(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051,
                          scale: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """The reference, computed the way the official Barlow Twins code computes it.

    BatchNorm1d without affine (batch statistics), C = a^T b / N, on-diagonal and off-diagonal
    terms. It runs in the inputs' dtype (call it on float64 inputs for a float64 reference; under
    autocast it behaves like the official code: BN in fp32, the matmul in the autocast dtype).
    """
    n = z1.shape[0]
    a = F.batch_norm(z1, None, None, training=True, eps=eps)
    b = F.batch_norm(z2, None, None, training=True, eps=eps)
    c = a.T @ b / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _operand(x, OP: tl.constexpr, UPCAST: tl.constexpr):
    """x as a dot operand of dtype OP. UPCAST (interpreter, bf16): the interpreter runs tl.dot on
    the raw uint16 bits of bf16 operands, so there we use bf16 values held in fp32 and multiply in
    fp32, which is what the tensor cores do (bf16 products are exact in fp32)."""
    if UPCAST:
        y = round_bf16(x.to(tl.float32))
    else:
        y = x.to(OP)
    return y


@triton.jit
def _round_tf32(x):
    """fp32 -> tf32 value (10 explicit mantissa bits), kept in fp32, by truncation. Only for
    Triton's interpreter (3.8), whose tl.dot ignores input_precision="tf32" and multiplies fp32
    operands exactly; compiled Triton hands the fp32 bits to the tensor cores, which ignore the
    low 13 mantissa bits (no round-to-nearest step: triton-lang/triton#4574)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u >> 13) << 13
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _to_output(x, out_ptr, EMU_BF16: tl.constexpr):
    """Cast for the store into out_ptr's dtype, rounding to nearest (kernels._runtime.round_bf16)
    when that dtype is bf16 (EMU_BF16 is set for bf16 inputs; some of their buffers are fp32)."""
    if EMU_BF16:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            x = round_bf16(x.to(tl.float32))
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _inv_sqrt(x, ACC: tl.constexpr):
    """1 / sqrt(x) with an IEEE-rounded square root (tl.sqrt is approximate in fp32)."""
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(x)  # fp64 sqrt is always correctly rounded
    else:
        r = 1.0 / tl.sqrt_rn(x)
    return r


@triton.jit
def _tile_coords(pid, T, SYM: tl.constexpr):
    """(ti, tj) of tile pid: the upper triangle of a T x T tile grid, row-major, when SYM;
    otherwise row-major over T columns."""
    if SYM:
        ti = pid * 0
        rem = pid
        while rem >= T - ti:
            rem -= T - ti
            ti += 1
        tj = ti + rem
    else:
        ti = pid // T
        tj = pid % T
    return ti, tj


@triton.jit
def _bt_stats_kernel(
    z1_ptr, z2_ptr,      # [N, D] inputs (the global batch), contiguous
    mean_ptr, rstd_ptr,  # [2, D] out: per-feature mean and 1/sqrt(var + eps); row 0 z1, row 1 z2
    d_ptr,               # [D] out: d_i = C_ii = (1/N) sum_n a_ni b_ni
    part_ptr,            # [cdiv(D, BLOCK_D)] out: scale * sum_i [(d_i - 1)^2 - lambd d_i^2]
    a_ptr, b_ptr,        # WRITE: [N, D] out: a = BN(z1), b = BN(z2) in the input dtype
    N, D, eps, lambd, scale,
    WRITE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cnt = tl.zeros([BLOCK_D], ACC)
    mean1 = tl.zeros([BLOCK_D], ACC)
    mean2 = tl.zeros([BLOCK_D], ACC)
    m2_1 = tl.zeros([BLOCK_D], ACC)
    m2_2 = tl.zeros([BLOCK_D], ACC)
    c12 = tl.zeros([BLOCK_D], ACC)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(z1_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(z2_ptr + offs, mask=mask, other=0.0).to(ACC)
        nb = tl.sum(rmask.to(ACC), 0)
        # Chan et al.'s pairwise update: centre each tile on its own mean, then merge. Robust to
        # a mean far larger than the spread, unlike sum(x^2) - N mean^2.
        tm1 = tl.sum(x, 0) / nb
        tm2 = tl.sum(y, 0) / nb
        dx = tl.where(mask, x - tm1[None, :], 0.0)
        dy = tl.where(mask, y - tm2[None, :], 0.0)
        n_new = cnt + nb
        w = nb / n_new
        f = cnt * w
        del1 = tm1 - mean1
        del2 = tm2 - mean2
        mean1 += del1 * w
        mean2 += del2 * w
        m2_1 += tl.sum(dx * dx, 0) + del1 * del1 * f
        m2_2 += tl.sum(dy * dy, 0) + del2 * del2 * f
        c12 += tl.sum(dx * dy, 0) + del1 * del2 * f
        cnt = n_new
    # biased variance, like BatchNorm's normalisation
    rstd1 = _inv_sqrt(m2_1 / cnt + eps, ACC)
    rstd2 = _inv_sqrt(m2_2 / cnt + eps, ACC)
    d = c12 / cnt * rstd1 * rstd2
    tl.store(mean_ptr + cols, mean1, mask=cmask)
    tl.store(mean_ptr + D + cols, mean2, mask=cmask)
    tl.store(rstd_ptr + cols, rstd1, mask=cmask)
    tl.store(rstd_ptr + D + cols, rstd2, mask=cmask)
    tl.store(d_ptr + cols, d, mask=cmask)
    on = tl.where(cmask, (d - 1.0) * (d - 1.0) - lambd * d * d, 0.0)
    tl.store(part_ptr + pid, scale * tl.sum(on, 0))
    if WRITE:  # small batches: the second pass re-reads this program's columns from L2
        for start in range(0, N, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            mask = (rows < N)[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(z1_ptr + offs, mask=mask, other=0.0).to(ACC)
            y = tl.load(z2_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(a_ptr + offs, _to_output((x - mean1[None, :]) * rstd1[None, :], a_ptr,
                                              EMU_BF16), mask=mask)
            tl.store(b_ptr + offs, _to_output((y - mean2[None, :]) * rstd2[None, :], b_ptr,
                                              EMU_BF16), mask=mask)


@triton.jit
def _normalize_tile(z_ptr, o_ptr, mean_ptr, rstd_ptr, side, ROWS, D, pid_r, pid_c,
                    BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
                    EMU_BF16: tl.constexpr):
    """One BM x BN tile of o = BN(z) (statistics row `side`), in o's dtype."""
    rows = pid_r * BM + tl.arange(0, BM)
    cols = pid_c * BN + tl.arange(0, BN)
    cmask = cols < D
    mask = (rows < ROWS)[:, None] & cmask[None, :]
    m = tl.load(mean_ptr + side * D + cols, mask=cmask, other=0.0)
    r = tl.load(rstd_ptr + side * D + cols, mask=cmask, other=0.0)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(o_ptr + offs, _to_output((x - m[None, :]) * r[None, :], o_ptr, EMU_BF16), mask=mask)


@triton.jit
def _bt_normalize_kernel(
    z1_ptr, z2_ptr,       # [N, D] inputs (the global batch)
    mean_ptr, rstd_ptr,   # [2, D] batch statistics
    a_ptr, b_ptr,         # [ROWS, D] out: BN(z1) (side 0) and BN(z2) (side 1), input dtype
    ROWS, D, side0,
    BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    side = side0 + tl.program_id(2)
    if side == 0:
        z_ptr = z1_ptr
        o_ptr = a_ptr
    else:
        z_ptr = z2_ptr
        o_ptr = b_ptr
    _normalize_tile(z_ptr, o_ptr, mean_ptr, rstd_ptr, side, ROWS, D, tl.program_id(0),
                    tl.program_id(1), BM, BN, ACC, EMU_BF16)


@triton.jit
def _gram_store(acc_a, acc_b, ga_ptr, gb_ptr, dga_ptr, dgb_ptr, part_ptr, slot, ti, tj, rows,
                cols, rmask, cmask, N, row0, coef, inv_gscale, SYM: tl.constexpr,
                SPLIT_DIAG: tl.constexpr, EMU_BF16: tl.constexpr):
    """Store a tile of G_a / gscale and G_b / gscale in the storage dtype (and its mirror image
    when SYM and off the diagonal), and the tile's loss partial coef * w * sum(G_a * G_b) from the
    fp32 accumulators (w = 2 for a mirrored tile). SPLIT_DIAG: the diagonal entries (global row
    row0 + rows == column) go to dga, dgb (accumulator dtype, indexed by local row) and are stored
    as zeros in G (module docstring, Numerics); the loss partial above still uses them."""
    w = 1.0
    if SYM:
        w = 1.0 + (ti != tj).to(acc_a.dtype)  # the accumulator's dtype: fp64 stays fp64
    tl.store(part_ptr + slot, coef * w * tl.sum(tl.sum(acc_a * acc_b, 1), 0))
    m = rmask[:, None] & cmask[None, :]
    o = rows[:, None].to(tl.int64) * N + cols[None, :]
    ea = acc_a * inv_gscale
    eb = acc_b * inv_gscale
    if SPLIT_DIAG:
        # each row's diagonal entry lies in exactly one tile (under SYM: a ti == tj tile, never
        # a mirrored one), so every valid row of dga, dgb is written once
        on = (row0 + rows)[:, None] == cols[None, :]
        dm = rmask & (tl.sum(on.to(tl.int32), 1) > 0)
        tl.store(dga_ptr + rows, tl.sum(tl.where(on, ea, 0.0), 1), mask=dm)
        tl.store(dgb_ptr + rows, tl.sum(tl.where(on, eb, 0.0), 1), mask=dm)
        ea = tl.where(on, 0.0, ea)
        eb = tl.where(on, 0.0, eb)
    sa = _to_output(ea, ga_ptr, EMU_BF16)
    sb = _to_output(eb, gb_ptr, EMU_BF16)
    tl.store(ga_ptr + o, sa, mask=m)
    tl.store(gb_ptr + o, sb, mask=m)
    if SYM:
        if ti != tj:
            ot = cols[:, None].to(tl.int64) * N + rows[None, :]
            mt = cmask[:, None] & rmask[None, :]
            tl.store(ga_ptr + ot, tl.trans(sa), mask=mt)
            tl.store(gb_ptr + ot, tl.trans(sb), mask=mt)


@triton.jit
def _bt_gram_fwd_kernel(
    a_ptr, b_ptr,         # [N, D] a = BN(z1), b = BN(z2) of the global batch, input dtype
    ga_ptr, gb_ptr,       # [R, N] out (not SPLIT): rows row0.. of a a^T / gscale, b b^T / gscale
                          # (zero diagonal when SPLIT_DIAG)
    dga_ptr, dgb_ptr,     # SPLIT_DIAG, not SPLIT: [R] out their diagonals, accumulator dtype
    part_ptr,             # not SPLIT: [tiles] out loss partials. SPLIT: [splits, tiles, 2, BM, BM]
                          # out fp32 partial tiles (summed by _bt_gram_reduce_kernel)
    R, N, D, row0, k_split, n_tiles, coef, inv_gscale,
    SYM: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr,
    BK: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, SPLIT_DIAG: tl.constexpr, EMU_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    ti, tj = _tile_coords(pid, tl.cdiv(N, BM), SYM)
    ar = tl.arange(0, BM)
    rows = ti * BM + ar          # local row of G (row of this rank's block)
    rmask = rows < R
    cols = tj * BM + ar
    cmask = cols < N
    k_lo = sid * k_split
    k_hi = tl.minimum(D, k_lo + k_split)
    pi = (row0 + rows)[:, None].to(tl.int64) * D
    pj = cols[:, None].to(tl.int64) * D
    acc_a = tl.zeros([BM, BM], ACC)
    acc_b = tl.zeros([BM, BM], ACC)
    for k in range(k_lo, k_hi, BK):  # a plain NT GEMM: the operands go straight to the dot
        ks = (k + tl.arange(0, BK))[None, :]
        if EVEN_K:
            mi = rmask[:, None]
            mj = cmask[:, None]
        else:
            mi = rmask[:, None] & (ks < k_hi)
            mj = cmask[:, None] & (ks < k_hi)
        ai = tl.load(a_ptr + pi + ks, mask=mi, other=0.0)
        aj = tl.load(a_ptr + pj + ks, mask=mj, other=0.0)
        bi = tl.load(b_ptr + pi + ks, mask=mi, other=0.0)
        bj = tl.load(b_ptr + pj + ks, mask=mj, other=0.0)
        acc_a = tl.dot(_operand(ai, OP, UPCAST), tl.trans(_operand(aj, OP, UPCAST)), acc_a,
                       input_precision=PREC, out_dtype=ACC)
        acc_b = tl.dot(_operand(bi, OP, UPCAST), tl.trans(_operand(bj, OP, UPCAST)), acc_b,
                       input_precision=PREC, out_dtype=ACC)
    if SPLIT:
        base = (sid * n_tiles + pid).to(tl.int64) * (2 * BM * BM)
        o = ar[:, None] * BM + ar[None, :]
        tl.store(part_ptr + base + o, acc_a)
        tl.store(part_ptr + base + BM * BM + o, acc_b)
    else:
        _gram_store(acc_a, acc_b, ga_ptr, gb_ptr, dga_ptr, dgb_ptr, part_ptr, pid, ti, tj, rows,
                    cols, rmask, cmask, N, row0, coef, inv_gscale, SYM, SPLIT_DIAG, EMU_BF16)


@triton.jit
def _bt_gram_reduce_kernel(
    split_ptr,            # [splits, tiles, 2, BM, BM] fp32 partial tiles from _bt_gram_fwd_kernel
    ga_ptr, gb_ptr,       # [R, N] out: G_a / gscale, G_b / gscale rows of this rank
    dga_ptr, dgb_ptr,     # SPLIT_DIAG: [R] out their diagonals (the full sums over D)
    part_ptr,             # [tiles] out: loss partials
    R, N, row0, n_tiles, n_split, coef, inv_gscale,
    SYM: tl.constexpr, BM: tl.constexpr, ACC: tl.constexpr, SPLIT_DIAG: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    ti, tj = _tile_coords(pid, tl.cdiv(N, BM), SYM)
    ar = tl.arange(0, BM)
    o = ar[:, None] * BM + ar[None, :]
    acc_a = tl.zeros([BM, BM], ACC)
    acc_b = tl.zeros([BM, BM], ACC)
    for s in range(0, n_split):  # fixed order: deterministic, unlike atomics
        base = (s * n_tiles + pid).to(tl.int64) * (2 * BM * BM)
        acc_a += tl.load(split_ptr + base + o)
        acc_b += tl.load(split_ptr + base + BM * BM + o)
    rows = ti * BM + ar
    cols = tj * BM + ar
    _gram_store(acc_a, acc_b, ga_ptr, gb_ptr, dga_ptr, dgb_ptr, part_ptr, pid, ti, tj, rows, cols,
                rows < R, cols < N, N, row0, coef, inv_gscale, SYM, SPLIT_DIAG, EMU_BF16)


@triton.jit
def _bt_gram_bwd_kernel(
    z1_ptr, z2_ptr,       # [N, D] inputs (the global batch): x and y of the epilogue, exact
    xa_ptr, xb_ptr,       # [N, D] BN(z1), BN(z2) in the input dtype: the K-loop operand of side 0, 1
    mean_ptr, rstd_ptr,   # [2, D] batch statistics
    d_ptr,                # [D] diagonal of C
    ga_ptr, gb_ptr,       # [R, N] G_a / gscale, G_b / gscale of this rank's rows (side 0 reads gb)
    dga_ptr, dgb_ptr,     # SPLIT_DIAG: [R] their diagonals (accumulator dtype; G holds zeros there)
    gl_ptr,               # [] upstream gradient of the loss
    g_ptr,                # not FINAL: [sides, R, DC] out pre-BatchNorm gradient, columns col0..
    s2_ptr,               # not FINAL: [2, TR, D] out per-row-tile sums of g * x
    dz1_ptr, dz2_ptr,     # FINAL: [R, D] out gradients
    R, N, D, row0, col0, DC, side0, TR,
    c_diag, c_off, lambd, gscale,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GOP: tl.constexpr,
    UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, FINAL: tl.constexpr,
    EVEN_N: tl.constexpr, SPLIT_DIAG: tl.constexpr, EMU_TF32: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    ps = tl.program_id(2)
    side = side0 + ps
    if side == 0:
        x_ptr = z1_ptr
        y_ptr = z2_ptr
        xk_ptr = xa_ptr
        gy_ptr = gb_ptr
        dgy_ptr = dgb_ptr
    else:
        x_ptr = z2_ptr
        y_ptr = z1_ptr
        xk_ptr = xb_ptr
        gy_ptr = ga_ptr
        dgy_ptr = dga_ptr
    rows = pid_r * BM + tl.arange(0, BM)
    rmask = rows < R
    zrows = row0 + rows
    cols = col0 + pid_c * BN + tl.arange(0, BN)
    cmask = cols < tl.minimum(D, col0 + DC)
    pg = gy_ptr + rows[:, None].to(tl.int64) * N
    acc = tl.zeros([BM, BN], ACC)
    for k in range(0, N, BK):  # W = G_y[rows, :] @ x[:, cols]: a plain NN GEMM
        ks = k + tl.arange(0, BK)
        if EVEN_N:
            mg = rmask[:, None]
            mk = cmask[None, :]
        else:
            mg = rmask[:, None] & (ks < N)[None, :]
            mk = (ks < N)[:, None] & cmask[None, :]
        gt = tl.load(pg + ks[None, :], mask=mg, other=0.0)
        xk = tl.load(xk_ptr + ks[:, None].to(tl.int64) * D + cols[None, :], mask=mk, other=0.0)
        go = _operand(gt, GOP, UPCAST)
        xo = _operand(xk, GOP, UPCAST)
        if EMU_TF32:
            go = _round_tf32(go)
            xo = _round_tf32(xo)
        acc = tl.dot(go, xo, acc, input_precision=PREC, out_dtype=ACC)
    gl = tl.load(gl_ptr).to(ACC)
    dv = tl.load(d_ptr + cols, mask=cmask, other=0.0)
    v = 2.0 * (1.0 - lambd) * dv - 2.0
    mx = tl.load(mean_ptr + side * D + cols, mask=cmask, other=0.0)
    rx = tl.load(rstd_ptr + side * D + cols, mask=cmask, other=0.0)
    my = tl.load(mean_ptr + (1 - side) * D + cols, mask=cmask, other=0.0)
    ry = tl.load(rstd_ptr + (1 - side) * D + cols, mask=cmask, other=0.0)
    m2 = rmask[:, None] & cmask[None, :]
    o = zrows[:, None].to(tl.int64) * D + cols[None, :]
    yv = tl.where(m2, (tl.load(y_ptr + o, mask=m2, other=0.0).to(ACC) - my[None, :]) * ry[None, :], 0.0)
    xv = tl.where(m2, (tl.load(x_ptr + o, mask=m2, other=0.0).to(ACC) - mx[None, :]) * rx[None, :], 0.0)
    if SPLIT_DIAG:
        # G_y's diagonal term, kept out of the GEMM: its fp32 value times the fp32 BN(z) row
        # (the large part of G_y x that the BatchNorm projection removes again: module docstring)
        dgy = tl.load(dgy_ptr + rows, mask=rmask, other=0.0)
        acc += dgy[:, None] * xv
    g = gl * (c_diag * yv * v[None, :] + (c_off * gscale) * acc)
    g = tl.where(m2, g, 0.0)
    if FINAL:
        # one row tile holds the whole batch: the BatchNorm backward's column sum is right here,
        # so finish dz in this kernel (no scratch, no second launch)
        s2 = tl.sum(g * xv, 0)
        dz = rx[None, :] * (g - xv * (s2 / N)[None, :])
        od = rows[:, None].to(tl.int64) * D + cols[None, :]
        if side == 0:
            tl.store(dz1_ptr + od, _to_output(dz, dz1_ptr, EMU_BF16), mask=m2)
        else:
            tl.store(dz2_ptr + od, _to_output(dz, dz2_ptr, EMU_BF16), mask=m2)
    else:
        og = (ps * R + rows)[:, None].to(tl.int64) * DC + (cols - col0)[None, :]
        tl.store(g_ptr + og, g, mask=m2)
        tl.store(s2_ptr + (side * TR + pid_r).to(tl.int64) * D + cols, tl.sum(g * xv, 0),
                 mask=cmask)


@triton.jit
def _bt_gram_finalize_kernel(
    z1_ptr, z2_ptr,       # [N, D] inputs (the global batch)
    mean_ptr, rstd_ptr,   # [2, D] batch statistics
    g_ptr,                # [sides, R, DC] pre-BatchNorm gradient from _bt_gram_bwd_kernel
    s2_ptr,               # [2, n_parts, D] partial sums of g * x (summed here)
    dz1_ptr, dz2_ptr,     # [R, D] out: gradients of this rank's rows, in the input dtype
    nrm_ptr,              # n_fin < grid z: [N, D] out BN(z) of side nrm_side (the next side's
                          # K-loop operand), written by the programs with program_id(2) == n_fin
    R, N, D, row0, col0, DC, side0, n_parts, n_fin, nrm_side,
    BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    ps = tl.program_id(2)
    if ps < n_fin:
        side = side0 + ps
        if side == 0:
            x_ptr = z1_ptr
            dz_ptr = dz1_ptr
        else:
            x_ptr = z2_ptr
            dz_ptr = dz2_ptr
        rows = pid_r * BM + tl.arange(0, BM)
        rmask = rows < R
        cols = col0 + pid_c * BN + tl.arange(0, BN)
        cmask = cols < tl.minimum(D, col0 + DC)
        s2 = tl.zeros([BN], ACC)
        for p in range(0, n_parts):
            s2 += tl.load(s2_ptr + (side * n_parts + p).to(tl.int64) * D + cols, mask=cmask,
                          other=0.0)
        mx = tl.load(mean_ptr + side * D + cols, mask=cmask, other=0.0)
        rx = tl.load(rstd_ptr + side * D + cols, mask=cmask, other=0.0)
        m2 = rmask[:, None] & cmask[None, :]
        xv = (tl.load(x_ptr + (row0 + rows)[:, None].to(tl.int64) * D + cols[None, :], mask=m2,
                      other=0.0).to(ACC) - mx[None, :]) * rx[None, :]
        g = tl.load(g_ptr + (ps * R + rows)[:, None].to(tl.int64) * DC + (cols - col0)[None, :],
                    mask=m2, other=0.0)
        dz = rx[None, :] * (g - xv * (s2 / N)[None, :])
        tl.store(dz_ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                 _to_output(dz, dz_ptr, EMU_BF16), mask=m2)
    else:
        # the next side's BN(z) rides on this launch (one launch less; it writes only nrm_ptr,
        # which no finalize program reads)
        if nrm_side == 0:
            z_ptr = z1_ptr
        else:
            z_ptr = z2_ptr
        _normalize_tile(z_ptr, nrm_ptr, mean_ptr, rstd_ptr, nrm_side, N, D, pid_r, pid_c, BM, BN,
                        ACC, EMU_BF16)


@triton.jit
def _bt_cross_tile_kernel(
    x_ptr, y_ptr,         # [N, D] normalised inputs (input dtype): columns of x index the rows of
                          # C, columns of y its columns
    out_ptr,              # MODE 0: [TI * TJ] out loss partials. MODE 1: [P, D] out m(C) rows i0..
    rowp_ptr, colp_ptr,   # MODE 0: [TJ, D], [TI, D] out partial sums of C * m(C) along j and i
    d_ptr,                # [D] C's diagonal from the statistics kernel (fp32 from z: exact-ish)
    N, D, i0, i_hi, lambd, scale,
    MODE: tl.constexpr, EVEN_N: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
    BK: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, EXACT_DIAG: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ii = i0 + pid_i * BI + tl.arange(0, BI)
    imask = ii < i_hi
    jj = pid_j * BJ + tl.arange(0, BJ)
    jmask = jj < D
    acc = tl.zeros([BI, BJ], ACC)
    for n in range(0, N, BK):  # C tile = x[:, I]^T y[:, J], contraction over the batch
        ns = n + tl.arange(0, BK)
        if EVEN_N:
            mi = imask[None, :]
            mj = jmask[None, :]
        else:
            mi = (ns < N)[:, None] & imask[None, :]
            mj = (ns < N)[:, None] & jmask[None, :]
        on = ns[:, None].to(tl.int64) * D
        xa = tl.load(x_ptr + on + ii[None, :], mask=mi, other=0.0)
        yb = tl.load(y_ptr + on + jj[None, :], mask=mj, other=0.0)
        acc = tl.dot(tl.trans(_operand(xa, OP, UPCAST)), _operand(yb, OP, UPCAST), acc,
                     input_precision=PREC, out_dtype=ACC)
    c = acc / N
    diag = ii[:, None] == jj[None, :]
    if EXACT_DIAG:
        # C_ii from d (fp32 from z), not from the 16-bit operands: with agreeing views C_ii ~ 1
        # and m(C)_ii = C_ii - 1 would amplify their rounding (module docstring, Numerics)
        dv = tl.load(d_ptr + ii, mask=imask, other=0.0).to(ACC)
        c = tl.where(diag, dv[:, None], c)
    valid = imask[:, None] & jmask[None, :]
    m = tl.where(valid, tl.where(diag, c - 1.0, lambd * c), 0.0)
    if MODE == 0:
        t = tl.where(diag, (c - 1.0) * (c - 1.0), lambd * c * c)
        t = tl.where(valid, t, 0.0)
        tl.store(out_ptr + pid_i * tl.num_programs(1) + pid_j, scale * tl.sum(tl.sum(t, 1), 0))
        cm = c * m
        tl.store(rowp_ptr + pid_j.to(tl.int64) * D + ii, tl.sum(cm, 1), mask=imask)
        tl.store(colp_ptr + pid_i.to(tl.int64) * D + jj, tl.sum(cm, 0), mask=jmask)
    else:
        tl.store(out_ptr + (ii - i0)[:, None].to(tl.int64) * D + jj[None, :], m, mask=valid)


@triton.jit
def _bt_cross_grad_kernel(
    x_ptr, y_ptr,         # [N, D] inputs: x is this side (its gradient is written), y the other
    mean_ptr, rstd_ptr,   # [2, D] batch statistics
    sx,                   # row of the statistics that belongs to x
    panel_ptr,            # [P, D] m(C') for rows i0..i0+P of C' = x^T y / N
    s2_ptr,               # [D] sum_j C'_ij m(C')_ij for this side
    gl_ptr,               # [] upstream gradient of the loss
    dz_ptr,               # [R, D] out: gradient of this rank's rows of x, in the input dtype
    R, N, D, row0, i0, i_hi, coef,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GOP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BM + tl.arange(0, BM)
    rmask = rows < R
    zrows = (row0 + rows).to(tl.int64)
    ii = i0 + pid_c * BN + tl.arange(0, BN)
    imask = ii < i_hi
    acc = tl.zeros([BM, BN], ACC)
    for j in range(0, D, BK):  # g[rows, I] = (1/N) y[rows, :] @ M[I, :]^T
        js = j + tl.arange(0, BK)
        jmask = js < D
        # y normalised here in fp32, not read from the 16-bit copy: with m(C) in fp32 and IEEE
        # dots this keeps the cross gradient as accurate as the reference run in fp32
        my = tl.load(mean_ptr + (1 - sx) * D + js, mask=jmask, other=0.0)
        ry = tl.load(rstd_ptr + (1 - sx) * D + js, mask=jmask, other=0.0)
        my_ = rmask[:, None] & jmask[None, :]
        yt = tl.where(my_, (tl.load(y_ptr + zrows[:, None] * D + js[None, :], mask=my_, other=0.0).to(ACC) - my[None, :]) * ry[None, :], 0.0)
        mt = tl.load(panel_ptr + (ii - i0)[:, None].to(tl.int64) * D + js[None, :],
                     mask=imask[:, None] & jmask[None, :], other=0.0)
        acc = tl.dot(yt.to(GOP), tl.trans(mt.to(GOP)), acc, input_precision=PREC, out_dtype=ACC)
    gl = tl.load(gl_ptr).to(ACC)
    g = (gl * coef / N) * acc
    s2 = gl * coef * tl.load(s2_ptr + ii, mask=imask, other=0.0)
    mx = tl.load(mean_ptr + sx * D + ii, mask=imask, other=0.0)
    rx = tl.load(rstd_ptr + sx * D + ii, mask=imask, other=0.0)
    m2 = rmask[:, None] & imask[None, :]
    xv = (tl.load(x_ptr + zrows[:, None] * D + ii[None, :], mask=m2, other=0.0).to(ACC) - mx[None, :]) * rx[None, :]
    dz = rx[None, :] * (g - xv * (s2 / N)[None, :])
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * D + ii[None, :],
             _to_output(dz, dz_ptr, EMU_BF16), mask=m2)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}
# gram backward: fp32 gradient scratch per column chunk (one side at a time), and both sides in
# one launch when the whole thing fits _SCRATCH_BOTH_BYTES. 32 MiB: D = 8192 bf16 takes one chunk
# per side at N = 1024, two at N = 2048 (peak about 24 MiB above 8 MiB chunks, still under a
# quarter of torch.compile's peak there); a full-width scratch for both sides (the fewest
# launches) would cost 128 MiB at N = 2048.
_SCRATCH_BYTES = 32 << 20
_SCRATCH_BOTH_BYTES = 32 << 20
_SPLIT_BYTES = 16 << 20         # gram forward: split-over-D partial tiles
_PANEL_BYTES = 16 << 20         # cross backward: one row panel of m(C)
_STATS_BLOCK_D = 64
_STATS_WRITE_MAX_ROWS = 512     # up to here the stats kernel also writes a, b (one launch less)
_FINAL_MAX_ROWS = 256           # up to here the Gram backward is one kernel
_FP32_MAX_ROWS = 256            # 16-bit inputs, default grad_precision: fp32 operands up to here
# Dots of that "fp32" mode: "tf32x3" (each fp32 operand split into a tf32 high part and a tf32
# remainder, three tensor-core products, about 2^-21 relative error per product, far below the
# gradient's own bf16/fp16 rounding of 2^-9) instead of IEEE FMA dots, which run on the CUDA
# cores at a fraction of the tensor-core rate. Chosen for GPU time, which the op's CUDA-graph
# path exposes once host launches are gone; not yet measured on a GPU. Triton's interpreter
# ignores input_precision (it multiplies in fp32), so CPU figures are those of IEEE dots.
# fp32 *inputs* keep IEEE dots, as torch's own fp32 matmul does by default.
_FP32_MODE_DOTS = "tf32x3"
# Gram: G stored with a zero diagonal, the diagonal kept in fp32 and applied to the fp32 BN(z) in
# the backward epilogue (module docstring, Numerics). False only to measure the old numerics.
_SPLIT_DIAG = True
# Cross: C's diagonal taken from d (the statistics kernel's fp32 sums over z) rather than from the
# 16-bit operands' dot, forward and backward alike. False only to measure the old numerics.
_CROSS_EXACT_DIAG = True
_EW_BLOCK = (64, 128) if INTERPRETER else (32, 128)  # normalise / finalise tiles (BM, BN)


@dataclass(frozen=True)
class _Precision:
    """How the dots of one input dtype run (see the module docstring, Numerics)."""
    op: object               # forward dot operand dtype (= the input dtype)
    acc: object              # accumulator / statistics / scratch dtype
    prec: str                # forward input_precision
    gstore: torch.dtype      # storage dtype of G_a, G_b between forward and backward
    gscale: bool             # store G / D (16-bit storage: keeps fp16 in range)
    gop: object              # backward Gram dot operand dtype
    gprec: str               # backward Gram input_precision
    gupcast: bool            # interpreter: backward bf16 operands multiplied in fp32
    cop: object              # cross backward dot operand dtype
    upcast: bool             # interpreter: forward bf16 operands multiplied in fp32 (_operand)
    emu_bf16: bool           # interpreter: round-to-nearest emulated for bf16 stores
    torch_acc: torch.dtype
    operand: torch.dtype     # dtype of the a, b buffers (GEMM operands); keys the tile configs
    gemu_tf32: bool = False  # interpreter: tf32 backward Gram dot operands emulated (_round_tf32)


@functools.lru_cache(maxsize=None)
def _precision(dtype: torch.dtype, grad_precision: Optional[str] = None) -> _Precision:
    if dtype == torch.float64:
        return _Precision(tl.float64, tl.float64, "ieee", torch.float64, False, tl.float64, "ieee",
                          False, tl.float64, False, False, torch.float64, torch.float64)
    if dtype == torch.float32:
        # IEEE fp32 dots: torch's own fp32 matmul does not use tf32 by default either.
        return _Precision(tl.float32, tl.float32, "ieee", torch.float32, False, tl.float32, "ieee",
                          False, tl.float32, False, False, torch.float32, torch.float32)
    bf16_interp = INTERPRETER and dtype == torch.bfloat16
    grad_precision = grad_precision or "input"
    if grad_precision == "fp32":  # 16-bit inputs, fp32 operands end to end, 3xTF32 dots
        return _Precision(tl.float32, tl.float32, _FP32_MODE_DOTS, torch.float32, False,
                          tl.float32, _FP32_MODE_DOTS, False, tl.float32, False, bf16_interp,
                          torch.float32, torch.float32)
    if grad_precision == "input":  # G stored in the input dtype: a plain 16-bit GEMM backward
        gstore, gop, gprec, gup = dtype, _TL_DTYPE[dtype], "tf32", bf16_interp
    elif grad_precision == "tf32":  # G in fp32, the normalised operand upcast, tf32 dots
        gstore, gop, gprec, gup = torch.float32, tl.float32, "tf32", False
    else:
        raise ValueError(f"{_OP}: grad_precision must be 'input', 'tf32' or 'fp32', got "
                         f"{grad_precision!r}")
    # forward: 16-bit operands ("tf32" is Triton's default and is ignored for 16-bit operands);
    # cross backward: fp32 m(C) against BN(z) in fp32, IEEE (tf32 was measured too coarse)
    return _Precision(_TL_DTYPE[dtype], tl.float32, "tf32", gstore, gstore != torch.float32, gop,
                      gprec, gup, tl.float32, bf16_interp, bf16_interp, torch.float32, dtype,
                      INTERPRETER and grad_precision == "tf32")


_SM_COUNT: Dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: a few programs, enough to exercise the split-over-D path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _big(dtype: torch.dtype) -> bool:
    """16-bit inputs get the large tensor-core tiles; fp32 (IEEE FMA dots) and fp64 smaller ones."""
    return dtype in (torch.bfloat16, torch.float16)


def _gram_fwd_candidates(dtype: torch.dtype):
    """(BM, BK, num_warps, num_stages, cost of one K-step in units of the 128 x 128 x 32 step)."""
    if INTERPRETER:
        return ((64, 64, 4, 1, 1.0),)
    if _big(dtype):  # 64 x 64 x 64: half the flops of 128 x 128 x 32 at ~65% of its efficiency
        return ((64, 64, 4, 3, 0.77), (128, 32, 8, 3, 1.0))
    return ((64, 16 if dtype == torch.float64 else 32, 4, 2, 1.0),)


@dataclass(frozen=True)
class _GramPlan:
    bm: int
    bk: int
    warps: int
    stages: int
    split: int
    k_split: int
    tiles: int
    sym: bool


@functools.lru_cache(maxsize=None)
def _pick_split(tiles: int, ksteps: int, sms: int, tile_bytes: int) -> Tuple[int, float]:
    """Split the D reduction of the Gram forward when there are too few tiles to fill the device.

    Cost in K-steps: waves x K-steps per program, plus for a split the reduce launch and the
    write and read-back of the partial tiles (about one K-step per 512 KiB). At most _SPLIT_BYTES
    of partial tiles."""
    best, best_cost = 1, None
    for s in range(1, min(ksteps, 64) + 1):
        if s > 1 and s * tiles * tile_bytes > _SPLIT_BYTES:
            break
        cost = math.ceil(tiles * s / sms) * math.ceil(ksteps / s)
        if s > 1:
            cost += 4 + s * tiles * tile_bytes / (1 << 19)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best, best_cost


@functools.lru_cache(maxsize=None)
def _gram_fwd_plan(n: int, r: int, d: int, dtype: torch.dtype, sms: int) -> _GramPlan:
    """Tile size and split for the Gram forward: the candidate with the fewest modelled K-steps
    (wave quantisation matters: at N=2048, 136 tiles of 128 on 132 SMs take two full waves)."""
    sym = r == n
    best = None
    for bm, bk, warps, stages, step in _gram_fwd_candidates(dtype):
        tn = triton.cdiv(n, bm)
        tiles = tn * (tn + 1) // 2 if sym else triton.cdiv(r, bm) * tn
        ksteps = triton.cdiv(d, bk)
        split, cost = _pick_split(tiles, ksteps, sms, 2 * bm * bm * 4)
        if best is None or cost * step < best[0]:
            k_split = triton.cdiv(ksteps, split) * bk
            best = (cost * step, _GramPlan(bm, bk, warps, stages, triton.cdiv(d, k_split),
                                           k_split, tiles, sym))
    return best[1]


def _gram_bwd_cfg(dtype: torch.dtype) -> dict:
    if INTERPRETER:
        return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=1)
    if _big(dtype):
        return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    return dict(BM=64, BN=64, BK=16 if dtype == torch.float64 else 32, num_warps=4, num_stages=2)


def _gram_bwd_final_cfg(r: int, dtype: torch.dtype) -> dict:
    """Gram backward in one launch when a single row tile (BM >= R) holds the batch."""
    bm = max(16, triton.next_power_of_2(r))
    if INTERPRETER:
        return dict(BM=bm, BN=64, BK=64, num_warps=4, num_stages=1)
    if _big(dtype):
        if bm >= 128:
            return dict(BM=bm, BN=64, BK=64, num_warps=8, num_stages=3)
        return dict(BM=bm, BN=128, BK=64, num_warps=4, num_stages=3)
    bk = 16 if dtype == torch.float64 else 32
    return dict(BM=bm, BN=32 if bm >= 128 else 64, BK=bk, num_warps=8 if bm >= 128 else 4,
                num_stages=2)


def _cross_cfg(dtype: torch.dtype) -> dict:
    if INTERPRETER:  # fewer, larger programs: the interpreter pays per program, numpy does not
        return dict(B=128, BK=64, num_warps=4, num_stages=1)
    if _big(dtype):
        return dict(B=128, BK=32, num_warps=8, num_stages=3)
    return dict(B=64, BK=16 if dtype == torch.float64 else 32, num_warps=4, num_stages=2)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Every buffer of this module comes from here (tests poison it to catch unwritten outputs)."""
    return torch.empty(shape, device=device, dtype=dtype)


_STAGE_CAP: Dict[object, int] = {}
#: set (with the reason) when a 3xTF32 dot did not compile here: IEEE dots from then on
_TF32X3_FAILED: Dict[str, str] = {}


def _launch(kernel, grid, *args, num_warps: int, num_stages: int, **constexprs) -> None:
    """Launch, stepping num_stages down (and remembering the cap for this kernel) if the compiled
    kernel needs more shared memory than the device has. Tile sizes, hence grids and buffers,
    never change. Kept cheap: at N=256 the whole op is a few launches long.

    A kernel whose dots are 3xTF32 (``_FP32_MODE_DOTS``) that this Triton or GPU cannot compile
    is run with IEEE fp32 dots instead, for the rest of the process, with one warning: slower,
    as accurate (compile_check.py compiles it for sm_90 with the Triton of CI; a GPU with
    another Triton must not lose the op over it)."""
    if constexprs.get("PREC") == "tf32x3" and _TF32X3_FAILED:
        constexprs["PREC"] = "ieee"
    stages = min(num_stages, _STAGE_CAP.get(kernel, num_stages))
    while True:
        try:
            kernel[grid](*args, num_warps=num_warps, num_stages=stages, **constexprs)
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _STAGE_CAP[kernel] = stages
        except Exception as e:  # noqa: BLE001 - only a 3xTF32 compile failure is handled
            if constexprs.get("PREC") != "tf32x3":
                raise
            import warnings
            _TF32X3_FAILED["reason"] = f"{type(e).__name__}: {str(e)[:300]}"
            warnings.warn(f"{_OP}: 3xTF32 dots did not compile here ({_TF32X3_FAILED['reason']});"
                          " using IEEE fp32 dots instead (slower, as accurate)", RuntimeWarning,
                          stacklevel=3)
            constexprs["PREC"] = "ieee"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    """Where this process's rows sit in the global batch."""
    group: object = None
    world: int = 1
    rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _resolve_group(group) -> _Dist:
    import torch.distributed as dist
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{_OP}: group was given but torch.distributed is not initialised")
    elif not (dist.is_available() and dist.is_initialized()):
        return _Dist()
    world = dist.get_world_size(group)
    if world <= 1:
        return _Dist(group, 1, 0)
    return _Dist(group, world, dist.get_rank(group))


def _all_gather_rows(z: torch.Tensor, dd: _Dist) -> torch.Tensor:
    import torch.distributed as dist
    out = z.new_empty((dd.world * z.shape[0], z.shape[1]))
    dist.all_gather(list(out.chunk(dd.world)), z, group=dd.group)  # writes into the views
    return out


def _check_dist_shapes(z: torch.Tensor, dd: _Dist) -> None:
    import torch.distributed as dist
    mine = torch.tensor([z.shape[0], z.shape[1]], dtype=torch.int64, device=z.device)
    got = [torch.empty_like(mine) for _ in range(dd.world)]
    dist.all_gather(got, mine, group=dd.group)
    shapes = [tuple(t.tolist()) for t in got]  # host sync: acceptable once per step under DDP
    if len(set(shapes)) != 1:
        raise ValueError(f"{_OP}: every rank must pass the same N x D shape, got {shapes} "
                         "(use drop_last=True in the sampler)")


def _flops(method: str, n: int, r: int, d: int, need: Tuple[bool, bool] = (True, True)) -> float:
    """Flops of this implementation: the forward and the backward of each side in need."""
    sides = sum(map(bool, need))
    if method == "gram":
        fwd = 2 * n * n * d if r == n else 4 * r * n * d       # symmetric tiles once
        return fwd + sides * 2 * r * n * d
    return 2 * n * d * d + sides * (2 * n * d * d + 2 * r * d * d)  # each side's panels recompute C


@functools.lru_cache(maxsize=None)
def choose_method(n: int, d: int, rows: Optional[int] = None,
                  need: Tuple[bool, bool] = (True, True)) -> str:
    """The method "auto" picks: the one with fewer flops in this implementation.

    ``need``: the gradients the backward will compute ((False, False): no backward, e.g. under
    torch.no_grad). Single process that is "gram" iff N <= (5/3) D with both gradients (gram:
    2 N^2 D forward with symmetric tiles + 2 N^2 D backward per side; cross: 2 N D^2 forward +
    per side 2 N D^2 recomputing C in the backward panels + 2 N D^2 backward), N <= 1.5 D with
    one, N <= D with none. Under DDP with ``rows`` per rank, the per-rank counts (every rank
    must then pass the same ``need``, as it must the same shapes).
    """
    r = n if rows is None else rows
    return ("gram" if _flops("gram", n, r, d, need) <= _flops("cross", n, r, d, need)
            else "cross")


@dataclass
class _State:
    """What the backward needs; built by barlow_twins_fwd."""
    method: str
    lambd: float
    scale: float
    dist: _Dist
    z1: torch.Tensor               # global batch (this process's inputs when not distributed)
    z2: torch.Tensor
    rows: int                      # this rank's rows
    row0: int
    mean: torch.Tensor             # [2, D]
    rstd: torch.Tensor             # [2, D]
    d: torch.Tensor                # [D]
    pr: _Precision
    ab: Optional[torch.Tensor] = None                     # [2, N, D] BN(z1), BN(z2), if kept
    gram: Optional[List[Optional[torch.Tensor]]] = None   # [G_a, G_b], released by backward
    gdiag: Optional[torch.Tensor] = None                  # [2, R] diagonals of G_a, G_b
    split_diag: bool = True                               # G stored without its diagonal
    s2: Optional[torch.Tensor] = None                     # cross: [2, D]
    extra: dict = field(default_factory=dict)


def _stats(z1, z2, lambd, scale, eps, pr: _Precision, part, ab):
    """Batch statistics, d, cdiv(D, 64) loss partials into part, and a, b into ab[0], ab[1]."""
    n, d = z1.shape
    mean = _empty((2, d), z1.device, pr.torch_acc)
    rstd = _empty((2, d), z1.device, pr.torch_acc)
    dvec = _empty(d, z1.device, pr.torch_acc)
    write = n <= _STATS_WRITE_MAX_ROWS
    _launch(_bt_stats_kernel, (triton.cdiv(d, _STATS_BLOCK_D),), z1, z2, mean, rstd, dvec, part,
            ab[0], ab[1], n, d, eps, lambd, scale, WRITE=write, BLOCK_N=64,
            BLOCK_D=_STATS_BLOCK_D, ACC=pr.acc, EMU_BF16=pr.emu_bf16, num_warps=4, num_stages=2)
    if not write:
        _normalize(z1, z2, mean, rstd, ab[0], ab[1], (0, 1), pr)
    return mean, rstd, dvec


def _normalize(z1, z2, mean, rstd, out_a, out_b, sides, pr: _Precision) -> None:
    """out_a = BN(z1) (side 0) and / or out_b = BN(z2) (side 1), all rows, in the input dtype."""
    n, d = z1.shape
    bm, bn = _EW_BLOCK
    _launch(_bt_normalize_kernel, (triton.cdiv(n, bm), triton.cdiv(d, bn), len(sides)), z1, z2,
            mean, rstd, out_a, out_b, n, d, sides[0], BM=bm, BN=bn, ACC=pr.acc,
            EMU_BF16=pr.emu_bf16, num_warps=4, num_stages=1)


def _reuse_ab(n: int, d: int, dtype: torch.dtype, pr: _Precision) -> bool:
    """Gram, single process, N > _FINAL_MAX_ROWS: keep the forward's [2, N, D] a, b until the
    backward and use them as its K-loop operands *and* as the dz1, dz2 buffers (the gradient of a
    column chunk overwrites it after the chunk's last read, as for the recomputed copy). Saves the
    backward's BatchNorm launches; costs holding a, b (the size of dz1 + dz2) from the forward to
    the backward, and a backward peak higher by one G (dz2 exists while G_b does). Taken only
    while that G is at most 1/8 of a gradient (N <= D / 8 for 16-bit G): at D = 8192, N <= 1024."""
    return 8 * n * n * pr.gstore.itemsize <= n * d * dtype.itemsize


def _normalized(st: _State) -> torch.Tensor:
    """[2, N, D] BN(z1), BN(z2): the forward's if it was kept, else recomputed."""
    if st.ab is not None:
        return st.ab
    n, d = st.z1.shape
    ab = _empty((2, n, d), st.z1.device, st.pr.operand)
    _normalize(st.z1, st.z2, st.mean, st.rstd, ab[0], ab[1], (0, 1), st.pr)
    return ab


def _gram_fwd(st: _State, ab: torch.Tensor, part: Optional[torch.Tensor] = None):
    """G_a / gscale, G_b / gscale of this rank's rows (zero diagonal when st.split_diag) and
    their diagonals ([2, R], accumulator dtype); per-tile loss partials into part."""
    pr = st.pr
    n, d = st.z1.shape
    r = st.rows
    dev = st.z1.device
    plan = _gram_fwd_plan(n, r, d, pr.operand, _sm_count(dev))
    ga = _empty((r, n), dev, pr.gstore)
    gb = _empty((r, n), dev, pr.gstore)
    gdiag = _empty((2, r), dev, pr.torch_acc)
    if part is None:
        part = _empty(plan.tiles, dev, pr.torch_acc)
    coef = st.scale * st.lambd / (n * n)
    inv_gscale = 1.0 / d if pr.gscale else 1.0
    consts = dict(SYM=plan.sym, EVEN_K=d % plan.bk == 0, BM=plan.bm, BK=plan.bk, OP=pr.op,
                  UPCAST=pr.upcast, ACC=pr.acc, PREC=pr.prec, SPLIT_DIAG=st.split_diag,
                  EMU_BF16=pr.emu_bf16)
    if plan.split == 1:
        _launch(_bt_gram_fwd_kernel, (plan.tiles, 1), ab[0], ab[1], ga, gb, gdiag[0], gdiag[1],
                part, r, n, d, st.row0, plan.k_split, plan.tiles, coef, inv_gscale, SPLIT=False,
                num_warps=plan.warps, num_stages=plan.stages, **consts)
    else:
        partial = _empty((plan.split, plan.tiles, 2, plan.bm, plan.bm), dev, pr.torch_acc)
        _launch(_bt_gram_fwd_kernel, (plan.tiles, plan.split), ab[0], ab[1], ga, gb, gdiag[0],
                gdiag[1], partial, r, n, d, st.row0, plan.k_split, plan.tiles, coef, inv_gscale,
                SPLIT=True, num_warps=plan.warps, num_stages=plan.stages, **consts)
        _launch(_bt_gram_reduce_kernel, (plan.tiles,), partial, ga, gb, gdiag[0], gdiag[1], part,
                r, n, st.row0, plan.tiles, plan.split, coef, inv_gscale, SYM=plan.sym, BM=plan.bm,
                ACC=pr.acc, SPLIT_DIAG=st.split_diag, EMU_BF16=pr.emu_bf16, num_warps=4,
                num_stages=1)
        del partial
    st.extra["gram_split"] = plan.split
    return ga, gb, gdiag


def _cross_fwd(st: _State, ab: torch.Tensor):
    pr = st.pr
    n, d = st.z1.shape
    cfg = _cross_cfg(pr.operand)
    b = cfg["B"]
    t = triton.cdiv(d, b)
    dev = st.z1.device
    part = _empty(t * t, dev, pr.torch_acc)
    rowp = _empty((t, d), dev, pr.torch_acc)
    colp = _empty((t, d), dev, pr.torch_acc)
    st.extra["exact_diag"] = _CROSS_EXACT_DIAG  # the backward uses the forward's choice
    _launch(_bt_cross_tile_kernel, (t, t), ab[0], ab[1], part, rowp, colp, st.d, n, d, 0, d,
            st.lambd, st.scale, MODE=0, EVEN_N=n % cfg["BK"] == 0, BI=b, BJ=b, BK=cfg["BK"],
            OP=pr.op, UPCAST=pr.upcast, ACC=pr.acc, PREC=pr.prec, EXACT_DIAG=_CROSS_EXACT_DIAG,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return part, rowp, colp


def barlow_twins_fwd(z1: torch.Tensor, z2: torch.Tensor, lambd: float, scale: float, eps: float,
                     method: str, group=None, grad_precision: Optional[str] = None,
                     keep_for_backward: bool = True,
                     need: Tuple[bool, bool] = (True, True)) -> Tuple[torch.Tensor, _State]:
    """Forward launcher: validated inputs in, (fp32 loss, state for barlow_twins_bwd) out.

    grad_precision (16-bit inputs only): "input" stores G_a, G_b in the input dtype and runs the
    backward Gram dots on 16-bit operands; "tf32" stores them in fp32 and runs tf32 dots (more
    accurate when the views are strongly correlated, slower: docs/performance.md); "fp32" makes
    a, b and G fp32 and every dot 3xTF32 (``_FP32_MODE_DOTS``; the gradient is then as accurate
    as its own rounding to the input dtype; several times the GPU time of the 16-bit dots).
    None (default): "fp32" up to _FP32_MAX_ROWS (256) rows of the global batch, where the op
    is launch bound and the fp32 dots cost no wall time, "input" above.
    need: which gradients the backward will be asked for (both: the forward's a, b may become the
    gradient buffers, see _reuse_ab)."""
    dd = _resolve_group(group)
    z1 = z1.contiguous()
    z2 = z2.contiguous()
    rows = z1.shape[0]
    if dd.active:
        _check_dist_shapes(z1, dd)
        z1g, z2g, row0 = _all_gather_rows(z1, dd), _all_gather_rows(z2, dd), dd.rank * rows
    else:
        z1g, z2g, row0 = z1, z2, 0
    n, d = z1g.shape
    dev = z1.device
    if method == "auto":
        method = choose_method(n, d, rows, tuple(map(bool, need)))
    if grad_precision is None and z1.dtype in (torch.bfloat16, torch.float16):
        # small batches are launch bound (docs/performance.md): fp32 operands cost no wall time
        # there and keep the correlated-view gradient at the output's own rounding
        grad_precision = "fp32" if n <= _FP32_MAX_ROWS else "input"
    pr = _precision(z1.dtype, grad_precision)
    ns = triton.cdiv(d, _STATS_BLOCK_D)
    # one buffer for every loss partial: the loss is a single sum over it
    gtiles = _gram_fwd_plan(n, rows, d, pr.operand, _sm_count(dev)).tiles if method == "gram" else 0
    parts = _empty(ns + gtiles, dev, pr.torch_acc)
    ab = _empty((2, n, d), dev, pr.operand)  # a = BN(z1), b = BN(z2): the GEMM operands
    mean, rstd, dvec = _stats(z1g, z2g, lambd, scale, eps, pr, parts, ab)
    st = _State(method, lambd, scale, dd, z1g, z2g, rows, row0, mean, rstd, dvec, pr,
                split_diag=_SPLIT_DIAG)
    if method == "gram":
        ga, gb, gdiag = _gram_fwd(st, ab, parts[ns:])
        if dd.active:
            import torch.distributed as dist
            mine = parts[ns:].sum()
            dist.all_reduce(mine, group=dd.group)
            loss = parts[:ns].sum() + mine
        else:
            loss = parts.sum()
        if keep_for_backward:
            st.gram = [ga, gb]
            st.gdiag = gdiag
            if not dd.active and rows <= _FINAL_MAX_ROWS:
                st.ab = ab  # small: the one-kernel backward reads it (otherwise recomputed)
            elif (not dd.active and all(need) and pr.operand == z1.dtype
                  and _reuse_ab(n, d, z1.dtype, pr)):
                st.ab = ab  # becomes dz1, dz2 (already normalised: no backward BN launch)
                st.extra["ab_as_dz"] = True
    else:
        cpart, rowp, colp = _cross_fwd(st, ab)
        loss = cpart.sum()  # the tiles hold the whole loss, the diagonal included
        if keep_for_backward:
            st.s2 = torch.stack((rowp.sum(0), colp.sum(0)))
            st.ab = ab
    return loss, st


def _gram_bwd(st: _State, gl: torch.Tensor, need: Tuple[bool, bool], out_dtype: torch.dtype):
    pr = st.pr
    z1, z2 = st.z1, st.z2
    n, d = z1.shape
    r = st.rows
    dev = z1.device
    if st.gram is None:  # a second backward through a retained graph: recompute the grams
        ga, gb, st.gdiag = _gram_fwd(st, _normalized(st))
        st.gram = [ga, gb]
    gram, gdiag = st.gram, st.gdiag
    st.gram = st.gdiag = None  # released below as soon as each is no longer needed
    c_diag = st.scale / n
    c_off = 2.0 * st.scale * st.lambd / (n * n)
    gscale = float(d) if pr.gscale else 1.0
    gl = gl.reshape(()).to(pr.torch_acc).contiguous()
    sides = [s for s in (0, 1) if need[s]]
    dz: List[Optional[torch.Tensor]] = [None, None]
    common = dict(GOP=pr.gop, UPCAST=pr.gupcast, ACC=pr.acc, PREC=pr.gprec,
                  SPLIT_DIAG=st.split_diag, EMU_TF32=pr.gemu_tf32, EMU_BF16=pr.emu_bf16)
    if not st.dist.active and r <= _FINAL_MAX_ROWS:
        # small batch: one row tile covers it, the kernel finishes dz itself (one launch)
        ab = _normalized(st)
        st.ab = None
        cfg = _gram_bwd_final_cfg(r, pr.operand)
        for s in sides:
            dz[s] = _empty((r, d), dev, out_dtype)
        out1 = dz[0] if dz[0] is not None else dz[1]
        out2 = dz[1] if dz[1] is not None else dz[0]
        _launch(_bt_gram_bwd_kernel, (1, triton.cdiv(d, cfg["BN"]), len(sides)), z1, z2, ab[0],
                ab[1], st.mean, st.rstd, st.d, gram[0], gram[1], gdiag[0], gdiag[1], gl, out1,
                out1, out1, out2, r, n, d, st.row0, 0, d, sides[0], 1, c_diag, c_off, st.lambd,
                gscale, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], FINAL=True,
                EVEN_N=n % cfg["BK"] == 0, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], **common)
        return dz
    cfg = _gram_bwd_cfg(pr.operand)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    tr = triton.cdiv(r, bm)
    esize = 8 if pr.torch_acc == torch.float64 else 4
    if len(sides) * r * d * esize <= _SCRATCH_BOTH_BYTES:
        groups, dc = [sides], d
    else:
        groups = [[s] for s in sides]
        dc = max(bn, (_SCRATCH_BYTES // (r * esize)) // bn * bn)
        dc = min(dc, triton.cdiv(d, bn) * bn)
    s2 = _empty((2, tr, d), dev, pr.torch_acc)
    if st.dist.active:
        s2.zero_()  # summed over all row tiles, chunk by chunk, before the all-reduce
    scratch = _empty((len(groups[0]), r, dc), dev, pr.torch_acc)
    xbuf: List[Optional[torch.Tensor]] = [None, None]
    reuse = st.extra.pop("ab_as_dz", False) and st.ab is not None
    if reuse and out_dtype != st.ab.dtype:  # gradients wanted wider than the operands
        reuse, st.ab = False, None

    def alloc(grp):  # dz2 is allocated only once G_b is released: it takes its place
        for s in grp:
            dz[s] = _empty((r, d), dev, out_dtype)
            # the K-loop operand BN(z) of every row: single process, it lives in the gradient's
            # own buffer (a column chunk of it is overwritten only after its last read)
            # (not when the operands are wider than the gradient: "fp32" for 16-bit inputs)
            own = st.dist.active or pr.operand != out_dtype
            xbuf[s] = _empty((n, d), dev, pr.operand) if own else dz[s]

    if reuse:  # the forward's a, b: normalised already, and they become dz1, dz2
        ab, st.ab = st.ab, None
        for s in sides:
            dz[s] = xbuf[s] = ab[s]
        del ab
    else:
        alloc(groups[0])
        _normalize(z1, z2, st.mean, st.rstd, xbuf[groups[0][0]], xbuf[groups[0][-1]], groups[0],
                   pr)
    fb, fbn = _EW_BLOCK
    for gi, grp in enumerate(groups):
        side0, ns = grp[0], len(grp)
        ga = gram[0] if gram[0] is not None else gram[1]
        gb = gram[1] if gram[1] is not None else gram[0]
        xa = xbuf[0] if xbuf[0] is not None else xbuf[1]
        xb = xbuf[1] if xbuf[1] is not None else xbuf[0]
        out1 = dz[0] if dz[0] is not None else dz[1]
        out2 = dz[1] if dz[1] is not None else dz[0]
        for col0 in range(0, d, dc):
            ncols = min(dc, d - col0)
            _launch(_bt_gram_bwd_kernel, (tr, triton.cdiv(ncols, bn), ns), z1, z2, xa, xb,
                    st.mean, st.rstd, st.d, ga, gb, gdiag[0], gdiag[1], gl, scratch, s2, out1,
                    out2, r, n, d, st.row0, col0, dc, side0, tr, c_diag, c_off, st.lambd, gscale,
                    BM=bm, BN=bn, BK=bk, FINAL=False, EVEN_N=n % bk == 0,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
            if st.dist.active:
                import torch.distributed as dist
                red = s2[:, :, col0:col0 + ncols].sum(1)
                dist.all_reduce(red, group=st.dist.group)
                s2[:, 0, col0:col0 + ncols] = red
                s2_arg, n_parts = s2[:, :1].contiguous(), 1
            else:
                s2_arg, n_parts = s2, tr
            nxt = None
            if not reuse and col0 + dc >= d and gi + 1 < len(groups):
                nxt = groups[gi + 1]
            nrm, nrm_side, grid_r, grid_c = out1, 0, triton.cdiv(r, fb), triton.cdiv(ncols, fbn)
            if nxt is not None:
                # the last chunk of this side: the next side's BN(z) rides on its finalize launch
                ga = gb = xa = xb = None
                if grp == [0]:
                    gram[1] = None  # G_b is only read for dz1: free it before dz2 is allocated
                alloc(nxt)
                nrm, nrm_side = xbuf[nxt[0]], nxt[0]
                grid_r, grid_c = triton.cdiv(max(r, n), fb), triton.cdiv(d, fbn)
            _launch(_bt_gram_finalize_kernel, (grid_r, grid_c, ns + (nxt is not None)),
                    z1, z2, st.mean, st.rstd, scratch, s2_arg, out1, out2, nrm, r, n, d, st.row0,
                    col0, dc, side0, n_parts, ns, nrm_side, BM=fb, BN=fbn, ACC=pr.acc,
                    EMU_BF16=pr.emu_bf16, num_warps=4, num_stages=1)
        if grp == [0]:
            gram[1] = None
    return dz


def _cross_bwd(st: _State, gl: torch.Tensor, need: Tuple[bool, bool], out_dtype: torch.dtype):
    pr = st.pr
    z1, z2 = st.z1, st.z2
    n, d = z1.shape
    r = st.rows
    dev = z1.device
    ab = _normalized(st)
    cfg = _cross_cfg(pr.operand)
    b, bk = cfg["B"], cfg["BK"]
    esize = 8 if pr.torch_acc == torch.float64 else 4
    p = max(b, (_PANEL_BYTES // (d * esize)) // b * b)
    p = min(p, triton.cdiv(d, b) * b)
    panel = _empty((p, d), dev, pr.torch_acc)
    gl = gl.reshape(()).to(pr.torch_acc).contiguous()
    dz = [None, None]
    for side in (0, 1):
        if not need[side]:
            continue
        x, y, xn, yn = (z1, z2, ab[0], ab[1]) if side == 0 else (z2, z1, ab[1], ab[0])
        out = _empty((r, d), dev, out_dtype)
        s2 = st.s2[side].contiguous()
        for i0 in range(0, d, p):
            i_hi = min(d, i0 + p)
            _launch(_bt_cross_tile_kernel, (triton.cdiv(i_hi - i0, b), triton.cdiv(d, b)), xn, yn,
                    panel, panel, panel, st.d, n, d, i0, i_hi, st.lambd, st.scale, MODE=1,
                    EVEN_N=n % bk == 0, BI=b, BJ=b, BK=bk, OP=pr.op, UPCAST=pr.upcast,
                    ACC=pr.acc, PREC=pr.prec, EXACT_DIAG=st.extra.get("exact_diag", True),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            _launch(_bt_cross_grad_kernel, (triton.cdiv(r, b), triton.cdiv(i_hi - i0, b)), x, y,
                    st.mean, st.rstd, side, panel, s2, gl, out, r, n, d, st.row0, i0, i_hi,
                    2.0 * st.scale, BM=b, BN=b, BK=bk, GOP=pr.cop,
                    ACC=pr.acc, PREC="ieee", EMU_BF16=pr.emu_bf16, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])
        dz[side] = out
    st.ab = None
    return dz


def barlow_twins_bwd(st: _State, grad_loss: torch.Tensor, need: Tuple[bool, bool] = (True, True),
                     grad_dtype: Optional[torch.dtype] = None):
    """Backward launcher: (dL/dz1, dL/dz2) for this process's rows, in the input dtype (or in
    grad_dtype: the CUDA-graph path keeps its grad_loss = 1 gradients in fp32, see
    _loss_and_grads)."""
    out_dtype = grad_dtype or st.z1.dtype
    if st.method == "gram":
        return _gram_bwd(st, grad_loss, need, out_dtype)
    return _cross_bwd(st, grad_loss, need, out_dtype)


# ----------------------------------------------------------------------------------------------
# Validation, autograd, public API
# ----------------------------------------------------------------------------------------------


def _validate(z1, z2, lambd, scale, eps, method, group=None) -> None:
    check_float(_OP, "z1", z1)
    check_float(_OP, "z2", z2)
    if z1.dtype != z2.dtype:
        raise TypeError(f"{_OP}: z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.dim() != 2 or z2.dim() != 2:
        raise ValueError(f"{_OP}: z1 and z2 must be 2-D (N x D), got shapes {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"{_OP}: z1 and z2 must have the same shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    if z1.shape[0] < 2 and z1.shape[0] * _resolve_group(group).world < 2:
        # the statistics are over the global batch: one row per rank is enough under DDP
        raise ValueError(f"{_OP}: batch statistics need N >= 2 rows (over all ranks), got "
                         f"N = {z1.shape[0]}")
    if z1.shape[1] < 1:
        raise ValueError(f"{_OP}: need D >= 1 features, got D = {z1.shape[1]}")
    _check_hparams(lambd, scale, eps, method)
    check_triton_device(_OP, z1, z2)


def _check_hparams(lambd, scale, eps, method) -> None:
    if method not in METHODS:
        raise ValueError(f"{_OP}: unknown method {method!r}; valid: {', '.join(METHODS)}")
    for name, val in (("lambd", lambd), ("scale", scale), ("eps", eps)):
        # any real number (Python, NumPy); not a tensor: the kernels take host scalars
        if not isinstance(val, numbers.Real) or isinstance(val, bool):
            raise TypeError(f"{_OP}: {name} must be a real number (int or float), got "
                            f"{type(val).__name__} {val!r}")
        if not math.isfinite(val):
            raise ValueError(f"{_OP}: {name} must be finite, got {val!r}")
    if eps < 0:
        raise ValueError(f"{_OP}: eps must be >= 0, got {eps}")


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one when it is not."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class _BarlowTwinsLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, lambd, scale, eps, method, group, grad_enabled):
        # grad mode is off inside forward and needs_input_grad ignores it: the caller's mode
        need = tuple(bool(x) and grad_enabled for x in ctx.needs_input_grad[:2])
        keep = any(need)
        with _on_device(z1.device):
            loss, st = barlow_twins_fwd(z1, z2, float(lambd), float(scale), float(eps), method,
                                        group, keep_for_backward=keep, need=need)
        ctx.state = st
        if keep:  # autograd's version counters: z changed in place after this call is an error
            ctx.save_for_backward(z1, z2)
        return loss

    @staticmethod
    @once_differentiable  # the launchers build no graph: a double backward must raise
    def backward(ctx, grad_loss):
        ctx.saved_tensors  # raises when z1 or z2 was modified in place since the forward
        st = ctx.state
        need = tuple(bool(x) for x in ctx.needs_input_grad[:2])
        with _on_device(st.z1.device):
            dz1, dz2 = barlow_twins_bwd(st, grad_loss, need)
        return dz1, dz2, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# CUDA graphs (opt-in): the whole op replayed from one graph per input address
# ----------------------------------------------------------------------------------------------


class _CudaGraphs:
    """Capture backend. ``capture(fn, z1, z2)`` records the launches of ``fn(z1, z2)`` in a
    torch.cuda.CUDAGraph without running them and returns (replay, outputs of fn);
    ``replay(z1, z2)`` (which keeps the graph and its memory pool alive) reruns them on the tensors at the captured addresses (the arguments are
    for backends that cannot read by address: the CPU tests' fake). Holds no reference to the
    inputs, so that later tensors at the same addresses can match."""

    def __init__(self):
        self.streams: Dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def usable(z: torch.Tensor) -> bool:
        return z.is_cuda and not torch.cuda.is_current_stream_capturing()

    def capture(self, fn, z1, z2):
        """CUDAGraph.capture_begin / capture_end on a side stream, not ``torch.cuda.graph``:
        that context synchronises the device and empties the caching allocator's cache, which
        in the middle of a training step would move later tensors (the next steps' z among
        them) to new addresses, where no graph would match."""
        dev = z1.device
        cur = torch.cuda.current_stream(dev)
        side = self.streams.get(dev)
        if side is None:
            side = self.streams[dev] = torch.cuda.Stream(dev)
        side.wait_stream(cur)  # the inputs are ready before anything captured would read them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            # thread_local: another thread's CUDA calls (a loader's pin-memory thread) must not
            # invalidate this capture, which records only this thread's launches
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = fn(z1, z2)
            finally:
                graph.capture_end()
        cur.wait_stream(side)
        loss, dz = out
        for t in (loss, *dz):  # read on the current stream after each replay
            t.record_stream(cur)
        return (lambda a, b: graph.replay()), out


@dataclass
class _Captured:
    replay: object                     # (z1, z2) -> None: recompute loss and dz in place
    loss: torch.Tensor                 # static fp32 loss
    dz: Tuple[torch.Tensor, torch.Tensor]   # static dL/dz1, dL/dz2 at grad_loss = 1
    owner: Optional[object] = None     # token of the forward whose results dz holds


class _GraphCache:
    """Graphs keyed by the inputs' addresses, layout and the op's settings.

    A graph reads z1 and z2 at the addresses it was captured with, so it is replayed only for
    inputs at those addresses (in training the caching allocator hands each block's projector
    output the same address step after step). An address is captured the second time it is
    seen (the first call runs eagerly and compiles the kernels); at most ``max_graphs`` graphs
    are kept (least recently used dropped); after ``max_captures`` captures with fewer replays
    than captures the addresses evidently change every call, and graphs are switched off for
    the process with one warning, as they are when a capture fails."""

    def __init__(self, max_graphs: int = 8, max_captures: int = 32):
        self.max_graphs, self.max_captures = max_graphs, max_captures
        self.graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self.seen: Dict[tuple, int] = {}
        self.captures = self.replays = 0
        self.disabled: Optional[str] = None
        self.backend = _CudaGraphs()

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.captures = self.replays = 0
        self.disabled = None

    def lookup(self, key: tuple) -> Optional[_Captured]:
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            self.replays += 1
        return entry

    def want_capture(self, key: tuple) -> bool:
        if self.disabled is not None:
            return False
        if len(self.seen) > 1024:
            self.seen.clear()
        self.seen[key] = self.seen.get(key, 0) + 1
        return self.seen[key] >= 2

    def capture(self, key: tuple, fn, z1, z2) -> Optional[_Captured]:
        if self.captures >= self.max_captures and self.replays < self.captures:
            return self._switch_off(f"{self.captures} graphs captured but only {self.replays} "
                                    "replayed: the inputs' addresses change from call to call")
        try:
            replay, (loss, dz) = self.backend.capture(fn, z1, z2)
        except Exception as e:  # e.g. an op that cannot be captured: run directly from now on
            return self._switch_off(f"capture failed ({type(e).__name__}: {e})")
        self.captures += 1
        entry = _Captured(replay, loss, (dz[0], dz[1]))
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry

    def _switch_off(self, why: str) -> None:
        import warnings
        self.disabled = why
        self.graphs.clear()
        warnings.warn(f"{_OP}(cuda_graphs=True): CUDA graphs switched off for this process, "
                      f"{why}; running the launchers directly", RuntimeWarning, stacklevel=5)
        return None


_GRAPHS = _GraphCache()
_ONES: Dict[torch.device, torch.Tensor] = {}


def _loss_and_grads(z1, z2, lambd, scale, eps, method):
    """Loss and both gradients at grad_loss = 1, forward and backward launchers back to back.
    The gradients are fp32 for 16-bit inputs: stored in fp16 at grad_loss = 1 they would
    underflow (GradScaler's grad_loss of 2^16 then multiplies zeros and subnormals) or overflow
    to inf where grad_loss * dz is finite; the backward rounds grad_loss * dz once instead."""
    one = _ONES.get(z1.device)
    if one is None:
        one = _ONES[z1.device] = torch.ones((), device=z1.device, dtype=torch.float32)
    loss, st = barlow_twins_fwd(z1, z2, lambd, scale, eps, method)
    dz = barlow_twins_bwd(st, one, grad_dtype=torch.promote_types(z1.dtype, torch.float32))
    return loss, (dz[0], dz[1])


def _graph_key(z1, z2, lambd, scale, eps, method) -> tuple:
    return (z1.data_ptr(), z2.data_ptr(), tuple(z1.shape), z1.stride(), z2.stride(), z1.dtype,
            z1.device, lambd, scale, eps, method)


def _graphs_usable(z1, z2, group) -> bool:
    return (z1.requires_grad and z2.requires_grad and torch.is_grad_enabled()
            and z1.is_contiguous() and z2.is_contiguous() and group is None
            and not _resolve_group(None).active
            and _GRAPHS.backend.usable(z1))


class _GraphedLossFn(torch.autograd.Function):
    """The loss with its gradients computed in the forward (one graph replay), scaled by
    grad_loss in the backward. A backward whose forward's results were overwritten by a later
    replay of the same graph recomputes them directly (correct in any call order)."""

    @staticmethod
    def forward(ctx, z1, z2, lambd, scale, eps, method):
        key = _graph_key(z1, z2, lambd, scale, eps, method)
        entry = _GRAPHS.lookup(key)
        if entry is None and _GRAPHS.want_capture(key):
            fn = functools.partial(_loss_and_grads, lambd=lambd, scale=scale, eps=eps,
                                   method=method)
            entry = _GRAPHS.capture(key, fn, z1, z2)
        ctx.save_for_backward(z1, z2)
        ctx.hparams = (lambd, scale, eps, method)
        if entry is None:  # not captured (first sight of these addresses): run directly
            loss, ctx.dz = _loss_and_grads(z1, z2, lambd, scale, eps, method)
            ctx.entry = ctx.token = None
            return loss
        entry.replay(z1, z2)
        ctx.entry, ctx.token, ctx.dz = entry, object(), None
        entry.owner = ctx.token
        return entry.loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        z1, z2 = ctx.saved_tensors
        if ctx.entry is None:
            dz = ctx.dz
        elif ctx.entry.owner is ctx.token:
            dz = ctx.entry.dz
        else:  # a later forward replayed this graph: its dz are not ours
            _, dz = _loss_and_grads(z1, z2, *ctx.hparams)
        # fp32 dz (16-bit inputs: _loss_and_grads) times grad_loss, rounded once to z's dtype
        # (one multiply per side that writes z's dtype: no separate cast launch)
        out = [torch.mul(d, grad_loss, out=torch.empty_like(d, dtype=z.dtype))
               for d, z in zip(dz, (z1, z2))]
        return out[0], out[1], None, None, None, None


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051,
                      scale: float = 1.0, eps: float = 1e-5, method: str = "auto",
                      group=None, cuda_graphs: bool = False) -> torch.Tensor:
    """Fused Barlow Twins loss; equals ``barlow_twins_loss_ref(z1, z2, lambd, scale, eps)``.

    Args:
        z1, z2: N x D embeddings of the two views (fp32, bf16, fp16; fp64 for gradcheck), same
            dtype, shape and device; CUDA, or CPU under ``TRITON_INTERPRET=1``.
        lambd: weight of the off-diagonal (redundancy reduction) term.
        scale: multiplies the whole loss.
        eps: BatchNorm epsilon (biased batch variance, no affine).
        method: "gram" (N x N form), "cross" (D x D form, tiled: no D x D buffer) or "auto" (the
            one with fewer flops here, the backward counted for the gradients that will be
            computed: none under torch.no_grad; see :func:`choose_method`).
        group: a torch.distributed process group. Default: the world group when torch.distributed
            is initialised. With more than one rank the loss is the single-process loss over the
            concatenation of every rank's batch (rank order), identical on every rank; every rank
            must pass the same N x D.
        cuda_graphs: replay the whole op (forward and backward launchers, run together in the
            forward) from a CUDA graph per input address, to cut the per-launch host cost at
            small N (docs/performance.md). Used only on CUDA, single process (no group given
            and torch.distributed not running over several ranks), when both inputs require
            grad; otherwise, and on the first call at an address, the launchers run directly.
            The gradients are computed in the forward at grad_loss = 1 (in fp32 for 16-bit
            inputs) and multiplied by grad_loss in the backward, then rounded once to the input
            dtype. Each graph keeps its buffers (at N=256, D=8192, bf16: about 30 MiB, and
            8 MiB more for the fp32 gradients) while it is cached (at most 8).

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs). Gradients reach z1 and z2 in their dtype.
        Under DDP the gradient of this rank's z1, z2 is the gradient of the *global* loss with
        respect to this rank's rows. DDP then averages parameter gradients over ranks, so the
        parameters see dL/dtheta / world_size, as in the official Barlow Twins code; multiply the
        loss (or ``scale``) by the world size for the exact gradient of the global loss.

    Non-finite inputs: a NaN or inf anywhere in a column of z1 or z2 makes that feature's
    statistics non-finite, so the loss (and the gradients) come back non-finite (NaN); nothing
    raises inside the kernels. Check ``torch.isfinite(loss)`` as for any loss.
    """
    _validate(z1, z2, lambd, scale, eps, method, group)
    if cuda_graphs and _graphs_usable(z1, z2, group):
        with _on_device(z1.device):
            return _GraphedLossFn.apply(z1, z2, float(lambd), float(scale), float(eps), method)
    return _BarlowTwinsLossFn.apply(z1, z2, lambd, scale, eps, method, group,
                                    torch.is_grad_enabled())


class BarlowTwinsLoss(nn.Module):
    """``barlow_twins_loss`` as a module (hyper-parameters only, no weights)."""

    def __init__(self, lambd: float = 0.0051, scale: float = 1.0, eps: float = 1e-5,
                 method: str = "auto", group=None, cuda_graphs: bool = False):
        super().__init__()
        _check_hparams(lambd, scale, eps, method)  # fail at construction, not at the first step
        self.lambd = lambd
        self.scale = scale
        self.eps = eps
        self.method = method
        self.group = group
        self.cuda_graphs = bool(cuda_graphs)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z1, z2, self.lambd, self.scale, self.eps, self.method, self.group,
                                 cuda_graphs=self.cuda_graphs)

    def extra_repr(self) -> str:
        return (f"lambd={self.lambd}, scale={self.scale}, eps={self.eps}, method={self.method!r}"
                + (", cuda_graphs=True" if self.cuda_graphs else ""))
