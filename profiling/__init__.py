"""profiling: energy (NVML, RAPL) and memory meters, named windows, reports.

The trainer uses ``Profiler`` only; ``python -m profiling compare|maxbatch|report`` runs the trainer
in fresh processes and renders reports from their profile.json files. This package never imports
``blockwise``.
"""
from profiling.energy import (
    COUNTER_UPDATE_S,
    EnergyMeter,
    EnergyWindow,
    GpuEnergy,
    PowerTrace,
    RaplReader,
)
from profiling.memory import MemoryMeter, MemoryWindow
from profiling.profiler import SCHEMA, Profiler

__all__ = [
    "COUNTER_UPDATE_S",
    "EnergyMeter",
    "EnergyWindow",
    "GpuEnergy",
    "MemoryMeter",
    "MemoryWindow",
    "PowerTrace",
    "Profiler",
    "RaplReader",
    "SCHEMA",
]
