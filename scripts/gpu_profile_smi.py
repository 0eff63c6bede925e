"""nvidia-smi power sampling in a background process: an instrument independent of the profiling
package (another process, another tool), for scripts/gpu_profile_*.py.

    with SmiSampler(gpu_index) as smi:
        t0 = time.time(); ...work...; t1 = time.time()
        joules = smi.energy_j(t0, t1)

Prefers ``power.draw.instant`` where this nvidia-smi has it (``power.draw`` is a 1 s average on
recent GPUs and drivers). Timestamps are the host's wall clock (nvidia-smi's own timestamp
column), so windows are given in ``time.time()``.
"""
from __future__ import annotations

import datetime
import subprocess
import threading
from typing import List, Optional, Tuple


def _supports(field: str, index: int) -> bool:
    try:
        r = subprocess.run(["nvidia-smi", "-i", str(index), f"--query-gpu={field}",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0:
        return False
    try:
        float(r.stdout.strip().splitlines()[0])
        return True
    except (ValueError, IndexError):
        return False


class SmiSampler:
    def __init__(self, index: int, interval_ms: int = 50):
        self.index = index
        self.interval_ms = interval_ms
        self.field = "power.draw.instant" if _supports("power.draw.instant", index) else \
            "power.draw"
        self.samples: List[Tuple[float, float]] = []  # (unix time, W)
        self._proc: Optional[subprocess.Popen] = None
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None

    def __enter__(self) -> "SmiSampler":
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), f"--query-gpu=timestamp,{self.field}",
                 "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            self.error = f"nvidia-smi could not start: {e}"
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                ts, w = [x.strip() for x in line.split(",")[:2]]
                t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((t, float(w)))
            except ValueError:
                continue  # "[N/A]" or a header

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def energy_j(self, t0: float, t1: float) -> Optional[float]:
        """Trapezoid integral of power over [t0, t1] (linear interpolation at the ends)."""
        s = sorted(self.samples)
        if len(s) < 2 or s[0][0] > t0 or s[-1][0] < t1:
            return None

        def at(t: float) -> float:
            for (ta, pa), (tb, pb) in zip(s, s[1:]):
                if ta <= t <= tb:
                    return pa if tb == ta else pa + (pb - pa) * (t - ta) / (tb - ta)
            raise ValueError(t)

        pts = [(t0, at(t0))] + [(t, p) for t, p in s if t0 < t < t1] + [(t1, at(t1))]
        return sum(0.5 * (pa + pb) * (tb - ta) for (ta, pa), (tb, pb) in zip(pts, pts[1:]))
