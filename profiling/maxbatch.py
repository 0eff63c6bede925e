"""``python -m profiling maxbatch``: the largest batch each mode fits in GPU memory.

Each probe is a fresh ``python -m blockwise.train`` process running a couple of steps at one batch
size (sequential: that many steps per block, so every block's peak is reached); exit code 3 is
out of memory. A fresh process per probe is what makes recovering from an OOM reliable: nothing
of a failed attempt (fragmented cache, half-freed graphs) leaks into the next one.

Search, per mode: from ``--start``, double while the batch fits (up to ``--max-batch``) or halve
while it does not, then bisect between the largest fitting and the smallest failing batch, on
multiples of ``--granularity``, until they are one granule apart or ``--max-probes`` is spent.
The answer is an interval: largest batch seen to fit, smallest seen to fail. With no failure
above the largest (the cap reached, the probes spent) the largest is only a lower bound, shown
"≥ n"; a ratio to e2e it enters is then a bound ("≥", "≤"), or n/a between two lower bounds
(maxbatch.json: ``lower_bound``, ``vs_e2e``, ``vs_e2e_bound``). It needs a CUDA device: on CPU
(``--device cpu``, or ``--device cuda``/``auto``/none given and no CUDA here) it stops with a
clear error before any probe starts, as it does for an unknown ``--arch`` or ``--device`` and
bad search settings. A probe that fails for another reason than out of memory
stops that mode's search: the console and maxbatch.md give the reason (the probe log's last
error line, else its exit code) and the log's path.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from profiling import _io
from profiling import compare as _compare
from profiling.compare import (
    DEVICES,
    FUSED_CHOICES,
    check_arch,
    check_out_dir,
    check_projector,
    check_timeout,
    last_error_line,
    parse_modes,
    run_trainer,
    trainer_command,
)


MIN_BATCH = 2  # the trainer's smallest batch: batch statistics need two rows


class ProbeError(RuntimeError):
    """A probe failed for another reason than out of memory: the search cannot go on."""


def search(probe: Callable[[int], bool], *, start: int, max_batch: int, granularity: int,
           max_probes: int, min_batch: int = 1) -> dict:
    """Bisection over batch sizes; ``probe(b)`` is True when ``b`` fits, False on OOM.

    Returns {"largest_fitting", "smallest_failing", "resolution", "capped", "probes": [b...],
    "fits": {b: bool}}. ``largest_fitting`` is None when not even the smallest batch probed fits;
    ``capped`` means ``max_batch`` itself fitted (the true limit may be higher). No batch below
    ``min_batch`` (rounded up to a multiple of ``granularity``) is probed: the trainer needs
    two rows for batch statistics.
    """
    for name, v in (("start", start), ("max_batch", max_batch), ("granularity", granularity),
                    ("max_probes", max_probes), ("min_batch", min_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    smallest = -(-min_batch // granularity) * granularity
    if max_batch < smallest:
        raise ValueError(f"max_batch ({max_batch}) must be >= the smallest batch probed, "
                         f"{smallest} (granularity {granularity}, at least {min_batch})")

    def _round(b: int, g: int) -> int:
        return max(smallest, (b // g) * g)

    fits: Dict[int, bool] = {}
    order: List[int] = []
    lo: Optional[int] = None  # largest fitting
    hi: Optional[int] = None  # smallest failing

    def try_(b: int) -> bool:
        nonlocal lo, hi
        ok = bool(probe(b))
        fits[b] = ok
        order.append(b)
        if ok:
            lo = b if lo is None else max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        return ok

    b = min(_round(start, granularity), _round(max_batch, granularity))
    # phase 1: bracket (double up while it fits, halve down while it does not)
    while len(order) < max_probes:
        if try_(b):
            if b >= max_batch or hi is not None:
                break
            b = min(_round(2 * b, granularity), _round(max_batch, granularity))
            if b in fits:
                break
        else:
            if lo is not None:
                break
            nb = _round(b // 2, granularity)
            if nb == b or nb in fits:
                break
            b = nb
    # phase 2: bisect
    while lo is not None and hi is not None and hi - lo > granularity \
            and len(order) < max_probes:
        mid = _round((lo + hi) // 2, granularity)
        if mid <= lo:
            mid = lo + granularity
        if mid >= hi or mid in fits:
            break
        try_(mid)
    return {
        "largest_fitting": lo,
        "smallest_failing": hi,
        "resolution": (hi - lo) if lo is not None and hi is not None else None,
        "capped": lo is not None and hi is None and lo >= _round(max_batch, granularity),
        "probes": order,
        "fits": {str(k): v for k, v in sorted(fits.items())},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default="e2e,simultaneous,sequential",
                   help="comma-separated modes to search, each on its own "
                        "(e2e, simultaneous, sequential)")
    p.add_argument("--arch", default="resnet50",
                   help=f"backbone: {' or '.join(_compare.ARCHS)}")
    p.add_argument("--image-size", type=int, default=224,
                   help="synthetic image side in pixels (>= 8)")
    p.add_argument("--projector", default=None,
                   help="projector widths, e.g. 8192-8192-8192 (default: the trainer's)")
    p.add_argument("--fused", nargs="?", const="on", default="off",
                   choices=[c for c in FUSED_CHOICES if c != "both"],
                   help="fused Triton kernels in every probe: off or on (--fused alone)")
    p.add_argument("--device", default=None,
                   help=f"{', '.join(d for d in DEVICES if d != 'cpu')} (default: the "
                        "trainer's, auto); maxbatch needs CUDA: cpu, or no CUDA here, is "
                        "refused before any probe")
    p.add_argument("--start", type=int, default=256, help="first batch size probed")
    p.add_argument("--max-batch", type=int, default=8192, help="never probe above this")
    p.add_argument("--granularity", type=int, default=32,
                   help="batch sizes are multiples of this; the search stops one granule apart")
    p.add_argument("--max-probes", type=int, default=8, help="probes per mode at most")
    p.add_argument("--steps", type=int, default=2,
                   help="steps per probe (sequential: per block); 2 reaches the optimizer state")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per probe")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the probe runs (python -m blockwise.train)")
    p.add_argument("--out", required=True,
                   help="report directory: maxbatch.md, maxbatch.json, memory_vs_batch.png and "
                        "probes/ (each probe's run directory and log)")


def _require_gpu(device: Optional[str]) -> None:
    """maxbatch searches for a GPU out-of-memory limit: refuse a CPU run up front (on CPU there
    is no device-memory limit to hit; probes would only double until host RAM runs out), and a
    --device the trainer does not know."""
    if device is not None and device.split(":")[0].lower() == "cpu":
        raise ValueError(f"maxbatch needs a CUDA device, got --device {device}: on CPU there is "
                         "no device-memory limit to find (use --device cuda, or leave it out)")
    if device is not None and device not in DEVICES:
        raise ValueError(f"unknown --device {device!r}; valid: "
                         f"{', '.join(d for d in DEVICES if d != 'cpu')} (maxbatch needs CUDA)")
    if not _compare.cuda_available():
        raise ValueError("maxbatch finds the largest batch that fits in GPU memory and needs "
                         "a CUDA device; none is available here"
                         + (f" (--device {device})" if device else "")
                         + ": run it on a GPU machine")


def _check_search(args: argparse.Namespace) -> None:
    """The search settings, checked as search() checks them, before anything runs."""
    search(lambda b: True, start=args.start, max_batch=args.max_batch,
           granularity=args.granularity, max_probes=1, min_batch=MIN_BATCH)


def probe_failure(res, log_path: str) -> str:
    """Why a probe failed (not OOM), on one line: the log's last error line, else its exit
    code (or the timeout)."""
    if res.exit_code is None or res.exit_code == 0:  # timed out; no profile.json
        return (res.error or "no result").split(" (log:")[0].strip()
    line = last_error_line(log_path)
    return f"exit code {res.exit_code}" + (f": {line}" if line else "")


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    modes = parse_modes(args.modes)
    if isinstance(args.steps, bool) or not isinstance(args.steps, int) or args.steps < 1:
        raise ValueError(f"--steps must be an integer >= 1 (trainer steps per probe), "
                         f"got {args.steps!r}")
    check_arch(args.arch)
    check_projector(args.projector)
    check_timeout(args.timeout)
    trainer_command(modes[0], run_dir="x", arch=args.arch, image_size=args.image_size,
                    batch_size=MIN_BATCH, steps=1, warmup=0, fused=False)  # --image-size
    _check_search(args)
    out = os.path.abspath(args.out)
    check_out_dir(out)
    _require_gpu(args.device)
    probes_dir = os.path.join(out, "probes")
    os.makedirs(probes_dir, exist_ok=True)
    fused = args.fused == "on"
    results = []
    envs: List[dict] = []  # from this invocation's probes, never a stale probe dir's
    for mode in modes:
        records: List[dict] = []

        def probe(batch: int, mode=mode, records=records) -> bool:
            name = f"{mode}-b{batch}"
            run_dir = os.path.join(probes_dir, name)
            # the probe's first step is warm-up: the profile then holds the peak of the others
            cmd = trainer_command(mode, run_dir=run_dir, arch=args.arch,
                                  image_size=args.image_size, batch_size=batch,
                                  steps=max(1, args.steps - 1), warmup=min(1, args.steps - 1),
                                  fused=fused, projector=args.projector, device=args.device,
                                  extra=extra, python=args.python)
            log_path = os.path.join(probes_dir, name + ".log")
            res = run_trainer(cmd, run_dir, log_path, args.timeout, name, mode, fused)
            rec = {"batch": batch, "result": {"ok": "fits"}.get(res.status, res.status),
                   "exit_code": res.exit_code, "wall_s": res.wall_s, "log": log_path,
                   "peak_allocated_gib": None, "peak_reserved_gib": None, "nvml_used_gib": None}
            reason = probe_failure(res, log_path) if res.status == "failed" else None
            if reason:
                rec["reason"] = reason
            if res.profile:
                envs.append(res.profile.get("environment"))
                r = res.profile["run"]
                for k in ("peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib"):
                    rec[k] = r.get(k)
                rec["memory_unavailable"] = r.get("unavailable", {}).get("memory")
            records.append(rec)
            print(f"  {mode} batch {batch}: {rec['result']} ({res.wall_s:.0f} s)"
                  + (f", peak allocated {rec['peak_allocated_gib']:.2f} GiB"
                     if rec["peak_allocated_gib"] is not None else "")
                  + (f": {reason}; log {log_path}" if reason else ""), flush=True)
            if res.status == "failed":
                raise ProbeError(f"{mode} at batch {batch} failed (not OOM): {reason}; "
                                 f"log {log_path}")
            return res.status == "ok"

        print(f"{mode}:", flush=True)
        try:
            found = search(probe, start=args.start, max_batch=args.max_batch,
                           granularity=args.granularity, max_probes=args.max_probes,
                           min_batch=MIN_BATCH)
            error = None
        except ProbeError as e:
            found, error = None, str(e)
        entry = {"mode": mode, "error": error, "probes": records}
        entry.update({k: (found or {}).get(k) for k in
                      ("largest_fitting", "smallest_failing", "resolution", "capped")})
        entry["lower_bound"] = lower_bound(entry)
        results.append(entry)
    base = next((e for e in results if e["mode"] == "e2e"), None)
    for e in results:
        e["vs_e2e"], e["vs_e2e_bound"], e["vs_e2e_na"] = vs_e2e(e, base)
    rep = {"schema": "blockwise.maxbatch/1",
           "command": "python -m profiling maxbatch " + " ".join(
               shlex.quote(a) for a in getattr(args, "_argv", [])),
           "settings": {"arch": args.arch, "image_size": args.image_size,
                        "projector": args.projector, "fused": fused, "device": args.device,
                        "start": args.start, "max_batch": args.max_batch,
                        "granularity": args.granularity, "max_probes": args.max_probes,
                        "steps_per_probe": args.steps, "extra_trainer_args": list(extra)},
           "environment": envs[0] if envs else None, "modes": results}
    write_outputs(rep, out)
    smallest = -(-MIN_BATCH // args.granularity) * args.granularity
    lines = ["largest batch that fits (x e2e):"] + [
        f"  {e['mode']}: {largest_cell(e, smallest)} ({ratio_cell(e, base)})" for e in results]
    text = "\n".join(lines)
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):  # a console that cannot print the bounds' signs
        text = text.replace("≥", ">=").replace("≤", "<=")
    print(text)
    print(f"report: {os.path.join(out, 'maxbatch.md')}")
    return 0 if all(e["error"] is None for e in results) else 1


def lower_bound(m: dict) -> bool:
    """Whether a mode's largest fitting batch is only a lower bound on its true limit: no probe
    failed above it (the cap was reached, or the probes ran out before an OOM)."""
    return m.get("largest_fitting") is not None and m.get("smallest_failing") is None


def vs_e2e(m: dict, base: Optional[dict]
           ) -> Tuple[Optional[float], Optional[str], Optional[str]]:
    """(largest fitting batch / e2e's, what the value is: "exact", "at least" or "at most",
    why it is None). A lower-bound limit over an exact e2e limit bounds the ratio from below, an
    exact limit over a lower-bound e2e one from above; two lower bounds leave it unknown."""
    lf = m.get("largest_fitting")
    if base is None or base.get("largest_fitting") is None:
        return None, None, "no e2e result"
    if lf is None:
        return None, None, "no largest fitting batch"
    if m is base:
        return 1.0, "exact", None
    num, den = lower_bound(m), lower_bound(base)
    if num and den:
        return None, None, "both limits are lower bounds"
    return lf / base["largest_fitting"], ("at least" if num else "at most" if den
                                          else "exact"), None


def largest_cell(m: dict, smallest: int) -> str:
    """The largest batch that fits, as a table cell: '≥ n (why)' when it is a lower bound."""
    lf = m["largest_fitting"]
    if m["error"]:
        return "n/a (probe failed, not OOM)"
    if lf is None and (m["smallest_failing"] or 0) > smallest:
        return f"n/a (probes ran out: every batch probed OOMed, down to {m['smallest_failing']})"
    if lf is None:
        return "n/a (nothing fits, not even the smallest probe)"
    if lower_bound(m):
        return f"≥ {lf} (" + ("cap reached" if m["capped"] else
                              "probes ran out before an OOM") + ")"
    return f"{lf}"


def ratio_cell(m: dict, base: Optional[dict]) -> str:
    """The ratio to e2e as a table cell: '≥'/'≤' when a lower-bound limit makes it a bound."""
    value, bound, why = vs_e2e(m, base)
    if value is None:
        return "n/a" if why == "no largest fitting batch" else f"n/a ({why})"
    return {"exact": "", "at least": "≥ ", "at most": "≤ "}[bound] + f"{value:.2f}x"


def render_markdown(rep: dict) -> str:
    env = rep.get("environment") or {}
    s = rep["settings"]
    out = ["# Largest batch that fits in GPU memory", "",
           f"**GPU** {env.get('gpu') or 'n/a (no GPU profile)'}"
           + (f", {env['gpu_memory_gib']:.1f} GiB" if env.get("gpu_memory_gib") else "")
           + f"; **driver** {env.get('driver') or 'n/a'}; **torch** {env.get('torch') or 'n/a'}; "
           f"**triton** {env.get('triton') or 'n/a'}.", "",
           f"**Settings** {s['arch']}, {s['image_size']} px, projector "
           f"{s['projector'] or '(trainer default)'}, fused {s['fused']}, "
           f"{s['steps_per_probe']} steps per probe (sequential: per block); search from "
           f"{s['start']}, multiples of {s['granularity']}, at most {s['max_probes']} probes per "
           f"mode, cap {s['max_batch']}"
           + (f"; trainer args {' '.join(s['extra_trainer_args'])}"
              if s["extra_trainer_args"] else "") + ".", "",
           f"Produced by `{rep['command']}`.", "",
           "| mode | largest batch that fits | x e2e | smallest batch that OOMs | resolution | "
           "peak allocated at largest (GiB) | probes |",
           "|---|---:|---:|---:|---:|---:|---|"]
    base = next((m for m in rep["modes"] if m["mode"] == "e2e"), None)
    smallest = -(-MIN_BATCH // s["granularity"]) * s["granularity"]  # as search() rounds it
    notes: List[str] = []
    for m in rep["modes"]:
        lf = m["largest_fitting"]
        if m["error"]:
            notes.append(" ".join(str(m["error"]).split()))  # one line, never cut
            lf_s = f"n/a (probe failed, not OOM: note {len(notes)})"
        else:
            lf_s = largest_cell(m, smallest)
        ratio = ratio_cell(m, base)
        at = next((p for p in m["probes"] if p["batch"] == lf), None)
        peak = (f"{at['peak_allocated_gib']:.2f}" if at and at["peak_allocated_gib"] is not None
                else f"n/a ({(at or {}).get('memory_unavailable') or 'not measured'})")
        oomed = [p["batch"] for p in m["probes"] if p["result"] == "oom"]
        if m["smallest_failing"] is not None:
            fail = m["smallest_failing"]
        elif m["error"]:
            fail = (f"n/a (search stopped; smallest OOM seen {min(oomed)})" if oomed else
                    "n/a (no OOM seen; a probe failed for another reason)")
        else:
            fail = "n/a (none failed)"
        res = m["resolution"] if m["resolution"] is not None else "n/a"
        probes = ", ".join(f"{p['batch']}:{p['result']}" for p in m["probes"])
        out.append(f"| {m['mode']} | {lf_s} | {ratio} | {fail} | {res} | {peak} | {probes} |")
    if notes:
        out += ["", "Probes that failed for another reason than out of memory (the search of "
                    "that mode stopped there):", ""]
        out += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    out += ["", "![peak memory vs batch](memory_vs_batch.png)", "",
            "Each probe is a fresh trainer process (`--max-steps`/`--steps-per-block` as above, "
            "synthetic data); OOM = exit code 3. The true limit lies between the largest batch "
            "that fits and the smallest that fails; '≥ n' where no probe failed above n (the cap "
            "was reached or the probes ran out): the true limit is n or more. x e2e: '≥' when "
            "only the mode's limit is a lower bound, '≤' when only e2e's is, n/a when both are."]
    return "\n".join(out) + "\n"


def render_plot(rep: dict, path: str) -> None:
    from profiling.report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    any_point = False
    env = rep.get("environment") or {}
    measured = [p["peak_allocated_gib"] for m in rep["modes"] for p in m["probes"]
                if p["peak_allocated_gib"] is not None]
    # OOM probes have no peak: mark them at the memory limit (the GPU's, else the highest
    # measured peak), never at 0 GiB
    ceiling = env.get("gpu_memory_gib") or max(measured or [1.0])
    for i, m in enumerate(rep["modes"]):
        pts = sorted((p["batch"], p["peak_allocated_gib"]) for p in m["probes"]
                     if p["result"] == "fits" and p["peak_allocated_gib"] is not None)
        if pts:
            ax.plot([b for b, _ in pts], [v for _, v in pts], "o-", color=f"C{i}",
                    label=f"{m['mode']} (fits)")
            any_point = True
        ooms = [p["batch"] for p in m["probes"] if p["result"] == "oom"]
        if ooms:
            ax.scatter(ooms, [ceiling] * len(ooms), marker="x", color=f"C{i}", s=60,
                       label=f"{m['mode']} (OOM, no peak)")
            any_point = True
    if env.get("gpu_memory_gib"):
        ax.axhline(env["gpu_memory_gib"], color="k", ls="--", lw=1, label="GPU memory")
    if not any_point:
        ax.text(0.5, 0.5, "n/a (no probe measured memory)", transform=ax.transAxes,
                ha="center")
    ax.set_xlabel("batch size (image pairs)")
    ax.set_ylabel("peak allocated (GiB)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    fig._blockwise_suptitle = fig.suptitle(
        f"Peak memory vs batch size\n{env.get('gpu') or 'no GPU'} - "
        f"{rep['settings']['arch']}, {rep['settings']['image_size']} px", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def write_outputs(rep: dict, out: str) -> None:
    render_plot(rep, os.path.join(out, "memory_vs_batch.png"))
    _io.atomic_write_json(os.path.join(out, "maxbatch.json"), rep)
    _io.atomic_write_text(os.path.join(out, "maxbatch.md"), render_markdown(rep))
