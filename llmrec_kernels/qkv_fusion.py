"""The fused q/k/v group of a patched attention block: one ``fused_cora_linear_multi`` call
for the q, k and v projections that share ``x`` and ``A_b``.

Used by :func:`llmrec_kernels.hf.apply_cora_to_llama`. Which weights may be moved into one
buffer, and which are concatenated per call instead, is the ownership rule stated on
:class:`FusedQKV`.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from llmrec_kernels.cora_linear import fused_cora_linear_multi

if TYPE_CHECKING:
    from llmrec_kernels.hf import CoRALinear

__all__ = ["FusedQKV", "can_share_buffer", "on_device", "self_contained", "version_of"]


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A model split over devices (device_map="auto") gets A on each layer's device.
    return t if t.device == device else t.to(device)


def version_of(t: torch.Tensor) -> Optional[int]:
    # Inference tensors (torch.inference_mode) have no version counter; under torch.compile
    # neither is readable (nor needed: the traced attention code does not modify its input
    # between the q, k and v calls).
    if torch.compiler.is_compiling() or t.is_inference():
        return None
    return t._version


class FusedQKV:
    """One fused ``fused_cora_linear`` call for the q/k/v projections of one attention block.

    Only projections whose weights are plain float ``nn.Linear`` parameters are grouped (see
    :func:`llmrec_kernels.hf_targets.is_plain_linear`). Where every member's weight (and, separately, every member's
    ``lora_B.weight``) is *self-contained* (a plain ``nn.Parameter`` that is the whole of its
    own storage, :func:`self_contained`), the group moves them into one contiguous
    ``(sum(sizes), d_in)`` (``(sum(sizes), rank)``) buffer and the members become views of it,
    so the fused operands are the buffers themselves and nothing is concatenated per call (no
    second copy of the weights either). An optimizer step updates the ``lora_B`` views in
    place, hence the buffer: training ``B`` needs nothing more. The gradients go to each
    member's own parameters (:func:`fused_cora_linear_multi`).

    Parameters that are not self-contained are never re-pointed: views into storage someone
    else manages (FSDP's flat parameters, a user's packed buffer, tensor subclasses such as
    DTensor or quantised parameters). Such a part is concatenated per call instead (a copy,
    the same values, so the same results), which is what ``fuse_qkv=False`` avoids.

    Ownership: only the parameter objects that were members at patch time are ever re-pointed.
    A member whose parameter object was replaced (``fully_shard``/FSDP registering its own
    parameters, ``load_state_dict(assign=True)``, a user's ``module.weight = ...``) belongs
    to someone else: that part is never fused again and its buffer is released, whatever the
    new parameter looks like (an FSDP unsharded parameter can look self-contained).
    :meth:`release` (``llmrec_kernels.hf.unfuse_qkv``) gives every member its own storage
    back and stops fusion for good, so that no two modules' parameters share storage.

    Layout checks: in eager mode every call compares the members' data pointers with the
    buffers' (integers, cached at fusion time; the buffers are held here, so their addresses
    cannot be reused); a part that drifted apart (``model.to(...)``, ``.data =``, a replaced
    parameter) is re-fused before the call if it is self-contained again (as after
    ``.to()``), else concatenated per call. Under ``torch.compile`` pointers are not
    traceable: :func:`cora_weights` runs the same check when its block is entered (outside the
    compiled region), ``nn.Module._apply`` (``.to``, ``.half()``, ...) marks the group stale,
    and a stale group computes with concatenated copies (correct, slower) until the next eager
    call or block entry re-fuses it. Holds no activation between forwards except the pending
    outputs of the current call.
    """

    def __init__(self, members: Sequence[CoRALinear]):
        self.members = list(members)
        self.sizes = [m.out_features for m in self.members]
        for i, m in enumerate(self.members):
            m._group = self
            m._group_index = i
        self._clear()
        self._w_fused = self._w_ptrs = self._b_fused = self._b_ptrs = None
        # the parameter objects this group may re-point (None: a part it never fuses again)
        self._w_owned: Optional[tuple] = tuple(weakref.ref(p) for p in self._weights())
        self._b_owned: Optional[tuple] = tuple(weakref.ref(p) for p in self._lora_bs())
        self.refuse()

    def __deepcopy__(self, memo: dict) -> FusedQKV:
        # A copied model's group owns the copies of its members' parameters (weak references
        # are copied as themselves and would still name the originals).
        new = object.__new__(FusedQKV)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_w_owned", "_b_owned"):
                new.__dict__[key] = copy.deepcopy(value, memo)
        for key in ("_w_owned", "_b_owned"):
            refs = self.__dict__[key]
            copies = [memo.get(id(ref())) for ref in refs] if refs is not None else [None]
            owned = None if any(c is None for c in copies) else tuple(map(weakref.ref, copies))
            new.__dict__[key] = owned
        return new

    def _clear(self) -> None:
        self._x: Optional[torch.Tensor] = None
        self._a: Optional[torch.Tensor] = None
        self._version: Optional[int] = None
        self._pending: dict[int, torch.Tensor] = {}

    @staticmethod
    def _fuse(params: list, sizes: list) -> tuple[Optional[torch.Tensor], Optional[tuple]]:
        """``(buffer, data pointers)`` with ``params`` re-pointed into it, or ``(None, None)``
        (left alone) unless every parameter is self-contained and they fit one buffer."""
        if not (can_share_buffer(params) and all(self_contained(p) for p in params)):
            return None, None
        fused = torch.cat([p.detach() for p in params], dim=0)
        offset = 0
        for p, n in zip(params, sizes):
            p.data = fused[offset : offset + n]
            offset += n
        return fused, tuple(p.data_ptr() for p in params)

    def _weights(self) -> list:
        return [m.weight for m in self.members]

    def _lora_bs(self) -> list:
        return [m.lora_B.weight for m in self.members]

    @staticmethod
    def _in_place(params: list, ptrs: Optional[tuple]) -> bool:
        return ptrs is not None and tuple(p.data_ptr() for p in params) == ptrs

    @staticmethod
    def _owns(owned: Optional[tuple], params: list) -> bool:
        return owned is not None and all(ref() is p for ref, p in zip(owned, params))

    @torch.no_grad()
    def refuse(self, force: bool = True) -> None:
        """Fuse each part (weights, ``lora_B``) whose members are self-contained and still
        the parameter objects of patch time; a part already in place is kept unless
        ``force``. A part whose parameters were replaced is given up for good."""
        weights, lora_bs = self._weights(), self._lora_bs()
        if not self._owns(self._w_owned, weights):
            self._w_owned = None
        if not self._owns(self._b_owned, lora_bs):
            self._b_owned = None
        if force or not self._in_place(weights, self._w_ptrs):
            # Drop the old buffer first: a failed fusion must not keep a stale copy alive.
            self._w_fused = self._w_ptrs = None
            if self._w_owned is not None:
                self._w_fused, self._w_ptrs = self._fuse(weights, self.sizes)
        if force or not self._in_place(lora_bs, self._b_ptrs):
            self._b_fused = self._b_ptrs = None
            if self._b_owned is not None:
                self._b_fused, self._b_ptrs = self._fuse(lora_bs, self.sizes)
        self.stale = False

    @torch.no_grad()
    def release(self) -> None:
        """Give every member still viewing a fused buffer its own storage (same values) and
        never fuse again: afterwards no parameter shares storage with another's, as FSDP or
        a sharding wrapper expects. Every call then concatenates its operands."""
        for params, fused in ((self._weights(), self._w_fused), (self._lora_bs(), self._b_fused)):
            if fused is None:
                continue
            base = fused.untyped_storage().data_ptr()
            for p in params:
                if p.untyped_storage().data_ptr() == base:
                    p.data = p.detach().clone()
        self._w_fused = self._w_ptrs = self._b_fused = self._b_ptrs = None
        self._w_owned = self._b_owned = None
        self.stale = False

    def _layout_ok(self) -> bool:
        """Eager check: every member still a view at its place in the fused buffers."""
        return self._in_place(self._weights(), self._w_ptrs) and self._in_place(
            self._lora_bs(), self._b_ptrs
        )

    def ensure_fused(self) -> None:
        """Re-fuse the parts whose members drifted apart (eager only: reads data pointers)."""
        if self.stale or not self._layout_ok():
            self.refuse(force=False)

    def operands(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The fused weight and ``B`` (``None``: concatenate the members for this call)."""
        if not torch.compiler.is_compiling():
            # One read of the pointers per call when the layout holds (the decode path).
            weights, lora_bs = self._weights(), self._lora_bs()
            w_ok = self._in_place(weights, self._w_ptrs)
            b_ok = self._in_place(lora_bs, self._b_ptrs)
            if self.stale or not (w_ok and b_ok):
                self.refuse(force=False)
                w_ok = self._in_place(weights, self._w_ptrs)
                b_ok = self._in_place(lora_bs, self._b_ptrs)
            # A part that is not (or no longer) fused is concatenated by the op.
            return (self._w_fused if w_ok else None), (self._b_fused if b_ok else None)
        if self.stale:
            return None, None
        return self._w_fused, self._b_fused

    def output(self, member: CoRALinear, x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        idx = member._group_index
        if (
            self._x is x
            and self._a is lora_a
            and idx in self._pending
            and self._version == version_of(x)
        ):
            y = self._pending.pop(idx)
            if not self._pending:
                self._clear()
            return y
        state = member._state
        fused_w, fused_b = self.operands()
        outs = fused_cora_linear_multi(
            x,
            [m.weight for m in self.members],
            on_device(lora_a, x.device),
            [m.lora_B.weight for m in self.members],
            [m.bias for m in self.members],
            scaling=state.scaling,
            backend=state.backend,
            fused_weight=fused_w,
            fused_lora_b=fused_b,
            **state.dropout_args(member, x),
        )
        self._clear()
        pending = {j: o for j, o in enumerate(outs) if j != idx}
        if pending:
            self._x, self._a, self._version, self._pending = x, lora_a, version_of(x), pending
        return outs[idx]


def can_share_buffer(params: list) -> bool:
    """Parameters that can share one buffer: one dtype, one device, 2-D, equal widths."""
    first = params[0]
    return all(
        p.dtype == first.dtype
        and p.device == first.device
        and p.dim() == 2
        and p.shape[1] == first.shape[1]
        for p in params
    )


def self_contained(p: torch.Tensor) -> bool:
    """A plain float ``nn.Parameter`` that is the whole of its own storage.

    Only such a parameter may be re-pointed into a fused buffer: nothing else can be
    looking at its storage through another tensor (FSDP's flat parameter, a packed buffer),
    and it is not a tensor subclass (DTensor, bitsandbytes' ``Params4bit``/``Int8Params``)
    whose data means more than its values.
    """
    if type(p) is not nn.Parameter or not p.is_floating_point() or p.device.type == "meta":
        return False
    if not p.is_contiguous() or p.storage_offset() != 0:
        return False
    return p.untyped_storage().nbytes() == p.numel() * p.element_size()
