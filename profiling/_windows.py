"""Checks shared by every kind of named, nestable window (energy, memory, profiler)."""
from __future__ import annotations

from typing import Sequence


def check_window_name(name) -> None:
    """ValueError unless ``name`` is a non-empty string."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"window name must be a non-empty string, got {name!r}")


def check_closing(name: str, open_names: Sequence[str]) -> None:
    """ValueError unless ``name`` is the innermost of the open windows ``open_names``."""
    if not open_names:
        raise ValueError(f"end({name!r}) but no window is open")
    if open_names[-1] != name:
        raise ValueError(f"end({name!r}) but the innermost open window is {open_names[-1]!r} "
                         f"(open: {list(open_names)}); windows must close innermost first")
