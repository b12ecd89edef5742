"""The Hopper (sm_90) Triton kernels of :mod:`llmrec_kernels.triton.hopper`: a persistent,
TMA-fed forward and dx with the low-rank term as one extra K step of the same accumulator.

The host side (tile configurations, descriptors, launches, the selection hook) lives in
:mod:`llmrec_kernels.triton.hopper`; the same kernel bodies take a pointer-load path
(``USE_TMA=False``) on sm_80 and where no 2-D descriptor fits.
"""

import triton
import triton.language as tl

from llmrec_kernels.triton.kernels import _dot_fp32_lhs, _grouped_tile, _row_offsets, _wide


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
