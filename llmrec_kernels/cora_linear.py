"""``fused_cora_linear``: a linear layer with a per-sample low-rank delta (CoRA).

``y = x W^T + bias + scaling * (x A_b) B^T`` where every sample ``b`` of the batch has its own
``A_b`` (or one ``A`` is shared, which is plain LoRA). The dense ``W + scaling * B A_b^T`` is
never formed.

The op is registered with ``torch.library.custom_op`` as two ops, ``llmrec_kernels::
cora_linear_forward`` and ``llmrec_kernels::cora_linear_backward``, with fake (meta)
implementations and an autograd formula, so it works under ``torch.compile(fullgraph=True)``
and passes ``torch.library.opcheck``. The backend (Triton, CUDA or PyTorch) is resolved in
Python before the op is called; see :mod:`llmrec_kernels.backends`.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmrec_kernels import _torch_impl
from llmrec_kernels._validation import check_cora_linear_args
from llmrec_kernels.backends import resolve_backend

__all__ = ["fused_cora_linear"]


def _impl(backend: str):
    if backend == "triton":
        from llmrec_kernels.triton import cora_linear as triton_impl

        return triton_impl
    if backend == "cuda":
        from llmrec_kernels import _cuda_impl

        return _cuda_impl
    return _torch_impl


@torch.library.custom_op("llmrec_kernels::cora_linear_forward", mutates_args=())
def _cora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(B, L, d_in)`` -> ``(y (B, L, d_out) in x.dtype, s = scaling * x A (B, L, r))``.

    ``s`` is fp32 (fp64 for fp64 inputs) and is kept for the backward.
    """
    return _impl(backend).forward(x, weight, lora_a, lora_b, bias, scaling)


@_cora_linear_forward.register_fake
def _(x, weight, lora_a, lora_b, bias, scaling, backend):
    batch, length, _ = x.shape
    y = x.new_empty((batch, length, weight.shape[0]))
    s = x.new_empty((batch, length, lora_a.shape[-1]), dtype=_torch_impl.s_dtype(x.dtype))
    return y, s


@torch.library.custom_op("llmrec_kernels::cora_linear_backward", mutates_args=())
def _cora_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s_scaled: torch.Tensor,
    scaling: float,
    backend: str,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dA, dB)`` of the forward; a gradient not asked for is an empty tensor."""
    dx, da, db = _impl(backend).backward(
        dy, x, weight, lora_a, lora_b, s_scaled, scaling, need_dx, need_da, need_db
    )
    # The outputs of a custom op may not alias each other: a backend may hand back one shared
    # empty tensor for every gradient not asked for, so each gets its own here.
    return (
        dx if need_dx else x.new_empty(0),
        da if need_da else x.new_empty(0),
        db if need_db else x.new_empty(0),
    )


@_cora_linear_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, s_scaled, scaling, backend, need_dx, need_da, need_db):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_da else x.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_db else x.new_empty(0)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, backend = inputs
    _, s_scaled = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s_scaled)
    ctx.scaling = scaling
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _ds_unused):
    x, weight, lora_a, lora_b, s_scaled = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
    dx = dw = da = db = dbias = None
    if need_dx or need_da or need_db:
        dx, da, db = _cora_linear_backward(
            dy, x, weight, lora_a, lora_b, s_scaled, ctx.scaling, ctx.backend,
            need_dx, need_da, need_db,
        )  # fmt: skip
        dx = dx if need_dx else None
        da = da if need_da else None
        db = db if need_db else None
    if need_dw:
        # The frozen-weight gradient is rare (full fine-tuning); plain PyTorch is enough.
        dw = dy.reshape(-1, dy.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])
    if need_dbias:
        acc_dtype = torch.promote_types(dy.dtype, torch.float32)
        dbias = dy.sum(dim=(0, 1), dtype=acc_dtype).to(ctx.bias_dtype)
    return dx, dw, da, db, dbias, None, None


_cora_linear_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_cora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear layer with a per-sample low-rank delta, ``x W^T + bias + scaling (x A) B^T``.

    Args:
        x: ``(B, L, d_in)``; or ``(B, d_in)`` for one token per sample. float16, bfloat16,
            float32 (float64 on the ``"torch"`` backend). Any strides.
        weight: ``(d_out, d_in)``, ``nn.Linear`` layout, same dtype as ``x``; usually frozen.
        lora_a: ``(B, d_in, r)``, one A per sample (CoRA); or ``(d_in, r)``, one A shared by
            all samples (plain LoRA). Any floating dtype; computed in the dtype of ``x``.
        lora_b: ``(d_out, r)``, the ``nn.Linear(r, d_out).weight`` layout, shared by all samples.
        bias: ``(d_out,)`` or ``None``.
        scaling: the LoRA scale ``alpha / r``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"`` (see
            :mod:`llmrec_kernels.backends`; ``LLMREC_KERNELS_BACKEND`` sets the default).

    Returns:
        ``(B, L, d_out)`` (``(B, d_out)`` for 2-D ``x``) in the dtype of ``x``. Differentiable
        in ``x``, ``lora_a``, ``lora_b``, ``bias`` and, when it requires grad, ``weight``.
        The low-rank intermediate ``x A`` and every accumulation are kept in fp32.

    Raises:
        TypeError: a non-tensor, an integer dtype, or ``weight`` in another dtype than ``x``.
        ValueError: mismatched shapes, tensors on different devices, an unknown backend.
    """
    check_cora_linear_args(x, weight, lora_a, lora_b, bias, scaling)
    concrete = resolve_backend(backend, x.device, x.dtype, lora_a.shape[-1])
    one_token = x.dim() == 2
    x3 = x.unsqueeze(1) if one_token else x
    y, _ = _cora_linear_forward(x3, weight, lora_a, lora_b, bias, float(scaling), concrete)
    return y.squeeze(1) if one_token else y
