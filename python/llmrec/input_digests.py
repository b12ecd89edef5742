"""The sha256 of every input file a run reads, recorded in ``run.json`` and verified later.

``run.json["inputs"]`` maps a group (``data``, ``cf``, ``llm``) to ``{file path: sha256}``
(paths relative to the run folder, :mod:`llmrec.run_paths`): the dataset's split files and
``meta.json``, the CF run's ``embeddings.safetensors`` (and a SASRec run's
``model.safetensors``, which encodes histories; or the ``--cf`` file), a local LLM
directory's weight files.
``evaluate``, ``recommend``, ``compare`` and ``--resume`` call :func:`verify_command_inputs`
before they read anything else: a file whose content changed (or that is gone) is refused
with one line naming it, unless ``--accept-changed-inputs`` is given; then the change is
recorded in ``run.json["accepted_input_changes"]`` and the new digests replace the old.

Each file is hashed once per process (streamed in 1 MiB blocks; a cache keyed by path, size
and modification time), however many runs name it.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from llmrec.errors import RunConfigError

__all__ = ["digest_inputs", "file_digest", "verify_command_inputs", "verify_run_inputs"]

PathLike = Union[str, Path]
ACCEPT_FLAG = "--accept-changed-inputs"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_digest(path: PathLike) -> str:
    """The sha256 hex digest of ``path``, computed once per process per file version."""
    from llmrec.safe_files import file_sha256

    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = file_sha256(real)
    return _CACHE[key]


def _files(group: str, path: PathLike) -> List[Path]:
    from llmrec.output_guard import DATASET_FILES

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    if group == "data":
        return [path / n for n in DATASET_FILES if (path / n).is_file()]
    if group == "cf":
        files = [path / n for n in ("embeddings.safetensors", "model.safetensors") if
                 (path / n).is_file() and (n == "embeddings.safetensors" or sequential_cf_run(path))]  # fmt: skip
        return files
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def sequential_cf_run(cf_run: PathLike) -> bool:
    """Whether ``cf_run`` is a CF run directory of a sequential model (SASRec), whose model the
    LLM methods run on each row's history (:mod:`llmrec.cf.user_vectors`); False for any
    other model, a file, or a directory whose ``run.json`` does not say."""
    try:
        info = json.loads((Path(cf_run) / "run.json").read_text())
        return info["config"]["model"] == "sasrec"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def digest_inputs(**groups: Optional[PathLike]) -> Dict[str, Dict[str, str]]:
    """``{group: {absolute file path: sha256}}`` for ``data=``, ``cf=``, ``llm=`` paths
    (``None``, the synthetic data or a hub model name: nothing recorded)."""
    found: Dict[str, Dict[str, str]] = {}
    for group, path in groups.items():
        if path is None:
            continue
        files = _files(group, path)
        if files:
            found[group] = {str(p.absolute()): file_digest(p) for p in files}
    return found


def verify_run_inputs(
    run_dir: PathLike, *, accept: bool = False, skip: Tuple[str, ...] = (), command: str = ""
) -> List[str]:
    """Check the digests recorded in ``run_dir/run.json``; returns the changes accepted.

    Raises :class:`RunConfigError` naming the first changed file unless ``accept``; with it,
    the changes and the new digests are written to ``run.json``. ``skip``: groups the command
    does not read (``data`` when ``--data`` names another dataset).
    """
    from llmrec.run_paths import WRITTEN_IN, resolve_run_path
    from llmrec.safe_files import atomic_write_json

    run_file = Path(run_dir) / "run.json"
    try:
        info = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return []  # no run or an unreadable one: the command itself says so
    inputs = info.get("inputs") if isinstance(info, dict) else None
    if not isinstance(inputs, dict):
        return []  # an older run: nothing recorded
    changes: List[str] = []
    written_in = info.get(WRITTEN_IN)
    for group, files in inputs.items():
        if group in skip or not isinstance(files, dict):
            continue
        for recorded, old in files.items():
            # a path relative to the run folder is checked where the run is now
            path = resolve_run_path(recorded, run_dir, written_in)
            new = file_digest(path) if os.path.isfile(path) else None
            if new == old:
                continue
            what = "is gone" if new is None else f"changed (sha256 {old[:12]}... -> {new[:12]}...)"
            if not accept:
                raise RunConfigError(
                    f"{run_dir}: its {group} input {path} {what} since the run recorded it; "
                    f"pass {ACCEPT_FLAG} to use it anyway (recorded in run.json)"
                )
            changes.append(f"{path} {what}")
            if new is not None:
                files[recorded] = new
    if changes:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        info.setdefault("accepted_input_changes", []).extend(
            {"when": stamp, "command": command, "change": c} for c in changes
        )
        atomic_write_json(run_file, info)
    return changes


def verify_command_inputs(args, log=None) -> None:
    """:func:`verify_run_inputs` for each run a parsed ``llmrec`` command reads: ``evaluate``,
    ``recommend`` and ``export`` its run, ``compare`` its run directories, ``train`` /
    ``train-cf --resume`` its ``--out``."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    accept = bool(get("accept_changed_inputs"))  # command_options.InputCheckOptions
    cmd = args.command
    runs: List[Tuple[str, Tuple[str, ...]]] = []
    if cmd in ("evaluate", "recommend", "export"):
        runs = [(get("run"), ("data",) if get("data") is not None else ())]
    elif cmd == "compare":
        runs = [(p, ()) for p in get("runs") or [] if Path(p).is_dir()]
    elif cmd == "train" and get("run.resume"):
        runs = [(get("run.out"), ())]
    elif cmd == "train-cf" and get("cf.resume"):
        runs = [(get("cf.out"), ())]
    for run_dir, skip in runs:
        if run_dir is None:
            continue
        for change in verify_run_inputs(run_dir, accept=accept, skip=skip, command=cmd):
            if log is not None:
                log(f"{ACCEPT_FLAG}: {run_dir}: {change} (recorded in run.json)")
