"""Test set-up: run Triton kernels through the interpreter when no GPU is present.

``TRITON_INTERPRET`` must be set before any Triton kernel module is imported, so it is set
here, at collection time. ``torch.cuda.is_available()`` does not initialise CUDA.
"""

import getpass
import os
import tempfile

import pytest
import torch

# Inductor's on-disk cache does not key its compiled C++ kernels on ATEN_CPU_CAPABILITY: a
# kernel built for AVX-512 is reloaded under ATEN_CPU_CAPABILITY=avx2 and fails ("tuple args
# required"). One cache directory per capability keeps the suite runnable under both.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(),
        f"torchinductor-{getpass.getuser()}-{os.environ['ATEN_CPU_CAPABILITY'].lower()}",
    )

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
