"""CoRA: a per-(user, item) LoRA generated from the CF embeddings (:mod:`llmrec.methods.cora.model`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, List

from llmrec.config import finite_float, float_in, json_object, option, positive_int, projection_list
from llmrec.errors import RunConfigError
from llmrec.memory_check import check_fits, cora_training_bytes
from llmrec.method import Method, RunContext, register
from llmrec.methods.common import backend_option
from llmrec.methods.cora.generator import GENERATORS
from llmrec.methods.cora.model import CoRARecommender


@register
class CoRA(Method):
    name = "cora"
    description = "CoRA: per-(user, item) LoRA generated from CF embeddings"

    @dataclass
    class Options:
        # r 16, alpha 32, q/k/v/o: VanillaCreamer/CoRA train_configs (lora_config)
        rank: int = option(16, help="CoRA rank r", flag="--rank", parse=positive_int)
        alpha: float = option(
            32.0, help="CoRA alpha; scale alpha/r", flag="--alpha", parse=finite_float
        )
        # dropout on x before x A_b (reference lora_config.dropout 0.05, ppeft/plora.py),
        # applied inside the fused op in training mode (llmrec_kernels.hf).
        lora_dropout: float = option(
            0.05, help="dropout on x before x A_b", parse=float_in(0, 1, hi_open=True)
        )
        generator: str = option(
            "qformer", help="the LoRA generator", flag="--generator", choices=sorted(GENERATORS)
        )
        generator_kwargs: Dict[str, Any] = option(
            factory=dict,
            help='extra generator arguments, e.g. \'{"num_layers": 2, "num_heads": 4}\'',
            flag="--generator-kwargs",
            parse=json_object,
            metavar="JSON",
        )
        target_modules: List[str] = option(
            factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
            help="comma-separated projections to patch (auto: the model's attention projections that read the hidden state)",
            flag="--target-modules",
            parse=projection_list,
        )
        fuse_qkv: bool = option(
            True, help="fuse the q/k/v projections", flag="--no-fuse-qkv", resume=False
        )
        backend: str = backend_option()

        def __post_init__(self) -> None:
            check_generator_kwargs(self.generator, self.generator_kwargs)

    def build(self, ctx: RunContext, opts: Options) -> CoRARecommender:
        if not 0.0 <= opts.lora_dropout < 1.0:
            raise RunConfigError(f"cora lora_dropout must be in [0, 1), got {opts.lora_dropout}")
        hidden = int(ctx.llm.config.hidden_size)
        if opts.rank > hidden:
            # a delta B A_b^T of rank r <= hidden: a larger r is no longer low rank, and the
            # generator's output layer grows with it (2 cf_dim x hidden r)
            raise RunConfigError(
                f"--rank {opts.rank} exceeds the LLM's hidden size {hidden}; CoRA's per-sample "
                "delta is low rank: use a rank at most the hidden size (the paper: 16)"
            )
        check_fits(
            cora_training_bytes(ctx.cf_dim, hidden, opts.rank, ctx.llm.config.num_hidden_layers),
            f"CoRA at --rank {opts.rank}",
            "lower --rank",
        )
        return CoRARecommender(
            ctx.llm,
            ctx.tokenizer,
            ctx.cf_dim,
            rank=opts.rank,
            alpha=opts.alpha,
            generator=opts.generator,
            target_modules=None if opts.target_modules == ["auto"] else tuple(opts.target_modules),
            fuse_qkv=opts.fuse_qkv,
            backend=opts.backend,
            generator_kwargs=opts.generator_kwargs or None,
            lora_dropout=opts.lora_dropout,
            answer_score=ctx.cfg.answer_score,
        )


def check_generator_kwargs(generator: str, kwargs: Dict[str, Any]) -> None:
    """Refuse ``--generator-kwargs`` the generator does not take (before any training)."""
    params = inspect.signature(GENERATORS[generator].__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(set(params) - {"self", "cf_dim", "hidden_size", "rank"})
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise RunConfigError(
            f"--generator-kwargs: {unknown} not accepted by the {generator} generator "
            f"(it takes {allowed})"
        )
