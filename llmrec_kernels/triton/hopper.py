"""A Hopper (sm_90) mainloop for the fused CoRA forward and the dx GEMM (issue 25, item 3).

Same maths and launcher interface as :mod:`llmrec_kernels.triton.cora_linear` (``forward``,
``backward``); the difference is how the two big GEMMs are fed and scheduled:

* **TMA loads.** The mainloop operands (``x`` and ``W`` in the forward, ``dy`` and ``W`` in
  dx) and the stored output are read and written through host-built tensor descriptors
  (``triton.tools.tensor_descriptor.TensorDescriptor``; the GPU machines' Triton 3.6 has
  them): one bulk copy per tile and stage instead of masked per-thread pointer loads with an
  int64 row gather. Out-of-range rows and columns are zero-filled by the copy engine and
  clipped on store, so odd ``M``, ``N``, ``K`` need no masks. The same kernel body keeps a
  pointer-load path (``USE_TMA=False``): it runs where descriptors cannot (rows that do not
  merge into one strided 2-D view, strides that are not 16-byte multiples, GPUs before
  sm_90, a Triton without descriptors), and it is the sm_80 (Ampere) variant, where it
  compiles to ``mma.sync`` fed by cp.async.
* **Persistent grouped scheduler.** The grid is the number of SMs (:func:`_sm_count`, or
  what the caller passes); program ``p`` walks tiles ``p, p + P, p + 2P, ...`` in the
  grouped order of :func:`llmrec_kernels.triton.kernels._grouped_tile` (``GROUP_M`` row tiles
  share each column tile of ``W`` while it is in L2).
* **Tiles that fit sm_90 shared memory.** 16-bit: 128 x 128 x 64 at 4 stages and 8 warps
  (two warpgroups): a 4 x 32 KB operand ring, a 16 KB output slice and the rank-sized
  low-rank tiles, 148 KB of the 227 KB a CTA may hold (the AOT test measures it).
  :data:`WIDE_16BIT` (128 x 256 x 64, 3 stages, 184 KB) is the candidate a GPU run weighs
  against it; fp32 tiles depend on the dots' precision (:func:`hopper_config`).
* **The expand as one extra K step.** ``s S_b B^T`` joins the same fp32 accumulator as a
  last K step of depth ``BLOCK_R`` (two for 16-bit inputs: fp32 ``S`` enters the tensor cores
  as ``hi + lo`` halves, :func:`llmrec_kernels.triton.kernels._dot_fp32_lhs`). Up to a padded
  rank of 32 its operands are loaded *before* the mainloop, so their latency hides under
  it; larger ranks take steps of 16 ranks loaded after it (registers). ``S`` itself is
  computed once per row, by a separate shrink pass (split over ``K`` when one pass per row
  tile would not fill the GPU), never once per column tile.
* **Sub-tiled epilogue.** The accumulator is stored as ``EPI_SPLIT`` column slices (bias
  added per slice, rounded to the output dtype only there), so the staging buffer of the
  TMA store is a slice, not the whole tile.
* **Optionally flattened** (``flatten=True``, forward, descriptor path): Triton fuses the
  tile and K loops into one software-pipelined loop, so the next tile's loads overlap this
  tile's epilogue; off until a GPU run shows it faster.

dx: ``dx = dy W + dS A_b^T`` with ``dS = s dy B`` computed once by the same shrink pass (``B``
as a shared "A"), stored for dA, and loaded by every column tile of dx. A row tile that spans
several samples (short sequences) adds each sample's ``dS A_b^T`` to its own rows; at small
ranks the first sample's ``A_b`` tile is loaded before the mainloop.

Selection: :func:`supports` says when the Triton backend takes this path (CUDA sm_90, 16-bit,
no LoRA dropout, not batch-invariant mode, and at least one wave of 128 x 128 tiles); set
``LLMREC_KERNELS_HOPPER=0`` before import to turn it off. Nothing here has run on a GPU yet:
the interpreter tests check the maths of both load paths, the AOT test what sm_90 and sm_80
compile it to.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from llmrec_kernels.backends import batch_invariant_enabled, interpreter_enabled
from llmrec_kernels.triton.configs import block_r, reduce_config, shrink_config
from llmrec_kernels.triton.kernels import (
    _cora_shrink_kernel,
    _dot_fp32_lhs,
    _grouped_tile,
    _row_offsets,
    _rows_transpose_matmul_kernel,
    _wide,
)
from llmrec_kernels.triton.shrink_splitk import (
    _cora_shrink_splitk_kernel,
    _cora_splitk_reduce_kernel,
)

try:  # Triton >= 3.4; older versions keep the pointer-load path of the same kernels.
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

__all__ = [
    "ENABLED",
    "WIDE_16BIT",
    "HopperConfig",
    "backward",
    "forward",
    "hopper_config",
    "supports",
    "supports_dx",
    "tma_available",
]

# Read once: the selection runs on every call of the Triton backend (host cost at decode).
ENABLED = os.environ.get("LLMREC_KERNELS_HOPPER", "1") != "0"
_16BIT = (torch.float16, torch.bfloat16)
# Up to this padded rank the low-rank term is one K step whose operands are loaded before the
# mainloop and held in registers across it. Beyond it, steps of LARGE_RANK_CHUNK ranks loaded
# after the mainloop: the whole (128, BLOCK_R) fp32 slice of dS held across it spilled ~300
# bytes on sm_80 at rank 64 and ~200 on sm_90 at rank 128.
MAX_PRELOAD_RANK_BLOCK = 32
LARGE_RANK_CHUNK = 16


def _rank_chunk(rank: int) -> int:
    """Ranks per low-rank K step (``R_CHUNK``) of the kernels at ``rank``."""
    padded = block_r(rank)
    return padded if padded <= MAX_PRELOAD_RANK_BLOCK else LARGE_RANK_CHUNK


def tma_available() -> bool:
    """True when the installed Triton has host-side tensor descriptors (TMA on sm_90)."""
    return TensorDescriptor is not None


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _store_slice(
    part, out_dst, bias_ptr, row0, col0, M, COLS,
    HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, SLICE: tl.constexpr,
):  # fmt: skip
    """Store one ``(BLOCK_M, SLICE)`` fp32 slice of the accumulator at ``(row0, col0)``.

    Bias is added in fp32 before the one rounding to the output dtype. ``out_dst`` is a
    descriptor over the contiguous ``(M, COLS)`` output (it clips what lies outside), or
    the output's pointer (masked stores).
    """
    offs_c = col0 + tl.arange(0, SLICE)
    c_mask = offs_c < COLS
    if HAS_BIAS:
        part += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if USE_TMA:
        out_dst.store([row0, col0], part.to(out_dst.dtype))
    else:
        offs_m = row0 + tl.arange(0, part.shape[0])
        ptrs = out_dst + offs_m[:, None].to(tl.int64) * COLS + offs_c[None, :]
        mask = (offs_m < M)[:, None] & c_mask[None, :]
        tl.store(ptrs, part.to(out_dst.dtype.element_ty), mask=mask)


@triton.jit
def _store_tile(
    acc, out_dst, bias_ptr, row0, col0, M, COLS,
    HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_COLS: tl.constexpr, EPI_SPLIT: tl.constexpr,
):  # fmt: skip
    """The sub-tiled epilogue: ``acc`` (``(BLOCK_M, BLOCK_COLS)`` fp32) in ``EPI_SPLIT`` slices."""
    if EPI_SPLIT == 2:
        halves = tl.permute(tl.reshape(acc, (acc.shape[0], 2, BLOCK_COLS // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        _store_slice(left, out_dst, bias_ptr, row0, col0, M, COLS,
                     HAS_BIAS, USE_TMA, BLOCK_COLS // 2)  # fmt: skip
        _store_slice(right, out_dst, bias_ptr, row0, col0 + BLOCK_COLS // 2, M, COLS,
                     HAS_BIAS, USE_TMA, BLOCK_COLS // 2)  # fmt: skip
    else:
        tl.static_assert(EPI_SPLIT == 1, "EPI_SPLIT is 1 or 2")
        _store_slice(acc, out_dst, bias_ptr, row0, col0, M, COLS, HAS_BIAS, USE_TMA, BLOCK_COLS)


@triton.jit
def _as_element_type(v, src, USE_TMA: tl.constexpr):
    """``v`` cast to the element dtype behind a descriptor (``USE_TMA``) or a pointer."""
    return v.to(src.dtype) if USE_TMA else v.to(src.dtype.element_ty)


@triton.jit
def _lowrank_operands(
    rows_ptr, cols_ptr, r0, offs_m, offs_c, row_mask, c_mask, R, stride_c, stride_r,
    R_CHUNK: tl.constexpr,
):  # fmt: skip
    """Operands of one low-rank K step, ranks ``[r0, r0 + R_CHUNK)``: rows ``offs_m`` of an
    fp32 contiguous ``(M, R)`` matrix (``S`` or ``dS``; zero outside ``row_mask``), and the
    ``(R_CHUNK, BLOCK_COLS)`` tile ``cols_ptr[r * stride_r + c * stride_c]`` (``Bm^T`` or
    ``A_g^T``, ``BLOCK_R`` ranks in memory; zero outside ``c_mask``)."""
    offs_r = r0 + tl.arange(0, R_CHUNK)
    rows = tl.load(
        rows_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :],
        mask=row_mask[:, None] & (offs_r < R)[None, :],
        other=0.0,
    )
    cols = tl.load(
        cols_ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
        mask=c_mask[None, :],
        other=0.0,
    )
    return rows, cols


@triton.jit
def _lowrank_steps(
    acc, rows_ptr, cols_ptr, offs_m, offs_c, row_mask, c_mask, R, stride_c, stride_r, like,
    USE_TMA: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    SPLIT_LOWRANK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc + rows @ cols`` over ``BLOCK_R`` ranks, ``R_CHUNK`` per K step (operands as in
    :func:`_lowrank_operands`; ``like``: the mainloop's source, for the compute dtype).

    Not software-pipelined (one stage): at large ranks a ring of these tiles would cost
    shared memory the mainloop's ring needs, for a handful of steps per tile.
    """
    for r0 in tl.range(0, BLOCK_R, R_CHUNK, num_stages=1):
        rows, cols = _lowrank_operands(rows_ptr, cols_ptr, r0, offs_m, offs_c, row_mask, c_mask,
                                       R, stride_c, stride_r, R_CHUNK)  # fmt: skip
        cols = _as_element_type(cols, like, USE_TMA)
        acc = _dot_fp32_lhs(rows, cols, acc, SPLIT_LOWRANK, INPUT_PRECISION)
    return acc


@triton.jit
def _hopper_fwd_kernel(
    x_src, w_src, y_dst, bias_ptr, s_ptr, lb_ptr,
    M, N, K, R, L,
    stride_xb, stride_xl, stride_xk,
    stride_wn, stride_wk,
    stride_lbn, stride_lbr,
    HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_LOWRANK: tl.constexpr,
    R_CHUNK: tl.constexpr,
    FLATTEN: tl.constexpr = False,
):  # fmt: skip
    """Persistent ``y = x W^T + bias + S Bm^T`` over flat rows; y contiguous ``(M, N)``.

    Grid: ``(min(NUM_PROGRAMS, tiles),)``; program ``p`` computes tiles ``p, p +
    NUM_PROGRAMS, ...`` of the ``tiles = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` output tiles,
    in grouped order. ``S`` is fp32 contiguous ``(M, R)``, already scaled; ``Bm`` has
    ``BLOCK_R`` columns in memory (zero beyond ``R``). With ``USE_TMA``, ``x_src``, ``w_src`` and ``y_dst`` are descriptors over
    ``(M, K)``, ``(N, K)`` and ``(M, N)`` with blocks ``(BLOCK_M, BLOCK_K)``, ``(BLOCK_N,
    BLOCK_K)`` and ``(BLOCK_M, BLOCK_N // EPI_SPLIT)``; the strides then go unused.
    Otherwise they are pointers, ``x`` a strided ``(B, L, K)`` tensor. ``FLATTEN``: the tile
    and K loops become one software-pipelined loop (see :func:`forward`).
    """
    stride_xb, stride_xl, stride_xk = _wide(stride_xb), _wide(stride_xl), _wide(stride_xk)
    stride_wn, stride_wk = _wide(stride_wn), _wide(stride_wk)
    stride_lbn, stride_lbr = _wide(stride_lbn), _wide(stride_lbr)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    offs_kb = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        if R_CHUNK == BLOCK_R:  # one low-rank step: issued before the mainloop, hidden by it
            s_tile, lb_t = _lowrank_operands(s_ptr, lb_ptr, 0, offs_m, offs_n, m_mask, n_mask,
                                             R, stride_lbn, stride_lbr, R_CHUNK)  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            for k0 in range(0, K, BLOCK_K):
                xt = x_src.load([pid_m * BLOCK_M, k0])
                wt = w_src.load([pid_n * BLOCK_N, k0])
                acc = tl.dot(xt, wt.T, acc, input_precision=INPUT_PRECISION)
        else:
            x_rows = _row_offsets(offs_m, L, stride_xb, stride_xl)
            x_ptrs = x_src + x_rows[:, None] + offs_kb[None, :] * stride_xk
            w_ptrs = w_src + offs_n[None, :] * stride_wn + offs_kb[:, None] * stride_wk
            for k0 in range(0, K, BLOCK_K):
                k_mask = (k0 + offs_kb) < K
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
        # The expand: more K steps (of depth R_CHUNK) of the same fp32 accumulator.
        if R_CHUNK == BLOCK_R:
            lb_t = _as_element_type(lb_t, x_src, USE_TMA)
            acc = _dot_fp32_lhs(s_tile, lb_t, acc, SPLIT_LOWRANK, INPUT_PRECISION)
        else:  # large ranks: loaded after the mainloop, not held in registers across it
            acc = _lowrank_steps(acc, s_ptr, lb_ptr, offs_m, offs_n, m_mask, n_mask, R,
                                 stride_lbn, stride_lbr, x_src, USE_TMA, BLOCK_R, R_CHUNK,
                                 SPLIT_LOWRANK, INPUT_PRECISION)  # fmt: skip
        _store_tile(acc, y_dst, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N,
                    HAS_BIAS, USE_TMA, BLOCK_N, EPI_SPLIT)  # fmt: skip


@triton.jit
def _hopper_dx_kernel(
    dy_src, w_src, dx_dst, ds_ptr, a_ptr,
    M, N, K, R, L, ROWS_PER_A,
    stride_dyb, stride_dyl, stride_dyn,
    stride_wn, stride_wk,
    stride_ab, stride_ak, stride_ar,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_LOWRANK: tl.constexpr,
    R_CHUNK: tl.constexpr,
):  # fmt: skip
    """Persistent ``dx = dy W + dS A_g^T``, ``g = m // ROWS_PER_A``; dx contiguous ``(M, K)``.

    The output columns are x's (``K``, ``BLOCK_K`` per tile); the reduction runs over ``N``
    (``BLOCK_N`` per step). ``dS`` (fp32 contiguous ``(M, R)``, scaled) was computed once, by
    the shrink pass; ``A`` has ``BLOCK_R`` columns in memory (zero beyond ``R``), group
    stride 0 when shared. With ``USE_TMA``, ``dy_src``, ``w_src`` and ``dx_dst`` are
    descriptors over ``(M, N)``, ``(N, K)`` and ``(M, K)`` with blocks ``(BLOCK_M,
    BLOCK_N)``, ``(BLOCK_N, BLOCK_K)`` and ``(BLOCK_M, BLOCK_K // EPI_SPLIT)``.
    Grid: ``(min(NUM_PROGRAMS, tiles),)``, as :func:`_hopper_fwd_kernel`.
    """
    stride_dyb, stride_dyl, stride_dyn = _wide(stride_dyb), _wide(stride_dyl), _wide(stride_dyn)
    stride_wn, stride_wk = _wide(stride_wn), _wide(stride_wk)
    stride_ab, stride_ak, stride_ar = _wide(stride_ab), _wide(stride_ak), _wide(stride_ar)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
    offs_nb = tl.arange(0, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_k = _grouped_tile(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        k_mask = offs_k < K
        row_group = offs_m // ROWS_PER_A
        group_first = (pid_m * BLOCK_M) // ROWS_PER_A
        group_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // ROWS_PER_A
        a_first = a_ptr + group_first.to(tl.int64) * stride_ab
        if R_CHUNK == BLOCK_R:  # dS and the first sample's A^T tile, hidden by the mainloop
            ds_tile, a_t = _lowrank_operands(ds_ptr, a_first, 0, offs_m, offs_k, m_mask, k_mask,
                                             R, stride_ak, stride_ar, R_CHUNK)  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if USE_TMA:
            for n0 in range(0, N, BLOCK_N):
                dyt = dy_src.load([pid_m * BLOCK_M, n0])
                wt = w_src.load([n0, pid_k * BLOCK_K])
                acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION)
        else:
            dy_rows = _row_offsets(offs_m, L, stride_dyb, stride_dyl)
            dy_ptrs = dy_src + dy_rows[:, None] + offs_nb[None, :] * stride_dyn
            w_ptrs = w_src + offs_nb[:, None] * stride_wn + offs_k[None, :] * stride_wk
            for n0 in range(0, N, BLOCK_N):
                n_mask = (n0 + offs_nb) < N
                dyt = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION)
                dy_ptrs += BLOCK_N * stride_dyn
                w_ptrs += BLOCK_N * stride_wn
        # The low-rank term: more K steps, for each sample the row tile touches (one at
        # prefill, several at short sequences), on that sample's rows only.
        g_next = group_first
        if R_CHUNK == BLOCK_R:
            ds_g = tl.where((row_group == group_first)[:, None], ds_tile, tl.zeros_like(ds_tile))
            a_t = _as_element_type(a_t, dy_src, USE_TMA)
            acc = _dot_fp32_lhs(ds_g, a_t, acc, SPLIT_LOWRANK, INPUT_PRECISION)
            g_next += 1
        for g in tl.range(g_next, group_last + 1, num_stages=1):
            acc = _lowrank_steps(acc, ds_ptr, a_ptr + g * stride_ab, offs_m, offs_k,
                                 m_mask & (row_group == g), k_mask, R, stride_ak, stride_ar,
                                 dy_src, USE_TMA, BLOCK_R, R_CHUNK, SPLIT_LOWRANK,
                                 INPUT_PRECISION)  # fmt: skip
        _store_tile(acc, dx_dst, dx_dst, pid_m * BLOCK_M, pid_k * BLOCK_K, M, K,
                    False, USE_TMA, BLOCK_K, EPI_SPLIT)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HopperConfig:
    """Tiles of the persistent GEMMs (both the forward and dx)."""

    BLOCK_M: int
    # Output columns per tile (N in the forward, K in dx).
    BLOCK_COLS: int
    # Reduction depth per mainloop step (K in the forward, N in dx).
    BLOCK_RED: int
    GROUP_M: int
    # Column slices of the epilogue (1 or 2).
    EPI_SPLIT: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.EPI_SPLIT not in (1, 2):
            raise ValueError(f"EPI_SPLIT must be 1 or 2, got {self.EPI_SPLIT}")


# 16-bit on sm_90: 128 x 128 x 64 at 4 stages (about 150 KB of shared memory with the output
# slice and the low-rank tiles), two warpgroups. TF32 halves the depth. IEEE fp32 dots run on
# the FMA units with their operands in registers: 128 x 128 spilled 12-16 KB there, 64 x 64 x 16
# still spilled 28 bytes (dx, sm_80, rank 128); 32 x 64 x 32 is spill-free (AOT test).
_GPU_16BIT = HopperConfig(128, 128, 64, 8, 2, 8, 4)
_GPU_TF32 = HopperConfig(128, 128, 32, 8, 2, 8, 3)
_GPU_IEEE = HopperConfig(32, 64, 32, 4, 2, 8, 2)
# The candidate a GPU run weighs against _GPU_16BIT (benchmarks/hopper_mainloop.py): twice the
# columns per tile (operand reuse of cuBLAS's usual sm_90 tile), 3 stages; ~188 KB, spill-free.
WIDE_16BIT = HopperConfig(128, 256, 64, 8, 2, 8, 3)
# Under the interpreter: small tiles (~0.5 ms per program instance), sub-tiled like the GPU's.
_INTERPRETER = HopperConfig(16, 32, 16, 2, 2, 4, 1)


def hopper_config(dtype: torch.dtype, precision: str = "tf32") -> HopperConfig:
    """The tile config of both persistent GEMMs for ``dtype`` and, for fp32, the dots'
    ``precision`` (``"tf32"`` or ``"ieee"``); the interpreter's config under it."""
    if interpreter_enabled():
        return _INTERPRETER
    if dtype != torch.float32:
        return _GPU_16BIT
    return _GPU_IEEE if precision == "ieee" else _GPU_TF32


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _programs(t: torch.Tensor, tiles: int, num_programs: Optional[int]) -> tuple[int, int]:
    """``(stride, grid)`` of a persistent launch: the caller's program count, else one per SM
    (4 under the interpreter), and the grid, no larger than the tiles.

    The stride (``NUM_PROGRAMS``, a compile-time constant) stays the SM count even when fewer
    tiles launch fewer programs (each then takes one tile): one compile per device, not one
    per small shape.
    """
    if num_programs is not None:
        if num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {num_programs}")
        stride = num_programs
    else:
        stride = _sm_count(t.get_device()) if t.is_cuda else 4
    return stride, min(stride, tiles)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _full_wave(t: torch.Tensor, rows: int, cols: int) -> bool:
    """At least one program per SM of 128 x 128 tiles: below that the row-matched tiles of the
    existing kernels (:mod:`llmrec_kernels.triton.configs`) fill the GPU better."""
    return _cdiv(rows, 128) * _cdiv(cols, 128) >= _sm_count(t.get_device())


def supports(x: torch.Tensor, weight: torch.Tensor, dropout: Optional[tuple] = None) -> bool:
    """Whether the Triton backend's forward takes this path for ``x`` ``(B, L, K)`` and
    ``weight`` ``(N, K)``: a CUDA sm_90 device, fp16/bf16, no LoRA dropout, not
    batch-invariant mode (split-K and tile choices here depend on ``M``), a full wave of tiles.
    """
    if not (ENABLED and x.is_cuda and x.dtype in _16BIT and dropout is None):
        return False
    if batch_invariant_enabled() or _capability(x.get_device()) != (9, 0):
        return False
    return _full_wave(x, x.shape[0] * x.shape[1], weight.shape[0])


def supports_dx(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dropout: Optional[tuple] = None
) -> bool:
    """Whether the Triton backend's backward takes :func:`backward` (dx's output has K cols)."""
    if not (ENABLED and dy.is_cuda and x.dtype in _16BIT and dropout is None):
        return False
    if batch_invariant_enabled() or _capability(dy.get_device()) != (9, 0):
        return False
    return _full_wave(dy, x.shape[0] * x.shape[1], x.shape[2])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _input_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless PyTorch allows TF32 (ignored for 16-bit inputs)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _flat_row_stride(t: torch.Tensor) -> Optional[int]:
    """Stride between flat rows ``m = b * L + l`` of a ``(B, L, C)`` tensor, None if there is
    no single one (the rows are then gathered by the pointer path)."""
    batch, length, _ = t.shape
    sb, sl, _ = t.stride()
    if length == 1:
        return sb
    if batch == 1 or sb == length * sl:
        return sl
    return None


def _tma_device(t: torch.Tensor) -> bool:
    """Descriptors can feed ``t``'s kernels: sm_90 or newer (the interpreter emulates them)."""
    if not tma_available():
        return False
    return _capability(t.get_device())[0] >= 9 if t.is_cuda else interpreter_enabled()


def _tma_ok(t: torch.Tensor, row_stride: Optional[int]) -> bool:
    """A 2-D TMA view is possible: unit inner stride, 16-byte-aligned base and row pitch."""
    size = t.element_size()
    return (
        row_stride is not None
        and t.stride(-1) == 1
        and (row_stride * size) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def _descriptor(t: torch.Tensor, shape: list, row_stride: int, block: list):
    return TensorDescriptor(t, shape, [row_stride, 1], block)


def _shrink_pass(
    inp: torch.Tensor,
    mat: torch.Tensor,
    mat_strides: tuple[int, int, int],
    out: torch.Tensor,
    scaling: float,
    k_split: Optional[int] = None,
) -> None:
    """``out = scaling * inp @ mat[b]`` (fp32 ``(B, L, R)``) once per row, filling the GPU.

    ``inp`` is a strided ``(B, L, K)`` tensor, ``mat`` ``(G, K, BLOCK_R)`` or shared (group
    stride 0). When one program per 64-row tile would leave SMs idle (prefill 8 x 256: 32
    programs on 132 SMs), ``K`` is split into slices whose fp32 partials are summed in a fixed
    order (no atomics: the result does not depend on the split's timing). ``k_split``: K
    elements per slice, instead of the rule (tests).
    """
    batch, length, k = inp.shape
    rank = out.shape[-1]
    sb, sl, sk = inp.stride()
    if mat_strides[0] == 0 and _flat_row_stride(inp) is not None:
        batch, length, sb, sl = 1, batch * length, 0, _flat_row_stride(inp)
    cfg = shrink_config(length, inp.dtype)
    programs = _cdiv(length, cfg.BLOCK_M) * batch
    if k_split is None and inp.is_cuda:
        wanted = _cdiv(2 * _sm_count(inp.get_device()), programs)
        if wanted > 1:
            k_split = _cdiv(_cdiv(k, wanted), cfg.BLOCK_K) * cfg.BLOCK_K
    meta = dict(
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_K=cfg.BLOCK_K,
        BLOCK_R=block_r(rank),
        INPUT_PRECISION=_input_precision(inp.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if k_split is None or k_split >= k:
        _cora_shrink_kernel[(_cdiv(length, cfg.BLOCK_M), batch)](
            inp, mat, out, length, k, rank, sb, sl, sk, *mat_strides, scaling, **meta
        )
        return
    if k_split % cfg.BLOCK_K:
        raise ValueError(f"k_split must be a multiple of {cfg.BLOCK_K}, got {k_split}")
    split = _cdiv(k, k_split)
    numel = batch * length * rank
    ws = torch.empty((split, batch * length, rank), dtype=torch.float32, device=out.device)
    _cora_shrink_splitk_kernel[(_cdiv(length, cfg.BLOCK_M), split, batch)](
        inp, mat, ws, length, k, rank, k_split, sb, sl, sk, *mat_strides, numel, rank, **meta
    )
    _cora_splitk_reduce_kernel[(_cdiv(numel, 512),)](
        ws, out, numel, split, numel, scaling, BLOCK=512, num_warps=4, num_stages=1
    )


def _pad_rank(mat: torch.Tensor) -> torch.Tensor:
    """``mat`` (``(..., R)``) with zero columns up to ``block_r(R)``: the kernels read A and Bm
    unmasked along the rank."""
    rank = mat.shape[-1]
    padded = block_r(rank)
    return mat if padded == rank else torch.nn.functional.pad(mat, (0, padded - rank))


def _a_strides(lora_a: torch.Tensor) -> tuple[int, int, int]:
    strides = lora_a.stride()
    return strides if len(strides) == 3 else (0, *strides)


def _check_common(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b, dropout):
    if dropout is not None:
        raise ValueError("the Hopper kernels apply no LoRA dropout; use the Triton backend's own")
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, d_in), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"weight must be (d_out, {x.shape[2]}), got {tuple(weight.shape)}")
    batch, _, d_in = x.shape
    if lora_a.shape not in ((d_in, lora_a.shape[-1]), (batch, d_in, lora_a.shape[-1])):
        raise ValueError(
            f"lora_a must be ({d_in}, r) or ({batch}, {d_in}, r), got {tuple(lora_a.shape)}"
        )
    if lora_b.dim() != 2 or lora_b.shape != (weight.shape[0], lora_a.shape[-1]):
        raise ValueError(f"lora_b must be (d_out, r), got {tuple(lora_b.shape)}")


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    dropout: Optional[tuple] = None,
    *,
    num_programs: Optional[int] = None,
    use_tma: Optional[bool] = None,
    k_split: Optional[int] = None,
    flatten: bool = False,
    config: Optional[HopperConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)`` of the Triton backend's ``forward``, by the persistent TMA kernel.

    Args:
        x: ``(B, L, d_in)``, any strides, fp16/bf16 (fp32 too, for tests).
        weight: ``(d_out, d_in)``; lora_a: ``(B, d_in, r)`` or shared ``(d_in, r)``;
        lora_b: ``(d_out, r)``; bias: ``(d_out,)`` or None; all in x's dtype.
        scaling: the LoRA scale ``s``.
        dropout: must be None (LoRA dropout stays on the existing kernels).
        num_programs: persistent programs (default: the SM count), for tests.
        use_tma: force the descriptor (True) or pointer (False) path; default: descriptors
            when the tensors allow them.
        k_split: K elements per slice of the shrink pass (tests), default by occupancy.
        flatten: let Triton flatten the tile and K loops into one software-pipelined loop
            (descriptor path only), so the next tile's loads overlap this tile's epilogue.
            Off by default until a GPU run shows it faster: it compiles spill-free on sm_90
            but with more registers and shared memory (the AOT test records both).
        config: the tiles, instead of :func:`hopper_config`'s (benchmarks: e.g.
            :data:`WIDE_16BIT`).

    Returns:
        y ``(B, L, d_out)`` in x's dtype, and ``S = scaling * x A`` fp32 ``(B, L, r)``.
    """
    _check_common(x, weight, lora_a, lora_b, dropout)
    batch, length, k = x.shape
    n, rank, rows = weight.shape[0], lora_a.shape[-1], batch * length
    y = torch.empty((batch, length, n), dtype=x.dtype, device=x.device)
    s = torch.empty((batch, length, rank), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, s
    lora_a, lora_b = _pad_rank(lora_a), _pad_rank(lora_b)
    _shrink_pass(x, lora_a, _a_strides(lora_a), s, scaling, k_split)
    if n == 0:
        return y, s
    precision = _input_precision(x.dtype)
    cfg = config or hopper_config(x.dtype, precision)
    bm, bn, bk = cfg.BLOCK_M, cfg.BLOCK_COLS, cfg.BLOCK_RED
    x_row = _flat_row_stride(x)
    tma = (
        _tma_device(x) and k > 0 and _tma_ok(x, x_row) and _tma_ok(weight, weight.stride(0))
        and (n * y.element_size()) % 16 == 0
    )  # fmt: skip
    if use_tma and not tma:
        raise ValueError(
            "use_tma=True, but these tensors (or this device or Triton) allow no TMA view"
        )
    tma = tma if use_tma is None else use_tma
    if tma:
        x_src = _descriptor(x, [rows, k], x_row, [bm, bk])
        w_src = _descriptor(weight, [n, k], weight.stride(0), [bn, bk])
        y_dst = _descriptor(y, [rows, n], n, [bm, bn // cfg.EPI_SPLIT])
    else:
        x_src, w_src, y_dst = x, weight, y
    tiles = _cdiv(rows, bm) * _cdiv(n, bn)
    stride, programs = _programs(x, tiles, num_programs)
    _hopper_fwd_kernel[(programs,)](
        x_src, w_src, y_dst, bias.contiguous() if bias is not None else y, s, lora_b,
        rows, n, k, rank, length,
        *x.stride(),
        *weight.stride(),
        *lora_b.stride(),
        HAS_BIAS=bias is not None,
        USE_TMA=tma,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r(rank),
        GROUP_M=cfg.GROUP_M, EPI_SPLIT=cfg.EPI_SPLIT, NUM_PROGRAMS=stride,
        INPUT_PRECISION=precision,
        SPLIT_LOWRANK=x.dtype != torch.float32,
        R_CHUNK=_rank_chunk(rank),
        FLATTEN=bool(flatten and tma),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y, s


def _rows_transpose_matmul(
    lhs: torch.Tensor, rhs: torch.Tensor, groups: int, rows_per_group: int
) -> torch.Tensor:
    """``out[g] = lhs_rows(g)^T @ rhs_rows(g)`` in fp32, ``(groups, P, R)`` (dA and dB).

    ``lhs`` a strided ``(B, L, P)`` tensor, ``rhs`` contiguous fp32 ``(B, L, R)``. The rows of
    a group are split into chunks when that fills the GPU; the chunks' partials are summed in
    a fixed order.
    """
    _, length, p = lhs.shape
    rank = rhs.shape[-1]
    cfg = reduce_config(lhs.dtype, rank)
    p_tiles = _cdiv(p, cfg.BLOCK_P)
    target = 4 * _sm_count(lhs.get_device()) if lhs.is_cuda else 1
    max_splits = max(1, _cdiv(rows_per_group, cfg.BLOCK_ROWS))
    splits = min(max_splits, max(1, _cdiv(target, p_tiles * groups)))
    rows_per_split = _cdiv(_cdiv(rows_per_group, splits), cfg.BLOCK_ROWS) * cfg.BLOCK_ROWS
    splits = max(1, _cdiv(rows_per_group, rows_per_split))
    out = torch.empty((splits, groups, p, rank), dtype=torch.float32, device=lhs.device)
    _rows_transpose_matmul_kernel[(p_tiles, splits, groups)](
        lhs, rhs, out,
        rows_per_group, p, rank, length, rows_per_split,
        *lhs.stride(),
        out.stride(0), out.stride(1),
        BLOCK_P=cfg.BLOCK_P, BLOCK_ROWS=cfg.BLOCK_ROWS, BLOCK_R=block_r(rank),
        INPUT_PRECISION=_input_precision(lhs.dtype),
        SPLIT_RHS=lhs.dtype != torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.sum(0) if splits > 1 else out[0]


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
    *,
    num_programs: Optional[int] = None,
    use_tma: Optional[bool] = None,
    k_split: Optional[int] = None,
    config: Optional[HopperConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dA, dB)`` of :func:`forward` (the Triton backend's ``backward``).

    Args:
        dy: ``(B, L, d_out)``, any strides, x's dtype; x, weight, lora_a, lora_b, scaling:
            as in :func:`forward`; s_scaled: the forward's fp32 ``S`` ``(B, L, r)``.
        need_dx, need_da, need_db: which gradients to compute; one not asked for is an empty
            tensor.
        dropout, num_programs, use_tma, k_split, config: as in :func:`forward` (``k_split`` splits
            the ``dS = scaling * dy B`` pass over ``d_out``).

    Returns:
        dx ``(B, L, d_in)`` in x's dtype, dA shaped and typed like lora_a, dB like lora_b.
    """
    _check_common(x, weight, lora_a, lora_b, dropout)
    if dy.shape != (*x.shape[:2], weight.shape[0]):
        raise ValueError(f"dy must be {(*x.shape[:2], weight.shape[0])}, got {tuple(dy.shape)}")
    batch, length, k = x.shape
    n, rank, rows = weight.shape[0], lora_a.shape[-1], batch * length
    empty = x.new_empty(0)
    dx = da = db = empty
    if rows == 0:
        return (
            torch.zeros_like(x) if need_dx else empty,
            torch.zeros_like(lora_a) if need_da else empty,
            torch.zeros_like(lora_b) if need_db else empty,
        )
    per_sample = lora_a.dim() == 3
    da_shape, db_dtype = lora_a.shape, lora_b.dtype
    lora_a, lora_b = _pad_rank(lora_a), _pad_rank(lora_b)
    ds = None
    if need_dx or need_da:
        # dS = s dy B once per row; every column tile of dx and the dA reduction read it.
        ds = torch.empty((batch, length, rank), dtype=torch.float32, device=x.device)
        _shrink_pass(dy, lora_b, (0, *lora_b.stride()), ds, scaling, k_split)
    if need_dx:
        dx = torch.empty((batch, length, k), dtype=x.dtype, device=x.device)
        if k > 0:
            _launch_dx(dy, weight, lora_a, ds, dx, rows, n, k, rank, length,
                       length if per_sample else rows, num_programs, use_tma, config)  # fmt: skip
    if need_da:
        groups, rows_per_group = (batch, length) if per_sample else (1, rows)
        da = _rows_transpose_matmul(x, ds, groups, rows_per_group)
        da = da.reshape(da_shape).to(lora_a.dtype)
    if need_db:
        db = _rows_transpose_matmul(dy, s_scaled.contiguous(), 1, rows)[0].to(db_dtype)
    return dx, da, db


def _launch_dx(dy, weight, lora_a, ds, dx, rows, n, k, rank, length, rows_per_a,
               num_programs, use_tma, config) -> None:  # fmt: skip
    precision = _input_precision(dx.dtype)
    cfg = config or hopper_config(dx.dtype, precision)
    bm, bk, bn = cfg.BLOCK_M, cfg.BLOCK_COLS, cfg.BLOCK_RED
    dy_row = _flat_row_stride(dy)
    tma = (
        _tma_device(dy) and n > 0 and _tma_ok(dy, dy_row) and _tma_ok(weight, weight.stride(0))
        and (k * dx.element_size()) % 16 == 0
    )  # fmt: skip
    if use_tma and not tma:
        raise ValueError(
            "use_tma=True, but these tensors (or this device or Triton) allow no TMA view"
        )
    tma = tma if use_tma is None else use_tma
    if tma:
        dy_src = _descriptor(dy, [rows, n], dy_row, [bm, bn])
        w_src = _descriptor(weight, [n, k], weight.stride(0), [bn, bk])
        dx_dst = _descriptor(dx, [rows, k], k, [bm, bk // cfg.EPI_SPLIT])
    else:
        dy_src, w_src, dx_dst = dy, weight, dx
    tiles = _cdiv(rows, bm) * _cdiv(k, bk)
    stride, programs = _programs(dx, tiles, num_programs)
    _hopper_dx_kernel[(programs,)](
        dy_src, w_src, dx_dst, ds, lora_a,
        rows, n, k, rank, length, rows_per_a,
        *dy.stride(),
        *weight.stride(),
        *_a_strides(lora_a),
        USE_TMA=tma,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, BLOCK_R=block_r(rank),
        GROUP_M=cfg.GROUP_M, EPI_SPLIT=cfg.EPI_SPLIT, NUM_PROGRAMS=stride,
        INPUT_PRECISION=precision,
        SPLIT_LOWRANK=dx.dtype != torch.float32,
        R_CHUNK=_rank_chunk(rank),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
