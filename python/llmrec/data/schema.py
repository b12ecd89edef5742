"""The CoLLM data schema and its validation.

A dataset directory holds one file per split (``train``, ``valid``, ``valid_small``,
``test``), each ``<split>.parquet`` or ``<split>.csv``, with the columns below (one row per
(user, item) interaction; ids are 1-based, 0 is padding):

==========  =====================================================================
uid         user id, integer >= 1
iid         item id, integer >= 1
label       1 = positive (rating >= 4 on MovieLens), 0 = negative
timestamp   interaction time (optional)
his         the user's earlier positive items, a leading 0 then item ids
his_title   their titles, a leading '' then one title per entry of ``his``
title       the target item's title
flag        -1 train, 0 valid, 1 test (optional)
not_cold    1 when the user and the item both occur in training (warm), 0 when cold
==========  =====================================================================

In CSV files ``his`` and ``his_title`` are JSON lists (``"[0, 12, 7]"``,
``"[\\"\\", \\"Heat (1995)\\", ...]"``).

Every error raised here is a :class:`DataValidationError` whose message names the file and,
where one row is at fault, the row (0-based data row; for CSV the file line too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from llmrec.errors import DataValidationError

__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "DataValidationError",
    "validate_split",
]

REQUIRED_COLUMNS = ("uid", "iid", "label", "his", "his_title", "title", "not_cold")
OPTIONAL_COLUMNS = ("timestamp", "flag")


#: the largest user or item id accepted: embedding tables get one row per id up to the
#: largest, so a stray 10**12 would ask for terabytes (remap sparse ids to 1..N instead)
MAX_ID = 50_000_000


def _id_limit(col: str, hi: Optional[int]) -> Optional[int]:
    if col in ("uid", "iid"):
        return MAX_ID if hi is None else min(hi, MAX_ID)
    return hi


def _to_str(value, path: Path, row: int, col: str):
    """A title as str: bytes are decoded as UTF-8 (parquet binary columns)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataValidationError(
                f"{_where(path, row)}: column {col!r} is not valid UTF-8 text ({exc.reason} at "
                f"byte {exc.start}): {bytes(value[:40])!r}"
            ) from None
    return value


def _where(path: Path, row: int) -> str:
    if path.suffix == ".csv":
        return f"{path}: row {row} (file line {row + 2})"
    return f"{path}: row {row}"


def _int_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    values = df[col]
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise DataValidationError(f"{_where(path, row)}: column {col!r} is missing a value")
    arr = values.to_numpy()
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        for row, v in enumerate(arr):
            try:
                ok = float(v) == int(float(v))
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise DataValidationError(
                    f"{_where(path, row)}: column {col!r} must hold integers, got {v!r}"
                )
        arr = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating):
        # inf, nan and values beyond int64 would wrap around in the cast below
        bad = np.flatnonzero(~np.isfinite(arr) | (np.abs(arr) > 2.0**62) | (arr != np.round(arr)))
        if bad.size:
            row = int(bad[0])
            raise DataValidationError(
                f"{_where(path, row)}: column {col!r} must hold integers, got {arr[row]!r}"
            )
    return arr.astype(np.int64)


def _parse_list(value, path: Path, row: int, col: str):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataValidationError(
                f"{_where(path, row)}: column {col!r} is not a JSON list ({exc.msg}): "
                f"{value[:80]!r}"
            ) from None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise DataValidationError(
        f"{_where(path, row)}: column {col!r} must be a list, got {type(value).__name__}"
    )


def _check_histories(df: pd.DataFrame, path: Path, max_item: Optional[int]) -> None:
    """Parse ``his``/``his_title`` into lists of int / str in place and check them."""
    his_col, title_col = [], []
    for row, (his, titles) in enumerate(zip(df["his"].tolist(), df["his_title"].tolist())):
        his = _parse_list(his, path, row, "his")
        titles = _parse_list(titles, path, row, "his_title")
        try:
            ids = [int(v) for v in his]
        except (TypeError, ValueError, OverflowError):
            raise DataValidationError(
                f"{_where(path, row)}: column 'his' must hold integer item ids, got {his[:10]!r}"
            ) from None
        if any(float(v) != i for v, i in zip(his, ids) if not isinstance(v, str)):
            raise DataValidationError(
                f"{_where(path, row)}: column 'his' must hold integer item ids, got {his[:10]!r}"
            )
        if len(ids) != len(titles):
            raise DataValidationError(
                f"{_where(path, row)}: malformed history: 'his' has {len(ids)} entries but "
                f"'his_title' has {len(titles)}"
            )
        titles = [_to_str(t, path, row, "his_title") for t in titles]
        if not all(isinstance(t, str) for t in titles):
            raise DataValidationError(
                f"{_where(path, row)}: malformed history: 'his_title' must hold strings"
            )
        start = 0
        while start < len(ids) and ids[start] == 0:  # leading padding
            if titles[start] != "":
                raise DataValidationError(
                    f"{_where(path, row)}: malformed history: padding id 0 has title "
                    f"{titles[start]!r} (expected '')"
                )
            start += 1
        body = ids[start:]
        if body:
            lo, hi = min(body), max(body)
            if lo < 1:
                raise DataValidationError(
                    f"{_where(path, row)}: malformed history: item id {lo} in 'his' after the "
                    "leading padding (ids are >= 1; 0 only pads the front)"
                )
            limit = _id_limit("iid", max_item)
            if hi > limit:
                what = f"the data has {max_item} items" if limit == max_item else (
                    f"ids above {MAX_ID} are refused; remap item ids to 1..N"
                )  # fmt: skip
                raise DataValidationError(
                    f"{_where(path, row)}: item id {hi} in 'his' is out of range ({what})"
                )
        his_col.append(ids)
        title_col.append(list(titles))
    df["his"] = pd.Series(his_col, index=df.index, dtype=object)
    df["his_title"] = pd.Series(title_col, index=df.index, dtype=object)


def validate_split(
    df: pd.DataFrame,
    path: Path,
    *,
    max_user: Optional[int] = None,
    max_item: Optional[int] = None,
) -> pd.DataFrame:
    """Check one split's frame against the schema and return a normalised copy.

    Normalised: ``uid``/``iid``/``label``/``not_cold`` int64, ``his`` lists of int,
    ``his_title`` lists of str, ``title`` str, a fresh ``RangeIndex``.
    ``max_user`` / ``max_item`` bound the ids when given (ids must be ``<=`` them).
    """
    path = Path(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {missing}; the schema needs {list(REQUIRED_COLUMNS)}"
        )
    if len(df) == 0:
        raise DataValidationError(f"{path}: the split is empty (no rows)")
    df = df.reset_index(drop=True).copy()
    for col, lo, hi in (
        ("uid", 1, max_user),
        ("iid", 1, max_item),
        ("label", 0, 1),
        ("not_cold", 0, 1),
    ):
        arr = _int_column(df, col, path)
        hi = _id_limit(col, hi)
        bad = np.flatnonzero((arr < lo) | ((arr > hi) if hi is not None else False))
        if bad.size:
            row = int(bad[0])
            what = "id" if col in ("uid", "iid") else "value"
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            hint = "; remap ids to 1..N" if hi == MAX_ID else ""
            raise DataValidationError(
                f"{_where(path, row)}: {col} {what} {arr[row]} is out of range (must be {rng}"
                f"{hint})"
            )
        df[col] = arr
    if "timestamp" in df.columns:
        df["timestamp"] = _int_column(df, "timestamp", path)
    if df["title"].isna().any():
        row = int(np.flatnonzero(df["title"].isna().to_numpy())[0])
        raise DataValidationError(f"{_where(path, row)}: column 'title' is missing a value")
    df["title"] = [_to_str(t, path, row, "title") for row, t in enumerate(df["title"])]
    df["title"] = df["title"].astype(str).astype(object)
    _check_histories(df, path, max_item)
    return df
