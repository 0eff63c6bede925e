"""Backbone cut into blocks, per-block heads, and the export back to torchvision.

Backbone: a torchvision ResNet cut into the paper's 4 blocks (Siddiqui et al., TMLR 2024):
block1 = conv1, bn1, relu, maxpool, layer1 (the stem merged with layer1); block2..4 = layer2..4.
Each block is an ``nn.Sequential`` whose children keep torchvision's names, so the state dict of
``blocks[k]`` is torchvision's with a ``"{k}."`` prefix: the export is a rename, nothing else.
For a 224 input the outputs are 256x56x56, 512x28x28, 1024x14x14, 2048x7x7 (ResNet-50).

The small-image stem (32x32 data, as the usual CIFAR ResNets): conv1 is 3x3 stride 1 padding 1 and
there is no max-pool, so a 32 input gives 32, 16, 8, 4 pixels per side at blocks 1..4.

Head, one per block (the paper's local head):
    feature map -> [1x1 conv expander + BN + ReLU ("CbE")] -> pooling -> projector -> z (N x D)
Pooling is "avg" or "sqrt" (square-root / L2 pooling, sqrt of the window's sum of squares),
global or over k x k windows (stride k) followed by a mean over the pooled positions.
The projector follows the official Barlow Twins code: Linear, BN1d, ReLU per hidden layer, then a
last Linear; every Linear is bias-free as there (a bias before BatchNorm is redundant, and the
loss batch-normalises the last output).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import kernels

ARCHS: Dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}

_BLOCK_CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
}

#: torchvision submodule names held by each block, in forward order
BLOCK_LAYERS = (
    ("conv1", "bn1", "relu", "maxpool", "layer1"),
    ("layer2",),
    ("layer3",),
    ("layer4",),
)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(sorted(ARCHS))}")


def block_channels(arch: str) -> List[int]:
    """Output channels of blocks 1..4: [64, 128, 256, 512] (resnet18) or [256, 512, 1024, 2048]."""
    _check_arch(arch)
    return list(_BLOCK_CHANNELS[arch])


def _small_stem_conv() -> nn.Conv2d:
    """3x3 stride-1 conv1 for 32x32 images, initialised as torchvision initialises its convs."""
    conv = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def build_blocks(arch: str, small_stem: bool) -> nn.ModuleList:
    """A fresh (randomly initialised) torchvision ResNet cut into 4 ``nn.Sequential`` blocks.

    Children keep torchvision's names (``blocks[0].conv1``, ``blocks[1].layer2`` ...).
    ``small_stem=True`` swaps conv1 for a 3x3 stride-1 conv and the max-pool for ``nn.Identity``.
    """
    _check_arch(arch)
    if not isinstance(small_stem, bool):
        raise TypeError(f"build_blocks: small_stem must be a bool, got {type(small_stem).__name__}")
    net = ARCHS[arch](weights=None)
    if small_stem:
        net.conv1 = _small_stem_conv()
        net.maxpool = nn.Identity()
    return nn.ModuleList(
        nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))
        for names in BLOCK_LAYERS
    )


def forward_block(block: nn.Module, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """``block(x)``; with ``checkpointed`` (``--activation-checkpointing``) and autograd recording,
    each residual unit (and block 1's stem as one piece) keeps only its input for the backward
    and recomputes its activations there: about one extra forward of the block for a fraction of
    its activation memory.

    Exact: the recomputation normalises with the same batch statistics, and it does not update
    BatchNorm's running statistics or batch counters a second time. ``block`` is one of
    :func:`build_blocks`' blocks (or any ``nn.Sequential``, which is then split at its
    children, nested ``nn.Sequential`` children at theirs).
    """
    if not (checkpointed and torch.is_grad_enabled() and block.training):
        return block(x)
    from torch.utils.checkpoint import checkpoint
    for segment in _segments(block):
        x = checkpoint(_run_segment, segment, x, use_reentrant=False, preserve_rng_state=False,
                       context_fn=functools.partial(_recompute_context, segment))
    return x


def _segments(block: nn.Module) -> List[List[nn.Module]]:
    """The pieces :func:`forward_block` checkpoints: consecutive plain children (the stem) as one,
    each child of a nested ``nn.Sequential`` (a torchvision layer's residual units) alone."""
    if not isinstance(block, nn.Sequential):
        return [[block]]
    pieces, run = [], []
    for child in block.children():
        if isinstance(child, nn.Sequential):
            if run:
                pieces.append(run)
                run = []
            pieces.extend([unit] for unit in child.children())
        else:
            run.append(child)
    if run:
        pieces.append(run)
    return pieces


def _run_segment(segment: List[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in segment:
        x = module(x)
    return x


def _recompute_context(segment: List[nn.Module]):
    return contextlib.nullcontext(), _batch_stats_only(segment)


@contextlib.contextmanager
def _batch_stats_only(segment: List[nn.Module]):
    """BatchNorm layers of ``segment`` leave their running statistics and batch counters as they
    were (the recomputation in backward must not record its batch a second time). The layers
    still receive their buffers (momentum 0: running * 1 + batch * 0), so the recomputation saves
    the same tensors as the forward did, as checkpoint's check requires."""
    norms = [m for module in segment for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.sub_(1)


def _block_prefix_to_torchvision(key: str) -> str:
    """'0.conv1.weight' -> 'conv1.weight'; '3.layer4.2.bn3.bias' -> 'layer4.2.bn3.bias'."""
    return key.split(".", 1)[1]


def _has_small_stem(blocks: nn.ModuleList) -> bool:
    return tuple(blocks[0].conv1.kernel_size) != (7, 7)


def _unwrap(block: nn.Module) -> nn.Module:
    """The plain block inside torch.compile (``_orig_mod``) or DDP (``module``) wrappers."""
    while True:
        if isinstance(getattr(block, "_orig_mod", None), nn.Module):
            block = block._orig_mod
        elif isinstance(block, nn.parallel.DistributedDataParallel):
            block = block.module
        else:
            return block


def _check_blocks(blocks, fn: str) -> nn.ModuleList:
    """The 4 plain blocks (wrappers removed), or TypeError if these are not build_blocks' blocks."""
    if not isinstance(blocks, (nn.ModuleList, list, tuple)) or len(blocks) != 4:
        got = type(blocks).__name__
        if isinstance(blocks, (nn.ModuleList, list, tuple)):
            got += f" of {len(blocks)}"
        raise TypeError(f"{fn}: expected the nn.ModuleList of 4 blocks from build_blocks, got {got}")
    blocks = nn.ModuleList(_unwrap(b) for b in blocks)
    for k, (block, names) in enumerate(zip(blocks, BLOCK_LAYERS)):
        got = tuple(name for name, _ in block.named_children())
        if got != names:
            raise TypeError(f"{fn}: block {k + 1} has children {got}, expected {names} "
                            "(blocks must come from build_blocks)")
    return blocks


def export_torchvision_state_dict(blocks: nn.ModuleList, arch: str,
                                  allow_small_stem: bool = False) -> Dict[str, torch.Tensor]:
    """The backbone as a torchvision ResNet state dict (CPU tensors, detached copies).

    Keys are torchvision's (conv1.*, bn1.*, layer1..4.*) plus a freshly initialised ``fc.*``, so
    ``torchvision.models.<arch>().load_state_dict(sd, strict=True)`` works. Blocks with the small
    stem have a 3x3 conv1 that torchvision cannot load: ValueError, unless
    ``allow_small_stem=True``, which returns the dict anyway (not strict-loadable).
    """
    _check_arch(arch)
    blocks = _check_blocks(blocks, "export_torchvision_state_dict")
    if _has_small_stem(blocks) and not allow_small_stem:
        raise ValueError(
            "export_torchvision_state_dict: these blocks use the small-image stem (3x3 conv1, "
            "no max-pool); torchvision's ResNet has a 7x7 conv1 and cannot load it strictly. "
            "Pass allow_small_stem=True to export it anyway (load with strict=False and replace "
            "conv1/maxpool yourself)."
        )
    # keys and shapes from a model on the meta device (no memory, no init cost); fc is the only
    # part not taken from the blocks: a fresh nn.Linear, which is how torchvision initialises it
    with torch.device("meta"):
        meta_net = ARCHS[arch](weights=None)
    reference = meta_net.state_dict()
    fc = nn.Linear(meta_net.fc.in_features, meta_net.fc.out_features)
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in blocks.state_dict().items():
        name = _block_prefix_to_torchvision(key)
        if name not in reference:
            raise ValueError(f"export_torchvision_state_dict: {name!r} is not a {arch} key; "
                             "are these blocks of another arch?")
        if value.shape != reference[name].shape and not (name == "conv1.weight" and allow_small_stem):
            raise ValueError(f"export_torchvision_state_dict: {name} has shape "
                             f"{tuple(value.shape)}, {arch} expects {tuple(reference[name].shape)}; "
                             "are these blocks of another arch?")
        out[name] = value.detach().cpu().clone()
    out["fc.weight"] = fc.weight.detach()
    out["fc.bias"] = fc.bias.detach()
    missing = [name for name in reference if name not in out]
    if missing:
        raise ValueError(f"export_torchvision_state_dict: blocks lack {arch} keys {missing[:5]}")
    return out


def load_torchvision_state_dict(blocks: nn.ModuleList, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a torchvision ResNet state dict (e.g. pretrained weights) into blocks, strictly.

    ``fc.*`` keys are ignored. The inverse of :func:`export_torchvision_state_dict`.
    """
    blocks = _check_blocks(blocks, "load_torchvision_state_dict")
    layer_to_block = {name: k for k, names in enumerate(BLOCK_LAYERS) for name in names}
    mapped = OrderedDict()
    for key, value in state_dict.items():
        top = key.split(".", 1)[0]
        if top == "fc":
            continue
        if top not in layer_to_block:
            raise ValueError(f"load_torchvision_state_dict: unexpected key {key!r}; expected a "
                             "torchvision ResNet state dict, keys starting with conv1., bn1., "
                             "layer1. .. layer4. or fc. (strip wrapper prefixes such as 'module.')")
        mapped[f"{layer_to_block[top]}.{key}"] = value
    blocks.load_state_dict(mapped, strict=True)


# ---------------------------------------------------------------------------------------------
# Pooling


def _avg_pool(x: torch.Tensor, window: Optional[int], fused: bool) -> torch.Tensor:
    del fused  # average pooling is a cheap, memory-bound PyTorch op: no kernel of ours
    if window is None:
        return x.mean(dim=(2, 3))
    return F.avg_pool2d(x, window, window).mean(dim=(2, 3))


_warned_fallback = set()


def warn_once(key: str, message: str) -> None:
    """One RuntimeWarning per ``key`` per process (the fallbacks would otherwise warn per step)."""
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _sqrt_pool_fn(x: torch.Tensor, fused: bool) -> Callable[..., torch.Tensor]:
    """kernels.sqrt_pool2d (the Triton kernel) when fused and Triton can run on x's device, else
    the reference (with one warning when fused was asked for)."""
    if not fused:
        return kernels.sqrt_pool2d_ref
    if not kernels.triton_can_run_on(x.device):
        warn_once("sqrt_device", f"fused=True but the Triton kernels cannot run on {x.device} "
                  "(no CUDA; TRITON_INTERPRET is not set); using the PyTorch reference "
                  "kernels.sqrt_pool2d_ref")
        return kernels.sqrt_pool2d_ref
    return kernels.sqrt_pool2d


def _sqrt_pool(x: torch.Tensor, window: Optional[int], fused: bool) -> torch.Tensor:
    op = _sqrt_pool_fn(x, fused)
    if window is None:
        # global: one window covering the whole map (explicit sizes, not kernel_size=None, so the
        # call is the same for the reference and the kernel)
        size = (x.shape[-2], x.shape[-1])
        return op(x, kernel_size=size, stride=size).flatten(1)
    return op(x, kernel_size=window, stride=window).mean(dim=(2, 3))


#: pooling name -> fn(feature map N x C x H x W, window or None, fused) -> N x C
POOLS: Dict[str, Callable[[torch.Tensor, Optional[int], bool], torch.Tensor]] = {
    "avg": _avg_pool,
    "sqrt": _sqrt_pool,
}


def parse_projector(spec: str) -> List[int]:
    """'8192-8192-8192' -> [8192, 8192, 8192]; '' or 'none' -> [] (no projector)."""
    if not isinstance(spec, str):
        raise TypeError(f"projector must be a string like '8192-8192-8192', got {type(spec).__name__}")
    if spec.strip().lower() in ("", "none"):
        return []
    try:
        sizes = [int(s) for s in spec.split("-")]
    except ValueError:
        raise ValueError(f"projector {spec!r}: expected widths separated by '-', e.g. "
                         "'8192-8192-8192', or 'none'") from None
    if any(s <= 0 for s in sizes):
        raise ValueError(f"projector {spec!r}: every width must be a positive integer")
    return sizes


def build_projector(in_dim: int, spec: str) -> nn.Module:
    """The official Barlow Twins projector: (Linear, BN1d, ReLU) per hidden width, last Linear."""
    sizes = [in_dim] + parse_projector(spec)
    if len(sizes) == 1:
        return nn.Identity()
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BlockHead(nn.Module):
    """The local head of one block: [expander] -> pooling -> projector; forward gives N x D.

    Args:
        in_channels: channels of the block's feature map.
        expander: > 0 adds a 1x1 conv (no bias) + BatchNorm2d + ReLU to that many channels (CbE);
            0 means none.
        pool: a name in ``POOLS`` ("avg" or "sqrt").
        pool_window: None for global pooling; an int k pools k x k windows with stride k (clipped
            to the feature map's size), then averages over the pooled positions.
        projector: widths joined by '-' ("8192-8192-8192"), or "none".
        fused: square-root pooling through ``kernels.sqrt_pool2d`` (Triton) instead of
            ``kernels.sqrt_pool2d_ref``, and the ExpanderPool's elementwise work through
            ``kernels.expander_pool_fwd`` / ``_bwd``; both fall back to the PyTorch references
            where Triton cannot run (CPU without TRITON_INTERPRET; square-root pooling warns once).
        expander_recompute: with an expander and global pooling, expander + pooling run as
            :class:`blockwise.expander.ExpanderPool` (the Cout x H x W map is never stored; same
            parameter names and state dict as the plain ``nn.Sequential``). Window pooling always
            takes the plain path. Its output is fp32 under autocast (the plain path's: bf16).
    """

    def __init__(self, in_channels: int, expander: int, pool: str, pool_window: Optional[int],
                 projector: str, fused: bool, expander_recompute: bool = False):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"BlockHead: in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(expander, int) or expander < 0:
            raise ValueError(f"BlockHead: expander must be an int >= 0 (0 = none), got {expander!r}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(sorted(POOLS))}")
        if pool_window is not None and (not isinstance(pool_window, int) or isinstance(pool_window, bool)
                                        or pool_window <= 0):
            raise ValueError(f"BlockHead: pool_window must be None (global) or a positive int, "
                             f"got {pool_window!r}")
        self.pool = pool
        self.pool_window = pool_window
        self.fused = bool(fused)
        self.expander_recompute = bool(expander_recompute) and expander > 0 and pool_window is None
        if self.expander_recompute:
            from blockwise.expander import ExpanderPool
            self.expander = ExpanderPool(in_channels, expander, pool, fused=self.fused)
            self.feature_dim = expander
        elif expander > 0:
            self.expander = nn.Sequential(
                nn.Conv2d(in_channels, expander, kernel_size=1, bias=False),
                nn.BatchNorm2d(expander),
                nn.ReLU(inplace=True),
            )
            self.feature_dim = expander
        else:
            self.expander = nn.Identity()
            self.feature_dim = in_channels
        self.projector = build_projector(self.feature_dim, projector)
        sizes = parse_projector(projector)
        self.out_dim = sizes[-1] if sizes else self.feature_dim

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Expander then pooling: N x feature_dim (the representation before the projector)."""
        if x.dim() != 4:
            raise ValueError(f"BlockHead: expected an N x C x H x W feature map, got shape {tuple(x.shape)}")
        if self.expander_recompute:
            return self.expander(x)  # expander + global pooling in one op
        x = self.expander(x)
        window = self.pool_window
        if window is not None:
            window = min(window, x.shape[-2], x.shape[-1])
        return POOLS[self.pool](x, window, self.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.pooled(x))

    def extra_repr(self) -> str:
        return (f"pool={self.pool}, pool_window={self.pool_window}, fused={self.fused}, "
                f"expander_recompute={self.expander_recompute}, out_dim={self.out_dim}")


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, scale: float = 1.0,
                      fused: bool = False) -> torch.Tensor:
    """The Barlow Twins loss of two N x D embeddings, an fp32 scalar.

    ``fused=True`` uses ``kernels.barlow_twins_loss`` (Triton; never builds the D x D matrix) when
    it can run on these tensors, else (one warning) the reference. The reference runs
    in fp32 with autocast off: under fp16 autocast the official code's D x D matmul overflows.
    """
    if fused:
        if kernels.triton_can_run_on(z1.device):
            return kernels.barlow_twins_loss(z1, z2, lambd=lambd, scale=scale)
        warn_once("bt_device", f"fused=True but the Triton kernels cannot run on {z1.device} "
                  "(no CUDA; TRITON_INTERPRET is not set); using kernels.barlow_twins_loss_ref")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return kernels.barlow_twins_loss_ref(z1.float(), z2.float(), lambd=lambd, scale=scale)


def add_noise(x: torch.Tensor, std: float, training: bool = True) -> torch.Tensor:
    """The paper's noise at block outputs: ``x + std * N(0, 1) * x.std()``.

    Identity when ``std == 0`` or ``training`` is False. ``x.std()`` is the whole tensor's
    standard deviation, taken without gradient (the noise scale is not a learning signal).
    """
    if std < 0:
        raise ValueError(f"add_noise: std must be >= 0, got {std}")
    if std == 0 or not training:
        return x
    return x + torch.randn_like(x) * (std * x.detach().std())
