"""Which implementation runs a call: ``"triton"``, ``"cuda"`` or ``"torch"``.

Policy for ``backend="auto"`` (the default), after the ``LLMREC_KERNELS_BACKEND`` environment
variable, which replaces ``"auto"`` when set:

* CUDA tensors run the factored PyTorch path (cuBLAS: ``x W^T + (x A) B^T``, never a dense
  delta). Measured on an H200 (bf16, ``benchmarks/results/gpu-check-h200-2026-11-30``), it
  beat the Triton kernels in 53 of 60 projection workloads (Triton / torch 0.90-3.2x, median
  1.3x; the 7 others within 11%, at host-bound decode and small-prefill shapes):
  cuBLAS's GEMM outran the Triton GEMM mainloop at prefill and training shapes, and at decode
  Triton's Python launcher cost more host time than the three cuBLAS calls. The Triton
  kernels (``backend="triton"`` or ``LLMREC_KERNELS_BACKEND=triton``) stay available and
  tested; ``python -m benchmarks.tile_sweep`` times their tiles against cuBLAS on a GPU.
* CPU tensors run the factored PyTorch path too, except under ``TRITON_INTERPRET=1``, where
  ``auto`` runs the Triton kernels on the CPU through Triton's interpreter (fp16, bf16 or
  fp32, rank at most :data:`MAX_TRITON_RANK`): how the kernels are tested without a GPU.
* ``"cuda"`` (hand-written CUDA kernels from ``csrc/``) is used only when asked for.

An explicit ``backend=`` argument always wins over the environment variable.

Batch-invariant mode (:func:`batch_invariant`, opt-in, Triton backend): a sample's output
bits do not depend on the batch it is computed in. Off by default, because it gives up the
shape-dependent choices that make small and large batches fast; see
:mod:`llmrec_kernels.triton.dispatch` for the predicted cost.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "MAX_TRITON_RANK",
    "batch_invariant",
    "batch_invariant_enabled",
    "interpreter_enabled",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_BACKEND = "LLMREC_KERNELS_BACKEND"
MAX_TRITON_RANK = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# os.environ.get encodes the key and decodes the value on every call (~0.5 us); its backing
# dict of bytes is read directly where it exists (CPython keeps it in sync with os.environ).
_ENV_DATA = getattr(os.environ, "_data", None)
if not isinstance(_ENV_DATA, dict) or os.name != "posix":
    _ENV_DATA = None


def _getenv(name: str, key: bytes) -> str:
    # torch.compile traces os.environ.get (it knows it), not the private dict.
    if _ENV_DATA is not None and not torch.compiler.is_compiling():
        value = _ENV_DATA.get(key)
        return "" if value is None else value.decode()
    return os.environ.get(name, "")


# One flag for the process; LLMREC_BATCH_INVARIANT=1 in the environment turns it on at import.
_BATCH_INVARIANT = [os.environ.get("LLMREC_BATCH_INVARIANT", "0") == "1"]


def batch_invariant_enabled() -> bool:
    """True inside :func:`batch_invariant` (or with ``LLMREC_BATCH_INVARIANT=1`` at import)."""
    return _BATCH_INVARIANT[0]


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Make the Triton backend's forward batch-invariant inside the ``with`` block.

    A sample's output (and its ``S = s x A``) is then bitwise the same whatever batch it is
    computed in: the tile configs stop depending on ``M`` (the largest GEMM tile, the 16-row
    shrink tile) and the shrink is split over K by a count fixed by ``K`` alone, summed in a
    fixed order. The cost (predicted): about 0.8x at small decode batches, where the GEMM
    loses its decode tiles, and nothing at large prefill. Process-wide (not per thread);
    the torch and CUDA backends are not affected (cuBLAS picks its algorithm by shape).
    """
    previous = _BATCH_INVARIANT[0]
    _BATCH_INVARIANT[0] = bool(enabled)
    try:
        yield
    finally:
        _BATCH_INVARIANT[0] = previous


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return _getenv("TRITON_INTERPRET", b"TRITON_INTERPRET") == "1"


# Looked up once, without importing triton (importing llmrec_kernels must stay cheap).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package is installed (checked without importing it)."""
    return _TRITON_INSTALLED


def _requested() -> str:
    env = _getenv(ENV_BACKEND, ENV_BACKEND.encode()).strip().lower()
    if env and env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {BACKENDS}")
    return env or "auto"


# (backend, device, dtype, rank, env backend, TRITON_INTERPRET) -> concrete backend. The
# answer depends on nothing else (the CUDA extension's availability does not change within a
# process), so a hit skips every check. Bounded: ranks and devices are few.
_RESOLVED: dict = {}
_MAX_RESOLVED = 4096


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rank: int) -> str:
    """Turn a requested backend into the concrete one that will run, or raise ``ValueError``."""
    if backend == "torch":
        return "torch"
    if torch.compiler.is_compiling():
        return _resolve(backend, device, dtype, rank)
    key = (
        backend, device, dtype, rank,
        _getenv(ENV_BACKEND, b"LLMREC_KERNELS_BACKEND"),
        _getenv("TRITON_INTERPRET", b"TRITON_INTERPRET"),
    )  # fmt: skip
    try:
        hit = _RESOLVED.get(key)
    except TypeError:  # an unhashable backend argument: the checks below name it
        hit = key = None
    if hit is not None:
        return hit
    concrete = _resolve(backend, device, dtype, rank)
    if key is not None and not isinstance(rank, torch.SymInt):
        if len(_RESOLVED) >= _MAX_RESOLVED:
            _RESOLVED.clear()
        _RESOLVED[key] = concrete
    return concrete


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, rank: int) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend.lower()
    if backend == "auto":
        backend = _requested()
    on_triton_device = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "auto":
        # On a GPU cuBLAS wins (module docstring); the interpreter's auto stays Triton.
        if (
            device.type == "cpu"
            and interpreter_enabled()
            and triton_available()
            and dtype in TRITON_DTYPES
            and rank <= MAX_TRITON_RANK
        ):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if not on_triton_device:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); on the CPU set "
                "TRITON_INTERPRET=1 before importing llmrec_kernels to run Triton's interpreter"
            )
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {dtype}")
        if rank > MAX_TRITON_RANK:
            raise ValueError(
                f"backend='triton' supports ranks up to {MAX_TRITON_RANK}, got r={rank}; "
                "use backend='torch'"
            )
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        from llmrec_kernels import _cuda

        reason = _cuda.unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='cuda' is not available: {reason}")
    return backend
