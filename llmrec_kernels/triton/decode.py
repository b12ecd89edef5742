"""The Triton decode path that CUDA graphs can capture (issue 25 item 2).

Three launches, every shape static, nothing read back to the host, nothing allocated when
the caller gives ``out`` and ``workspace`` (:func:`llmrec_kernels.decode.cora_linear_decode`):

1. the base product ``out = x W^T (+ bias)`` on cuBLAS (``torch.mm``/``torch.addmm`` into
   ``out``: a GEMV at decode, where cuBLAS is at the bandwidth limit);
2. the split-K shrink (:func:`~llmrec_kernels.triton.shrink_splitk._cora_shrink_splitk_kernel`)
   into fp32 partials in ``workspace`` (``(SPLIT, M, r)``), or the plain shrink into
   ``workspace`` (``SPLIT = 1``) where the dispatcher does not split (and under the
   interpreter);
3. one expand-add (:func:`~llmrec_kernels.triton.shrink_splitk._cora_splitk_expand_add_kernel`)
   that sums the partials in a fixed order, scales them and adds ``S B^T`` into ``out``: the
   split-K reduction and the expand in one kernel.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from llmrec_kernels.triton import cora_linear as _launcher
from llmrec_kernels.triton.configs import block_r
from llmrec_kernels.triton.launch import LaunchMeta, launch
from llmrec_kernels.triton.shrink_splitk import _cora_splitk_expand_add_kernel

__all__ = ["forward_into", "workspace_numel"]

# The expand-add's tiles: 16 rows (decode batches) by 64 columns, 4 warps; at B 32, d_out
# 4096 that is 128 programs, one wave on an H100/H200.
# The rank is walked 16 at a time: a whole rank-128 B tile in fp32 spilled (AOT check).
EXPAND_BLOCK_M, EXPAND_BLOCK_N, EXPAND_WARPS, EXPAND_R_CHUNK = 16, 64, 4, 16


def _plans(x: torch.Tensor, lora_a: torch.Tensor, rank: int, k_split: Optional[int]):
    """``(layout, split-K plan or None, plain shrink plan or None)`` of the shrink."""
    layout = _launcher._shrink_layout(x, lora_a.dim() == 2)
    key = _launcher._key(x.dtype)
    split = _launcher._splitk_plan(
        layout[0], layout[1], x.shape[-1], rank, key, _launcher._gpu_spec(x), k_split
    )
    plain = None if split is not None else _launcher._shrink_plan(layout[0], layout[1], rank, key)
    return layout, split, plain


def workspace_numel(x: torch.Tensor, lora_a: torch.Tensor, k_split: Optional[int] = None) -> int:
    """fp32 elements :func:`forward_into` needs for ``x`` ``(B, L, d_in)`` and ``lora_a``:
    ``SPLIT * B * L * r`` (``SPLIT`` 1 without split-K)."""
    rank = lora_a.shape[-1]
    _, split, _ = _plans(x, lora_a, rank, k_split)
    return (split[0] if split is not None else 1) * x.shape[0] * x.shape[1] * rank


@functools.lru_cache(maxsize=1024)
def _expand_plan(rows: int, cols: int, rank: int) -> tuple:
    grid = (-(-rows // EXPAND_BLOCK_M), -(-cols // EXPAND_BLOCK_N))
    meta = LaunchMeta(
        BLOCK_M=EXPAND_BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=block_r(rank),
        R_CHUNK=min(block_r(rank), EXPAND_R_CHUNK), INPUT_PRECISION="ieee",
        num_warps=EXPAND_WARPS, num_stages=1,
    )  # fmt: skip
    return grid, meta


def forward_into(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    out: torch.Tensor,
    workspace: torch.Tensor,
    k_split: Optional[int] = None,
) -> torch.Tensor:
    """``out (B, L, d_out) = x W^T + bias + scaling (x A) B^T`` in place; returns ``out``.

    ``x`` ``(B, L, d_in)`` (rows viewable as ``(B * L, d_in)``), ``out`` contiguous in x's
    dtype, ``workspace`` contiguous fp32 with at least :func:`workspace_numel` elements.
    ``k_split``: K elements per split instead of the dispatcher's choice (tests). Ranks that
    are not multiples of 16 copy A and B zero-padded (the kernels' vectorised loads).
    """
    batch, length, k = x.shape
    n, rank, rows = weight.shape[0], lora_a.shape[-1], batch * length
    out2 = out.view(rows, n)
    x2 = x.view(rows, k) if x.is_contiguous() else x.reshape(rows, k)
    with _launcher._device_guard(x):
        if bias is None:
            torch.mm(x2, weight.t(), out=out2)
        else:
            torch.addmm(bias, x2, weight.t(), out=out2)
        if rows == 0 or n == 0:
            return out
        layout, split_plan, plain_plan = _plans(x, lora_a, rank, k_split)
        split = split_plan[0] if split_plan is not None else 1
        lora_a, lora_b = _launcher._pad_rank(lora_a), _launcher._pad_rank(lora_b)
        a_strides = _launcher._a_strides(lora_a)
        if split_plan is not None:
            _, k_per_split, grid, meta, _, _ = split_plan
            launch(
                _launcher._cora_shrink_splitk_kernel, grid,
                (x, lora_a, workspace),
                (layout[1], k, rank, k_per_split, *layout[2:], *a_strides, rows * rank, rank),
                meta,
            )  # fmt: skip
        else:
            grid, meta = plain_plan
            partial = workspace[: rows * rank].view(batch, length, rank)
            launch(
                _launcher._cora_shrink_kernel, grid,
                (x, lora_a, partial), (layout[1], k, rank, *layout[2:], *a_strides, 1.0), meta,
            )  # fmt: skip
        grid, meta = _expand_plan(rows, n, rank)
        sbn, sbr = lora_b.stride()
        launch(
            _cora_splitk_expand_add_kernel, grid,
            (workspace, lora_b, out2),
            (rows, n, rank, split, rows * rank, rank, sbn, sbr, n, 1, float(scaling)),
            meta,
        )  # fmt: skip
    return out
