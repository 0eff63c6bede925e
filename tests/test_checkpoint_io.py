"""Atomic writes of a run's files: a failed write keeps the old file whole and leaves no
temporary behind; files get the mode the umask gives (mkstemp alone gives 0600)."""
import json
import os
import stat

import pytest
import torch

from blockwise.checkpoint import SCHEMA, atomic_torch_save, atomic_write_json, load_checkpoint
from profiling._io import atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_get_the_umask_mode(tmp_path, umask_022):
    paths = [atomic_torch_save({"a": torch.ones(2)}, str(tmp_path / "c.pt")),
             atomic_write_json(str(tmp_path / "c.json"), {"a": 1})]
    atomic_write_text(str(tmp_path / "r.md"), "x")
    paths.append(str(tmp_path / "r.md"))
    for p in paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary left behind
    atomic_write_json(str(tmp_path / "c.json"), {"step": 3})
    assert json.loads((tmp_path / "c.json").read_text()) == {"step": 3}


def test_load_checkpoint_of_a_truncated_or_foreign_file_is_a_value_error(tmp_path):
    """The CLIs turn ValueError into exit 2 with the message; a raw UnpicklingError / zip
    RuntimeError / EOFError was a traceback instead."""
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"schema": SCHEMA, "w": torch.arange(1000.0)}, str(path))
    assert load_checkpoint(str(tmp_path))["w"][-1] == 999.0
    whole = path.read_bytes()
    for content in (whole[:len(whole) // 2], b"", b'{"step": 1}\n'):
        path.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable blockwise checkpoint.*checkpoint.pt"):
            load_checkpoint(str(tmp_path))
