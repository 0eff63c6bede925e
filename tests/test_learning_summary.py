"""scripts/learning_summary.py: the learning criteria computed from the runs' own probe files."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import learning_summary  # noqa: E402


def _run(folder, name, top1, control, epochs=80):
    d = folder / name
    d.mkdir()
    (d / "probe.json").write_text(json.dumps({"top1": top1, "control_top1": control,
                                              "num_test": 2000, "probe_epochs": 100}))
    (d / "summary.json").write_text(json.dumps({"steps": 10, "time_s": 1.0, "pairs_per_s": 5.0,
                                                "loader_capacity_pairs_per_s": 50.0,
                                                "data_wait_share": 0.01}))
    (d / "config.json").write_text(json.dumps({"config": {"epochs": epochs}}))


CTRL = {f"block{k}": 40.0 for k in range(1, 5)}


def test_pass_and_fail_follow_the_numbers(tmp_path, capsys):
    _run(tmp_path, "e2e", {"block1": 45, "block2": 50, "block3": 55, "block4": 70.0}, CTRL)
    _run(tmp_path, "simultaneous", {"block1": 50, "block2": 60, "block3": 68.5, "block4": 66}, CTRL)
    assert learning_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS: simultaneous best block 68.50 vs e2e block 4 70.00 (need >= 68.00)" in out
    # 2.5 points behind e2e: the "within 2 points" criterion fails
    (tmp_path / "simultaneous" / "probe.json").write_text(json.dumps(
        {"top1": {"block1": 50, "block2": 60, "block3": 67.5, "block4": 66}, "control_top1": CTRL}))
    assert learning_summary.main([str(tmp_path)]) == 1
    assert "FAIL: simultaneous best block 67.50" in capsys.readouterr().out


def test_block_not_above_its_control_fails(tmp_path, capsys):
    _run(tmp_path, "simultaneous_sqrt", {"block1": 42.0, "block2": 60, "block3": 70, "block4": 70},
         CTRL)
    assert learning_summary.main([str(tmp_path), "--margin", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: simultaneous_sqrt block1 42.00 vs random init 40.00 (need +3)" in out
    assert "no e2e run here" in out


def test_unequal_epochs_are_not_compared(tmp_path, capsys):
    _run(tmp_path, "e2e", {"block1": 45, "block2": 50, "block3": 55, "block4": 90.0}, CTRL, 80)
    _run(tmp_path, "simultaneous", {"block1": 50, "block2": 60, "block3": 70, "block4": 66}, CTRL, 20)
    assert learning_summary.main([str(tmp_path)]) == 0
    assert "20 epochs vs e2e's 80: not compared" in capsys.readouterr().out


def test_lines_say_when_a_run_is_not_the_bars(tmp_path, capsys):
    """Issue 4's learning bar is ResNet-18, small stem, 32x32, 80 epochs on a CIFAR-10 layout:
    a PASS from a shorter run (the first session's was 20 epochs) must say it is not that."""
    bar = {"arch": "resnet18", "small_stem": True, "image_size": 32, "dataset": "imagefolder",
           "max_steps": None}
    for name, top1 in (("e2e", {"block1": 45, "block2": 50, "block3": 55, "block4": 70.0}),
                       ("simultaneous", {"block1": 50, "block2": 60, "block3": 69, "block4": 66})):
        _run(tmp_path, name, top1, CTRL)
        (tmp_path / name / "config.json").write_text(json.dumps({"config": dict(bar, epochs=80)}))
    assert learning_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS: simultaneous best block 69.00 vs e2e block 4 70.00 (need >= 68.00)\n" in out
    assert "not issue 4's learning bar" not in out
    for name in ("e2e", "simultaneous"):
        (tmp_path / name / "config.json").write_text(json.dumps({"config": dict(bar, epochs=20)}))
    assert learning_summary.main([str(tmp_path)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith(("PASS", "FAIL"))]
    assert len(lines) == 5
    assert all(x.endswith("[not issue 4's learning bar: epochs 20 (bar: 80)]") for x in lines)


@pytest.mark.parametrize("make", [False, True])
def test_no_runs_is_exit_2(tmp_path, make):
    folder = tmp_path / "x"
    if make:
        folder.mkdir()
    assert learning_summary.main([str(folder)]) == 2
