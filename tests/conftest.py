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

# Under pytest-xdist (the README's `-n auto`) every worker is a process of its own: with
# torch's default of one intra-op thread per core, N workers would each start N threads and
# fight over N cores. One thread per worker, and OMP_NUM_THREADS=1 for the subprocesses they
# start (`llmrec` CLI runs, torchrun), keeps one runnable thread per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# The longest files, longest first (minutes each on a busy 2-core CPU: the SmolLM2 CLI run
# about 9, torch.compile of the patched model 6, the mount-namespace faults 6, the subprocess
# kill/interrupt tests 4-6, the Triton AOT build 4). Under xdist's `--dist loadfile` a file
# runs whole on one worker, and files are handed out in collection order: started last, one
# of these would leave the other worker idle for minutes at the end.
LONGEST_FILES_FIRST = (
    "tests/model/test_real_llm.py",
    "tests/patching/test_hf_compile.py",
    "tests/e2e/test_reliability_faults.py",
    "tests/e2e/test_reliability_round3.py",
    "tests/ops/test_aot_compile.py",
    "tests/e2e/test_reliability.py",
    "tests/e2e/test_evaluate_parts.py",
    "tests/e2e/test_ddp.py",
)


def pytest_configure(config):
    # xdist's default (--loadscope-reorder) hands out the files with the most tests first,
    # which put the one-test SmolLM2 file last; collection order (below) is the order wanted.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _schedule_rank(item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return (
        LONGEST_FILES_FIRST.index(path) if path in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # serial runs keep the plain collection order
        items.sort(key=_schedule_rank)  # stable: the order within each file is kept


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
