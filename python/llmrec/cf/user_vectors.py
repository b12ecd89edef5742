"""The user representation a CF run gives one row of data, for the LLM methods that read it.

MF and LightGCN represent a user by a row of their user table, the same for every row of
that user. A sequential model (SASRec) represents the user by its encoding of the row's own
history, as A-LLMRec's reference computes SASRec's ``log_feats`` of each sequence
(``ghdtjr/A-LLMRec``, ``models/a_llmrec_model.py``: ``self.recsys.model(u, seq, ...,
mode='log_only')``): a user first seen after the training period still gets a
representation, and a training row's does not include the row's own future. The exported
user table of a SASRec run holds each user's vector after the whole training period, zero
for a user without training positives (about half of ML-1M's test users in CoLLM's
time split), so looking it up loses the CF signal for those users.
:func:`load_user_vectors` returns the representation the CF run's model defines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from llmrec.cf.models import pad_histories

__all__ = ["UserVectors", "as_user_vectors", "load_user_vectors"]

#: histories encoded per forward of a sequential model
_ENCODE_BATCH = 1024


class UserVectors:
    """``(uids, histories) -> (B, d)`` float32: each row's user representation.

    Args:
        table: ``(n_users + 1, d)`` the CF run's exported user table.
        encoder: a sequential CF model with ``encode(his)`` (``his`` ``(B, L)`` int64,
            left-padded with 0) and ``max_len``; None: rows take their user's table row.
    """

    def __init__(self, table: torch.Tensor, encoder: Optional[nn.Module] = None):
        if table.dim() != 2:
            raise ValueError(f"table must be (n_users + 1, d), got {tuple(table.shape)}")
        self.table = table.detach().float()
        self.encoder = encoder
        if encoder is not None:
            encoder.eval().requires_grad_(False)

    @property
    def from_history(self) -> bool:
        """True when a row's vector is its history's encoding (a sequential CF model)."""
        return self.encoder is not None

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def __call__(
        self, uids: Union[torch.Tensor, np.ndarray, Sequence[int]], histories: Sequence
    ) -> torch.Tensor:
        """``(B, d)`` float32 on the table's device for ``B`` rows: their ``uids`` and, for a
        sequential model, their ``histories`` (sequences of item ids, oldest first)."""
        uids = torch.as_tensor(np.array(uids, np.int64))  # a copy: frames' arrays are read-only
        if self.encoder is None:
            return self.table[uids]
        if len(histories) != len(uids):
            raise ValueError(f"{len(uids)} uids but {len(histories)} histories")
        if len(uids) == 0:
            return self.table.new_zeros((0, self.dim))
        device = next(self.encoder.parameters()).device
        parts = []
        with torch.no_grad():
            for start in range(0, len(histories), _ENCODE_BATCH):
                his = pad_histories(histories[start : start + _ENCODE_BATCH], self.encoder.max_len)
                parts.append(self.encoder.encode(his.to(device)).float())
        return torch.cat(parts).to(self.table.device)

    def of_rows(self, frame) -> torch.Tensor:
        """``(len(frame), d)`` for a data frame's rows (``uid`` and, when needed, ``his``)."""
        his = frame["his"].tolist() if self.from_history else [()] * len(frame)
        return self(frame["uid"].to_numpy(np.int64), his)

    def of_episodes(self, episodes: Sequence) -> torch.Tensor:
        """``(len(episodes), d)`` for objects with ``uid`` (and ``his`` when needed)."""
        his = [list(e.his) for e in episodes] if self.from_history else [()] * len(episodes)
        return self([int(e.uid) for e in episodes], his)


def load_user_vectors(
    cf_path: Optional[Union[str, Path]], table: torch.Tensor, data
) -> UserVectors:
    """The user representation of the CF run at ``cf_path`` (its directory), given its
    exported user ``table``: SASRec runs encode each row's history with their trained model
    (``model.safetensors``, frozen, on the CPU); every other model, or an embeddings file
    given alone, looks the table up."""
    from llmrec.cf.cf_run import cf_run_config, load_cf_model
    from llmrec.input_digests import sequential_cf_run

    if cf_path is None or not sequential_cf_run(cf_path):
        return UserVectors(table)
    return UserVectors(table, load_cf_model(Path(cf_path), cf_run_config(Path(cf_path)), data))


def as_user_vectors(users: Union[UserVectors, torch.Tensor]) -> UserVectors:
    """``users`` itself, or a table ``(n_users + 1, d)`` as the :class:`UserVectors` that
    looks it up."""
    return users if isinstance(users, UserVectors) else UserVectors(users)
