"""A-LLMRec's ranking episodes: the prompt, its tokenisation and the candidate pairs.

An :class:`Episode` is one prompt: a user, their history and a candidate set holding the
item whose title is the target. :func:`make_episodes` draws ranking episodes (a positive row's
item among random items the user never rated), :func:`row_episodes` turns a split's rows into
pointwise episodes (a user's rows as the candidate set). :class:`EpisodeCollator` tokenises
them, with a slot after the user marker and after every title
(:func:`llmrec.data.slots.encode_slotted`); :class:`EpisodeBatches` feeds stage-2 training,
:class:`CandidatePairs` the scored evaluation, whose metric is :data:`HIT_AT_1`. The model
that fills the slots and scores the titles is :class:`~llmrec.methods.allmrec.stage2_prompt.ALLMRec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from llmrec.cf.user_vectors import as_user_vectors
from llmrec.data.batching import pad_id_of
from llmrec.data.lengths import PromptTooLong, TitleCutter, fit_history, refusal_line
from llmrec.data.slots import Slot, encode_slotted, slot_marker
from llmrec.errors import LLMRecError
from llmrec.training_loop import Metric

__all__ = [
    "HIT_AT_1",
    "IGNORE",
    "PROMPT_HEAD",
    "PROMPT_MID",
    "PROMPT_TAIL",
    "CandidatePairs",
    "Episode",
    "EpisodeBatches",
    "EpisodeCollator",
    "allmrec_pieces",
    "hit_ndcg",
    "make_episodes",
    "prompt_batches",
    "recent_items",
    "row_episodes",
    "target_text",
]

IGNORE = -100
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


def recent_items(his: Sequence[int], titles: Mapping[int, str], max_his: int) -> List[int]:
    """The last ``max_his`` items of a history (oldest first) that have a title."""
    if max_his <= 0:
        return []
    return [int(i) for i in his if int(i) != 0 and int(i) in titles][-max_his:]


def allmrec_pieces(
    his: Sequence[int], candidates: Sequence[int], titles: Mapping[int, str], max_his: int = 10
) -> list:
    """A-LLMRec's prompt as pieces: the user slot first, an item slot after every title."""
    his = recent_items(his, titles, max_his)
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
    items = set(catalogue.tolist())

    def sample(n: int, exclude: set) -> List[int]:
        # rejection sampling never ends when fewer than n items are left: say so instead
        # (counted only when the exclusions alone could leave too few: a walk over the
        # user's rated items per positive row otherwise)
        left = len(items) - len(exclude)
        if left < n:
            left = len(items) - sum(1 for i in exclude if i in items)
        if left < n:
            raise LLMRecError(
                f"{n} negative candidates are needed but only {left} of the {len(items)} "
                "catalogue items are left after the user's rated items; lower "
                "--allmrec-train-candidates / --allmrec-candidates"
            )
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
    Each user's rows are shuffled by a generator of ``(seed, uid)``, so a user's episodes
    do not depend on the other users of ``df`` (chunked scoring of whole users).
    Returns the episodes and, for each, the row index in ``df``."""
    eps, rows = [], []
    for uid, g in df.groupby("uid", sort=True):
        idx = g.index.to_numpy().copy()
        np.random.default_rng([seed, int(uid)]).shuffle(idx)
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
        users,
        *,
        max_his: int = 10,
        max_length: int = 1024,
    ):
        # step 1 of the length rule (llmrec.data.lengths): every title in a prompt, and so
        # every generated title's reference, is cut to MAX_TITLE_TOKENS tokens
        cut = TitleCutter(tokenizer)
        # a UserVectors (a sequential CF model encodes each episode's history) or a table
        self.tok, self.users = tokenizer, as_user_vectors(users)
        self.titles = {item: cut(title) for item, title in titles.items()}
        self.max_his, self.max_length = max_his, max_length
        self.refusal = refusal_line(
            "an A-LLMRec prompt with its longest candidate and target titles", max_length,
            "A-LLMRec takes at least 1024; or lower --allmrec-candidates / "
            "--allmrec-train-candidates",
        )  # fmt: skip
        self.pad = pad_id_of(tokenizer)
        self.marker = slot_marker(tokenizer)
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
        # steps 2 to 4 of the length rule (llmrec.data.lengths): the oldest history items
        # (titles and their slots) are dropped until the prompt and the longest title of its
        # candidates fit, so the prompt keeps the same history whichever candidate follows it
        # (training's target batches and scoring's candidate batches agree)
        room = max((len(self.target_ids(item)) for item in ep.candidates), default=0)

        def encode_prompt(his: Sequence[int]) -> tuple[List[int], List[int]]:
            pieces = allmrec_pieces(his, ep.candidates, self.titles, len(his))
            return encode_slotted(self.tok, pieces, marker=self.marker)

        ids, items = fit_history(
            encode_prompt, recent_items(ep.his, self.titles, self.max_his), self.max_length,
            self.refusal, size=lambda encoded: len(encoded[0]) + room,
        )  # fmt: skip
        n_prompt = len(ids)
        if mode == "target":
            ids = ids + self.target_ids(ep.target if target is None else target)
        if len(ids) > self.max_length:  # a target that is none of the candidates
            raise PromptTooLong(self.refusal(len(ids)))
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
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "slot_items": slot_items,
            "user_emb": self.users.of_episodes(episodes),
            "labels": labels,
        }

    def candidates(
        self, episodes: Sequence[Episode], pairs: Sequence[tuple[int, int]]
    ) -> Dict[str, torch.Tensor]:
        """A batch of (episode, candidate) pairs whose prompts are encoded once.

        ``pairs``: ``(j, item)``, ``episodes[j]``'s prompt followed by ``item``'s title. The
        batch is the ``"prompt"``-mode batch of the episodes the pairs use (``U`` rows), plus
        ``cand_ids`` ``(P, S)`` int64, each pair's title ids + EOS, right-padded;
        ``cand_mask`` ``(P, S)``; ``cand_prompt`` ``(P,)``, the row of the pair's prompt.
        :meth:`ALLMRec.candidate_logprob` scores it; ``"target"`` batches of the same pairs
        give the same log-likelihoods, with every prompt run once per pair.
        """
        used = sorted({j for j, _ in pairs})
        row = {j: r for r, j in enumerate(used)}
        batch = self([episodes[j] for j in used], "prompt")
        titles = [self.target_ids(item) for _, item in pairs]
        width = max(len(t) for t in titles)
        ids = torch.full((len(pairs), width), self.pad, dtype=torch.long)
        cmask = torch.zeros((len(pairs), width), dtype=torch.long)
        for r, t in enumerate(titles):
            ids[r, : len(t)] = torch.as_tensor(t, dtype=torch.long)
            cmask[r, : len(t)] = 1
        batch["cand_ids"], batch["cand_mask"] = ids, cmask
        batch["cand_prompt"] = torch.as_tensor([row[j] for j, _ in pairs], dtype=torch.long)
        return batch


class EpisodeBatches:
    """Stage-2 training batches: episodes with their target title (``mode="target"``)."""

    def __init__(self, coll: EpisodeCollator, episodes: Sequence[Episode]):
        self.coll, self.episodes = coll, list(episodes)

    def __len__(self) -> int:
        return len(self.episodes)

    def __call__(self, indices) -> Dict[str, torch.Tensor]:
        return self.coll([self.episodes[int(j)] for j in indices], "target")


def prompt_batches(prompt_of: Sequence[int], batch_size: int) -> List[tuple[int, int]]:
    """``[start, end)`` spans over pairs whose prompts are ``prompt_of``: consecutive runs of
    one prompt kept whole and packed up to ``batch_size`` pairs a span."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runs, s = [], 0
    for e in range(1, len(prompt_of) + 1):
        if e == len(prompt_of) or prompt_of[e] != prompt_of[s]:
            runs.extend((a, min(a + batch_size, e)) for a in range(s, e, batch_size))
            s = e
    spans: List[tuple[int, int]] = []
    for a, b in runs:
        if spans and b - spans[-1][0] <= batch_size:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


class CandidatePairs:
    """Every (episode, candidate) pair, scored by the candidate title's log-likelihood; the
    metric :data:`HIT_AT_1` reads the scores back as ``(episodes, candidates)``."""

    def __init__(self, coll: EpisodeCollator, episodes: Sequence[Episode]):
        self.coll, self.episodes = coll, list(episodes)
        self.pairs = [(e, c) for e, ep in enumerate(self.episodes) for c in ep.candidates]
        self.target_pos = np.array([ep.candidates.index(ep.target) for ep in self.episodes])

    def __len__(self) -> int:
        return len(self.pairs)

    def __call__(self, indices) -> Dict[str, torch.Tensor]:
        """The pairs at ``indices`` (:meth:`EpisodeCollator.candidates`: each prompt once)."""
        return self.coll.candidates(self.episodes, [self.pairs[int(j)] for j in indices])

    def batches(self, batch_size: int) -> List[np.ndarray]:
        """Index batches of at most ``batch_size`` pairs that never split an episode's
        candidates needlessly (:func:`prompt_batches`): each prompt runs once."""
        spans = prompt_batches([e for e, _ in self.pairs], batch_size)
        return [np.arange(s, e) for s, e in spans]

    def grid(self, scores: np.ndarray) -> np.ndarray:
        """``(E, C)`` scores, ``-inf`` where an episode has fewer candidates."""
        C = max((len(ep.candidates) for ep in self.episodes), default=0)
        out = np.full((len(self.episodes), C), -np.inf)
        j = 0
        for e, ep in enumerate(self.episodes):
            out[e, : len(ep.candidates)] = scores[j : j + len(ep.candidates)]
            j += len(ep.candidates)
        return out


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


def _hit_at_1(scores: np.ndarray, source: CandidatePairs) -> float:
    if not len(source.episodes):
        return 0.0
    return hit_ndcg(source.grid(scores), source.target_pos, [1])["hit@1"]


#: Hit@1 of the scored candidates (A-LLMRec's stage-2 validation metric)
HIT_AT_1 = Metric("hit@1", _hit_at_1)
