"""llmrec: the model layer over llmrec_kernels (CoRA, CoLLM, A-LLMRec, CF models, data, CLI)."""

__version__ = "0.1.0"

from llmrec.cora import CoRARecommender as CoRARecommender
from llmrec.generator import MLPGenerator as MLPGenerator
from llmrec.generator import QFormerGenerator as QFormerGenerator
from llmrec.generator import build_generator as build_generator
