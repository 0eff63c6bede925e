"""Memory meter: peak CUDA memory per named, nestable window; NVML device memory; OOM count.

PyTorch keeps one peak counter per device (``max_memory_allocated``), reset by
``reset_peak_memory_stats``. A window resets it at its begin so its own peak starts from the
memory in use at that moment; nested windows would then lose the outer window's peak, so before
every reset the peak reached so far is folded into every open window:

    begin(w):  for o in open windows: o.peak = max(o.peak, device peak)   # before the reset
               reset; w.peak = allocated now
    end(w):    for o in open windows (w included): o.peak = max(o.peak, device peak)

Each window's peak is therefore the maximum over exactly its own lifetime, at any nesting depth,
and a root window opened at construction keeps the peak over the meter's life
(``peak_since_start``), which callers must use instead of ``torch.cuda.max_memory_allocated``
(that one is reset by every window).

Peak reserved memory (the caching allocator's segments) is tracked the same way. NVML's "used"
memory (all processes on the GPU, CUDA contexts included) is read at window ends when asked for;
it is what ``nvidia-smi`` shows. Peaks are CPU-timeline figures: the allocator books memory when a
kernel is enqueued, so no synchronize is needed for them (the Profiler synchronizes anyway for time
and energy).

On a CPU device, or without CUDA, the meter is "unavailable" with a reason and returns None
fields, never zeros.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

from profiling import _io, _nvml
from profiling._windows import check_closing, check_window_name

GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryWindow:
    """Memory of one window; None = not measured (see ``unavailable``)."""

    name: str
    depth: int
    peak_allocated_gib: Optional[float]  # tensors (PyTorch caching allocator), max over the window
    peak_reserved_gib: Optional[float]  # allocator segments reserved from the driver, max
    allocated_begin_gib: Optional[float]
    allocated_end_gib: Optional[float]
    nvml_used_gib: Optional[float]  # NVML device memory in use at the window's end (all processes)
    oom_count: Optional[int]  # out-of-memory errors raised inside the window
    unavailable: Optional[str]


class TorchCudaMemory:
    """The PyTorch calls the meter needs, on one CUDA device (tests substitute a fake)."""

    def __init__(self, device: Any):
        import torch

        self._torch = torch
        self.device = device

    def stats(self) -> dict:
        """One call for everything: allocated/reserved current and peak bytes, num_ooms."""
        s = self._torch.cuda.memory_stats_as_nested_dict(self.device)
        if not s:  # before the first allocation the dict is empty
            return {"allocated": 0, "allocated_peak": 0, "reserved": 0, "reserved_peak": 0,
                    "num_ooms": 0}
        return {
            "allocated": s["allocated_bytes"]["all"]["current"],
            "allocated_peak": s["allocated_bytes"]["all"]["peak"],
            "reserved": s["reserved_bytes"]["all"]["current"],
            "reserved_peak": s["reserved_bytes"]["all"]["peak"],
            "num_ooms": s.get("num_ooms", 0),
        }

    def reset_peak(self) -> None:
        self._torch.cuda.reset_peak_memory_stats(self.device)

    def record_history(self, max_entries: int) -> None:
        self._torch.cuda.memory._record_memory_history(max_entries=max_entries)

    def stop_history(self) -> None:
        self._torch.cuda.memory._record_memory_history(enabled=None)

    def dump_snapshot(self, path: str) -> None:
        self._torch.cuda.memory._dump_snapshot(path)


class _Open:
    __slots__ = ("name", "peak_alloc", "peak_res", "alloc0", "ooms0")

    def __init__(self, name, peak_alloc, peak_res, alloc0, ooms0):
        self.name, self.peak_alloc, self.peak_res = name, peak_alloc, peak_res
        self.alloc0, self.ooms0 = alloc0, ooms0


class MemoryMeter:
    """Peak memory per named, nestable window on one device.

    Args:
        device: the training device (``"cuda"``, ``"cuda:1"``, ``torch.device``; CPU = unavailable).
        nvml: read NVML's device memory in use at window ends (``end(..., nvml=True)``).
        backend: the PyTorch memory calls (default ``TorchCudaMemory``; tests pass a fake).
        nvml_index: NVML index of the device (default: mapped from the CUDA device by UUID).
    """

    def __init__(self, device: Any = "cuda", *, nvml: bool = True, backend: Any = None,
                 nvml_index: Optional[int] = None):
        import torch

        self._nvml_index = nvml_index
        self.device = torch.device(device)
        self.unavailable: Optional[str] = None
        self.nvml_unavailable: Optional[str] = None
        self._backend = backend
        self._open: List[_Open] = []
        self._nvml: Any = None
        self._handle: Any = None
        self._history = False
        if backend is None:
            if self.device.type != "cuda":
                self.unavailable = (f"device is {self.device.type}: PyTorch memory statistics "
                                    "exist only for CUDA devices")
            elif not torch.cuda.is_available():
                self.unavailable = "CUDA is not available"
            else:
                # the caching allocator exists only once CUDA is initialised: before that,
                # reset_peak_memory_stats("cuda:N") raises "Invalid device argument N: did you
                # call init?" (current_device() below initialises it, but only without an index)
                torch.cuda.init()
                if self.device.index is None:
                    self.device = torch.device("cuda", torch.cuda.current_device())
                self._backend = TorchCudaMemory(self.device)
        if self.unavailable is None and nvml:
            self._init_nvml()
        elif not nvml:
            self.nvml_unavailable = "NVML memory not requested (nvml=False)"
        else:
            self.nvml_unavailable = self.unavailable
        if self.unavailable is None:
            s = self._backend.stats()
            self._backend.reset_peak()
            # the root window: the peak over the meter's life
            self._root = _Open("<root>", s["allocated"], s["reserved"], s["allocated"],
                               s["num_ooms"])
            self.start_ooms = s["num_ooms"]

    def _init_nvml(self) -> None:
        nvml, reason = _nvml.load()
        if nvml is None:
            self.nvml_unavailable = reason
            return
        try:
            index = self._nvml_index
            if index is None:
                index = _nvml.nvml_index_for_cuda_device(nvml, self.device.index or 0)
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
            nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self._nvml = nvml
        except Exception as e:
            self.nvml_unavailable = f"NVML memory info failed: {type(e).__name__}: {e}"
            _nvml.shutdown(nvml)

    @property
    def available(self) -> bool:
        return self.unavailable is None

    # -- folding peaks -------------------------------------------------------------------------
    def _fold(self, s: dict) -> None:
        for o in (self._root, *self._open):
            o.peak_alloc = max(o.peak_alloc, s["allocated_peak"])
            o.peak_res = max(o.peak_res, s["reserved_peak"])

    def nvml_used_gib(self) -> Optional[float]:
        """NVML device memory in use now (all processes), or None."""
        if self._nvml is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / GIB
        except Exception:
            return None

    # -- windows -------------------------------------------------------------------------------
    def begin(self, name: str) -> None:
        check_window_name(name)
        if self.unavailable is not None:
            self._open.append(_Open(name, 0, 0, 0, 0))
            return
        s = self._backend.stats()
        self._fold(s)  # the outer windows keep the peak reached so far ...
        self._backend.reset_peak()  # ... before this window starts its own
        self._open.append(_Open(name, s["allocated"], s["reserved"], s["allocated"],
                                s["num_ooms"]))

    def end(self, name: str, *, nvml: bool = False) -> MemoryWindow:
        check_closing(name, [o.name for o in self._open])
        if self.unavailable is not None:
            self._open.pop()
            return MemoryWindow(name, len(self._open), None, None, None, None, None, None,
                                self.unavailable)
        s = self._backend.stats()
        self._fold(s)
        o = self._open.pop()
        return MemoryWindow(
            name=name,
            depth=len(self._open),
            peak_allocated_gib=o.peak_alloc / GIB,
            peak_reserved_gib=o.peak_res / GIB,
            allocated_begin_gib=o.alloc0 / GIB,
            allocated_end_gib=s["allocated"] / GIB,
            nvml_used_gib=self.nvml_used_gib() if nvml else None,
            oom_count=int(s["num_ooms"] - o.ooms0),
            unavailable=None,
        )

    @contextmanager
    def window(self, name: str) -> Iterator[List[MemoryWindow]]:
        """``with meter.window("x") as out: ...``; then ``out[0]`` is the MemoryWindow."""
        out: List[MemoryWindow] = []
        self.begin(name)
        try:
            yield out
        except BaseException:
            try:  # close it, but never replace the exception on its way out (e.g. a CUDA OOM)
                out.append(self.end(name))
            except Exception:
                pass
            raise
        out.append(self.end(name))

    def peak_since_start(self) -> Optional[dict]:
        """{"peak_allocated_gib", "peak_reserved_gib"} over the meter's life, or None."""
        if self.unavailable is not None:
            return None
        self._fold(self._backend.stats())
        return {"peak_allocated_gib": self._root.peak_alloc / GIB,
                "peak_reserved_gib": self._root.peak_res / GIB}

    def oom_count(self) -> Optional[int]:
        """OOM errors on this device since the process started (PyTorch's num_ooms)."""
        if self.unavailable is not None:
            return None
        return int(self._backend.stats()["num_ooms"])

    # -- memory snapshot (for https://pytorch.org/memory_viz) ----------------------------------
    def start_history(self, max_entries: int = 100_000) -> None:
        """Record allocation history with stacks (costly; for one-off investigations)."""
        if self.unavailable is not None:
            raise RuntimeError(f"memory snapshot unavailable: {self.unavailable}")
        if not isinstance(max_entries, int) or max_entries <= 0:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self._backend.record_history(max_entries)
        self._history = True

    def dump_snapshot(self, path: str) -> str:
        """Write the recorded history as a pickle for the memory_viz page (atomically)."""
        if not self._history:
            raise RuntimeError("dump_snapshot() needs start_history() first")
        _io.atomic_write(path, self._backend.dump_snapshot, suffix=os.path.splitext(path)[1])
        return path

    def stop_history(self) -> None:
        if self._history:
            self._backend.stop_history()
            self._history = False

    def close(self) -> None:
        self.stop_history()
        if self._nvml is not None:
            _nvml.shutdown(self._nvml)
            self._nvml = None
