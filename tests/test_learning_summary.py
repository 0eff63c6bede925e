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


@pytest.mark.parametrize("make", [False, True])
def test_no_runs_is_exit_2(tmp_path, make):
    folder = tmp_path / "x"
    if make:
        folder.mkdir()
    assert learning_summary.main([str(folder)]) == 2
