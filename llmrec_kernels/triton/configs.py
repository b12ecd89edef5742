"""Tile configurations of the Triton kernels, chosen per shape from small fixed tables.

No ``triton.autotune``: a fixed table keeps the first call fast, makes every configuration the
dispatcher can pick enumerable (the ahead-of-time compile test checks each one for sm_80 and
sm_90, spills included), and works under the interpreter, where one small configuration is used.

The tables follow the shape classes of DESIGN.md section 4: decode-sized ``M`` (a few rows)
must not pay for a 128-row tile, so the row tile grows with ``M``; the 128 x 128 tile uses 8
warps because 4 warps spill there on sm_90.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from llmrec_kernels.backends import MAX_TRITON_RANK, interpreter_enabled

__all__ = [
    "GemmConfig",
    "ReduceConfig",
    "ShrinkConfig",
    "all_configs",
    "block_r",
    "gemm_config",
    "reduce_config",
    "shrink_config",
]

_RANK_BLOCKS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of the forward GEMM and of the backward ``dx`` GEMM (``BLOCK_N`` = output cols)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class ShrinkConfig:
    BLOCK_M: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    BLOCK_P: int
    BLOCK_ROWS: int
    num_warps: int
    num_stages: int


def block_r(rank: int) -> int:
    """Padded rank tile: the next power of two, at least 16 (the smallest MMA K)."""
    if not 1 <= rank <= MAX_TRITON_RANK:
        raise ValueError(
            f"rank must be in [1, {MAX_TRITON_RANK}] for the Triton kernels, got {rank}"
        )
    return max(16, 1 << (rank - 1).bit_length())


_INTERPRETER_GEMM = GemmConfig(32, 32, 32, 4, 4, 1)
_INTERPRETER_SHRINK = ShrinkConfig(16, 32, 4, 1)
_INTERPRETER_REDUCE = ReduceConfig(32, 32, 4, 1)


def _gemm_table(dtype: torch.dtype, block_rank: int) -> tuple[tuple[int, GemmConfig], ...]:
    """``(max rows, config)`` pairs, smallest first; the last entry has no row limit."""
    wide = dtype == torch.float32
    big_k = 32 if wide else 64
    stages = 3 if not wide else 2
    big = GemmConfig(128, 128, big_k, 8, 8, stages)
    if block_rank >= 128:
        # A 128-wide rank tile next to a 128 x 128 accumulator exceeds the register budget.
        big = GemmConfig(128, 64, big_k, 8, 8, stages)
    return (
        (16, GemmConfig(16, 64, 64 if wide else 128, 1, 4, 3)),
        (32, GemmConfig(32, 64, 64 if wide else 128, 1, 4, 3)),
        (64, GemmConfig(64, 64, big_k, 4, 4, 3)),
        (1 << 62, big),
    )


def gemm_config(rows: int, dtype: torch.dtype, rank: int) -> GemmConfig:
    """Tile config for a GEMM over ``rows`` flat rows (``M = B * L``)."""
    if interpreter_enabled():
        return _INTERPRETER_GEMM
    return next(cfg for max_rows, cfg in _gemm_table(dtype, block_r(rank)) if rows <= max_rows)


def _shrink_table(dtype: torch.dtype) -> tuple[tuple[int, ShrinkConfig], ...]:
    """``(max rows per sample, config)`` pairs, smallest first."""
    block_k = 64 if dtype == torch.float32 else 128
    return ((16, ShrinkConfig(16, block_k, 4, 3)), (1 << 62, ShrinkConfig(64, block_k // 2, 4, 3)))


def _reduce_gpu_config(dtype: torch.dtype) -> ReduceConfig:
    return ReduceConfig(64, 32 if dtype == torch.float32 else 64, 4, 3)


def shrink_config(rows_per_sample: int, dtype: torch.dtype) -> ShrinkConfig:
    """Tile config of the shrink ``x A`` for samples of ``rows_per_sample`` rows."""
    if interpreter_enabled():
        return _INTERPRETER_SHRINK
    return next(cfg for max_rows, cfg in _shrink_table(dtype) if rows_per_sample <= max_rows)


def reduce_config(dtype: torch.dtype) -> ReduceConfig:
    """Tile config of the row reductions ``x^T dS`` and ``dy^T S``."""
    if interpreter_enabled():
        return _INTERPRETER_REDUCE
    return _reduce_gpu_config(dtype)


def all_configs() -> Iterator[tuple[str, torch.dtype, int, object]]:
    """Every ``(kernel, dtype, BLOCK_R, config)`` the dispatcher can choose on a GPU."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for rank_block in _RANK_BLOCKS:
            for _, cfg in _gemm_table(dtype, rank_block):
                yield "fwd", dtype, rank_block, cfg
                yield "bwd_dx", dtype, rank_block, cfg
            for _, cfg in _shrink_table(dtype):
                yield "shrink", dtype, rank_block, cfg
            yield "reduce", dtype, rank_block, _reduce_gpu_config(dtype)
