"""Energy meter: GPU energy over NVML, CPU package energy over Linux RAPL, per named window.

GPU energy, per GPU, by one of two methods (chosen once, for all GPUs of the meter):

- ``"counter"``: NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since
  the driver loaded; Volta and newer). A window's energy is the counter's difference between
  its end and its begin, each read right after a device synchronize. The counter updates about
  every 100 ms (``COUNTER_UPDATE_S``), so one window shorter than that reads one update quantum
  or nothing: such windows are flagged ``short`` (the sum over many short windows is still an
  unbiased estimate when their phase against the update clock is random; a single one is not).
- ``"sampling"``: where the counter is not supported, a background thread samples the power
  (``nvmlDeviceGetPowerUsage``, mW, or the instantaneous-power field where the driver has it,
  see ``power_source``) every ``sample_interval_s`` and integrates it with the trapezoid rule.
  Window boundaries take a sample of their own, so a window's integral starts and ends exactly
  at its boundaries.

The sampler runs with either method (unless ``sample_interval_s=None``): it is the power trace
for plots, and with the counter method it gives every window a second, independent estimate
(``sampled_energy_j``) so the two can be checked against each other on long windows.

Counters are turned into monotonic totals (``_MonotonicCounter``): a step backwards is a
wrap-around when adding the modulus gives a plausible step (RAPL: ``max_energy_range_uj``; NVML:
2**64), otherwise a reset (the driver reloaded: the counter restarted from 0). Windows across a
reset are flagged ``counter_reset`` and take the power-sampling estimate when there is one. The
sampler also polls the counters every ``counter_poll_s`` so that several wraps between two window
boundaries (RAPL wraps every few minutes on a busy package) are all seen.

Nothing is reported as 0 J when it was not measured: a meter without NVML, without a GPU or
without a readable RAPL domain says so in ``gpu_unavailable`` / ``cpu_unavailable`` and returns
``None`` energies.
"""
from __future__ import annotations

import glob
import os
import re
import threading
import weakref
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from profiling import _nvml
from profiling._windows import check_closing, check_window_name

COUNTER_UPDATE_S = 0.1  # NVML total-energy counter update period (about; driver dependent)
NVML_COUNTER_MODULUS = 2**64  # the counter is an unsigned 64-bit value in mJ
MAX_PLAUSIBLE_GPU_POWER_W = 5000.0  # a "wrapped" NVML step implying more than this is a reset
METHODS = ("auto", "counter", "sampling")
POWER_SOURCES = ("auto", "instant", "usage")


# ----------------------------------------------------------------------------------------------
# Results (units in the field names)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuEnergy:
    """Energy of one window on one GPU."""

    nvml_index: int
    name: str
    energy_j: Optional[float]  # by the meter's method; None = not measured
    mean_power_w: Optional[float]
    sampled_energy_j: Optional[float]  # power-sampling integral of the same window, if sampled
    counter_reset: bool  # the NVML counter reset inside the window (energy_j is then sampled)
    method: Optional[str] = None  # where energy_j comes from: "counter" | "sampling" | None


@dataclass(frozen=True)
class EnergyWindow:
    """Energy and time of one window, summed over the meter's GPUs."""

    name: str
    depth: int  # 0 for a top-level window
    start_s: float  # begin time relative to the meter's creation (the power trace's t = 0)
    time_s: float
    energy_j: Optional[float]  # GPUs, by ``method``; None = not measured (see gpu_unavailable)
    mean_power_w: Optional[float]
    sampled_energy_j: Optional[float]  # GPUs, power-sampling integral (cross-check)
    # "counter" | "sampling" | None; "sampling" also where the counter method fell back to the
    # power samples (a failed counter read, a counter reset), "counter+sampling" where GPUs differ
    method: Optional[str]
    short: bool  # shorter than the method's update period: energy_j is a coarse estimate
    counter_reset: bool
    cpu_energy_j: Optional[float]  # CPU packages (RAPL); None = not measured
    gpus: Tuple[GpuEnergy, ...]
    gpu_unavailable: Optional[str]  # why energy_j is None
    cpu_unavailable: Optional[str]  # why cpu_energy_j is None


@dataclass(frozen=True)
class PowerTrace:
    """Sampled GPU power; t_s relative to the meter's creation."""

    t_s: List[float]
    power_w: List[float]  # sum over the meter's GPUs
    per_gpu_w: List[List[float]]  # [gpu][sample]
    source: Optional[str]  # "instant" | "usage"


class WindowHandle:
    """What ``EnergyMeter.window`` yields; ``result`` is set when the window closes."""

    __slots__ = ("name", "result")

    def __init__(self, name: str):
        self.name = name
        self.result: Optional[EnergyWindow] = None


# ----------------------------------------------------------------------------------------------
# Counters
# ----------------------------------------------------------------------------------------------
class _MonotonicCounter:
    """A raw hardware counter that may wrap at ``modulus`` or reset to 0, as a monotonic total.

    ``max_rate_per_s`` bounds a plausible step: a backwards step whose wrapped difference would
    need more than that rate is a reset (the counter restarted at 0, so the new raw value is the
    energy since the reset; what happened between the last read and the reset is lost, at most
    one poll period). ``max_rate_per_s=None`` means the counter never resets (RAPL).
    """

    def __init__(self, modulus: Optional[int], max_rate_per_s: Optional[float]):
        self.modulus = modulus
        self.max_rate_per_s = max_rate_per_s
        self.total = 0
        self.resets = 0
        self.wraps = 0
        self._last_raw: Optional[int] = None
        self._last_t: Optional[float] = None

    def update(self, raw: int, t: float) -> int:
        raw = int(raw)
        if self._last_raw is None:
            self._last_raw, self._last_t = raw, t
            return self.total
        step = raw - self._last_raw
        if step < 0:
            wrapped = step + self.modulus if self.modulus else None
            limit = None
            if self.max_rate_per_s is not None:
                # generous: at least one second of the maximum rate, whatever the clock says
                limit = self.max_rate_per_s * max(t - (self._last_t or t), 1.0)
            if wrapped is not None and wrapped >= 0 and (limit is None or wrapped <= limit):
                step = wrapped
                self.wraps += 1
            else:
                step = raw  # reset: counted up from 0 to raw since it happened
                self.resets += 1
        self.total += step
        self._last_raw, self._last_t = raw, t
        return self.total


class RaplReader:
    """CPU package energy from ``<root>/intel-rapl:<n>/energy_uj`` (AMD's RAPL driver uses the
    same names). Only package domains (``intel-rapl:<n>``) are summed: their subdomains
    (``intel-rapl:<n>:<m>``: core, uncore, dram) are parts of the package and would count twice,
    and so would the top-level ``psys`` domain (the whole platform, packages included), which is
    left out (listed in ``skipped``).
    Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694).
    """

    _PACKAGE = re.compile(r"^intel-rapl:\d+$")

    def __init__(self, root: str = "/sys/class/powercap"):
        self.root = root
        self.domains: List[Tuple[str, str, _MonotonicCounter]] = []  # (name, path, counter)
        self.reason: Optional[str] = None
        self.skipped: List[str] = []  # top-level domains that are not packages (psys)
        problems = []
        for d in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
            if not self._PACKAGE.match(os.path.basename(d)):
                continue
            path = os.path.join(d, "energy_uj")
            try:
                name = _read_text(os.path.join(d, "name")) if os.path.exists(
                    os.path.join(d, "name")) else os.path.basename(d)
                if name.startswith("psys"):
                    self.skipped.append(name)
                    continue
                max_range = int(_read_text(os.path.join(d, "max_energy_range_uj")))
                int(_read_text(path))
            except (OSError, ValueError) as e:
                problems.append(f"{path}: {type(e).__name__}: {e}")
                continue
            if max_range <= 0:
                problems.append(f"{d}/max_energy_range_uj is {max_range}")
                continue
            self.domains.append((name, path, _MonotonicCounter(max_range, None)))
        if not self.domains:
            if problems:
                self.reason = ("RAPL energy not readable (needs root since Linux 5.10): "
                               + "; ".join(problems[:2]))
            else:
                self.reason = f"no RAPL package domains under {root} (no powercap/RAPL here)"

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read_uj(self, t: float) -> Optional[int]:
        """Monotonic total µJ over all packages since the first read; None if not readable."""
        if not self.domains:
            return None
        total = 0
        for _name, path, counter in self.domains:
            try:
                total += counter.update(int(_read_text(path)), t)
            except (OSError, ValueError):
                return None
        return total


def _read_text(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def _field_value(v: Any) -> float:
    """The number in an nvmlFieldValue_t, whatever its valueType."""
    names = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    return float(getattr(v.value, names.get(int(v.valueType), "uiVal")))


# ----------------------------------------------------------------------------------------------
# The meter
# ----------------------------------------------------------------------------------------------
class _Open:
    __slots__ = ("name", "t0", "counter_mj", "cum_j", "cpu_uj", "resets")

    def __init__(self, name, t0, counter_mj, cum_j, cpu_uj, resets):
        self.name, self.t0, self.counter_mj = name, t0, counter_mj
        self.cum_j, self.cpu_uj, self.resets = cum_j, cpu_uj, resets


GpuSpec = Union[int, str, Any]  # NVML index (int), or a CUDA device ("cuda:1", torch.device)


def _sampler_loop(ref: "weakref.ref[EnergyMeter]", stop: threading.Event, interval: float) -> None:
    """The sampler thread: ticks the meter while it exists and is not closed."""
    while not stop.wait(interval):
        meter = ref()
        if meter is None:
            return
        meter._tick()
        del meter  # no strong reference while waiting


def combined_method(methods: Iterable[Optional[str]]) -> Optional[str]:
    """One label for energies from several windows or GPUs: "counter", "sampling",
    "counter+sampling" (some fell back to the power samples), or None (none measured)."""
    parts = {p for m in methods if m for p in m.split("+")}
    return "+".join(sorted(parts)) or None


def _release(stop: threading.Event, nvml: Any) -> None:
    stop.set()
    if nvml is not None:
        _nvml.shutdown(nvml)


class EnergyMeter:
    """Named, nestable energy windows over the GPUs ``gpus`` (and the CPU packages).

    Args:
        gpus: None = every GPU this process sees (CUDA's visible devices when torch has CUDA,
            else all NVML devices); [] = no GPU (CPU energy only); a list of NVML indices (int)
            or CUDA devices (``"cuda:0"``, ``torch.device``; mapped to NVML by UUID).
        method: "auto" (counter where every GPU supports it, else sampling), "counter",
            "sampling".
        sample_interval_s: power-sampling period of the background thread; None = no thread
            (power is then sampled only at window boundaries and by ``sample()``).
        power_source: "auto" (NVML's instantaneous-power field where the driver has it, else
            ``nvmlDeviceGetPowerUsage``, which newer GPUs average over 1 s), "instant", "usage".
        cpu: read RAPL CPU package energy where readable.
        sync: True = ``torch.cuda.synchronize()`` of each measured CUDA device at both ends of
            every window (when CUDA is initialised); False = none; or a callable.
        clock: seconds, monotonic (tests pass a fake).
        counter_reuse_s: window boundaries closer than this to the last counter reading reuse
            it instead of calling NVML again (nested windows open and close in bursts; the
            counter updates every ~100 ms, so this costs no accuracy and saves an NVML call,
            during which the synchronized GPU would sit idle, per nested boundary).
    """

    def __init__(
        self,
        gpus: Optional[Sequence[GpuSpec]] = None,
        *,
        method: str = "auto",
        sample_interval_s: Optional[float] = 0.02,
        power_source: str = "auto",
        cpu: bool = True,
        powercap_root: str = "/sys/class/powercap",
        sync: Union[bool, Callable[[], None]] = True,
        clock: Callable[[], float] = time.perf_counter,
        counter_poll_s: float = 0.5,
        counter_reuse_s: float = 0.001,
        max_trace_points: int = 200_000,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if power_source not in POWER_SOURCES:
            raise ValueError(f"power_source must be one of {POWER_SOURCES}, got {power_source!r}")
        if sample_interval_s is not None and not (float(sample_interval_s) > 0):
            raise ValueError(f"sample_interval_s must be > 0 or None, got {sample_interval_s!r}")
        if not counter_poll_s > 0:
            raise ValueError(f"counter_poll_s must be > 0, got {counter_poll_s!r}")
        if max_trace_points < 16:
            raise ValueError(f"max_trace_points must be >= 16, got {max_trace_points}")
        self._clock = clock
        self._lock = threading.RLock()
        self._open: List[_Open] = []
        self._counter_poll_s = float(counter_poll_s)
        self._max_trace = int(max_trace_points)
        self.sample_interval_s = None if sample_interval_s is None else float(sample_interval_s)
        self.thread_error: Optional[str] = None
        self._closed = False
        self._last_poll: Optional[tuple] = None  # (t, counters, cpu) of the last reading
        if not counter_reuse_s >= 0:
            raise ValueError(f"counter_reuse_s must be >= 0, got {counter_reuse_s!r}")
        self.counter_reuse_s = float(counter_reuse_s)

        self._nvml: Any = None
        self._handles: List[Any] = []
        self.gpu_indices: List[int] = []
        self.gpu_names: List[str] = []
        self.driver: Optional[str] = None
        self.method: Optional[str] = None
        self.power_source: Optional[str] = None
        self.gpu_unavailable: Optional[str] = None
        self._counters: List[_MonotonicCounter] = []
        self._power_fns: List[Callable[[], float]] = []
        self._cuda_ordinals: List[int] = []
        self._init_gpus(gpus, method, power_source)

        self._rapl: Optional[RaplReader] = RaplReader(powercap_root) if cpu else None
        self.cpu_unavailable: Optional[str] = (
            "CPU energy not requested (cpu=False)" if self._rapl is None else self._rapl.reason)

        self._sync = self._make_sync(sync)

        # power sampling state (guarded by self._lock)
        n = len(self._handles)
        self._cum_j = [0.0] * n
        self._last_t: Optional[float] = None
        self._last_p: List[float] = [0.0] * n
        self._trace_t: List[float] = []
        self._trace_p: List[List[float]] = [[] for _ in range(n)]
        self._sampling = bool(self._power_fns) and (
            self.method == "sampling" or self.sample_interval_s is not None)
        self.origin = self._clock()
        with self._lock:
            t = self._clock()
            if self._sampling:
                self._sample_locked(t)
            self._poll_counters_locked(t)

        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # a meter dropped without close(): stop its sampler and release NVML when it is
        # collected (the thread holds only a weak reference, so it does not keep the meter alive)
        self._finalizer = weakref.finalize(self, _release, self._stop, self._nvml)
        if self.sample_interval_s is not None and (
                self._sampling or self._counters or self._rapl_ok()):
            self._next_poll = self._clock() + self._counter_poll_s
            self._thread = threading.Thread(
                target=_sampler_loop, args=(weakref.ref(self), self._stop, self.sample_interval_s),
                name="EnergyMeter-sampler", daemon=True)
            self._thread.start()

    # -- setup ---------------------------------------------------------------------------------
    def _rapl_ok(self) -> bool:
        return self._rapl is not None and self._rapl.available

    def _init_gpus(self, gpus: Optional[Sequence[GpuSpec]], method: str, power_source: str):
        if gpus is not None and len(gpus) == 0:
            self.gpu_unavailable = "no GPU selected"
            return
        nvml, reason = _nvml.load()
        if nvml is None:
            self.gpu_unavailable = reason
            return
        self._nvml = nvml
        self.driver = _nvml.driver_version(nvml)
        try:
            indices = self._resolve(nvml, gpus)
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception as e:
            self.gpu_unavailable = f"NVML could not open the GPUs: {type(e).__name__}: {e}"
            self._handles = []
            return
        if not self._handles:
            self.gpu_unavailable = "NVML sees no GPU"
            return
        self.gpu_indices = list(indices)
        self.gpu_names = [_nvml.device_name(nvml, h) for h in self._handles]

        counter_problems = []
        for i, h in zip(indices, self._handles):
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)
            except Exception as e:
                kind = "not supported" if _nvml.is_not_supported(nvml, e) else repr(e)
                counter_problems.append(f"GPU {i}: total-energy counter {kind}")
        power_fns, power_problems, sources = [], [], set()
        for i, h in zip(indices, self._handles):
            fn, src, problem = self._power_reader(nvml, h, power_source)
            if fn is None:
                power_problems.append(f"GPU {i}: {problem}")
            else:
                power_fns.append(fn)
                sources.add(src)
        have_power = not power_problems
        if have_power:
            self._power_fns = power_fns
            self.power_source = sources.pop() if len(sources) == 1 else "mixed"

        if method == "counter" and counter_problems:
            raise RuntimeError("method='counter' but " + "; ".join(counter_problems)
                               + " (use method='auto' to fall back to power sampling)")
        if method == "sampling" and not have_power:
            raise RuntimeError("method='sampling' but " + "; ".join(power_problems))
        if method in ("auto", "counter") and not counter_problems:
            self.method = "counter"
            self._counters = [_MonotonicCounter(NVML_COUNTER_MODULUS,
                                                MAX_PLAUSIBLE_GPU_POWER_W * 1000.0)
                              for _ in self._handles]
        elif have_power:
            self.method = "sampling"
        else:
            self.gpu_unavailable = "; ".join(counter_problems + power_problems)

    def _resolve(self, nvml: Any, gpus: Optional[Sequence[GpuSpec]]) -> List[int]:
        import torch

        if gpus is None:
            try:
                if torch.cuda.is_available():
                    self._cuda_ordinals = list(range(torch.cuda.device_count()))
                    return [_nvml.nvml_index_for_cuda_device(nvml, c)
                            for c in self._cuda_ordinals]
            except Exception:
                pass
            return list(range(int(nvml.nvmlDeviceGetCount())))
        out = []
        for g in gpus:
            if isinstance(g, bool):
                raise TypeError(f"gpus entries must be NVML indices or CUDA devices, got {g!r}")
            if isinstance(g, int):
                out.append(g)
                continue
            dev = torch.device(g)
            if dev.type != "cuda":
                raise ValueError(f"gpus entries must be CUDA devices or NVML indices, got {g!r}")
            ordinal = dev.index if dev.index is not None else torch.cuda.current_device()
            self._cuda_ordinals.append(ordinal)
            out.append(_nvml.nvml_index_for_cuda_device(nvml, ordinal))
        return out

    @staticmethod
    def _power_reader(nvml: Any, handle: Any, source: str):
        """(fn() -> watts, source name, problem)."""
        if source in ("auto", "instant"):
            fid = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
            get = getattr(nvml, "nvmlDeviceGetFieldValues", None)
            if fid is not None and get is not None:
                try:
                    v = get(handle, [fid])[0]
                    usage_mw = None
                    try:
                        usage_mw = float(nvml.nvmlDeviceGetPowerUsage(handle))
                    except Exception:
                        pass
                    # sanity: the same quantity in the same unit (mW) as the averaged reading,
                    # within a factor of 3 (they differ by the averaging only)
                    plausible = usage_mw is None or usage_mw <= 0 or \
                        1 / 3 <= _field_value(v) / usage_mw <= 3
                    if int(v.nvmlReturn) == 0 and _field_value(v) > 0 and plausible:
                        def read_instant() -> float:
                            r = get(handle, [fid])[0]
                            if int(r.nvmlReturn) != 0:
                                raise RuntimeError(f"NVML field read failed: {int(r.nvmlReturn)}")
                            return _field_value(r) / 1000.0

                        return read_instant, "instant", None
                except Exception:
                    pass
            if source == "instant":
                return None, None, "instantaneous-power field not supported"
        try:
            nvml.nvmlDeviceGetPowerUsage(handle)
        except Exception as e:
            kind = "not supported" if _nvml.is_not_supported(nvml, e) else repr(e)
            return None, None, f"power reading {kind}"
        return (lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0), "usage", None

    def _make_sync(self, sync: Union[bool, Callable[[], None]]) -> Callable[[], None]:
        if callable(sync):
            return sync
        if not sync:
            return lambda: None
        ordinals = list(self._cuda_ordinals)

        def _sync() -> None:
            try:
                import torch

                if not torch.cuda.is_initialized():
                    return
                for o in ordinals or [torch.cuda.current_device()]:
                    torch.cuda.synchronize(o)
            except ImportError:
                pass

        return _sync

    # -- properties ----------------------------------------------------------------------------
    @property
    def gpu_available(self) -> bool:
        return self.method is not None

    @property
    def cpu_available(self) -> bool:
        return self._rapl_ok()

    @property
    def min_window_s(self) -> float:
        """Windows shorter than this are flagged ``short``."""
        return self._min_window_for(self.method)

    def _min_window_for(self, method: Optional[str]) -> float:
        if method is not None and "sampling" in method:
            period = self.sample_interval_s or COUNTER_UPDATE_S
            return max(2.0 * period, COUNTER_UPDATE_S)
        return COUNTER_UPDATE_S

    def info(self) -> dict:
        return {
            "gpu_available": self.gpu_available,
            "gpu_unavailable": self.gpu_unavailable,
            "method": self.method,
            "power_source": self.power_source,
            "sample_interval_s": self.sample_interval_s,
            "min_window_s": self.min_window_s if self.gpu_available else None,
            "gpus": [{"nvml_index": i, "name": n} for i, n in zip(self.gpu_indices,
                                                                    self.gpu_names)],
            "driver": self.driver,
            "cpu_available": self.cpu_available,
            "cpu_unavailable": self.cpu_unavailable,
            "counter_resets": sum(c.resets for c in self._counters),
            "counter_wraps": sum(c.wraps for c in self._counters),
            "thread_error": self.thread_error,
        }

    # -- sampling ------------------------------------------------------------------------------
    def _sample_locked(self, t: float) -> None:
        powers = []
        for g, fn in enumerate(self._power_fns):
            try:
                powers.append(float(fn()))
            except Exception:
                powers.append(self._last_p[g])  # hold the last value through a failed read
        if self._last_t is not None:
            dt = t - self._last_t
            if dt > 0:
                for g, p in enumerate(powers):
                    self._cum_j[g] += 0.5 * (p + self._last_p[g]) * dt
        if self._last_t is None or t >= self._last_t:
            self._last_t, self._last_p = t, powers
            self._trace_t.append(t - self.origin)
            for g, p in enumerate(powers):
                self._trace_p[g].append(p)
            if len(self._trace_t) > self._max_trace:  # keep memory bounded on long runs
                self._trace_t = self._trace_t[::2]
                self._trace_p = [tp[::2] for tp in self._trace_p]

    def _cum_at_locked(self, t: float) -> Optional[List[float]]:
        """Integrated energy per GPU up to time t (extrapolating the last sample's power)."""
        if not self._sampling or self._last_t is None:
            return None
        dt = max(t - self._last_t, 0.0)
        return [c + p * dt for c, p in zip(self._cum_j, self._last_p)]

    def _poll_counters_locked(self, t: float, reuse: bool = False
                              ) -> Tuple[Optional[List[Optional[int]]], Optional[int]]:
        """Read the NVML counters and RAPL (monotonic totals). ``reuse``: a reading taken less
        than ``counter_reuse_s`` ago is returned again (window boundaries come in bursts when
        windows nest, and the counters only update every ~100 ms anyway)."""
        if reuse and self._last_poll is not None and 0 <= t - self._last_poll[0] \
                < self.counter_reuse_s:
            return self._last_poll[1], self._last_poll[2]
        counters: Optional[List[Optional[int]]] = None
        if self._counters:
            counters = []
            for h, c in zip(self._handles, self._counters):
                try:
                    counters.append(c.update(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h), t))
                except Exception:
                    counters.append(None)
        cpu = self._rapl.read_uj(t) if self._rapl_ok() else None
        self._last_poll = (t, counters, cpu)
        return counters, cpu

    def sample(self) -> None:
        """Take one power sample now (the thread does this every ``sample_interval_s``)."""
        if self._sampling:
            with self._lock:
                self._sample_locked(self._clock())

    def _tick(self) -> None:
        """One round of the sampler thread: a power sample, and the counters when due."""
        try:
            with self._lock:
                t = self._clock()
                if self._sampling:
                    self._sample_locked(t)
                if t >= self._next_poll:
                    self._poll_counters_locked(t)
                    self._next_poll = t + self._counter_poll_s
        except Exception as e:  # never die silently: info() reports it
            self.thread_error = f"{type(e).__name__}: {e}"

    # -- windows -------------------------------------------------------------------------------
    def _read_locked(self):
        """(time, counter readings, CPU reading) at a window boundary; call with the lock held."""
        t = self._clock()
        if self.method == "sampling":
            self._sample_locked(t)
        counters, cpu = self._poll_counters_locked(t, reuse=True)
        return t, counters, cpu

    def begin(self, name: str) -> None:
        """Open window ``name`` (synchronizes the device first)."""
        check_window_name(name)
        if self._closed:
            raise RuntimeError("EnergyMeter is closed")
        self._sync()
        with self._lock:
            t, counters, cpu = self._read_locked()
            self._open.append(_Open(name, t, counters, self._cum_at_locked(t), cpu,
                                    [c.resets for c in self._counters]))

    def end(self, name: str) -> EnergyWindow:
        """Close window ``name``, the innermost open one (synchronizes the device first)."""
        check_closing(name, [o.name for o in self._open])
        self._sync()
        with self._lock:
            t, counters, cpu = self._read_locked()
            cum = self._cum_at_locked(t)
            o = self._open.pop()
            depth = len(self._open)
            resets = [c.resets for c in self._counters]
        return self._result(o, depth, t, counters, cum, cpu, resets)

    def _result(self, o: _Open, depth: int, t1: float, counters, cum, cpu, resets) -> EnergyWindow:
        time_s = t1 - o.t0
        gpus: List[GpuEnergy] = []
        any_reset = False
        failed = None
        for g, (idx, name) in enumerate(zip(self.gpu_indices, self.gpu_names)):
            sampled = None
            if cum is not None and o.cum_j is not None:
                sampled = cum[g] - o.cum_j[g]
            reset = False
            method = self.method
            if self.method == "counter":
                c0 = o.counter_mj[g] if o.counter_mj else None
                c1 = counters[g] if counters else None
                if c0 is None or c1 is None:  # a counter read failed: the samples stand in
                    energy, method = sampled, "sampling"
                    if energy is None:
                        failed = f"GPU {idx}: NVML energy counter read failed"
                else:
                    energy = (c1 - c0) / 1000.0
                    if resets[g] != o.resets[g]:
                        reset = True
                        if sampled is not None:
                            energy, method = sampled, "sampling"
            elif self.method == "sampling":
                energy = sampled
            else:
                energy = None
            any_reset |= reset
            power = energy / time_s if energy is not None and time_s > 0 else None
            gpus.append(GpuEnergy(idx, name, energy, power, sampled, reset,
                                  method if energy is not None else None))
        if gpus and all(x.energy_j is not None for x in gpus):
            energy_j: Optional[float] = sum(x.energy_j for x in gpus)  # type: ignore[misc]
            gpu_reason = None
        else:
            energy_j = None
            gpu_reason = self.gpu_unavailable or failed or "GPU energy not measured"
        window_method = combined_method(x.method for x in gpus) if energy_j is not None else None
        sampled_all = None
        if gpus and all(x.sampled_energy_j is not None for x in gpus):
            sampled_all = sum(x.sampled_energy_j for x in gpus)  # type: ignore[misc]
        cpu_j = None
        cpu_reason = self.cpu_unavailable
        if o.cpu_uj is not None and cpu is not None:
            cpu_j = (cpu - o.cpu_uj) / 1e6
        elif cpu_reason is None:
            cpu_reason = "RAPL read failed during the window"
        return EnergyWindow(
            name=o.name,
            depth=depth,
            start_s=o.t0 - self.origin,
            time_s=time_s,
            energy_j=energy_j,
            mean_power_w=energy_j / time_s if energy_j is not None and time_s > 0 else None,
            sampled_energy_j=sampled_all,
            method=window_method,
            short=energy_j is not None and time_s < self._min_window_for(window_method),
            counter_reset=any_reset,
            cpu_energy_j=cpu_j,
            gpus=tuple(gpus),
            gpu_unavailable=gpu_reason,
            cpu_unavailable=cpu_reason if cpu_j is None else None,
        )

    @contextmanager
    def window(self, name: str) -> Iterator[WindowHandle]:
        """``with meter.window("step") as w: ...``; then ``w.result`` is the EnergyWindow."""
        handle = WindowHandle(name)
        self.begin(name)
        try:
            yield handle
        except BaseException:
            try:  # close it, but never replace the exception on its way out (e.g. a CUDA OOM)
                handle.result = self.end(name)
            except Exception:
                pass
            raise
        handle.result = self.end(name)

    @property
    def open_windows(self) -> List[str]:
        return [o.name for o in self._open]

    # -- trace and teardown --------------------------------------------------------------------
    def power_trace(self) -> Optional[PowerTrace]:
        """The sampled power so far, or None when nothing was sampled."""
        with self._lock:
            if not self._sampling or not self._trace_t:
                return None
            per_gpu = [list(p) for p in self._trace_p]
            total = [sum(ps) for ps in zip(*per_gpu)]
            return PowerTrace(list(self._trace_t), total, per_gpu, self.power_source)

    def close(self) -> None:
        """Stop the sampler and release NVML. Idempotent."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._thread = None
        self._finalizer()  # sets the stop event and shuts NVML down, once
        self._closed = True

    def __enter__(self) -> "EnergyMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

