"""Ahead-of-time compilation of the Triton kernels for real GPUs, without a GPU.

What is compiled is what the JIT would launch. The real launchers
(:mod:`llmrec_kernels.triton.cora_linear`) run on CPU tensors of the shapes the dispatcher sees
(:func:`workloads`: LLaMA-7B and SmolLM2-135M projections, ranks 4 to 128, decode and prefill,
every dtype, per-sample and shared ``A``, forward and backward; the training shapes once more
with LoRA dropout, whose launches specialise the shrink, dx and dA kernels with ``DROPOUT``)
with each kernel's ``run`` replaced by a recorder. The recorder specialises the arguments with Triton's own binder for the
target (``create_function_from_signature`` + ``JITFunction._pack_args``, the code
``JITFunction.run`` calls): integers divisible by 16 and equal to 1, 16-byte-aligned pointers,
constexprs, options. Each distinct specialisation is then compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``, as ``JITFunction._do_compile`` does, and its PTX assembled
with the ``ptxas`` bundled with Triton (``-v``: registers, spills).

Each compiled kernel is checked for:

* no register spills, and tensor-core instructions for every dot that should have them;
* shared memory within the architecture's per-block limit (:data:`ARCH_LIMITS`);
* int64 addressing (:func:`int64_addressing_violations`);

and reported with its occupancy (CTAs per SM from registers, shared memory and warps) and
how its loads of ``A`` and ``Bm`` are issued (:func:`load_kinds`). Used by the test suite and
runnable by hand::

    python -m tools.aot                 # every specialisation, both archs
    python -m tools.aot --arch 90 --table out.txt

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces compilation).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from llmrec_kernels.triton import cora_linear, dispatch, kernels, shrink_splitk
from llmrec_kernels.triton.configs import DTYPE_PRECISIONS

__all__ = [
    "ARCH_LIMITS",
    "Launch",
    "Workload",
    "compile_launch",
    "int64_addressing_violations",
    "load_kinds",
    "ptxas_path",
    "trace_launches",
    "workloads",
]

KERNELS = {
    "shrink": kernels._cora_shrink_kernel,
    "fwd": kernels._cora_linear_fwd_kernel,
    "bwd_dx": kernels._cora_linear_bwd_dx_kernel,
    "reduce": kernels._rows_transpose_matmul_kernel,
    "shrink_splitk": shrink_splitk._cora_shrink_splitk_kernel,
    "splitk_reduce": shrink_splitk._cora_splitk_reduce_kernel,
}
# Kernels without a dot: no input precision, no tensor cores expected.
NO_DOT_KERNELS = frozenset({"splitk_reduce"})


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of one architecture (CUDA C Programming Guide, compute capabilities)."""

    smem_per_block: int  # opt-in maximum of dynamic shared memory per block, bytes
    smem_per_sm: int
    smem_reserved_per_block: int  # the driver reserves 1 KB per resident block (sm_80+)
    regs_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    sm_count: int  # A100 SXM / H100 SXM: what the launcher sizes its split-K grids for


ARCH_LIMITS = {
    80: ArchLimits(163 * 1024, 164 * 1024, 1024, 65536, 2048, 32, 108),
    90: ArchLimits(227 * 1024, 228 * 1024, 1024, 65536, 2048, 32, 132),
}
# Registers are allocated per warp in units of 256 (8 per thread).
_REG_ALLOC_UNIT = 256

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------
# The shapes the dispatcher sees


@dataclasses.dataclass(frozen=True)
class Workload:
    """One call of the op: a projection of a model at a rank, dtype and batch shape."""

    model: str
    proj: str
    d_in: int
    d_out: int
    rank: int
    dtype: torch.dtype
    precision: str  # "ieee" or "tf32" (fp32 only; 16-bit dtypes ignore it)
    batch: int
    length: int
    shared_a: bool
    dropout: bool = False  # a training step with LoRA dropout (:data:`TRAINING_DROPOUT`)

    @property
    def name(self) -> str:
        a = "sharedA" if self.shared_a else "perSampleA"
        return (
            f"{self.model}.{self.proj} r{self.rank} {_TL_DTYPE[self.dtype]}/{self.precision} "
            f"B{self.batch}xL{self.length} {a}" + (" dropout" if self.dropout else "")
        )


MODEL_PROJECTIONS = {
    # LLaMA-7B: d 4096, 32 heads of 128, no GQA: q, k, v and o are all 4096 x 4096.
    "llama-7b": (("qkvo", 4096, 4096),),
    # SmolLM2-135M: d 576, 9 query heads and 3 key/value heads of 64.
    "smollm2-135m": (("q/o", 576, 576), ("k/v", 576, 192)),
}
RANKS = (4, 8, 12, 16, 32, 64, 128)
# (B, L): decode at M = 1, 32 and 64 (every row class of the tile tables), prefill at M = 2048
# as one sequence and as 8 samples.
BATCH_SHAPES = ((1, 1), (32, 1), (64, 1), (1, 2048), (8, 256))
# The prefill shapes are the training ones: LoRA dropout is traced there only (a decode step is
# inference, no dropout). The mask adds no shape of its own: the dropout launches differ from
# the plain ones by ``DROPOUT`` and the three scalars of :data:`TRAINING_DROPOUT`.
TRAINING_SHAPES = ((1, 2048), (8, 256))
# ``(p, seed, offset)`` as a training step passes them: p 0.05 (a common LoRA dropout), a seed
# as :func:`llmrec_kernels.dropout.draw_seed` draws them (64-bit; not a multiple of 16, as 15
# in 16 draws are not), offset 0 (the default). The JIT specialises the scalars like any int,
# so a seed that is a multiple of 16, or below 2**31, compiles once more, to the same code but
# for the alignment hint or the width of the seed register.
TRAINING_DROPOUT = (0.05, 0x2C1B_3C6D_5E7F_8A9B, 0)


def workloads(
    ranks: Iterable[int] = RANKS,
    dtypes: Iterable[tuple[torch.dtype, str]] = DTYPE_PRECISIONS,
    batch_shapes: Iterable[tuple[int, int]] = BATCH_SHAPES,
    models: Iterable[str] = tuple(MODEL_PROJECTIONS),
    dropout_shapes: Iterable[tuple[int, int]] = TRAINING_SHAPES,
) -> list[Workload]:
    """Every combination of the given models' projections, ranks, dtypes, shapes, A layouts.

    A shape of ``batch_shapes`` also in ``dropout_shapes`` is traced twice: without and with
    LoRA dropout (``Workload.dropout``).
    """
    batch_shapes = tuple(batch_shapes)
    dropout_shapes = set(dropout_shapes)
    return [
        Workload(model, proj, d_in, d_out, rank, dtype, prec, b, seq, shared, drop)
        for model in models
        for proj, d_in, d_out in MODEL_PROJECTIONS[model]
        for rank in ranks
        for dtype, prec in dtypes
        for b, seq in batch_shapes
        for drop in ((False, True) if (b, seq) in dropout_shapes else (False,))
        for shared in (False, True)
    ]


# --------------------------------------------------------------------------------------------
# Recording the launches


@dataclasses.dataclass
class Launch:
    """One kernel specialisation as the JIT would compile it, and the workloads that launch it."""

    kind: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    # The first launch's integer values and pointer addresses, by argument name.
    values: dict = dataclasses.field(default_factory=dict)
    users: list = dataclasses.field(default_factory=list)
    # A kernel outside KERNELS (tests compile old or deliberately bad kernels); not pickled.
    other_fn: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def fn(self):
        return self.other_fn if self.other_fn is not None else KERNELS[self.kind]

    def __getstate__(self):
        if self.other_fn is not None:
            raise TypeError("a Launch of a kernel outside KERNELS is compiled in-process only")
        return self.__dict__

    @property
    def key(self) -> str:
        return repr(
            (self.kind, sorted(self.signature.items()), sorted(self.constexprs.items()),
             sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(self.options.items()))
        )  # fmt: skip

    def value(self, name: str):
        """A constexpr's value, or its specialisation: ``"d16"`` (divisible by 16) or ``"-"``."""
        idx = (self.fn.arg_names.index(name),)
        if idx in self.constexprs:
            return self.constexprs[idx]
        return "d16" if ["tt.divisibility", 16] in self.attrs.get(idx, []) else "-"

    def table_entry(self) -> tuple:
        """``(kernel, dtype, precision, config fields)`` as :func:`configs.all_configs` has them."""
        v = self.value
        if self.kind == "fwd":
            tiles = (v("BLOCK_M"), v("BLOCK_N"), v("BLOCK_K"), v("GROUP_M"))
        elif self.kind == "bwd_dx":  # the launcher passes the table's BLOCK_N as BLOCK_K
            tiles = (v("BLOCK_M"), v("BLOCK_K"), v("BLOCK_N"), v("GROUP_M"))
        elif self.kind in ("shrink", "shrink_splitk"):
            tiles = (v("BLOCK_M"), v("BLOCK_K"))
        elif self.kind == "splitk_reduce":
            tiles = (v("BLOCK"),)
        else:
            tiles = (v("BLOCK_P"), v("BLOCK_ROWS"))
        dtype = self.signature[self.fn.arg_names[0]].lstrip("*")
        fields = (*tiles, self.options["num_warps"], self.options["num_stages"])
        if self.kind in ("fwd", "bwd_dx"):  # GemmConfig.R_CHUNK, as the launch caps it at R
            fields += (v("R_CHUNK"),)
        return self.kind, dtype, self.precision(), fields

    @property
    def dropout(self) -> bool:
        """Whether the launch applies LoRA dropout (``DROPOUT=True``)."""
        return "DROPOUT" in self.fn.arg_names and self.value("DROPOUT") is True

    def precision(self) -> str:
        """The dots' input precision; ``"-"`` for a kernel without dots."""
        return "-" if self.kind in NO_DOT_KERNELS else self.value("INPUT_PRECISION")

    def int_args(self) -> dict[str, tuple[int, str]]:
        """Integer and pointer arguments: ``(value or address, "1" | "d" | ".")``.

        ``"1"``: specialised to the constant 1; ``"d"``: marked divisible by 16 (integers) or
        16-byte aligned (pointers); ``"."``: neither.
        """
        out = {}
        for kp in self.fn.params:
            if kp.is_constexpr or kp.name not in self.values:
                continue
            spec = self.value(kp.name)
            out[kp.name] = (
                self.values[kp.name],
                "1" if spec == 1 else "d" if spec == "d16" else ".",
            )
        return out

    def int_spec(self) -> str:
        """Integer arguments as specialised: ``1`` (constant), ``d`` (divisible by 16), ``.``.

        Sizes by name, then the strides in argument order; the dropout scalars only when the
        launch applies dropout (without it their defaults are dead arguments).
        """
        sizes, strides = [], []
        dropout = self.dropout
        for kp in self.fn.params:
            if kp.is_constexpr or kp.name.endswith("_ptr") or kp.name == "scaling":
                continue
            if kp.name.startswith("drop_") and not dropout:
                continue
            spec = self.value(kp.name)
            sym = "1" if spec == 1 else "d" if spec == "d16" else "."
            if kp.name.startswith("stride_"):
                strides.append(sym)
            else:
                sizes.append(f"{kp.name}={sym}")
        return " ".join(sizes) + " st=" + "".join(strides)


def _mirror_run_kwargs(kwargs: dict) -> dict:
    # JITFunction.run adds these before binding; mirror it so the options match exactly.
    from triton import knobs

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug") or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kwargs


@functools.cache
def _binder(fn, arch: int):
    """``(backend, binder)`` of ``fn`` for ``sm_{arch}``: generating the binder's code took half
    of a trace's time when it was rebuilt per launch."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialise(fn, kind: str, arch: int, *args, **kwargs) -> Launch:
    """The specialisation ``fn[grid](*args, **kwargs)`` compiles to on ``sm_{arch}``.

    Triton's own binder and argument packing (what ``JITFunction.run`` calls before
    ``_do_compile``), with the target's backend instead of the current device's.
    """
    backend, binder = _binder(fn, arch)
    kwargs = _mirror_run_kwargs(kwargs)
    bound, specialization, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, opts
    )
    values = {
        name: (val.data_ptr() if isinstance(val, torch.Tensor) else val)
        for name, val in bound.items()
        if isinstance(val, torch.Tensor) or (isinstance(val, int) and not isinstance(val, bool))
    }
    other = None if KERNELS.get(kind) is fn else fn
    return Launch(
        kind, signature, constexprs, attrs, dict(options.__dict__), values, other_fn=other
    )


@contextlib.contextmanager
def _recording(arch: int) -> Iterator[list[Launch]]:
    """Replace every kernel's ``run`` by a recorder of its specialisation for ``sm_{arch}``."""
    recorded: list[Launch] = []
    patched = []

    def recorder(kind, fn):
        def run(*args, grid, warmup, **kwargs):
            recorded.append(specialise(fn, kind, arch, *args, **kwargs))

        return run

    saved_targets = getattr(cora_linear, "_target_programs", None)
    saved_spec = cora_linear._gpu_spec
    try:
        for kind, fn in KERNELS.items():
            fn.run = recorder(kind, fn)  # shadows JITFunction.run; kernel[grid](...) calls it
            patched.append(fn)
        if saved_targets is not None:
            # Split-K grids are sized from the device's SM count; use the target's.
            cora_linear._target_programs = lambda device: 4 * ARCH_LIMITS[arch].sm_count
        # The dispatcher (split-K shrink, GEMM tiles by occupancy) sizes for the target's GPU.
        cora_linear._gpu_spec = lambda tensor: dispatch.ARCH_DEFAULT[arch]
        cora_linear.clear_config_cache()
        yield recorded
    finally:
        for fn in patched:
            del fn.run
        if saved_targets is not None:
            cora_linear._target_programs = saved_targets
        cora_linear._gpu_spec = saved_spec
        cora_linear.clear_config_cache()


def _run_workload(w: Workload) -> None:
    """Forward, then backward with dx needed and not needed (a first layer's frozen input).

    With ``w.dropout`` both pass :data:`TRAINING_DROPOUT`, as a training step does.
    """

    def make(*shape):
        # Meta tensors: no memory, no arithmetic, and data_ptr() is the storage offset in bytes
        # from an address of 0, so alignment is that of a fresh (512-byte-aligned) CUDA
        # allocation and of the views the launchers take.
        return torch.empty(shape, dtype=w.dtype, device="meta")

    x = make(w.batch, w.length, w.d_in)
    weight = make(w.d_out, w.d_in)
    lora_a = make(w.d_in, w.rank) if w.shared_a else make(w.batch, w.d_in, w.rank)
    lora_b = make(w.d_out, w.rank)
    bias = make(w.d_out)
    drop = TRAINING_DROPOUT if w.dropout else None
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = w.precision == "tf32"
    try:
        _, s = cora_linear.forward(x, weight, lora_a, lora_b, bias, 0.5, dropout=drop)
        dy = make(w.batch, w.length, w.d_out)
        for need_dx in (True, False):
            cora_linear.backward(
                dy, x, weight, lora_a, lora_b, s, 0.5, need_dx, True, True, dropout=drop
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def trace_launches(arch: int, work: Iterable[Workload]) -> list[Launch]:
    """The distinct specialisations the launchers make for ``work`` on ``sm_{arch}``, in order."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    unique: dict[str, Launch] = {}
    for w in work:
        with _recording(arch) as recorded:
            _run_workload(w)
        for launch in recorded:
            kept = unique.setdefault(launch.key, launch)
            if w.name not in kept.users:
                kept.users.append(w.name)
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# Checks on the PTX

_PARAM_RE = re.compile(r"\[\s*\w+_param_(\d+)\s*\]")
_REG_RE = re.compile(r"%[a-z]+\d+")
_ADDR_RE = re.compile(r"\[\s*(%rd\d+)")
_MUL32_RE = re.compile(r"^(?:mul|mad)\.lo\.[su]32$|^(?:mul24|mad24)\.|^shl\.b32$")
_NO_DEST = ("st.", "cp.", "red.", "prefetch", "bar", "bra", "ret", "membar", "fence", "mbarrier",
            "stmatrix", "trap", "exit", "wgmma.fence", "wgmma.commit", "wgmma.wait", "call")  # fmt: skip
# Integer arguments whose products with an index are memory offsets: strides, and R (the row
# pitch of S and dS). Other integers (M, N, K, L, ...) also count tiles and rows, whose 32-bit
# products are bounded by the grid and are index arithmetic, not offsets.
_OFFSET_ARG = re.compile(r"^stride_\w+$|^R$")


def _ptx_files(ptx: str) -> dict[str, str]:
    """``.file`` index -> source path."""
    return dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, flags=re.M))


def _line_shift(ptx: str, fn) -> tuple[str, int]:
    """``(kernel's file, current line - line in the PTX)`` of the kernel's ``def``.

    Triton's cache keys a compile by the kernel's source text, not its position: after an edit
    above the kernel, a cached PTX carries the old line numbers. The first ``.loc`` of the PTX
    is the ``def`` line (the function's entry).
    """
    path = os.path.realpath(inspect.getsourcefile(fn.fn))
    lines, first = inspect.getsourcelines(fn.fn)
    def_line = first + next(i for i, text in enumerate(lines) if text.lstrip().startswith("def "))
    files = {k: os.path.realpath(v) for k, v in _ptx_files(ptx).items()}
    for match in re.finditer(r"^\s*\.loc\s+(\d+)\s+(\d+)", ptx, flags=re.M):
        if files.get(match.group(1)) == path:
            return path, def_line - int(match.group(2))
    return path, 0


def _ptx_instructions(ptx: str, fn=None) -> Iterator[tuple[tuple[str, int], str, list[str]]]:
    """``((source file, line), opcode, operands)`` of each PTX instruction; guards stripped.

    The source position is the last ``.loc`` before the instruction (outside inline asm
    blocks, whose lines LLVM numbers one by one); with ``fn``, lines of
    the kernel's file are moved to where the kernel is now (:func:`_line_shift`).
    """
    files = {k: os.path.realpath(v) for k, v in _ptx_files(ptx).items()}
    shift_path, shift = _line_shift(ptx, fn) if fn is not None else ("", 0)
    where = ("?", 0)
    in_asm = False
    for raw in ptx.splitlines():
        # Inside an inline-asm block LLVM numbers each asm line with an incrementing .loc; the
        # block's source position is the .loc before "begin inline asm".
        if "// begin inline asm" in raw or "// end inline asm" in raw:
            in_asm = "begin" in raw
            continue
        text = raw.split("//")[0].strip()
        if text.startswith(".loc"):
            if in_asm:
                continue
            fields = text.split()
            path = files.get(fields[1], "?")
            where = (path, int(fields[2]) + (shift if path == shift_path else 0))
            continue
        if not text.endswith(";") or text.startswith("."):
            continue
        text = re.sub(r"^@!?%p\d+\s+", "", text[:-1].strip())
        opcode, _, rest = text.partition(" ")
        operands, depth, cur = [], 0, ""
        for ch in rest:
            depth += ch in "[{"
            depth -= ch in "]}"
            if ch == "," and depth == 0:
                operands.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            operands.append(cur.strip())
        yield where, opcode, operands


def int64_addressing_violations(ptx: str, param_names: list[str], fn=None) -> list[str]:
    """Global-memory accesses whose address depends on a 32-bit product with a stride.

    Why this PTX pattern: Triton passes integer arguments below 2**31 as i32, so every index
    (``pid * BLOCK + arange``, ``m // L``, tile counts) fits in 32 bits; what can exceed 2**31
    is an *offset*, an index times a stride (or times ``R``, the pitch of ``S``/``dS``). A
    product computed in 64 bits shows up as ``mul.wide.s32``/``mad.wide.s32`` or a ``.s64``
    multiply of sign-extended operands, and cannot wrap. A product computed in 32 bits shows
    up as ``mul.lo.{s,u}32``, ``mad.lo.{s,u}32``, ``mul24``/``mad24`` or ``shl.b32`` (a power
    of two times a stride) and wraps silently; widening its result afterwards (``mad.wide.s32
    %rd, %r, 2, base``: the element size) does not undo the wrap. So: taint the registers
    loaded from a stride (or ``R``) parameter; a 32-bit multiply or shift with a tainted
    operand produces an *overflowing* value; anything computed from an overflowing value
    overflows too (through 64-bit arithmetic as well); an ``[%rd]`` address operand of any
    instruction (global loads and stores, ``cp.async``'s source, atomics) that overflows is a
    violation. The analysis is flow-insensitive (union over all definitions of a register, to a
    fixed point, which covers loop-carried pointers); predicates carry no taint. Constexpr
    strides (specialised to 1) are folded away and never appear.

    ``param_names`` lists the kernel's non-constexpr arguments in order (the PTX parameters
    ``<kernel>_param_<i>``). Returns one message per offending instruction, naming the source
    line of the access and of the 32-bit product (lines of ``fn``'s file as they are now).
    """
    insts = list(_ptx_instructions(ptx, fn))
    stride_regs: set[str] = set()
    for _, opcode, operands in insts:
        if opcode.startswith("ld.param") and len(operands) == 2:
            match = _PARAM_RE.search(operands[1])
            index = int(match.group(1)) if match else len(param_names)
            if index < len(param_names) and _OFFSET_ARG.match(param_names[index]):
                stride_regs.update(_REG_RE.findall(operands[0]))
    # overflow: register -> where the 32-bit product it derives from was computed.
    stride, overflow = set(stride_regs), {}
    changed = True
    while changed:
        changed = False
        for (path, line), opcode, operands in insts:
            if not operands or opcode.startswith(_NO_DEST) or opcode.startswith("ld.param"):
                continue
            dests = [r for r in _REG_RE.findall(operands[0]) if not r.startswith("%p")]
            srcs = [r for op in operands[1:] for r in _REG_RE.findall(op) if not r.startswith("%p")]
            origin = next((overflow[r] for r in srcs if r in overflow), None)
            if origin is None and _MUL32_RE.match(opcode):
                factors = operands[1:2] if opcode.startswith("shl") else operands[1:3]
                if any(r in stride for op in factors for r in _REG_RE.findall(op)):
                    origin = f"{Path(path).name}:{line} ({opcode})"
            is_stride = any(r in stride for r in srcs)
            for d in dests:
                if origin is not None and d not in overflow:
                    overflow[d] = origin
                    changed = True
                elif origin is None and is_stride and d not in stride:
                    stride.add(d)
                    changed = True
    bad = []
    for (path, line), opcode, operands in insts:
        if opcode.startswith(("ld.param", "ld.shared", "st.shared")):
            continue
        for op in operands:
            for reg in _ADDR_RE.findall(op):
                if reg in overflow:
                    bad.append(
                        f"{Path(path).name}:{line}: {opcode} addresses memory with an offset "
                        f"multiplied in 32 bits at {overflow[reg]}"
                    )
    return bad


@dataclasses.dataclass(frozen=True)
class _LoadSite:
    operand: str  # "A" or "B"
    path: str
    first_line: int
    last_line: int


# Pointer variables of the loads of A (lora_a; Bm in the dS shrink) and of Bm.
_A_POINTERS = {"a_ptrs", "a_t_ptrs", "a_g_ptrs"}
_B_POINTERS = {"lb_ptrs", "lb_t_ptrs"}


def _load_sites(fn) -> list[_LoadSite]:
    """Source line ranges (in kernels.py) of each kernel's ``tl.load`` of A and of Bm."""
    lines, first = inspect.getsourcelines(fn.fn)
    path = inspect.getsourcefile(fn.fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    sites = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and node.args
        ):
            names = {n.id for n in ast.walk(node.args[0]) if isinstance(n, ast.Name)}
            operand = "A" if names & _A_POINTERS else "B" if names & _B_POINTERS else None
            if operand:
                sites.append(
                    _LoadSite(operand, path, first + node.lineno - 1, first + node.end_lineno - 1)
                )
    return sites


_CP_ASYNC_RE = re.compile(r"^cp\.async\.(?:ca|cg)\.shared\.global")
_LD_GLOBAL_RE = re.compile(r"^ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[a-z](\d+)$")


def load_kinds(ptx: str, fn) -> dict[str, str]:
    """How the loads of A and of Bm are issued, per operand: ``"-"`` when the kernel has none.

    Decided from the PTX instructions attributed (by ``.loc``) to the source lines of those
    ``tl.load`` calls: ``cp.async.bulk.tensor`` is TMA; ``cp.async.{ca,cg}.shared.global`` with
    its byte count (``cp.async16``: 16-byte copies) means Triton's software pipeliner put the
    load in its multi-stage cp.async pipeline (nothing else emits cp.async); otherwise the
    widest ``ld.global`` vector (``ld16``: 16 bytes per thread, ``ld2``: a scalar fp16). A
    pipelined load is one that overlaps the MMAs of earlier iterations; an ``ld`` is not.
    """
    sites = _load_sites(fn)
    found: dict[str, set[str]] = {}
    for (path, line), opcode, operands in _ptx_instructions(ptx, fn):
        for site in sites:
            if not (site.first_line <= line <= site.last_line and _same_file(path, site.path)):
                continue
            if opcode.startswith("cp.async.bulk.tensor"):
                found.setdefault(site.operand, set()).add("tma")
            elif _CP_ASYNC_RE.match(opcode) and len(operands) >= 3:
                found.setdefault(site.operand, set()).add(f"cp.async{int(operands[2], 0)}")
            else:
                match = _LD_GLOBAL_RE.match(opcode)
                if match:
                    width = int(match.group(1) or 1) * int(match.group(2)) // 8
                    found.setdefault(site.operand, set()).add(f"ld{width}")
    out = {}
    for operand in ("A", "B"):
        kinds = found.get(operand)
        if not any(s.operand == operand for s in sites):
            out[operand] = "-"
        elif not kinds:
            out[operand] = "-"  # compiled away: a branch the constexprs remove
        else:
            # The worst kind decides: one scalar load among vector ones is still scalar.
            out[operand] = min(kinds, key=_load_rank)
    return out


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _load_rank(kind: str) -> tuple[int, int]:
    if kind == "tma":
        return (2, 0)
    if kind.startswith("cp.async"):
        return (1, int(kind[len("cp.async") :]))
    return (0, int(kind[2:]))


def is_pipelined(kind: str) -> bool:
    return kind == "tma" or kind.startswith("cp.async")


# --------------------------------------------------------------------------------------------
# Compiling


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


_PTXAS_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_LINE = re.compile(r"Used (\d+) registers")


def _ptxas_report(ptx: str, arch: int, cache_dir: Path | None) -> str:
    """``ptxas -v`` output for ``ptx``, cached by the PTX's hash (the compile is cached by Triton)."""
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    cached = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"{gpu_name}\n{ptx}".encode()).hexdigest()[:32]
        cached = cache_dir / f"{digest}.ptxas.txt"
        if cached.exists():
            return cached.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = Path(tmp) / "kernel.ptx"
        ptx_file.write_text(ptx)
        proc = subprocess.run(
            [ptxas_path(arch), "-v", f"--gpu-name={gpu_name}", str(ptx_file),
             "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = proc.stdout + proc.stderr
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(report)
    return report


def ctas_per_sm(registers: int, shared: int, num_warps: int, arch: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them (``regs``/``smem``/``warps``)."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    by = {
        "regs": (lim.regs_per_sm // regs_per_warp) // num_warps,
        "smem": lim.smem_per_sm // (shared + lim.smem_reserved_per_block),
        "warps": lim.max_threads_per_sm // (32 * num_warps),
        "blocks": lim.max_blocks_per_sm,
    }
    limiter = min(by, key=lambda k: by[k])
    return by[limiter], limiter


@contextlib.contextmanager
def _compile_cache_keyed_on_file(fn):
    """Point Triton's compile cache at a folder keyed on the kernel's whole source file.

    Triton keys a cached compile on the kernel's source text, not on where that text sits,
    yet the cached PTX carries ``.file``/``.loc`` (path and line), which :func:`load_kinds`
    matches against the ``tl.load`` calls of A and B. After an edit above a kernel, or from
    another checkout of the same code, the cache would hand back PTX pointing at other lines
    or another file, and every load would read as missing. So the folder is keyed on the
    file's resolved path and its content.
    """
    py_fn = getattr(fn, "fn", fn)
    source = Path(inspect.getsourcefile(py_fn)).resolve()
    digest = hashlib.sha256(str(source).encode() + b"\0" + source.read_bytes()).hexdigest()[:16]
    from triton import knobs

    base = knobs.cache.dir
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(base, f"llmrec-aot-src-{digest}")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous


def compile_launch(launch: Launch, arch: int, cache_dir: Path | None = None) -> dict:
    """Compile one recorded specialisation for ``sm_{arch}``; a record of what ptxas reports."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    fn = launch.fn
    src = ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
    with _compile_cache_keyed_on_file(fn):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
    ptx = compiled.asm["ptx"]
    report = _ptxas_report(ptx, arch, cache_dir)
    spills = _PTXAS_LINE.search(report)
    regs = _REGS_LINE.search(report)
    if spills is None or regs is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{report}")
    params = [name for name, ty in launch.signature.items() if ty != "constexpr"]
    shared = int(compiled.metadata.shared)
    num_warps = int(compiled.metadata.num_warps)
    ctas, limiter = ctas_per_sm(int(regs.group(1)), shared, num_warps, arch)
    precision = launch.precision()
    dtype = launch.signature[next(iter(launch.signature))].lstrip("*")
    return {
        "kernel": launch.kind,
        "arch": arch,
        "dtype": dtype,
        "precision": precision,
        "block_r": launch.value("BLOCK_R") if "BLOCK_R" in fn.arg_names else None,
        "dropout": launch.dropout,
        "config": _config_text(launch),
        "spec": launch.int_spec(),
        "num_warps": num_warps,
        "num_stages": int(launch.options["num_stages"]),
        "registers": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared": shared,
        "shared_limit": ARCH_LIMITS[arch].smem_per_block,
        "ctas_per_sm": ctas,
        "cta_limiter": limiter,
        "uses_tensor_cores": ("wgmma" in ptx) or ("mma.sync" in ptx),
        "loads": load_kinds(ptx, fn),
        "int64_violations": int64_addressing_violations(ptx, params, fn),
        "int_args": launch.int_args(),
        "users": launch.users,
    }


_TILE_NAMES = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_ROWS", "BLOCK"}


def _config_text(launch: Launch) -> str:
    """Tiles in argument order (``BLOCK_M x BLOCK_N x BLOCK_K`` and so on), group, rank chunk,
    warps and stages; ``ds`` when the dx kernel computes dS in its loop, ``drop`` with LoRA
    dropout."""
    v = launch.value
    names = launch.fn.arg_names
    text = "x".join(str(v(n)) for n in names if n in _TILE_NAMES)
    if "GROUP_M" in names:
        text += f" g{v('GROUP_M')}"
    if "R_CHUNK" in names:
        text += f" rc{v('R_CHUNK')}"
    text += f" w{launch.options['num_warps']}s{launch.options['num_stages']}"
    if launch.kind == "bwd_dx" and v("COMPUTE_DS"):
        text += " ds"
    if launch.dropout:
        text += " drop"
    return text


def needs_tensor_cores(record: dict) -> bool:
    """IEEE fp32 dots run on FMA units by design; every other dot must use tensor cores."""
    if record["kernel"] in NO_DOT_KERNELS:
        return False
    return not (record["dtype"] == "fp32" and record["precision"] == "ieee")


def failures(record: dict) -> list[str]:
    """Why a compiled kernel is unacceptable; empty when it passes every check."""
    why = []
    if record["spill_stores"] or record["spill_loads"]:
        why.append(f"spills {record['spill_stores']} B")
    if needs_tensor_cores(record) and not record["uses_tensor_cores"]:
        why.append("no mma/wgmma")
    if record["shared"] > record["shared_limit"]:
        why.append(f"smem {record['shared']} > {record['shared_limit']}")
    if record["int64_violations"]:
        why.append(f"i32 offsets ({len(record['int64_violations'])})")
    if not 0 < record["registers"] <= 255:
        why.append("registers")
    return why


def _compile_job(job: tuple) -> dict:
    return compile_launch(*job)


def compile_all(
    archs: Iterable[int] = (80, 90),
    work: list[Workload] | None = None,
    jobs: int = 1,
    cache_dir: Path | None = None,
) -> list[dict]:
    """Trace ``work`` (default: every workload) and compile every specialisation per arch."""
    work = workloads() if work is None else work
    todo = [(launch, arch, cache_dir) for arch in archs for launch in trace_launches(arch, work)]
    return compile_launches(todo, jobs)


def compile_launches(todo: list[tuple[Launch, int, Path | None]], jobs: int = 1) -> list[dict]:
    """:func:`compile_launch` over ``(launch, arch, cache_dir)`` jobs, in order."""
    if jobs <= 1:
        return [_compile_job(job) for job in todo]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, todo))


_LEGEND = """\
Legend: R = BLOCK_R (padded rank tile). config = tiles (fwd/dx: BLOCK_M x BLOCK_N x BLOCK_K,
shrink and shrink_splitk: BLOCK_M x BLOCK_K, reduce: BLOCK_P x BLOCK_ROWS, splitk_reduce:
BLOCK), g = GROUP_M, rc = R_CHUNK, w = warps, s = stages, ds = dS computed in the dx loop,
drop = LoRA dropout (DROPOUT: shrink, dx and dA (reduce) of a training step; the specialised
ints then include the seed, offset and threshold). smem = Triton's shared memory per CTA. CTA/SM =
resident CTAs per SM from registers (allocated 256 per warp), shared memory (+1 KB reserved per
CTA) and threads (2048 per SM), with the limiting resource. A/B load = how the PTX lines of the
tl.load of A (lora_a; Bm in the dS shrink) and of Bm are issued: cp.asyncN = N-byte cp.async
copies of Triton's software pipeline (pipelined), tma = cp.async.bulk.tensor, ldN = plain
ld.global of N bytes per thread (not pipelined), - = no such load. uses = workloads launching
it. specialised ints: 1 = the constant 1, d = divisible by 16, . = neither; st = strides in
argument order.
"""


def format_table(records: list[dict]) -> str:
    """One table per kernel: a row per compiled specialisation, then a headline."""
    out = [_LEGEND]
    head = (
        f"{'arch':>4} {'dtype':5} {'prec':4} {'R':>3} {'config':26} {'regs':>4} {'smem KB':>7} "
        f"{'spill':>5} {'CTA/SM':>9} {'A load':>10} {'B load':>10} {'uses':>4}  specialised ints"
    )
    for kind in KERNELS:
        rows = sorted(
            (r for r in records if r["kernel"] == kind),
            key=lambda r: (r["arch"], r["dtype"], r["precision"], str(r["block_r"]), r["config"],
                           r["spec"]),
        )  # fmt: skip
        if not rows:
            continue
        out.append(f"== {kind} ({len(rows)} specialisations)")
        out.append(head)
        for r in rows:
            why = failures(r)
            prec = r["precision"] if r["dtype"] == "fp32" else "-"
            out.append(
                f"{r['arch']:4d} {r['dtype']:5} {prec:4} {r['block_r'] or '-'!s:>3} "
                f"{r['config']:26} {r['registers']:4d} {r['shared'] / 1024:7.1f} "
                f"{r['spill_stores']:5d} {r['ctas_per_sm']:3d} {r['cta_limiter']:>5} "
                f"{r['loads']['A']:>10} {r['loads']['B']:>10} {len(r['users']):4d}  {r['spec']}"
                + (f"  <-- FAIL: {', '.join(why)}" if why else "")
            )
        out.append("")
    out.append(headline(records))
    return "\n".join(out)


def headline(records: list[dict]) -> str:
    """Summary lines: counts, failures, occupancy range and pipelining of A and B."""
    lines = []
    n_fail = sum(bool(failures(r)) for r in records)
    n_drop = sum(bool(r.get("dropout")) for r in records)
    lines.append(
        f"{len(records)} specialisations compiled ({n_drop} with LoRA dropout); {n_fail} fail "
        "(spills, missing tensor cores, shared memory over the limit, or i32 offsets)"
    )
    for arch in sorted({r["arch"] for r in records}):
        rs = [r for r in records if r["arch"] == arch]
        loads = [k for r in rs for k in r["loads"].values() if k != "-"]
        piped = sum(is_pipelined(k) for k in loads)
        lines.append(
            f"sm_{arch}: registers {min(r['registers'] for r in rs)}-"
            f"{max(r['registers'] for r in rs)}, shared memory up to "
            f"{max(r['shared'] for r in rs) / 1024:.1f} KB of {ARCH_LIMITS[arch].smem_per_block // 1024}"
            f" KB, CTAs/SM {min(r['ctas_per_sm'] for r in rs)}-{max(r['ctas_per_sm'] for r in rs)}; "
            f"A/B loads pipelined {piped}/{len(loads)} "
            f"(not pipelined: {_kinds_summary(rs)})"
        )
    return "\n".join(lines)


def _kinds_summary(records: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        for k in r["loads"].values():
            if k != "-" and not is_pipelined(k):
                counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCH_LIMITS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rank", type=int, action="append", help="only these ranks")
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
        / "llmrec-aot-ptxas",
        help="where ptxas reports are cached by PTX hash (Triton caches the compiles)",
    )
    args = parser.parse_args(argv)
    work = workloads(ranks=tuple(args.rank or RANKS))
    records = compile_all(tuple(args.arch or sorted(ARCH_LIMITS)), work, args.jobs, args.cache_dir)
    table = format_table(records)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 1 if any(failures(r) for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
