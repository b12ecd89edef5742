"""The decode path's Triton kernels (``llmrec_kernels/triton/decode.py``) compile for sm_80
and sm_90 as its launcher specialises them (issue 25 item 2).

A subprocess (compilation needs ``TRITON_INTERPRET`` unset; this file run as a script)
runs the decode launcher on meta tensors at decode shapes (B 1 and 32, d 4096, ranks 16 and
128, bf16, fp16 and fp32, per-sample and shared A) with each kernel's ``run`` replaced by a
recorder of Triton's own specialisation for the target (``tools.aot.specialise``), and the
dispatcher sized for that target's GPU; every distinct specialisation of the expand-add (and
the bf16 ones of the shrinks, whose other dtypes test_aot_compile.py compiles) is compiled
and must pass the checks of ``tools.aot.failures``: no spills, shared memory within the block limit,
64-bit address arithmetic, registers in range. The expand-add's rank-r product is an IEEE
fp32 dot (FMA units, not tensor cores, by design).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmrec_kernels.backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ARCHS = (80, 90)
SHAPES = ((1, 4096, 4096), (32, 4096, 4096))  # (B, d_in, d_out) at L 1
RANKS = (16, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _trace(arch: int) -> list:
    """The decode launcher's distinct launches on ``sm_{arch}``."""
    from llmrec_kernels.triton import cora_linear, decode, dispatch
    from tools import aot

    kernels = {
        "shrink": cora_linear._cora_shrink_kernel,
        "shrink_splitk": cora_linear._cora_shrink_splitk_kernel,
        "expand_add": decode._cora_splitk_expand_add_kernel,
    }
    recorded: dict = {}

    def recorder(kind, fn):
        def run(*args, grid, warmup, **kwargs):
            launch = aot.specialise(fn, kind, arch, *args, **kwargs)
            recorded.setdefault(launch.key, launch)

        return run

    saved_spec = cora_linear._gpu_spec
    try:
        for kind, fn in kernels.items():
            fn.run = recorder(kind, fn)
        cora_linear._gpu_spec = lambda tensor: dispatch.ARCH_DEFAULT[arch]
        cora_linear.clear_config_cache()
        for (batch, d_in, d_out), rank, dtype, shared in (
            (s, r, dt, sh) for s in SHAPES for r in RANKS for dt in DTYPES for sh in (False, True)
        ):
            x = torch.empty(batch, 1, d_in, dtype=dtype, device="meta")
            w = torch.empty(d_out, d_in, dtype=dtype, device="meta")
            a_shape = (d_in, rank) if shared else (batch, d_in, rank)
            a = torch.empty(a_shape, dtype=dtype, device="meta")
            b = torch.empty(d_out, rank, dtype=dtype, device="meta")
            out = torch.empty(batch, 1, d_out, dtype=dtype, device="meta")
            ws = torch.empty(decode.workspace_numel(x, a), device="meta")
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32: IEEE dots
            try:
                decode.forward_into(x, w, a, b, None, 0.5, out, ws)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
    finally:
        for fn in kernels.values():
            with contextlib.suppress(AttributeError):
                del fn.run
        cora_linear._gpu_spec = saved_spec
        cora_linear.clear_config_cache()
    return list(recorded.values())


def _emit(out: Path) -> None:
    from tools import aot

    records = []
    for arch in ARCHS:
        for launch in _trace(arch):
            # every expand-add; the shrinks (compiled in test_aot_compile.py) in bf16 only
            if launch.kind != "expand_add" and "bf16" not in launch.signature["x_ptr"]:
                continue
            rec = aot.compile_launch(launch, arch)
            rec["failures"] = aot.failures(rec)
            records.append(rec)
    out.write_text(json.dumps(records))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("decode-aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    if not out.exists():
        pytest.fail(f"compilation crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_decode_kernels_compile_clean_for_both_archs(records):
    kinds = {(r["kernel"], r["arch"]) for r in records}
    # decode at B 32 splits K on both targets; the expand-add runs after either shrink
    assert {("shrink_splitk", a) for a in ARCHS} <= kinds
    assert {("expand_add", a) for a in ARCHS} <= kinds
    bad = {f"{r['kernel']} sm{r['arch']} {r['dtype']} {r['config']}": r["failures"]
           for r in records if r["failures"]}  # fmt: skip
    assert not bad, bad


def test_expand_add_is_an_fma_dot_within_limits(records):
    expand = [r for r in records if r["kernel"] == "expand_add"]
    assert {r["block_r"] for r in expand} == set(RANKS)
    for r in expand:
        assert r["precision"] == "ieee" and r["dtype"] == "fp32"  # fp32 partials, IEEE dot
        assert r["spill_stores"] == r["spill_loads"] == 0
        assert r["shared"] <= r["shared_limit"] and r["ctas_per_sm"] >= 1
        assert not r["int64_violations"], r["int64_violations"]


if __name__ == "__main__":
    _emit(Path(sys.argv[1]))
