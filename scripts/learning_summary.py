"""Probe table of the learning runs under a folder, and the issue's learning criteria.

    python scripts/learning_summary.py FOLDER [--margin 3]

FOLDER holds run directories written by ``python -m blockwise.train`` (each with probe.json and
summary.json), e.g. ``e2e``, ``simultaneous``, ``simultaneous_sqrt`` from
scripts/gpu_learning_check.sh, possibly from several device calls. Prints top-1 per block for
every run next to its random-init control, the step and loader rates, and for every non-e2e run:
  - PASS/FAIL: each block at least MARGIN points above the same block at random initialisation;
  - PASS/FAIL: its best block within 2 points of e2e's block 4, only when an e2e run with the same
    number of epochs is in FOLDER (the criterion is "at equal epochs").
Exit status 1 when a criterion fails, 2 when FOLDER holds no run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def load_runs(folder: str) -> dict:
    runs = {}
    for name in sorted(os.listdir(folder)):
        d = os.path.join(folder, name)
        if os.path.isfile(os.path.join(d, "probe.json")) and os.path.isfile(os.path.join(d, "summary.json")):
            with open(os.path.join(d, "probe.json")) as f:
                probe = json.load(f)
            with open(os.path.join(d, "summary.json")) as f:
                summary = json.load(f)
            cfg = {}
            if os.path.isfile(os.path.join(d, "config.json")):
                with open(os.path.join(d, "config.json")) as f:
                    cfg = json.load(f)
            runs[name] = (probe, summary, cfg)
    return runs


def _epochs(cfg: dict):
    c = cfg.get("config", cfg)
    return c.get("epochs")


#: issue 4's learning bar: ResNet-18 with the small stem, 32x32, 80 epochs, a CIFAR-10 layout
LEARNING_BAR = {"arch": "resnet18", "small_stem": True, "image_size": 32, "epochs": 80}


def _off_bar(cfg: dict) -> list:
    """How a run's settings differ from the learning bar's (empty: the bar's run)."""
    c = cfg.get("config", cfg)
    off = [f"{k} {c.get(k)!r} (bar: {v!r})" for k, v in LEARNING_BAR.items() if c.get(k) != v]
    if c.get("dataset") not in ("cifar10", "imagefolder"):
        off.append(f"dataset {c.get('dataset')!r} (bar: a CIFAR-10 layout)")
    if c.get("max_steps"):
        off.append(f"max_steps {c.get('max_steps')} (bar: every epoch)")
    return off


def _note(*cfgs: dict) -> str:
    off = sorted({x for cfg in cfgs for x in _off_bar(cfg)})
    return f" [not issue 4's learning bar: {', '.join(off)}]" if off else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--margin", type=float, default=3.0,
                    help="points above random init every block must reach (default 3)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.folder):
        print(f"learning_summary: {a.folder} is not a directory", file=sys.stderr)
        return 2
    runs = load_runs(a.folder)
    if not runs:
        print(f"learning_summary: no run directory with probe.json and summary.json in {a.folder}",
              file=sys.stderr)
        return 2
    names = list(runs)
    first = runs[names[0]][0]
    print(f"linear probe top-1 (%), {first.get('num_test')} test images, "
          f"{first.get('probe_epochs')} probe epochs on cached features")
    width = max([14] + [len(n) for n in names])  # whole run names: ablations differ at the end
    print(f"{'block':>6} " + " ".join(f"{n:>{width}}" for n in names) + f" {'random init':>14}")
    ctrl_run = next((n for n in names if runs[n][0].get("control_top1")), None)
    for k in range(1, 5):
        b = f"block{k}"
        cells = " ".join(f"{runs[n][0]['top1'].get(b, float('nan')):{width}.2f}" for n in names)
        ctrl = runs[ctrl_run][0]["control_top1"].get(b, float("nan")) if ctrl_run else float("nan")
        print(f"{k:>6} {cells} {ctrl:14.2f}")
    for n in names:
        s, cfg = runs[n][1], runs[n][2]
        mem = s.get("peak_memory_gib_per_block") or {}
        print(f"{n}: {_epochs(cfg)} epochs, {s.get('steps')} steps, {s.get('time_s', 0):.1f} s "
              f"training, {s.get('pairs_per_s') or 0:.0f} pairs/s; loader capacity "
              f"{s.get('loader_capacity_pairs_per_s') or 0:.0f} pairs/s, waiting for data "
              f"{100 * (s.get('data_wait_share') or 0):.1f}%"
              + ("; peak memory " + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items())
                 if mem else ""))
    ok = True
    e2e = next((n for n in names if n == "e2e" or n.startswith("e2e_")), None)
    for n in names:
        if n == e2e:
            continue
        probe, _, cfg = runs[n]
        top1, ctrl = probe["top1"], probe.get("control_top1") or {}
        for b in top1:
            if b not in ctrl:
                continue
            good = top1[b] - ctrl[b] >= a.margin
            ok &= good
            print(f"{'PASS' if good else 'FAIL'}: {n} {b} {top1[b]:.2f} vs random init "
                  f"{ctrl[b]:.2f} (need +{a.margin:g})" + _note(cfg))
        if e2e is None:
            print(f"-- {n}: no e2e run here, the 'within 2 points of e2e' criterion is not checked")
            continue
        if _epochs(runs[e2e][2]) != _epochs(cfg):
            print(f"-- {n}: {_epochs(cfg)} epochs vs e2e's {_epochs(runs[e2e][2])}: not compared")
            continue
        best = max(top1.values())
        e2e4 = runs[e2e][0]["top1"]["block4"]
        good = best >= e2e4 - 2
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}: {n} best block {best:.2f} vs e2e block 4 "
              f"{e2e4:.2f} (need >= {e2e4 - 2:.2f})" + _note(cfg, runs[e2e][2]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
