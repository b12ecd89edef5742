"""Per-dimension standardisation of CF embedding tables (z-scores), kept as module buffers.

Why: a trained MF's entries are small (|e| of a few hundredths per dimension), and a
method that feeds them to a saturating encoder (A-LLMRec's ``Linear -> sigmoid``) maps every
item to nearly the same point: the item soft tokens the LLM sees become indistinguishable
(mean pairwise cosine 0.9988 on the SmolLM2 run of issue 29). Standardising every dimension
with the mean and standard deviation of the *training* tables gives the encoder inputs of
unit scale whatever the CF model's scale.

The statistics are buffers of :class:`Standardizer` so that a method can save them with
its trainable state: evaluation then applies the statistics training used, not ones
recomputed from whatever tables it is given.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["Standardizer", "table_statistics"]


def table_statistics(
    table: torch.Tensor, rows: Optional[torch.Tensor] = None, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of a CF table, each ``(d,)`` float32.

    ``table``: ``(n + 1, d)`` floating, row 0 the padding row (never counted). ``rows``:
    optional int64 ids of the rows to count (e.g. the users / items of the training split);
    by default every row but 0. The population standard deviation is floored at ``eps``
    times the largest one (and at ``eps``), so a constant dimension maps to 0, not to NaN.
    """
    if not torch.is_tensor(table) or table.dim() != 2 or not table.is_floating_point():
        raise TypeError(
            f"table must be a 2-D floating tensor, got {getattr(table, 'shape', table)}"
        )
    if rows is None:
        picked = table[1:]
    else:
        rows = torch.as_tensor(rows, dtype=torch.long, device=table.device).unique()
        if rows.numel() and (int(rows.min()) < 1 or int(rows.max()) >= table.shape[0]):
            raise ValueError(f"rows must be ids in [1, {table.shape[0] - 1}]")
        picked = table[rows]
    if picked.shape[0] < 2:
        raise ValueError(f"table statistics need at least 2 rows, got {picked.shape[0]}")
    picked = picked.double()
    mean = picked.mean(0)
    std = picked.std(0, unbiased=False)
    floor = max(eps, eps * float(std.max()))
    return mean.float(), std.clamp_min(floor).float()


class Standardizer(nn.Module):
    """A fixed per-dimension z-score ``(x - mean) / std`` whose statistics are buffers.

    ``mean`` and ``std`` (each ``(d,)`` float32) start as the identity (0 and 1) and are set
    by :meth:`fit`; ``enabled=False`` keeps the identity for good (raw inputs). Being an
    affine map, it changes no model class a following ``Linear`` spans, only the scale the
    following layers start from.
    """

    def __init__(self, dim: int, enabled: bool = True):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.enabled = int(dim), bool(enabled)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, table: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Set the statistics from ``table`` ``(n + 1, d)`` (row 0 padding) and optional
        ``rows`` ids (:func:`table_statistics`); a no-op when disabled."""
        if table.dim() != 2 or table.shape[1] != self.dim:
            raise ValueError(f"table must be (n + 1, {self.dim}), got {tuple(table.shape)}")
        if not self.enabled:
            return
        mean, std = table_statistics(table.detach().float(), rows)
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` in, the z-scores out (same shape and dtype)."""
        return ((x - self.mean) / self.std).to(x.dtype)
