"""CoLLM (``llmrec.methods.collm``) on a tiny random LLaMA and synthetic data.

Slots are checked against a hand-built embedding sequence, LoRA against peft, the stages
against what must and must not train, and the two-step runner end to end.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tolerance import assert_close_to_oracle, fp64_copy

from llmrec.data.slots import ITEM_SLOT, USER_SLOT, Slot, encode_slotted
from llmrec.methods.collm.model import (
    CoLLMRecommender,
    apply_lora,
    build_collm_pieces,
    lora_modules,
    make_collm_examples,
    remove_lora,
)
from llmrec_kernels.dropout import dropout_mask

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

CF_DIM = 6
WORDS = ["Yes", "No", "#Question:", "#Answer:", "A", "user", "liked", "feature", "movie", "."]
WORDS += [f"t{i}" for i in range(30)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side="left"
    )


def make_llm(seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def make_model(seed=0, stage="joint", dropout=0.0, backend="torch", llm_seed=0):
    tok = make_tokenizer()
    rec = CoLLMRecommender(
        make_llm(llm_seed),
        tok,
        CF_DIM,
        lora_dropout=dropout,
        stage=stage,
        backend=backend,
        seed=seed,
    )
    with torch.no_grad():  # non-zero B so LoRA changes the output
        for m in rec.lora.values():
            m.lora_B.weight.normal_(0, 0.3)
    return rec


TEMPLATE = "#Question: A user liked <ItemTitleList> feature <UserID> . movie <TargetItemTitle> feature <TargetItemID> #Answer:"


def slotted_batch(tok, rows):
    """rows: list of (history titles, target title); left-padded batch with CF embeddings."""
    seqs = [encode_slotted(tok, build_collm_pieces(h, t, TEMPLATE))[0] for h, t in rows]
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        mask[r, width - len(s) :] = 1
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "user_emb": torch.randn(len(rows), CF_DIM, generator=g),
        "item_emb": torch.randn(len(rows), CF_DIM, generator=g),
        "labels": torch.tensor([1.0, 0.0, 1.0][: len(rows)]),
    }


ROWS = [
    (["t1 t2", "t3"], "t4"),
    # titles holding the placeholder and the marker text, and a word the vocab lacks (<unk>)
    (["t5 <UserID>", "zzz <unk>"], "t6 <TargetItemID>"),
    ([], "t7"),
]


# --------------------------------------------------------------------------------------------
# slots


def test_slots_are_marked_at_tokenisation_not_searched():
    tok = make_tokenizer()
    unk = tok.unk_token_id
    for his, title in ROWS:
        ids, items = encode_slotted(tok, build_collm_pieces(his, title, TEMPLATE))
        assert ids.count(USER_SLOT) == 1 and ids.count(ITEM_SLOT) == 1
        assert items == [0, 0]
        # the slots sit exactly where the template puts them: after "feature"
        u, i = ids.index(USER_SLOT), ids.index(ITEM_SLOT)
        feature = tok.convert_tokens_to_ids("feature")
        assert ids[u - 1] == feature and ids[i - 1] == feature
        assert ids[i + 1] == tok.convert_tokens_to_ids("#Answer:")
        # the text pieces tokenise as on their own (no token lost around a slot)
        text = [p for p in build_collm_pieces(his, title, TEMPLATE) if isinstance(p, str)]
        want = tok(" ".join(text), add_special_tokens=False)["input_ids"]
        assert [t for t in ids if t >= 0] == want
    # a title that tokenises to <unk> or holds the placeholders stays text
    ids, _ = encode_slotted(tok, build_collm_pieces(*ROWS[1], TEMPLATE))
    assert unk in ids  # "zzz" and the literal "<unk>" of the title
    assert sum(t < 0 for t in ids) == 2


def test_encode_slotted_item_slots_and_slow_path():
    tok = make_tokenizer()
    pieces = ["A user", Slot("user"), "liked t1", Slot("item", 7), "t2", Slot("item", 9)]
    ids, items = encode_slotted(tok, pieces, add_special_tokens=False)
    w = tok.convert_tokens_to_ids
    assert ids == [w("A"), w("user"), USER_SLOT, w("liked"), w("t1"), ITEM_SLOT, w("t2"), ITEM_SLOT]
    assert items == [0, 7, 9]
    with pytest.raises(ValueError, match="slot kind"):
        encode_slotted(tok, ["a", Slot("movie")])


def test_collm_examples_and_text_only_examples():
    from llmrec.data import make_synthetic

    data = make_synthetic(n_users=10, n_items=20, per_user=8, seed=0)
    tok = make_tokenizer()
    df = data["train"].iloc[:5]
    ex = make_collm_examples(df, tok, template="collm")
    assert all(s.count(USER_SLOT) == 1 and s.count(ITEM_SLOT) == 1 for s in ex.input_ids)
    plain = make_collm_examples(df, tok, template="cora")  # step 1: text only, no slots
    assert all(min(s) >= 0 for s in plain.input_ids)
    with pytest.raises(ValueError, match="raise --max-length to at least"):
        make_collm_examples(df, tok, template="collm", max_length=4)


def test_injection_equals_hand_built_embedding_sequence():
    rec = make_model()
    batch = slotted_batch(rec.tokenizer, ROWS)
    got = rec.embed(batch)
    ids = batch["input_ids"]

    def hand_built(rec, batch):
        table = rec.llm.get_input_embeddings().weight
        want = torch.empty(*ids.shape, table.shape[1], dtype=table.dtype)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                v = int(ids[b, t])
                if v == USER_SLOT:
                    want[b, t] = rec.cie(batch["user_emb"][b])
                elif v == ITEM_SLOT:
                    want[b, t] = rec.cie(batch["item_emb"][b])
                else:
                    want[b, t] = table[v]
        # score == the full HF forward on the hand-built sequence, Yes - No at the last position
        logits = rec.llm(inputs_embeds=want, attention_mask=batch["attention_mask"]).logits
        return want, logits[:, -1, rec.yes_token_id] - logits[:, -1, rec.no_token_id]

    with torch.no_grad():
        want, want_score = hand_built(rec, batch)
        want64, want_score64 = hand_built(*fp64_copy(rec, batch))
        assert_close_to_oracle(got, want, want64, "input embeddings")
        assert_close_to_oracle(rec.score(batch), want_score, want_score64, "score")
    # slots need the embeddings; text-only prompts do not
    with pytest.raises(ValueError, match="user_emb and item_emb"):
        rec.embed({"input_ids": ids})
    plain = {"input_ids": ids.clamp_min(3), "attention_mask": batch["attention_mask"]}
    assert rec.score(plain).shape == (3,)


# --------------------------------------------------------------------------------------------
# LoRA vs peft


def _peft_pair(dropout, seed=0):
    peft = pytest.importorskip("peft")
    base = make_llm(seed)
    ref = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]
        ),
    )
    mods = apply_lora(base, rank=8, alpha=16, dropout=dropout, backend="torch")
    g = torch.Generator().manual_seed(3)
    ref_sd = ref.state_dict()
    with torch.no_grad():
        for path, m in mods.items():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
            key = f"base_model.model.{path}"
            ref_sd[f"{key}.lora_A.default.weight"].copy_(m.lora_A.weight)
            ref_sd[f"{key}.lora_B.default.weight"].copy_(m.lora_B.weight)
    return base, ref, mods


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_forward_matches_peft(backend):
    base, ref, mods = _peft_pair(0.05)
    assert sorted(p.rsplit(".", 1)[-1] for p in mods) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert [n for n, p in base.named_parameters() if p.requires_grad] == [
        n for n, p in base.named_parameters() if "lora_" in n
    ]
    for m in mods.values():
        m.backend = backend
    ids = torch.randint(3, 64, (2, 7))
    base.eval(), ref.eval()
    with torch.no_grad():
        want64 = copy.deepcopy(ref).double()(ids).logits
        assert_close_to_oracle(base(ids).logits, ref(ids).logits, want64, "logits vs peft")


class _ExplicitDropout(torch.nn.Module):
    """peft's ``lora_dropout`` replaced by the fused op's mask, applied by hand."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        keep = dropout_mask(tuple(x.shape), self.p, next(self.seeds), 0, x.device)
        return x * keep.to(x.dtype) / (1 - self.p)


def test_lora_training_with_dropout_matches_peft_outputs_and_gradients(monkeypatch):
    import itertools

    import llmrec_kernels.dropout as dropout

    base, ref, mods = _peft_pair(0.05)
    ref64 = copy.deepcopy(ref).double()
    ids = torch.randint(3, 64, (2, 7))
    base.train(), ref.train(), ref64.train()
    # The fused op draws one seed per call; peft's layers get the same seeds in the same call
    # order (q_proj, v_proj of each layer) and apply that seed's mask explicitly.
    seeds = {}
    # every eager seed of a patched projection comes from dropout.draw_seed (call_seed)
    monkeypatch.setattr(dropout, "draw_seed", lambda: next(seeds["fused"]))
    for model, key in ((ref, "ref"), (ref64, "ref64")):
        for m in model.modules():
            if hasattr(m, "lora_dropout") and "default" in getattr(m, "lora_dropout", {}):
                m.lora_dropout["default"] = _ExplicitDropout(0.05, _Seeds(seeds, key))
    outs = []
    for model, key in ((base, "fused"), (ref, "ref"), (ref64, "ref64")):
        seeds[key] = itertools.count(1000)
        outs.append(model(ids).logits)
        outs[-1].square().mean().backward()
    assert_close_to_oracle(*outs, "logits vs peft (dropout)")
    ref_params, ref64_params = dict(ref.named_parameters()), dict(ref64.named_parameters())
    for path, m in mods.items():
        key = f"base_model.model.{path}"
        for name in ("lora_A", "lora_B"):
            g_ref = ref_params[f"{key}.{name}.default.weight"].grad
            g_orc = ref64_params[f"{key}.{name}.default.weight"].grad
            assert_close_to_oracle(getattr(m, name).weight.grad, g_ref, g_orc, f"{path}.{name}")
    # the dropout is in play: without it the logits differ
    base.eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, outs[0])


class _Seeds:
    """An iterator over ``table[key]`` looked up at each draw (the table is refilled per run)."""

    def __init__(self, table, key):
        self.table, self.key = table, key

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.table[self.key])


def test_lora_eval_runs_the_fused_op(monkeypatch):
    import llmrec_kernels.lora as lora

    calls, dropout_ps = [], []
    real = lora.fused_cora_linear

    def spy(x, weight, lora_a, lora_b, *a, **k):
        calls.append(lora_a.shape)
        dropout_ps.append(k.get("dropout_p", 0.0))
        return real(x, weight, lora_a, lora_b, *a, **k)

    monkeypatch.setattr(lora, "fused_cora_linear", spy)
    base = make_llm()
    mods = apply_lora(base, backend="torch")
    base.eval()(torch.randint(3, 64, (2, 5)))
    assert len(calls) == len(mods) and all(s == (32, 8) for s in calls)  # one shared A
    # training with dropout: the fused op too, with its own dropout (no unfused fallback)
    calls.clear(), dropout_ps.clear()
    base.train()(torch.randint(3, 64, (2, 5)))
    assert len(calls) == len(mods) and all(p == 0.05 for p in dropout_ps)
    remove_lora(base)
    assert (
        not lora_modules(base) and type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    )


# --------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize(
    "stage,trains_cie,trains_lora",
    [("joint", True, True), ("cie", True, False), ("lora", False, True)],
)
def test_training_step_updates_only_the_stage(stage, trains_cie, trains_lora):
    rec = make_model(stage=stage, dropout=0.05)
    batch = slotted_batch(rec.tokenizer, ROWS)
    params = list(rec.trainable_parameters())
    assert params and all(p.requires_grad for p in params)
    frozen = [p for n, p in rec.llm.named_parameters() if "lora_" not in n]
    before = {k: v.detach().clone() for k, v in rec.trainable_state().items()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    rec.train()
    losses = []
    for _ in range(5):
        loss = rec.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in frozen)
    after = rec.trainable_state()
    for k, v in before.items():
        changed = not torch.equal(v, after[k].detach())
        assert changed == (trains_cie if k.startswith("cie.") else trains_lora), k


def test_save_and_load_trainable(tmp_path):
    rec = make_model(seed=0)
    path = tmp_path / "collm.safetensors"
    rec.save_trainable(path)
    other = make_model(seed=5)
    other.load_trainable(path)
    batch = slotted_batch(rec.tokenizer, ROWS)
    with torch.no_grad():
        rec64, batch64 = fp64_copy(rec, batch)
        want64 = rec64.score(batch64)
        assert_close_to_oracle(other.score(batch), rec.score(batch), want64, "reloaded score")
    wrong = CoLLMRecommender(make_llm(0), make_tokenizer(), CF_DIM + 1, backend="torch")
    with pytest.raises(ValueError, match="mismatched"):
        wrong.load_trainable(path)


@pytest.mark.parametrize("tuning", ["two-step", "one-step"])
def test_run_collm_end_to_end_on_synthetic_data(tmp_path, tuning):
    import json

    from llmrec import llm_training as T
    from llmrec.data import make_synthetic

    data = make_synthetic(n_users=40, n_items=30, per_user=10, seed=0)
    cfg = T.RunConfig(
        method="collm",
        out=str(tmp_path / "run"),
        tiny={"hidden_size": 32, "intermediate_size": 64, "vocab_size": 400},
        max_train_rows=48,
        max_valid_rows=24,
        max_test_rows=24,
        method_kwargs={"tuning": tuning, "backend": "torch"},
        train=T.TrainConfig(epochs=1, batch_size=16, eval_batch_size=32, progress=False),
    )
    metrics = T.run_training(cfg, data=data)
    run = tmp_path / "run"
    on_disk = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= on_disk["test"]["auc"] <= 1.0 and "uauc" in on_disk["test"]
    assert {"warm", "cold"} <= set(on_disk["test"])
    stages = [s["stage"] for s in metrics["train"]["stages"]]
    assert stages == (["lora", "cie"] if tuning == "two-step" else ["joint"])
    assert (run / "best.safetensors").exists()
    assert (run / "step1" / "best.safetensors").exists() == (tuning == "two-step")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`llmrec train --method collm` (two-step) on a small synthetic dataset."""
    from llmrec.cli import main
    from llmrec.data import make_synthetic, write_data

    root = tmp_path_factory.mktemp("collm_cli")
    data = write_data(make_synthetic(n_users=30, n_items=25, per_user=10, seed=1), root / "d")
    out = root / "collm"
    tiny = ["--tiny-hidden", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-kv-heads",
            "1", "--tiny-vocab", "400", "--backend", "torch", "--no-progress"]  # fmt: skip
    rc = main(["train", "--method", "collm", "--data", str(data), "--out", str(out), "--epochs", "1",
               "--batch-size", "16", "--max-train-rows", "32", "--max-valid-rows", "16",
               "--method-kwargs", '{"tuning": "two-step", "lora_max_steps": 1}', *tiny])  # fmt: skip
    assert rc == 0
    return out


def test_cli_train_and_evaluate_collm(cli_run):
    import json

    from llmrec.cli import main

    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["method"] == "collm" and metrics["train"]["stages"][0]["steps"] == 1
    assert main(["evaluate", "--run", str(cli_run), "--no-progress"]) == 0
    again = json.loads((cli_run / "eval_test.json").read_text())
    assert again["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def test_cli_recommend_with_retrieval(cli_run):
    import json

    from llmrec.cli import main

    pytest.importorskip("faiss")
    rc = main(["recommend", "--run", str(cli_run), "--retrieve", "5", "--index", "hnsw", "--users",
               "3", "--full-users", "1", "--top-n", "3", "--no-progress"])  # fmt: skip
    assert rc == 0
    rec = json.loads((cli_run / "recommend_k5_hnsw.json").read_text())
    assert rec["recommend"]["users"] == 3 and "full_catalogue" in rec["recommend"]
    assert set(rec["retrieval_only"]["indexes"]) == {"exact", "ivf", "hnsw"}
