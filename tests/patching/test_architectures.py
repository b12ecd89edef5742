"""CoRA patching across decoder architectures, each a tiny random model of transformers.

LLaMA, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms, heads x head_dim != hidden), Gemma 2
(heads x head_dim != hidden, logit soft-capping) and Phi-3 (one fused ``qkv_proj``). The
oracle is the unpatched model: with every ``lora_B`` zero the patched logits are its logits
bit for bit; with random ``lora_B`` they match the unpatched model whose target projections
get ``s (x A_b) B^T`` added by forward hooks (``hooked_oracle.py``), in fp32 against fp64
under ``tests/tolerance.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hooked_oracle import HookedOracle
from tolerance import assert_close_to_oracle

from llmrec_kernels.hf import (
    apply_cora_to_llama,
    cora_modules,
    cora_weights,
    lora_b_parameters,
    remove_cora,
)

transformers = pytest.importorskip("transformers")

RANK, ALPHA = 4, 8
SCALING = ALPHA / RANK
HIDDEN = 64
TINY = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=100,
    max_position_embeddings=64,
)

# name: (config class, model class, extra config, targets the default patches)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {},
        {"q_proj", "k_proj", "v_proj", "o_proj"},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    # 4 heads x 32 = 128 != 64: o_proj reads 128 features and is left out.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}, {"q_proj", "k_proj", "v_proj"}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8},
        {"q_proj", "k_proj", "v_proj"},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, {"qkv_proj", "o_proj"}),
}


def make_model(arch: str, seed: int = 0):
    config_cls, model_cls, extra, _ = ARCHS[arch]
    if not hasattr(transformers, config_cls):  # Qwen3 arrived in transformers 4.51
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY, **extra, attn_implementation="eager")
    return getattr(transformers, model_cls)(config).eval()


def patch(model, expect_warning: bool, **kwargs):
    if expect_warning:
        with pytest.warns(UserWarning, match=r"leaves \['o_proj'\] unpatched"):
            apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch", **kwargs)
    else:
        apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch", **kwargs)


def random_bs(model, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_b_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return {path: m.lora_B.weight.detach().clone() for path, m in cora_modules(model).items()}


def batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    a = torch.randn(3, HIDDEN, RANK, generator=g) * 0.3
    return ids, a


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_default_targets_zero_b_identical_random_b_matches_hooked_oracle(arch):
    model = make_model(arch)
    ref = copy.deepcopy(model)
    leaves_o_proj = "o_proj" not in ARCHS[arch][3]
    patch(model, expect_warning=leaves_o_proj)
    assert {p.rsplit(".", 1)[-1] for p in cora_modules(model)} == ARCHS[arch][3]
    ids, a = batch()
    with torch.no_grad():
        want = ref(ids).logits
        with cora_weights(model, a):
            got = model(ids).logits
        assert torch.equal(model(ids).logits, want)  # outside the block: the base model
    # B = 0: the fused q/k/v GEMM may round differently from three GEMMs; nothing else.
    want64 = copy.deepcopy(ref).double()(ids).logits
    assert_close_to_oracle(got, want, want64, f"{arch} logits with B = 0")

    bs = random_bs(model)
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    same, wide = HookedOracle(ref, SCALING)(bs, a, ids)
    assert not torch.allclose(same, want)  # the deltas are not negligible
    assert_close_to_oracle(got, same, wide, f"{arch} logits with random B")

    remove_cora(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_unfused_zero_b_bit_identical(arch):
    """Without q/k/v fusion every target is its own ``x W^T + 0``: the unpatched logits exactly."""
    model = make_model(arch)
    ref = copy.deepcopy(model)
    patch(model, expect_warning=arch == "gemma2", fuse_qkv=False)
    ids, a = batch()
    with torch.no_grad(), cora_weights(model, a):
        assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize(
    "arch, targets, message",
    [
        ("gemma2", ("q_proj", "o_proj"), r"o_proj reads 128 features, not the hidden size 64"),
        ("qwen3", ("o_proj",), r"o_proj reads 128 features, not the hidden size 64"),
        ("llama", ("q_proj", "down_proj"), r"down_proj reads 96 features"),
        ("phi3", ("q_proj", "v_proj"), r"named one of \['q_proj', 'v_proj'\].* 'qkv_proj'"),
        ("llama", ("q_proj", "qkv_proj"), r"\['qkv_proj'\] match no module"),
    ],
)
def test_explicit_targets_that_cannot_pass_are_refused_before_any_change(arch, targets, message):
    model = make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        apply_cora_to_llama(model, rank=RANK, target_modules=targets)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads


def test_phi3_explicit_fused_qkv_target():
    model = make_model("phi3")
    ref = copy.deepcopy(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, target_modules="qkv_proj", backend="torch")
    bs = random_bs(model)
    assert {p.rsplit(".", 1)[-1] for p in bs} == {"qkv_proj"}
    ids, a = batch()
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    same, wide = HookedOracle(ref, SCALING)(bs, a, ids)
    assert_close_to_oracle(got, same, wide, "phi3 qkv_proj logits")
