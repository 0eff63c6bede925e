"""Atomic file writes: a temporary file in the same directory, then os.replace.

A reader (or a crash) never sees a half-written report, profile.json or plot.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from typing import Any, Callable


def _tmp_path(path: str, suffix: str = "") -> str:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix + ".tmp",
                               dir=directory)
    os.close(fd)
    return tmp


@functools.lru_cache(maxsize=None)
def _file_mode() -> int:
    """What open() would give a new file: 0o666 less the process umask (mkstemp gives 0o600).
    Read once: reading the umask means setting it, and another thread creating a file in
    between would get mode 0o666."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    ``suffix`` lets writers that infer the format from the name (matplotlib) see it.
    """
    tmp = _tmp_path(path, suffix)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, _write)


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON; they would mean a bug upstream, so they become null (= not measured)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False, default=str) + "\n")
