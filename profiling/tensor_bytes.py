"""Bytes held by tensors, on any device: a dispatch-level meter for where CUDA's allocator
statistics do not exist (CPU runs, the memory model in scripts/cpu_memory_model.py) and for tests
that must show what autograd keeps alive.

``TensorBytesMeter`` is a ``TorchDispatchMode``: every op's outputs that are new storages are
counted, once each, until the storage is freed (a weak reference on the storage). ``current`` is
the bytes alive now, ``peak`` the maximum since the meter was entered. Tensors created before the
meter (parameters, optimizer state, inputs) and in-place updates of them are not counted; views
share their base's storage and add nothing.

This counts tensor bytes, not an allocator's: no rounding to blocks, no cached free blocks, no
workspaces that a library allocates outside PyTorch's ops.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorBytesMeter(TorchDispatchMode):
    """``with TensorBytesMeter() as m: ...``; then ``m.peak`` (bytes) and ``m.current``."""

    def __init__(self):
        super().__init__()
        self._live = {}
        self._paused = 0
        self.current = 0
        self.peak = 0

    @contextlib.contextmanager
    def paused(self):
        """Storages created inside are not counted (those counted before still are, until
        freed): e.g. an optimizer step left out of a forward+backward peak."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _freed(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in inputs:  # counted already, or an in-place result
                continue
            n = storage.nbytes()
            self._live[key] = weakref.ref(storage, lambda _, k=key, n=n: self._freed(k, n))
            self.current += n
            self.peak = max(self.peak, self.current)
        return out
