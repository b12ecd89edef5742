"""A zero-shot baseline: the frozen LLM's answer logit, no CF input and no training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.llm import answer_ids, answer_logit, decoder_body
from llmrec.method import Method, RunContext, register


class FrozenLLMScorer(nn.Module):
    """The frozen LLM's "Yes" logit at the last position; it gives the level a method must
    beat (about 0.5 AUC for a random LLM)."""

    def __init__(
        self, llm: nn.Module, tokenizer, cf_dim: int = 0, options=None, answer_score="yes-no"
    ):
        super().__init__()
        self.llm = llm
        self.llm.requires_grad_(False)
        self.yes_token_id, self.no_token_id = answer_ids(tokenizer, answer_score)

    def score(self, batch) -> torch.Tensor:
        out = decoder_body(self.llm)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        return answer_logit(
            self.llm, out.last_hidden_state[:, -1], self.yes_token_id, self.no_token_id
        )

    def forward(self, batch) -> torch.Tensor:
        return self.score(batch)

    def loss(self, batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.score(batch), batch["labels"].float())

    def trainable_state(self) -> dict:
        return {}

    def trainable_parameters(self):
        return iter(())

    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        save_file({}, str(path), metadata={"method": "frozen"})

    def load_trainable(self, path) -> None:
        return None


@register
class Frozen(Method):
    name = "frozen"
    description = "zero-shot frozen LLM (Yes logit), no CF and no training: a baseline"
    uses_cf = False
    trains = False

    def build(self, ctx: RunContext, opts) -> FrozenLLMScorer:
        return FrozenLLMScorer(ctx.llm, ctx.tokenizer, answer_score=ctx.cfg.answer_score)
