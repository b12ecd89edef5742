"""The CoRA model core (``llmrec.methods.cora``) on a tiny random LLaMA.

The score is checked against the full Hugging Face forward (``logits[:, -1, yes]``), the
generator against its definition, and the gradient flow against what must and must not
train. Tests that name no backend run the default path (Triton's interpreter without a GPU).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_oracle, fp64_copy

from llmrec.methods.cora.generator import MLPGenerator, QFormerGenerator, build_generator
from llmrec.methods.cora.model import CoRARecommender
from llmrec_kernels.hf import cora_weights, lora_b_parameters

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

WORDS = ["Yes", "No", "#Question:", "#Answer:", "A", "user", "liked", "movie", "would", "enjoy"]
WORDS += [f"t{i}" for i in range(40)]
CF_DIM, RANK = 8, 4


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def make_llm(arch="llama", seed=0):
    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=64,
        pad_token_id=0,
    )
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def make_rec(seed=0, randomize_b=True, **kwargs):
    llm = make_llm(kwargs.pop("arch", "llama"), seed)
    if kwargs.get("generator", "qformer") == "qformer":
        # dropout 0: these tests compare forward passes in train mode
        kwargs.setdefault("generator_kwargs", {"num_layers": 2, "num_heads": 2, "dropout": 0.0})
    torch.manual_seed(seed + 1)
    rec = CoRARecommender(llm, make_tokenizer(), cf_dim=CF_DIM, rank=RANK, alpha=8, **kwargs)
    if randomize_b:
        with torch.no_grad():
            for p in lora_b_parameters(rec.llm).values():
                p.normal_(0, 0.5)
    return rec


def make_batch(tokenizer, seed=0, labels=True):
    texts = ["#Question: A user liked t1 t2 t3 #Answer:", "#Question: t7 #Answer:", "t4 t5 movie"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "user_emb": torch.randn(3, CF_DIM, generator=g),
        "item_emb": torch.randn(3, CF_DIM, generator=g),
    }
    if labels:
        batch["labels"] = torch.tensor([1.0, 0.0, 1.0])
    return batch


def full_yes_logit(rec, batch):
    """``logits[:, -1, yes] - logits[:, -1, no]`` of the full Hugging Face forward under the
    batch's CoRA weights (the default ``answer_score="yes-no"``)."""
    a = rec.generator(batch["user_emb"], batch["item_emb"])
    with cora_weights(rec.llm, a):
        logits = rec.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return logits.logits[:, -1, rec.yes_token_id] - logits.logits[:, -1, rec.no_token_id]


# --------------------------------------------------------------------------------------------
# Generator


@pytest.mark.parametrize("kind", ["qformer", "mlp"])
def test_generator_shape_and_unit_norm(kind):
    extra = {"num_heads": 2, "num_layers": 2} if kind == "qformer" else {}
    gen = build_generator(kind, cf_dim=CF_DIM, hidden_size=64, rank=RANK, **extra)
    u, i = torch.randn(5, CF_DIM), torch.randn(5, CF_DIM)
    a = gen(u, i)
    assert a.shape == (5, 64, RANK) and a.dtype == torch.float32
    torch.testing.assert_close(a.flatten(1).norm(dim=1), torch.ones(5))
    # Samples get different A.
    assert (a[0] - a[1]).abs().max() > 1e-3


def test_build_generator_kinds_and_defaults():
    gen = build_generator("qformer", cf_dim=CF_DIM, hidden_size=64, rank=RANK, num_heads=2)
    assert isinstance(gen, QFormerGenerator)
    assert gen.num_queries == 4 and len(gen.blocks) == 8  # the paper's k and N
    assert gen.blocks[0].self_attn.embed_dim == 2 * CF_DIM
    assert gen.proj.out_features == 64 * RANK
    assert gen.blocks[0].self_attn.num_heads == 2
    assert build_generator("qformer", 16, 64, 2).blocks[0].self_attn.num_heads == 8
    assert isinstance(build_generator("MLP", CF_DIM, 64, RANK), MLPGenerator)
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator("transformer", CF_DIM, 64, RANK)
    with pytest.raises(ValueError, match="must divide"):
        build_generator("qformer", cf_dim=6, hidden_size=64, rank=RANK)  # 12 % 8
    with pytest.raises(ValueError, match="rank"):
        build_generator("mlp", CF_DIM, 64, 0)
    with pytest.raises(ValueError, match=r"user_emb must be \(B, cf_dim\)"):
        gen(torch.randn(2, CF_DIM + 1), torch.randn(2, CF_DIM))


def test_qformer_matches_its_definition():
    torch.manual_seed(0)
    gen = QFormerGenerator(CF_DIM, hidden_size=16, rank=3, num_layers=2, num_heads=2).eval()
    u, i = torch.randn(4, CF_DIM), torch.randn(4, CF_DIM)

    def definition(gen, u, i):
        # LayerNorm'd queries through the blocks, Linear on *every* query, mean, L2 normalise
        # (eval mode: no dropout).
        kv = torch.cat([u, i], -1)[:, None]
        norm = gen.query_norm[0]
        q = torch.nn.functional.layer_norm(
            gen.queries.expand(4, -1, -1), (2 * CF_DIM,), norm.weight, norm.bias, eps=1e-12
        )
        for blk in gen.blocks:
            q = blk.norm1(q + blk.self_attn(q, q, q)[0])
            q = blk.norm2(q + blk.cross_attn(q, kv, kv)[0])
            q = blk.norm3(q + blk.ffn(q))
        flat = gen.proj(q).mean(1)
        return (flat / flat.norm(dim=1, keepdim=True)).view(4, 16, 3)

    with torch.no_grad():
        want = definition(gen, u, i)
        want64 = definition(copy.deepcopy(gen).double(), u.double(), i.double())
        assert_close_to_oracle(gen(u, i), want, want64, "generator output")


# --------------------------------------------------------------------------------------------
# Score and loss


def test_yes_token_resolution():
    rec = make_rec(randomize_b=False, generator="mlp")
    assert rec.yes_token_id == rec.tokenizer.convert_tokens_to_ids("Yes")
    rec2 = CoRARecommender(make_llm(), make_tokenizer(), CF_DIM, rank=2, yes_token_id=7)
    assert rec2.yes_token_id == 7
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CoRARecommender(make_llm(), make_tokenizer(), CF_DIM, rank=2, yes_token_id=64)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_score_equals_full_forward_yes_logit(backend):
    rec = make_rec(backend=backend).eval()  # the generator's dropout off: one A per sample
    batch = make_batch(rec.tokenizer)
    # Right-padded rows are found too: the third text is shorter than the first.
    assert batch["attention_mask"][:, 0].tolist() == [1, 0, 0]
    with torch.no_grad():
        score = rec.score(batch)
        want = full_yes_logit(rec, batch)
        want64 = full_yes_logit(*fp64_copy(rec, batch))
    assert score.shape == (3,) and score.dtype == torch.float32
    assert_close_to_oracle(score, want, want64, "score")


def test_score_never_computes_full_vocabulary_logits(monkeypatch):
    rec = make_rec(backend="torch")

    def forbidden(*args, **kwargs):
        raise AssertionError("lm_head was called: full-vocabulary logits")

    monkeypatch.setattr(rec.llm.lm_head, "forward", forbidden)
    with torch.no_grad():
        assert rec.score(make_batch(rec.tokenizer)).shape == (3,)


def test_no_collaborative_input_is_the_frozen_backbone():
    rec = make_rec(backend="torch")
    plain = copy.deepcopy(rec.llm)
    from llmrec_kernels.hf import remove_cora

    remove_cora(plain)
    batch = make_batch(rec.tokenizer)
    no_cf = {k: v for k, v in batch.items() if k not in ("user_emb", "item_emb")}
    with torch.no_grad():
        got = rec.score(no_cf)
        got_none = rec.score({**batch, "user_emb": None, "item_emb": None})
        want = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want64 = (
            copy.deepcopy(plain)
            .double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits
        )
        with_cf = rec.score(batch)
    yes, no = rec.yes_token_id, rec.no_token_id
    assert_close_to_oracle(
        got,
        want[:, -1, yes] - want[:, -1, no],
        want64[:, -1, yes] - want64[:, -1, no],
        "score without CF",
    )
    assert torch.equal(got, got_none)
    assert (with_cf - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="both user_emb and item_emb"):
        rec.score({**batch, "item_emb": None})


def test_loss_is_bce_with_logits():
    rec = make_rec(backend="torch", generator="mlp")
    batch = make_batch(rec.tokenizer)
    with torch.no_grad():
        s = rec.score(batch)
        y = batch["labels"]
        want = -(y * F.logsigmoid(s) + (1 - y) * F.logsigmoid(-s)).mean()
        s64, y64 = s.double(), y.double()
        want64 = -(y64 * F.logsigmoid(s64) + (1 - y64) * F.logsigmoid(-s64)).mean()
        assert_close_to_oracle(rec.loss(batch), want, want64, "loss")
    with pytest.raises(ValueError, match="labels"):
        rec.loss(make_batch(rec.tokenizer, labels=False))


def test_mistral_backbone():
    rec = make_rec(arch="mistral", backend="torch", generator="mlp")
    batch = make_batch(rec.tokenizer)
    with torch.no_grad():
        want, want64 = full_yes_logit(rec, batch), full_yes_logit(*fp64_copy(rec, batch))
        assert_close_to_oracle(rec.score(batch), want, want64, "score (Mistral)")


# --------------------------------------------------------------------------------------------
# Training: gradients, checkpointing, save / load


def _train_grads(rec, batch):
    rec.zero_grad(set_to_none=True)
    rec.loss(batch).backward()
    return {k: p.grad.clone() for k, p in rec.trainable_state().items()}


def test_gradients_reach_generator_and_every_lora_b_only():
    rec = make_rec()  # default backend
    batch = make_batch(rec.tokenizer)
    grads = _train_grads(rec, batch)
    lora_keys = [k for k in grads if k.startswith("llm.")]
    assert len(lora_keys) == 2 * 4  # 2 layers x q, k, v, o
    for k, g in grads.items():
        assert torch.isfinite(g).all(), k
        assert g.abs().sum() > 0, k
    trainable = {id(p) for p in rec.trainable_parameters()}
    assert len(trainable) == len(grads)
    for name, p in rec.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad and p.grad is None, name


def test_zero_initialised_lora_b_start_is_the_frozen_llm():
    rec = make_rec(randomize_b=False, backend="torch")
    for p in lora_b_parameters(rec.llm).values():
        assert torch.equal(p, torch.zeros_like(p))
    batch = make_batch(rec.tokenizer)
    no_cf = {k: v for k, v in batch.items() if k not in ("user_emb", "item_emb")}
    rec64, no_cf64 = fp64_copy(rec, no_cf)
    with torch.no_grad():
        score, frozen = rec.score(batch), rec.score(no_cf)
        assert_close_to_oracle(score, frozen, rec64.score(no_cf64), "B = 0 score vs frozen LLM")
    grads = _train_grads(rec, batch)
    # B = 0: only B receives a gradient at the first step (dA = s x^T dy B = 0).
    assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith("llm."))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gradient_checkpointing_gives_the_same_gradients(backend):
    rec = make_rec(backend=backend).train()
    batch = make_batch(rec.tokenizer)
    plain = _train_grads(rec, batch)
    oracle = _train_grads(*fp64_copy(rec, batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec.llm.gradient_checkpointing_enable()
    assert rec.llm.model.layers[0].gradient_checkpointing
    # loss.backward() runs after score() has left its cora_weights block.
    ckpt = _train_grads(rec, batch)
    for k in plain:
        assert_close_to_oracle(ckpt[k], plain[k], oracle[k], k)


def test_save_and_load_trainable(tmp_path):
    rec = make_rec(seed=0)
    path = tmp_path / "cora.safetensors"
    rec.save_trainable(path)
    other = make_rec(seed=5)
    batch = make_batch(rec.tokenizer)
    other.llm.load_state_dict(rec.llm.state_dict(), strict=False)  # same frozen LLM
    with torch.no_grad():
        assert not torch.allclose(other.score(batch), rec.score(batch))
    other.load_trainable(path)
    with torch.no_grad():
        rec64, batch64 = fp64_copy(rec, batch)
        want64 = rec64.score(batch64)
        assert_close_to_oracle(other.score(batch), rec.score(batch), want64, "reloaded score")
    for k, v in rec.trainable_state().items():
        assert torch.equal(other.trainable_state()[k], v), k

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["rank"] == str(RANK)
    assert keys == set(rec.trainable_state())
    assert "llm.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert not any(k.endswith("q_proj.weight") for k in keys)  # no frozen weight saved

    wrong_rank = CoRARecommender(
        make_llm(), make_tokenizer(), CF_DIM, rank=2, generator_kwargs={"num_heads": 2}
    )
    with pytest.raises(
        ValueError, match=r"q_proj\.lora_B\.weight: file \(64, 4\) vs model \(64, 2\)"
    ):
        wrong_rank.load_trainable(path)
    mlp = make_rec(generator="mlp")
    with pytest.raises(ValueError, match=r"missing keys: generator\.net"):
        mlp.load_trainable(path)


def test_lora_dropout_reaches_the_patched_projections():
    rec = make_rec(lora_dropout=0.2, backend="torch")
    plain = make_rec(backend="torch")
    batch = make_batch(rec.tokenizer)
    rec.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(rec.score(batch), plain.score(batch))  # eval mode: no dropout
        rec.train()
        torch.manual_seed(3)
        train = rec.score(batch)
        torch.manual_seed(3)
        assert torch.equal(rec.score(batch), train)
    assert not torch.allclose(train, plain.score(batch).detach())
