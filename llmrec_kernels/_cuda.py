"""Loader of the compiled CUDA extension (the hand-written kernels of ``csrc/``).

Importing this module never imports or builds anything. The first call of
:func:`unavailable_reason` (or :func:`cuda_available`, :func:`ops`) tries, once per process:

1. the prebuilt extension ``llmrec_kernels._C`` (``setup.py`` builds it when a CUDA build of
   torch and nvcc are present);
2. otherwise a just-in-time build of the kernel sources (:func:`source_dir`: ``csrc/`` of a
   source checkout, or the copy every wheel ships inside the package) with
   ``torch.utils.cpp_extension.load`` and
   ninja, cached by torch under ``TORCH_EXTENSIONS_DIR`` (default
   ``~/.cache/torch_extensions``) so later processes reuse it. It is attempted only when torch
   is a CUDA build, the sources are present, a CUDA toolkit and ninja are found and a GPU is
   visible. ``LLMREC_CUDA_JIT=0`` disables it; ``LLMREC_CUDA_JIT=1`` builds even without a
   visible GPU. The first JIT build takes a few minutes.

Whatever fails is remembered as a sentence, so ``import llmrec_kernels`` works everywhere and
``backend="cuda"`` can say why it is not available. Both ways register the same ops under
``torch.ops.llmrec_kernels_cuda``.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = [
    "ENV_JIT",
    "NAMESPACE",
    "SOURCE_PATTERNS",
    "build_info",
    "cuda_available",
    "kernel_sources",
    "load_extension",
    "ops",
    "ready_without_build",
    "source_dir",
    "unavailable_reason",
]

NAMESPACE = "llmrec_kernels_cuda"
ENV_JIT = "LLMREC_CUDA_JIT"
_JIT_NAME = "llmrec_kernels_cuda_jit"
# Where the kernel sources live: inside the installed package (wheels and non-editable
# installs; setup.py copies them there), else csrc/ beside the package (a source checkout or
# an editable install).
_PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"
_CHECKOUT_CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The files a JIT build compiles or includes (host_emu/ is the CPU test harness: not shipped).
SOURCE_PATTERNS = ("*.cu", "*.cpp", "*.cuh", "*.h")
_OPS = ("cora_forward", "cora_backward", "shrink", "lowrank_linear")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def source_dir() -> Optional[Path]:
    """The folder holding the CUDA kernel sources, or ``None`` when this installation has none.

    The copy inside the package wins, so an installed wheel never compiles a stale checkout.
    """
    for folder in (_PACKAGED_CSRC, _CHECKOUT_CSRC):
        if any(folder.glob("*.cu")):
            return folder
    return None


def kernel_sources() -> list[Path]:
    """Every CUDA/C++ source and header of the extension (:data:`SOURCE_PATTERNS`), sorted."""
    folder = source_dir()
    if folder is None:
        return []
    return sorted(p for pattern in SOURCE_PATTERNS for p in folder.glob(pattern))


def _ops_registered() -> bool:
    import torch

    return all(hasattr(getattr(torch.ops, NAMESPACE), name) for name in _OPS)


def _import_prebuilt() -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        module = importlib.import_module("llmrec_kernels._C")
    except (ImportError, OSError) as exc:
        return (
            None,
            f"the prebuilt extension llmrec_kernels._C is not importable ({_first_line(exc)})",
        )
    if not _ops_registered():
        return None, "llmrec_kernels._C imported but did not register its ops"
    return module, None


def _jit_build() -> tuple[Optional[ModuleType], Optional[str]]:
    mode = os.environ.get(ENV_JIT, "").strip()
    if mode == "0":
        return None, f"the just-in-time build is disabled ({ENV_JIT}=0)"
    folder = source_dir()
    if folder is None:
        return None, (
            f"this installation ships no CUDA kernel sources (looked in {_PACKAGED_CSRC} and "
            f"{_CHECKOUT_CSRC}); reinstall from a wheel or sdist of llmrec-kernels, or from a "
            "source checkout"
        )
    sources = [p for p in kernel_sources() if p.suffix in (".cu", ".cpp")]
    import torch

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build, so nothing can be JIT-built"
    if mode != "1" and not torch.cuda.is_available():
        return None, (
            f"no CUDA device is visible, so the extension is not JIT-built "
            f"(set {ENV_JIT}=1 to build it anyway)"
        )
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None, "no CUDA toolkit was found for a JIT build (set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed, which the JIT build needs (pip install ninja)"
    try:
        module = cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(p) for p in sources],
            extra_include_paths=[str(folder)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            is_python_module=True,
            verbose=os.environ.get("LLMREC_CUDA_JIT_VERBOSE", "0") == "1",
        )
    except Exception as exc:  # compiler errors, missing headers, ...
        return None, f"the JIT build of {folder} failed ({_first_line(exc)})"
    if not _ops_registered():
        return None, "the JIT-built extension did not register its ops"
    return module, None


_prebuilt = functools.cache(_import_prebuilt)


@functools.cache
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    module, prebuilt_reason = _prebuilt()
    if module is not None:
        return module, None
    module, jit_reason = _jit_build()
    if module is not None:
        return module, None
    return None, f"{prebuilt_reason}; {jit_reason}"


def load_extension() -> ModuleType:
    """The extension module (prebuilt or JIT-built); ``RuntimeError`` saying why if neither."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"the llmrec_kernels CUDA extension is not available: {reason}")
    return module


def unavailable_reason() -> Optional[str]:
    """``None`` when the CUDA extension is loaded, else a sentence saying why it is not."""
    return _load()[1]


def cuda_available() -> bool:
    """True when the hand-written CUDA kernels (``backend="cuda"``) can be used.

    May JIT-build the extension (minutes, once) when the prebuilt one is missing.
    """
    return unavailable_reason() is None


def ready_without_build() -> bool:
    """True when the extension is usable without compiling anything now: the prebuilt
    ``_C`` imports, or an earlier call in this process already loaded it. Meant for an
    automatic backend policy, which must never block a forward call on a JIT build."""
    if _prebuilt()[0] is not None:
        return True
    return _load.cache_info().currsize > 0 and _load()[0] is not None


def ops():
    """``torch.ops.llmrec_kernels_cuda``, loading the extension first."""
    load_extension()
    import torch

    return getattr(torch.ops, NAMESPACE)


def build_info() -> dict:
    """Facts fixed when the extension was built: SM architectures, CUDA runtime, limits."""
    return dict(load_extension().build_info())
