"""Where the Triton kernels may run, decided once at import time.

Triton picks compiled code or its CPU interpreter when a ``@triton.jit`` function is *decorated*,
based on the environment variable ``TRITON_INTERPRET``. So the choice is fixed when this package is
imported: a CUDA tensor always runs compiled Triton; a CPU tensor runs only if
``TRITON_INTERPRET=1`` was set before triton was first imported (that is how CPU-only CI tests
the kernel code). Anything else gets a clear error instead of a crash inside Triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_compat() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument into a Python int with
    ``int(array)`` on a 1-element array, which numpy 2 rejects ("only 0-dimensional arrays can be
    converted"), so any ``range(0, N, ...)`` over a runtime bound fails; Triton 3.8 squeezes first.
    Apply the 3.8 behaviour (interpreter only; a no-op where it is already fixed).

    Applied here, when the package is imported, so that every kernel module gets it (every one
    imports this module before it launches anything)."""
    from triton.runtime import interpreter as itp
    orig = getattr(itp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_squeezes_index", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._squeezes_index = True
    itp._patch_lang_tensor = patched


if INTERPRETER:
    _interpreter_compat()

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triton_can_run_on(device: torch.device) -> bool:
    """True when a Triton kernel can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRETER


def check_triton_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the valid options when the kernels cannot run on these tensors."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if triton_can_run_on(device):
        return
    if device.type == "cpu":
        raise ValueError(
            f"{op}: got a CPU tensor, but the Triton kernels run on CPU only under Triton's "
            "interpreter. Either move the input to a CUDA device, or set TRITON_INTERPRET=1 in "
            "the environment before triton is first imported (slow; meant for tests), or use "
            f"the PyTorch reference {op}_ref."
        )
    raise ValueError(f"{op}: unsupported device {device}; valid: cuda, or cpu with TRITON_INTERPRET=1")


def check_float(op: str, name: str, t: torch.Tensor, allow_fp64: bool = True) -> None:
    """TypeError unless ``t`` is a floating-point tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    valid = _FLOAT_DTYPES if allow_fp64 else _FLOAT_DTYPES[:3]
    if t.dtype not in valid:
        names = ", ".join(str(d).replace("torch.", "") for d in valid)
        raise TypeError(f"{op}: {name} must be floating point ({names}), got {t.dtype}")


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32.

    Only needed under Triton's interpreter, whose fp32 -> bf16 cast truncates where compiled
    Triton rounds to nearest even: truncation would double the rounding error that CPU-only CI
    sees. Rounding the fp32 bits first makes the interpreter's truncating cast exact."""
    u = x.to(tl.float32).to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def cast_for_store(v, dst_ptr, RTNE_BF16: tl.constexpr):
    """v (fp32/fp64) in the dtype of dst_ptr; RTNE_BF16 (set only under the interpreter, for
    bf16 outputs) rounds to nearest even first, as compiled code does (see round_bf16)."""
    if RTNE_BF16:
        v = round_bf16(v)
    return v.to(dst_ptr.dtype.element_ty)
