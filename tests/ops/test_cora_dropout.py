"""LoRA dropout inside ``fused_cora_linear``: ``x W^T + b + s (dropout(x) A_b) B^T``.

* the plain-PyTorch Philox (:func:`llmrec_kernels.dropout.philox_randint`) gives Triton's
  ``tl.randint`` bit for bit, and the kernels drop exactly the elements the torch path drops;
* the mask's keep rate is ``1 - p`` within a binomial bound, with no visible dependence
  between neighbouring rows or columns;
* forward and every gradient against an fp64 oracle that applies the same mask explicitly
  (``x * keep / (1 - p)`` through :func:`llmrec_kernels.reference.cora_linear_factored`),
  on both backends, both A layouts, odd shapes and a non-contiguous ``x``: the backward
  regenerates the forward's mask;
* determinism, ``p = 0`` exactly the op without dropout, argument checks, the fused q/k/v op
  and ``torch.library.opcheck`` with the new arguments.

Numbers follow ``tests/tolerance.py``. The Triton cases run in the interpreter without a GPU,
so their shapes are small.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from tolerance import assert_close_to_oracle

import llmrec_kernels.cora_linear as cl
from llmrec_kernels import fused_cora_linear
from llmrec_kernels.cora_linear import fused_cora_linear_multi
from llmrec_kernels.dropout import dropout_mask, keep_threshold, philox4x, philox_randint
from llmrec_kernels.reference import cora_linear_factored

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = INTERPRET or torch.cuda.is_available()
BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(b, length, k, n, r, shared, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)

    # strided: a non-contiguous x, every other column of a wider tensor
    x = rand(b, length, 2 * k)[..., ::2] if strided else rand(b, length, k)
    w = rand(n, k, scale=k**-0.5)
    a = rand(k, r, scale=k**-0.5) if shared else rand(b, k, r, scale=k**-0.5)
    lb = rand(n, r, scale=r**-0.5)
    bias = rand(n)
    dy = rand(b, length, n)
    return x, w, a, lb, bias, dy


def _explicit(x, w, a, lb, bias, s, keep, p):
    """The reference: the same mask applied by hand, ``dropout(x) = x * keep / (1 - p)``."""
    base = cora_linear_factored(x, w, a, lb.new_zeros(lb.shape), bias, s)
    return base + cora_linear_factored(x * keep / (1 - p), w.new_zeros(w.shape), a, lb, None, s)


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, dy))


# --------------------------------------------------------------------------------- the mask


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (GPU or interpreter)")
def test_torch_philox_equals_triton_randint4x():
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out_ptr, seed, base, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, base + offs.to(tl.int64))
        tl.store(out_ptr + offs * 4, r0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF)

    for seed, base in ((0, 0), (12345, 3), (2**40 + 7, 2**33 - 5), (2**63 - 1, 17)):
        got = torch.empty(128, 4, dtype=torch.int64, device=DEV)
        randint4x_kernel[(1,)](got, seed, base, BLOCK=128)
        want = torch.stack(philox4x(seed, torch.arange(base, base + 128, device=DEV)), dim=1)
        assert torch.equal(got, want), (seed, base)
        assert torch.equal(philox_randint(seed, torch.arange(base, base + 128, device=DEV)),
                           want[:, 0])  # fmt: skip


def _philox4x_python(seed: int, counter: int) -> list:
    """Philox4x32-10 on Python integers (Salmon et al. 2011), one counter at a time."""
    m32 = 0xFFFFFFFF
    c = [counter & m32, (counter >> 32) & m32, 0, 0]
    k0, k1 = seed & m32, (seed >> 32) & m32
    for _ in range(10):
        prod_b, prod_a = 0xCD9E8D57 * c[2], 0xD2511F53 * c[0]
        c = [(prod_b >> 32) ^ c[1] ^ k0, prod_b & m32, (prod_a >> 32) ^ c[3] ^ k1, prod_a & m32]
        k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
    return c


def test_torch_philox_equals_the_python_integer_philox():
    """The int64 tensor arithmetic (products that wrap past 2**63) against exact integers,
    at the extremes of seed and counter, on CPU and the test device."""
    seeds = (0, 1, 12345, 2**32 - 1, 2**32, 2**40 + 7, 2**62 + 2**31, 2**63 - 1)
    counters = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**33 - 5, 2**62, 2**63 - 1]
    counters += torch.randint(
        0, 2**63 - 1, (24,), generator=torch.Generator().manual_seed(3)
    ).tolist()
    for device in {torch.device("cpu"), DEV}:
        for seed in seeds:
            got = torch.stack(philox4x(seed, torch.tensor(counters, device=device)), dim=1)
            want = torch.tensor([_philox4x_python(seed, c) for c in counters], device=device)
            assert torch.equal(got, want), (seed, device)


def test_mask_reads_eight_16_bit_values_per_philox_call():
    """The documented layout, element by element, from an offset inside a call's 8."""
    seed, offset, p = 77, 13, 0.3
    keep = dropout_mask((1, 3, 11), p, seed, offset, torch.device("cpu")).reshape(-1)
    for i in range(keep.numel()):
        g = offset + i
        word = philox4x(seed, torch.tensor([g >> 3]))[(g >> 1) & 3].item()
        value = (word >> (16 * (g & 1))) & 0xFFFF
        assert bool(keep[i]) == (value >= keep_threshold(p)), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_kernel_drops_the_elements_the_mask_names(backend, shared):
    # x = 1 and A = I: S = s/(1-p) * keep, so the shrink's nonzeros are the kept elements.
    b, length, k, p, seed, offset = 2, 3, 37, 0.4, 99, 5
    x = torch.ones(b, length, k, device=DEV)
    eye = torch.eye(k, device=DEV)
    a = eye if shared else eye.expand(b, k, k).contiguous()
    w, lb = torch.zeros(4, k, device=DEV), torch.zeros(4, k, device=DEV)
    _, s = cl._cora_linear_forward(x, w, a, lb, None, 1.0, backend, p, torch.tensor(seed), offset)
    keep = dropout_mask((b, length, k), p, seed, offset, DEV)
    assert torch.equal(s != 0, keep)
    assert torch.allclose(s[keep], torch.full_like(s[keep], 1 / (1 - p)))


def test_mask_statistics():
    p, shape = 0.3, (8, 50, 500)
    keep = dropout_mask(shape, p, seed=2024, offset=0, device=torch.device("cpu"))
    n, q = keep.numel(), 1 - p
    bound = 5 * math.sqrt(q * (1 - q) / n)  # five binomial standard deviations
    assert abs(keep.double().mean().item() - q) < bound
    # no dependence between neighbours: along k, along rows, across samples
    flat = keep.reshape(-1, shape[-1]).double()
    for a, b in (
        (flat[:, :-1], flat[:, 1:]),
        (flat[:-1], flat[1:]),
        (keep[:-1].double(), keep[1:].double()),
    ):
        both = (a * b).mean().item()
        assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / a.numel())
    # every column and every row keeps about 1 - p (a per-column / per-row bias would show)
    per_col = flat.mean(0)
    assert (per_col - q).abs().max() < 5 * math.sqrt(q * (1 - q) / flat.shape[0])
    per_row = flat.mean(1)
    assert (per_row - q).abs().max() < 5 * math.sqrt(q * (1 - q) / flat.shape[1])
    # the integer threshold is p to 2**-16
    assert keep_threshold(p) == round(p * 2**16) and keep_threshold(0.0) == 0


# ------------------------------------------------------------------------- numbers vs oracle


CASES = [
    # (B, L, K, N, r, shared A, strided x)
    (2, 3, 37, 19, 5, False, False),
    (2, 3, 37, 19, 8, True, True),
    (3, 1, 24, 16, 5, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_explicit_mask_oracle(backend, case):
    b, length, k, n, r, shared, strided = case
    p, seed, offset, s = 0.25, 4321, 11, 1.5
    x, w, a, lb, bias, dy = _inputs(b, length, k, n, r, shared, strided=strided)
    keep = dropout_mask((b, length, k), p, seed, offset, DEV)

    def fused(x, a, lb, bias):
        return fused_cora_linear(
            x, w, a, lb, bias, s, backend=backend,
            dropout_p=p, dropout_seed=seed, dropout_offset=offset,
        )  # fmt: skip

    def ref(x, a, lb, bias):
        return _explicit(x, w.to(x.dtype), a, lb, bias, s, keep, p)

    got = _grads(fused, (x, a, lb, bias), dy)
    want = _grads(ref, (x, a, lb, bias), dy)
    oracle = _grads(ref, [t.double() for t in (x, a, lb, bias)], dy.double())
    for name, g, r_, o in zip(("y", "dx", "dA", "dB", "dbias"), got, want, oracle):
        assert_close_to_oracle(g, r_, o, f"{backend} {name}")


def test_bf16_torch_path_matches_oracle():
    b, length, k, n, r = 2, 4, 40, 24, 8
    p, seed, s = 0.1, 7, 2.0
    x, w, a, lb, bias, _ = _inputs(b, length, k, n, r, False, dtype=torch.bfloat16)
    keep = dropout_mask((b, length, k), p, seed, 0, DEV)
    y = fused_cora_linear(x, w, a, lb, bias, s, backend="torch", dropout_p=p, dropout_seed=seed)
    want = _explicit(x, w, a, lb, bias, s, keep, p)
    oracle = _explicit(*(t.double() for t in (x, w, a, lb, bias)), s, keep, p)
    assert_close_to_oracle(y, want, oracle, "bf16 y")


def test_one_token_x():
    x, w, a, lb, bias, _ = _inputs(3, 1, 24, 16, 4, False)
    kw = dict(dropout_p=0.5, dropout_seed=3)
    y2 = fused_cora_linear(x[:, 0], w, a, lb, bias, 2.0, backend="torch", **kw)
    assert torch.equal(y2, fused_cora_linear(x, w, a, lb, bias, 2.0, backend="torch", **kw)[:, 0])


# ------------------------------------------------------------------- determinism and p = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_bits_other_seed_or_offset_other_mask(backend):
    x, w, a, lb, bias, dy = _inputs(2, 3, 24, 16, 4, False)

    def run(seed, offset=0):
        fn = lambda x, a: fused_cora_linear(  # noqa: E731
            x, w, a, lb, bias, 2.0, backend=backend,
            dropout_p=0.5, dropout_seed=seed, dropout_offset=offset,
        )  # fmt: skip
        return _grads(fn, (x, a), dy)

    first, again = run(5), run(5)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert not torch.equal(first[0], run(6)[0])
    assert not torch.equal(first[0], run(5, offset=1)[0])
    m = dropout_mask((2, 3, 24), 0.5, 5, 0, DEV)
    assert not torch.equal(m, dropout_mask((2, 3, 24), 0.5, 6, 0, DEV))
    assert not torch.equal(m, dropout_mask((2, 3, 24), 0.5, 5, 1, DEV))


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_is_the_op_without_dropout(backend):
    x, w, a, lb, bias, dy = _inputs(2, 3, 24, 16, 4, True)

    def plain(x, a):
        return fused_cora_linear(x, w, a, lb, bias, 2.0, backend=backend)

    def zero(x, a):
        return fused_cora_linear(
            x, w, a, lb, bias, 2.0, backend=backend, dropout_p=0.0, dropout_seed=9
        )

    for u, v in zip(_grads(plain, (x, a), dy), _grads(zero, (x, a), dy)):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------- argument checks


def test_bad_dropout_arguments_raise():
    x, w, a, lb, bias, _ = _inputs(1, 2, 8, 4, 2, False)

    def call(**kw):
        return fused_cora_linear(x, w, a, lb, bias, 1.0, backend="torch", **kw)

    for p in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            call(dropout_p=p, dropout_seed=1)
    with pytest.raises(TypeError, match="dropout_p"):
        call(dropout_p="0.1", dropout_seed=1)
    with pytest.raises(ValueError, match="dropout_seed"):
        call(dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_seed"):
        call(dropout_p=0.1, dropout_seed=-1)
    with pytest.raises(TypeError, match="dropout_seed"):
        call(dropout_p=0.1, dropout_seed=1.5)
    with pytest.raises(ValueError, match="dropout_offset"):
        call(dropout_p=0.1, dropout_seed=1, dropout_offset=-3)
    with pytest.raises(ValueError, match="CUDA backend"):
        cl._check_dropout(0.1, 1, 0, "cuda")
    cl._check_dropout(0.0, None, 0, "cuda")  # no dropout: the CUDA backend is fine


# -------------------------------------------------------------------- fused q/k/v and opcheck


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_shares_one_mask_across_projections(backend):
    x, _, a, _, _, _ = _inputs(2, 3, 24, 8, 4, False)
    g = torch.Generator().manual_seed(1)
    sizes = (16, 8, 8)
    ws = [(torch.randn(m, 24, generator=g) / 5).to(DEV) for m in sizes]
    bs = [(torch.randn(m, 4, generator=g) / 2).to(DEV) for m in sizes]
    dys = [torch.randn(2, 3, m, generator=g).to(DEV) for m in sizes]
    p, seed, s = 0.3, 17, 2.0
    keep = dropout_mask((2, 3, 24), p, seed, 0, DEV)

    def run(fn, x, a):
        x, a = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
        outs = fn(x, a)
        return (*outs, *torch.autograd.grad(outs, (x, a), [d.to(x.dtype) for d in dys]))

    def fused(x, a):
        return fused_cora_linear_multi(
            x, ws, a, bs, None, s, backend, dropout_p=p, dropout_seed=seed
        )

    def ref(x, a):
        dt = x.dtype
        return [_explicit(x, wj.to(dt), a, bj.to(dt), None, s, keep, p) for wj, bj in zip(ws, bs)]

    got, want, oracle = run(fused, x, a), run(ref, x, a), run(ref, x.double(), a.double())
    names = ("y_q", "y_k", "y_v", "dx", "dA")
    for name, u, v, o in zip(names, got, want, oracle):
        assert_close_to_oracle(u, v, o, f"{backend} multi {name}")
    with torch.no_grad():  # the no-grad path: one fused call, the same mask
        outs = fused(x, a)
    for name, u, v, o in zip(names, outs, want, oracle):
        assert_close_to_oracle(u, v, o, f"{backend} multi no-grad {name}")


def test_opcheck_with_dropout_arguments():
    x, w, a, lb, bias, _ = _inputs(2, 3, 8, 6, 3, False, dtype=torch.float64)
    seed = torch.tensor(5)  # the ops carry the seed as a 0-d int64 CPU tensor
    args = (x, w, a.requires_grad_(True), lb.requires_grad_(True), bias, 2.0, "torch", 0.3, seed, 2)
    torch.library.opcheck(cl._cora_linear_forward, args)


def test_a_tensor_seed_gives_the_int_seeds_mask_traced_or_not():
    """The seed as a 0-d tensor (what compiled graphs pass): the same mask as the int, both
    through the host path and through the Philox arithmetic on the tensor itself (traced)."""
    import llmrec_kernels.dropout as drop

    cpu = torch.device("cpu")
    for seed in (0, 5, 2**40 + 3, 2**62 - 1):
        want = drop._compute_mask((2, 3, 41), 0.3, seed, 7, cpu)
        assert torch.equal(dropout_mask((2, 3, 41), 0.3, torch.tensor(seed), 7, cpu), want)
        assert torch.equal(drop._compute_mask((2, 3, 41), 0.3, torch.tensor(seed), 7, cpu), want)
    traced = torch.compile(
        lambda s: drop.dropout_mask((2, 3, 41), 0.3, s, 7, cpu), backend="aot_eager",
        fullgraph=True,
    )  # fmt: skip
    assert torch.equal(traced(torch.tensor(5)), drop._compute_mask((2, 3, 41), 0.3, 5, 7, cpu))


def test_the_graph_seed_draw_is_the_eager_draw():
    from llmrec_kernels.dropout import draw_seed, draw_seed_in_graph

    x = torch.randn(2, 3)
    torch.manual_seed(11)
    want = [draw_seed() for _ in range(3)]
    torch.manual_seed(11)
    got = [draw_seed_in_graph(x, key) for key in (1, 1, 2)]  # the key never changes a value
    assert [int(t) for t in got] == want
    assert all(t.shape == () and t.dtype == torch.int64 and t.device.type == "cpu" for t in got)


@pytest.mark.parametrize(
    "seed", [torch.tensor([5]), torch.tensor(5.0), torch.tensor(5, dtype=torch.int32)]
)
def test_a_bad_tensor_seed_is_refused(seed):
    x, w, a, lb, bias, _ = _inputs(2, 3, 8, 6, 3, False, dtype=torch.float32)
    with pytest.raises(ValueError, match="0-d int64 CPU tensor"):
        fused_cora_linear(x, w, a, lb, bias, 2.0, backend="torch", dropout_p=0.1, dropout_seed=seed)


def test_cpu_mask_cache_returns_the_same_numbers_and_stays_in_budget(monkeypatch):
    import llmrec_kernels.dropout as drop

    cpu = torch.device("cpu")
    first = dropout_mask((2, 3, 40), 0.2, 5, 0, cpu)
    assert dropout_mask((2, 3, 40), 0.2, 5, 0, cpu) is first  # the backward's lookup
    assert torch.equal(first, drop._compute_mask((2, 3, 40), 0.2, 5, 0, cpu))
    monkeypatch.setattr(drop, "CPU_MASK_CACHE_BYTES", 1000)
    for seed in range(10):
        dropout_mask((2, 3, 40), 0.2, seed, 0, cpu)  # 240 bytes each
    assert sum(m.numel() for m in drop._cpu_masks.values()) <= 1000
