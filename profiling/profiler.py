"""Profiler: the trainer's one handle on time, energy and memory.

    prof = Profiler(device, enabled=cfg.profile)   # enabled=False: every call is a cheap no-op
    with prof.measure():                           # the measured part (after warm-up); may be
        for step in ...:                           # entered several times (sequential: per block)
            with prof.window("step"):
                with prof.window("block1"): ...    # nestable, any depth
            prof.add_images(batch_size)
    prof.save(run_dir + "/profile.json", meta=config_dict)
    prof.close()

Every timed window boundary synchronizes the device once, then reads the energy meter (time,
NVML counter, RAPL) and the memory meter (peaks; see memory.py for how nesting keeps each window's
peak exact). A memory-only window (``window(name, timed=False)``) reads the memory meter alone and
never synchronizes: the caching allocator books memory on the host when a kernel is enqueued, so
its peak is exact without a sync; its time and energy are null ("not timed"), never 0. Windows are aggregated by name, and only those that close inside ``measure()``
count: warm-up steps (compilation, autotuning, cudnn benchmarking) stay out of the figures.
Each ``measure()`` entry is one segment of the run; the run's time, images and energy are sums
over segments, its peaks maxima. Energy, power and the power trace are this process's GPU only:
under torchrun each process meters its own GPU (the trainer saves rank 0's profile), while
``images`` counts every process's pairs, so ``energy_per_image_j`` multiplies by world_size and
``mean_power_w`` and the windows' energies stay one GPU's. A segment is labelled ``block<k>``
when exactly one block was trained in it (had a ``block<k>/backward`` window; sequential mode
trains one block per segment and runs the earlier ones forward only), so reports can give
per-block costs.

The cost of a timed boundary when enabled: one device synchronize, one NVML read per GPU, one RAPL
read, one ``memory_stats`` call and a peak reset: tens of microseconds plus the time the GPU sits
idle between the synchronize and the next kernel launch. The figures of an instrumented run
include that; keep timed windows to the granularity the report needs (on a slow host, a sync per
phase cost 28-35 % of the throughput of a ResNet-50 step on an H100). A memory-only boundary costs
one ``memory_stats`` call and a peak reset, and lets the GPU queue run on.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import socket
from typing import Any, Dict, List, Optional

from profiling import _io
from profiling._windows import check_closing, check_window_name
from profiling.energy import EnergyMeter, EnergyWindow, combined_method
from profiling.memory import MemoryMeter, MemoryWindow

SCHEMA = "blockwise.profile/1"
MEASURE = "<measure>"  # the window name of a measure() segment (reserved)
_BLOCK = re.compile(r"^block(\d+)(/backward)?$")
TRACE_POINTS = 2000  # power_trace in profile.json is averaged down to at most this many points


class _NullContext:
    """A reusable do-nothing context manager (the disabled profiler's window/measure)."""

    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _NullContext()


class _Window:
    __slots__ = ("prof", "name", "timed")

    def __init__(self, prof: "Profiler", name: str, timed: bool):
        self.prof, self.name, self.timed = prof, name, timed

    def __enter__(self):
        self.prof.begin(self.name, timed=self.timed)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.prof.end(self.name)
            return False
        try:  # an exception is on its way out (e.g. a CUDA OOM the trainer turns into exit 3):
            self.prof.end(self.name)
        except Exception:  # closing the window must not replace it (a window left open inside
            pass  # by a bare begin(), a failing sync after a device error)
        return False


class _Measure:
    __slots__ = ("prof", "label")

    def __init__(self, prof: "Profiler", label: Optional[str]):
        self.prof, self.label = prof, label

    def __enter__(self):
        self.prof._measure_begin(self.label)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.prof._measure_end()
            return False
        try:  # as _Window: never replace the exception on its way out
            self.prof._measure_end()
        except Exception:
            pass
        return False


class _Agg:
    __slots__ = ("count", "untimed", "time", "energy", "energy_missing", "sampled",
                 "sampled_missing", "short", "peak_alloc", "peak_res", "images", "depth")

    def __init__(self, depth: int):
        self.count = 0
        self.untimed = 0  # memory-only windows among count (no time, no energy)
        self.time = 0.0
        self.energy = 0.0
        self.energy_missing = False
        self.sampled = 0.0
        self.sampled_missing = False
        self.short = 0
        self.peak_alloc: Optional[float] = None
        self.peak_res: Optional[float] = None
        self.images = 0
        self.depth = depth

    def add(self, e: Optional[EnergyWindow], m: MemoryWindow, images: int, depth: int) -> None:
        """One closed window; ``e`` None = a memory-only window (not timed)."""
        self.count += 1
        if e is None:
            self.untimed += 1
        else:
            self.time += e.time_s
            if e.energy_j is None:
                self.energy_missing = True
            else:
                self.energy += e.energy_j
            if e.sampled_energy_j is None:
                self.sampled_missing = True
            else:
                self.sampled += e.sampled_energy_j
            self.short += int(e.short)
        if m.peak_allocated_gib is not None:
            self.peak_alloc = max(self.peak_alloc or 0.0, m.peak_allocated_gib)
            self.peak_res = max(self.peak_res or 0.0, m.peak_reserved_gib or 0.0)
        self.images += images
        self.depth = min(self.depth, depth)

    def as_dict(self) -> dict:
        # a name with any memory-only window has no time/energy: a partial sum would look whole
        timed = self.untimed == 0
        energy = None if self.energy_missing or not timed else self.energy
        time_total = self.time if timed else None
        return {
            "count": self.count,
            "time_s_total": time_total,
            "time_s_mean": time_total / self.count if timed else None,
            "energy_j": energy,
            "short_windows": self.short,
            "peak_allocated_gib": self.peak_alloc,
            "peak_reserved_gib": self.peak_res,
            # beyond the binding schema (readers may ignore them):
            "mean_power_w": energy / self.time if energy is not None and self.time > 0 else None,
            "sampled_energy_j": None if self.sampled_missing or not timed else self.sampled,
            "timed": timed,  # False: memory-only windows, time and energy null ("not timed")
            "untimed_windows": self.untimed,
            "images": self.images,  # add_images() calls made while this window was open
            "depth": self.depth,
        }


class Profiler:
    """Time, energy and peak memory per named window on ``device`` (see the module docstring).

    Args:
        device: the training device; CUDA gets energy (NVML) and memory figures, CPU gets time
            and (where readable) RAPL CPU energy, the rest marked unavailable with a reason.
        enabled: False makes every method a no-op (nothing initialised, no synchronize).
        sample_interval_s: power-sampling period (power trace, sampling fallback).
        energy_method: "auto" | "counter" | "sampling" (see EnergyMeter).
        energy_meter, memory_meter: injected meters (tests); default built for ``device``.
    """

    def __init__(self, device: Any = "cuda", enabled: bool = True, *,
                 sample_interval_s: Optional[float] = 0.02, energy_method: str = "auto",
                 cpu_energy: bool = True, energy_meter: Optional[EnergyMeter] = None,
                 memory_meter: Optional[MemoryMeter] = None):
        self.enabled = bool(enabled)
        if not self.enabled:
            return
        import torch

        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._torch = torch
        is_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._cuda = is_cuda
        if energy_meter is None:
            energy_meter = EnergyMeter([self.device] if is_cuda else [], method=energy_method,
                                       sample_interval_s=sample_interval_s, cpu=cpu_energy,
                                       sync=False)
            if not is_cuda:
                energy_meter.gpu_unavailable = (
                    f"device is {self.device.type}: no GPU energy to measure"
                    if self.device.type != "cuda" else "CUDA is not available")
        self.energy = energy_meter
        self.memory = memory_meter if memory_meter is not None else MemoryMeter(self.device)
        self._stack: List[tuple] = []  # (name, images at begin, timed)
        self._agg: Dict[str, _Agg] = {}
        self._segments: List[dict] = []
        self._measuring = False
        self._images = 0  # images added inside measured steps, all segments
        self._seg_images0 = 0
        self._seg_label: Optional[str] = None
        self._seg_blocks: set = set()

    # -- windows -------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self._cuda:
            self._torch.cuda.synchronize(self.device)  # host-device sync: window boundary

    def window(self, name: str, timed: bool = True):
        """Context manager around a named window (nestable).

        ``timed=False``: a memory-only window (count and peak memory, time and energy null),
        which never synchronizes the device.
        """
        if not self.enabled:
            return _NULL
        return _Window(self, name, timed)

    def begin(self, name: str, timed: bool = True) -> None:
        if not self.enabled:
            return
        check_window_name(name)
        if not isinstance(timed, bool):
            raise TypeError(f"timed must be True or False, got {timed!r}")
        if not timed and name == MEASURE:
            raise ValueError(f"{MEASURE!r} is always timed")
        if timed:
            self._sync()
        self.memory.begin(name)
        if timed:
            self.energy.begin(name)
        self._stack.append((name, self._images, timed))

    def end(self, name: str) -> None:
        if not self.enabled:
            return
        check_closing(name, [w[0] for w in self._stack])
        timed = self._stack[-1][2]
        e = None
        if timed:
            self._sync()
            e = self.energy.end(name)
        m = self.memory.end(name, nvml=name == MEASURE)
        _, images0, _ = self._stack.pop()
        depth = len(self._stack)
        if name == MEASURE:
            self._last_measure = (e, m)
            return
        if self._measuring:
            agg = self._agg.get(name)
            if agg is None:
                agg = self._agg[name] = _Agg(depth)
            agg.add(e, m, self._images - images0, depth)
            m = _BLOCK.match(name)
            if m:  # (block name, trained?) for the segment's label
                self._seg_blocks.add((f"block{m.group(1)}", m.group(2) is not None))

    # -- the measured part ---------------------------------------------------------------------
    def measure(self, label: Optional[str] = None):
        """Context manager around the measured part of the run (after warm-up)."""
        if not self.enabled:
            return _NULL
        if label is not None and not isinstance(label, str):
            raise TypeError(f"label must be a string or None, got {type(label).__name__}")
        return _Measure(self, label)

    def _measure_begin(self, label: Optional[str]) -> None:
        if self._measuring:
            raise ValueError("measure() is already active; it cannot be nested")
        self.begin(MEASURE)
        self._measuring = True
        self._seg_images0 = self._images
        self._seg_label = label
        self._seg_blocks = set()

    def _measure_end(self) -> None:
        self._measuring = False
        self.end(MEASURE)
        e, m = self._last_measure
        images = self._images - self._seg_images0
        label = self._seg_label
        if label is None:
            # the block trained in this segment: the one with a backward window (sequential runs
            # frozen earlier blocks forward only), else the only block window seen
            trained = {b for b, bwd in self._seg_blocks if bwd}
            seen = {b for b, _ in self._seg_blocks}
            if len(trained) == 1:
                label = next(iter(trained))
            elif not trained and len(seen) == 1:
                label = next(iter(seen))
        self._segments.append({
            "label": label,
            "start_s": e.start_s,
            "time_s": e.time_s,
            "images": images,
            "energy_j": e.energy_j,
            "sampled_energy_j": e.sampled_energy_j,
            "cpu_energy_j": e.cpu_energy_j,
            "short": e.short,
            "counter_reset": e.counter_reset,
            "energy_method": e.method,
            "peak_allocated_gib": m.peak_allocated_gib,
            "peak_reserved_gib": m.peak_reserved_gib,
            "nvml_used_gib": m.nvml_used_gib,
            "oom_count": m.oom_count,
            "energy_unavailable": e.gpu_unavailable,
            "cpu_energy_unavailable": e.cpu_unavailable,
        })

    def add_images(self, n: int) -> None:
        """Count ``n`` image pairs processed by a measured step (ignored outside measure())."""
        if not self.enabled:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"add_images needs a non-negative int, got {n!r}")
        if self._measuring:
            self._images += n

    def peak_memory(self) -> Optional[dict]:
        """Peak allocated/reserved GiB since the profiler started (windows reset PyTorch's own
        max_memory_allocated, so read peaks here), or None when not measured."""
        if not self.enabled:
            return None
        return self.memory.peak_since_start()

    # -- results -------------------------------------------------------------------------------
    def environment(self) -> dict:
        torch = self._torch
        env = {"gpu": None, "driver": self.energy.driver, "cuda": torch.version.cuda,
               "torch": torch.__version__, "triton": _version("triton"),
               "hostname": socket.gethostname(), "python": platform.python_version(),
               # beyond the binding schema:
               "device": str(self.device), "cpu": _cpu_name(), "gpu_memory_gib": None,
               "nvml_gpus": self.energy.info()["gpus"]}
        if self._cuda:
            props = torch.cuda.get_device_properties(self.device)
            env["gpu"] = props.name
            env["gpu_memory_gib"] = props.total_memory / float(1 << 30)
        return env

    def summary(self, meta: Optional[dict] = None) -> dict:
        """The profile.json content (schema ``blockwise.profile/1``)."""
        if not self.enabled:
            raise RuntimeError("the profiler is disabled (enabled=False): nothing was measured")
        segs = self._segments
        energy_reason = self.energy.gpu_unavailable
        memory_reason = self.memory.unavailable
        if not segs:
            energy_reason = energy_reason or "nothing measured: measure() was never entered"
            memory_reason = memory_reason or "nothing measured: measure() was never entered"
        time_s = sum(s["time_s"] for s in segs) if segs else None
        images = sum(s["images"] for s in segs)

        def total(key: str) -> Optional[float]:
            vals = [s[key] for s in segs]
            return sum(vals) if vals and all(v is not None for v in vals) else None

        def peak(key: str) -> Optional[float]:
            vals = [s[key] for s in segs if s[key] is not None]
            return max(vals) if vals else None

        energy = total("energy_j")
        if segs and energy is None and energy_reason is None:
            energy_reason = next((s["energy_unavailable"] for s in segs
                                  if s["energy_unavailable"]), "GPU energy not measured")
        ooms = [s["oom_count"] for s in segs if s["oom_count"] is not None]
        # images counts the global batch (every process's pairs) but energy is this process's
        # GPU only: per pair, divide by the pairs this process trained (images / world_size)
        world = (meta or {}).get("world_size") or 1
        run = {
            "time_s": time_s,
            "images": images,
            "throughput_img_s": images / time_s if time_s and images else None,
            "energy_j": energy,
            # the meter's method, or what its windows fell back to (a failed counter read)
            "energy_method": (combined_method(s["energy_method"] for s in segs)
                              or self.energy.method) if energy is not None else None,
            "energy_per_image_j": energy * world / images if energy is not None and images
            else None,
            "mean_power_w": energy / time_s if energy is not None and time_s else None,
            "cpu_energy_j": total("cpu_energy_j"),
            "peak_allocated_gib": peak("peak_allocated_gib"),
            "peak_reserved_gib": peak("peak_reserved_gib"),
            "nvml_used_gib": peak("nvml_used_gib"),
            "oom_count": sum(ooms) if ooms else None,
            "unavailable": {
                "energy": None if energy is not None else energy_reason,
                "memory": memory_reason,
            },
            # beyond the binding schema:
            "sampled_energy_j": total("sampled_energy_j"),
            # a measured segment shorter than the counter's update: energy_j is 0 or whole
            # updates; reports take sampled_energy_j instead, or show n/a
            "short": any(s["short"] for s in segs),
            "cpu_energy_unavailable": (self.energy.cpu_unavailable
                                       if total("cpu_energy_j") is None else None),
            "segments": segs,
        }
        trace = self.energy.power_trace()
        power_trace = None
        if trace is not None:
            t, p = _downsample(trace.t_s, trace.power_w, TRACE_POINTS)
            power_trace = {"t_s": t, "power_w": p, "source": trace.source,
                           "measured_s": [[s["start_s"], s["start_s"] + s["time_s"]]
                                          for s in segs]}
        return {
            "schema": SCHEMA,
            "meta": dict(meta or {}),
            "environment": self.environment(),
            "run": run,
            "windows": {name: agg.as_dict() for name, agg in self._agg.items()},
            "power_trace": power_trace,
            "meters": {"energy": self.energy.info(),
                       "memory": {"available": self.memory.available,
                                  "unavailable": self.memory.unavailable,
                                  "nvml_unavailable": self.memory.nvml_unavailable}},
        }

    def save(self, path: str, meta: Optional[dict] = None) -> Optional[str]:
        """Write profile.json atomically; returns the path (None when disabled)."""
        if not self.enabled:
            return None
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        if self._stack:
            raise ValueError(f"save() with windows still open: {[s[0] for s in self._stack]}")
        _io.atomic_write_json(path, self.summary(meta))
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self.energy.close()
        self.memory.close()

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)  # no import: triton must not load early
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _downsample(t: List[float], p: List[float], n: int):
    """Average consecutive samples into at most ``n`` points (keeps the integral's shape)."""
    if len(t) <= n:
        return list(t), list(p)
    step = len(t) / n
    out_t, out_p = [], []
    for i in range(n):
        a, b = int(i * step), max(int((i + 1) * step), int(i * step) + 1)
        out_t.append(sum(t[a:b]) / (b - a))
        out_p.append(sum(p[a:b]) / (b - a))
    return out_t, out_p
