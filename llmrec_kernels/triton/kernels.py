"""Triton kernels of the CoRA linear layer (forward and backward).

Notation: ``x`` is ``(B, L, K)`` (K = d_in), ``W`` is ``(N, K)`` (N = d_out), ``A`` is
``(B, K, R)`` per sample or ``(K, R)`` shared, ``Bm`` (the LoRA B) is ``(N, R)``, ``s`` is the
scaling, and ``M = B * L`` rows.

Forward: ``S = s * x A`` (fp32, ``(M, R)``), then ``y = x W^T + bias + S Bm^T``.

Design decision: ``S`` is computed first, by :func:`_cora_shrink_kernel`, not inside the K-loop
of the main GEMM. Reasons:

* the main GEMM can then tile the flat ``M = B * L`` rows freely: an output tile may span
  several samples (decode, ``L = 1``) because the low-rank epilogue ``S Bm^T`` involves only the
  shared ``Bm``. Computing ``x A_b`` inside the K-loop would tie every row tile to one sample
  and waste a whole tile per sample at decode;
* computing ``x A_b`` inside every output tile repeats it ``N / BLOCK_N`` times (``R / BLOCK_N``
  extra tensor-core work, and ``R / BLOCK_N`` extra loads of ``A``), whereas the separate shrink
  reads ``x`` once more (``M * K`` elements, small beside ``W`` at decode and L2-resident at
  prefill) and writes ``M * R`` fp32 values;
* ``S`` is kept for the backward (``dBm = dy^T S``) and can be shared by projections reading
  the same ``x`` and ``A`` (q, k and v in CoRA).

The cost model (docs/design.md §4) puts the shrink at ``2 M K R`` FLOPs, 0.4% of the GEMM at
``d = 4096, r = 16``; the extra traffic is one read of ``x``. This choice still has to be timed
against the in-loop variant on a GPU; the benchmark suite records both paths' times.

Precision: every accumulation is fp32. ``S`` stays fp32; to add ``S Bm^T`` on tensor cores in
fp16/bf16 it is split into a high and a low half (``S ~= hi + lo``, both in the input dtype,
about 16 mantissa bits together) and two MMAs are issued: twice a tiny product, and no
rounding of ``S`` to 8 bits. fp32 inputs use IEEE fp32 dots unless PyTorch allows TF32.

Addressing: every product of an index with a stride is computed in int64 (strides are widened
on entry, :func:`_wide`), so offsets never wrap once a tensor holds 2**31 elements or more;
``tools.aot.int64_addressing_violations`` enforces this on the PTX of every compiled kernel.

Rank padding: ``A`` and ``Bm`` hold exactly ``BLOCK_R`` columns in memory (the launcher pads
them with zeros when ``R`` is not already ``BLOCK_R``), so their loads carry no mask along the
rank: a runtime ``offs_r < R`` mask, and a row pitch that is not a multiple of 16 bytes, would
make them scalar loads outside the cp.async pipeline. ``S``, ``dS`` and the outputs keep ``R``.

Backward (``W`` frozen):

* :func:`_cora_linear_bwd_dx_kernel`: ``dx = dy W + dS A_b^T`` with ``dS = s dy Bm`` computed in
  the same pass over ``dy`` as ``dy W`` (``COMPUTE_DS``), or loaded when precomputed for large
  ranks where recomputing it in every column tile would cost more than a second pass;
* :func:`_rows_transpose_matmul_kernel`: ``dA_b = x_b^T dS_b`` and ``dBm = dy^T S``, reductions over
  rows split into fixed chunks whose fp32 partial sums are added by the launcher, so results
  are deterministic (no atomics anywhere).

LoRA dropout (``DROPOUT``, :mod:`llmrec_kernels.dropout`): ``S = s/(1-p) (x * keep) A``, the
keep mask regenerated from ``(seed, offset + element index)`` by :func:`_keep` wherever ``x``
enters the low-rank branch, never stored: the shrink zeroes dropped ``x`` elements, the dA
reduction likewise, and the dx kernel masks its low-rank term before ``dy W`` joins it
(``dx = dy W + keep * (dS A^T)`` with ``dS = s/(1-p) dy Bm`` precomputed). The ``1/(1-p)`` rides on the
fp32 scale, so masking is exact in every dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_hi_lo(v, DTYPE: tl.constexpr):
    """Split fp32 ``v`` into ``hi + lo`` in ``DTYPE``; non-finite values stay in ``hi`` alone."""
    hi = v.to(DTYPE)
    hi32 = hi.to(tl.float32)
    lo = tl.where(tl.abs(hi32) < float("inf"), v - hi32, tl.zeros_like(v)).to(DTYPE)
    return hi, lo


@triton.jit
def _dot_fp32_lhs(lhs, rhs, acc, SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + lhs @ rhs`` for an fp32 ``lhs`` and a ``rhs`` in the compute dtype.

    With ``SPLIT`` (16-bit compute), ``lhs`` enters the tensor cores as ``hi + lo`` halves.
    """
    if SPLIT:
        lhs_hi, lhs_lo = _split_hi_lo(lhs, rhs.dtype)
        acc = tl.dot(lhs_hi, rhs, acc)
        acc = tl.dot(lhs_lo, rhs, acc)
    else:
        acc = tl.dot(lhs, rhs, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _grouped_tile(
    pid,
    num_rows,
    num_cols,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
):
    """Map a linear program id to a (row tile, column tile), GROUP_ROWS row tiles at a time.

    Neighbouring programs then share column tiles of the weight in L2.
    """
    num_pid_m = tl.cdiv(num_rows, BLOCK_ROWS)
    num_pid_n = tl.cdiv(num_cols, BLOCK_COLS)
    num_pid_in_group = GROUP_ROWS * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_ROWS
    group_size_m = min(num_pid_m - first_pid_m, GROUP_ROWS)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _wide(v):
    """``v`` as int64: a stride, before any product with an index (constexpr strides fold)."""
    return tl.cast(v, tl.int64)


@triton.jit
def _row_offsets(offs_m, L, stride_b, stride_l):
    """Memory offsets of flat rows ``m = b * L + l`` of a strided ``(B, L, .)`` tensor."""
    return (offs_m // L).to(tl.int64) * stride_b + (offs_m % L).to(tl.int64) * stride_l


@triton.jit
def _keep(seed, elem, threshold):
    """Dropout keep mask of int64 element indices ``elem`` (:mod:`llmrec_kernels.dropout`):
    the 16-bit half ``elem & 1`` of word ``(elem >> 1) & 3`` of ``randint4x(seed, elem >> 3)``
    is at least ``threshold``."""
    r0, r1, r2, r3 = tl.randint4x(seed, elem >> 3)
    word = (elem >> 1) & 3
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    shift = ((elem & 1) * 16).to(tl.uint32)
    return ((r >> shift) & 0xFFFF).to(tl.int32) >= threshold


@triton.jit
def _cora_shrink_kernel(
    x_ptr, a_ptr, s_ptr,
    L, K, R,
    stride_xb, stride_xl, stride_xk,
    stride_ab, stride_ak, stride_ar,
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr = False,
    drop_seed=0, drop_offset=0, drop_threshold=0,
):  # fmt: skip
    """``S[b, l, :] = scaling * x[b, l, :] @ A[b]`` in fp32; S is contiguous ``(B, L, R)``.

    With ``DROPOUT`` the dropped elements of ``x`` (:func:`_keep`) read as zero.

    Grid: ``(cdiv(L, BLOCK_M), B)``. A shared A is passed with ``stride_ab = 0``; the same kernel
    computes ``dS = s * dy @ Bm`` with ``Bm`` passed as a shared ``(N, R)`` "A". ``A`` has
    ``BLOCK_R`` columns in memory (zero beyond ``R``).
    """
    stride_xb, stride_xl, stride_xk = _wide(stride_xb), _wide(stride_xl), _wide(stride_xk)
    stride_ab, stride_ak, stride_ar = _wide(stride_ab), _wide(stride_ak), _wide(stride_ar)
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < L
    r_mask = offs_r < R
    x_ptrs = x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xl + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + pid_b * stride_ab + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            elem = drop_offset + (pid_b * L + offs_m)[:, None] * K + (k0 + offs_k)[None, :]
            xt = tl.where(_keep(drop_seed, elem, drop_threshold), xt, tl.zeros_like(xt))
        at = tl.load(a_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(xt, at.to(xt.dtype), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    s_ptrs = s_ptr + (pid_b * L + offs_m[:, None]) * R + offs_r[None, :]
    tl.store(s_ptrs, acc * scaling, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _cora_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, lb_ptr, y_ptr,
    M, N, K, R, L,
    stride_xb, stride_xl, stride_xk,
    stride_wn, stride_wk,
    stride_lbn, stride_lbr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_CHUNK: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_LOWRANK: tl.constexpr,
):  # fmt: skip
    """``y = x W^T + bias + S Bm^T`` over flat rows; y is contiguous ``(M, N)``.

    Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``. ``S`` (fp32, contiguous ``(M, R)``) is
    already scaled; ``Bm`` has ``BLOCK_R >= R`` columns in memory (zero beyond ``R``), read
    ``R_CHUNK`` at a time. The low-rank term joins the fp32 accumulator before the single store.
    """
    stride_xb, stride_xl, stride_xk = _wide(stride_xb), _wide(stride_xl), _wide(stride_xk)
    stride_wn, stride_wk = _wide(stride_wn), _wide(stride_wk)
    stride_lbn, stride_lbr = _wide(stride_lbn), _wide(stride_lbr)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = _row_offsets(offs_m, L, stride_xb, stride_xl)
    x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Low-rank epilogue, R_CHUNK ranks at a time to bound registers at large r.
    compute_dtype = x_ptr.dtype.element_ty
    offs_c = tl.arange(0, R_CHUNK)
    s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * R + offs_c[None, :]
    lb_t_ptrs = lb_ptr + offs_c[:, None] * stride_lbr + offs_n[None, :] * stride_lbn
    for r0 in range(0, R, R_CHUNK):
        c_mask = (r0 + offs_c) < R
        s = tl.load(s_ptrs, mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        # R_CHUNK divides BLOCK_R, so a chunk never reaches past Bm's padded columns.
        lb_t = tl.load(lb_t_ptrs, mask=n_mask[None, :], other=0.0)
        acc = _dot_fp32_lhs(s, lb_t.to(compute_dtype), acc, SPLIT_LOWRANK, INPUT_PRECISION)
        s_ptrs += R_CHUNK
        lb_t_ptrs += R_CHUNK * stride_lbr
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _add_stored_ds_at(
    acc, ds_ptr, a_ptr, offs_m, offs_k, m_mask, k_mask, row_group, group_first, group_last,
    R, stride_ab, stride_ak, stride_ar, compute_dtype: tl.constexpr,
    R_CHUNK: tl.constexpr, SPLIT_LOWRANK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc + dS A_g^T`` for a ``(BLOCK_M, BLOCK_K)`` tile, ``dS`` read from memory (fp32,
    ``(M, R)``) and each row's own ``A_g`` (the rows of group ``g`` only).

    The rank is walked ``R_CHUNK`` columns at a time: at large ``r`` a whole ``(BLOCK_M, R)``
    slice of dS beside the accumulator would not fit in registers.
    """
    offs_c = tl.arange(0, R_CHUNK)
    a_g_ptrs = (
        a_ptr + group_first.to(tl.int64) * stride_ab + offs_c[:, None] * stride_ar
        + offs_k[None, :] * stride_ak
    )  # fmt: skip
    for _g in range(group_first, group_last + 1):
        row_mask = m_mask & (row_group == _g)
        for r0 in range(0, R, R_CHUNK):
            ds_c = tl.load(
                ds_ptr + offs_m[:, None].to(tl.int64) * R + (r0 + offs_c)[None, :],
                mask=row_mask[:, None] & ((r0 + offs_c) < R)[None, :],
                other=0.0,
            )
            a_t = tl.load(a_g_ptrs + r0 * stride_ar, mask=k_mask[None, :], other=0.0)
            acc = _dot_fp32_lhs(ds_c, a_t.to(compute_dtype), acc, SPLIT_LOWRANK, INPUT_PRECISION)
        a_g_ptrs += stride_ab
    return acc


@triton.jit
def _cora_linear_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, lb_ptr, ds_ptr, dx_ptr,
    M, N, K, R, L, ROWS_PER_A,
    stride_dyb, stride_dyl, stride_dyn,
    stride_wn, stride_wk,
    stride_ab, stride_ak, stride_ar,
    stride_lbn, stride_lbr,
    scaling,
    COMPUTE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_LOWRANK: tl.constexpr,
    DROPOUT: tl.constexpr = False,
    drop_seed=0, drop_offset=0, drop_threshold=0,
):  # fmt: skip
    """``dx = dy W + dS A_g^T`` over flat rows, ``g = m // ROWS_PER_A``; dx contiguous ``(M, K)``.

    Grid: ``(cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),)``; the reduction runs over N. With
    ``COMPUTE_DS``, ``dS = scaling * dy Bm`` is accumulated in the same loop over ``dy`` and
    the programs of the first column tile store it (fp32, ``(M, R)``) for the ``dA`` kernel;
    otherwise ``dS`` is read from ``ds_ptr``, ``R_CHUNK`` ranks at a time. A row tile may
    span several A's (short sequences); the epilogue adds each A's term to its own rows only.
    ``A`` and ``Bm`` have ``BLOCK_R`` columns in memory (zero beyond ``R``). ``DROPOUT``
    (dS precomputed) adds the low-rank term first, masked by :func:`_keep`, then ``dy W``.
    """
    stride_dyb, stride_dyl, stride_dyn = _wide(stride_dyb), _wide(stride_dyl), _wide(stride_dyn)
    stride_wn, stride_wk = _wide(stride_wn), _wide(stride_wk)
    stride_ab, stride_ak, stride_ar = _wide(stride_ab), _wide(stride_ak), _wide(stride_ar)
    stride_lbn, stride_lbr = _wide(stride_lbn), _wide(stride_lbr)
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    k_mask = offs_k < K
    r_mask = offs_r < R
    dy_rows = _row_offsets(offs_m, L, stride_dyb, stride_dyl)
    dy_ptrs = dy_ptr + dy_rows[:, None] + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    lb_ptrs = lb_ptr + offs_n[:, None] * stride_lbn + offs_r[None, :] * stride_lbr
    compute_dtype = dx_ptr.dtype.element_ty
    row_group = offs_m // ROWS_PER_A
    tile_first = pid_m * BLOCK_M
    tile_last = min(tile_first + BLOCK_M, M) - 1
    group_first = tile_first // ROWS_PER_A
    group_last = tile_last // ROWS_PER_A
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DROPOUT:
        # The masked low-rank term first, from the precomputed dS; dy W then accumulates onto
        # it, so no second (BLOCK_M, BLOCK_K) accumulator is live (it spilled at 128 x 128).
        tl.static_assert(not COMPUTE_DS, "dropout needs dS precomputed")
        # The mask before the accumulator is live: Philox's state then has the registers.
        elem = drop_offset + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        keep = _keep(drop_seed, elem, drop_threshold)
        acc = _add_stored_ds_at(
            acc, ds_ptr, a_ptr, offs_m, offs_k, m_mask, k_mask, row_group, group_first,
            group_last, R, stride_ab, stride_ak, stride_ar, compute_dtype,
            R_CHUNK, SPLIT_LOWRANK, INPUT_PRECISION,
        )  # fmt: skip
        acc = tl.where(keep, acc, tl.zeros_like(acc))
    for n0 in range(0, N, BLOCK_N):
        n_mask = (n0 + offs_n) < N
        dyt = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION)
        if COMPUTE_DS:
            lbt = tl.load(lb_ptrs, mask=n_mask[:, None], other=0.0)
            ds = tl.dot(dyt, lbt.to(dyt.dtype), ds, input_precision=INPUT_PRECISION)
            lb_ptrs += BLOCK_N * stride_lbn
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn

    if COMPUTE_DS:
        ds = ds * scaling
        if pid_k == 0:
            tl.store(
                ds_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :],
                ds,
                mask=m_mask[:, None] & r_mask[None, :],
            )
        a_t_ptrs = (
            a_ptr + group_first.to(tl.int64) * stride_ab + offs_r[:, None] * stride_ar
            + offs_k[None, :] * stride_ak
        )  # fmt: skip
        for _g in range(group_first, group_last + 1):
            a_t = tl.load(a_t_ptrs, mask=k_mask[None, :], other=0.0)
            ds_g = tl.where((row_group == _g)[:, None], ds, tl.zeros_like(ds))
            acc = _dot_fp32_lhs(ds_g, a_t.to(compute_dtype), acc, SPLIT_LOWRANK, INPUT_PRECISION)
            a_t_ptrs += stride_ab
    elif not DROPOUT:
        acc = _add_stored_ds_at(
            acc, ds_ptr, a_ptr, offs_m, offs_k, m_mask, k_mask, row_group, group_first,
            group_last, R, stride_ab, stride_ak, stride_ar, compute_dtype,
            R_CHUNK, SPLIT_LOWRANK, INPUT_PRECISION,
        )  # fmt: skip
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(compute_dtype), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _rows_transpose_matmul_kernel(
    lhs_ptr, rhs_ptr, out_ptr,
    ROWS_PER_GROUP, P, R, L, ROWS_PER_SPLIT,
    stride_lb, stride_ll, stride_lp,
    stride_os, stride_og,
    BLOCK_P: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT_RHS: tl.constexpr,
    DROPOUT: tl.constexpr = False,
    drop_seed=0, drop_offset=0, drop_threshold=0,
):  # fmt: skip
    """``out[split, g] = lhs[rows]^T @ rhs[rows]`` over one chunk of one group's rows.

    ``lhs`` is a strided ``(B, L, P)`` tensor read as flat rows ``m = b * L + l``; ``rhs`` is
    fp32 contiguous ``(M, R)``; group ``g`` owns rows ``[g * ROWS_PER_GROUP, (g + 1) *
    ROWS_PER_GROUP)``, split into chunks of ``ROWS_PER_SPLIT``. ``out`` is fp32
    ``(SPLITS, G, P, R)``, summed over splits by the launcher (deterministic).
    Grid: ``(cdiv(P, BLOCK_P), SPLITS, G)``. With ``DROPOUT`` the dropped elements of ``lhs``
    (``x``, element ``(row, p)``; :func:`_keep`) read as zero.
    """
    stride_lb, stride_ll, stride_lp = _wide(stride_lb), _wide(stride_ll), _wide(stride_lp)
    stride_os, stride_og = _wide(stride_os), _wide(stride_og)
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    p_mask = offs_p < P
    r_mask = offs_r < R
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = min(row_start + ROWS_PER_SPLIT, ROWS_PER_GROUP)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for i0 in range(row_start, row_end, BLOCK_ROWS):
        offs_i = i0 + tl.arange(0, BLOCK_ROWS)
        i_mask = offs_i < row_end
        rows = g * ROWS_PER_GROUP + offs_i
        lhs_rows = _row_offsets(rows, L, stride_lb, stride_ll)
        lhs_t = tl.load(
            lhs_ptr + lhs_rows[None, :] + offs_p[:, None] * stride_lp,
            mask=p_mask[:, None] & i_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            elem = drop_offset + rows[None, :].to(tl.int64) * P + offs_p[:, None]
            lhs_t = tl.where(_keep(drop_seed, elem, drop_threshold), lhs_t, tl.zeros_like(lhs_t))
        rhs = tl.load(
            rhs_ptr + rows[:, None].to(tl.int64) * R + offs_r[None, :],
            mask=i_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if SPLIT_RHS:
            rhs_hi, rhs_lo = _split_hi_lo(rhs, lhs_t.dtype)
            acc = tl.dot(lhs_t, rhs_hi, acc)
            acc = tl.dot(lhs_t, rhs_lo, acc)
        else:
            acc = tl.dot(lhs_t, rhs, acc, input_precision=INPUT_PRECISION)
    out_ptrs = (
        out_ptr + pid_s * stride_os + g * stride_og
        + offs_p[:, None].to(tl.int64) * R + offs_r[None, :]
    )  # fmt: skip
    tl.store(out_ptrs, acc, mask=p_mask[:, None] & r_mask[None, :])
