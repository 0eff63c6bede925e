"""Fakes for the profiling tests: an NVML module (``pynvml``), a clock, a CUDA memory backend.

Install the fake NVML with ``monkeypatch.setitem(sys.modules, "pynvml", fake.module)``: the meters
import ``pynvml`` when they are built, so they pick it up.
"""
from __future__ import annotations

import math
import types
from typing import Callable, List, Optional


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        assert dt >= 0
        self.t += dt


class FakeGPU:
    """One GPU: power is a function of time; the energy counter integrates it (midpoint rule on
    a fine grid, exact for the constant and linear powers the tests use) and updates only every
    ``update_s`` seconds, like NVML's."""

    def __init__(self, clock: Callable[[], float], power_w: Callable[[float], float] | float = 200.0,
                 *, counter_start_mj: int = 0, update_s: float = 0.1,
                 counter_supported: bool = True, power_supported: bool = True,
                 instant_power_w: Optional[Callable[[float], float]] = None,
                 name: str = "Fake GPU 80GB", used_bytes: int = 3 << 30):
        self.clock = clock
        self.power = power_w if callable(power_w) else (lambda t, p=float(power_w): p)
        self.t0 = clock()
        self.counter_start_mj = counter_start_mj
        self.update_s = update_s
        self.counter_supported = counter_supported
        self.power_supported = power_supported
        self.instant_power_w = instant_power_w
        self.name = name
        self.used_bytes = used_bytes
        self.reset_at: Optional[float] = None  # the driver "reloads" here: counter restarts at 0

    def energy_j(self, a: float, b: float) -> float:
        """∫_a^b power dt (midpoint rule, 1000 panels: exact for linear power)."""
        if b <= a:
            return 0.0
        n = 1000
        h = (b - a) / n
        return sum(self.power(a + (i + 0.5) * h) for i in range(n)) * h

    def counter_mj(self) -> int:
        t = self.clock()
        tick = self.t0 + math.floor((t - self.t0) / self.update_s + 1e-9) * self.update_s
        if self.reset_at is not None and tick >= self.reset_at:
            return int(round(1000.0 * self.energy_j(self.reset_at, tick)))
        raw = self.counter_start_mj + int(round(1000.0 * self.energy_j(self.t0, tick)))
        return raw % (2**64)


class FakeNVML:
    """A ``pynvml`` stand-in over a list of FakeGPU."""

    def __init__(self, gpus: List[FakeGPU], *, init_error: Optional[str] = None,
                 driver: str = "999.99"):
        self.gpus = gpus
        self.init_count = 0
        self.shutdown_count = 0
        self.calls = 0
        m = types.ModuleType("pynvml")

        class NVMLError(Exception):
            pass

        class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's name
            pass

        class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801
            pass

        m.NVMLError = NVMLError
        m.NVMLError_NotSupported = NVMLError_NotSupported
        m.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
        fake = self

        def nvmlInit():
            fake.calls += 1
            if init_error == "library":
                raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
            fake.init_count += 1

        def nvmlShutdown():
            fake.shutdown_count += 1

        def handle(i):
            fake.calls += 1
            if not 0 <= i < len(fake.gpus):
                raise NVMLError("Invalid Argument")
            return fake.gpus[i]

        def energy(h):
            fake.calls += 1
            if not h.counter_supported:
                raise NVMLError_NotSupported("Not Supported")
            return h.counter_mj()

        def power(h):
            fake.calls += 1
            if not h.power_supported:
                raise NVMLError_NotSupported("Not Supported")
            return int(round(1000.0 * h.power(h.clock())))

        def meminfo(h):
            fake.calls += 1
            return types.SimpleNamespace(used=h.used_bytes, total=80 << 30, free=(80 << 30) - h.used_bytes)

        m.nvmlInit = nvmlInit
        m.nvmlShutdown = nvmlShutdown
        m.nvmlDeviceGetCount = lambda: len(fake.gpus)
        m.nvmlDeviceGetHandleByIndex = handle
        m.nvmlDeviceGetIndex = lambda h: fake.gpus.index(h)
        m.nvmlDeviceGetName = lambda h: h.name.encode()
        m.nvmlSystemGetDriverVersion = lambda: driver.encode()
        m.nvmlDeviceGetTotalEnergyConsumption = energy
        m.nvmlDeviceGetPowerUsage = power
        m.nvmlDeviceGetMemoryInfo = meminfo
        if any(g.instant_power_w is not None for g in gpus):
            m.NVML_FI_DEV_POWER_INSTANT = 186

            def field_values(h, ids):
                fake.calls += 1
                assert list(ids) == [186]
                ok = h.instant_power_w is not None
                val = int(round(1000.0 * h.instant_power_w(h.clock()))) if ok else 0
                return [types.SimpleNamespace(nvmlReturn=0 if ok else 3, valueType=1,
                                              value=types.SimpleNamespace(uiVal=val))]

            m.nvmlDeviceGetFieldValues = field_values
        self.module = m


class FakeCudaMemory:
    """The MemoryMeter backend over a simulated caching allocator (bytes)."""

    def __init__(self, segment: int = 2 << 20):
        self.segment = segment
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_ooms = 0
        self.history: Optional[int] = None

    def malloc(self, n: int) -> None:
        self.allocated += n
        need = -(-self.allocated // self.segment) * self.segment
        self.reserved = max(self.reserved, need)
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, n: int) -> None:
        assert n <= self.allocated
        self.allocated -= n

    def stats(self) -> dict:
        return {"allocated": self.allocated, "allocated_peak": self.peak_allocated,
                "reserved": self.reserved, "reserved_peak": self.peak_reserved,
                "num_ooms": self.num_ooms}

    def reset_peak(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def record_history(self, max_entries: int) -> None:
        self.history = max_entries

    def stop_history(self) -> None:
        self.history = None

    def dump_snapshot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"fake snapshot")
