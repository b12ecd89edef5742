"""Tokenisation, left padding and batching of (prompt, CF embedding, label) examples.

Prompts are tokenised once (:func:`encode_prompts`); :class:`RecCollator` pads each batch on
the LEFT so every prompt's last token sits at position ``T - 1``, where the "Yes" logit is
read. :func:`make_examples` applies the length rule (:mod:`llmrec.data.lengths`: titles cut to
a token budget, then the oldest history titles dropped until the prompt fits ``max_length``);
:func:`encode_prompts` alone keeps, of a prompt longer than ``max_length``, its first token when
it is BOS and its last ``max_length - 1`` tokens.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from llmrec.data.lengths import TitleCutter, fit_history, refusal_line
from llmrec.data.prompts import MAX_HIS, TEMPLATES, build_prompt, build_prompts

__all__ = [
    "MODEL_KEYS",
    "RecCollator",
    "RecExamples",
    "encode_prompts",
    "make_examples",
    "pad_id_of",
    "recent_titles",
]

#: keys of a batch that the models' ``score`` / ``loss`` read
MODEL_KEYS = ("input_ids", "attention_mask", "user_emb", "item_emb", "labels")


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return int(tid)
    return 0


def recent_titles(
    titles: Sequence[str], max_his: int, cut: Optional[Callable[[str], str]] = None
) -> List[str]:
    """Steps 1 and 2 of the length rule: the last ``max_his`` non-empty titles of a history
    (oldest first), each passed through ``cut`` (a :class:`~llmrec.data.lengths.TitleCutter`)."""
    if max_his <= 0:
        return []
    kept = [t for t in titles if t][-max_his:]
    return [cut(t) for t in kept] if cut is not None else kept


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int = 512) -> List[List[int]]:
    """Token ids of each prompt (special tokens added as the tokenizer does), unpadded."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out: List[List[int]] = []
    bos = tokenizer.bos_token_id
    chunk = 1024
    for start in range(0, len(prompts), chunk):
        enc = tokenizer(list(prompts[start : start + chunk]), add_special_tokens=True)
        for ids in enc["input_ids"]:
            ids = list(ids)
            if len(ids) > max_length:
                keep_bos = bos is not None and ids[0] == bos
                ids = ([bos] if keep_bos else []) + ids[-(max_length - int(keep_bos)) :]
            out.append(ids)
    return out


class RecExamples(torch.utils.data.Dataset):
    """Tokenised prompts with their ids and labels; items are row indices."""

    def __init__(
        self,
        input_ids: List[List[int]],
        uid: np.ndarray,
        iid: np.ndarray,
        label: np.ndarray,
        not_cold: Optional[np.ndarray] = None,
    ):
        n = len(input_ids)
        if not (len(uid) == len(iid) == len(label) == n):
            raise ValueError("input_ids, uid, iid and label must have the same length")
        self.input_ids = input_ids
        self.uid = np.asarray(uid, dtype=np.int64)
        self.iid = np.asarray(iid, dtype=np.int64)
        self.label = np.asarray(label, dtype=np.float32)
        self.not_cold = (
            np.ones(n, dtype=np.int64) if not_cold is None else np.asarray(not_cold, np.int64)
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> int:
        return index

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])


def make_examples(
    df: pd.DataFrame,
    tokenizer,
    *,
    template: str = "cora",
    max_his: int = MAX_HIS,
    max_length: int = 512,
) -> RecExamples:
    """Build prompts for every row of a split frame and tokenise them.

    The length rule (:mod:`llmrec.data.lengths`) makes every prompt fit ``max_length``: titles
    cut to :data:`~llmrec.data.lengths.MAX_TITLE_TOKENS` tokens, then the oldest history
    titles dropped; a prompt that cannot fit with no history raises
    :class:`~llmrec.data.lengths.PromptTooLong`.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    cut = TitleCutter(tokenizer)
    histories = [recent_titles(h, max_his, cut) for h in df["his_title"]]
    targets = [cut(t) for t in df["title"]]
    prompts = build_prompts(histories, targets, template=template, max_his=max_his)
    ids = encode_prompts(tokenizer, prompts, max_length=sys.maxsize)  # nothing cut here
    refusal = refusal_line(
        f"a {template if template in TEMPLATES else 'custom'} prompt", max_length
    )
    for row in np.flatnonzero(np.array([len(x) for x in ids]) > max_length):

        def encode(his, target=targets[row]):
            text = build_prompt(his, target, template, max_his)
            return list(tokenizer(text, add_special_tokens=True)["input_ids"])

        ids[row] = fit_history(encode, histories[row], max_length, refusal)
    return RecExamples(
        ids,
        df["uid"].to_numpy(),
        df["iid"].to_numpy(),
        df["label"].to_numpy(),
        df["not_cold"].to_numpy() if "not_cold" in df.columns else None,
    )


class RecCollator:
    """Turn a list of row indices of a :class:`RecExamples` into a left-padded batch.

    The batch holds ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``user_emb``
    / ``item_emb`` (B, d_cf) float (rows of the frozen CF tables, zeros when no tables are
    given), ``labels`` (B,) float, plus ``uid``, ``iid``, ``index`` (B,) long for
    bookkeeping.
    """

    def __init__(
        self,
        examples: RecExamples,
        pad_id: int,
        user_table: Optional[torch.Tensor] = None,
        item_table: Optional[torch.Tensor] = None,
        cf_dim: int = 0,
    ):
        self.examples = examples
        self.pad_id = int(pad_id)
        self.user_table = user_table
        self.item_table = item_table
        self.cf_dim = int(user_table.shape[1]) if user_table is not None else cf_dim

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        """``(N,)`` prompt lengths (prediction batches rows of similar length together)."""
        return self.examples.lengths()

    def labels(self) -> np.ndarray:
        """``(N,)`` float32 labels, for the validation metric."""
        return self.examples.label

    def __call__(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        ex = self.examples
        idx = np.asarray(indices, dtype=np.int64)
        seqs = [ex.input_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            if s:
                input_ids[row, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
                mask[row, width - len(s) :] = 1
        uid = torch.from_numpy(ex.uid[idx])
        iid = torch.from_numpy(ex.iid[idx])
        if self.user_table is not None and self.item_table is not None:
            user_emb = self.user_table[uid].float()
            item_emb = self.item_table[iid].float()
        else:
            user_emb = torch.zeros((len(seqs), self.cf_dim))
            item_emb = torch.zeros((len(seqs), self.cf_dim))
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "user_emb": user_emb,
            "item_emb": item_emb,
            "labels": torch.from_numpy(ex.label[idx]),
            "uid": uid,
            "iid": iid,
            "index": torch.from_numpy(idx),
        }
