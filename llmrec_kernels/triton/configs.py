"""Tile configurations of the Triton kernels, chosen per shape from small fixed tables.

No ``triton.autotune``: a fixed table keeps the first call fast, makes every configuration the
dispatcher can pick enumerable (the ahead-of-time compile test checks each one for sm_80 and
sm_90, spills included), and works under the interpreter, where one small configuration is used.

The tables follow the shape classes of docs/design.md §4: decode-sized ``M`` (a few rows)
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
DTYPE_PRECISIONS = (
    (torch.float16, "tf32"),
    (torch.bfloat16, "tf32"),
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
)


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


def _gemm_table(
    kernel: str, dtype: torch.dtype, block_rank: int, dropout: bool = False
) -> tuple[tuple[int, GemmConfig], ...]:
    """``(max rows, config)`` pairs for ``kernel`` ("fwd" or "bwd_dx"), smallest first.

    fp32 dots without TF32 run on FMA units, whose operands live in registers: fp32 gets
    smaller tiles and more warps per tile (the sizes are the largest that ptxas assembles
    without spills for sm_80 and sm_90 at every rank). The dx kernel carries ``dS`` and per-sample ``A`` tiles beside its
    accumulator, so at ranks of 64 and more its widest tile is halved; with LoRA dropout too
    (its Philox mask over the whole output tile spilled 100-700 bytes at 128 x 128).
    """
    if dtype == torch.float32:
        small = (16, GemmConfig(16, 64, 32, 1, 4, 2))
        mid = GemmConfig(32, 64, 32, 1, 8, 2)
        if kernel == "bwd_dx":
            # 4 warps spill a few bytes on sm_80 for some specialisations (per-sample A, L = 1).
            return ((1 << 62, GemmConfig(32, 64, 32, 1, 8, 1)),)
        # BLOCK_K 32 spills 8 bytes on sm_90 at R_CHUNK 16 (IEEE fp32, ranks <= 16).
        return (small, (32, mid), (1 << 62, GemmConfig(64, 64, 16, 4, 8, 2)))
    big = GemmConfig(128, 128, 64, 8, 8, 3)
    smallest = GemmConfig(16, 64, 128, 1, 4, 3)
    if kernel == "bwd_dx" and block_rank >= 64:
        big = GemmConfig(128, 64, 64, 8, 8, 3)
        # Three stages spill 8 bytes on sm_80 at M = 1 (the dS-from-memory epilogue).
        smallest = GemmConfig(16, 64, 128, 1, 4, 2)
    elif kernel == "bwd_dx" and dropout:
        big = GemmConfig(128, 64, 64, 8, 8, 3)
    return (
        (16, smallest),
        (32, GemmConfig(32, 64, 128, 1, 4, 3)),
        (64, GemmConfig(64, 64, 64, 4, 4, 3)),
        (1 << 62, big),
    )


def gemm_config(
    kernel: str, rows: int, dtype: torch.dtype, rank: int, dropout: bool = False
) -> GemmConfig:
    """Tile config of ``kernel`` ("fwd" or "bwd_dx") over ``rows`` flat rows (``M = B * L``).

    ``dropout``: the launch applies LoRA dropout (only the dx kernel's tiles change).
    """
    if interpreter_enabled():
        return _INTERPRETER_GEMM
    table = _gemm_table(kernel, dtype, block_r(rank), dropout)
    return next(cfg for max_rows, cfg in table if rows <= max_rows)


def _shrink_table(dtype: torch.dtype) -> tuple[tuple[int, ShrinkConfig], ...]:
    """``(max rows per sample, config)`` pairs, smallest first."""
    block_k = 32 if dtype == torch.float32 else 128
    return ((16, ShrinkConfig(16, block_k, 4, 3)), (1 << 62, ShrinkConfig(64, block_k // 2, 4, 3)))


def _reduce_gpu_config(dtype: torch.dtype, block_rank: int) -> ReduceConfig:
    """Spill-free on sm_80 and sm_90 at every specialisation the AOT check traces.

    IEEE fp32 at ``BLOCK_P`` 64 spilled up to 448 bytes on sm_80 (one row per group, L = 1);
    16-bit at rank 128 needs 8 warps over a 32 x 32 tile.
    """
    if dtype == torch.float32:
        return ReduceConfig(32, 32, 4, 3)
    if block_rank <= 64:
        return ReduceConfig(64, 64, 4, 3)
    return ReduceConfig(32, 32, 8, 3)


def shrink_config(rows_per_sample: int, dtype: torch.dtype) -> ShrinkConfig:
    """Tile config of the shrink ``x A`` for samples of ``rows_per_sample`` rows."""
    if interpreter_enabled():
        return _INTERPRETER_SHRINK
    return next(cfg for max_rows, cfg in _shrink_table(dtype) if rows_per_sample <= max_rows)


def reduce_config(dtype: torch.dtype, rank: int) -> ReduceConfig:
    """Tile config of the row reductions ``x^T dS`` and ``dy^T S``."""
    if interpreter_enabled():
        return _INTERPRETER_REDUCE
    return _reduce_gpu_config(dtype, block_r(rank))


def all_configs() -> Iterator[tuple[str, torch.dtype, str, int, object]]:
    """Every ``(kernel, dtype, input precision, BLOCK_R, config)`` the dispatcher can choose.

    fp32 appears twice: IEEE dots (PyTorch's default) and TF32 (``allow_tf32``).
    """
    for dtype, precision in DTYPE_PRECISIONS:
        for rank_block in _RANK_BLOCKS:
            for kernel in ("fwd", "bwd_dx"):
                for _, cfg in _gemm_table(kernel, dtype, rank_block):
                    yield kernel, dtype, precision, rank_block, cfg
            for _, cfg in _shrink_table(dtype):
                yield "shrink", dtype, precision, rank_block, cfg
            yield "reduce", dtype, precision, rank_block, _reduce_gpu_config(dtype, rank_block)
