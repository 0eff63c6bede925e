"""Square-root (L2) spatial pooling.

Forward:  y[n, c, i, j] = sqrt( sum_{(h, w) in window(i, j)} x[n, c, h, w]^2 + eps )
Backward: dx[n, c, h, w] = sum_{windows w containing (h, w)} dy_w * x[n, c, h, w] / y_w,
          and 0 where y_w == 0 (an all-zero window with eps == 0): never NaN or inf.

Padding adds zeros. With eps = 0 and padding = 0 this equals ``F.lp_pool2d(x, 2, k, s)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
    # where() on both sides keeps d sqrt / d sq finite: all-zero windows get gradient 0
    y = torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    return y.to(x.dtype)
