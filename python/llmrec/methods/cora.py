"""CoRA: a per-(user, item) LoRA generated from the CF embeddings (:mod:`llmrec.cora`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from llmrec.cora import CoRARecommender
from llmrec.method import Method, RunContext, register
from llmrec.runs import RunConfigError


@register
class CoRA(Method):
    name = "cora"
    description = "CoRA: per-(user, item) LoRA generated from CF embeddings"

    @dataclass
    class Options:
        # r 16, alpha 32, q/k/v/o: VanillaCreamer/CoRA train_configs (lora_config)
        rank: int = 16
        alpha: float = 32.0
        # dropout on x before x A_b (reference lora_config.dropout 0.05, ppeft/plora.py),
        # applied inside the fused op in training mode (llmrec_kernels.hf).
        lora_dropout: float = 0.05
        generator: str = "qformer"
        generator_kwargs: Dict[str, Any] = field(default_factory=dict)
        target_modules: List[str] = field(
            default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        fuse_qkv: bool = True
        backend: str = "auto"

    def build(self, ctx: RunContext, opts: Options) -> CoRARecommender:
        if not 0.0 <= opts.lora_dropout < 1.0:
            raise RunConfigError(f"cora lora_dropout must be in [0, 1), got {opts.lora_dropout}")
        return CoRARecommender(
            ctx.llm,
            ctx.tokenizer,
            ctx.cf_dim,
            rank=opts.rank,
            alpha=opts.alpha,
            generator=opts.generator,
            target_modules=tuple(opts.target_modules),
            fuse_qkv=opts.fuse_qkv,
            backend=opts.backend,
            generator_kwargs=opts.generator_kwargs or None,
            lora_dropout=opts.lora_dropout,
        )
