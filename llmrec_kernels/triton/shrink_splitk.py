"""Split-K shrink ``S = s * x A``: the decode shrink that fills the GPU (issue 16).

The plain shrink (:func:`llmrec_kernels.triton.kernels._cora_shrink_kernel`) gives each
program one row tile of one sample and walks all of ``K``: at decode (``L = 1``) that is one
program per sample streaming ``K * R`` elements of ``A_b`` through a short cp.async ring, a
latency-bound stream of about 15 GB/s per SM, and ``B`` programs for ``B`` samples (32 of
132 SMs at ``B = 32``). Splitting ``K`` over ``SPLIT`` programs multiplies the bytes in
flight by ``SPLIT``; see :mod:`llmrec_kernels.triton.dispatch` for when it pays.

Two launches, no atomics, so the result is bitwise reproducible:

* :func:`_cora_shrink_splitk_kernel`: program ``(m, j, b)`` reduces rows ``m`` of sample ``b``
  over the ``j``-th slice of ``K`` (``K_SPLIT`` elements, a multiple of ``BLOCK_K``) into an
  fp32 workspace ``ws[j, b * L + l, :]`` of shape ``(SPLIT, M, R)``;
* :func:`_cora_splitk_reduce_kernel`: ``S = scaling * (ws[0] + ws[1] + ...)`` summed in the
  fixed order ``j = 0, 1, ...`` by one program per element block, whatever ``M`` is. A
  row's bits therefore depend only on ``K``, ``K_SPLIT`` and the tile config, never on the
  other rows: the property the batch-invariant mode relies on.

Addressing follows :mod:`llmrec_kernels.triton.kernels`: strides are widened to int64 on
entry, so every index-times-stride product is 64-bit (``tools.aot.int64_addressing_violations``).
``A`` has ``BLOCK_R`` columns in memory (zero beyond ``R``), as for the plain shrink.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _wide(v):
    """``v`` as int64 (a stride, before any product with an index)."""
    return tl.cast(v, tl.int64)


@triton.jit
def _cora_shrink_splitk_kernel(
    x_ptr, a_ptr, ws_ptr,
    L, K, R, K_SPLIT,
    stride_xb, stride_xl, stride_xk,
    stride_ab, stride_ak, stride_ar,
    stride_wss, stride_wsm,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``ws[j, b*L + l, :] = x[b, l, kj] @ A[b, kj, :]`` over ``kj = [j*K_SPLIT, (j+1)*K_SPLIT)``.

    Grid: ``(cdiv(L, BLOCK_M), SPLIT, B)``; a shared A is passed with ``stride_ab = 0``. The
    partials are unscaled fp32; :func:`_cora_splitk_reduce_kernel` sums and scales them.
    """
    stride_xb, stride_xl, stride_xk = _wide(stride_xb), _wide(stride_xl), _wide(stride_xk)
    stride_ab, stride_ak, stride_ar = _wide(stride_ab), _wide(stride_ak), _wide(stride_ar)
    stride_wss, stride_wsm = _wide(stride_wss), _wide(stride_wsm)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    k_lo = pid_s * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < L
    r_mask = offs_r < R
    x_ptrs = (
        x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xl
        + (k_lo + offs_k[None, :]) * stride_xk
    )  # fmt: skip
    a_ptrs = (
        a_ptr + pid_b * stride_ab + (k_lo + offs_k[:, None]) * stride_ak
        + offs_r[None, :] * stride_ar
    )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_mask = (k0 + offs_k) < k_hi
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(xt, at.to(xt.dtype), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    ws_ptrs = (
        ws_ptr + pid_s.to(tl.int64) * stride_wss
        + (pid_b * L + offs_m[:, None]) * stride_wsm + offs_r[None, :]
    )  # fmt: skip
    tl.store(ws_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _cora_splitk_reduce_kernel(
    ws_ptr, s_ptr,
    NUMEL, SPLIT,
    stride_wss,
    scaling,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """``S.flat[i] = scaling * sum_j ws[j].flat[i]``, ``j`` ascending; S contiguous ``(M, R)``.

    Grid: ``(cdiv(M * R, BLOCK),)``. ``ws[j]`` is contiguous ``(M, R)`` at ``j * stride_wss``.
    """
    stride_wss = _wide(stride_wss)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, SPLIT):
        acc += tl.load(ws_ptr + j * stride_wss + offs, mask=mask, other=0.0)
    tl.store(s_ptr + offs, acc * scaling, mask=mask)


@triton.jit
def _cora_splitk_expand_add_kernel(
    ws_ptr, b_ptr, y_ptr,
    M, N, R, SPLIT,
    stride_wss, stride_wsm,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr = "ieee",
):  # fmt: skip
    """``y[m, n] += scaling * sum_r (ws[0, m, r] + ws[1, m, r] + ...) * B[n, r]``: the decode
    path's one expand-add (issue 25 item 2), the split-K reduction folded into it.

    Grid: ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``. ``ws`` holds the split-K shrink's fp32
    partials ``(SPLIT, M, R)`` (row stride ``stride_wsm``, rank stride 1), summed in the fixed
    order ``j = 0, 1, ...`` (bitwise reproducible, as :func:`_cora_splitk_reduce_kernel`);
    ``B`` is ``(N, R)`` with ``BLOCK_R`` columns in memory (zero beyond ``R``); ``y`` ``(M, N)``
    holds the base product ``x W^T (+ bias)`` and gets the low-rank term added in place, in
    fp32, rounded once (as cuBLAS's ``addmm_`` into a 16-bit ``y``). The rank is walked in
    ``R_CHUNK`` steps (a whole rank-128 B tile in fp32 spilled). The rank-``R`` product is a
    few FMAs per output at decode: an fp32 dot, IEEE by default (no tensor cores needed;
    ``INPUT_PRECISION`` names it for the AOT checks).
    """
    stride_wss, stride_wsm = _wide(stride_wss), _wide(stride_wsm)
    stride_bn, stride_br = _wide(stride_bn), _wide(stride_br)
    stride_ym, stride_yn = _wide(stride_ym), _wide(stride_yn)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, BLOCK_R, R_CHUNK):
        offs_r = r0 + tl.arange(0, R_CHUNK)
        s_mask = m_mask[:, None] & (offs_r < R)[None, :]
        ws_ptrs = ws_ptr + offs_m[:, None] * stride_wsm + offs_r[None, :]
        s = tl.zeros((BLOCK_M, R_CHUNK), dtype=tl.float32)
        for j in range(0, SPLIT):
            s += tl.load(ws_ptrs + j * stride_wss, mask=s_mask, other=0.0)
        b_t = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=n_mask[None, :], other=0.0,
        )  # fmt: skip
        acc = tl.dot(s, b_t.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = m_mask[:, None] & n_mask[None, :]
    base = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (base.to(tl.float32) + acc * scaling).to(base.dtype), mask=y_mask)
