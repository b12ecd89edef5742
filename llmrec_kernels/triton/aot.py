"""Ahead-of-time compilation of the Triton kernels for real GPUs, without a GPU.

Every kernel at every configuration the dispatcher can choose (:func:`configs.all_configs`) is
compiled with ``triton.compile`` for a ``GPUTarget`` (sm_80, sm_90), and the PTX is assembled
with the ``ptxas`` bundled with Triton, ``-v``, to read registers and spills. Used by the test
suite and runnable by hand::

    python -m llmrec_kernels.triton.aot            # table of every config, both archs
    python -m llmrec_kernels.triton.aot --arch 90

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces compilation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmrec_kernels.triton import kernels
from llmrec_kernels.triton.configs import GemmConfig, ReduceConfig, ShrinkConfig, all_configs

__all__ = ["CompileReport", "compile_config", "ptxas_path"]

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass
class CompileReport:
    kernel: str
    dtype: str
    precision: str
    block_r: int
    config: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    uses_tensor_cores: bool
    ptx: str = dataclasses.field(repr=False)


def ptxas_path(arch: int) -> str:
    """The ptxas bundled with Triton that accepts its PTX version for ``arch``.

    Triton emits PTX newer than the plain bundled ptxas (and CUDA 13.0's) accepts for sm_90a;
    the ``ptxas-blackwell`` binary accepts it.
    """
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise FileNotFoundError(f"no ptxas under {bin_dir}")


# What the JIT specialises for contiguous inputs with dimensions that are multiples of 16 (the
# LLM shapes the kernels are tuned for): unit strides become constants, and pointers, sizes and
# strides are known to be 16-divisible. Odd shapes compile to slower generic variants.
_UNIT_STRIDES = {
    "fwd": ("stride_xk", "stride_wk", "stride_lbr"),
    "bwd_dx": ("stride_dyn", "stride_wk", "stride_ar", "stride_lbr"),
    "shrink": ("stride_xk", "stride_ar"),
    "reduce": ("stride_lp",),
}
_ALIGNED_INTS = {
    "fwd": ("N", "K", "stride_xb", "stride_xl", "stride_wn", "stride_lbn"),
    "bwd_dx": ("N", "K", "stride_dyb", "stride_dyl", "stride_wn", "stride_ab", "stride_ak",
               "stride_lbn"),
    "shrink": ("K", "stride_xb", "stride_xl", "stride_ab", "stride_ak"),
    "reduce": ("P", "stride_lb", "stride_ll", "stride_os", "stride_og"),
}  # fmt: skip


def _signature(fn, dtype: torch.dtype, pointers: dict[str, str], constexprs: dict) -> dict:
    compute = _TL_DTYPE[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + (pointers[name] or compute)
        elif name == "scaling":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _kernel_spec(kind: str, dtype: torch.dtype, precision: str, block_r: int, cfg) -> tuple:
    """``(jit fn, pointer dtypes, constexprs, num_warps, num_stages)`` as the launchers pass them."""
    from llmrec_kernels.triton.cora_linear import MAX_FUSED_DS_RANK_BLOCK, R_CHUNK

    split = dtype != torch.float32
    if kind == "fwd":
        assert isinstance(cfg, GemmConfig)
        return (
            kernels._cora_linear_fwd_kernel,
            {"x_ptr": None, "w_ptr": None, "bias_ptr": None, "s_ptr": "fp32", "lb_ptr": None,
             "y_ptr": None},
            dict(HAS_BIAS=True, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                 R_CHUNK=min(block_r, R_CHUNK), GROUP_M=cfg.GROUP_M, INPUT_PRECISION=precision,
                 SPLIT_LOWRANK=split),
            cfg.num_warps, cfg.num_stages,
        )  # fmt: skip
    if kind == "bwd_dx":
        assert isinstance(cfg, GemmConfig)
        return (
            kernels._cora_linear_bwd_dx_kernel,
            {"dy_ptr": None, "w_ptr": None, "a_ptr": None, "lb_ptr": None, "ds_ptr": "fp32",
             "dx_ptr": None},
            dict(COMPUTE_DS=block_r <= MAX_FUSED_DS_RANK_BLOCK, BLOCK_M=cfg.BLOCK_M,
                 BLOCK_K=cfg.BLOCK_N, BLOCK_N=cfg.BLOCK_K, BLOCK_R=block_r,
                 R_CHUNK=min(block_r, R_CHUNK), GROUP_M=cfg.GROUP_M,
                 INPUT_PRECISION=precision, SPLIT_LOWRANK=split),
            cfg.num_warps, cfg.num_stages,
        )  # fmt: skip
    if kind == "shrink":
        assert isinstance(cfg, ShrinkConfig)
        return (
            kernels._cora_shrink_kernel,
            {"x_ptr": None, "a_ptr": None, "s_ptr": "fp32"},
            dict(BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_R=block_r,
                 INPUT_PRECISION=precision),
            cfg.num_warps, cfg.num_stages,
        )  # fmt: skip
    if kind == "reduce":
        assert isinstance(cfg, ReduceConfig)
        return (
            kernels._rows_transpose_matmul_kernel,
            {"lhs_ptr": None, "rhs_ptr": "fp32", "out_ptr": "fp32"},
            dict(BLOCK_P=cfg.BLOCK_P, BLOCK_ROWS=cfg.BLOCK_ROWS, BLOCK_R=block_r,
                 INPUT_PRECISION=precision, SPLIT_RHS=split),
            cfg.num_warps, cfg.num_stages,
        )  # fmt: skip
    raise ValueError(f"unknown kernel kind {kind!r}")


_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_LINE = re.compile(r"Used (\d+) registers")


def compile_config(
    kind: str, dtype: torch.dtype, precision: str, block_r: int, cfg, arch: int
) -> CompileReport:
    """Compile one kernel configuration for ``sm_{arch}`` and read ``ptxas -v``'s report."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    fn, pointers, constexprs, num_warps, num_stages = _kernel_spec(
        kind, dtype, precision, block_r, cfg
    )
    constexprs = {**constexprs, **dict.fromkeys(_UNIT_STRIDES[kind], 1)}
    signature = _signature(fn, dtype, pointers, constexprs)
    aligned = list(pointers) + list(_ALIGNED_INTS[kind])
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = Path(tmp) / "kernel.ptx"
        ptx_file.write_text(ptx)
        proc = subprocess.run(
            [ptxas_path(arch), "-v", f"--gpu-name={gpu_name}", str(ptx_file),
             "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = proc.stdout + proc.stderr
    spills = _PTXAS_LINE.search(report)
    regs = _REGS_LINE.search(report)
    if spills is None or regs is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{report}")
    return CompileReport(
        kernel=kind,
        dtype=_TL_DTYPE[dtype],
        precision=precision,
        block_r=block_r,
        config=str(cfg),
        arch=arch,
        registers=int(regs.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        uses_tensor_cores=("wgmma" in ptx) or ("mma.sync" in ptx),
        ptx=ptx,
    )


def needs_tensor_cores(record: dict) -> bool:
    """IEEE fp32 dots run on FMA units by design; every other dot must use tensor cores."""
    return not (record["dtype"] == "fp32" and record["precision"] == "ieee")


def _compile_job(job: tuple) -> dict:
    rep = compile_config(*job)
    record = dataclasses.asdict(rep)
    del record["ptx"]
    return record


def compile_all(archs: tuple[int, ...] = (80, 90), jobs: int = 1) -> list[dict]:
    """Compile every configuration for every arch; one record per compile, in a stable order."""
    work = [(*spec, arch) for spec in all_configs() for arch in archs]
    if jobs <= 1:
        return [_compile_job(job) for job in work]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    args = parser.parse_args(argv)
    records = compile_all(tuple(args.arch or (80, 90)), args.jobs)
    failures = 0
    print(f"{'kernel':8} {'dtype':5} {'prec':4} {'R':>4} arch regs spill tc  config")
    for rec in records:
        bad = rec["spill_stores"] > 0 or (needs_tensor_cores(rec) and not rec["uses_tensor_cores"])
        failures += bad
        print(
            f"{rec['kernel']:8} {rec['dtype']:5} {rec['precision']:4} {rec['block_r']:4d} {rec['arch']:4d} "
            f"{rec['registers']:4d} {rec['spill_stores']:5d} "
            f"{'y' if rec['uses_tensor_cores'] else 'n':3} {rec['config']}"
            + ("  <-- FAIL" if bad else "")
        )
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(f"{len(records)} compiles, {failures} with spills or missing tensor cores")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
