"""CoLLM: CF embeddings in ``<UserID>`` / ``<TargetItemID>`` slots + LoRA (:mod:`llmrec.methods.collm.model`).

``two-step`` tuning (CoLLM's recipe) is two stages: LoRA on text-only prompts (the CoRA
template, no slots) in ``<out>/step1``, then the CIE on CoLLM prompts with LoRA frozen;
``one-step`` is one stage training both on CoLLM prompts. ``--collm-lora-from`` replaces
step 1 with the LoRA of a finished run, as the reference's second step loads its first step's
checkpoint (cfg ``ckpt``); CoLLM's step 1 is TALLRec's text-only LoRA on the same rows, so a
TALLRec run of the same settings serves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from llmrec.config import option
from llmrec.data.batching import RecCollator, pad_id_of
from llmrec.errors import RunConfigError
from llmrec.method import Method, RunContext, Stage, register
from llmrec.methods.collm.model import (
    COLLM_DEFAULT_TARGETS,
    TUNINGS,
    CoLLMRecommender,
    make_collm_examples,
)
from llmrec.methods.common import backend_option
from llmrec.run_store import BEST
from llmrec.safe_files import file_sha256, state_file_in, verify_safetensors


@register
class CoLLM(Method):
    name = "collm"
    description = (
        "CoLLM: CF embeddings mapped into <UserID>/<TargetItemID> slots + LoRA q/v; "
        "two-step (default) or one-step tuning"
    )
    template = "collm"

    # source: zyang1580/CoLLM train_configs/collm_pretrain_mf_ood.yaml (ML-1M) ("cfg")
    @dataclass
    class Options:
        lora_rank: int = option(8, help="LoRA rank (cfg lora_config.r)")
        lora_alpha: float = option(16.0, help="LoRA alpha; scale alpha/r (cfg lora_config.alpha)")
        lora_dropout: float = option(0.05, help="LoRA dropout (cfg lora_config.dropout)")
        lora_targets: List[str] = option(
            factory=lambda: list(COLLM_DEFAULT_TARGETS),
            help="projections with LoRA, comma-separated",
        )
        cie_mult: int = option(
            10, help="width of the CF encoder's hidden layer, times d_cf (cfg proj_mid_times)"
        )
        tuning: str = option(
            "two-step",
            help="two-step (CoLLM paper: LoRA on text first, then the CF encoder) or one-step",
            choices=TUNINGS,
        )
        lora_epochs: Optional[int] = option(None, help="step 1's --epochs (none: the run's)")
        lora_max_steps: Optional[int] = option(None, help="step 1's --max-steps (none: the run's)")
        # None: the run's lr, 1e-3 under the paper preset (cfg init_lr, the same both steps)
        lora_lr: Optional[float] = option(None, help="step 1's --lr (none: the run's)")
        lora_from: Optional[str] = option(
            None,
            help="a finished run's directory (its best.safetensors; TALLRec, or a CoLLM run's "
            "step1) or a .safetensors file: its LoRA replaces step 1 (cfg ckpt)",
        )
        backend: str = backend_option()

        def __post_init__(self) -> None:
            if self.lora_from is not None and self.tuning != "two-step":
                raise RunConfigError(
                    "--collm-lora-from replaces step 1 of two-step tuning; "
                    f"--collm-tuning {self.tuning} has no step 1"
                )

    def build(self, ctx: RunContext, opts: Options) -> CoLLMRecommender:
        if opts.tuning not in TUNINGS:
            raise RunConfigError(f"CoLLM tuning must be one of {TUNINGS}, got {opts.tuning!r}")
        return CoLLMRecommender(
            ctx.llm,
            ctx.tokenizer,
            ctx.cf_dim,
            lora_rank=opts.lora_rank,
            lora_alpha=opts.lora_alpha,
            lora_dropout=opts.lora_dropout,
            target_modules=tuple(opts.lora_targets),
            cie_mult=opts.cie_mult,
            stage="cie" if opts.tuning == "two-step" else "joint",
            backend=opts.backend,
            answer_score=ctx.cfg.answer_score,
        )

    def source(self, ctx: RunContext, df, template: Optional[str] = None) -> RecCollator:
        ex = make_collm_examples(
            df,
            ctx.tokenizer,
            template=template or self.template,
            max_his=ctx.cfg.max_his,
            max_length=ctx.cfg.max_length,
        )
        return RecCollator(ex, pad_id_of(ctx.tokenizer), ctx.user_table, ctx.item_table)

    def stages(self, ctx: RunContext, model: CoLLMRecommender, opts: Options) -> List[Stage]:
        train_df, valid_df = ctx.rows("train"), ctx.rows(ctx.valid_split)
        last = "cie" if opts.tuning == "two-step" else "joint"
        info = {"template": "collm"}
        if opts.lora_from is not None:
            path = lora_state_file(opts.lora_from)
            try:
                model.load_lora(path)
            except ValueError as exc:
                raise RunConfigError(f"--collm-lora-from: {exc}") from exc
            info["lora_from"] = {"path": str(path), "sha256": file_sha256(path)}
        final = Stage(
            last,
            self.source(ctx, train_df, "collm"),
            self.source(ctx, valid_df, "collm"),
            ctx.cfg.train,
            enter=lambda: model.set_stage(last),
            info=info,
        )
        if opts.tuning == "one-step" or opts.lora_from is not None:
            return [final]
        step1 = copy.deepcopy(ctx.cfg.train)
        if opts.lora_epochs is not None:
            step1.epochs = opts.lora_epochs
        if opts.lora_max_steps is not None:
            step1.max_steps = opts.lora_max_steps
        if opts.lora_lr is not None:
            step1.lr = opts.lora_lr
        lora = Stage(
            "lora",
            self.source(ctx, train_df, "cora"),
            self.source(ctx, valid_df, "cora"),
            step1,
            subdir="step1",
            enter=lambda: model.set_stage("lora"),
            info={"template": "cora"},
        )
        return [lora, final]

    def train_summary(self, opts: Options) -> dict:
        return {"tuning": opts.tuning}


def lora_state_file(source: str) -> Path:
    """The state file ``--collm-lora-from`` names: ``source`` itself, or a run directory's
    ``best.safetensors``."""
    path = state_file_in(
        source, BEST, RunConfigError,
        "--collm-lora-from takes a finished run's directory (TALLRec, or a CoLLM run's step1) "
        "or a .safetensors file",
    )  # fmt: skip
    verify_safetensors(path, RunConfigError)  # truncated or corrupt: refused before training
    return path
