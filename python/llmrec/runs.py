"""The run directory: its layout, its configuration, and every file written into it.

A run directory (``llmrec train --out OUT``, ``llmrec train-cf --out OUT``) holds

* ``run.json``: what the run is (``kind`` ``"llm"`` or ``"cf"``, the method, the full
  config, the CF embeddings used, a data summary), written before any training;
* ``metrics.json``: the final metrics (a ``test`` and a ``valid`` block, ``train``,
  ``config``, ``wall_time_s``); ``eval_<split>.json`` from ``llmrec evaluate``;
* ``best.safetensors``: the best trainable state; ``checkpoints/`` with the ``latest``
  pointer (written by :class:`llmrec.trainer.Trainer`); ``train_log.jsonl``;
* ``llm/``: the tiny LLM (``--llm tiny``), ``cf/``: an MF trained when no ``--cf`` was given;
* one subdirectory per earlier training stage of a multi-stage method (``step1/``, ...).

Every file goes through :func:`atomic_write_text` (or the helpers built on it): written
under a temporary name, flushed, renamed into place, so a reader never sees half a file.
All run-directory I/O lives here.

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
* every safetensors file written here carries the sha256 of its data area in its metadata
  (:func:`seal_safetensors`), checked by :func:`verify_safetensors` before it is loaded.

``LLMREC_TEST_KILL_AT=<step>`` (tests only) makes the process SIGKILL itself at the named
step (:func:`kill_point`), so the kill tests are deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import signal
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from llmrec.errors import LLMRecError
from llmrec.metrics import json_safe

__all__ = [
    "BEST",
    "LATEST",
    "RESUME_MUST_MATCH",
    "RUN_FILE",
    "TRAINABLE",
    "TRAINER",
    "CheckpointError",
    "RunConfig",
    "RunConfigError",
    "RunLock",
    "TrainConfig",
    "atomic_write_json",
    "atomic_write_text",
    "check_resume_config",
    "claim_run_dir",
    "clean_temporaries",
    "fsync_dir",
    "kill_point",
    "latest_checkpoint",
    "read_json",
    "read_run_info",
    "recover_checkpoints",
    "reopen_config",
    "save_safetensors",
    "save_trainable_atomic",
    "seal_safetensors",
    "verify_safetensors",
    "write_csv",
    "write_metrics",
    "write_predictions",
    "write_run_info",
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
CHECKSUM_KEY = "llmrec_sha256"
KILL_ENV = "LLMREC_TEST_KILL_AT"

PathLike = Union[str, Path]


class CheckpointError(LLMRecError):
    """A checkpoint cannot be used with this model (other shapes, missing, corrupt)."""


class RunConfigError(LLMRecError):
    """The run's options are inconsistent (resume into another config, out dir in use, ...)."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """One training stage's optimisation settings (:class:`llmrec.trainer.Trainer`).

    ``min_lr_ratio`` 1 with ``warmup_steps`` 0 gives a constant learning rate;
    ``weight_decay`` 0 makes AdamW plain Adam; ``adam_betas`` are its ``(beta1, beta2)``.
    """

    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-3
    # a list, not a tuple: run.json stores it as one, and a resumed config must compare equal
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    # None: warm-up (step + 1) / warmup; a float: linear from this share of lr (see lr_factor)
    warmup_start_ratio: Optional[float] = None
    max_steps: Optional[int] = None
    patience: int = 2
    grad_clip: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    precision: str = "auto"
    seed: int = 0
    progress: bool = True
    save_rank_state: bool = False
    # batches of similar prompt lengths (shuffled within and across groups of 64 batches):
    # the padding of a random batch costs a quarter of a CPU training step on ML-1M prompts
    group_by_length: bool = True


@dataclass
class RunConfig:
    """Everything ``llmrec train`` needs; stored in ``<out>/run.json``.

    Method options: CoRA's (``rank`` ... ``backend``) are top-level fields for historical
    reasons; every other method reads its typed options from ``method_kwargs`` (see
    :func:`llmrec.method.parse_options`).
    """

    method: str = "cora"
    data: Optional[str] = None  # None: the embedded synthetic dataset
    cf: Optional[str] = None  # None: train an MF first (into <out>/cf)
    llm: str = "tiny"
    out: str = "runs/cora"
    max_his: int = 10
    max_length: int = 512
    rank: int = 16
    alpha: float = 32.0
    generator: str = "qformer"
    generator_kwargs: Dict[str, Any] = field(default_factory=dict)
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    fuse_qkv: bool = True
    backend: str = "auto"
    method_kwargs: Dict[str, Any] = field(default_factory=dict)
    tiny: Dict[str, Any] = field(default_factory=dict)
    tiny_seed: int = 0
    max_train_rows: Optional[int] = None
    max_valid_rows: Optional[int] = None
    max_test_rows: Optional[int] = None
    valid_split: Optional[str] = None  # None: valid_small when present, else valid
    test_split: str = "test"
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: Optional[str] = (
        None  # the `llmrec train --preset` that set the defaults (llmrec.presets)
    )
    cf_dim: int = 64  # size of the MF trained when no --cf is given (the paper preset: 256)
    device: str = "auto"
    llm_dtype: str = "auto"
    # auto: eager attention for a bf16 LLM on the CPU (faster than SDPA there), else HF's
    llm_attn: str = "auto"
    # torch.compile the LLM's decoder layers (llmrec.llm.compile_decoder_layers)
    compile: bool = False
    resume: bool = False
    force: bool = False  # move an existing run in ``out`` aside instead of refusing
    init_from: Optional[str] = None
    predictions: Optional[str] = None

    def method_options(self) -> Dict[str, Any]:
        """The top-level method options and ``method_kwargs`` as one dict."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "generator": self.generator,
            "generator_kwargs": dict(self.generator_kwargs),
            "target_modules": list(self.target_modules),
            "fuse_qkv": self.fuse_qkv,
            "backend": self.backend,
            "method_kwargs": dict(self.method_kwargs),
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        train = TrainConfig(**d.pop("train", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(train=train, **{k: v for k, v in d.items() if k in known})


#: fields that must not change when a run is resumed (they change the model or the data)
RESUME_MUST_MATCH = (
    "method",
    "data",
    "llm",
    "max_his",
    "max_length",
    "rank",
    "alpha",
    "generator",
    "generator_kwargs",
    "target_modules",
    "method_kwargs",
    "tiny",
    "tiny_seed",
    "max_train_rows",
    "max_valid_rows",
    "valid_split",
    "train.batch_size",  # the position inside an epoch is counted in batches
    "train.seed",  # the data order
    "train.group_by_length",  # the data order too
)
_MISSING = object()


# ---------------------------------------------------------------------------------------------
# test hook


def kill_point(step: str) -> None:
    """SIGKILL this process when ``LLMREC_TEST_KILL_AT`` names ``step`` (tests only).

    ``step`` or ``step@N`` (the N-th time the step is reached, 1-based) in the variable.
    """
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    name, _, nth = want.partition("@")
    if name != step:
        return
    _KILL_COUNTS[step] = _KILL_COUNTS.get(step, 0) + 1
    if _KILL_COUNTS[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_KILL_COUNTS: Dict[str, int] = {}


# ---------------------------------------------------------------------------------------------
# atomic files


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    kill_point(f"write:{path.name}")
    os.replace(tmp, path)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (NaN and infinities as null, numpy scalars as numbers)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def read_json(path: PathLike, error=None) -> Any:
    """The JSON in ``path``; with ``error`` (an exception class) an unreadable or truncated
    file raises it with a one-line message instead of the parser's exception."""
    if error is None:
        return json.loads(Path(path).read_text())
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not readable JSON ({exc})") from None


# ---------------------------------------------------------------------------------------------
# checksums of safetensors files


def _read_header(path: Path, error) -> tuple[int, dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise error(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise error(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header")
    return n, header


def state_file_in(source: PathLike, name: str, error, hint: str) -> Path:
    """``source`` if it is a file, else the file ``name`` in the directory ``source``;
    ``error`` (an exception class) with ``hint`` appended when there is none."""
    path = Path(source)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise error(f"{source}: no state file there ({path}); {hint}")
    return path


def file_sha256(path: PathLike) -> str:
    """The sha256 hex digest of a whole file."""
    return _data_sha256(Path(path), 0)[0]


def _data_sha256(path: Path, start: int) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def seal_safetensors(path: PathLike) -> None:
    """Add the sha256 of the file's data area to its metadata (``llmrec_sha256``), in place.

    Called on a temporary file before it is renamed into place, so it need not be atomic.
    """
    path = Path(path)
    n, header = _read_header(path, CheckpointError)
    digest, _ = _data_sha256(path, 8 + n)
    meta = dict(header.get("__metadata__") or {})
    meta[CHECKSUM_KEY] = digest
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data area to 8 bytes
    tmp = path.with_name(f".{path.name}.tmp-seal-{os.getpid()}")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        src.seek(8 + n)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


def verify_safetensors(path: PathLike, error=None) -> None:
    """Raise ``error`` (default :class:`CheckpointError`) unless ``path`` is a complete
    safetensors file whose data area matches its ``llmrec_sha256`` (files without one, from
    older runs, are checked for truncation only)."""
    error = error or CheckpointError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    n, header = _read_header(path, error)
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    digest, size = _data_sha256(path, 8 + n)
    if size < max(ends, default=0):
        raise error(f"{path}: truncated safetensors file ({size} of {max(ends)} data bytes)")
    want = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
    if want is not None and want != digest:
        raise error(f"{path}: checksum mismatch (the file is corrupt; sha256 {digest[:12]}... "
                    f"!= recorded {want[:12]}...)")  # fmt: skip


def save_trainable_atomic(model, path: PathLike) -> None:
    """``model.save_trainable`` into ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    model.save_trainable(str(tmp))
    seal_safetensors(tmp)
    kill_point(f"write:{path.name}")
    os.replace(tmp, path)


def save_safetensors(path: PathLike, tensors: Dict[str, Any], metadata=None) -> Path:
    """A safetensors file written through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=metadata)  # fmt: skip
    seal_safetensors(tmp)
    kill_point(f"write:{path.name}")
    os.replace(tmp, path)
    return path


def write_csv(path: PathLike, frame) -> None:
    """A pandas frame as CSV (no index) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_predictions(path: PathLike, df, scores: np.ndarray) -> None:
    """One CSV row per row of ``df``: ``uid, iid, label, score`` (``scores`` ``(len(df),)``)."""
    import pandas as pd

    out = pd.DataFrame(
        {"uid": df["uid"].to_numpy(), "iid": df["iid"].to_numpy(), "label": df["label"].to_numpy()}
    )
    out["score"] = np.asarray(scores)
    write_csv(path, out)


# ---------------------------------------------------------------------------------------------
# run.json, metrics, reopening


def write_run_info(out: PathLike, kind: str, name_key: str, name: str, config: dict, **extra):
    """``<out>/run.json``: ``kind``, the method/model name, the config, ``created``, extras."""
    info = {
        "kind": kind,
        name_key: name,
        "config": config,
        **extra,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(out) / RUN_FILE, info)


def read_run_info(run_dir: PathLike) -> dict:
    """The ``run.json`` of a run directory (:class:`RunConfigError` when there is none)."""
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
    return info


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
    atomic_write_json(target, metrics)
    if predictions:
        write_predictions(predictions, pred_df, scores)
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


def check_resume_config(cfg: RunConfig, out: PathLike) -> None:
    """Refuse to overwrite a run with checkpoints, or to resume it with other options."""
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
    old = read_run_info(out)["config"]
    new = cfg.to_dict()

    def get(d, key):
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return _MISSING
            d = d[part]
        return d

    diffs = [
        f"{k}: {get(old, k)!r} -> {get(new, k)!r}"
        for k in RESUME_MUST_MATCH
        if get(old, k) is not _MISSING and json.dumps(get(old, k)) != json.dumps(get(new, k))
    ]
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
        os.write(fd, f"{what} pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())

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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunConfigError(f"--out {out}: exists and is not a directory")
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
