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
All run-directory I/O lives here so that locking and checksums can be added in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

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
    "TrainConfig",
    "atomic_write_json",
    "atomic_write_text",
    "check_resume_config",
    "fsync_dir",
    "latest_checkpoint",
    "read_json",
    "read_run_info",
    "reopen_config",
    "save_safetensors",
    "save_trainable_atomic",
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

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this model (other shapes, missing, corrupt)."""


class RunConfigError(ValueError):
    """The run's options are inconsistent (resume into another config, out dir in use, ...)."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """One training stage's optimisation settings (:class:`llmrec.trainer.Trainer`).

    ``min_lr_ratio`` 1 with ``warmup_steps`` 0 gives a constant learning rate;
    ``weight_decay`` 0 makes AdamW plain Adam.
    """

    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-3
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
    resume: bool = False
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
)
_MISSING = object()


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
    os.replace(tmp, path)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (NaN and infinities as null, numpy scalars as numbers)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_trainable_atomic(model, path: PathLike) -> None:
    """``model.save_trainable`` into ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    model.save_trainable(str(tmp))
    os.replace(tmp, path)


def save_safetensors(path: PathLike, tensors: Dict[str, Any], metadata=None) -> Path:
    """A safetensors file written through a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=metadata)  # fmt: skip
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
    return read_json(run_file)


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
    old = read_json(out / RUN_FILE).get("config", {})
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
    path = pointer.parent / pointer.read_text().strip()
    if not (path / TRAINABLE).exists() or not (path / TRAINER).exists():
        raise CheckpointError(f"{pointer}: points to {path}, which is not a complete checkpoint")
    return path


def append_jsonl(path: PathLike, record: dict) -> None:
    """One JSON line appended (the training log; a torn last line is tolerable there)."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")


def write_checkpoint(out_dir: PathLike, name: str, fill, keep: int = 2) -> Path:
    """A complete checkpoint ``<out>/checkpoints/<name>/``, then the ``latest`` pointer.

    ``fill(tmp_dir)`` writes the files into a temporary directory, which is renamed into
    place only when complete; the pointer is replaced after that, so an interrupted run always
    finds a complete checkpoint. The oldest checkpoints beyond ``keep`` are removed.
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
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    path = ck / name
    os.replace(tmp, path)
    fsync_dir(ck)
    atomic_write_text(ck / LATEST, name + "\n")
    old = sorted(p for p in ck.glob("ckpt-*") if p.is_dir())
    for p in old[: -max(1, keep)]:
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
    os.replace(tmp, target)
    return target
