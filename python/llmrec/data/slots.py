"""Slots in a prompt: positions that hold a CF embedding instead of a token.

Slots are marked *at tokenisation*, never searched for afterwards. :func:`encode_slotted`
builds the prompt from pieces (text, or a :class:`Slot`), records the character span of
every slot it inserts and uses the fast tokenizer's offsets to put exactly one position per
slot, holding a negative sentinel id: :data:`USER_SLOT` (-1) or :data:`ITEM_SLOT` (-2). No
tokenizer emits a negative id, so a title that contains ``<UserID>``, ``<unk>`` or any text
at all cannot be mistaken for a slot. Used by CoLLM (a user and a target-item slot) and
A-LLMRec (a user slot and one slot per item).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Union

__all__ = [
    "ITEM_SLOT",
    "SLOT_KINDS",
    "USER_SLOT",
    "Piece",
    "Slot",
    "encode_slotted",
    "slot_marker",
    "truncate_slotted",
]

#: sentinel ids marking slots in ``input_ids`` (no tokenizer produces a negative id)
USER_SLOT = -1


#: sentinel ids marking slots in ``input_ids`` (no tokenizer produces a negative id)
USER_SLOT = -1
ITEM_SLOT = -2


ITEM_SLOT = -2
SLOT_KINDS = {"user": USER_SLOT, "item": ITEM_SLOT}


@dataclasses.dataclass(frozen=True)
class Slot:
    """A slot piece of a prompt: ``kind`` ``"user"`` or ``"item"``; ``item`` an item id or 0."""

    kind: str
    item: int = 0


Piece = Union[str, Slot]


def slot_marker(tokenizer) -> str:
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
    marker = marker or slot_marker(tokenizer)
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


def truncate_slotted(ids: List[int], max_length: int, bos: Optional[int]) -> List[int]:
    """Keep BOS and the last ``max_length - 1`` tokens (as :func:`encode_prompts` does)."""
    if len(ids) <= max_length:
        return ids
    keep_bos = bos is not None and ids[0] == bos
    out = ([bos] if keep_bos else []) + ids[-(max_length - int(keep_bos)) :]
    if sum(1 for t in out if t < 0) != sum(1 for t in ids if t < 0):
        from llmrec.errors import DataValidationError  # one line in the CLI, not a traceback

        raise DataValidationError(
            f"max_length={max_length} cuts a CF slot out of the prompt; raise --max-length"
        )
    return out
