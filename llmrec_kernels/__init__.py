"""Fused kernels for per-sample low-rank (CoRA) deltas in LLM recommenders.

Importing this package never initialises CUDA and never needs the compiled extension or
Triton: the kernels are imported on first use.
"""

from llmrec_kernels import reference
from llmrec_kernels._cuda import cuda_available
from llmrec_kernels.backends import BACKENDS, batch_invariant, resolve_backend
from llmrec_kernels.cora_linear import fused_cora_linear, fused_cora_linear_multi
from llmrec_kernels.decode import cora_linear_decode, decode_workspace

# The one version of the distribution: pyproject.toml reads it (tool.setuptools.dynamic).
__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "__version__",
    "batch_invariant",
    "cora_linear_decode",
    "cuda_available",
    "decode_workspace",
    "fused_cora_linear",
    "fused_cora_linear_multi",
    "reference",
    "resolve_backend",
]
