"""The Hopper kernels (:mod:`llmrec_kernels.triton.hopper`) against an fp64 oracle.

On a machine without a GPU they run in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``), which executes tensor-descriptor loads and stores: both load paths
of the same kernel bodies are tested here, the descriptor (TMA) path and the pointer path
(``use_tma=False``: the sm_80 variant, and what sm_90 falls back to for strides no 2-D
descriptor can express). fp16 and fp32 only under the interpreter (its bf16 ``tl.dot`` and
bf16 descriptor loads are wrong); bf16 too on a GPU. The interpreter's tiles are 16 x 32
with K steps of 16 (:data:`hopper._INTERPRETER`), so the shapes below have several row and
column tiles, ragged edges in M, N and K, and more tiles than persistent programs.

The oracle is :func:`llmrec_kernels.reference.cora_linear_factored` in float64 on the same
rounded inputs; the tolerance is :mod:`tolerance`'s rule (a few times the error of the same
computation in plain PyTorch at the inputs' precision).
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec_kernels.backends import interpreter_enabled, triton_available

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(
        not (interpreter_enabled() or torch.cuda.is_available()),
        reason="needs TRITON_INTERPRET=1 or a CUDA device",
    ),
]

ON_GPU = torch.cuda.is_available() and not interpreter_enabled()
# Descriptors (TMA) need sm_90; the interpreter emulates them.
HAS_TMA = not ON_GPU or torch.cuda.get_device_capability()[0] >= 9
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
SCALING = 2.0
# (B, L, d_in, d_out, r). TMA-able rows (d_in, d_out multiples of 8): prefill with samples
# spanning row tiles (L 20 > 16) and row tiles spanning samples; decode (L 1); rank 40, whose
# padded 64 ranks take the chunked low-rank steps (16 per step).
ALIGNED = [(2, 20, 40, 72, 5), (6, 1, 48, 40, 16), (1, 37, 24, 56, 40)]
# Rows whose pitch (37 fp16 elements) is no multiple of 16 bytes: the pointer path only.
ODD = [(3, 5, 37, 53, 3)]


@pytest.fixture(scope="module")
def hopper():
    from llmrec_kernels.triton import hopper

    return hopper


def _device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


def make_inputs(b, seq, d_in, d_out, rank, dtype, *, shared=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=_device(), dtype=dtype)

    x = rand(b, seq, d_in)
    weight = rand(d_out, d_in, scale=d_in**-0.5)
    lora_a = rand(d_in, rank, scale=d_in**-0.5) if shared else rand(b, d_in, rank, scale=d_in**-0.5)
    lora_b = rand(d_out, rank, scale=rank**-0.5)
    bias_t = rand(d_out) if bias else None
    dy = rand(b, seq, d_out)
    return x, weight, lora_a, lora_b, bias_t, dy


def _autograd(x, weight, lora_a, lora_b, bias, dy, cast):
    """``(y, S, (dx, dA, dB))`` of the factored maths, every input cast by ``cast``."""
    from llmrec_kernels.reference import cora_linear_factored

    x, lora_a, lora_b = (cast(t).detach().requires_grad_() for t in (x, lora_a, lora_b))
    weight = cast(weight)
    bias = cast(bias) if bias is not None else None
    y = cora_linear_factored(x, weight, lora_a, lora_b, bias, scaling=SCALING)
    grads = torch.autograd.grad(y, (x, lora_a, lora_b), cast(dy))
    shrink = torch.matmul(x.detach(), lora_a.detach()) * SCALING
    return y.detach(), shrink, grads


def check_forward_and_backward(hopper, inputs, **kwargs):
    """Run :func:`hopper.forward` and :func:`hopper.backward`; compare everything with fp64."""
    x, weight, lora_a, lora_b, bias, dy = inputs
    dtype = x.dtype
    y, s = hopper.forward(x, weight, lora_a, lora_b, bias, SCALING, **kwargs)
    grads = hopper.backward(dy, x, weight, lora_a, lora_b, s, SCALING, True, True, True, **kwargs)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype, lora_a.dtype, lora_b.dtype]
    ref = _autograd(x, weight, lora_a, lora_b, bias, dy, lambda t: t)
    orc = _autograd(x, weight, lora_a, lora_b, bias, dy, lambda t: t.double())
    # S is fp32 whatever the inputs (products of rounded inputs, fp32 sums): fp32's rule.
    s_ref = _autograd(x, weight, lora_a, lora_b, bias, dy, lambda t: t.float())[1]
    assert_close_to_oracle(y, ref[0], orc[0], "y")
    assert_close_to_oracle(s, s_ref, orc[1], "S", dtype=torch.float32)
    for name, g, g_ref, g_orc in zip(("dx", "dA", "dB"), grads, ref[2], orc[2]):
        assert_close_to_oracle(g, g_ref, g_orc, name)
    return y, s, grads


@pytest.mark.parametrize("shape", ALIGNED, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_both_load_paths_match_fp64(hopper, shape, dtype, shared, use_tma):
    if use_tma and not HAS_TMA:
        pytest.skip("tensor descriptors need sm_90")
    inputs = make_inputs(*shape, dtype, shared=shared)
    check_forward_and_backward(hopper, inputs, use_tma=use_tma, num_programs=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_flattened_forward(hopper, dtype):
    """``flatten=True`` changes only how the compiler schedules the loops: same results."""
    inputs = make_inputs(2, 20, 40, 72, 5, dtype)
    y, s = hopper.forward(*inputs[:5], SCALING, num_programs=4, flatten=True)
    y_nested, s_nested = hopper.forward(*inputs[:5], SCALING, num_programs=4)
    assert torch.equal(y, y_nested) and torch.equal(s, s_nested)


def test_other_tiles_and_an_unsplit_epilogue(hopper):
    """``config=``: other tiles (wider columns, deeper K steps) and one epilogue slice
    (``EPI_SPLIT`` 1) give the same maths."""
    inputs = make_inputs(2, 20, 40, 72, 5, torch.float16)
    for cfg in (
        hopper.HopperConfig(16, 32, 16, 2, 1, 4, 1),
        hopper.HopperConfig(32, 64, 32, 1, 2, 4, 1),
    ):
        check_forward_and_backward(hopper, inputs, num_programs=2, config=cfg)
    with pytest.raises(ValueError, match="EPI_SPLIT"):
        hopper.HopperConfig(16, 32, 16, 2, 4, 4, 1)


@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
def test_unaligned_rows_take_the_pointer_path(hopper, shape, dtype, shared):
    inputs = make_inputs(*shape, dtype, shared=shared)
    with pytest.raises(ValueError, match="use_tma=True"):
        hopper.forward(*inputs[:5], SCALING, use_tma=True)
    check_forward_and_backward(hopper, inputs)  # default: whichever path the strides allow


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
def test_without_bias(hopper, dtype, shared):
    inputs = make_inputs(2, 20, 40, 72, 5, dtype, shared=shared, bias=False)
    check_forward_and_backward(hopper, inputs, num_programs=2)


def test_non_contiguous_inputs(hopper):
    """Strided x and dy: a sliced last dimension (the rows still one 2-D view with a 16-byte
    pitch and base: descriptors apply), rows that do not merge into one view (each sample's
    rows a slice of a longer sequence), and a transposed x (unit stride along L). The last
    two can only take the pointer path. What lies outside the views is NaN: a load beyond a
    view's rows or columns would show in the results."""
    x, weight, lora_a, lora_b, bias, dy = make_inputs(2, 20, 40, 72, 5, torch.float16)
    # Columns 8..48 of 56: 16-byte pitch (112 bytes) and base (offset 16 bytes).
    wide_x = torch.full((2, 20, 56), float("nan"), dtype=x.dtype, device=x.device)
    wide_x[..., 8:48] = x
    sliced = wide_x[..., 8:48]
    wide_dy = torch.full((2, 20, 88), float("nan"), dtype=dy.dtype, device=dy.device)
    wide_dy[..., 8:80] = dy
    sliced_dy = wide_dy[..., 8:80]
    assert not sliced.is_contiguous() and not sliced_dy.is_contiguous()
    check_forward_and_backward(
        hopper, (sliced, weight, lora_a, lora_b, bias, sliced_dy), use_tma=True
    )
    # Rows 0..19 of sequences of 23: no single stride between flat rows.
    long_x = torch.full((2, 23, 40), float("nan"), dtype=x.dtype, device=x.device)
    long_x[:, :20] = x
    long_dy = torch.full((2, 23, 72), float("nan"), dtype=dy.dtype, device=dy.device)
    long_dy[:, :20] = dy
    unmerged, unmerged_dy = long_x[:, :20], long_dy[:, :20]
    with pytest.raises(ValueError, match="use_tma=True"):
        hopper.forward(unmerged, weight, lora_a, lora_b, bias, SCALING, use_tma=True)
    check_forward_and_backward(hopper, (unmerged, weight, lora_a, lora_b, bias, unmerged_dy))
    transposed = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert transposed.stride(-1) != 1
    check_forward_and_backward(hopper, (transposed, weight, lora_a, lora_b, bias, dy))


@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_persistent_programs_cover_every_tile_once(hopper, use_tma):
    """The forward's M 40 x N 72 is 3 x 3 tiles of 16 x 32, dx's M 40 x K 40 is 3 x 2.
    Whatever the number of programs (fewer than the tiles, or more), each tile is computed
    once and alike, so the outputs are bitwise equal; the first run is checked against fp64."""
    inputs = make_inputs(2, 20, 40, 72, 5, torch.float16)
    first = check_forward_and_backward(hopper, inputs, use_tma=use_tma, num_programs=1)
    x, weight, lora_a, lora_b, bias, dy = inputs
    for programs in (2, 4, 9, 50):
        y, s = hopper.forward(x, weight, lora_a, lora_b, bias, SCALING,
                              use_tma=use_tma, num_programs=programs)  # fmt: skip
        dx, _, _ = hopper.backward(dy, x, weight, lora_a, lora_b, s, SCALING, True, False, False,
                                   use_tma=use_tma, num_programs=programs)  # fmt: skip
        assert torch.equal(y, first[0]), programs
        assert torch.equal(dx, first[2][0]), programs


def test_output_tiles_are_written_once_each(hopper, monkeypatch):
    """Every element of y is written: y starts as NaN (torch.empty is replaced), and a tile
    skipped by the scheduler would leave NaN behind."""
    inputs = make_inputs(3, 7, 40, 104, 4, torch.float32)
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    y, s = hopper.forward(*inputs[:5], SCALING, num_programs=3)
    dx, _, _ = hopper.backward(inputs[5], *inputs[:4], s, SCALING, True, False, False,
                               num_programs=3)  # fmt: skip
    assert torch.isfinite(y).all() and torch.isfinite(s).all() and torch.isfinite(dx).all()


@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
def test_split_k_shrink_pass(hopper, shared):
    """S and dS computed in K slices (summed in a fixed order) are still right."""
    inputs = make_inputs(2, 9, 104, 72, 6, torch.float32, shared=shared)
    check_forward_and_backward(hopper, inputs, k_split=32)


def test_empty_shapes(hopper):
    x, weight, lora_a, lora_b, bias, dy = make_inputs(2, 3, 16, 8, 4, torch.float32)
    y, s = hopper.forward(x[:0], weight, lora_a[:0], lora_b, bias, SCALING)
    assert y.shape == (0, 3, 8) and s.shape == (0, 3, 4)
    dx, da, db = hopper.backward(dy[:0], x[:0], weight, lora_a[:0], lora_b, s, SCALING,
                                 True, True, True)  # fmt: skip
    assert dx.shape == (0, 3, 16) and not dx.any() and not da.any() and not db.any()
    y, s = hopper.forward(x, weight[:0], lora_a, lora_b[:0], None, SCALING)
    assert y.shape == (2, 3, 0)
    torch.testing.assert_close(s, SCALING * torch.bmm(x, lora_a), rtol=1e-5, atol=1e-6)


def test_argument_errors(hopper):
    x, weight, lora_a, lora_b, bias, dy = make_inputs(2, 5, 40, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="dropout"):
        hopper.forward(x, weight, lora_a, lora_b, bias, SCALING, dropout=(0.1, 0, 0))
    with pytest.raises(ValueError, match="x must be"):
        hopper.forward(x[0], weight, lora_a, lora_b, bias, SCALING)
    with pytest.raises(ValueError, match="weight must be"):
        hopper.forward(x, weight[:, :7], lora_a, lora_b, bias, SCALING)
    with pytest.raises(ValueError, match="lora_a must be"):
        hopper.forward(x, weight, lora_a[:1], lora_b, bias, SCALING)
    with pytest.raises(ValueError, match="lora_b must be"):
        hopper.forward(x, weight, lora_a, lora_b[:, :2], bias, SCALING)
    with pytest.raises(ValueError, match="num_programs"):
        hopper.forward(x, weight, lora_a, lora_b, bias, SCALING, num_programs=0)
    with pytest.raises(ValueError, match="k_split"):
        hopper.forward(x, weight, lora_a, lora_b, bias, SCALING, k_split=20)
    with pytest.raises(ValueError, match="dy must be"):
        hopper.backward(dy[:, :2], x, weight, lora_a, lora_b, x, SCALING, True, True, True)


def test_not_selected_off_sm90(hopper):
    """The Triton backend's hook takes this path only on CUDA sm_90 in 16-bit."""
    x, weight, *_ = make_inputs(2, 5, 40, 24, 4, torch.float16)
    if not ON_GPU:
        assert not hopper.supports(x, weight) and not hopper.supports_dx(x, x, weight)
    assert not hopper.supports(x.float(), weight.float())
    assert not hopper.supports(x, weight, dropout=(0.1, 0, 0))


def test_triton_backend_routes_through_the_hook(hopper, monkeypatch):
    """With :func:`hopper.supports` forced on, ``fused_cora_linear(backend="triton")``
    runs these kernels (forward and backward) and still matches fp64."""
    from llmrec_kernels import fused_cora_linear

    calls = []

    def spy(name):
        real = getattr(hopper, name)

        def run(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(hopper, "supports", lambda *a, **k: True)
    monkeypatch.setattr(hopper, "supports_dx", lambda *a, **k: True)
    monkeypatch.setattr(hopper, "forward", spy("forward"))
    monkeypatch.setattr(hopper, "backward", spy("backward"))
    x, weight, lora_a, lora_b, bias, dy = make_inputs(2, 20, 40, 72, 5, torch.float16)
    leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b)]
    y = fused_cora_linear(leaves[0], weight, leaves[1], leaves[2], bias, SCALING, backend="triton")
    grads = torch.autograd.grad(y, leaves, dy)
    assert calls == ["forward", "backward"]
    ref = _autograd(x, weight, lora_a, lora_b, bias, dy, lambda t: t)
    orc = _autograd(x, weight, lora_a, lora_b, bias, dy, lambda t: t.double())
    assert_close_to_oracle(y, ref[0], orc[0], "y")
    for name, g, g_ref, g_orc in zip(("dx", "dA", "dB"), grads, ref[2], orc[2]):
        assert_close_to_oracle(g, g_ref, g_orc, name)
