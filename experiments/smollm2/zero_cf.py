"""Write CF embeddings of the same shapes as SRC's, all zeros, into DST (an ablation: CoRA
with the collaborative signal removed). Usage: python zero_cf.py SRC_RUN DST_DIR"""

import sys
from pathlib import Path

import torch

from llmrec.cf import load_cf_embeddings, save_cf_embeddings

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not (dst / "embeddings.safetensors").exists():
    emb = load_cf_embeddings(src)
    dst.mkdir(parents=True, exist_ok=True)
    save_cf_embeddings(dst / "embeddings.safetensors", torch.zeros_like(emb.user),
                       torch.zeros_like(emb.item), "zeros")  # fmt: skip
