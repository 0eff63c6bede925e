"""One training step per mode (ResNet-50, 224 px, bf16), with peak memory and energy.

Times ``Trainer.train_step`` on a batch already on the GPU (pytest-benchmark, synchronized in
the timed callable), torch and fused kernels side by side. Sequential mode is one step of
block k after blocks 1..k-1 are frozen. ``extra_info`` holds the peak allocated memory (the
trainer's own per-step peak), and the GPU energy of ``ENERGY_STEPS`` steps measured in one
EnergyMeter window (NVML counter, or power sampling where the counter is not supported).

    pytest tests/benchmarks/test_bench_train_step.py --benchmark-only --benchmark-json ts.json
    python -m profiling bench ts.json --baseline e2e     # per mode, ratios to e2e
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BATCH = 128  # image pairs per step
ENERGY_STEPS = 10
CASES = [("e2e", 1), ("simultaneous", 1), ("sequential", 1), ("sequential", 2),
         ("sequential", 3), ("sequential", 4)]


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("mode, block", CASES,
                         ids=[m if m != "sequential" else f"sequential-block{b}" for m, b in CASES])
def test_bench_train_step(benchmark, tmp_path, mode, block, fused):
    from blockwise.config import Config
    from blockwise.trainer import Trainer
    from profiling import EnergyMeter

    cfg = Config(mode=mode, dataset="synthetic", arch="resnet50", image_size=224,
                 batch_size=BATCH, synthetic_size=BATCH, projector="8192-8192-8192",
                 fused=fused, device="cuda", precision="bf16", probe_epochs=0, workers=0,
                 checkpoint=False, out=str(tmp_path))
    trainer = Trainer(cfg, str(tmp_path), log=lambda line: None)
    for b in range(block - 1):  # freeze the blocks before this one, as Trainer.fit does
        trainer._finish_block(b)
        trainer._begin_block(b + 1)
    dev = trainer.device
    shape = (BATCH, 3, 224, 224)
    x1 = torch.randn(shape, device=dev).contiguous(memory_format=trainer.memory_format)
    x2 = torch.randn(shape, device=dev).contiguous(memory_format=trainer.memory_format)

    def step():
        trainer.train_step(x1, x2, trainer.base_lr, block - 1)
        torch.cuda.synchronize(dev)

    for _ in range(3):  # cudnn benchmark, Triton autotuning, optimizer state
        step()
    trainer.peaks.clear()
    meter = EnergyMeter([dev], sample_interval_s=0.02)
    meter.begin("steps")
    for _ in range(ENERGY_STEPS):
        step()
    e = meter.end("steps")
    meter.close()
    label = mode if mode != "sequential" else f"sequential-block{block}"
    benchmark.group = f"train step resnet50 224px bf16 batch {BATCH} {'fused' if fused else 'torch'}"
    benchmark.extra_info.update({
        "provider": label, "mode": mode, "block": block if mode == "sequential" else None, "fused": fused,
        "batch_image_pairs": BATCH, "gpu": torch.cuda.get_device_name(dev),
        "peak_allocated_gib": max(trainer.peaks.values()) if trainer.peaks else None,
        "energy_per_step_j": None if e.energy_j is None else e.energy_j / ENERGY_STEPS,
        "energy_per_image_j": None if e.energy_j is None else e.energy_j / (ENERGY_STEPS * BATCH),
        "mean_power_w": e.mean_power_w, "energy_method": e.method,
        "energy_unavailable": e.gpu_unavailable,
    })
    benchmark.pedantic(step, rounds=10, warmup_rounds=1, iterations=1)
    assert benchmark.extra_info["peak_allocated_gib"] > 0
    assert e.energy_j is None or e.energy_j > 0
    trainer.close()
