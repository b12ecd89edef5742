"""Sizes that cannot fit are refused before they are allocated, from the shapes alone.

:func:`available_bytes` reads ``MemAvailable`` from ``/proc/meminfo`` (``os.sysconf`` where
there is none; psutil is not a dependency). :func:`check_fits` compares an estimate with it
and raises one :class:`~llmrec.errors.RunConfigError` line naming the flag to lower.
"""

from __future__ import annotations

import os
from typing import Optional

from llmrec.errors import RunConfigError

__all__ = ["available_bytes", "check_fits", "cora_training_bytes", "tiny_llm_bytes"]

_GIB = float(1 << 30)


def available_bytes() -> Optional[int]:
    """Bytes of memory the system can still give (None when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_fits(needed: int, what: str, hint: str) -> None:
    """Refuse ``needed`` bytes (an estimate from shapes) above the memory available now."""
    free = available_bytes()
    if free is not None and needed > free:
        raise RunConfigError(
            f"{what} needs about {needed / _GIB:,.1f} GiB of memory, {free / _GIB:,.1f} GiB "
            f"are free; {hint}"
        )


def tiny_llm_bytes(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    """fp32 bytes of the tiny LLaMA's weights (embedding and head untied, SwiGLU MLP)."""
    from llmrec.tiny_llm import tiny_intermediate_size

    kv = hidden // heads * kv_heads
    per_layer = hidden * (2 * hidden + 2 * kv) + 3 * hidden * tiny_intermediate_size(hidden)
    return 4 * (2 * vocab * hidden + layers * (per_layer + 2 * hidden) + hidden)


def cora_training_bytes(cf_dim: int, hidden: int, rank: int, layers: int) -> int:
    """fp32 bytes CoRA's trainable state needs while training, from the shapes: the
    generator's output layer ``(2 cf_dim) x (hidden rank)`` and a ``B`` of ``(d_out, rank)``
    for q/k/v/o of every layer (``d_out`` at most ``hidden``), each held four times (weight,
    gradient and AdamW's two moments). A lower bound: the rest of the generator is left out."""
    params = 2 * cf_dim * hidden * rank + layers * 4 * hidden * rank
    return 4 * 4 * params
