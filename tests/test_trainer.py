"""blockwise.trainer: the three modes, gradient isolation, memory release, resume, non-finite loss.

Tiny settings throughout (ResNet-18, 8x8 synthetic images, batch 8, projector 16-16): each run
is a fraction of a second per step on a CPU.
"""
from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch

from blockwise import models
from blockwise.checkpoint import atomic_torch_save, load_checkpoint
from blockwise.config import Config
from blockwise.trainer import NonFiniteLoss, Trainer, initial_blocks
from profiling.tensor_bytes import TensorBytesMeter


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy CI machine (a 2-thread
    OpenMP barrier waits for a descheduled thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, **kw) -> Config:
    values = dict(dataset="synthetic", image_size=8, synthetic_size=32, num_classes=4,
                  batch_size=8, projector="16-16", epochs=2, workers=0, device="cpu",
                  probe_epochs=0, log_interval=1, out=str(tmp_path))
    values.update(kw)
    return Config(**values)


def make(tmp_path, **kw) -> Trainer:
    cfg = tiny(tmp_path, **kw)
    return Trainer(cfg, cfg.out, log=lambda line: None)


def params_of(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def assert_same_state(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs"


@pytest.mark.parametrize("mode", ["e2e", "simultaneous", "sequential"])
def test_each_mode_trains(tmp_path, mode):
    kw = dict(steps_per_block=2) if mode == "sequential" else {}
    tr = make(tmp_path, mode=mode, **kw)
    before = params_of(tr.blocks)
    summary = tr.fit()
    expected = 8 if mode == "sequential" else 8  # 4 blocks x 2 steps, or 2 epochs x 4 steps
    assert tr.state.step == expected and summary["steps"] == expected
    after = params_of(tr.blocks)
    for k in range(4):  # every block was trained (e2e: through the single head)
        changed = any(not torch.equal(before[n], after[n]) for n in before if n.startswith(f"{k}."))
        assert changed, f"{mode}: block {k + 1} did not change"
    records = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    blocks_logged = {r["block"] for r in records}
    assert blocks_logged == ({4} if mode == "e2e" else {1, 2, 3, 4})
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert {"step", "block", "loss", "lr", "ms_per_step", "peak_memory_gib"} <= records[0].keys()
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["state"]["step"] == expected
    if mode == "sequential":  # every head released at the end
        assert ckpt["heads"] == [None] * 4 and tr.heads == [None] * 4


def _grad_owners(tr: Trainer):
    """Names of the blocks/heads that hold a gradient right now."""
    owners = set()
    for k, block in enumerate(tr.blocks):
        if any(p.grad is not None for p in block.parameters()):
            owners.add(f"block{k + 1}")
    for k, head in enumerate(tr.heads):
        if head is not None and any(p.grad is not None for p in head.parameters()):
            owners.add(f"head{k + 1}")
    return owners


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_no_gradient_crosses_blocks(tmp_path, mode):
    """When block k's optimizer steps (right after loss_k.backward()), only block k and head k
    hold gradients: loss_k reached no other block, and no earlier block's gradient lingers."""
    kw = dict(steps_per_block=2) if mode == "sequential" else {}
    tr = make(tmp_path, mode=mode, max_steps=6, **kw)
    seen = []

    def hook_for(k):
        def hook(optimizer, args, kwargs):
            owners = _grad_owners(tr)
            seen.append((k, owners))
            block = tr.blocks[k]
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()), \
                f"block {k + 1} got no gradient from its own loss"
        return hook

    for k in range(4):
        if tr.optimizers[k] is not None:
            tr.optimizers[k].register_step_pre_hook(hook_for(k))
    if mode == "sequential":  # optimizers of later blocks are built when their block starts
        start = tr._start_stage

        def start_and_hook(k):
            start(k)
            tr.optimizers[k].register_step_pre_hook(hook_for(k))
        tr._start_stage = start_and_hook
    tr.fit()
    assert len(seen) == (24 if mode == "simultaneous" else 6)
    for k, owners in seen:
        assert owners == {f"block{k + 1}", f"head{k + 1}"}, f"at block {k + 1}'s step: {owners}"
    if mode == "sequential":
        assert [k for k, _ in seen] == [0, 0, 1, 1, 2, 2]


def test_sequential_frozen_blocks_do_not_change(tmp_path):
    tr = make(tmp_path, mode="sequential", steps_per_block=2, noise_std=0.25)
    snapshots = {}
    finish = tr._finish_block

    def finish_and_snapshot(b):
        finish(b)
        snapshots[b] = params_of(tr.blocks)  # parameters and BN running statistics
    tr._finish_block = finish_and_snapshot
    initial = params_of(tr.blocks)
    tr.fit()
    final = params_of(tr.blocks)
    for b in range(4):
        block = {n: v for n, v in final.items() if n.startswith(f"{b}.")}
        # frozen from the end of its own phase on: the final weights are those it finished with
        assert_same_state(block, {n: snapshots[b][n] for n in block}, f"block {b + 1} after its phase")
        # not touched before its phase either
        if b > 0:
            assert_same_state({n: snapshots[b - 1][n] for n in block},
                              {n: initial[n] for n in block}, f"block {b + 1} before its phase")
        assert not any(torch.equal(final[n], initial[n]) for n in block if n.endswith("weight")
                       and "bn" not in n and "downsample.1" not in n), f"block {b + 1} never trained"
    assert all(not p.requires_grad for p in tr.blocks.parameters())


class _SavedTensorTracker:
    """saved_tensors_hooks: every tensor autograd saves is wrapped in a holder we keep a weak
    reference to; a dead holder means autograd released that saved tensor."""

    class Holder:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self):
        self.refs = []

    def pack(self, t):
        h = self.Holder(t)
        self.refs.append(weakref.ref(h))
        return h

    @staticmethod
    def unpack(h):
        return h.t

    def alive(self, refs):
        return sum(r() is not None for r in refs)


@pytest.mark.parametrize("mode", ["simultaneous", "e2e"])
def test_block_graph_released_before_next_block_forward(tmp_path, mode):
    """Simultaneous: when block k+1 starts its forward, nothing block k saved for backward is
    alive. The same probe on e2e (which must keep them) proves the probe can see them."""
    tr = make(tmp_path, mode=mode)
    tracker = _SavedTensorTracker()
    alive_at_start = {}

    def pre_hook(k):
        def hook(module, inputs):
            if module.training:  # the first call (view 1) only
                alive_at_start.setdefault(k, (len(tracker.refs), tracker.alive(tracker.refs)))
        return hook

    handles = [tr.blocks[k].register_forward_pre_hook(pre_hook(k)) for k in range(4)]
    x1, x2 = torch.randn(2, 8, 3, 8, 8).unbind(0)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        tr.train_step(x1, x2, lr=0.1)
    for h in handles:
        h.remove()
    for k in (1, 2, 3):  # at the first forward of block k+1 (view 1)
        saved, alive = alive_at_start[k]
        assert saved > 0
        if mode == "simultaneous":
            assert alive == 0, f"{alive} tensors saved by blocks 1..{k} alive at block {k + 1}'s forward"
        else:
            assert alive == saved, "e2e should keep every saved tensor until its backward"
    assert tracker.alive(tracker.refs) == 0  # everything released after the step


def test_sequential_releases_finished_head_and_optimizer(tmp_path):
    tr = make(tmp_path, mode="sequential", steps_per_block=2, max_steps=3)
    head0, opt0 = weakref.ref(tr.heads[0]), weakref.ref(tr.optimizers[0])
    tr.train_step(*torch.randn(2, 8, 3, 8, 8).unbind(0), lr=0.1, b=0)
    mu = [weakref.ref(s["mu"]) for s in tr.optimizers[0].state.values()]
    assert mu and all(r() is not None for r in mu)
    assert tr.heads[1] is None  # later heads are not built before their block starts
    tr.fit()  # finishes block 1 after its 2nd step, trains 1 step of block 2
    gc.collect()
    assert tr.state.block == 1 and tr.heads[1] is not None
    assert head0() is None, "block 1's head is still alive after its phase"
    assert opt0() is None, "block 1's optimizer is still alive after its phase"
    assert all(r() is None for r in mu), "block 1's optimizer state is still alive"


@pytest.mark.parametrize("mode,kw", [
    ("simultaneous", dict(noise_std=0.25)),
    ("sequential", dict(steps_per_block=3)),
    ("e2e", dict()),
])
def test_resume_equals_uninterrupted(tmp_path, mode, kw):
    """Stop mid-epoch, resume (another worker count): the same bits as one uninterrupted run."""
    a = make(tmp_path / "a", mode=mode, **kw)
    a.fit()
    b = make(tmp_path / "b", mode=mode, max_steps=5, **kw)
    b.fit()
    assert b.state.step == 5 and b.state.batch == (2 if mode == "sequential" else 1)  # mid-epoch
    c = make(tmp_path / "b", mode=mode, resume=str(tmp_path / "b"), workers=1, **kw)
    assert c.state.step == 5
    c.fit()
    assert c.state.step == a.state.step
    assert_same_state(params_of(a.blocks), params_of(c.blocks), "blocks")
    for ha, hc in zip(a.heads, c.heads):
        assert (ha is None) == (hc is None)
        if ha is not None:
            assert_same_state(params_of(ha), params_of(hc), "head")
    la = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    lc = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    key = lambda r: (r["step"], r["block"], r["loss"], r["lr"])  # noqa: E731
    assert [key(r) for r in la] == [key(r) for r in lc]


def test_resume_keeps_the_metrics_and_clock_of_steps_before_the_checkpoint(tmp_path):
    """Steps between the last log line and an epoch-end checkpoint are logged before it is
    written (a resume does not redo them), and time_s continues across the resume."""
    kw = dict(mode="simultaneous", log_interval=100)  # no interval line: only epoch ends, the end
    a = make(tmp_path / "a", **kw)
    a.fit()
    b = make(tmp_path / "b", **kw)
    step = b.train_step

    def killed_in_step_6(*args, **kwargs):  # a kill after step 5: the checkpoint is step 4's
        if b.state.step == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    b.train_step = killed_in_step_6
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    ckpt = load_checkpoint(str(tmp_path / "b"))
    assert 0 < ckpt["state"]["time_s"] < 1000
    ckpt["state"]["time_s"] = 1000.0  # as if the first session had trained for 1000 s
    atomic_torch_save(ckpt, str(tmp_path / "b" / "checkpoint.pt"))
    c = make(tmp_path / "b", resume=str(tmp_path / "b"), **kw)
    summary = c.fit()
    la = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    lc = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    key = lambda r: (r["step"], r["block"], r["loss"])  # noqa: E731
    assert [key(r) for r in la] == [key(r) for r in lc]
    assert {r["step"] for r in lc} == {4, 8}  # each epoch's steps, the first epoch's kept
    first, second = [[r["time_s"] for r in lc if r["step"] == s] for s in (4, 8)]
    assert 0 < max(first) < 1000 < min(second), "time_s restarted at the resume"
    assert summary["run_time_s"] == pytest.approx(1000 + summary["time_s"])


@pytest.mark.parametrize("mode,kw", [("simultaneous", dict(max_steps=1)),
                                     ("sequential", dict(steps_per_block=1))])
def test_metrics_peak_memory_is_the_records_block(tmp_path, mode, kw, monkeypatch):
    """Each metrics.jsonl record gives its own block's peak (CUDA: one window per block), not
    the largest block's peak so far (which every record carried). CPU: the windows faked."""
    tr = make(tmp_path, mode=mode, **kw)
    fake = {"block1": 4.0, "block2": 3.0, "block3": 2.0, "block4": 1.0}
    monkeypatch.setattr(tr, "_mem_end", lambda key: tr.peaks.__setitem__(key, fake[key]))
    monkeypatch.setattr(tr, "peak_memory_gib",
                        lambda: max(tr.peaks.values()) if tr.peaks else None)
    tr.fit()
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert sorted(r["block"] for r in records) == [1, 2, 3, 4]
    for r in records:
        assert r["peak_memory_gib"] == fake[f"block{r['block']}"], r


def test_summary_loader_capacity_counts_every_process(tmp_path):
    """Under torchrun every process runs its own loader on its share of each global batch: the
    capacity set beside the job's pairs/s is the job's (it was one process's)."""
    from blockwise.trainer import DistInfo
    tr = make(tmp_path, max_steps=1)
    tr.fit()
    one = tr.summary()["loader_capacity_pairs_per_s"]
    tr.dist = DistInfo(rank=0, world_size=4)  # the same per-process figures, 4 processes
    assert tr.summary()["loader_capacity_pairs_per_s"] == pytest.approx(4 * one)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = make(tmp_path, mode="simultaneous", log_interval=100)
    loss_fn, calls = tr.loss_fn, {"n": 0}

    def poisoned(z1, z2):
        calls["n"] += 1
        loss = loss_fn(z1, z2)
        # step 6 (2nd step of epoch 2), block 3
        return loss * float("nan") if calls["n"] == 5 * 4 + 3 else loss
    for stage in tr.stages:
        stage.loss_fn = poisoned
    with pytest.raises(NonFiniteLoss) as err:
        tr.fit()
    msg = str(err.value)
    assert "step 6" in msg and "block 3" in msg and "checkpoint.pt (step 4)" in msg
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["state"]["step"] == 4  # the end of epoch 1: written before the NaN
    assert all(torch.isfinite(v).all() for v in ckpt["blocks"].values() if v.is_floating_point())


def test_control_is_the_initial_weights(tmp_path):
    tr = make(tmp_path)
    assert_same_state(params_of(tr.blocks), params_of(initial_blocks(tr.cfg)), "initial blocks")


def test_warmup_cosine_schedule_in_the_loop(tmp_path):
    tr = make(tmp_path, epochs=4, warmup_epochs=1.0)  # 16 steps, 4 warm-up
    tr.fit()
    lrs = [json.loads(l)["lr"] for l in open(tmp_path / "metrics.jsonl") if '"block": 1' in l]
    base = tr.base_lr
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.75 * base)
    assert lrs[4] == pytest.approx(base)  # end of warm-up
    assert all(x > y for x, y in zip(lrs[4:], lrs[5:]))  # then cosine decay
    assert lrs[-1] < 0.05 * base


class _PeakSavedBytes:
    """Peak bytes of tensors autograd holds for backward (unique storages), over a step."""

    def __init__(self, exclude=()):
        self.live = {}
        self.peak = 0
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}  # parameters

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude:
            return t
        holder = _SavedTensorTracker.Holder(t)
        self.live[key] = (weakref.ref(holder), t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.current())
        return holder

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _SavedTensorTracker.Holder) else h

    def current(self):
        self.live = {k: v for k, v in self.live.items() if v[0]() is not None}
        return sum(n for _, n in self.live.values())


def _grads_at_steps(tr):
    grads = {}
    for k, opt in enumerate(tr.optimizers):
        if opt is not None:
            def hook(optimizer, args, kwargs, k=k):
                grads[k] = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]
            opt.register_step_pre_hook(hook)
    return grads


@pytest.mark.parametrize("mode", ["simultaneous", "e2e", "sequential"])
def test_split_views_gives_the_joint_gradient_with_half_the_activations(tmp_path, mode):
    kw = dict(steps_per_block=2) if mode == "sequential" else {}
    joint = make(tmp_path / "j", mode=mode, **kw)
    split = make(tmp_path / "s", mode=mode, split_views=True, **kw)
    g_joint, g_split = _grads_at_steps(joint), _grads_at_steps(split)
    x1, x2 = torch.randn(2, 8, 3, 8, 8).unbind(0)
    peaks = []
    for tr in (joint, split):
        params = [p for m in [tr.blocks] + [h for h in tr.heads if h is not None]
                  for p in m.parameters()]
        meter = _PeakSavedBytes(exclude=params)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            losses = tr.train_step(x1, x2, lr=0.1)
        peaks.append(meter.peak)
        if tr is joint:
            joint_losses = losses
    torch.testing.assert_close(losses, joint_losses, rtol=1e-6, atol=1e-6)
    assert g_joint.keys() == g_split.keys() and g_joint
    for k in g_joint:
        for a, b in zip(g_joint[k], g_split[k]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # BatchNorm running statistics: updated once per view, as in the joint step
    assert_same_state({n: v for n, v in params_of(joint.blocks).items() if "running" in n},
                      {n: v for n, v in params_of(split.blocks).items() if "running" in n},
                      "BN running statistics")
    assert peaks[1] < 0.6 * peaks[0], f"split views peak {peaks[1]} vs joint {peaks[0]} bytes"


@pytest.mark.parametrize("mode", ["simultaneous", "e2e"])
def test_split_views_with_noise_draws_the_joint_steps_noise(tmp_path, mode):
    """--noise-std > 0: each view gets the noise the joint step gives it, and the generator ends
    where the joint step leaves it (split views drew view 2's noise first: another trajectory,
    so a resume that switched --split-views on or off was not exact)."""
    joint = make(tmp_path / "j", mode=mode, noise_std=0.25)
    split = make(tmp_path / "s", mode=mode, noise_std=0.25, split_views=True)
    g_joint, g_split = _grads_at_steps(joint), _grads_at_steps(split)
    x1, x2 = torch.randn(2, 8, 3, 8, 8).unbind(0)
    losses, after = [], []
    for tr in (joint, split):
        torch.manual_seed(1)
        losses.append(tr.train_step(x1, x2, lr=0.1))
        after.append(torch.get_rng_state())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(after[0], after[1])
    for k in g_joint:
        for a, b in zip(g_joint[k], g_split[k]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["simultaneous", "e2e", "sequential"])
def test_activation_checkpointing_is_exact_and_keeps_a_fraction_of_the_activations(tmp_path, mode):
    kw = dict(steps_per_block=2, image_size=16) if mode == "sequential" else dict(image_size=16)
    plain = make(tmp_path / "p", mode=mode, **kw)
    ckpt = make(tmp_path / "c", mode=mode, activation_checkpointing=True, **kw)
    g_plain, g_ckpt = _grads_at_steps(plain), _grads_at_steps(ckpt)
    x1, x2 = torch.randn(2, 8, 3, 16, 16).unbind(0)
    losses = [tr.train_step(x1, x2, lr=0.1) for tr in (plain, ckpt)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert g_plain.keys() == g_ckpt.keys() and g_plain
    for k in g_plain:
        for a, b in zip(g_plain[k], g_ckpt[k]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # the recomputation in backward does not record its batch in BatchNorm a second time
    assert_same_state({n: v for n, v in params_of(plain.blocks).items() if "running" in n or "tracked" in n},
                      {n: v for n, v in params_of(ckpt.blocks).items() if "running" in n or "tracked" in n},
                      "BN running statistics")
    # what the graph keeps alive after the forward (activations): measured, not assumed
    held = []
    for tr in (plain, ckpt):
        module = tr.model if mode == "e2e" else tr.stages[0]
        meter = TensorBytesMeter()
        with meter, tr._autocast():
            out = module(x1, x2)
        held.append(meter.current)
        del out
    assert held[1] < 0.5 * held[0], f"checkpointed forward holds {held[1]} vs {held[0]} bytes"


def test_split_views_with_noise_is_deterministic(tmp_path):
    a = make(tmp_path / "a", split_views=True, noise_std=0.25, max_steps=3)
    a.fit()  # (the noise generator is global: build each trainer right before its run)
    b = make(tmp_path / "b", split_views=True, noise_std=0.25, max_steps=3)
    b.fit()
    assert_same_state(params_of(a.blocks), params_of(b.blocks), "blocks")
    loss = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(loss)))


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_profile_records_flops_and_resident_bytes_per_segment(tmp_path, mode):
    from torch.utils.flop_counter import FlopCounterMode
    kw = dict(steps_per_block=3) if mode == "sequential" else dict(max_steps=3)
    tr = make(tmp_path, mode=mode, profile=True, profile_warmup=1, **kw)
    tr.fit()
    segments = 4 if mode == "sequential" else 1
    assert len(tr.flops_per_step) == len(tr.resident) == segments
    assert all(f > 0 for f in tr.flops_per_step)
    if mode == "sequential":  # block k's step also runs blocks 1..k-1 forward
        assert tr.flops_per_step == sorted(tr.flops_per_step)
        return
    # the count is that of a training step (the same shapes: the same flops)
    x1, x2 = torch.randn(2, 8, 3, 8, 8).unbind(0)
    with FlopCounterMode(display=False) as counter:
        tr.train_step(x1, x2, lr=0.1)
    assert tr.flops_per_step[0] == counter.get_total_flops()
    params = sum(p.numel() * 4 for m in [tr.blocks] + tr.heads for p in m.parameters())
    assert tr.resident[0] == {"parameters_bytes": params, "optimizer_state_bytes": params}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_checkpointing_on_cuda_lowers_the_peak_with_the_same_gradients(tmp_path):
    """bf16 autocast, channels_last, fused kernels: the GPU path of --activation-checkpointing."""
    kw = dict(device="cuda", image_size=64, batch_size=32, synthetic_size=64, fused=True,
              projector="64-64")
    peaks, grads = [], []
    for ckpt in (False, True):
        tr = make(tmp_path / str(ckpt), activation_checkpointing=ckpt, **kw)
        g = _grads_at_steps(tr)
        torch.manual_seed(0)
        x1, x2 = torch.randn(2, 32, 3, 64, 64, device="cuda").unbind(0)
        x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        tr.train_step(x1, x2, lr=0.1)  # warm-up: cudnn algorithms, optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tr.train_step(x1, x2, lr=0.0)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append(g)
        del tr
    assert peaks[1] < 0.85 * peaks[0], f"checkpointed peak {peaks[1]} vs {peaks[0]} bytes"
    for k in grads[0]:
        for a, b in zip(grads[0][k], grads[1][k]):
            torch.testing.assert_close(b, a, rtol=5e-2, atol=1e-3)


def test_loss_cuda_graphs_reaches_the_kernel(monkeypatch):
    """--loss-cuda-graphs is passed to kernels.barlow_twins_loss (which uses it on CUDA only)."""
    import kernels
    from blockwise.trainer import BarlowTwinsLoss

    seen = []
    monkeypatch.setattr(kernels, "barlow_twins_loss", lambda z1, z2, **kw: seen.append(kw))
    z = torch.randn(4, 8)
    BarlowTwinsLoss(0.01, 0.1, fused=True, cuda_graphs=True)(z, z)
    BarlowTwinsLoss(0.01, 0.1, fused=True)(z, z)
    assert [kw["cuda_graphs"] for kw in seen] == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_cuda_graphs_same_trajectory_on_cuda(tmp_path):
    """Simultaneous mode, four heads: the graphed loss (captured at step 2, replayed after)
    gives the same gradients as the launchers called directly."""
    import kernels.barlow_twins as bt

    kw = dict(device="cuda", image_size=32, batch_size=32, synthetic_size=64, fused=True,
              projector="256-256")
    grads = []
    for graphs in (False, True):
        bt._GRAPHS.clear()
        tr = make(tmp_path / str(graphs), loss_cuda_graphs=graphs, **kw)
        g = _grads_at_steps(tr)
        torch.manual_seed(0)
        steps = []
        for _ in range(4):
            x1, x2 = torch.randn(2, 32, 3, 32, 32, device="cuda").unbind(0)
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            tr.train_step(x1, x2, lr=0.1)
            steps.append({k: [t.clone() for t in v] for k, v in g.items()})
        grads.append(steps)
        if graphs:
            assert bt._GRAPHS.replays > 0, "no graph was replayed"
        del tr
    bt._GRAPHS.clear()
    for step_a, step_b in zip(*grads):
        for k in step_a:
            for a, b in zip(step_a[k], step_b[k]):
                torch.testing.assert_close(b, a, rtol=5e-2, atol=1e-3)  # cudnn may differ


@pytest.mark.parametrize("mode", ["sequential", "simultaneous"])
def test_split_views_releases_the_last_blocks_view1_output(tmp_path, mode):
    """--split-views: the last block a step trains keeps no output for a next block, so view
    1's block output is freed before view 2's pass (in sequential mode that is the block being
    trained, at block 1 the largest map of the step); earlier blocks' outputs are kept."""
    kw = dict(steps_per_block=2) if mode == "sequential" else {}
    tr = make(tmp_path, mode=mode, split_views=True, **kw)
    last = 0 if mode == "sequential" else 3
    seen = {}  # stage -> [(weakref to the returned block output, grad enabled)]
    alive_at_view2 = {}

    def pre(stage, args):
        calls = seen.setdefault(stage.index, [])
        if torch.is_grad_enabled() and len(calls) == 2:  # view 2 with a graph
            alive_at_view2[stage.index] = calls[1][0]() is not None

    def post(stage, args, out):
        seen.setdefault(stage.index, []).append((weakref.ref(out[0]), torch.is_grad_enabled()))

    for st in tr.stages:
        if st is not None:  # sequential: the current block's stage only
            st.register_forward_pre_hook(pre)
            st.register_forward_hook(post)
    x1, x2 = torch.randn(2, 8, 3, 8, 8).unbind(0)
    tr.train_step(x1, x2, lr=0.1)
    assert [g for _, g in seen[last]] == [False, True, True]  # no-graph view 2, view 1, view 2
    assert alive_at_view2[last] is False
    if mode == "simultaneous":
        assert all(alive_at_view2[k] for k in range(3))  # they feed the next block


@pytest.mark.parametrize("mode", ["e2e", "simultaneous", "sequential"])
def test_bf16_autocast_batches_arrive_in_bf16(tmp_path, mode, monkeypatch):
    """Under bf16 autocast the loader's images are converted to bf16 on arrival (the first
    convolution casts them anyway): every step gets bf16 inputs and trains, in every mode."""
    kw = dict(steps_per_block=1) if mode == "sequential" else dict(max_steps=2)
    tr = make(tmp_path, mode=mode, precision="bf16", **kw)
    seen = []
    orig = tr.train_step

    def spy(x1, x2, lr, b=0):
        seen.append((x1.dtype, x2.dtype))
        return orig(x1, x2, lr, b)

    monkeypatch.setattr(tr, "train_step", spy)
    before = params_of(tr.blocks)
    tr.fit()
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    after = params_of(tr.blocks)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_checkpoint_blocks_recomputes_only_the_chosen_blocks(tmp_path, monkeypatch):
    x1, x2 = torch.randn(2, 8, 3, 16, 16).unbind(0)
    trainers = {spec: make(tmp_path / spec.replace(",", "_"), mode="e2e", image_size=16,
                           activation_checkpointing=spec != "none",
                           checkpoint_blocks=None if spec in ("none", "all") else spec)
                for spec in ("none", "1", "1,3", "all")}
    real = models.forward_block
    for spec, tr in trainers.items():
        calls = []

        def spy(block, x, checkpointed=False):
            calls.append((next(i for i, b in enumerate(tr.blocks) if b is block), checkpointed))
            return real(block, x, checkpointed)

        monkeypatch.setattr(models, "forward_block", spy)
        meter = TensorBytesMeter()
        with meter, tr._autocast():
            loss = tr.model(x1, x2)
        trainers[spec] = (meter.current, loss.detach())
        del loss
        want = {"none": set(), "1": {0}, "1,3": {0, 2}, "all": {0, 1, 2, 3}}[spec]
        assert {i for i, c in calls if c} == want and {i for i, _ in calls} == {0, 1, 2, 3}, spec
    held = {spec: v[0] for spec, v in trainers.items()}
    # each block recomputed keeps less alive after the forward, and the values do not change
    assert held["all"] < held["1,3"] < held["1"] < held["none"], held
    for spec in ("1", "1,3", "all"):
        torch.testing.assert_close(trainers[spec][1], trainers["none"][1], rtol=1e-6, atol=1e-6)


def test_checkpoint_blocks_per_stage_and_bad_specs(tmp_path):
    tr = make(tmp_path / "s", activation_checkpointing=True, checkpoint_blocks="2,4")
    assert [tr.stages[k].checkpointed for k in range(4)] == [False, True, False, True]
    for bad in ("0", "5", "1,1", "a", "", "1,,2"):
        with pytest.raises(ValueError, match="distinct block numbers from 1 to 4"):
            tiny(tmp_path / "b", activation_checkpointing=True, checkpoint_blocks=bad)
    with pytest.raises(ValueError, match="add --activation-checkpointing"):
        tiny(tmp_path / "b", checkpoint_blocks="1")
