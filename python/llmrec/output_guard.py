"""Where a command may write: the one rule every ``llmrec`` command passes before it writes.

* A run directory (``train --out``, ``train-cf --out``) is written only when it is new, empty,
  or already a run (``run.json`` or the lock file of an earlier, interrupted start); the run's
  kind and method are then checked by :func:`llmrec.run_store.claim_run_dir`. A dataset
  directory, or a non-empty directory that no run created, is refused, with ``--force`` too:
  ``--force`` moves aside only runs.
* No output path (``--out``, ``--predictions``, ``--metrics``, ``--lists``, ``--plot``,
  ``--json``) may name a file inside a run or dataset the command reads (its ``--data``, the
  CF run, the evaluated run, ``--init-from``, the compared runs), with one exception:
  ``evaluate`` and ``recommend`` write their reports into the run they read by default
  (``RUN/eval_<split>.json``), so a report file of theirs may sit directly in that run
  (``RUN/eval_test_all.json``, ``RUN/test_predictions.csv``): a ``.json`` or ``.csv``
  that is not one of the run's own records (:data:`RUN_RECORDS`).

:func:`check_command_paths` applies both to parsed CLI arguments; it only reads the file
system. :func:`check_out_dir` is also called by ``claim_run_dir`` itself, so the rule holds
for the Python API as well.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from llmrec.errors import RunConfigError

__all__ = [
    "check_command_paths",
    "check_out_dir",
    "check_outputs",
    "is_dataset",
    "is_report_of",
    "is_run",
]

PathLike = Union[str, Path]

#: files that make a directory a dataset (CoLLM schema, :mod:`llmrec.data.loader`)
DATASET_FILES = (
    "meta.json",
    *(
        f"{s}.{ext}"
        for s in ("train", "valid", "valid_small", "test")
        for ext in ("parquet", "csv")
    ),
)
_RUN_MARKS = ("run.json", ".llmrec.lock")
#: the report files of a run that its commands read back: never another command's output
RUN_RECORDS = ("run.json", "metrics.json", "stage_done.json")
_REPORT_SUFFIXES = (".json", ".csv")


def is_dataset(path: PathLike) -> bool:
    """Whether ``path`` is a directory holding dataset files (``train.csv``, ``meta.json``...)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in DATASET_FILES)


def is_run(path: PathLike) -> bool:
    """Whether ``path`` is a directory a run created (``run.json`` or its lock file)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in _RUN_MARKS)


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: PathLike, flag: str) -> None:
    """Refuse ``path`` when the folder that would hold it cannot be created or written."""
    parent = _first_existing(Path(path).absolute().parent)
    if not parent.is_dir():
        raise RunConfigError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunConfigError(f"{flag} {path}: {parent} is not writable")


def check_out_dir(out: PathLike, *, flag: str = "--out", kind: str = "run") -> None:
    """Refuse an output directory that is a dataset or a non-empty directory of something else.

    ``kind`` ``"run"``: a run directory (new, empty, or already a run); ``"dataset"``
    (``make-data``): new, empty, or already a dataset.
    """
    out = Path(out)
    if not out.exists():
        check_writable_parent(out, flag)
        return
    if not out.is_dir():
        raise RunConfigError(f"{flag} {out}: exists and is not a directory")
    if kind == "dataset":
        if is_run(out):
            raise RunConfigError(f"{flag} {out} is a run directory; choose another {flag}")
        if is_dataset(out) or not any(out.iterdir()):
            return
    else:
        if is_dataset(out):
            raise RunConfigError(
                f"{flag} {out} is a dataset directory (it holds data files); a run never "
                f"writes into a dataset, --force included: choose another {flag}"
            )
        if is_run(out) or not any(out.iterdir()):
            return
    raise RunConfigError(
        f"{flag} {out} is a non-empty directory that llmrec did not create; choose a new or "
        f"empty {flag} (--force moves aside only runs)"
    )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolved(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def is_report_of(path: PathLike, run_dir: PathLike) -> bool:
    """Whether ``path`` is a report file ``evaluate``/``recommend`` may write into the run
    they read: directly in ``run_dir``, a ``.json`` or ``.csv``, not a hidden file, not one of
    the run's own records (:data:`RUN_RECORDS`)."""
    p, run = _resolved(path), _resolved(run_dir)
    return (
        p.parent == run
        and p.suffix in _REPORT_SUFFIXES
        and not p.name.startswith(".")
        and p.name not in RUN_RECORDS
        and not p.is_dir()
    )


def check_outputs(
    outputs: Iterable[Tuple[str, Optional[PathLike]]],
    reads: Iterable[Tuple[str, Optional[PathLike]]],
    reports_into: Optional[PathLike] = None,
) -> None:
    """Refuse an output path inside (or equal to) a run or dataset the command reads.

    ``outputs`` and ``reads``: ``(flag, path)`` pairs; ``None`` paths are skipped. A read path
    that is a file (``--init-from X.safetensors``, ``--cf RUN/embeddings.safetensors``)
    protects the run or dataset directory holding it. ``reports_into``: the run whose
    report files (:func:`is_report_of`) the command may write.
    """
    own = _resolved(reports_into) if reports_into is not None else None
    folders: List[Tuple[str, Path]] = []
    for flag, path in reads:
        if path is None:
            continue
        p = _resolved(path)
        if p.is_file() and (is_run(p.parent) or is_dataset(p.parent)):
            p = p.parent
        folders.append((flag, p))
    for flag, path in outputs:
        if path is None:
            continue
        p = _resolved(path)
        for read_flag, folder in folders:
            if folder == own and is_report_of(p, folder):
                continue
            if _inside(p, folder):
                what = "dataset" if is_dataset(folder) else "run" if is_run(folder) else "input"
                raise RunConfigError(
                    f"{flag} {path} is inside the {what} {folder} ({read_flag}), which this "
                    f"command reads; write it elsewhere"
                    + (
                        " (a report file of its own may sit directly in the run: a new .json "
                        "or .csv name)"
                        if folder == own
                        else ""
                    )
                )
        if not p.is_dir():
            check_writable_parent(p, flag)


def _run_inputs(run_dir: Optional[PathLike]) -> List[Tuple[str, Optional[str]]]:
    """The data and CF paths a finished run recorded (nothing when run.json is unreadable:
    the command itself reports that)."""
    from llmrec.run_paths import resolve_run_info

    if run_dir is None:
        return []
    try:
        info = resolve_run_info(json.loads((Path(run_dir) / "run.json").read_text()), run_dir)
        config = info.get("config") or {}
        found = [("the run's data", config.get("data"))]
        if info.get("cf_path"):
            found.append(("the run's CF run", info["cf_path"]))
        return [(flag, p) for flag, p in found if isinstance(p, str)]
    except (OSError, ValueError, AttributeError):
        return []


def check_command_paths(args) -> None:
    """The rule for a parsed ``llmrec`` command line (``args.command``): raises
    :class:`RunConfigError` before anything is written."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    cmd = args.command
    outputs: Dict[str, Optional[str]] = {}
    reads: List[Tuple[str, Optional[str]]] = []
    if cmd == "train":
        check_out_dir(get("run.out"))
        llm = get("run.llm")
        reads = [("--data", get("run.data")), ("--cf", get("run.cf")),
                 ("--init-from", get("run.init_from"))]  # fmt: skip
        if llm and llm != "tiny" and Path(llm).exists():
            reads.append(("--llm", llm))
        outputs = {"--out": get("run.out"), "--predictions": get("run.predictions")}
    elif cmd == "train-cf":
        check_out_dir(get("cf.out"))
        reads = [("--data", get("cf.data"))]
        outputs = {"--out": get("cf.out"), "--predictions": get("cf.predictions")}
    elif cmd in ("evaluate", "recommend"):
        reads = [("--run", get("run")), ("--data", get("data")), ("--state", get("state")),
                 *_run_inputs(get("run"))]  # fmt: skip
        if cmd == "evaluate":
            outputs = {"--metrics": get("metrics"), "--predictions": get("predictions")}
        else:
            outputs = {"--out": get("out"), "--lists": get("lists")}
    elif cmd == "export":  # DIR itself is checked by llmrec.adapter.export_run
        reads = [("RUN", get("run")), ("--data", get("data")), *_run_inputs(get("run"))]
        outputs = {"DIR": get("dir")}
    elif cmd == "compare":
        reads = [("RUN_DIR", p) for p in get("runs") or []]
        outputs = {"--json": get("json"), "--plot": None if get("no_plot") else get("plot")}
    elif cmd == "make-data":
        check_out_dir(get("out"), kind="dataset")
        return
    reports_into = get("run") if cmd in ("evaluate", "recommend") else None
    check_outputs(outputs.items(), reads, reports_into)


# ---------------------------------------------------------------------------------------------
# after a failure: this process's temporaries, a directory it created and left empty


def written_dirs(args) -> List[Path]:
    """The run directory and output-file folders a parsed command writes into."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    dirs = [get("run.out"), get("cf.out"), get("run") if args.command != "compare" else None]
    if args.command == "make-data":
        dirs.append(get("out"))
    files = [get(n) for n in ("run.predictions", "cf.predictions", "predictions", "metrics",
                              "lists", "json")]  # fmt: skip
    if args.command == "recommend":
        files.append(get("out"))
    if args.command == "compare" and not get("no_plot"):
        files.append(get("plot"))
    found = [Path(d) for d in dirs if isinstance(d, str)]
    found += [Path(f).absolute().parent for f in files if isinstance(f, str)]
    return found


def remove_own_temporaries(folders: Iterable[Path], pid: Optional[int] = None) -> List[str]:
    """Remove the temporaries (``.*tmp-*<pid>*``) this process left under ``folders``
    (a run directory recursively) after an interrupt or an OS error; another process's are
    never touched (its pid differs)."""
    import re
    import shutil

    own = re.compile(rf"^\..*tmp-.*(?<!\d){pid or os.getpid()}(?!\d)")
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for root, dirs, files in os.walk(folder):
            for name in list(dirs):
                if own.match(name):
                    shutil.rmtree(Path(root) / name, ignore_errors=True)
                    dirs.remove(name)
                    removed.append(name)
            for name in files:
                if own.match(name):
                    with contextlib.suppress(OSError):
                        os.unlink(Path(root) / name)
                    removed.append(name)
    return removed


def remove_if_unmade(folder: Optional[Path]) -> bool:
    """Remove ``folder`` (created by this command) when it holds no ``run.json`` and no
    dataset file: nothing in it can be resumed or read. Returns whether it was removed."""
    import fcntl
    import shutil

    if folder is None or not folder.is_dir() or (folder / "run.json").exists():
        return False
    if is_dataset(folder):
        return False
    try:  # another process that raced us into the new folder holds its lock: leave it
        fd = os.open(folder / ".llmrec.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if (folder / "run.json").exists():
            return False
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True
