"""llmrec: the model layer over llmrec_kernels (CoRA, CoLLM, A-LLMRec, CF models, data, CLI).

The names below are imported on first use, so ``import llmrec`` (and ``llmrec --help``)
does not import torch.
"""

from importlib import metadata as _metadata

# One version source (llmrec_kernels.__version__, which pyproject reads), taken from the
# installed distribution: importing llmrec_kernels here would import torch.
try:
    __version__ = _metadata.version("llmrec-kernels")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "AdapterError": "llmrec.errors",
    "CoRARecommender": "llmrec.methods.cora.model",
    "MLPGenerator": "llmrec.methods.cora.generator",
    "QFormerGenerator": "llmrec.methods.cora.generator",
    "build_generator": "llmrec.methods.cora.generator",
    "export_run": "llmrec.adapter",
    "from_pretrained": "llmrec.adapter",
    "read_adapter_config": "llmrec.adapter",
    "save_pretrained": "llmrec.adapter",
    "save_run_adapter": "llmrec.adapter",
}

__all__ = [
    "AdapterError",
    "CoRARecommender",
    "MLPGenerator",
    "QFormerGenerator",
    "build_generator",
    "export_run",
    "from_pretrained",
    "read_adapter_config",
    "save_pretrained",
    "save_run_adapter",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmrec' has no attribute {name!r}")
