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

LoRA goes through :func:`llmrec_kernels.fused_cora_linear` with one A shared by the batch
(:class:`LoRALinear`; the parameters are named and laid out as peft's ``lora_A.weight``
``(r, d_in)`` and ``lora_B.weight`` ``(d_out, r)``). While the module trains with dropout
> 0 the LoRA branch reads ``dropout(x)`` and the base GEMM reads ``x``, which one fused call
cannot express; that case runs ``F.linear(x, W, b) + s B (A dropout(x))`` in PyTorch, exactly
as peft does. Evaluation (and dropout 0) runs the fused op.

Tuning (:func:`run_collm`): ``two-step`` (CoLLM's recipe) first trains LoRA on text-only
prompts (the TALLRec/CoRA template, no slots), then trains the CIE on CoLLM prompts with
LoRA frozen; ``one-step`` trains LoRA and the CIE together on CoLLM prompts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmrec_kernels.cora_linear import fused_cora_linear

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
    "run_collm",
]

#: sentinel ids marking slots in ``input_ids`` (no tokenizer produces a negative id)
USER_SLOT = -1
ITEM_SLOT = -2
SLOT_KINDS = {"user": USER_SLOT, "item": ITEM_SLOT}
COLLM_DEFAULT_TARGETS = ("q_proj", "v_proj")
STAGES = ("lora", "cie", "joint")
TUNINGS = ("two-step", "one-step")


# =============================================================================================
# slotted prompts


@dataclasses.dataclass(frozen=True)
class Slot:
    """A slot piece of a prompt: ``kind`` ``"user"`` or ``"item"``; ``item`` an item id or 0."""

    kind: str
    item: int = 0


Piece = Union[str, Slot]
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


def _marker(tokenizer) -> str:
    # A special token string is split off by the tokenizer as one token with exact offsets,
    # so the neighbouring text tokenises as it would around CoLLM's "<unk>".
    for tok in (getattr(tokenizer, "unk_token", None), getattr(tokenizer, "pad_token", None)):
        if isinstance(tok, str) and tok:
            return tok
    return "<slot>"


def encode_slotted(
    tokenizer,
    pieces: Sequence[Piece],
    *,
    add_special_tokens: bool = True,
    marker: Optional[str] = None,
) -> tuple[List[int], List[int]]:
    """Tokenise a prompt given as pieces; return ``(ids, slot_items)``.

    ``ids`` holds the token ids with exactly one sentinel (:data:`USER_SLOT` /
    :data:`ITEM_SLOT`) per :class:`Slot`; ``slot_items`` lists the ``item`` of every slot in
    order. Slot positions come from the character spans recorded while the text is built and
    the tokenizer's offsets (fast tokenizers), never from searching the ids; every token that
    overlaps a slot's span is folded into that slot's single position. Slow tokenizers are
    handled by tokenising the text pieces separately.
    """
    marker = marker or _marker(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        return _encode_pieces_separately(tokenizer, pieces, add_special_tokens)
    text_parts: List[str] = []
    spans: List[tuple[int, int, Slot]] = []
    pos = 0
    for piece in pieces:
        if isinstance(piece, Slot):
            if piece.kind not in SLOT_KINDS:
                raise ValueError(f"unknown slot kind {piece.kind!r}; use {sorted(SLOT_KINDS)}")
            spans.append((pos, pos + len(marker), piece))
            text_parts.append(marker)
            pos += len(marker)
        else:
            text_parts.append(piece)
            pos += len(piece)
    enc = tokenizer(
        "".join(text_parts), add_special_tokens=add_special_tokens, return_offsets_mapping=True
    )
    ids_in, offsets = enc["input_ids"], enc["offset_mapping"]
    ids: List[int] = []
    slot_items: List[int] = []
    k = 0  # next slot
    in_slot = False
    for tid, (a, b) in zip(ids_in, offsets):
        while k < len(spans) and b > a and a >= spans[k][1]:
            if not in_slot:  # a slot no token overlapped (cannot happen with a marker)
                raise ValueError("a slot was tokenised to no token")
            k += 1
            in_slot = False
        if k < len(spans) and b > a and a < spans[k][1] and b > spans[k][0]:
            if not in_slot:
                ids.append(SLOT_KINDS[spans[k][2].kind])
                slot_items.append(int(spans[k][2].item))
                in_slot = True
            continue
        ids.append(int(tid))
    if in_slot:
        k += 1
    if k != len(spans):
        raise ValueError(f"{len(spans) - k} slot(s) were not found in the tokenised prompt")
    return ids, slot_items


def _encode_pieces_separately(tokenizer, pieces, add_special_tokens) -> tuple[List[int], List[int]]:
    ids: List[int] = []
    items: List[int] = []
    if add_special_tokens:
        ids.extend(tokenizer("", add_special_tokens=True)["input_ids"])
    for piece in pieces:
        if isinstance(piece, Slot):
            ids.append(SLOT_KINDS[piece.kind])
            items.append(int(piece.item))
        elif piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids, items


def _truncate(ids: List[int], max_length: int, bos: Optional[int]) -> List[int]:
    """Keep BOS and the last ``max_length - 1`` tokens (as :func:`encode_prompts` does)."""
    if len(ids) <= max_length:
        return ids
    keep_bos = bos is not None and ids[0] == bos
    out = ([bos] if keep_bos else []) + ids[-(max_length - int(keep_bos)) :]
    if sum(1 for t in out if t < 0) != sum(1 for t in ids if t < 0):
        raise ValueError(
            f"max_length={max_length} cuts a CF slot out of the prompt; raise --max-length"
        )
    return out


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
    from llmrec.data.batching import RecExamples, make_examples
    from llmrec.data.prompts import TEMPLATES

    text = TEMPLATES.get(template, template)
    if "<UserID>" not in text and "<TargetItemID>" not in text:
        return make_examples(
            df, tokenizer, template=template, max_his=max_his, max_length=max_length
        )
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    bos = tokenizer.bos_token_id
    marker = _marker(tokenizer)
    ids = []
    for his, title in zip(df["his_title"], df["title"]):
        row, _ = encode_slotted(
            tokenizer, build_collm_pieces(his, title, text, max_his), marker=marker
        )
        ids.append(_truncate(row, max_length, bos))
    return RecExamples(
        ids,
        df["uid"].to_numpy(),
        df["iid"].to_numpy(),
        df["label"].to_numpy(),
        df["not_cold"].to_numpy() if "not_cold" in df.columns else None,
    )


# =============================================================================================
# LoRA through fused_cora_linear


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus LoRA, ``x W^T + b + s B A dropout(x)``, s = alpha / r.

    ``weight`` / ``bias`` are the original parameters (same objects); ``lora_A.weight``
    ``(r, d_in)`` (Kaiming-uniform, as peft) and ``lora_B.weight`` ``(d_out, r)`` (zeros)
    train. Without dropout in play the call is ``fused_cora_linear(x, W, A^T, B, b, s)``
    with A shared by every sample.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.05,
        backend: str = "auto",
        path: str = "",
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        lora_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(
            base.in_features, rank, bias=False, device=w.device, dtype=lora_dtype
        )
        self.lora_B = nn.Linear(
            rank, base.out_features, bias=False, device=w.device, dtype=lora_dtype
        )
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = float(alpha) / rank
        self.backend = backend
        self.path = path
        self.__dict__["_base"] = base

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout_p:g}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0:
            dt = x.dtype
            y = F.linear(x, self.weight, self.bias)
            h = F.linear(self.lora_dropout(x), self.lora_A.weight.to(dt))
            return y + F.linear(h, self.lora_B.weight.to(dt)) * self.scaling
        if x.dim() not in (2, 3):
            lead = x.shape[:-1]
            y = self.forward(x.reshape(-1, x.shape[-1]))
            return y.reshape(*lead, self.out_features)
        return fused_cora_linear(
            x,
            self.weight,
            self.lora_A.weight.t(),
            self.lora_B.weight,
            self.bias,
            scaling=self.scaling,
            backend=self.backend,
        )


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = COLLM_DEFAULT_TARGETS,
    backend: str = "auto",
    seed: Optional[int] = None,
) -> Dict[str, LoRALinear]:
    """Replace every ``nn.Linear`` named in ``target_modules`` by a :class:`LoRALinear`.

    Freezes every parameter of ``model`` first; returns ``{path: LoRALinear}``. ``seed``
    makes the ``lora_A`` initialisation reproducible without touching the global RNG.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = []
    for path, module in model.named_modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and name in target_modules:
                targets.append((module, name, child, f"{path}.{name}" if path else name))
    if not targets:
        raise ValueError(f"no nn.Linear module of the model is named one of {list(target_modules)}")
    model.requires_grad_(False)
    out: Dict[str, LoRALinear] = {}
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else _null()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        for parent, name, child, full in targets:
            lora = LoRALinear(child, rank, alpha, dropout, backend, full)
            setattr(parent, name, lora)
            out[full] = lora
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original ``nn.Linear`` modules back (the LoRA factors are dropped)."""
    for path, m in list(lora_modules(model).items()):
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        setattr(parent, path.rsplit(".", 1)[-1], m._base)
    return model


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
    ):
        super().__init__()
        from llmrec.cora import resolve_yes_token_id

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
        self.yes_token_id = int(
            resolve_yes_token_id(tokenizer) if yes_token_id is None else yes_token_id
        )
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
        out = {}
        for path, m in self.lora.items():
            out[f"llm.{path}.lora_A.weight"] = m.lora_A.weight
            out[f"llm.{path}.lora_B.weight"] = m.lora_B.weight
        return out

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

    def _decoder(self) -> nn.Module:
        get = getattr(self.llm, "get_decoder", None)
        decoder = get() if callable(get) else None
        return decoder if decoder is not None else self.llm.model

    def last_hidden(self, batch: Mapping[str, Any]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        out = self._decoder()(inputs_embeds=self.embed(batch), attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state
        if mask is None or bool(mask[:, -1].all()):
            return hidden[:, -1]
        last = mask.shape[1] - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def score(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``(B,)`` float32 "Yes" logits at the last position (one lm_head row)."""
        h = self.last_hidden(batch)
        head = self.llm.get_output_embeddings()
        logit = h.float() @ head.weight[self.yes_token_id].float()
        if getattr(head, "bias", None) is not None:
            logit = logit + head.bias[self.yes_token_id].float()
        return logit

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
        bad = [
            f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(loaded))
            if tuple(loaded[k].shape) != tuple(own[k].shape)
        ]
        missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        if bad or (strict and (missing or unexpected)):
            raise ValueError(
                f"cannot load CoLLM trainable state from {path}: mismatched {bad}, "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for k, v in loaded.items():
                if k in own:
                    own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))


# =============================================================================================
# registry hooks and the two-step runner


def collm_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """CoLLM's settings from a run's method options (``method_kwargs`` wins over defaults)."""
    kw = dict(options.get("method_kwargs") or {})
    return {
        "lora_rank": int(kw.get("lora_rank", 8)),
        "lora_alpha": float(kw.get("lora_alpha", 16)),
        "lora_dropout": float(kw.get("lora_dropout", 0.05)),
        "target_modules": tuple(kw.get("lora_targets", COLLM_DEFAULT_TARGETS)),
        "cie_mult": int(kw.get("cie_mult", 10)),
        "tuning": str(kw.get("tuning", "two-step")),
        "lora_epochs": kw.get("lora_epochs"),
        "lora_max_steps": kw.get("lora_max_steps"),
        "lora_lr": kw.get("lora_lr"),
    }


def build_collm(llm, tokenizer, cf_dim: int, options: Mapping[str, Any]) -> CoLLMRecommender:
    """Registry builder: ``CoLLMRecommender`` in its final stage (``cie`` for two-step)."""
    o = collm_options(options)
    if o["tuning"] not in TUNINGS:
        raise ValueError(f"CoLLM tuning must be one of {TUNINGS}, got {o['tuning']!r}")
    return CoLLMRecommender(
        llm,
        tokenizer,
        cf_dim,
        lora_rank=o["lora_rank"],
        lora_alpha=o["lora_alpha"],
        lora_dropout=o["lora_dropout"],
        target_modules=o["target_modules"],
        cie_mult=o["cie_mult"],
        stage="cie" if o["tuning"] == "two-step" else "joint",
        backend=options.get("backend", "auto"),
    )


def run_collm(
    cfg,
    *,
    env=None,
    log: Optional[Callable[[str], None]] = None,
    callback=None,
    data=None,
) -> dict:
    """``llmrec train --method collm``: one- or two-step tuning, then test; writes the run.

    Two-step: step 1 trains LoRA on text-only prompts in ``<out>/step1`` (its own checkpoints
    and ``best.safetensors``); step 2 starts from step 1's best LoRA, freezes it and trains the
    CIE on CoLLM prompts in ``<out>``. The metrics file has the layout of every other method
    (``test`` / ``valid`` blocks with AUC, UAUC, warm, cold; ``train``; ``config``;
    ``wall_time_s``), with one entry per step under ``train.stages``.
    """
    import copy
    import datetime
    import json

    from llmrec import train as T
    from llmrec.data.batching import RecCollator, pad_id_of
    from llmrec.metrics import json_safe

    start = time.perf_counter()
    env = env or T.DistEnv()
    log = log or (lambda m: None)
    out = Path(cfg.out)
    T._check_resume_config(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    prep = T.prepare_run(cfg, env, log, data=data)
    model: CoLLMRecommender = prep.model
    o = collm_options(cfg.method_options())
    if env.is_main:
        run_info = {
            "kind": "llm",
            "method": cfg.method,
            "config": cfg.to_dict(),
            "cf_path": prep.cf_path,
            "data": prep.data.summary(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        T._atomic_write_text(out / T.RUN_FILE, json.dumps(json_safe(run_info), indent=2) + "\n")
    valid_split = cfg.valid_split or prep.data.validation_split()
    seed = cfg.train.seed
    train_df = T._subsample(prep.data["train"], cfg.max_train_rows, seed)
    valid_df = T._subsample(prep.data[valid_split], cfg.max_valid_rows, seed + 1)
    pad = pad_id_of(prep.tokenizer)

    def collator(df, template):
        ex = make_collm_examples(
            df, prep.tokenizer, template=template, max_his=cfg.max_his, max_length=cfg.max_length
        )
        return RecCollator(ex, pad, prep.user_table, prep.item_table)

    stages = []
    if o["tuning"] == "two-step":
        step1_dir = out / "step1"
        tcfg = copy.deepcopy(cfg.train)
        if o["lora_epochs"] is not None:
            tcfg.epochs = int(o["lora_epochs"])
        if o["lora_max_steps"] is not None:
            tcfg.max_steps = int(o["lora_max_steps"])
        if o["lora_lr"] is not None:
            tcfg.lr = float(o["lora_lr"])
        model.set_stage("lora")
        if not cfg.resume and (step1_dir / "checkpoints").exists():
            raise T.RunConfigError(
                f"{step1_dir} already holds CoLLM step-1 checkpoints; pass --resume to continue "
                "the run or choose another --out"
            )
        if cfg.resume and (step1_dir / "step1_done").exists():
            log("step 1 already finished: loading its best LoRA")
            model.load_trainable(str(step1_dir / T.BEST))
            stages.append(json.loads((step1_dir / "step1_done").read_text()))
        else:
            log("CoLLM step 1: LoRA on text-only prompts")
            t0 = time.perf_counter()
            trainer = T.Trainer(
                model, collator(train_df, "cora"), collator(valid_df, "cora"), tcfg, step1_dir,
                device=prep.device, env=env, log=log, callback=callback,
            )  # fmt: skip
            st = trainer.fit(resume=cfg.resume)
            info = {
                "stage": "lora",
                "template": "cora",
                "steps": st.global_step,
                "best_step": st.best_step,
                "best_valid_auc": st.best_auc if st.best_step >= 0 else None,
                "train_time_s": time.perf_counter() - t0,
            }
            stages.append(info)
            if env.is_main:
                T._atomic_write_text(step1_dir / "step1_done", json.dumps(json_safe(info)))
        model.set_stage("cie")
        log("CoLLM step 2: CIE on CoLLM prompts, LoRA frozen")
    else:
        model.set_stage("joint")
    t0 = time.perf_counter()
    train_c, valid_c = collator(train_df, "collm"), collator(valid_df, "collm")
    trainer = T.Trainer(
        model, train_c, valid_c, cfg.train, out, device=prep.device, env=env, log=log,
        callback=callback,
    )  # fmt: skip
    st = trainer.fit(resume=cfg.resume)
    stages.append(
        {
            "stage": model.stage,
            "template": "collm",
            "steps": st.global_step,
            "best_step": st.best_step,
            "best_valid_auc": st.best_auc if st.best_step >= 0 else None,
            "train_time_s": time.perf_counter() - t0,
        }
    )
    test_df = T._subsample(prep.data[cfg.test_split], cfg.max_test_rows, seed + 2)
    test_scores = trainer.predict(collator(test_df, "collm"), desc=cfg.test_split)
    valid_scores = trainer.predict(valid_c, desc=valid_split)
    metrics = {
        "method": cfg.method,
        cfg.test_split: T._split_metrics(test_scores, test_df),
        "valid": {"split": valid_split, **T._split_metrics(valid_scores, valid_df)},
        "train": {
            "rows": len(train_c.examples),
            "steps": sum(s["steps"] for s in stages),
            "epochs_completed": st.epoch,
            "best_step": st.best_step,
            "best_valid_auc": st.best_auc if st.best_step >= 0 else None,
            "stopped_early": st.stopped_early,
            "train_time_s": sum(s["train_time_s"] for s in stages),
            "world_size": env.world_size,
            "tuning": o["tuning"],
            "stages": stages,
        },
        "config": cfg.to_dict(),
        "data": prep.data.summary(),
        "device": str(prep.device),
        "wall_time_s": time.perf_counter() - start,
    }
    if env.is_main:
        T._atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
        if cfg.predictions:
            T._write_predictions(Path(cfg.predictions), test_df, test_scores)
    env.barrier()
    return metrics
