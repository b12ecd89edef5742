"""Next-item pairs with random negatives: SASRec's training task, shared by the CF models
(``train-cf --objective next-item``) and A-LLMRec's stage 1 (``--stage1-rows next_item``).

SASRec (Kang & McAuley 2018; ghdtjr/A-LLMRec pre_train/sasrec) trains on every position of a
user's positive sequence: BCE of the next positive item (target 1) against one random item
the user never interacted with (target 0), drawn afresh. From this project's labelled rows:
every positive training row ``(uid, iid, his)`` is a positive (the item that came after the
row's history of earlier positives) and :func:`draw_unrated` gives its negative.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from llmrec.data.catalogue import seen_items

__all__ = ["NextItemPairs", "draw_unrated", "ranking_rows"]


def draw_unrated(
    users: np.ndarray,
    positives: np.ndarray,
    catalogue: np.ndarray,
    seen: Optional[Mapping[int, set]],
    rng: np.random.Generator,
) -> np.ndarray:
    """One random item of ``catalogue`` per row that is neither the row's positive nor in
    ``seen[user]``; ``users``, ``positives``: ``(N,)`` int; returns ``(N,)`` int64.

    Rejection sampling, one row after the other (the draws depend only on ``rng``'s state);
    a user with no item left to draw raises ``ValueError`` after 1,000 tries.
    """
    seen = seen or {}
    out = np.empty(len(users), np.int64)
    for k, (u, pos) in enumerate(zip(np.asarray(users).tolist(), np.asarray(positives).tolist())):
        banned = seen.get(int(u), set())
        for _ in range(1000):
            cand = int(catalogue[rng.integers(len(catalogue))])
            if cand != pos and cand not in banned:
                break
        else:
            raise ValueError(f"user {u} has no unrated catalogue item to draw as negative")
        out[k] = cand
    return out


class NextItemPairs:
    """The CF models' next-item training rows: each positive row of ``train_df`` (``uid``,
    ``iid``, ``label``, ``his``) with one negative, the same user and history, an item of
    ``1..n_items`` the user did not rate in ``train_df`` (either label).

    Only the training split bans negatives (as the reference bans the training sequence):
    banning the items a user rated in the validation or test split would feed their held-out
    interactions into training. The negatives of epoch ``e`` come from a generator seeded by
    ``(seed, e)``: a resumed run draws the ones the uninterrupted run drew.
    """

    def __init__(self, train_df: pd.DataFrame, n_items: int, seed: int = 0):
        self.positives = train_df[train_df["label"] == 1].reset_index(drop=True)
        if len(self.positives) == 0:
            raise ValueError("the training split has no positive rows to learn next items from")
        self.seen = seen_items({"train": train_df}, ("train",))
        self.catalogue = np.arange(1, n_items + 1, dtype=np.int64)
        if len(self.catalogue) < 2:
            raise ValueError("the catalogue must hold at least 2 items to draw negatives from")
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.positives)

    def negatives(self, epoch: int) -> torch.Tensor:
        """``(len(self),)`` int64 negative item of each positive row for ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        uid = self.positives["uid"].to_numpy(np.int64)
        iid = self.positives["iid"].to_numpy(np.int64)
        return torch.from_numpy(draw_unrated(uid, iid, self.catalogue, self.seen, rng))

    @staticmethod
    def pair(batch: Dict[str, torch.Tensor], negatives: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``B`` positive rows (tensors ``(B, ...)``) and their ``(B,)`` negatives -> ``2B``
        rows, the positives then the negatives (target 0, the same user and history)."""
        out = {k: torch.cat([v, v]) for k, v in batch.items() if k not in ("iid", "labels")}
        out["iid"] = torch.cat([batch["iid"], negatives])
        out["labels"] = torch.cat([torch.ones(len(negatives)), torch.zeros(len(negatives))])
        return out


def ranking_rows(data, split: str, seed: int = 0) -> pd.DataFrame:
    """The positive rows of ``data[split]`` (label 1) then, in the same order, one negative
    each (label 0): the same user and history, an item of ``1..n_items`` the user rated in
    neither the training split nor ``split``. The AUC of a model's scores on these rows is
    the next-item task's held-out measure (the chance a held-out positive outranks an unrated
    item, what A-LLMRec's ranking episodes ask); the draws are fixed by ``seed``."""
    df = data[split]
    pos = df[df["label"] == 1].reset_index(drop=True)
    if len(pos) == 0:
        raise ValueError(f"the {split!r} split has no positive rows to rank")
    seen = seen_items(data, ("train", split))
    rng = np.random.default_rng([int(seed), 1])
    neg = pos.copy()
    neg["iid"] = draw_unrated(pos["uid"].to_numpy(np.int64), pos["iid"].to_numpy(np.int64),
                              np.arange(1, data.n_items + 1, dtype=np.int64), seen, rng)  # fmt: skip
    neg["label"] = 0
    return pd.concat([pos, neg], ignore_index=True)
