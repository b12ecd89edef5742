"""The tolerance rule (``tests/tolerance.py``) lets a correct op pass and catches small bugs.

Each bug is a plausible kernel mistake on top of the real op: a dropped bias, the low-rank term
scaled 1% wrong, ``S`` rounded to bf16 before the expand (the hi/lo split left out), a gradient
1% off. A rule loose enough to let them through would make every numeric test toothless.
"""

from __future__ import annotations

import pytest
import torch
from test_cora_linear import make_inputs, reference_and_oracle, run_op
from tolerance import assert_close_to_oracle

from llmrec_kernels import _torch_impl

SCALING = 2.0


def _forward_with(bug: str):
    real = _torch_impl.forward

    def forward(x, weight, lora_a, lora_b, bias, scaling, *rest):
        if bug == "no_bias":
            return real(x, weight, lora_a, lora_b, None, scaling)
        if bug == "scaling_1pct":
            return real(x, weight, lora_a, lora_b, bias, scaling * 1.01)
        if bug == "s_rounded_to_bf16":
            _, s = real(x, weight, lora_a, lora_b, bias, scaling)
            y_no_lowrank = real(x, weight, lora_a, torch.zeros_like(lora_b), bias, scaling)[0]
            s_bf16 = s.to(torch.bfloat16).to(x.dtype)
            lowrank = torch.matmul(s_bf16, lora_b.to(x.dtype).transpose(0, 1))
            return (y_no_lowrank + lowrank).to(x.dtype), s
        raise ValueError(bug)

    return forward


def _check(dtype, monkeypatch=None, bug=None):
    inputs = make_inputs(4, 6, 48, 40, 8, dtype, seed=11)
    if bug is not None:
        monkeypatch.setattr(_torch_impl, "forward", _forward_with(bug))
    y, grads = run_op(*inputs[:5], SCALING, inputs[5], backend="torch")
    (y_ref, g_ref), (y_orc, g_orc) = reference_and_oracle(*inputs[:5], SCALING, inputs[5])
    assert_close_to_oracle(y, y_ref, y_orc, "y")
    return grads, g_ref, g_orc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_correct_op_passes(dtype):
    grads, g_ref, g_orc = _check(dtype)
    for g, r, o in zip(grads, g_ref, g_orc):
        assert_close_to_oracle(g, r, o)


# bf16 carries 8 bits: a 1% error of one term of the sum is below its rounding, so that bug is
# asserted for fp32 and fp16 only; the bf16 rounding of S is a bug only for fp32 inputs.
@pytest.mark.parametrize(
    "dtype, bug",
    [
        (torch.float32, "no_bias"),
        (torch.float16, "no_bias"),
        (torch.bfloat16, "no_bias"),
        (torch.float32, "scaling_1pct"),
        (torch.float16, "scaling_1pct"),
        (torch.float32, "s_rounded_to_bf16"),
    ],
    ids=str,
)
def test_forward_bugs_fail(dtype, bug, monkeypatch):
    with pytest.raises(AssertionError, match="max error vs fp64"):
        _check(dtype, monkeypatch, bug)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["dx", "dA", "dB", "dbias"])
def test_gradient_off_by_one_percent_fails(dtype, which):
    grads, g_ref, g_orc = _check(dtype)
    wrong = grads[which] * 1.01
    with pytest.raises(AssertionError, match="max error vs fp64"):
        assert_close_to_oracle(wrong, g_ref[which], g_orc[which])


def test_non_finite_mismatch_fails():
    orc = torch.tensor([1.0, float("inf"), 3.0], dtype=torch.float64)
    ok = torch.tensor([1.0, float("inf"), 3.0])
    assert_close_to_oracle(ok, ok, orc)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_oracle(torch.tensor([1.0, 5.0, 3.0]), ok, orc)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_oracle(torch.tensor([float("nan"), float("inf"), 3.0]), ok, orc)
