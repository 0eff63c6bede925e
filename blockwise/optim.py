"""Optimisers and the learning-rate schedule of the Barlow Twins recipe.

LARS as in the official Barlow Twins code (facebookresearch/barlowtwins, main.py), per parameter p
with gradient g, in a group with learning rate lr:
    d = g + weight_decay * p                               (skipped for lars_exclude groups)
    q = eta * ||p|| / ||d||  if ||p|| > 0 and ||d|| > 0 else 1   (skipped for lars_exclude groups)
    mu = momentum * mu + q * d                             (mu starts at 0)
    p = p - lr * mu
Biases and normalisation parameters (every 1-D parameter) go in a ``lars_exclude`` group: no
weight decay and no trust-ratio adaptation. The trust ratio is computed on the device with
``torch.where``: a step never synchronises the host.

Schedule (official code): linear warmup from 0, then cosine from base_lr to final_ratio * base_lr;
the base learning rate is scaled by batch_size / 256.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017), the official Barlow Twins variant.

    A param group with ``lars_exclude=True`` gets neither weight decay nor adaptation (plain
    momentum SGD); :func:`param_groups` builds such groups for biases and norm parameters.
    """

    def __init__(self, params, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9,
                 eta: float = 0.001, foreach: Optional[bool] = None):
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if eta <= 0:
            raise ValueError(f"LARS: eta must be > 0, got {eta}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        lars_exclude=False)
        super().__init__(params, defaults)
        #: None: the multi-tensor path on CUDA (a few launches per group instead of ~8 per
        #: parameter), the per-parameter loop elsewhere; both compute the same update
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise TypeError("LARS does not support sparse gradients")
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            foreach = self.foreach if self.foreach is not None else all(p.is_cuda for p in params)
            # one list per (device, dtype): the multi-tensor kernels need uniform lists
            buckets: Dict[tuple, List[torch.Tensor]] = {}
            for p in params:
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for bucket in buckets.values():
                (_step_foreach if foreach else _step_loop)(bucket, [self.state[p]["mu"] for p in bucket], group)
        return loss


def _trust_ratio(param_norm: torch.Tensor, update_norm: torch.Tensor, eta: float) -> torch.Tensor:
    """eta * ||p|| / ||d||, or 1 where either norm is 0; on the device (no .item(): no host sync)."""
    one = torch.ones_like(param_norm)
    return torch.where(param_norm > 0,
                       torch.where(update_norm > 0, eta * param_norm / update_norm, one), one)


def _step_loop(params: List[torch.Tensor], mus: List[torch.Tensor], group: dict) -> None:
    """The official code's per-parameter update (the reference for the multi-tensor path)."""
    for p, mu in zip(params, mus):
        d = p.grad
        if not group["lars_exclude"]:
            if group["weight_decay"] != 0:
                d = d.add(p, alpha=group["weight_decay"])
            d = d.mul(_trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(d), group["eta"]))
        mu.mul_(group["momentum"]).add_(d)
        p.add_(mu, alpha=-group["lr"])


def _step_foreach(params: List[torch.Tensor], mus: List[torch.Tensor], group: dict) -> None:
    """The same update with multi-tensor ops (params share one device and dtype)."""
    grads = [p.grad for p in params]
    if group["lars_exclude"]:
        d = grads
    else:
        if group["weight_decay"] != 0:
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        else:
            d = grads
        q = _trust_ratio(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d)),
                         group["eta"])
        if d is grads:  # the gradients are the caller's: a scaled copy
            d = torch._foreach_mul(d, list(q.unbind()))
        else:  # d is this step's own buffer: scale it in place (one copy of the gradients, not two)
            torch._foreach_mul_(d, list(q.unbind()))
    torch._foreach_mul_(mus, group["momentum"])
    torch._foreach_add_(mus, d)
    torch._foreach_add_(params, mus, alpha=-group["lr"])


def param_groups(module: nn.Module, weight_decay: float) -> List[dict]:
    """Two groups: weights (``weight_decay``) and 1-D params (biases, norms: no decay, lars_exclude).

    Only parameters that require grad; empty groups are left out.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"param_groups: expected an nn.Module, got {type(module).__name__}")
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lars_exclude": False})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def _lars(params, lr: float, weight_decay: float, **options) -> torch.optim.Optimizer:
    return LARS(params, lr=lr, weight_decay=weight_decay, **options)


def _sgd(params, lr: float, weight_decay: float, **options) -> torch.optim.Optimizer:
    options.setdefault("momentum", 0.9)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **options)


def _adamw(params, lr: float, weight_decay: float, **options) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **options)


#: optimiser name -> fn(params or param groups, lr, weight_decay, **options) -> Optimizer
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "lars": _lars,
    "sgd": _sgd,
    "adamw": _adamw,
}


def build_optimizer(name: str, module_or_params: Union[nn.Module, Iterable], lr: float,
                    weight_decay: float, **options) -> torch.optim.Optimizer:
    """An optimiser from ``OPTIMIZERS``.

    Given a module, its parameters are split by :func:`param_groups` (biases and norms get no
    weight decay, and no LARS adaptation); given parameters or groups, they are used as they are.
    ``options`` go to the optimiser's constructor (e.g. ``eta=0.001`` for LARS; SGD's momentum
    defaults to 0.9).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(sorted(OPTIMIZERS))}")
    if isinstance(module_or_params, nn.Module):
        params = param_groups(module_or_params, weight_decay)
    else:
        params = list(module_or_params)
    if not params:
        raise ValueError(f"build_optimizer({name!r}): no parameters to optimise")
    return OPTIMIZERS[name](params, lr, weight_decay, **options)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                  final_ratio: float = 0.001) -> float:
    """Learning rate at ``step`` (0-based): linear warmup from 0, then cosine to final_ratio * base_lr.

    As the official Barlow Twins code: ``base_lr * step / warmup_steps`` during warmup, then
    ``base_lr * q + final * (1 - q)`` with ``q = (1 + cos(pi * t)) / 2``, t going 0 -> 1 from the
    end of warmup to ``total_steps``. Steps past ``total_steps`` stay at the final value.
    """
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine: total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_cosine: warmup_steps must be in [0, total_steps={total_steps}], "
                         f"got {warmup_steps}")
    if step < 0:
        raise ValueError(f"warmup_cosine: step must be >= 0, got {step}")
    if not 0 <= final_ratio <= 1:
        raise ValueError(f"warmup_cosine: final_ratio must be in [0, 1], got {final_ratio}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    final = base_lr * final_ratio
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return final
    t = min(step - warmup_steps, decay_steps) / decay_steps
    q = 0.5 * (1.0 + math.cos(math.pi * t))
    return base_lr * q + final * (1.0 - q)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of the recipe: ``base_lr * batch_size / 256``."""
    if batch_size <= 0:
        raise ValueError(f"scaled_lr: batch_size must be > 0, got {batch_size}")
    return base_lr * batch_size / 256


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate (call once per step with the schedule's value)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
