"""Factored PyTorch implementation of the CoRA linear forward and backward (no autograd).

The ``"torch"`` backend of :func:`llmrec_kernels.fused_cora_linear`: the CPU default and the
fallback for shapes the kernels do not cover. It never forms a dense per-sample weight and
never upcasts full activations; only the ``(B, L, r)`` intermediates are kept in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llmrec_kernels.backends import CoraShapes, supports_from
from llmrec_kernels.dropout import dropout_mask, keep_scale

__all__ = [
    "HAS_DROPOUT",
    "SUPPORT_DEPENDS_ON_ENV",
    "TRACEABLE",
    "backward",
    "backward_multi",
    "check_supported",
    "forward",
    "forward_multi",
    "s_dtype",
    "supports",
]

TRACEABLE = True  # plain PyTorch ops: torch.compile traces them
HAS_DROPOUT = True
SUPPORT_DEPENDS_ON_ENV = False


def check_supported(shapes: CoraShapes, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``TypeError`` for a non-floating dtype; every shape and device is supported."""
    if not dtype.is_floating_point:
        raise TypeError(f"backend='torch' needs a floating-point dtype, got {dtype}")


supports = supports_from(check_supported)


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
    a_t = (lora_a if lora_a.dtype is dx.dtype else lora_a.to(dx.dtype)).transpose(-1, -2)
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
        # One token per sample (decode-sized training): each dA_b is an outer product, and a
        # broadcast multiply is one elementwise kernel where a bmm with K = 1 runs a GEMM
        # (about 4x slower on a CPU at B 32, d 256, r 16).
        x_t = x.transpose(1, 2)
        da = x_t * ds if x.shape[1] == 1 else torch.bmm(x_t, ds)
    else:
        rows = x.shape[0] * x.shape[1]
        da = x.reshape(rows, x.shape[-1]).transpose(0, 1) @ ds.reshape(rows, ds.shape[-1])
    return da if da.dtype is lora_a.dtype else da.to(lora_a.dtype)


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
    """Gradients ``(dx, dA, dB)``; an unneeded one is ``None``.

    ``dropout``: the forward's ``(p, seed, offset)``; the mask is regenerated. With
    ``x_d = x * keep`` and ``dS = s/(1-p) dy B``: ``dx = dy W + keep * (dS A^T)``,
    ``dA = x_d^T dS``. One output of :func:`backward_multi`.
    """
    if dropout is not None:
        dx, da, dbs = backward_multi(
            (dy,), x, weight, lora_a, lora_b, s_scaled, scaling, (weight.shape[0],),
            need_dx, need_da, (need_db,), dropout,
        )  # fmt: skip
        return dx, da, dbs[0]
    # The common case written out: backward_multi's generality is host time per call.
    dt = x.dtype
    batch, length = x.shape[0], x.shape[1]
    rows = batch * length
    dy2 = dy.reshape(rows, dy.shape[-1])
    dx = da = db = None
    if need_db:
        s2 = s_scaled.reshape(rows, s_scaled.shape[-1])
        db = dy2.transpose(0, 1) @ (s2 if s2.dtype is dt else s2.to(dt))
        db = db if db.dtype is lora_b.dtype else db.to(lora_b.dtype)
    if need_dx or need_da:
        ds = dy2 @ (lora_b if lora_b.dtype is dt else lora_b.to(dt))  # (rows, r)
        ds = ds.mul_(scaling).view(batch, length, ds.shape[-1])
        if need_dx:
            dx = (dy2 @ weight).view(x.shape)
            _add_lowrank_dx(dx, ds, lora_a, None)
        if need_da:
            da = _lora_a_grad(x, ds, lora_a, None)
    return dx, da, db


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
    # Casts only where the dtypes differ: a no-op .to() still costs host time per call.
    b = lora_b if lora_b.dtype is dt else lora_b.to(dt)
    ds = dx = da = None
    dbs: list[Optional[torch.Tensor]] = [None] * len(sizes)
    s2 = None
    if any(need_dbs):
        s2 = s_scaled.reshape(rows, s_scaled.shape[-1])
        s2 = s2 if s2.dtype is dt else s2.to(dt)
    one = len(sizes) == 1  # one projection: no slicing (a view is a dispatched op too)
    start = 0
    for j, (dy, size) in enumerate(zip(dys, sizes)):
        stop = start + size
        dy2 = dy.reshape(rows, size)
        if need_dx or need_da:
            b_j = b if one else b[start:stop]
            if ds is None:
                ds = dy2 @ b_j  # (rows, r)
            else:
                ds.addmm_(dy2, b_j)
        if need_dx:
            w_j = weight if one else weight[start:stop]
            if dx is None:
                dx = dy2 @ w_j
            else:
                dx.addmm_(dy2, w_j)
        if need_dbs[j]:
            db = dy2.transpose(0, 1) @ s2
            dbs[j] = db if db.dtype is lora_b.dtype else db.to(lora_b.dtype)
        start = stop
    if ds is not None:
        ds = ds.mul_(scaling).view(*x.shape[:2], ds.shape[-1])
    if need_dx:
        dx = dx.view(x.shape)
        _add_lowrank_dx(dx, ds, lora_a, keep)
    if need_da:
        da = _lora_a_grad(x, ds, lora_a, keep)
    return dx, da, dbs
