"""Non-LLM baselines on ranking episodes: item popularity and the CF dot product.

A ranking method's Hit@1 among ``C`` candidates means little alone (chance is ``1 / C``):
A-LLMRec's 0.045 among 20 on SmolLM2 was below both ranking by training popularity and by
the MF dot product on episodes of the same kind (issue 29). :func:`baseline_ranking` scores
*the same* episodes by both, so they are reported side by side.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

from llmrec.cf.user_vectors import as_user_vectors

__all__ = ["baseline_ranking", "episode_grid", "popularity_counts", "ranks_of_targets"]


def popularity_counts(uid_iid_label, n_items: int) -> np.ndarray:
    """``(n_items + 1,)`` float64 number of positive rows per item id of a frame with
    ``iid`` and ``label`` columns (the training split)."""
    pos = uid_iid_label[uid_iid_label["label"] == 1]["iid"].to_numpy(np.int64)
    if len(pos) and (pos.min() < 0 or pos.max() > n_items):
        raise ValueError(f"item ids must lie in [0, {n_items}]")
    return np.bincount(pos, minlength=n_items + 1).astype(np.float64)


def episode_grid(episodes: Sequence, item_scores) -> tuple[np.ndarray, np.ndarray]:
    """``(E, C)`` float64 scores of every candidate (``-inf`` past an episode's last one) and
    ``(E,)`` int64 positions of the targets. ``item_scores(e, candidates)`` returns the
    scores ``(len(candidates),)`` of episode ``e``'s candidates."""
    width = max((len(ep.candidates) for ep in episodes), default=0)
    grid = np.full((len(episodes), width), -np.inf)
    target_pos = np.empty(len(episodes), np.int64)
    for e, ep in enumerate(episodes):
        grid[e, : len(ep.candidates)] = item_scores(ep, np.asarray(ep.candidates, np.int64))
        target_pos[e] = list(ep.candidates).index(ep.target)
    return grid, target_pos


def ranks_of_targets(grid: np.ndarray, target_pos: np.ndarray, seed: int = 0) -> np.ndarray:
    """0-based rank of each episode's target in its row of ``grid`` ``(E, C)``, ties broken
    at random (popularity ties a lot: counting a tie as a win would flatter it)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(grid))
    target = grid[rows, target_pos][:, None]
    above = (grid > target).sum(1)
    tied = (grid == target).sum(1) - 1  # other candidates with the target's score
    return above + np.floor(rng.random(len(grid)) * (tied + 1)).astype(np.int64)


def _metrics(ranks: np.ndarray, ks: Sequence[int], prefix: str) -> Dict[str, float]:
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"{prefix}hit@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        ndcg = np.where(hit, 1.0 / np.log2(ranks + 2), 0.0)
        out[f"{prefix}ndcg@{k}"] = float(ndcg.mean()) if len(ranks) else float("nan")
    return out


def baseline_ranking(
    episodes: Sequence,
    train_df,
    users,
    item_table: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    seed: int = 0,
) -> Dict[str, float]:
    """Hit@K / NDCG@K of two baselines on ``episodes`` (objects with ``uid``, ``his``,
    ``candidates``, ``target``): ``popularity_*`` ranks candidates by their positive training
    rows in ``train_df`` (``iid``, ``label``); ``cf_dot_*`` by ``<e_u, e_i>``, ``e_u`` each
    episode's user representation from ``users`` (a
    :class:`~llmrec.cf.user_vectors.UserVectors`, or a user table ``(n_users + 1, d)``) and
    ``e_i`` rows of ``item_table`` ``(n_items + 1, d)`` (float). Ties are broken at random
    (``seed``). Keys: ``popularity_hit@1``, ``cf_dot_ndcg@10``, ...
    """
    users = as_user_vectors(users)
    if item_table.dim() != 2 or users.dim != item_table.shape[1]:
        raise ValueError(
            f"the user vectors ({users.dim}) and item_table {tuple(item_table.shape)} must be "
            "(n, d) of one d"
        )
    counts = popularity_counts(train_df, item_table.shape[0] - 1)
    user_of = users.of_episodes(episodes).double().cpu().numpy()
    row_of = {id(ep): e for e, ep in enumerate(episodes)}
    items = item_table.detach().double().cpu().numpy()
    out: Dict[str, float] = {}
    for name, score in (
        ("popularity_", lambda ep, cands: counts[cands]),
        ("cf_dot_", lambda ep, cands: items[cands] @ user_of[row_of[id(ep)]]),
    ):
        grid, tpos = episode_grid(episodes, score)
        out.update(_metrics(ranks_of_targets(grid, tpos, seed), ks, name))
    return out
