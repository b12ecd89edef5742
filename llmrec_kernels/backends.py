"""Which implementation runs a call: ``"triton"``, ``"cuda"`` or ``"torch"``.

Policy for ``backend="auto"`` (the default), after the ``LLMREC_KERNELS_BACKEND`` environment
variable, which replaces ``"auto"`` when set:

* CUDA tensors run what the GPU's measured dispatch table says
  (:mod:`llmrec_kernels.dispatch_table`): a custom kernel (``"triton"`` or ``"cuda"``) only for
  a ``(dtype, forward or training, shape class)`` where it measured at least 3% faster than
  the torch path in the same run, else the factored PyTorch path (cuBLAS: ``x W^T + (x A)
  B^T``, never a dense delta). With no table for the GPU, the torch path: the one full
  measurement so far (H200, bf16, ``benchmarks/results/gpu-check-h200-2026-11-30``) had the
  torch path ahead in 53 of 60 projection workloads.
* CPU tensors run the factored PyTorch path, except under ``TRITON_INTERPRET=1``, where
  ``auto`` runs the Triton kernels on the CPU through Triton's interpreter (fp16, bf16 or
  fp32, rank at most :data:`MAX_TRITON_RANK`): how the kernels are tested without a GPU.
* ``"cuda"`` (hand-written CUDA kernels from ``csrc/``) runs when asked for or when a GPU's
  table picks it.

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
from collections.abc import Callable, Iterator
from typing import NamedTuple, Optional, Protocol

import torch

from llmrec_kernels import dispatch_table

__all__ = [
    "BACKENDS",
    "CONCRETE_BACKENDS",
    "ENV_BACKEND",
    "MAX_TRITON_RANK",
    "CoraBackend",
    "CoraShapes",
    "batch_invariant",
    "batch_invariant_enabled",
    "get_backend",
    "interpreter_enabled",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "triton", "cuda", "torch")
CONCRETE_BACKENDS = ("torch", "triton", "cuda")
ENV_BACKEND = "LLMREC_KERNELS_BACKEND"
MAX_TRITON_RANK = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CoraShapes(NamedTuple):
    """The sizes of one CoRA linear call: ``x (batch, length, d_in)``, ``W (d_out, d_in)``,
    ``A (batch or 1, d_in, rank)``; ``per_sample_a`` is False for one shared ``A``."""

    batch: int
    length: int
    d_in: int
    d_out: int
    rank: int
    per_sample_a: bool = True

    @classmethod
    def of(cls, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor) -> CoraShapes:
        """The shapes of a call with 3-D ``x``."""
        batch, length, d_in = x.shape
        return cls(batch, length, d_in, weight.shape[0], lora_a.shape[-1], lora_a.dim() == 3)


class CoraBackend(Protocol):
    """What every backend module (:func:`get_backend`) provides; written once, here.

    All take 3-D ``x`` ``(B, L, d_in)`` and run without autograd (:mod:`llmrec_kernels.
    cora_linear` wraps them in one autograd node per call). ``dropout`` is ``None`` or the
    op's ``(p, seed, offset)`` (:mod:`llmrec_kernels.dropout`); ``s_scaled`` is the forward's
    ``scaling * x A`` (or ``scaling * dropout(x) A``), fp32 (fp64 for fp64 inputs),
    ``(B, L, r)``. A gradient not asked for is returned as ``None``.
    """

    #: True when the backend is plain PyTorch ops that ``torch.compile`` traces; otherwise
    #: compiled code reaches it through the registered custom ops.
    TRACEABLE: bool
    #: True when the backend implements LoRA dropout (``dropout`` not ``None``).
    HAS_DROPOUT: bool
    #: True when :meth:`check_supported` reads the environment (``TRITON_INTERPRET``), so an
    #: explicit request's resolution cannot be cached without it.
    SUPPORT_DEPENDS_ON_ENV: bool

    def check_supported(self, shapes: CoraShapes, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ``TypeError``/``ValueError`` saying why the backend cannot run such a call."""

    def supports(self, shapes: CoraShapes, dtype: torch.dtype, device: torch.device) -> bool:
        """True when :meth:`check_supported` would not raise."""

    def forward(
        self, x, weight, lora_a, lora_b, bias, scaling: float, need_s: bool = True,
        dropout: Optional[tuple] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
        """``(y (B, L, d_out) in x's dtype, s_scaled or None when need_s is False)``."""

    def backward(
        self, dy, x, weight, lora_a, lora_b, s_scaled, scaling: float, need_dx: bool,
        need_da: bool, need_db: bool, dropout: Optional[tuple] = None,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:  # fmt: skip
        """``(dx, dA, dB)`` in the dtypes of ``x``, ``lora_a``, ``lora_b``."""

    def forward_multi(
        self, x, weight, lora_a, lora_b, bias, scaling: float, sizes: tuple[int, ...],
        dropout: Optional[tuple] = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """Projections sharing ``x`` and ``A``: ``weight``/``lora_b``/``bias`` hold their rows
        stacked in ``sizes`` order; ``([y_j (B, L, d_j)], s_scaled)``, each ``y_j`` its own
        tensor."""

    def backward_multi(
        self, dys, x, weight, lora_a, lora_b, s_scaled, scaling: float, sizes: tuple[int, ...],
        need_dx: bool, need_da: bool, need_dbs: tuple[bool, ...], dropout: Optional[tuple] = None,
    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[Optional[torch.Tensor]]]:  # fmt: skip
        """Gradients of :meth:`forward_multi`: ``(dx, dA, [dB_j])``, ``None`` where not needed."""


_LOADED: dict = {}


def _import_backend(name: str):
    # Import statements, not importlib: torch.compile traces these (importlib is skipped, a
    # graph break), so a first resolution inside a compiled region stays in one graph.
    if name == "torch":
        from llmrec_kernels import _torch_impl as module
    elif name == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        from llmrec_kernels.triton import cora_linear as module
    elif name == "cuda":
        from llmrec_kernels import _cuda_impl as module
    else:
        raise ValueError(f"backend must be one of {CONCRETE_BACKENDS}, got {name!r}")
    return module


def get_backend(name: str) -> CoraBackend:
    """The module implementing a concrete backend (``"torch"``, ``"triton"`` or ``"cuda"``),
    imported on first use (the Triton one imports ``triton``)."""
    if torch.compiler.is_compiling():
        # A traced read of _LOADED guards on its contents: a graph traced before the first
        # eager call would be recompiled once that call fills it. Import statements leave
        # no guard.
        return _import_backend(name)
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = _import_backend(name)
    return module


def supports_from(check_supported: Callable) -> Callable:
    """A backend's ``supports`` built from its ``check_supported`` (written once)."""

    def supports(shapes: CoraShapes, dtype: torch.dtype, device: torch.device) -> bool:
        try:
            check_supported(shapes, dtype, device)
        except (TypeError, ValueError):
            return False
        return True

    return supports


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
    fixed order. The cost (predicted): about 0.6x at small decode batches, where the GEMM
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
# (backend, device, dtype, rank) -> backend, for explicit requests (see resolve_backend).
_RESOLVED_EXPLICIT: dict = {}
_MAX_RESOLVED = 4096


def resolve_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    tokens: int = 0,
    length: int = 0,
    training: bool = False,
) -> str:
    """Turn a requested backend into the concrete one that will run, or raise ``ValueError``.

    ``tokens`` (``B * L``), ``length`` (``L``) and ``training`` (autograd records the call)
    pick the measured table's entry for ``"auto"`` on a GPU (:mod:`llmrec_kernels.dispatch_table`).
    """
    if torch.compiler.is_compiling():
        return _resolve(backend, device, dtype, rank, tokens, length, training)
    # An explicit request whose backend's support does not depend on the environment is
    # answered from a smaller key (no environment reads: host time at decode).
    try:
        hit = _RESOLVED_EXPLICIT.get((backend, device, dtype, rank))
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    cls = dispatch_table.shape_class(tokens, length) if device.type == "cuda" else None
    key = (
        backend, device, dtype, rank, cls, training,
        _getenv(ENV_BACKEND, b"LLMREC_KERNELS_BACKEND"),
        _getenv("TRITON_INTERPRET", b"TRITON_INTERPRET"),
    )  # fmt: skip
    try:
        hit = _RESOLVED.get(key)
    except TypeError:  # an unhashable backend argument: the checks below name it
        hit = key = None
    if hit is not None:
        return hit
    concrete = _resolve(backend, device, dtype, rank, tokens, length, training)
    if key is not None and not isinstance(rank, torch.SymInt):
        if len(_RESOLVED) >= _MAX_RESOLVED:
            _RESOLVED.clear()
            _RESOLVED_EXPLICIT.clear()
        _RESOLVED[key] = concrete
        if backend == concrete and not get_backend(concrete).SUPPORT_DEPENDS_ON_ENV:
            _RESOLVED_EXPLICIT[(backend, device, dtype, rank)] = concrete
    return concrete


def _resolve(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    tokens: int = 0,
    length: int = 0,
    training: bool = False,
) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend.lower()
    if backend == "auto":
        backend = _requested()
    if backend == "auto":
        if device.type == "cuda":
            # The measured table's choice where one exists and the backend can run the call;
            # else the torch path (module docstring).
            choice = dispatch_table.choose(device, dtype, tokens, length, training)
            if get_backend(choice).supports(CoraShapes(0, 0, 0, 0, rank), dtype, device):
                return choice
            return "torch"
        # The interpreter's auto stays Triton: how the kernels are tested without a GPU.
        if (
            device.type == "cpu"
            and interpreter_enabled()
            and triton_available()
            and dtype in TRITON_DTYPES
            and rank <= MAX_TRITON_RANK
        ):
            return "triton"
        return "torch"
    # The backend itself says what it cannot run (the rank alone is known here).
    get_backend(backend).check_supported(CoraShapes(0, 0, 0, 0, rank), dtype, device)
    return backend
