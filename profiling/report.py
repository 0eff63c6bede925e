"""Reports from profile.json files: report.md, report.json and PNG plots (matplotlib, Agg).

Input: one ``RunResult`` per trainer run (its profile.json, or why there is none). Output, all
written atomically into one directory:

- ``report.json`` (schema ``blockwise.report/1``): header (GPU, driver, versions, settings;
  from ``compare`` also ``fused_kernels``: requested, used per run, and a summary), per run
  the derived metrics, per-block and per-phase figures, and every table as rows of numbers with
  its ratio columns and the baseline values they were divided by;
- ``report.md``: the same tables for a paper, units in the headers, "n/a (reason)" where a figure
  was not measured (never 0), the method notes;
- ``peak_memory.png``, ``throughput.png``, ``energy_per_image.png``, ``power_trace.png``.

Per-image cost of sequential mode: it trains one block per step (block k's step runs the frozen
blocks 1..k-1 forward without gradients, then trains block k), so its whole-run throughput mixes
blocks and is not comparable with e2e's. The report gives it per block, and as "all 4 blocks, one
pass each": the sum over blocks of (time or energy of block k's measured steps) / (image pairs in
them), i.e. the cost of training every block once on each image, the unit e2e and simultaneous
pay per image.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from profiling import _io
from profiling.profiler import SCHEMA as PROFILE_SCHEMA

REPORT_SCHEMA = "blockwise.report/1"
BASELINE_MODE = "e2e"
PLOTS = ("peak_memory.png", "throughput.png", "energy_per_image.png", "power_trace.png")
PHASES = ("forward", "head", "backward", "optimizer")
_BLOCK = re.compile(r"^block(\d+)$")
NOT_TIMED = ("not timed: per-phase timing was off, so this window recorded peak memory only, "
             "without a device sync (time and energy per block and phase: compare --phases, "
             "trainer --profile-phases)")
TIMING_ON = "per-phase timing on: throughput includes one device sync per window"
TIMING_OFF = ("per-phase timing off: the measured steps are timed as a whole (one device sync "
              "at each end of the measured part, none per step); step, block and phase windows "
              "give peak memory only")


def _timed(w: dict) -> bool:
    """Whether an aggregated window has time and energy (memory-only windows do not)."""
    return w.get("timed", True) is not False and w.get("time_s_total") is not None


def timing_label(profile: Optional[dict]) -> Optional[str]:
    """Which kind of run a profile is: per-phase timing on or off (None: no profile)."""
    if not profile:
        return None
    meta = profile.get("meta") or {}
    if "profile_phases" in meta:
        return TIMING_ON if meta["profile_phases"] else TIMING_OFF
    windows = profile.get("windows") or {}
    return TIMING_ON if windows and all(_timed(w) for w in windows.values()) else TIMING_OFF


@dataclass
class RunResult:
    """One trainer run as the report sees it."""

    label: str
    run_dir: str
    profile: Optional[dict] = None
    status: str = "ok"  # ok | oom | failed | missing
    error: Optional[str] = None
    mode: Optional[str] = None
    fused: Optional[bool] = None
    exit_code: Optional[int] = None
    wall_s: Optional[float] = None
    command: Optional[List[str]] = None
    #: the trainer flags this run left out of the others' (compare --baseline-without)
    without: Optional[List[str]] = None

    def __post_init__(self):
        meta = (self.profile or {}).get("meta") or {}
        if self.mode is None:
            self.mode = meta.get("mode")
        if self.fused is None and "fused" in meta:
            self.fused = bool(meta["fused"])


def load_profile(path: str) -> dict:
    """Read and check a profile.json (ValueError naming the file when it is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            p = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(p, dict) or p.get("schema") != PROFILE_SCHEMA:
        raise ValueError(f"{path} is not a {PROFILE_SCHEMA} profile (schema "
                         f"{p.get('schema') if isinstance(p, dict) else None!r})")
    for key in ("meta", "environment", "run", "windows"):
        if not isinstance(p.get(key), dict):
            raise ValueError(f"{path}: missing or malformed {key!r}")
    return p


def load_run_dir(run_dir: str, label: Optional[str] = None) -> RunResult:
    """A run directory written by ``python -m blockwise.train --profile``."""
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, "profile.json")
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not os.path.isfile(path):
        hint = "was the run made with --profile?"
        runs_dir = os.path.join(run_dir, "runs")
        if os.path.isdir(runs_dir):  # a compare output: its run directories sit under runs/
            hint = (f"this looks like a compare output; its runs are "
                    f"{', '.join(sorted(os.listdir(runs_dir))) or 'none'} under {runs_dir}")
        raise FileNotFoundError(f"no profile.json in {run_dir} ({hint})")
    profile = load_profile(path)
    meta = profile["meta"]
    if label is None:
        label = str(meta.get("mode") or os.path.basename(os.path.abspath(run_dir)))
        if "fused" in meta:
            label += " (fused)" if meta["fused"] else ""
    return RunResult(label=label, run_dir=os.path.dirname(path) or ".", profile=profile)


# ----------------------------------------------------------------------------------------------
# Metrics derived from one profile
# ----------------------------------------------------------------------------------------------
def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _short(reason: Optional[str]) -> str:
    """A few words for a table cell; the full reason goes under the table."""
    if not reason:
        return "not measured"
    r = reason.lower()
    for needle, short in (("device is cpu", "CPU run"), ("nvidia-ml-py", "no pynvml"),
                          ("nvml could not", "no NVML"), ("cuda is not available", "no CUDA"),
                          ("never entered", "not measured"), ("not supported", "not supported"),
                          ("no gpu", "no GPU"), ("not readable", "not readable"),
                          ("no rapl", "no RAPL"), ("run failed", "run failed"),
                          ("out of memory", "OOM"), ("no e2e", "no e2e run"),
                          ("not requested", "not requested"),
                          ("segments", "no per-block segments"),
                          ("not timed", "not timed"),
                          ("counted per training step", "per step only"),
                          ("flops not counted", "not counted"), ("not recorded", "not recorded"),
                          ("inconsistent", "inconsistent")):
        if needle in r:
            return short
    return reason if len(reason) <= 28 else reason[:25] + "..."


def _segments_by_block(profile: dict) -> Optional[List[dict]]:
    """Sequential: the measured segments of blocks 1..n in order, or None if not separable."""
    segs = profile["run"].get("segments") or []
    if not segs:
        return None
    labelled = {}
    for s in segs:
        m = _BLOCK.match(str(s.get("label") or ""))
        if m:
            labelled.setdefault(int(m.group(1)), []).append(s)
    if labelled and sum(len(v) for v in labelled.values()) == len(segs):
        out = []
        for k in sorted(labelled):
            group = labelled[k]
            out.append(_merge_segments(group, f"block{k}"))
        return out
    if len(segs) >= 2:  # unlabelled: the trainer measures one segment per block, in order
        return [_merge_segments([s], f"block{i + 1}") for i, s in enumerate(segs)]
    return None


def _merge_segments(group: List[dict], label: str) -> dict:
    def total(key):
        vals = [s.get(key) for s in group]
        return sum(vals) if all(v is not None for v in vals) else None

    def peak(key):
        vals = [s.get(key) for s in group if s.get(key) is not None]
        return max(vals) if vals else None

    return {"label": label, "time_s": total("time_s"), "images": total("images"),
            "energy_j": total("energy_j"), "cpu_energy_j": total("cpu_energy_j"),
            "sampled_energy_j": total("sampled_energy_j"),
            "peak_allocated_gib": peak("peak_allocated_gib"),
            "peak_reserved_gib": peak("peak_reserved_gib"),
            "short": any(s.get("short") for s in group),
            "energy_unavailable": next((s.get("energy_unavailable") for s in group
                                        if s.get("energy_unavailable")), None)}


def _window_energy(w: dict, method: Optional[str]) -> Tuple[Optional[float], Optional[str]]:
    """Energy of an aggregated window and where it comes from.

    Windows shorter than the counter's ~100 ms update read whole updates or nothing, so a
    window name most of whose windows are short takes the power-sampling integral when there is
    one (no quantisation; its error is about one sample interval per boundary) and is marked.
    """
    energy = w.get("energy_j")
    if energy is None:
        return None, None
    short, count = w.get("short_windows") or 0, w.get("count") or 1
    if short == 0:
        return energy, method or "counter"
    if 2 * short > count and w.get("sampled_energy_j") is not None:
        return w["sampled_energy_j"], f"power samples ({short}/{count} windows < 100 ms)"
    return energy, f"{method or 'counter'}, {short}/{count} windows < 100 ms (estimate)"


SHORT_NO_SAMPLES = ("measured window shorter than the energy counter's ~100 ms update and no "
                    "power samples to integrate instead: measure more --steps")


def _measured_energy(energy: Optional[float], sampled: Optional[float], short: bool,
                     method: Optional[str]) -> Tuple[Optional[float], Optional[str],
                                                     Optional[str]]:
    """(energy J, where it comes from, why it is None) of a measured segment or run.

    A measured stretch shorter than the counter's ~100 ms update reads a whole update or none
    (0 J, or up to twice the truth): the power-sample integral replaces it when there is one,
    otherwise the value is withheld, never shown as a measurement."""
    if energy is None:
        return None, None, None
    if not short:
        return energy, method or "counter", None
    if sampled is not None:
        return sampled, "power samples (measured window < 100 ms)", None
    return None, None, SHORT_NO_SAMPLES


def run_metrics(r: RunResult) -> Tuple[Dict[str, Any], Dict[str, str], List[dict], str]:
    """(metrics, reasons for the None ones, per-block rows, how the per-image cost was computed).

    Metric keys: images, time_s, throughput_img_s, time_per_image_ms, energy_per_image_j,
    mean_power_w, cpu_energy_per_image_j, peak_allocated_gib, peak_reserved_gib, nvml_used_gib,
    energy_method, oom_count, sampled_energy_per_image_j.
    """
    keys = ("images", "time_s", "throughput_img_s", "time_per_image_ms", "energy_per_image_j",
            "mean_power_w", "cpu_energy_per_image_j", "peak_allocated_gib", "peak_reserved_gib",
            "nvml_used_gib", "energy_method", "oom_count", "sampled_energy_per_image_j",
            "parameters_gib", "optimizer_state_gib", "rest_at_peak_gib", "gflop_per_pair",
            "achieved_tflops")
    if r.profile is None:
        why = r.error or f"run {r.status}"
        if r.status == "oom":
            why = "out of memory: " + (r.error or "")
        elif r.status == "failed":
            why = "run failed: " + (r.error or "")
        return {k: None for k in keys}, {k: why for k in keys}, [], "no profile"
    run = r.profile["run"]
    unav = run.get("unavailable") or {}
    e_reason = unav.get("energy") or "GPU energy not measured"
    m_reason = unav.get("memory") or "memory not measured"
    cpu_reason = run.get("cpu_energy_unavailable") or "CPU energy not measured"
    # DDP: images count the global batch (all processes' pairs), GPU energy is this process's
    # GPU only, so GPU energy per pair = energy / (images / world_size)
    world = (r.profile.get("meta") or {}).get("world_size") or 1

    def gpu_per_pair(e: Optional[float], n: Optional[float]) -> Optional[float]:
        v = _div(e, n)
        return None if v is None else v * world

    met: Dict[str, Any] = {
        "images": run.get("images"),
        "time_s": run.get("time_s"),
        "peak_allocated_gib": run.get("peak_allocated_gib"),
        "peak_reserved_gib": run.get("peak_reserved_gib"),
        "nvml_used_gib": run.get("nvml_used_gib"),
        "energy_method": run.get("energy_method"),
        "oom_count": run.get("oom_count"),
        "mean_power_w": run.get("mean_power_w"),
    }
    run_short = run["short"] if "short" in run else any(  # files from before run.short
        sg.get("short") for sg in run.get("segments") or [])
    run_energy, run_source, short_reason = _measured_energy(
        run.get("energy_j"), run.get("sampled_energy_j"), run_short, run.get("energy_method"))
    if run_short:
        met["energy_method"] = run_source
        met["mean_power_w"] = _div(run_energy, run.get("time_s"))
        if short_reason:
            e_reason = short_reason
    breakdown, breakdown_reasons = memory_breakdown(r.profile)
    met.update(breakdown)
    per_block: List[dict] = []
    basis = "run"
    segs = _segments_by_block(r.profile) if r.mode == "sequential" else None
    if r.mode == "sequential" and segs:
        basis = f"sum over {len(segs)} blocks (one pass each)"
        t_img = [_div(s["time_s"], s["images"]) for s in segs]
        seg_energy = [_measured_energy(s["energy_j"], s["sampled_energy_j"], s["short"],
                                       run.get("energy_method")) for s in segs]
        e_img = [gpu_per_pair(e, s["images"]) for (e, _, _), s in zip(seg_energy, segs)]
        c_img = [_div(s["cpu_energy_j"], s["images"]) for s in segs]
        s_img = [gpu_per_pair(s["sampled_energy_j"], s["images"]) for s in segs]
        met["time_per_image_ms"] = (1000.0 * sum(t_img)) if all(v is not None for v in t_img) \
            else None
        met["energy_per_image_j"] = sum(e_img) if all(v is not None for v in e_img) else None
        met["cpu_energy_per_image_j"] = sum(c_img) if all(v is not None for v in c_img) else None
        met["throughput_img_s"] = _div(1000.0, met["time_per_image_ms"])
        met["sampled_energy_per_image_j"] = sum(s_img) if all(v is not None for v in s_img) \
            else None
        gflops, gflop_why = _segment_gflops(r.profile, segs)
        if any(why for _, _, why in seg_energy):
            e_reason = SHORT_NO_SAMPLES
        for k, (s, t, e) in enumerate(zip(segs, t_img, e_img)):
            per_block.append({
                "gflop_per_pair": None if gflops is None else gflops[k],
                "gflop_unavailable": gflop_why,
                "block": s["label"], "source": "measured segment",
                "peak_allocated_gib": s["peak_allocated_gib"],
                "peak_reserved_gib": s["peak_reserved_gib"],
                "time_per_image_ms": None if t is None else 1000.0 * t,
                "energy_per_image_j": e, "images": s["images"],
                "energy_source": seg_energy[k][1] if e is not None else None,
                "short": s["short"], "windows": None, "short_windows": None,
                "energy_unavailable": None if e is not None else (
                    seg_energy[k][2] or s["energy_unavailable"])})
    else:
        images = run.get("images")
        met["time_per_image_ms"] = None if _div(run.get("time_s"), images) is None else \
            1000.0 * _div(run.get("time_s"), images)
        met["throughput_img_s"] = run.get("throughput_img_s")
        met["energy_per_image_j"] = gpu_per_pair(run_energy, images)
        met["cpu_energy_per_image_j"] = _div(run.get("cpu_energy_j"), images)
        met["sampled_energy_per_image_j"] = gpu_per_pair(run.get("sampled_energy_j"), images)
        if r.mode == "sequential":
            basis = "run (segments not separable per block: NOT one pass per block)"
        windows = r.profile.get("windows") or {}
        for name in sorted((n for n in windows if _BLOCK.match(n)),
                           key=lambda n: int(_BLOCK.match(n).group(1))):
            w = windows[name]
            timed = _timed(w)
            energy, source = _window_energy(w, run.get("energy_method")) if timed else (None, None)
            per_block.append({
                "gflop_per_pair": None,
                "gflop_unavailable": "flops are counted per training step, not per block",
                "block": name, "source": f"'{name}' windows",
                "peak_allocated_gib": w.get("peak_allocated_gib"),
                "peak_reserved_gib": w.get("peak_reserved_gib"),
                "time_per_image_ms": None if not timed or _div(w.get("time_s_total"), images)
                is None else 1000.0 * _div(w.get("time_s_total"), images),
                "time_unavailable": None if timed else NOT_TIMED,
                "energy_per_image_j": gpu_per_pair(energy, images),
                "energy_source": source,
                "images": images, "short": None, "windows": w.get("count"),
                "short_windows": w.get("short_windows"),
                "energy_unavailable": (NOT_TIMED if not timed else
                                       e_reason if w.get("energy_j") is None else None)})
    arithmetic, arithmetic_reasons = _arithmetic(r.profile, r.mode, segs,
                                                 met.get("throughput_img_s"))
    met.update(arithmetic)
    reasons: Dict[str, str] = {}
    for k in keys:
        if met.get(k) is not None:
            continue
        if k in breakdown_reasons:
            reasons[k] = breakdown_reasons[k]
        elif k in arithmetic_reasons:
            reasons[k] = arithmetic_reasons[k]
        elif k in ("peak_allocated_gib", "peak_reserved_gib", "nvml_used_gib", "oom_count"):
            reasons[k] = m_reason if k != "nvml_used_gib" or unav.get("memory") else \
                "NVML memory not measured"
        elif k in ("energy_per_image_j", "mean_power_w", "energy_method",
                   "sampled_energy_per_image_j"):
            reasons[k] = e_reason
        elif k == "cpu_energy_per_image_j":
            reasons[k] = cpu_reason
        else:
            reasons[k] = "nothing measured" if not run.get("images") else "not measured"
    return met, reasons, per_block, basis


GIB = float(1 << 30)
NO_RESIDENT = ("parameters and optimizer state not recorded (profile.json written by a trainer "
               "before this report version)")


def memory_breakdown(profile: dict) -> Tuple[Dict[str, Optional[float]], Dict[str, str]]:
    """The peak split into what lives across steps and the rest, at the measured segment with
    the highest peak (sequential: the block that sets the run's peak):
    parameters_gib, optimizer_state_gib (exact tensor bytes, recorded by the trainer at the end
    of each measured segment: meta["resident"]) and rest_at_peak_gib = peak allocated - both
    (activations, gradients, the loss's buffers, workspaces). Returns (values, reasons for the
    None ones)."""
    keys = ("parameters_gib", "optimizer_state_gib", "rest_at_peak_gib")
    resident = (profile.get("meta") or {}).get("resident")
    segs = profile["run"].get("segments") or []
    if not resident or len(resident) != len(segs):
        return {k: None for k in keys}, {k: NO_RESIDENT for k in keys}
    peaks = [sg.get("peak_allocated_gib") for sg in segs]
    if all(p is not None for p in peaks):
        i = max(range(len(segs)), key=lambda j: peaks[j])
    else:  # no device memory (CPU): the segment holding the most
        i = max(range(len(segs)), key=lambda j: sum(resident[j].values()))
    params = resident[i]["parameters_bytes"] / GIB
    state = resident[i]["optimizer_state_bytes"] / GIB
    rest = None if peaks[i] is None else peaks[i] - params - state
    reasons = {}
    if rest is None:
        reasons["rest_at_peak_gib"] = ((profile["run"].get("unavailable") or {}).get("memory")
                                       or "memory not measured")
    elif rest < 0:  # the peak cannot hold less than what lived through it
        rest = None
        reasons["rest_at_peak_gib"] = (
            "inconsistent: parameters and optimizer state exceed the measured peak (were they "
            "on another device?)")
    return {"parameters_gib": params, "optimizer_state_gib": state,
            "rest_at_peak_gib": rest}, reasons


NO_FLOPS = "flops not recorded (profile.json written by a trainer before this report version)"
FLOPS_NOT_COUNTED = ("flops not counted: the trainer counts them in the last warm-up step "
                     "(--profile-warmup 0 leaves none)")


def _segment_gflops(profile: dict, block_segs: Optional[List[dict]]
                    ) -> Tuple[Optional[List[float]], Optional[str]]:
    """Matmul and convolution GFLOP per image pair of one training step, per measured segment
    (meta["flops_per_step"]: per process, counted by torch.utils.flop_counter), or (None, why).
    ``block_segs``: sequential's segments merged per block; they must be one per block."""
    meta = profile.get("meta") or {}
    flops = meta.get("flops_per_step")
    segs = profile["run"].get("segments") or []
    batch, world = meta.get("batch_size"), meta.get("world_size") or 1
    if not flops or len(flops) != len(segs):
        return None, NO_FLOPS
    if any(f is None for f in flops):
        return None, FLOPS_NOT_COUNTED
    if block_segs is not None and len(block_segs) != len(flops):
        return None, "sequential segments not one per block"
    if not batch:
        return None, "batch size not recorded"
    return [f * world / batch / 1e9 for f in flops], None


def _arithmetic(profile: dict, mode: str, block_segs: Optional[List[dict]],
                throughput: Optional[float]) -> Tuple[Dict[str, Optional[float]], Dict[str, str]]:
    """gflop_per_pair: the flops of one training step per image pair (forward, backward and any
    recomputation; sequential: summed over the blocks, as its per-pair time); achieved_tflops:
    that over the measured time per pair, per GPU (process)."""
    keys = ("gflop_per_pair", "achieved_tflops")
    if mode == "sequential" and not block_segs:
        return {k: None for k in keys}, {k: "sequential segments not one per block" for k in keys}
    gflops, why = _segment_gflops(profile, block_segs if mode == "sequential" else None)
    if gflops is None:
        return {k: None for k in keys}, {k: why for k in keys}
    gflop = sum(gflops) if mode == "sequential" else gflops[0]
    world = (profile.get("meta") or {}).get("world_size") or 1
    achieved = None if throughput is None else gflop * throughput / world / 1000.0
    return ({"gflop_per_pair": gflop, "achieved_tflops": achieved},
            {} if achieved is not None else {"achieved_tflops": "time not measured"})


def phase_reasons(r: RunResult) -> Dict[str, str]:
    """Why a phase time is n/a: its windows were memory-only, or there are none."""
    windows = (r.profile or {}).get("windows") or {}
    # the reasons phase_times gives up for the whole run, whatever the windows
    run_reason = None
    if r.profile is not None and not r.profile["run"].get("images"):
        run_reason = "no image pairs measured"
    elif r.profile is not None and r.mode == "sequential":
        segs = _segments_by_block(r.profile)
        if not segs:
            run_reason = "sequential segments not separable per block"
        elif len({s["images"] for s in segs}) != 1:
            run_reason = ("sequential blocks measured on unequal numbers of image pairs, so a "
                          "phase's per-pair time summed over blocks is not defined")
    out = {}
    for phase in PHASES:
        names = [n for n in windows if n == phase or re.match(rf"^block\d+/{phase}$", n)]
        out[phase] = ("no such windows in this run" if not names else
                      NOT_TIMED if not all(_timed(windows[n]) for n in names) else
                      run_reason or "not measured")
    return out


def phase_times(r: RunResult, basis_blocks: int) -> Dict[str, Optional[float]]:
    """Time per image (ms) of each phase, summed over blocks: forward, head, backward, optimizer.

    e2e windows: block<k>/forward, head, backward, optimizer; block modes: block<k>/<phase>.
    Sequential ("one pass each") multiplies by the number of blocks: each block saw 1/n of the
    image pairs (checked: equal segments, else n/a).
    """
    out: Dict[str, Optional[float]] = {p: None for p in PHASES}
    if r.profile is None:
        return out
    windows = r.profile.get("windows") or {}
    images = r.profile["run"].get("images")
    if not images:
        return out
    scale = 1.0
    if r.mode == "sequential":
        segs = _segments_by_block(r.profile)
        if not segs or len({s["images"] for s in segs}) != 1:
            return out
        scale = float(len(segs))
    for phase in PHASES:
        names = [n for n in windows if n == phase or re.match(rf"^block\d+/{phase}$", n)]
        if names and all(_timed(windows[n]) for n in names):
            total = sum(windows[n]["time_s_total"] for n in names)
            out[phase] = 1000.0 * total * scale / images
    return out


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = [
    # key, header, format, ratio to e2e?
    ("peak_allocated_gib", "peak allocated (GiB)", "{:.2f}", True),
    ("peak_reserved_gib", "peak reserved (GiB)", "{:.2f}", True),
    ("throughput_img_s", "throughput (pairs/s)", "{:.1f}", True),
    ("time_per_image_ms", "time/pair (ms)", "{:.3f}", True),
    ("energy_per_image_j", "GPU energy/pair (J)", "{:.3f}", True),
    ("mean_power_w", "mean GPU power (W)", "{:.0f}", True),
]
SIG = "sig"  # a column format: 3 significant digits, whole numbers from 100 up (see _sig)
BREAKDOWN_COLUMNS = [
    ("peak_allocated_gib", "peak allocated (GiB)", "{:.2f}", True),
    ("parameters_gib", "parameters (GiB)", "{:.2f}", True),
    ("optimizer_state_gib", "optimizer state (GiB)", "{:.2f}", True),
    ("rest_at_peak_gib", "activations, gradients, workspace (GiB)", "{:.2f}", True),
]
ARITHMETIC_COLUMNS = [
    ("gflop_per_pair", "GFLOP/pair (matmul + conv)", SIG, True),
    ("achieved_tflops", "achieved TFLOP/s per GPU", SIG, True),
]
DETAIL_COLUMNS = [
    ("nvml_used_gib", "NVML used (GiB)", "{:.2f}", True),
    ("cpu_energy_per_image_j", "CPU energy/pair (J)", "{:.3f}", True),
    ("sampled_energy_per_image_j", "sampled energy/pair (J)", "{:.3f}", True),
    ("images", "image pairs", "{:d}", False),
    ("time_s", "measured time (s)", "{:.2f}", False),
    ("oom_count", "OOMs", "{:d}", False),
    ("energy_method", "energy method", "{}", False),
]
BLOCK_COLUMNS = [
    ("peak_allocated_gib", "peak allocated (GiB)", "{:.2f}", True),
    ("gflop_per_pair", "GFLOP/pair", SIG, True),
    ("time_per_image_ms", "time/pair (ms)", "{:.3f}", True),
    ("energy_per_image_j", "GPU energy/pair (J)", "{:.4f}", True),
    ("energy_source", "energy from", "{}", False),
]


def _on_gpu(profile: Optional[dict]) -> bool:
    """Whether a run trained on a GPU (its profile names one; a CPU run's meters have none)."""
    env = (profile or {}).get("environment") or {}
    return bool(env.get("gpu") or env.get("nvml_gpus"))


def _world_size(profile: Optional[dict]) -> int:
    return ((profile or {}).get("meta") or {}).get("world_size") or 1


def _per_device(runs: Sequence[RunResult]) -> str:
    """What a per-device rate is per: a GPU, or on CPU (no GPU) the training process."""
    cpu = [not _on_gpu(r.profile) for r in runs if r.profile is not None]
    return ("per process (CPU)" if cpu and all(cpu) else
            "per GPU (CPU runs: per process)" if any(cpu) else "per GPU")


def _columns(columns, runs: Sequence[RunResult]) -> list:
    """The columns with labels that say what a figure covers in these runs: achieved TFLOP/s
    per GPU or, on CPU, per process; mean power of this process's GPU only under torchrun
    (profile.json is rank 0's: its power is one GPU's, not the job's)."""
    ddp = any(_world_size(r.profile) > 1 for r in runs)
    labels = {"achieved_tflops": f"achieved TFLOP/s {_per_device(runs)}",
              "mean_power_w": "mean GPU power, rank 0's GPU only (W)" if ddp else None}
    return [(k, labels.get(k) or header, *rest) for k, header, *rest in columns]


def _fmt(value: Any, fmt: str) -> str:
    if fmt == SIG:  # figures that span orders of magnitude (a CPU's TFLOP/s is 0.0x)
        return _sig(float(value))
    if isinstance(value, float) and fmt == "{:d}":
        fmt = "{:.0f}"
    return fmt.format(value)


def _ratio(v: Any, base: Any) -> Optional[float]:
    if not isinstance(v, (int, float)) or not isinstance(base, (int, float)) or base == 0:
        return None
    return float(v) / float(base)


def _build_table(title: str, columns, rows: List[Tuple[str, Dict[str, Any], Dict[str, str]]],
                 baseline: Dict[str, Any], baseline_reason: str, ratio_header: str) -> dict:
    """rows: (label, values, reasons). Adds <key>_vs_e2e = value / baseline[key]."""
    cols = []
    for key, header, fmt, ratio in columns:
        cols.append({"key": key, "label": header, "format": fmt})
        if ratio:
            cols.append({"key": key + "_vs_e2e", "label": ratio_header, "format": "{:.2f}x",
                         "ratio_of": key})
    out_rows = []
    for label, values, reasons in rows:
        cells, na = {}, {}
        for key, _header, _fmt_, ratio in columns:
            cells[key] = values.get(key)
            if cells[key] is None:
                na[key] = reasons.get(key) or "not measured"
            if ratio:
                rk = key + "_vs_e2e"
                cells[rk] = _ratio(values.get(key), baseline.get(key))
                if cells[rk] is None:
                    if values.get(key) is None:
                        na[rk] = na[key]
                    elif baseline.get(key) is None:
                        na[rk] = baseline_reason if not baseline else (
                            f"e2e {key} not measured")
        out_rows.append({"label": label, "cells": cells, "na": na})
    return {"title": title, "columns": cols, "rows": out_rows,
            "baseline": {k: baseline.get(k) for k, *_ in columns}}


def _md_table(table: dict, footnotes: List[str]) -> str:
    """The table in markdown. A column that is n/a in every row is left out and named in one
    line under the table instead, with its reason (or reasons), so that a pasted table holds only
    what was measured; the JSON report keeps every column."""
    rows = table["rows"]
    kept, dropped = [], {}
    gone = set()
    for c in table["columns"]:
        reasons = list(dict.fromkeys(row["na"].get(c["key"]) or "not measured"
                                     for row in rows))
        if rows and all(row["cells"].get(c["key"]) is None for row in rows) and (
                not c.get("ratio_of") or c["ratio_of"] in gone or len(reasons) == 1):
            # a ratio column goes with its value column; one n/a for its own reasons
            # (e.g. the baseline was not timed) stays, since nothing else says why
            gone.add(c["key"])
            if not c.get("ratio_of"):
                dropped.setdefault(tuple(reasons), []).append(c["label"])
            for reason in reasons:
                if reason not in footnotes:
                    footnotes.append(reason)
        else:
            kept.append(c)
    omitted = "; ".join(f"{', '.join(labels)}: "
                        + " or ".join(f"n/a ({_short(reason)})" for reason in reasons)
                        for reasons, labels in dropped.items())
    if not kept:
        return f"Nothing measured here ({omitted})."
    head = "| run | " + " | ".join(c["label"] for c in kept) + " |"
    sep = "|---|" + "|".join("---:" for _ in kept) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for c in kept:
            v = row["cells"].get(c["key"])
            if v is None and c.get("ratio_of") and row["cells"].get(c["ratio_of"]) is None:
                cells.append("n/a")  # its value cell, just left of it, gives the reason
            elif v is None:
                reason = row["na"].get(c["key"]) or "not measured"
                if reason not in footnotes:
                    footnotes.append(reason)
                cells.append(f"n/a ({_short(reason)})")
            else:
                cells.append(_fmt(v, c["format"]))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if omitted:
        lines += ["", f"Not in this table: {omitted}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def _header(runs: Sequence[RunResult]) -> dict:
    envs = [r.profile["environment"] for r in runs if r.profile]
    metas = [r.profile["meta"] for r in runs if r.profile]
    meters = [r.profile.get("meters", {}).get("energy", {}) for r in runs if r.profile]
    env = envs[0] if envs else {}
    differs = sorted({k for e in envs[1:] for k in ("gpu", "driver", "torch", "hostname")
                      if e.get(k) != env.get(k)})
    settings_keys = ("arch", "image_size", "batch_size", "projector", "fused", "expander", "pool",
                     "precision", "channels_last", "optimizer", "workers", "profile_warmup",
                     "profile_phases",
                     "max_steps", "steps_per_block", "dataset", "device", "small_stem",
                     "synthetic_augment", "world_size")
    settings: Dict[str, Any] = {}
    varying: Dict[str, list] = {}
    for k in settings_keys:
        vals = [m.get(k) for m in metas if k in m]
        if not vals:
            continue
        uniq = []
        for v in vals:
            if v not in uniq:
                uniq.append(v)
        if len(uniq) == 1:
            settings[k] = uniq[0]
        else:
            varying[k] = uniq
    m0 = meters[0] if meters else {}
    timings = []
    for r in runs:
        t = timing_label(r.profile)
        if t is not None and t not in timings:
            timings.append(t)
    gpu = env.get("gpu") or ", ".join(g.get("name", "?") for g in env.get("nvml_gpus") or []) \
        or None
    return {
        "gpu": gpu, "driver": env.get("driver"), "cuda": env.get("cuda"),
        "torch": env.get("torch"), "triton": env.get("triton"), "python": env.get("python"),
        "hostname": env.get("hostname"), "cpu": env.get("cpu"),
        "gpu_memory_gib": env.get("gpu_memory_gib"),
        "environment_differs": differs,
        "settings": settings, "settings_per_run": varying,
        "timing": timings[0] if len(timings) == 1 else (
            "; ".join(f"{r.label}: {timing_label(r.profile)}" for r in runs if r.profile)
            if timings else None),
        "timing_mixed": len(timings) > 1,
        "energy_method": m0.get("method"), "power_source": m0.get("power_source"),
        "sample_interval_s": m0.get("sample_interval_s"),
    }


def _baseline(runs: Sequence[RunResult]) -> Optional[RunResult]:
    """The e2e run without fused kernels if there is one, else the first e2e run."""
    e2e = [r for r in runs if r.mode == BASELINE_MODE]
    for r in e2e:
        if r.fused is False:
            return r
    return e2e[0] if e2e else None


def _same_options_e2e(runs: Sequence[RunResult],
                      base: Optional[RunResult]) -> Optional[RunResult]:
    """With a baseline that left flags out (compare --baseline-without): the e2e run that has
    them, with the baseline's kernels (fused or not), if the report holds one."""
    if base is None or not base.without:
        return None
    return next((r for r in runs if r is not base and r.mode == BASELINE_MODE
                 and r.fused == base.fused and r.profile is not None), None)


def build_report(runs: Sequence[RunResult], command: Optional[str] = None,
                 title: str = "Blockwise vs end-to-end: memory, speed and energy") -> dict:
    """The report as a dict (what report.json holds)."""
    if not runs:
        raise ValueError("build_report needs at least one run")
    base = _baseline(runs)
    base_reason = "no e2e run in this report" if base is None else (
        f"e2e run {base.label!r} has no profile ({base.status})" if base.profile is None else "")
    entries = []
    for r in runs:
        met, reasons, per_block, basis = run_metrics(r)
        entries.append({"label": r.label, "mode": r.mode, "fused": r.fused, "run_dir": r.run_dir,
                        "status": r.status, "error": r.error, "exit_code": r.exit_code,
                        "wall_s": r.wall_s, "command": r.command, "metrics": met,
                        "na": reasons, "per_block": per_block, "per_image_basis": basis,
                        "phases_ms_per_image": phase_times(r, len(per_block)),
                        "phases_na": phase_reasons(r),
                        "timing": timing_label(r.profile),
                        "world_size": _world_size(r.profile),
                        # the run's own method: metrics' energy_method names the power samples
                        # when the run was short, which its (counter) windows did not use
                        "window_energy_method": ((r.profile or {}).get("run") or {}).get(
                            "energy_method"),
                        "windows": (r.profile or {}).get("windows") or {}})
    base_entry = next((e for e, r in zip(entries, runs) if r is base), None)
    base_met = base_entry["metrics"] if base_entry else {}

    def label_of(e):
        if e["mode"] == "sequential" and e["per_image_basis"].startswith("sum over"):
            return f"{e['label']} (all 4 blocks, one pass each)"
        return e["label"]

    rows = [(label_of(e), e["metrics"], e["na"]) for e in entries]
    tables = {
        "summary": _build_table("Summary (measured steps only)",
                                _columns(SUMMARY_COLUMNS, runs), rows, base_met,
                                base_reason or "no e2e run", "x e2e"),
        "memory": _build_table("Peak memory: what lives across steps and the rest",
                               BREAKDOWN_COLUMNS, rows, base_met, base_reason or "no e2e run",
                               "x e2e"),
        "arithmetic": _build_table("Arithmetic: counted flops and the rate achieved",
                                   _columns(ARITHMETIC_COLUMNS, runs), rows, base_met,
                                   base_reason or "no e2e run", "x e2e"),
        "detail": _build_table("Detail", DETAIL_COLUMNS, rows, base_met,
                               base_reason or "no e2e run", "x e2e"),
    }
    block_rows = []
    for e in entries:
        for b in e["per_block"]:
            reasons = {k: (b.get("energy_unavailable") if k in ("energy_per_image_j",
                                                                "energy_source") else
                           b.get("gflop_unavailable") if k == "gflop_per_pair" else
                           b.get("time_unavailable") if k == "time_per_image_ms" and
                           b.get("time_unavailable") else
                           e["na"].get(k.replace("time_per_image_ms", "time_s")))
                       for k, *_ in BLOCK_COLUMNS}
            block_rows.append((f"{e['label']} {b['block']}", b, reasons))
    tables["per_block"] = _build_table(
        "Per block (ratio to the whole e2e step)", BLOCK_COLUMNS, block_rows, base_met,
        base_reason or "no e2e run", "x e2e step")
    same = _same_options_e2e(runs, base)
    if same is not None:
        ref = entries[runs.index(same)]
        flags = ", ".join("--" + n for n in base.without)
        tables["same_options"] = _build_table(
            f"Against e2e with the same options ({flags}): {ref['label']!r}",
            _columns(SUMMARY_COLUMNS, runs),
            [row for row, r in zip(rows, runs) if r is not base], ref["metrics"],
            f"e2e run {ref['label']!r} has no profile", "x e2e (same options)")
    phase_cols = [(p, f"{p} (ms/pair)", "{:.3f}", True) for p in PHASES]
    phase_rows = [(label_of(e), e["phases_ms_per_image"], e["phases_na"]) for e in entries]
    tables["phases"] = _build_table(
        "Time per phase, summed over blocks", phase_cols, phase_rows,
        base_entry["phases_ms_per_image"] if base_entry else {}, base_reason or "no e2e run",
        "x e2e")
    return {
        "schema": REPORT_SCHEMA,
        "title": title,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "header": _header(runs),
        "baseline": base.label if base else None,
        "baseline_reason": base_reason or None,
        "baseline_without": list(base.without) if base and base.without else None,
        "runs": entries,
        "tables": tables,
        "plots": list(PLOTS),
        "notes": _notes(runs, base),
    }


def _notes(runs: Sequence[RunResult], base: Optional[RunResult]) -> List[str]:
    notes = [
        "Unit: an image pair (one training example: one image's two augmented views, two "
        "forward passes; --batch-size counts pairs). Throughput is pairs per second of measured "
        "time (from the start of the first measured step to the end of the last, synchronized "
        "at both ends; per block in sequential mode), not the process's wall-clock time; time "
        "and energy are per pair. Only the measured steps count (after "
        "the warm-up steps); each run was a fresh process.",
        "Peak allocated: PyTorch's caching allocator, tensors only (max_memory_allocated over "
        "the measured steps); peak reserved: the allocator's segments; NVML used: device memory "
        "in use by all processes incl. the CUDA context, read at the end of each measured "
        "segment.",
        "Peak memory breakdown: parameters (the fp32 master weights of the blocks and of the "
        "heads that exist) and optimizer state (e.g. LARS momentum) are the exact bytes of "
        "those tensors at the end of the measured segment that sets the run's peak "
        "(sequential: usually block 1, with its own head only); the rest is peak allocated "
        "minus both: activations kept for backward, gradients, the loss's buffers and "
        "workspaces at the peak moment.",
        "Arithmetic: the matmul and convolution flops of one training step (forward, "
        "backward, and the recomputation of --activation-checkpointing or --split-views), "
        "counted by torch.utils.flop_counter in the last warm-up step of each measured segment, "
        "per image pair (sequential: summed over the 4 blocks, each block's step including the "
        "frozen blocks' forward); Triton kernels are not counted (the Barlow Twins loss: about "
        "8 N^2 D per call, a small fraction). Achieved TFLOP/s = those flops over the measured "
        f"time per pair, {_per_device(runs)}. The ratio of flops bounds the ratio of throughputs "
        "a mode can reach at equal efficiency.",
        "Energy: NVML's total-energy counter (mJ) read after a device synchronize at both ends "
        "of each window (or, where the counter is unsupported, the trapezoid integral of power "
        "samples); GPU only, the CPU (RAPL) column is separate. Windows shorter than the "
        "counter's ~100 ms update are flagged as short; per-window energies of short windows are "
        "estimates (their sum over many windows is unbiased).",
        "Timed windows synchronize the device at both ends. Per-phase timing off (the default): "
        "no window inside the measured part is timed, so throughput carries no sync per step; "
        "step, block and phase windows record peak memory only (no sync; their time and energy "
        "are n/a, never 0). Per-phase timing on (--phases): every block and phase window is timed too, which "
        "lowers throughput (by 28-35 % for ResNet-50 on an H100 with a slow host); compare "
        "throughput only between runs of the same kind.",
        "Sequential mode trains one block per step (block k's step also runs the frozen blocks "
        "1..k-1 forward). Its per-pair time and energy are reported per block and as 'all 4 "
        "blocks, one pass each' = sum over blocks of (block k's measured time or energy) / "
        "(image pairs in block k's measured steps): the cost of training every block once on "
        "each image pair, comparable with one e2e step per pair. Its throughput is 1 / that "
        "time.",
        "Ratios ('x e2e') divide by the baseline run: "
        + (f"{base.label!r}." if base else "none (no e2e run), so ratios are n/a."),
    ]
    worlds = sorted({_world_size(r.profile) for r in runs if r.profile} - {1})
    if worlds:
        notes.append(
            f"Runs of {' or '.join(map(str, worlds))} processes (torchrun): each process meters "
            "its own GPU and rank 0 writes profile.json, so mean power, the power trace and the "
            "per-window energies are rank 0's GPU only, not the job's or the node's; GPU energy "
            "per pair is that GPU's energy over the pairs it trained (images / world_size), the "
            "job's energy per pair when every GPU draws alike. Throughput counts every "
            "process's pairs.")
    if any(r.profile and "sampling" in (r.profile["run"].get("energy_method") or "")
           for r in runs):
        notes.append("At least one run measured energy, in whole or in part, by power sampling "
                     "(the total-energy counter was not supported, or a read of it failed or "
                     "it reset inside a window).")
    return notes


def render_markdown(rep: dict) -> str:
    h = rep["header"]
    out = [f"# {rep['title']}", ""]
    gpu = h.get("gpu") or "no GPU (CPU run)"
    mem = f", {h['gpu_memory_gib']:.1f} GiB" if h.get("gpu_memory_gib") else ""
    out.append(f"**GPU** {gpu}{mem}; **driver** {h.get('driver') or 'n/a'}; "
               + (f"**CUDA** {h.get('cuda') or 'n/a'}; " if h.get("gpu") else
                  f"**CUDA** not used (torch built for {h['cuda']}); " if h.get("cuda") else
                  "**CUDA** n/a; ")
               + f"**torch** {h.get('torch')}; "
               f"**triton** {h.get('triton') or 'n/a'}; **python** {h.get('python')}; "
               f"**CPU** {h.get('cpu') or 'n/a'}; **host** {h.get('hostname')}.")
    s = h.get("settings") or {}
    if s:
        out.append("")
        out.append("**Settings** " + "; ".join(f"{k} {v}" for k, v in s.items()) + ".")
    if h.get("settings_per_run"):
        out.append("")
        out.append("**Varies per run** " + "; ".join(
            f"{k}: {', '.join(map(str, v))}" for k, v in h["settings_per_run"].items()) + ".")
    if h.get("timing"):
        out.append("")
        out.append(f"**Timing** {h['timing']}." + (
            " **Warning**: the runs differ in per-phase timing; their throughputs are not "
            "comparable." if h.get("timing_mixed") else ""))
    method = h.get("energy_method") or "not measured"
    power = h.get("power_source")
    interval = h.get("sample_interval_s")
    out.append("")
    out.append(f"**Energy** method {method}" + (f"; power trace from NVML {power} power every "
                                                f"{1000 * interval:.0f} ms" if power and interval
                                                else "") + ".")
    if h.get("environment_differs"):
        out.append("")
        out.append("**Warning**: runs differ in " + ", ".join(h["environment_differs"]) + ".")
    if rep.get("command"):
        out += ["", f"Produced by `{rep['command']}` at {rep['created_utc']}."]
    failed = [r for r in rep["runs"] if r["status"] != "ok"]
    for r in failed:
        out += ["", f"**{r['label']}: {r['status']}** (exit code {r['exit_code']}): "
                    f"{(r['error'] or '').strip()[:300]}"]
    footnotes: List[str] = []
    sections = [("summary", "## Summary"), ("same_options", "## Against e2e with the same options"),
                ("memory", "## Peak memory breakdown"),
                ("arithmetic", "## Arithmetic"), ("per_block", "## Per block"),
                ("phases", "## Time per phase"), ("detail", "## Detail")]
    for key, heading in sections:
        if key not in rep["tables"]:  # same_options: only with compare --baseline-without
            continue
        t = rep["tables"][key]
        caption = [] if t["title"] == heading.lstrip("# ") else [f"*{t['title']}*", ""]
        out += ["", heading, ""] + caption + [_md_table(t, footnotes)]
        if key == "summary":
            out += ["", "![peak memory](peak_memory.png)", "",
                    "![throughput](throughput.png)", "",
                    "![energy per image pair](energy_per_image.png)"]
        if key == "per_block":
            basis = [f"{r['label']}: {r['per_image_basis']}" for r in rep["runs"]
                     if r["mode"] == "sequential"]
            if basis:
                out += ["", "Sequential per-pair basis: " + "; ".join(basis) + "."]
    out += ["", "## Power", "", "![power trace](power_trace.png)"]
    out += ["", "## Windows per run", ""]
    for r in rep["runs"]:
        out += _md_windows(r, rep, footnotes)
    if footnotes:
        out += ["", "## Not measured", ""]
        out += [f"- n/a ({_short(f)}): {f}" for f in footnotes]
    out += ["", "## How this was measured", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(out) + "\n"


def _md_windows(r: dict, rep: dict, footnotes: List[str]) -> List[str]:
    if not r["windows"]:
        return [f"**{r['label']}**: no measured windows.", ""]
    if not any(_timed(w) for w in r["windows"].values()):
        # per-phase timing off: nothing but counts and peaks to show (no columns of n/a)
        if NOT_TIMED not in footnotes:
            footnotes.append(NOT_TIMED)
        m_reason = r["na"].get("peak_allocated_gib") or "memory not measured"
        order = sorted(r["windows"].items(), key=lambda kv: (kv[0] != "step", kv[0]))
        if all(w.get("peak_allocated_gib") is None for _, w in order):
            if m_reason not in footnotes:
                footnotes.append(m_reason)
            return [f"**{r['label']}**: nothing measured per window (no timing; peak memory "
                    f"n/a ({_short(m_reason)})); windows: "
                    + ", ".join(f"{name} x{w['count']}" for name, w in order) + ".", ""]
        lines = [f"**{r['label']}** (no window timed: time and energy are those of the measured "
                 "steps as a whole, above)", "", "| window | count | peak allocated (GiB) |",
                 "|---|---:|---:|"]
        for name, w in order:
            peak = w.get("peak_allocated_gib")
            if peak is None and m_reason not in footnotes:
                footnotes.append(m_reason)
            lines.append(f"| {name} | {w['count']} | "
                         + (f"{peak:.2f}" if peak is not None else f"n/a ({_short(m_reason)})")
                         + " |")
        return lines + [""]
    base = next((e for e in rep["runs"] if e["label"] == rep["baseline"]), None)
    base_w = base["windows"] if base else {}
    # a window's energy is this process's GPU's: under torchrun, one GPU of several
    e_head = ("energy, rank 0's GPU only (J)" if (r.get("world_size") or 1) > 1 else
              "energy (J)")
    lines = [f"**{r['label']}**", "",
             "| window | count | mean (ms) | x e2e (same window) | total (s) | "
             f"{e_head} | peak allocated (GiB) | windows < 100 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    e_reason = r["na"].get("energy_per_image_j") or "GPU energy not measured"
    m_reason = r["na"].get("peak_allocated_gib") or "memory not measured"
    for name, w in sorted(r["windows"].items(), key=lambda kv: (kv[0] != "step", kv[0])):
        timed = _timed(w)
        if timed:
            ratio = _ratio(w.get("time_s_mean"), (base_w.get(name) or {}).get("time_s_mean"))
            cells = [name, str(w["count"]), f"{1000 * w['time_s_mean']:.2f}",
                     f"{ratio:.2f}x" if ratio is not None else (
                         "n/a (no such e2e window)" if name not in base_w else
                         "n/a (not timed in e2e)"),
                     f"{w['time_s_total']:.3f}"]
            energy, source = _window_energy(w, r.get("window_energy_method"))
        else:
            if NOT_TIMED not in footnotes:
                footnotes.append(NOT_TIMED)
            cells = [name, str(w["count"])] + ["n/a (not timed)"] * 3
            energy, source = None, None
        e_fmt = "{:.2f}"
        if source and source.startswith("power samples"):
            e_fmt = "{:.2f} (sampled)"
        elif source and "estimate" in source:
            e_fmt = "~{:.2f}"
        for v, reason, fmt in ((energy, e_reason if timed else NOT_TIMED, e_fmt),
                               (w.get("peak_allocated_gib"), m_reason, "{:.2f}")):
            if v is None:
                if reason not in footnotes:
                    footnotes.append(reason)
                cells.append(f"n/a ({_short(reason)})")
            else:
                cells.append(fmt.format(v))
        # a window is flagged short only when its energy was measured: no energy, no count
        cells.append("n/a (not timed)" if not timed else
                     "n/a (no energy)" if energy is None else
                     f"{w.get('short_windows', 0)}/{w['count']}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Energy of window names most of whose windows are shorter than the "
                    "counter's update: '(sampled)' = power-sample integral, '~' = counter sum "
                    "(an estimate).", ""]


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    # Room for the two-line suptitle above the axes' own titles, measured: recent matplotlib's
    # tight_layout already leaves it (a fixed rect would double the gap), older ones do not.
    title = getattr(fig, "_blockwise_suptitle", None)
    if title is not None and fig.axes:
        renderer = fig.canvas.get_renderer()
        axes_top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
        overlap = axes_top - title.get_window_extent(renderer).y0
        if overlap > -4:  # keep at least 4 px between the title and the axes
            top = fig.subplotpars.top - (overlap + 4) / fig.bbox.height
            fig.subplots_adjust(top=top)
    _io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130,
                                                   bbox_inches="tight"), suffix=".png")


def _sig(v: float) -> str:
    """A bar label: whole numbers from 100 up, else 3 significant digits (0.64, not 1)."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _bars(ax, labels: List[str], values: List[Optional[float]], reasons: List[str],
          unit: str, fmt: Optional[str], color=None) -> None:
    """Bars with their values (``fmt`` None: :func:`_sig`); missing values get an
    'n/a (reason)' label, no bar."""
    xs = list(range(len(labels)))
    top = max([v for v in values if v is not None] or [1.0])
    for x, v, why in zip(xs, values, reasons):
        if v is None:
            ax.text(x, top * 0.02, f"n/a\n({_short(why)})", ha="center", va="bottom",
                    fontsize=8, color="0.35")
        else:
            ax.bar(x, v, color=color or "C0", width=0.6)
            ax.text(x, v, _sig(v) if fmt is None else fmt.format(v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels([_tick(x) for x in labels], fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("run (training mode)", fontsize=9)
    ax.set_ylabel(unit)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)


def _tick(label: str, width: int = 16) -> str:
    """A run's label on an axis or in a legend, wrapped onto lines of at most ``width``
    characters (a baseline's "e2e (without --activation-checkpointing, --split-views)" would
    otherwise run off the figure)."""
    return "\n".join(textwrap.wrap(label, width, break_long_words=False,
                                   break_on_hyphens=False)) or label


def _suptitle(fig, rep: dict, what: str) -> None:
    h = rep["header"]
    s = h.get("settings") or {}
    desc = ", ".join(str(x) for x in (s.get("arch"), s.get("image_size") and
                                      f"{s['image_size']}px", s.get("batch_size") and
                                      f"batch {s['batch_size']}", s.get("precision"))
                     if x)
    fig._blockwise_suptitle = fig.suptitle(
        f"{what}\n{h.get('gpu') or 'CPU run'}" + (f" - {desc}" if desc else ""), fontsize=10)


def render_plots(rep: dict, out_dir: str) -> List[str]:
    plt = _plt()
    runs = rep["runs"]
    labels = [r["label"] for r in runs]
    paths = []

    def seq_note(what: str) -> str:  # only when a sequential run is plotted
        return f" (sequential: {what})" if any(r["mode"] == "sequential" for r in runs) else ""

    # peak memory: per run, and per block
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    ax = axes[0]
    xs = list(range(len(runs)))
    vals_a = [r["metrics"]["peak_allocated_gib"] for r in runs]
    vals_r = [r["metrics"]["peak_reserved_gib"] for r in runs]
    top = max([v for v in vals_a + vals_r if v is not None] or [1.0])
    for x, a, rv, r in zip(xs, vals_a, vals_r, runs):
        if a is None:
            ax.text(x, top * 0.02, f"n/a\n({_short(r['na'].get('peak_allocated_gib'))})",
                    ha="center", va="bottom", fontsize=8, color="0.35")
            continue
        m = r["metrics"]
        parts = (m.get("parameters_gib"), m.get("optimizer_state_gib"), m.get("rest_at_peak_gib"))
        if all(v is not None for v in parts):  # allocated, split as the breakdown table
            bottom = 0.0
            for v, color, name in zip(parts, ("#08519c", "#6baed6", "#c6dbef"),
                                      ("allocated: parameters", "allocated: optimizer state",
                                       "allocated: activations, gradients, workspace")):
                ax.bar(x - 0.18, v, width=0.36, bottom=bottom, color=color, label=name if
                       name not in ax.get_legend_handles_labels()[1] else None)
                bottom += v
        else:
            ax.bar(x - 0.18, a, width=0.36, color="C0", label="allocated" if
                   "allocated" not in ax.get_legend_handles_labels()[1] else None)
        ax.text(x - 0.18, a, f"{a:.1f}", ha="center", va="bottom", fontsize=7)
        if rv is not None:
            ax.bar(x + 0.18, rv, width=0.36, color="C1", label="reserved" if
                   "reserved" not in ax.get_legend_handles_labels()[1] else None)
            ax.text(x + 0.18, rv, f"{rv:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels([_tick(x) for x in labels], fontsize=8)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_xlabel("run (training mode)", fontsize=9)
    ax.set_ylabel("peak memory (GiB)")
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)
    ax.set_title("whole run", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # under the axis: the bars keep their room
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2,
                  frameon=False)
    ax = axes[1]
    block_runs = [r for r in runs if r["per_block"]]
    base = next((r for r in runs if r["label"] == rep["baseline"]), None)
    if block_runs:
        nb = max(len(r["per_block"]) for r in block_runs)
        width = 0.8 / len(block_runs)
        any_bar = False
        measured = any(b["peak_allocated_gib"] is not None for r in block_runs
                       for b in r["per_block"])
        for i, r in enumerate(block_runs):
            for j, b in enumerate(r["per_block"]):
                v = b["peak_allocated_gib"]
                x = j + (i - (len(block_runs) - 1) / 2) * width
                if v is not None:
                    ax.bar(x, v, width=width * 0.95, color=f"C{i + 2}",
                           label=r["label"] if j == 0 else None)
                    any_bar = True
                elif measured:  # some measured, this one not
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, color="0.35")
        if base and base["metrics"]["peak_allocated_gib"] is not None:
            ax.axhline(base["metrics"]["peak_allocated_gib"], color="k", ls="--", lw=1,
                       label=_tick(f"{base['label']} (whole step)", 40))
        ax.set_xticks(range(nb))
        ax.set_xticklabels([f"block {j + 1}" for j in range(nb)])
        ax.set_ylabel("peak allocated (GiB)")
        ax.set_title("per block", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:  # under the axis, as the left panel's
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2,
                      frameon=False)
        if not any_bar:
            ax.text(0.5, 0.5, "n/a (" + _short(block_runs[0]["na"].get("peak_allocated_gib"))
                    + ")", transform=ax.transAxes, ha="center")
    else:
        ax.text(0.5, 0.5, "no per-block windows", transform=ax.transAxes, ha="center")
        ax.set_axis_off()
    _suptitle(fig, rep, "Peak GPU memory")
    p = os.path.join(out_dir, "peak_memory.png")
    _save(fig, p)
    plt.close(fig)
    paths.append(p)

    # throughput
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _bars(ax, labels, [r["metrics"]["throughput_img_s"] for r in runs],
          [r["na"].get("throughput_img_s", "") for r in runs], "throughput (image pairs/s)",
          None)
    _suptitle(fig, rep, "Training throughput" + seq_note("all blocks, one pass each"))
    p = os.path.join(out_dir, "throughput.png")
    _save(fig, p)
    plt.close(fig)
    paths.append(p)

    # energy per image; sequential stacked by block
    fig, ax = plt.subplots(figsize=(6.5, 4))
    vals = [r["metrics"]["energy_per_image_j"] for r in runs]
    top = max([v for v in vals if v is not None] or [1.0])
    for x, (r, v) in enumerate(zip(runs, vals)):
        if v is None:
            ax.text(x, top * 0.02, f"n/a\n({_short(r['na'].get('energy_per_image_j'))})",
                    ha="center", va="bottom", fontsize=8, color="0.35")
            continue
        if r["mode"] == "sequential" and r["per_image_basis"].startswith("sum over"):
            bottom = 0.0
            for j, b in enumerate(r["per_block"]):
                e = b["energy_per_image_j"] or 0.0
                ax.bar(x, e, bottom=bottom, width=0.6, color=f"C{j}", alpha=0.85,
                       label=f"sequential {b['block']}" if
                       f"sequential {b['block']}" not in ax.get_legend_handles_labels()[1]
                       else None)
                bottom += e
        else:
            ax.bar(x, v, width=0.6, color="0.5")
        ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([_tick(x) for x in labels], fontsize=8)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_xlabel("run (training mode)", fontsize=9)
    ax.set_ylabel("GPU energy per image pair (J)")
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _suptitle(fig, rep, "GPU energy per image pair" + seq_note("stacked per block"))
    p = os.path.join(out_dir, "energy_per_image.png")
    _save(fig, p)
    plt.close(fig)
    paths.append(p)

    # power trace, one panel per run
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.9 * len(runs) + 0.8), squeeze=False)
    for ax, r, run_prof in zip(axes[:, 0], runs, rep.get("_traces", [None] * len(runs))):
        trace = run_prof
        if not trace:
            reason = r["na"].get("mean_power_w") or "no power samples"
            ax.text(0.5, 0.5, f"{r['label']}: n/a ({_short(reason)})", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.35")
            ax.set_yticks([])
            ax.set_xticks([])
            continue
        ax.plot(trace["t_s"], trace["power_w"], lw=0.8, color="C3")
        for i, (a, b) in enumerate(trace.get("measured_s") or []):
            ax.axvspan(a, b, color="C2", alpha=0.15, label="measured" if i == 0 else None)
        ax.set_ylabel("power (W)")
        world = r.get("world_size") or 1
        ax.set_title(r["label"] + (f" (rank 0's GPU only, of {world} processes)"
                                   if world > 1 else ""), fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if trace.get("measured_s"):
            ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("time since the profiler started (s)")
    _suptitle(fig, rep, "GPU power (NVML samples; shaded: measured steps)")
    fig.tight_layout()
    p = os.path.join(out_dir, "power_trace.png")
    _save(fig, p)
    plt.close(fig)
    paths.append(p)
    return paths


def write_report(runs: Sequence[RunResult], out_dir: str, command: Optional[str] = None,
                 title: Optional[str] = None,
                 annotate: Optional[Callable[[dict], None]] = None) -> dict:
    """Build and write report.json, report.md and the plots into ``out_dir``; returns the dict.
    ``annotate(rep)``, if given, completes the report in place before anything is written (e.g.
    compare's note on whether the Triton kernels ran)."""
    os.makedirs(out_dir, exist_ok=True)
    rep = build_report(runs, command=command, **({"title": title} if title else {}))
    if annotate is not None:
        annotate(rep)
    rep["_traces"] = [(r.profile or {}).get("power_trace") for r in runs]
    try:
        render_plots(rep, out_dir)
    finally:
        rep.pop("_traces")
    _io.atomic_write_json(os.path.join(out_dir, "report.json"), rep)
    _io.atomic_write_text(os.path.join(out_dir, "report.md"), render_markdown(rep))
    return rep

