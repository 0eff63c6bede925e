"""Linear probe of every block: how linearly separable are the classes in each block's features?

For each block k: the backbone (frozen, eval mode) runs once over the training and test images;
block k's output is globally average-pooled (N x C_k) and cached. A linear classifier is trained
on the cached training features with SGD (momentum 0.9, lr 0.1, batch 256, cosine to 0, as the
paper's probe: 100 epochs by default) and scored top-1 on the test features. Caching makes
the probe cost one forward pass instead of one per epoch; the price is no augmentation during the
probe (the paper's probe augments), so figures are comparable between runs of this program, not
to the paper's ImageNet numbers.

Features are standardised with the training set's per-feature mean and std before the linear
layer (an affine change a linear classifier could learn itself; it lets one learning rate work
for every block, trained or not: a randomly initialised ResNet's blocks have very different
scales).

The control: the same architecture at its random initialisation (the exact weights the run
started from, rebuilt from the seed), probed the same way. ``python -m blockwise.probe RUN_DIR``
probes a saved run and writes RUN_DIR/probe.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from blockwise import data
from blockwise.checkpoint import atomic_write_json, load_checkpoint
from blockwise.config import Config

PROBE = "probe.json"
PROBE_SCHEMA = "blockwise.probe/1"


@torch.no_grad()
def extract_features(blocks: nn.ModuleList, dataset, device: torch.device, batch_size: int = 256,
                     workers: int = 0, amp_dtype: Optional[torch.dtype] = None,
                     memory_format=torch.contiguous_format) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Global-average-pooled outputs of the 4 blocks (fp32, on ``device``) and the labels."""
    was_training = [b.training for b in blocks]
    blocks.eval()
    loader = data.build_loader(dataset, batch_size, shuffle=False, workers=workers,
                               pin_memory=device.type == "cuda", drop_last=False, seed=0)
    feats: List[List[torch.Tensor]] = [[] for _ in blocks]
    labels = []
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            for k, block in enumerate(blocks):
                x = block(x)
                feats[k].append(x.float().mean(dim=(2, 3)))
            labels.append(torch.as_tensor(y))
    for b, mode in zip(blocks, was_training):
        b.train(mode)
    return [torch.cat(f) for f in feats], torch.cat(labels).to(device)


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, epochs: int, lr: float = 0.1,
                 batch_size: int = 256, seed: int = 0) -> float:
    """Top-1 (%) on the test features of a linear classifier trained on the training features."""
    if epochs <= 0:
        raise ValueError(f"train_linear: epochs must be > 0, got {epochs}")
    device = train_x.device
    train_y = train_y.long()  # cross_entropy takes int64 targets only (int32 labels are valid)
    # a feature constant on the training set (a dead channel) keeps scale 1, as scikit-learn's
    # StandardScaler: dividing by a clamped ~0 std would blow its test values up by ~1e6, and
    # its weight (no gradient, never trained) would then decide every prediction
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Linear(train_x.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9)
    n = len(train_x)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    g = torch.Generator()
    g.manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(steps_per_epoch):
            for group in opt.param_groups:  # cosine from lr to 0
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(clf(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        correct = (clf(test_x).argmax(1) == test_y).sum().item()  # sync point
    return 100.0 * correct / len(test_y)


def probe_blocks(blocks: nn.ModuleList, bundle: data.DataBundle, cfg: Config,
                 device: torch.device) -> Dict[str, float]:
    """{"block1": top-1 %, ..., "block4": ...} for these blocks."""
    amp = torch.bfloat16 if cfg.precision == "bf16" else None
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batch = max(cfg.probe_batch_size, 256)
    workers = min(cfg.workers, 4)
    tr_x, tr_y = extract_features(blocks, bundle.train_eval, device, batch, workers, amp, fmt)
    te_x, te_y = extract_features(blocks, bundle.test_eval, device, batch, workers, amp, fmt)
    return {f"block{k + 1}": train_linear(tr_x[k], tr_y, te_x[k], te_y, bundle.num_classes,
                                          cfg.probe_epochs, cfg.probe_lr, cfg.probe_batch_size,
                                          cfg.seed)
            for k in range(len(blocks))}


def run_probe(cfg: Config, blocks: nn.ModuleList, bundle: data.DataBundle, device: torch.device,
              meta: Optional[dict] = None) -> dict:
    """Probe ``blocks`` and (``cfg.probe_control``) their random initialisation; probe.json content."""
    from blockwise.trainer import initial_blocks

    trained = probe_blocks(blocks, bundle, cfg, device)
    control = None
    if cfg.probe_control:
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        init = initial_blocks(cfg).to(device, memory_format=fmt)
        control = probe_blocks(init, bundle, cfg, device)
        del init
    return {
        "schema": PROBE_SCHEMA,
        "top1": trained,
        "control_top1": control,
        "probe_epochs": cfg.probe_epochs,
        "probe_lr": cfg.probe_lr,
        "probe_batch_size": cfg.probe_batch_size,
        "features": "global average pool of each block's output, standardised with the "
                    "training features' mean and std; no augmentation (cached)",
        "control": "the same architecture at the run's random initialisation (same seed)",
        "dataset": cfg.dataset,
        "num_train": len(bundle.train_eval),
        "num_test": len(bundle.test_eval),
        "num_classes": bundle.num_classes,
        "arch": cfg.arch,
        "mode": cfg.mode,
        **(meta or {}),
    }


def format_table(result: dict) -> str:
    """The probe result as a small table: block, pre-trained, random init, gain."""
    top1, control = result["top1"], result.get("control_top1")
    lines = [f"linear probe top-1 (%) on {result['dataset']} ({result['num_test']} test images, "
             f"{result['probe_epochs']} epochs on cached features), {result['mode']} {result['arch']}",
             f"{'block':>6} {'pre-trained':>12} {'random init':>12} {'gain':>7}"]
    for name, acc in top1.items():
        if control is not None:
            c = control[name]
            lines.append(f"{name[5:]:>6} {acc:12.2f} {c:12.2f} {acc - c:+7.2f}")
        else:
            lines.append(f"{name[5:]:>6} {acc:12.2f} {'-':>12} {'-':>7}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blockwise.probe",
        description="Linear probe of every block of a saved run (writes RUN_DIR/probe.json).")
    parser.add_argument("run_dir", help="a run directory holding config.json and checkpoint.pt")
    parser.add_argument("--probe-epochs", type=int, help="override the run's probe epochs")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default=None,
                        help="default: the run's device if available here, else cpu")
    parser.add_argument("--workers", type=int, help="data-loading workers")
    parser.add_argument("--no-control", action="store_true", help="skip the random-init control")
    args = parser.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.run_dir)
        values = dict(ckpt["config"])
        values["resume"] = None
        if args.probe_epochs is not None:
            values["probe_epochs"] = args.probe_epochs
        if args.workers is not None:
            values["workers"] = args.workers
        if args.no_control:
            values["probe_control"] = False
        device = args.device or values["device"]
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but CUDA is not available here; valid: cpu, auto")
        if device in ("auto", "cuda") and not torch.cuda.is_available():
            device = "cpu"  # the run's device (or auto) is not here: probe on the CPU
        if device == "cpu":
            values.update(device="cpu", precision="fp32", channels_last=False)
        values["device"] = device
        cfg = Config(**values)
        if cfg.probe_epochs <= 0:
            raise ValueError("--probe-epochs must be > 0" if args.probe_epochs is not None else
                             "the run was saved with --probe-epochs 0 (no probe); pass "
                             "--probe-epochs N (N > 0) to probe it")
        from blockwise.trainer import initial_blocks
        bundle = data.build_datasets(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.download,
                                     cfg.synthetic_size, cfg.num_classes, cfg.seed,
                                     cfg.synthetic_augment)
        dev = torch.device(cfg.device)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        blocks = initial_blocks(cfg)
        blocks.load_state_dict(ckpt["blocks"])
        blocks = blocks.to(dev, memory_format=fmt)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run_probe(cfg, blocks, bundle, dev, meta={"step": ckpt["state"]["step"]})
    print(format_table(result))
    # RUN_DIR may also be the checkpoint file itself (load_checkpoint takes both): probe.json
    # goes into the directory that holds it
    run_dir = args.run_dir if os.path.isdir(args.run_dir) else os.path.dirname(os.path.abspath(args.run_dir))
    path = atomic_write_json(os.path.join(run_dir, PROBE), result)
    print(f"wrote {path}")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_path):  # the run's summary carries the probe too: keep them equal
        try:
            with open(summary_path, encoding="utf-8") as fh:
                summary = json.load(fh)
        except (OSError, ValueError) as err:
            print(f"warning: {summary_path} not updated (unreadable: {err})", file=sys.stderr)
        else:
            if isinstance(summary, dict):
                summary["probe"] = result
                atomic_write_json(summary_path, summary)
                print(f"updated {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
