"""Multi-process training on CPU (gloo): the loss is the global-batch loss, and the gradient the
parameters receive after DDP's averaging is the gradient of one process on the concatenated batch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import kernels

WORLD = 2
LOCAL = 4  # rows per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_stage_parts():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    head = nn.Linear(5, 7, bias=False)
    x1 = torch.randn(WORLD * LOCAL, 6)
    x2 = x1 + 0.3 * torch.randn(WORLD * LOCAL, 6)
    return block, head, x1, x2


def _worker(rank: int, store_path: str, use_kernel: bool, out_dir: str,
            checkpointed: bool = False) -> None:
    torch.set_num_threads(1)
    # A FileStore, not a TCPStore hosted by rank 0: with TCP, rank 0 could exit while rank 1 was
    # still talking to its store thread and die with SIGABRT ("terminate called without an
    # active exception"), failing CI about one run in three on a busy 2-core machine.
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank,
                            world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from blockwise.trainer import BarlowTwinsLoss, Stage

        # one process, whole batch (the reference loss: no collective inside)
        block, head, x1, x2 = _tiny_stage_parts()
        single = Stage(0, block, head, BarlowTwinsLoss(0.0051, 0.5, fused=False, world_size=1), 0.0)
        _, _, loss_single = single(x1, x2)
        loss_single.backward()
        expected = {n: p.grad.clone() for n, p in single.named_parameters()}

        # WORLD processes, each with its rows, exactly as Trainer.train_step does it
        block, head, _, _ = _tiny_stage_parts()
        loss_fn = BarlowTwinsLoss(0.0051, 0.5, fused=use_kernel, world_size=WORLD)
        stage = DDP(Stage(0, block, head, loss_fn, 0.0, checkpointed=checkpointed))
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        _, _, loss = stage(x1[rows], x2[rows])
        (loss * loss_fn.grad_factor).backward()
        got = {n[len("module."):]: p.grad.clone() for n, p in stage.named_parameters()}
        torch.save({"loss": loss.detach(), "loss_single": loss_single.detach(), "got": got,
                    "expected": expected, "uses_kernel": loss_fn.use_kernel,
                    "factor": loss_fn.grad_factor}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_kernel,checkpointed", [
    (False, False),
    (False, True),  # --activation-checkpointing under DDP: the recomputation in backward
    pytest.param(True, False, marks=pytest.mark.skipif(
        not kernels.triton_can_run_on(torch.device("cpu")),
        reason="kernels.barlow_twins_loss cannot run on this CPU (needs TRITON_INTERPRET=1)")),
])
def test_ddp_gradient_equals_single_process_on_concatenated_batch(tmp_path, use_kernel,
                                                                  checkpointed):
    mp.spawn(_worker, args=(str(tmp_path / "store"), use_kernel, str(tmp_path), checkpointed),
             nprocs=WORLD, join=True)
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["uses_kernel"] == use_kernel
        assert r["factor"] == (WORLD if use_kernel else 1)
        torch.testing.assert_close(r["loss"], r["loss_single"], rtol=1e-5, atol=1e-6)
        assert r["got"].keys() == r["expected"].keys()
        for name in r["expected"]:
            torch.testing.assert_close(r["got"][name], r["expected"][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


# The CLI, with the process group's timeout cut to 3 s (a stand-in for NCCL's 10 minutes) and
# rank 0's probe made to last longer than that: no rank may still wait in a collective then.
_SLOW_PROBE_CLI = """
import datetime, sys, time
import torch.distributed as dist
_init = dist.init_process_group
dist.init_process_group = lambda *a, **k: _init(*a, timeout=datetime.timedelta(seconds=3), **k)
from blockwise import train
_probe = train.run_probe
def slow_probe(*a, **k):
    time.sleep(6)
    return _probe(*a, **k)
train.run_probe = slow_probe
sys.exit(train.main())
"""


def test_torchrun_two_processes_end_to_end(tmp_path):
    out = tmp_path / "run"
    cli = tmp_path / "slow_probe_cli.py"
    cli.write_text(_SLOW_PROBE_CLI)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(cli), "--device", "cpu",
           "--dataset", "synthetic", "--image-size", "8", "--synthetic-size", "32",
           "--batch-size", "8", "--projector", "16-16", "--epochs", "1", "--workers", "0",
           "--probe-epochs", "2", "--log-interval", "1", "--mode", "simultaneous",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 4  # 4 steps x 4 blocks, written by rank 0 only
    assert proc.stdout.count("linear probe top-1") == 1  # only rank 0 prints
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe["top1"]) == {"block1", "block2", "block3", "block4"}
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["state"]["step"] == 4


def _torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "blockwise.train"] + [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_resume_with_noise_is_exact(tmp_path):
    """Each rank draws its own noise: a resume must restore each rank's generator, not rank 0's
    on every rank (which made the resumed run drift by about 1e-2)."""
    base = ["--device", "cpu", "--dataset", "synthetic", "--image-size", "8", "--synthetic-size",
            "32", "--batch-size", "8", "--projector", "16-16", "--epochs", "2", "--workers", "0",
            "--probe-epochs", "0", "--mode", "simultaneous", "--noise-std", "0.5",
            "--optimizer", "sgd"]
    _torchrun(base + ["--out", tmp_path / "full"])
    _torchrun(base + ["--out", tmp_path / "part", "--max-steps", "3"])
    _torchrun(["--resume", tmp_path / "part"])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert full["state"]["step"] == part["state"]["step"] == 8
    assert len(part["rng_per_rank"]) == 2
    for key, v in full["blocks"].items():
        if v.is_floating_point():
            assert torch.equal(v, part["blocks"][key]), key
    for h_full, h_part in zip(full["heads"], part["heads"]):
        for key, v in h_full.items():
            if v.is_floating_point():
                assert torch.equal(v, h_part[key]), key
