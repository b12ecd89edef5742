"""Retrieval-first recommendation: a Faiss index over CF item embeddings, then the LLM.

CoLLM-FaissRet's idea (its published code has no retrieval; this implements the paper's
description): instead of letting the LLM score every item of the catalogue for a user,
retrieve the top-K items by inner product ``<e_u, e_i>`` of the CF embeddings and let the
LLM score only those K.

* :class:`ItemIndex` — ``exact`` (``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, inner
  product) or ``hnsw`` (``IndexHNSWFlat``, inner product) over the item table; on a GPU
  build of Faiss with a CUDA device the exact and IVF indexes move to the GPU
  (``use_gpu="auto"``; HNSW has no GPU version and stays on the CPU). Items a user has
  already rated can be excluded (over-fetch, then filter).
* :func:`brute_force_topk` — the reference the exact index must match.
* :func:`evaluate_retrieval` — recall@K of the retrieved candidates against the user's test
  positives (retrieving from the whole catalogue), the approximate indexes' recall against
  the exact top-K, search time per user.
* :func:`recommend` — ``llmrec recommend --retrieve K``: per user, retrieve K, score them with
  a trained run's model (CoLLM, CoRA, ...), rank; HR/NDCG/recall@N of the LLM's top N
  against the retrieval order alone, and the end-to-end time per user for K candidates
  against scoring every item of the catalogue (measured on a few users).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Set, Union

import numpy as np
import pandas as pd
import torch

from llmrec.command_options import INDEX_KINDS  # the CLI's choices, defined once
from llmrec.data.catalogue import seen_items, test_positives, title_map, user_histories
from llmrec.run_store import RunLock
from llmrec.safe_files import atomic_write_json, write_csv

__all__ = [
    "INDEX_KINDS",
    "IVF_PROBE_SHARE",
    "ItemIndex",
    "PairScorer",
    "brute_force_topk",
    "evaluate_retrieval",
    "faiss_gpu_available",
    "load_pair_scorer",
    "ranking_metrics",
    "recall_at_k",
    "recommend",
    "seen_items",
    "test_positives",
    "title_map",
    "user_histories",
]


#: share of the IVF lists probed by default: the smallest round share reaching >= 95% of
#: the exact top-K on ML-1M (MF d 256: nprobe 24 of 57 lists gave 94-96%, 32 gave 97-98%)
IVF_PROBE_SHARE = 0.6
ArrayLike = Union[np.ndarray, torch.Tensor]


def _np32(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "retrieval needs Faiss: pip install faiss-cpu (or a GPU build of Faiss)"
        ) from exc
    return faiss


def faiss_gpu_available() -> bool:
    """True for a GPU build of Faiss that sees a CUDA device."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class ItemIndex:
    """A Faiss inner-product index over item embeddings.

    Args:
        item_emb: ``(n, d)`` embeddings; with ``item_ids=None`` row ``j`` is item ``j`` and
            row 0 (the padding row of the CF tables) is left out.
        kind: ``"exact"``, ``"ivf"`` or ``"hnsw"``.
        item_ids: ids of the rows to index (default ``1..n-1``).
        nlist / nprobe: IVF lists (default ``~sqrt(n)``) and lists probed per query
            (default :data:`IVF_PROBE_SHARE` of the lists, at least 8: on ML-1M's MF-256
            item embeddings it returns 97-98% of the exact top-10/50/100, where nprobe 8 of
            57 lists returned 72-80%; a smaller nprobe is faster and misses more).
        hnsw_m / ef_search: HNSW graph degree and search breadth (raised to the k asked).
        use_gpu: ``"auto"`` (GPU when Faiss has GPU support and a device), True or False.
    """

    def __init__(
        self,
        item_emb: ArrayLike,
        kind: str = "exact",
        *,
        item_ids: Optional[Sequence[int]] = None,
        nlist: Optional[int] = None,
        nprobe: Optional[int] = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        use_gpu: Union[str, bool] = "auto",
        seed: int = 0,
    ):
        faiss = _faiss()
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        emb = _np32(item_emb)
        if emb.ndim != 2:
            raise ValueError(f"item_emb must be 2-D (n, d), got shape {emb.shape}")
        if item_ids is None:
            ids = np.arange(1, emb.shape[0], dtype=np.int64)
            vectors = emb[1:]
        else:
            ids = np.asarray(item_ids, dtype=np.int64)
            vectors = emb[ids]
        if len(ids) == 0:
            raise ValueError("no items to index")
        self.kind, self.ids, self.dim = kind, ids, int(emb.shape[1])
        self.ef_search = ef_search
        t0 = time.perf_counter()
        if kind == "exact":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "ivf":
            # about sqrt(n) lists with >= 39 training points each (Faiss' k-means minimum)
            nlist = nlist or max(1, min(int(math.sqrt(len(ids))), len(ids) // 39))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(vectors)
            if nprobe is None:
                nprobe = max(8, math.ceil(IVF_PROBE_SHARE * nlist))
            index.nprobe = min(nprobe, nlist)
            self._quantizer = quantizer  # keep alive
        else:
            index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        index.add(vectors)
        self.nlist = nlist if kind == "ivf" else None
        self.nprobe = index.nprobe if kind == "ivf" else None
        want_gpu = faiss_gpu_available() if use_gpu == "auto" else bool(use_gpu)
        self.on_gpu = False
        if want_gpu and kind != "hnsw":
            if not faiss_gpu_available():
                raise ValueError("use_gpu=True but Faiss has no GPU support or sees no GPU")
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
            self.on_gpu = True
        self.index = index
        self.build_time_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "items": len(self),
            "dim": self.dim,
            "on_gpu": self.on_gpu,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "build_time_s": self.build_time_s,
        }

    def search(
        self,
        queries: ArrayLike,
        k: int,
        exclude: Optional[Sequence[Set[int]]] = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query by inner product: ``(scores, item ids)``, each ``(Q, k)``.

        ``exclude[q]`` is a set of item ids never returned for query ``q``. When fewer than
        ``k`` items remain, the rest of the row is ``-inf`` / ``-1``.
        """
        q = _np32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        extra = max((len(s) for s in exclude), default=0) if exclude is not None else 0
        fetch = min(len(self), k + extra)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, fetch)
        scores, rows = self.index.search(q, fetch)
        ids = np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for r in range(len(q)):
            keep = ids[r] >= 0
            if exclude is not None and exclude[r]:
                keep &= ~np.isin(ids[r], np.fromiter(exclude[r], dtype=np.int64))
            sel_i, sel_s = ids[r][keep][:k], scores[r][keep][:k]
            out_i[r, : len(sel_i)], out_s[r, : len(sel_s)] = sel_i, sel_s
        return out_s, out_i


def brute_force_topk(
    queries: ArrayLike,
    item_emb: ArrayLike,
    k: int,
    exclude: Optional[Sequence[Set[int]]] = None,
    item_ids: Optional[Sequence[int]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` by a full matrix product (the reference for :class:`ItemIndex`)."""
    q, emb = _np32(queries), _np32(item_emb)
    ids = np.arange(1, emb.shape[0]) if item_ids is None else np.asarray(item_ids, np.int64)
    scores = q @ emb[ids].T
    if exclude is not None:
        pos = {int(v): j for j, v in enumerate(ids)}
        for r, s in enumerate(exclude):
            cols = [pos[i] for i in s if i in pos]
            scores[r, cols] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def recall_at_k(retrieved: np.ndarray, relevant: Sequence[Set[int]]) -> float:
    """Mean over queries with a relevant item of ``|top-k ∩ relevant| / |relevant|``."""
    vals = [len(set(row.tolist()) & rel) / len(rel) for row, rel in zip(retrieved, relevant) if rel]
    return float(np.mean(vals)) if vals else float("nan")


def ranking_metrics(ranked: np.ndarray, relevant: Sequence[Set[int]], n: int) -> dict:
    """HR@n, recall@n and NDCG@n (binary gains) of ranked item lists."""
    hr, rec, ndcg = [], [], []
    disc = 1.0 / np.log2(np.arange(2, n + 2))
    for row, rel in zip(ranked, relevant):
        if not rel:
            continue
        hits = np.array([int(i) in rel for i in row[:n]], dtype=np.float64)
        hr.append(float(hits.any()))
        rec.append(hits.sum() / len(rel))
        ideal = disc[: min(len(rel), n)].sum()
        ndcg.append(float((hits * disc[: len(hits)]).sum() / ideal))
    f = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {f"hr@{n}": f(hr), f"recall@{n}": f(rec), f"ndcg@{n}": f(ndcg), "users": len(hr)}


def evaluate_retrieval(
    user_emb: ArrayLike,
    item_emb: ArrayLike,
    data,
    ks: Sequence[int] = (10, 50, 100),
    kinds: Sequence[str] = INDEX_KINDS,
    *,
    split: str = "test",
    exclude_seen: bool = True,
    item_ids: Optional[Sequence[int]] = None,
    use_gpu: Union[str, bool] = "auto",
    index_kwargs: Optional[dict] = None,
) -> dict:
    """Recall@K against the users' ``split`` positives, for every index kind and K.

    Also the approximate indexes' recall against the exact index's top-K (1.0 = identical
    candidates) and the search time per user (all users searched in one call).
    """
    pos = test_positives(data, split)
    users = sorted(pos)
    seen = seen_items(data) if exclude_seen else {}
    exclude = [seen.get(u, set()) for u in users]
    relevant = [pos[u] for u in users]
    queries = _np32(user_emb)[users]
    kmax = max(ks)
    out: Dict[str, dict] = {}
    exact_ids = None
    for kind in ["exact", *[k for k in kinds if k != "exact"]]:
        index = ItemIndex(
            item_emb, kind, item_ids=item_ids, use_gpu=use_gpu, **(index_kwargs or {})
        )
        t0 = time.perf_counter()
        _, ids = index.search(queries, kmax, exclude)
        per_user_ms = 1e3 * (time.perf_counter() - t0) / max(1, len(users))
        block = {"index": index.describe(), "search_ms_per_user": per_user_ms}
        for k in ks:
            block[f"recall@{k}"] = recall_at_k(ids[:, :k], relevant)
            if exact_ids is not None:
                block[f"recall_vs_exact@{k}"] = float(
                    np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, exact_ids)])
                )
        if kind == "exact":
            exact_ids = ids
        if kind in kinds:
            out[kind] = block
    n_items = len(item_ids) if item_ids is not None else _np32(item_emb).shape[0] - 1
    return {"users": len(users), "catalogue": n_items, "indexes": out}


# ---------------------------------------------------------------------------------------------
# LLM scoring of candidates


@dataclass
class PairScorer:
    """Scores ``(uid, iid)`` pairs with a finished run's model.

    ``score(uid, his, his_title, iids)`` builds one prompt per candidate (the user's history,
    the candidate's title) with the run's own prompt builder, batches them with the run's CF
    tables and returns the model's scores; CF runs score ``<e_u, e_i>``.
    """

    method: str
    titles: Dict[int, str]
    model: Optional[torch.nn.Module] = None
    tokenizer: object = None
    examples: Optional[Callable] = None
    user_table: Optional[torch.Tensor] = None
    item_table: Optional[torch.Tensor] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64
    max_his: int = 10
    max_length: int = 512

    @torch.no_grad()
    def score(self, uid: int, his: list, his_title: list, iids: Sequence[int]) -> np.ndarray:
        iids = [int(i) for i in iids]
        if self.model is None:  # CF run: the inner product
            return (self.item_table[iids] @ self.user_table[uid]).float().numpy()
        from llmrec.data.batching import MODEL_KEYS, RecCollator, pad_id_of

        n = len(iids)
        df = pd.DataFrame(
            {
                "uid": np.full(n, uid, dtype=np.int64),
                "iid": np.asarray(iids, dtype=np.int64),
                "label": np.zeros(n, dtype=np.int64),
                "his": [his] * n,
                "his_title": [his_title] * n,
                "title": [self.titles.get(i, "") for i in iids],
                "not_cold": np.ones(n, dtype=np.int64),
            }
        )
        ex = self.examples(df, self.tokenizer, max_his=self.max_his, max_length=self.max_length)
        coll = RecCollator(ex, pad_id_of(self.tokenizer), self.user_table, self.item_table)
        out = np.empty(n, dtype=np.float64)
        self.model.eval()
        for start in range(0, n, self.batch_size):
            idx = list(range(start, min(n, start + self.batch_size)))
            batch = coll(idx)
            batch = {k: batch[k].to(self.device) for k in MODEL_KEYS}
            out[start : start + len(idx)] = self.model.score(batch).float().cpu().numpy()
        return out


def load_pair_scorer(
    run_dir,
    data=None,
    *,
    data_path: Optional[str] = None,
    device: str = "auto",
    batch_size: int = 64,
) -> tuple[PairScorer, object]:
    """``(PairScorer, data)`` for a run written by ``llmrec train`` or ``llmrec train-cf``."""
    from llmrec.cf import load_cf_embeddings
    from llmrec.data import load_run_data
    from llmrec.errors import RunConfigError
    from llmrec.llm_training import reopen_run
    from llmrec.run_store import read_run_info

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if info.get("kind") == "cf":
        data = data if data is not None else load_run_data(data_path or info["config"].get("data"))
        emb = load_cf_embeddings(run_dir, data.n_users, data.n_items)
        scorer = PairScorer(
            info.get("model", "cf"), title_map(data), user_table=emb.user, item_table=emb.item
        )
        return scorer, data
    run = reopen_run(run_dir, data_path=data_path, device=device, progress=False, data=data)
    ctx, method = run.ctx, run.method
    if not method.uses_cf:
        raise RunConfigError(
            f"{run_dir}: method {method.name!r} has no CF embeddings to retrieve with"
        )
    if not callable(getattr(run.model, "score", None)):
        raise RunConfigError(
            f"{run_dir}: method {method.name!r} has no pointwise score(batch); retrieve-then-"
            "score works with the scoring methods (collm, cora, ...) and CF runs"
        )
    scorer = PairScorer(
        method.name,
        title_map(ctx.data),
        model=run.model,
        tokenizer=ctx.tokenizer,
        examples=lambda df, tok, **kw: method.source(ctx, df).examples,
        user_table=ctx.user_table,
        item_table=ctx.item_table,
        device=ctx.device,
        batch_size=batch_size,
        max_his=ctx.cfg.max_his,
        max_length=ctx.cfg.max_length,
    )
    return scorer, ctx.data


def recommend(
    scorer: PairScorer,
    data,
    k: int,
    *,
    index_kind: str = "exact",
    users: Optional[int] = None,
    top_n: int = 10,
    full_users: int = 2,
    split: str = "test",
    exclude_seen: bool = True,
    seed: int = 0,
    use_gpu: Union[str, bool] = "auto",
    lists_path: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Retrieve ``k`` candidates per user, score them with the LLM, rank; report quality/time.

    Users: those with a positive in ``split`` (a random ``users`` of them when given). The
    prompt history is the user's history at their first ``split`` row. Reported: retrieval
    recall@k (from the whole catalogue), HR/recall/NDCG@``top_n`` of the LLM's ranking of the
    k candidates and of the retrieval order alone, and seconds per user end to end (search,
    prompts, LLM) for k candidates against all catalogue items (the latter on ``full_users``
    users; their full-catalogue ranking quality is reported too).
    """
    from tqdm.auto import tqdm

    titles = scorer.titles
    catalogue = np.array(sorted(i for i in titles if 1 <= i < scorer.item_table.shape[0]), np.int64)
    pos = test_positives(data, split)
    hist = user_histories(data, split)
    pool = sorted(u for u in pos if u in hist)
    if users is not None and users < len(pool):
        rng = np.random.default_rng(seed)
        pool = sorted(rng.choice(pool, size=users, replace=False).tolist())
    seen = seen_items(data) if exclude_seen else {}
    index = ItemIndex(scorer.item_table, index_kind, item_ids=catalogue, use_gpu=use_gpu)
    relevant = [pos[u] for u in pool]
    retrieved, reranked = [], []
    t_search = t_score = 0.0
    lists = []
    for u in tqdm(pool, desc=f"recommend k={k}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        _, ids = index.search(scorer.user_table[u : u + 1], k, [seen.get(u, set())])
        t1 = time.perf_counter()
        cand = ids[0][ids[0] >= 0]
        his, his_title = hist[u]
        scores = scorer.score(u, his, his_title, cand)
        order = np.argsort(-scores, kind="stable")
        t_score += time.perf_counter() - t1
        t_search += t1 - t0
        retrieved.append(ids[0])
        reranked.append(np.pad(cand[order], (0, k - len(cand)), constant_values=-1))
        lists.extend(
            (u, r + 1, int(cand[j]), float(scores[j])) for r, j in enumerate(order[:top_n])
        )
    retrieved_a, reranked_a = np.array(retrieved), np.array(reranked)
    n_users = max(1, len(pool))
    result = {
        "k": k,
        "index": index.describe(),
        "users": len(pool),
        "top_n": top_n,
        "retrieval": {
            f"recall@{k}": recall_at_k(retrieved_a, relevant),
            **ranking_metrics(retrieved_a, relevant, top_n),
        },
        "llm_rerank": ranking_metrics(reranked_a, relevant, top_n),
        "time_per_user_s": {
            "search": t_search / n_users,
            "llm_score": t_score / n_users,
            "total": (t_search + t_score) / n_users,
        },
    }
    # scoring every item of the catalogue, on a few users
    full_pool = pool[: max(0, full_users)]
    if full_pool:
        t0 = time.perf_counter()
        full_ranked, n_scored = [], []
        for u in full_pool:
            cand = np.array([i for i in catalogue if i not in seen.get(u, set())], np.int64)
            n_scored.append(len(cand))
            scores = scorer.score(u, *hist[u], cand)
            full_ranked.append(cand[np.argsort(-scores, kind="stable")][:top_n])
        per_user = (time.perf_counter() - t0) / len(full_pool)
        sub_rel = [pos[u] for u in full_pool]
        idx = [pool.index(u) for u in full_pool]
        result["full_catalogue"] = {
            "users": len(full_pool),
            "catalogue": len(catalogue),
            "items_scored_per_user": float(np.mean(n_scored)),
            "time_per_user_s": per_user,
            "speedup_of_retrieval": per_user / max(1e-12, result["time_per_user_s"]["total"]),
            "llm_full": ranking_metrics(np.array(full_ranked), sub_rel, top_n),
            "llm_rerank_same_users": ranking_metrics(reranked_a[idx], sub_rel, top_n),
        }
    if lists_path:
        write_csv(lists_path, pd.DataFrame(lists, columns=["uid", "rank", "iid", "score"]))
    return result


def run_recommend(
    run_dir,
    k: int,
    *,
    index_kind: str = "exact",
    users: Optional[int] = None,
    top_n: int = 10,
    full_users: int = 2,
    data_path: Optional[str] = None,
    device: str = "auto",
    batch_size: int = 64,
    out: Optional[str] = None,
    lists_path: Optional[str] = None,
    retrieval_ks: Sequence[int] = (10, 50, 100),
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """``llmrec recommend --run RUN --retrieve K``: writes ``RUN/recommend_k<K>_<index>.json``.

    Holds the run directory's lock while it reads the run and writes into it, as ``evaluate``
    does: never beside a process that is training into the same directory.
    """
    lock = RunLock(run_dir, "recommend") if os.access(run_dir, os.W_OK) else None
    try:
        return _run_recommend_locked(
            run_dir, k, index_kind=index_kind, users=users, top_n=top_n, full_users=full_users,
            data_path=data_path, device=device, batch_size=batch_size, out=out,
            lists_path=lists_path, retrieval_ks=retrieval_ks, progress=progress, seed=seed,
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _run_recommend_locked(
    run_dir, k, *, index_kind, users, top_n, full_users, data_path, device, batch_size, out,
    lists_path, retrieval_ks, progress, seed,
) -> dict:  # fmt: skip
    start = time.perf_counter()
    scorer, data = load_pair_scorer(
        run_dir, data_path=data_path, device=device, batch_size=batch_size
    )
    catalogue = sorted(i for i in scorer.titles if 1 <= i < scorer.item_table.shape[0])
    if k > len(catalogue):  # before any index or candidate table is allocated
        from llmrec.errors import RunConfigError

        raise RunConfigError(
            f"--retrieve {k}: the catalogue has {len(catalogue)} items; choose K <= "
            f"{len(catalogue)}"
        )
    result = {
        "method": scorer.method,
        "run": str(run_dir),
        "recommend": recommend(
            scorer, data, k, index_kind=index_kind, users=users, top_n=top_n,
            full_users=full_users, lists_path=lists_path, progress=progress, seed=seed,
        ),
        "retrieval_only": evaluate_retrieval(
            scorer.user_table, scorer.item_table, data, ks=sorted({*retrieval_ks, k}), item_ids=catalogue
        ),
        "wall_time_s": None,
    }  # fmt: skip
    result["wall_time_s"] = time.perf_counter() - start
    target = Path(out) if out else Path(run_dir) / f"recommend_k{k}_{index_kind}.json"
    atomic_write_json(target, result)
    return result
