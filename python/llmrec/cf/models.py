"""Collaborative filtering models: MF, LightGCN and SASRec, scored as ``<e_u, e_i>`` logits.

Every model maps a batch (``uid``, ``iid`` (B,) long; SASRec also ``his`` (B, L) long,
left-padded with 0) to logits, and exports one ``user`` table ``(n_users + 1, d)`` and one
``item`` table ``(n_items + 1, d)`` (row 0 = padding) for the LLM methods.

* MF: ``logit = <p_u, q_i>``.
* LightGCN (He et al. 2020): embeddings propagated ``n_layers`` times over the symmetric
  normalised user-item graph of the training positives, averaged over layers.
* SASRec (Kang & McAuley 2018): a causal transformer over the user's positive history; the
  user vector is its output at the last position. The exported user table holds each
  user's vector after their whole training-period history (the per-row history is only
  used inside the CF model).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CF_MODELS", "LightGCN", "MatrixFactorization", "SASRec", "build_cf_model"]


class MatrixFactorization(nn.Module):
    kind = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.1):
        super().__init__()
        self.n_users, self.n_items, self.dim = n_users, n_items, dim
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.user(batch["uid"]) * self.item(batch["iid"])).sum(-1)

    @torch.no_grad()
    def export(self, data=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.weight.detach().clone(), self.item.weight.detach().clone()


class LightGCN(nn.Module):
    kind = "lightgcn"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        n_layers: int = 2,
        init_std: float = 0.1,
        train_df: Optional[pd.DataFrame] = None,
    ):
        super().__init__()
        self.n_users, self.n_items, self.dim, self.n_layers = n_users, n_items, dim, n_layers
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        self.register_buffer("graph", self._empty_graph(), persistent=False)
        if train_df is not None:
            self.set_graph(train_df)

    def _empty_graph(self) -> torch.Tensor:
        n = self.n_users + self.n_items + 2
        return torch.sparse_coo_tensor(
            torch.zeros((2, 0), dtype=torch.long), [], (n, n), check_invariants=False
        )

    def set_graph(self, train_df: pd.DataFrame) -> None:
        """The normalised adjacency of the positive (user, item) pairs of ``train_df``."""
        pos = train_df[train_df["label"] == 1]
        pairs = np.unique(pos[["uid", "iid"]].to_numpy(np.int64), axis=0)
        off = self.n_users + 1
        n = off + self.n_items + 1
        rows = np.concatenate([pairs[:, 0], pairs[:, 1] + off])
        cols = np.concatenate([pairs[:, 1] + off, pairs[:, 0]])
        deg = np.bincount(rows, minlength=n).astype(np.float64)
        with np.errstate(divide="ignore"):
            inv = np.where(deg > 0, deg**-0.5, 0.0)
        vals = inv[rows] * inv[cols]
        graph = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([rows, cols])),
            torch.from_numpy(vals).float(),
            (n, n),
            check_invariants=False,
        ).coalesce()
        self.graph = graph.to(self.user.weight.device)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat([self.user.weight, self.item.weight])
        layers = [emb]
        for _ in range(self.n_layers):
            emb = torch.sparse.mm(self.graph, emb)
            layers.append(emb)
        out = torch.stack(layers).mean(0)
        return out[: self.n_users + 1], out[self.n_users + 1 :]

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        users, items = self.propagate()
        return (users[batch["uid"]] * items[batch["iid"]]).sum(-1)

    @torch.no_grad()
    def export(self, data=None) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.propagate()
        return users.detach().clone(), items.detach().clone()


class SASRec(nn.Module):
    kind = "sasrec"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 1,
        max_len: int = 50,
        dropout: float = 0.2,
        init_std: float = 0.1,
    ):
        super().__init__()
        self.n_users, self.n_items, self.dim, self.max_len = n_users, n_items, dim, max_len
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item.weight, std=init_std)
        self.item.weight.data[0].zero_()
        nn.init.normal_(self.pos.weight, std=init_std)
        layer = nn.TransformerEncoderLayer(
            dim, n_heads, dim_feedforward=dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def encode(self, his: torch.Tensor) -> torch.Tensor:
        """``his`` (B, L) left-padded item ids -> the user vector (B, d) at the last position."""
        his = his[:, -self.max_len :]
        length = his.shape[1]
        pad = his == 0
        pad[:, -1] = False  # an empty history still attends to its last (padding) slot
        x = self.item(his) * self.dim**0.5 + self.pos.weight[-length:]
        x = self.drop(x)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=his.device), 1)
        h = self.encoder(x, mask=causal, src_key_padding_mask=pad)
        return self.norm(h[:, -1])

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.encode(batch["his"]) * self.item(batch["iid"])).sum(-1)

    @torch.no_grad()
    def export(self, data=None) -> tuple[torch.Tensor, torch.Tensor]:
        """User vectors from each user's positive training history (zeros for unseen users)."""
        users = torch.zeros(self.n_users + 1, self.dim, device=self.item.weight.device)
        if data is not None:
            train = data["train"]
            last: Dict[int, list] = {}
            for u, his, i, y in zip(train["uid"], train["his"], train["iid"], train["label"]):
                last[int(u)] = [*his, int(i)] if y else list(his)
            uids = torch.tensor(sorted(last))
            seqs = [last[int(u)] for u in uids]
            was_training = self.training
            self.eval()
            for start in range(0, len(seqs), 512):
                his = pad_histories(seqs[start : start + 512], self.max_len)
                users[uids[start : start + 512]] = self.encode(his.to(users.device))
            self.train(was_training)
        return users, self.item.weight.detach().clone()


def pad_histories(histories, max_len: int) -> torch.Tensor:
    """Left-pad lists of item ids (leading zeros dropped) to (B, L<=max_len), keeping the end."""
    seqs = [[int(v) for v in h if v][-max_len:] for h in histories]
    width = max(1, max((len(s) for s in seqs), default=1))
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            out[row, width - len(s) :] = torch.tensor(s)
    return out


CF_MODELS = {"mf": MatrixFactorization, "lightgcn": LightGCN, "sasrec": SASRec}


def build_cf_model(kind: str, n_users: int, n_items: int, **kwargs) -> nn.Module:
    if kind not in CF_MODELS:
        raise ValueError(f"unknown CF model {kind!r}; choose from {sorted(CF_MODELS)}")
    return CF_MODELS[kind](n_users, n_items, **kwargs)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.float())
