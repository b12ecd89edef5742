"""Which implementation runs a call: ``"triton"``, ``"cuda"`` or ``"torch"``.

Policy for ``backend="auto"`` (the default), after the ``LLMREC_KERNELS_BACKEND`` environment
variable, which replaces ``"auto"`` when set:

* CUDA tensors run the Triton kernels when Triton is installed, the dtype is fp16, bf16 or
  fp32 and the rank is at most :data:`MAX_TRITON_RANK`; otherwise the factored PyTorch path.
* CPU tensors run the factored PyTorch path (``x W^T + (x A) B^T``; never a dense delta),
  except under ``TRITON_INTERPRET=1``, where the Triton kernels run on the CPU through
  Triton's interpreter (how the kernels are tested without a GPU).
* ``"cuda"`` (hand-written CUDA kernels from ``csrc/``) is used only when asked for.

An explicit ``backend=`` argument always wins over the environment variable.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "MAX_TRITON_RANK",
    "interpreter_enabled",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_BACKEND = "LLMREC_KERNELS_BACKEND"
MAX_TRITON_RANK = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton (importing llmrec_kernels must stay cheap).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package is installed (checked without importing it)."""
    return _TRITON_INSTALLED


def _requested() -> str:
    env = os.environ.get(ENV_BACKEND, "").strip().lower()
    if env and env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {BACKENDS}")
    return env or "auto"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rank: int) -> str:
    """Turn a requested backend into the concrete one that will run, or raise ``ValueError``."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend.lower()
    if backend == "auto":
        backend = _requested()
    on_triton_device = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "auto":
        if (
            on_triton_device
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
