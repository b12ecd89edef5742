"""Fused-projection (q/k/v) forward and backward built from a backend's one-projection calls.

Backends whose kernels compute one projection per call (Triton, CUDA) get their
``forward_multi``/``backward_multi`` from :func:`per_projection`, one factory over their
one-projection functions; the torch backend has its own, which runs
the shrink once and sums the outputs' low-rank gradients before they meet ``A``. The
``forward``/``backward`` passed in have the one-projection signature of
:class:`llmrec_kernels.backends.CoraBackend` (they may be the backend's functions or the
registered custom ops' wrappers, under ``torch.compile``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["backward_multi", "forward_multi", "per_projection"]


def forward_multi(
    forward: Callable,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    sizes: tuple[int, ...],
    dropout: Optional[tuple] = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([y_j (B, L, d_j)], s_scaled)``: one ``forward`` per row block of ``weight`` (each
    recomputes the rank-``r`` shrink, an ``r / d_j`` fraction of its GEMM); the first
    projection's ``s_scaled`` is kept (every projection's is the same)."""
    outs, s, start = [], None, 0
    for size in sizes:
        stop = start + size
        y, s_j = forward(
            x, weight[start:stop], lora_a, lora_b[start:stop],
            None if bias is None else bias[start:stop], scaling, s is None, dropout,
        )  # fmt: skip
        outs.append(y)
        s = s_j if s is None else s
        start = stop
    return outs, s


def backward_multi(
    backward: Callable,
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
    """``(dx, dA, [dB_j])`` of :func:`forward_multi`: one ``backward`` per projection, the
    projections' dx and dA summed in place; ``None`` where not needed."""
    dx = da = None
    dbs: list[Optional[torch.Tensor]] = [None] * len(sizes)
    start = 0
    for j, (dy, size) in enumerate(zip(dys, sizes)):
        stop = start + size
        if need_dx or need_da or need_dbs[j]:
            gx, ga, gb = backward(
                dy, x, weight[start:stop], lora_a, lora_b[start:stop], s_scaled, scaling,
                need_dx, need_da, need_dbs[j], dropout,
            )  # fmt: skip
            if need_dx:
                dx = gx if dx is None else dx.add_(gx)
            if need_da:
                da = ga if da is None else da.add_(ga)
            dbs[j] = gb if need_dbs[j] else None
        start = stop
    return dx, da, dbs


def per_projection(forward: Callable, backward: Callable) -> tuple[Callable, Callable]:
    """A backend's ``(forward_multi, backward_multi)``, with the signatures of
    :class:`llmrec_kernels.backends.CoraBackend`, from its one-projection ``forward`` and
    ``backward``: :func:`forward_multi` and :func:`backward_multi` bound to them (written
    once for every backend that computes one projection per call)."""

    def forward_multi_bound(x, weight, lora_a, lora_b, bias, scaling, sizes, dropout=None):
        return forward_multi(forward, x, weight, lora_a, lora_b, bias, scaling, sizes, dropout)

    def backward_multi_bound(
        dys, x, weight, lora_a, lora_b, s_scaled, scaling, sizes, need_dx, need_da, need_dbs,
        dropout=None,
    ):  # fmt: skip
        return backward_multi(
            backward, dys, x, weight, lora_a, lora_b, s_scaled, scaling, sizes, need_dx,
            need_da, need_dbs, dropout,
        )  # fmt: skip

    forward_multi_bound.__doc__ = forward_multi.__doc__
    backward_multi_bound.__doc__ = backward_multi.__doc__
    forward_multi_bound.__name__, backward_multi_bound.__name__ = "forward_multi", "backward_multi"
    return forward_multi_bound, backward_multi_bound
