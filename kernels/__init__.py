"""Fused Triton kernels for blockwise self-supervised learning, each with its PyTorch reference."""
from kernels._runtime import INTERPRETER, triton_can_run_on
from kernels.sqrt_pool import SqrtPool2d, sqrt_pool2d, sqrt_pool2d_ref
from kernels.barlow_twins import BarlowTwinsLoss, barlow_twins_loss, barlow_twins_loss_ref
from kernels.expander_pool import (expander_pool_bwd, expander_pool_bwd_ref, expander_pool_fwd,
                                   expander_pool_fwd_ref)

__all__ = [
    "INTERPRETER",
    "triton_can_run_on",
    "sqrt_pool2d_ref",
    "sqrt_pool2d",
    "SqrtPool2d",
    "barlow_twins_loss_ref",
    "barlow_twins_loss",
    "BarlowTwinsLoss",
    "expander_pool_fwd_ref",
    "expander_pool_bwd_ref",
    "expander_pool_fwd",
    "expander_pool_bwd",
]
