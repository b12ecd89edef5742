"""Tile configurations of the Triton kernels, chosen per shape from small fixed tables.

No ``triton.autotune``: a fixed table keeps the first call fast, makes every configuration the
dispatcher can pick enumerable (the ahead-of-time compile test checks each one for sm_80 and
sm_90, spills included), and works under the interpreter, where one small configuration is used.

The tables follow the shape classes of docs/design.md §4: decode-sized ``M`` (a few rows)
must not pay for a 128-row tile, so the row tile grows with ``M``; the 128 x 128 tile uses 8
warps because 4 warps spill there on sm_90.

Above the decode classes the tile is chosen by occupancy, not by ``M`` alone (issue 16): the
largest tile is kept only when its grid fills about one wave of the GPU's SMs
(:data:`FULL_WAVE` of ``sm_count``, from the device's properties or, for the AOT and CPU
paths, :mod:`llmrec_kernels.triton.dispatch`'s default per arch); otherwise the next smaller
tile of the table. M = 128 with N = 4096 thus launches 128 CTAs of 64 x 64 on 132 SMs, not
32 of 128 x 128. The split-K shrink (``"shrink_splitk"``) reuses the shrink tiles; when to
split is decided in :mod:`llmrec_kernels.triton.dispatch` (its cost model).

Batch-invariant mode (:func:`llmrec_kernels.batch_invariant`) takes every tile from
:data:`BATCH_INVARIANT_ROWS`'s class whatever ``M`` is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from llmrec_kernels.backends import MAX_TRITON_RANK, interpreter_enabled

__all__ = [
    "BATCH_INVARIANT_ROWS",
    "FULL_WAVE",
    "GemmConfig",
    "ReduceConfig",
    "ShrinkConfig",
    "SplitReduceConfig",
    "all_configs",
    "block_r",
    "gemm_config",
    "reduce_config",
    "shrink_config",
    "split_reduce_config",
]

# A grid of at least this fraction of the SM count counts as one full wave.
FULL_WAVE = 0.9
# Batch-invariant mode: the row class every M gets (the largest GEMM tile, the 16-row shrink).
BATCH_INVARIANT_ROWS = 1 << 62

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
    # Ranks per step of the low-rank epilogue that reads S (or dS) from memory.
    R_CHUNK: int = 32


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


@dataclasses.dataclass(frozen=True)
class SplitReduceConfig:
    """The fixed-order sum of the split-K partials: ``BLOCK`` elements of ``S`` per program."""

    BLOCK: int
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
_SPLIT_REDUCE = SplitReduceConfig(512, 4, 1)


def _gemm_table(
    kernel: str, dtype: torch.dtype, block_rank: int, dropout: bool = False
) -> tuple[tuple[int, GemmConfig], ...]:
    """``(max rows, config)`` pairs for ``kernel`` ("fwd" or "bwd_dx"), smallest first.

    fp32 dots without TF32 run on FMA units, whose operands live in registers: fp32 gets
    smaller tiles and more warps per tile (the sizes are the largest that ptxas assembles
    without spills for sm_80 and sm_90 at every rank). The dx kernel carries ``dS`` and
    per-sample ``A`` tiles beside its accumulator, so at ranks of 64 and more its widest tile is
    halved; with LoRA dropout too (its Philox mask over the whole output tile spilled 100-700
    bytes at 128 x 128), and in fp32 its only tile has half the output columns.
    """
    if dtype == torch.float32:
        small = (16, GemmConfig(16, 64, 32, 1, 4, 2))
        mid = GemmConfig(32, 64, 32, 1, 8, 2)
        if kernel == "bwd_dx" and dropout:
            # With the mask, 32 x 64 spilled 4-12 bytes (sm_80 at every rank, sm_90 at rank <= 16
            # decode), and so did 16 x 64 and 32 x 64 x 16 (sm_80) and 32 x 64 on 4 warps (sm_90);
            # 32 x 32 (4 output elements per thread) with 32 ranks per epilogue step still
            # spilled 4 bytes on sm_90 (TF32, 3 specialisations), and on 4 warps or with
            # BLOCK_K 16 on sm_80; 16 ranks per step is spill-free on both, IEEE and TF32.
            # Without the mask 32 x 32 spills 4 bytes (IEEE, sm_80, rank >= 64).
            return ((1 << 62, GemmConfig(32, 32, 32, 1, 8, 1, R_CHUNK=16)),)
        if kernel == "bwd_dx":
            # 4 warps spill a few bytes on sm_80 for some specialisations (per-sample A, L = 1),
            # and so did BLOCK_K 32 with shared A at ranks 64/128 (TF32, sm_80, M 32/64). There
            # BLOCK_K 16 is spill-free on sm_80 and sm_90, IEEE and TF32; at ranks up to 32 it
            # would narrow the fused dS pass's loads of Bm to 4 bytes, so they keep 32.
            return ((1 << 62, GemmConfig(32, 64, 16 if block_rank >= 64 else 32, 1, 8, 1)),)
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
    kernel: str,
    rows: int,
    dtype: torch.dtype,
    rank: int,
    cols: int | None = None,
    sm_count: int | None = None,
    batch_invariant: bool = False,
    dropout: bool = False,
) -> GemmConfig:
    """Tile config of ``kernel`` ("fwd" or "bwd_dx") over ``rows`` flat rows (``M = B * L``).

    ``cols``: output columns (N for "fwd", K for "bwd_dx"); with ``sm_count`` the tile is
    chosen by occupancy (:func:`gemm_gpu_config`), without them from ``rows`` alone.
    ``dropout``: the launch applies LoRA dropout (only the dx kernel's tiles change).
    """
    if interpreter_enabled():
        return _INTERPRETER_GEMM
    return gemm_gpu_config(kernel, rows, dtype, rank, cols, sm_count, batch_invariant, dropout)


def _tiles(rows: int, cols: int, cfg: GemmConfig) -> int:
    return -(-rows // cfg.BLOCK_M) * -(-cols // cfg.BLOCK_N)


def gemm_gpu_config(
    kernel: str,
    rows: int,
    dtype: torch.dtype,
    rank: int,
    cols: int | None = None,
    sm_count: int | None = None,
    batch_invariant: bool = False,
    dropout: bool = False,
) -> GemmConfig:
    """:func:`gemm_config` for a GPU, whatever the interpreter setting (the cost model's view).

    Rows up to the second-largest class keep their row-matched tile (decode: the tile's rows
    are what M needs, the columns give the parallelism). Above it, the largest tile is kept
    when ``cdiv(M, BM) * cdiv(N, BN) >= FULL_WAVE * sm_count``, else the second-largest is
    taken: a smaller tile (64 x 64 in 16-bit, a quarter of 128 x 128) multiplies the CTAs
    where the big one leaves SMs idle.
    """
    table = _gemm_table(kernel, dtype, block_r(rank), dropout)
    if batch_invariant:
        rows = BATCH_INVARIANT_ROWS
    chosen = next(i for i, (max_rows, _) in enumerate(table) if rows <= max_rows)
    cfg = table[chosen][1]
    if (
        not batch_invariant
        and cols is not None
        and sm_count is not None
        and chosen == len(table) - 1
        and chosen > 0
        and _tiles(rows, cols, cfg) < FULL_WAVE * sm_count
    ):
        cfg = table[chosen - 1][1]
    return cfg


def _shrink_table(
    dtype: torch.dtype, dropout: bool = False
) -> tuple[tuple[int, ShrinkConfig], ...]:
    """``(max rows per sample, config)`` pairs, smallest first.

    With LoRA dropout the 16-bit 64-row tile takes 8 warps: on 4 its Philox mask spilled
    8 bytes on sm_80 at rank 16 (128 registers); 8 warps are spill-free on sm_80 and sm_90 at
    every rank (BLOCK_K 32 on 4 warps was too, with one more loop step per K).
    """
    block_k = 32 if dtype == torch.float32 else 128
    warps = 8 if dropout and dtype != torch.float32 else 4
    return (
        (16, ShrinkConfig(16, block_k, 4, 3)),
        (1 << 62, ShrinkConfig(64, block_k // 2, warps, 3)),
    )


def _reduce_gpu_config(dtype: torch.dtype, block_rank: int, dropout: bool = False) -> ReduceConfig:
    """Spill-free on sm_80 and sm_90 at every specialisation the AOT check traces.

    IEEE fp32 at ``BLOCK_P`` 64 spilled up to 448 bytes on sm_80 (one row per group, L = 1);
    16-bit at rank 128 needs 8 warps over a 32 x 32 tile, and so does rank 64 with LoRA
    dropout (the mask of the 64 x 64 tile of ``x`` spilled 12-216 bytes on sm_80).
    """
    if dtype == torch.float32:
        return ReduceConfig(32, 32, 4, 3)
    if block_rank <= 32 or (block_rank == 64 and not dropout):
        return ReduceConfig(64, 64, 4, 3)
    return ReduceConfig(32, 32, 8, 3)


def shrink_config(
    rows_per_sample: int, dtype: torch.dtype, batch_invariant: bool = False, dropout: bool = False
) -> ShrinkConfig:
    """Tile config of the shrink ``x A`` (plain or split-K) for samples of ``rows_per_sample`` rows.

    Batch-invariant mode always takes the decode tile (16 rows), whatever the rows.
    ``dropout``: the launch applies LoRA dropout (plain shrink only).
    """
    if interpreter_enabled():
        return _INTERPRETER_SHRINK
    return shrink_gpu_config(rows_per_sample, dtype, batch_invariant, dropout)


def shrink_gpu_config(
    rows_per_sample: int, dtype: torch.dtype, batch_invariant: bool = False, dropout: bool = False
) -> ShrinkConfig:
    """:func:`shrink_config` for a GPU, whatever the interpreter setting."""
    rows = 1 if batch_invariant else rows_per_sample
    return next(cfg for max_rows, cfg in _shrink_table(dtype, dropout) if rows <= max_rows)


def split_reduce_config() -> SplitReduceConfig:
    """Tile config of the fixed-order sum of the split-K partials (fp32 whatever the dtype)."""
    return _SPLIT_REDUCE


def reduce_config(dtype: torch.dtype, rank: int, dropout: bool = False) -> ReduceConfig:
    """Tile config of the row reductions ``x^T dS`` and ``dy^T S``.

    ``dropout``: the launch masks ``x`` with LoRA dropout (dA of a training step).
    """
    if interpreter_enabled():
        return _INTERPRETER_REDUCE
    return _reduce_gpu_config(dtype, block_r(rank), dropout)


def all_configs() -> Iterator[tuple[str, torch.dtype, str, int, object]]:
    """Every ``(kernel, dtype, input precision, BLOCK_R, config)`` the dispatcher can choose.

    fp32 appears twice: IEEE dots (PyTorch's default) and TF32 (``allow_tf32``); the dx
    and shrink tiles of a launch with LoRA dropout are included (some repeat). The split-K
    partials' reduction (``"splitk_reduce"``) appears once, with precision ``"-"`` and no
    ``BLOCK_R``.
    """
    for dtype, precision in DTYPE_PRECISIONS:
        for rank_block in _RANK_BLOCKS:
            for kernel, dropout in (("fwd", False), ("bwd_dx", False), ("bwd_dx", True)):
                for _, cfg in _gemm_table(kernel, dtype, rank_block, dropout):
                    yield kernel, dtype, precision, rank_block, cfg
            for _, cfg in _shrink_table(dtype):
                yield "shrink", dtype, precision, rank_block, cfg
                yield "shrink_splitk", dtype, precision, rank_block, cfg
            for _, cfg in _shrink_table(dtype, dropout=True):  # the masked plain shrink
                yield "shrink", dtype, precision, rank_block, cfg
            for dropout in (False, True):
                cfg = _reduce_gpu_config(dtype, rank_block, dropout)
                yield "reduce", dtype, precision, rank_block, cfg
    # The partials are fp32 whatever the input dtype; no dot, so no input precision.
    yield "splitk_reduce", torch.float32, "-", None, _SPLIT_REDUCE
