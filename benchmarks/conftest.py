"""pytest-benchmark set-up for ``pytest benchmarks --benchmark-only``.

The files time CPU-sized shapes on the CPU and the LLaMA-7B shapes on a GPU when one is
present. They never assert on time. Triton's interpreter is not a performance path: on a
CPU the Triton and CUDA methods are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def run_method(benchmark, case, method: str) -> None:
    """Benchmark one method of a built case, or skip with the reason it cannot run."""
    if case.skip_reason is not None:
        pytest.skip(case.skip_reason)
    mc = next((m for m in case.methods if m.name == method), None)
    if mc is None:
        pytest.skip(f"{method} is not a method of {case.workload.op}")
    if mc.fn is None:
        pytest.skip(mc.skip_reason or "not runnable here")
    fn = mc.fn
    if DEVICE.type == "cuda":

        def fn():
            mc.fn()
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        op=case.workload.op, mode=case.workload.mode, B=case.workload.B, L=case.workload.L,
        d_in=case.workload.d_in, d_out=case.workload.d_out, r=case.workload.r,
        dtype=str(DTYPE), device=str(DEVICE), method=method,
    )  # fmt: skip
    fn()  # warm-up (and the first-call compilation of the Triton kernels on a GPU)
    benchmark(fn)
