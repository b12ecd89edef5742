"""llmrec: the model layer over llmrec_kernels (CoRA, CoLLM, A-LLMRec, CF models, data, CLI)."""

__version__ = "0.1.0"
