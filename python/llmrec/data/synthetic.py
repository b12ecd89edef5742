"""A synthetic dataset in the CoLLM schema whose labels depend on latent CF factors only.

Users and items get Gaussian latent factors; a (user, item) pair is positive when
``<p_u, q_i> + noise > 0``. Item titles are random word combinations unrelated to the
factors, so the text carries no signal about the label beyond the item's identity: a model
must use collaborative information to beat 0.5 AUC. Interactions get timestamps and are
split globally by time (70/15/15 by default) like the ML-1M split; a fraction of items is
held out of the training period so valid/test contain cold items. ``not_cold`` is 1 when
the row's user *and* its item both occur in the training split (CoLLM's ML-1M
preprocessing, and what ML-1M's files hold), 0 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from llmrec.data.loader import RecData

__all__ = ["SyntheticFactors", "make_synthetic"]

_WORDS = [
    "red",
    "blue",
    "green",
    "silver",
    "golden",
    "dark",
    "bright",
    "silent",
    "wild",
    "lost",
    "hidden",
    "last",
    "first",
    "secret",
    "broken",
    "frozen",
    "burning",
    "electric",
    "midnight",
    "summer",
    "winter",
    "autumn",
    "spring",
    "ocean",
    "river",
    "mountain",
    "desert",
    "forest",
    "city",
    "island",
    "garden",
    "castle",
    "road",
    "train",
    "ship",
    "star",
    "moon",
    "sun",
    "sky",
    "night",
    "day",
    "dream",
    "shadow",
    "storm",
    "fire",
    "water",
    "stone",
    "iron",
    "glass",
    "paper",
    "heart",
    "mind",
    "king",
    "queen",
    "prince",
    "soldier",
    "doctor",
    "stranger",
    "hunter",
    "thief",
    "ghost",
    "angel",
    "dragon",
    "wolf",
    "tiger",
    "horse",
    "bird",
    "journey",
    "return",
    "escape",
    "promise",
    "legend",
    "story",
    "song",
    "dance",
    "game",
    "war",
    "love",
    "life",
]


@dataclass
class SyntheticFactors:
    """The generating factors: ``user`` (n_users+1, dim) and ``item`` (n_items+1, dim)."""

    user: np.ndarray
    item: np.ndarray


def _titles(n: int, rng: np.random.Generator, max_words: int) -> list[str]:
    seen, out = set(), []
    while len(out) < n:
        k = int(rng.integers(1, max_words + 1))
        words = " ".join(_WORDS[j] for j in rng.choice(len(_WORDS), size=k, replace=False))
        title = f"{words.title()} ({int(rng.integers(1950, 2001))})"
        if title not in seen:
            seen.add(title)
            out.append(title)
    return out


def make_synthetic(
    n_users: int = 200,
    n_items: int = 100,
    per_user: int = 40,
    dim: int = 4,
    noise: float = 0.1,
    cold_frac: float = 0.1,
    split_frac: tuple[float, float] = (0.7, 0.15),
    max_title_words: int = 3,
    seed: int = 0,
    return_factors: bool = False,
    popularity: float = 0.0,
):
    """Generate a :class:`RecData` (and optionally its :class:`SyntheticFactors`).

    ``per_user`` interactions per user (distinct items); labels are
    ``1[<p_u, q_i> + noise * eps > 0]`` with zero-mean factors, so about half are positive
    and no item is globally popular. ``cold_frac`` of the items appear only after the
    training period. ``valid_small`` is every second valid row. ``popularity`` ``s > 0``
    makes the items popular to a Zipf law: each user draws their items with probability
    proportional to ``rank ** -s`` (a random ranking of the items), independently of the
    factors and so of the labels (0: uniform, the same data as before the option).
    """
    if per_user > n_items:
        raise ValueError(f"per_user={per_user} exceeds n_items={n_items}")
    rng = np.random.default_rng(seed)
    user_f = np.zeros((n_users + 1, dim))
    item_f = np.zeros((n_items + 1, dim))
    user_f[1:] = rng.normal(size=(n_users, dim)) / dim**0.25  # <p_u, q_i> has unit variance
    item_f[1:] = rng.normal(size=(n_items, dim)) / dim**0.25  # <p_u, q_i> has unit variance
    titles = ["", *_titles(n_items, rng, max_title_words)]

    n_cold = round(cold_frac * n_items)
    cold = set((rng.permutation(n_items)[:n_cold] + 1).tolist())
    t_train_end = split_frac[0]
    draw_p = None
    if popularity > 0:
        ranks = rng.permutation(n_items) + 1.0
        draw_p = ranks**-popularity / (ranks**-popularity).sum()
    rows = []
    for u in range(1, n_users + 1):
        items = rng.choice(n_items, size=per_user, replace=False, p=draw_p) + 1
        times = rng.uniform(0.0, 1.0, size=per_user)
        # cold items are only interacted with after the training period
        times = np.array(
            [t_train_end + (1 - t_train_end) * t if i in cold else t for i, t in zip(items, times)]
        )
        score = (user_f[u] * item_f[items]).sum(-1) + noise * rng.normal(size=per_user)
        for i, t, s in zip(items, times, score):
            rows.append((u, int(i), int(s > 0), t))
    df = pd.DataFrame(rows, columns=["uid", "iid", "label", "t"])
    df = df.sort_values(["t", "uid"], kind="stable").reset_index(drop=True)
    df["timestamp"] = (9e8 + df["t"] * 1e8).astype(np.int64)

    his, his_title = [], []
    positives: dict[int, list[int]] = {}
    for u, i, y in zip(df["uid"], df["iid"], df["label"]):
        prev = positives.setdefault(u, [])
        his.append([0, *prev])
        his_title.append(["", *[titles[j] for j in prev]])
        if y:
            prev.append(i)
    df["his"] = his
    df["his_title"] = his_title
    df["title"] = [titles[i] for i in df["iid"]]

    t_valid_end = split_frac[0] + split_frac[1]
    flag = np.where(df["t"] < t_train_end, -1, np.where(df["t"] < t_valid_end, 0, 1))
    df["flag"] = flag.astype(np.int8)
    train_rows = df["flag"] == -1
    warm = df["uid"].isin(set(df.loc[train_rows, "uid"])) & df["iid"].isin(
        set(df.loc[train_rows, "iid"])
    )
    df["not_cold"] = warm.astype(np.int64)
    cols = ["uid", "iid", "label", "timestamp", "his", "his_title", "title", "flag", "not_cold"]
    df = df[cols]
    splits = {
        "train": df[df["flag"] == -1].reset_index(drop=True),
        "valid": df[df["flag"] == 0].reset_index(drop=True),
        "test": df[df["flag"] == 1].reset_index(drop=True),
    }
    splits["valid_small"] = splits["valid"].iloc[::2].reset_index(drop=True)
    data = RecData(splits=splits, n_users=n_users, n_items=n_items, source="synthetic")
    if return_factors:
        return data, SyntheticFactors(user=user_f, item=item_f)
    return data
