"""Scoring a split in chunks that survive an interruption, and in parts across machines.

Scoring ML-1M's 7,331 test rows with SmolLM2-135M costs about 0.9 s a row on a 2-core CPU,
so ``llmrec evaluate --resume`` (and ``--part K/N``) scores the rows in fixed chunks and
writes each chunk's scores to its own sealed safetensors file under
``RUN/scores/<key>/``, where ``<key>`` is the sha256 of everything that decides a score: the
rows, the trainable state, the run's configuration (paths excluded, so a moved run keeps its
chunks), its recorded input digests, the eval batch size and the chunk size. A run killed
at any point loses at most the chunk in progress; ``--part K/N`` scores only the K-th of N
contiguous ranges of chunks, so N machines (or N sessions) can share one split, and the
chunk files of each can be copied into one run folder. Once every chunk is there, the
metrics are computed from them as from one pass.

A chunk is scored by the same ``predict`` as an unchunked pass; its batches are formed
inside the chunk, so scores equal an unchunked pass's up to the rounding of other batch
compositions (bit for bit when the chunk size is the whole split).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from llmrec.errors import CheckpointError
from llmrec.safe_files import save_safetensors, verify_safetensors

__all__ = ["DEFAULT_CHUNK_ROWS", "chunk_costs", "parse_part", "score_key", "score_resumably"]

#: rows per chunk file: about 4 minutes of SmolLM2 scoring on a 2-core CPU
DEFAULT_CHUNK_ROWS = 256

# configuration entries that do not change a score (where files are, how the run is driven)
_NOT_SCORING = ("out", "data", "cf", "init_from", "predictions", "device", "resume", "force")


def parse_part(text: str) -> Tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; ValueError (one line) otherwise."""
    k, sep, n = str(text).partition("/")
    try:
        part, parts = int(k), int(n)
    except ValueError:
        raise ValueError(f"--part takes K/N (e.g. 2/4), got {text!r}") from None
    if not sep or parts < 1 or not 1 <= part <= parts:
        raise ValueError(f"--part takes K/N with 1 <= K <= N, got {text!r}")
    return part, parts


def score_key(
    df, config: Dict[str, Any], state: Optional[Path], inputs: Any, batch_size: int, chunk: int
) -> Dict[str, Any]:
    """What decides the scores of ``df``'s rows, as a JSON-able dict (its sha256 names the
    chunk folder).

    Args:
        df: the rows scored (``uid``, ``iid``, ``label`` columns), in scoring order.
        config: the run's configuration (``RunConfig.to_dict()``).
        state: the trainable state file loaded (None: the method trains nothing).
        inputs: the input digests the run recorded (data, CF run, LLM weights), or None.
        batch_size: the eval batch size; chunk: rows per chunk.
    """
    from llmrec.safe_files import file_sha256

    order = np.stack([df[c].to_numpy().astype(np.int64) for c in ("uid", "iid", "label")], 1)
    cfg = {k: v for k, v in config.items() if k not in _NOT_SCORING}
    train = dict(cfg.get("train") or {})
    cfg["train"] = {k: train[k] for k in ("precision",) if k in train}
    return {
        "rows_sha256": hashlib.sha256(np.ascontiguousarray(order, "<i8").tobytes()).hexdigest(),
        "rows": len(df),
        "state_sha256": None if state is None else file_sha256(state),
        "config": cfg,
        "inputs": inputs,
        "eval_batch_size": int(batch_size),
        "chunk_rows": int(chunk),
    }


def _key_digest(key: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _chunk_file(folder: Path, start: int, stop: int) -> Path:
    return folder / f"rows-{start:07d}-{stop:07d}.safetensors"


def _read_chunk(path: Path, key_digest: str, length: int) -> np.ndarray:
    """A chunk file's scores ``(length,)`` float64, or CheckpointError (one line)."""
    from safetensors import safe_open

    hint = "delete it to score those rows again"
    try:
        verify_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            scores = f.get_tensor("scores").double().numpy()
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {hint}") from None
    except Exception as exc:  # any unreadable file: one line, the hint
        raise CheckpointError(f"{path}: unreadable scores ({type(exc).__name__}); {hint}") from None
    if meta.get("key") != key_digest or scores.shape != (length,):
        raise CheckpointError(f"{path}: scores of other rows or another state; {hint}")
    return scores


def score_resumably(
    df,
    score_rows: Callable[[Any], np.ndarray],
    run_dir: Path,
    key: Dict[str, Any],
    part: Optional[Tuple[int, int]] = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    machine: str = "",
    groups: Optional[np.ndarray] = None,
) -> Optional[np.ndarray]:
    """Scores ``(len(df),)`` float64 of every row of ``df``, chunk by chunk, reusing the chunk
    files already under ``run_dir/scores/<key>/``; None when ``part`` leaves rows unscored.

    Args:
        df: the rows, in scoring order; score_rows: ``frame -> (len(frame),)`` scores.
        run_dir: the run folder (chunks go to ``run_dir/scores``).
        key: :func:`score_key` of the rows; part: ``(K, N)`` to score only the K-th of N
            contiguous ranges of chunks (None: all of them).
        machine: where this process scores, recorded with each chunk it writes beside the
            chunk's scoring time (:func:`chunk_costs` sums them).
        groups: ``(len(df),)`` a group label per row, each group's rows contiguous: a chunk
            then ends at a group's end (it may hold more than ``chunk_rows`` rows), so no group
            is split between chunks (whole users, for a method that ranks a user's rows).
    """
    from tqdm.auto import tqdm

    n, chunk = len(df), int(key["chunk_rows"])
    digest = _key_digest(key)
    folder = Path(run_dir) / "scores" / digest[:16]
    folder.mkdir(parents=True, exist_ok=True)
    # a killed call's half-written temporaries (the run lock admits one evaluate at a time)
    for stale in folder.glob(".rows-*.tmp-*"):
        stale.unlink(missing_ok=True)
    key_file = folder / "key.json"
    if not key_file.exists():
        from llmrec.safe_files import atomic_write_json

        atomic_write_json(key_file, {**key, "sha256": digest})
    bounds = _chunk_bounds(n, chunk, groups)
    if part is None:
        mine = range(len(bounds))
    else:
        k, parts = part
        mine = range((k - 1) * len(bounds) // parts, k * len(bounds) // parts)
    scores = np.full(n, np.nan)
    todo: List[int] = []
    done = 0
    for i, (start, stop) in enumerate(bounds):
        path = _chunk_file(folder, start, stop)
        if path.exists():
            scores[start:stop] = _read_chunk(path, digest, stop - start)
            done += 1
        elif i in mine:
            todo.append(i)
    if todo:
        log(f"scoring {len(todo)} chunk(s) of {chunk} rows into {folder} ({done} of "
            f"{len(bounds)} already there)")  # fmt: skip
    import torch

    for i in tqdm(todo, desc="chunks", disable=not progress, leave=False):
        start, stop = bounds[i]
        began = time.perf_counter()
        got = np.asarray(score_rows(df.iloc[start:stop]), dtype=np.float64)
        if got.shape != (stop - start,):
            raise RuntimeError(f"scored {got.shape} for rows {start}..{stop}")
        meta = {"key": digest, "rows": f"{start}-{stop}", "machine": machine,
                "seconds": f"{time.perf_counter() - began:.3f}"}  # fmt: skip
        save_safetensors(
            _chunk_file(folder, start, stop), {"scores": torch.from_numpy(got)}, metadata=meta
        )
        scores[start:stop] = got
    missing = int(np.isnan(scores).sum())
    if missing:
        left = [f"{s}-{e}" for s, e in bounds if np.isnan(scores[s:e]).any()]
        log(f"{n - missing} of {n} rows scored; {len(left)} chunk(s) left ({', '.join(left[:4])}"
            f"{', ...' if len(left) > 4 else ''}): run the other parts, or --resume without "
            "--part, then the metrics are written")  # fmt: skip
        return None
    return scores


def _chunk_bounds(n: int, chunk: int, groups: Optional[np.ndarray]) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)``: ``chunk`` rows each, or, with
    ``groups``, extended to the end of the group the chunk's last row belongs to."""
    if groups is None:
        return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups must have one label per row ({n}), got {len(groups)}")
    if n == 0:
        return []
    change = np.flatnonzero(groups[1:] != groups[:-1]) + 1  # first row of each later group
    if len(np.unique(groups[np.r_[0, change]])) != len(change) + 1:
        raise ValueError("each group's rows must be contiguous")
    bounds, start = [], 0
    while start < n:
        after = change[change >= min(start + chunk, n)]
        stop = int(after[0]) if len(after) else n
        bounds.append((start, stop))
        start = stop
    return bounds


def chunk_costs(run_dir: Path, key: Dict[str, Any]) -> Dict[str, Any]:
    """What scoring ``key``'s chunk files cost, read from their metadata.

    Returns ``{"chunks", "timed_chunks", "seconds", "machines"}``: the chunk files present,
    how many of them recorded their scoring time (files written before it was recorded did
    not), the sum of those times (the scoring's compute time, however many processes,
    sessions or machines wrote the chunks) and the distinct machines that wrote them.
    """
    from safetensors import safe_open

    folder = Path(run_dir) / "scores" / _key_digest(key)[:16]
    chunks, timed, seconds, machines = 0, 0, 0.0, set()
    for path in sorted(folder.glob("rows-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        chunks += 1
        try:
            seconds += float(meta["seconds"])
            timed += 1
        except (KeyError, ValueError):
            pass
        if meta.get("machine"):
            machines.add(meta["machine"])
    return {"chunks": chunks, "timed_chunks": timed, "seconds": round(seconds, 3),
            "machines": sorted(machines)}  # fmt: skip
