"""The item catalogue of a dataset as the methods and retrieval read it: titles, the items a
user has seen, a split's positives and histories (``data`` is a :class:`llmrec.data.RecData`)."""

from __future__ import annotations

from typing import Dict, Sequence, Set

import numpy as np

__all__ = ["seen_items", "test_positives", "title_map", "user_histories"]


def title_map(data) -> Dict[int, str]:
    """``iid -> title`` from the targets and the histories of every split."""
    titles: Dict[int, str] = {}
    for df in data.splits.values():
        his = df[["his", "his_title"]].explode(["his", "his_title"])
        his = his[his["his"].notna() & (his["his"] != 0)]
        titles.update(zip(his["his"].astype(np.int64).tolist(), his["his_title"].tolist()))
        titles.update(zip(df["iid"].tolist(), df["title"].tolist()))
    return titles


def seen_items(data, splits: Sequence[str] = ("train", "valid")) -> Dict[int, Set[int]]:
    """``uid -> items`` the user rated in ``splits`` (excluded from recommendations)."""
    seen: Dict[int, Set[int]] = {}
    for split in splits:
        if split in data:
            for u, i in zip(data[split]["uid"].tolist(), data[split]["iid"].tolist()):
                seen.setdefault(int(u), set()).add(int(i))
    return seen


def test_positives(data, split: str = "test") -> Dict[int, Set[int]]:
    """``uid -> items`` with label 1 in ``split`` (what a recommender should find)."""
    df = data[split]
    pos = df[df["label"] == 1]
    out: Dict[int, Set[int]] = {}
    for u, i in zip(pos["uid"].tolist(), pos["iid"].tolist()):
        out.setdefault(int(u), set()).add(int(i))
    return out


def user_histories(data, split: str = "test") -> Dict[int, tuple[list, list]]:
    """``uid -> (his, his_title)`` at the user's first row of ``split`` (history so far)."""
    df = data[split]
    if "timestamp" in df.columns:
        df = df.sort_values("timestamp", kind="stable")
    first = df.drop_duplicates("uid", keep="first")
    return {
        int(u): (list(h), list(t))
        for u, h, t in zip(
            first["uid"].tolist(), first["his"].tolist(), first["his_title"].tolist()
        )
    }
