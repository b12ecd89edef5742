"""``backend="cuda"``: the hand-written kernels of ``csrc/`` (``torch.ops.llmrec_kernels_cuda``).

The shared backend interface (:class:`llmrec_kernels.backends.CoraBackend`); no LoRA dropout.

Forward, per call (x as ``B*L`` rows; fp16/bf16 in, fp32 accumulation, one rounding per output):

* shrink ``s = scaling * x A`` in fp32: a batched GEMV (one A_b per sample, K split over
  blocks) when there are at most 4 tokens per sample and A is per sample (decode); otherwise
  a tensor-core GEMM per sample (prefill) or over all rows (shared A);
* ``y = x W^T + bias + s B^T``: one tensor-core GEMM (mma.sync, cp.async pipeline) whose fp32
  accumulator receives the low-rank term before the single store; 128x128 tiles when they
  alone fill the GPU, 64x32 tiles otherwise (decode).

Backward: ``dS = scaling * dy B`` (fp32), ``dx = dy W + dS A_b^T`` (the same fused GEMM with
W read as (d_out, d_in) and a per-sample E), ``dA_b = x_b^T dS_b`` and ``dB = dy^T s`` (tensor
cores, split-K partials summed in fp32). The fp32 operands (s, dS) enter the tensor cores as
hi + lo parts of the input dtype, keeping about 16 (bf16) / 22 (fp16) significant bits.

Inputs may be strided: x, dy and weight are used in place when their rows are contiguous with
one row stride, otherwise copied; lora_a, lora_b and bias are converted to x's dtype and made
contiguous (as the PyTorch path does).
"""

from __future__ import annotations

from typing import Optional

import torch

from llmrec_kernels import _cuda, _multi
from llmrec_kernels.backends import CoraShapes, supports_from

__all__ = [
    "HAS_DROPOUT",
    "MAX_RANK",
    "SUPPORTED_DTYPES",
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
    dx, da, db = _cuda.ops().cora_backward(
        dy.to(x.dtype), x, weight, lora_a, lora_b, s_scaled.float(), float(scaling),
        bool(need_dx), bool(need_da), bool(need_db),
    )  # fmt: skip
    return (dx if need_dx else None), (da if need_da else None), (db if need_db else None)


def forward_multi(x, weight, lora_a, lora_b, bias, scaling, sizes, dropout=None):
    """One fused call per projection (:func:`llmrec_kernels._multi.forward_multi`)."""
    return _multi.forward_multi(forward, x, weight, lora_a, lora_b, bias, scaling, sizes, dropout)


def backward_multi(
    dys, x, weight, lora_a, lora_b, s_scaled, scaling, sizes, need_dx, need_da, need_dbs,
    dropout=None,
):  # fmt: skip
    """:func:`backward` per projection, dx and dA summed (:func:`llmrec_kernels._multi.
    backward_multi`)."""
    return _multi.backward_multi(
        backward, dys, x, weight, lora_a, lora_b, s_scaled, scaling, sizes, need_dx, need_da,
        need_dbs, dropout,
    )  # fmt: skip


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
