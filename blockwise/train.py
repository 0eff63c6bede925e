"""``python -m blockwise.train``: pre-train (e2e / simultaneous / sequential), then probe every block.

    python -m blockwise.train --fused                       # digits, CPU or GPU, a few minutes
    python -m blockwise.train --dataset imagefolder --data-dir DIR --mode sequential \\
        --block-epochs 10,10,20,20 --fused
    torchrun --nproc_per_node=8 -m blockwise.train --dataset imagefolder --data-dir DIR --fused
    python -m blockwise.train --resume runs/20250101-120000      # continue where it stopped

Run directory (--out, default runs/<timestamp>): config.json (resolved settings and versions),
metrics.jsonl (one record per block per log interval), checkpoint.pt (each epoch and at the end,
atomically; off by default with --profile, on with --checkpoint), probe.json,
backbone_torchvision.pt (ImageNet stem; backbone_small_stem.pt for the small stem),
summary.json, and profile.json with --profile.

Exit codes: 0 done; 2 bad input (unknown name, missing data, batch too small, non-finite loss:
a one-line message, no traceback; also an unreadable image file, an --out that cannot be a run
directory); 3 CUDA out of memory ("out of memory: ..."; nothing half-written); 130 interrupted
(Ctrl-C: one line naming the step and whether a checkpoint is there to --resume).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from PIL import UnidentifiedImageError

from blockwise import config as config_mod
from blockwise import models
from blockwise.checkpoint import atomic_torch_save, atomic_write_json, load_checkpoint
from blockwise.config import Config
from blockwise.probe import PROBE, format_table, run_probe
from blockwise.trainer import DistInfo, NonFiniteLoss, Trainer, setup_distributed

EXIT_BAD_INPUT = 2
EXIT_OOM = 3
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


class _Exit(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def versions() -> Dict[str, Any]:
    import numpy
    import torchvision
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "triton": triton_version,
            "numpy": numpy.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git_commit": commit, "hostname": platform.node()}


def resolve_config(given: Dict[str, Any]) -> Config:
    """The run's Config: from the flags, or (``resume``) the saved config with the flags merged."""
    if given.get("resume"):
        saved = load_checkpoint(given["resume"])["config"]
        given = dict(given)
        if "out" not in given:
            where = given["resume"]
            given["out"] = where if os.path.isdir(where) else os.path.dirname(os.path.abspath(where))
        return config_mod.merge_for_resume(saved, given)
    return config_mod.config_from_flags(given)


#: files whose presence means a directory already holds a run
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.jsonl")


def _claim_default_out() -> str:
    """runs/<timestamp>, created here; a suffix when another run took that second."""
    base = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs("runs", exist_ok=True)
    for i in range(1, 1000):
        out = base if i == 1 else f"{base}-{i}"
        try:
            os.mkdir(out)
            return out
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: 999 runs started in this second; pass --out")


def _existing_run_problem(cfg: Config, out: str) -> Optional[str]:
    """Why a run may not use ``out`` (it holds another run), or None. A resumed run may write
    into the directory it resumes, or into one that holds no run."""
    if os.path.exists(out) and not os.path.isdir(out):
        return (f"--out {out!r} exists and is not a directory; valid: a directory that holds no "
                f"run (created if missing)")
    if not os.path.isdir(out):
        return None
    if cfg.resume:
        where = cfg.resume if os.path.isdir(cfg.resume) else os.path.dirname(
            os.path.abspath(cfg.resume))
        if os.path.realpath(out) == os.path.realpath(where):
            return None
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not found:
        return None
    if cfg.resume:
        return (f"--out {out!r} already holds another run ({', '.join(found)}); resuming "
                f"{cfg.resume!r} there would overwrite it. Leave --out out to continue in the "
                "resumed run's directory, or choose an --out that holds no run")
    if "checkpoint.pt" in found:
        return (f"--out {out!r} already holds a run ({', '.join(found)}); a new run would "
                f"overwrite it. Continue it with --resume {out}, or choose another --out")
    # no checkpoint (a --profile run, a stop before the first epoch ended, a non-finite loss
    # before any): nothing to resume from
    return (f"--out {out!r} already holds a run ({', '.join(found)}) without a checkpoint, so it "
            f"cannot be resumed (--profile runs write none unless --checkpoint; a run stopped "
            f"before its first epoch ended has none). Choose another --out, or delete {out!r} "
            f"to reuse it")


def _resolve_out(cfg: Config, info: DistInfo) -> str:
    """The run directory: rank 0 decides (and claims the default one); every rank gets its
    answer, or the same error."""
    out, problem = cfg.out, None
    if info.is_main:
        if out is None:
            out = _claim_default_out()
        problem = _existing_run_problem(cfg, out)
        if problem is None:
            try:  # here, not after the model and data are built: a bad path fails at once
                os.makedirs(out, exist_ok=True)
            except OSError as err:
                problem = (f"--out {out!r}: cannot create the run directory "
                           f"({err.strerror or err}); valid: a writable directory path")
    if info.enabled:
        import torch.distributed as dist
        box = [out, problem]
        dist.broadcast_object_list(box, src=0)
        out, problem = box
    if problem:
        raise ValueError(problem)
    return out


def _config_record(cfg: Config, out: str, record: Dict[str, Any]) -> Dict[str, Any]:
    """config.json's content; on resume the earlier invocations are kept under "previous"."""
    path = os.path.join(out, "config.json")
    if cfg.resume and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                prev = json.load(fh)
        except (OSError, ValueError):
            prev = None
        if isinstance(prev, dict):
            record["previous"] = list(prev.get("previous") or []) + [
                {k: prev.get(k) for k in ("command", "started", "config")}]
    return record


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def run(cfg: Config, info: DistInfo, log=print) -> Dict[str, Any]:
    """Pre-train, save, probe, export; returns the summary. Raises _Exit for codes 2 and 3."""
    main = info.is_main
    say = log if main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    try:
        trainer = Trainer(cfg, cfg.out, info, log=say)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _Exit(EXIT_BAD_INPUT, f"error: {err}") from None
    if main:
        atomic_write_json(os.path.join(cfg.out, "config.json"), _config_record(cfg, cfg.out, {
            "config": cfg.to_dict(), "recipe": cfg.recipe_name(), "world_size": info.world_size,
            "versions": versions(), "command": sys.argv,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "fused_kernels_used": trainer.fused, "loss_uses_kernel": trainer.loss_fn.use_kernel,
            "train_images": len(trainer.bundle.train_ssl), "steps_per_epoch": trainer.steps_per_epoch,
            "total_steps": trainer.total_steps()}))
    say(config_mod.describe(cfg))
    say(f"{cfg.mode}: {cfg.arch} on {cfg.dataset} ({len(trainer.bundle.train_ssl)} training "
        f"images, {cfg.image_size} px), global batch {cfg.batch_size} over {info.world_size} "
        f"process(es) on {trainer.device}, {trainer.steps_per_epoch} steps/epoch, "
        f"{trainer.total_steps()} steps from step {trainer.state.step}; run dir {cfg.out}")
    try:
        try:
            summary = trainer.fit()
        except NonFiniteLoss as err:
            raise _Exit(EXIT_BAD_INPUT, f"error: {err}") from None
        if cfg.profile and main:
            meta = {**cfg.to_dict(), "warmup_steps": cfg.profile_warmup,
                    "measured_steps": trainer.measured_steps, "world_size": info.world_size,
                    "resident": trainer.resident, "flops_per_step": trainer.flops_per_step,
                    "fused_kernels_used": trainer.fused,
                    "loss_uses_kernel": trainer.loss_fn.use_kernel}
            trainer.prof.save(os.path.join(cfg.out, "profile.json"), meta=meta)
            summary["profile"] = os.path.join(cfg.out, "profile.json")
            if trainer.measured_steps == 0:  # e.g. resumed a few steps before --max-steps
                summary["profile_note"] = (
                    f"nothing measured: this process ran {summary.get('steps_this_process', 0)} step(s), all "
                    f"within the --profile-warmup {cfg.profile_warmup} warm-up steps (per "
                    f"phase); run more steps or lower --profile-warmup")
                warnings.warn(f"--profile: {summary['profile_note']}", RuntimeWarning)
        summary["export"] = _export(trainer) if main else None
        if info.enabled:
            # training is over on every rank: leave the job now, so that the other ranks do not
            # sit in a collective (NCCL times out after 10 minutes) while rank 0 probes alone
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        probe = None
        if cfg.probe_epochs > 0 and main:
            t_probe = time.perf_counter()
            probe = run_probe(cfg, trainer.blocks, trainer.bundle, trainer.device,
                              meta={"step": trainer.state.step})
            probe["probe_time_s"] = time.perf_counter() - t_probe  # both probes, incl. features
            atomic_write_json(os.path.join(cfg.out, PROBE), probe)
    except _Exit:
        raise
    except KeyboardInterrupt:
        kept = (f"the last checkpoint is kept: continue with --resume {cfg.out}"
                if trainer.last_checkpoint else "no checkpoint had been written yet")
        raise _Exit(EXIT_INTERRUPTED, f"interrupted at step {trainer.state.step}; {kept}") from None
    except UnidentifiedImageError as err:  # a corrupt or non-image file in the data tree
        raise _Exit(EXIT_BAD_INPUT, f"error: {err}; remove or replace that file (the data "
                                    f"directory must hold readable images only)") from None
    except BaseException as err:
        if _is_oom(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise _Exit(EXIT_OOM, f"out of memory: {first}") from None
        raise
    finally:
        trainer.close()
    summary["probe"] = probe
    # data set and model set-up, training, export and probe (not the interpreter's start-up)
    summary["wall_s"] = time.perf_counter() - t_start
    if main:
        atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
        say(format_summary(summary, cfg))
    return summary


def _export(trainer: Trainer) -> Dict[str, Any]:
    """backbone_torchvision.pt (ImageNet stem): loads into torchvision.models.<arch>() strictly."""
    cfg = trainer.cfg
    if cfg.small_stem:
        sd = models.export_torchvision_state_dict(trainer.blocks, cfg.arch, allow_small_stem=True)
        path = atomic_torch_save(sd, os.path.join(cfg.out, "backbone_small_stem.pt"))
        return {"path": path, "strict_torchvision": False,
                "note": "small stem (3x3 stride-1 conv1, no max-pool): torchvision's ResNet cannot "
                        "load it strictly, so backbone_torchvision.pt was not written; this file has "
                        "torchvision's key names: replace conv1 by a 3x3 stride-1 conv and maxpool "
                        "by nn.Identity(), then load_state_dict(strict=True)"}
    sd = models.export_torchvision_state_dict(trainer.blocks, cfg.arch)
    path = atomic_torch_save(sd, os.path.join(cfg.out, "backbone_torchvision.pt"))
    return {"path": path, "strict_torchvision": True,
            "note": f"torchvision.models.{cfg.arch}().load_state_dict(torch.load(path)) "
                    "(fc is freshly initialised)"}


def format_summary(summary: Dict[str, Any], cfg: Config) -> str:
    lines = ["", "=" * 78]
    pairs = summary["pairs_per_s"]
    loader = summary["loader_capacity_pairs_per_s"]
    wait = summary["data_wait_share"]
    lines.append(f"done: {summary['steps_this_process']} steps in {summary['time_s']:.1f} s "
                 f"({pairs:.1f} pairs/s, i.e. {2 * pairs:.1f} images/s)"
                 if pairs else f"done: no step run (already at step {summary['steps']})")
    if loader is not None:
        workers = summary.get("loader_workers")
        who = (f"{workers} worker(s) x 1 / their measured time per pair" if workers
               else "the main process: 1 / measured time per pair")
        if (summary.get("world_size") or 1) > 1:
            who += f", times {summary['world_size']} processes"
        lines.append(f"loader: capacity about {loader:.0f} pairs/s, i.e. {2 * loader:.0f} images/s "
                     f"({who}); waiting for data "
                     f"{100 * (wait or 0):.1f}% of the run")
    per_block = summary.get("peak_memory_gib_per_block")
    if per_block:
        lines.append("peak memory: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in per_block.items()))
    elif summary.get("peak_memory_gib") is not None:
        lines.append(f"peak memory: {summary['peak_memory_gib']:.2f} GiB (per-window figures in "
                     "profile.json)")
    else:
        lines.append("peak memory: n/a (CPU run)")
    if summary.get("parameters_gib"):
        lines.append(f"live across steps: parameters {summary['parameters_gib']:.2f} GiB, "
                     f"optimizer state {summary['optimizer_state_gib']:.2f} GiB (blocks and "
                     f"heads; part of any peak above)")
    if summary.get("profile"):
        lines.append(f"profile: {summary['profile']}" + (
            f" ({summary['profile_note']})" if summary.get("profile_note") else ""))
    export = summary.get("export")
    if export:
        lines.append(f"backbone: {export['path']}" + ("" if export["strict_torchvision"]
                                                     else f" ({export['note']})"))
    if summary.get("probe"):
        lines.append(format_table(summary["probe"]))
        untrained = summary.get("untrained_blocks") or []
        if untrained:
            lines.append(f"note: block(s) {', '.join(map(str, untrained))} got no training step "
                         f"(sequential mode stopped by --max-steps before them): their "
                         f"'pre-trained' column is their random initialisation")
        if summary["probe"].get("dataset") == "digits":
            lines.append(DIGITS_PROBE_NOTE)
        if summary["probe"].get("probe_time_s") is not None:
            lines.append(f"probe: {summary['probe']['probe_time_s']:.1f} s")
    if summary.get("wall_s") is not None:
        lines.append(f"total: {summary['wall_s']:.1f} s (set-up, training, export, probe)")
    lines.append(f"run directory: {cfg.out}")
    return "\n".join(lines)


#: under the probe table of a digits run: why a gain near 0 (or below) is expected there
DIGITS_PROBE_NOTE = (
    "note: on digits a random-init ResNet already probes at about 94-99%, so gains near 0 (or\n"
    "below) are expected: this run shows that the pipeline works end to end, not that it learns.\n"
    "To see learning, pre-train on real images, e.g. --dataset cifar10 --data-dir DIR --download\n"
    "(a GPU is advised; README, \"Training\").")


def main(argv: Optional[Sequence[str]] = None) -> int:
    given = config_mod.parse_args(argv)  # argparse itself exits 2 on an unknown flag
    info = DistInfo()
    try:
        try:
            cfg = resolve_config(given)
            info = setup_distributed(cfg.device)
            cfg.out = _resolve_out(cfg, info)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise _Exit(EXIT_BAD_INPUT, f"error: {err}") from None
        run(cfg, info)
        return 0
    except _Exit as err:
        if info.is_main or err.code == EXIT_OOM:
            print(str(err), file=sys.stderr, flush=True)
        return err.code
    finally:
        if info.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
