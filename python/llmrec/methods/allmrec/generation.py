"""A-LLMRec evaluation: candidates scored by their title's log-likelihood (Hit@K, NDCG@K,
AUC) and greedy generation of the next title (generated Hit@1, A-LLMRec's ``eval.py``
rule: :func:`reference_hit`)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from llmrec.methods.allmrec.episodes import CandidatePairs, Episode, EpisodeCollator, prompt_batches
from llmrec.methods.allmrec.stage2_prompt import ALLMRec

__all__ = [
    "generate_hits",
    "parse_generated",
    "reference_hit",
    "score_episodes",
    "score_pairs",
    "score_rows",
]


@torch.no_grad()
def score_pairs(
    model: ALLMRec,
    coll: EpisodeCollator,
    prompts: Sequence[Episode],
    pairs: Sequence[tuple[int, int]],
    batch_size: int,
    device,
    progress=False,
    desc="score",
) -> np.ndarray:
    """``(P,)`` log-likelihood of each pair's title: ``(j, item)`` is ``prompts[j]``'s prompt
    followed by ``item``'s title. The distinct prompts of a batch run once each
    (:meth:`EpisodeCollator.candidates`), so list pairs of one prompt together: a batch
    holds whole runs of one prompt's pairs, up to ``batch_size`` pairs (a run longer than
    that is cut into ``batch_size`` pieces), so no prompt runs twice for want of room."""
    from tqdm.auto import tqdm

    model.eval()
    out = np.empty(len(pairs))
    spans = prompt_batches([j for j, _ in pairs], batch_size)
    for s, e in tqdm(spans, desc=desc, disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in coll.candidates(prompts, pairs[s:e]).items()}
        out[s:e] = model.score(batch).float().cpu().numpy()
    return out


def score_episodes(
    model: ALLMRec,
    coll: EpisodeCollator,
    episodes: Sequence[Episode],
    batch_size: int,
    device,
    progress=False,
    desc="score",
) -> np.ndarray:
    """``(E, C)`` title log-likelihood of every candidate of every episode (``-inf`` where an
    episode has fewer candidates)."""
    source = CandidatePairs(coll, episodes)
    scores = score_pairs(model, coll, source.episodes, source.pairs, batch_size, device,
                         progress, desc)  # fmt: skip
    return source.grid(scores)


def score_rows(
    model: ALLMRec,
    coll: EpisodeCollator,
    episodes: Sequence[Episode],
    batch_size: int,
    device,
    progress=False,
    desc="rows",
) -> np.ndarray:
    """Title log-likelihood of each episode's own target (pointwise row scores). Episodes with
    the same prompt (a user's rows in one candidate chunk, :func:`row_episodes`) share it."""
    index: Dict[tuple, int] = {}
    prompts: List[Episode] = []
    pairs = []
    for ep in episodes:
        key = (ep.uid, tuple(ep.his), tuple(ep.candidates))
        if key not in index:
            index[key] = len(prompts)
            prompts.append(ep)
        pairs.append((index[key], ep.target))
    return score_pairs(model, coll, prompts, pairs, batch_size, device, progress, desc)


@torch.no_grad()
def reference_hit(title: str, generated: str) -> bool:
    """A-LLMRec's Hit@1 rule (ghdtjr/A-LLMRec ``eval.py``): both lower-cased, the generation
    cut to the text between its first and last double quote when it has one (after dropping
    a ``"item title" : `` prefix), and a hit when the title is a *substring* of that."""
    pred = generated.strip().lower().replace('"item title" : ', "")
    start, end = pred.find('"'), pred.rfind('"')
    if start >= 0 and end >= 0:
        pred = pred[start + 1 : end]
    return title.lower() in pred


def parse_generated(text: str) -> str:
    """The title in a generation: the text up to the closing quote, quotes stripped."""
    text = text.strip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end] if end > 0 else text[1:]
    return text


def generate_hits(
    model: ALLMRec,
    coll: EpisodeCollator,
    episodes: Sequence[Episode],
    batch_size: int,
    device,
    max_new_tokens: int = 40,
    progress=False,
) -> dict:
    """Generated Hit@1 of ``episodes``: ``hit@1_generated`` by A-LLMRec's rule
    (:func:`reference_hit`), ``hit@1_generated_exact`` when the parsed title equals the
    target's exactly (this project's stricter earlier metric)."""
    from tqdm.auto import tqdm

    model.eval()
    hits, exact, valid = 0, 0, 0
    examples = []
    for s in tqdm(
        range(0, len(episodes), batch_size), desc="generate", disable=not progress, leave=False
    ):
        eps = episodes[s : s + batch_size]
        batch = {k: v.to(device) for k, v in coll(eps, "prompt").items()}
        for ep, text in zip(eps, model.generate(batch, max_new_tokens)):
            title = parse_generated(text)
            hits += int(reference_hit(coll.titles[ep.target], text))
            exact += int(title == coll.titles[ep.target])
            valid += int(title in {coll.titles[c] for c in ep.candidates})
            if len(examples) < 5:
                examples.append({"target": coll.titles[ep.target], "generated": title})
    n = max(1, len(episodes))
    return {
        "hit@1_generated": hits / n,
        "hit@1_generated_exact": exact / n,
        "valid_title_rate": valid / n,
        "generated_examples": examples,
    }
