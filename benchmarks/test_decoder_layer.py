"""pytest-benchmark: one patched LLaMA decoder layer, forward + backward, reference way vs ours.

CPU: hidden 512 (4 heads, FFN 1376), B 4, L 32; GPU: LLaMA-7B shapes, B 8, L 256. Skipped with
the reason when transformers or ``llmrec_kernels.hf`` is missing. No assertion on time.
"""

from __future__ import annotations

import pytest

from benchmarks.conftest import DEVICE, DTYPE, run_method
from benchmarks.methods import Workload, available_memory_bytes
from benchmarks.model_workloads import build_decoder_layer_case

if DEVICE.type == "cuda":
    WL = Workload("decoder_layer", "fwd_bwd", 8, 256, 4096, 4096, 16, DTYPE,
                  (("ffn", 11008), ("heads", 32)))  # fmt: skip
else:
    WL = Workload("decoder_layer", "fwd_bwd", 4, 32, 512, 512, 16, DTYPE,
                  (("ffn", 1376), ("heads", 4)))  # fmt: skip

METHODS = ("reference", "ours[fused_qkv]", "ours[unfused]", "base")
_case: list = []


def _get():
    if not _case:
        _case.append(build_decoder_layer_case(WL, DEVICE, available_memory_bytes(DEVICE) // 2))
    return _case[0]


@pytest.mark.parametrize("method", METHODS)
def test_decoder_layer_fwd_bwd(benchmark, method):
    benchmark.group = f"decoder_layer fwd_bwd B={WL.B} L={WL.L} d={WL.d_in}"
    run_method(benchmark, _get(), method)
