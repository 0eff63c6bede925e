"""blockwise.optim: LARS against a hand computation, parameter groups, registry, schedule."""
import math

import pytest
import torch
import torch.nn as nn

from blockwise.optim import (LARS, OPTIMIZERS, build_optimizer, param_groups, scaled_lr, set_lr,
                             warmup_cosine)
from helpers import assert_close


def _norm(values):
    return math.sqrt(sum(v * v for v in values))


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_two_steps_match_hand_computation(foreach):
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.01
    w0 = [3.0, 0.0, 0.0, 4.0]  # ||w0|| = 5
    grads = [[1.0, -2.0, 0.5, 2.0], [-0.5, 1.0, 1.5, 0.25]]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64).view(2, 2))
    opt = LARS([p], lr=lr, weight_decay=wd, momentum=mom, eta=eta, foreach=foreach)

    # by hand, in plain Python floats
    w, mu = list(w0), [0.0] * 4
    for g in grads:
        d = [gi + wd * wi for gi, wi in zip(g, w)]
        q = eta * _norm(w) / _norm(d)
        mu = [mom * m + q * di for m, di in zip(mu, d)]
        w = [wi - lr * m for wi, m in zip(w, mu)]

        p.grad = torch.tensor(g, dtype=torch.float64).view(2, 2)
        opt.step()
    assert_close(p.detach().flatten(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, name="LARS")
    assert_close(opt.state[p]["mu"].flatten(), torch.tensor(mu, dtype=torch.float64), rtol=1e-12, name="mu")


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_excluded_group_gets_no_decay_and_no_adaptation(foreach):
    lr, mom = 0.1, 0.9
    b = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = LARS([{"params": [b], "lars_exclude": True, "weight_decay": 0.5}], lr=lr, momentum=mom,
               foreach=foreach)
    g1, g2 = torch.tensor([0.1, 0.2, -0.3]), torch.tensor([1.0, 0.0, 2.0])
    b.grad = g1.clone()
    opt.step()
    assert_close(b.detach(), torch.tensor([1.0, -2.0, 3.0]) - lr * g1, rtol=1e-6, name="step 1")
    b.grad = g2.clone()
    opt.step()
    expected = torch.tensor([1.0, -2.0, 3.0]) - lr * g1 - lr * (mom * g1 + g2)
    assert_close(b.detach(), expected, rtol=1e-6, name="step 2")


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_zero_weight_or_zero_update_uses_ratio_one(foreach):
    p = nn.Parameter(torch.zeros(2, 3))
    opt = LARS([p], lr=0.1, weight_decay=1e-6, foreach=foreach)
    g = torch.randn(2, 3)
    p.grad = g.clone()
    opt.step()  # ||p|| = 0: trust ratio 1, plain momentum step
    assert_close(p.detach(), -0.1 * g, rtol=1e-6, name="zero weight")
    q = nn.Parameter(torch.randn(2, 3))
    q0 = q.detach().clone()
    opt2 = LARS([q], lr=0.1, weight_decay=0.0, foreach=foreach)
    q.grad = torch.zeros(2, 3)
    opt2.step()  # ||update|| = 0: no NaN, no change
    assert torch.equal(q.detach(), q0)


def test_lars_multi_tensor_path_matches_loop():
    # several shapes, two dtypes in one group (bucketed), an excluded group, a param without grad
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 3, 3, 3), (7,), (1, 1)]
    runs = []
    for foreach in (False, True):
        torch.manual_seed(1)
        weights = [nn.Parameter(torch.randn(s, dtype=torch.float64 if i == 2 else torch.float32))
                   for i, s in enumerate(shapes)]
        no_grad = nn.Parameter(torch.randn(3, 3))
        groups = [{"params": [w for w in weights if w.ndim > 1] + [no_grad], "weight_decay": 1e-2},
                  {"params": [w for w in weights if w.ndim == 1], "weight_decay": 0.0,
                   "lars_exclude": True, "lr": 0.05}]
        opt = LARS(groups, lr=0.7, eta=0.02, foreach=foreach)
        for _ in range(3):
            for w in weights:
                w.grad = torch.randn_like(w)
            grads = [w.grad.clone() for w in weights]
            opt.step()
            for w, g in zip(weights, grads):  # the step leaves the gradients as they were
                assert torch.equal(w.grad, g)
        runs.append([w.detach().clone() for w in weights] + [no_grad.detach().clone()])
    for k, (a, b) in enumerate(zip(*runs)):
        assert_close(b, a, rtol=1e-6, atol=1e-7, name=f"param {k}")


def test_lars_skips_params_without_grad_and_reduces_a_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    frozen = nn.Parameter(torch.ones(3, 3))
    groups = param_groups(model, 1e-6)
    groups[1]["lr"] = 0.02  # biases and norms: plain momentum SGD, so a much smaller rate
    opt = LARS(groups + [{"params": [frozen]}], lr=5.0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    first = None
    for _ in range(30):
        loss = (model(x) - y).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert torch.equal(frozen.detach(), torch.ones(3, 3))


def test_param_groups_split_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2),
                          nn.LayerNorm(2))
    model[3].weight.requires_grad_(False)
    groups = param_groups(model, 1e-4)
    assert len(groups) == 2
    decay, excluded = groups
    assert decay["weight_decay"] == 1e-4 and not decay["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in excluded["params"])
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
    assert id(model[3].weight) not in ids


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(name, model, lr=0.3, weight_decay=1e-5)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 0.0]
    assert all(g["lr"] == 0.3 for g in opt.param_groups)
    set_lr(opt, 0.01)
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    # explicit parameters are used as they are
    opt2 = build_optimizer(name, model.parameters(), lr=0.1, weight_decay=0.0)
    assert len(opt2.param_groups) == 1
    if name == "lars":
        assert opt2.param_groups[0]["eta"] == 0.001
        opt3 = build_optimizer(name, model, lr=0.1, weight_decay=0.0, eta=0.02)
        assert all(g["eta"] == 0.02 for g in opt3.param_groups)
    if name == "sgd":
        assert opt2.param_groups[0]["momentum"] == 0.9


def test_build_optimizer_bad_name_lists_valid():
    with pytest.raises(ValueError, match="adamw.*lars.*sgd"):
        build_optimizer("adam", nn.Linear(2, 2), lr=0.1, weight_decay=0.0)
    assert set(OPTIMIZERS) == {"lars", "sgd", "adamw"}


def test_warmup_cosine_endpoints_and_monotonicity():
    total, warmup, base = 100, 10, 0.8
    lrs = [warmup_cosine(s, total, warmup, base) for s in range(total + 5)]
    assert lrs[0] == 0.0
    assert lrs[warmup] == pytest.approx(base)
    assert lrs[warmup // 2] == pytest.approx(base / 2)
    assert lrs[total] == pytest.approx(base * 0.001)
    assert lrs[total + 4] == pytest.approx(base * 0.001)  # stays at the final value
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(base * 0.001 + (base - base * 0.001) * 0.5)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert warmup_cosine(0, 50, 0, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(50, 50, 0, 1.0, final_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(7, 7, 7, 1.0) == pytest.approx(0.001)


@pytest.mark.parametrize("kwargs", [dict(step=0, total_steps=0, warmup_steps=0),
                                    dict(step=0, total_steps=10, warmup_steps=11),
                                    dict(step=-1, total_steps=10, warmup_steps=1)])
def test_warmup_cosine_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        warmup_cosine(base_lr=1.0, **kwargs)


def test_scaled_lr():
    assert scaled_lr(0.2, 2048) == pytest.approx(1.6)
    assert scaled_lr(0.2, 256) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        scaled_lr(0.2, 0)
