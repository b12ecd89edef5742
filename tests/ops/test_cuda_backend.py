"""Checks of the hand-written CUDA backend (``csrc/``, ``backend="cuda"``).

Three groups, from the cheapest:

1. **Compile checks and host emulation** (no GPU, no torch build needed): every
   ``csrc/*.cu`` compiles with nvcc for sm_80 and sm_90 with ``-Xptxas -v``; any compiler
   warning or register spill fails. The same sources, built with g++ against
   ``csrc/host_emu`` (a CPU model of mma.sync, ldmatrix and cp.async, CUDA threads as
   fibers), run every kernel variant against a float64 reference. Skipped when nvcc / g++
   are not found; ``LLMREC_REQUIRE_NVCC=1`` (set by ``.ci/cuda_checks.sh``) turns that skip
   into a failure.
2. **The built extension** (no GPU): it imports, registers its ops under
   ``torch.ops.llmrec_kernels_cuda`` with the expected schemas, gives shapes for meta
   tensors and refuses CPU tensors and bad arguments with clear messages. Skipped when the
   extension is not importable; ``LLMREC_REQUIRE_CUDA_EXT=1`` turns that into a failure.
3. **GPU comparisons** (marked ``gpu``): forward and backward against a float64 reference,
   fp16 and bf16, decode and prefill shapes, odd and strided shapes, ranks 1 to 128.
   Skipped without a CUDA device (by ``conftest.py``) or without the extension.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec_kernels import _cuda, fused_cora_linear
from llmrec_kernels.reference import cora_linear_factored

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")

# ----------------------------------------------------------------------------------------
# 1. nvcc compile checks
# ----------------------------------------------------------------------------------------


def _find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


NVCC = _find_nvcc()


def _skip_if_opted_out() -> None:
    # .ci/cuda_checks.sh runs these checks; a later plain pytest run may skip them.
    if os.environ.get("LLMREC_SKIP_CUDA_CHECKS", "0") == "1":
        pytest.skip("LLMREC_SKIP_CUDA_CHECKS=1 (these run in .ci/cuda_checks.sh)")


def _require_or_skip(env: str, reason: str) -> None:
    if os.environ.get(env, "0") == "1":
        pytest.fail(f"{reason} (and {env}=1 requires it)")
    pytest.skip(reason)


SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")


def nvcc_check(src: Path, arch: str, tmp_path: Path) -> str:
    """Compile ``src`` for ``sm_<arch>``; fail on errors, warnings and register spills."""
    cmd = [
        NVCC, "-c", str(src), "-o", str(tmp_path / f"{src.stem}_sm{arch}.o"),
        f"-arch=sm_{arch}", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
        "-Xptxas", "-v", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
        "-I", str(CSRC),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed for {src.name} sm_{arch}:\n{log}"
    warnings = [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.I)]
    assert not warnings, f"compiler warnings for {src.name} sm_{arch}:\n" + "\n".join(warnings)
    # ptxas prints, per kernel, "Compiling entry function '...'" then its spill line.
    spills, entry = [], None
    for line in log.splitlines():
        m = ENTRY_RE.search(line)
        if m:
            entry = m.group(1)
            continue
        m = SPILL_RE.search(line)
        if m and (int(m.group(1)) or int(m.group(2))):
            spills.append(f"{entry}: {line.strip()}")
    assert not spills, f"register spills in {src.name} sm_{arch}:\n" + "\n".join(spills)
    return log


def test_csrc_has_kernel_sources():
    assert CU_FILES, f"no .cu files in {CSRC}"
    for path in CU_FILES:
        text = path.read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text, (
            f"{path.name} includes torch headers; kernels must compile with plain nvcc"
        )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_without_warnings_or_spills(src, arch, tmp_path):
    _skip_if_opted_out()
    if NVCC is None:
        _require_or_skip("LLMREC_REQUIRE_NVCC", "nvcc not found (set CUDA_HOME)")
    log = nvcc_check(src, arch, tmp_path)
    kernels = ENTRY_RE.findall(log)
    assert all(a == f"sm_{arch}" for _, a in kernels)
    if "gemm_f16" in src.name or "gemm_bf16" in src.name or "shrink" in src.name:
        assert kernels, f"ptxas reported no kernels for {src.name}"


def test_gemm_kernels_use_tensor_cores(tmp_path):
    _skip_if_opted_out()
    """The GEMM instantiations must reach mma.sync in the PTX (not a scalar fallback)."""
    if NVCC is None:
        _require_or_skip("LLMREC_REQUIRE_NVCC", "nvcc not found (set CUDA_HOME)")
    ptx = tmp_path / "gemm.ptx"
    cmd = [NVCC, "-ptx", str(CSRC / "cora_gemm_bf16.cu"), "-o", str(ptx), "-arch=sm_90",
           "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-I", str(CSRC)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    text = ptx.read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text
    assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in text
    assert "cp.async.cg.shared.global" in text


def _cuda_include_dir() -> Path | None:
    if NVCC is None:
        return None
    include = Path(NVCC).resolve().parent.parent / "include"
    if (include / "cuda_runtime.h").is_file() and (include / "cuda_fp16.h").is_file():
        return include
    for root in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "include"
    return None


def test_kernels_run_under_host_emulation(tmp_path):
    """Run the kernels' real source on the CPU (csrc/host_emu): every GEMM variant and the
    GEMV shrink through their launchers, odd/aligned/misaligned shapes, split-K, per-sample
    low-rank segments, against a float64 reference. PTX instructions are replaced by a model
    of their documented semantics, so this checks the index math, not the PTX or timing."""
    _skip_if_opted_out()
    cxx = shutil.which("g++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        _require_or_skip("LLMREC_REQUIRE_NVCC", "g++ or the CUDA headers not found")
    emu = CSRC / "host_emu"
    work = tmp_path / "src"
    work.mkdir()
    for path in [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        shutil.copy(path, work / path.name)
    shutil.copy(emu / "cora_common.cuh", work / "cora_common.cuh")  # the modelled primitives
    exe = tmp_path / "emu_test"
    cmd = [
        cxx, "-std=c++20", "-O2", "-Wno-unknown-pragmas", f"-I{work}", f"-I{emu}", f"-I{include}",
        "-include", "emu_runtime.h", "-x", "c++",
        *(str(work / p.name) for p in CU_FILES),
        "-x", "none", str(emu / "emu_runtime.cpp"), str(emu / "emu_test.cpp"), "-o", str(exe),
    ]  # fmt: skip
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"host build of the kernels failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (
        f"emulated kernels failed (rc {run.returncode}):\n{run.stdout}{run.stderr}"
    )
    assert "0 failed" in run.stdout


# ----------------------------------------------------------------------------------------
# 2. the built extension, without a GPU
# ----------------------------------------------------------------------------------------

EXPECTED_SCHEMAS = {
    "cora_forward": (
        "llmrec_kernels_cuda::cora_forward(Tensor x, Tensor weight, Tensor lora_a, "
        "Tensor lora_b, Tensor? bias, float scaling) -> (Tensor, Tensor)"
    ),
    "cora_backward": (
        "llmrec_kernels_cuda::cora_backward(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, "
        "Tensor lora_b, Tensor s_scaled, float scaling, bool need_dx, bool need_da, "
        "bool need_db) -> (Tensor, Tensor, Tensor)"
    ),
    "shrink": "llmrec_kernels_cuda::shrink(Tensor x, Tensor lora_a, float scaling) -> Tensor",
    "lowrank_linear": (
        "llmrec_kernels_cuda::lowrank_linear(Tensor x, Tensor weight, Tensor? bias, Tensor s, "
        "Tensor lora_b) -> Tensor"
    ),
}


def test_loader_never_raises():
    ready = _cuda.ready_without_build()
    reason = _cuda.unavailable_reason()
    assert reason is None or (isinstance(reason, str) and reason)
    assert _cuda.cuda_available() == (reason is None)
    assert not ready or reason is None


@pytest.fixture(scope="module")
def ext():
    """The prebuilt ``llmrec_kernels._C`` (this group checks the build, not the JIT path)."""
    if torch.version.cuda is None:
        _require_or_skip(
            "LLMREC_REQUIRE_CUDA_EXT", f"torch {torch.__version__} is a CPU build: no extension"
        )
    if importlib.util.find_spec("llmrec_kernels._C") is None:
        _require_or_skip("LLMREC_REQUIRE_CUDA_EXT", "llmrec_kernels._C is not built")
    from llmrec_kernels import _C

    return _C


def test_extension_imports_and_registers_schemas(ext):
    assert _cuda.unavailable_reason() is None
    ns = getattr(torch.ops, _cuda.NAMESPACE)
    for name, schema in EXPECTED_SCHEMAS.items():
        assert str(getattr(ns, name).default._schema) == schema


def test_extension_build_info(ext):
    info = ext.build_info()
    assert info["namespace"] == _cuda.NAMESPACE
    assert info["max_rank"] == 128
    assert info["archs"] and all(a >= 800 for a in info["archs"])
    wanted = os.environ.get("LLMREC_EXPECT_CUDA_ARCHS")  # e.g. "800,900" in CI
    if wanted:
        assert sorted(info["archs"]) == sorted(int(a) for a in wanted.split(","))


def _meta_args(B=2, L=5, d_in=64, d_out=96, r=16, dtype=torch.bfloat16, per_sample=True):
    m = dict(device="meta")
    x = torch.empty(B, L, d_in, dtype=dtype, **m)
    w = torch.empty(d_out, d_in, dtype=dtype, **m)
    a = torch.empty(*((B,) if per_sample else ()), d_in, r, dtype=torch.float32, **m)
    b = torch.empty(d_out, r, dtype=torch.float32, **m)
    return x, w, a, b


def test_meta_shapes(ext):
    ns = getattr(torch.ops, _cuda.NAMESPACE)
    x, w, a, b = _meta_args()
    y, s = ns.cora_forward(x, w, a, b, None, 2.0)
    assert (y.shape, y.dtype, s.shape, s.dtype) == (
        (2, 5, 96), torch.bfloat16, (2, 5, 16), torch.float32,
    )  # fmt: skip
    dx, da, db = ns.cora_backward(y, x, w, a, b, s, 2.0, True, True, False)
    assert dx.shape == x.shape and da.shape == a.shape and da.dtype == a.dtype
    assert db.numel() == 0
    assert ns.shrink(x, a, 2.0).shape == (2, 5, 16)
    assert ns.lowrank_linear(x, w, None, s, b).shape == (2, 5, 96)


def _cpu_args(B=2, L=5, d_in=64, d_out=96, r=16, dtype=torch.bfloat16):
    x = torch.randn(B, L, d_in, dtype=dtype)
    w = torch.randn(d_out, d_in, dtype=dtype)
    return x, w, torch.randn(B, d_in, r), torch.randn(d_out, r)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, r"backend='cuda' needs CUDA tensors, got tensors on cpu"),
        ({"w": torch.randn(96, 63, dtype=torch.bfloat16)}, r"weight must be \(d_out, d_in\)"),
        ({"w": torch.randn(96, 64, dtype=torch.float16)}, r"weight must have the dtype of x"),
        ({"x": torch.randn(2, 5, 64)}, r"supports float16 and bfloat16, got x of dtype Float"),
        ({"a": torch.randn(3, 64, 16)}, r"lora_a must be \(B, d_in, r\) = \(2, 64, r\)"),
        ({"a": torch.randn(2, 64, 129), "b": torch.randn(96, 129)}, r"ranks 1\.\.128, got r = 129"),
        ({"b": torch.randn(96, 8)}, r"lora_b must be \(d_out, r\) = \(96, 16\)"),
        ({"bias": torch.randn(95)}, r"bias must be \(d_out,\) = \(96,\)"),
        ({"x": torch.randn(5, 64, dtype=torch.bfloat16)}, r"x must be \(B, L, d_in\)"),
    ],
)
def test_op_argument_checks(ext, change, message):
    ns = getattr(torch.ops, _cuda.NAMESPACE)
    x, w, a, b = _cpu_args()
    args = {"x": x, "w": w, "a": a, "b": b, "bias": None, **change}
    with pytest.raises(RuntimeError, match=message):
        ns.cora_forward(args["x"], args["w"], args["a"], args["b"], args["bias"], 1.0)


def test_backward_argument_checks(ext):
    ns = getattr(torch.ops, _cuda.NAMESPACE)
    x, w, a, b = _cpu_args()
    s = torch.zeros(2, 5, 16)
    dy = torch.zeros(2, 5, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"dy must be \(B, L, d_out\) = \(2, 5, 96\)"):
        ns.cora_backward(dy[:, :4], x, w, a, b, s, 1.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"s_scaled must be float32"):
        ns.cora_backward(dy, x, w, a, b, s.half(), 1.0, True, True, True)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors"):
        ns.cora_backward(dy, x, w, a, b, s, 1.0, True, True, True)


def test_backend_cuda_refuses_cpu_tensors():
    x, w, a, b = _cpu_args()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_cora_linear(x, w, a, b, backend="cuda")


# ----------------------------------------------------------------------------------------
# 3. the ops against a float64 reference: on a GPU, and on the CPU through the
#    host-emulation build (csrc/bindings.cpp + csrc/*.cu over csrc/host_emu)
# ----------------------------------------------------------------------------------------

# Tolerance per output element: |out - ref| <= TOL * (|ref| + 0.05 * max|ref|). One rounding
# of the output costs at most 2^-9 (bf16) / 2^-11 (fp16) relative; the rest is fp32
# accumulation and the hi/lo split of fp32 operands, both far smaller.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}
DTYPES = [torch.float16, torch.bfloat16]
EMU_NAMESPACE = "llmrec_kernels_cuda_emu"


@pytest.fixture(scope="module")
def emu_ops():
    """``torch.ops.llmrec_kernels_cuda_emu``: the real glue and kernels, built for the CPU.

    Built once per torch version under ``LLMREC_EMU_BUILD_DIR`` (default
    ``~/.cache/llmrec-kernels-emu``), incrementally (about 20 s the first time)."""
    _skip_if_opted_out()
    from torch.utils import cpp_extension

    include = _cuda_include_dir()
    if shutil.which("c++") is None or include is None or not cpp_extension.is_ninja_available():
        _require_or_skip("LLMREC_REQUIRE_NVCC", "a C++ compiler, ninja or the CUDA headers missing")
    if hasattr(torch.ops, EMU_NAMESPACE) and hasattr(
        getattr(torch.ops, EMU_NAMESPACE), "cora_forward"
    ):
        return getattr(torch.ops, EMU_NAMESPACE)
    root = Path(os.environ.get("LLMREC_EMU_BUILD_DIR", Path.home() / ".cache/llmrec-kernels-emu"))
    work = root / f"torch-{torch.__version__}"
    work.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> str:  # rewrite only on change: ninja stays incremental
        path = work / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return str(path)

    for path in [*CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        put(path.name, path.read_text())
    put("cora_common.cuh", (CSRC / "host_emu" / "cora_common.cuh").read_text())
    sources = [
        put(f"{p.stem}_emu.cpp", '#include "emu_runtime.h"\n' + p.read_text()) for p in CU_FILES
    ]
    sources.append(put("bindings.cpp", (CSRC / "bindings.cpp").read_text()))
    sources.append(str(CSRC / "host_emu" / "emu_runtime.cpp"))
    cpp_extension.load(
        name="llmrec_kernels_emu",
        sources=sources,
        extra_include_paths=[str(work), str(CSRC / "host_emu"), str(include)],
        extra_cflags=[
            "-O2",
            "-Wno-unknown-pragmas",
            "-DLLMREC_HOST_EMULATION",
            f"-DLLMREC_OPS_NAMESPACE={EMU_NAMESPACE}",
        ],
        build_directory=str(work),
        is_python_module=True,
    )
    return getattr(torch.ops, EMU_NAMESPACE)


def _gpu_ops():
    reason = _cuda.unavailable_reason()
    if reason is not None:
        _require_or_skip("LLMREC_REQUIRE_CUDA_EXT", f"CUDA extension unavailable: {reason}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CUDA kernels need compute capability 8.0 or newer")
    return _cuda.ops()


@pytest.fixture
def cuda_ext():
    return _gpu_ops()


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def target(request):
    """``(ops namespace, device)``: the emulated ops on the CPU, or the real ones on a GPU."""
    if request.param == "gpu":
        return _gpu_ops(), "cuda"
    return request.getfixturevalue("emu_ops"), "cpu"


def assert_close(
    out: torch.Tensor, same: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """The project's rule (``tests/tolerance.py``: ``out`` against the fp64 ``ref`` relative to
    the same-precision PyTorch result ``same``), and on top of it the a-priori per-element bound
    above, which also holds the kernels to their accuracy on the small entries."""
    assert_close_to_oracle(out, same, ref, what, dtype)
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    scale = ref64.abs().max().clamp_min(1e-12)
    err = (out64 - ref64).abs()
    bound = TOL[dtype] * (ref64.abs() + 0.05 * scale)
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, (
        f"{what}: max |err| {err.max().item():.3e} (max |ref| {scale.item():.3e}), "
        f"{worst:.2f}x the tolerance"
    )


def make_inputs(B, L, d_in, d_out, r, dtype, *, per_sample=True, bias=True, lora_dtype=None,
                seed=0, device="cuda"):  # fmt: skip
    """Inputs in ``dtype`` (A, B in ``lora_dtype``, default the same), scaled so y ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

    x = randn(B, L, d_in)
    w = randn(d_out, d_in, std=d_in**-0.5)
    a_shape = (B, d_in, r) if per_sample else (d_in, r)
    a = randn(*a_shape, std=d_in**-0.5, dt=lora_dtype)
    b = randn(d_out, r, std=r**-0.5, dt=lora_dtype)
    bb = randn(d_out, std=0.5) if bias else None
    return x, w, a, b, bb


def reference(x, w, a, b, bias, scaling, dtype):
    """fp64 reference on the values the kernel sees (lora/bias rounded to x's dtype)."""

    def up(t):
        return None if t is None else t.to(dtype).double()

    return cora_linear_factored(up(x), up(w), up(a), up(b), up(bias), scaling)


def relayout(x: torch.Tensor, w: torch.Tensor, layout: str):
    """The same values as x, w in another memory layout."""
    if layout == "contiguous":
        return x, w
    if layout == "row-slice":  # rows with a stride larger than d_in: used in place
        x_big = torch.zeros(*x.shape[:-1], x.shape[-1] + 24, dtype=x.dtype, device=x.device)
        x_big[..., : x.shape[-1]] = x
        w_big = torch.zeros(w.shape[0], w.shape[1] + 8, dtype=w.dtype, device=w.device)
        w_big[:, : w.shape[1]] = w
        return x_big[..., : x.shape[-1]], w_big[:, : w.shape[1]]
    if layout == "transposed":  # last dim not contiguous: copied
        return x.transpose(1, 2).contiguous().transpose(1, 2), w.t().contiguous().t()
    if layout == "misaligned":  # a 2-byte offset: no 16-byte vector loads
        buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        buf[1:] = x.reshape(-1)
        return buf[1:].view(x.shape), w
    raise ValueError(layout)


def check_ops(ops, device, dtype, B, L, d_in, d_out, r, per_sample=True, bias=True, *,
              scaling=2.0, layout="contiguous", lora_dtype=None):  # fmt: skip
    """cora_forward and cora_backward of ``ops`` against the float64 autograd reference."""
    x, w, a, b, bb = make_inputs(B, L, d_in, d_out, r, dtype, per_sample=per_sample, bias=bias,
                                 lora_dtype=lora_dtype, device=device)  # fmt: skip
    x_in, w_in = relayout(x, w, layout)
    y, s = ops.cora_forward(x_in, w_in, a, b, bb, scaling)
    assert y.dtype == dtype and s.dtype == torch.float32
    y2, s2 = ops.cora_forward(x_in, w_in, a, b, bb, scaling)
    assert torch.equal(y, y2) and torch.equal(s, s2), "the forward is not deterministic"

    leaves = [t.to(dtype).double().requires_grad_() for t in (x, a, b)]
    y_ref = cora_linear_factored(
        leaves[0], w.double(), leaves[1], leaves[2], None if bb is None else bb.double(), scaling
    )
    # The same maths in plain PyTorch at the kernel's precision: the rule's reference.
    same = [t.to(dtype).detach().requires_grad_() for t in (x, a, b)]
    y_same = cora_linear_factored(
        same[0], w, same[1], same[2], None if bb is None else bb.to(dtype), scaling
    )
    assert_close(y, y_same, y_ref, dtype, f"y ({layout})")
    a64 = a.to(dtype).double()
    s_ref = scaling * (torch.bmm(x.double(), a64) if per_sample else x.double() @ a64)
    a32 = a.to(dtype).float()
    s_same = scaling * (torch.bmm(x.float(), a32) if per_sample else x.float() @ a32)
    assert_close(s, s_same, s_ref, torch.float32, "s")

    dy = make_inputs(B, L, d_out, 1, 1, dtype, seed=1, device=device)[0]
    y_ref.backward(dy.double())
    y_same.backward(dy)
    dx, da, db = ops.cora_backward(dy, x_in, w_in, a, b, s, scaling, True, True, True)
    assert dx.dtype == dtype and da.dtype == a.dtype and db.dtype == b.dtype
    assert_close(dx, same[0].grad, leaves[0].grad, dtype, f"dx ({layout})")
    assert_close(da, same[1].grad, leaves[1].grad, dtype, "dA")
    assert_close(db, same[2].grad, leaves[2].grad, dtype, "dB")

    dx2, da2, db2 = ops.cora_backward(dy, x_in, w_in, a, b, s, scaling, False, True, False)
    assert dx2.numel() == 0 and db2.numel() == 0
    assert torch.equal(da2, da), "the backward is not deterministic"


# (B, L, d_in, d_out, r, per-sample A, bias): small enough for the emulation, covering the
# decode GEMV shrink (with and without K splits, vector and scalar paths), few tokens, the
# per-sample and shared tensor-core shrink, both tile configurations (LLMREC_EMU_SMS = 4
# emulated SMs), odd sizes and ranks 1 to 128.
OP_SHAPES = [
    pytest.param(1, 1, 64, 96, 16, True, True, id="decode-B1"),
    pytest.param(5, 1, 256, 80, 16, True, False, id="decode-K-splits"),
    pytest.param(3, 1, 64, 40, 100, True, True, id="decode-r100"),
    pytest.param(3, 1, 100, 61, 3, True, True, id="decode-odd"),
    pytest.param(3, 2, 64, 72, 16, True, True, id="L2"),
    pytest.param(2, 4, 48, 40, 7, True, False, id="L4-r7"),
    pytest.param(2, 67, 72, 80, 16, True, True, id="prefill-odd-L"),
    pytest.param(2, 33, 64, 48, 128, True, True, id="prefill-r128"),
    pytest.param(3, 17, 64, 40, 32, False, True, id="shared-A"),
    pytest.param(4, 1, 64, 40, 16, False, False, id="shared-A-decode"),
    pytest.param(2, 19, 100, 60, 5, True, True, id="odd-K"),
    pytest.param(2, 9, 64, 64, 1, True, False, id="r1"),
    pytest.param(1, 5, 7, 9, 2, True, True, id="tiny"),
    pytest.param(2, 128, 64, 256, 16, True, True, id="large-tiles-fwd"),
    pytest.param(2, 128, 256, 64, 16, True, False, id="large-tiles-dx"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("B", "L", "d_in", "d_out", "r", "per_sample", "bias"), OP_SHAPES)
def test_ops_match_reference(target, dtype, B, L, d_in, d_out, r, per_sample, bias):
    ops, device = target
    check_ops(ops, device, dtype, B, L, d_in, d_out, r, per_sample, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row-slice", "transposed", "misaligned"])
def test_ops_strided_and_misaligned_inputs(target, dtype, layout):
    ops, device = target
    check_ops(ops, device, dtype, 3, 21, 64, 80, 8, layout=layout)
    check_ops(ops, device, dtype, 5, 1, 64, 80, 8, layout=layout)  # decode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_mixed_precision_lora_params(target, dtype):
    """fp32 lora_a / lora_b / bias with fp16/bf16 activations (the usual training set-up)."""
    ops, device = target
    check_ops(ops, device, dtype, 4, 24, 128, 96, 16, lora_dtype=torch.float32)
    check_ops(ops, device, dtype, 4, 1, 128, 96, 16, per_sample=False, lora_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_and_lowrank_linear_ops(target, dtype):
    ops, device = target
    x, w, a, b, bb = make_inputs(2, 50, 96, 112, 24, dtype, device=device)
    s = ops.shrink(x, a, 2.0)
    y = ops.lowrank_linear(x, w, bb, s, b)
    y_same = cora_linear_factored(x, w, a, b, bb, 2.0)
    assert_close(y, y_same, reference(x, w, a, b, bb, 2.0, dtype), dtype, "lowrank_linear")
    xd = x[:, :1]  # the decode path of the shrink (batched GEMV)
    s1 = ops.shrink(xd, a, 2.0)
    s1_same = 2.0 * torch.bmm(xd.float(), a.float())
    s1_ref = 2.0 * torch.bmm(xd.double(), a.double())
    assert_close(s1, s1_same, s1_ref, torch.float32, "shrink (decode)")


def test_ops_empty_batch_and_opcheck(target):
    ops, device = target
    x, w, a, b, bb = make_inputs(2, 9, 64, 48, 8, torch.bfloat16, device=device)
    y0, s0 = ops.cora_forward(x[:, :0], w, a, b, bb, 2.0)
    assert y0.shape == (2, 0, 48) and s0.shape == (2, 0, 8)
    dx0, da0, db0 = ops.cora_backward(y0, x[:, :0], w, a, b, s0, 2.0, True, True, True)
    assert dx0.shape == (2, 0, 64) and not da0.any() and not db0.any()
    y, s = ops.cora_forward(x, w, a, b, bb, 2.0)
    dy = torch.randn_like(y)
    cases = [
        (ops.cora_forward.default, (x, w, a, b, bb, 2.0)),
        (ops.cora_backward.default, (dy, x, w, a, b, s, 2.0, True, True, True)),
        (ops.shrink.default, (x, a, 2.0)),
        (ops.lowrank_linear.default, (x, w, bb, s, b)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- the public op on a GPU: fused_cora_linear(backend="cuda") with autograd ----------------

# (B, L, d_in, d_out, r, per_sample A, bias): decode, few tokens, prefill, odd sizes.
SHAPES = [
    pytest.param(1, 1, 64, 96, 16, True, True, id="decode-B1"),
    pytest.param(37, 1, 256, 320, 16, True, False, id="decode-B37"),
    pytest.param(256, 1, 512, 256, 8, True, True, id="decode-B256"),
    pytest.param(2, 1, 4096, 128, 16, True, True, id="decode-long-K"),
    pytest.param(3, 1, 1000, 64, 16, True, False, id="decode-split-tail"),
    pytest.param(4, 1, 128, 64, 100, True, True, id="decode-r100"),
    pytest.param(3, 1, 100, 61, 3, True, True, id="decode-odd"),
    pytest.param(3, 2, 128, 72, 16, True, True, id="L2"),
    pytest.param(5, 4, 96, 80, 7, True, False, id="L4-r7"),
    pytest.param(2, 67, 136, 200, 16, True, True, id="prefill-odd-L"),
    pytest.param(3, 130, 256, 384, 64, True, True, id="prefill-r64"),
    pytest.param(2, 129, 128, 96, 128, True, True, id="prefill-r128"),
    pytest.param(4, 33, 128, 160, 32, False, True, id="shared-A"),
    pytest.param(6, 1, 128, 160, 16, False, False, id="shared-A-decode"),
    pytest.param(2, 19, 100, 60, 5, True, True, id="odd-K"),
    pytest.param(2, 9, 64, 64, 1, True, False, id="r1"),
    pytest.param(1, 5, 7, 9, 2, True, True, id="tiny"),
    pytest.param(16, 128, 512, 2048, 16, True, True, id="large-tiles-fwd"),
    pytest.param(8, 256, 2048, 512, 32, True, False, id="large-tiles-dx"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("B", "L", "d_in", "d_out", "r", "per_sample", "bias"), SHAPES)
def test_fused_cora_linear_cuda_backend(cuda_ext, dtype, B, L, d_in, d_out, r, per_sample, bias):
    scaling = 2.0
    x, w, a, b, bb = make_inputs(B, L, d_in, d_out, r, dtype, per_sample=per_sample, bias=bias)
    leaves = [t.detach().requires_grad_() for t in (x, a, b)]
    if bb is not None:
        leaves.append(bb.detach().requires_grad_())
    xg, ag, bg = leaves[:3]
    biasg = leaves[3] if bb is not None else None
    two_d = L == 1 and B % 2 == 1  # exercise the (B, d_in) form too
    x_in = xg.squeeze(1) if two_d else xg
    y = fused_cora_linear(x_in, w, ag, bg, biasg, scaling=scaling, backend="cuda")
    assert y.dtype == dtype
    y = y.unsqueeze(1) if two_d else y

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, ar, br = ref_leaves[:3]
    biasr = ref_leaves[3] if bb is not None else None
    y_ref = cora_linear_factored(xr, w.double(), ar, br, biasr, scaling)
    same_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    xs, as_, bs = same_leaves[:3]
    biass = same_leaves[3] if bb is not None else None
    y_same = cora_linear_factored(xs, w, as_, bs, biass, scaling)
    assert_close(y, y_same, y_ref, dtype, "y")

    dy = torch.randn_like(y_ref).to(dtype)
    y.backward(dy)
    y_ref.backward(dy.double())
    y_same.backward(dy)
    assert_close(xg.grad, xs.grad, xr.grad, dtype, "dx")
    assert_close(ag.grad, as_.grad, ar.grad, dtype, "dA")
    assert_close(bg.grad, bs.grad, br.grad, dtype, "dB")
    if bb is not None:
        assert_close(biasg.grad, biass.grad, biasr.grad, dtype, "dbias")


@pytest.mark.gpu
def test_fused_cora_linear_weight_gradient_and_fp32_refusal(cuda_ext):
    x, w, a, b, bb = make_inputs(2, 7, 64, 48, 8, torch.float16)
    w = w.detach().requires_grad_()
    fused_cora_linear(x, w, a, b, bb, backend="cuda").float().sum().backward()
    w64 = w.detach().double().requires_grad_()
    cora_linear_factored(x.double(), w64, a.double(), b.double(), bb.double()).sum().backward()
    w16 = w.detach().clone().requires_grad_()
    cora_linear_factored(x, w16, a, b, bb).float().sum().backward()
    assert_close(w.grad, w16.grad, w64.grad, torch.float16, "dW")
    x32, w32, a32, b32, _ = make_inputs(2, 3, 32, 32, 4, torch.float32)
    with pytest.raises((TypeError, RuntimeError), match="float16 and bfloat16"):
        fused_cora_linear(x32, w32, a32, b32, backend="cuda")
