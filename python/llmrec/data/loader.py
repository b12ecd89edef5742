"""Load a CoLLM-schema dataset directory (parquet or CSV per split) with validation."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import numpy as np
import pandas as pd

from llmrec.data.schema import MAX_ID, DataValidationError, validate_split

__all__ = ["SPLITS", "RecData", "check_cold_flags", "find_split_file", "load_data", "read_split"]

SPLITS = ("train", "valid", "valid_small", "test")
REQUIRED_SPLITS = ("train", "valid", "test")
#: the length rule applied when a split is read: a title (target or history) longer than this
#: is cut to its first MAX_TITLE_CHARS characters, so one title can never push a prompt's CF
#: slots past --max-length (the longest ML-1M title has 79 characters, valid_small.parquet)
MAX_TITLE_CHARS = 160
META_FILE = "meta.json"


@dataclass
class RecData:
    """A validated dataset: one frame per split plus the id ranges.

    Ids run from 1 to ``n_users`` / ``n_items`` (0 is padding), so embedding tables have
    ``n_users + 1`` / ``n_items + 1`` rows.
    """

    splits: Dict[str, pd.DataFrame]
    n_users: int
    n_items: int
    source: str = "synthetic"
    files: Dict[str, str] = field(default_factory=dict)

    def __getitem__(self, split: str) -> pd.DataFrame:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in {self.source} (has {sorted(self.splits)})")
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def item_titles(self) -> Dict[int, str]:
        """``iid -> title`` over every split (targets and histories)."""
        titles: Dict[int, str] = {}
        for df in self.splits.values():
            titles.update(zip(df["iid"].tolist(), df["title"].tolist()))
        return titles

    def validation_split(self) -> str:
        """``valid_small`` when present (what CoLLM/CoRA validate on), else ``valid``."""
        return "valid_small" if "valid_small" in self.splits else "valid"

    def summary(self) -> dict:
        return {
            "source": self.source,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "rows": {k: len(v) for k, v in self.splits.items()},
        }


def find_split_file(directory: Path, split: str) -> Optional[Path]:
    """``<split>.parquet`` or ``<split>.csv``; both present is an error (which one is meant?)."""
    found = [directory / f"{split}{ext}" for ext in (".parquet", ".csv")]
    found = [p for p in found if p.exists()]
    if len(found) > 1:
        raise DataValidationError(
            f"{directory}: both {found[0].name} and {found[1].name} exist; keep one"
        )
    return found[0] if found else None


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataValidationError(f"{meta_path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise DataValidationError(
            f'{meta_path}: expected an object like {{"n_users": 6040, "n_items": 3952}}, '
            f"got {type(meta).__name__}"
        )
    for key in ("n_users", "n_items"):
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DataValidationError(f"{meta_path}: {key} must be an integer >= 1, got {v!r}")
        if v is not None and v > MAX_ID:
            raise DataValidationError(
                f"{meta_path}: {key} {v} is above the supported {MAX_ID}; remap ids to 1..N"
            )
    return meta


def read_split(
    path: Union[str, Path], *, max_user: Optional[int] = None, max_item: Optional[int] = None
) -> pd.DataFrame:
    """Read and validate one split file (``.parquet`` or ``.csv``)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""])
            # a title may legitimately look like a number or be empty in histories only
            if "title" in df.columns:
                df["title"] = df["title"].astype(object)
        else:
            raise DataValidationError(f"{path}: unsupported file type (use .parquet or .csv)")
    except DataValidationError:
        raise
    except Exception as exc:  # pyarrow / pandas parse errors
        raise DataValidationError(f"{path}: cannot be read: {exc}") from exc
    return _cut_titles(validate_split(df, path, max_user=max_user, max_item=max_item))


def _cut_titles(df: pd.DataFrame) -> pd.DataFrame:
    """Titles and history titles cut to :data:`MAX_TITLE_CHARS` characters (ids, histories
    and so every CF slot are kept as they are)."""

    def cut(title):
        return title[:MAX_TITLE_CHARS] if isinstance(title, str) else title

    if "title" in df.columns:
        df["title"] = [cut(t) for t in df["title"]]
    if "his_title" in df.columns:
        df["his_title"] = [
            type(ts)(cut(t) for t in ts) if isinstance(ts, (list, tuple)) else ts
            for ts in df["his_title"]
        ]
    return df


def _max_ids(df: pd.DataFrame) -> tuple[int, int]:
    his_max = max((max(h) for h in df["his"] if h), default=0)
    return int(df["uid"].max()), int(max(df["iid"].max(), his_max))


def _check_not_cold(frames: Dict[str, pd.DataFrame], files: Dict[str, str]) -> None:
    """Refuse ``not_cold`` flags that cannot be true: ``not_cold`` is 1 when the row's user and
    item both occur in ``train``, so every train row is warm and no row may be warm when its
    user or item never occurs in train. (Flags that are merely unexpected, cold although both
    occur, only warn: :func:`check_cold_flags`.)"""
    if "train" not in frames:
        return
    train = frames["train"]
    bad = np.flatnonzero(train["not_cold"].to_numpy() != 1)
    if bad.size:
        raise DataValidationError(
            f"{files['train']}: row {int(bad[0])}: not_cold is 0 in the train split (every "
            "train row's user and item occur in train)"
        )
    users, items = train["uid"].unique(), train["iid"].unique()
    for split, df in frames.items():
        user_seen, item_seen = df["uid"].isin(users).to_numpy(), df["iid"].isin(items).to_numpy()
        warm_unseen = (df["not_cold"].to_numpy() == 1) & ~(user_seen & item_seen)
        if warm_unseen.any():
            row = int(np.flatnonzero(warm_unseen)[0])
            what = "item" if not item_seen[row] else "user"
            value = int(df["iid" if what == "item" else "uid"].iloc[row])
            raise DataValidationError(
                f"{files[split]}: row {row}: not_cold is 1 but {what} {value} never occurs in train"
            )


def check_cold_flags(frames: Mapping[str, pd.DataFrame], where="") -> Dict[str, int]:
    """Warn when a split's ``not_cold`` flags contradict its ``train`` split.

    ``not_cold`` is 1 when the row's user and item both occur in ``train`` (CoLLM's ML-1M
    preprocessing). ``frames``: split -> frame with ``uid``, ``iid``, ``not_cold``. Returns
    split -> number of contradicting rows (a :class:`UserWarning` names each split with
    any); nothing is checked without a ``train`` frame.
    """
    if "train" not in frames:
        return {}
    train = frames["train"]
    users, items = set(train["uid"].tolist()), set(train["iid"].tolist())
    out = {}
    for split, df in frames.items():
        warm = df["uid"].isin(users) & df["iid"].isin(items)
        bad = int((warm.astype(np.int64) != df["not_cold"].astype(np.int64)).sum())
        out[split] = bad
        if bad:
            warnings.warn(
                f"{where}: {split}: {bad} of {len(df)} rows have not_cold flags that contradict "
                "the train split (not_cold = 1 iff the user and the item both occur in train)",
                stacklevel=2,
            )
    return out


def load_data(
    path: Union[str, Path],
    *,
    splits: Iterable[str] = SPLITS,
    n_users: Optional[int] = None,
    n_items: Optional[int] = None,
) -> RecData:
    """Load the splits of a dataset directory, validating every file.

    ``train``, ``valid`` and ``test`` are required (when asked for); ``valid_small`` is
    optional. The id ranges come from ``n_users`` / ``n_items`` when given, else from a
    ``meta.json`` (``{"n_users": .., "n_items": ..}``) in the directory, else from the
    largest ids in the data. Ids beyond a declared range are errors.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise DataValidationError(f"{directory}: not a directory (expected one file per split)")
    meta_path = directory / META_FILE
    if meta_path.exists():
        meta = _read_meta(meta_path)
        n_users = n_users if n_users is not None else meta.get("n_users")
        n_items = n_items if n_items is not None else meta.get("n_items")
    frames: Dict[str, pd.DataFrame] = {}
    files: Dict[str, str] = {}
    for split in splits:
        file = find_split_file(directory, split)
        if file is None:
            if split in REQUIRED_SPLITS:
                raise DataValidationError(
                    f"{directory}: no {split}.parquet or {split}.csv (required split)"
                )
            continue
        frames[split] = read_split(file, max_user=n_users, max_item=n_items)
        files[split] = str(file)
    if not frames:
        raise DataValidationError(f"{directory}: none of the splits {list(splits)} found")
    _check_not_cold(frames, files)
    check_cold_flags(frames, directory)
    maxes = np.array([_max_ids(df) for df in frames.values()])
    return RecData(
        splits=frames,
        n_users=int(n_users if n_users is not None else maxes[:, 0].max()),
        n_items=int(n_items if n_items is not None else maxes[:, 1].max()),
        source=str(directory),
        files=files,
    )


def write_data(data: RecData, path: Union[str, Path], fmt: str = "parquet") -> Path:
    """Write every split as ``<split>.<fmt>`` (parquet or csv) plus ``meta.json``."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for split, df in data.splits.items():
        out = df.copy()
        if fmt == "csv":
            out["his"] = [json.dumps([int(v) for v in h]) for h in out["his"]]
            out["his_title"] = [json.dumps(list(t)) for t in out["his_title"]]
            out.to_csv(directory / f"{split}.csv", index=False)
        else:
            out["his"] = [np.asarray(h, dtype=np.int64) for h in out["his"]]
            out["his_title"] = [np.asarray(t, dtype=object) for t in out["his_title"]]
            out.to_parquet(directory / f"{split}.parquet", index=False)
    (directory / META_FILE).write_text(
        json.dumps({"n_users": data.n_users, "n_items": data.n_items}, indent=2) + "\n"
    )
    return directory
