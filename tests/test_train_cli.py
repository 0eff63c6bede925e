"""python -m blockwise.train: the README command, run directory, profiling, exit codes, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from blockwise import train
from blockwise.trainer import Trainer

from helpers import TINY_TRAIN_ARGS as TINY


pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(args, capsys):
    code = train.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_command_end_to_end(tmp_path):
    """`python -m blockwise.train --fused`, capped to a few seconds: pre-train, probe, files."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "blockwise.train", "--fused", "--image-size", "8",
           "--batch-size", "16", "--max-steps", "3", "--projector", "32-32", "--probe-epochs", "3",
           "--log-interval", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": os.environ.get(
        "CUDA_VISIBLE_DEVICES", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "probe.json", "summary.json"):
        assert (out / name).is_file(), f"{name} missing"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["dataset"] == "digits" and cfg["config"]["fused"] is True
    assert cfg["versions"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert "no CUDA device" in proc.stderr and not cfg["fused_kernels_used"]
    assert "random init" in proc.stdout and "linear probe top-1" in proc.stdout
    assert train.DIGITS_PROBE_NOTE in proc.stdout  # why digits' gains are near 0
    assert proc.stdout.count("ms/step") == 3  # one fixed-format line per step here
    probe = json.loads((out / "probe.json").read_text())
    assert set(probe["top1"]) == set(probe["control_top1"]) == {f"block{k}" for k in range(1, 5)}
    assert all(0 <= v <= 100 for v in probe["top1"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["probe"]["top1"] == probe["top1"]
    # the summary's times are measured: the whole run covers training plus the probe
    assert 0 < probe["probe_time_s"] < summary["wall_s"]
    assert summary["time_s"] + probe["probe_time_s"] < summary["wall_s"]
    assert f"total: {summary['wall_s']:.1f} s" in proc.stdout
    assert "images/s (the main process" in proc.stdout  # loader capacity in images/s too
    assert summary["export"]["strict_torchvision"] is False  # small stem: explained, not strict
    # what lives across steps: 4 heads and the backbone, fp32, and one LARS momentum per weight
    params = summary["parameters_gib"]
    assert params > 0 and summary["optimizer_state_gib"] == pytest.approx(params)
    assert f"live across steps: parameters {params:.2f} GiB" in proc.stdout


@pytest.mark.parametrize("mode", ["e2e", "simultaneous", "sequential"])
def test_profile_writes_the_windows_of_the_interface(tmp_path, mode, capsys):
    extra = ["--steps-per-block", "3"] if mode == "sequential" else ["--max-steps", "3"]
    code, out, err = run_main(TINY + ["--mode", mode, "--profile", "--profile-warmup", "1",
                                      "--probe-epochs", "0", "--out", tmp_path] + extra, capsys)
    assert code == 0, err
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["schema"] == "blockwise.profile/1"
    windows = set(prof["windows"])
    if mode == "e2e":
        expected = {"step", "head", "backward", "optimizer"} | {f"block{k}/forward" for k in range(1, 5)}
    else:
        expected = {"step"} | {f"block{k}{part}" for k in range(1, 5)
                               for part in ("", "/forward", "/head", "/backward", "/optimizer")}
    assert windows == expected
    measured = 2 if mode != "sequential" else 4 * 2  # warm-up 1 of 3 steps (per block)
    meta = prof["meta"]
    assert meta["measured_steps"] == measured and meta["warmup_steps"] == 1
    assert meta["world_size"] == 1 and meta["mode"] == mode
    for key in ("arch", "batch_size", "image_size", "fused", "projector"):
        assert key in meta
    assert prof["run"]["images"] == measured * 8
    assert prof["windows"]["step"]["count"] == measured
    if mode == "sequential":  # one measured segment per block, labelled by it
        labels = [s["label"] for s in prof["run"]["segments"]]
        assert labels == ["block1", "block2", "block3", "block4"]
        assert prof["windows"]["block1/backward"]["count"] == 2
        assert prof["windows"]["block1/forward"]["count"] == 2 + 3 * 2  # + frozen prefix runs
    assert not (tmp_path / "checkpoint.pt").exists()  # --profile: no checkpoint by default
    # default (no --profile-phases): no window is timed (no sync per step); time and energy of
    # the measured segment(s) as a whole
    assert meta["profile_phases"] is False
    assert prof["run"]["time_s"] > 0 and prof["run"]["throughput_img_s"] > 0
    assert all(s["time_s"] > 0 for s in prof["run"]["segments"])
    for name in windows:
        w = prof["windows"][name]
        assert w["timed"] is False and w["count"] > 0, name
        assert w["time_s_total"] is None and w["energy_j"] is None, name
        if torch.cuda.is_available():
            assert w["peak_allocated_gib"] > 0, name


def test_profile_on_resume_warms_up_in_this_process(tmp_path, capsys):
    """Warm-up is counted in steps this process ran: a resumed run is cold at its first step."""
    code, _, err = run_main(TINY + ["--mode", "e2e", "--max-steps", "1", "--probe-epochs", "0",
                                    "--out", tmp_path], capsys)
    assert code == 0, err
    code, _, err = run_main(["--resume", tmp_path, "--profile", "--profile-warmup", "1",
                             "--probe-epochs", "0"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "profile.json").read_text())["meta"]
    assert meta["measured_steps"] == 2  # steps 2, 3, 4 of 4: one warm-up, two measured
    assert meta["flops_per_step"][0] > 0  # counted in the warm-up step
    # resumed 1 step before --max-steps with 5 warm-up steps: nothing measured, and it says so
    with pytest.warns(RuntimeWarning, match="nothing measured"):
        code, out, err = run_main(["--resume", tmp_path, "--profile", "--max-steps", "5",
                                   "--probe-epochs", "0"], capsys)
    assert code == 0, err
    assert "profile: " in out and "(nothing measured: this process ran 0 step(s)" in out


def test_a_run_without_checkpoint_is_not_offered_to_resume(tmp_path, capsys):
    """A --profile run writes no checkpoint: its --out is refused for a new run, and the message
    must not send the user to --resume (which would fail: no checkpoint)."""
    code, _, err = run_main(TINY + ["--mode", "e2e", "--max-steps", "2", "--probe-epochs", "0",
                                    "--profile", "--profile-warmup", "1", "--out", tmp_path],
                            capsys)
    assert code == 0, err
    assert not (tmp_path / "checkpoint.pt").exists()
    code, _, err = run_main(TINY + ["--max-steps", "1", "--out", tmp_path], capsys)
    assert code == 2 and "without a checkpoint, so it cannot be resumed" in err, err
    assert "--resume" not in err.replace("cannot be resumed", "")


def test_profile_phases_times_every_window(tmp_path, capsys):
    code, out, err = run_main(TINY + ["--mode", "simultaneous", "--profile", "--profile-phases",
                                      "--profile-warmup", "1", "--probe-epochs", "0",
                                      "--max-steps", "2", "--out", tmp_path], capsys)
    assert code == 0, err
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["meta"]["profile_phases"] is True
    assert len(prof["windows"]) == 21
    for name, w in prof["windows"].items():
        assert w["timed"] is True and w["time_s_total"] > 0, name


BAD = [
    (["--arch", "resnet34"], "unknown arch 'resnet34'; valid: resnet18, resnet50"),
    (["--mode", "blockwise"], "unknown mode 'blockwise'; valid: e2e, sequential, simultaneous"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; valid: cifar10, digits, imagefolder, synthetic"),
    (["--optimizer", "adam"], "unknown optimizer 'adam'; valid: adamw, lars, sgd"),
    (["--pool", "max"], "unknown pool 'max'; valid: avg, sqrt"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/data"], "does not exist"),
    (["--dataset", "imagefolder"], "needs --data-dir"),
    (["--batch-size", "1"], "at least 2 image pairs per rank"),
    (["--mode", "sequential", "--block-epochs", "1,2"], "expected 4 positive integers"),
    (["--block-epochs", "1,1,1,1"], "applies to --mode sequential only"),
    (["--projector", "8192-x"], "expected widths separated by '-'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--synthetic-size", "4"], "fewer than one batch"),
    (["--seed", "100000000000000000000"], "--seed must be an integer in [0, 2**32)"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--profile", "--max-steps", "3"], "--profile would measure nothing: --max-steps 3 <= "
                                        "--profile-warmup 5"),
    # a flag the dataset ignores
    (["--dataset", "digits", "--num-classes", "5"], "--num-classes applies to --dataset "
                                                    "synthetic only"),
    (["--dataset", "digits", "--synthetic-size", "100"], "--synthetic-size applies to --dataset "
                                                         "synthetic only"),
    (["--dataset", "synthetic", "--data-dir", "x"], "--data-dir applies to --dataset cifar10 or "
                                                    "imagefolder only (dataset is 'synthetic')"),
    (["--dataset", "cifar10", "--num-classes", "3"], "--num-classes applies to --dataset "
                                                     "synthetic only (dataset is 'cifar10')"),
    (["--dataset", "imagefolder", "--data-dir", "x", "--download"],
     "--download applies to --dataset cifar10 only"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gets_a_clear_message_and_exit_code_2(tmp_path, capsys, args, message):
    base = [a for a in TINY]
    # the flag under test replaces the tiny setting of the same name; another --dataset also
    # drops the tiny synthetic-only settings (that dataset would refuse them)
    drop = [a for a in args if a.startswith("--")]
    if "--dataset" in args and args[args.index("--dataset") + 1] != "synthetic":
        drop += ["--synthetic-size", "--num-classes"]
    for flag in drop:
        if flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    code, out, err = run_main(base + args + ["--out", tmp_path], capsys)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1


def test_flag_the_dataset_ignores_is_refused_before_anything_is_built(tmp_path, capsys):
    code, out, err = run_main(["--dataset", "digits", "--data-dir", tmp_path, "--num-classes", "5",
                               "--out", tmp_path / "run"], capsys)
    assert code == 2
    assert err == ("error: --data-dir applies to --dataset cifar10 or imagefolder only; "
                   "--num-classes applies to --dataset synthetic only (dataset is 'digits')\n")
    assert not (tmp_path / "run").exists()


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_non_finite_loss_exit_2_names_block_and_step(tmp_path, capsys):
    code, out, err = run_main(TINY + ["--optimizer", "sgd", "--lr", "1e30", "--epochs", "3",
                                      "--out", tmp_path], capsys)
    assert code == 2, err
    assert "non-finite loss" in err and "at step" in err and "block" in err
    assert "Traceback" not in err
    if (tmp_path / "checkpoint.pt").exists():  # any checkpoint left is from before the NaN
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in ckpt["blocks"].values() if v.is_floating_point())
    assert not (tmp_path / "probe.json").exists()


def test_out_of_memory_exit_3_one_line(tmp_path, capsys, monkeypatch):
    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    monkeypatch.setattr(Trainer, "fit", oom)
    code, out, err = run_main(TINY + ["--profile", "--out", tmp_path], capsys)
    assert code == 3
    assert err == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    assert not (tmp_path / "profile.json").exists() and not (tmp_path / "probe.json").exists()


def test_resume_continues_and_rejects_changed_training_flags(tmp_path, capsys):
    code, _, err = run_main(TINY + ["--max-steps", "2", "--probe-epochs", "0", "--out", tmp_path],
                            capsys)
    assert code == 0, err
    first_command = json.loads((tmp_path / "config.json").read_text())["command"]
    # a fresh run into the same directory would overwrite it: refused, nothing touched
    before = {f: (tmp_path / f).read_bytes() for f in train.RUN_FILES}
    code, _, err = run_main(TINY + ["--max-steps", "1", "--out", tmp_path], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert {f: (tmp_path / f).read_bytes() for f in train.RUN_FILES} == before
    code, _, err = run_main(["--resume", tmp_path, "--lr", "0.5"], capsys)
    assert code == 2 and "differs from the resumed run" in err
    # --data-dir may change at resume, but this synthetic run reads none
    code, _, err = run_main(["--resume", tmp_path, "--data-dir", tmp_path], capsys)
    assert code == 2 and "--data-dir applies to --dataset cifar10 or imagefolder only" in err, err
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-40])  # killed in the middle of a metrics line
    with pytest.warns(RuntimeWarning, match="unreadable line"):
        code, out, err = run_main(["--resume", tmp_path, "--probe-epochs", "0"], capsys)
    assert code == 0, err
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4  # 1 epoch of 32 / 8, continued from step 2
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    record = json.loads((tmp_path / "config.json").read_text())
    assert [p["command"] for p in record["previous"]] == [first_command]  # the history is kept
    code, _, err = run_main(["--resume", tmp_path / "nowhere"], capsys)
    assert code == 2 and "no checkpoint" in err


def test_resume_into_another_runs_directory_is_refused(tmp_path, capsys):
    """--resume A --out B, where B holds another run: refused, B untouched (it was overwritten,
    and B's metrics.jsonl then mixed B's steps with A's continuation)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        code, _, err = run_main(TINY + ["--max-steps", "1", "--probe-epochs", "0", "--out", d],
                                capsys)
        assert code == 0, err
    before = {f: (b / f).read_bytes() for f in train.RUN_FILES}
    code, _, err = run_main(["--resume", a, "--out", b, "--probe-epochs", "0"], capsys)
    assert code == 2 and "already holds another run" in err, err
    assert {f: (b / f).read_bytes() for f in train.RUN_FILES} == before
    # its own directory, named explicitly (and resumed from the checkpoint file): allowed
    code, _, err = run_main(["--resume", a / "checkpoint.pt", "--out", a, "--max-steps", "2",
                             "--probe-epochs", "0"], capsys)
    assert code == 0, err


def test_export_loads_into_torchvision_strictly(tmp_path, capsys):
    args = [a for a in TINY]
    i = args.index("--image-size")
    args[i + 1] = "32"
    code, out, err = run_main(args + ["--no-small-stem", "--max-steps", "1", "--probe-epochs", "0",
                                      "--out", tmp_path], capsys)
    assert code == 0, err
    sd = torch.load(tmp_path / "backbone_torchvision.pt")
    net = torchvision.models.resnet18()
    net.load_state_dict(sd, strict=True)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert torch.equal(net.layer4[1].conv2.weight, ckpt["blocks"]["3.layer4.1.conv2.weight"])
    assert torch.equal(net.conv1.weight, ckpt["blocks"]["0.conv1.weight"])


def test_help_lists_every_setting(capsys):
    from dataclasses import fields

    from blockwise.config import Config
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for f in fields(Config):
        assert f"--{f.name.replace('_', '-')}" in text
    assert "--no-fused" in text and "--no-small-stem" in text


def test_default_run_directories_never_collide(tmp_path, monkeypatch):
    import datetime as real

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(train.datetime, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    got = [train._claim_default_out() for _ in range(3)]
    assert got == [os.path.join("runs", "20300102-030405" + s) for s in ("", "-2", "-3")]
    assert all(os.path.isdir(g) for g in got)


def test_out_that_cannot_be_a_run_directory_is_bad_input(tmp_path, capsys):
    """--out naming a file, or a path that cannot be created: exit 2, one line naming --out
    (a file gave a FileExistsError traceback after the model and data were built)."""
    a_file = tmp_path / "config.json"
    a_file.write_text("{}")
    code, _, err = run_main(TINY + ["--max-steps", "1", "--out", a_file], capsys)
    assert code == 2 and "exists and is not a directory" in err and "Traceback" not in err, err
    under_a_file = a_file / "run"
    code, _, err = run_main(TINY + ["--max-steps", "1", "--out", under_a_file], capsys)
    assert code == 2 and "cannot create the run directory" in err, err
    assert a_file.read_text() == "{}"


def test_ctrl_c_is_one_line_naming_the_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted(self):
        self.state.step = 7
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "fit", interrupted)
    code, _, err = run_main(TINY + ["--out", tmp_path], capsys)
    assert code == 130
    assert err == "interrupted at step 7; no checkpoint had been written yet\n"


def test_unreadable_image_is_bad_input(tmp_path, capsys):
    """A corrupt file in an imagefolder tree: exit 2 naming the file, not a PIL traceback."""
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    code, _, err = run_main(["--dataset", "imagefolder", "--data-dir", tmp_path / "data",
                             "--image-size", "8", "--batch-size", "4", "--projector", "16-16",
                             "--arch", "resnet18", "--epochs", "1", "--probe-epochs", "0",
                             "--out", tmp_path / "run"], capsys)
    assert code == 2, err
    assert "broken.png" in err and "remove or replace that file" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_sequential_stopped_early_says_which_blocks_never_trained(tmp_path, capsys):
    """--max-steps inside block 1 of sequential mode: blocks 2-4 keep their random init, and
    the probe table must not pass them off as pre-trained without a word."""
    code, out, err = run_main(TINY + ["--mode", "sequential", "--max-steps", "2",
                                      "--probe-epochs", "1", "--no-probe-control",
                                      "--out", tmp_path], capsys)
    assert code == 0, err
    assert "note: block(s) 2, 3, 4 got no training step" in out
    assert json.loads((tmp_path / "summary.json").read_text())["untrained_blocks"] == [2, 3, 4]
