"""GPU checks of fused_cora_linear: compiled Triton kernels (bf16 included) at model-like shapes.

Skipped without a CUDA device. The tolerance rule is ``tests/tolerance.py``: the fp64 factored
form as the oracle, the same-precision factored form as the reference (``test_cora_linear.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_cora_linear import check_all, make_inputs, reference_and_oracle, run_op
from tolerance import assert_close_to_oracle

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [
    (4, 37, 512, 1536, 16),   # prefill, fused-qkv-like N
    (64, 1, 1024, 1024, 16),  # decode
    (3, 130, 256, 200, 8),    # odd d_out, L over several row tiles
    (2, 64, 384, 256, 64),    # precomputed-dS path
    (2, 17, 128, 96, 128),    # largest rank
    (1, 1, 37, 53, 3),        # odd everything
]  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_matches_fp64(shape, dtype, shared, backend):
    inputs = make_inputs(*shape, dtype, shared=shared, device="cuda")
    y, grads = run_op(*inputs[:5], 2.0, inputs[5], backend=backend)
    check_all(y, grads, *reference_and_oracle(*inputs[:5], 2.0, inputs[5]))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_gpu_no_dense_memory(backend):
    """At B=64 decode the naive dense weights would need 64 * d^2 elements; no backend may."""
    from llmrec_kernels import fused_cora_linear
    from llmrec_kernels.backends import resolve_backend

    d, b, r = 2048, 64, 16
    expected = "torch" if backend == "auto" else "triton"  # auto takes cuBLAS on a GPU
    assert resolve_backend(backend, torch.device("cuda"), torch.bfloat16, r) == expected
    x, weight, lora_a, lora_b, bias, _ = make_inputs(b, 1, d, d, r, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_cora_linear(x, weight, lora_a, lora_b, bias, 2.0, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < b * d * d * 2 / 16, f"{extra} bytes allocated: a dense per-sample weight?"


def test_gpu_non_default_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    inputs = make_inputs(2, 5, 64, 48, 8, torch.float16, device="cuda:1")
    y, _ = run_op(*inputs[:5], 2.0, inputs[5], backend="triton")
    (y_ref, _), (y_orc, _) = reference_and_oracle(*inputs[:5], 2.0, inputs[5])
    assert_close_to_oracle(y, y_ref, y_orc, "y")
