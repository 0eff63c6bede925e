"""EnergyMeter on a fake NVML (counter, sampling, wrap-around, reset, fallbacks) and a fake RAPL."""
import os
import sys
import time

import pytest

from fake_nvml import FakeClock, FakeGPU, FakeNVML
from profiling.energy import (
    COUNTER_UPDATE_S,
    EnergyMeter,
    RaplReader,
    _MonotonicCounter,
)


@pytest.fixture
def clock():
    return FakeClock(1000.05)  # mid-way between two counter updates


def install(monkeypatch, *gpus, **kw):
    fake = FakeNVML(list(gpus), **kw)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    return fake


def meter(clock, **kw):
    kw.setdefault("sample_interval_s", None)
    kw.setdefault("cpu", False)
    kw.setdefault("sync", False)
    return EnergyMeter(clock=clock, **kw)


# -- the counter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("powers", [(200.0,), (180.0, 310.0)])
def test_counter_energy_per_gpu(monkeypatch, clock, powers):
    install(monkeypatch, *[FakeGPU(clock, p) for p in powers])
    m = meter(clock)
    assert m.method == "counter" and m.gpu_available
    with m.window("step") as w:
        clock.advance(2.0)
    r = w.result
    assert r.method == "counter" and not r.short and r.time_s == pytest.approx(2.0)
    assert [g.energy_j for g in r.gpus] == pytest.approx([2.0 * p for p in powers], rel=1e-6)
    assert r.energy_j == pytest.approx(2.0 * sum(powers), rel=1e-6)
    assert r.mean_power_w == pytest.approx(sum(powers), rel=1e-6)
    assert [g.mean_power_w for g in r.gpus] == pytest.approx(list(powers), rel=1e-6)
    assert r.gpu_unavailable is None
    m.close()


def test_counter_quantised_to_updates(monkeypatch, clock):
    """A window of 1.0 s that starts and ends at different phases of the 100 ms update clock
    reads whole updates: 1.0 s of energy, whatever the offset inside a tick."""
    install(monkeypatch, FakeGPU(clock, 250.0))  # updates at 1000.05 + k * 0.1
    m = meter(clock)
    clock.advance(0.05)
    m.begin("a")
    clock.advance(0.999)
    r = m.end("a")
    assert r.energy_j == pytest.approx(250.0, rel=1e-6)  # 10 updates inside the window


def test_short_window_is_flagged_not_silent_zero(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock, 200.0))
    m = meter(clock)
    with m.window("tiny") as w:
        clock.advance(COUNTER_UPDATE_S / 4)
    r = w.result
    assert r.short, "a window shorter than the counter update period must be flagged"
    assert r.energy_j == 0.0  # the counter did not move: only the flag tells the two apart
    with m.window("long") as w2:
        clock.advance(3 * COUNTER_UPDATE_S)
    assert not w2.result.short and w2.result.energy_j > 0


def test_counter_wraparound(monkeypatch, clock):
    gpu = FakeGPU(clock, 200.0, counter_start_mj=2**64 - 50_000)  # wraps after 50 J
    install(monkeypatch, gpu)
    m = meter(clock)
    with m.window("w") as w:
        clock.advance(2.0)  # 400 J: through the 2**64 wrap
    assert gpu.counter_mj() < 400_000  # the raw counter did wrap
    assert w.result.energy_j == pytest.approx(400.0, rel=1e-6)
    assert not w.result.counter_reset
    assert m.info()["counter_wraps"] == 1


def test_counter_reset_falls_back_to_sampling(monkeypatch, clock):
    gpu = FakeGPU(clock, 200.0, counter_start_mj=10**9)  # the driver has run for a while
    install(monkeypatch, gpu)
    m = meter(clock, sample_interval_s=0.5)  # the sampler thread runs (on the fake clock)
    m.begin("w")
    clock.advance(1.0)
    m.sample()
    gpu.reset_at = clock() + 0.05  # the driver reloads: the counter restarts from 0
    clock.advance(1.0)
    m.sample()
    r = m.end("w")
    m.close()
    assert r.counter_reset
    # the counter alone would say 0.95 s worth (190 J); the sampled integral has all 400 J
    assert r.sampled_energy_j == pytest.approx(400.0, rel=1e-6)
    assert r.energy_j == pytest.approx(400.0, rel=1e-6)
    assert m.info()["counter_resets"] == 1


def test_counter_reset_without_sampling_keeps_flagged_lower_bound(monkeypatch, clock):
    gpu = FakeGPU(clock, 200.0, counter_start_mj=10**9)
    install(monkeypatch, gpu)
    m = meter(clock)  # no sampler: nothing to fall back on
    m.begin("w")
    clock.advance(1.0)
    gpu.reset_at = clock() + 0.05
    clock.advance(1.0)
    r = m.end("w")
    assert r.counter_reset and r.sampled_energy_j is None
    assert r.energy_j == pytest.approx(200.0 * 0.95, rel=1e-6)  # only what came after the reset


def test_monotonic_counter_wrap_vs_reset():
    c = _MonotonicCounter(modulus=1000, max_rate_per_s=100.0)
    c.update(900, 0.0)
    assert c.update(950, 1.0) == 50
    assert c.update(20, 2.0) == 120  # wrapped: +70 is plausible at <= 100/s
    assert c.update(10, 3.0) == 130  # -10 (+990 would exceed 100/s): a reset, +10 since it
    assert (c.wraps, c.resets) == (1, 1)
    rapl = _MonotonicCounter(modulus=1000, max_rate_per_s=None)  # never resets
    rapl.update(10, 0.0)
    assert rapl.update(5, 100.0) == 995


# -- power sampling ------------------------------------------------------------------------------
def test_not_supported_counter_falls_back_to_sampling(monkeypatch, clock):
    t0 = clock()
    ramp = lambda t: 100.0 + 50.0 * (t - t0)  # noqa: E731 - W, linear in time
    install(monkeypatch, FakeGPU(clock, ramp, counter_supported=False))
    m = meter(clock)
    assert m.method == "sampling" and m.power_source == "usage"
    m.begin("w")
    for _ in range(4):
        clock.advance(0.5)
        m.sample()
    r = m.end("w")
    # trapezoid is exact for a linear power: 100*2 + 25*2**2 = 300 J
    assert r.method == "sampling"
    assert r.energy_j == pytest.approx(300.0, rel=1e-9)
    assert r.sampled_energy_j == pytest.approx(300.0, rel=1e-9)
    assert r.mean_power_w == pytest.approx(150.0, rel=1e-9)


def test_sampling_thread_builds_trace_and_integrates(monkeypatch):
    """Real clock and thread: constant 150 W integrates to 150 W x time whatever the sampling."""
    install(monkeypatch, FakeGPU(time.perf_counter, 150.0, counter_supported=False))
    m = EnergyMeter(sample_interval_s=0.005, cpu=False, sync=False)
    with m.window("w") as w:
        time.sleep(0.25)
    m.close()
    r = w.result
    assert r.method == "sampling"
    assert r.energy_j == pytest.approx(150.0 * r.time_s, rel=1e-6)
    trace = m.power_trace()
    assert trace is not None and len(trace.t_s) >= 10, "the background thread did not sample"
    assert all(p == pytest.approx(150.0) for p in trace.power_w)
    assert trace.t_s == sorted(trace.t_s)
    assert m.info()["thread_error"] is None


def test_counter_and_sampling_measured_at_once_agree(monkeypatch, clock):
    """One >= 10 s window measured both ways (what scripts/gpu_profile_check.sh does on the GPU)."""
    t0 = clock()
    install(monkeypatch, FakeGPU(clock, lambda t: 300.0 + 20.0 * ((t - t0) % 2.0)))
    m = meter(clock, sample_interval_s=1.0)
    m.begin("long")
    for _ in range(1200):
        clock.advance(0.01)
        m.sample()
    r = m.end("long")
    m.close()
    assert r.method == "counter" and r.time_s == pytest.approx(12.0)
    assert r.sampled_energy_j == pytest.approx(r.energy_j, rel=0.01)
    assert r.energy_j == pytest.approx(12.0 * 320.0, rel=0.01)


def test_instant_power_field_preferred(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock, 100.0, counter_supported=False,
                                 instant_power_w=lambda t: 250.0))
    m = meter(clock)
    assert m.power_source == "instant"
    with m.window("w") as w:
        clock.advance(1.0)
    assert w.result.energy_j == pytest.approx(250.0)
    m2 = meter(clock, power_source="usage")
    with m2.window("w") as w2:
        clock.advance(1.0)
    assert m2.power_source == "usage" and w2.result.energy_j == pytest.approx(100.0)
    # an instant field in another unit (W instead of mW: 1000x off) is not trusted
    install(monkeypatch, FakeGPU(clock, 100.0, counter_supported=False,
                                 instant_power_w=lambda t: 0.1))
    assert meter(clock).power_source == "usage"


# -- unavailable states --------------------------------------------------------------------------
def _assert_unavailable(m, needle):
    assert not m.gpu_available and m.method is None
    assert needle in m.gpu_unavailable
    with m.window("w") as w:
        time.sleep(0.002)
    r = w.result
    assert r.energy_j is None and r.mean_power_w is None and r.method is None
    assert needle in r.gpu_unavailable
    assert r.time_s > 0  # time is still measured
    assert m.power_trace() is None


def test_missing_library_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    m = EnergyMeter(cpu=False, sync=False)
    _assert_unavailable(m, "nvidia-ml-py")
    m.close()


def test_nvml_init_failure_is_unavailable(monkeypatch):
    install(monkeypatch, FakeGPU(time.perf_counter), init_error="library")
    _assert_unavailable(EnergyMeter(cpu=False, sync=False), "NVML could not be initialised")


def test_no_gpu_is_unavailable(monkeypatch):
    install(monkeypatch)
    _assert_unavailable(EnergyMeter(cpu=False, sync=False), "no GPU")
    _assert_unavailable(EnergyMeter([], cpu=False, sync=False), "no GPU selected")


def test_neither_counter_nor_power_is_unavailable(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock, counter_supported=False, power_supported=False))
    m = meter(clock)
    assert not m.gpu_available
    assert "counter not supported" in m.gpu_unavailable
    assert "power reading not supported" in m.gpu_unavailable


def test_forced_method_that_cannot_work_raises(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock, counter_supported=False))
    with pytest.raises(RuntimeError, match="method='counter'"):
        meter(clock, method="counter")


@pytest.mark.parametrize("kw, match", [
    ({"method": "joules"}, "method must be one of"),
    ({"sample_interval_s": 0}, "sample_interval_s"),
    ({"power_source": "psu"}, "power_source"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        EnergyMeter([], cpu=False, **kw)


# -- windows -------------------------------------------------------------------------------------
def test_windows_nest(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock, 100.0))
    m = meter(clock)
    with m.window("outer") as outer:
        clock.advance(1.0)
        with m.window("inner") as inner:
            assert m.open_windows == ["outer", "inner"]
            clock.advance(2.0)
        clock.advance(1.0)
    assert inner.result.depth == 1 and outer.result.depth == 0
    assert inner.result.energy_j == pytest.approx(200.0)
    assert outer.result.energy_j == pytest.approx(400.0)
    assert outer.result.time_s == pytest.approx(4.0)
    assert inner.result.start_s == pytest.approx(outer.result.start_s + 1.0)


def test_windows_must_close_innermost_first(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock))
    m = meter(clock)
    with pytest.raises(ValueError, match="no window is open"):
        m.end("a")
    m.begin("a")
    m.begin("b")
    with pytest.raises(ValueError, match="innermost open window is 'b'"):
        m.end("a")
    with pytest.raises(ValueError, match="non-empty string"):
        m.begin("")


def test_exception_in_window_is_not_replaced(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock, 100.0))
    m = meter(clock)
    with pytest.raises(KeyError):  # not the ValueError the closing end("a") would raise
        with m.window("a"):
            m.begin("b")
            raise KeyError("inside")
    m.end("b")
    with pytest.raises(KeyError):  # a plain error still closes its window, with a result
        with m.window("c") as c:
            clock.advance(1.0)
            raise KeyError("inside")
    assert c.result is not None and c.result.energy_j == pytest.approx(100.0)


def test_sync_called_at_both_ends(monkeypatch, clock):
    install(monkeypatch, FakeGPU(clock))
    calls = []
    m = meter(clock, sync=lambda: calls.append(clock()))
    m.begin("a")
    clock.advance(1.0)
    m.end("a")
    assert len(calls) == 2 and calls[1] - calls[0] == pytest.approx(1.0)


def test_close_balances_nvml_init(monkeypatch, clock):
    fake = install(monkeypatch, FakeGPU(clock))
    m = meter(clock, sample_interval_s=0.01)
    m.close()
    m.close()
    assert fake.init_count == fake.shutdown_count == 1
    with pytest.raises(RuntimeError, match="closed"):
        m.begin("late")


# -- RAPL ----------------------------------------------------------------------------------------
def _domain(root, name, label, energy, max_range=1_000_000):
    d = root / name
    d.mkdir()
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return d


def test_rapl_packages_with_wraparound(tmp_path, clock, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    p0 = _domain(tmp_path, "intel-rapl:0", "package-0", 999_000)
    core = _domain(tmp_path, "intel-rapl:0:0", "core", 5)  # a subdomain: must not be counted
    p1 = _domain(tmp_path, "intel-rapl:1", "package-1", 10_000)
    _domain(tmp_path, "intel-rapl-mmio:0", "package-0", 0)  # another interface: ignored
    psys = _domain(tmp_path, "intel-rapl:2", "psys", 0)  # the platform, packages included
    m = EnergyMeter([], clock=clock, sample_interval_s=None, powercap_root=str(tmp_path),
                    sync=False)
    assert m.cpu_available and m.cpu_unavailable is None
    m.begin("w")
    clock.advance(1.0)
    (p0 / "energy_uj").write_text("500\n")  # wrapped: 1_000 to the top, then 500
    (p1 / "energy_uj").write_text("12000\n")
    (core / "energy_uj").write_text("900000\n")
    (psys / "energy_uj").write_text("700000\n")
    r = m.end("w")
    assert r.cpu_energy_j == pytest.approx((1_000 + 500 + 2_000) / 1e6)
    assert r.cpu_unavailable is None
    assert r.energy_j is None and "no GPU selected" in r.gpu_unavailable


def test_rapl_unreadable_and_absent(tmp_path):
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "max_energy_range_uj").write_text("1000\n")
    (d / "energy_uj").mkdir()  # reads fail even as root
    r = RaplReader(str(tmp_path))
    assert not r.available and "not readable" in r.reason and r.read_uj(0.0) is None
    empty = RaplReader(str(tmp_path / "nowhere"))
    assert not empty.available and "no RAPL package domains" in empty.reason
    m = EnergyMeter([], powercap_root=str(tmp_path), sample_interval_s=None, sync=False)
    with m.window("w") as w:
        pass
    assert w.result.cpu_energy_j is None and "not readable" in w.result.cpu_unavailable


@pytest.mark.skipif(not os.path.exists("/sys/class/powercap"), reason="no powercap here")
def test_rapl_on_this_machine_reads_or_explains():
    r = RaplReader()
    assert r.available or r.reason


def test_boundaries_in_a_burst_share_one_counter_read(monkeypatch, clock):
    fake = install(monkeypatch, FakeGPU(clock, 200.0))
    m = meter(clock)
    clock.advance(0.01)  # past the reading taken at construction
    before = fake.calls
    m.begin("block1")
    m.begin("block1/forward")  # same instant: no second NVML call
    assert fake.calls == before + 1
    clock.advance(0.5)
    m.end("block1/forward")
    r = m.end("block1")
    assert fake.calls == before + 2
    assert r.energy_j == pytest.approx(100.0)
    with pytest.raises(ValueError, match="counter_reuse_s"):
        meter(clock, counter_reuse_s=-1)


def test_a_meter_dropped_without_close_stops_sampling_and_releases_nvml(monkeypatch):
    """The sampler thread holds only a weak reference: a meter nobody closed is collected, its
    thread ends and NVML is shut down (a sweep that builds a meter per run leaked threads)."""
    import gc
    import threading

    fake = install(monkeypatch, FakeGPU(time.perf_counter, 200.0))
    for _ in range(3):
        m = EnergyMeter([0], cpu=False, sync=False, sample_interval_s=0.005)
        time.sleep(0.02)
        assert m.power_trace() is not None  # it was sampling
        del m
    gc.collect()
    deadline = time.time() + 5
    while time.time() < deadline and any(t.name == "EnergyMeter-sampler"
                                         for t in threading.enumerate()):
        time.sleep(0.01)
    assert not any(t.name == "EnergyMeter-sampler" for t in threading.enumerate())
    assert fake.shutdown_count == 3
    calls = fake.calls
    time.sleep(0.05)
    assert fake.calls == calls  # nobody polls NVML any more


def test_failed_counter_read_falls_back_to_samples_and_says_so(monkeypatch, clock):
    """A counter read that fails at a window boundary: the power-sample integral stands in, and
    the window (and the GPU) says "sampling", not "counter"."""
    gpu = FakeGPU(clock, 200.0)
    install(monkeypatch, gpu)
    m = meter(clock, sample_interval_s=0.5)
    assert m.method == "counter"
    with m.window("ok") as w0:
        clock.advance(1.0)
        m.sample()
    assert w0.result.method == "counter" and w0.result.gpus[0].method == "counter"
    m.begin("w")
    clock.advance(1.0)
    m.sample()
    gpu.counter_supported = False  # the read at the window's end fails
    clock.advance(1.0)
    m.sample()
    r = m.end("w")
    m.close()
    assert r.energy_j == pytest.approx(400.0, rel=1e-6)
    assert r.method == "sampling" and r.gpus[0].method == "sampling"
    assert not r.short


def test_failed_counter_read_without_samples_is_unmeasured(monkeypatch, clock):
    gpu = FakeGPU(clock, 200.0)
    install(monkeypatch, gpu)
    m = meter(clock)
    m.begin("w")
    gpu.counter_supported = False
    clock.advance(1.0)
    r = m.end("w")
    assert r.energy_j is None and r.method is None
    assert "counter read failed" in r.gpu_unavailable
