"""The host-side fast paths of ``fused_cora_linear`` and the fused multi-projection op.

* the direct backend call (no custom-op dispatch) is taken exactly when nothing can observe
  the op, and gives what the op gives;
* the cheap argument predicate never lets through what the detailed checks reject;
* ``fused_cora_linear_multi`` (fused q/k/v) against an fp64 oracle, forward and every
  gradient, each output's gradient used on its own;
* the Triton launcher's cached launch plans equal the config tables' answers.

Numbers follow ``tests/tolerance.py``: fp64 oracle, same-precision plain-PyTorch reference.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_oracle
from torch.utils._python_dispatch import TorchDispatchMode

import llmrec_kernels.cora_linear as cl
from llmrec_kernels import fused_cora_linear
from llmrec_kernels._validation import _valid_fast, check_cora_linear_args
from llmrec_kernels.cora_linear import fused_cora_linear_multi

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["torch", "triton"] if (INTERPRET or torch.cuda.is_available()) else ["torch"]


def _inputs(b=2, length=3, d_in=24, sizes=(16, 8, 8), r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rand(b, length, d_in)
    ws = [rand(n, d_in, scale=d_in**-0.5) for n in sizes]
    a = rand(b, d_in, r, scale=d_in**-0.5)
    bs = [rand(n, r, scale=r**-0.5) for n in sizes]
    biases = [rand(n) for n in sizes]
    dys = [rand(b, length, n) for n in sizes]
    return x, ws, a, bs, biases, dys


def _plain(x, w, a, b, bias, s):
    """Independent plain-PyTorch CoRA projection (any precision)."""
    return F.linear(x, w, bias) + s * torch.bmm(x, a.to(x.dtype)) @ b.to(x.dtype).t()


# ------------------------------------------------------------------------ direct backend call


def test_direct_call_only_when_nothing_observes_the_op(monkeypatch):
    calls = []
    real = cl._cora_linear_forward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cl, "_cora_linear_forward", spy)
    x, ws, a, bs, _, _ = _inputs()
    with torch.inference_mode():
        fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch")
    with torch.no_grad():
        fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch")
    fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch")  # nothing requires grad
    assert calls == []
    # Autograd records it: eagerly through the autograd.Function over the same backend
    # functions (no dispatcher), under a __torch_function__ mode through the op.
    a.requires_grad_(True)
    y = fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch")
    assert calls == [] and type(y.grad_fn).__name__ == "_CoraLinearEagerBackward"

    class Observer(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Observer():
        fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch")
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_call_matches_the_op(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bf16 tl.dot is wrong in Triton's interpreter")
    x, ws, a, bs, biases, _ = _inputs(dtype=dtype)
    s = 1.5  # not a power of two: the direct path scales on addmm's alpha
    with torch.no_grad():
        direct = fused_cora_linear(x, ws[0], a, bs[0], biases[0], s, backend=backend)
        via_op, _ = cl._cora_linear_forward(x, ws[0], a, bs[0], biases[0], s, backend)
    oracle = _plain(x.double(), ws[0].double(), a.double(), bs[0].double(), biases[0].double(), s)
    reference = _plain(x, ws[0], a, bs[0], biases[0], s)
    assert_close_to_oracle(direct, reference, oracle, "direct call")
    assert_close_to_oracle(via_op, reference, oracle, "op call")


def test_two_dim_x_on_the_direct_path():
    x, ws, a, bs, _, _ = _inputs(length=1)
    with torch.no_grad():
        y2 = fused_cora_linear(x[:, 0], ws[0], a, bs[0], None, 2.0, backend="torch")
        y3 = fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch")
    assert y2.shape == (2, 16)
    torch.testing.assert_close(y2, y3[:, 0], rtol=0, atol=0)


# ------------------------------------------------------------------------ argument predicate


def _mutations():
    """Argument tuples that are wrong in one way each (the detailed checks reject them)."""
    x, ws, a, bs, biases, _ = _inputs()
    w, b, bias = ws[0], bs[0], biases[0]
    good = (x, w, a, b, bias, 2.0)
    yield "good", good, True
    yield "x 4-D", (x[None], w, a, b, bias, 2.0), False
    yield "x 1-D", (x[0, 0], w, a, b, bias, 2.0), False
    yield "x int", (x.long(), w, a, b, bias, 2.0), False
    yield "weight d_in", (x, w[:, :-1], a, b, bias, 2.0), False
    yield "weight 3-D", (x, w[None], a, b, bias, 2.0), False
    yield "weight dtype", (x, w.double(), a, b, bias, 2.0), False
    yield "a batch", (x, w, a[:1], b, bias, 2.0), False
    yield "a d_in", (x, w, a[:, :-1], b, bias, 2.0), False
    yield "a 4-D", (x, w, a[None], b, bias, 2.0), False
    yield "a shared d_in", (x, w, a[0, :-1], b, bias, 2.0), False
    yield "a rank 0", (x, w, a[..., :0], b[:, :0], bias, 2.0), False
    yield "a int", (x, w, a.long(), b, bias, 2.0), False
    yield "b rank", (x, w, a, b[:, :-1], bias, 2.0), False
    yield "b d_out", (x, w, a, b[:-1], bias, 2.0), False
    yield "b transposed", (x, w, a, b.t(), bias, 2.0), False
    yield "b int", (x, w, a, b.long(), bias, 2.0), False
    yield "bias shape", (x, w, a, b, bias[:-1], 2.0), False
    yield "bias 2-D", (x, w, a, b, bias[None], 2.0), False
    yield "bias int", (x, w, a, b, bias.long(), 2.0), False
    yield "bias not a tensor", (x, w, a, b, [1.0], 2.0), False
    yield "scaling tensor", (x, w, a, b, bias, torch.tensor(2.0)), False
    yield "scaling bool", (x, w, a, b, bias, True), False
    yield "x not a tensor", (x.tolist(), w, a, b, bias, 2.0), False
    yield "a on meta", (x, w, a.to("meta"), b, bias, 2.0), False
    yield "b on meta", (x, w, a, b.to("meta"), bias, 2.0), False
    yield "bias on meta", (x, w, a, b, bias.to("meta"), 2.0), False


@pytest.mark.parametrize("name,args,valid", list(_mutations()), ids=lambda v: str(v)[:20])
def test_fast_predicate_never_accepts_what_the_checks_reject(name, args, valid):
    assert _valid_fast(*args) == valid, name
    if valid:
        check_cora_linear_args(*args)
    else:
        with pytest.raises((TypeError, ValueError)):
            check_cora_linear_args(*args)


# --------------------------------------------------------------- fused multi-projection op


NAMES = ("x", "a", "w0", "w1", "w2", "b0", "b1", "b2", "bias0", "bias1", "bias2")


def _grad_subsets():
    """Representative subsets of the inputs that require grad (every single one, and more)."""
    yield from ((n,) for n in NAMES)
    yield ("x", "a")
    yield ("a", "b0", "b1", "b2")  # CoRA training: A (from a generator) and every B
    yield ("b1",)
    yield NAMES


# Every subset on the torch backend; a few through the Triton interpreter (slow).
CASES = [("torch", needs) for needs in _grad_subsets()] + [
    ("triton", needs) for needs in (("x",), ("a", "b0", "b1", "b2"), NAMES) if "triton" in BACKENDS
]


@pytest.mark.parametrize("backend,needs", CASES, ids=[f"{b}-{'+'.join(n)}" for b, n in CASES])
def test_multi_forward_and_gradients_against_fp64(backend, needs):
    x, ws, a, bs, biases, dys = _inputs()
    s = 1.5

    def leaves(dtype):
        vals = {"x": x, "a": a}
        vals.update({f"w{i}": w for i, w in enumerate(ws)})
        vals.update({f"b{i}": b for i, b in enumerate(bs)})
        vals.update({f"bias{i}": b for i, b in enumerate(biases)})
        return {k: v.detach().to(dtype).requires_grad_(k in needs) for k, v in vals.items()}

    def grads(outs, t):
        want = [t[n] for n in NAMES if n in needs]
        # outputs that do not depend on a leaf needing grad are left out (the reference's
        # output i does not depend on w_j)
        loss = sum((o * d.to(o.dtype)).sum() for o, d in zip(outs, dys) if o.requires_grad)
        return dict(zip([n for n in NAMES if n in needs], torch.autograd.grad(loss, want)))

    t = leaves(torch.float32)
    w3, b3, bias3 = (
        [t[f"w{i}"] for i in range(3)],
        [t[f"b{i}"] for i in range(3)],
        [t[f"bias{i}"] for i in range(3)],
    )
    outs = fused_cora_linear_multi(t["x"], w3, t["a"], b3, bias3, s, backend=backend)
    got = grads(outs, t)

    results = {}
    for dtype in (torch.float32, torch.float64):
        u = leaves(dtype)
        ref = tuple(
            _plain(u["x"], u[f"w{i}"], u["a"], u[f"b{i}"], u[f"bias{i}"], s) for i in range(3)
        )
        results[dtype] = (ref, grads(ref, u))
    (ref_y, ref_g), (ora_y, ora_g) = results[torch.float32], results[torch.float64]
    for i in range(3):
        assert_close_to_oracle(outs[i], ref_y[i], ora_y[i], f"output {i}")
    for n in got:
        assert_close_to_oracle(got[n], ref_g[n], ora_g[n], f"d{n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_multi_backward_with_shared_a_and_strided_grads(backend, dropout_p):
    """The multi backward sums the outputs' low-rank gradients before they meet A (torch
    backend): checked with one shared 2-D A (plain LoRA), odd sizes, non-contiguous output
    gradients and dropout, against per-projection fused_cora_linear calls and fp64."""
    x, ws, a3, bs, biases, _ = _inputs(3, 5, 21, (13, 7, 7), 5, seed=4)
    a = a3[0]  # (d_in, r): one A for every sample
    g = torch.Generator().manual_seed(8)
    # each output gradient a transposed view: not contiguous
    dys = [torch.randn(n, 5, 3, generator=g).permute(2, 1, 0) for n in (13, 7, 7)]
    assert not dys[0].is_contiguous()
    kw = {"dropout_p": dropout_p, "dropout_seed": 5} if dropout_p else {}

    def run(dtype, fused):
        xl = x.to(dtype).requires_grad_(True)
        al = a.to(dtype).requires_grad_(True)
        bl = [b.to(dtype).requires_grad_(True) for b in bs]
        wl = [w.to(dtype) for w in ws]
        bias = [b.to(dtype) for b in biases]
        be = backend if dtype != torch.float64 else "torch"
        if fused:
            outs = fused_cora_linear_multi(xl, wl, al, bl, bias, 1.5, be, **kw)
        else:  # one call per projection: the same mask (same seed), each its own backward
            outs = [
                fused_cora_linear(xl, w, al, b, c, 1.5, be, **kw) for w, b, c in zip(wl, bl, bias)
            ]
        grads = torch.autograd.grad(outs, (xl, al, *bl), [d.to(dtype) for d in dys])
        return (*outs, *grads)

    got, want, oracle = (
        run(torch.float32, True),
        run(torch.float32, False),
        run(torch.float64, False),
    )
    names = ("y0", "y1", "y2", "dx", "dA", "dB0", "dB1", "dB2")
    for name, u, v, o in zip(names, got, want, oracle):
        assert_close_to_oracle(u, v, o, f"{backend} shared-A multi {name}")


def test_multi_outputs_are_separate_tensors_in_training():
    """A slice of one buffer would keep every projection's output alive (see the op's doc)."""
    x, ws, a, bs, _, _ = _inputs()
    a.requires_grad_(True)
    outs = fused_cora_linear_multi(x, ws, a, bs, None, 2.0, backend="torch")
    ptrs = {o.untyped_storage().data_ptr() for o in outs}
    assert len(ptrs) == 3


def test_multi_uses_given_fused_operands_and_rejects_bad_lists():
    x, ws, a, bs, _, _ = _inputs()
    fw, fb = torch.cat(ws), torch.cat(bs)
    with torch.no_grad():
        got = fused_cora_linear_multi(x, ws, a, bs, None, 2.0, "torch", fw, fb)
        want = fused_cora_linear(x, fw, a, fb, None, 2.0, backend="torch")
    torch.testing.assert_close(torch.cat(got, -1), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one length"):
        fused_cora_linear_multi(x, ws, a, bs[:2])
    with pytest.raises(ValueError, match="add up"):
        fused_cora_linear_multi(x, ws[:2], a, bs[:2], None, 2.0, "torch", fw, fb)


# ------------------------------------------------------------------ Triton launch plans


def test_triton_launch_plans_equal_the_config_tables(monkeypatch):
    """The cached (grid, kwargs) of every launch are what the config functions give."""
    pytest.importorskip("triton")
    from benchmarks.host_overhead import noop_triton_launches

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from llmrec_kernels.triton import configs
    from llmrec_kernels.triton import cora_linear as launcher

    def cdiv(p, q):
        return (p + q - 1) // q

    for rows, n, k, rank, dtype in itertools.product(
        (1, 17, 33, 64, 300), (40, 3072), (24,), (4, 16, 64, 128),
        (torch.float16, torch.float32),
    ):  # fmt: skip
        launcher.clear_config_cache()
        key = launcher._key(dtype)
        grid, meta = launcher._gemm_plan("fwd", rows, n, rank, key)
        cfg = configs.gemm_config("fwd", rows, dtype, rank)
        assert grid == (cdiv(rows, cfg.BLOCK_M) * cdiv(n, cfg.BLOCK_N),)
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]) == (
            cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K,
        )  # fmt: skip
        assert meta["num_warps"] == cfg.num_warps and meta["num_stages"] == cfg.num_stages
        grid, meta = launcher._gemm_plan("bwd_dx", rows, k, rank, key)
        cfg = configs.gemm_config("bwd_dx", rows, dtype, rank)
        # the dx kernel tiles x's columns (K) with the config's BLOCK_N
        assert grid == (cdiv(rows, cfg.BLOCK_M) * cdiv(k, cfg.BLOCK_N),)
        assert (meta["BLOCK_K"], meta["BLOCK_N"]) == (cfg.BLOCK_N, cfg.BLOCK_K)
        assert meta["BLOCK_R"] == configs.block_r(rank)
        grid, meta = launcher._shrink_plan(3, rows, rank, key)
        cfg = configs.shrink_config(rows, dtype)
        assert grid == (cdiv(rows, cfg.BLOCK_M), 3)
        assert (meta["BLOCK_M"], meta["BLOCK_K"]) == (cfg.BLOCK_M, cfg.BLOCK_K)
        # with the device's SM count: the occupancy rule of the same config function
        grid, meta = launcher._gemm_plan("fwd", rows, n, rank, key, 132)
        cfg = configs.gemm_config("fwd", rows, dtype, rank, n, 132)
        assert grid == (cdiv(rows, cfg.BLOCK_M) * cdiv(n, cfg.BLOCK_N),)
        assert (meta["BLOCK_M"], meta["BLOCK_N"]) == (cfg.BLOCK_M, cfg.BLOCK_N)
    # and the launcher's forward runs end to end with no-op launches (allocations, strides)
    x, ws, a, bs, _, _ = _inputs()
    with noop_triton_launches() as mod:
        y, s = mod.forward(x, ws[0], a, bs[0], None, 2.0)
    assert y.shape == (2, 3, 16) and s.shape == (2, 3, 4)
    launcher.clear_config_cache()


def test_fp32_precision_follows_the_tf32_flag_on_every_call():
    """The Triton path reads cuBLAS's TF32 flag through its C getter (host cost): a change of
    ``torch.backends.cuda.matmul.allow_tf32`` must still reach the next call's precision."""
    from llmrec_kernels.triton import cora_linear as triton_impl

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag, want in ((True, "tf32"), (False, "ieee")):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert triton_impl._input_precision(torch.float32) == want
            assert triton_impl._key(torch.float32)[1] == want
            assert triton_impl._input_precision(torch.bfloat16) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ----------------------------------------------------- one projection: every gradient subset

SINGLE_NAMES = ("x", "w", "a", "b", "bias")
SINGLE_SUBSETS = [
    needs
    for k in range(1, len(SINGLE_NAMES) + 1)
    for needs in itertools.combinations(SINGLE_NAMES, k)
]


@pytest.mark.parametrize("length,shared_a", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("needs", SINGLE_SUBSETS, ids=["+".join(n) for n in SINGLE_SUBSETS])
def test_single_every_grad_subset_against_fp64(needs, length, shared_a):
    """Every subset of (x, W, A, B, bias) needing grad, decode (L 1, where dA is an outer
    product) and prefill, per-sample and shared A: the gradients asked for are right and
    the others are not computed."""
    x, ws, a, bs, biases, dy = _inputs(b=3, length=length, sizes=(10,), r=4, seed=5)
    a = a[0] if shared_a else a
    values = {"x": x, "w": ws[0], "a": a, "b": bs[0], "bias": biases[0]}
    s = 1.5

    def run(dtype, ours):
        t = {k: v.to(dtype).requires_grad_(k in needs) for k, v in values.items()}
        if ours:
            y = fused_cora_linear(t["x"], t["w"], t["a"], t["b"], t["bias"], s, backend="torch")
        else:
            low = torch.matmul(t["x"], t["a"]) @ t["b"].t()
            y = F.linear(t["x"], t["w"], t["bias"]) + s * low
        grads = torch.autograd.grad(y, [t[n] for n in needs], dy[0].to(dtype))
        return y, dict(zip(needs, grads)), t

    y, got, leaves = run(torch.float32, True)
    y_ref, ref, _ = run(torch.float32, False)
    y_orc, orc, _ = run(torch.float64, False)
    assert_close_to_oracle(y, y_ref, y_orc, "y")
    for n in needs:
        assert got[n].dtype == leaves[n].dtype and got[n].shape == leaves[n].shape
        assert_close_to_oracle(got[n], ref[n], orc[n], f"d{n}")


# ------------------------------------------------------- host cost against plain autograd
#
# Decode-sized training step (B 32, L 1, d 256, r 16, fp32, W frozen): CoRA trains A (from a
# generator) and B; x is a hidden state that needs grad. "Plain" is the same maths written as
# factored autograd, x W^T + s (x A) B^T.

HOST_B, HOST_L, HOST_D, HOST_R = 32, 1, 256, 16


def _host_case(dtype=torch.float32, n_proj=1):
    g = torch.Generator().manual_seed(21)

    def rand(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    x = rand(HOST_B, HOST_L, HOST_D, grad=True)
    a = rand(HOST_B, HOST_D, HOST_R, scale=HOST_D**-0.5, grad=True)
    ws = [rand(HOST_D, HOST_D, scale=HOST_D**-0.5) for _ in range(n_proj)]
    bs = [rand(HOST_D, HOST_R, scale=HOST_R**-0.5, grad=True) for _ in range(n_proj)]
    dys = [rand(HOST_B, HOST_L, HOST_D) for _ in range(n_proj)]
    fused_w = torch.cat(ws)
    fused_b = torch.cat([b.detach() for b in bs])
    leaves = (x, a, *bs)

    def ours():
        if n_proj == 1:
            outs = (fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend="torch"),)
        else:
            outs = fused_cora_linear_multi(x, ws, a, bs, None, 2.0, "torch", fused_w, fused_b)
        return torch.autograd.grad(outs, leaves, dys)

    def plain():
        shrunk = torch.bmm(x, a)
        outs = [x @ w.t() + 2.0 * (shrunk @ b.t()) for w, b in zip(ws, bs)]
        return torch.autograd.grad(outs, leaves, dys)

    return ours, plain


class _OpRecorder(TorchDispatchMode):
    """Records every ATen op dispatched (name, output dtypes and shapes)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        metas = [(t.dtype, tuple(t.shape)) for t in flat if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket.__name__), metas))
        return out


# Ops that only make a view or metadata (no kernel on a GPU).
_VIEW_OPS = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select",
    "detach", "alias", "unsqueeze", "squeeze", "as_strided", "reshape",
}  # fmt: skip


def _recorded(fn):
    with _OpRecorder() as rec:
        fn()
    return rec.ops


@pytest.mark.parametrize("n_proj", [1, 3], ids=["one projection", "fused qkv"])
def test_backward_dispatches_no_more_ops_than_plain_autograd(n_proj):
    """Deterministic half of the host-cost check: forward+backward dispatches at most as many
    ATen ops, and at most as many kernels (ops that are not views), as plain autograd."""
    ours, plain = _host_case(n_proj=n_proj)
    ours_ops, plain_ops = _recorded(ours), _recorded(plain)

    def kernels(ops):
        return [name for name, _ in ops if name not in _VIEW_OPS]

    assert len(ours_ops) <= len(plain_ops), ([o for o, _ in ours_ops], [o for o, _ in plain_ops])
    assert len(kernels(ours_ops)) <= len(kernels(plain_ops)), (
        kernels(ours_ops),
        kernels(plain_ops),
    )


@pytest.mark.parametrize("n_proj", [1, 3], ids=["one projection", "fused qkv"])
def test_no_full_size_fp32_tensor_in_a_bf16_step(n_proj):
    """A bf16 forward+backward makes fp32 tensors only r-wide (S, dS): no up-cast of x, dy,
    W or a gradient."""
    ours, _ = _host_case(torch.bfloat16, n_proj)
    for name, metas in _recorded(ours):
        for dtype, shape in metas:
            if dtype == torch.float32:
                assert shape and shape[-1] == HOST_R, (name, shape)


def _interleaved_ratio(ours, plain, rounds: int = 40, calls: int = 5) -> tuple[float, float]:
    """``(median over rounds of ours/plain, min(ours)/min(plain))``: per-call wall time of
    the two in alternating order within each round, after a warm-up; the garbage collector
    off. The median of per-round ratios cancels slow phases of a shared machine (both sides
    of a round see the same load); the ratio of minima is the least disturbed pair."""
    for _ in range(10):
        ours(), plain()
    times = {ours: [], plain: []}
    ratios = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            for fn in (ours, plain) if i % 2 == 0 else (plain, ours):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[fn].append(time.perf_counter() - start)
            ratios.append(times[ours][-1] / times[plain][-1])
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(ratios), min(times[ours]) / min(times[plain])


# Measured on the project's shared 2-core box (torch 2.13 CPU, one intra-op thread), median
# per-round ratio / ratio of the best rounds: one projection 0.96-1.05 / 1.00-1.06 (parity:
# fewer ops and kernels than plain autograd, but one Python autograd node costs about what
# plain autograd's extra C++ nodes do), fused q/k/v 0.94-0.97 / 0.84-0.92. The margin absorbs
# a shared machine's noise; the op-count test above is the deterministic bound.
HOST_MARGIN = 1.10


@pytest.mark.parametrize("n_proj", [1, 3], ids=["one projection", "fused qkv"])
def test_host_cost_of_a_training_step_is_at_most_plain_autograd(n_proj):
    """Forward+backward per call at decode size (B 32, L 1, d 256, r 16), torch backend,
    against the same maths as plain factored autograd: interleaved, many rounds, judged on
    the median per-round ratio and on the ratio of the best rounds (both must pass, in one of
    up to three attempts)."""
    ours, plain = _host_case(n_proj=n_proj)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # intra-op threads add their own scheduling noise
    attempts = []
    try:
        # A regression is slow in every attempt; a burst of load from other processes on a
        # shared machine rarely lasts three.
        for _ in range(3):
            attempts.append(_interleaved_ratio(ours, plain))
            if max(attempts[-1]) <= HOST_MARGIN:
                break
    finally:
        torch.set_num_threads(threads)
    assert max(attempts[-1]) <= HOST_MARGIN, attempts
