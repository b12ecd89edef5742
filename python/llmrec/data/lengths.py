"""The length rule: how every prompt of every method is made to fit ``--max-length`` tokens.

One rule, applied where a method turns rows into token ids (CoRA, TALLRec and frozen through
:func:`llmrec.data.batching.make_examples`, CoLLM through ``make_collm_examples``, A-LLMRec
through its ``EpisodeCollator``), documented in ``docs/reliability.md``:

0. when a split is read, every title is cut to its first
   :data:`~llmrec.data.loader.MAX_TITLE_CHARS` characters (no tokenizer is known yet; this
   keeps a 10,000-character title from being tokenised at all);
1. every title (target, history, candidate) is cut to its first :data:`MAX_TITLE_TOKENS`
   tokens of the run's tokenizer (cut on a token boundary, at the character where the first
   token beyond the limit starts);
2. the history keeps its ``--max-his`` most recent non-empty titles, as before;
3. while the prompt is longer than ``--max-length``, its OLDEST history titles are dropped
   (with their CF slots, in A-LLMRec): the prompt keeps the most recent ``k`` titles for the
   largest ``k`` that fits (bisection over ``k``; a prompt's length grows with ``k``);
4. a prompt that does not fit even with no history (``--max-length`` below the fixed
   template plus its target and candidate titles) is refused with one line naming
   ``--max-length``. :meth:`llmrec.method.Method.check_prompt_lengths` applies step 4 to the
   data's longest titles when the model is built, before any training or scoring.

No token is ever cut out of a prompt: the template, every CF slot and the target title are
whole in every prompt, and a prompt that already fits is the same token for token as
without the rule.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, TypeVar

from llmrec.errors import RunConfigError

__all__ = [
    "MAX_TITLE_TOKENS",
    "PromptTooLong",
    "TitleCutter",
    "fit_history",
    "longest_title_row",
    "longest_titles",
    "refusal_line",
]

#: step 1 of the rule: the longest title has 65 tokens on ML-1M with the tiny LLM's
#: 400-token vocabulary (42 with its default 2,048; LLaMA's tokenizer needs fewer), so ML-1M's
#: titles are never cut
MAX_TITLE_TOKENS = 96

Item = TypeVar("Item")
Encoded = TypeVar("Encoded")


class PromptTooLong(RunConfigError):
    """A prompt does not fit ``--max-length`` even with no history (step 4 of the rule)."""


class TitleCutter:
    """Step 1: ``cutter(title)`` is ``title`` cut to its first ``max_tokens`` tokens.

    ``tokenizer``: a Hugging Face tokenizer (fast ones are cut at the offset where token
    ``max_tokens`` starts; slow ones by decoding the first ``max_tokens`` ids). Results are
    cached per title, so a catalogue's titles are tokenised once each.
    """

    def __init__(self, tokenizer, max_tokens: int = MAX_TITLE_TOKENS):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer, self.max_tokens = tokenizer, int(max_tokens)
        self._cut: Dict[str, str] = {}

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, title: str) -> str:
        if not isinstance(title, str):
            return title
        if title not in self._cut:
            self._cut[title] = self._cut_title(title)
        return self._cut[title]

    def _cut_title(self, title: str) -> str:
        tok, limit = self.tokenizer, self.max_tokens
        if not getattr(tok, "is_fast", False):
            ids = tok(title, add_special_tokens=False)["input_ids"]
            return title if len(ids) <= limit else tok.decode(ids[:limit])
        enc = tok(title, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= limit:
            return title
        # cut where the first token past the limit starts; a character split over two byte
        # tokens starts there too, so it is dropped whole. Re-tokenising a prefix can merge
        # differently: step back a token until the cut text has at most ``limit`` tokens.
        keep = limit
        while keep > 0:
            cut = title[: offsets[keep][0]]
            if self.n_tokens(cut) <= limit:
                return cut
            keep -= 1
        return ""


def fit_history(
    encode: Callable[[Sequence[Item]], Encoded],
    history: Sequence[Item],
    max_length: int,
    refusal: Callable[[int], str],
    size: Callable[[Encoded], int] = len,
) -> Encoded:
    """Steps 3 and 4: the prompt with the most recent history entries that fit.

    ``encode(entries)`` encodes the prompt holding ``entries``, a suffix of ``history``
    (oldest first): by default a list of token ids (slot sentinels included), else anything
    whose token count ``size`` gives. Returns ``encode(history)`` when it has at most
    ``max_length`` tokens, else ``encode(history[-k:])`` for the largest ``k`` that fits.
    Raises :class:`PromptTooLong` with ``refusal(n)`` (``n`` the length with no history)
    when even the empty history does not fit.
    """
    encoded = encode(history)
    if size(encoded) <= max_length:
        return encoded
    best = encode(history[len(history) :])
    if size(best) > max_length:
        raise PromptTooLong(refusal(size(best)))
    lo, hi = 1, len(history) - 1  # the largest k in [lo, hi] whose prompt fits
    while lo <= hi:
        k = (lo + hi) // 2
        candidate = encode(history[len(history) - k :])
        if size(candidate) <= max_length:
            best, lo = candidate, k + 1
        else:
            hi = k - 1
    return best


def refusal_line(what: str, max_length: int, hint: Optional[str] = None) -> Callable[[int], str]:
    """The one line of step 4: ``what`` names the prompt, ``hint`` another option to change."""

    def line(needed: int) -> str:
        other = f" ({hint})" if hint else ""
        return (
            f"--max-length {max_length} is too small: {what} has {needed} tokens with no "
            f"history (titles cut to {MAX_TITLE_TOKENS} tokens); raise --max-length to at "
            f"least {needed}{other}"
        )

    return line


def longest_titles(titles: Iterable[str], cut: TitleCutter, n: int) -> List[str]:
    """The ``n`` titles with the most tokens once cut (step 1), longest first; ties broken by
    the text, so the choice is deterministic."""
    cut_titles = {cut(t) for t in titles if isinstance(t, str)}
    return sorted(cut_titles, key=lambda t: (-cut.n_tokens(t), t))[:n]


def longest_title_row(data, tokenizer):
    """A one-row split frame (the columns of the schema) whose target is the data's longest
    target title (in tokens of ``tokenizer``, after the cut) and whose history is empty: the
    row with the longest prompt a pointwise method can be left with after step 3.
    ``data``: a :class:`llmrec.data.RecData`."""
    import pandas as pd

    first = next(iter(data.splits.values())).iloc[0]
    titles = (t for df in data.splits.values() for t in df["title"])
    (title,) = longest_titles(titles, TitleCutter(tokenizer), 1)
    values = {column: [first[column]] for column in first.index}
    values.update(title=[title], his=[[]], his_title=[[]])
    return pd.DataFrame(values)
