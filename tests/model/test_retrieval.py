"""Retrieval-first recommendation (``llmrec.retrieval``): Faiss indexes, recall, LLM re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec.data.catalogue import title_map
from llmrec.retrieval import (
    ItemIndex,
    PairScorer,
    brute_force_topk,
    evaluate_retrieval,
    faiss_gpu_available,
    ranking_metrics,
    recall_at_k,
    recommend,
)

faiss = pytest.importorskip("faiss")


def tables(n_users=30, n_items=400, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(n_users + 1, dim, generator=g)
    item = torch.randn(n_items + 1, dim, generator=g)
    user[0] = item[0] = 0
    return user, item


@pytest.mark.parametrize("k", [1, 10, 50])
def test_exact_index_recall_is_one_against_brute_force(k):
    user, item = tables()
    q = user[1:]
    rng = np.random.default_rng(0)
    exclude = [
        set(rng.choice(np.arange(1, 401), size=int(rng.integers(0, 30))).tolist())
        for _ in range(len(q))
    ]
    for ex in (None, exclude):
        index = ItemIndex(item, "exact", use_gpu=False)
        scores, ids = index.search(q, k, ex)
        ref_s, ref_i = brute_force_topk(q, item, k, ex)
        assert ids.shape == (30, k) and (ids >= 1).all()  # padding row 0 never returned
        assert recall_at_k(ids, [set(r.tolist()) for r in ref_i]) == 1.0
        np.testing.assert_array_equal(ids, ref_i)
        # fp32 Faiss against the fp32 matrix product and an fp64 one over the same top-k ids.
        ref64 = np.einsum("qd,qkd->qk", q.double().numpy(), item.double().numpy()[ref_i])
        assert_close_to_oracle(torch.as_tensor(scores), torch.as_tensor(ref_s),
                               torch.as_tensor(ref64), "exact index scores")  # fmt: skip
        if ex is not None:
            assert all(not (set(r.tolist()) & e) for r, e in zip(ids, ex))


def test_index_over_a_subset_of_items_and_short_rows():
    user, item = tables(n_items=50)
    subset = np.arange(10, 20)
    index = ItemIndex(item, "exact", item_ids=subset, use_gpu=False)
    assert len(index) == 10
    _, ids = index.search(user[1:3], 5)
    assert set(ids.ravel().tolist()) <= set(subset.tolist())
    _, ref = brute_force_topk(user[1:3], item, 5, item_ids=subset)
    np.testing.assert_array_equal(ids, ref)
    # more excluded than available: the rest of the row is -1 / -inf
    scores, ids = index.search(user[1:2], 5, [set(range(10, 17))])
    assert ids[0, :3].tolist() and (ids[0, 3:] == -1).all() and np.isinf(scores[0, 3:]).all()
    with pytest.raises(ValueError, match="index kind"):
        ItemIndex(item, "lsh")
    with pytest.raises(ValueError, match="queries"):
        index.search(torch.zeros(2, 3), 5)


def test_approximate_indexes_against_exact():
    user, item = tables(n_items=2000, dim=16)
    q = user[1:]
    _, exact = ItemIndex(item, "exact", use_gpu=False).search(q, 20)
    # IVF probing every list is exact
    ivf_all = ItemIndex(item, "ivf", nlist=16, nprobe=16, use_gpu=False)
    np.testing.assert_array_equal(ivf_all.search(q, 20)[1], exact)
    for kind, kw in (("ivf", {"nprobe": 4}), ("hnsw", {})):
        _, ids = ItemIndex(item, kind, use_gpu=False, **kw).search(q, 20)
        overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, exact)])
        assert overlap > 0.5, (kind, overlap)


@pytest.mark.skipif(not faiss_gpu_available(), reason="Faiss has no GPU support here")
def test_gpu_index_matches_cpu():
    user, item = tables()
    cpu = ItemIndex(item, "exact", use_gpu=False).search(user[1:], 10)[1]
    gpu = ItemIndex(item, "exact", use_gpu=True)
    assert gpu.on_gpu
    np.testing.assert_array_equal(gpu.search(user[1:], 10)[1], cpu)


def test_ranking_metric_functions_by_hand():
    ranked = np.array([[5, 3, 9], [1, 2, 4]])
    relevant = [{3}, {7, 8}]
    assert recall_at_k(ranked, relevant) == pytest.approx(0.5)  # 1/1 and 0/2
    m = ranking_metrics(ranked, relevant, 2)
    assert m["hr@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((1 / np.log2(3)) / 2)
    assert m["recall@2"] == pytest.approx(0.5)


def synthetic():
    from llmrec.data import make_synthetic

    data, f = make_synthetic(
        n_users=40, n_items=60, per_user=15, dim=4, seed=0, return_factors=True
    )
    return (
        data,
        torch.as_tensor(f.user, dtype=torch.float32),
        torch.as_tensor(f.item, dtype=torch.float32),
    )


def test_evaluate_retrieval_reports_every_index_and_k():
    data, user, item = synthetic()
    out = evaluate_retrieval(user, item, data, ks=(5, 20), kinds=("exact", "ivf", "hnsw"))
    assert out["catalogue"] == 60 and out["users"] > 0
    for kind in ("exact", "ivf", "hnsw"):
        block = out["indexes"][kind]
        assert 0 <= block["recall@5"] <= block["recall@20"] <= 1
        assert block["search_ms_per_user"] >= 0
        if kind != "exact":
            assert 0 <= block["recall_vs_exact@20"] <= 1
    # with the generating factors, retrieval beats random (20 of 60 -> about 1/3)
    assert out["indexes"]["exact"]["recall@20"] > 0.4


class CountingModel(torch.nn.Module):
    """Stands in for an LLM method: scores = a fixed function of the item, counts calls."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def score(self, batch):
        self.rows += batch["input_ids"].shape[0]
        return -batch["item_emb"][:, 0]


def test_recommend_scores_only_k_candidates_per_user(tmp_path):
    from llmrec.data.batching import make_examples
    from llmrec.tiny_llm import train_tiny_tokenizer

    data, user, item = synthetic()
    titles = title_map(data)
    tok = train_tiny_tokenizer(list(titles.values()) * 2, vocab_size=300)
    model = CountingModel()
    scorer = PairScorer(
        "fake", titles, model=model, tokenizer=tok,
        examples=lambda df, t, **kw: make_examples(df, t, template="cora", **kw),
        user_table=user, item_table=item, batch_size=7,
    )  # fmt: skip
    res = recommend(scorer, data, 12, users=5, top_n=5, full_users=1, progress=False,
                    lists_path=str(tmp_path / "lists.csv"))  # fmt: skip
    assert res["users"] == 5
    full = res["full_catalogue"]
    # 5 users x 12 candidates, plus one user scored over the catalogue minus their seen items
    assert 5 * 12 < model.rows <= 5 * 12 + full["items_scored_per_user"]
    assert set(res["time_per_user_s"]) == {"search", "llm_score", "total"}
    assert full["time_per_user_s"] > 0 and full["speedup_of_retrieval"] > 0
    for block in (res["retrieval"], res["llm_rerank"]):
        assert 0 <= block["hr@5"] <= 1
    import pandas as pd

    lists = pd.read_csv(tmp_path / "lists.csv")
    assert len(lists) == 5 * 5 and lists.groupby("uid")["rank"].max().eq(5).all()


def test_recommend_with_cf_scorer_keeps_the_retrieval_order():
    data, user, item = synthetic()
    scorer = PairScorer("mf", title_map(data), user_table=user, item_table=item)
    res = recommend(scorer, data, 10, top_n=10, full_users=0, progress=False)
    for key, value in res["llm_rerank"].items():  # scoring by <e_u, e_i> again: same ranking
        assert value == pytest.approx(res["retrieval"][key]), key
