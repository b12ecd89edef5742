"""What the training loop writes while it trains: ``OUT/train_log.jsonl`` (one line per
optimizer step and one per evaluation, told apart by ``kind``) and, with ``--tensorboard``,
the same scalars in ``OUT/tensorboard/``. The record format is in docs/training.md.

The JSON-lines file is opened once per training call and flushed per line, never fsynced; at
a (re)start it is rewritten from the checkpoint (:func:`llmrec.run_store.resume_train_log`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from llmrec.errors import RunConfigError
from llmrec.run_store import TRAIN_LOG, JsonlLog

__all__ = ["TrainLog", "peak_memory_bytes", "require_tensorboard", "step_record"]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: ``torch.cuda.max_memory_allocated`` on a CUDA
    device, else the peak resident set size (``resource.getrusage``; Linux reports KiB,
    macOS bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``; a one-line :class:`RunConfigError` when the
    optional tensorboard package is missing (called before a run touches anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunConfigError(
            "--tensorboard needs the tensorboard package (pip install tensorboard); "
            "the same scalars are in OUT/train_log.jsonl without it"
        ) from None
    return SummaryWriter


def step_record(
    *,
    step: int,
    epoch: float,
    loss: float,
    lr: float,
    batch: Dict[str, Any],
    seconds: float,
    world_size: int,
    device: torch.device,
) -> Dict[str, Any]:
    """The ``kind: step`` record of optimizer step ``step`` (1-based): its ``loss`` and
    ``lr``, its wall time ``seconds`` (batch collation included), the whole job's tokens/s
    (the ``attention_mask`` ones of this rank's ``batch`` times ``world_size``; rows/s where
    the batch has no mask) and the process's peak memory on ``device``."""
    record: Dict[str, Any] = {
        "kind": "step",
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "step_time_s": seconds,
    }
    # the whole job's rate: this rank's count times the ranks (each reads an equal share)
    rate = world_size / max(seconds, 1e-9)
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask):
        record["tokens_per_s"] = float(mask.sum()) * rate
    else:
        rows = next((len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim), 0)
        record["rows_per_s"] = rows * rate
    record["memory_bytes"] = peak_memory_bytes(device)
    record["memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"
    record["time"] = time.time()
    return record


class TrainLog:
    """``out/train_log.jsonl`` open for appending, and with ``tensorboard`` a
    ``SummaryWriter`` on ``out/tensorboard`` that gets every numeric field of every record
    (``train/<field>`` for step records, ``valid/<field>`` for evaluations) at its step."""

    def __init__(self, out: Path, tensorboard: bool = False):
        self._writer: Optional[Any] = None
        if tensorboard:
            self._writer = require_tensorboard()(log_dir=str(Path(out) / "tensorboard"))
        self._file = JsonlLog(Path(out) / TRAIN_LOG)

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(record)
        if self._writer is not None:
            prefix = "train" if record.get("kind") == "step" else "valid"
            for key, value in record.items():
                if key not in ("kind", "step", "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
