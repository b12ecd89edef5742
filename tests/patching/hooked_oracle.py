"""An independent oracle for patched models: the *unpatched* model with forward hooks.

Every target projection of an unpatched copy gets a forward hook that adds
``s (x A_b) B^T`` to its output, computed with plain ``torch.bmm`` per sample; nothing of
``llmrec_kernels`` runs. Shared by the architecture, quantised and peft tests.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def delta_hooks(
    model: nn.Module, bs: Mapping[str, torch.Tensor], lora_a: torch.Tensor, scaling: float
) -> Iterator[nn.Module]:
    """Inside the block, module ``path`` of ``model`` returns ``out + s (x A_b) B^T``.

    ``bs``: ``{path: B (d_out, r)}``; ``lora_a``: ``(B, d_in, r)``. Computed in the dtype of
    the module's input.
    """

    def hook_for(b: torch.Tensor):
        def add_delta(module, args, out):
            x = args[0]
            a = lora_a.to(x.dtype)
            return out + scaling * torch.bmm(
                torch.bmm(x, a), b.to(x.dtype).T.expand(len(x), -1, -1)
            )

        return add_delta

    handles = [model.get_submodule(p).register_forward_hook(hook_for(b)) for p, b in bs.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


class HookedOracle:
    """``(same precision, float64)`` logits of the hooked unpatched model: the reference and
    the oracle of ``tests/tolerance.py``."""

    def __init__(self, ref: nn.Module, scaling: float):
        self.ref = ref
        self.ref64 = copy.deepcopy(ref).double()
        self.scaling = scaling

    @torch.no_grad()
    def __call__(self, bs, lora_a, input_ids, **kw):
        with delta_hooks(self.ref, bs, lora_a, self.scaling):
            same = self.ref(input_ids, **kw).logits
        bs64 = {k: v.double() for k, v in bs.items()}
        with delta_hooks(self.ref64, bs64, lora_a.double(), self.scaling):
            wide = self.ref64(input_ids, **kw).logits
        return same, wide
