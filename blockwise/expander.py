"""The head's expander and global pooling in one op that never stores the Cout x H x W map.

    p = pool_global(ReLU(BN_train(conv1x1(x))))        x: N x Cin x H x W  ->  p: N x Cout

The plain path (``nn.Conv2d`` + ``nn.BatchNorm2d`` + ``nn.ReLU`` + pooling) saves the conv output,
the BN output and the ReLU output for backward: 3 x N x Cout x H x W. At block 1 of ResNet-50
(256 x 56 x 56 -> 2048 x 56 x 56, batch 2 x 256) that is ~13 GiB, more than the block itself.
:class:`ExpanderPool` saves x (alive anyway: it is the block's output), the weights, the BN
statistics and a few N x Cout sums; the map is built chunk by chunk (whole images per chunk, at
most ``chunk_bytes`` of fp32 map per chunk) in forward, and rebuilt the same way in backward.

Math (M = N*H*W pixels, h = W x per pixel, W the Cout x Cin conv weight):

* BN statistics without h: mean_h = W mean_x, var_h = diag(W Sigma W^T) with Sigma the centred
  Cin x Cin covariance of x over pixels (X X^T and sum x accumulated over chunks in fp32, after
  subtracting a per-channel shift (the first chunk's mean) against cancellation). Cin^2*M flops,
  Cout/Cin times fewer than the conv. Biased variance normalises; the running variance gets the
  unbiased one, as ``nn.BatchNorm2d``.
* Forward per chunk: hhat = (h - mu) * rstd, a = gamma*hhat + beta, y = relu(a);
  avg: p = mean_pix y, saving cnt = sum_pix [a>0] and s = sum_pix hhat [a>0];
  sqrt: p = sqrt(sum_pix y^2 + eps_pool), saving sy = sum_pix y and syh = sum_pix y*hhat.
* Backward: with the per-pixel weight w (avg: gp/HW * [a>0]; sqrt: gp/p * y, 0 where p = 0),
  dbeta = sum w, dgamma = sum w*hhat come from the saved sums, and the BN reductions are
  sum dhhat = gamma*dbeta, sum dhhat*hhat = gamma*dgamma. One recompute pass then gives per chunk
  dh = rstd*(gamma*w - (gamma*dbeta + hhat*gamma*dgamma)/M), dx = W^T dh, dW += dh x^T.
  (In eval mode the statistics are constants: dh = rstd*gamma*w.)

dtypes: under autocast the two matmuls per chunk run in the autocast dtype (fp32 accumulation);
statistics, sums, the elementwise work and the output p are fp32 (fp64 for fp64 inputs).
DDP: when the BN child has been converted to ``nn.SyncBatchNorm`` (as the trainer does on CUDA)
and torch.distributed is initialised, the statistics (shift, sum x, X X^T, count) are all-reduced
over its process group in forward and (dgamma, dbeta) in backward: SyncBN semantics. The returned
gamma/beta/W gradients are the local ones, as SyncBN's (DDP averages them).

``fused=True`` (where Triton can run on x's device) does the per-chunk elementwise work and sums in
two Triton kernels (kernels/expander_pool.py) on h kept in the matmul dtype, dh written in place
into h; the torch path (the kernels' ``*_ref``) stays the reference. Not yet measured on a GPU.

The children are named "0" (conv), "1" (BN), "2" (ReLU, unused in forward) so the state dict is
the one of ``nn.Sequential(conv, bn, relu)``: a drop-in for the plain expander's parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import once_differentiable

import kernels

POOLS = ("avg", "sqrt")


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> (N*H*W) x C, a view for channels_last tensors."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _chunk_images(n: int, cout: int, hw: int, chunk_bytes: int) -> int:
    """Images per chunk: as many as fit chunk_bytes of fp32 map, at least 1."""
    return max(1, min(n, chunk_bytes // max(1, cout * hw * 4)))


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t


class _ExpanderPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gamma, beta, running_mean, running_var, use_batch_stats: bool,
                momentum: Optional[float], eps: float, pool: str, eps_pool: float, chunk_bytes: int,
                cdtype: torch.dtype, group, fused: bool):
        n, cin, hgt, wid = x.shape
        cout = weight.shape[0]
        hw = hgt * wid
        acc = torch.promote_types(cdtype, torch.float32)
        step = _chunk_images(n, cout, hw, chunk_bytes)
        w2 = weight.reshape(cout, cin)
        wc = w2.to(cdtype)
        wa = w2.to(acc)
        count = n * hw
        if use_batch_stats:
            # shift = first chunk's mean (global average under DDP) against cancellation in
            # E[xx^T] - E[x]E[x]^T
            # the statistics pass holds a Cin (not Cout) wide fp32 copy of its chunk: chunks of
            # up to chunk_bytes of that (block 1 of ResNet-50: 80 images, not 10)
            sstep = _chunk_images(n, cin, hw, chunk_bytes)
            shift = _pixels(x[:sstep]).to(acc).mean(0)
            if group is not None:
                shift = _all_reduce(shift, group) / dist.get_world_size(group)
            s1 = torch.zeros(cin, dtype=acc, device=x.device)
            s2 = torch.zeros(cin, cin, dtype=acc, device=x.device)
            for i in range(0, n, sstep):
                xp = _pixels(x[i:i + sstep]).to(acc) - shift
                s1 += xp.sum(0)
                s2 += xp.t() @ xp
            if group is not None:
                flat = torch.cat([s1, s2.flatten(), s1.new_tensor([float(count)])])
                _all_reduce(flat, group)
                s1, s2 = flat[:cin], flat[cin:cin + cin * cin].view(cin, cin)
                count = int(round(flat[-1].item()))
            d = s1 / count
            cov = s2 / count - torch.outer(d, d)
            mu = wa @ (shift + d)
            var = ((wa @ cov) * wa).sum(1).clamp_min_(0)
            if running_mean is not None:
                with torch.no_grad():
                    unbiased = var * (count / max(count - 1, 1))
                    running_mean.mul_(1 - momentum).add_(mu.to(running_mean.dtype), alpha=momentum)
                    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        else:
            mu = running_mean.to(acc)
            var = running_var.to(acc)
        rstd = torch.rsqrt(var + eps)
        g = gamma.to(acc)
        b = beta.to(acc)
        out = torch.empty(n, cout, dtype=acc, device=x.device)
        sa = torch.empty(n, cout, dtype=acc, device=x.device)  # avg: cnt;  sqrt: sum y
        sb = torch.empty(n, cout, dtype=acc, device=x.device)  # avg: s;    sqrt: sum y*hhat
        for i in range(0, n, step):
            xc = x[i:i + step]
            m = xc.shape[0]
            h = _pixels(xc).to(cdtype) @ wc.t()  # (m*hw) x Cout, image-major rows, cdtype
            if fused:  # h stays in cdtype; the kernel writes the sums into the batch buffers
                kernels.expander_pool_fwd(h, mu, rstd, g, b, hw, pool, eps_pool,
                                          out=out[i:i + m], sa=sa[i:i + m], sb=sb[i:i + m])
            else:
                out[i:i + m], sa[i:i + m], sb[i:i + m] = kernels.expander_pool_fwd_ref(
                    h, mu, rstd, g, b, hw, pool, eps_pool)
        ctx.save_for_backward(x, weight, gamma, beta, mu, rstd, out, sa, sb)
        ctx.cfg = (use_batch_stats, pool, chunk_bytes, cdtype, group, count, fused)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gp):
        x, weight, gamma, beta, mu, rstd, out, sa, sb = ctx.saved_tensors
        use_batch_stats, pool, chunk_bytes, cdtype, group, count, fused = ctx.cfg
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        n, cin, hgt, wid = x.shape
        cout = weight.shape[0]
        hw = hgt * wid
        acc = out.dtype
        gp = gp.to(acc)
        if pool == "avg":
            wsc = gp / hw                      # per-(n, c) factor of w = wsc * [a > 0]
        else:
            pos = out > 0
            wsc = torch.where(pos, gp / torch.where(pos, out, torch.ones_like(out)),
                              torch.zeros_like(out))   # w = wsc * y
        wsc = wsc.contiguous()  # a no-op: gp / hw and where() give new dense tensors
        dbeta = (wsc * sa).sum(0)
        dgamma = (wsc * sb).sum(0)
        g = gamma.to(acc)
        dx = dw = None
        if need_x or need_w:
            c0 = c1 = None
            if use_batch_stats:
                tot = torch.stack([dbeta, dgamma])
                if group is not None:
                    tot = _all_reduce(tot.clone(), group)
                c0 = g * tot[0] / count        # mean of dhhat
                c1 = g * tot[1] / count        # mean of dhhat * hhat
            b = beta.to(acc)
            step = _chunk_images(n, cout, hw, chunk_bytes)
            w2 = weight.reshape(cout, cin)
            wc = w2.to(cdtype)
            if need_x:
                dx = torch.empty_like(x)
            if need_w:
                dwa = torch.zeros(cout, cin, dtype=acc, device=x.device)
            for i in range(0, n, step):
                xc = x[i:i + step]
                m = xc.shape[0]
                xp = _pixels(xc).to(cdtype)
                h = xp @ wc.t()  # recomputed, (m*hw) x Cout in cdtype
                if fused:  # dh overwrites h: no second map-sized buffer
                    dh = kernels.expander_pool_bwd(h, mu, rstd, g, b, wsc[i:i + m], c0, c1, hw,
                                                   pool)
                else:
                    dh = kernels.expander_pool_bwd_ref(h, mu, rstd, g, b, wsc[i:i + m], c0, c1,
                                                       hw, pool).to(cdtype)
                if need_x:
                    # (m*hw) x Cin back to N x Cin x H x W, written in x's memory format
                    dx[i:i + m] = (dh @ wc).view(m, hgt, wid, cin).movedim(-1, 1).to(x.dtype)
                if need_w:
                    dwa += (dh.t() @ xp).to(acc)
            if need_w:
                dw = dwa.view_as(weight).to(weight.dtype)
        dg = dgamma.to(gamma.dtype) if need_g else None
        db = dbeta.to(beta.dtype) if need_b else None
        return dx, dw, dg, db, None, None, None, None, None, None, None, None, None, None, None


class ExpanderPool(nn.Module):
    """``pool_global(ReLU(BatchNorm2d(Conv2d_1x1(x))))`` -> N x Cout, without the Cout x H x W map.

    Same parameters, buffers and names as ``nn.Sequential(nn.Conv2d(Cin, Cout, 1, bias=False),
    nn.BatchNorm2d(Cout, eps_bn, momentum), nn.ReLU())`` (children "0", "1", "2"), same training
    semantics (batch statistics and running-stat updates in training mode, running statistics in
    eval mode). ``pool``: "avg" (mean over pixels) or "sqrt" (sqrt of the sum of squares over
    pixels, + ``eps_pool``; gradient 0 where the result is 0). ``chunk_bytes``: the fp32 map of
    one chunk of whole images is at most this large (one image per chunk when an image exceeds it).
    The output is fp32 (fp64 for fp64 inputs), also under autocast. ``fused``: the elementwise
    work in Triton kernels (kernels/expander_pool.py) where Triton can run on x's device (CUDA,
    or CPU under TRITON_INTERPRET=1); elsewhere, silently, the same torch path as ``fused=False``.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: str = "avg", eps_bn: float = 1e-5,
                 momentum: Optional[float] = 0.1, chunk_bytes: int = 256 << 20, eps_pool: float = 0.0,
                 fused: bool = False):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("chunk_bytes", chunk_bytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ExpanderPool: {name} must be a positive int, got {v!r}")
        if pool not in POOLS:
            raise ValueError(f"ExpanderPool: unknown pool {pool!r}; valid: {', '.join(POOLS)}")
        if not (eps_pool >= 0 and eps_bn > 0):  # NaN fails too
            raise ValueError(f"ExpanderPool: need eps_bn > 0 and eps_pool >= 0, got {eps_bn}, {eps_pool}")
        self.pool = pool
        self.chunk_bytes = chunk_bytes
        self.eps_pool = float(eps_pool)
        self.fused = bool(fused)
        self.add_module("0", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        self.add_module("1", nn.BatchNorm2d(out_channels, eps=eps_bn, momentum=momentum))
        self.add_module("2", nn.ReLU(inplace=True))

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self, "0")

    @property
    def bn(self) -> nn.BatchNorm2d:
        return getattr(self, "1")

    def _group(self, use_batch_stats: bool):
        """The process group to all-reduce statistics over (SyncBN child, dist up, > 1 rank)."""
        bn = self.bn
        if not (use_batch_stats and isinstance(bn, nn.SyncBatchNorm)
                and dist.is_available() and dist.is_initialized()):
            return None
        group = bn.process_group if bn.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if x.dim() != 4 or x.shape[1] != conv.in_channels:
            raise ValueError(f"ExpanderPool: expected N x {conv.in_channels} x H x W, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"ExpanderPool: expected a floating-point input, got {x.dtype}")
        dev = x.device.type
        cdtype = x.dtype
        if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:  # as autocast: fp64 stays
            cdtype = torch.get_autocast_dtype(dev)
        use_batch_stats = self.training or not bn.track_running_stats
        running_mean = running_var = None
        momentum = bn.momentum
        if bn.track_running_stats:
            running_mean, running_var = bn.running_mean, bn.running_var
            if self.training:
                bn.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                    momentum = 1.0 / float(bn.num_batches_tracked)
        if use_batch_stats and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            raise ValueError("ExpanderPool: batch statistics need more than 1 value per channel, "
                             f"got input of shape {tuple(x.shape)}")
        with torch.autocast(dev, enabled=False):
            return _ExpanderPoolFn.apply(
                x, conv.weight, bn.weight, bn.bias, running_mean, running_var, use_batch_stats,
                momentum, bn.eps, self.pool, self.eps_pool, self.chunk_bytes, cdtype,
                self._group(use_batch_stats), self.fused and kernels.triton_can_run_on(x.device))

    def extra_repr(self) -> str:
        return (f"pool={self.pool}, chunk_bytes={self.chunk_bytes}, eps_pool={self.eps_pool}, "
                f"fused={self.fused}")
