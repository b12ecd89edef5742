"""A decode step of the CoRA projection that CUDA graphs can capture (issue 25 item 2).

:func:`cora_linear_decode` computes what :func:`llmrec_kernels.fused_cora_linear` computes,
for inference, into a caller's ``out`` with a caller's ``workspace``
(:func:`decode_workspace`): the base product on cuBLAS, the shrink ``x A`` (split over K on
the Triton backend) and one expand-add. Given both buffers it allocates nothing, reads
nothing back to the host and its launches depend on the shapes alone, so a
``torch.cuda.CUDAGraph`` captures it and replays it on new values copied into the same
inputs. ``tests/ops/test_decode_graphs.py`` checks the ATen ops of a call under a dispatch
mode (no host read-back, no allocation) on the CPU, and the capture on a GPU.

Backends: ``"torch"`` (``mm``/``addmm`` into ``out``, ``bmm`` into the workspace,
``addmm_`` of the expand into ``out``; any device) and ``"triton"`` (cuBLAS base, the split-K
shrink and the Triton expand-add that sums the partials: :mod:`llmrec_kernels.triton.decode`).
``"auto"`` resolves as for :func:`~llmrec_kernels.fused_cora_linear`; ``"cuda"`` has no
decode path and is refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmrec_kernels._validation import check_cora_linear_args
from llmrec_kernels.backends import CONCRETE_BACKENDS, resolve_backend

__all__ = ["cora_linear_decode", "decode_workspace"]


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.dim() == 2 else x


def _resolve(backend: str, x: torch.Tensor, lora_a: torch.Tensor) -> str:
    x3 = _as_3d(x)
    concrete = backend  # a backend without a decode path is refused before its own checks
    if not (isinstance(backend, str) and backend.lower() in _NO_DECODE_PATH):
        concrete = resolve_backend(
            backend, x.device, x.dtype, lora_a.shape[-1], x3.shape[0] * x3.shape[1], x3.shape[1]
        )
    if concrete not in _DECODE_PATHS:
        raise ValueError(
            f"backend={concrete!r} has no decode path; use backend='torch' or 'triton' "
            "(or fused_cora_linear)"
        )
    return concrete


def decode_workspace(
    x: torch.Tensor, lora_a: torch.Tensor, backend: str = "auto", k_split: Optional[int] = None
) -> torch.Tensor:
    """The workspace :func:`cora_linear_decode` needs for inputs shaped like ``x`` and
    ``lora_a`` on ``backend``: made once, outside a captured region, and reused.

    ``x``: ``(B, d_in)`` or ``(B, L, d_in)``; ``lora_a``: ``(B, d_in, r)`` or ``(d_in, r)``.
    Returns a 1-D tensor on x's device: ``B * L * r`` elements in x's dtype (torch backend),
    or the split-K partials' fp32 elements (Triton backend). ``k_split``: as
    :func:`cora_linear_decode`'s.
    """
    numel, dtype = _DECODE_PATHS[_resolve(backend, x, lora_a)][0](_as_3d(x), lora_a, k_split)
    return torch.empty(numel, dtype=dtype, device=x.device)


def _check_buffers(x3, weight, out, workspace, need: int, ws_dtype: torch.dtype) -> None:
    want = (*x3.shape[:2], weight.shape[0])
    if tuple(out.shape[-1:]) != want[-1:] or out.numel() != want[0] * want[1] * want[2]:
        raise ValueError(f"out must hold (B, L, d_out) = {want} elements, got {tuple(out.shape)}")
    if out.dtype != x3.dtype or out.device != x3.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {x3.dtype} tensor on {x3.device}, got a "
            f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} one on {out.device}"
        )
    if (
        workspace.dtype != ws_dtype or workspace.device != x3.device
        or not workspace.is_contiguous() or workspace.numel() < need
    ):  # fmt: skip
        raise ValueError(
            f"workspace must be a contiguous {ws_dtype} tensor on {x3.device} of at least "
            f"{need} elements (decode_workspace makes one), got {workspace.dtype} "
            f"{tuple(workspace.shape)} on {workspace.device}"
        )


def _torch_workspace(x3, lora_a, k_split) -> tuple[int, torch.dtype]:
    return x3.shape[0] * x3.shape[1] * lora_a.shape[-1], x3.dtype


def _triton_workspace(x3, lora_a, k_split) -> tuple[int, torch.dtype]:
    from llmrec_kernels.triton import decode as triton_decode

    return triton_decode.workspace_numel(x3, lora_a, k_split), torch.float32


def _triton_decode(x3, weight, lora_a, lora_b, bias, scaling, out, workspace, k_split) -> None:
    from llmrec_kernels.triton import decode as triton_decode

    if bias is not None and bias.dtype is not x3.dtype:
        bias = bias.to(x3.dtype)
    triton_decode.forward_into(x3, weight, lora_a, lora_b, bias, scaling, out, workspace, k_split)


def _torch_decode(x3, weight, lora_a, lora_b, bias, scaling, out, workspace, k_split) -> None:
    batch, length, k = x3.shape
    rows, n, rank = batch * length, weight.shape[0], lora_a.shape[-1]
    dt = x3.dtype
    # Casts only where the dtypes differ (each one allocates; the capturable use passes
    # A, B and the bias in x's dtype).
    a = lora_a if lora_a.dtype is dt else lora_a.to(dt)
    b = lora_b if lora_b.dtype is dt else lora_b.to(dt)
    if bias is not None and bias.dtype is not dt:
        bias = bias.to(dt)
    x2 = x3.view(rows, k) if x3.is_contiguous() else x3.reshape(rows, k)
    out2 = out.view(rows, n)
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)
    shrunk = workspace[: rows * rank].view(batch, length, rank)
    if a.dim() == 3:
        torch.bmm(x3, a, out=shrunk)
    else:
        torch.mm(x2, a, out=shrunk.view(rows, rank))
    out2.addmm_(shrunk.view(rows, rank), b.t(), alpha=scaling)


def cora_linear_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    *,
    out: Optional[torch.Tensor] = None,
    workspace: Optional[torch.Tensor] = None,
    backend: str = "auto",
    k_split: Optional[int] = None,
) -> torch.Tensor:
    """``x W^T + bias + scaling (x A_b) B^T`` for inference, into ``out``: a capturable step.

    Args:
        x, weight, lora_a, lora_b, bias, scaling: as :func:`llmrec_kernels.fused_cora_linear`
            (``x`` ``(B, d_in)`` or ``(B, L, d_in)``, any L; meant for decode).
        out: ``(B, d_out)`` / ``(B, L, d_out)`` (any shape with those elements), contiguous,
            x's dtype and device; written in place and returned. ``None``: allocated.
        workspace: from :func:`decode_workspace` (same backend, same shapes); ``None``:
            allocated. With ``out`` and ``workspace`` given and ``A``, ``B`` and the bias in
            x's dtype, the call allocates nothing (a Triton call at a rank that is not a
            multiple of 16 copies A and B zero-padded).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        k_split: Triton backend: K elements per split of the shrink instead of the
            dispatcher's choice (tests and benchmarks); must be the one the workspace was
            made for.

    Returns:
        ``out``. No autograd: raises ``ValueError`` when a gradient would be needed.

    Raises:
        TypeError, ValueError: as :func:`~llmrec_kernels.fused_cora_linear`; wrong ``out`` or
            ``workspace`` buffers; the ``"cuda"`` backend.
    """
    check_cora_linear_args(x, weight, lora_a, lora_b, bias, scaling)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, bias)
    ):
        raise ValueError(
            "cora_linear_decode is inference-only (no autograd); call it under "
            "torch.no_grad() / inference_mode(), or use fused_cora_linear for training"
        )
    concrete = _resolve(backend, x, lora_a)
    x3 = _as_3d(x)
    if workspace is None:
        workspace = decode_workspace(x, lora_a, concrete, k_split)
    if out is None:
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    sizes, run = _DECODE_PATHS[concrete]
    _check_buffers(x3, weight, out, workspace, *sizes(x3, lora_a, k_split))
    run(x3, weight, lora_a, lora_b, bias, float(scaling), out, workspace, k_split)
    return out


# backend -> (workspace (elements, dtype) for (x3, lora_a, k_split), the step itself)
_DECODE_PATHS = {
    "torch": (_torch_workspace, _torch_decode),
    "triton": (_triton_workspace, _triton_decode),
}
_NO_DECODE_PATH = frozenset(CONCRETE_BACKENDS) - _DECODE_PATHS.keys()
