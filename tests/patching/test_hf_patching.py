"""CoRA patching of Hugging Face attention (``llmrec_kernels.hf``) against HF's own modules.

The oracle for a patched forward is the *unpatched* model run one sample at a time through
``torch.func.functional_call`` with every target weight replaced by the dense
``W + (alpha / rank) B_m A_b^T``. Tests that name no backend run the default path (Triton
through its interpreter when there is no GPU); the others pin ``backend="torch"``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tolerance import assert_close_to_oracle
from torch.func import functional_call

import llmrec_kernels.hf as hf
import llmrec_kernels.qkv_fusion as qkv_fusion
from llmrec_kernels.hf import (
    CoRALinear,
    apply_cora_to_llama,
    cora_modules,
    cora_weights,
    lora_b_parameters,
    parameter_bytes,
    remove_cora,
)

transformers = pytest.importorskip("transformers")

RANK, ALPHA = 4, 8
SCALING = ALPHA / RANK
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=100,
    max_position_embeddings=128,
)


def make_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(**{**TINY, **overrides}, attn_implementation=attn)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**{**TINY, **overrides}, attn_implementation=attn)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "mistral":
        config = transformers.MistralConfig(**{**TINY, **overrides}, attn_implementation=attn)
        model = transformers.MistralForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.eval()


def patch_random(model, seed: int = 1, **kwargs):
    """Patch with CoRA and give every lora_B random non-zero values; returns {path: B}."""
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_b_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return {path: m.lora_B.weight.detach().clone() for path, m in cora_modules(model).items()}


def random_a(batch: int, seed: int = 2, d: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d, RANK, generator=g) * 0.3


def oracle_logits(ref, bs, a_b, input_ids, **kw):
    """Unpatched HF model, one sample, with every target weight made dense: W + s B A_b^T."""
    params = {}
    for path, b in bs.items():
        w = ref.get_submodule(path).weight
        params[f"{path}.weight"] = w + SCALING * (b @ a_b.T)
    return functional_call(ref, params, args=(), kwargs=dict(input_ids=input_ids, **kw)).logits


class DenseOracle:
    """:func:`oracle_logits` in the unpatched model's own precision and in float64.

    Returns ``(same_precision, fp64)`` logits: the reference and the oracle of the tolerance
    rule (``tests/tolerance.py``).
    """

    def __init__(self, ref):
        self.ref = ref
        self.ref64 = copy.deepcopy(ref).double()

    def __call__(self, bs, a_b, input_ids, **kw):
        same = oracle_logits(self.ref, bs, a_b, input_ids, **kw)
        bs64 = {k: v.double() for k, v in bs.items()}
        return same, oracle_logits(self.ref64, bs64, a_b.double(), input_ids, **kw)


def left_padded_batch(lengths, vocab=100, seed=3):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    rows = []
    for i, n in enumerate(lengths):
        row = torch.randint(1, vocab, (n,), generator=g)
        ids[i, t - n :] = row
        mask[i, t - n :] = 1
        rows.append(row)
    return ids, mask, rows


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


class CallCounter:
    """Counts the fused op calls of the patched modules (single and fused q/k/v entry points)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        # single projections call the op from hf, the fused q/k/v group from qkv_fusion
        for module, name in ((hf, "fused_cora_linear"), (qkv_fusion, "fused_cora_linear_multi")):
            real = getattr(module, name)

            def counted(*args, _real=real, **kwargs):
                self.calls += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


# --------------------------------------------------------------------------------------------
# Forward against the dense per-sample oracle


@pytest.mark.parametrize(
    "arch, attn, fuse, backend",
    [
        ("llama", "sdpa", True, "auto"),
        ("llama", "eager", False, "auto"),
        ("llama", "sdpa", True, "torch"),
        ("llama", "eager", False, "torch"),
        ("qwen2", "sdpa", True, "auto"),  # q/k/v with bias: the fused bias path
        ("mistral", "eager", True, "torch"),
    ],
)
def test_patched_forward_matches_dense_oracle(arch, attn, fuse, backend):
    model = make_model(arch, attn)
    ref = copy.deepcopy(model)
    bs = patch_random(model, fuse_qkv=fuse, backend=backend)
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(5))
    a = random_a(3)
    with torch.no_grad(), cora_weights(model, a):
        out = model(ids).logits
    with torch.no_grad():
        plain = ref(ids).logits
    dense = DenseOracle(ref)
    for b in range(3):
        with torch.no_grad():
            want, want64 = dense(bs, a[b], ids[b : b + 1])
        assert_close_to_oracle(out[b : b + 1], want, want64, f"logits of sample {b}")
    # The per-sample term is not negligible: the test would notice it missing.
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_left_padding_last_position(backend):
    model = make_model("llama", "sdpa")
    ref = copy.deepcopy(model)
    bs = patch_random(model, backend=backend)
    lengths = [7, 4, 2]
    ids, mask, rows = left_padded_batch(lengths)
    a = random_a(3)
    with torch.no_grad(), cora_weights(model, a):
        out = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    dense = DenseOracle(ref)
    for b, row in enumerate(rows):
        with torch.no_grad():
            want, want64 = dense(bs, a[b], row[None])  # the sample alone, no padding
        assert_close_to_oracle(out[b, -1], want[0, -1], want64[0, -1], f"sample {b}")


def test_fused_and_unfused_qkv_agree(monkeypatch):
    fused = make_model()
    unfused = copy.deepcopy(fused)
    dense = DenseOracle(copy.deepcopy(fused))
    bs = patch_random(fused, fuse_qkv=True, backend="torch")
    patch_random(unfused, fuse_qkv=False, backend="torch")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(7))
    a = random_a(2)
    counter = CallCounter(monkeypatch)
    with torch.no_grad(), cora_weights(fused, a):
        y_fused = fused(ids).logits
    assert counter.calls == 2 * 2  # per layer: one q/k/v call + o_proj
    counter.calls = 0
    with torch.no_grad(), cora_weights(unfused, a):
        y_unfused = unfused(ids).logits
    assert counter.calls == 4 * 2
    for b in range(2):
        with torch.no_grad():
            want, want64 = dense(bs, a[b], ids[b : b + 1])
        assert_close_to_oracle(y_fused[b : b + 1], want, want64, f"fused, sample {b}")
        assert_close_to_oracle(y_unfused[b : b + 1], want, want64, f"unfused, sample {b}")


def test_shared_2d_a_equals_repeated_per_sample_a():
    model = make_model()
    dense = DenseOracle(copy.deepcopy(model))
    bs = patch_random(model, backend="torch")
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(8))
    a = random_a(1)[0]
    with torch.no_grad(), cora_weights(model, a):
        shared = model(ids).logits
    with torch.no_grad(), cora_weights(model, a.expand(2, -1, -1)):
        per_sample = model(ids).logits
    for b in range(2):
        with torch.no_grad():
            want, want64 = dense(bs, a, ids[b : b + 1])
        assert_close_to_oracle(shared[b : b + 1], want, want64, f"shared A, sample {b}")
        assert_close_to_oracle(per_sample[b : b + 1], want, want64, f"per-sample A, sample {b}")


# --------------------------------------------------------------------------------------------
# Exactness of the frozen backbone


def test_zero_lora_b_gives_unpatched_logits():
    model = make_model()
    ref = copy.deepcopy(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, fuse_qkv=False, backend="torch")
    ids, mask, _ = left_padded_batch([6, 3])
    kw = dict(attention_mask=mask, position_ids=positions(mask))
    with torch.no_grad():
        want = ref(ids, **kw).logits
        with cora_weights(model, random_a(2)):
            got = model(ids, **kw).logits
    # Factored path with B = 0: x W^T + 0, bit for bit.
    assert torch.equal(got, want)


def test_zero_lora_b_default_backend_fused():
    model = make_model()
    ref = copy.deepcopy(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ref(ids).logits
        want64 = copy.deepcopy(ref).double()(ids).logits
        with cora_weights(model, random_a(2)):
            got = model(ids).logits
    # Another GEMM (fused [Wq;Wk;Wv], Triton tiles) may round differently; nothing else.
    assert_close_to_oracle(got, want, want64, "logits with B = 0")


def test_outside_block_and_remove_cora_are_bit_identical():
    model = make_model("qwen2")
    ref = copy.deepcopy(model)
    ids, mask, _ = left_padded_batch([6, 3])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    originals = {n: m for n, m in model.named_modules() if n.endswith(("_proj",))}
    keys = list(model.state_dict())
    model.lm_head.weight.requires_grad_(False)  # remove_cora must restore this flag too
    patch_random(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, want)  # no block
        with cora_weights(model, None):
            assert torch.equal(model(ids, attention_mask=mask).logits, want)
        with cora_weights(model, random_a(2)):
            assert not torch.equal(model(ids, attention_mask=mask).logits, want)
    remove_cora(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, want)
    assert not any(isinstance(m, CoRALinear) for m in model.modules())
    for n, m in model.named_modules():
        if n in originals:
            assert m is originals[n]
    assert list(model.state_dict()) == keys
    assert not model.lm_head.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad
    assert not hf.is_cora_patched(model)
    apply_cora_to_llama(model, rank=2)  # can be patched again
    assert hf.is_cora_patched(model)


def test_nested_blocks_restore_previous_a():
    model = make_model()
    patch_random(model, backend="torch")
    ids = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(10))
    a1, a2 = random_a(2, seed=11), random_a(2, seed=12)
    with torch.no_grad():
        with cora_weights(model, a1):
            y1 = model(ids).logits
        with cora_weights(model, a2):
            y2 = model(ids).logits
        with cora_weights(model, a1):
            with cora_weights(model, a2):
                assert torch.equal(model(ids).logits, y2)
            assert torch.equal(model(ids).logits, y1)
    assert not torch.equal(y1, y2)


# --------------------------------------------------------------------------------------------
# Memory: the fused q/k/v buffer holds the only copy of the weights


def test_fused_qkv_does_not_duplicate_weights():
    model = make_model()
    before_bytes = parameter_bytes(model)
    before_numel = sum(p.numel() for p in model.parameters())
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, fuse_qkv=True)
    lora = lora_b_parameters(model)
    lora_bytes = sum(p.numel() * p.element_size() for p in lora.values())
    assert parameter_bytes(model) == before_bytes + lora_bytes
    assert parameter_bytes(model, trainable_only=True) == lora_bytes
    assert sum(p.numel() for p in model.parameters()) == before_numel + sum(
        p.numel() for p in lora.values()
    )
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert q.untyped_storage().nbytes() == (64 + 32 + 32) * 64 * 4


def test_dtype_change_after_patching_refuses():
    model = make_model()
    ref = copy.deepcopy(model).double()
    bs = patch_random(model, backend="torch")
    model.double()  # the q/k/v parameters get separate fp64 storage
    ids = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(13))
    a = random_a(2).double()
    with torch.no_grad(), cora_weights(model, a):
        out = model(ids).logits
    bs = {p: b.double() for p, b in bs.items()}
    with torch.no_grad():
        want = oracle_logits(ref, bs, a[1], ids[1:2])
    # fp64 all through: the dense fp64 path is both the reference and the oracle.
    assert_close_to_oracle(out[1:2], want, want, "fp64 logits")
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == (
        attn.v_proj.weight.untyped_storage().data_ptr()
    )
    # The old fp32 buffer is gone and the fp64 weights are not duplicated.
    assert parameter_bytes(model) == parameter_bytes(ref) + sum(
        p.numel() * 8 for p in lora_b_parameters(model).values()
    )


# --------------------------------------------------------------------------------------------
# Gradients


def test_gradients_match_dense_oracle_and_skip_frozen():
    model = make_model()
    ref = copy.deepcopy(model)
    patch_random(model)  # default backend
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(14))
    a = random_a(2).requires_grad_(True)
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(15))
    with cora_weights(model, a):
        loss = (model(ids).logits * target).sum()
    loss.backward()

    lora = lora_b_parameters(model)
    bs = {
        k[: -len(".lora_B.weight")]: p.detach().clone().requires_grad_(True)
        for k, p in lora.items()
    }
    # The dense oracle's gradients in fp32 (the reference) and in fp64 (the oracle).
    a_ref = a.detach().clone().requires_grad_(True)
    a64 = a.detach().double().requires_grad_(True)
    bs64 = {k: b.detach().double().requires_grad_(True) for k, b in bs.items()}
    ref64 = copy.deepcopy(ref).double()
    for model_, bs_, a_, target_ in ((ref, bs, a_ref, target), (ref64, bs64, a64, target.double())):
        loss_ = sum(
            (oracle_logits(model_, bs_, a_[b], ids[b : b + 1]) * target_[b : b + 1]).sum()
            for b in range(2)
        )
        loss_.backward()
    assert_close_to_oracle(a.grad, a_ref.grad, a64.grad, "dA")
    for key, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        path = key[: -len(".lora_B.weight")]
        assert_close_to_oracle(p.grad, bs[path].grad, bs64[path].grad, key)
    for name, p in model.named_parameters():
        if "lora_B" not in name:
            assert not p.requires_grad and p.grad is None, name


def _enable_checkpointing(model, reentrant: bool):
    kwargs = {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _grads(model, a, ids, mask, target, backward_inside: bool):
    a = a.detach().clone().requires_grad_(True)
    for p in lora_b_parameters(model).values():
        p.grad = None
    with cora_weights(model, a):
        loss = (model(ids, attention_mask=mask, use_cache=False).logits * target).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        # A later block with another A must not leak into the recomputation.
        with cora_weights(model, random_a(a.shape[0], seed=99)):
            loss.backward()
    return a.grad, {k: p.grad.clone() for k, p in lora_b_parameters(model).items()}


@pytest.mark.parametrize(
    "reentrant, backward_inside, backend",
    [(False, False, "auto"), (True, False, "torch"), (False, True, "torch")],
)
def test_gradient_checkpointing_same_gradients(monkeypatch, reentrant, backward_inside, backend):
    model = make_model().train()
    patch_random(model, backend=backend)
    ids, mask, _ = left_padded_batch([5, 3])
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(16))
    a = random_a(2)
    a_plain, b_plain = _grads(model, a, ids, mask, target, backward_inside=True)
    # The same patched model in fp64, without checkpointing: the oracle.
    a_64, b_64 = _grads(copy.deepcopy(model).double(), a.double(), ids, mask, target.double(),
                        backward_inside=True)  # fmt: skip

    _enable_checkpointing(model, reentrant)
    counter = CallCounter(monkeypatch)
    a_ckpt, b_ckpt = _grads(model, a, ids, mask, target, backward_inside)
    assert counter.calls == 2 * (2 * 2)  # the forward ran twice: it was recomputed
    assert_close_to_oracle(a_ckpt, a_plain, a_64, "dA")
    for k in b_plain:
        assert_close_to_oracle(b_ckpt[k], b_plain[k], b_64[k], k)


@pytest.mark.parametrize("reentrant", [False, True])
def test_lora_dropout_in_training_only_and_replayed_by_checkpointing(reentrant):
    model = make_model().train()
    patch_random(model, backend="torch", lora_dropout=0.3)
    ids, mask, _ = left_padded_batch([5, 3])
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(16))
    a = random_a(2)
    with torch.no_grad(), cora_weights(model, a):
        model.eval()
        eval_logits = model(ids, attention_mask=mask).logits
        model.train()
        torch.manual_seed(5)
        train_logits = model(ids, attention_mask=mask).logits
        torch.manual_seed(5)
        assert torch.equal(model(ids, attention_mask=mask).logits, train_logits)  # reproducible
    assert not torch.allclose(train_logits, eval_logits)  # the dropout is in play
    plain = make_model()
    patch_random(plain, backend="torch")
    with torch.no_grad(), cora_weights(plain, a):
        assert torch.equal(plain(ids, attention_mask=mask).logits, eval_logits)  # eval: none

    # One seed per call from the CPU generator: checkpointing restores that generator before it
    # recomputes a layer, so the recomputation applies the forward's masks.
    torch.manual_seed(7)
    a_plain, b_plain = _grads(model, a, ids, mask, target, backward_inside=True)
    torch.manual_seed(7)
    a_64, b_64 = _grads(copy.deepcopy(model).double(), a.double(), ids, mask, target.double(),
                        backward_inside=True)  # fmt: skip
    _enable_checkpointing(model, reentrant)
    torch.manual_seed(7)
    a_ckpt, b_ckpt = _grads(model, a, ids, mask, target, backward_inside=True)
    assert_close_to_oracle(a_ckpt, a_plain, a_64, "dA")
    for k in b_plain:
        assert_close_to_oracle(b_ckpt[k], b_plain[k], b_64[k], k)
    with pytest.raises(ValueError, match="lora_dropout"):
        apply_cora_to_llama(make_model(), rank=RANK, lora_dropout=1.0)


# --------------------------------------------------------------------------------------------
# generate() with the KV cache


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_generate_with_cache_equals_step_by_step(backend):
    model = make_model("llama", "sdpa")
    patch_random(model, backend=backend)
    ids, mask, _ = left_padded_batch([5, 3])
    a = random_a(2)
    steps = 3
    with torch.no_grad(), cora_weights(model, a):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    # Step by step: a full forward (no cache) over the growing sequence, greedy; in fp64 too.
    model64 = copy.deepcopy(model).double()
    seq, m = ids, mask
    with torch.no_grad(), cora_weights(model, a), cora_weights(model64, a.double()):
        for step in range(steps):
            logits = model(seq, attention_mask=m, position_ids=positions(m)).logits[:, -1]
            logits64 = model64(seq, attention_mask=m, position_ids=positions(m)).logits[:, -1]
            assert_close_to_oracle(out.logits[step], logits, logits64, f"step {step}")
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            m = torch.cat([m, torch.ones_like(nxt)], dim=1)
    assert torch.equal(out.sequences, seq)
    with torch.no_grad():
        frozen = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
    assert not torch.allclose(frozen, out.logits[0], atol=1e-3)  # A really took part


# --------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="rank"):
        apply_cora_to_llama(model, rank=0)
    with pytest.raises(ValueError, match=r"no linear module .* named"):
        apply_cora_to_llama(model, target_modules=("query_key_value",))
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module"):
        apply_cora_to_llama(model, target_modules=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match=r"down_proj reads 128 features, not the hidden size 64"):
        apply_cora_to_llama(model, target_modules=("q_proj", "down_proj"))
    with pytest.raises(ValueError, match="not patched"), cora_weights(model, random_a(2)):
        pass
    with pytest.raises(ValueError, match="not patched"):
        remove_cora(model)
    assert all(p.requires_grad for p in model.parameters())  # failed calls changed nothing

    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    with pytest.raises(ValueError, match="already patched"):
        apply_cora_to_llama(model)
    with (
        pytest.raises(ValueError, match=r"\(B, 64, 4\)"),
        cora_weights(model, torch.randn(2, 64, 3)),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"\(B, 64, 4\)"),
        cora_weights(model, torch.randn(2, 32, 4)),
    ):
        pass
    with (
        pytest.raises(TypeError, match="floating"),
        cora_weights(model, torch.ones(2, 64, 4, dtype=torch.long)),
    ):
        pass
    ids = torch.randint(0, 100, (3, 4))
    with (
        pytest.raises(ValueError, match=r"lora_a for 2 samples .* batch of 3"),
        cora_weights(model, random_a(2)),
    ):
        model(ids)
    # The failed block left no A behind.
    assert hf._get_state(model).lora_a is None

    odd = make_model(head_dim=8)  # o_proj reads 4 * 8 = 32 features, not hidden_size 64
    with pytest.raises(ValueError, match="o_proj reads 32 features"):
        apply_cora_to_llama(odd, target_modules=("q_proj", "o_proj"))
    assert all(p.requires_grad for p in odd.parameters())
    # The default targets leave such an o_proj out, and say so.
    with pytest.warns(UserWarning, match=r"leaves \['o_proj'\] unpatched"):
        apply_cora_to_llama(odd)
    assert {p.rsplit(".", 1)[-1] for p in cora_modules(odd)} == {"q_proj", "k_proj", "v_proj"}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_forward_on_gpu_matches_dense_oracle(dtype, backend):
    """The patched model on a GPU (auto: cuBLAS; triton: the kernels on bf16 tensor cores); the
    dense oracle in the same dtype on the GPU is the reference, in fp64 on the CPU the oracle."""
    model = make_model("llama", "sdpa")
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    bs = patch_random(model, backend=backend)
    model, ref = model.to("cuda", dtype), ref.to("cuda", dtype)
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(5)).cuda()
    a = random_a(3).cuda()
    with torch.no_grad(), cora_weights(model, a):
        out = model(ids).logits.float()
    for b in range(3):
        with torch.no_grad():
            bs_b = {k: v.to("cuda", dtype) for k, v in bs.items()}
            want = oracle_logits(ref, bs_b, a[b].to(dtype), ids[b : b + 1]).float()
            bs64 = {k: v.double() for k, v in bs.items()}
            want64 = oracle_logits(ref64, bs64, a[b].double().cpu(), ids[b : b + 1].cpu())
        assert_close_to_oracle(out[b : b + 1], want, want64.to(out.device), f"sample {b}", dtype)
