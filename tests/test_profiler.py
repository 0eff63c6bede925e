"""Profiler: disabled no-op, windows aggregated by name inside measure(), profile.json schema."""
import json
import os
import sys
import time

import pytest
import torch

from fake_nvml import FakeClock, FakeCudaMemory, FakeGPU, FakeNVML
from profiling import Profiler
from profiling.energy import EnergyMeter
from profiling.memory import GIB, MemoryMeter
from profiling.profiler import SCHEMA, _downsample

MIB = 1 << 20
RUN_KEYS = {"time_s", "images", "throughput_img_s", "energy_j", "energy_method",
            "energy_per_image_j", "mean_power_w", "cpu_energy_j", "peak_allocated_gib",
            "peak_reserved_gib", "nvml_used_gib", "oom_count", "unavailable"}
WINDOW_KEYS = {"count", "time_s_total", "time_s_mean", "energy_j", "short_windows",
               "peak_allocated_gib", "peak_reserved_gib"}
ENV_KEYS = {"gpu", "driver", "cuda", "torch", "triton", "hostname", "python"}


def check_schema(p: dict) -> None:
    assert p["schema"] == SCHEMA
    assert {"schema", "meta", "environment", "run", "windows", "power_trace"} <= set(p)
    assert ENV_KEYS <= set(p["environment"])
    assert RUN_KEYS <= set(p["run"])
    assert set(p["run"]["unavailable"]) == {"energy", "memory"}
    for w in p["windows"].values():
        assert WINDOW_KEYS <= set(w)
    if p["power_trace"] is not None:
        assert len(p["power_trace"]["t_s"]) == len(p["power_trace"]["power_w"])


def test_disabled_is_a_no_op(monkeypatch, tmp_path):
    class Exploding:
        def __getattr__(self, name):
            raise AssertionError(f"disabled profiler touched pynvml.{name}")

    monkeypatch.setitem(sys.modules, "pynvml", Exploding())
    prof = Profiler("cuda", enabled=False)
    w = prof.window("step")
    assert w is prof.window("other"), "disabled window() should return one shared object"
    with prof.measure():
        with prof.window("step"):
            prof.begin("x")
            prof.end("y")  # not even checked
        prof.add_images(-5)
    assert prof.save(str(tmp_path / "profile.json"), {"a": 1}) is None
    assert prof.peak_memory() is None
    prof.close()
    assert os.listdir(tmp_path) == []


def test_cpu_profile_marks_unavailable_and_aggregates(tmp_path):
    prof = Profiler("cpu")
    with prof.window("step"):  # warm-up: outside measure(), not counted
        time.sleep(0.001)
    prof.add_images(99)  # ignored: not measuring
    for block in ("block1", "block2"):
        with prof.measure():
            for _ in range(3):
                with prof.window("step"):
                    with prof.window(block):
                        with prof.window(block + "/forward"):
                            time.sleep(0.002)
                prof.add_images(4)
    path = prof.save(str(tmp_path / "profile.json"), {"mode": "sequential"})
    prof.close()
    p = json.load(open(path))
    check_schema(p)
    assert os.listdir(tmp_path) == ["profile.json"]
    run = p["run"]
    assert run["images"] == 24
    segs = run["segments"]
    assert [s["label"] for s in segs] == ["block1", "block2"]
    assert run["time_s"] == pytest.approx(sum(s["time_s"] for s in segs))
    assert run["throughput_img_s"] == pytest.approx(24 / run["time_s"])
    for key in ("energy_j", "energy_per_image_j", "mean_power_w", "peak_allocated_gib",
                "peak_reserved_gib", "nvml_used_gib", "oom_count", "energy_method"):
        assert run[key] is None, key  # not measured on CPU: null, never 0
    assert "cpu" in run["unavailable"]["energy"] and "CUDA" in run["unavailable"]["memory"]
    w = p["windows"]
    assert w["step"]["count"] == 6  # the warm-up step is not in it
    assert w["block1"]["count"] == 3 and w["block2/forward"]["count"] == 3
    assert w["step"]["time_s_mean"] == pytest.approx(w["step"]["time_s_total"] / 6)
    assert w["step"]["time_s_total"] >= w["block1"]["time_s_total"] + w["block2"]["time_s_total"]
    assert w["step"]["energy_j"] is None and w["step"]["peak_allocated_gib"] is None
    assert p["power_trace"] is None
    assert p["environment"]["gpu"] is None and p["environment"]["torch"] == torch.__version__
    assert p["meta"] == {"mode": "sequential"}


def _fake_gpu_profiler(monkeypatch):
    """A Profiler over one fake 250 W GPU (fake NVML, clock and allocator): (clock, mem, energy, prof)."""
    clock = FakeClock()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU(clock, 250.0)]).module)
    mem = FakeCudaMemory()
    energy = EnergyMeter(clock=clock, sample_interval_s=None, cpu=False, sync=False)
    prof = Profiler("cpu", energy_meter=energy,
                    memory_meter=MemoryMeter("cuda", backend=mem, nvml=False))
    return clock, mem, energy, prof


def test_with_fake_gpu_meters(monkeypatch, tmp_path):
    clock, mem, energy, prof = _fake_gpu_profiler(monkeypatch)
    with prof.measure():
        for step in range(4):
            with prof.window("step"):
                with prof.window("forward"):
                    mem.malloc(300 * MIB)
                    clock.advance(0.2)
                with prof.window("backward"):
                    mem.free(300 * MIB)
                    mem.malloc(100 * MIB)
                    clock.advance(0.3)
                    mem.free(100 * MIB)
                if step == 2:
                    with prof.window("tiny"):
                        clock.advance(0.01)
            prof.add_images(32)
    p = prof.summary({"mode": "e2e"})
    prof.close()
    check_schema(p)
    run = p["run"]
    assert run["energy_method"] == "counter"
    assert run["time_s"] == pytest.approx(4 * 0.5 + 0.01)
    assert run["energy_j"] == pytest.approx(250.0 * run["time_s"], abs=250.0 * 0.1)
    assert run["energy_per_image_j"] == pytest.approx(run["energy_j"] / 128)
    assert run["mean_power_w"] == pytest.approx(run["energy_j"] / run["time_s"])
    assert run["peak_allocated_gib"] * GIB == 300 * MIB
    assert run["unavailable"] == {"energy": None, "memory": None}
    w = p["windows"]
    assert w["forward"]["energy_j"] == pytest.approx(4 * 0.2 * 250.0, abs=25.0)
    assert w["forward"]["peak_allocated_gib"] * GIB == 300 * MIB
    assert w["backward"]["peak_allocated_gib"] * GIB == 300 * MIB  # freed inside it
    assert w["tiny"]["short_windows"] == 1 and w["forward"]["short_windows"] == 0
    assert p["environment"]["driver"] == "999.99"


def test_run_energy_method_names_a_fallback_to_samples(monkeypatch):
    """A segment whose counter read failed took the power samples: the run's energy_method
    says so ("counter+sampling"), and so does each segment."""
    clock = FakeClock()
    gpu = FakeGPU(clock, 250.0)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([gpu]).module)
    energy = EnergyMeter(clock=clock, sample_interval_s=0.05, cpu=False, sync=False)
    prof = Profiler("cpu", energy_meter=energy, memory_meter=MemoryMeter("cpu"))
    for fail in (False, True):
        with prof.measure():
            clock.advance(0.5)
            energy.sample()
            gpu.counter_supported = not fail
            clock.advance(0.5)
            energy.sample()
            prof.add_images(8)
    p = prof.summary({"mode": "e2e"})
    prof.close()
    assert [s["energy_method"] for s in p["run"]["segments"]] == ["counter", "sampling"]
    assert p["run"]["energy_method"] == "counter+sampling"
    assert p["run"]["energy_j"] == pytest.approx(250.0 * 2.0, rel=0.05)


def test_measure_cannot_nest_and_windows_are_checked():
    prof = Profiler("cpu")
    with prof.measure():
        with pytest.raises(ValueError, match="cannot be nested"):
            prof._measure_begin(None)
        with pytest.raises(ValueError, match="non-negative int"):
            prof.add_images(2.5)
        with pytest.raises(ValueError, match="non-negative int"):
            prof.add_images(True)
        prof.begin("a")
        with pytest.raises(ValueError, match="innermost open window is 'a'"):
            prof.end("b")
        prof.end("a")
    with pytest.raises(TypeError, match="label"):
        prof.measure(3)
    prof.begin("open")
    with pytest.raises(ValueError, match="windows still open"):
        prof.save("/nonexistent/profile.json", {})
    with pytest.raises(TypeError, match="meta must be a dict"):
        prof.save("/nonexistent/profile.json", ["not", "a", "dict"])
    prof.end("open")
    prof.close()
    with pytest.raises(ValueError, match="device"):
        Profiler("tpu:0")


def test_exception_inside_windows_is_not_replaced():
    """An error inside windows (an OOM the trainer counts) comes out as itself, even with a
    window left open inside by a bare begin(), which would make the closing end() complain."""
    prof = Profiler("cpu")

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with prof.measure():
            with prof.window("step"):
                prof.begin("block1")
                raise Boom("out of memory")
    with pytest.raises(ValueError, match="innermost open window"):  # no error: still checked
        with prof.window("step"):
            prof.begin("block1")
    prof.close()


def test_nothing_measured_says_so(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU(clock, 250.0)]).module)
    prof = Profiler("cpu", energy_meter=EnergyMeter(clock=clock, sample_interval_s=None,
                                                    cpu=False, sync=False),
                    memory_meter=MemoryMeter("cuda", backend=FakeCudaMemory(), nvml=False))
    with prof.window("step"):
        clock.advance(1.0)
    p = prof.summary({})
    prof.close()
    run = p["run"]
    assert run["time_s"] is None and run["throughput_img_s"] is None and run["energy_j"] is None
    assert "never entered" in run["unavailable"]["energy"]
    assert "never entered" in run["unavailable"]["memory"]
    assert p["windows"] == {}


def test_downsample_keeps_mean():
    t = [i * 0.01 for i in range(10_001)]
    p = [100.0 + (i % 7) for i in range(10_001)]
    dt, dp = _downsample(t, p, 500)
    assert len(dt) == len(dp) == 500
    assert sum(dp) / len(dp) == pytest.approx(sum(p) / len(p), rel=1e-3)
    assert dt == sorted(dt)
    assert _downsample([1.0, 2.0], [3.0, 4.0], 500) == ([1.0, 2.0], [3.0, 4.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_profile(tmp_path):
    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    prof = Profiler(dev)
    with prof.measure():
        for _ in range(5):
            with prof.window("step"):
                y = x @ x
                del y
            prof.add_images(1)
    p = json.load(open(prof.save(str(tmp_path / "profile.json"), {"t": 1})))
    prof.close()
    check_schema(p)
    assert p["environment"]["gpu"] == torch.cuda.get_device_name(dev)
    assert p["run"]["peak_allocated_gib"] * GIB >= 2 * 4096 * 4096 * 4
    assert p["run"]["oom_count"] == 0
    if p["run"]["energy_j"] is not None:
        assert p["run"]["energy_j"] > 0 and p["run"]["energy_method"] in ("counter", "sampling")
    else:
        assert p["run"]["unavailable"]["energy"]


def test_segment_label_is_the_trained_block():
    """Sequential: block k's segment also runs blocks 1..k-1 forward (frozen); the label is the
    block that had a backward window."""
    prof = Profiler("cpu")
    for k in (1, 2, 3):
        with prof.measure():
            with prof.window("step"):
                for j in range(1, k):
                    with prof.window(f"block{j}"), prof.window(f"block{j}/forward"):
                        pass
                with prof.window(f"block{k}"):
                    with prof.window(f"block{k}/backward"):
                        pass
            prof.add_images(2)
    with prof.measure():  # simultaneous-like: several trained blocks -> no label
        for k in (1, 2):
            with prof.window(f"block{k}"), prof.window(f"block{k}/backward"):
                pass
    with prof.measure(label="mine"):
        pass
    labels = [s["label"] for s in prof.summary({})["run"]["segments"]]
    prof.close()
    assert labels == ["block1", "block2", "block3", None, "mine"]


def test_memory_only_window_does_not_sync_and_records_memory(monkeypatch):
    """timed=False: no device sync at either end, peak memory exact, time/energy null (not 0)."""
    clock, mem, energy, prof = _fake_gpu_profiler(monkeypatch)
    syncs = []
    monkeypatch.setattr(prof, "_sync", lambda: syncs.append(len(prof._stack)))
    energy_calls = []
    for meth in ("begin", "end"):
        orig = getattr(energy, meth)
        monkeypatch.setattr(energy, meth, lambda name, _o=orig, _m=meth:
                            (energy_calls.append((_m, name)), _o(name))[1])
    with prof.measure():
        assert len(syncs) == 1  # the measured segment is timed
        for _ in range(3):
            with prof.window("step"):
                n = len(syncs)
                with prof.window("block1", timed=False):
                    with prof.window("block1/forward", timed=False):
                        mem.malloc(200 * MIB)
                        clock.advance(0.1)
                    mem.free(200 * MIB)
                    mem.malloc(50 * MIB)
                    mem.free(50 * MIB)
                assert len(syncs) == n, "a memory-only window synchronized the device"
            prof.add_images(8)
    assert len(syncs) == 2 + 3 * 2  # measure() and the step windows only
    assert {name for _, name in energy_calls} == {"<measure>", "step"}
    p = prof.summary()
    prof.close()
    check_schema(p)
    w = p["windows"]
    for name in ("block1", "block1/forward"):
        assert w[name]["count"] == 3 and w[name]["timed"] is False
        assert w[name]["untimed_windows"] == 3
        for key in ("time_s_total", "time_s_mean", "energy_j", "mean_power_w",
                    "sampled_energy_j"):
            assert w[name][key] is None, (name, key)
        assert w[name]["peak_allocated_gib"] * GIB == 200 * MIB
    assert w["block1/forward"]["depth"] == w["block1"]["depth"] + 1 == w["step"]["depth"] + 2
    assert w["step"]["timed"] is True and w["step"]["time_s_total"] == pytest.approx(0.3)
    assert w["step"]["energy_j"] == pytest.approx(0.3 * 250.0, abs=25.0)
    assert w["step"]["peak_allocated_gib"] * GIB == 200 * MIB
    assert p["run"]["time_s"] == pytest.approx(0.3)
    with pytest.raises(TypeError, match="timed must be True or False"):
        prof.begin("x", timed="no")


def test_memory_only_window_on_cpu_has_no_time_and_no_memory(tmp_path):
    prof = Profiler("cpu")
    with prof.measure():
        with prof.window("step"):
            with prof.window("block1", timed=False):
                time.sleep(0.002)
    p = json.load(open(prof.save(str(tmp_path / "profile.json"))))
    prof.close()
    b = p["windows"]["block1"]
    assert b["count"] == 1 and b["timed"] is False
    assert b["time_s_total"] is None and b["energy_j"] is None
    assert b["peak_allocated_gib"] is None  # CPU: unavailable, never 0
    assert p["windows"]["step"]["time_s_total"] >= 0.002


# -- figures derived from profile.json -------------------------------------------------------------
def test_ddp_energy_per_pair_uses_this_process_pairs(monkeypatch, tmp_path):
    """Under DDP the trainer counts the global batch (add_images(cfg.batch_size)) while the
    profiler meters only its own GPU: per pair, the energy is over this process's pairs, so two
    processes at the same per-GPU batch and power give the same J/pair as one."""
    from profile_factory import make_profile
    from profiling.report import RunResult, build_report

    runs = []
    for world in (1, 2):
        for mode in ("e2e", "sequential"):
            p = make_profile(monkeypatch, str(tmp_path / f"{mode}{world}" / "profile.json"), mode,
                             batch=16 * world, meta_extra={"world_size": world})
            runs.append(RunResult(f"{mode} x{world}", str(tmp_path), p))
    one, two = runs[0].profile["run"], runs[2].profile["run"]
    assert two["energy_j"] == pytest.approx(one["energy_j"]) and two["images"] == 2 * one["images"]
    assert two["energy_per_image_j"] == pytest.approx(one["energy_per_image_j"])
    assert two["energy_per_image_j"] == pytest.approx(2 * two["energy_j"] / two["images"])
    rep = build_report(runs)
    by = {e["label"]: e for e in rep["runs"]}
    for mode in ("e2e", "sequential"):
        m1, m2 = by[f"{mode} x1"]["metrics"], by[f"{mode} x2"]["metrics"]
        for key in ("energy_per_image_j", "sampled_energy_per_image_j"):
            assert m1[key] is not None and m2[key] == pytest.approx(m1[key]), (mode, key)
        assert m2["throughput_img_s"] == pytest.approx(2 * m1["throughput_img_s"])  # global
        b1 = [b["energy_per_image_j"] for b in by[f"{mode} x1"]["per_block"]]
        b2 = [b["energy_per_image_j"] for b in by[f"{mode} x2"]["per_block"]]
        assert None not in b1 and b2 == pytest.approx(b1), mode


def _seq_profile_one_short_segment():
    """Sequential, phases timed: block 4's measured segment is under 100 ms (so the run is
    'short' and its total takes the power samples), block 1's windows are all long."""
    seg = {"time_s": 1.0, "images": 64, "energy_j": 200.0, "sampled_energy_j": 210.0,
           "cpu_energy_j": None, "short": False, "peak_allocated_gib": None,
           "peak_reserved_gib": None, "energy_unavailable": None}
    segs = [dict(seg, label=f"block{k}") for k in (1, 2, 3)]
    segs.append(dict(seg, label="block4", time_s=0.08, energy_j=0.0, sampled_energy_j=16.0,
                     short=True))
    run = {"time_s": 3.08, "images": 256, "energy_j": 600.0, "sampled_energy_j": 646.0,
           "energy_method": "counter", "mean_power_w": 600.0 / 3.08, "short": True,
           "unavailable": {"energy": None, "memory": None}, "segments": segs}
    w = {"count": 4, "time_s_total": 1.0, "time_s_mean": 0.25, "energy_j": 200.0,
         "sampled_energy_j": 210.0, "short_windows": 0, "peak_allocated_gib": None,
         "timed": True}
    return {"schema": SCHEMA, "meta": {"mode": "sequential", "profile_phases": True},
            "environment": {}, "run": run, "windows": {"block1": w}, "power_trace": None}


def test_window_table_does_not_call_counter_energy_sampled():
    """A short measured segment makes the run's energy come from the power samples; the windows
    table must still label a long window's counter energy as the counter's, not '(sampled)'."""
    from profiling.report import RunResult, build_report, render_markdown

    rep = build_report([RunResult("sequential", "x", _seq_profile_one_short_segment())])
    assert "power samples" in rep["runs"][0]["metrics"]["energy_method"]  # the run's total
    line = next(ln for ln in render_markdown(rep).splitlines() if ln.startswith("| block1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == "200.00", line  # the counter's 200 J, shown as measured, unmarked


def test_phase_na_reason_names_why_not_no_windows(monkeypatch, tmp_path):
    """Phase windows that exist and are timed but cannot give a per-pair figure (sequential
    blocks measured on unequal pairs, e.g. cut by --max-steps; no pairs) are not 'no such
    windows'."""
    from profile_factory import make_profile
    from profiling.report import RunResult, phase_reasons, phase_times

    p = make_profile(monkeypatch, str(tmp_path / "s" / "profile.json"), "sequential")
    run = RunResult("sequential", str(tmp_path), p)
    assert all(v is not None for v in phase_times(run, 4).values())
    p["run"]["segments"][3]["images"] //= 3  # block 4 cut short
    assert all(v is None for v in phase_times(run, 4).values())
    for reason in phase_reasons(run).values():
        assert "no such windows" not in reason and "unequal" in reason
    p["run"]["images"] = 0
    assert all("no image pairs" in why for why in phase_reasons(run).values())
