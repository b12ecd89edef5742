"""Launchers of the Triton CoRA linear kernels: the ``"triton"`` backend.

``forward`` and ``backward`` have the interface every backend module shares (see
:mod:`llmrec_kernels.cora_linear`): 3-D ``x``, no autograd, the scaled shrink ``S = s x A``
returned in fp32 for the backward. The kernels themselves and the reasoning behind their
structure are in :mod:`llmrec_kernels.triton.kernels`.

Host cost matters at decode, where a launch's Python is longer than its kernel: the tile
config, grid and compile-time arguments of every launch are computed once per shape key
(``functools.lru_cache`` around the config functions of :mod:`llmrec_kernels.triton.configs`)
and integer ceilings use plain arithmetic (``triton.cdiv`` is a JIT function, slow to call
from Python). ``python -m benchmarks.host_overhead`` measures this side with the launches
replaced by no-ops.

The forward's shrink is split over K (:mod:`llmrec_kernels.triton.shrink_splitk`) when
:func:`llmrec_kernels.triton.dispatch.shrink_split` says so for the device (decode and
underfilled prefill grids); the GEMM's tile is chosen by occupancy from the device's SM count
(:func:`_gpu_spec`). Under the interpreter no device is sized for, and the forward keeps the
plain shrink unless batch-invariant mode (:func:`llmrec_kernels.batch_invariant`) is on.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from llmrec_kernels import _multi
from llmrec_kernels.backends import (
    MAX_TRITON_RANK,
    TRITON_DTYPES,
    CoraShapes,
    batch_invariant_enabled,
    interpreter_enabled,
    supports_from,
)
from llmrec_kernels.dropout import keep_scale, keep_threshold
from llmrec_kernels.triton import dispatch
from llmrec_kernels.triton import hopper as _hopper  # issue 25 item 3: the sm_90 mainloop
from llmrec_kernels.triton.configs import (
    block_r,
    gemm_config,
    reduce_config,
    shrink_config,
    split_reduce_config,
)
from llmrec_kernels.triton.kernels import (
    _cora_linear_bwd_dx_kernel,
    _cora_linear_fwd_kernel,
    _cora_shrink_kernel,
    _rows_transpose_matmul_kernel,
)
from llmrec_kernels.triton.launch import LaunchMeta, launch
from llmrec_kernels.triton.shrink_splitk import (
    _cora_shrink_splitk_kernel,
    _cora_splitk_reduce_kernel,
)

__all__ = [
    "HAS_DROPOUT",
    "SUPPORT_DEPENDS_ON_ENV",
    "TRACEABLE",
    "backward",
    "backward_multi",
    "check_supported",
    "clear_config_cache",
    "forward",
    "forward_multi",
    "supports",
]

TRACEABLE = False  # Triton launches: compiled code calls the custom ops
HAS_DROPOUT = True
SUPPORT_DEPENDS_ON_ENV = True


def check_supported(shapes: CoraShapes, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``TypeError``/``ValueError`` when the Triton kernels cannot run such a call:
    CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``), fp16/bf16/fp32, rank up to
    :data:`~llmrec_kernels.backends.MAX_TRITON_RANK`."""
    if not (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on the CPU set "
            "TRITON_INTERPRET=1 before importing llmrec_kernels to run Triton's interpreter"
        )
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, got {dtype}")
    if shapes.rank > MAX_TRITON_RANK:
        raise ValueError(
            f"backend='triton' supports ranks up to {MAX_TRITON_RANK}, got r={shapes.rank}; "
            "use backend='torch'"
        )


supports = supports_from(check_supported)

# The dx kernel recomputes dS = s dy Bm in every column tile; beyond this padded rank that
# costs more than a separate pass over dy (R / BLOCK_N extra MMA work per tile).
MAX_FUSED_DS_RANK_BLOCK = 32


_CACHE_SIZE = 4096


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# torch.backends.cuda.matmul.allow_tf32 is a module __getattr__ around this C function and
# costs ~1.2 us more per read (host cost at decode); the property stays the fallback.
_cublas_allow_tf32 = getattr(
    torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32
)


def _input_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless PyTorch allows TF32 (the flag is ignored for 16-bit inputs)."""
    if dtype == torch.float32 and not _cublas_allow_tf32():
        return "ieee"
    return "tf32"


class _NoGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_GUARD = _NoGuard()


def _device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current for the launches; nothing to do when it already is."""
    if t.is_cuda:
        index = t.get_device()
        if index != torch.cuda.current_device():
            return torch.cuda.device(index)
    return _NO_GUARD


def _key(dtype: torch.dtype) -> tuple:
    """What every cached launch plan depends on besides the shape (and the device's spec)."""
    return dtype, _input_precision(dtype), interpreter_enabled(), batch_invariant_enabled()


def _gpu_spec(t: torch.Tensor) -> Optional[dispatch.GpuSpec]:
    """What the dispatcher sizes ``t``'s launches for: its CUDA device's spec; None under the
    interpreter.

    Other devices (CPU and meta tensors: the no-op host timing and the AOT tracer, which
    replaces this function per target arch) get the default sm_90 spec.
    """
    if t.is_cuda:
        return dispatch.gpu_spec_for_device(t.get_device())
    if interpreter_enabled():
        return None
    return dispatch.DEFAULT_GPU


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _shrink_plan(batch: int, length: int, rank: int, key: tuple, dropout: bool = False) -> tuple:
    """``(grid, compile-time kwargs)`` of one shrink launch (``dropout``: it applies the mask)."""
    dtype, precision, _, invariant = key
    cfg = shrink_config(length, dtype, invariant, dropout)
    grid = (_cdiv(length, cfg.BLOCK_M), batch)
    meta = LaunchMeta(
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_K=cfg.BLOCK_K,
        BLOCK_R=block_r(rank),
        INPUT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return grid, meta


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _splitk_plan(
    batch: int,
    length: int,
    k: int,
    rank: int,
    key: tuple,
    gpu: Optional[dispatch.GpuSpec],
    k_split: Optional[int] = None,
) -> Optional[tuple]:
    """``(split, K per split, grid, kwargs, reduce grid, reduce kwargs)``; None: plain shrink.

    ``k_split``: K elements per split, instead of the dispatcher's choice (benchmarks).
    """
    dtype, precision, _, invariant = key
    cfg = shrink_config(length, dtype, invariant)
    if k_split is None:
        k_split = dispatch.shrink_split(batch, length, k, rank, dtype, cfg, gpu, invariant)
    if not k_split or k_split >= k:
        return None
    split = _cdiv(k, k_split)
    meta = LaunchMeta(
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_K=cfg.BLOCK_K,
        BLOCK_R=block_r(rank),
        INPUT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    red = split_reduce_config()
    red_meta = LaunchMeta(BLOCK=red.BLOCK, num_warps=red.num_warps, num_stages=red.num_stages)
    grid = (_cdiv(length, cfg.BLOCK_M), split, batch)
    red_grid = (_cdiv(batch * length * rank, red.BLOCK),)
    return split, k_split, grid, meta, red_grid, red_meta


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _forward_plan(
    batch: int,
    length: int,
    k: int,
    n: int,
    rank: int,
    key: tuple,
    gpu: Optional[dispatch.GpuSpec],
    dropout: bool = False,
) -> tuple:
    """``(split-K plan or None, plain shrink plan or None, GEMM plan)`` of one forward.

    ``batch``, ``length``: the shrink's samples and rows (merged when A is shared). One cached
    lookup per forward call (host cost at decode). ``dropout``: never split (the split-K
    kernel applies no mask; dropout is a training feature, split-K a decode one).
    """
    split = None if dropout else _splitk_plan(batch, length, k, rank, key, gpu)
    plain = None if split is not None else _shrink_plan(batch, length, rank, key, dropout)
    gemm = _gemm_plan("fwd", batch * length, n, rank, key, gpu.sm_count if gpu else None)
    return split, plain, gemm


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _gemm_plan(
    kernel: str,
    rows: int,
    cols: int,
    rank: int,
    key: tuple,
    sm_count: Optional[int] = None,
    dropout: bool = False,
) -> tuple:
    """``(grid, compile-time kwargs)`` of the forward (``"fwd"``) or dx (``"bwd_dx"``) GEMM.

    ``sm_count``: the device's SMs, for the occupancy rule of :func:`configs.gemm_gpu_config`.
    ``dropout``: the launch applies LoRA dropout (the dx kernel's tiles differ).
    """
    dtype, precision, _, invariant = key
    cfg = gemm_config(kernel, rows, dtype, rank, cols, sm_count, invariant, dropout)
    grid = (_cdiv(rows, cfg.BLOCK_M) * _cdiv(cols, cfg.BLOCK_N),)
    # The dx kernel's output columns are x's (K); its names swap BLOCK_N and BLOCK_K.
    meta = LaunchMeta(
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N if kernel == "fwd" else cfg.BLOCK_K,
        BLOCK_K=cfg.BLOCK_K if kernel == "fwd" else cfg.BLOCK_N,
        R_CHUNK=min(block_r(rank), cfg.R_CHUNK),
        GROUP_M=cfg.GROUP_M,
        INPUT_PRECISION=precision,
        SPLIT_LOWRANK=dtype != torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if kernel == "bwd_dx":
        meta["BLOCK_R"] = block_r(rank)
    return grid, meta


def clear_config_cache() -> None:
    """Forget the cached launch plans (after changing the config tables or the environment)."""
    _shrink_plan.cache_clear()
    _splitk_plan.cache_clear()
    _gemm_plan.cache_clear()
    _forward_plan.cache_clear()
    _reduce_plan.cache_clear()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """How many programs a row reduction should spread over to fill the device."""
    if device.type != "cuda" or interpreter_enabled():
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pad_rank(mat: torch.Tensor) -> torch.Tensor:
    """``mat`` (``(..., R)``, A or Bm) with zero columns up to ``block_r(R)``.

    The kernels load A and Bm unmasked along the rank, over ``BLOCK_R`` columns: vectorised,
    cp.async-pipelined loads, which a rank that is not a multiple of 16 (4, 8, 12) would
    otherwise make scalar. Costs one copy of A and Bm per call, only at such ranks.
    """
    rank = mat.shape[-1]
    padded = block_r(rank)
    return mat if padded == rank else torch.nn.functional.pad(mat, (0, padded - rank))


def _a_strides(lora_a: torch.Tensor) -> tuple[int, int, int]:
    """``(stride_group, stride_k, stride_r)``; a shared 2-D A has group stride 0."""
    strides = lora_a.stride()  # one call: each stride(i) is a dispatcher round trip
    return strides if len(strides) == 3 else (0, *strides)


_NO_DROP: dict = {}
# The forward kernel's one per-call compile-time argument, as launch() extras.
_HAS_BIAS, _NO_BIAS = {"HAS_BIAS": True}, {"HAS_BIAS": False}


def _drop_args(dropout: Optional[tuple]) -> Optional[dict]:
    """The kernels' dropout keyword arguments for a ``(p, seed, offset)`` dropout."""
    if dropout is None:
        return None
    p, seed, offset = dropout
    return dict(DROPOUT=True, drop_seed=seed, drop_offset=offset, drop_threshold=keep_threshold(p))


def _shrink_layout(inp: torch.Tensor, shared: bool) -> tuple[int, int, int, int, int]:
    """``(samples, rows per sample, stride_b, stride_l, stride_k)`` the shrink tiles.

    One matrix for all samples and mergeable rows: tile the flat rows, not per sample.
    """
    batch, length, _ = inp.shape
    sb, sl, sk = inp.stride()
    if shared and (batch == 1 or sb == length * sl):
        return 1, batch * length, 0, sl, sk
    return batch, length, sb, sl, sk


def _launch_shrink(
    inp, mat, mat_strides, out, scaling, layout, split_plan, plain_plan, drop=None
) -> None:
    """Launch the split-K shrink (``split_plan``) or the plain one; see :func:`_shrink`.

    ``drop`` (:func:`_drop_args`, plain shrink only) zeroes the dropped elements of ``inp``.
    """
    if drop is not None and split_plan is not None:
        raise AssertionError("the split-K shrink applies no dropout mask")
    batch, length, sb, sl, sk = layout
    k, rank = inp.shape[-1], out.shape[-1]
    if split_plan is not None:
        split, k_split, grid, meta, red_grid, red_meta = split_plan
        ws = torch.empty((split, batch * length, rank), dtype=torch.float32, device=out.device)
        launch(
            _cora_shrink_splitk_kernel, grid,
            (inp, mat, ws),
            (length, k, rank, k_split, sb, sl, sk, *mat_strides,
             batch * length * rank, rank),  # ws's strides (contiguous), without two calls
            meta,
        )  # fmt: skip
        launch(
            _cora_splitk_reduce_kernel, red_grid,
            (ws, out), (batch * length * rank, split, batch * length * rank, scaling), red_meta,
        )  # fmt: skip
        return
    grid, meta = plain_plan
    launch(
        _cora_shrink_kernel, grid,
        (inp, mat, out), (length, k, rank, sb, sl, sk, *mat_strides, scaling), meta, drop,
    )  # fmt: skip


def _shrink(
    inp: torch.Tensor,
    mat: torch.Tensor,
    mat_strides: tuple[int, int, int],
    out: torch.Tensor,
    scaling: float,
    key: Optional[tuple] = None,
    gpu: Optional[dispatch.GpuSpec] = None,
    allow_split: bool = False,
    k_split: Optional[int] = None,
) -> None:
    """``out = scaling * inp @ mat[b]`` for a strided ``(B, L, K)`` ``inp``; out fp32 ``(B, L, R)``.

    ``key``: :func:`_key` of ``inp.dtype`` when the caller has it already. ``allow_split``:
    the split-K kernel may run (when the dispatcher chooses it for ``gpu``); the backward's
    ``dS`` shrink keeps the plain kernel. ``k_split`` (with ``allow_split``): K elements per
    split instead of the dispatcher's choice.
    """
    layout = _shrink_layout(inp, mat_strides[0] == 0)
    batch, length = layout[:2]
    key = key or _key(inp.dtype)
    split_plan = None
    if allow_split:
        split_plan = _splitk_plan(batch, length, inp.shape[-1], out.shape[-1], key, gpu, k_split)
    plain_plan = None if split_plan is not None else _shrink_plan(batch, length, out.shape[-1], key)
    _launch_shrink(inp, mat, mat_strides, out, scaling, layout, split_plan, plain_plan)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _reduce_plan(
    p: int, rank: int, groups: int, rows_per_group: int, programs: int, key: tuple, dropout: bool
) -> tuple:
    """``(splits, rows per split, grid, kwargs)`` of one :func:`_rows_transpose_matmul`
    launch; ``programs``: how many programs fill the device (:func:`_target_programs`)."""
    dtype, precision, _, _ = key
    cfg = reduce_config(dtype, rank, dropout)
    p_tiles = _cdiv(p, cfg.BLOCK_P)
    max_splits = max(1, _cdiv(rows_per_group, cfg.BLOCK_ROWS))
    splits = min(max_splits, max(1, _cdiv(programs, p_tiles * groups)))
    rows_per_split = _cdiv(_cdiv(rows_per_group, splits), cfg.BLOCK_ROWS) * cfg.BLOCK_ROWS
    splits = max(1, _cdiv(rows_per_group, rows_per_split))
    meta = LaunchMeta(
        BLOCK_P=cfg.BLOCK_P, BLOCK_ROWS=cfg.BLOCK_ROWS, BLOCK_R=block_r(rank),
        INPUT_PRECISION=precision, SPLIT_RHS=dtype != torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return splits, rows_per_split, (p_tiles, splits, groups), meta


def _rows_transpose_matmul(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    groups: int,
    rows_per_group: int,
    drop: Optional[dict] = None,
) -> torch.Tensor:
    """``out[g] = lhs_rows(g)^T @ rhs_rows(g)`` in fp32: ``(groups, P, R)``.

    ``lhs`` is a strided ``(B, L, P)`` tensor, ``rhs`` a contiguous fp32 ``(B, L, R)``;
    ``drop`` (:func:`_drop_args`) zeroes the dropped elements of ``lhs``.
    """
    _, length, p = lhs.shape
    rank = rhs.shape[-1]
    splits, rows_per_split, grid, meta = _reduce_plan(
        p, rank, groups, rows_per_group, _target_programs(lhs.device), _key(lhs.dtype),
        drop is not None,
    )  # fmt: skip
    out = torch.empty((splits, groups, p, rank), dtype=torch.float32, device=lhs.device)
    launch(
        _rows_transpose_matmul_kernel, grid,
        (lhs, rhs, out),
        (rows_per_group, p, rank, length, rows_per_split, *lhs.stride(), *out.stride()[:2]),
        meta, drop,
    )  # fmt: skip
    # Fixed-order sum of the per-chunk partials: deterministic, unlike atomics.
    return out.sum(0) if splits > 1 else out[0]


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    need_s: bool = True,
    dropout: Optional[tuple] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)``: y ``(B, L, d_out)`` in x's dtype, ``S = scaling * x A`` fp32 ``(B, L, r)``.

    ``need_s`` is accepted for the shared interface: the fused GEMM reads ``S`` from memory,
    so it is always made and returned.

    ``dropout``: ``None`` or ``(p, seed, offset)``; then ``S = scaling * dropout(x) A``
    (:mod:`llmrec_kernels.dropout`), and the base GEMM still reads ``x``.
    """
    if _hopper.supports(x, weight, dropout):  # sm_90 TMA/persistent path (triton/hopper.py)
        return _hopper.forward(x, weight, lora_a, lora_b, bias, scaling)
    batch, length, k = x.shape
    n, rank, rows = weight.shape[0], lora_a.shape[-1], batch * length
    dt, dev = x.dtype, x.device
    y = torch.empty((batch, length, n), dtype=dt, device=dev)
    s = torch.empty((batch, length, rank), dtype=torch.float32, device=dev)
    if rows == 0:
        return y, s
    key = _key(dt)
    lora_a, lora_b = _pad_rank(lora_a), _pad_rank(lora_b)
    layout = _shrink_layout(x, lora_a.dim() == 2)
    drop = _drop_args(dropout)
    s_scale = scaling if drop is None else scaling * keep_scale(dropout[0])
    # Split-K is an inference/decode path: a training forward with dropout on the LoRA input
    # takes the plain shrink, which applies the mask (the split-K kernel has none).
    split_plan, plain_plan, (grid, meta) = _forward_plan(
        layout[0], layout[1], k, n, rank, key, _gpu_spec(x), drop is not None
    )
    with _device_guard(x):
        _launch_shrink(
            x, lora_a, _a_strides(lora_a), s, s_scale, layout, split_plan, plain_plan, drop
        )
        if n == 0:
            return y, s
        bias_arg = bias.contiguous() if bias is not None else y
        launch(
            _cora_linear_fwd_kernel, grid,
            (x, weight, bias_arg, s, lora_b, y),
            (rows, n, k, rank, length, *x.stride(), *weight.stride(), *lora_b.stride()),
            meta, _HAS_BIAS if bias is not None else _NO_BIAS,
        )  # fmt: skip
    return y, s


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
    """Gradients ``(dx, dA, dB)`` of :func:`forward`; one not asked for is ``None``.

    ``dropout``: the forward's; the mask is regenerated, and ``dS = scaling/(1-p) dy Bm``
    carries the ``1/(1-p)`` of ``dropout(x)`` into dx's low-rank term and into dA.
    """
    if need_dx and _hopper.supports_dx(dy, x, weight, dropout):  # sm_90 (triton/hopper.py)
        return _hopper.backward(dy, x, weight, lora_a, lora_b, s_scaled, scaling,
                                need_dx, need_da, need_db)  # fmt: skip
    batch, length, k = x.shape
    n, rank, rows = weight.shape[0], lora_a.shape[-1], batch * length
    dx = da = db = None
    if rows == 0:
        return (
            torch.zeros_like(x) if need_dx else None,
            torch.zeros_like(lora_a) if need_da else None,
            torch.zeros_like(lora_b) if need_db else None,
        )
    per_sample = lora_a.dim() == 3
    da_shape, db_dtype = lora_a.shape, lora_b.dtype
    lora_a, lora_b = _pad_rank(lora_a), _pad_rank(lora_b)
    drop = _drop_args(dropout)
    # With dropout dx's kernel masks its low-rank term before dy W: dS must exist first.
    fuse_ds = need_dx and block_r(rank) <= MAX_FUSED_DS_RANK_BLOCK and k > 0 and drop is None
    ds_scale = scaling if drop is None else scaling * keep_scale(dropout[0])
    with _device_guard(x):
        ds = None
        if need_dx or need_da:
            ds = torch.empty((batch, length, rank), dtype=torch.float32, device=x.device)
            if not fuse_ds:
                lb = lora_b
                _shrink(dy, lb, (0, lb.stride(0), lb.stride(1)), ds, ds_scale)
        if need_dx:
            dx = torch.empty((batch, length, k), dtype=x.dtype, device=x.device)
            if k > 0:
                gpu = _gpu_spec(x)
                grid, meta = _gemm_plan(
                    "bwd_dx", rows, k, rank, _key(x.dtype), gpu.sm_count if gpu else None,
                    drop is not None,
                )  # fmt: skip
                launch(
                    _cora_linear_bwd_dx_kernel, grid,
                    (dy, weight, lora_a, lora_b, ds, dx),
                    (rows, n, k, rank, length, length if per_sample else rows,
                     *dy.stride(), *weight.stride(), *_a_strides(lora_a), *lora_b.stride(),
                     ds_scale),
                    meta, {"COMPUTE_DS": fuse_ds, **(drop or _NO_DROP)},
                )  # fmt: skip
        if need_da:
            groups, rows_per_group = (batch, length) if per_sample else (1, rows)
            da = _rows_transpose_matmul(x, ds, groups, rows_per_group, drop)
            da = da.reshape(da_shape).to(lora_a.dtype)
        if need_db:
            db = _rows_transpose_matmul(dy, s_scaled.contiguous(), 1, rows)[0].to(db_dtype)
    return dx, da, db


# One call (launch pair) per projection, dx and dA summed: llmrec_kernels._multi.
forward_multi, backward_multi = _multi.per_projection(forward, backward)
