"""The one tolerance rule of the numeric tests: compare against an fp64 oracle, relative to
what the same precision can do.

A result under test passes when

    err(actual) <= K[dtype] * err(reference) + EPS[dtype] * max|oracle|

where ``err(t) = max |t - oracle|`` elementwise, ``oracle`` is the computation in float64
and ``reference`` is an independent plain-PyTorch computation in the same precision as the
result under test (the rule flash-attention's tests use). Comparing two fp32 (or bf16)
paths with each other directly fails on a CPU whose kernels sum in another order; comparing
both with fp64 measures each path's own error, and the same-precision reference says how
large that error may legitimately be on the machine at hand.

``K`` allows the path under test a few times the reference's error (another summation order,
a split accumulation); ``EPS`` is a floor of a few units in the last place of the dtype, for
when the reference happens to be exact. Both are stated once, here.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch

# How many times the same-precision reference's error the result under test may have.
K = {torch.float64: 4.0, torch.float32: 4.0, torch.float16: 3.0, torch.bfloat16: 3.0}
# A floor, in units of max|oracle|: about eight ulps at 1.0 for fp64/fp32, two for 16-bit.
EPS = {
    torch.float64: 8 * torch.finfo(torch.float64).eps,
    torch.float32: 8 * torch.finfo(torch.float32).eps,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}


def max_error(t: torch.Tensor, oracle: torch.Tensor) -> float:
    """``max |t - oracle|`` over the finite entries of the oracle, in float64."""
    diff = (t.detach().to(torch.float64) - oracle.detach().to(torch.float64)).abs()
    finite = torch.isfinite(oracle)
    return float(diff[finite].max()) if bool(finite.any()) else 0.0


def assert_close_to_oracle(
    actual: torch.Tensor,
    reference: torch.Tensor,
    oracle: torch.Tensor,
    what: str = "result",
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Assert ``actual`` is as close to the fp64 ``oracle`` as the same-precision ``reference``.

    Args:
        actual: the result under test, any floating dtype and shape.
        reference: the same quantity from an independent computation in the precision of
            ``actual`` (plain PyTorch), same shape.
        oracle: the same quantity computed in float64, same shape.
        what: a name for the failure message.
        dtype: the precision whose ``K``/``EPS`` apply (default: ``actual.dtype``); pass it
            when a low-precision computation returns a wider dtype.

    Non-finite entries of the oracle must be matched exactly (same inf, NaN where NaN).
    """
    if actual.shape != oracle.shape or reference.shape != oracle.shape:
        raise AssertionError(
            f"{what}: shapes differ: actual {tuple(actual.shape)}, reference "
            f"{tuple(reference.shape)}, oracle {tuple(oracle.shape)}"
        )
    dtype = dtype or actual.dtype
    oracle = oracle.detach().to(torch.float64)
    nonfinite = ~torch.isfinite(oracle)
    if bool(nonfinite.any()):
        got = actual.detach().to(torch.float64)[nonfinite]
        want = oracle[nonfinite]
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        assert bool(same.all()), f"{what}: non-finite entries differ from the oracle's"
    finite = torch.isfinite(oracle)
    if bool(finite.any()):
        assert bool(torch.isfinite(actual.detach()[finite]).all()), (
            f"{what}: non-finite values where the fp64 oracle is finite"
        )
    err = max_error(actual, oracle)
    err_ref = max_error(reference, oracle)
    scale = float(oracle[finite].abs().max()) if bool(finite.any()) else 0.0
    bound = K[dtype] * err_ref + EPS[dtype] * scale
    assert err <= bound or math.isclose(err, bound), (
        f"{what}: max error vs fp64 {err:.3e} > {K[dtype]:g} x the {dtype} reference's "
        f"{err_ref:.3e} + {EPS[dtype]:.1e} x max|oracle| {scale:.3g} (= {bound:.3e})"
    )


def fp64_copy(module: torch.nn.Module, batch: dict) -> tuple[torch.nn.Module, dict]:
    """A float64 copy of ``module`` and ``batch`` (floating tensors cast, others kept): how the
    model-level tests compute their oracle. ``module`` itself is not changed."""
    batch64 = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in batch.items()
    }
    return copy.deepcopy(module).double(), batch64
