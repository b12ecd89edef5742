"""The Hopper kernels (:mod:`llmrec_kernels.triton.hopper`) compiled ahead of time, no GPU.

Self-contained: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` on the
specialisations the launchers make at LLaMA-7B prefill (8 x 256 rows, d 4096, r 16), then
``ptxas -v`` (Triton's bundled ``ptxas-blackwell``, which accepts the PTX version Triton
emits for sm_90a) for registers and spills. Compilation cannot run under the interpreter the
other tests use, so one subprocess (this file run as a script, :func:`_emit`) compiles
every case and writes one JSON record per case.

What must hold:

* sm_90 descriptor path: the mainloop is ``wgmma`` fed by TMA (``cp.async.bulk.tensor``
  global -> shared, completed on mbarriers), the output leaves by TMA stores, and there is no
  ``mma.sync``;
* sm_80 (the pointer path of the same kernels): ``mma.sync`` with ``cp.async``, no ``wgmma``
  and no TMA;
* everywhere: no spills, and shared memory within the architecture's per-block limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llmrec_kernels.backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# Opt-in maximum of dynamic shared memory per block (CUDA programming guide).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (name, kernel, arch, dtype, descriptors, rank[, flatten[, wide]]): prefill 8 x 256 at
# LLaMA-7B size; "wide" = the 128 x 256 candidate tile (hopper.WIDE_16BIT).
CASES = [
    ("fwd-sm90-bf16-tma-r16-flat", "fwd", 90, "bf16", True, 16, True),
    ("fwd-sm90-bf16-tma-r16-wide", "fwd", 90, "bf16", True, 16, False, True),
    ("fwd-sm90-bf16-tma-r16-wide-flat", "fwd", 90, "bf16", True, 16, True, True),
    ("dx-sm90-bf16-tma-r16-wide", "dx", 90, "bf16", True, 16, False, True),
    ("fwd-sm90-bf16-tma-r16", "fwd", 90, "bf16", True, 16),
    ("fwd-sm90-fp16-tma-r64", "fwd", 90, "fp16", True, 64),
    ("dx-sm90-bf16-tma-r16", "dx", 90, "bf16", True, 16),
    ("dx-sm90-fp16-tma-r64", "dx", 90, "fp16", True, 64),
    ("fwd-sm90-bf16-ptr-r16", "fwd", 90, "bf16", False, 16),
    ("dx-sm90-bf16-ptr-r16", "dx", 90, "bf16", False, 16),
    ("fwd-sm80-bf16-ptr-r16", "fwd", 80, "bf16", False, 16),
    ("fwd-sm80-fp16-ptr-r64", "fwd", 80, "fp16", False, 64),
    ("dx-sm80-bf16-ptr-r16", "dx", 80, "bf16", False, 16),
    ("dx-sm80-fp16-ptr-r64", "dx", 80, "fp16", False, 64),
    ("fwd-sm90-bf16-tma-r128", "fwd", 90, "bf16", True, 128),
    ("dx-sm90-bf16-tma-r128", "dx", 90, "bf16", True, 128),
    ("dx-sm80-bf16-ptr-r128", "dx", 80, "bf16", False, 128),
    # fp32 (never selected by the backend's hook; callable directly): TF32 and IEEE tiles.
    ("fwd-sm90-tf32-tma-r16", "fwd", 90, "tf32", True, 16),
    ("dx-sm90-tf32-tma-r128", "dx", 90, "tf32", True, 128),
    ("fwd-sm80-tf32-ptr-r16", "fwd", 80, "tf32", False, 16),
    ("dx-sm80-tf32-ptr-r128", "dx", 80, "tf32", False, 128),
    ("fwd-sm90-ieee-tma-r16", "fwd", 90, "ieee", True, 16),
    ("dx-sm90-ieee-tma-r128", "dx", 90, "ieee", True, 128),
    ("fwd-sm80-ieee-ptr-r128", "fwd", 80, "ieee", False, 128),
    ("dx-sm80-ieee-ptr-r128", "dx", 80, "ieee", False, 128),
]
BATCH, LENGTH, D_IN, D_OUT = 8, 256, 4096, 4096

# The CASES' dtype column: the tensors' dtype, and the dots' input precision.
_TORCH_DTYPE = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "ieee": torch.float32,
}  # fmt: skip
_PRECISION = {"bf16": "tf32", "fp16": "tf32", "tf32": "tf32", "ieee": "ieee"}


def _ptxas() -> Path | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    return path if path.exists() else None


def _specialise(fn, arch: int, *args, **kwargs):
    """``(signature, constexprs, attrs, options)`` of ``fn[grid](*args, **kwargs)`` on sm_arch.

    Triton's own binder and argument packing (what ``JITFunction.run`` does before compiling),
    with the target's backend instead of the current device's.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs["debug"] = knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, opts = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, opts)


def _launch_args(kernel, dtype: str, tma: bool, rank: int, flatten=False, wide=False):
    """The positional and keyword arguments the launcher passes (meta tensors, no memory)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from llmrec_kernels.triton import hopper, hopper_kernels
    from llmrec_kernels.triton.configs import block_r

    precision = _PRECISION[dtype]
    dtype = _TORCH_DTYPE[dtype]
    cfg = hopper.WIDE_16BIT if wide else hopper.hopper_config(dtype, precision)
    rows, rb = BATCH * LENGTH, block_r(rank)

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    def desc(t, block):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block)

    x, w = meta(rows, D_IN), meta(D_OUT, D_IN)
    common = dict(
        USE_TMA=tma, BLOCK_M=cfg.BLOCK_M, BLOCK_R=rb, GROUP_M=cfg.GROUP_M,
        EPI_SPLIT=cfg.EPI_SPLIT, NUM_PROGRAMS=132, INPUT_PRECISION=precision,
        SPLIT_LOWRANK=dtype != torch.float32, R_CHUNK=hopper._rank_chunk(rank),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    out_block = [cfg.BLOCK_M, cfg.BLOCK_COLS // cfg.EPI_SPLIT]
    if kernel == "fwd":
        y, lb = meta(rows, D_OUT), meta(D_OUT, rb)
        srcs = (
            (desc(x, [cfg.BLOCK_M, cfg.BLOCK_RED]), desc(w, [cfg.BLOCK_COLS, cfg.BLOCK_RED]),
             desc(y, out_block))
            if tma else (x, w, y)
        )  # fmt: skip
        args = (
            *srcs, meta(D_OUT), meta(rows, rank, dt=torch.float32), lb,
            rows, D_OUT, D_IN, rank, LENGTH,
            LENGTH * D_IN, D_IN, 1, D_IN, 1, rb, 1,
        )  # fmt: skip
        return (
            hopper_kernels._hopper_fwd_kernel,
            args,
            dict(
                common, HAS_BIAS=True, BLOCK_N=cfg.BLOCK_COLS, BLOCK_K=cfg.BLOCK_RED,
                FLATTEN=flatten,
            ),
        )  # fmt: skip
    dy, dx, a = meta(rows, D_OUT), meta(rows, D_IN), meta(BATCH, D_IN, rb)
    srcs = (
        (desc(dy, [cfg.BLOCK_M, cfg.BLOCK_RED]), desc(w, [cfg.BLOCK_RED, cfg.BLOCK_COLS]),
         desc(dx, out_block))
        if tma else (dy, w, dx)
    )  # fmt: skip
    args = (
        *srcs, meta(rows, rank, dt=torch.float32), a,
        rows, D_OUT, D_IN, rank, LENGTH, LENGTH,
        LENGTH * D_OUT, D_OUT, 1, D_IN, 1, D_IN * rb, rb, 1,
    )  # fmt: skip
    return (
        hopper_kernels._hopper_dx_kernel,
        args,
        dict(common, BLOCK_K=cfg.BLOCK_COLS, BLOCK_N=cfg.BLOCK_RED),
    )


def _count(pattern: str, ptx: str) -> int:
    return len(re.findall(pattern, ptx, flags=re.MULTILINE))


def _compile_case(name, kernel, arch, dtype, tma, rank, flatten=False, wide=False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, kwargs = _launch_args(kernel, dtype, tma, rank, flatten, wide)
    options, signature, constexprs, attrs = _specialise(fn, arch, *args, **kwargs)
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(options.__dict__),
    )
    ptx = compiled.asm["ptx"]
    record = {
        "name": name,
        "kernel": kernel,
        "arch": arch,
        "dtype": dtype,
        "tma": tma,
        "rank": rank,
        "flatten": flatten,
        "wide": wide,
        "shared": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "wgmma": _count(r"^\s*wgmma\.mma_async", ptx),
        "mma_sync": _count(r"^\s*(@%p\d+ )?mma\.sync", ptx),
        "tma_loads": _count(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx),
        "tma_stores": _count(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared", ptx),
        "cp_async": _count(r"cp\.async\.(ca|cg)\.shared\.global", ptx),
        "mbarrier_waits": _count(r"mbarrier\.try_wait", ptx),
        "registers": None,
        "spill_stores": None,
        "spill_loads": None,
    }
    ptxas = _ptxas()
    if ptxas is not None:
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k.ptx").write_text(ptx)
            proc = subprocess.run(
                [str(ptxas), "-v", f"--gpu-name={gpu}", str(Path(tmp) / "k.ptx"),
                 "-o", str(Path(tmp) / "k.cubin")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
        report = proc.stdout + proc.stderr
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        regs = re.search(r"Used (\d+) registers", report)
        record.update(
            registers=int(regs.group(1)),
            spill_stores=int(spills.group(1)),
            spill_loads=int(spills.group(2)),
        )
    return record


def _emit(out: Path) -> None:
    """Run in a subprocess with ``TRITON_INTERPRET`` unset: compile every case, dump JSON."""
    out.write_text(json.dumps([_compile_case(*case) for case in CASES]))


@pytest.fixture(scope="module")
def records() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hopper_aot.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        proc = subprocess.run(
            [sys.executable, __file__, str(out)],
            capture_output=True, text=True, env=env, timeout=900, check=False,
        )  # fmt: skip
        if not out.exists():
            pytest.fail(f"AOT compilation crashed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        recs = json.loads(out.read_text())
    for r in recs:  # the table the report quotes (pytest -s shows it)
        print(
            f"{r['name']:32s} regs {r['registers']} spill {r['spill_stores']}/{r['spill_loads']} "
            f"smem {r['shared']} wgmma {r['wgmma']} mma.sync {r['mma_sync']} "
            f"tma ld {r['tma_loads']} st {r['tma_stores']} cp.async {r['cp_async']} "
            f"mbar waits {r['mbarrier_waits']}"
        )
    return {r["name"]: r for r in recs}


def _need_ptxas(records: dict) -> None:
    if any(r["registers"] is None for r in records.values()):
        pytest.skip("Triton's bundled ptxas-blackwell is absent: no register/spill report")


def test_every_case_compiled(records):
    assert set(records) == {case[0] for case in CASES}


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[2] == 90 and c[4]])
def test_sm90_descriptor_path_is_wgmma_fed_by_tma(records, name):
    r = records[name]
    if r["dtype"] == "ieee":  # IEEE fp32 dots run on the FMA units: TMA-fed all the same
        assert r["wgmma"] == 0 and r["mma_sync"] == 0, r
    else:
        assert r["wgmma"] > 0 and r["mma_sync"] == 0, r
    # Both mainloop operands by TMA into shared memory, waited on with mbarriers; the
    # epilogue's slices leave by TMA stores. No cp.async copies remain, except where the
    # flattened forward pipelines its rank-sized low-rank tiles
    # (test_flattened_forward_overlaps_the_low_rank_loads).
    assert r["tma_loads"] >= 2 and r["mbarrier_waits"] > 0, r
    assert r["tma_stores"] >= 2, r
    if not r["flatten"]:
        assert r["cp_async"] == 0, r


@pytest.mark.parametrize(
    "name", [c[0] for c in CASES if c[2] == 90 and not c[4] and c[3] != "ieee"]
)
def test_sm90_pointer_path_still_uses_wgmma(records, name):
    r = records[name]
    assert r["wgmma"] > 0 and r["tma_loads"] == 0 and r["tma_stores"] == 0, r


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[2] == 80])
def test_sm80_variant_is_mma_sync_with_cp_async(records, name):
    r = records[name]
    assert (r["mma_sync"] > 0 or r["dtype"] == "ieee") and r["wgmma"] == 0, r
    assert r["tma_loads"] == 0 and r["cp_async"] > 0, r


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_no_spills_and_shared_memory_fits(records, name):
    r = records[name]
    assert r["shared"] <= SMEM_LIMIT[r["arch"]], r
    _need_ptxas(records)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_flattened_forward_overlaps_the_low_rank_loads(records):
    """``flatten=True``: the tile and K loops become one pipelined loop; the low-rank operands
    of the next tile then travel by cp.async in the same ring (they are plain loads in the
    nested form), at the cost of registers and shared memory, still within sm_90's limits."""
    flat, nested = records["fwd-sm90-bf16-tma-r16-flat"], records["fwd-sm90-bf16-tma-r16"]
    assert flat["cp_async"] > 0 and nested["cp_async"] == 0, (flat, nested)
    assert flat["shared"] > nested["shared"], (flat, nested)


def test_sm90_tile_is_one_cta_per_sm_with_a_deep_ring(records):
    """128 x 128 x 64 at 4 stages: more than half of an SM's 228 KB (one CTA per SM, as a
    persistent grid of one program per SM assumes), and at least 3 stages of operands."""
    for name in ("fwd-sm90-bf16-tma-r16", "dx-sm90-bf16-tma-r16"):
        shared = records[name]["shared"]
        assert shared > 114 * 1024, shared
        assert shared >= 3 * (128 * 64 + 128 * 64) * 2, shared


if __name__ == "__main__":
    _emit(Path(sys.argv[1]))
