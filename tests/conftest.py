"""Test harness: CUDA when present, otherwise Triton's CPU interpreter.

TRITON_INTERPRET must be in the environment before triton is first imported (triton reads it when
a kernel is decorated), so this file decides the device before anything imports triton or our
kernels. torch itself does not import triton at import time; we check that it did not.
"""
import os
import sys

# Under Triton's interpreter every tl.dot is a small numpy matmul; a multi-threaded OpenBLAS on a
# busy 2-core CI machine makes those ~800x slower. Must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1; "
            "run the tests with TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def device() -> torch.device:
    """The device the kernels are tested on: CUDA, or the CPU under Triton's interpreter."""
    return DEVICE


@pytest.fixture
def one_thread():
    """Tiny CPU models: one intra-op thread (two threads on a busy 2-core machine are slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # A plain `pytest` runs each benchmark once as a test (fast); `pytest --benchmark-only`
    # times them for real.
    opt = config.option
    if hasattr(opt, "benchmark_only") and not opt.benchmark_only and not getattr(
        opt, "benchmark_enable", False
    ):
        opt.benchmark_disable = True
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: slow on CPU")


def pytest_benchmark_update_machine_info(config, machine_info):
    """--benchmark-json files name the device and versions that produced them (read by
    ``python -m profiling bench``)."""
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["device"] = "cuda" if HAS_CUDA else "cpu"
    if HAS_CUDA:
        machine_info["cuda"] = torch.version.cuda
        machine_info["cuda_device"] = torch.cuda.get_device_name()
