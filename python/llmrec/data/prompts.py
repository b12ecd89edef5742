"""Prompt builders: the CoRA/TALLRec template and the CoLLM template (with ID placeholders).

Titles are double-quoted and comma-joined; at most ``max_his`` (10) of the most recent
history titles are used. An empty history gives an empty list in the sentence.

Before ``#Answer:`` the templates hold a literal backslash followed by ``n`` (two
characters), not a line break: the reference prompt files (zyang1580/CoLLM
``prompts/tallrec_movie.txt`` / ``collm_movie.txt``; VanillaCreamer/CoRA's configs name the
same ``prompts/tallrec_*.txt`` files) are read line by line and contain those two characters, so the LLM of the published runs saw the
tokens of ``\\n``. :data:`ANSWER_SEPARATOR` is that string.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = [
    "ANSWER_SEPARATOR",
    "COLLM_TEMPLATE",
    "CORA_TEMPLATE",
    "ITEM_PLACEHOLDER",
    "MAX_HIS",
    "TEMPLATES",
    "USER_PLACEHOLDER",
    "build_prompt",
    "build_prompts",
    "format_title_list",
]

MAX_HIS = 10
USER_PLACEHOLDER = "<UserID>"
ITEM_PLACEHOLDER = "<TargetItemID>"

#: what precedes ``#Answer:``: a space, a backslash and an ``n`` (the reference files' bytes)
ANSWER_SEPARATOR = " \\n"

CORA_TEMPLATE = (
    "#Question: A user has given high ratings to the following movies: <ItemTitleList>. "
    "Leverage the information to predict whether the user would enjoy the movie titled "
    '<TargetItemTitle>? Answer with "Yes" or "No".' + ANSWER_SEPARATOR + "#Answer:"
)
COLLM_TEMPLATE = (
    "#Question: A user has given high ratings to the following movies: <ItemTitleList>. "
    "Additionally, we have information about the user's preferences encoded in the feature "
    f"{USER_PLACEHOLDER}. Using all available information, make a prediction about whether "
    "the user would enjoy the movie titled <TargetItemTitle> with the feature "
    f'{ITEM_PLACEHOLDER}? Answer with "Yes" or "No".' + ANSWER_SEPARATOR + "#Answer:"
)
TEMPLATES = {"cora": CORA_TEMPLATE, "tallrec": CORA_TEMPLATE, "collm": COLLM_TEMPLATE}


def _quote(title: str) -> str:
    return f'"{title}"'


def format_title_list(titles: Sequence[str], max_his: int = MAX_HIS) -> str:
    """The last ``max_his`` non-empty titles, quoted and comma-joined."""
    titles = [t for t in titles if t]
    if max_his <= 0:
        return ""
    return ", ".join(_quote(t) for t in titles[-max_his:])


def build_prompt(
    his_titles: Sequence[str], target_title: str, template: str = "cora", max_his: int = MAX_HIS
) -> str:
    """One prompt. ``template`` is a key of :data:`TEMPLATES` or a template string."""
    text = TEMPLATES.get(template, template)
    if "<ItemTitleList>" not in text or "<TargetItemTitle>" not in text:
        raise ValueError(
            f"template {template!r} is neither one of {sorted(TEMPLATES)} nor a template "
            "with <ItemTitleList> and <TargetItemTitle>"
        )
    return text.replace("<ItemTitleList>", format_title_list(his_titles, max_his)).replace(
        "<TargetItemTitle>", _quote(target_title)
    )


def build_prompts(
    his_titles: Iterable[Sequence[str]],
    target_titles: Iterable[str],
    template: str = "cora",
    max_his: int = MAX_HIS,
) -> list[str]:
    return [build_prompt(h, t, template, max_his) for h, t in zip(his_titles, target_titles)]
