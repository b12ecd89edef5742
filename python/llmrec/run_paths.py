"""Paths in ``run.json``, relative to the run folder, so that a run survives a move.

:func:`portable_run_info` (used by :func:`llmrec.run_store.write_run_info`) writes every
absolute path of a run's record (the ``config`` paths, ``cf_path``, the ``inputs`` files) as
``./x`` or ``../x`` relative to the run directory; :func:`resolve_run_info` (used by
:func:`llmrec.run_store.read_run_info` and every other reader) turns them back into absolute
paths for the place the run is in now. A run moved together with its data and CF run (their
parent folder moved) finds them beside it; a run folder moved alone still finds inputs that
stayed where they were (``written_in``); ``--data`` given again overrides the data. Runs
written before (absolute paths) read as they always did.

This module imports nothing beyond the standard library: the CLI's path checks read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "PATH_KEYS",
    "WRITTEN_IN",
    "portable_run_info",
    "resolve_run_info",
    "resolve_run_path",
]

PathLike = Union[str, Path]

#: the ``config`` keys of a run.json that may hold a path (an LLM run's and a CF run's)
PATH_KEYS = ("out", "data", "cf", "llm", "init_from", "predictions")
#: the run directory's absolute path when run.json was written: the fallback for inputs that
#: stayed where they were when the run folder alone moved
WRITTEN_IN = "written_in"


def _is_run_relative(value) -> bool:
    return isinstance(value, str) and (
        value in (".", "..") or value.startswith("./") or value.startswith("../")
    )


def _portable(path, run_dir: str):
    """An absolute path as ``./x`` or ``../x`` relative to ``run_dir``; anything else (a model
    name, a Hub ID, ``tiny``, None) as it is."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, run_dir)
    return rel if rel == "." or _is_run_relative(rel) else f"./{rel}"


def resolve_run_path(value, run_dir: PathLike, written_in: Optional[str] = None):
    """A run.json path value made absolute for the run's present place ``run_dir``.

    ``./x`` and ``../x`` are relative to the run directory. When that names nothing but the
    same relative path from where the run was written (``written_in``) does, that one: a run
    folder moved alone still finds the inputs that did not move. Absolute paths (older runs)
    and non-paths are returned as they are.
    """
    if not _is_run_relative(value):
        return value
    here = os.path.normpath(os.path.join(os.path.abspath(run_dir), value))
    if written_in and not os.path.exists(here):
        there = os.path.normpath(os.path.join(written_in, value))
        if os.path.exists(there):
            return there
    return here


def portable_run_info(info: dict, run_dir: PathLike) -> dict:
    """``info`` with its paths (``config`` :data:`PATH_KEYS`, ``cf_path``, the ``inputs``
    files) relative to ``run_dir``, so the run folder survives a move (with its inputs
    beside it, or with ``--data`` given again)."""
    base = os.path.abspath(run_dir)
    info = dict(info, **{WRITTEN_IN: base})
    if isinstance(info.get("config"), dict):
        info["config"] = {
            k: _portable(v, base) if k in PATH_KEYS else v for k, v in info["config"].items()
        }
    if "cf_path" in info:
        info["cf_path"] = _portable(info["cf_path"], base)
    if isinstance(info.get("inputs"), dict):
        info["inputs"] = {
            group: {_portable(p, base): d for p, d in files.items()}
            if isinstance(files, dict) else files
            for group, files in info["inputs"].items()
        }  # fmt: skip
    return info


def resolve_run_info(info: dict, run_dir: PathLike) -> dict:
    """The inverse of :func:`portable_run_info` for the run's present place ``run_dir``:
    every relative path made absolute (:func:`resolve_run_path`)."""
    written_in = info.get(WRITTEN_IN)
    written_in = written_in if isinstance(written_in, str) else None

    def resolve(value):
        return resolve_run_path(value, run_dir, written_in)

    info = dict(info)
    if isinstance(info.get("config"), dict):
        info["config"] = {k: resolve(v) if k in PATH_KEYS else v for k, v in info["config"].items()}
    if "cf_path" in info:
        info["cf_path"] = resolve(info["cf_path"])
    if isinstance(info.get("inputs"), dict):
        info["inputs"] = {
            group: {resolve(p): d for p, d in files.items()} if isinstance(files, dict) else files
            for group, files in info["inputs"].items()
        }
    return info
