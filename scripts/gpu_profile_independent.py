"""An independent measurement of what ``python -m profiling compare`` reported (GPU check).

For every run of a compare report, rebuild the trainer from the run's config.json and time its
own training step (``Trainer.train_step``: the same model, heads, optimizers and precision) in a
plain loop, with instruments the profiling package does not use:

- time: CUDA events around N steps after W warm-up steps (no per-window synchronize);
- peak memory: ``torch.cuda.reset_peak_memory_stats`` after warm-up, then the maximum of
  ``max_memory_allocated`` and the trainer's own per-block peaks (``Trainer.peaks``): without
  --profile the trainer resets PyTorch's peak counter per block (simultaneous mode), so
  ``max_memory_allocated`` after the loop alone would see only the last block's peak;
- energy: nvidia-smi power samples from a separate process, integrated over the timed interval.

The batch is random data already on the GPU (the compare runs read synthetic data through the
trainer's loader: if the loader limited them, throughput disagrees here, which is the point).
Sequential mode is measured per block (block k's step after blocks 1..k-1 are frozen) and
summed as in the report ("all 4 blocks, one pass each").

Pass (the project's bar): peak memory and throughput within 10 %, energy per image pair within 15 %.

    PYTHONPATH=. python scripts/gpu_profile_independent.py --report DIR/report.json --out DIR
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_profile_smi import SmiSampler  # noqa: E402

from blockwise.config import Config  # noqa: E402
from blockwise.trainer import Trainer  # noqa: E402
from profiling._io import atomic_write_json  # noqa: E402

GIB = float(1 << 30)
TOLERANCE = {"peak_allocated_gib": 0.10, "throughput_img_s": 0.10, "energy_per_image_j": 0.15}


def build(run_dir: str) -> Config:
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)["config"]
    saved.update(profile=False, resume=None, probe_epochs=0, checkpoint=False, workers=0,
                 out=tempfile.mkdtemp(prefix="indep-"))
    return Config(**saved)


def measure_block(trainer: Trainer, b: int, x1, x2, warmup: int, steps: int,
                  smi: SmiSampler) -> dict:
    dev = trainer.device
    lr = trainer.base_lr
    for _ in range(warmup):
        trainer.train_step(x1, x2, lr, b)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    trainer.peaks.clear()  # the trainer's per-block peaks of the measured steps only
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t_wall0 = time.time()
    start.record()
    for _ in range(steps):
        trainer.train_step(x1, x2, lr, b)
    stop.record()
    stop.synchronize()
    t_wall1 = time.time()
    seconds = start.elapsed_time(stop) / 1000.0
    # the trainer resets the peak counter at each block's start (simultaneous: 4 per step), so
    # max_memory_allocated() now holds the last block's peak only: take the max with its peaks
    peaks = dict(trainer.peaks)
    peak = max([torch.cuda.max_memory_allocated(dev) / GIB] + list(peaks.values()))
    time.sleep(0.3)  # let nvidia-smi report past the end
    return {"block": b + 1, "time_s": seconds, "images": steps * trainer.cfg.batch_size,
            "wall_s": t_wall1 - t_wall0,
            "peak_allocated_gib": peak, "trainer_peaks_gib": peaks,
            "energy_j": smi.energy_j(t_wall0, t_wall1)}


def measure_run(run_dir: str, warmup: int, steps: int, seq_warmup: int, seq_steps: int,
                smi: SmiSampler) -> dict:
    cfg = build(run_dir)
    trainer = Trainer(cfg, cfg.out, log=lambda line: None)
    dev = trainer.device
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    x1 = torch.randn(shape, device=dev).contiguous(memory_format=trainer.memory_format)
    x2 = torch.randn(shape, device=dev).contiguous(memory_format=trainer.memory_format)
    parts = []
    if cfg.mode == "sequential":
        for b in range(4):
            if b > 0:
                trainer._finish_block(b - 1)  # as Trainer.fit does between blocks
                trainer._begin_block(b)
            parts.append(measure_block(trainer, b, x1, x2, seq_warmup, seq_steps, smi))
    else:
        parts.append(measure_block(trainer, 0, x1, x2, warmup, steps, smi))
    trainer.close()
    del trainer, x1, x2
    gc.collect()
    torch.cuda.empty_cache()
    t_img = sum(p["time_s"] / p["images"] for p in parts)
    e_img = None
    if all(p["energy_j"] is not None for p in parts):
        e_img = sum(p["energy_j"] / p["images"] for p in parts)
    return {"mode": cfg.mode, "fused": cfg.fused, "parts": parts,
            "throughput_img_s": 1.0 / t_img, "time_per_image_ms": 1000.0 * t_img,
            "energy_per_image_j": e_img,
            "peak_allocated_gib": max(p["peak_allocated_gib"] for p in parts)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", required=True, help="report.json of a compare run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seq-warmup", type=int, default=3)
    ap.add_argument("--seq-steps", type=int, default=15)
    args = ap.parse_args()
    with open(args.report) as f:
        rep = json.load(f)
    dev = torch.device("cuda", torch.cuda.current_device())
    rows, ok = [], True
    with SmiSampler(dev.index, interval_ms=50) as smi:
        for run in rep["runs"]:
            if run["status"] != "ok":
                rows.append({"label": run["label"], "skipped": run["status"]})
                continue
            ind = measure_run(run["run_dir"], args.warmup, args.steps, args.seq_warmup,
                              args.seq_steps, smi)
            row = {"label": run["label"], "independent": ind, "checks": {}}
            for key, tol in TOLERANCE.items():
                rv, iv = run["metrics"].get(key), ind.get(key)
                if rv is None or iv is None:
                    row["checks"][key] = {"report": rv, "independent": iv, "pass": None}
                    ok = False
                    continue
                dev_rel = rv / iv - 1.0
                passed = abs(dev_rel) <= tol
                ok &= passed
                row["checks"][key] = {"report": rv, "independent": iv, "rel": dev_rel,
                                      "tolerance": tol, "pass": passed}
            rows.append(row)
            print(f"  measured {run['label']}", flush=True)
        smi_field = smi.field
    res = {"report": args.report, "nvidia_smi_field": smi_field, "runs": rows, "pass": ok,
           "settings": vars(args)}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "independent_check.json"), res)
    print(f"== report vs independent measurement (CUDA events, max_memory_allocated, "
          f"nvidia-smi {smi_field}) ==")
    print(f"  {'run':40s} {'metric':20s} {'report':>10s} {'independent':>11s} {'diff':>7s}  ok")
    for row in rows:
        if "skipped" in row:
            print(f"  {row['label']:40s} skipped ({row['skipped']})")
            continue
        for key, c in row["checks"].items():
            f = lambda v: f"{v:10.4g}" if v is not None else "       n/a"  # noqa: E731
            d = f"{100 * c['rel']:+6.1f}%" if c.get("rel") is not None else "    n/a"
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]
            print(f"  {row['label']:40s} {key:20s} {f(c['report'])} {f(c['independent']):>11s} "
                  f"{d}  {verdict}")
    print(f"INDEPENDENT CHECK (memory, throughput 10%; energy/image 15%): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
