"""Realistic profile.json files for the report tests, produced by the real Profiler on fake meters
(fake NVML, fake clock, simulated allocator) so that their schema is the one the trainer writes."""
from __future__ import annotations

import os
import sys
from typing import Optional

from fake_nvml import FakeClock, FakeCudaMemory, FakeGPU, FakeNVML
from profiling import Profiler
from profiling.energy import EnergyMeter
from profiling.memory import MemoryMeter

MIB = 1 << 20

# per mode: seconds of each phase per block, activation MiB per block, watts
_PHASE_S = {"forward": 0.010, "head": 0.004, "backward": 0.020, "optimizer": 0.002}
_ACT_MIB = [800, 600, 400, 200]


def make_profile(monkeypatch, path: str, mode: str, *, steps: int = 3, warmup: int = 1,
                 batch: int = 32, power_w: float = 300.0, gpu: bool = True,
                 counter: bool = True, fused: bool = False, slow: float = 1.0,
                 meta_extra: Optional[dict] = None) -> dict:
    """Simulate a trainer run of ``mode`` and save its profile.json at ``path``; returns it."""
    clock = FakeClock()
    mem = FakeCudaMemory()
    if gpu:
        gpu_obj = FakeGPU(clock, power_w, counter_supported=counter, name="Fake H100 80GB")
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([gpu_obj]).module)
        energy = EnergyMeter(clock=clock, sample_interval_s=3600.0, cpu=False, sync=False)
        memory = MemoryMeter("cuda", backend=mem, nvml=False)
    else:
        monkeypatch.setitem(sys.modules, "pynvml", None)
        energy = EnergyMeter([], clock=clock, sample_interval_s=None, cpu=False, sync=False)
        energy.gpu_unavailable = "device is cpu: no GPU energy to measure"
        memory = MemoryMeter("cpu")
    prof = Profiler("cpu", energy_meter=energy, memory_meter=memory)

    def tick(dt):
        # a few power samples per phase (the sampler thread's job on a real GPU)
        for _ in range(4):
            clock.advance(dt * slow / 4)
            energy.sample()

    def phase(name, seconds, alloc=0, free=0):
        with prof.window(name):
            if alloc:
                mem.malloc(alloc)
            tick(seconds)
            if free:
                mem.free(free)

    def block_step(k):
        act = _ACT_MIB[k - 1] * MIB
        with prof.window(f"block{k}"):
            phase(f"block{k}/forward", _PHASE_S["forward"], alloc=act)
            phase(f"block{k}/head", _PHASE_S["head"], alloc=100 * MIB, free=100 * MIB)
            phase(f"block{k}/backward", _PHASE_S["backward"], free=act)
            phase(f"block{k}/optimizer", _PHASE_S["optimizer"])

    def e2e_step():
        total = 0
        for k in range(1, 5):
            phase(f"block{k}/forward", _PHASE_S["forward"], alloc=_ACT_MIB[k - 1] * MIB)
            total += _ACT_MIB[k - 1] * MIB
        phase("head", _PHASE_S["head"], alloc=100 * MIB, free=100 * MIB)
        phase("backward", 4 * _PHASE_S["backward"], free=total)
        phase("optimizer", 4 * _PHASE_S["optimizer"])

    def run_steps(n, step_fn, measured):
        for _ in range(n):
            with prof.window("step"):
                step_fn()
            if measured:
                prof.add_images(batch)

    if mode == "sequential":
        for k in range(1, 5):
            fn = (lambda k=k: block_step(k))
            run_steps(warmup, fn, False)
            with prof.measure():
                run_steps(steps, fn, True)
    else:
        fn = e2e_step if mode == "e2e" else (lambda: [block_step(k) for k in range(1, 5)])
        run_steps(warmup, fn, False)
        with prof.measure():
            run_steps(steps, fn, True)
    meta = {"mode": mode, "arch": "resnet18", "image_size": 32, "batch_size": batch,
            "projector": "32-32", "fused": fused, "precision": "fp32", "profile_warmup": warmup,
            "measured_steps": steps, **(meta_extra or {})}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prof.save(path, meta)
    prof.close()
    import json

    with open(path) as f:
        return json.load(f)
