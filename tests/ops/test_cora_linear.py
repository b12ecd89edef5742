"""fused_cora_linear against an fp64 oracle, through the Triton (interpreter) and torch backends.

The oracle is :func:`cora_linear_factored` evaluated in float64 on the same (rounded) inputs;
it shares no code with the kernels. On a machine without a GPU the Triton backend runs in
Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec_kernels import fused_cora_linear
from llmrec_kernels.backends import resolve_backend
from llmrec_kernels.reference import cora_linear_factored, cora_linear_naive

# (B, L, d_in, d_out, r): odd sizes, tiles spanning several samples (L < tile), samples
# spanning several tiles (L > tile), decode, a rank that takes the precomputed-dS path (64)
# and the largest rank (128).
SHAPES = [
    (1, 1, 37, 53, 3),
    (3, 5, 37, 53, 3),
    (2, 40, 33, 47, 5),
    (4, 1, 64, 96, 16),
    (2, 3, 40, 70, 64),
    (1, 2, 20, 24, 128),
]


def _backends(dtype: torch.dtype) -> list[str]:
    # bf16 tl.dot is wrong in Triton's interpreter; bf16 runs on the torch path here and on
    # both paths in the GPU tests.
    on_gpu = torch.cuda.is_available()
    if dtype == torch.bfloat16 and not on_gpu:
        return ["torch"]
    return ["triton", "torch"]


def make_inputs(b, seq, d_in, d_out, rank, dtype, *, shared=False, bias=True, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rand(b, seq, d_in)
    weight = rand(d_out, d_in, scale=d_in**-0.5)
    lora_a = rand(d_in, rank, scale=d_in**-0.5) if shared else rand(b, d_in, rank, scale=d_in**-0.5)
    lora_b = rand(d_out, rank, scale=rank**-0.5)
    bias_t = rand(d_out) if bias else None
    grad_out = rand(b, seq, d_out)
    return x, weight, lora_a, lora_b, bias_t, grad_out


def _factored_autograd(x, weight, lora_a, lora_b, bias, scaling, grad_out, want_weight_grad, cast):
    leaves = [cast(t).detach().requires_grad_() if t is not None else None
              for t in (x, weight, lora_a, lora_b, bias)]  # fmt: skip
    y = cora_linear_factored(*leaves, scaling=scaling)
    wrt = [leaves[0], leaves[2], leaves[3]] + ([leaves[4]] if bias is not None else [])
    wrt += [leaves[1]] if want_weight_grad else []
    grads = torch.autograd.grad(y, wrt, cast(grad_out).to(y.dtype))
    return y.detach(), grads


def oracle(x, weight, lora_a, lora_b, bias, scaling, grad_out, want_weight_grad=False):
    """fp64 output and gradients (x, lora_a, lora_b, bias[, weight]) by autograd."""
    return _factored_autograd(x, weight, lora_a, lora_b, bias, scaling, grad_out,
                              want_weight_grad, lambda t: t.double())  # fmt: skip


def reference(x, weight, lora_a, lora_b, bias, scaling, grad_out, want_weight_grad=False):
    """The same as :func:`oracle` in the inputs' own dtypes: plain PyTorch, same precision."""
    return _factored_autograd(x, weight, lora_a, lora_b, bias, scaling, grad_out,
                              want_weight_grad, lambda t: t)  # fmt: skip


def reference_and_oracle(*args, **kwargs):
    """``(reference(...), oracle(...))``: what :func:`check_all` compares a result with."""
    return reference(*args, **kwargs), oracle(*args, **kwargs)


GRAD_NAMES = ("dx", "dA", "dB", "dbias", "dW")


def check_all(y, grads, ref, orc, dtype=None):
    """Output and gradients of the op against the same-precision reference and fp64 oracle."""
    assert_close_to_oracle(y, ref[0], orc[0], "y", dtype)
    assert len(grads) == len(orc[1])
    for name, g, g_ref, g_orc in zip(GRAD_NAMES, grads, ref[1], orc[1]):
        assert_close_to_oracle(g, g_ref, g_orc, name, dtype)


def run_op(x, weight, lora_a, lora_b, bias, scaling, grad_out, backend, weight_grad=False):
    x = x.detach().requires_grad_()
    lora_a = lora_a.detach().requires_grad_()
    lora_b = lora_b.detach().requires_grad_()
    weight = weight.detach().requires_grad_(weight_grad)
    leaves = [x, lora_a, lora_b]
    if bias is not None:
        bias = bias.detach().requires_grad_()
        leaves.append(bias)
    if weight_grad:
        leaves.append(weight)
    y = fused_cora_linear(x, weight, lora_a, lora_b, bias, scaling, backend=backend)
    grads = torch.autograd.grad(y, leaves, grad_out)
    return y, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_triton_forward_and_gradients_match_fp64(shape, dtype, shared, bias, device):
    inputs = make_inputs(*shape, dtype, shared=shared, bias=bias, device=device)
    grad_out = inputs[5]
    y, grads = run_op(*inputs[:5], 2.0, grad_out, backend="triton")
    assert y.dtype == dtype
    check_all(y, grads, *reference_and_oracle(*inputs[:5], 2.0, grad_out))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
def test_torch_backend_matches_fp64(shape, dtype, shared):
    inputs = make_inputs(*shape, dtype, shared=shared)
    y, grads = run_op(*inputs[:5], 0.5, inputs[5], backend="torch")
    check_all(y, grads, *reference_and_oracle(*inputs[:5], 0.5, inputs[5]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend, device):
    gen = torch.Generator().manual_seed(1)
    b, seq, d_in, d_out, rank = 3, 6, 24, 40, 4
    # Every operand a strided view: sliced, transposed or permuted storage.
    x = torch.randn(seq * 2, b, d_in + 5, generator=gen)[::2, :, 2 : 2 + d_in].transpose(0, 1)
    weight = (torch.randn(d_in, d_out, generator=gen) * d_in**-0.5).t()
    lora_a = torch.randn(rank, b, d_in, generator=gen).permute(1, 2, 0)
    lora_b = torch.randn(rank, d_out, generator=gen).t()
    bias = torch.randn(2 * d_out, generator=gen)[::2]
    grad_out = torch.randn(d_out, seq, b, generator=gen).permute(2, 1, 0)
    tensors = [t.to(device) for t in (x, weight, lora_a, lora_b, bias, grad_out)]
    assert not any(t.is_contiguous() for t in tensors)
    y, grads = run_op(*tensors[:5], 1.5, tensors[5], backend=backend, weight_grad=True)
    check_all(y, grads, *reference_and_oracle(*tensors[:5], 1.5, tensors[5], want_weight_grad=True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_expanded_grad_output(backend, device):
    """``y.sum().backward()`` hands the kernels a grad with all strides 0."""
    x, weight, lora_a, lora_b, bias, _ = make_inputs(2, 3, 16, 24, 4, torch.float32, device=device)
    x.requires_grad_()
    lora_a.requires_grad_()
    fused_cora_linear(x, weight, lora_a, lora_b, bias, 2.0, backend=backend).sum().backward()
    ones = torch.ones(2, 3, 24, device=device)
    (_, ref), (_, orc) = reference_and_oracle(x, weight, lora_a, lora_b, bias, 2.0, ones)
    assert_close_to_oracle(x.grad, ref[0], orc[0], "dx")
    assert_close_to_oracle(lora_a.grad, ref[1], orc[1], "dA")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_token_per_sample_2d_input(backend, device):
    x, weight, lora_a, lora_b, bias, _ = make_inputs(5, 1, 32, 48, 8, torch.float32, device=device)
    x2 = x[:, 0, :]
    y = fused_cora_linear(x2, weight, lora_a, lora_b, bias, 2.0, backend=backend)
    assert y.shape == (5, 48)
    y_ref = cora_linear_factored(x2, weight, lora_a, lora_b, bias, 2.0)
    y_orc = cora_linear_factored(x2.double(), weight.double(), lora_a.double(), lora_b.double(),
                                 bias.double(), 2.0)  # fmt: skip
    assert_close_to_oracle(y, y_ref, y_orc, "y")


def test_naive_reference_agrees_with_factored():
    inputs = make_inputs(3, 4, 12, 10, 3, torch.float64, shared=False)
    for a in (inputs[2], inputs[2][0]):
        y_naive = cora_linear_naive(inputs[0], inputs[1], a, inputs[3], inputs[4], 0.7)
        y_fact = cora_linear_factored(inputs[0], inputs[1], a, inputs[3], inputs[4], 0.7)
        # Both in fp64: the factored form is its own reference and oracle (error 0), so the
        # naive path must agree to the fp64 floor.
        assert_close_to_oracle(y_naive, y_fact, y_fact, "naive vs factored (fp64)")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_precision_lora_params(backend, device):
    """fp16 activations with fp32 LoRA factors: compute in fp16, gradients in each dtype."""
    x, weight, lora_a, lora_b, bias, grad_out = make_inputs(2, 3, 32, 40, 4, torch.float16,
                                                            device=device)  # fmt: skip
    lora_a32 = lora_a.float().requires_grad_()
    lora_b32 = lora_b.float().requires_grad_()
    y = fused_cora_linear(x, weight, lora_a32, lora_b32, bias, 2.0, backend=backend)
    da, db = torch.autograd.grad(y, [lora_a32, lora_b32], grad_out)
    assert y.dtype == torch.float16 and da.dtype == torch.float32 and db.dtype == torch.float32
    (y_ref, ref), (y_orc, orc) = reference_and_oracle(x, weight, lora_a, lora_b, bias, 2.0,
                                                      grad_out)  # fmt: skip
    assert_close_to_oracle(y, y_ref, y_orc, "y")
    assert_close_to_oracle(da, ref[1], orc[1], "dA", dtype=torch.float16)
    assert_close_to_oracle(db, ref[2], orc[2], "dB", dtype=torch.float16)


def test_row_reductions_split_over_programs(monkeypatch, device):
    """dA and dB summed from several row chunks equal the single-chunk result."""
    from llmrec_kernels.triton import cora_linear as triton_impl

    inputs = make_inputs(2, 70, 16, 24, 4, torch.float32, device=device)
    (_, ref), (_, orc) = reference_and_oracle(*inputs[:5], 2.0, inputs[5])
    monkeypatch.setattr(triton_impl, "_target_programs", lambda device: 64)
    _, grads = run_op(*inputs[:5], 2.0, inputs[5], backend="triton")
    assert_close_to_oracle(grads[1], ref[1], orc[1], "dA")
    assert_close_to_oracle(grads[2], ref[2], orc[2], "dB")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_is_deterministic(backend, device):
    inputs = make_inputs(3, 9, 24, 40, 5, torch.float32, device=device)
    _, first = run_op(*inputs[:5], 2.0, inputs[5], backend=backend)
    _, second = run_op(*inputs[:5], 2.0, inputs[5], backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("where", ["x", "lora_a", "lora_b", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_propagate_like_reference(backend, where, value, device):
    x, weight, lora_a, lora_b, bias, _ = make_inputs(3, 4, 20, 24, 4, torch.float32, device=device)
    target = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "weight": weight}[where]
    target.view(-1)[7] = value
    y = fused_cora_linear(x, weight, lora_a, lora_b, bias, 2.0, backend=backend)
    y_ref = cora_linear_factored(x, weight, lora_a, lora_b, bias, 2.0)
    y_orc = cora_linear_factored(*(t.double() for t in (x, weight, lora_a, lora_b, bias)), 2.0)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))
    assert torch.equal(torch.sign(y[torch.isinf(y)]), torch.sign(y_ref[torch.isinf(y_ref)]))
    assert torch.isnan(y).any() or torch.isinf(y).any()
    finite = torch.isfinite(y_ref)
    assert_close_to_oracle(y[finite], y_ref[finite], y_orc[finite], "finite entries of y")


def test_shared_a_matches_peft_lora_linear():
    """peft's LoRA Linear as an independent oracle for the shared-A (plain LoRA) case."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    d_in, d_out, rank, alpha = 48, 40, 8, 16

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(
        Tiny(),
        peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]),
    )
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft initialises B to zero
    x = torch.randn(3, 7, d_in)
    expected = model(x)
    y = fused_cora_linear(
        x,
        layer.base_layer.weight,
        layer.lora_A["default"].weight.t(),
        layer.lora_B["default"].weight,
        layer.base_layer.bias,
        scaling=layer.scaling["default"],
    )
    assert layer.scaling["default"] == alpha / rank
    # peft's module in fp32 is the same-precision reference; the same module in fp64 the oracle.
    model64 = copy.deepcopy(model).double()
    layer64 = model64.base_model.model.proj
    expected64 = model64(x.double())
    assert_close_to_oracle(y, expected, expected64, "y")
    # And the gradients of the LoRA factors.
    g = torch.randn_like(y)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    ga_ref, gb_ref = torch.autograd.grad(expected, [a, b], g)
    ga, gb = torch.autograd.grad(y, [a, b], g)
    ab64 = [layer64.lora_A["default"].weight, layer64.lora_B["default"].weight]
    ga_orc, gb_orc = torch.autograd.grad(expected64, ab64, g.double())
    assert_close_to_oracle(ga, ga_ref, ga_orc, "dA")
    assert_close_to_oracle(gb, gb_ref, gb_orc, "dB")


# ----------------------------------------------------------------------------- bad input


def _good():
    return make_inputs(2, 3, 8, 6, 2, torch.float32)[:5]


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.__setitem__(0, a[0][None]), ValueError, r"x must be \(B, L, d_in\)"),
        (lambda a: a.__setitem__(1, torch.randn(6, 9)), ValueError, r"weight must be \(d_out, d_in\)"),
        (lambda a: a.__setitem__(2, torch.randn(3, 8, 2)), ValueError, r"lora_a must be \(B, d_in, r\)"),
        (lambda a: a.__setitem__(2, torch.randn(7, 2)), ValueError, r"lora_a must be \(d_in, r\)"),
        (lambda a: a.__setitem__(2, torch.randn(2, 8, 2, 1)), ValueError, r"lora_a must be"),
        (lambda a: a.__setitem__(2, torch.randn(2, 8, 0)), ValueError, r"rank r"),
        (lambda a: a.__setitem__(3, torch.randn(6, 3)), ValueError, r"lora_b must be \(d_out, r\) = \(6, 2\)"),
        (lambda a: a.__setitem__(3, torch.randn(5, 2)), ValueError, r"lora_b must be"),
        (lambda a: a.__setitem__(4, torch.randn(7)), ValueError, r"bias must be \(d_out,\) = \(6,\)"),
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, r"x must be a floating-point"),
        (lambda a: a.__setitem__(3, a[3].to(torch.int64)), TypeError, r"lora_b must be a floating-point"),
        (lambda a: a.__setitem__(1, a[1].half()), TypeError, r"weight must have the dtype of x"),
        (lambda a: a.__setitem__(0, [[1.0]]), TypeError, r"x must be a torch.Tensor"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), ValueError, r"one device"),
    ],
    ids=["x_4d", "weight_d_in", "lora_a_batch", "lora_a_shared_d_in", "lora_a_4d", "rank_0",
         "lora_b_rank", "lora_b_d_out", "bias", "x_int", "lora_b_int", "weight_dtype",
         "x_list", "device"],
)  # fmt: skip
def test_bad_input_raises_clear_error(mutate, exc, match):
    args = list(_good())
    mutate(args)
    with pytest.raises(exc, match=match):
        fused_cora_linear(*args, scaling=2.0)


def test_bad_scaling_and_backend():
    args = _good()
    with pytest.raises(TypeError, match="scaling"):
        fused_cora_linear(*args, scaling=torch.tensor(2.0))
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_cora_linear(*args, backend="cutlass")


# ----------------------------------------------------------------------------- dispatch


def test_backend_policy(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LLMREC_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu, torch.float32, 16) == "triton"
    assert resolve_backend("auto", cpu, torch.float64, 16) == "torch"
    assert resolve_backend("auto", cpu, torch.float32, 129) == "torch"
    monkeypatch.setenv("LLMREC_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", cpu, torch.float32, 16) == "torch"
    assert resolve_backend("triton", cpu, torch.float32, 16) == "triton"  # explicit arg wins
    monkeypatch.setenv("LLMREC_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LLMREC_KERNELS_BACKEND"):
        resolve_backend("auto", cpu, torch.float32, 16)
    monkeypatch.delenv("LLMREC_KERNELS_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu, torch.float32, 16) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu, torch.float32, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("cuda", cpu, torch.float16, 16)
    # On a GPU auto takes cuBLAS (measured faster on an H200); Triton only when asked.
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 16) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 256) == "torch"
    monkeypatch.setenv("LLMREC_KERNELS_BACKEND", "triton")
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, 16) == "triton"


def test_env_variable_selects_backend(monkeypatch):
    """Both backends agree, and the environment variable really switches between them."""
    from llmrec_kernels import _torch_impl

    calls = []
    original = _torch_impl.forward
    monkeypatch.setattr(_torch_impl, "forward", lambda *a: calls.append(1) or original(*a))
    args = _good()
    monkeypatch.setenv("LLMREC_KERNELS_BACKEND", "torch")
    y_torch = fused_cora_linear(*args, scaling=2.0)
    assert calls == [1]
    if os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setenv("LLMREC_KERNELS_BACKEND", "triton")
        y_triton = fused_cora_linear(*args, scaling=2.0)
        assert calls == [1]
        y_orc = cora_linear_factored(*(t.double() for t in args), scaling=2.0)
        assert_close_to_oracle(y_triton, y_torch, y_orc, "triton vs torch backend")


def test_import_does_not_initialise_cuda_or_import_triton():
    code = (
        "import sys, torch, llmrec_kernels\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "assert 'triton' not in sys.modules, 'triton imported at import'\n"
        "assert 'llmrec_kernels._C' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
def test_opcheck(backend, shared, device):
    x, weight, lora_a, lora_b, bias, grad_out = make_inputs(2, 3, 16, 24, 4, torch.float32,
                                                            shared=shared, device=device)  # fmt: skip
    x.requires_grad_()
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    bias.requires_grad_()
    torch.library.opcheck(
        torch.ops.llmrec_kernels.cora_linear_fwd.default,
        (x, weight, lora_a, lora_b, bias, 2.0, backend),
    )
    s = torch.randn(2, 3, 4, device=device)
    torch.library.opcheck(
        torch.ops.llmrec_kernels.cora_linear_bwd.default,
        (grad_out, x.detach(), weight, lora_a.detach(), lora_b.detach(), s, 2.0, backend,
         True, True, False),
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    inputs = make_inputs(2, 5, 16, 24, 4, torch.float32, device=device)
    x, weight, lora_a, lora_b, bias, grad_out = inputs

    def layer(x, lora_a, lora_b):
        return torch.relu(fused_cora_linear(x, weight, lora_a, lora_b, bias, 2.0, backend=backend))

    compiled = torch.compile(layer, fullgraph=True)
    leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b)]
    y = compiled(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_out)
    leaves_ref = [t.detach().requires_grad_() for t in (x, lora_a, lora_b)]
    y_ref = layer(*leaves_ref)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, grad_out)
    leaves_orc = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    w64, b64 = weight.double(), bias.double()
    y_orc = torch.relu(cora_linear_factored(leaves_orc[0], w64, *leaves_orc[1:], b64, 2.0))
    grads_orc = torch.autograd.grad(y_orc, leaves_orc, grad_out.double())
    # The compiled op against the eager op (the same-precision reference) and fp64.
    assert_close_to_oracle(y, y_ref, y_orc, "y")
    for name, g, g_ref, g_orc in zip(("dx", "dA", "dB"), grads, grads_ref, grads_orc):
        assert_close_to_oracle(g, g_ref, g_orc, name)


def test_self_check_main_job_runs():
    out = subprocess.run(
        [sys.executable, "-m", "llmrec_kernels", "--batch", "2", "--seq", "4", "--d-in", "32",
         "--d-out", "24", "--rank", "4", "--repeats", "1"],
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "naive (dense per sample)" in out.stdout and out.stdout.strip().endswith("OK")


def test_float64_torch_backend_is_exact_to_fp64():
    """fp64 inputs keep the shrink in fp64 (no fp32 rounding of x A)."""
    inputs = make_inputs(2, 3, 16, 12, 4, torch.float64)
    y, grads = run_op(*inputs[:5], 2.0, inputs[5], backend="torch")
    check_all(y, grads, *reference_and_oracle(*inputs[:5], 2.0, inputs[5]))


def _random_strided(gen, shape, device, scale=1.0):
    """A tensor of ``shape`` laid out through a random permutation and random step slicing."""
    ndim = len(shape)
    perm = torch.randperm(ndim, generator=gen).tolist()
    steps = [int(torch.randint(1, 3, (1,), generator=gen)) for _ in range(ndim)]
    storage_shape = [shape[p] * steps[i] for i, p in enumerate(perm)]
    base = torch.randn(storage_shape, generator=gen) * scale
    view = base[tuple(slice(None, None, st) for st in steps)]
    inverse = [perm.index(d) for d in range(ndim)]
    return view.permute(inverse).to(device)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_random_shapes_and_strides_match_fp64(seed, backend, device):
    gen = torch.Generator().manual_seed(1000 + seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    b, seq, d_in, d_out, rank = draw(1, 4), draw(1, 40), draw(1, 70), draw(1, 70), draw(1, 40)
    shared = bool(draw(0, 1))
    x = _random_strided(gen, (b, seq, d_in), device)
    weight = _random_strided(gen, (d_out, d_in), device, scale=d_in**-0.5)
    lora_a = _random_strided(gen, (d_in, rank) if shared else (b, d_in, rank), device)
    lora_b = _random_strided(gen, (d_out, rank), device)
    bias = _random_strided(gen, (d_out,), device) if draw(0, 1) else None
    grad_out = _random_strided(gen, (b, seq, d_out), device)
    y, grads = run_op(x, weight, lora_a, lora_b, bias, 0.75, grad_out, backend=backend)
    check_all(y, grads, *reference_and_oracle(x, weight, lora_a, lora_b, bias, 0.75, grad_out))


# ----------------------------------------------------------------------------- grad subsets

_GRAD_INPUTS = ("x", "weight", "lora_a", "lora_b", "bias")
_SUBSETS = [
    tuple(name for bit, name in enumerate(_GRAD_INPUTS) if mask >> bit & 1)
    for mask in range(1, 2 ** len(_GRAD_INPUTS))
]


@pytest.mark.parametrize("wanted", _SUBSETS, ids=lambda w: "+".join(w))
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample_a", "shared_a"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_every_subset_of_inputs_requiring_grad(wanted, shared, backend, device):
    """Any subset of inputs may require grad (e.g. training B against a fixed A); the others
    get none, and the ones asked for match fp64. 2-D ``x`` (one token) for the shared layout."""
    inputs = make_inputs(3, 2, 20, 12, 5, torch.float32, shared=shared, device=device, seed=4)
    x, weight, lora_a, lora_b, bias, grad_out = inputs
    if shared:  # one token per sample, as a decode step calls it
        x, grad_out = x[:, 0], grad_out[:, 0]
    tensors = dict(zip(_GRAD_INPUTS, (x, weight, lora_a, lora_b, bias)))
    leaves = {n: t.detach().clone().requires_grad_(n in wanted) for n, t in tensors.items()}
    y = fused_cora_linear(*leaves.values(), scaling=1.5, backend=backend)
    grads = torch.autograd.grad(y, [leaves[n] for n in wanted], grad_out)

    def autograd_at(cast):
        ref_leaves = {n: cast(t).detach().requires_grad_(n in wanted) for n, t in tensors.items()}
        out = cora_linear_factored(*ref_leaves.values(), scaling=1.5)
        return out, torch.autograd.grad(out, [ref_leaves[n] for n in wanted], cast(grad_out))

    y_ref, grads_ref = autograd_at(lambda t: t)
    y_orc, grads_orc = autograd_at(lambda t: t.double())
    assert_close_to_oracle(y, y_ref, y_orc, "y")
    for name, g, g_ref, g_orc in zip(wanted, grads, grads_ref, grads_orc):
        assert g.shape == tensors[name].shape and g.dtype == tensors[name].dtype
        assert_close_to_oracle(g, g_ref, g_orc, f"d{name}")
    for name, leaf in leaves.items():
        assert leaf.grad is None, f"{name}: .grad was written by torch.autograd.grad"


@pytest.mark.parametrize(
    ("wanted", "dropout_p"),
    [(w, 0.0) for w in _SUBSETS] + [(_GRAD_INPUTS, 0.3), (("lora_b",), 0.3)],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else f"p{v}",
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_eager_autograd_is_the_custom_op_bit_for_bit(wanted, dropout_p, backend, device):
    """An eager call that needs a gradient skips the custom-op dispatcher (host cost) through
    an ``autograd.Function`` over the same backend functions; its output and every gradient
    must be the registered op's, bit for bit, for any subset of inputs requiring grad."""
    import llmrec_kernels.cora_linear as cl

    inputs = make_inputs(2, 3, 20, 12, 5, torch.float32, device=device, seed=7)
    x, weight, lora_a, lora_b, bias, grad_out = inputs
    drop = (dropout_p, torch.tensor(11), 5) if dropout_p else ()
    results = []
    for path in ("eager", "op"):
        leaves = [
            t.detach().clone().requires_grad_(n in wanted)
            for n, t in zip(_GRAD_INPUTS, (x, weight, lora_a, lora_b, bias))
        ]
        if path == "eager":
            kwargs = {"dropout_p": dropout_p, "dropout_seed": 11, "dropout_offset": 5}
            y = fused_cora_linear(*leaves, scaling=1.5, backend=backend, **kwargs)
            assert type(y.grad_fn).__name__ == "_CoraLinearEagerBackward"
        else:
            y = cl._cora_linear_forward(*leaves, 1.5, backend, *drop)[0]
            assert type(y.grad_fn).__name__ != "_CoraLinearEagerBackward"
        grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], grad_out)
        results.append((y, grads))
    (y_eager, g_eager), (y_op, g_op) = results
    assert torch.equal(y_eager, y_op)
    for name, a, b in zip(wanted, g_eager, g_op):
        assert torch.equal(a, b), f"d{name} differs between the eager path and the op"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_double_backward_on_either_path(backend, device):
    """Neither the op nor the eager autograd.Function defines a second derivative (the Triton
    kernels are not differentiable): both refuse it instead of returning a silent wrong one."""
    import llmrec_kernels.cora_linear as cl

    x, weight, lora_a, lora_b, bias, _ = make_inputs(2, 3, 20, 12, 5, torch.float32, device=device)
    a, b = lora_a.requires_grad_(), lora_b.requires_grad_()
    for y in (
        fused_cora_linear(x, weight, a, b, bias, 1.5, backend),
        cl._cora_linear_forward(x, weight, a, b, bias, 1.5, backend)[0],
    ):
        (ga,) = torch.autograd.grad(y.sum(), (a,), create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(ga.sum(), (b,))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_casts_like_linear(backend, grad, device):
    """Under ``torch.autocast`` the op (single and multi) behaves as ``F.linear`` does: x, W
    and the bias computed in the autocast dtype, A and B as given, gradients back to the fp32
    leaves in fp32; bit for bit the op called on the cast inputs outside autocast. Before,
    autocast reached the backend's own matmuls and the call failed on mixed dtypes."""
    from llmrec_kernels.cora_linear import fused_cora_linear_multi

    # the interpreter's bf16 tl.dot is wrong (README): fp16 on the Triton path
    low = torch.float16 if backend == "triton" else torch.bfloat16
    x, weight, lora_a, lora_b, bias, grad_out = make_inputs(
        2, 3, 20, 12, 5, torch.float32, device=device, seed=9
    )
    leaves = [t.detach().clone().requires_grad_(grad) for t in (x, lora_a, lora_b)]
    with torch.set_grad_enabled(grad):
        with torch.autocast(device.type, dtype=low):
            y = fused_cora_linear(leaves[0], weight, leaves[1], leaves[2], bias, 1.5, backend)
            multi = fused_cora_linear_multi(
                leaves[0], [weight, weight], leaves[1], [leaves[2], leaves[2]], [bias, bias],
                1.5, backend,
            )  # fmt: skip
        want_leaves = [t.detach().clone().requires_grad_(grad) for t in (x, lora_a, lora_b)]
        want = fused_cora_linear(
            want_leaves[0].to(low), weight.to(low), want_leaves[1], want_leaves[2],
            bias.to(low), 1.5, backend,
        )  # fmt: skip
    assert y.dtype == low and all(m.dtype == low for m in multi)
    assert torch.equal(y, want)
    assert torch.equal(multi[0], multi[1])
    if grad:
        got = torch.autograd.grad(y, leaves, grad_out.to(low))
        expected = torch.autograd.grad(want, want_leaves, grad_out.to(low))
        for g, e, leaf in zip(got, expected, leaves):
            assert g.dtype == leaf.dtype == torch.float32
            assert torch.equal(g, e)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_zero_output_features(backend, device):
    """``d_out = 0`` (an empty projection) gives an empty output and zero-free gradients."""
    x, weight, lora_a, lora_b, _, _ = make_inputs(2, 3, 8, 0, 2, torch.float32, device=device)
    x.requires_grad_()
    lora_a.requires_grad_()
    y = fused_cora_linear(x, weight, lora_a, lora_b, None, 2.0, backend=backend)
    assert y.shape == (2, 3, 0)
    dx, da = torch.autograd.grad(y, [x, lora_a], torch.empty_like(y))
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(da, torch.zeros_like(lora_a))
