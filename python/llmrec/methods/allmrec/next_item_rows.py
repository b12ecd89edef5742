"""Next-item rows with random negatives: the way A-LLMRec's stage 1 sees interactions.

ghdtjr/A-LLMRec trains its stage 1 on SASRec's next-item task: per user of a batch of 32,
the representation of the history, the next item (label 1) and one random item the user
never interacted with (label 0), drawn afresh every batch. :class:`NextItemRows` gives the
same pairs from this project's data: every positive training row ``(uid, iid)`` is a
positive (the item that came after the row's history), and each batch draws one random
unrated catalogue item per positive as its negative (:func:`llmrec.cf.next_item.draw_unrated`,
the sampler ``train-cf --objective next-item`` uses too).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from llmrec.cf.next_item import draw_unrated
from llmrec.cf.user_vectors import as_user_vectors

__all__ = ["NextItemRows"]


class NextItemRows:
    """Stage-1 batches of positives and random negatives.

    ``uid``, ``iid``: ``(N,)`` int arrays of positive interactions. ``users``: a
    :class:`~llmrec.cf.user_vectors.UserVectors` or a user table ``(n_users + 1, d)``;
    ``his``: each row's history (needed when ``users`` encodes histories); ``item_tables``: name -> ``(n_items + 1, d_name)`` float tables,
    looked up by item id (e.g. ``{"item_emb": cf_items, "text_emb": titles}``).
    ``catalogue``: the item ids negatives are drawn from; ``seen``: uid -> items never to
    draw as that user's negative (the positive itself is always excluded).

    ``source(indices)`` for ``B`` indices returns ``2B`` rows, the ``B`` positives then their
    ``B`` negatives: ``user_emb`` ``(2B, d)``, each name of ``item_tables`` ``(2B, d_name)``,
    ``labels`` ``(2B,)`` float32 (1 then 0). The mean losses over the ``2B`` rows are half
    the reference's sum of the positive and negative means, a constant factor Adam ignores.

    Negatives are drawn from a generator seeded by ``seed`` and the number of batches drawn
    so far: a run repeated from the start draws the same negatives; a resumed one draws new.
    """

    def __init__(
        self,
        uid: np.ndarray,
        iid: np.ndarray,
        users,
        item_tables: Mapping[str, torch.Tensor],
        catalogue: np.ndarray,
        seen: Optional[Mapping[int, set]] = None,
        seed: int = 0,
        his: Optional[Sequence] = None,
    ):
        self.uid = np.asarray(uid, np.int64)
        self.iid = np.asarray(iid, np.int64)
        if self.uid.shape != self.iid.shape or self.uid.ndim != 1:
            raise ValueError(f"uid and iid must be 1-D of one length, got {self.uid.shape}, "
                             f"{self.iid.shape}")  # fmt: skip
        self.catalogue = np.asarray(catalogue, np.int64)
        if len(self.catalogue) < 2:
            raise ValueError("catalogue must hold at least 2 items to draw negatives from")
        users = as_user_vectors(users)
        if users.from_history and (his is None or len(his) != len(self.uid)):
            raise ValueError("a history-encoding CF model needs his, one history per row")
        self.user_emb = users(self.uid, list(his) if users.from_history else [()] * len(self.uid))
        self.item_tables = {k: v.float() for k, v in item_tables.items()}
        if "user_emb" in self.item_tables or "labels" in self.item_tables:
            raise ValueError("item_tables may not be named 'user_emb' or 'labels'")
        self.seen = seen or {}
        self.seed, self.calls = int(seed), 0

    def __len__(self) -> int:
        return len(self.uid)

    def labels(self) -> np.ndarray:
        """Every row of the source is a positive."""
        return np.ones(len(self.uid), np.float32)

    def negatives(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random item per row of ``rows`` that its user never rated and is not its
        positive; ``(len(rows),)`` int64."""
        return draw_unrated(self.uid[rows], self.iid[rows], self.catalogue, self.seen, rng)

    def __call__(self, indices) -> Dict[str, torch.Tensor]:
        rows = np.asarray(indices, np.int64)
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        items = np.concatenate([self.iid[rows], self.negatives(rows, rng)])
        item_ids = torch.from_numpy(items)
        batch = {"user_emb": self.user_emb[torch.from_numpy(np.concatenate([rows, rows]))]}
        batch.update({k: v[item_ids] for k, v in self.item_tables.items()})
        batch["labels"] = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))])
        return batch
