"""Factored PyTorch implementation of the CoRA linear forward and backward (no autograd).

The ``"torch"`` backend of :func:`llmrec_kernels.fused_cora_linear`: the CPU default and the
fallback for shapes the kernels do not cover. It never forms a dense per-sample weight and
never upcasts full activations; only the ``(B, L, r)`` intermediates are kept in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def s_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved shrink ``S``: fp32, or fp64 for fp64 inputs (so no precision is lost)."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _shrink(x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``x A`` for x ``(B, L, K)`` and A ``(B, K, R)`` or ``(K, R)``; result in x's dtype."""
    a = lora_a.to(x.dtype)
    return torch.bmm(x, a) if a.dim() == 3 else torch.matmul(x, a)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, s)``: y ``(B, L, d_out)`` in x's dtype, ``s = scaling * x A`` (see s_dtype)."""
    dt = x.dtype
    # In place: .to() may return the freshly made product itself, never an input.
    shrunk = _shrink(x, lora_a).to(s_dtype(dt)).mul_(scaling)
    y = F.linear(x, weight, None if bias is None else bias.to(dt)).contiguous()
    rows = x.shape[0] * x.shape[1]  # explicit: view(-1, 0) is ambiguous when d_out is 0
    # Expand into y's own storage: no second (M, d_out) temporary.
    y.view(rows, y.shape[-1]).addmm_(
        shrunk.view(rows, shrunk.shape[-1]).to(dt), lora_b.to(dt).transpose(0, 1)
    )
    return y, shrunk


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dA, dB)``; an unneeded one is an empty tensor."""
    dt = x.dtype
    rows = x.shape[0] * x.shape[1]  # explicit: reshape(-1, 0) is ambiguous when d_out is 0
    empty = x.new_empty(0)
    dx = da = db = empty
    ds = None
    if need_dx or need_da:
        ds = torch.matmul(dy, lora_b.to(dt)) * scaling  # (B, L, R)
    if need_dx:
        a = lora_a.to(dt)
        a_t = a.transpose(-1, -2)
        lowrank = torch.bmm(ds, a_t) if a.dim() == 3 else torch.matmul(ds, a_t)
        dx = torch.matmul(dy, weight) + lowrank
    if need_da:
        if lora_a.dim() == 3:
            da = torch.bmm(x.transpose(1, 2), ds)
        else:
            da = x.reshape(rows, x.shape[-1]).transpose(0, 1) @ ds.reshape(rows, ds.shape[-1])
        da = da.to(lora_a.dtype)
    if need_db:
        dy2 = dy.reshape(rows, dy.shape[-1])
        db = (dy2.transpose(0, 1) @ s_scaled.reshape(rows, s_scaled.shape[-1]).to(dt)).to(
            lora_b.dtype
        )
    return dx, da, db
