"""Plain LoRA with one ``A`` shared by the batch, through the fused CoRA op.

CoLLM (and any method that tunes an LLM with ordinary LoRA) patches projections with
:class:`LoRALinear`: ``y = x W^T + b + s B A dropout(x)``, ``s = alpha / r``, with peft's
parameter names and layouts (``lora_A.weight`` ``(r, d_in)``, ``lora_B.weight``
``(d_out, r)``). Every call is :func:`fused_cora_linear` with the same ``A^T`` for every
sample, so the base GEMM and the low-rank update share one kernel; while a module trains with
dropout > 0 the op's own LoRA dropout (``dropout_p``) makes the low-rank branch read
``dropout(x)`` and the base GEMM ``x``, as peft's unfused layer does (a different, counter-based
mask stream than ``nn.Dropout``'s). The modules to patch are found as :func:`llmrec_kernels.hf.apply_cora_to_llama` finds them
(:func:`llmrec_kernels.hf_targets.find_linear_modules`).

A quantised base (bitsandbytes ``Linear4bit``/``Linear8bitLt``, QLoRA-style) or any other
linear-like module that is not a plain float ``nn.Linear`` keeps its own ``forward`` for the
base product, as the child ``base_layer``, and the LoRA term is added to it
(:func:`llmrec_kernels.hf.lowrank_delta`); its weights are never touched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from llmrec_kernels.cora_linear import fused_cora_linear
from llmrec_kernels.dropout import call_seed, seed_key
from llmrec_kernels.hf import lowrank_delta, run_eagerly
from llmrec_kernels.hf_targets import (
    adopt_base,
    default_lora_dtype,
    device_of,
    find_linear_modules,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LoRALinear",
    "apply_lora",
    "lora_modules",
    "lora_parameters",
    "remove_lora",
]

DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus LoRA, ``x W^T + b + s B A dropout(x)``, s = alpha / r.

    For a plain float ``nn.Linear`` base, ``weight`` / ``bias`` are the original parameters
    (same objects); any other linear-like base (quantised, wrapped) is kept as the child
    ``base_layer`` and computes ``base_layer(x) + s B A dropout(x)``. ``lora_A.weight``
    ``(r, d_in)`` (Kaiming-uniform, as peft) and ``lora_B.weight`` ``(d_out, r)`` (zeros)
    train. The call is ``fused_cora_linear(x, W, A^T, B, b, s)`` with A shared by every
    sample; in training mode with ``dropout > 0`` it passes ``dropout_p`` and one seed per
    call drawn from torch's CPU generator (:func:`llmrec_kernels.dropout.draw_seed`: follows
    ``torch.manual_seed``, resume and activation checkpointing's RNG replay; compiled, the
    same draw is an op of the graph).
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.05,
        backend: str = "auto",
        path: str = "",
    ):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        adopt_base(self, base, path or "LoRA target")
        lora_dtype = default_lora_dtype(base)
        device = device_of(base)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(
            rank, self.out_features, bias=False, device=device, dtype=lora_dtype
        )
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        # Kept for peft's module tree and repr; the fused op applies the dropout itself.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = float(alpha) / rank
        self.backend = backend
        self.path = path
        self._seed_key = seed_key(path)
        if not self.wraps_module:
            # the original module, kept out of the module tree (its parameters are ours already)
            self.__dict__["base_layer"] = base

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout_p:g}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            lead = x.shape[:-1]
            y = self.forward(x.reshape(-1, x.shape[-1]))
            return y.reshape(*lead, self.out_features)
        if (
            self.wraps_module
            and self.training
            and self.dropout_p > 0
            and torch.compiler.is_compiling()
        ):
            return run_eagerly(self._project, x)  # plain-PyTorch mask from a host seed
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        dropout = {}
        if self.training and self.dropout_p > 0:
            dropout = {"dropout_p": self.dropout_p, "dropout_seed": call_seed(x, self._seed_key)}
        if self.wraps_module:
            y = self.base_layer(x)
            delta = lowrank_delta(
                x, self.lora_A.weight.t(), self.lora_B.weight, self.scaling, **dropout
            )
            return y + delta.to(y.dtype)
        return fused_cora_linear(
            x,
            self.weight,
            self.lora_A.weight.t(),
            self.lora_B.weight,
            self.bias,
            scaling=self.scaling,
            backend=self.backend,
            **dropout,
        )


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    backend: str = "auto",
    seed: Optional[int] = None,
) -> Dict[str, LoRALinear]:
    """Replace every linear projection named in ``target_modules`` by a :class:`LoRALinear`.

    ``nn.Linear`` targets and linear-like ones (a bitsandbytes quantised linear: QLoRA) are
    accepted; every target is checked, and its LoRA module built, before ``model`` is changed.
    Then freezes every parameter of ``model``; returns ``{path: LoRALinear}``. ``seed``
    makes the ``lora_A`` initialisation reproducible without touching the global RNG.

    Raises:
        ValueError: no module named one of ``target_modules``, or a bad rank/dropout.
        TypeError: a target that is not a linear projection.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = find_linear_modules(model, tuple(target_modules))
    out: Dict[str, LoRALinear] = {}
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        for _, _, child, full in targets:
            out[full] = LoRALinear(child, rank, alpha, dropout, backend, full)
    model.requires_grad_(False)
    for parent, name, _, full in targets:
        setattr(parent, name, out[full])
    return out


def lora_modules(model: nn.Module) -> Dict[str, LoRALinear]:
    """``{path: LoRALinear}`` of every module :func:`apply_lora` patched."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(
    modules: Mapping[str, LoRALinear], prefix: str = "llm."
) -> Dict[str, nn.Parameter]:
    """``{prefix + path + ".lora_A.weight" / ".lora_B.weight": parameter}`` of ``modules``
    (as :func:`apply_lora` returns them): the state-dict names a model holding the LLM as
    ``llm`` saves its LoRA factors under."""
    out: Dict[str, nn.Parameter] = {}
    for path, m in modules.items():
        out[f"{prefix}{path}.lora_A.weight"] = m.lora_A.weight
        out[f"{prefix}{path}.lora_B.weight"] = m.lora_B.weight
    return out


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original ``nn.Linear`` modules back (the LoRA factors are dropped)."""
    for path, m in list(lora_modules(model).items()):
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        setattr(parent, path.rsplit(".", 1)[-1], m.base_layer)
    return model
