"""Atomic files of a run directory: checkpoint.pt, JSON files, the RNG state.

Everything the user keeps is written to a temporary file in the same directory, flushed to disk,
then moved over the old file with ``os.replace``: a crash (or an out-of-memory exit) leaves the
previous version intact, never a half-written one.
"""
from __future__ import annotations

import json
import os
import pickle
import random
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from profiling._io import atomic_write

CHECKPOINT = "checkpoint.pt"
SCHEMA = "blockwise.checkpoint/1"


def _atomic(path: str, write: Callable[[Any], None], mode: str = "wb") -> str:
    def to_file(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, to_file)
    return path


def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save`` through a temporary file and ``os.replace``."""
    return _atomic(path, lambda fh: torch.save(obj, fh))


def atomic_write_json(path: str, obj: Any) -> str:
    return _atomic(path, lambda fh: fh.write(json.dumps(obj, indent=2, default=str) + "\n"), "w")


def atomic_write_lines(path: str, lines) -> str:
    return _atomic(path, lambda fh: fh.writelines(lines), "w")


def rng_state() -> Dict[str, Any]:
    """Every random generator the training loop draws from (noise, and nothing else by design)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def checkpoint_path(run_dir_or_file: str) -> str:
    """A run directory -> its checkpoint.pt; a file path stays as it is."""
    if os.path.isdir(run_dir_or_file):
        return os.path.join(run_dir_or_file, CHECKPOINT)
    return run_dir_or_file


def load_checkpoint(run_dir_or_file: str, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by the trainer; a clear FileNotFoundError/ValueError otherwise."""
    path = checkpoint_path(run_dir_or_file)
    if not os.path.isfile(path):
        why = ""
        if os.path.isdir(run_dir_or_file) and os.path.isfile(
                os.path.join(run_dir_or_file, "profile.json")):
            why = ("; this is a --profile run, which writes no checkpoint unless it is given "
                   "--checkpoint")
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected a run directory holding "
                                f"{CHECKPOINT}, or the checkpoint file itself){why}")
    # weights_only=False: the checkpoint holds RNG states (numpy arrays, python tuples) written
    # by this program; only load checkpoints you made yourself.
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except torch.cuda.OutOfMemoryError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:  # another file, or truncated
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{path!r} is not a readable blockwise checkpoint ({type(err).__name__}: "
                         f"{first}); expected the {CHECKPOINT} that blockwise.train writes "
                         f"(schema {SCHEMA}); is it truncated, or another file?") from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA:
        raise ValueError(f"{path!r} is not a blockwise checkpoint (schema {SCHEMA})")
    return ckpt
