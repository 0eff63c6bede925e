"""One training step per mode, with peak memory and energy.

On CUDA: ResNet-50, 224 px, bf16, batch 128, projector 8192-8192-8192 (the issue's setting at
half the batch), torch and fused kernels side by side. Without CUDA: a small CPU setting
(ResNet-18 small stem, 32 px, fp32, batch 16, projector 256-256-256; torch only, the kernels
need a GPU) that times the same code path, so that ``pytest --benchmark-only`` measures
something on any machine and a plain ``pytest`` (each benchmark run once) checks this file in CI.

Times ``Trainer.train_step`` on a batch already on the device (pytest-benchmark, synchronized in
the timed callable). Sequential mode is one step of block k after blocks 1..k-1 are frozen.
``extra_info`` holds the peak allocated memory (the trainer's own per-step peak; CUDA only) and
the GPU energy of ``energy_steps`` steps measured in one EnergyMeter window (NVML counter, or
power sampling where the counter is not supported), or null with the reason.

    pytest tests/benchmarks/test_bench_train_step.py --benchmark-only --benchmark-json ts.json
    python -m profiling bench ts.json --baseline e2e     # per mode, ratios to e2e
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
if CUDA:
    SETTING = dict(arch="resnet50", image_size=224, batch_size=128, projector="8192-8192-8192",
                   device="cuda", precision="bf16")
    FUSED = [False, True]
    ENERGY_STEPS, ROUNDS = 10, 10
else:
    SETTING = dict(arch="resnet18", image_size=32, batch_size=16, projector="256-256-256",
                   device="cpu", precision="fp32")
    FUSED = [False]
    ENERGY_STEPS, ROUNDS = 2, 5
BATCH = SETTING["batch_size"]  # image pairs per step
CASES = [("e2e", 1), ("simultaneous", 1), ("sequential", 1), ("sequential", 2),
         ("sequential", 3), ("sequential", 4)]


@pytest.mark.parametrize("fused", FUSED, ids=["torch", "fused"][:len(FUSED)])
@pytest.mark.parametrize("mode, block", CASES,
                         ids=[m if m != "sequential" else f"sequential-block{b}" for m, b in CASES])
def test_bench_train_step(benchmark, tmp_path, mode, block, fused):
    from blockwise.config import Config
    from blockwise.trainer import Trainer
    from profiling import EnergyMeter

    cfg = Config(mode=mode, dataset="synthetic", synthetic_size=BATCH, fused=fused,
                 probe_epochs=0, workers=0, checkpoint=False, out=str(tmp_path), **SETTING)
    trainer = Trainer(cfg, str(tmp_path), log=lambda line: None)
    for b in range(block - 1):  # freeze the blocks before this one, as Trainer.fit does
        trainer._finish_block(b)
        trainer._begin_block(b + 1)
    dev = trainer.device
    size = SETTING["image_size"]
    shape = (BATCH, 3, size, size)
    x1 = torch.randn(shape, device=dev).contiguous(memory_format=trainer.memory_format)
    x2 = torch.randn(shape, device=dev).contiguous(memory_format=trainer.memory_format)

    def step():
        trainer.train_step(x1, x2, trainer.base_lr, block - 1)
        if CUDA:
            torch.cuda.synchronize(dev)

    for _ in range(3):  # cudnn benchmark, Triton autotuning, optimizer state
        step()
    trainer.peaks.clear()
    meter = EnergyMeter([dev] if CUDA else [], sample_interval_s=0.02)
    meter.begin("steps")
    for _ in range(ENERGY_STEPS):
        step()
    e = meter.end("steps")
    meter.close()
    label = mode if mode != "sequential" else f"sequential-block{block}"
    benchmark.group = (f"train step {cfg.arch} {SETTING['image_size']}px {cfg.precision} batch "
                       f"{BATCH} {'fused' if fused else 'torch'}" + ("" if CUDA else " (CPU)"))
    benchmark.extra_info.update({
        "provider": label, "mode": mode, "block": block if mode == "sequential" else None, "fused": fused,
        "batch_image_pairs": BATCH, "gpu": torch.cuda.get_device_name(dev) if CUDA else None,
        "peak_allocated_gib": max(trainer.peaks.values()) if trainer.peaks else None,
        "peak_unavailable": None if CUDA else "CPU run: peak memory is measured on CUDA only",
        "energy_per_step_j": None if e.energy_j is None else e.energy_j / ENERGY_STEPS,
        "energy_per_image_j": None if e.energy_j is None else e.energy_j / (ENERGY_STEPS * BATCH),
        "mean_power_w": e.mean_power_w, "energy_method": e.method,
        "energy_unavailable": e.gpu_unavailable,
    })
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if CUDA:
        assert benchmark.extra_info["peak_allocated_gib"] > 0
        assert e.energy_j is None or e.energy_j > 0
    else:  # nothing unmeasured reads as a figure
        assert benchmark.extra_info["peak_allocated_gib"] is None
        assert e.energy_j is None and e.gpu_unavailable
    trainer.close()
