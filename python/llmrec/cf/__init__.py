"""Collaborative filtering: MF, LightGCN, SASRec; BCE training; embedding export."""

from llmrec.cf.cf_training import (
    EMBEDDINGS_FILE,
    CFConfig,
    CFEmbeddingError,
    CFEmbeddings,
    load_cf_embeddings,
    predict_cf,
    save_cf_embeddings,
    train_cf,
)
from llmrec.cf.models import CF_MODELS, LightGCN, MatrixFactorization, SASRec, build_cf_model

__all__ = [
    "CF_MODELS",
    "EMBEDDINGS_FILE",
    "CFConfig",
    "CFEmbeddingError",
    "CFEmbeddings",
    "LightGCN",
    "MatrixFactorization",
    "SASRec",
    "build_cf_model",
    "load_cf_embeddings",
    "predict_cf",
    "save_cf_embeddings",
    "train_cf",
]
