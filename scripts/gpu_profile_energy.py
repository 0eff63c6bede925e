"""GPU check of the energy meter (run by scripts/gpu_profile_check.sh on a CUDA machine).

1. Cost of the calls a window boundary makes (NVML counter, power readings, synchronize, memory
   statistics) and of a whole empty Profiler window: the overhead an instrumented run pays.
2. Windows of >= 10 s of bf16 matmul load measured three ways at once: NVML's total-energy counter
   and the meter's power-sampling integral (the same EnergyMeter window), and nvidia-smi power
   samples taken by a separate process. One window starts from idle (includes the ramp), one in
   steady state. Pass: counter and power integration within 10 % of each other on every window.

    PYTHONPATH=. python scripts/gpu_profile_energy.py --out DIR
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_profile_smi import SmiSampler  # noqa: E402

from profiling import EnergyMeter, Profiler  # noqa: E402
from profiling._io import atomic_write_json  # noqa: E402


def per_call_us(fn, n: int = 50) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t0) / n


def overheads(dev: torch.device) -> dict:
    out = {}
    meter = EnergyMeter([dev], sample_interval_s=None, cpu=True)
    nvml, h = meter._nvml, meter._handles[0] if meter._handles else None
    if h is not None:
        for name, fn in (("nvml_total_energy_us", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h)),
                         ("nvml_power_usage_us", lambda: nvml.nvmlDeviceGetPowerUsage(h)),
                         ("nvml_memory_info_us", lambda: nvml.nvmlDeviceGetMemoryInfo(h))):
            try:
                out[name] = per_call_us(fn)
            except Exception as e:  # noqa: BLE001 - report, do not stop
                out[name] = f"error: {e!r}"
        fid = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if fid is not None:
            try:
                out["nvml_power_instant_us"] = per_call_us(
                    lambda: nvml.nvmlDeviceGetFieldValues(h, [fid]))
            except Exception as e:  # noqa: BLE001
                out["nvml_power_instant_us"] = f"error: {e!r}"
    out["energy_meter"] = meter.info()
    meter.close()
    out["cuda_synchronize_idle_us"] = per_call_us(lambda: torch.cuda.synchronize(dev), 200)
    out["memory_stats_us"] = per_call_us(lambda: torch.cuda.memory_stats_as_nested_dict(dev))
    prof = Profiler(dev)
    with prof.measure():
        t0 = time.perf_counter()
        for _ in range(100):
            with prof.window("x"):
                pass
        out["profiler_empty_window_us"] = 1e6 * (time.perf_counter() - t0) / 100
        t0 = time.perf_counter()
        for _ in range(50):
            with prof.window("a"), prof.window("a/b"), prof.window("a/b/c"):
                pass
        out["profiler_3_nested_windows_us"] = 1e6 * (time.perf_counter() - t0) / 50
    prof.close()
    return out


def load(dev: torch.device, seconds: float) -> int:
    """bf16 matmuls for about ``seconds`` (host-timed; the caller synchronizes)."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    n = 0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(10):
            a @ b
        n += 10
        torch.cuda.synchronize(dev)  # keeps the queue short so the window ends on time
    return n


def window(meter: EnergyMeter, smi: SmiSampler, name: str, dev, seconds: float) -> dict:
    t_wall0 = time.time()
    meter.begin(name)  # synchronizes first
    n = load(dev, seconds)
    r = meter.end(name)
    t_wall1 = time.time()
    time.sleep(0.3)  # nvidia-smi samples after the end
    smi_j = smi.energy_j(t_wall0, t_wall1)
    out = {"name": name, "time_s": r.time_s, "matmuls": n, "method": r.method,
           "counter_j": r.energy_j if r.method == "counter" else None,
           "sampled_j": r.sampled_energy_j, "nvidia_smi_j": smi_j,
           "mean_power_w": r.mean_power_w, "short": r.short}
    c, s = out["counter_j"], out["sampled_j"]
    out["sampled_vs_counter"] = (s / c - 1.0) if c and s is not None else None
    out["smi_vs_counter"] = (smi_j / c - 1.0) if c and smi_j is not None else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=11.0)
    ap.add_argument("--no-overheads", action="store_true",
                    help="skip the per-call overhead timings (on the H100 VM they took most of "
                         "a 55 s budget with the earlier, larger repetition counts)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check")
        return 0
    dev = torch.device("cuda", torch.cuda.current_device())
    res = {"gpu": torch.cuda.get_device_name(dev),
           "overheads": {} if args.no_overheads else overheads(dev)}
    meter = EnergyMeter([dev], sample_interval_s=0.02)
    res["meter"] = meter.info()
    with SmiSampler(dev.index, interval_ms=50) as smi:
        res["smi_field"] = smi.field
        time.sleep(3.0)  # idle: the GPU settles
        res["windows"] = [window(meter, smi, "from_idle", dev, args.seconds),
                          window(meter, smi, "steady", dev, args.seconds)]
    meter.close()
    ok = all(w["sampled_vs_counter"] is not None and abs(w["sampled_vs_counter"]) <= 0.10
             for w in res["windows"])
    res["pass"] = ok
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "energy_check.json"), res)
    o = res["overheads"]
    print("== per-call cost (us) ==")
    for k, v in o.items():
        if k != "energy_meter":
            print(f"  {k:34s} {v:.1f}" if isinstance(v, float) else f"  {k:34s} {v}")
    print(f"== energy: counter vs power integration (meter: {res['meter']['method']}, power "
          f"source {res['meter']['power_source']}; nvidia-smi {res['smi_field']}) ==")
    print(f"  {'window':10s} {'time s':>7s} {'counter J':>10s} {'sampled J':>10s} "
          f"{'smi J':>10s} {'samp/cnt':>9s} {'smi/cnt':>8s} {'mean W':>7s}")
    for w in res["windows"]:
        f = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
        print(f"  {w['name']:10s} {w['time_s']:7.2f} {f(w['counter_j'], '10.1f')} "
              f"{f(w['sampled_j'], '10.1f')} {f(w['nvidia_smi_j'], '10.1f')} "
              f"{f(w['sampled_vs_counter'] and 100 * w['sampled_vs_counter'], '+8.1f')}% "
              f"{f(w['smi_vs_counter'] and 100 * w['smi_vs_counter'], '+7.1f')}% "
              f"{f(w['mean_power_w'], '7.0f')}")
    print(f"ENERGY CHECK (counter vs power integration within 10%): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
