"""CoRA: a per-(user, item) LoRA generated from the CF embeddings (:mod:`llmrec.cora`)."""

from __future__ import annotations

import inspect
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
        # dropout on x before x A_b (reference lora_config.dropout 0.05, ppeft/plora.py). The
        # fused op (llmrec_kernels.hf) has no dropout yet: it is passed on once
        # CoRARecommender takes ``lora_dropout``; until then build() logs that it is not applied.
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
        kwargs = {}
        if "lora_dropout" in inspect.signature(CoRARecommender).parameters:
            kwargs["lora_dropout"] = opts.lora_dropout
        elif opts.lora_dropout > 0:
            ctx.log(
                f"cora lora_dropout {opts.lora_dropout} is not applied: the fused CoRA op has "
                "no dropout on x yet (the reference applies it before x A_b)"
            )
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
            **kwargs,
        )
