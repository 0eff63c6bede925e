"""Fused Barlow Twins loss.

a = BN(z1), b = BN(z2) (batch statistics, biased variance, eps, no affine); C = a^T b / N;
L = scale * [ sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 ].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
