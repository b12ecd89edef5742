"""Where ``benchmarks/`` import CoRA's model from; the model is
:mod:`llmrec.methods.cora.model` (this name stays until the benchmarks import that)."""

from llmrec.methods.cora.model import CoRARecommender

__all__ = ["CoRARecommender"]
