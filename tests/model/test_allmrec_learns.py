"""A-LLMRec that learns (issue 29): distinct item soft tokens from small-magnitude MF
embeddings, standardisation statistics kept with the state, next-item stage-1 rows, and
the popularity / CF-dot baselines on the same ranking episodes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from llmrec.data.slots import ITEM_SLOT, USER_SLOT
from llmrec.methods.allmrec.episodes import Episode, EpisodeCollator
from llmrec.methods.allmrec.next_item_rows import NextItemRows
from llmrec.methods.allmrec.ranking_baselines import baseline_ranking
from llmrec.methods.allmrec.stage2_prompt import ALLMRec
from llmrec.methods.allmrec.standardize import Standardizer, table_statistics

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TINY = {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 400}


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of rows of ``x`` ``(n, d)``, in fp64."""
    x = F.normalize(x.double(), dim=-1)
    n = x.shape[0]
    return float(((x @ x.T).sum() - n) / (n * (n - 1)))


def soft_tokens(model: ALLMRec, coll: EpisodeCollator, items, uids):
    """``(item soft tokens (len(items), d_model), user soft tokens (len(uids), d_model))`` as
    the LLM sees them: :meth:`ALLMRec.embed` of prompts listing ``items`` as candidates."""
    eps = [Episode(int(u), [], [int(i) for i in items], int(items[0])) for u in uids]
    batch = coll(eps, "prompt")
    with torch.no_grad():
        emb = model.embed(batch)
    ids = batch["input_ids"]
    return emb[0][ids[0] == ITEM_SLOT], emb[ids == USER_SLOT]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A-LLMRec run end to end on synthetic data with the MF it trains itself (small
    entries, like ML-1M's), reopened from its best state."""
    from llmrec import llm_training as T
    from llmrec.data import make_synthetic

    data = make_synthetic(n_users=60, n_items=40, per_user=14, seed=3)
    out = tmp_path_factory.mktemp("allmrec") / "run"
    kw = {"text_encoder": "random", "stage1_epochs": 3, "candidates": 5, "train_candidates": 4,
          "episodes": 10, "valid_episodes": 8, "generate": False}  # fmt: skip
    cfg = T.RunConfig(
        method="allmrec", out=str(out), tiny=TINY, max_train_rows=40, max_valid_rows=20,
        max_test_rows=20, method_kwargs=kw, cf_dim=32,
        train=T.TrainConfig(epochs=1, batch_size=8, eval_batch_size=32, lr=1e-3, progress=False),
    )  # fmt: skip
    metrics = T.run_training(cfg, data=data)
    run = T.reopen_run(out, data=data, device="cpu", progress=False)
    return data, metrics, run


def test_item_soft_tokens_of_a_trained_run_are_distinct(trained_run):
    """The collapse of issue 29: MF entries of a few hundredths through the stage-1 sigmoid
    gave every item nearly the same soft token (mean pairwise cosine 0.9988 on ML-1M). The
    run's own MF is as small here; its item soft tokens must now point different ways."""
    data, _, run = trained_run
    item_table = run.ctx.item_table
    items = sorted(set(data["train"]["iid"].tolist()))
    assert float(item_table[items].abs().mean()) < 0.2  # MF-like small entries
    p = run.method._prompting(run.ctx)
    item_tok, user_tok = soft_tokens(run.model, p.coll, items, sorted(set(data["train"]["uid"])))
    assert item_tok.shape[0] == len(items)
    assert mean_pairwise_cosine(item_tok) < 0.5, mean_pairwise_cosine(item_tok)
    assert mean_pairwise_cosine(user_tok) < 0.5, mean_pairwise_cosine(user_tok)


def test_without_standardisation_the_same_tokens_collapse(trained_run):
    """The control: the same model with the identity statistics (the earlier behaviour)
    gives nearly parallel item soft tokens, so the test above can fail."""
    data, _, run = trained_run
    model = run.model
    saved = {k: v.clone() for k, v in model.trainable_state().items() if "_norm." in k}
    try:
        for norm in (model.user_norm, model.item_norm, model.latent_norm):
            norm.mean.zero_()
            norm.std.fill_(1.0)
        items = sorted(set(data["train"]["iid"].tolist()))
        p = run.method._prompting(run.ctx)
        item_tok, _ = soft_tokens(model, p.coll, items, [1])
        assert mean_pairwise_cosine(item_tok) > 0.95
    finally:
        with torch.no_grad():
            for k, v in model.trainable_state().items():
                if k in saved:
                    v.copy_(saved[k])


def test_run_reports_baselines_on_the_same_episodes_and_keeps_its_statistics(trained_run):
    data, metrics, run = trained_run
    test = metrics["test"]
    for key in ("hit@1", "popularity_hit@1", "cf_dot_hit@1", "cf_dot_ndcg@10"):
        assert key in test, key
    info = metrics["train"]["stages"][-1]
    assert info["valid_episodes"] == 8 and info["selected_on"] == "valid hit@1"
    # the statistics the model was evaluated with are the training tables' (input) and the
    # frozen stage-1 latents' ones, read back from the saved state
    model = run.model
    train = data["train"]
    mean, std = table_statistics(
        run.ctx.item_table, torch.as_tensor(train["iid"].to_numpy(np.int64, copy=True))
    )
    torch.testing.assert_close(model.item_norm.mean, mean)
    torch.testing.assert_close(model.item_norm.std, std)
    z = model.aligner.joint(model.item_norm(run.ctx.item_table)).detach()
    zmean, zstd = table_statistics(z, torch.as_tensor(train["iid"].to_numpy(np.int64, copy=True)))
    # the latent statistics came from the file: equal up to the recomputation's rounding
    torch.testing.assert_close(model.latent_norm.mean, zmean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.latent_norm.std, zstd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model.latent_norm.std, torch.ones_like(zstd))


def test_saved_state_carries_the_statistics(tmp_path):
    """Evaluation applies the statistics training used, not ones fitted on other tables."""
    from llmrec.tiny_llm import build_tiny_llm

    llm, tok = build_tiny_llm(["a b c"], config=TINY)
    g = torch.Generator().manual_seed(0)
    users, items = 0.05 * torch.randn(9, 6, generator=g), 0.05 * torch.randn(7, 6, generator=g)
    first = ALLMRec(llm, tok, cf_dim=6, text_dim=16, latent_dim=4)
    first.set_tables(items)
    first.fit_input_statistics(users)
    first.fit_latent_statistics()
    first.save_trainable(tmp_path / "state.safetensors")
    second = ALLMRec(llm, tok, cf_dim=6, text_dim=16, latent_dim=4, seed=1)
    second.set_tables(items * 3 + 1)
    second.fit_input_statistics(users * 2)
    second.load_trainable(tmp_path / "state.safetensors")
    for name in ("user_norm", "item_norm", "latent_norm"):
        for buf in ("mean", "std"):
            a, b = getattr(getattr(first, name), buf), getattr(getattr(second, name), buf)
            assert torch.equal(a, b), (name, buf)


def test_table_statistics_match_numpy_and_skip_the_padding_row():
    g = torch.Generator().manual_seed(1)
    table = 0.03 * torch.randn(12, 5, generator=g) + torch.linspace(-1, 1, 5)
    table[0] = 100.0  # the padding row must not count
    rows = torch.tensor([1, 3, 3, 4, 7, 11])
    mean, std = table_statistics(table, rows)
    ref = table.double().numpy()[[1, 3, 4, 7, 11]]  # each row once
    np.testing.assert_allclose(mean.numpy(), ref.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(std.numpy(), ref.std(0), rtol=1e-5)
    norm = Standardizer(5)
    norm.fit(table, rows)
    z = norm(table[[1, 3, 4, 7, 11]]).double()
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), 1.0, rtol=1e-4)
    off = Standardizer(5, enabled=False)
    off.fit(table, rows)
    assert torch.equal(off(table), table)
    with pytest.raises(ValueError, match="rows"):
        table_statistics(table, torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="table"):
        table_statistics(torch.ones(3, 2, dtype=torch.long))


def test_next_item_rows_pair_each_positive_with_an_unrated_negative():
    uid = np.array([1, 1, 2, 3])
    iid = np.array([4, 5, 4, 6])
    users = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    items = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2)
    text = -torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 5)
    seen = {1: {4, 5, 2}, 2: {4}, 3: {6, 7}}
    src = NextItemRows(uid, iid, users, {"item_emb": items, "text_emb": text}, np.arange(1, 8),
                       seen, seed=0)  # fmt: skip
    assert len(src) == 4 and (src.labels() == 1).all()
    for _ in range(20):
        b = src([0, 1, 2, 3])
        assert b["labels"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
        got_items = b["item_emb"][:, 0].long() // 2  # item id of every row
        assert got_items[:4].tolist() == [4, 5, 4, 6]
        assert torch.equal(b["text_emb"][:, 0], -got_items.float())
        assert torch.equal(b["user_emb"], users[torch.tensor([1, 1, 2, 3] * 2)])
        for u, neg in zip([1, 1, 2, 3], got_items[4:].tolist()):
            assert 1 <= neg <= 7 and neg not in seen[u]
    # the same draw sequence from the same seed
    again = NextItemRows(uid, iid, users, {"item_emb": items}, np.arange(1, 8), seen, seed=0)
    first = NextItemRows(uid, iid, users, {"item_emb": items}, np.arange(1, 8), seen, seed=0)
    assert torch.equal(again([0, 1, 2, 3])["item_emb"], first([0, 1, 2, 3])["item_emb"])


def test_baselines_rank_by_popularity_and_dot_product_by_hand():
    train = pd.DataFrame({"iid": [1, 1, 1, 2, 2, 3, 4], "label": [1, 1, 1, 1, 1, 1, 0]})
    users = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[0, 0], [0.1, 0.9], [0.5, 0.5], [0.9, 0.1], [0.2, 0.0]])
    eps = [
        Episode(1, [], [1, 2, 3], 3),  # popularity picks 1, dot product (user 1) picks 3
        Episode(2, [], [2, 1, 4], 1),  # popularity picks 1, dot product (user 2) picks 1
        Episode(2, [], [4, 3], 3),  # popularity: 3 beats 4; dot: 3 (0.1) beats 4 (0.0)
    ]
    m = baseline_ranking(eps, train, users, items, ks=(1, 2))
    assert m["popularity_hit@1"] == pytest.approx(2 / 3)
    assert m["cf_dot_hit@1"] == pytest.approx(1.0)
    # episode 1's target is last by popularity: NDCG@2 counts episodes 2 and 3 only
    assert m["popularity_ndcg@2"] == pytest.approx(2 / 3)
    # ties are broken at random, not in the target's favour: two unrated candidates
    tie = [Episode(1, [], [5, 6], 5) for _ in range(400)]
    more = torch.cat([items, torch.zeros(2, 2)])
    hit = baseline_ranking(tie, train, users, more, ks=(1,))["popularity_hit@1"]
    assert 0.4 < hit < 0.6


def test_allmrec_learns_an_answer_the_cf_embeddings_encode():
    """The oracle: users and items fall into four groups, a user's target is the one
    candidate of the user's group, and only the CF embeddings (MF-like: entries of a few
    hundredths around a shared offset) say which group a user is in. The titles' first word
    names the item's group, so the frozen LLM can express the answer; stage 2 must read it
    from the user's soft token. Held-out users, chance 1/4; without the standardisation
    (``standardize=False``, the earlier behaviour) the same 60 steps went from 0.2 to 0.3
    and this test failed (issue 29)."""
    from llmrec.methods.allmrec.episodes import hit_ndcg
    from llmrec.methods.allmrec.generation import score_episodes
    from llmrec.tiny_llm import build_tiny_llm

    words, nouns = ["red", "blue", "green", "gold"], ["river", "castle", "ship", "star"]
    titles = {1 + g * 4 + k: f"{w} {n}" for g, w in enumerate(words) for k, n in enumerate(nouns)}
    group = {i: (i - 1) // 4 for i in titles}
    # a random LLM whose logits respond to its inputs (the default 0.02 init is nearly
    # uniform over the vocabulary whatever the prompt)
    llm, tok = build_tiny_llm(
        [f'"{t}"' for t in titles.values()] * 3 + ["is a user representation. This user has"],
        config={**TINY, "num_hidden_layers": 1, "initializer_range": 0.5, "vocab_size": 300},
    )
    g = torch.Generator().manual_seed(1)
    n_users, d = 200, 16
    item = 0.03 * torch.randn(len(titles) + 1, d, generator=g) + 0.02
    user_group = np.random.default_rng(0).integers(0, 4, n_users + 1)
    centre = 0.03 * torch.randn(4, d, generator=g)
    user = centre[torch.as_tensor(user_group)] + 0.005 * torch.randn(n_users + 1, d, generator=g)
    user = user + 0.02

    def episodes(users, seed):
        rng, out = np.random.default_rng(seed), []
        for u in users:
            per_group = [[i for i in titles if group[i] == h] for h in range(4)]
            cands = [int(rng.choice(per_group[h])) for h in range(4)]
            rng.shuffle(cands)
            target = next(i for i in cands if group[i] == user_group[u])
            out.append(Episode(int(u), [], cands, target))
        return out

    train, test = episodes(range(1, 161), 0), episodes(range(161, 201), 1)
    model = ALLMRec(llm, tok, cf_dim=d, text_dim=16, latent_dim=8, seed=0)
    model.set_tables(item)
    model.fit_input_statistics(user)
    model.fit_latent_statistics()
    coll = EpisodeCollator(tok, titles, user)
    target_pos = np.array([ep.candidates.index(ep.target) for ep in test])

    def hit_at_1() -> float:
        scores = score_episodes(model, coll, test, batch_size=160, device="cpu")
        return hit_ndcg(scores, target_pos, [1])["hit@1"]

    before = hit_at_1()
    opt = torch.optim.Adam(list(model.trainable_parameters()), lr=1e-2)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(60):
        loss = model.loss(coll([train[j] for j in rng.choice(len(train), 16)], "target"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = hit_at_1()
    assert after >= 0.4 and after > before + 0.1, (before, after)


@pytest.mark.parametrize("hidden", [32, 96])
def test_soft_tokens_start_at_the_scale_of_the_llms_token_embeddings(hidden):
    """Xavier-initialised projections give soft tokens of norm ~0.65 sqrt(d_model) whatever
    the LLM: on SmolLM2 15.8 against its token embeddings' 3.2 (issue 29), so every soft
    token outweighs the text around it in the residual stream. ``embeddings``: a constant
    factor on the projections' outputs starts the user and item soft tokens at the LLM's
    mean token-embedding norm (here computed independently, in fp64); ``xavier`` (the
    default) keeps the reference's unscaled outputs, far off that scale."""
    from llmrec.tiny_llm import build_tiny_llm

    titles = {i: f"film {i}" for i in range(1, 31)}
    llm, tok = build_tiny_llm(
        [f'"{t}"' for t in titles.values()] + ["is a user representation"],
        config={**TINY, "hidden_size": hidden},
    )
    reference = float(llm.get_input_embeddings().weight.detach().double().norm(dim=-1).mean())
    g = torch.Generator().manual_seed(0)
    users = 0.03 * torch.randn(21, 16, generator=g) + 0.02  # MF-like: small entries
    items = 0.03 * torch.randn(31, 16, generator=g) + 0.02
    norms = {}
    for scale in ("embeddings", "xavier"):
        model = ALLMRec(llm, tok, cf_dim=16, text_dim=16, latent_dim=8, projection_scale=scale)
        model.set_tables(items)
        model.fit_input_statistics(users)
        model.fit_latent_statistics()
        coll = EpisodeCollator(tok, titles, users)
        item_tok, user_tok = soft_tokens(model, coll, list(range(1, 31)), range(1, 21))
        norms[scale] = (
            float(item_tok.double().norm(dim=-1).mean()),
            float(user_tok.double().norm(dim=-1).mean()),
        )
        # the rescaling changes no direction: the item tokens stay distinct
        assert mean_pairwise_cosine(item_tok) < 0.9
    for got in norms["embeddings"]:
        assert 0.8 < got / reference < 1.25, (got, reference)
    for got in norms["xavier"]:
        assert got / reference > 5, (got, reference)
    # the default is the reference's (rescaling showed no gain on SmolLM2, allmrec_probe.md)
    default = ALLMRec(llm, tok, cf_dim=16, text_dim=16, latent_dim=8)
    assert default.user_scale == default.item_scale == 1.0


def test_an_unknown_projection_scale_is_refused():
    from llmrec.tiny_llm import build_tiny_llm

    llm, tok = build_tiny_llm(["a b c"], config=TINY)
    with pytest.raises(ValueError, match="projection_scale"):
        ALLMRec(llm, tok, cf_dim=4, text_dim=16, latent_dim=8, projection_scale="huge")
