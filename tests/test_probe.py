"""blockwise.probe: the linear classifier on cached features, feature extraction, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from blockwise import probe, train
from blockwise.config import Config
from blockwise.trainer import initial_blocks

from helpers import TINY_TRAIN_ARGS as TINY


pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(n, dim, classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linear_probe_separates_clusters_and_not_noise():
    x, y = _clusters(600, 32, 5, 1.0, 0)
    xt, yt = _clusters(200, 32, 5, 1.0, 0)  # same centres (same seed), fresh points below
    xt = xt + 0.5 * torch.randn_like(xt)
    assert probe.train_linear(x, y, xt, yt, 5, epochs=10) > 95
    # labels independent of the features: chance level (20%), give or take
    noise_acc = probe.train_linear(x, torch.randint(5, (600,)), xt, torch.randint(5, (200,)), 5,
                                   epochs=10)
    assert noise_acc < 40


def test_linear_probe_takes_int32_labels():
    x, y = _clusters(200, 8, 3, 1.0, 2)
    acc = probe.train_linear(x, y.int(), x, y.int(), 3, epochs=2)  # was: cross_entropy error
    assert acc == probe.train_linear(x, y, x, y, 3, epochs=2)


def test_linear_probe_ignores_a_feature_dead_on_the_training_set():
    """A channel that is 0 on every training image but not on the test images (a dead ReLU
    channel) must not decide the predictions: its weight never trains."""
    x, y = _clusters(300, 8, 3, 2.0, 1)
    xt, yt = _clusters(100, 8, 3, 2.0, 1)
    clean = probe.train_linear(x, y, xt, yt, 3, epochs=5)
    dead = probe.train_linear(torch.cat([x, torch.zeros(len(x), 1)], 1), y,
                              torch.cat([xt, torch.full((len(xt), 1), 0.01)], 1), yt, 3, epochs=5)
    assert clean > 90 and dead == pytest.approx(clean, abs=2.0)


def test_linear_probe_is_invariant_to_feature_scale():
    """Standardisation: the same classifier whatever the feature scale (random-init blocks
    differ by orders of magnitude)."""
    x, y = _clusters(300, 16, 3, 2.0, 1)
    xt, yt = _clusters(100, 16, 3, 2.0, 1)
    a = probe.train_linear(x, y, xt, yt, 3, epochs=5)
    b = probe.train_linear(x * 1e4, y, xt * 1e4, yt, 3, epochs=5)
    assert a == pytest.approx(b, abs=1.0)


def test_extract_features_shapes_and_pooling():
    cfg = Config(dataset="synthetic", image_size=16, device="cpu", workers=0)
    blocks = initial_blocks(cfg)
    images = torch.randn(10, 3, 16, 16)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(10))
    feats, labels = probe.extract_features(blocks, dataset, torch.device("cpu"), batch_size=4)
    assert [f.shape for f in feats] == [(10, 64), (10, 128), (10, 256), (10, 512)]
    assert torch.equal(labels, torch.arange(10))
    blocks.eval()
    with torch.no_grad():
        x = images
        for k, block in enumerate(blocks):
            x = block(x)
            torch.testing.assert_close(feats[k], x.mean(dim=(2, 3)))


def test_probe_cli_on_a_saved_run(tmp_path, capsys):
    assert train.main([str(a) for a in TINY + ["--max-steps", "2", "--probe-epochs", "0",
                                               "--out", tmp_path]]) == 0
    assert not (tmp_path / "probe.json").exists()
    capsys.readouterr()
    assert probe.main([str(tmp_path)]) == 2  # saved with no probe: say so, name the flag
    assert "saved with --probe-epochs 0" in capsys.readouterr().err
    assert probe.main([str(tmp_path), "--probe-epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "random init" in out and "block" in out
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["schema"] == "blockwise.probe/1" and result["probe_epochs"] == 3
    assert result["step"] == 2 and result["num_classes"] == 4
    # summary.json's probe is the new one (it kept the run's null probe)
    assert json.loads((tmp_path / "summary.json").read_text())["probe"] == result
    for name in ("top1", "control_top1"):
        assert set(result[name]) == {"block1", "block2", "block3", "block4"}
        assert all(0 <= v <= 100 for v in result[name].values())
    # deterministic: the same run probed again gives the same figures
    assert probe.main([str(tmp_path), "--probe-epochs", "3"]) == 0
    assert json.loads((tmp_path / "probe.json").read_text())["top1"] == result["top1"]


def test_probe_cli_takes_the_checkpoint_file_itself(tmp_path, capsys):
    """load_checkpoint takes a run directory or its checkpoint.pt: probe.json then goes beside
    the file (it crashed at the end, after the whole probe, writing under checkpoint.pt/)."""
    assert train.main([str(a) for a in TINY + ["--max-steps", "1", "--probe-epochs", "0",
                                               "--out", tmp_path]]) == 0
    assert probe.main([str(tmp_path / "checkpoint.pt"), "--probe-epochs", "1", "--no-control"]) == 0
    assert json.loads((tmp_path / "probe.json").read_text())["step"] == 1


def test_probe_cli_on_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_text('{"step": 1}\n')
    assert probe.main([str(tmp_path)]) == 2  # not a traceback
    assert "not a readable blockwise checkpoint" in capsys.readouterr().err


def test_probe_cli_without_checkpoint(tmp_path, capsys):
    assert probe.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--profile run" not in err
    (tmp_path / "profile.json").write_text("{}")  # a --profile run: says why there is none
    assert probe.main([str(tmp_path)]) == 2
    assert "this is a --profile run, which writes no checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_probe_cli_explicit_cuda_without_cuda_is_an_error(tmp_path, capsys):
    assert train.main([str(a) for a in TINY + ["--max-steps", "1", "--probe-epochs", "0",
                                               "--out", tmp_path]]) == 0
    capsys.readouterr()
    assert probe.main([str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "probe.json").exists()
