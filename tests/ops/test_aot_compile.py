"""The Triton kernels, as the JIT specialises them for the dispatcher's shapes, compile for GPUs.

One subprocess (the interpreter the other tests use replaces compilation; this file run as a
script, :func:`_emit`) traces the real launchers (:func:`aot.trace_launches`) and compiles:

* a representative subset of the specialisations for sm_80 and sm_90 (LLaMA-7B shapes at
  decode (M 1) and prefill (8 x 256), ranks 4 and 128, fp16 and IEEE fp32, both A layouts; the CLI
  ``python -m tools.aot`` compiles all of them, every rank, dtype and model);
* a training step with LoRA dropout (the ``DROPOUT`` shrink, dx and dA kernels) at the
  prefill shape, rank 128, fp16 and IEEE fp32, both A layouts (:data:`DROPOUT_SUBSET`);
* the split-K shrink and its reduction (issue 16) at decode, with their occupancy;
* the shrink kernel as it was before the int64 fix (:func:`_old_shrink_kernel`, verbatim), to
  show that the PTX int64 check flags its 32-bit row offset, and that its R-masked loads of A at
  rank 4 are scalar and unpipelined where the padded A of the current launcher is pipelined.

Each record must assemble without spills, use tensor cores where it should, fit the
architecture's shared memory, and address memory with 64-bit offsets only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from llmrec_kernels.backends import triton_available
from tools import aot

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ARCHS = (80, 90)
SUBSET = dict(
    ranks=(4, 128),
    dtypes=((torch.float16, "tf32"), (torch.float32, "ieee")),
    batch_shapes=((1, 1), (8, 256)),
    models=("llama-7b",),
)
# Dropout is traced at the training (prefill) shape only. Rank 128 alone: the mask code is the
# same at every rank, and 128 is where the dx kernel's registers peak (its IEEE fp32 tile
# spilled there on sm_80); rank 4 adds four compiles per arch for no new code path.
DROPOUT_SUBSET = dict(SUBSET, ranks=(128,), batch_shapes=((8, 256),))
DROPOUT_KERNELS = {"shrink", "bwd_dx", "reduce"}


@triton.jit
def _old_shrink_kernel(
    x_ptr, a_ptr, s_ptr,
    L, K, R,
    stride_xb, stride_xl, stride_xk,
    stride_ab, stride_ak, stride_ar,
    scaling,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    # The shrink before the int64 fix and the rank padding (kernels.py at d857742), verbatim.
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < L
    r_mask = offs_r < R
    x_ptrs = x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xl + offs_k[None, :] * stride_xk  # OLD-LINE # fmt: skip
    a_ptrs = a_ptr + pid_b * stride_ab + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(xt, at.to(xt.dtype), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    s_ptrs = s_ptr + (pid_b * L + offs_m[:, None]) * R + offs_r[None, :]
    tl.store(s_ptrs, acc * scaling, mask=m_mask[:, None] & r_mask[None, :])


def _shrink_launch(fn, kind: str, arch: int, batch: int, length: int, k: int, rank: int, *, shared):
    """Specialise a shrink-shaped kernel as the old launcher called it (unpadded A)."""
    from llmrec_kernels.triton.configs import block_r, shrink_config

    x = torch.empty(batch, length, k, dtype=torch.float16, device="meta")
    a = torch.empty((k, rank) if shared else (batch, k, rank), dtype=torch.float16, device="meta")
    s = torch.empty(batch, length, rank, device="meta")
    sb, sl, sk = x.stride()
    a_strides = (0, *a.stride()) if shared else a.stride()
    if shared:  # the launcher merges all B * L rows when A is shared
        batch, length, sb = 1, batch * length, 0
    cfg = shrink_config(length, torch.float16)
    return aot.specialise(
        fn, kind, arch,
        x, a, s, length, k, rank, sb, sl, sk, *a_strides, 0.5,
        BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_R=block_r(rank),
        INPUT_PRECISION="tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _emit(out: Path) -> None:
    """Run in a subprocess with ``TRITON_INTERPRET`` unset: trace, compile, dump JSON."""
    from llmrec_kernels.triton import kernels
    from llmrec_kernels.triton.configs import GemmConfig, all_configs

    jobs = min(2, os.cpu_count() or 1)
    launches = aot.trace_launches(90, aot.workloads())
    traced = {"90": [launch.int_args() for launch in launches]}
    table = sorted({json.dumps(launch.table_entry()) for launch in launches})

    def effective(cfg, rank_block):  # a launch steps min(R_CHUNK, padded rank) ranks
        if isinstance(cfg, GemmConfig):
            return dataclasses.replace(cfg, R_CHUNK=min(cfg.R_CHUNK, rank_block))
        return cfg

    dispatchable = sorted(
        {
            json.dumps((kind, aot._TL_DTYPE[dtype], prec, dataclasses.astuple(effective(cfg, rb))))
            for kind, dtype, prec, rb, cfg in all_configs()
        }
    )
    work = aot.workloads(**SUBSET, dropout_shapes=())
    work += [w for w in aot.workloads(**DROPOUT_SUBSET) if w.dropout]
    subset = aot.compile_all(ARCHS, work, jobs=jobs)
    probes = {}
    for arch in ARCHS:
        for name, fn, kind, rank, shared in (
            ("old-shared-r16", _old_shrink_kernel, "old_shrink", 16, True),
            ("old-r4", _old_shrink_kernel, "old_shrink", 4, False),
            ("new-shared-r16", kernels._cora_shrink_kernel, "shrink", 16, True),
        ):
            launch = _shrink_launch(fn, kind, arch, 8, 256, 4096, rank, shared=shared)
            probes[f"{name}-sm{arch}"] = aot.compile_launch(launch, arch)
    out.write_text(
        json.dumps(
            {
                "traced": traced,
                "table": table,
                "dispatchable": dispatchable,
                "subset": subset,
                "probes": probes,
            }
        )
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The script imports tools.aot (build-time tools live at the repository root, not in
    # the installed package).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    if not out.exists():
        pytest.fail(
            f"ahead-of-time compilation crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(out.read_text())


def test_specialisation_follows_the_jit_rules(results):
    """Re-derive every recorded specialisation from the argument values (Triton's rules)."""
    launches = results["traced"]["90"]
    assert len(launches) > 100
    for args in launches:
        for name, (value, spec) in args.items():
            if name.endswith("_ptr"):
                assert spec == ("d" if value % 16 == 0 else "."), (name, value, spec)
            elif value == 1:
                assert spec == "1", (name, value, spec)
            else:
                assert spec == ("d" if value % 16 == 0 else "."), (name, value, spec)
    # The case: R = 16 and M = 2048 are marked divisible, M = 1 is a constant.
    specs = [{n: s for n, (_, s) in a.items()} for a in launches]
    values = [{n: v for n, (v, _) in a.items()} for a in launches]
    assert any(
        v.get("R") == 16 and s["R"] == "d" and s.get("M") == "d" for v, s in zip(values, specs)
    )
    assert any(v.get("M") == 1 and s["M"] == "1" for v, s in zip(values, specs))


def test_workloads_reach_every_table_config(results):
    """The traced shapes reach every tile configuration the dispatcher's tables hold."""
    assert set(results["table"]) == set(results["dispatchable"])


def test_subset_covers_every_kernel_and_arch(results):
    seen = {(r["kernel"], r["arch"]) for r in results["subset"]}
    assert seen == {(k, a) for k in aot.KERNELS for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_launches_are_traced_and_compiled(results, arch):
    """A training step's dropout launches (``DROPOUT=True``) are among those compiled.

    The shrink, dx and dA (reduce) kernels each with the mask, for both dtypes, launched only
    by the dropout workloads; the forward GEMM and the split-K shrink take no mask.
    """
    recs = [r for r in results["subset"] if r["arch"] == arch]
    drop = [r for r in recs if r["dropout"]]
    assert {(r["kernel"], r["dtype"]) for r in drop} == {
        (k, d) for k in DROPOUT_KERNELS for d in ("fp16", "fp32")
    }
    assert all(u.endswith(" dropout") for r in drop for u in r["users"])
    assert all("DROPOUT" in aot.KERNELS[r["kernel"]].arg_names for r in drop)
    # The mask's scalars are specialised as a training step passes them (64-bit seed).
    assert all("drop_seed=." in r["spec"] and "drop_offset=d" in r["spec"] for r in drop)
    # Dropout needs dS precomputed: the dx kernel never fuses it then.
    assert not any(r["config"].endswith(" ds drop") for r in drop)


def test_compiled_kernels_pass_every_check(results):
    bad = {
        f"{r['kernel']} sm{r['arch']} {r['dtype']} {r['config']} {r['spec']}": aot.failures(r)
        for r in results["subset"]
        if aot.failures(r)
    }
    assert not bad


@pytest.mark.parametrize("arch", ARCHS)
def test_split_k_shrink_compiles_clean_with_its_occupancy(results, arch):
    """The split-K shrink and its fixed-order reduction, as the decode workloads launch them.

    The subset's decode shapes (M 1) take split-K on the arch's default GPU (132 or 108 SMs);
    each specialisation is spill-free, 64-bit addressed, and its occupancy is stated (the
    cost model in ``triton/dispatch.py`` assumes several resident shrink programs per SM).
    """
    for kind in ("shrink_splitk", "splitk_reduce"):
        recs = [r for r in results["subset"] if r["kernel"] == kind and r["arch"] == arch]
        assert recs, kind
        for r in recs:
            assert not aot.failures(r), (kind, r["config"], r["spec"], aot.failures(r))
            assert r["int64_violations"] == []
            assert r["ctas_per_sm"] >= 2 and r["cta_limiter"], (kind, r["ctas_per_sm"])
        assert any("B1xL1" in u for r in recs for u in r["users"]), kind
    # fp16 at rank 4 (BLOCK_R 16): the shape the decode model is written for.
    small = [
        r for r in results["subset"]
        if r["kernel"] == "shrink_splitk" and r["arch"] == arch and r["dtype"] == "fp16"
        and r["block_r"] == 16
    ]  # fmt: skip
    assert small and min(r["ctas_per_sm"] for r in small) >= 7


def test_loads_of_a_and_b_are_pipelined(results):
    """Every load of A and Bm sits in a loop and must be a cp.async (or TMA) copy, rank 4 too.

    Single-stage configurations (the fp32 dx kernel) pipeline nothing, by the table's choice.
    """
    for r in results["subset"]:
        if r["num_stages"] < 2:
            continue
        for operand, kind in r["loads"].items():
            if kind != "-":
                assert aot.is_pipelined(kind), (r["kernel"], r["arch"], r["spec"], operand, kind)
    rank4 = [r for r in results["subset"] if r["kernel"] == "shrink" and "r4 " in r["users"][0]]
    assert rank4 and all(aot.is_pipelined(r["loads"]["A"]) for r in rank4)


def _line_of(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if marker in line)


@pytest.mark.parametrize("arch", ARCHS)
def test_int64_check_flags_the_old_row_offset(results, arch):
    old = results["probes"][f"old-shared-r16-sm{arch}"]
    where = f"{Path(__file__).name}:{_line_of('# OLD-LINE')} "
    assert any(where in v for v in old["int64_violations"]), old["int64_violations"]
    assert aot.failures(old)
    new = results["probes"][f"new-shared-r16-sm{arch}"]
    assert new["int64_violations"] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_unpadded_small_rank_loads_were_scalar(results, arch):
    """The check discriminates: the old R-masked A load at rank 4 is not pipelined."""
    old = results["probes"][f"old-r4-sm{arch}"]
    assert not aot.is_pipelined(old["loads"]["A"]) and old["loads"]["A"] == "ld2"


def test_int64_check_on_handwritten_ptx():
    """The PTX patterns: a 32-bit stride product reaching an address, and its 64-bit forms."""
    head = """
    .file 1 "k.py"
    .loc 1 10 0
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b32 %r1, [k_param_1];
    mov.u32 %r2, %tid.x;
    """
    bad = (
        head
        + """
    .loc 1 11 0
    mul.lo.s32 %r3, %r1, %r2;
    mad.wide.s32 %rd2, %r3, 2, %rd1;
    .loc 1 12 0
    @%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    """
    )
    shifted = (
        head
        + """
    shl.b32 %r3, %r1, 7;
    add.s32 %r4, %r3, %r2;
    mul.wide.s32 %rd3, %r4, 2;
    add.s64 %rd2, %rd1, %rd3;
    cp.async.cg.shared.global [ %r9 + 0 ], [ %rd2 + 0 ], 0x10, %r8;
    """
    )
    good = (
        head
        + """
    mul.wide.s32 %rd3, %r1, %r2;
    shl.b64 %rd4, %rd3, 1;
    add.s64 %rd2, %rd1, %rd4;
    mul.lo.s32 %r5, %r2, 64;
    ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    """
    )
    names = ["x_ptr", "stride_xl"]
    found = aot.int64_addressing_violations(bad, names)
    assert len(found) == 1 and found[0].startswith("k.py:12") and "k.py:11 (mul.lo.s32)" in found[0]
    assert len(aot.int64_addressing_violations(shifted, names)) == 1
    assert aot.int64_addressing_violations(good, names) == []
    # Not a stride: a 32-bit product of an index with M is index arithmetic, not an offset.
    assert aot.int64_addressing_violations(bad, ["x_ptr", "M"]) == []


def test_ctas_per_sm():
    # 128 registers x 4 warps: 65536 / (128 * 32 * 4) = 4 CTAs, limited by registers.
    assert aot.ctas_per_sm(128, 16 * 1024, 4, 90) == (4, "regs")
    # 100 KB of shared memory: 2 CTAs on sm_90 (228 KB per SM), 1 on sm_80 (164 KB).
    assert aot.ctas_per_sm(32, 100 * 1024, 4, 90) == (2, "smem")
    assert aot.ctas_per_sm(32, 100 * 1024, 4, 80) == (1, "smem")
    # 33 registers round up to 40 per thread (256 per warp): 65536 / (40 * 32) / 8 = 6.
    assert aot.ctas_per_sm(33, 0, 8, 80) == (6, "regs")


if __name__ == "__main__":
    _emit(Path(sys.argv[1]))
