"""MemoryMeter: nested peaks on a simulated allocator, unavailable states, snapshot, real CUDA."""
import os
import random
import sys

import pytest
import torch

from fake_nvml import FakeCudaMemory, FakeGPU, FakeNVML
from profiling.memory import GIB, MemoryMeter

MIB = 1 << 20


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML unless a test installs one
    return FakeCudaMemory()


def test_inner_reset_keeps_outer_peak(fake):
    m = MemoryMeter("cuda", backend=fake)
    m.begin("outer")
    fake.malloc(100 * MIB)
    fake.free(100 * MIB)  # outer's peak (100 MiB) happens before the inner window
    m.begin("inner")  # resets PyTorch's peak counter
    fake.malloc(5 * MIB)
    inner = m.end("inner")
    fake.free(5 * MIB)
    outer = m.end("outer")
    assert inner.peak_allocated_gib * GIB == 5 * MIB
    assert outer.peak_allocated_gib * GIB == 100 * MIB
    assert outer.peak_reserved_gib * GIB >= 100 * MIB
    assert inner.allocated_begin_gib == 0 and inner.allocated_end_gib * GIB == 5 * MIB
    assert (inner.depth, outer.depth) == (1, 0)
    assert m.peak_since_start()["peak_allocated_gib"] * GIB == 100 * MIB


def test_random_nesting_matches_brute_force(fake):
    """Random allocations and nested windows: every window's peak equals the maximum of the
    allocation timeline over exactly its lifetime."""
    rng = random.Random(1234)
    m = MemoryMeter("cuda", backend=fake)
    timeline = [0]  # allocated bytes after each event
    open_ = []  # (name, index into timeline at begin)
    live = []
    results = []
    for i in range(400):
        r = rng.random()
        if r < 0.2 and len(open_) < 5:
            name = f"w{i}"
            m.begin(name)
            open_.append((name, len(timeline) - 1))
        elif r < 0.35 and open_:
            name, start = open_.pop()
            results.append((m.end(name), max(timeline[start:])))
        elif r < 0.7 or not live:
            n = rng.randrange(1, 64) * MIB
            fake.malloc(n)
            live.append(n)
            timeline.append(fake.allocated)
        else:
            fake.free(live.pop(rng.randrange(len(live))))
            timeline.append(fake.allocated)
    while open_:
        name, start = open_.pop()
        results.append((m.end(name), max(timeline[start:])))
    assert len(results) > 20
    for w, expect in results:
        assert w.peak_allocated_gib * GIB == expect, w.name
    assert m.peak_since_start()["peak_allocated_gib"] * GIB == max(timeline)


def test_oom_count_per_window(fake):
    m = MemoryMeter("cuda", backend=fake)
    fake.num_ooms = 2  # before the meter's windows
    with m.window("a") as out:
        fake.num_ooms += 1
    assert out[0].oom_count == 1
    assert m.oom_count() == 3


def test_oom_inside_window_is_counted_and_not_replaced(fake):
    m = MemoryMeter("cuda", backend=fake)

    class FakeOOM(RuntimeError):
        pass

    with pytest.raises(FakeOOM):  # not the ValueError the closing end("a") would raise
        with m.window("a"):
            m.begin("b")
            fake.num_ooms += 1
            raise FakeOOM("CUDA out of memory")
    w = m.end("b")
    assert w.oom_count == 1
    with pytest.raises(FakeOOM):
        with m.window("c") as out:
            fake.num_ooms += 1
            raise FakeOOM("CUDA out of memory")
    assert out[0].oom_count == 1 and m.oom_count() == 2


def test_nvml_used_memory_at_window_end(monkeypatch, fake):
    gpu = FakeGPU(lambda: 0.0, used_bytes=int(3.5 * GIB))
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([gpu]).module)
    m = MemoryMeter("cuda", backend=fake, nvml_index=0)
    m.begin("a")
    assert m.end("a", nvml=True).nvml_used_gib == pytest.approx(3.5)
    m.begin("b")
    assert m.end("b").nvml_used_gib is None  # only when asked (one NVML call)
    m.close()


def test_indexed_cuda_device_before_cuda_is_initialised(monkeypatch):
    """MemoryMeter("cuda:1") as the first CUDA call of a process: PyTorch's caching allocator
    refuses reset_peak_memory_stats before CUDA is initialised (NativeCachingAllocator::
    resetPeakStats -> "Invalid device argument 1: did you call init?"), and memory_stats is
    empty then. Only "cuda" without an index initialised it (via current_device())."""
    state = {"init": False}

    def stats(device=None):
        if not state["init"]:
            return {}
        cur = {"current": 3 * MIB, "peak": 3 * MIB}
        return {"allocated_bytes": {"all": dict(cur)}, "reserved_bytes": {"all": dict(cur)},
                "num_ooms": 0}

    def reset(device=None):
        if not state["init"]:
            raise RuntimeError(f"Invalid device argument {torch.device(device).index}: "
                               "did you call init?")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: state.update(init=True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.update(init=True) or 0)
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", stats)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    m = MemoryMeter("cuda:1", nvml=False)
    assert m.available and m.device == torch.device("cuda", 1)
    with m.window("a") as out:
        pass
    assert out[0].peak_allocated_gib * GIB == 3 * MIB


def test_cpu_device_is_unavailable():
    m = MemoryMeter("cpu")
    assert not m.available and "exist only for CUDA" in m.unavailable
    with m.window("a") as out:
        with m.window("b"):
            pass
    w = out[0]
    assert w.peak_allocated_gib is None and w.peak_reserved_gib is None
    assert w.oom_count is None and "CUDA" in w.unavailable
    assert m.peak_since_start() is None and m.oom_count() is None
    with pytest.raises(RuntimeError, match="unavailable"):
        m.start_history()
    m.begin("x")
    with pytest.raises(ValueError, match="innermost"):
        m.end("y")


def test_snapshot_written_atomically(tmp_path, fake):
    m = MemoryMeter("cuda", backend=fake)
    with pytest.raises(RuntimeError, match="start_history"):
        m.dump_snapshot(str(tmp_path / "s.pickle"))
    with pytest.raises(ValueError, match="max_entries"):
        m.start_history(0)
    m.start_history(1000)
    assert fake.history == 1000
    path = m.dump_snapshot(str(tmp_path / "s.pickle"))
    assert open(path, "rb").read() == b"fake snapshot"
    assert os.listdir(tmp_path) == ["s.pickle"]  # no temporary left behind
    m.close()
    assert fake.history is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_nested_peaks(tmp_path):
    dev = torch.device("cuda")
    m = MemoryMeter(dev)
    m.begin("outer")
    a = torch.empty(256 * MIB, dtype=torch.uint8, device=dev)
    del a
    m.begin("inner")
    b = torch.empty(16 * MIB, dtype=torch.uint8, device=dev)
    inner = m.end("inner")
    del b
    outer = m.end("outer", nvml=True)
    assert 16 * MIB <= inner.peak_allocated_gib * GIB < 64 * MIB
    assert outer.peak_allocated_gib * GIB >= 256 * MIB
    assert outer.peak_reserved_gib >= outer.peak_allocated_gib
    assert outer.nvml_used_gib is None or outer.nvml_used_gib > 0
    m.start_history(1000)
    torch.empty(MIB, device=dev)
    m.dump_snapshot(str(tmp_path / "snap.pickle"))
    m.close()
    assert os.path.getsize(tmp_path / "snap.pickle") > 0


def test_tensor_bytes_meter_counts_new_storages_until_freed():
    import torch

    from profiling.tensor_bytes import TensorBytesMeter
    before = torch.ones(1000)  # exists before the meter: never counted, nor its in-place updates
    with TensorBytesMeter() as m:
        a = torch.zeros(1000)  # 4000 bytes
        assert m.current == 4000
        v = a.view(10, 100)  # a view shares the storage
        before.mul_(2)
        assert m.current == 4000
        b = a.double() + 1  # a temporary (8000) and the result (8000)
        assert m.current == 4000 + 8000 and m.peak == 4000 + 16000
        del a, v
        assert m.current == 8000  # a's storage is freed with its last view
        with m.paused():
            c = torch.empty(10_000)  # not counted
        assert m.current == 8000
        del b, c
        assert m.current == 0 and m.peak == 20000
