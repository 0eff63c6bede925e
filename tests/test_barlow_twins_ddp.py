"""Distributed Barlow Twins loss: 2 CPU processes on gloo against the single-process reference.

The loss and both gradients on every rank must equal the single-process values on the
concatenation of the ranks' batches (rank order); the gradient each rank gets is that of the
global loss with respect to its own rows. The workers run the kernels on CPU tensors under
Triton's interpreter (set in their environment before they import triton), on any machine.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import assert_close, rel_err

WORLD = 2
N_LOCAL, D = 21, 37  # odd sizes: ragged tiles on every rank and in the gathered batch
LAMBD, SCALE = 0.02, 0.5


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    z1 = torch.randn(WORLD * N_LOCAL, D, generator=g, dtype=torch.float64) * 1.3 + 0.2
    z2 = 0.6 * z1 + 0.8 * torch.randn(WORLD * N_LOCAL, D, generator=g, dtype=torch.float64)
    return z1.to(dtype), z2.to(dtype)


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1, "blas")
    except ImportError:  # pragma: no cover
        pass
    from kernels.barlow_twins import barlow_twins_loss  # imports triton: TRITON_INTERPRET is set

    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank,
                            world_size=WORLD)
    try:
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        z1, z2 = _batch(torch.float32)
        out = {}
        for method in ("gram", "cross"):
            a = z1[rows].clone().requires_grad_()
            b = z2[rows].clone().requires_grad_()
            loss = barlow_twins_loss(a, b, LAMBD, SCALE, method=method)  # default group: world
            loss.backward()
            out[method] = (loss.detach(), a.grad, b.grad)
        # a group of world size 1 behaves as a single process on the local batch
        singles = [dist.new_group([r]) for r in range(WORLD)]
        out["local"] = barlow_twins_loss(z1[rows], z2[rows], LAMBD, SCALE, method="gram",
                                         group=singles[rank])
        # ... with cuda_graphs=True too (a capture backend that works on CPU tensors): the
        # graphed path once ran its launchers on the default (world) group
        import kernels.barlow_twins as bt
        from test_barlow_twins_graphs import FakeGraphs
        bt._GRAPHS.backend = FakeGraphs()
        out["local_graphs"] = [barlow_twins_loss(
            z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_(), LAMBD, SCALE,
            method="gram", group=singles[rank], cuda_graphs=True).detach() for _ in range(3)]
        # one row per rank: the batch statistics are over the global batch of WORLD rows
        out["one_row"] = barlow_twins_loss(z1[rank:rank + 1], z2[rank:rank + 1], LAMBD, SCALE)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process_on_concatenated_batch(tmp_path, monkeypatch):
    from kernels.barlow_twins import barlow_twins_loss_ref

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned workers only
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    z1, z2 = _batch(torch.float32)
    x = z1.double().requires_grad_()
    y = z2.double().requires_grad_()
    ref = barlow_twins_loss_ref(x, y, LAMBD, SCALE)
    g1, g2 = torch.autograd.grad(ref, (x, y))
    scale1, scale2 = g1.abs().max().item(), g2.abs().max().item()
    for method in ("gram", "cross"):
        for r in range(WORLD):  # the same global loss on every rank
            assert rel_err(results[r][method][0], ref) <= 1e-5, (method, r)
        d1 = torch.cat([results[r][method][1] for r in range(WORLD)])
        d2 = torch.cat([results[r][method][2] for r in range(WORLD)])
        assert_close(d1, g1, rtol=1e-5, atol=1e-6 * scale1, name=f"{method} dz1")
        assert_close(d2, g2, rtol=1e-5, atol=1e-6 * scale2, name=f"{method} dz2")
    for r in range(WORLD):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        local_ref = barlow_twins_loss_ref(z1[rows].double(), z2[rows].double(), LAMBD, SCALE)
        assert rel_err(results[r]["local"], local_ref) <= 1e-5
        assert rel_err(results[r]["local"], ref) > 1e-2  # and it is not the global loss
        for loss in results[r]["local_graphs"]:
            assert rel_err(loss, local_ref) <= 1e-5
        two = barlow_twins_loss_ref(z1[:WORLD].double(), z2[:WORLD].double(), LAMBD, SCALE)
        assert rel_err(results[r]["one_row"], two) <= 1e-5
