"""Benchmark suite for ``llmrec_kernels``: CoRA projections, a patched decoder layer and CoRA
scoring, against naive PyTorch, the reference CoRA code's way and the base GEMM, with a
roofline model.

Run the report with ``python -m benchmarks [--quick] [--out FILE.json] [--plot FILE.png]``,
the pytest-benchmark files with ``pytest benchmarks --benchmark-only``. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["METHODS", "SuiteConfig", "Workload", "default_workloads", "machine_label", "run_suite"]

# where each public name lives: imported on first use, so that the GPU check's torch-free
# steps (its summary) can import their own module without importing torch
_HOME = {"METHODS": "methods", "Workload": "methods", "SuiteConfig": "suite",
         "default_workloads": "suite", "machine_label": "suite", "run_suite": "suite"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'benchmarks' has no attribute {name!r}")
    return getattr(importlib.import_module(f"benchmarks.{_HOME[name]}"), name)
