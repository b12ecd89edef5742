"""Every backend passes one contract suite (:class:`llmrec_kernels.backends.CoraBackend`).

The same checks run on each backend this machine can run: ``torch`` always, ``triton``
through Triton's interpreter (or on a GPU), ``cuda`` where the extension is built and a GPU
is present (otherwise its ``supports`` must say no, with a reason). Values are checked
against an fp64 oracle with the tolerance rule of ``tests/tolerance.py``.
"""

from __future__ import annotations

import inspect
import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_oracle

from llmrec_kernels.backends import CONCRETE_BACKENDS, CoraBackend, CoraShapes, get_backend

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SHAPES = CoraShapes(batch=3, length=4, d_in=24, d_out=20, rank=4)


def _runnable(name: str) -> bool:
    return get_backend(name).supports(
        SHAPES, torch.float32 if name != "cuda" else torch.float16, DEVICE
    )


RUNNABLE = [name for name in CONCRETE_BACKENDS if _runnable(name)]


def _dtype(name: str) -> torch.dtype:
    # the CUDA extension runs 16-bit only; the others are checked in fp32 (bf16 tl.dot is
    # wrong in Triton's interpreter)
    return torch.float16 if name == "cuda" else torch.float32


def _inputs(dtype, shared_a=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, length, d_in, d_out, r = SHAPES[:5]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x = rand(b, length, d_in)
    w = rand(d_out, d_in, scale=d_in**-0.5)
    a = rand(d_in, r, scale=d_in**-0.5) if shared_a else rand(b, d_in, r, scale=d_in**-0.5)
    lb = rand(d_out, r, scale=r**-0.5)
    bias = rand(d_out)
    dy = rand(b, length, d_out)
    return x, w, a, lb, bias, dy


def _oracle(x, w, a, lb, bias, dy, scaling):
    """fp64 forward and gradients by autograd (independent of every backend)."""
    leaves = [t.double().requires_grad_(True) for t in (x, a, lb)]
    xd, ad, bd = leaves
    s = scaling * torch.matmul(xd, ad)
    y = F.linear(xd, w.double(), bias.double()) + s @ bd.t()
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y.detach(), s.detach(), grads


def _same_precision(x, w, a, lb, bias, dy, scaling):
    """The same maths in the backend's precision, plain PyTorch (fp32 for 16-bit inputs on
    the CPU, which lacks some 16-bit kernels)."""
    dt = x.dtype if x.is_cuda or x.dtype == torch.float32 else torch.float32
    leaves = [t.to(dt).requires_grad_(True) for t in (x, a, lb)]
    xd, ad, bd = leaves
    s = scaling * torch.matmul(xd, ad)
    y = F.linear(xd, w.to(dt), bias.to(dt)) + s @ bd.t()
    grads = torch.autograd.grad(y, leaves, dy.to(dt))
    return y.detach(), s.detach(), grads


def test_every_backend_module_implements_the_protocol_with_its_signatures():
    """One interface, written once: the same method names and parameter names everywhere."""
    members = ("forward", "backward", "forward_multi", "backward_multi", "check_supported")
    for name in CONCRETE_BACKENDS:
        module = get_backend(name)
        for flag in ("TRACEABLE", "HAS_DROPOUT", "SUPPORT_DEPENDS_ON_ENV"):
            assert isinstance(getattr(module, flag), bool), (name, flag)
        assert callable(module.supports)
        for member in members:
            want = list(inspect.signature(getattr(CoraBackend, member)).parameters)[1:]
            got = list(inspect.signature(getattr(module, member)).parameters)
            assert got == want, (name, member, got, want)


def test_no_code_asks_which_backend_it_is():
    """Dispatch goes through the contract, never through a backend's name or module."""
    root = Path(__file__).resolve().parents[2] / "llmrec_kernels"
    pattern = re.compile(
        r"""backend\s*[!=]=\s*["'](torch|triton|cuda)["']|is _torch_impl|is _cuda_impl"""
    )
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("name", CONCRETE_BACKENDS)
def test_supports_agrees_with_check_supported(name):
    module = get_backend(name)
    cases = [
        (SHAPES, torch.float32, torch.device("cpu")),
        (SHAPES, torch.float16, DEVICE),
        (SHAPES, torch.float64, DEVICE),
        (SHAPES._replace(rank=4096), torch.float16, DEVICE),
        (SHAPES, torch.int32, DEVICE),
        (SHAPES, torch.float32, torch.device("meta")),
    ]
    for shapes, dtype, device in cases:
        try:
            module.check_supported(shapes, dtype, device)
            ok = True
        except (TypeError, ValueError) as exc:
            ok = False
            assert str(exc), "a refusal must say why"
        assert module.supports(shapes, dtype, device) == ok, (shapes, dtype, device)
    # every backend refuses integers
    assert not module.supports(SHAPES, torch.int32, DEVICE)


@pytest.mark.parametrize("shared_a", [False, True], ids=["per-sample A", "shared A"])
@pytest.mark.parametrize("name", RUNNABLE)
def test_forward_and_every_backward_subset(name, shared_a):
    module = get_backend(name)
    dtype = _dtype(name)
    x, w, a, lb, bias, dy = _inputs(dtype, shared_a)
    scaling = 1.5
    y_orc, s_orc, g_orc = _oracle(x, w, a, lb, bias, dy, scaling)
    y_ref, s_ref, g_ref = _same_precision(x, w, a, lb, bias, dy, scaling)
    with torch.no_grad():
        y, s = module.forward(x, w, a, lb, bias, scaling, True, None)
        assert y.shape == y_orc.shape and y.dtype == dtype
        assert s.shape == s_orc.shape and s.dtype == torch.float32
        assert_close_to_oracle(y, y_ref, y_orc, f"{name} y")
        assert_close_to_oracle(s, s_ref, s_orc, f"{name} s")
        y_no_s = module.forward(x, w, a, lb, bias, scaling, False, None)[0]
        assert_close_to_oracle(y_no_s, y_ref, y_orc, f"{name} y (need_s=False)")
        for needs in itertools.product((False, True), repeat=3):
            grads = module.backward(dy, x, w, a, lb, s, scaling, *needs, None)
            assert len(grads) == 3
            for need, got, ref, orc, like, what in zip(
                needs, grads, g_ref, g_orc, (x, a, lb), ("dx", "dA", "dB")
            ):
                if not need:
                    assert got is None, f"{name} {what} not asked for"
                    continue
                assert got.shape == like.shape and got.dtype == like.dtype, (name, what)
                assert_close_to_oracle(got, ref, orc, f"{name} {what} {needs}")


@pytest.mark.parametrize("name", RUNNABLE)
def test_multi_projection_equals_projections_one_by_one(name):
    """``forward_multi``/``backward_multi`` over stacked rows give each projection's own
    output and the summed dx, dA (the same values as one call per projection)."""
    module = get_backend(name)
    dtype = _dtype(name)
    x, w, a, lb, bias, dy = _inputs(dtype, seed=3)
    sizes = (8, 6, 6)
    scaling = 1.5
    y_orc, _, g_orc = _oracle(x, w, a, lb, bias, dy, scaling)
    y_ref, _, g_ref = _same_precision(x, w, a, lb, bias, dy, scaling)
    with torch.no_grad():
        outs, s = module.forward_multi(x, w, a, lb, bias, scaling, sizes, None)
        assert [o.shape[-1] for o in outs] == list(sizes)
        assert_close_to_oracle(torch.cat(outs, -1), y_ref, y_orc, f"{name} multi y")
        dys = tuple(dy.split(sizes, -1))
        dx, da, dbs = module.backward_multi(
            dys, x, w, a, lb, s, scaling, sizes, True, True, (True, False, True), None
        )
        assert dbs[1] is None
        assert_close_to_oracle(dx, g_ref[0], g_orc[0], f"{name} multi dx")
        assert_close_to_oracle(da, g_ref[1], g_orc[1], f"{name} multi dA")
        for j, (start, stop) in enumerate(((0, 8), (14, 20))):
            k = (0, 2)[j]
            assert_close_to_oracle(
                dbs[k], g_ref[2][start:stop], g_orc[2][start:stop], f"{name} multi dB{k}"
            )


@pytest.mark.parametrize("name", CONCRETE_BACKENDS)
def test_dropout_is_implemented_or_refused(name):
    """A backend without dropout refuses a dropout spec; one with it applies the mask."""
    module = get_backend(name)
    if name not in RUNNABLE:
        pytest.skip(f"{name} cannot run here")
    dtype = _dtype(name)
    x, w, a, lb, bias, _ = _inputs(dtype)
    with torch.no_grad():
        if not module.HAS_DROPOUT:
            with pytest.raises(ValueError, match="dropout"):
                module.forward(x, w, a, lb, bias, 1.0, True, (0.5, 7, 0))
            return
        y_drop = module.forward(x, w, a, lb, bias, 1.0, True, (0.5, 7, 0))[0]
        y = module.forward(x, w, a, lb, bias, 1.0, True, None)[0]
        assert not torch.equal(y_drop, y)


def test_cuda_backend_keeps_the_base_gemm_off_the_mma_sync_kernel_on_sm90(monkeypatch):
    """On sm_90+ the CUDA backend's base GEMM and dx's ``dy W`` are cuBLAS's: the
    extension's fused GEMM ops are never called, its shrink and dA/dB kernels are. Checked on
    the CPU with the extension's ops stood in for by plain PyTorch (the routing, not the
    kernels; those run in the GPU check)."""
    from llmrec_kernels import _cuda, _cuda_impl

    calls = []

    class FakeOps:
        def shrink(self, x, a, scaling):
            calls.append("shrink")
            return scaling * torch.matmul(x.float(), a.float())

        def cora_forward(self, *args):
            raise AssertionError("the mma.sync forward GEMM ran on sm_90")

        def cora_backward(self, dy, x, w, a, b, s, scaling, need_dx, need_da, need_db):
            calls.append("backward")
            assert not need_dx, "the mma.sync dx GEMM ran on sm_90"
            ds = scaling * dy.float() @ b.float()
            da = torch.matmul(x.float().transpose(-1, -2), ds).to(a.dtype) if need_da else None
            db = (dy.float().flatten(0, 1).t() @ s.flatten(0, 1)).to(b.dtype) if need_db else None
            return None, da, db

    monkeypatch.setattr(_cuda, "ops", lambda: FakeOps())
    monkeypatch.setattr(_cuda_impl, "_routes_to_cublas", lambda x: True)
    x, w, a, lb, bias, dy = _inputs(torch.float32)
    scaling = 1.5
    y_orc, s_orc, g_orc = _oracle(x, w, a, lb, bias, dy, scaling)
    y_ref, s_ref, g_ref = _same_precision(x, w, a, lb, bias, dy, scaling)
    monkeypatch.setattr(_cuda_impl, "_check", lambda x, rank: None)  # fp32 stands in for bf16
    y, s = _cuda_impl.forward(x, w, a, lb, bias, scaling)
    assert_close_to_oracle(y, y_ref, y_orc, "sm90 y")
    assert_close_to_oracle(s, s_ref, s_orc, "sm90 s")
    dx, da, db = _cuda_impl.backward(dy, x, w, a, lb, s, scaling, True, True, True)
    for got, ref, orc, what in zip((dx, da, db), g_ref, g_orc, ("dx", "dA", "dB")):
        assert_close_to_oracle(got, ref, orc, f"sm90 {what}")
    assert calls == ["shrink", "backward"]
