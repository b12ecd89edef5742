"""CoRA over bases whose projections are not plain float ``nn.Linear`` modules.

* A fake quantised linear (int8 weight and a scale, its own ``forward``) and a linear whose
  weight is a ``Parameter`` subclass prove the guard without bitsandbytes: the base product
  runs through the module's own ``forward``, nothing of it is re-pointed or copied, q/k/v are
  not fused.
* bitsandbytes 4-bit and 8-bit LLaMA (loaded by transformers, on the CPU) where bitsandbytes
  is installed with CPU support; skipped otherwise.
* peft ``PeftModel`` over a tiny LLaMA: the peft layers are patched too (their base product
  and their LoRA through their own ``forward``, plus CoRA), or the patch is refused before
  any change.
* FSDP-like parameters (views into a flat buffer someone else manages) are never re-pointed
  by the q/k/v fusion, before or after patching.

Oracle: the unpatched model with forward hooks adding ``s (x A_b) B^T`` (``hooked_oracle.py``).
"""

from __future__ import annotations

import copy
import importlib.util
import types

import pytest
import torch
import torch.nn.functional as F
from hooked_oracle import HookedOracle, delta_hooks
from tolerance import assert_close_to_oracle
from torch import nn

from llmrec_kernels.hf import (
    CoRALinear,
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
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,  # a multiple of 64: bitsandbytes 4-bit CPU blocks
        vocab_size=100,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).eval()


def batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 6), generator=g)
    a = torch.randn(3, HIDDEN, RANK, generator=g) * 0.3
    return ids, a


def random_bs(model, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_b_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return {path: m.lora_B.weight.detach().clone() for path, m in cora_modules(model).items()}


def tensors_of(model) -> dict:
    """``{name: tensor}`` of every parameter and buffer (the storage a patch could re-point)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def snapshot(model):
    """Everything a patch must not change about the base: the state dict's values (quantised
    layers serialise their packing state there) and every parameter's and buffer's storage."""
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return values, {k: v.data_ptr() for k, v in tensors_of(model).items()}


def fused_weight_keys(model) -> set:
    """State-dict keys of the plain q/k/v weights the fusion moved into its buffer (ours to
    move: plain, self-contained parameters); every other tensor keeps its storage."""
    return {f"{p}.weight" for p, m in cora_modules(model).items() if m._group is not None}


def assert_base_untouched(before, model, rename=lambda k: k, may_move=frozenset()):
    values, ptrs = before

    def ours(k):  # the factors a patch adds (CoRA's B; plain LoRA's A and B)
        return k.endswith((".lora_B.weight", ".lora_A.weight"))

    after = {rename(k): v for k, v in model.state_dict().items() if not ours(k)}
    assert set(after) == set(values)
    for key, value in values.items():
        assert torch.equal(after[key], value), f"{key} changed"
    now = {rename(k): v.data_ptr() for k, v in tensors_of(model).items() if not ours(k)}
    assert set(now) == set(ptrs)
    moved = [k for k in ptrs if now[k] != ptrs[k] and k not in may_move]
    assert not moved, f"re-pointed: {moved}"


def base_layer_key(key: str) -> str:
    """A wrapped target's state-dict key as it was before patching (``base_layer.`` dropped)."""
    return (
        key.replace(".base_layer.", ".", 1)
        if any(f".{t}.base_layer." in key for t in TARGETS)
        else key
    )


# --------------------------------------------------------------------------------------------
# A fake quantised linear and a Parameter subclass: the guard without bitsandbytes


class FakeInt8Linear(nn.Linear):
    """int8 weight and a per-row scale; the product dequantises in its own ``forward``."""

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        w = base.weight.detach()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach().clone())

    def forward(self, x):
        w = self.weight.to(self.scale.dtype) * self.scale[:, None]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class PackedParameter(nn.Parameter):
    """A float parameter subclass, as quantisation libraries use: never ours to re-point."""


def with_projections(model, convert):
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in TARGETS:
            setattr(attn, name, convert(getattr(attn, name)))
    return model


def packed(base: nn.Linear) -> nn.Linear:
    base.weight = PackedParameter(base.weight.detach().clone())
    return base


@pytest.mark.parametrize(
    "convert", [FakeInt8Linear, packed], ids=["int8-forward", "param-subclass"]
)
def test_non_plain_projections_run_their_own_forward_and_are_never_modified(convert):
    model = with_projections(make_llama(), convert)
    ref = copy.deepcopy(model)
    before = snapshot(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    mods = cora_modules(model)
    assert len(mods) == 8 and all(m.wraps_module and m._group is None for m in mods.values())
    assert_base_untouched(before, model, base_layer_key)

    ids, a = batch()
    with torch.no_grad():
        want = ref(ids).logits
        with cora_weights(model, a):
            assert torch.equal(model(ids).logits, want)  # B = 0: base(x) + 0 exactly
    bs = random_bs(model)
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    same, wide = HookedOracle(ref, SCALING)(bs, a, ids)
    assert_close_to_oracle(got, same, wide, "logits over non-plain projections")
    assert_base_untouched(before, model, base_layer_key)

    remove_cora(model)
    assert_base_untouched(before, model)
    assert all(
        type(m.self_attn.q_proj) is type(r.self_attn.q_proj)
        for m, r in zip(model.model.layers, ref.model.layers)
    )


def test_non_plain_projection_gradients_match_hooked_oracle():
    """Gradients through the wrapped path (plain autograd) reach lora_B and A as the oracle's."""
    model = with_projections(make_llama(), FakeInt8Linear)
    ref = copy.deepcopy(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    bs = random_bs(model)
    ids, a = batch()
    a_patched = a.clone().requires_grad_()
    with cora_weights(model, a_patched):
        model(ids).logits.square().mean().backward()

    def oracle_grads(net, dtype):
        leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in bs.items()}
        a_leaf = a.to(dtype).clone().requires_grad_()
        with delta_hooks(net, leaves, a_leaf, SCALING):
            net(ids).logits.square().mean().backward()
        return a_leaf.grad, {k: v.grad for k, v in leaves.items()}

    ga, gb = oracle_grads(ref, torch.float32)
    ga64, gb64 = oracle_grads(copy.deepcopy(ref).double(), torch.float64)
    assert_close_to_oracle(a_patched.grad, ga, ga64, "dL/dA")
    for path, m in cora_modules(model).items():
        assert_close_to_oracle(m.lora_B.weight.grad, gb[path], gb64[path], f"dL/dB {path}")


# --------------------------------------------------------------------------------------------
# FSDP-like parameters: views into a flat buffer the fusion does not own


def flatten_into_foreign_buffer(attn) -> torch.Tensor:
    """Re-point q/k/v weights into one flat buffer (v, q, k order), as FSDP does."""
    ws = [attn.v_proj.weight, attn.q_proj.weight, attn.k_proj.weight]
    flat = torch.cat([w.detach().reshape(-1) for w in ws])
    offset = 0
    with torch.no_grad():
        for w in ws:
            w.data = flat[offset : offset + w.numel()].view_as(w)
            offset += w.numel()
    return flat


@pytest.mark.parametrize("when", ["before", "after"])
def test_fused_qkv_never_repoints_foreign_views(when):
    model = make_llama()
    ref = copy.deepcopy(model)
    flats = []
    if when == "before":
        flats = [flatten_into_foreign_buffer(layer.self_attn) for layer in model.model.layers]
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    bs = random_bs(model)
    ids, a = batch()
    with torch.no_grad(), cora_weights(model, a):
        fused_result = model(ids).logits
    if when == "after":
        flats = [flatten_into_foreign_buffer(layer.self_attn) for layer in model.model.layers]
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    for layer, flat in zip(model.model.layers, flats):
        start, stop = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        for name in ("q_proj", "k_proj", "v_proj"):
            assert start <= getattr(layer.self_attn, name).weight.data_ptr() < stop
    if when == "after":
        # The per-call concatenation holds the same values as the fused buffer: same bits.
        assert torch.equal(got, fused_result)
    same, wide = HookedOracle(ref, SCALING)(bs, a, ids)
    assert_close_to_oracle(got, same, wide, "logits over foreign q/k/v views")


def test_fused_qkv_results_identical_to_the_buffered_layout_after_to():
    """``.to()`` gives every parameter its own storage; the group re-fuses it (ours, whole)."""
    model = make_llama()
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    random_bs(model)
    ids, a = batch()
    with torch.no_grad(), cora_weights(model, a):
        want = model(ids).logits
    model.double().float()
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    attn = model.model.layers[0].self_attn
    assert (
        attn.q_proj.weight.untyped_storage().data_ptr()
        == attn.v_proj.weight.untyped_storage().data_ptr()
    )
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# bitsandbytes


def bnb_cpu_reason():
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(8, 8, compute_dtype=torch.float32).to("cpu")
        layer(torch.randn(1, 8))
    except Exception as exc:  # no CPU backend in this build
        return f"bitsandbytes has no CPU support here ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    reason = bnb_cpu_reason()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("tiny-llama")
    make_llama().save_pretrained(path)
    return path


def load_quantised(path, bits: int):
    kw = (
        dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
        if bits == 4
        else dict(load_in_8bit=True)
    )
    config = transformers.BitsAndBytesConfig(**kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", attn_implementation="eager"
    )
    return model.eval()


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base_patched_without_touching_its_weights(saved_llama, bits):
    import bitsandbytes as bnb

    model = load_quantised(saved_llama, bits)
    ref = load_quantised(saved_llama, bits)
    quantised = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].self_attn.q_proj, quantised)
    before = snapshot(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    mods = cora_modules(model)
    assert len(mods) == 8 and all(isinstance(m.base_layer, quantised) for m in mods.values())
    assert all(m._group is None for m in mods.values())
    assert_base_untouched(before, model, base_layer_key)

    ids, a = batch()
    with torch.no_grad():
        want = ref(ids).logits
        with cora_weights(model, a):
            assert torch.equal(model(ids).logits, want)  # B = 0: the quantised model exactly
    bs = random_bs(model)
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    # Reference: the unpatched quantised model with the deltas hooked in. A bitsandbytes
    # model has no fp64 run, so there is no fp64 oracle of the logits: the two fp32
    # computations share every base product bit for bit and differ only in how the rank-4
    # deltas round, so they agree to a few fp32 units of the logits' scale (the single
    # projection below is checked against an fp64 oracle under the tolerance rule).
    with torch.no_grad(), delta_hooks(ref, bs, a, SCALING):
        same = ref(ids).logits
    assert not torch.allclose(same, want)
    err = float((got - same).abs().max()) / float(same.abs().max())
    assert err <= 64 * torch.finfo(torch.float32).eps

    # One projection in isolation against an fp64 oracle of base(x) + s (x A) B^T.
    proj = model.model.layers[0].self_attn.k_proj
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        base = proj.base_layer(x)
        with cora_weights(model, a):
            y = proj(x)
        b = proj.lora_B.weight
        ref_delta = SCALING * torch.bmm(torch.bmm(x, a), b.T.expand(3, -1, -1))
        oracle = base.double() + SCALING * torch.bmm(
            torch.bmm(x.double(), a.double()), b.double().T.expand(3, -1, -1)
        )
    assert_close_to_oracle(y, base + ref_delta, oracle, f"{bits}-bit k_proj")

    # bitsandbytes repacks its own weights on its first CPU forward (new storage, in every
    # quantised layer, patched or not): compare the values with the unpatched model's after
    # the same forwards.
    ref_values = snapshot(ref)[0]
    remove_cora(model)
    values = model.state_dict()
    assert values.keys() == ref_values.keys()
    assert all(torch.equal(values[k], v) for k, v in ref_values.items())


# --------------------------------------------------------------------------------------------
# peft


def peft_model(targets):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False
    )
    torch.manual_seed(5)
    return peft.get_peft_model(make_llama(), config).eval()


@pytest.mark.parametrize("peft_targets", [("q_proj", "v_proj"), ("k_proj", "o_proj")])
def test_peft_model_is_patched_completely(peft_targets):
    from peft.tuners.lora import Linear as PeftLinear

    model = peft_model(peft_targets)
    ref = copy.deepcopy(model)
    before = snapshot(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    mods = cora_modules(model)
    names = {p.rsplit(".", 1)[-1] for p in mods}
    assert names == set(TARGETS) and len(mods) == 8  # every layer, every target
    for path, m in mods.items():
        wrapped = path.rsplit(".", 1)[-1] in peft_targets
        assert m.wraps_module == wrapped
        if wrapped:
            assert isinstance(m.base_layer, PeftLinear) and m._group is None
    moved = fused_weight_keys(model)
    assert all(".base_layer." not in k for k in moved)
    assert_base_untouched(before, model, base_layer_key, moved)

    ids, a = batch()
    with torch.no_grad():
        want = ref(ids).logits
        with cora_weights(model, a):
            got0 = model(ids).logits
    # The peft LoRA is in the base product: B = 0 gives the peft model's logits.
    want64 = copy.deepcopy(ref).double()(ids).logits
    assert_close_to_oracle(got0, want, want64, "peft logits with B = 0")
    bs = random_bs(model)
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    same, wide = HookedOracle(ref, SCALING)(bs, a, ids)
    assert_close_to_oracle(got, same, wide, "peft + CoRA logits")

    remove_cora(model)
    assert_base_untouched(before, model, may_move=moved)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize(
    "targets, error, message",
    [
        (("q_proj", "down_proj"), ValueError, "down_proj reads 128 features"),
        (("q_proj", "lora_A"), TypeError, r"not linear projections: .*lora_A \(ModuleDict\)"),
        (("q_proj", "gate"), ValueError, r"\['gate'\] match no module"),
    ],
)
def test_peft_model_refused_before_any_change(targets, error, message):
    model = peft_model(("q_proj", "v_proj"))
    before = snapshot(model)
    types = [(name, type(m)) for name, m in model.named_modules()]
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=message):
        apply_cora_to_llama(model, rank=RANK, target_modules=targets)
    assert_base_untouched(before, model)
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not any(isinstance(m, CoRALinear) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Plain LoRA (llmrec_kernels.lora) over a quantised base: QLoRA-style


@pytest.mark.parametrize("targets", [("q_proj", "v_proj")])
def test_lora_over_fake_quantised_base(targets):
    from llmrec_kernels.lora import apply_lora, lora_modules, remove_lora

    model = with_projections(make_llama(), FakeInt8Linear)
    ref = copy.deepcopy(model)
    before = snapshot(model)
    mods = apply_lora(
        model, rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=targets, backend="torch", seed=0
    )
    assert len(mods) == 4 and all(m.wraps_module for m in mods.values())
    assert_base_untouched(before, model, base_layer_key)
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # B = 0: the base exactly
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.5)
        got = model(ids).logits
    lora = lora_modules(model)

    def hooked(net, dtype):
        handles = []
        for path, m in lora.items():
            a_t = m.lora_A.weight.detach().to(dtype).t()
            b = m.lora_B.weight.detach().to(dtype)

            def add(module, args, out, a_t=a_t, b=b):
                return out + SCALING * (args[0] @ a_t) @ b.T

            handles.append(net.get_submodule(path).register_forward_hook(add))
        try:
            with torch.no_grad():
                return net(ids).logits
        finally:
            for h in handles:
                h.remove()

    same = hooked(ref, torch.float32)
    wide = hooked(copy.deepcopy(ref).double(), torch.float64)
    assert_close_to_oracle(got, same, wide, "LoRA over int8 projections")
    remove_lora(model)
    assert_base_untouched(before, model)


def test_lora_over_bitsandbytes_4bit(saved_llama):
    """QLoRA: plain LoRA over a 4-bit base, the base product through bitsandbytes."""
    import bitsandbytes as bnb

    from llmrec_kernels.lora import apply_lora

    model = load_quantised(saved_llama, 4)
    ref = load_quantised(saved_llama, 4)
    mods = apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, backend="torch", seed=0)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in mods.values())
    ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # B = 0
    proj = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        proj.lora_B.weight.copy_(torch.randn(proj.lora_B.weight.shape) * 0.5)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        base = proj.base_layer(x)
        y = proj(x)
        a_t, b = proj.lora_A.weight.t(), proj.lora_B.weight
        reference = base + SCALING * (x @ a_t) @ b.T
        oracle = base.double() + SCALING * (x.double() @ a_t.double()) @ b.double().T
    assert_close_to_oracle(y, reference, oracle, "QLoRA v_proj")


def test_instance_level_forward_is_kept():
    """A projection whose ``forward`` was replaced on the instance (as accelerate's offloading
    hooks do) keeps computing through it: the wrapped path, not the weight directly."""
    model = make_llama()
    calls = []

    def counted(self, x):
        calls.append(1)
        return nn.Linear.forward(self, x)

    for layer in model.model.layers:
        proj = layer.self_attn.v_proj
        # A bound method: deepcopy rebinds it to the copy (the fp64 reference below).
        proj.forward = types.MethodType(counted, proj)
    ref = copy.deepcopy(model)
    apply_cora_to_llama(model, rank=RANK, alpha=ALPHA, backend="torch")
    mods = cora_modules(model)
    assert all(m.wraps_module == p.endswith("v_proj") for p, m in mods.items())
    ids, a = batch()
    calls.clear()
    with torch.no_grad(), cora_weights(model, a):
        got = model(ids).logits
    assert len(calls) == 2  # v_proj of each layer ran its own forward
    want64 = copy.deepcopy(ref).double()(ids).logits
    with torch.no_grad():
        want = ref(ids).logits
    assert_close_to_oracle(got, want, want64, "logits with B = 0")
