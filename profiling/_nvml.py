"""Loading NVML (nvidia-ml-py, imported as ``pynvml``) and mapping CUDA devices to NVML devices.

Every failure becomes a reason string, never an exception: callers report "unavailable (reason)"
instead of zeros. ``pynvml`` is imported when a meter is built (not when this module is imported),
so tests can put a fake module into ``sys.modules["pynvml"]``.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple


def load() -> Tuple[Optional[Any], Optional[str]]:
    """Import and initialise NVML. Returns ``(pynvml, None)`` or ``(None, reason)``."""
    try:
        import pynvml  # noqa: PLC0415 - imported late on purpose (fakeable, optional)
    except ImportError as e:
        return None, f"nvidia-ml-py (pynvml) is not installed ({e})"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # pynvml.NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML could not be initialised: {type(e).__name__}: {e} (no NVIDIA driver?)"
    return pynvml, None


def shutdown(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()  # NVML reference-counts init/shutdown
    except Exception:
        pass


def is_not_supported(pynvml: Any, err: BaseException) -> bool:
    cls = getattr(pynvml, "NVMLError_NotSupported", None)
    return cls is not None and isinstance(err, cls)


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def driver_version(pynvml: Any) -> Optional[str]:
    try:
        return as_str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        return None


def device_name(pynvml: Any, handle: Any) -> str:
    try:
        return as_str(pynvml.nvmlDeviceGetName(handle))
    except Exception as e:
        return f"unknown GPU ({type(e).__name__})"


def nvml_index_for_cuda_device(pynvml: Any, cuda_index: int) -> int:
    """NVML index of CUDA ordinal ``cuda_index`` of this process.

    CUDA ordinals are relative to CUDA_VISIBLE_DEVICES and may be ordered differently from NVML's
    (CUDA_DEVICE_ORDER=FASTEST_FIRST), so match by UUID; fall back to CUDA_VISIBLE_DEVICES integers,
    then to the ordinal itself.
    """
    try:
        import torch

        uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
        if uuid is not None:
            handle = pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + str(uuid)).encode())
            return int(pynvml.nvmlDeviceGetIndex(handle))
    except Exception:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        parts = [p.strip() for p in visible.split(",") if p.strip()]
        if cuda_index < len(parts) and parts[cuda_index].isdigit():
            return int(parts[cuda_index])
    return cuda_index
