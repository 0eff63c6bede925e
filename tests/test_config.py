"""blockwise.config: resolution per dataset, validation, the generated CLI, resume merging."""
from __future__ import annotations

import dataclasses

import pytest

from blockwise import config as C
from blockwise.config import Config


def test_digits_defaults_fit_the_cpu_budget():
    cfg = Config(device="cpu")
    assert cfg.recipe_name() == "digits"
    assert (cfg.arch, cfg.small_stem, cfg.expander, cfg.image_size) == ("resnet18", True, 0, 16)
    assert cfg.projector == "512-512-512" and cfg.batch_size == 128 and cfg.epochs == 10
    assert (cfg.lr, cfg.weight_decay, cfg.lars_eta, cfg.loss_scale) == (0.3, 1e-4, 0.02, 0.1)
    assert cfg.precision == "fp32" and cfg.channels_last is False


def test_paper_defaults_for_large_images():
    cfg = Config(dataset="synthetic", device="cpu")
    assert cfg.recipe_name() == "paper" and cfg.image_size == 224
    assert (cfg.arch, cfg.small_stem, cfg.expander) == ("resnet50", False, 2048)
    assert cfg.projector == "8192-8192-8192" and cfg.loss_scale == 0.024 and cfg.lambd == 0.0051
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lars_eta) == ("lars", 0.2, 1e-6, 0.001)
    assert cfg.epochs == 300 and cfg.warmup_epochs == 10 and cfg.probe_epochs == 100


def test_small_images_recipe():
    cfg = Config(dataset="synthetic", image_size=32, device="cpu")
    assert cfg.recipe_name() == "small"
    assert (cfg.arch, cfg.small_stem, cfg.expander) == ("resnet18", True, 0)
    assert cfg.projector == "8192-8192-8192"
    assert (cfg.lr, cfg.weight_decay, cfg.lars_eta, cfg.loss_scale) == (0.3, 1e-4, 0.02, 0.1)
    explicit = Config(dataset="synthetic", image_size=32, arch="resnet50", small_stem=False,
                      device="cpu")
    assert explicit.expander == 2048 and explicit.small_stem is False


def test_optimizer_defaults_and_warmup():
    assert Config(optimizer="adamw", device="cpu").lr == 1e-3
    assert Config(epochs=20, device="cpu").warmup_epochs == 2.0
    seq = Config(mode="sequential", block_epochs="10,10,20,20", device="cpu")
    assert seq.block_epoch_list() == [10, 10, 20, 20] and seq.warmup_epochs == 1.0


@pytest.mark.parametrize("kw,message", [
    (dict(mode="x"), "unknown mode 'x'; valid: e2e, sequential, simultaneous"),
    (dict(arch="vgg"), "unknown arch 'vgg'; valid: resnet18, resnet50"),
    (dict(batch_size=1), "--batch-size must be >= 2"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(noise_std=-1.0), "--noise-std must be >= 0"),
    (dict(lr=float("inf")), "--lr must be a finite number, got inf"),
    (dict(weight_decay=float("inf")), "--weight-decay must be a finite number"),
    (dict(warmup_epochs=float("inf")), "--warmup-epochs must be a finite number"),
    (dict(epochs=10, warmup_epochs=11.0), "--warmup-epochs 11 is longer than the run's 10 "
                                          "epoch(s): it would be all warm-up"),
    (dict(mode="sequential", block_epochs="10,2,10,10", warmup_epochs=3.0),
     "longer than the shortest block's 2 epoch(s)"),
    (dict(steps_per_block=3), "applies to --mode sequential only"),
    (dict(mode="sequential", steps_per_block=0), "--steps-per-block must be > 0"),
    (dict(precision="fp16"), "unknown precision 'fp16'; valid: auto, bf16, fp32"),
    (dict(loss_cuda_graphs=True), "--loss-cuda-graphs replays the fused loss: add --fused"),
])
def test_validation(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config(device="cpu", **kw)


def test_types_are_checked():
    with pytest.raises(TypeError, match="batch_size must be int"):
        Config(device="cpu", batch_size="8")
    with pytest.raises(TypeError, match="fused must be bool"):
        Config(device="cpu", fused=1)
    assert Config(device="cpu", lr=1).lr == 1.0  # an int where a float is expected is fine


def test_parser_covers_every_field_and_only_given_flags():
    fields = {f.name for f in dataclasses.fields(Config)}
    parser = C.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == fields
    given = C.parse_args(["--mode", "e2e", "--no-fused", "--batch-size", "64", "--lr", "0.1"])
    assert given == {"mode": "e2e", "fused": False, "batch_size": 64, "lr": 0.1}
    assert C.parse_args(["--small-stem"]) == {"small_stem": True}


def test_resume_merge_rules():
    saved = Config(device="cpu", max_steps=5).to_dict()
    merged = C.merge_for_resume(saved, {"resume": "x", "workers": 3, "probe_epochs": 0})
    assert merged.workers == 3 and merged.probe_epochs == 0 and merged.max_steps is None
    assert merged.batch_size == saved["batch_size"]
    same = C.merge_for_resume(saved, {"resume": "x", "batch_size": saved["batch_size"]})
    assert same.batch_size == saved["batch_size"]
    with pytest.raises(ValueError, match="--batch-size 64 differs from the resumed run's 128"):
        C.merge_for_resume(saved, {"resume": "x", "batch_size": 64})


def test_resume_may_change_exact_options_and_move_the_data(tmp_path):
    saved = Config(device="cpu", activation_checkpointing=True, checkpoint_blocks="1").to_dict()
    off = C.merge_for_resume(saved, {"resume": "x", "activation_checkpointing": False})
    assert not off.activation_checkpointing and off.checkpoint_blocks is None
    split = C.merge_for_resume(saved, {"resume": "x", "split_views": True})
    assert split.split_views and split.checkpoint_blocks == saved["checkpoint_blocks"]
    d = tmp_path / "moved"
    (d / "train").mkdir(parents=True)
    (d / "val").mkdir()
    folder = {**saved, "dataset": "imagefolder", "data_dir": str(tmp_path / "gone")}
    moved = C.merge_for_resume(folder, {"resume": "x", "data_dir": str(d)})
    assert moved.data_dir == str(d)


def test_flags_the_dataset_ignores_are_refused_when_given():
    with pytest.raises(ValueError, match=r"^--num-classes applies to --dataset synthetic only "
                                         r"\(dataset is 'digits'\)$"):
        C.config_from_flags({"num_classes": 5, "device": "cpu"})  # digits: the default dataset
    with pytest.raises(ValueError, match="--synthetic-augment applies to --dataset synthetic only"):
        C.config_from_flags({"dataset": "cifar10", "synthetic_augment": True, "device": "cpu"})
    # defaults are not flags given; a switch given as off asks for nothing
    cfg = C.config_from_flags({"download": False, "synthetic_augment": False, "device": "cpu"})
    assert (cfg.dataset, cfg.num_classes, cfg.data_dir) == ("digits", 10, None)
    cfg = C.config_from_flags({"dataset": "synthetic", "num_classes": 3, "synthetic_size": 64,
                               "synthetic_augment": True, "device": "cpu"})
    assert (cfg.num_classes, cfg.synthetic_size) == (3, 64)


def test_resume_refuses_only_the_dataset_flags_given_again(tmp_path):
    """The saved config holds every field (num_classes, synthetic_size, ... for any dataset),
    and an older run may have saved one its dataset ignored: neither is a flag given."""
    saved = {**Config(device="cpu").to_dict(), "num_classes": 5, "data_dir": str(tmp_path)}
    assert C.merge_for_resume(saved, {"resume": "x", "workers": 0}).dataset == "digits"
    with pytest.raises(ValueError, match="--data-dir applies to --dataset cifar10 or imagefolder "
                                         "only \\(dataset is 'digits'\\)"):
        C.merge_for_resume(saved, {"resume": "x", "data_dir": str(tmp_path)})
