"""blockwise.models: blocks vs torchvision, shapes, heads, the loss dispatch, noise, export."""
import copy
import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import kernels
from blockwise import models
from blockwise.models import (ARCHS, POOLS, BlockHead, add_noise, barlow_twins_loss, block_channels,
                              build_blocks, export_torchvision_state_dict, load_torchvision_state_dict)
from helpers import assert_close

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def _torchvision_features(net: nn.Module, x: torch.Tensor):
    """torchvision's own forward graph, cut at the end of layer1..layer4 (before avgpool)."""
    extractor = create_feature_extractor(net, {name: name for name in LAYERS})
    out = extractor(x)
    return [out[name] for name in LAYERS]


def _block_outputs(blocks: nn.ModuleList, x: torch.Tensor):
    outs = []
    for block in blocks:
        x = block(x)
        outs.append(x)
    return outs


def _randomise_bn_buffers(module: nn.Module) -> None:
    """Non-trivial running statistics, so that a lost or misplaced buffer changes eval outputs."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_blocks_compose_to_torchvision_forward(arch):
    net = ARCHS[arch](weights=None)
    _randomise_bn_buffers(net)
    net.eval()
    blocks = build_blocks(arch, small_stem=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _torchvision_features(net, x)
        # fresh blocks are initialised independently: the comparison below is not vacuous
        assert not torch.allclose(_block_outputs(blocks, x)[-1], expected[-1])
        load_torchvision_state_dict(blocks, net.state_dict())
        got = _block_outputs(blocks, x)
    for k, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, rtol=1e-5, atol=1e-5, name=f"{arch} block{k + 1}")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("small_stem,size,sides", [(False, 224, [56, 28, 14, 7]), (True, 32, [32, 16, 8, 4])])
def test_block_output_shapes(arch, small_stem, size, sides):
    blocks = build_blocks(arch, small_stem=small_stem).eval()
    with torch.no_grad():
        outs = _block_outputs(blocks, torch.randn(1, 3, size, size))
    channels = block_channels(arch)
    assert [tuple(o.shape) for o in outs] == [(1, c, s, s) for c, s in zip(channels, sides)]


def test_small_stem_layout():
    blocks = build_blocks("resnet18", small_stem=True)
    conv1 = blocks[0].conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert isinstance(blocks[0].maxpool, nn.Identity)
    assert [name for name, _ in blocks[0].named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1"]
    assert [list(dict(b.named_children())) for b in blocks[1:]] == [["layer2"], ["layer3"], ["layer4"]]
    assert conv1.weight.std() > 0  # initialised, not left at zeros


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        build_blocks("resnet34", small_stem=False)
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        block_channels("vit")


# ---------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize("pool", ["avg", "sqrt"])
@pytest.mark.parametrize("window", [None, 2, 4, 9])
@pytest.mark.parametrize("expander", [0, 12])
def test_head_output_shape(pool, window, expander):
    head = BlockHead(8, expander, pool, window, "32-16", fused=False)
    z = head(torch.randn(5, 8, 6, 6))
    assert z.shape == (5, 16) and head.out_dim == 16
    assert head.feature_dim == (expander or 8)
    assert torch.isfinite(z).all()


def test_head_pooling_values():
    x = torch.randn(3, 4, 6, 6)
    avg_global = BlockHead(4, 0, "avg", None, "none", fused=False)
    assert_close(avg_global(x), x.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6, name="avg global")
    sqrt_global = BlockHead(4, 0, "sqrt", None, "none", fused=False)
    assert_close(sqrt_global(x), x.pow(2).sum(dim=(2, 3)).sqrt(), rtol=1e-5, atol=1e-6, name="sqrt global")
    # 2x2 windows, stride 2, then the mean over the 3 x 3 pooled positions
    windows = x.unfold(2, 2, 2).unfold(3, 2, 2)  # N x C x 3 x 3 x 2 x 2
    sqrt_window = BlockHead(4, 0, "sqrt", 2, "none", fused=False)
    expected = windows.pow(2).sum(dim=(-1, -2)).sqrt().mean(dim=(2, 3))
    assert_close(sqrt_window(x), expected, rtol=1e-5, atol=1e-6, name="sqrt window")
    avg_window = BlockHead(4, 0, "avg", 4, "none", fused=False)  # floor: one 4x4 window at the corner
    assert_close(avg_window(x), x[:, :, :4, :4].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6, name="avg window")


def test_head_expander_and_projector_layout():
    head = BlockHead(8, 16, "avg", None, "32-32-24", fused=False)
    conv, bn, relu = head.expander
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 16 and isinstance(relu, nn.ReLU)
    kinds = [type(m) for m in head.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in head.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 24)]
    assert all(m.bias is None for m in linears)


def test_paper_projector_parameter_count():
    # The paper: four 2048-8192-8192-8192 projectors hold ~604M parameters.
    with torch.device("meta"):
        heads = [BlockHead(c, 2048, "avg", None, "8192-8192-8192", fused=False)
                 for c in block_channels("resnet50")]
    n = sum(p.numel() for h in heads for p in h.projector.parameters())
    assert abs(n / 604e6 - 1) < 0.01, n
    assert all(h.out_dim == 8192 for h in heads)


def test_head_bad_arguments():
    with pytest.raises(ValueError, match="avg.*sqrt"):
        BlockHead(8, 0, "max", None, "16", fused=False)
    with pytest.raises(ValueError, match="projector"):
        BlockHead(8, 0, "avg", None, "16-x", fused=False)
    with pytest.raises(ValueError, match="positive"):
        BlockHead(8, 0, "avg", None, "16-0", fused=False)
    with pytest.raises(ValueError, match="pool_window"):
        BlockHead(8, 0, "avg", 0, "16", fused=False)
    with pytest.raises(ValueError, match="expander"):
        BlockHead(8, -1, "avg", None, "16", fused=False)
    assert set(POOLS) == {"avg", "sqrt"}


@pytest.mark.parametrize("window", [None, 2])
def test_fused_head_matches_reference(window, monkeypatch):
    # The fused head calls the Triton kernel and computes the same function as the reference head.
    calls = []
    kernel = kernels.sqrt_pool2d
    monkeypatch.setattr(kernels, "sqrt_pool2d", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ref = BlockHead(6, 0, "sqrt", window, "8", fused=False)
    fused = BlockHead(6, 0, "sqrt", window, "8", fused=True)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 4, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    z_fused = fused(x2)
    z_ref = ref(x)
    assert_close(z_fused, z_ref, rtol=1e-4, atol=1e-5, name="fused head")
    z_ref.square().sum().backward()
    z_fused.square().sum().backward()
    assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5, name="fused head grad")
    assert calls, "the fused head did not call kernels.sqrt_pool2d"


def test_fused_falls_back_with_warning_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(kernels, "triton_can_run_on", lambda device: False)
    monkeypatch.setattr(models, "_warned_fallback", set())
    monkeypatch.setattr(kernels, "sqrt_pool2d", lambda *a, **k: pytest.fail("kernel called"))
    head = BlockHead(4, 0, "sqrt", None, "none", fused=True)
    x = torch.randn(2, 4, 3, 3)
    with pytest.warns(RuntimeWarning, match="sqrt_pool2d_ref"):
        z = head(x)
    assert_close(z, x.pow(2).sum(dim=(2, 3)).sqrt(), rtol=1e-5, atol=1e-6, name="fallback")


# ---------------------------------------------------------------------------------------------
# Loss and noise


def test_barlow_twins_loss_dispatch(monkeypatch):
    calls = []
    kernel = kernels.barlow_twins_loss
    monkeypatch.setattr(kernels, "barlow_twins_loss", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    z1, z2 = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 12, dtype=torch.float64)
    expected = kernels.barlow_twins_loss_ref(z1, z2, lambd=0.01, scale=0.5)
    got = barlow_twins_loss(z1.float(), z2.float(), lambd=0.01, scale=0.5)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close(got, expected, rtol=1e-5, name="loss")
    # half-precision inputs still give an fp32 loss computed in fp32
    got_bf16 = barlow_twins_loss(z1.bfloat16(), z2.bfloat16(), lambd=0.01, scale=0.5)
    assert got_bf16.dtype == torch.float32
    assert_close(got_bf16, expected, rtol=2e-2, name="loss bf16")
    fused = barlow_twins_loss(z1.float(), z2.float(), lambd=0.01, scale=0.5, fused=True)
    assert_close(fused, expected, rtol=1e-4, name="fused loss")
    assert calls, "fused=True did not call kernels.barlow_twins_loss"


def test_add_noise():
    x = torch.randn(200, 500) * 3 + 1
    assert add_noise(x, 0.0) is x
    assert add_noise(x, 0.25, training=False) is x
    y = add_noise(x, 0.25)
    noise = y - x
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() / (0.25 * x.std().item()) - 1) < 0.02
    xg = x.clone().requires_grad_(True)
    add_noise(xg, 0.25).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))  # the noise scale carries no gradient
    with pytest.raises(ValueError):
        add_noise(x, -0.1)


# ---------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_strictly_and_reproduces_blocks(arch):
    blocks = build_blocks(arch, small_stem=False)
    _randomise_bn_buffers(blocks)
    blocks.eval()
    sd = export_torchvision_state_dict(blocks, arch)
    net = getattr(torchvision.models, arch)()
    net.load_state_dict(sd, strict=True)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _block_outputs(blocks, x)
        got = _torchvision_features(net, x)
    for k, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, rtol=1e-5, atol=1e-5, name=f"{arch} exported block{k + 1}")
    # a copy, not a view into the live parameters
    sd["conv1.weight"].zero_()
    assert blocks[0].conv1.weight.abs().sum() > 0


def test_export_refuses_small_stem_and_wrong_arch():
    small = build_blocks("resnet18", small_stem=True)
    with pytest.raises(ValueError, match="small"):
        export_torchvision_state_dict(small, "resnet18")
    sd = export_torchvision_state_dict(small, "resnet18", allow_small_stem=True)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert "fc.weight" in sd
    with pytest.raises(ValueError, match="another arch"):
        export_torchvision_state_dict(build_blocks("resnet18", small_stem=False), "resnet50")
    with pytest.raises(ValueError, match="resnet18"):
        export_torchvision_state_dict(small, "resnet101")


def test_export_sees_through_compile_wrappers():
    blocks = build_blocks("resnet18", small_stem=False)
    wrapped = nn.ModuleList([torch.compile(b) for b in blocks])  # compiles lazily: nothing runs
    sd = export_torchvision_state_dict(wrapped, "resnet18")
    assert not any("_orig_mod" in k for k in sd)
    assert torch.equal(sd["layer2.0.conv1.weight"], blocks[1].layer2[0].conv1.weight)
    with pytest.raises(TypeError, match="build_blocks"):
        export_torchvision_state_dict(nn.ModuleList([nn.Sequential()] * 4), "resnet18")


def test_bad_blocks_and_bad_state_dict_messages_say_what_is_valid():
    blocks = build_blocks("resnet18", small_stem=False)
    with pytest.raises(TypeError, match="4 blocks.*got ModuleList of 3"):
        export_torchvision_state_dict(blocks[:3], "resnet18")
    sd = {"module." + k: v for k, v in torchvision.models.resnet18().state_dict().items()}
    with pytest.raises(ValueError, match="'module.conv1.weight'.*expected.*conv1.*layer4.*module"):
        load_torchvision_state_dict(blocks, sd)


def test_forward_block_checkpointed_segments_and_exactness():
    blocks = models.build_blocks("resnet18", True)
    seg = models._segments(blocks[0])
    assert [len(s) for s in seg] == [4, 1, 1]  # the stem (conv1, bn1, relu, maxpool), 2 units
    assert [len(s) for s in models._segments(blocks[3])] == [1, 1]
    x = torch.randn(4, 64, 8, 8)
    plain, ckpt = blocks[1], copy.deepcopy(blocks[1])
    y0 = plain(x)
    y1 = models.forward_block(ckpt, x, checkpointed=True)
    torch.testing.assert_close(y1, y0)
    y0.square().sum().backward()
    y1.square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs: the recomputation updated it again"
    assert int(ckpt.layer2[0].bn1.num_batches_tracked) == 1
    assert ckpt.layer2[0].bn1.momentum == plain.layer2[0].bn1.momentum  # restored
    with torch.no_grad():  # no graph: nothing to checkpoint, the plain call
        torch.testing.assert_close(models.forward_block(ckpt.eval(), x, True), plain.eval()(x))
