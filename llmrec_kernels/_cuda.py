"""Loader of the compiled CUDA extension ``llmrec_kernels._C`` (built from ``csrc/``).

Importing this module never imports the extension; :func:`unavailable_reason` tries once and
remembers why it failed, so ``import llmrec_kernels`` works on machines without it.
"""

from __future__ import annotations

import functools
from typing import Optional

__all__ = ["cuda_available", "unavailable_reason"]


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from llmrec_kernels import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the compiled extension llmrec_kernels._C is not built ({exc})"
    return _C, None


def unavailable_reason() -> Optional[str]:
    """``None`` when the CUDA extension is loaded, else a sentence saying why it is not."""
    return _load()[1]


def cuda_available() -> bool:
    """True when the hand-written CUDA kernels (``backend="cuda"``) can be used."""
    return unavailable_reason() is None
