"""Parameters a sharding engine can own: the q/k/v fusion never re-points a parameter it did
not fuse itself, :func:`unfuse_qkv` leaves no two parameters sharing storage, and FSDP
(``fully_shard``) wraps a patched model and trains it like the unwrapped one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_hf_patching import (
    DenseOracle,
    left_padded_batch,
    make_model,
    patch_random,
    random_a,
)
from tolerance import assert_close_to_oracle
from torch import nn

from llmrec_kernels.hf import cora_modules, cora_weights, lora_b_parameters, unfuse_qkv


def _storage_owners(model: nn.Module) -> dict:
    """``{storage address: [parameter names]}`` over every parameter of ``model``."""
    owners: dict = {}
    for name, p in model.named_parameters():
        owners.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    return owners


def _logits(model, ids, mask, a):
    with cora_weights(model, a):
        return model(ids, attention_mask=mask, use_cache=False).logits


def test_fused_parameters_are_plain_leaves_and_share_only_within_their_qkv_group():
    model = make_model()
    patch_random(model)
    for name, p in model.named_parameters():
        assert type(p) is nn.Parameter and p.is_leaf, name
    for names in _storage_owners(model).values():
        if len(names) > 1:  # a fused group: q/k/v of one attention block, one kind of tensor
            blocks = {n.rsplit(".", 3)[0] if "lora_B" in n else n.rsplit(".", 2)[0] for n in names}
            assert len(blocks) == 1 and len(names) == 3, names


def test_unfuse_qkv_leaves_no_shared_storage_and_the_same_outputs():
    model = make_model()
    patch_random(model)
    ids, mask, _ = left_padded_batch([5, 3])
    a = random_a(2)
    with torch.no_grad():
        before = _logits(model, ids, mask, a)
    trainables = list(lora_b_parameters(model).values())
    unfuse_qkv(model)
    shared = [names for names in _storage_owners(model).values() if len(names) > 1]
    assert not shared, shared
    # the same parameter objects (an optimizer built before keeps working), plain leaves
    assert all(p is q for p, q in zip(lora_b_parameters(model).values(), trainables))
    assert all(type(p) is nn.Parameter and p.is_leaf for p in model.parameters())
    with torch.no_grad():
        after = _logits(model, ids, mask, a)
    assert torch.equal(before, after)  # the same values through the same op: bit for bit
    # a forward (or backward) does not fuse them again
    _logits(model, ids, mask, a).square().mean().backward()
    assert not [n for n in _storage_owners(model).values() if len(n) > 1]


def test_a_replaced_parameter_is_never_re_pointed():
    """A parameter object put in place after patching (FSDP, load_state_dict(assign=True), a
    user) is not the group's: it keeps its own storage, and the outputs stay right."""
    model = make_model()
    bs = patch_random(model)
    oracle = DenseOracle(make_model())
    attn = model.model.layers[0].self_attn
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    # each self-contained, as the group's own were before fusion: fusable, but not its own
    new = [nn.Parameter(m.weight.detach().clone(), requires_grad=False) for m in projections]
    for m, w in zip(projections, new):
        m.weight = w
    addresses = [w.data_ptr() for w in new]
    ids, mask, _ = left_padded_batch([4])
    a = random_a(1)
    with torch.no_grad():
        got = _logits(model, ids, mask, a)
    assert [m.weight for m in projections] == new
    assert [w.data_ptr() for w in new] == addresses
    same, fp64 = oracle(bs, a[0], ids, attention_mask=mask)
    assert_close_to_oracle(got, same, fp64, "logits with replaced q/k/v weights")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6: FSDP2 lives under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


@pytest.mark.parametrize("unfused", [False, True])
def test_fully_shard_wraps_a_patched_model_on_one_gloo_process(tmp_path, unfused):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    fully_shard = _fully_shard()
    model = make_model().train()
    patch_random(model, backend="torch")
    plain = copy.deepcopy(model)
    ids, mask, _ = left_padded_batch([5, 3])
    a = random_a(2)
    target = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(7))

    want = _logits(plain, ids, mask, a)
    (want * target).sum().backward()
    plain64 = copy.deepcopy(plain).double()
    want64 = _logits(plain64, ids, mask, a.double())
    (want64 * target.double()).sum().backward()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        if unfused:
            unfuse_qkv(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        got = _logits(model, ids, mask, a)
        (got * target).sum().backward()
        assert_close_to_oracle(got.detach(), want.detach(), want64.detach(), "FSDP logits")
        for name, p in lora_b_parameters(model).items():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            ref = plain.get_parameter(name).grad
            assert_close_to_oracle(grad, ref, plain64.get_parameter(name).grad, name)
        # FSDP's parameters are its own: no group holds a buffer they were moved into
        for m in cora_modules(model).values():
            assert m._group is None or (m._group._w_fused is None and m._group._b_fused is None)
    finally:
        dist.destroy_process_group()
