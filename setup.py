"""Build script: two pure-Python packages plus an optional CUDA extension from ``csrc/``.

The extension is built only when all of these hold; otherwise it is skipped with a message
and the package still installs (the Triton and PyTorch backends need no compilation):

* ``LLMREC_SKIP_CUDA_BUILD`` is not ``1``;
* torch is importable in the build environment and is a CUDA build (``torch.version.cuda``);
* a CUDA toolkit is found (``CUDA_HOME`` / nvcc);
* ``csrc/`` holds the extension sources.

Because pip builds in an isolated environment without torch, building the extension needs
``pip install --no-build-isolation -e .`` with a CUDA torch already installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
EXTENSION_NAME = "llmrec_kernels._C"


# The kernel sources travel inside the package (llmrec_kernels/csrc/ in every wheel), so the
# JIT fallback of llmrec_kernels._cuda can compile them wherever the package is installed.
PACKAGED_SOURCE_PATTERNS = ("*.cu", "*.cpp", "*.cuh", "*.h")


class BuildPyWithKernelSources(build_py):
    """``build_py`` that also copies ``csrc/*`` into ``llmrec_kernels/csrc/`` of the build."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "llmrec_kernels" / "csrc"
        self.mkpath(str(target))
        for pattern in PACKAGED_SOURCE_PATTERNS:
            for source in sorted(CSRC.glob(pattern)):
                self.copy_file(str(source), str(target / source.name))


def _skip(reason: str) -> dict:
    print(f"[llmrec-kernels] skipping the CUDA extension: {reason}", file=sys.stderr)
    return {}


def cuda_extension_kwargs() -> dict:
    """Return ``ext_modules``/``cmdclass`` for ``setup()``, or ``{}`` when the build is skipped."""
    if os.environ.get("LLMREC_SKIP_CUDA_BUILD", "0") == "1":
        return _skip("LLMREC_SKIP_CUDA_BUILD=1")
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")
    )
    if not sources:
        return _skip("no sources in csrc/")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip(
            "torch is not importable in the build environment "
            "(use `pip install --no-build-isolation`)"
        )
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    # sm_80 and sm_90 by default (the kernels use mma.sync/cp.async/ldmatrix: sm_80+);
    # TORCH_CUDA_ARCH_LIST overrides, e.g. "9.0" for a faster single-arch build.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
    # torch 2.14, C++17 for older releases); the kernels compile as either.
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    depends = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cuh")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.h")
    )
    ext = CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        depends=depends,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


extension = cuda_extension_kwargs()
setup(
    packages=find_packages(include=["llmrec_kernels", "llmrec_kernels.*"])
    + ["llmrec"]
    + [f"llmrec.{name}" for name in find_packages(where="python/llmrec")],
    package_dir={"llmrec_kernels": "llmrec_kernels", "llmrec": "python/llmrec"},
    # The GPU check's measured dispatch tables (llmrec_kernels.dispatch_table).
    package_data={"llmrec_kernels": ["dispatch_tables/*.json"]},
    ext_modules=extension.get("ext_modules", []),
    cmdclass={**extension.get("cmdclass", {}), "build_py": BuildPyWithKernelSources},
)
