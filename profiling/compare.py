"""``python -m profiling compare``: each training mode as a fresh trainer process, one report.

Each mode (and, with ``--fused both``, each mode with and without the fused kernels) runs as its
own ``python -m blockwise.train --profile ...`` process on the same model, batch and synthetic
data, for ``--warmup`` steps and then ``--steps`` measured steps (sequential: that many per
block). A fresh process per mode is the honest measurement: no allocator cache, cudnn autotuning
or warm clocks carried from one mode into the next. The report is rendered from the runs'
profile.json files (this package never imports ``blockwise``).

Layout of ``--out``: ``runs/<label>/`` (the trainer's run directory), ``runs/<label>.log`` (its
output), ``report.md``, ``report.json`` and the PNG plots. An ``--out`` that already holds a
compare report (report.json, report.md or runs/) is refused unless ``--overwrite`` is given, which
deletes that report first.

The settings are checked before any trainer starts (modes, --arch, --device, sizes, projector,
seed), against copies of the trainer's valid names (``blockwise.config``; tests keep the copies
equal): a bad value is exit 2 with nothing written.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from profiling.report import RunResult, load_profile, write_report

MODES = ("e2e", "simultaneous", "sequential")  # as blockwise.config.MODES (not imported)
ARCHS = ("resnet18", "resnet50")  # as blockwise.models.ARCHS (not imported)
DEVICES = ("auto", "cuda", "cpu")  # as blockwise.config.DEVICES (not imported)
FUSED_CHOICES = ("off", "on", "both")
OOM_EXIT_CODE = 3  # blockwise.train's exit code on CUDA out-of-memory
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_available() -> bool:
    """Whether this machine has a CUDA device (torch imported only here, on demand)."""
    import torch

    return bool(torch.cuda.is_available())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show (None, False) or
    the help text already says it; the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; valid: {', '.join(ARCHS)}")


def resolve_device(device: Optional[str]) -> str:
    """The device the trainer runs will use: 'cuda' or 'cpu'. Refuses, as the trainer would
    (but before any run starts), a name it does not know and ``cuda`` without CUDA."""
    if device is not None and device not in DEVICES:
        raise ValueError(f"unknown --device {device!r}; valid: {', '.join(DEVICES)} (auto: cuda "
                         f"when available)")
    if device == "cpu":
        return "cpu"
    has_cuda = cuda_available()
    if device == "cuda" and not has_cuda:
        raise ValueError("--device cuda, but CUDA is not available here; valid: cpu, auto (or "
                         "leave --device out)")
    return "cuda" if has_cuda else "cpu"


def check_projector(spec: Optional[str]) -> None:
    """As blockwise.models.parse_projector: widths separated by '-', or 'none'."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return
    try:
        sizes = [int(v) for v in spec.split("-")]
    except ValueError:
        raise ValueError(f"--projector {spec!r}: expected widths separated by '-', e.g. "
                         "'8192-8192-8192', or 'none'") from None
    if any(v <= 0 for v in sizes):
        raise ValueError(f"--projector {spec!r}: every width must be a positive integer")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed!r}")


def check_timeout(timeout) -> None:
    if not isinstance(timeout, (int, float)) or not timeout > 0 or timeout != timeout:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout!r}")


def check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a directory; valid: a directory "
                         f"(created if missing)")


#: what a compare report leaves in its --out (besides the plots)
REPORT_FILES = ("report.json", "report.md", "runs")


def existing_report(out: str) -> List[str]:
    """The compare outputs already in ``out`` (report.json, report.md, runs/)."""
    return [n + ("/" if n == "runs" else "") for n in REPORT_FILES
            if os.path.lexists(os.path.join(out, n))]


def clear_report(out: str) -> None:
    """Delete an earlier compare report from ``out`` (--overwrite): runs/, report.json,
    report.md and the plots; nothing else in the directory."""
    from profiling.report import PLOTS

    runs = os.path.join(out, "runs")
    if os.path.isdir(runs) and not os.path.islink(runs):
        shutil.rmtree(runs)
    elif os.path.lexists(runs):
        os.remove(runs)
    for name in ("report.json", "report.md") + tuple(PLOTS):
        if os.path.lexists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def parse_modes(text: str) -> List[str]:
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"--modes {text!r}: unknown {bad or 'empty list'}; valid: "
                         f"{', '.join(MODES)} (comma-separated)")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes {text!r} repeats a mode")
    return modes


def fused_variants(choice: str) -> List[bool]:
    if choice not in FUSED_CHOICES:
        raise ValueError(f"--fused {choice!r}; valid: {', '.join(FUSED_CHOICES)}")
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def trainer_command(mode: str, *, run_dir: str, arch: str, image_size: int, batch_size: int,
                    steps: int, warmup: int, fused: bool, projector: Optional[str] = None,
                    device: Optional[str] = None, seed: int = 0,
                    extra: Sequence[str] = (), python: str = sys.executable,
                    profile: bool = True, phases: bool = False) -> List[str]:
    """The ``python -m blockwise.train`` command line of one measured run.

    e2e / simultaneous: ``warmup + steps`` optimisation steps (``--max-steps``); sequential:
    ``warmup + steps`` per block (``--steps-per-block``); the first ``warmup`` (per block) are
    outside the measured part (``--profile-warmup``). The synthetic set holds exactly one
    epoch of those steps. ``phases``: ``--profile-phases`` (time every block and phase window,
    one device sync per window boundary; off: the measured steps are timed as a whole, the step,
    block and phase windows record peak memory without a sync).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    for name, v, lo in (("steps", steps, 1), ("warmup", warmup, 0), ("batch_size", batch_size, 2),
                        ("image_size", image_size, 8)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
    total = warmup + steps
    cmd = [python, "-m", "blockwise.train", "--mode", mode, "--dataset", "synthetic",
           "--arch", arch, "--image-size", str(image_size), "--batch-size", str(batch_size),
           "--synthetic-size", str(batch_size * total), "--probe-epochs", "0",
           "--out", run_dir, "--seed", str(seed), "--fused" if fused else "--no-fused"]
    if profile:
        cmd += ["--profile", "--profile-warmup", str(warmup),
                "--profile-phases" if phases else "--no-profile-phases"]
    if projector:
        cmd += ["--projector", projector]
    if device:
        cmd += ["--device", device]
    if mode == "sequential":
        cmd += ["--steps-per-block", str(total)]
    else:
        cmd += ["--max-steps", str(total)]
    return cmd + list(extra)


def child_env() -> dict:
    """The environment of a trainer process: ours, with the repository importable."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    if REPO_ROOT not in path.split(os.pathsep):
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    return env


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


def run_trainer(cmd: List[str], run_dir: str, log_path: str, timeout_s: float,
                label: str, mode: str, fused: Optional[bool]) -> RunResult:
    """Run one trainer process; classify ok / oom / failed; load its profile.json."""
    if os.path.isdir(run_dir):  # (compare refuses an --out holding runs/ unless --overwrite)
        shutil.rmtree(run_dir)  # a stale run dir would be resumed or mixed in
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    res = RunResult(label=label, run_dir=run_dir, mode=mode, fused=fused, exit_code=rc,
                    wall_s=wall, command=cmd)
    profile_path = os.path.join(run_dir, "profile.json")
    if rc is None:
        res.status, res.error = "failed", f"timed out after {timeout_s:.0f} s (log: {log_path})"
    elif rc == OOM_EXIT_CODE or (rc != 0 and "out of memory" in _tail(log_path, 5).lower()):
        res.status = "oom"
        oom = [ln for ln in _tail(log_path, 20).splitlines() if "out of memory" in ln.lower()]
        res.error = (oom[-1] if oom else "out of memory") + (
            "" if rc == OOM_EXIT_CODE else f" (exit code {rc}, detected from the output)")
    elif rc != 0:
        res.status, res.error = "failed", f"exit code {rc}; log {log_path}:\n" + _tail(log_path)
    elif not os.path.isfile(profile_path):
        res.status, res.error = "failed", f"exit code 0 but no {profile_path} (was --profile " \
                                          "honoured?)"
    else:
        try:
            res.profile = load_profile(profile_path)
        except ValueError as e:
            res.status, res.error = "failed", str(e)
    return res


def _names(text: str) -> List[str]:
    return [n.strip().lstrip("-") for n in str(text).split(",") if n.strip()]


def baseline_flags(without: str, extra: Sequence[str]) -> List[str]:
    """The trainer flags after -- minus the ``--baseline-without`` ones: a switch such as
    --split-views, or a flag with its value (``--checkpoint-blocks 1`` or
    ``--checkpoint-blocks=1``)."""
    names = _names(without)
    flags = {a.split("=", 1)[0] for a in extra if a.startswith("--")}
    missing = [n for n in names if f"--{n}" not in flags]
    if not names or missing:
        raise ValueError(f"--baseline-without {without!r}: "
                         f"{'no flag named' if not names else 'not among the trainer flags'} "
                         f"{', '.join('--' + n for n in missing)}; the trainer flags after -- "
                         f"are: {' '.join(extra) or '(none)'}")
    drop = {f"--{n}" for n in names}
    out: List[str] = []
    skip_value = False
    for a in extra:
        if skip_value:
            skip_value = False
            if not a.startswith("--"):  # the dropped flag's value
                continue
        if a.split("=", 1)[0] in drop:
            skip_value = "=" not in a
            continue
        out.append(a)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default="e2e,simultaneous,sequential",
                   help=f"comma-separated modes ({', '.join(MODES)})")
    p.add_argument("--arch", default="resnet50", help=f"backbone: {' or '.join(ARCHS)}")
    p.add_argument("--image-size", type=int, default=224,
                   help="synthetic image side in pixels (>= 8)")
    p.add_argument("--batch-size", type=int, default=256, help="image pairs per step")
    p.add_argument("--steps", type=int, default=20,
                   help="measured steps (sequential: per block)")
    p.add_argument("--warmup", type=int, default=5,
                   help="warm-up steps before the measured ones (sequential: per block)")
    p.add_argument("--projector", default=None, help="projector widths, e.g. 8192-8192-8192 "
                   "(default: the trainer's)")
    p.add_argument("--fused", nargs="?", const="on", default="off", choices=FUSED_CHOICES,
                   help="fused Triton kernels: off, on (--fused alone), or both (each mode "
                        "twice); without CUDA the trainer runs the PyTorch references instead, "
                        "and the report says so")
    p.add_argument("--phases", action="store_true",
                   help="time every block and phase (forward, head, backward, optimizer) with "
                        "--profile-phases: one device sync per window boundary, which lowers "
                        "the measured throughput; by default the measured steps are timed as "
                        "a whole, step, block and phase windows give peak memory alone")
    p.add_argument("--baseline-without", default=None, metavar="FLAGS",
                   help="comma-separated trainer flags among those after -- (without the "
                        "dashes, e.g. activation-checkpointing,split-views): also run e2e "
                        "without them, first, as the baseline of every ratio (e.g. blockwise "
                        "with memory options against plain e2e)")
    p.add_argument("--device", default=None,
                   help=f"{', '.join(DEVICES)} (default: the trainer's, auto: cuda when "
                        "available); cuda without CUDA is refused before any run")
    p.add_argument("--seed", type=int, default=0, help="the trainer's --seed, every run")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per trainer run")
    p.add_argument("--python", default=sys.executable, help="interpreter of the trainer runs")
    p.add_argument("--out", required=True,
                   help="report directory; one that already holds a compare report "
                        "(report.json, report.md, runs/) is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the compare report already in --out (deletes its runs/, "
                        "report.json, report.md and plots first)")


def last_error_line(log_path: str) -> Optional[str]:
    """The last line of a trainer log that names an error ('error: ...', 'ValueError: ...'),
    or None."""
    lines = [ln.strip() for ln in _tail(log_path, 200).splitlines()]
    hits = [ln for ln in lines if "error:" in ln.lower()]
    return hits[-1] if hits else None


def _config_json(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def kernel_usage(res: RunResult) -> dict:
    """Whether a run actually used the Triton kernels: its config.json's
    ``fused_kernels_used`` / ``loss_uses_kernel`` (else its profile.json meta's; None when
    neither says), and its device."""
    rec = _config_json(res.run_dir)
    meta = (res.profile or {}).get("meta") or {}
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}

    def pick(key):
        v = rec.get(key, meta.get(key))
        return None if v is None else bool(v)

    return {"requested": res.fused, "fused_kernels_used": pick("fused_kernels_used"),
            "loss_uses_kernel": pick("loss_uses_kernel"),
            "device": cfg.get("device", meta.get("device"))}


def describe_kernels(usages: Sequence[dict], labels: Sequence[str]) -> Optional[str]:
    """One phrase for the runs that asked for the fused kernels: were they used?"""
    asked = [(u, lab) for u, lab in zip(usages, labels) if u["requested"]]
    if not asked:
        return None
    used = [lab for u, lab in asked if u["fused_kernels_used"]]
    unused = [(u, lab) for u, lab in asked if u["fused_kernels_used"] is False]
    unknown = [lab for u, lab in asked if u["fused_kernels_used"] is None]
    if used and not unused and not unknown:
        partial = [lab for u, lab in asked if u["loss_uses_kernel"] is False]
        return "requested; Triton kernels used" + (
            f" (loss kernel not used in {', '.join(partial)})" if partial else "")
    if unused and not used and not unknown:
        why = ("no CUDA" if all(u["device"] == "cpu" for u, _ in unused) else
               "see runs/*.log")
        return f"requested; Triton kernels not used ({why}): PyTorch references measured"
    parts = []
    if used:
        parts.append(f"used in {', '.join(used)}")
    if unused:
        parts.append(f"not used in {', '.join(lab for _, lab in unused)} (PyTorch references)")
    if unknown:
        parts.append(f"unknown in {', '.join(unknown)} (no config.json)")
    return "requested; Triton kernels " + "; ".join(parts)


def _annotate_kernels(rep: dict, results: Sequence[RunResult], choice: str) -> Optional[str]:
    """Put in the report whether the Triton kernels ran (header.fused_kernels, the Settings
    line's 'fused', each run's fused_kernels_used / loss_uses_kernel); the phrase, or None."""
    usages = [kernel_usage(r) for r in results]
    for entry, u in zip(rep["runs"], usages):
        entry["fused_kernels_used"] = u["fused_kernels_used"]
        entry["loss_uses_kernel"] = u["loss_uses_kernel"]
    text = describe_kernels(usages, [r.label for r in results])
    h = rep["header"]
    h["fused_kernels"] = {"requested": choice, "summary": text or "off (not requested)",
                          "used": [r.label for r, u in zip(results, usages)
                                   if u["fused_kernels_used"]]}
    if text is None:
        return None
    if "fused" in h.get("settings", {}):
        h["settings"]["fused"] = text
    elif "fused" in h.get("settings_per_run", {}):
        h["settings_per_run"]["fused"] = [text if v else "off"
                                          for v in h["settings_per_run"]["fused"]]
    else:
        h.setdefault("settings", {})["fused"] = text
    return text


def validate(args: argparse.Namespace, extra: Sequence[str]) -> dict:
    """Every check that needs no trainer run; ValueError (exit 2) before anything is written."""
    modes = parse_modes(args.modes)
    variants = fused_variants(args.fused)
    without = getattr(args, "baseline_without", None)
    base_extra = baseline_flags(without, extra) if without else None
    check_arch(args.arch)
    check_projector(args.projector)
    check_seed(args.seed)
    check_timeout(args.timeout)
    trainer_command(modes[0], run_dir="x", arch=args.arch, image_size=args.image_size,
                    batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                    fused=False)  # the sizes and step counts (ValueError naming the flag)
    out = os.path.abspath(args.out)
    check_out_dir(out)
    found = existing_report(out) if os.path.isdir(out) else []
    if found and not getattr(args, "overwrite", False):
        raise ValueError(f"--out {args.out!r} already holds a compare report "
                         f"({', '.join(found)}); a new compare would replace it. Choose another "
                         f"--out, or add --overwrite to delete that report and write this one")
    device = resolve_device(args.device)
    return {"modes": modes, "variants": variants, "without": without, "base_extra": base_extra,
            "out": out, "device": device, "clear": bool(found)}


def cpu_notice(args: argparse.Namespace) -> str:
    why = "--device cpu" if args.device == "cpu" else "no CUDA device here"
    # the hint for smaller settings only where these are larger than it
    big = args.arch != "resnet18" or args.image_size > 32 or args.batch_size > 16
    return (f"note: {why}: the trainer runs use the CPU, so peak memory and energy will be n/a "
            f"(throughput and flops only)"
            + (f"; {args.arch} at {args.image_size} px, batch {args.batch_size} (the defaults "
               f"are ResNet-50 at 224 px, batch 256) is slow on a CPU: e.g. --arch resnet18 "
               f"--image-size 32 --batch-size 16 --projector 512-512" if big else "")
            + ("; --fused: the Triton kernels need CUDA, the PyTorch references will be measured"
               if args.fused != "off" else ""))


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    v = validate(args, extra)
    modes, variants, without, base_extra, out = (v["modes"], v["variants"], v["without"],
                                                 v["base_extra"], v["out"])
    if v["device"] == "cpu":
        print(cpu_notice(args), flush=True)
    if v["clear"]:
        print(f"--overwrite: deleting the earlier report in {out}", flush=True)
        clear_report(out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    jobs = [(m, f, None) for m in modes for f in variants]
    if base_extra is not None:  # first, so that it is the ratio baseline (the first unfused
        jobs.insert(0, ("e2e", variants[0], base_extra))  # e2e, else the first e2e)
    results: List[RunResult] = []
    for i, (mode, fused, own_extra) in enumerate(jobs, 1):
        name = mode if len(variants) == 1 else f"{mode}-{'fused' if fused else 'unfused'}"
        label = mode if len(variants) == 1 else f"{mode} ({'fused' if fused else 'unfused'})"
        if own_extra is not None:
            name += "-baseline"
            label += f" (without {', '.join('--' + n for n in _names(without))})"
        run_dir = os.path.join(out, "runs", name)
        cmd = trainer_command(mode, run_dir=run_dir, arch=args.arch, image_size=args.image_size,
                              batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                              fused=fused, projector=args.projector, device=args.device,
                              seed=args.seed, extra=extra if own_extra is None else own_extra,
                              python=args.python, phases=getattr(args, "phases", False))
        print(f"[{i}/{len(jobs)}] {label}: {' '.join(shlex.quote(c) for c in cmd[1:])}",
              flush=True)
        res = run_trainer(cmd, run_dir, os.path.join(out, "runs", name + ".log"), args.timeout,
                          label, mode, fused)
        if own_extra is not None:
            res.without = _names(without)
        summary = res.status
        if res.profile:
            r = res.profile["run"]
            summary += (f", {r['images']} image pairs in {r['time_s']:.2f} s"
                        if r.get("time_s") else ", nothing measured")
        print(f"      {summary} ({res.wall_s:.0f} s)" + (f": {res.error}" if res.error else ""),
              flush=True)
        results.append(res)
    command = "python -m profiling compare " + " ".join(
        shlex.quote(a) for a in getattr(args, "_argv", []))
    noted: List[Optional[str]] = []  # whether the Triton kernels ran (the runs' config.json)
    write_report(results, out, command=command.strip(),
                 annotate=lambda rep: noted.append(_annotate_kernels(rep, results, args.fused)))
    kernels = noted[0]
    if kernels is not None and ("not used" in kernels or "unknown" in kernels):
        print(f"note: --fused {args.fused}: {kernels}", flush=True)
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0 if all(r.status == "ok" for r in results) else 1
