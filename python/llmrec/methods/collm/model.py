"""CoLLM: CF embeddings mapped into the token embedding space, plus LoRA, on a frozen LLM.

CoLLM (Zhang et al., 2023) puts a user and a target-item *slot* into the prompt
(:data:`~llmrec.data.prompts.COLLM_TEMPLATE`, ``<UserID>`` / ``<TargetItemID>``) and fills
each slot with the output of the collaborative information encoder (CIE), an MLP
``d_cf -> 10 d_cf -> hidden`` (ReLU) applied to the CF embedding ``e_u`` / ``e_i``. The LLM is
frozen except for LoRA on ``q_proj`` / ``v_proj`` (r 8, alpha 16, dropout 0.05). The score is
the "Yes" logit at the last prompt position, trained with BCE, as for CoRA.

Slots are marked *at tokenisation*, never searched for afterwards. :func:`encode_slotted`
builds the prompt from pieces (text, or a slot), records the character span of every slot it
inserts and uses the fast tokenizer's offsets to put exactly one position per slot, holding a
negative sentinel id: :data:`USER_SLOT` (-1) or :data:`ITEM_SLOT` (-2). No tokenizer emits a
negative id, so a title that contains ``<UserID>``, ``<unk>`` or any text at all cannot be
mistaken for a slot (CoLLM's reference code replaces the placeholders by ``<unk>`` and later
searches for ``unk_token_id``, which breaks on any title that tokenises to ``<unk>``).
:meth:`CoLLMRecommender.embed` replaces the slots with one vectorised ``index_put``.

LoRA is :mod:`llmrec_kernels.lora` (one A shared by the batch, through the fused CoRA op;
re-exported here).

Tuning (:class:`llmrec.methods.collm.CoLLM`): ``two-step`` (CoLLM's recipe) first trains LoRA on text-only
prompts (the TALLRec/CoRA template, no slots), then trains the CIE on CoLLM prompts with
LoRA frozen; ``one-step`` trains LoRA and the CIE together on CoLLM prompts.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmrec.data.slots import (
    ITEM_SLOT,
    SLOT_KINDS,
    USER_SLOT,
    Piece,
    Slot,
    encode_slotted,
    slot_marker,
)
from llmrec.llm import answer_ids, answer_logit, decoder_body
from llmrec_kernels.lora import (
    DEFAULT_LORA_TARGETS,
    LoRALinear,
    apply_lora,
    lora_modules,
    lora_parameters,
    remove_lora,
)

__all__ = [
    "ITEM_SLOT",
    "SLOT_KINDS",
    "USER_SLOT",
    "CoLLMRecommender",
    "LoRALinear",
    "Slot",
    "apply_lora",
    "build_collm_pieces",
    "encode_slotted",
    "lora_modules",
    "make_collm_examples",
    "remove_lora",
    "slot_marker",
]

COLLM_DEFAULT_TARGETS = DEFAULT_LORA_TARGETS
STAGES = ("lora", "cie", "joint")
TUNINGS = ("two-step", "one-step")


# =============================================================================================
# slotted prompts


_TEMPLATE_FIELDS = re.compile(r"(<ItemTitleList>|<TargetItemTitle>|<UserID>|<TargetItemID>)")


def build_collm_pieces(
    his_titles: Sequence[str],
    target_title: str,
    template: Optional[str] = None,
    max_his: int = 10,
) -> List[Piece]:
    """The CoLLM prompt as pieces: text with the titles filled in, and two :class:`Slot` s.

    The template is split at its fields *before* any title is inserted, so a title holding
    ``<UserID>`` stays text.
    """
    from llmrec.data.prompts import COLLM_TEMPLATE, format_title_list

    text = COLLM_TEMPLATE if template is None else template
    pieces: List[Piece] = []
    for part in _TEMPLATE_FIELDS.split(text):
        if part == "<ItemTitleList>":
            pieces.append(format_title_list(his_titles, max_his))
        elif part == "<TargetItemTitle>":
            pieces.append(f'"{target_title}"')
        elif part == "<UserID>":
            pieces.append(Slot("user"))
        elif part == "<TargetItemID>":
            pieces.append(Slot("item"))
        elif part:
            pieces.append(part)
    return pieces


def make_collm_examples(
    df,
    tokenizer,
    *,
    template: str = "collm",
    max_his: int = 10,
    max_length: int = 512,
):
    """:class:`~llmrec.data.RecExamples` for CoLLM: slotted prompts (template ``"collm"`` or
    a template string with ``<UserID>`` / ``<TargetItemID>``), or text-only prompts for any
    template without slots (``"cora"``, the first step of two-step tuning)."""
    from llmrec.data.batching import RecExamples, make_examples, recent_titles
    from llmrec.data.lengths import TitleCutter, fit_history, refusal_line
    from llmrec.data.prompts import TEMPLATES

    text = TEMPLATES.get(template, template)
    if "<UserID>" not in text and "<TargetItemID>" not in text:
        return make_examples(
            df, tokenizer, template=template, max_his=max_his, max_length=max_length
        )
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    marker = slot_marker(tokenizer)
    cut = TitleCutter(tokenizer)  # the length rule (llmrec.data.lengths): no slot is ever cut
    refusal = refusal_line("a CoLLM prompt", max_length)

    def encode(titles: Sequence[str], target: str) -> List[int]:
        pieces = build_collm_pieces(titles, target, text, max_his)
        return encode_slotted(tokenizer, pieces, marker=marker)[0]

    ids = []
    for his, title in zip(df["his_title"], df["title"]):
        target = cut(title)
        history = recent_titles(his, max_his, cut)
        row = fit_history(
            lambda ts, target=target: encode(ts, target), history, max_length, refusal
        )
        ids.append(row)
    return RecExamples(
        ids,
        df["uid"].to_numpy(),
        df["iid"].to_numpy(),
        df["label"].to_numpy(),
        df["not_cold"].to_numpy() if "not_cold" in df.columns else None,
    )


# =============================================================================================
# the model


class CoLLMRecommender(nn.Module):
    """Frozen causal LM + LoRA on ``q_proj``/``v_proj`` + the CIE filling the CF slots.

    Batch contract: CoRA's (``input_ids`` (B, T) left-padded, ``attention_mask``,
    ``user_emb`` / ``item_emb`` (B, d_cf), ``labels``), where ``input_ids`` may hold the slot
    sentinels written by :func:`make_collm_examples` (a batch without slots is a text-only
    prompt and needs no embeddings).

    ``stage`` picks what trains: ``"lora"`` (step 1 of two-step tuning), ``"cie"`` (step 2,
    LoRA frozen) or ``"joint"`` (one-step). :meth:`trainable_state` always holds both parts,
    so every checkpoint is complete.
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        cf_dim: int,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] = COLLM_DEFAULT_TARGETS,
        cie_mult: int = 10,
        stage: str = "joint",
        backend: str = "auto",
        yes_token_id: Optional[int] = None,
        seed: int = 0,
        answer_score: str = "yes-no",
    ):
        super().__init__()
        if llm.get_output_embeddings() is None or llm.get_input_embeddings() is None:
            raise ValueError("llm must be a causal LM with input and output embeddings")
        if cf_dim < 1:
            raise ValueError(f"CoLLM needs CF embeddings (cf_dim >= 1), got cf_dim={cf_dim}")
        hidden = int(llm.config.hidden_size)
        self.llm = llm
        self.tokenizer = tokenizer
        self.lora = apply_lora(
            llm, lora_rank, lora_alpha, lora_dropout, tuple(target_modules), backend, seed=seed
        )
        device = llm.get_output_embeddings().weight.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.cie = nn.Sequential(
                nn.Linear(cf_dim, cie_mult * cf_dim),
                nn.ReLU(),
                nn.Linear(cie_mult * cf_dim, hidden),
            ).to(device)
        self.cf_dim, self.hidden_size = cf_dim, hidden
        self.lora_rank, self.lora_alpha, self.lora_dropout = lora_rank, lora_alpha, lora_dropout
        self.yes_token_id, self.no_token_id = answer_ids(tokenizer, answer_score, yes_token_id)
        self.set_stage(stage)

    # -- stages --------------------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        for m in self.lora.values():
            m.lora_A.weight.requires_grad_(stage in ("lora", "joint"))
            m.lora_B.weight.requires_grad_(stage in ("lora", "joint"))
        self.cie.requires_grad_(stage in ("cie", "joint"))

    def lora_state(self) -> Dict[str, nn.Parameter]:
        return lora_parameters(self.lora)

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        state = {f"cie.{k}": v for k, v in self.cie.named_parameters()}
        state.update(self.lora_state())
        return state

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the current stage trains."""
        if self.stage in ("cie", "joint"):
            yield from self.cie.parameters()
        if self.stage in ("lora", "joint"):
            yield from self.lora_state().values()

    # -- forward -------------------------------------------------------------------------------
    def embed(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Token embeddings ``(B, T, d)`` with every slot replaced by the CIE output.

        One ``index_put`` writes all slots of the batch: user slots get ``cie(user_emb[b])``,
        item slots ``cie(item_emb[b])``.
        """
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(ids.shape)}")
        slot = ids < 0
        emb = self.llm.get_input_embeddings()(ids.clamp_min(0))
        if not bool(slot.any()):
            return emb
        rows, cols = slot.nonzero(as_tuple=True)
        kind = -ids[rows, cols] - 1  # 0 user, 1 item
        if bool((kind > 1).any()):
            raise ValueError("input_ids hold an unknown negative id (only -1 and -2 are slots)")
        user, item = batch.get("user_emb"), batch.get("item_emb")
        if user is None or item is None:
            raise ValueError("the prompts have CF slots: the batch needs user_emb and item_emb")
        cf = torch.stack([user, item], dim=1).to(self.cie[0].weight.dtype)  # (B, 2, d_cf)
        mapped = self.cie(cf)  # (B, 2, d)
        return emb.index_put((rows, cols), mapped[rows, kind].to(emb.dtype))

    def last_hidden(self, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        out = decoder_body(self.llm)(
            inputs_embeds=self.embed(batch), attention_mask=mask, use_cache=False
        )
        hidden = out.last_hidden_state
        if mask is None or bool(mask[:, -1].all()):
            return hidden[:, -1]
        last = mask.shape[1] - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def score(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``(B,)`` float32 "Yes" logits at the last position (one lm_head row)."""
        return answer_logit(self.llm, self.last_hidden(batch), self.yes_token_id, self.no_token_id)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.score(batch)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        logits = self.score(batch)
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype))

    # -- persistence ---------------------------------------------------------------------------
    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        meta = {
            "format": "pt",
            "method": "collm",
            "cf_dim": str(self.cf_dim),
            "lora_rank": str(self.lora_rank),
            "lora_alpha": str(self.lora_alpha),
            "stage": self.stage,
        }
        save_file(tensors, str(path), metadata=meta)

    def load_trainable(self, path, strict: bool = True) -> None:
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        own = self.trainable_state()
        bad = _shape_mismatches(own, loaded)
        missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        if bad or (strict and (missing or unexpected)):
            raise ValueError(
                f"cannot load CoLLM trainable state from {path}: mismatched {bad}, "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        _copy_into(own, loaded)

    def load_lora(self, path) -> None:
        """Copy the LoRA tensors of ``path`` into this model; the CIE is left as it is.

        ``path``: a ``.safetensors`` file holding this model's LoRA tensors under the same names
        (a TALLRec run's ``best.safetensors``, a CoLLM state); other tensors in it are ignored.
        Refused when a LoRA tensor is missing or has another shape, or when the file records
        another ``lora_rank`` / ``lora_alpha`` (the same tensors would be scaled differently).
        """
        from safetensors import safe_open

        own = self.lora_state()
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            for key, want in (("lora_rank", self.lora_rank), ("lora_alpha", self.lora_alpha)):
                if key in meta and float(meta[key]) != float(want):
                    raise ValueError(
                        f"cannot load the LoRA of {path}: it was trained with {key} {meta[key]}, "
                        f"this model has {want}"
                    )
            missing = sorted(set(own) - names)
            if missing:
                raise ValueError(
                    f"cannot load the LoRA of {path}: it lacks {len(missing)} of this model's "
                    f"{len(own)} LoRA tensors (first: {missing[0]}); is it another model's?"
                )
            loaded = {k: f.get_tensor(k) for k in own}
        bad = _shape_mismatches(own, loaded)
        if bad:
            raise ValueError(f"cannot load the LoRA of {path}: shapes differ ({bad[0]}, ...)")
        _copy_into(own, loaded)


def _shape_mismatches(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]):
    """``"name: file (..) vs model (..)"`` for every tensor both hold with another shape."""
    return [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(loaded))
        if tuple(loaded[k].shape) != tuple(own[k].shape)
    ]


@torch.no_grad()
def _copy_into(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> None:
    """Copy every tensor of ``loaded`` that ``own`` holds, to its device and dtype."""
    for k, v in loaded.items():
        if k in own:
            own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
