"""ExpanderPool under DDP (SyncBatchNorm child): 2 gloo CPU processes against one process on the
concatenated batch. Outputs and input gradients of each rank's rows, the running statistics, and
the sum over ranks of the parameter gradients must equal the single-process values."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from helpers import rel_err

WORLD = 2
N_LOCAL, CIN, COUT, H, W = 3, 5, 12, 4, 3
POOLS = ("avg", "sqrt")


def _setup(pool):
    from blockwise.expander import ExpanderPool
    torch.manual_seed(7)
    ep = ExpanderPool(CIN, COUT, pool, chunk_bytes=2 * COUT * H * W * 8).double()
    with torch.no_grad():
        ep.bn.weight.uniform_(0.5, 1.5)
        ep.bn.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(WORLD * N_LOCAL, CIN, H, W, generator=g, dtype=torch.float64) + 0.4
    gp = torch.randn(WORLD * N_LOCAL, COUT, generator=g, dtype=torch.float64)
    return ep, x, gp


def _step(ep, x, gp):
    x = x.clone().requires_grad_(True)
    out = None
    for _ in range(2):  # two steps: running statistics updated twice
        ep.zero_grad()
        x.grad = None
        out = ep(x)
        out.backward(gp)
    return {"out": out.detach(), "dx": x.grad, "dw": ep.conv.weight.grad, "dg": ep.bn.weight.grad,
            "db": ep.bn.bias.grad, "rm": ep.bn.running_mean.clone(), "rv": ep.bn.running_var.clone()}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank,
                            world_size=WORLD)
    try:
        for pool in POOLS:
            ep, x, gp = _setup(pool)
            ep = nn.SyncBatchNorm.convert_sync_batchnorm(ep)
            assert isinstance(ep.bn, nn.SyncBatchNorm)
            rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            torch.save(_step(ep, x[rows], gp[rows]), os.path.join(out_dir, f"{pool}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("expander_ddp")
    mp.spawn(_worker, args=(str(path / "store"), str(path)), nprocs=WORLD, join=True)
    return path


@pytest.mark.parametrize("pool", POOLS)
def test_ddp_equals_single_process(ddp_results, pool):
    ep, x, gp = _setup(pool)
    ref = _step(ep, x, gp)
    got = [torch.load(ddp_results / f"{pool}{r}.pt") for r in range(WORLD)]
    errs = {
        "out": rel_err(torch.cat([g["out"] for g in got]), ref["out"]),
        "dx": rel_err(torch.cat([g["dx"] for g in got]), ref["dx"]),
    }
    for k in ("dw", "dg", "db"):
        errs[k] = rel_err(sum(g[k] for g in got), ref[k])
    for k in ("rm", "rv"):
        errs[k] = max(rel_err(g[k], ref[k]) for g in got)
    assert max(errs.values()) < 1e-10, errs
    # without the all-reduce the local statistics differ: the comparison can fail
    ep2, _, _ = _setup(pool)
    local = _step(ep2, x[:N_LOCAL], gp[:N_LOCAL])
    assert rel_err(local["out"], ref["out"][:N_LOCAL]) > 1e-6
