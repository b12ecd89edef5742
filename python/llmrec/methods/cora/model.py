"""The CoRA recommender core: a frozen LLM with CoRA-patched projections and a generator.

Batch contract (shared with the training CLI)::

    {
        "input_ids":      (B, T) long, left-padded prompts,
        "attention_mask": (B, T) 0/1,
        "user_emb":       (B, d_cf) float,      # optional together with item_emb
        "item_emb":       (B, d_cf) float,
        "labels":         (B,) float in {0, 1}  # needed by loss() only
    }

``score(batch)`` is the logit of the "Yes" token at the last prompt position; ``loss(batch)``
is BCE with logits. Only the generator and every ``lora_B`` train.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.llm import answer_ids, answer_logit, answer_token_ids, decoder_body
from llmrec.methods.cora.generator import build_generator
from llmrec_kernels.hf import (
    DEFAULT_TARGET_MODULES,
    apply_cora_to_llama,
    cora_weights,
    lora_b_parameters,
)

__all__ = ["CoRARecommender"]

_GENERATOR_PREFIX = "generator."
_LLM_PREFIX = "llm."


class CoRARecommender(nn.Module):
    """Frozen causal LM + CoRA-patched projections + collaborative weights generator.

    Args:
        llm: a transformers causal LM (``LlamaForCausalLM``, Mistral, Qwen2, ...). It is
            patched in place by :func:`llmrec_kernels.hf.apply_cora_to_llama` and frozen.
        tokenizer: its tokenizer; used to resolve the "Yes" token.
        cf_dim: ``d_cf``, the size of the user and item CF embeddings.
        rank, alpha: CoRA rank ``r`` and alpha (scale ``alpha / r``).
        generator: ``"qformer"``, ``"mlp"`` or a ready ``nn.Module`` mapping
            ``(user_emb, item_emb)`` to ``(B, hidden_size, rank)``.
        target_modules, fuse_qkv, backend: passed to ``apply_cora_to_llama`` (``None``: the
            model's own attention projections that read the hidden state).
        generator_kwargs: extra arguments for :func:`llmrec.methods.cora.generator.build_generator`.
        yes_token, yes_token_id: the answer token scored (``yes_token_id`` wins when given).
        lora_dropout: dropout on ``x`` before ``x A_b`` in training mode, inside the fused op
            (``apply_cora_to_llama(lora_dropout=...)``; the reference uses 0.05).
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        cf_dim: int,
        rank: int = 16,
        alpha: float = 32,
        generator: Union[str, nn.Module] = "qformer",
        target_modules: Optional[Sequence[str]] = DEFAULT_TARGET_MODULES,
        fuse_qkv: bool = True,
        backend: str = "auto",
        generator_kwargs: Optional[Mapping[str, Any]] = None,
        yes_token: str = "Yes",
        yes_token_id: Optional[int] = None,
        lora_dropout: float = 0.0,
        answer_score: str = "yes-no",
    ):
        super().__init__()
        if llm.get_output_embeddings() is None:
            raise ValueError("llm must be a causal LM with an output embedding (lm_head)")
        hidden_size = int(llm.config.hidden_size)
        apply_cora_to_llama(
            llm,
            rank=rank,
            alpha=alpha,
            target_modules=target_modules,
            fuse_qkv=fuse_qkv,
            backend=backend,
            lora_dropout=lora_dropout,
        )
        self.llm = llm
        self.tokenizer = tokenizer
        self.cf_dim, self.rank, self.alpha = cf_dim, rank, alpha
        self.lora_dropout = float(lora_dropout)
        if isinstance(generator, str):
            self.generator_kind = generator
            generator = build_generator(
                generator, cf_dim, hidden_size, rank, **dict(generator_kwargs or {})
            )
        else:
            if not isinstance(generator, nn.Module):
                raise TypeError("generator must be 'qformer', 'mlp' or an nn.Module")
            self.generator_kind = type(generator).__name__
        device = llm.get_output_embeddings().weight.device
        self.generator = generator.to(device)
        if yes_token_id is None:
            yes_token_id = answer_token_ids(tokenizer, (yes_token, "No"))[0]
        vocab = llm.get_output_embeddings().weight.shape[0]
        if not 0 <= int(yes_token_id) < vocab:
            raise ValueError(
                f"yes_token_id={yes_token_id} is outside the vocabulary (0..{vocab - 1})"
            )
        self.yes_token_id, self.no_token_id = answer_ids(tokenizer, answer_score, yes_token_id)

    # ----------------------------------------------------------------------------------------
    def collaborative_weights(self, batch: Mapping[str, Any]) -> Optional[torch.Tensor]:
        """``A`` ``(B, hidden_size, rank)`` from the batch's CF embeddings, or ``None``.

        ``None`` (frozen backbone only) when the batch has no ``user_emb``/``item_emb`` or
        they are ``None``; giving only one of them is an error.
        """
        user, item = batch.get("user_emb"), batch.get("item_emb")
        if user is None and item is None:
            return None
        if user is None or item is None:
            raise ValueError("give both user_emb and item_emb, or neither (frozen backbone)")
        return self.generator(user, item)

    def last_hidden(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Final-norm hidden state at each sample's last real position, ``(B, hidden_size)``."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
        lora_a = self.collaborative_weights(batch)
        if lora_a is not None and lora_a.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"user_emb/item_emb have {lora_a.shape[0]} rows but input_ids has "
                f"{input_ids.shape[0]}"
            )
        with cora_weights(self.llm, lora_a):
            out = decoder_body(self.llm)(input_ids=input_ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, d), final norm applied by the decoder
        if mask is None or bool(mask[:, -1].all()):
            return hidden[:, -1]
        # Not left-padded: take each row's last attended position.
        length = mask.shape[1]
        last = length - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def score(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``(B,)`` float32 logits of the "Yes" token at the last prompt position, minus the
        "No" token's (``answer_score="yes-no"``, the default).

        Runs the decoder body only, then one ``lm_head`` row: never the full-vocabulary
        logits, never at every position.
        """
        h = self.last_hidden(batch)
        return answer_logit(self.llm, h, self.yes_token_id, self.no_token_id)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Same as :meth:`score`."""
        return self.score(batch)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean BCE-with-logits of :meth:`score` against ``batch["labels"]`` ``(B,)`` in {0, 1}."""
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("loss() needs batch['labels'] of shape (B,)")
        logits = self.score(batch)
        if labels.shape != logits.shape:
            raise ValueError(
                f"labels must be (B,) = {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    # ----------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """``{name: parameter}``: ``generator.*`` and ``llm.<path>.lora_B.weight``."""
        state = {f"{_GENERATOR_PREFIX}{k}": v for k, v in self.generator.named_parameters()}
        state.update({f"{_LLM_PREFIX}{k}": v for k, v in lora_b_parameters(self.llm).items()})
        return state

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The generator's parameters and every ``lora_B.weight`` (nothing of the LLM else)."""
        yield from self.trainable_state().values()

    def save_trainable(self, path: Union[str, os.PathLike]) -> None:
        """Save the generator and every ``lora_B`` to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        metadata = {
            "format": "pt",
            "cf_dim": str(self.cf_dim),
            "rank": str(self.rank),
            "alpha": str(self.alpha),
            "generator": str(self.generator_kind),
            "yes_token_id": str(self.yes_token_id),
            "no_token_id": str(self.no_token_id),
        }
        save_file(tensors, str(path), metadata=metadata)

    def load_trainable(self, path: Union[str, os.PathLike], strict: bool = True) -> None:
        """Load what :meth:`save_trainable` wrote; raise ``ValueError`` naming bad keys.

        Shapes must match exactly; with ``strict`` (default) the key sets must match too.
        """
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        own = self.trainable_state()
        missing = sorted(set(own) - set(loaded))
        unexpected = sorted(set(loaded) - set(own))
        mismatched = [
            f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(loaded))
            if tuple(loaded[k].shape) != tuple(own[k].shape)
        ]
        problems = []
        if mismatched:
            problems.append("shape mismatch: " + "; ".join(mismatched))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise ValueError(
                f"cannot load CoRA trainable state from {path}: " + " | ".join(problems)
            )
        with torch.no_grad():
            for k, v in loaded.items():
                if k in own:
                    own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
