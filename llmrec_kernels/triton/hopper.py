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

from llmrec_kernels.backends import batch_invariant_enabled, interpreter_enabled
from llmrec_kernels.triton.configs import block_r, reduce_config, shrink_config
from llmrec_kernels.triton.hopper_kernels import _hopper_dx_kernel, _hopper_fwd_kernel
from llmrec_kernels.triton.kernels import (
    _cora_shrink_kernel,
    _rows_transpose_matmul_kernel,
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


def _resolve_tma(
    src: torch.Tensor,
    src_row: Optional[int],
    weight: torch.Tensor,
    reduce_dim: int,
    out: torch.Tensor,
    out_cols: int,
    use_tma: Optional[bool],
) -> bool:
    """Whether a launch reads ``src`` (rows x ``reduce_dim``, row stride ``src_row``) and
    ``weight`` and writes ``out`` (rows x ``out_cols``, contiguous) through TMA descriptors:
    what the tensors, device and Triton allow, unless ``use_tma`` forces a path (True where no
    TMA view exists is a ValueError)."""
    ok = (
        _tma_device(src) and reduce_dim > 0 and _tma_ok(src, src_row)
        and _tma_ok(weight, weight.stride(0)) and (out_cols * out.element_size()) % 16 == 0
    )  # fmt: skip
    if use_tma and not ok:
        raise ValueError(
            "use_tma=True, but these tensors (or this device or Triton) allow no TMA view"
        )
    return ok if use_tma is None else bool(use_tma)


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
    tma = _resolve_tma(x, x_row, weight, k, y, n, use_tma)
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
    tma = _resolve_tma(dy, dy_row, weight, n, dx, k, use_tma)
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
