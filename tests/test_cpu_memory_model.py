"""scripts/cpu_memory_model.py at tiny settings: the table, its fit and ratios, bad input."""
from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "cpu_memory_model.py")
spec = importlib.util.spec_from_file_location("cpu_memory_model", _PATH)
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)

TINY = ["--arch", "resnet18", "--image-size", "16", "--projector", "32-32", "--threads", "1"]


def _table(out: str):
    rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| mode")]
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


def test_table_fit_and_ratios(capsys):
    assert model.main(TINY + ["--batches", "2,4,6", "--target-batch", "64"]) == 0
    rows = _table(capsys.readouterr().out)
    assert set(rows) == {"e2e", "simultaneous", "sequential"}
    e2e = rows["e2e"]
    assert e2e[5] == "1.00x" and e2e[7] == "1.000x"
    for mode, cells in rows.items():
        peaks = [float(p) for p in cells[0].split(" / ")]
        assert len(peaks) == 3 and all(p > 0 for p in peaks), (mode, cells)
        predicted = float(cells[4])
        # the prediction at 64 pairs includes the resident bytes and the input images (bf16,
        # current + prefetched batch, two views: 4 * 64 * 3 * 16 * 16 * 2 bytes)
        assert float(cells[3]) == pytest.approx(4 * 64 * 3 * 16 * 16 * 2 / 2 ** 30, abs=0.006)
        assert predicted >= float(cells[2]) + float(cells[3]) - 0.01 and float(cells[6]) > 0
    # activation checkpointing: fewer bytes per pair in e2e, more flops
    assert model.main(TINY + ["--batches", "2,4,6", "--modes", "e2e", "--",
                              "--activation-checkpointing"]) == 0
    ckpt = _table(capsys.readouterr().out)["e2e"]
    assert float(ckpt[1]) < float(e2e[1]) and float(ckpt[6]) > float(e2e[6])


def test_bad_batches():
    with pytest.raises(SystemExit):
        model.main(TINY + ["--batches", "4"])
