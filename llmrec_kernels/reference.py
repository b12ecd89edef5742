"""Plain-PyTorch reference implementations of the CoRA linear layer.

Both functions take the same arguments as :func:`llmrec_kernels.fused_cora_linear` and are
differentiable through ordinary autograd. They serve as test oracles and as the baselines of
the benchmark suite:

* :func:`cora_linear_naive` is what a straightforward implementation does: it materialises the
  dense per-sample weight ``W + s * B @ A_b^T`` (``d_out x d_in`` for every sample) and runs one
  matmul per sample. Memory grows with ``B * d_out * d_in``.
* :func:`cora_linear_factored` never forms a dense delta: ``x W^T + b + s * (x A) B^T``, with
  separate, unfused PyTorch kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["cora_linear_factored", "cora_linear_naive"]


def cora_linear_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Dense per-sample weights: ``y_b = x_b (W + s B A_b^T)^T + bias``, one matmul per sample.

    Args:
        x: ``(B, L, d_in)`` or ``(B, d_in)``, floating point.
        weight: ``(d_out, d_in)``.
        lora_a: ``(B, d_in, r)`` (one A per sample) or ``(d_in, r)`` (shared).
        lora_b: ``(d_out, r)``.
        bias: ``(d_out,)`` or ``None``.
        scaling: the LoRA scale ``s = alpha / r``.

    Returns:
        ``(B, L, d_out)`` (or ``(B, d_out)`` for 2-D ``x``) in the dtype of ``x``.
    """
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x
    outs = []
    for b in range(x3.shape[0]):
        a_b = lora_a[b] if lora_a.dim() == 3 else lora_a
        dense = weight + scaling * (lora_b @ a_b.transpose(0, 1)).to(weight.dtype)
        outs.append(F.linear(x3[b], dense.to(x.dtype), None if bias is None else bias.to(x.dtype)))
    y = torch.stack(outs, 0)
    return y.squeeze(1) if squeeze else y


def cora_linear_factored(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Unfused low-rank form: ``x W^T + bias + s * (x A) B^T``; no dense delta is formed.

    Same arguments and result as :func:`cora_linear_naive`. Every product runs in the dtype of
    ``x`` (PyTorch accumulates matmuls in fp32 internally); pass fp64 tensors for an oracle.
    """
    dt = x.dtype
    base = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))
    a = lora_a.to(dt)
    if a.dim() == 3 and x.dim() == 2:
        shrunk = torch.bmm(x.unsqueeze(1), a).squeeze(1)
    else:
        shrunk = torch.matmul(x, a)
    return base + scaling * torch.matmul(shrunk, lora_b.to(dt).transpose(0, 1))
