"""``backend="cuda"``: the hand-written kernels of ``csrc/`` (``torch.ops.llmrec_kernels_cuda``).

The shared backend interface (:class:`llmrec_kernels.backends.CoraBackend`); no LoRA dropout.

Forward, per call (x as ``B*L`` rows; fp16/bf16 in, fp32 accumulation, one rounding per output):

* shrink ``s = scaling * x A`` in fp32: a batched GEMV (one A_b per sample, K split over
  blocks) when there are at most 4 tokens per sample and A is per sample (decode); otherwise
  a tensor-core GEMM per sample (prefill) or over all rows (shared A);
* ``y = x W^T + bias + s B^T``: one tensor-core GEMM (mma.sync, cp.async pipeline) whose fp32
  accumulator receives the low-rank term before the single store; 128x128 tiles when they
  alone fill the GPU, 64x32 tiles otherwise (decode). On sm_90 and newer this GEMM is retired:
  it measured 2.3x cuBLAS on an H200 (``benchmarks/results/gpu-check-h200-2026-11-30``), an
  Ampere-style mainloop without wgmma/TMA. There the base GEMM and dx's ``dy W`` run on
  cuBLAS (``F.linear``, ``mm``) with the low-rank expand as one ``addmm_`` into ``y``, and the
  extension keeps the shrink (its decode GEMV) and the dA/dB kernels
  (:func:`_base_gemm_on_cublas`). The kernels still build for sm_90 (the nvcc checks).

Backward: ``dS = scaling * dy B`` (fp32), ``dx = dy W + dS A_b^T`` (the same fused GEMM with
W read as (d_out, d_in) and a per-sample E), ``dA_b = x_b^T dS_b`` and ``dB = dy^T s`` (tensor
cores, split-K partials summed in fp32). The fp32 operands (s, dS) enter the tensor cores as
hi + lo parts of the input dtype, keeping about 16 (bf16) / 22 (fp16) significant bits.

Inputs may be strided: x, dy and weight are used in place when their rows are contiguous with
one row stride, otherwise copied; lora_a, lora_b and bias are converted to x's dtype and made
contiguous (as the PyTorch path does).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from llmrec_kernels import _cuda, _multi, _torch_impl
from llmrec_kernels.backends import CoraShapes, supports_from

__all__ = [
    "HAS_DROPOUT",
    "MAX_RANK",
    "SUPPORTED_DTYPES",
    "SUPPORT_DEPENDS_ON_ENV",
    "TRACEABLE",
    "backward",
    "backward_multi",
    "check_supported",
    "forward",
    "forward_multi",
    "lowrank_linear",
    "shrink",
    "supports",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_RANK = 128
TRACEABLE = False  # extension ops: compiled code calls the custom ops
HAS_DROPOUT = False
SUPPORT_DEPENDS_ON_ENV = False


def check_supported(shapes: CoraShapes, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``ValueError``/``TypeError`` when the extension cannot run such a call: CUDA
    tensors, the extension built or buildable, fp16/bf16, rank up to :data:`MAX_RANK`."""
    if device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    reason = _cuda.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend='cuda' is not available: {reason}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='cuda' supports float16 and bfloat16, got {dtype}; "
            "use backend='triton' or backend='torch'"
        )
    if shapes.rank > MAX_RANK:
        raise ValueError(
            f"backend='cuda' supports ranks up to {MAX_RANK}, got r={shapes.rank}; "
            "use backend='torch'"
        )


supports = supports_from(check_supported)


# From this compute capability on, the base GEMM is cuBLAS's (module docstring).
CUBLAS_BASE_GEMM_FROM_MAJOR = 9


@functools.lru_cache(maxsize=64)
def _base_gemm_on_cublas(device_index: int) -> bool:
    """True when the device's base GEMM runs on cuBLAS instead of the extension's mma.sync."""
    return torch.cuda.get_device_capability(device_index)[0] >= CUBLAS_BASE_GEMM_FROM_MAJOR


def _routes_to_cublas(x: torch.Tensor) -> bool:
    return x.is_cuda and _base_gemm_on_cublas(x.get_device())


def _cublas_forward(x, weight, lora_a, lora_b, bias, scaling):
    """sm_90+: the extension's fp32 shrink, cuBLAS's ``x W^T + bias``, one ``addmm_`` expand."""
    s = _cuda.ops().shrink(x, lora_a, float(scaling))
    dt = x.dtype
    if bias is not None and bias.dtype is not dt:
        bias = bias.to(dt)
    y = F.linear(x, weight, bias)
    if not y.is_contiguous():
        y = y.contiguous()
    rows = x.shape[0] * x.shape[1]
    b = lora_b if lora_b.dtype is dt else lora_b.to(dt)
    y.view(rows, weight.shape[0]).addmm_(s.view(rows, s.shape[-1]).to(dt), b.t())
    return y, s


def _no_dropout(dropout: Optional[tuple]) -> None:
    if dropout is not None:
        raise ValueError(
            "the CUDA backend has no LoRA dropout (dropout_p > 0); use backend='triton' or "
            "'torch', or dropout_p=0"
        )


def _check(x: torch.Tensor, rank: int) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='cuda' supports float16 and bfloat16, got {x.dtype}; "
            "use backend='triton' or backend='torch'"
        )
    if rank > MAX_RANK:
        raise ValueError(
            f"backend='cuda' supports ranks up to {MAX_RANK}, got r={rank}; use backend='torch'"
        )


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    need_s: bool = True,
    dropout: Optional[tuple] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (B, L, d_out) in x's dtype, s = scaling * x A (B, L, r) fp32)`` for x ``(B, L, d_in)``.

    ``need_s`` is accepted for the shared interface (the fused GEMM reads ``s``, so it is made
    either way); ``dropout`` must be ``None``.
    """
    _no_dropout(dropout)
    _check(x, lora_a.shape[-1])
    if _routes_to_cublas(x):
        return _cublas_forward(x, weight, lora_a, lora_b, bias, scaling)
    y, s = _cuda.ops().cora_forward(x, weight, lora_a, lora_b, bias, float(scaling))
    return y, s


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s_scaled: torch.Tensor,
    scaling: float,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
    dropout: Optional[tuple] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(dx, dA, dB)``; an unneeded one is ``None``."""
    _no_dropout(dropout)
    _check(x, lora_a.shape[-1])
    if need_dx and _routes_to_cublas(x):
        # dx = dy W + dS A^T on cuBLAS (the torch backend's two calls); dA, dB below.
        dx = _torch_impl.backward(
            dy.to(x.dtype), x, weight, lora_a, lora_b, s_scaled, scaling, True, False, False
        )[0]
        if not (need_da or need_db):
            return dx, None, None
        _, da, db = backward(
            dy, x, weight, lora_a, lora_b, s_scaled, scaling, False, need_da, need_db
        )
        return dx, da, db
    dx, da, db = _cuda.ops().cora_backward(
        dy.to(x.dtype), x, weight, lora_a, lora_b, s_scaled.float(), float(scaling),
        bool(need_dx), bool(need_da), bool(need_db),
    )  # fmt: skip
    return (dx if need_dx else None), (da if need_da else None), (db if need_db else None)


# One call (launch pair) per projection, dx and dA summed: llmrec_kernels._multi.
forward_multi, backward_multi = _multi.per_projection(forward, backward)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """``scaling * x A`` as fp32 ``(B, L, r)``; x ``(B, L, d_in)``, A ``(B, d_in, r)`` or ``(d_in, r)``.

    With :func:`lowrank_linear`, lets projections that share ``x`` and ``A`` (q, k and v in
    CoRA) compute the shrink once.
    """
    _check(x, lora_a.shape[-1])
    return _cuda.ops().shrink(x, lora_a, float(scaling))


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    s: torch.Tensor,
    lora_b: torch.Tensor,
) -> torch.Tensor:
    """``x W^T + bias + s B^T`` with ``s`` fp32 ``(B, L, r)`` from :func:`shrink` (already scaled)."""
    _check(x, s.shape[-1])
    return _cuda.ops().lowrank_linear(x, weight, bias, s, lora_b)
