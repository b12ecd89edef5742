"""The run directory: its layout, its configuration, and every file written into it.

A run directory (``llmrec train --out OUT``, ``llmrec train-cf --out OUT``) holds

* ``run.json``: what the run is (``kind`` ``"llm"`` or ``"cf"``, the method, the full
  config, the CF embeddings used, a data summary), written before any training;
* ``metrics.json``: the final metrics (a ``test`` and a ``valid`` block, ``train``,
  ``config``, ``wall_time_s``); ``eval_<split>.json`` from ``llmrec evaluate``;
* ``best.safetensors``: the best trainable state; ``checkpoints/`` with the ``latest``
  pointer (written by :class:`llmrec.training_loop.Trainer`); ``train_log.jsonl``;
* ``llm/``: the tiny LLM (``--llm tiny``), ``cf/``: an MF trained when no ``--cf`` was given;
* one subdirectory per earlier training stage of a multi-stage method (``step1/``, ...).

Every file is written through :mod:`llmrec.safe_files` (temporary name, flush, rename).
The configuration itself is :mod:`llmrec.config`; this module owns the directory.

Guarantees (docs/reliability.md):

* one writer: :func:`claim_run_dir` takes ``<out>/.llmrec.lock`` with ``fcntl.flock`` for
  the run's life (the kernel drops it when the process dies, even by ``kill -9``, so a
  stale lock never blocks; the file's pid/host/start time name the holder, and a record
  left in it tells the next run that its writer died);
* no silent overwrite: a directory holding another run is refused unless ``--resume``
  (same kind, method and config) or ``--force`` (the old directory is renamed aside,
  never deleted);
* resumable after a kill at any point: temporaries of dead writers are removed when the
  next run claims the directory, an orphan checkpoint (renamed into place, ``latest`` not
  yet moved) is adopted when complete and intact, else discarded; ``checkpoints/latest``
  may name only a checkpoint of its own directory;
* every safetensors file written here is sealed with its digest
  (:func:`llmrec.safe_files.seal_safetensors`) and verified before it is loaded.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from llmrec.config import RunConfig, resume_keys, resume_mismatches, with_legacy_defaults
from llmrec.errors import CheckpointError, RunConfigError
from llmrec.metrics import json_safe
from llmrec.run_paths import portable_run_info, resolve_run_info
from llmrec.safe_files import (
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    kill_point,
    read_json,
    seal_safetensors,
    verify_safetensors,
    write_predictions,
)

__all__ = [
    "BEST",
    "LATEST",
    "METRICS_FILE",
    "RUN_FILE",
    "STAGE_DONE",
    "TRAINABLE",
    "TRAINER",
    "TRAIN_LOG",
    "JsonlLog",
    "RunLock",
    "append_jsonl",
    "check_resume_config",
    "check_stage_dir_free",
    "claim_run_dir",
    "clean_temporaries",
    "latest_checkpoint",
    "read_run_info",
    "read_stage_done",
    "recover_checkpoints",
    "reopen_config",
    "resume_train_log",
    "rewrite_jsonl",
    "save_tiny_llm",
    "write_checkpoint",
    "write_metrics",
    "write_run_info",
    "write_stage_done",
]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
BEST = "best.safetensors"
LATEST = "latest"
TRAINABLE = "trainable.safetensors"
TRAINER = "trainer.safetensors"
STAGE_DONE = "stage_done.json"
LOCK_FILE = ".llmrec.lock"
TRAIN_LOG = "train_log.jsonl"

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# run.json, metrics, reopening


def machine_info(device: Optional[str] = None) -> Dict[str, object]:
    """Where a run or a scoring pass ran, for its metrics: the CPU model, its logical cores,
    torch's intra-op threads and, on a CUDA ``device``, the GPU's name.

    Wall times are only comparable between equal entries: the results tables print these.
    """
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)  # fmt: skip
    except OSError:
        pass
    gpu = None
    wants_gpu = device is not None and str(device).split(":")[0] in ("cuda", "auto")
    if wants_gpu and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(None if device == "auto" else torch.device(device))
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu}  # fmt: skip


def write_run_info(out: PathLike, kind: str, name_key: str, name: str, config: dict, **extra):
    """``<out>/run.json``: ``kind``, the method/model name, the config, ``created``, extras;
    paths relative to ``out`` (:func:`portable_run_info`)."""
    info = {
        "kind": kind,
        name_key: name,
        "config": config,
        **extra,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    info = portable_run_info(info, out)
    old = Path(out) / RUN_FILE
    if old.exists():  # input changes accepted earlier (--accept-changed-inputs) stay on record
        with contextlib.suppress(OSError, ValueError, AttributeError):
            accepted = json.loads(old.read_text()).get("accepted_input_changes")
            if accepted:
                info["accepted_input_changes"] = accepted
    atomic_write_json(Path(out) / RUN_FILE, info)


def read_run_info(run_dir: PathLike) -> dict:
    """The ``run.json`` of a run directory (:class:`RunConfigError` when there is none), its
    relative paths made absolute for where the run is now (:func:`resolve_run_info`)."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        raise RunConfigError(f"{run_dir}: no {RUN_FILE} (not a run directory written by llmrec)")
    info = read_json(run_file, RunConfigError)
    if (
        not isinstance(info, dict)
        or info.get("kind") not in ("llm", "cf")
        or not isinstance(info.get("config"), dict)
    ):
        raise RunConfigError(
            f"{run_file}: malformed (expected an object with 'kind' llm or cf and a 'config')"
        )
    return resolve_run_info(info, run_dir)


def write_metrics(
    out: PathLike,
    metrics: dict,
    *,
    metrics_path: Optional[PathLike] = None,
    predictions: Optional[PathLike] = None,
    pred_df=None,
    scores: Optional[np.ndarray] = None,
) -> Path:
    """Write ``metrics`` to ``metrics_path`` (default ``<out>/metrics.json``) and, when
    ``predictions`` is given, ``pred_df``'s rows with ``scores`` as a CSV. Returns the path."""
    target = Path(metrics_path) if metrics_path else Path(out) / METRICS_FILE
    if predictions:  # first: a failed predictions write (full disk) leaves the metrics as they were
        write_predictions(predictions, pred_df, scores)
    atomic_write_json(target, metrics)
    return target


def reopen_config(
    run_dir: PathLike, info: dict, *, data_path=None, device="auto", progress=True
) -> RunConfig:
    """The :class:`RunConfig` of a finished LLM run, pointed at the run's own files.

    The tiny LLM is the one saved in ``<run>/llm`` (never a freshly built random one), the CF
    embeddings those the run used; resuming and ``init_from`` are off.
    """
    run_dir = Path(run_dir)
    cfg = RunConfig.from_dict(info["config"])
    cfg.out = str(run_dir)
    if cfg.llm == "tiny":
        cfg.llm = str(run_dir / "llm")
        if not (run_dir / "llm" / "config.json").exists():
            raise RunConfigError(f"{run_dir}: the run's tiny LLM (llm/) is missing")
    if data_path is not None:
        cfg.data = data_path
    cfg.cf = info.get("cf_path") or cfg.cf
    cfg.device, cfg.resume, cfg.init_from = device, False, None
    cfg.train.progress = progress
    return cfg


def check_resume_config(
    cfg: RunConfig, out: PathLike, options_of: Optional[Callable[[dict], dict]] = None
) -> None:
    """Refuse to overwrite a run with checkpoints, or to resume it with other options.

    The fields compared are those marked ``resume=True`` (:func:`llmrec.config.option`);
    ``options_of(config dict)``, when given, returns the method's options that must match
    too (:func:`llmrec.method.resume_options`), compared the same way.
    """
    out = Path(out)
    has_ckpt = (out / "checkpoints" / LATEST).exists()
    if not cfg.resume:
        if has_ckpt:
            raise RunConfigError(
                f"{out} already holds a run with checkpoints; pass --resume to continue it or "
                "choose another --out"
            )
        return
    if not (out / RUN_FILE).exists():
        return
    old = with_legacy_defaults(read_run_info(out)["config"])
    new = cfg.to_dict()
    diffs = resume_mismatches(old, new, resume_keys(RunConfig))
    if options_of is not None:
        old_opts, new_opts = options_of(old), options_of(new)
        diffs += resume_mismatches(old_opts, new_opts, sorted(new_opts))
    if diffs:
        raise RunConfigError(
            f"--resume: the options differ from the run in {out} ({'; '.join(diffs)})"
        )


def check_stage_dir_free(stage_dir: PathLike, resume: bool) -> None:
    """An earlier stage's directory must not hold checkpoints unless the run resumes."""
    stage_dir = Path(stage_dir)
    if not resume and (stage_dir / "checkpoints").exists():
        raise RunConfigError(
            f"{stage_dir} already holds checkpoints of an earlier stage; pass --resume to "
            "continue the run or choose another --out"
        )


def read_stage_done(stage_dir: PathLike) -> Optional[dict]:
    """The summary of a finished earlier stage, or None when it has not finished."""
    path = Path(stage_dir) / STAGE_DONE
    return read_json(path) if path.exists() else None


def write_stage_done(stage_dir: PathLike, info: dict) -> None:
    atomic_write_json(Path(stage_dir) / STAGE_DONE, info)


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint directory named by ``<out>/checkpoints/latest``, or None."""
    pointer = Path(out_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc})") from None
    # only a checkpoint of this very run: no path separators, no '..', no absolute path
    if not _CKPT_NAME.fullmatch(name):
        raise CheckpointError(
            f"{pointer}: names {name[:80]!r}, which is not a checkpoint of this run "
            "(expected ckpt-<seq>-step<step>)"
        )
    path = pointer.parent / name
    if not (path / TRAINABLE).exists() or not (path / TRAINER).exists():
        raise CheckpointError(f"{pointer}: points to {path}, which is not a complete checkpoint")
    return path


_CKPT_NAME = re.compile(r"ckpt-\d+-step\d+")


def _checkpoint_ok(path: Path) -> bool:
    try:
        for f in (TRAINABLE, TRAINER):
            verify_safetensors(path / f)
    except CheckpointError:
        return False
    return True


def recover_checkpoints(out_dir: PathLike, log=None) -> Optional[str]:
    """Repair ``<out>/checkpoints`` after a kill; returns what was done (or None).

    A checkpoint folder newer than ``latest`` (killed after its rename, before the pointer
    moved) is adopted when complete and intact; incomplete or corrupt ones newer than
    ``latest`` are removed (they hold nothing that a replay from ``latest`` does not redo).
    """
    import shutil

    ck = Path(out_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    current = None
    if (ck / LATEST).exists():
        current = latest_checkpoint(out_dir).name
    names = sorted(p.name for p in ck.iterdir() if p.is_dir() and _CKPT_NAME.fullmatch(p.name))
    newer = [n for n in names if current is None or n > current]
    done = []
    for name in reversed(newer):
        if not _checkpoint_ok(ck / name):
            shutil.rmtree(ck / name, ignore_errors=True)
            done.append(f"discarded incomplete {name}")
        elif current is None or name > current:
            atomic_write_text(ck / LATEST, name + "\n")
            done.append(f"adopted {name}")
            current = name
    msg = f"{ck}: " + ", ".join(done) if done else None
    if msg and log is not None:
        log(msg)
    return msg


def append_jsonl(path: PathLike, record: dict) -> None:
    """One JSON line appended (the training log; on resume it is rewritten from the
    checkpoint's history by :func:`rewrite_jsonl`, which drops torn or repeated lines)."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")
        f.flush()
    kill_point(f"append:{Path(path).name}")


class JsonlLog:
    """A JSON-lines file kept open for appending: one line per :meth:`write`, flushed at once
    (line-buffered) so a reader or a kill sees whole records, never fsynced (a per-step
    fsync would cost more than a small model's step; a crash loses at most the tail, which
    the next ``--resume`` rebuilds from the checkpoint, see :func:`resume_train_log`)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(json_safe(record)) + "\n")
        kill_point(f"append:{self.path.name}")

    def close(self) -> None:
        self._file.close()


def resume_train_log(path: PathLike, history: List[dict], step: int) -> List[dict]:
    """The records ``train_log.jsonl`` holds at a (re)start from a checkpoint at ``step``.

    Evaluation records are the checkpoint's own ``history`` (exactly, in order). Per-step
    records (``"kind": "step"``) are not in the checkpoint: those the file already holds for
    steps ``<= step`` are kept (each step once, the first line of it); the ones after
    ``step`` that a kill left behind are dropped, since the resumed run writes those steps
    again; a torn or unreadable line is dropped. Each step record goes before the
    evaluation record of the same step, as in an uninterrupted run.
    """
    steps: Dict[int, dict] = {}
    if step > 0 and Path(path).exists():
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("kind") != "step":
                continue
            at = rec.get("step")
            if isinstance(at, int) and 0 < at <= step and at not in steps:
                steps[at] = rec
    merged = [(at, 0, i, rec) for i, (at, rec) in enumerate(sorted(steps.items()))]
    merged += [(int(rec.get("step", 0)), 1, i, rec) for i, rec in enumerate(history)]
    return [rec for *_, rec in sorted(merged, key=lambda m: m[:3])]


def rewrite_jsonl(path: PathLike, records: List[dict]) -> None:
    """``path`` atomically replaced by exactly ``records``, one JSON line each."""
    atomic_write_text(path, "".join(json.dumps(json_safe(r)) + "\n" for r in records))


def write_checkpoint(out_dir: PathLike, name: str, fill, keep: int = 2) -> Path:
    """A complete checkpoint ``<out>/checkpoints/<name>/``, then the ``latest`` pointer.

    ``fill(tmp_dir)`` writes the files into a temporary directory, which is renamed into
    place only when complete; the pointer is replaced after that, so an interrupted run always
    finds a complete checkpoint. The oldest checkpoints beyond ``keep`` are removed
    (``keep`` 0: none are, e.g. for a learning curve from one run's states).
    """
    import shutil

    ck = Path(out_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    tmp = ck / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    for f in tmp.iterdir():
        if f.suffix == ".safetensors":
            seal_safetensors(f)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    kill_point("checkpoint:filled")
    path = ck / name
    if path.exists():  # a replay after a kill reaches the same name: this one is newer
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_dir(ck)
    kill_point("checkpoint:renamed")
    atomic_write_text(ck / LATEST, name + "\n")
    kill_point("checkpoint:latest")
    old = sorted(p for p in ck.glob("ckpt-*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else ():
        shutil.rmtree(p, ignore_errors=True)
    return path


def save_tiny_llm(out_dir: PathLike, save) -> Path:
    """``<out>/llm``, written by ``save(tmp_dir)`` into a temporary directory and renamed."""
    import shutil

    target = Path(out_dir) / "llm"
    tmp = Path(out_dir) / f".llm.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    kill_point("llm:saved")
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------
# ownership: one writer per run directory


_TMP_NAME = re.compile(r"^\.(tmp-|.*\.tmp-)")


def clean_temporaries(out_dir: PathLike) -> List[str]:
    """Remove the temporaries of dead writers under ``out_dir`` (``.tmp-*``, ``.*.tmp-*``:
    half-written files, checkpoints, tiny-LLM copies); only called under the run's lock."""
    import shutil

    removed = []
    for root, dirs, files in os.walk(out_dir):
        for name in list(dirs):
            if _TMP_NAME.match(name):
                shutil.rmtree(Path(root) / name, ignore_errors=True)
                dirs.remove(name)
                removed.append(str(Path(root) / name))
        for name in files:
            if _TMP_NAME.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path(root) / name)
                removed.append(str(Path(root) / name))
    return removed


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<out>/.llmrec.lock`` for the life of a run.

    The kernel releases the lock when the process dies however it dies, so a lock left by a
    dead process is never an obstacle; the pid, host and start time written into the file
    name the live holder in the refusal message.
    """

    def __init__(self, out_dir: PathLike, what: str = "run"):
        import fcntl

        self.fd: Optional[int] = None
        self.path = Path(out_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise RunConfigError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or choose "
                "another --out"
            ) from None
        self.fd = fd
        self.stale = os.read(fd, 4096).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            os.write(
                fd, f"{what} pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode()
            )
        except OSError:  # a full disk: drop the lock now, so the failed start can be cleaned up
            self.release()
            raise

    def release(self) -> None:
        if self.fd is not None:
            # an empty file after a clean end: a record found by the next holder means its
            # writer died holding the lock
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _aside_name(out: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cand = out.with_name(f"{out.name}.old-{stamp}")
    k = 1
    while cand.exists():
        k += 1
        cand = out.with_name(f"{out.name}.old-{stamp}-{k}")
    return cand


def claim_run_dir(
    out: PathLike,
    kind: str,
    name_key: str,
    name: str,
    *,
    resume: bool = False,
    force: bool = False,
    log=None,
) -> RunLock:
    """Make ``out`` this run's directory and return its held :class:`RunLock`.

    Refuses (:class:`RunConfigError`) a directory in use by a live process, and one that
    holds a run (``run.json``) unless ``resume`` and it is a run of the same ``kind`` and
    ``name`` (the caller checks the config). ``force`` renames a non-empty directory to
    ``<out>.old-<time>`` and starts afresh. Temporaries of dead writers are removed.
    """
    from llmrec.output_guard import check_out_dir

    out = Path(out)
    check_out_dir(out)  # never a dataset or a directory no run created, --force included
    lock = RunLock(out)
    try:
        return _claim_locked(out, lock, kind, name_key, name, resume, force, log or print)
    except BaseException:
        lock.release()
        raise


def _claim_locked(out, lock, kind, name_key, name, resume, force, log) -> RunLock:
    if lock.stale:
        log(f"{out}: the lock of a dead process ({lock.stale}) was taken over")
    info = None
    if (out / RUN_FILE).exists():
        try:
            info = read_run_info(out)
        except RunConfigError:
            if not force:
                raise
    if force:
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            aside = _aside_name(out)
            lock.release()
            os.rename(out, aside)
            log(f"--force: moved the old {out} aside to {aside}")
            lock = RunLock(out)
        return lock
    if info is not None:
        old_name = info.get(name_key, info.get("method", info.get("model")))
        if info["kind"] != kind or old_name != name:
            raise RunConfigError(
                f"{out} holds a {info['kind']} run of {old_name!r}, not {kind} {name!r}; "
                "choose another --out, or pass --force to move it aside"
            )
        if not resume:
            raise RunConfigError(
                f"{out} already holds a run; pass --resume to continue it, --force to move "
                "it aside, or choose another --out"
            )
    removed = clean_temporaries(out)
    if removed:
        log(f"removed {len(removed)} temporary file(s) of an interrupted run")
    return lock
