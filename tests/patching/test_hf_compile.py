"""A CoRA-patched LLaMA under ``torch.compile``: one graph, the fused operands kept valid.

The oracle of every numeric check is the same patched model run eagerly in float64 (the
patched forward's eager correctness is tested in ``test_hf_patching.py`` against HF's own
unpatched model with dense per-sample weights); the same-precision reference is the eager
fp32 model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_hf_patching import RANK, TINY, make_model, patch_random
from tolerance import assert_close_to_oracle

import llmrec_kernels.cora_linear as cora_linear_mod
import llmrec_kernels.hf as hf
import llmrec_kernels.qkv_fusion as qkv_fusion
from llmrec_kernels.hf import apply_cora_to_llama, cora_weights, lora_b_parameters

transformers = pytest.importorskip("transformers")


def patched_model(fuse_qkv: bool = True, backend: str = "torch", seed: int = 0):
    model = make_model("llama", "sdpa", seed)
    patch_random(model, seed + 1, fuse_qkv=fuse_qkv, backend=backend)
    return model


def inputs(batch: int = 2, length: int = 5, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    a = torch.randn(batch, 64, RANK, generator=g) * 0.3
    return ids, a


def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def graph_breaks(model, ids, a, grad: bool) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad), cora_weights(model, a):
        explained = torch._dynamo.explain(lambda i: logits(model, i))(ids)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == len(reasons)
    return explained.graph_break_count, reasons


@pytest.mark.parametrize("fuse", [True, False], ids=["fused_qkv", "unfused"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_patched_llama_has_no_graph_breaks(fuse, grad):
    model = patched_model(fuse_qkv=fuse)
    ids, a = inputs()
    if grad:
        a.requires_grad_(True)
    count, reasons = graph_breaks(model, ids, a, grad)
    assert count == 0, reasons


def _oracle(model, ids, a, target):
    """fp64 eager logits and gradients (of A and every lora_B) of the patched model."""
    m64 = copy.deepcopy(model).double()
    a64 = a.detach().double().requires_grad_(True)
    with cora_weights(m64, a64):
        out = logits(m64, ids)
        grads = torch.autograd.grad(
            (out * target.double()).sum(), [a64, *lora_b_parameters(m64).values()]
        )
    return out.detach(), grads


def _run(fn, model, ids, a, target):
    a = a.detach().clone().requires_grad_(True)
    with cora_weights(model, a):
        out = fn(ids)
        grads = torch.autograd.grad((out * target).sum(), [a, *lora_b_parameters(model).values()])
    return out.detach(), grads


@pytest.mark.parametrize("fuse", [True, False], ids=["fused_qkv", "unfused"])
def test_fullgraph_compile_matches_eager_forward_and_gradients(fuse):
    model = patched_model(fuse_qkv=fuse)
    ids, a = inputs()
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    compiled = torch.compile(lambda i: logits(model, i), fullgraph=True, backend="aot_eager")
    out_c, grads_c = _run(compiled, model, ids, a, target)
    out_e, grads_e = _run(lambda i: logits(model, i), model, ids, a, target)
    out_o, grads_o = _oracle(model, ids, a, target)
    assert_close_to_oracle(out_c, out_e, out_o, "compiled logits")
    for i, (gc, ge, go) in enumerate(zip(grads_c, grads_e, grads_o)):
        assert_close_to_oracle(gc, ge, go, f"compiled gradient {i}")


def test_compiled_forward_sees_trained_lora_b_without_recompiling():
    """An optimizer step updates the lora_B views in place: the fused buffer follows."""
    model = patched_model()
    ids, a = inputs()
    params = list(lora_b_parameters(model).values())
    attn = model.model.layers[0].self_attn
    group = attn.q_proj._group
    # q/k/v lora_B are views into one buffer that the fused call uses as its operand.
    assert group._b_fused is not None
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert m.lora_B.weight.untyped_storage().data_ptr() == (
            group._b_fused.untyped_storage().data_ptr()
        )
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(lambda i: logits(model, i), fullgraph=True, backend=counter)
    opt = torch.optim.SGD(params, lr=0.5)
    for step in range(3):
        with cora_weights(model, a):
            out = compiled(ids)
            loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad(), cora_weights(model, a):
            want = logits(model, ids)
            got = compiled(ids)
        # Same model, same parameters, eager against compiled: the graph reads the trained B.
        m64 = copy.deepcopy(model).double()
        with torch.no_grad(), cora_weights(m64, a.double()):
            oracle = logits(m64, ids)
        assert_close_to_oracle(got, want, oracle, f"step {step}")
        if step == 0:
            compiled_frames = counter.frame_count  # one graph per grad mode
    assert counter.frame_count == compiled_frames == 2


def test_fused_call_concatenates_nothing(monkeypatch):
    """The fused q/k/v call gets the buffers themselves as operands (no per-call torch.cat)."""
    model = patched_model()
    ids, a = inputs()
    seen = []
    real = cora_linear_mod.fused_cora_linear_multi

    def spy(x, weights, lora_a, lora_bs, *args, fused_weight=None, fused_lora_b=None, **kw):
        seen.append((weights, lora_bs, fused_weight, fused_lora_b))
        return real(
            x, weights, lora_a, lora_bs, *args,
            fused_weight=fused_weight, fused_lora_b=fused_lora_b, **kw,
        )  # fmt: skip

    monkeypatch.setattr(qkv_fusion, "fused_cora_linear_multi", spy)
    cat_shapes = []
    real_cat = torch.cat

    def cat_spy(*args, **kwargs):
        out = real_cat(*args, **kwargs)
        cat_shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "cat", cat_spy)
    with torch.no_grad(), cora_weights(model, a):
        logits(model, ids)
    assert len(seen) == TINY["num_hidden_layers"]
    fused_rows = 64 + 32 + 32  # q + k + v output features (GQA: 2 of 4 heads for k and v)
    # (the rotary embedding of the attention code concatenates too: other shapes)
    assert not [shape for shape in cat_shapes if shape[0] == fused_rows], cat_shapes
    for weights, lora_bs, fw, fb in seen:
        assert fw is not None and fb is not None
        assert weights[0].data_ptr() == fw.data_ptr() and lora_bs[0].data_ptr() == fb.data_ptr()


def test_layout_change_marks_groups_stale_and_compiled_forward_stays_correct():
    model = patched_model()
    ids, a = inputs()
    a64 = a.double()
    group = model.model.layers[0].self_attn.q_proj._group
    model.double()  # every parameter gets its own storage: the fused buffers are stale
    assert group.stale
    torch._dynamo.reset()
    compiled = torch.compile(lambda i: logits(model, i), fullgraph=True, backend="aot_eager")
    with torch.no_grad(), cora_weights(model, a64):
        assert not group.stale  # re-fused eagerly when the block was entered
        got = compiled(ids)
        want = logits(copy.deepcopy(model), ids)
        torch.testing.assert_close(got, want)  # fp64: rounding apart at most
        # A layout change inside the block: the compiled graph cannot check pointers,
        # but _apply marked the group stale and the call uses copies (recompiled).
        model.float().double()
        assert group.stale
        got = compiled(ids)
        want = logits(copy.deepcopy(model), ids)
        torch.testing.assert_close(got, want)  # fp64: rounding apart at most


def test_fused_qkv_training_step_uses_no_more_memory_than_unfused():
    """bf16 decoder forward + backward: fused q/k/v peak <= unfused peak (CPU allocator)."""
    from benchmarks.timing import peak_memory_mb

    peaks = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
            attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.LlamaModel(config).to(torch.bfloat16)
        apply_cora_to_llama(model, rank=8, alpha=16, fuse_qkv=fuse, backend="torch")
        x = torch.randn(4, 32, 256, dtype=torch.bfloat16).requires_grad_(True)
        a = torch.randn(4, 256, 8).requires_grad_(True)
        dy = torch.randn(4, 32, 256, dtype=torch.bfloat16)
        bs = list(lora_b_parameters(model).values())

        def step(model=model, x=x, a=a, dy=dy, bs=bs):
            with cora_weights(model, a):
                y = model(inputs_embeds=x, use_cache=False).last_hidden_state
                return torch.autograd.grad(y, (x, a, *bs), dy)

        step()
        peaks[fuse] = peak_memory_mb(step, torch.device("cpu"))
    assert peaks[True] <= peaks[False] + 1e-6, peaks


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_with_static_lora_a(dtype, backend):
    """mode="reduce-overhead" (CUDA graphs) with A copied into one static buffer per batch."""
    model = patched_model(backend=backend).to("cuda", dtype)
    eager = copy.deepcopy(model)
    batch = 3
    a_buf = hf.static_lora_a(model, batch, device="cuda")
    ref64 = copy.deepcopy(model).double()
    getattr(ref64, hf._STATE_ATTR).backend = "torch"  # fp64: no Triton kernel takes it
    torch._dynamo.reset()
    step = torch.compile(lambda i: logits(model, i), mode="reduce-overhead", fullgraph=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad(), cora_weights(model, a_buf):
        for _ in range(4):  # warm-up, capture, then replays with new A and new tokens
            ids = torch.randint(0, 100, (batch, 1), generator=g).cuda()
            a_new = (torch.randn(batch, 64, RANK, generator=g) * 0.3).cuda()
            a_buf.copy_(a_new)
            got = step(ids).clone()
            with cora_weights(eager, a_new):
                want = logits(eager, ids)
            with cora_weights(ref64, a_new.double()):
                oracle = logits(ref64, ids)
            assert_close_to_oracle(got, want, oracle, "CUDA-graph decode logits")


@pytest.mark.parametrize(
    "fuse, compiler",
    [(True, "aot_eager"), (False, "aot_eager"), (False, "inductor")],
    ids=["fused_qkv", "unfused", "unfused-inductor"],
)
def test_dropout_under_compile_draws_the_eager_masks(fuse, compiler):
    """LoRA dropout in training mode: each projection's seed is drawn by an op of the graph
    from the CPU generator, the same draws in the same order as eager code, so the compiled
    forward and gradients are the eager ones, and the graph has no break."""
    model = make_model("llama", "sdpa", 0)
    patch_random(model, 1, fuse_qkv=fuse, lora_dropout=0.3)
    model.train()
    ids, a = inputs()
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    compiled = torch.compile(lambda i: logits(model, i), backend=compiler)
    torch.manual_seed(7)
    out_c, grads_c = _run(compiled, model, ids, a, target)
    torch.manual_seed(7)
    out_e, grads_e = _run(lambda i: logits(model, i), model, ids, a, target)
    torch.manual_seed(7)
    out_o, grads_o = _oracle(model, ids, a, target)
    assert_close_to_oracle(out_c, out_e, out_o, "compiled logits with dropout")
    for i, (gc, ge, go) in enumerate(zip(grads_c, grads_e, grads_o)):
        assert_close_to_oracle(gc, ge, go, f"compiled gradient {i} with dropout")
    # the masks are real: another seed gives other logits
    torch.manual_seed(8)
    other, _ = _run(compiled, model, ids, a, target)
    assert (other - out_c).abs().max() > 1e-3
    # no graph break, in training mode with dropout as in eval mode
    assert graph_breaks(model, ids, a.detach().requires_grad_(True), grad=True)[0] == 0
    model.eval()
    assert graph_breaks(model, ids, a.detach().requires_grad_(True), grad=True)[0] == 0


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_plain_lora_dropout_under_compile_draws_the_eager_masks(compiler):
    """The same for TALLRec's / CoLLM's LoRA layers (llmrec_kernels.lora): compiled training
    forward and LoRA gradients equal the eager ones, with no graph break. Inductor too: q and
    v draw on the same input, and its scheduler must neither merge nor reorder the draws."""
    from llmrec_kernels.lora import apply_lora

    model = make_model("llama", "sdpa", 0)
    layers = apply_lora(model, rank=4, alpha=8, dropout=0.3, backend="torch", seed=1)
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.weight.normal_(0, 0.5)
    model.train()
    ids, _ = inputs()
    params = [p for m in layers.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(4))

    def run(fn, m):
        out = fn(ids)
        return out.detach(), torch.autograd.grad((out * target).sum(), params)

    torch._dynamo.reset()
    compiled = torch.compile(lambda i: logits(model, i), backend=compiler)
    torch.manual_seed(7)
    out_c, grads_c = run(compiled, model)
    torch.manual_seed(7)
    out_e, grads_e = run(lambda i: logits(model, i), model)
    m64 = copy.deepcopy(model).double()
    params64 = [p for n, p in m64.named_parameters() if "lora_" in n]
    torch.manual_seed(7)
    out64 = logits(m64, ids)
    grads64 = torch.autograd.grad((out64 * target.double()).sum(), params64)
    assert_close_to_oracle(out_c, out_e, out64.detach(), "compiled LoRA logits with dropout")
    for i, (gc, ge, go) in enumerate(zip(grads_c, grads_e, grads64)):
        assert_close_to_oracle(gc, ge, go, f"compiled LoRA gradient {i} with dropout")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda i: logits(model, i))(ids)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_a_compiled_patched_model_is_not_recompiled_on_its_second_call():
    """The first call of a freshly imported backend inside a compiled region used to leave a
    guard on the backends' cache; the second call then recompiled every compiled frame."""
    import llmrec_kernels.backends as backends

    model = patched_model()
    model.eval()
    ids, a = inputs()
    torch._dynamo.reset()
    backends._LOADED.clear()  # as in a fresh process: no backend imported yet
    compiled = torch.compile(lambda i: logits(model, i))
    with torch.no_grad(), cora_weights(model, a):
        first = compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = compiled(ids)
    assert torch.equal(first, second)
