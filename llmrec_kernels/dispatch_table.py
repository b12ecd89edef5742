"""Measured dispatch: which backend ``backend="auto"`` runs on a GPU, from a table measured there.

A table is JSON package data, one per GPU model (``llmrec_kernels/dispatch_tables/<gpu key>.json``,
the key from :func:`gpu_key`, e.g. ``nvidia-h200``), written by the GPU check
(``benchmarks/dispatch_table.py`` from the benchmark suite's records). It holds, for each
``(dtype, mode, shape class)``, the backend that measured fastest and its time relative to
the torch path *in the same run*. ``auto`` takes a custom kernel only where that ratio is at
most ``1 - MIN_SPEEDUP`` (at least 3% faster), else the torch path; with no table for the
GPU, the torch path. See ``docs/backends.md``.

``LLMREC_DISPATCH_TABLE=/path/table.json`` replaces the packaged table of every GPU (the GPU
check uses it to try a freshly written table before it is committed).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "ENV_TABLE",
    "MIN_SPEEDUP",
    "SCHEMA",
    "TABLE_DIR",
    "choose",
    "clear_cache",
    "gpu_key",
    "load_table",
    "shape_class",
]

SCHEMA = 1
MIN_SPEEDUP = 0.03
ENV_TABLE = "LLMREC_DISPATCH_TABLE"
TABLE_DIR = Path(__file__).resolve().parent / "dispatch_tables"
# Tokens per sample up to which a call is a decode step (the CUDA backend's GEMV bound too).
DECODE_MAX_LENGTH = 4
# Tokens per call from which a prefill fills the GPU many times over (cuBLAS's home ground).
LARGE_PREFILL_TOKENS = 8192


def shape_class(tokens: int, length: int) -> str:
    """``"decode"`` (at most 4 tokens per sample), ``"prefill"`` (fewer than 8192 tokens in
    the call) or ``"prefill-large"``; ``tokens = B * L``, ``length = L``."""
    if length <= DECODE_MAX_LENGTH:
        return "decode"
    return "prefill" if tokens < LARGE_PREFILL_TOKENS else "prefill-large"


def gpu_key(name: str) -> str:
    """A GPU model's table key: its CUDA device name, lower case, runs of other characters
    than letters and digits as one ``-`` (``"NVIDIA H200"`` -> ``"nvidia-h200"``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=16)
def _device_key(index: int) -> str:
    return gpu_key(torch.cuda.get_device_name(index))


def _validate(table: dict, source: str) -> dict:
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        raise ValueError(f"{source}: not a dispatch table of schema {SCHEMA}")
    choices = {}
    for entry in table.get("choices", []):
        key = (entry["dtype"], entry["mode"], entry["shape_class"])
        backend, ratio = entry["backend"], float(entry["ratio_vs_torch"])
        # The rule is applied here too, so a table can never route to a slower kernel (the
        # torch path's own entries carry ratio 1.0).
        if ratio > 1.0 - MIN_SPEEDUP:
            backend = "torch"
        choices[key] = backend
    return choices


@functools.lru_cache(maxsize=16)
def load_table(key: str, override: str = "") -> Optional[dict]:
    """``{(dtype name, mode, shape class): backend}`` for a GPU key, or ``None`` when no table
    exists. ``override``: a table path that replaces the packaged one."""
    path = Path(override) if override else TABLE_DIR / f"{key}.json"
    if not path.is_file():
        return None
    return _validate(json.loads(path.read_text()), str(path))


def clear_cache() -> None:
    """Forget loaded tables (after writing one, or in tests)."""
    load_table.cache_clear()
    _device_key.cache_clear()


def choose(
    device: torch.device, dtype: torch.dtype, tokens: int, length: int, training: bool
) -> str:
    """The measured choice for a call on a CUDA ``device``: a backend name (``"torch"``
    without a table or an entry)."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = _device_key(index)
    except (AssertionError, RuntimeError):  # no usable CUDA (a CPU build of torch): no table
        return "torch"
    table = load_table(key, os.environ.get(ENV_TABLE, ""))
    if table is None:
        return "torch"
    dtype_name = str(dtype).replace("torch.", "")
    mode = "fwd_bwd" if training else "fwd"
    return table.get((dtype_name, mode, shape_class(tokens, length)), "torch")
