"""Predict each mode's GPU peak memory and flops from measurements on the CPU.

For planning GPU time (which options bring blockwise training under a memory budget?) on a
machine without one. For each mode, the real trainer runs on the CPU (bf16 autocast) at a few
small batches:
  - the tensor bytes created by one training step's forward and backward (optimizer steps left
    out: their transients come after the activations are freed) are measured with
    profiling.tensor_bytes.TensorBytesMeter; peak = intercept + slope * batch is fitted through
    them (activations grow with the batch; gradients and the heads' buffers do not);
  - parameters and optimizer state are the exact bytes (Trainer.resident_bytes);
  - flops: torch.utils.flop_counter over one step (sequential: the four blocks' steps) at each
    batch, fitted the same way (some work does not grow with the batch) and given per pair at
    --target-batch.
The prediction at --target-batch is resident + inputs + intercept + slope * target, where inputs
are the images of the current and the prefetched batch (two views each) in the dtype the trainer
delivers them (bf16 under bf16 autocast). Sequential is measured at its block 1 (the largest
activations; its peak in every GPU run so far).

    python scripts/cpu_memory_model.py --arch resnet50 --image-size 224 \\
        --projector 8192-8192-8192 --batches 16,32 --target-batch 256 [-- trainer flags]

What it is not: a measurement of a GPU. It counts tensors, not the caching allocator (no
fragmentation, no cuDNN workspaces), and on the CPU the fused Triton paths (--fused) do not run,
so heads with an expander hold the PyTorch path's larger per-chunk buffers. Against the H100
figures of docs/performance.md (ResNet-50, 224 px, batch 256, fifth session) it was 12-15% high
on the blockwise modes without memory options, and with --activation-checkpointing
--split-views 7-13% low on them and 12% high on e2e: a guide for what to measure, not a
measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from blockwise import config as config_mod  # noqa: E402
from blockwise.trainer import Trainer  # noqa: E402
from profiling.tensor_bytes import TensorBytesMeter  # noqa: E402

GIB = float(1 << 30)


def measure(mode: str, batch: int, args, flags: dict):
    """(forward+backward peak bytes, resident bytes, flops per step, bytes per input pixel value)
    at one batch."""
    extra = dict(steps_per_block=2) if mode == "sequential" else {}
    values = dict(dataset="synthetic", arch=args.arch, image_size=args.image_size,
                  synthetic_size=2 * batch, batch_size=batch, projector=args.projector,
                  epochs=1, workers=0, device="cpu", precision="bf16", probe_epochs=0,
                  out=tempfile.mkdtemp(prefix="cpu_memory_model_"), mode=mode, **extra)
    values.update(flags)

    def trainer():
        return Trainer(config_mod.Config(**values), values["out"], log=lambda line: None)

    tr = trainer()
    # as the trainer's loader delivers them (bf16 under bf16 autocast, Trainer._batches)
    x1, x2 = torch.randn(2, batch, 3, args.image_size, args.image_size,
                         dtype=tr.amp_dtype or torch.float32).unbind(0)
    flops = 0  # the first step (which also creates the optimizer state), counted
    for b in range(4 if mode == "sequential" else 1):
        if b:
            tr._finish_block(b - 1)
            tr._begin_block(b)
        with FlopCounterMode(display=False) as counter:
            tr.train_step(x1, x2, 0.01, b)
        flops += counter.get_total_flops()
    if mode == "sequential":  # block 1 again, with its optimizer state, for the memory
        tr = trainer()
        tr.train_step(x1, x2, 0.01)
    meter = TensorBytesMeter()
    for opt in tr.optimizers:  # optimizer steps are not counted
        if opt is not None:
            opt.step = _paused(meter, opt.step)
    with meter:
        tr.train_step(x1, x2, 0.01)
    resident = sum(tr.resident_bytes().values())
    return meter.peak, resident, flops, x1.element_size()


def _fit(xs, ys):
    """Least-squares line through (xs, ys): (slope, intercept)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def _paused(meter: TensorBytesMeter, step):
    def run(*args, **kwargs):
        with meter.paused():
            return step(*args, **kwargs)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--projector", default="8192-8192-8192")
    ap.add_argument("--batches", default="16,32", help="two or more small batches (pairs)")
    ap.add_argument("--target-batch", type=int, default=256)
    ap.add_argument("--modes", default="e2e,simultaneous,sequential")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    argv = sys.argv[1:] if argv is None else list(argv)
    trainer_flags = []
    if "--" in argv:
        i = argv.index("--")
        argv, trainer_flags = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    batches = sorted(int(b) for b in a.batches.split(","))
    if len(batches) < 2 or batches[0] < 2:
        ap.error("--batches needs at least two batch sizes >= 2")
    flags = config_mod.parse_args(trainer_flags)
    torch.set_num_threads(a.threads)
    print(f"{a.arch}, {a.image_size} px, projector {a.projector}, trainer flags "
          f"{' '.join(trainer_flags) or '(none)'}; batches {batches} on CPU, prediction at "
          f"{a.target_batch}")
    rows = []
    for mode in [m.strip() for m in a.modes.split(",")]:
        t0 = time.time()
        points = [measure(mode, b, a, flags) for b in batches]
        peaks = [p[0] for p in points]
        slope, intercept = _fit(batches, peaks)
        resident = points[0][1]
        # the images of the current and the prefetched batch, two views each, as delivered
        # (created before the step, so the meter does not count them; a GPU run holds them)
        inputs = 4 * a.target_batch * 3 * a.image_size ** 2 * points[0][3]
        predicted = resident + inputs + intercept + slope * a.target_batch
        # flops per step = fixed + per pair * batch (e.g. an expander's Cout x Cin x Cin
        # statistics product does not grow with the batch): per pair at the target batch
        f_slope, f_fixed = _fit(batches, [p[2] for p in points])
        gflop = (f_fixed / a.target_batch + f_slope) / 1e9
        rows.append((mode, peaks, slope, resident, inputs, predicted, gflop))
        print(f"  {mode}: measured in {time.time() - t0:.0f} s", flush=True)
    base = next((r for r in rows if r[0] == "e2e"), None)
    print(f"\n| mode | fwd+bwd peak at {', '.join(map(str, batches))} pairs (GiB) | MiB per pair "
          f"| parameters + optimizer state (GiB) | input images, current + next batch (GiB) | "
          f"predicted peak at {a.target_batch} (GiB) | x e2e | GFLOP/pair at {a.target_batch} "
          f"| x e2e |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, peaks, slope, resident, inputs, predicted, gflop in rows:
        ratio = f"{predicted / base[5]:.2f}x" if base else "n/a"
        fratio = f"{gflop / base[6]:.3f}x" if base else "n/a"
        print(f"| {mode} | {' / '.join(f'{p / GIB:.3f}' for p in peaks)} | "
              f"{slope / (1 << 20):.1f} | {resident / GIB:.2f} | {inputs / GIB:.2f} | "
              f"{predicted / GIB:.2f} | {ratio} | {gflop:.1f} | {fratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
