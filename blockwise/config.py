"""Every setting of a run: one dataclass, validated in ``__post_init__``; the CLI is generated from it.

A field left at ``None`` means "resolved from the dataset / device" (see :data:`RECIPES` and each
field's help). ``Config(**values)`` resolves and validates; the resolved config (concrete values
only) is what gets printed, saved as ``config.json`` and stored in every checkpoint, so a run can
be reproduced from its directory alone.

Three recipes:
- ``paper`` (ImageNet-sized images, > 64 px): ResNet-50, expander 2048, projector 8192-8192-8192,
  LARS (eta 0.001, momentum 0.9, weight decay 1e-6), base lr 0.2 scaled by batch/256, loss scale
  0.024, lambda 0.0051, 300 epochs, 10 warmup epochs; linear probe 100 epochs, SGD lr 0.1.
- ``small`` (<= 64 px, e.g. CIFAR-10): ResNet-18 with the small stem and no expander (its last
  block already has 512 channels; an expander to 2048 on a 32x32 map would cost more than the
  backbone), projector 8192-8192-8192 as the paper, and the optimiser settings of solo-learn's
  CIFAR Barlow Twins recipe: LARS eta 0.02, base lr 0.3, weight decay 1e-4, loss scale 0.1. The
  paper's eta 0.001 moves each weight by lr * eta of its norm per step: fine for 187k ImageNet
  steps, almost nothing in a short run (on digits the features stayed those of the random init).
- ``digits`` (the embedded default dataset) keeps the small recipe except what the time budget
  forces: 16 px images (the digits are 8x8), projector 512-512-512, batch 128, 10 epochs. The
  default command ``python -m blockwise.train --fused`` then pre-trains and probes within the
  5-minute budget on 2 CPU cores (measured: ``time python -m blockwise.train --fused``, 3 min
  11 s wall, 110 steps in 178 s, on a 2-vCPU VM (AMD EPYC), torch 2.14.1, while
  other jobs kept the load average near 2). Random-init ResNet features already probe at about 96-98% on digits,
  so this run shows the pipeline, not a learning gain; the learning check is
  scripts/gpu_learning_check.sh on CIFAR-10-sized data.

Learning rate: one base lr for every parameter group (``lr * global_batch / 256``), as the Barlow
Twins code the paper forked (its ``--scale-loss 0.024``). With the loss scaled by 0.024 the LARS
weights are unaffected by the scale (the trust ratio removes it) and the biases / norm parameters
(excluded from LARS) effectively get lr 0.2 * 0.024 = 0.0048 per unit of unscaled gradient: the
later official code's ``--learning-rate-biases 0.0048``. SGD and AdamW get their own defaults
(``OPTIMIZER_DEFAULTS``), scaled the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, get_type_hints

#: training modes; see blockwise/trainer.py
MODES = ("e2e", "simultaneous", "sequential")
#: numeric precision of forward/backward: "auto" = bf16 autocast on CUDA, fp32 on CPU
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cuda", "cpu")

#: the resolved defaults of fields left at None, per recipe (see the module docstring)
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": dict(arch="resnet50", projector="8192-8192-8192", batch_size=256, epochs=300,
                  loss_scale=0.024, lr=0.2, weight_decay=1e-6, lars_eta=0.001),
    "small": dict(arch="resnet18", projector="8192-8192-8192", batch_size=256, epochs=300,
                  loss_scale=0.1, lr=0.3, weight_decay=1e-4, lars_eta=0.02),
    "digits": dict(arch="resnet18", projector="512-512-512", batch_size=128, epochs=10,
                   loss_scale=0.1, lr=0.3, weight_decay=1e-4, lars_eta=0.02, image_size=16),
}
#: natural image size per dataset (digits: see RECIPES)
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "imagefolder": 224, "synthetic": 224}
#: default base learning rate (at batch 256) and weight decay of SGD and AdamW (LARS: RECIPES)
OPTIMIZER_DEFAULTS = {"sgd": (0.05, 1e-5), "adamw": (1e-3, 0.05)}
SMALL_IMAGE_MAX = 64


def _f(default, help: str, **meta):
    """A dataclass field with its documentation (used for --help)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Config:
    """Settings of one pre-training run (+ linear probe). ``None`` = resolved per dataset/device."""

    # ---- what is trained
    mode: str = _f("simultaneous", "e2e (one head on block 4, one backward through all), "
                   "simultaneous (all blocks every step, each block's backward and optimizer step "
                   "before the next block's forward), or sequential (one block after the other, "
                   "earlier blocks frozen)")
    arch: Optional[str] = _f(None, "backbone: resnet18 or resnet50 (default: resnet50 for images "
                             "> 64 px, resnet18 otherwise)")
    small_stem: Optional[bool] = _f(None, "3x3 stride-1 conv1 and no max-pool (default: on for "
                                    "images <= 64 px)")
    expander: Optional[int] = _f(None, "channels of the 1x1 conv + BN + ReLU expander of each head "
                                 "(0 = none; default: 2048 for resnet50 as the paper, 0 for resnet18)")
    pool: str = _f("avg", "spatial pooling of each head: avg or sqrt (square-root / L2 pooling)")
    pool_window: Optional[int] = _f(None, "pooling window k (k x k, stride k, then the mean over "
                                    "positions); default: global pooling")
    expander_recompute: bool = _f(True, "expander+pooling without storing the Cout x H x W map: BN "
                                  "statistics from the input's second moments, the map recomputed "
                                  "chunk by chunk in backward; ~1 extra 1x1 conv of compute per head "
                                  "(global pooling only; window pooling keeps the plain path)")
    projector: Optional[str] = _f(None, "projector widths, e.g. 8192-8192-8192 (default: that, "
                                  "as the paper; 512-512-512 for digits)")
    split_views: bool = _f(False, "back-propagate the two views one after the other: half the "
                           "activation memory of a step, for one extra forward (no graph) of each "
                           "block and head; exact (per-view BatchNorm statistics as in the joint "
                           "step). Applies to every mode, e2e included")
    activation_checkpointing: bool = _f(False, "keep only each residual unit's input (block 1's "
                                        "stem as one unit) and recompute the unit's activations "
                                        "in the backward: a fraction of the activation memory for "
                                        "about one extra forward of each trained block; exact "
                                        "(BatchNorm's running statistics are updated once). "
                                        "Applies to every mode, e2e included")
    checkpoint_blocks: Optional[str] = _f(None, "with --activation-checkpointing: the blocks "
                                          "(1-4, comma-separated) recomputed, e.g. 1: at 224 px "
                                          "block 1 holds about half of a ResNet's activations "
                                          "for the least compute (default: all four)")
    noise_std: float = _f(0.0, "noise at block outputs during training: x + std * N(0,1) * std(x) "
                          "(the paper uses 0.25; 0 = off)")
    # ---- loss
    lambd: float = _f(0.0051, "Barlow Twins off-diagonal weight lambda")
    loss_scale: Optional[float] = _f(None, "Barlow Twins loss scale (default 0.024, the paper's "
                                     "ImageNet value; 0.1 for small images, as solo-learn)")
    fused: bool = _f(False, "Triton kernels for the loss and square-root pooling "
                     "(kernels.barlow_twins_loss / sqrt_pool2d); without CUDA: a warning and the "
                     "PyTorch references")
    loss_cuda_graphs: bool = _f(False, "with --fused on CUDA, single process: replay the Barlow "
                                "Twins loss from CUDA graphs (kernels.barlow_twins_loss("
                                "cuda_graphs=True): less host time per call, the same values)")
    # ---- data
    dataset: str = _f("digits", "digits (embedded, default), cifar10, imagefolder, or synthetic")
    data_dir: Optional[str] = _f(None, "dataset directory (cifar10, imagefolder)")
    download: bool = _f(False, "download the dataset into --data-dir (cifar10)")
    image_size: Optional[int] = _f(None, "training image size (default: 16 digits, 32 cifar10, "
                                   "224 imagefolder / synthetic)")
    num_classes: int = _f(10, "classes of the synthetic dataset")
    synthetic_size: int = _f(4096, "images in the synthetic training set")
    synthetic_augment: bool = _f(False, "full augmentation on synthetic images (default: the image "
                                 "and its mirror, so the loader never limits a throughput study)")
    workers: Optional[int] = _f(None, "data-loading worker processes per rank (default on CUDA: "
                                "CPU cores - 1, 1..16; on CPU: cores / 4, at most 4, so 0 on a "
                                "2-core machine)")
    # ---- optimisation
    optimizer: str = _f("lars", "lars, sgd or adamw")
    lr: Optional[float] = _f(None, "base learning rate at batch 256, scaled by global batch / 256 "
                             "(default: lars 0.2, or 0.3 for small images; sgd 0.05; adamw 1e-3)")
    weight_decay: Optional[float] = _f(None, "weight decay (biases and norms excluded; default: "
                                       "lars 1e-6, or 1e-4 for small images; sgd 1e-5; adamw "
                                       "0.05)")
    lars_eta: Optional[float] = _f(None, "LARS trust coefficient eta (default 0.001 as the "
                                   "paper; 0.02 for small images, as solo-learn's CIFAR recipe)")
    batch_size: Optional[int] = _f(None, "global batch size (image pairs per step over all ranks; "
                                   "default 256, digits 128)")
    epochs: Optional[int] = _f(None, "epochs (per block in sequential mode; default 300, digits 10)")
    block_epochs: Optional[str] = _f(None, "sequential: epochs per block, e.g. 10,10,20,20 "
                                     "(overrides --epochs)")
    steps_per_block: Optional[int] = _f(None, "sequential: train each block this many steps "
                                        "instead of epochs (profiling)")
    warmup_epochs: Optional[float] = _f(None, "linear warm-up epochs before the cosine decay "
                                        "(default: 10 as the paper, at most a tenth of the run; "
                                        "finite, and at most the run's epochs or, in "
                                        "sequential mode, the shortest block's)")
    max_steps: Optional[int] = _f(None, "stop after this many optimisation steps of the whole run "
                                  "(smoke tests, profiling); the schedule is not shortened")
    # ---- hardware
    device: str = _f("auto", "auto (cuda when available), cuda or cpu")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    channels_last: Optional[bool] = _f(None, "channels-last memory format (default: on CUDA)")
    seed: int = _f(0, "seed of the initialisation, data order and augmentation")
    # ---- linear probe
    probe_epochs: Optional[int] = _f(None, "linear-probe epochs on cached features (default 100 "
                                     "as the paper; 0 = no probe)")
    probe_lr: float = _f(0.1, "linear-probe SGD learning rate (cosine schedule)")
    probe_batch_size: int = _f(256, "linear-probe batch size")
    probe_control: bool = _f(True, "also probe the same architecture at its random initialisation")
    # ---- run directory, logging
    out: Optional[str] = _f(None, "run directory (default: runs/<timestamp>)")
    resume: Optional[str] = _f(None, "continue a run: its directory or checkpoint file; settings "
                               "come from its config (flags given again must agree, except "
                               "those that leave the trajectory alone: RESUME_MUTABLE, e.g. "
                               "max_steps, workers, logging, checkpoint, probe and profiling "
                               "flags, the exact memory options, --data-dir, --download; "
                               "--max-steps is not inherited)")
    checkpoint: Optional[bool] = _f(None, "write checkpoint.pt every epoch and at the end "
                                    "(default: on, off with --profile)")
    log_interval: int = _f(20, "steps between log lines (each one synchronises the device)")
    profile: bool = _f(False, "profile time, memory and energy per block (profile.json)")
    profile_warmup: int = _f(5, "steps (per block in sequential mode) before the measured part")
    profile_phases: bool = _f(False, "with --profile: also time each block and phase (forward, "
                              "head, backward, optimizer; time and energy per window). Every "
                              "timed window synchronizes the device at both ends, which lowers "
                              "the measured throughput (by 28-35 percent for ResNet-50, batch "
                              "256, on an H100 with a slow host); off: time and energy of the measured steps as "
                              "a whole (one sync at each end), every window records peak "
                              "memory alone, without a sync")

    def __post_init__(self):
        self._check_types()
        from blockwise import data, models, optim  # the registries own the valid names

        _choice("mode", self.mode, MODES)
        _choice("dataset", self.dataset, data.DATASETS)
        _choice("optimizer", self.optimizer, optim.OPTIMIZERS)
        _choice("pool", self.pool, models.POOLS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        recipe = RECIPES[self.recipe_name()]

        # ---- resolve what was left at None
        if self.image_size is None:
            self.image_size = DEFAULT_IMAGE_SIZE[self.dataset]
        small = self.image_size <= SMALL_IMAGE_MAX
        if self.arch is None:
            self.arch = recipe["arch"] if self.dataset == "digits" else (
                "resnet18" if small else "resnet50")
        _choice("arch", self.arch, models.ARCHS)
        if self.small_stem is None:
            self.small_stem = small
        if self.expander is None:
            self.expander = 2048 if self.arch == "resnet50" else 0
        for name in ("projector", "batch_size", "epochs", "loss_scale"):
            if getattr(self, name) is None:
                setattr(self, name, recipe[name])
        lr, wd = ((recipe["lr"], recipe["weight_decay"]) if self.optimizer == "lars"
                  else OPTIMIZER_DEFAULTS[self.optimizer])
        if self.lars_eta is None:
            self.lars_eta = recipe["lars_eta"]
        if self.lr is None:
            self.lr = lr
        if self.weight_decay is None:
            self.weight_decay = wd
        if self.warmup_epochs is None:
            self.warmup_epochs = min(10.0, min(self.block_epoch_list()) / 10)
        if self.device == "auto":
            import torch
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.workers is None:
            # CUDA: the loader must keep a GPU fed. CPU: the training itself needs the cores;
            # augmentation in the main process between steps beats a worker fighting the
            # compute threads (on 2 cores a worker made each step about 2x slower).
            cores = max(1, _cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            self.workers = max(1, min(16, cores - 1)) if self.device == "cuda" else min(4, cores // 4)
        if self.precision == "auto":
            self.precision = "bf16" if self.device == "cuda" else "fp32"
        if self.channels_last is None:
            self.channels_last = self.device == "cuda"
        if self.probe_epochs is None:
            self.probe_epochs = 100
        if self.checkpoint is None:
            self.checkpoint = not self.profile

        # ---- validate
        models.parse_projector(self.projector)
        _positive("image_size", self.image_size, minimum=8)
        _positive("batch_size", self.batch_size, minimum=2,
                  why="Barlow Twins needs batch statistics: at least 2 image pairs per rank")
        _positive("epochs", self.epochs)
        _positive("lr", self.lr, zero_ok=False)
        _positive("weight_decay", self.weight_decay, zero_ok=True)
        _positive("lars_eta", self.lars_eta, zero_ok=False)
        _positive("lambd", self.lambd, zero_ok=True)
        _positive("loss_scale", self.loss_scale, zero_ok=False)
        _positive("noise_std", self.noise_std, zero_ok=True)
        _positive("expander", self.expander, zero_ok=True)
        _positive("warmup_epochs", self.warmup_epochs, zero_ok=True)
        shortest = min(self.block_epoch_list())
        if self.warmup_epochs > shortest:
            raise ValueError(
                f"--warmup-epochs {self.warmup_epochs:g} is longer than the "
                + ("shortest block's " if self.mode == "sequential" else "run's ")
                + f"{shortest} epoch(s): it would be all warm-up, with no cosine decay; valid: "
                f"0 to {shortest}")
        _positive("num_classes", self.num_classes, minimum=2)
        _positive("synthetic_size", self.synthetic_size)
        _positive("workers", self.workers, zero_ok=True)
        _positive("probe_epochs", self.probe_epochs, zero_ok=True)
        _positive("probe_lr", self.probe_lr, zero_ok=False)
        _positive("probe_batch_size", self.probe_batch_size)
        _positive("log_interval", self.log_interval)
        _positive("profile_warmup", self.profile_warmup, zero_ok=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.pool_window is not None:
            _positive("pool_window", self.pool_window)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
            if self.profile and self.max_steps <= self.profile_warmup:
                raise ValueError(
                    f"--profile would measure nothing: --max-steps {self.max_steps} <= "
                    f"--profile-warmup {self.profile_warmup} (steps run before the measured "
                    f"part); valid: --max-steps above --profile-warmup, or a smaller "
                    f"--profile-warmup (0 measures from the first step)")
        if self.mode != "sequential":
            for name in ("block_epochs", "steps_per_block"):
                if getattr(self, name) is not None:
                    raise ValueError(f"--{_flag(name)} applies to --mode sequential only "
                                     f"(mode is {self.mode!r})")
        if self.steps_per_block is not None:
            _positive("steps_per_block", self.steps_per_block)
        if self.loss_cuda_graphs and not self.fused:
            raise ValueError("--loss-cuda-graphs replays the fused loss: add --fused")
        self.block_epoch_list()  # validates block_epochs
        self.checkpointed_blocks()  # validates checkpoint_blocks
        if self.dataset in ("cifar10", "imagefolder") and not self.data_dir:
            raise ValueError(f"dataset {self.dataset!r} needs --data-dir")
        if self.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise ValueError("--device cuda, but CUDA is not available here; valid: cpu, auto")
        if self.resume is not None and not isinstance(self.resume, str):
            raise TypeError(f"resume must be a path, got {type(self.resume).__name__}")

    # ---- derived values
    def recipe_name(self) -> str:
        if self.dataset == "digits":
            return "digits"
        size = self.image_size if self.image_size is not None else DEFAULT_IMAGE_SIZE[self.dataset]
        return "small" if size <= SMALL_IMAGE_MAX else "paper"

    def block_epoch_list(self) -> List[int]:
        """Epochs of each block (sequential), or [epochs] for the other modes."""
        if self.block_epochs is None:
            return [self.epochs] * (4 if self.mode == "sequential" else 1)
        try:
            values = [int(v) for v in str(self.block_epochs).split(",")]
        except ValueError:
            values = []
        if len(values) != 4 or any(v <= 0 for v in values):
            raise ValueError(f"--block-epochs {self.block_epochs!r}: expected 4 positive integers "
                             "separated by commas, e.g. 10,10,20,20")
        return values

    def checkpointed_blocks(self) -> Tuple[bool, bool, bool, bool]:
        """Per block: whether its residual units are recomputed in the backward."""
        if self.checkpoint_blocks is None:
            return (self.activation_checkpointing,) * 4
        spec = str(self.checkpoint_blocks)
        try:
            values = [int(v) for v in spec.split(",")]
        except ValueError:
            values = []
        if not values or any(not 1 <= v <= 4 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"--checkpoint-blocks {spec!r}: expected distinct block numbers "
                             "from 1 to 4 separated by commas, e.g. 1 or 1,2")
        if not self.activation_checkpointing:
            raise ValueError(f"--checkpoint-blocks {spec!r} chooses the blocks that "
                             "--activation-checkpointing recomputes: add --activation-checkpointing")
        return tuple(k + 1 in values for k in range(4))  # type: ignore[return-value]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_types(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _base_type(hints[f.name])
            if value is None:
                if not _optional(hints[f.name]):
                    raise TypeError(f"{f.name} must not be None")
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if kind is int and isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{f.name} must be {kind.__name__}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# helpers


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(sorted(valid))}")


def _positive(name: str, value, minimum=None, zero_ok=False, why: str = "") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--{_flag(name)} must be a finite number, got {value}")
    if minimum is not None:
        ok = value >= minimum
        need = f">= {minimum}"
    elif zero_ok:
        ok, need = value >= 0, ">= 0"
    else:
        ok, need = value > 0, "> 0"
    if not ok:
        raise ValueError(f"--{_flag(name)} must be {need}, got {value}" + (f" ({why})" if why else ""))


def _optional(tp) -> bool:
    return type(None) in getattr(tp, "__args__", ())


def _base_type(tp):
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    return args[0] if args else tp


# ---------------------------------------------------------------------------------------------
# CLI generated from the dataclass


def build_parser(prog: str = "python -m blockwise.train") -> argparse.ArgumentParser:
    """One flag per Config field (``--field-name``); bools get ``--x/--no-x``.

    Defaults are argparse.SUPPRESS: only flags given on the command line appear in the parsed
    namespace, so a resumed run can tell them from the saved settings.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description="Blockwise self-supervised pre-training (Barlow Twins per ResNet "
        "block) followed by a linear probe of every block.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = _base_type(hints[f.name])
        default = "resolved" if f.default is None else f.default
        help_text = f.metadata.get("help", "") + f" [{default}]"
        if kind is bool:
            parser.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(f"--{_flag(f.name)}", type=kind, metavar=f.name.upper(),
                                help=help_text)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The flags given on the command line, as a dict of Config field values."""
    return vars(build_parser().parse_args(argv))


#: settings that only some datasets read (data.py's other builders ignore them), and those datasets
DATASET_FLAGS: Dict[str, Tuple[str, ...]] = {
    "data_dir": ("cifar10", "imagefolder"), "download": ("cifar10",),
    "num_classes": ("synthetic",), "synthetic_size": ("synthetic",),
    "synthetic_augment": ("synthetic",)}


def check_dataset_flags(dataset: str, given: Dict[str, Any]) -> None:
    """A flag given on the command line that ``dataset`` ignores: ValueError (whoever set it
    believes it took effect). Only ``given`` is checked: defaults and a resumed run's saved
    settings are not flags given; neither is a switch given as off (``--no-download``), which
    asks for nothing. An unknown dataset is left to Config's own message."""
    from blockwise import data

    if dataset not in data.DATASETS:
        return
    ignored = [f"--{_flag(name)} applies to --dataset {' or '.join(users)} only"
               for name, users in DATASET_FLAGS.items()
               if name in given and given[name] is not False and dataset not in users]
    if ignored:
        raise ValueError(f"{'; '.join(ignored)} (dataset is {dataset!r})")


def config_from_flags(given: Dict[str, Any]) -> Config:
    """A new run's Config from the flags given on the command line (``parse_args``)."""
    dataset = given.get("dataset", Config.__dataclass_fields__["dataset"].default)
    check_dataset_flags(dataset, given)
    return Config(**given)


#: settings a resumed run may change (they do not alter the training trajectory)
RESUME_MUTABLE = ("max_steps", "workers", "log_interval", "probe_epochs", "probe_lr",
                  "probe_batch_size", "probe_control", "profile", "profile_warmup", "profile_phases",
                  "checkpoint", "activation_checkpointing", "checkpoint_blocks",  # exact
                  "split_views",  # exact
                  "loss_cuda_graphs",
                  "data_dir", "download",  # the same data, moved or fetched again
                  "out", "resume")


def merge_for_resume(saved: Dict[str, Any], given: Dict[str, Any]) -> Config:
    """The saved config with the flags given again; a flag that would change training: ValueError."""
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in saved.items() if k in known}
    # a cap belongs to the invocation that set it: the resumed run goes on to the end unless
    # --max-steps is given again
    values["max_steps"] = None
    if given.get("activation_checkpointing") is False and "checkpoint_blocks" not in given:
        values["checkpoint_blocks"] = None  # the saved block choice goes with the option
    trial = Config(**{**values, **given})  # resolves the given values the same way
    for name in given:
        if name in RESUME_MUTABLE:
            continue
        if getattr(trial, name) != values.get(name):
            raise ValueError(f"--{_flag(name)} {given[name]!r} differs from the resumed run's "
                             f"{values.get(name)!r}; a resumed run keeps its training settings "
                             f"(changeable: {', '.join(_flag(n) for n in RESUME_MUTABLE)})")
    check_dataset_flags(trial.dataset, given)  # e.g. --data-dir on a digits run: not used
    return trial


def describe(cfg: Config) -> str:
    """A compact multi-line listing of the resolved settings (printed at the start of a run)."""
    d = cfg.to_dict()
    items = [f"{k}={v}" for k, v in d.items()]
    lines, line = [], ""
    for item in items:
        if len(line) + len(item) + 2 > 100:
            lines.append(line)
            line = ""
        line = f"{line}  {item}" if line else item
    lines.append(line)
    return f"config (recipe {cfg.recipe_name()!r}):\n  " + "\n  ".join(lines)
