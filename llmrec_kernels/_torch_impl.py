"""Factored PyTorch implementation of the CoRA linear forward and backward (no autograd).

The ``"torch"`` backend of :func:`llmrec_kernels.fused_cora_linear`: the CPU default and the
fallback for shapes the kernels do not cover. It never forms a dense per-sample weight and
never upcasts full activations; only the ``(B, L, r)`` intermediates are kept in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llmrec_kernels.dropout import dropout_mask, keep_scale


def s_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved shrink ``S``: fp32, or fp64 for fp64 inputs (so no precision is lost)."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _dropped(x: torch.Tensor, dropout: tuple) -> tuple[torch.Tensor, float]:
    """``(x * keep, 1 / (1 - p))``: the masked x (exact) and the factor for the fp32 scale."""
    p, seed, offset = dropout
    keep = dropout_mask(tuple(x.shape), p, seed, offset, x.device)
    return torch.where(keep, x, x.new_zeros(())), keep_scale(p)


def _add_lowrank_dx(dx, ds, lora_a, keep) -> None:
    """``dx += keep * (dS A^T)`` in dx's own storage (one ``(B, L, d_in)`` tensor, not three)."""
    a_t = lora_a.to(dx.dtype).transpose(-1, -2)
    if keep is not None:
        low = torch.matmul(ds, a_t)
        dx.add_(torch.where(keep, low, low.new_zeros(())))
    elif a_t.dim() == 3:
        dx.baddbmm_(ds, a_t)
    else:
        rows = dx.shape[0] * dx.shape[1]
        dx.view(rows, dx.shape[-1]).addmm_(ds.reshape(rows, ds.shape[-1]), a_t)


def _lora_a_grad(x, ds, lora_a, keep) -> torch.Tensor:
    """``dA = x_d^T dS`` (per sample for a 3-D A), ``x_d = keep * x``, in A's dtype."""
    if keep is not None:
        x = torch.where(keep, x, x.new_zeros(()))
    if lora_a.dim() == 3:
        da = torch.bmm(x.transpose(1, 2), ds)
    else:
        rows = x.shape[0] * x.shape[1]
        da = x.reshape(rows, x.shape[-1]).transpose(0, 1) @ ds.reshape(rows, ds.shape[-1])
    return da.to(lora_a.dtype)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    need_s: bool = True,
    dropout: Optional[tuple] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return ``(y, s)``: y ``(B, L, d_out)`` in x's dtype, ``s = scaling * x A`` (see s_dtype).

    ``need_s=False`` (no backward will follow: the decode hot path) returns ``(y, None)`` and
    puts the scale on the expand's ``alpha`` instead of multiplying ``x A`` (an elementwise op
    with a Python scalar costs more host time than the GEMMs at decode); in 16-bit ``x A`` is
    then rounded before it is scaled rather than after (the same when the scale is a power of
    two, e.g. alpha 32 at r 16).

    ``dropout``: ``None`` or ``(p, seed, offset)``: the shrink reads ``dropout(x)``
    (:mod:`llmrec_kernels.dropout`), the base GEMM ``x``.
    """
    dt = x.dtype
    # Casts only where the dtypes differ: every call is host cost at decode.
    a = lora_a if lora_a.dtype is dt else lora_a.to(dt)
    x_lr = x
    if dropout is not None:
        x_lr, inv_keep = _dropped(x, dropout)
        scaling = scaling * inv_keep
    shrunk = torch.bmm(x_lr, a) if a.dim() == 3 else torch.matmul(x_lr, a)
    if bias is not None and bias.dtype is not dt:
        bias = bias.to(dt)
    y = F.linear(x, weight, bias)
    if not y.is_contiguous():
        y = y.contiguous()
    shape = x.shape
    rows = shape[0] * shape[1]  # explicit: view(-1, 0) is ambiguous when d_out is 0
    b = lora_b if lora_b.dtype is dt else lora_b.to(dt)
    y2 = y.view(rows, weight.shape[0])
    if not need_s:
        y2.addmm_(shrunk.view(rows, a.shape[-1]), b.t(), alpha=scaling)
        return y, None
    if dt != torch.float32:
        shrunk = shrunk.to(s_dtype(dt))
    # In place: shrunk is the freshly made product (or its fresh cast), never an input.
    shrunk.mul_(scaling)
    s2 = shrunk.view(rows, shrunk.shape[-1])
    # Expand into y's own storage: no second (M, d_out) temporary.
    y2.addmm_(s2 if dt == torch.float32 else s2.to(dt), b.t())
    return y, shrunk


def forward_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    sizes: tuple[int, ...],
    dropout: Optional[tuple] = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`forward` with the output rows of ``weight``/``lora_b`` split by ``sizes``.

    Returns ``([y_j (B, L, d_j)], s)``: each ``y_j`` its own contiguous tensor (so each can be
    freed on its own), one shared ``s = scaling * x A`` (the shrink runs once; with
    ``dropout``, one mask serves every output).
    """
    dt = x.dtype
    a = lora_a if lora_a.dtype == dt else lora_a.to(dt)
    x_lr = x
    if dropout is not None:
        x_lr, inv_keep = _dropped(x, dropout)
        scaling = scaling * inv_keep
    shrunk = torch.bmm(x_lr, a) if a.dim() == 3 else torch.matmul(x_lr, a)
    if dt != torch.float32:
        shrunk = shrunk.to(s_dtype(dt))
    shrunk.mul_(scaling)
    rows = x.shape[0] * x.shape[1]
    s2 = shrunk.view(rows, shrunk.shape[-1])
    s2 = s2 if dt == torch.float32 else s2.to(dt)
    b = lora_b if lora_b.dtype == dt else lora_b.to(dt)
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    outs, start = [], 0
    for size in sizes:
        stop = start + size
        y = F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])
        if not y.is_contiguous():
            y = y.contiguous()
        y.view(rows, size).addmm_(s2, b[start:stop].t())
        outs.append(y)
        start = stop
    return outs, shrunk


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dA, dB)``; an unneeded one is an empty tensor.

    ``dropout``: the forward's ``(p, seed, offset)``; the mask is regenerated. With
    ``x_d = x * keep`` and ``dS = s/(1-p) dy B``: ``dx = dy W + keep * (dS A^T)``,
    ``dA = x_d^T dS``. One output of :func:`backward_multi`.
    """
    dx, da, dbs = backward_multi(
        (dy,), x, weight, lora_a, lora_b, s_scaled, scaling, (weight.shape[0],),
        need_dx, need_da, (need_db,), dropout,
    )  # fmt: skip
    empty = x.new_empty(0)
    return (
        dx if need_dx else empty,
        da if need_da else empty,
        dbs[0] if need_db else empty,
    )


def backward_multi(
    dys: tuple[torch.Tensor, ...],
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s_scaled: torch.Tensor,
    scaling: float,
    sizes: tuple[int, ...],
    need_dx: bool,
    need_da: bool,
    need_dbs: tuple[bool, ...],
    dropout: Optional[tuple] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[Optional[torch.Tensor]]]:
    """Gradients of :func:`forward_multi`: ``(dx, dA, [dB_j])``, ``None`` where not needed.

    ``dys[j]``: the gradient of output ``j`` (``(B, L, d_j)``); ``weight``/``lora_b`` hold the
    outputs' rows stacked in ``sizes`` order. The outputs share ``x`` and ``A``, so their
    low-rank gradients are summed before they meet ``A``: one ``dS = s/(1-p) sum_j dy_j B_j``,
    then one ``dS A^T`` for dx and one ``x^T dS`` for dA, where a backward per output would
    cast A, multiply by it and add its dx and dA once per output. ``dy_j W_j`` accumulates
    into one dx buffer (no concatenation of the ``dy_j``).
    """
    dt = x.dtype
    rows = x.shape[0] * x.shape[1]
    keep = None
    if dropout is not None and (need_dx or need_da):
        keep = dropout_mask(tuple(x.shape), dropout[0], dropout[1], dropout[2], x.device)
        scaling = scaling * keep_scale(dropout[0])
    b = lora_b if lora_b.dtype == dt else lora_b.to(dt)
    ds = dx = da = None
    dbs: list[Optional[torch.Tensor]] = [None] * len(sizes)
    s2 = s_scaled.reshape(rows, s_scaled.shape[-1]).to(dt) if any(need_dbs) else None
    start = 0
    for j, (dy, size) in enumerate(zip(dys, sizes)):
        stop = start + size
        dy2 = dy.reshape(rows, size)
        if need_dx or need_da:
            part = dy2 @ b[start:stop]  # (rows, r)
            ds = part if ds is None else ds.add_(part)
        if need_dx:
            if dx is None:
                dx = dy2 @ weight[start:stop]
            else:
                dx.addmm_(dy2, weight[start:stop])
        if need_dbs[j]:
            dbs[j] = (dy2.transpose(0, 1) @ s2).to(lora_b.dtype)
        start = stop
    if ds is not None:
        ds = ds.mul_(scaling).view(*x.shape[:2], ds.shape[-1])
    if need_dx:
        dx = dx.view(x.shape)
        _add_lowrank_dx(dx, ds, lora_a, keep)
    if need_da:
        da = _lora_a_grad(x, ds, lora_a, keep)
    return dx, da, dbs
