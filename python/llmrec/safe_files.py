"""Files that are never half-written: atomic text/JSON/CSV writes and sealed safetensors.

Every file goes through :func:`atomic_write_text` (or the helpers built on it): written
under a temporary name, flushed, renamed into place, so a reader never sees half a file.
Every safetensors file written here carries the sha256 of its data area in its metadata
(:func:`seal_safetensors`), checked by :func:`verify_safetensors` before it is loaded.

``LLMREC_TEST_KILL_AT=<step>`` (tests only) makes the process SIGKILL itself at the named
step (:func:`kill_point`), so the kill tests are deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import struct
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np

from llmrec.errors import CheckpointError
from llmrec.metrics import json_safe

__all__ = [
    "CHECKSUM_KEY",
    "atomic_write_json",
    "atomic_write_text",
    "file_sha256",
    "fsync_dir",
    "kill_point",
    "read_json",
    "save_safetensors",
    "save_trainable_atomic",
    "seal_safetensors",
    "state_file_in",
    "verify_safetensors",
    "write_csv",
    "write_predictions",
]

CHECKSUM_KEY = "llmrec_sha256"
KILL_ENV = "LLMREC_TEST_KILL_AT"

PathLike = Union[str, Path]


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
