"""Every Triton kernel, at every configuration the dispatcher can choose, compiles for real GPUs.

Runs ``python -m llmrec_kernels.triton.aot`` once (in a subprocess: the interpreter that the
other tests use replaces compilation) for sm_80 and sm_90, then checks each record: the kernel
assembled with ``ptxas -v``, spilled no registers, and its dots became tensor-core
instructions (``mma.sync`` on sm_80, ``wgmma`` or ``mma`` on sm_90), except IEEE fp32 dots,
which run on FMA units by design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmrec_kernels.backends import triton_available
from llmrec_kernels.triton.aot import needs_tensor_cores
from llmrec_kernels.triton.configs import all_configs

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ARCHS = (80, 90)
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
CASES = [
    (kind, _DTYPE_NAME[dtype], precision, block_r, str(cfg), arch)
    for kind, dtype, precision, block_r, cfg in all_configs()
    for arch in ARCHS
]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "llmrec_kernels.triton.aot", "--json", str(out),
         "--jobs", str(os.cpu_count() or 1)],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    if not out.exists():
        pytest.fail(
            f"ahead-of-time compilation crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return {
        (r["kernel"], r["dtype"], r["precision"], r["block_r"], r["config"], r["arch"]): r
        for r in json.loads(out.read_text())
    }


def test_every_dispatchable_config_was_compiled(records):
    assert set(records) == set(CASES)
    assert {r["kernel"] for r in records.values()} == {"fwd", "bwd_dx", "shrink", "reduce"}


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-r{c[3]}-sm{c[5]}-{c[4]}"
)
def test_compiles_without_spills_on_tensor_cores(records, case):
    rec = records[case]
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, (
        f"{rec['registers']} registers, {rec['spill_stores']} bytes of spill stores"
    )
    if needs_tensor_cores(rec):
        assert rec["uses_tensor_cores"], "no mma/wgmma instruction in the PTX"
    assert 0 < rec["registers"] <= 255
