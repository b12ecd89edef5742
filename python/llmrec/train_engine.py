"""The training engines under :class:`llmrec.training_loop.Trainer`: the process group of a
``torchrun`` launch, DistributedDataParallel over the trainable parameters, Hugging Face
activation checkpointing, and what a step of several micro-batches counts.

Kept apart from the loop so that the loop stays method- and engine-agnostic: it asks for a
wrapped loss and a summary, nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from llmrec.errors import RunConfigError

__all__ = [
    "DistEnv",
    "enable_gradient_checkpointing",
    "init_distributed",
    "step_summary",
    "wrap_ddp",
]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    gloo on the CPU, nccl on CUDA. A single process returns a trivial :class:`DistEnv`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


class _LossModule(torch.nn.Module):
    """``forward(batch) = model.loss(batch)``: DDP hooks a module's forward, and the loss is
    what a training step runs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)


def wrap_ddp(
    model, params: List[torch.nn.Parameter], device: torch.device, *, static_graph: bool = True
):
    """``model.loss`` under DistributedDataParallel, synchronising only ``params``.

    Every other parameter and every buffer is ignored by DDP: the frozen base model is loaded
    identically by every rank, so it is neither broadcast at construction nor reduced (a 4-bit
    base could not be broadcast at all). ``static_graph``: the trainable set is fixed for the
    wrapper's life (one per training stage), which lets DDP handle a parameter a method leaves
    unused without ``find_unused_parameters``' per-step graph walk; it must be False when
    steps use ``no_sync`` (gradient accumulation: torch 2.13's reducer fails an internal
    assert on a static graph's first step under ``no_sync``), and the graph walk is then on.
    ``params`` are broadcast from rank 0 at construction. Call ``wrapped(batch)`` for the
    loss.
    """
    if not isinstance(model, torch.nn.Module):
        raise RunConfigError(
            f"training under torchrun needs the model to be a torch.nn.Module (DDP), got "
            f"{type(model).__name__}"
        )
    from torch.nn.parallel import DistributedDataParallel

    wrapper = _LossModule(model)
    trainable = {id(p) for p in params}
    ignored = [n for n, p in wrapper.named_parameters() if id(p) not in trainable]
    ignored += [n for n, _ in wrapper.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignored)
    return DistributedDataParallel(
        wrapper,
        device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
        broadcast_buffers=False,
        static_graph=static_graph,
        find_unused_parameters=not static_graph,
    )


def enable_gradient_checkpointing(model) -> int:
    """Turn on Hugging Face activation checkpointing (``use_reentrant=False``: no input must
    require grad, and the frozen embeddings need none) in every Hugging Face model inside
    ``model``; returns how many were switched on. Raises :class:`RunConfigError` if none.

    transformers 5 names it ``activation_checkpointing_enable`` (the older
    ``gradient_checkpointing_enable`` warns there); 4.x has only the older name.
    """
    switched = 0
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    for m in modules:
        if not getattr(m, "supports_gradient_checkpointing", False):
            continue  # not a Hugging Face model (or one that cannot)
        new = callable(getattr(m, "activation_checkpointing_enable", None))
        on = "is_activation_checkpointing" if new else "is_gradient_checkpointing"
        if getattr(m, on, False):
            continue  # inside a model already switched on
        kwargs = {"use_reentrant": False}
        if new:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif callable(getattr(m, "gradient_checkpointing_enable", None)):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            continue
        switched += 1
    if not switched:
        raise RunConfigError(
            "--gradient-checkpointing: the model holds no Hugging Face model that supports "
            "gradient checkpointing"
        )
    return switched


def batch_rows(batch: Dict[str, Any]) -> int:
    return next((len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim), 0)


def step_summary(batches: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What :func:`step_record` counts of an optimizer step's micro-batches: their tokens
    (attention mask ones) or rows."""
    if len(batches) == 1:
        return batches[0]
    masks = [b.get("attention_mask") for b in batches]
    if all(torch.is_tensor(m) for m in masks):
        return {"attention_mask": torch.stack([m.sum() for m in masks])}
    return {"rows": torch.empty(sum(batch_rows(b) for b in batches))}
