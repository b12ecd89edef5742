"""Benchmark suite for ``llmrec_kernels``: CoRA projections, a patched decoder layer and CoRA
scoring, against naive PyTorch, the reference CoRA code's way and the base GEMM, with a
roofline model.

Run the report with ``python -m benchmarks [--quick] [--out FILE.json] [--plot FILE.png]``,
the pytest-benchmark files with ``pytest benchmarks --benchmark-only``. See
``benchmarks/README.md``.
"""

from benchmarks.methods import METHODS, Workload
from benchmarks.suite import SuiteConfig, default_workloads, machine_label, run_suite

__all__ = ["METHODS", "SuiteConfig", "Workload", "default_workloads", "machine_label", "run_suite"]
