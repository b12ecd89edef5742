"""pytest-benchmark: one CoRA projection and the fused q/k/v projection, every method.

CPU: d 1024 (scaled down from LLaMA-7B's 4096); GPU: d 4096. No assertion on time.
"""

from __future__ import annotations

import pytest

from benchmarks.conftest import DEVICE, DTYPE, run_method
from benchmarks.methods import METHODS, Workload, available_memory_bytes, build_projection_case

D = 4096 if DEVICE.type == "cuda" else 1024
SHAPES = ((32, 1), (8, 256)) if DEVICE.type == "cuda" else ((32, 1), (8, 64))
RANK = 16

_cases: dict = {}


def _case(op: str, mode: str, b: int, length: int):
    key = (op, mode, b, length)
    if key not in _cases:
        _cases.clear()  # keep one workload's tensors alive at a time
        d_out = 3 * D if op == "qkv" else D
        wl = Workload(op, mode, b, length, D, d_out, RANK, DTYPE)
        _cases[key] = build_projection_case(wl, DEVICE, available_memory_bytes(DEVICE) // 2)
    return _cases[key]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xL{s[1]}")
@pytest.mark.parametrize("mode", ("fwd", "fwd_bwd"))
def test_proj(benchmark, mode, shape, method):
    benchmark.group = f"proj {mode} B={shape[0]} L={shape[1]} d={D} r={RANK}"
    run_method(benchmark, _case("proj", mode, *shape), method)


@pytest.mark.parametrize("method", METHODS)
def test_qkv_fwd(benchmark, method):
    b, length = SHAPES[1]
    benchmark.group = f"qkv fwd B={b} L={length} d={D}->{3 * D} r={RANK}"
    run_method(benchmark, _case("qkv", "fwd", b, length), method)
