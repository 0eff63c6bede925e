"""Training loops: end-to-end, simultaneous blockwise, sequential blockwise.

The backbone is 4 blocks, each with a local head (expander, pooling, projector) and a Barlow Twins
loss. One step of each mode (x1, x2: the two augmented views of a batch):

- ``e2e``: x -> block1 -> ... -> block4 -> head -> loss; one backward through everything, one
  optimizer (the baseline: every block's activations are alive at the backward).
- ``simultaneous``: for k = 1..4: f = block_k(x); loss_k = BT(head_k(f1), head_k(f2));
  loss_k.backward(); optimizer_k.step(); x = f.detach(). Block k's graph is freed by its backward
  *before* block k+1 runs forward, so only one block's activations are ever alive (the public
  code back-propagates after the full forward and keeps all four alive). Gradients are set to
  None right after each block's step, so at most one block's gradients exist at a time.
- ``sequential``: block 1 trains for its epochs, then block 2 on block 1's frozen output (eval
  mode, ``torch.no_grad``), and so on. Only the current block and its head hold gradients and
  optimizer state; a finished block's head and optimizer are deleted. Each block has its own
  warmup-cosine schedule.

Multi-GPU (``torchrun``): every trained module is wrapped in DistributedDataParallel; the loss is
the Barlow Twins loss of the *global* batch. DDP averages parameter gradients over ranks, so
the loss each rank back-propagates must have, for the rows it holds, W times the global-loss
gradient: the reference path all-gathers z with an autograd-aware all-gather, whose backward
sums the W identical copies (factor W built in); ``kernels.barlow_twins_loss`` gives exactly
the global-loss gradient for the local rows, so the trainer multiplies its loss by W before
``backward`` (``BarlowTwinsLoss.grad_factor``). tests/test_trainer_ddp.py checks both against one
process on the concatenated batch.

Determinism and resume: every image pair is augmented under its own seed (seed, epoch, index),
whatever the worker; the order of each epoch comes from (seed, epoch); the checkpoint holds the
position in the epoch, the schedule step, all RNG states, models and optimizers. Resuming gives
the same bits as an uninterrupted run on the CPU.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import kernels
from blockwise import data, models, optim
from blockwise.checkpoint import (CHECKPOINT, SCHEMA, atomic_torch_save, atomic_write_lines,
                                  load_checkpoint, rng_state, set_rng_state)
from blockwise.config import Config
from profiling import Profiler

GIB = float(1 << 30)
METRICS = "metrics.jsonl"
#: host memory the loader's prefetched batches may hold (per process)
LOADER_HOST_BYTES = 8 * GIB


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stopped before writing any checkpoint after it."""

    def __init__(self, block: str, step: int, value: float, checkpoint: Optional[str]):
        self.block, self.step, self.value, self.checkpoint = block, step, value, checkpoint
        kept = (f"the last good checkpoint is kept: {checkpoint}" if checkpoint
                else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss ({value}) at step {step}, block {block}; training "
                         f"stopped ({kept}). Try a lower --lr or --loss-scale, or --precision fp32.")


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world_size 1: a plain single process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def build_bundle(cfg: Config, dist_info: DistInfo,
                 barrier: Optional[Callable[[], None]] = None) -> data.DataBundle:
    """The datasets of ``cfg``. With ``--download`` under torchrun, one process per machine
    (local rank 0) downloads while the others wait at a barrier, then read what it fetched:
    N processes extracting the same archive into one folder at once can corrupt it."""
    def build(download: bool) -> data.DataBundle:
        return data.build_datasets(cfg.dataset, cfg.data_dir, cfg.image_size, download,
                                   cfg.synthetic_size, cfg.num_classes, cfg.seed,
                                   cfg.synthetic_augment)

    if not (cfg.download and dist_info.enabled):
        return build(cfg.download)
    barrier = barrier or dist.barrier
    if dist_info.local_rank == 0:
        try:
            return build(True)
        finally:
            barrier()  # release the others, also when the download failed (they then fail too)
    barrier()
    return build(False)


def setup_distributed(device: str) -> DistInfo:
    """Join the torchrun job described by the environment (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return info


# ---------------------------------------------------------------------------------------------
# models


def initial_blocks(cfg: Config) -> nn.ModuleList:
    """The backbone's 4 blocks at their random initialisation: the same for a given seed (the
    probe's random-init control rebuilds exactly these weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return models.build_blocks(cfg.arch, cfg.small_stem)


def initial_head(cfg: Config, k: int, fused: bool) -> models.BlockHead:
    """Head of block k (0-based), initialised from its own seed (independent of build order)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + 101 + k)
        return models.BlockHead(models.block_channels(cfg.arch)[k], cfg.expander, cfg.pool,
                                cfg.pool_window, cfg.projector, fused,
                                expander_recompute=cfg.expander_recompute)


class BarlowTwinsLoss:
    """Barlow Twins loss of the global batch, and the factor its backward needs under DDP.

    ``use_kernel``: ``kernels.barlow_twins_loss`` (it handles the global batch itself when
    torch.distributed is initialised; its gradient for the local rows is the global-loss gradient,
    so ``grad_factor`` is the world size). Otherwise the reference, on z all-gathered with
    ``torch.distributed.nn.functional.all_gather`` (its backward sums the ranks' identical
    gradients: factor W built in, ``grad_factor`` 1).
    """

    def __init__(self, lambd: float, scale: float, fused: bool, world_size: int = 1,
                 cuda_graphs: bool = False):
        self.lambd, self.scale, self.world_size = lambd, scale, world_size
        self.use_kernel = bool(fused)
        self.cuda_graphs = bool(cuda_graphs)  # used by the kernel on CUDA, single process only
        self.grad_factor = float(world_size) if self.use_kernel else 1.0

    def __call__(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            return kernels.barlow_twins_loss(z1, z2, lambd=self.lambd, scale=self.scale,
                                             cuda_graphs=self.cuda_graphs)
        if self.world_size > 1:
            from torch.distributed.nn.functional import all_gather
            z1 = torch.cat(all_gather(z1.contiguous()))
            z2 = torch.cat(all_gather(z2.contiguous()))
        return models.barlow_twins_loss(z1, z2, lambd=self.lambd, scale=self.scale, fused=False)


class _NoProfiler:
    def window(self, name):
        return contextlib.nullcontext()


class _Windows:
    """The trainer's window calls ("step", block<k>, block<k>/<phase>, e2e phases) are timed
    only with ``phases`` (``--profile-phases``: a device sync at both ends of each); otherwise
    they are memory-only (peak memory, no sync), and time and energy come from the measured
    segment as a whole (``Profiler.measure``: one sync at each of its two ends). A sync per step
    would leave the GPU idle while the host starts the next step, and the profiled throughput
    would no longer be the unprofiled one."""

    __slots__ = ("prof", "phases")

    def __init__(self, prof: Profiler, phases: bool):
        self.prof, self.phases = prof, bool(phases)

    def window(self, name: str):
        return self.prof.window(name, timed=self.phases)


class Stage(nn.Module):
    """Block k and its head. ``forward(x1, x2) -> (f1, f2, loss)`` (f: block outputs, with noise);
    ``forward(x) -> (f, z)``: one view's block output and embedding (``--split-views``)."""

    def __init__(self, index: int, block: nn.Module, head: nn.Module, loss_fn: BarlowTwinsLoss,
                 noise_std: float, prof=None, checkpointed: bool = False):
        super().__init__()
        self.index, self.block, self.head = index, block, head
        self.loss_fn, self.noise_std, self.checkpointed = loss_fn, noise_std, checkpointed
        self.prof = prof or _NoProfiler()

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        y = models.forward_block(self.block, x, self.checkpointed)
        return _add_noise(y, self.noise_std, self.training)

    def forward(self, x1: torch.Tensor, x2: Optional[torch.Tensor] = None):
        name = f"block{self.index + 1}"
        if x2 is None:
            with self.prof.window(f"{name}/forward"):
                f = self._block(x1)
            with self.prof.window(f"{name}/head"):
                return f, self.head(f)
        with self.prof.window(f"{name}/forward"):
            f1, f2 = self._block(x1), self._block(x2)
        with self.prof.window(f"{name}/head"):
            loss = self.loss_fn(self.head(f1), self.head(f2))
        return f1, f2, loss


class EndToEnd(nn.Module):
    """All 4 blocks and one head on block 4: ``forward(x1, x2) -> loss``; ``forward(x) -> (f, z)``:
    one view's block-4 output and embedding (``--split-views``)."""

    def __init__(self, blocks: nn.ModuleList, head: nn.Module, loss_fn: BarlowTwinsLoss,
                 noise_std: float, prof=None, checkpointed: Sequence[bool] = (False,) * 4):
        super().__init__()
        self.blocks, self.head = blocks, head
        # checkpointed: per block (Config.checkpointed_blocks)
        self.loss_fn, self.noise_std, self.checkpointed = loss_fn, noise_std, tuple(checkpointed)
        if len(self.checkpointed) != len(blocks):
            raise ValueError(f"checkpointed: {len(self.checkpointed)} values for "
                             f"{len(blocks)} blocks")
        self.prof = prof or _NoProfiler()

    def forward(self, x1: torch.Tensor, x2: Optional[torch.Tensor] = None):
        views = [x1] if x2 is None else [x1, x2]
        for k, block in enumerate(self.blocks):
            with self.prof.window(f"block{k + 1}/forward"):
                views = [_add_noise(models.forward_block(block, x, self.checkpointed[k]),
                                    self.noise_std, self.training) for x in views]
        with self.prof.window("head"):
            if x2 is None:
                return views[0], self.head(views[0])
            return self.loss_fn(self.head(views[0]), self.head(views[1]))


class _NoisePlan:
    """``--split-views`` with noise: each view gets the noise the joint step would give it.

    The joint step draws, at each block output, view 1's noise and then view 2's (e2e: block 1
    view 1, block 1 view 2, block 2 view 1, ...) from one generator. The split step runs view 2
    first (no graph), then view 1, then view 2 again. In that first pass the plan keeps, at each
    noise call, the generator's state, skips view 1's draw (the same shape), keeps the state again
    and draws view 2's; the later passes set the kept state before each draw. ``rng``: get (no
    argument) or set the generator's state."""

    def __init__(self, rng: Callable):
        self.rng, self.states, self.view, self.i = rng, [], 0, 0

    def start(self, view: int) -> None:
        self.view, self.i = view, 0

    def __call__(self, y: torch.Tensor, std: float, training: bool) -> torch.Tensor:
        if std == 0 or not training:
            return models.add_noise(y, std, training)
        if self.view == 0:  # the first pass (view 2): record
            before_view1 = self.rng()
            torch.randn_like(y)  # view 1's noise, drawn here in the joint step
            self.states.append((before_view1, self.rng()))
        else:
            self.rng(self.states[self.i][self.view - 1])
            self.i += 1
        return models.add_noise(y, std, training)


#: the noise plan of the split step in progress (None: draw in call order)
_NOISE_PLAN: Optional[_NoisePlan] = None


def _add_noise(y: torch.Tensor, std: float, training: bool) -> torch.Tensor:
    plan = _NOISE_PLAN
    return models.add_noise(y, std, training) if plan is None else plan(y, std, training)


def _bn_buffers(module: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every BatchNorm running statistic in ``module``."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    out.append((buf, buf.clone()))
    return out


# ---------------------------------------------------------------------------------------------
# data: exact, resumable order and augmentation


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SeededPairs(Dataset):
    """``ds[(seed, i)] -> (view1, view2, seconds)``: the pair of image i augmented under ``seed``.

    torchvision's transforms draw from torch's global generator; it is seeded per sample inside
    ``fork_rng`` (the caller's generator is untouched), so a sample's augmentation depends only on
    its key, whatever the worker or the position in the epoch. ``seconds`` is the time spent on it
    (the loader's capacity in the summary).
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        seed, index = key
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            (view1, view2), _ = self.base[index]
        return view1, view2, time.perf_counter() - t0


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (sample seed, index) keys of one epoch, from batch ``start`` on; this rank's
    share of each global batch. Order from (seed, epoch): the same for any world size."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = n // global_batch
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, self.epoch, 1))
        perm = torch.randperm(self.n, generator=g).tolist()
        for i in range(self.start, self.steps_per_epoch):
            lo = i * self.global_batch + self.rank * self.local_batch
            yield [(_mix(self.seed, self.epoch, 2, j), j) for j in perm[lo:lo + self.local_batch]]


# ---------------------------------------------------------------------------------------------
# the trainer


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""
    step: int = 0  # optimisation steps done, whole run
    block: int = 0  # sequential: the block being trained (0-based); 4 = all done
    block_step: int = 0  # steps done in the current phase (a block in sequential, else the run)
    epoch: int = 0  # the epoch in progress (of the current block in sequential mode)
    batch: int = 0  # batches of that epoch already consumed
    time_s: float = 0.0  # wall time of the run's training loop up to this state, all sessions


class Trainer:
    """Builds data, blocks, heads, optimizers for ``cfg`` and trains them (``fit``).

    ``log`` receives each line meant for the user (rank 0 only). Resuming is
    ``cfg.resume = run dir or checkpoint`` (train.py merges the saved config).
    """

    def __init__(self, cfg: Config, run_dir: str, dist_info: Optional[DistInfo] = None,
                 log: Callable[[str], None] = print, bundle: Optional[data.DataBundle] = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.dist = dist_info or DistInfo()
        self.is_main = self.dist.is_main
        self._log = log if self.is_main else (lambda line: None)
        if cfg.device == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank if self.dist.enabled
                                       else torch.cuda.current_device())
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            self.device = torch.device("cpu")
        self.fused = cfg.fused and self.device.type == "cuda"
        if cfg.fused and not self.fused:
            models.warn_once("fused_cpu", "--fused: no CUDA device, so the Triton kernels are not used; "
                       "running the PyTorch references kernels.sqrt_pool2d_ref and "
                       "kernels.barlow_twins_loss_ref instead")
        self.amp_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        world = self.dist.world_size
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} "
                             "processes of this job")
        if cfg.batch_size // world < 2:
            raise ValueError(f"--batch-size {cfg.batch_size} over {world} processes gives "
                             f"{cfg.batch_size // world} image pair(s) per process; Barlow Twins "
                             "needs batch statistics: at least 2 per process")
        self.prof = Profiler(self.device, enabled=cfg.profile)
        self.windows = _Windows(self.prof, cfg.profile_phases)
        self.loss_fn = BarlowTwinsLoss(cfg.lambd, cfg.loss_scale, self.fused, world,
                                       cuda_graphs=cfg.loss_cuda_graphs)

        # ---- data
        self.bundle = bundle if bundle is not None else build_bundle(cfg, self.dist)
        n = len(self.bundle.train_ssl)
        if n < cfg.batch_size:
            raise ValueError(f"the {cfg.dataset} training set has {n} images, fewer than one "
                             f"batch of --batch-size {cfg.batch_size}")
        self.sampler = EpochBatches(n, cfg.batch_size, cfg.seed, self.dist.rank, world)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        # Each worker prepares whole batches, 2 ahead: cap the host memory they hold (a batch of
        # 1024 pairs at 224 px is 1.2 GB of float32; 15 workers x 2 of them would be 37 GB).
        pair_bytes = 2 * 3 * cfg.image_size ** 2 * 4
        fit = int(LOADER_HOST_BYTES // (2 * pair_bytes * self.sampler.local_batch))
        workers = min(cfg.workers, max(1, fit)) if cfg.workers > 0 else 0
        self.workers = workers
        self.loader = DataLoader(
            SeededPairs(self.bundle.train_ssl), batch_sampler=self.sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None, generator=torch.Generator())

        # ---- models, optimizers (sequential: a block's head and optimizer are built when it starts)
        self.blocks = initial_blocks(cfg).to(self.device, memory_format=self.memory_format)
        self.heads: List[Optional[nn.Module]] = [None] * 4
        self.optimizers: List[Optional[torch.optim.Optimizer]] = [None] * 4
        self.stages: List[Optional[nn.Module]] = [None] * 4
        self.model: Optional[nn.Module] = None  # e2e
        self.base_lr = optim.scaled_lr(cfg.lr, cfg.batch_size)
        if cfg.mode == "e2e":
            self.heads[3] = self._new_head(3)
            self.model = self._wrap(EndToEnd(self.blocks, self.heads[3], self.loss_fn,
                                             cfg.noise_std, self.windows,
                                             cfg.checkpointed_blocks()))
            self.optimizers[3] = self._new_optimizer(nn.ModuleList([self.blocks, self.heads[3]]))
        elif cfg.mode == "simultaneous":
            for k in range(4):
                self._start_stage(k)

        # ---- state, resume
        self.state = TrainState()
        self.last_checkpoint: Optional[str] = None
        self.peaks: Dict[str, float] = {}  # GiB per block (or "step"), CUDA only
        self._pending: List[Tuple[int, torch.Tensor]] = []  # (step, losses) not yet checked
        self._lr = 0.0
        self.data_wait_s = self.sample_time_s = 0.0
        self.samples = 0
        self.measured_steps = 0
        #: with --profile, one record per measured segment (a block in sequential mode, else the
        #: run): bytes of parameters and optimizer state resident at its end (profile.json meta)
        self.resident: List[Dict[str, int]] = []
        #: with --profile, per measured segment: matmul and convolution flops of one training
        #: step on this process (forward, backward, recomputation), counted by
        #: torch.utils.flop_counter in the segment's last warm-up step; None: not counted (no
        #: warm-up step in this process)
        self.flops_per_step: List[Optional[int]] = []
        #: the largest resident_bytes() at the end of a phase (sequential: of a block)
        self.resident_max: Dict[str, int] = {"parameters_bytes": 0, "optimizer_state_bytes": 0}
        self._flops_counted: Optional[int] = None
        torch.manual_seed(_mix(cfg.seed, 3, self.dist.rank))  # the noise generator
        self._resume_ckpt: Optional[dict] = None
        if cfg.resume:
            self._load(cfg.resume)
        if cfg.mode == "sequential" and self.state.block < 4:
            self._begin_block(self.state.block, self._resume_ckpt)
        self._resume_ckpt = None
        if self.is_main:
            os.makedirs(run_dir, exist_ok=True)
            self._trim_metrics()

    # ---- building pieces -------------------------------------------------------------------
    def _new_head(self, k: int) -> nn.Module:
        head = initial_head(self.cfg, k, self.fused)
        if self.dist.enabled:
            if self.device.type == "cuda":
                head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
            else:
                models.warn_once("syncbn_cpu", "SyncBatchNorm needs CUDA: on CPU (gloo) each process "
                           "normalises the heads with its own batch statistics")
        return head.to(self.device, memory_format=self.memory_format)

    def _new_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        cfg = self.cfg
        if cfg.optimizer == "lars":
            return optim.LARS(optim.param_groups(module, cfg.weight_decay), lr=self.base_lr,
                              weight_decay=cfg.weight_decay, eta=cfg.lars_eta)
        return optim.build_optimizer(cfg.optimizer, module, self.base_lr, cfg.weight_decay)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, gradient_as_bucket_view=True)

    def _start_stage(self, k: int) -> None:
        self.heads[k] = self._new_head(k)
        self.stages[k] = self._wrap(Stage(k, self.blocks[k], self.heads[k], self.loss_fn,
                                          self.cfg.noise_std, self.windows,
                                          self.cfg.checkpointed_blocks()[k]))
        self.optimizers[k] = self._new_optimizer(nn.ModuleList([self.blocks[k], self.heads[k]]))

    def _begin_block(self, b: int, ckpt: Optional[dict] = None) -> None:
        """Sequential: freeze blocks before b (eval mode, no grad), build block b's head/optimizer."""
        for j in range(b):
            self.blocks[j].eval().requires_grad_(False)
        self.blocks[b].train().requires_grad_(True)
        self._start_stage(b)
        if ckpt is not None and ckpt["heads"][b] is not None:
            self.heads[b].load_state_dict(ckpt["heads"][b])
            self.optimizers[b].load_state_dict(ckpt["optimizers"][b])

    def _finish_block(self, b: int) -> None:
        """Sequential: freeze block b; release its head and optimizer state (memory back)."""
        self.blocks[b].eval().requires_grad_(False)
        self.heads[b] = self.stages[b] = self.optimizers[b] = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- schedule ----------------------------------------------------------------------------
    def plan(self, b: int) -> Tuple[int, int]:
        """(total steps, warm-up steps) of phase b (a block in sequential mode, else the run)."""
        cfg = self.cfg
        epochs = cfg.block_epoch_list()[b if cfg.mode == "sequential" else 0]
        if cfg.steps_per_block is not None:
            total = cfg.steps_per_block
            warmup = round(total * min(1.0, cfg.warmup_epochs / epochs))
        else:
            total = epochs * self.steps_per_epoch
            warmup = min(total, round(cfg.warmup_epochs * self.steps_per_epoch))
        return total, warmup

    def total_steps(self) -> int:
        """Steps of the whole run (capped by --max-steps)."""
        phases = range(4) if self.cfg.mode == "sequential" else range(1)
        total = sum(self.plan(b)[0] for b in phases)
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def capped(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> Dict:
        """Train to the end (or --max-steps); returns the run's figures."""
        cfg, st = self.cfg, self.state
        self._bar = _progress(self.total_steps(), st.step, self.is_main)
        self._t_run = self._t_log = time.perf_counter()
        self._time_before = st.time_s  # a resumed run's metrics continue its clock
        self._steps_at_log = st.step
        phases = range(st.block, 4) if cfg.mode == "sequential" else range(1)
        try:
            for b in phases:
                if cfg.mode == "sequential" and self.stages[b] is None:
                    self._begin_block(b)
                total, warmup = self.plan(b)
                measuring = False
                # warm-up counts steps run by this process in this phase: a resumed run starts
                # cold (kernels to compile, allocator empty) whatever step it resumes at
                here0 = st.block_step
                with contextlib.ExitStack() as measured:
                    while st.block_step < total and not self.capped():
                        for x1, x2 in self._batches():
                            if self.prof.enabled and not measuring \
                                    and st.block_step - here0 >= cfg.profile_warmup:
                                # the first profile_warmup steps of each phase stay outside
                                measured.enter_context(self.prof.measure())
                                measuring = True
                            lr = optim.warmup_cosine(st.block_step, total, warmup, self.base_lr)
                            if self.prof.enabled and \
                                    st.block_step - here0 == cfg.profile_warmup - 1:
                                # the last warm-up step: outside the measured part, so the
                                # counter's per-op overhead costs no measured time
                                with FlopCounterMode(display=False) as counter:
                                    losses = self.train_step(x1, x2, lr, b)
                                self._flops_counted = int(counter.get_total_flops())
                            else:
                                losses = self.train_step(x1, x2, lr, b)
                            st.step += 1
                            st.block_step += 1
                            st.batch += 1
                            if measuring:
                                self.prof.add_images(cfg.batch_size)
                                self.measured_steps += 1
                            self._after_step(losses, lr, b, last=st.block_step >= total)
                            if st.block_step >= total or self.capped():
                                break
                        if st.batch == self.steps_per_epoch:  # the epoch is complete
                            st.epoch, st.batch = st.epoch + 1, 0
                            self.save_checkpoint()
                    resident = self.resident_bytes()  # this phase's heads and optimizer state
                    if measuring:
                        self.resident.append(resident)
                        self.flops_per_step.append(self._flops_counted)
                    if sum(resident.values()) > sum(self.resident_max.values()):
                        self.resident_max = resident
                self._flops_counted = None
                if st.block_step < total:  # stopped by --max-steps
                    break
                if cfg.mode == "sequential":
                    self._finish_block(b)
                    st.block, st.block_step, st.epoch, st.batch = b + 1, 0, 0, 0
            self._flush_log()
            self.save_checkpoint()
        finally:
            self._bar.close()
        return self.summary()

    def train_step(self, x1: torch.Tensor, x2: torch.Tensor, lr: float, b: int = 0) -> torch.Tensor:
        """One optimisation step; returns the step's losses (one per trained block) on the device."""
        prof = self.windows
        with prof.window("step"):
            if self.cfg.mode == "e2e":
                self._mem_begin()
                optim.set_lr(self.optimizers[3], lr)
                if self.cfg.split_views:
                    _, _, loss = self._split_views(self.model, x1, x2, "backward",
                                                   keep_outputs=False)
                else:
                    with self._autocast():
                        loss = self.model(x1, x2)  # windows block{k}/forward and head inside
                    with prof.window("backward"):
                        (loss * self.loss_fn.grad_factor).backward()
                with prof.window("optimizer"):
                    self.optimizers[3].step()
                    self.optimizers[3].zero_grad(set_to_none=True)
                self._mem_end("step")
                return loss.detach().reshape(1)
            if self.cfg.mode == "sequential":
                self._mem_begin()
                with torch.no_grad():  # the frozen blocks before b
                    for j in range(b):
                        with prof.window(f"block{j + 1}"), prof.window(f"block{j + 1}/forward"), \
                                self._autocast():
                            x1 = models.add_noise(self.blocks[j](x1), self.cfg.noise_std)
                            x2 = models.add_noise(self.blocks[j](x2), self.cfg.noise_std)
                trained = [b]
            else:
                trained = range(4)
            losses = []
            for k in trained:
                last = k == trained[-1]  # its outputs feed nothing: not kept (--split-views)
                with prof.window(f"block{k + 1}"):
                    if self.cfg.mode == "simultaneous":
                        self._mem_begin()
                    optimizer = self.optimizers[k]
                    optim.set_lr(optimizer, lr)
                    if self.cfg.split_views:
                        f1, f2, loss = self._split_views(self.stages[k], x1, x2,
                                                         f"block{k + 1}/backward",
                                                         keep_outputs=not last)
                    else:
                        with self._autocast():
                            f1, f2, loss = self.stages[k](x1, x2)  # block{k}/forward, /head
                        with prof.window(f"block{k + 1}/backward"):
                            # frees block k's graph: its activations are gone before block k+1
                            (loss * self.loss_fn.grad_factor).backward()
                    with prof.window(f"block{k + 1}/optimizer"):
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if self.cfg.mode == "simultaneous":
                        self._mem_end(f"block{k + 1}")
                losses.append(loss.detach())
                if not last:
                    x1, x2 = f1.detach(), f2.detach()  # stop-gradient between blocks
                del f1, f2, loss
            if self.cfg.mode == "sequential":
                self._mem_end(f"block{b + 1}")
            return torch.stack(losses)

    def _split_views(self, module: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                     backward_window: str, keep_outputs: bool = True):
        """Back-propagate the two views one after the other (``--split-views``).

        The loss couples the views (view 1's gradient needs z2), so view 2 first runs without a
        graph for its embedding (BatchNorm running statistics restored afterwards), then view 1
        with a graph: loss, backward (view 1's graph freed), then view 2 again with a graph:
        loss against the detached z1, backward; the parameter gradients add up to the joint
        step's. Only one view's activations are alive at a time (half the joint step's), for one
        extra forward without graph. With noise, each view gets the noise of the joint step
        (``_NoisePlan``), and the generator ends where the joint step leaves it.
        Returns (f1, f2, loss) like the joint step; with ``keep_outputs=False`` (the last block a
        step trains: its outputs feed no other block) (None, None, loss), and view 1's block
        output is released before view 2's pass instead of living through it (at block 1 of a
        ResNet-50 at 224 px, batch 256, bf16: 392 MiB of the sequential peak).
        """
        global _NOISE_PLAN
        plan = _NoisePlan(self._device_rng) if self.cfg.noise_std > 0 else None
        _NOISE_PLAN = plan
        try:
            return self._split_views_planned(module, x1, x2, backward_window, keep_outputs, plan)
        finally:
            _NOISE_PLAN = None

    def _split_views_planned(self, module, x1, x2, backward_window, keep_outputs, plan):
        factor = self.loss_fn.grad_factor
        saved = _bn_buffers(module)
        with torch.no_grad(), self._autocast():
            _, z2 = module(x2)  # view 2's embedding, no graph
        after = self._device_rng() if plan is not None else None  # where the joint step ends
        if plan is not None:
            plan.start(1)
        for buf, copy in saved:
            buf.copy_(copy)  # as if this pass had not happened
        del saved
        no_sync = module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()
        with no_sync:  # DDP: one gradient all-reduce per step, after view 2's backward
            with self._autocast():
                f1, z1 = module(x1)
                loss = self.loss_fn(z1, z2)
            with self.windows.window(backward_window):
                (loss * factor).backward()  # frees view 1's graph
        del z2
        if not keep_outputs:
            f1 = None
        if plan is not None:
            plan.start(2)  # view 2's noise again
        with self._autocast():
            f2, z2 = module(x2)
            loss2 = self.loss_fn(z1.detach(), z2)
        with self.windows.window(backward_window):
            (loss2 * factor).backward()  # frees view 2's graph
        if after is not None:
            self._device_rng(after)
        return (f1, f2, loss) if keep_outputs else (None, None, loss)

    def _device_rng(self, state: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Get (no argument) or set the generator the noise draws from."""
        if self.device.type == "cuda":
            if state is None:
                return torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(state, self.device)
        else:
            if state is None:
                return torch.get_rng_state()
            torch.set_rng_state(state)
        return None

    def _batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch, on the device.

        On CUDA the next batch is copied on a side stream while the current step computes (the
        loader's pinned buffers make the copy asynchronous); the compute stream waits for it only
        when it uses the batch. Under bf16 autocast the images are converted to bf16 on arrival:
        the first convolution would cast them anyway (the same values), and the current and the
        prefetched batch then hold half the bytes (ResNet-50 at 224 px, batch 256: 294 MiB less
        at every mode's peak).
        """
        self.sampler.set_position(self.state.epoch, self.state.batch)
        it = iter(self.loader)
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None

        def fetch():
            t0 = time.perf_counter()
            try:
                x1, x2, seconds = next(it)  # waits for the loader
            except StopIteration:
                return None
            self.data_wait_s += time.perf_counter() - t0
            self.sample_time_s += float(seconds.sum())
            self.samples += len(seconds)
            with torch.cuda.stream(copy_stream) if cuda else contextlib.nullcontext():
                out = [x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                       for x in (x1, x2)]
                if self.amp_dtype is not None:
                    out = [x.to(self.amp_dtype) for x in out]
                return out

        nxt = fetch()
        while nxt is not None:
            batch = nxt
            if cuda:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(copy_stream)
                for x in batch:
                    x.record_stream(current)  # the allocator must not reuse it early
            nxt = fetch()  # the next copy overlaps this step
            yield batch[0], batch[1]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def resident_bytes(self) -> Dict[str, int]:
        """Bytes of the tensors that live across steps: parameters (blocks and the heads that
        exist now, fp32 master weights) and optimizer state (LARS momentum, Adam moments).
        Each storage is counted once."""
        def nbytes(tensors) -> int:
            seen = {}
            for t in tensors:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            return sum(seen.values())
        modules = [self.blocks] + [h for h in self.heads if h is not None]
        params = [p for m in modules for p in m.parameters()]
        state = [t for o in self.optimizers if o is not None for st in o.state.values()
                 for t in st.values() if torch.is_tensor(t)]
        return {"parameters_bytes": nbytes(params), "optimizer_state_bytes": nbytes(state)}

    # ---- memory per block (CUDA; with --profile the profiler measures it instead) ------------
    def _mem_begin(self) -> None:
        if self.device.type == "cuda" and not self.prof.enabled:
            torch.cuda.reset_peak_memory_stats(self.device)  # host-side allocator stats: no sync

    def _mem_end(self, key: str) -> None:
        if self.device.type == "cuda" and not self.prof.enabled:
            peak = torch.cuda.max_memory_allocated(self.device) / GIB
            self.peaks[key] = max(self.peaks.get(key, 0.0), peak)

    def peak_memory_gib(self) -> Optional[float]:
        if self.device.type != "cuda":
            return None
        if self.prof.enabled:
            peak = self.prof.peak_memory()
            return peak["peak_allocated_gib"] if peak else None
        return max(self.peaks.values()) if self.peaks else None

    # ---- logging, non-finite check -----------------------------------------------------------
    def _block_names(self, b: int) -> List[str]:
        if self.cfg.mode == "e2e":
            return ["4"]
        if self.cfg.mode == "sequential":
            return [str(b + 1)]
        return ["1", "2", "3", "4"]

    def _after_step(self, losses: torch.Tensor, lr: float, b: int, last: bool) -> None:
        self._pending.append((self.state.step, losses))
        self._lr, self._phase = lr, b
        self._bar.update(1)
        if self.state.step % self.cfg.log_interval == 0 or last or self.capped():
            self._flush_log()

    def _check_finite(self) -> Optional[torch.Tensor]:
        """Raise NonFiniteLoss on the first NaN/inf loss not yet checked (host-device sync)."""
        if not self._pending:
            return None
        values = torch.stack([l.float() for _, l in self._pending]).cpu()  # sync point
        bad = ~torch.isfinite(values)
        if bad.any():
            i, j = [int(v) for v in bad.nonzero()[0]]
            step = self._pending[i][0]
            block = self._block_names(self._phase)[j]
            raise NonFiniteLoss(block + (" (e2e head)" if self.cfg.mode == "e2e" else ""),
                                step, float(values[i, j]), self.last_checkpoint)
        return values

    def _run_time(self, now: float) -> float:
        """The run's training time at ``now`` (perf_counter), a resume continuing the saved one."""
        return self._time_before + now - self._t_run

    def _flush_log(self) -> None:
        values = self._check_finite()
        if values is None:
            return
        now = time.perf_counter()
        n = self.state.step - self._steps_at_log
        ms = (now - self._t_log) / max(n, 1) * 1000
        mem = self.peak_memory_gib()
        mean = values.mean(0).tolist()
        names = self._block_names(self._phase)
        mem_text = f"{mem:6.2f} GiB" if mem is not None else "   n/a (cpu)"
        losses = " ".join(f"{v:9.4f}" for v in mean)
        line = (f"step {self.state.step:7d} | block {','.join(names):7s} | loss {losses} | "
                f"lr {self._lr:.3e} | {ms:8.1f} ms/step | mem {mem_text}")
        self._bar.write(line) if self._bar.enabled else self._log(line)
        if self.is_main:
            with open(os.path.join(self.run_dir, METRICS), "a") as fh:
                for name, value in zip(names, mean):
                    # the record's own block (simultaneous, sequential) where it is measured
                    # alone; else (e2e: one window; --profile) the run's peak so far
                    block_mem = self.peaks.get(f"block{name}", mem)
                    fh.write(json.dumps({
                        "step": self.state.step, "block": int(name), "loss": value,
                        "lr": self._lr, "ms_per_step": ms, "peak_memory_gib": block_mem,
                        "epoch": self.state.epoch, "phase_step": self.state.block_step,
                        "time_s": self._run_time(now)}) + "\n")
        self._pending.clear()
        self._t_log, self._steps_at_log = now, self.state.step

    def _trim_metrics(self) -> None:
        """On resume: drop metric lines written after the checkpoint (they will be redone)."""
        path = os.path.join(self.run_dir, METRICS)
        if not os.path.exists(path):
            return
        lines, torn = [], 0
        with open(path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):  # e.g. cut short by a kill mid-write
                    torn += 1
                    continue
                if step <= self.state.step:
                    lines.append(line if line.endswith("\n") else line + "\n")
        if torn:
            warnings.warn(f"{path}: dropped {torn} unreadable line(s) (a write cut short when the "
                          "run was stopped)", RuntimeWarning, stacklevel=2)
        atomic_write_lines(path, lines)

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {
            "schema": SCHEMA,
            "config": self.cfg.to_dict(),
            "state": asdict(self.state),
            "blocks": self.blocks.state_dict(),
            "heads": [h.state_dict() if h is not None else None for h in self.heads],
            "optimizers": [o.state_dict() if o is not None else None for o in self.optimizers],
            "rng": rng_state(),
            "world_size": self.dist.world_size,
        }

    def _rng_per_rank(self) -> Optional[List[Dict]]:
        """Every rank's generator state (collective: call on every rank), or None alone.
        Each rank draws its own noise, so a resume restores each rank's own stream."""
        if not self.dist.enabled:
            return None
        states: List[Optional[Dict]] = [None] * self.dist.world_size
        dist.all_gather_object(states, rng_state())
        return states

    def save_checkpoint(self) -> Optional[str]:
        """checkpoint.pt in the run directory, atomically (rank 0); only after a finite loss.

        Steps not yet logged are logged first: a resume redoes only the steps after the
        checkpoint, so metrics.jsonl would otherwise never record these."""
        if not self.cfg.checkpoint:
            self._check_finite()
            return None
        self._flush_log()
        if hasattr(self, "_t_run"):  # inside fit: the clock goes on; else it is the saved one
            self.state.time_s = self._run_time(time.perf_counter())
        per_rank = self._rng_per_rank()
        if not self.is_main:
            return None
        path = os.path.join(self.run_dir, CHECKPOINT)
        sd = self.state_dict()
        if per_rank is not None:
            sd["rng_per_rank"] = per_rank
        atomic_torch_save(sd, path)
        self.last_checkpoint = f"{path} (step {self.state.step})"
        return path

    def _load(self, where: str) -> None:
        ckpt = load_checkpoint(where, map_location=str(self.device))
        st = TrainState(**ckpt["state"])
        if ckpt["config"]["mode"] != self.cfg.mode:
            raise ValueError(f"the checkpoint is a {ckpt['config']['mode']} run, not {self.cfg.mode}")
        self.blocks.load_state_dict(ckpt["blocks"])
        if self.cfg.mode != "sequential":
            for k in range(4):
                if self.heads[k] is not None:
                    self.heads[k].load_state_dict(ckpt["heads"][k])
                    self.optimizers[k].load_state_dict(ckpt["optimizers"][k])
        self.state = st
        rng = ckpt["rng"]
        saved_world = ckpt.get("world_size", 1)
        per_rank = ckpt.get("rng_per_rank")
        if saved_world != self.dist.world_size:
            warnings.warn(f"resuming a {saved_world}-process run on {self.dist.world_size} "
                          "process(es): the global batches are the same, but the blocks' batch "
                          "statistics and the noise streams are split differently, so the "
                          "continuation is not exact", RuntimeWarning, stacklevel=2)
        elif per_rank is not None:
            rng = per_rank[self.dist.rank]
        if rng.get("cuda") is not None and self.device.type == "cuda":
            rng = {**rng, "cuda": [s.cpu() for s in rng["cuda"]]}
        rng = {**rng, "torch": rng["torch"].cpu()}
        set_rng_state(rng)
        self._resume_ckpt = ckpt
        self.last_checkpoint = f"{where} (step {st.step})"

    # ---- results -----------------------------------------------------------------------------
    def summary(self) -> Dict:
        elapsed = time.perf_counter() - self._t_run
        done = self._bar.n - self._bar.initial if hasattr(self, "_bar") else 0
        pairs = done * self.cfg.batch_size  # the global batch: pairs of all processes
        # every process runs its own loader (workers, or itself) on its share of each batch:
        # the job's capacity, to set beside the job's pairs/s
        loader = self.dist.world_size * (self.workers or 1) * self.samples / self.sample_time_s \
            if self.sample_time_s > 0 else None
        return {
            "mode": self.cfg.mode,
            "steps": self.state.step,
            "steps_this_process": done,
            "time_s": elapsed,
            "run_time_s": self._time_before + elapsed,  # all sessions of a resume
            "pairs_per_s": pairs / elapsed if elapsed > 0 else None,
            "loader_capacity_pairs_per_s": loader,
            "data_wait_share": self.data_wait_s / elapsed if elapsed > 0 else None,
            "peak_memory_gib": self.peak_memory_gib(),
            "peak_memory_gib_per_block": dict(self.peaks) or None,
            "parameters_gib": self.resident_max["parameters_bytes"] / GIB,
            "optimizer_state_gib": self.resident_max["optimizer_state_bytes"] / GIB,
            "measured_steps": self.measured_steps,
            "loader_workers": self.workers,
            "world_size": self.dist.world_size,
            "last_checkpoint": self.last_checkpoint,
            "untrained_blocks": self.untrained_blocks(),
        }

    def untrained_blocks(self) -> List[int]:
        """Blocks (1-based) that no step of this run has trained: in sequential mode, those after
        the block --max-steps stopped in (their weights are their random initialisation)."""
        if self.cfg.mode != "sequential":
            return []
        first = self.state.block + (1 if self.state.block_step > 0 else 0)
        return list(range(first + 1, 5))

    def close(self) -> None:
        self.prof.close()



class _NoBar:
    enabled = False
    n = initial = 0

    def update(self, k):
        self.n += k

    def write(self, line):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, is_main: bool):
    """A tqdm bar on rank 0 when stderr is a terminal; log lines go through ``bar.write``."""
    import sys
    if not is_main or not sys.stderr.isatty():
        bar = _NoBar()
        bar.n = bar.initial = initial
        return bar
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    bar.enabled = True
    return bar
