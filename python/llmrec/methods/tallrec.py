"""TALLRec-style tuning: LoRA on text-only prompts, no CF input.

TALLRec (Bao et al., RecSys 2023) tunes LoRA (r 8, alpha 16, dropout 0.05, q/v) on the
recommendation prompt and reads the "Yes" answer; it is the text-only baseline of the CoLLM
and CoRA papers and the first step of CoLLM's two-step tuning (``collm`` step 1 trains the
same modules on the same prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.config import option
from llmrec.llm import answer_ids, answer_logit, decoder_body
from llmrec.method import Method, RunContext, register
from llmrec.methods.common import backend_option
from llmrec_kernels.lora import DEFAULT_LORA_TARGETS, apply_lora, lora_parameters


class TALLRecRecommender(nn.Module):
    """The frozen LLM with LoRA on ``target_modules``; scores the "Yes" logit of text prompts.

    Args:
        llm: a causal LM (frozen here); tokenizer: its tokenizer.
        lora_rank / lora_alpha / lora_dropout / target_modules / backend: the LoRA
            (:func:`llmrec_kernels.lora.apply_lora`); seed: the ``lora_A`` initialisation.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        target_modules=DEFAULT_LORA_TARGETS,
        backend: str = "auto",
        seed: int = 0,
        answer_score: str = "yes-no",
    ):
        super().__init__()
        self.llm = llm
        self.lora = apply_lora(
            llm, lora_rank, lora_alpha, lora_dropout, tuple(target_modules), backend, seed=seed
        )
        self.yes_token_id, self.no_token_id = answer_ids(tokenizer, answer_score)
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha

    def trainable_state(self) -> dict:
        return lora_parameters(self.lora)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.trainable_state().values()

    def score(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` float32 "Yes" logits at the last position (prompts are left-padded)."""
        out = decoder_body(self.llm)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        return answer_logit(
            self.llm, out.last_hidden_state[:, -1], self.yes_token_id, self.no_token_id
        )

    def forward(self, batch) -> torch.Tensor:
        return self.score(batch)

    def loss(self, batch) -> torch.Tensor:
        logits = self.score(batch)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype))

    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        meta = {"format": "pt", "method": "tallrec", "lora_rank": str(self.lora_rank),
                "lora_alpha": str(self.lora_alpha)}  # fmt: skip
        save_file(tensors, str(path), metadata=meta)

    def load_trainable(self, path) -> None:
        from safetensors.torch import load_file

        loaded, own = load_file(str(path)), self.trainable_state()
        if set(loaded) != set(own) or any(loaded[k].shape != own[k].shape for k in own):
            raise ValueError(
                f"cannot load TALLRec LoRA from {path}: its tensors do not match this model's "
                f"({len(loaded)} in the file, {len(own)} here)"
            )
        with torch.no_grad():
            for k, v in loaded.items():
                own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))


@register
class TALLRec(Method):
    name = "tallrec"
    description = "TALLRec-style: LoRA (q/v) on text-only prompts, no CF input"
    uses_cf = False

    # source: SAI-Lab/TALLRec finetune_rec.py defaults (lora_r 8, lora_alpha 16,
    # lora_dropout 0.05, lora_target_modules [q_proj, v_proj]); the same as CoLLM's step 1
    @dataclass
    class Options:
        lora_rank: int = option(8, help="LoRA rank")
        lora_alpha: float = option(16.0, help="LoRA alpha; scale alpha/r")
        lora_dropout: float = option(0.05, help="LoRA dropout")
        lora_targets: List[str] = option(
            factory=lambda: list(DEFAULT_LORA_TARGETS),
            help="projections with LoRA, comma-separated",
        )
        backend: str = backend_option()

    def build(self, ctx: RunContext, opts: Options) -> TALLRecRecommender:
        return TALLRecRecommender(
            ctx.llm,
            ctx.tokenizer,
            lora_rank=opts.lora_rank,
            lora_alpha=opts.lora_alpha,
            lora_dropout=opts.lora_dropout,
            target_modules=tuple(opts.lora_targets),
            backend=opts.backend,
            seed=ctx.cfg.train.seed,
            answer_score=ctx.cfg.answer_score,
        )
