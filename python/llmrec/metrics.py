"""AUC and UAUC, on all / warm / cold rows.

* AUC: :func:`sklearn.metrics.roc_auc_score` over every row (ties count one half).
* UAUC: the unweighted mean of per-user AUC over the users that have both a positive and a
  negative row (CoLLM's definition); users with one class are skipped.
* warm / cold: rows with ``not_cold == 1`` / ``0``.

An undefined value (one class only, or no user with both classes) is ``nan`` in Python and
``null`` in the JSON files.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = [
    "auc",
    "check_both_classes",
    "evaluate_predictions",
    "json_safe",
    "rows_digest",
    "uauc",
]


def _arrays(*xs):
    out = [np.asarray(x).reshape(-1) for x in xs]
    n = len(out[0])
    if any(len(x) != n for x in out):
        raise ValueError(f"length mismatch: {[len(x) for x in out]}")
    return out


def _check_finite(scores: np.ndarray) -> None:
    if scores.dtype.kind == "f" and not np.isfinite(scores).all():
        from llmrec.errors import NumericalError

        first = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise NumericalError(
            f"the model's scores hold NaN or infinite values (first at row {first}): the "
            "training diverged; lower --lr"
        )


def check_both_classes(labels, split: str) -> None:
    """Refuse a validation split whose AUC is undefined (one class only), before training:
    early stopping could not choose a best state (:class:`llmrec.errors.NumericalError`)."""
    values = np.unique(np.asarray(labels))
    if values.size < 2:
        from llmrec.errors import NumericalError

        only = "no rows" if values.size == 0 else f"only label {values[0]}"
        raise NumericalError(
            f"the {split!r} split has {only}: its AUC is undefined, so early stopping cannot "
            "choose a best state; give a validation split with both classes (--valid-split)"
        )


def auc(labels, scores) -> float:
    """ROC AUC of ``scores`` against binary ``labels``; ``nan`` when only one class occurs.

    Non-finite scores (a diverged model) raise :class:`llmrec.errors.NumericalError`.
    """
    labels, scores = _arrays(labels, scores)
    _check_finite(scores)
    if len(labels) == 0 or np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels.astype(np.int64), scores.astype(np.float64)))


def uauc(users, labels, scores, return_count: bool = False):
    """Mean per-user AUC over users with both classes (``nan`` when there are none)."""
    users, labels, scores = _arrays(users, labels, scores)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    values = []
    for lab, sc in zip(np.split(labels, bounds), np.split(scores, bounds)):
        if lab.size and 0 < lab.sum() < lab.size:
            values.append(roc_auc_score(lab.astype(np.int64), sc.astype(np.float64)))
    value = float(np.mean(values)) if values else float("nan")
    return (value, len(values)) if return_count else value


def _block(users, labels, scores) -> dict:
    value, n_users = uauc(users, labels, scores, return_count=True)
    return {
        "auc": auc(labels, scores),
        "uauc": value,
        "rows": len(labels),
        "uauc_users": n_users,
        "positive_rate": float(np.mean(labels)) if len(labels) else float("nan"),
    }


def rows_digest(users, items, labels) -> str:
    """The sha256 (hex) of a set of scored rows: ``users``, ``items``, ``labels`` ``(n,)``
    integer ids and 0/1 labels, as int64 ``(uid, iid, label)`` triples in sorted order, so
    the same rows in another order give the same digest and any other row set another one.
    ``llmrec compare`` checks that the runs it puts side by side were scored on equal rows."""
    import hashlib

    triples = np.stack(
        [np.asarray(a).astype(np.int64).reshape(-1) for a in (users, items, labels)], axis=1
    )
    triples = triples[np.lexsort(triples.T[::-1])]
    return hashlib.sha256(np.ascontiguousarray(triples, dtype="<i8").tobytes()).hexdigest()


def evaluate_predictions(
    users, labels, scores, not_cold: Optional[np.ndarray] = None, items=None
) -> dict:
    """``{"auc", "uauc", "rows", "uauc_users", "positive_rate", "warm": {...}, "cold": {...}}``.

    ``warm`` / ``cold`` are present when ``not_cold`` is given; ``rows_sha256`` (see
    :func:`rows_digest`) when the rows' ``items`` are.
    """
    users, labels, scores = _arrays(users, labels, scores)
    _check_finite(np.asarray(scores, dtype=np.float64))
    out = _block(users, labels, scores)
    if items is not None:
        out["rows_sha256"] = rows_digest(users, items, labels)
    if not_cold is not None:
        (not_cold,) = _arrays(not_cold)
        for name, mask in (("warm", not_cold == 1), ("cold", not_cold == 0)):
            out[name] = _block(users[mask], labels[mask], scores[mask])
    return out


def json_safe(obj):
    """Replace NaN / inf floats (recursively) by ``None`` so ``json.dump`` writes ``null``."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
