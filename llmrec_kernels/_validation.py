"""Argument checks shared by the public ops: clear errors that name the argument and shape.

The checks run on every call, so the common case (valid arguments) is decided by one cheap
predicate, :func:`_valid_fast`, of plain attribute reads and comparisons (about a
microsecond); only when it fails are the detailed checks run, to raise the error that names
the argument. With ``LLMREC_KERNELS_DEBUG=1`` (read at import) the detailed checks always run.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPE_SET = frozenset(_FLOAT_DTYPES)
DEBUG = os.environ.get("LLMREC_KERNELS_DEBUG", "0") == "1"
_Tensor = torch.Tensor


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, t: object, allow_none: bool = False) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def _valid_fast(x, weight, lora_a, lora_b, bias, scaling) -> bool:
    """True when the arguments are certainly valid (the same rules as the detailed checks)."""
    if not (
        isinstance(x, _Tensor)
        and isinstance(weight, _Tensor)
        and isinstance(lora_a, _Tensor)
        and isinstance(lora_b, _Tensor)
        and (type(scaling) is float or type(scaling) is int)
    ):
        return False
    xs, ws, as_, bs = x.shape, weight.shape, lora_a.shape, lora_b.shape
    nx, na = len(xs), len(as_)
    if nx != 2 and nx != 3:
        return False
    d_in = xs[-1]
    if len(ws) != 2 or ws[1] != d_in:
        return False
    if na == 3:
        if as_[0] != xs[0] or as_[1] != d_in:
            return False
    elif na != 2 or as_[0] != d_in:
        return False
    rank = as_[-1]
    if rank < 1 or len(bs) != 2 or bs[0] != ws[0] or bs[1] != rank:
        return False
    dt = x.dtype
    if (
        weight.dtype != dt
        or dt not in _FLOAT_DTYPE_SET
        or lora_a.dtype not in _FLOAT_DTYPE_SET
        or lora_b.dtype not in _FLOAT_DTYPE_SET
    ):
        return False
    dev = x.device
    if lora_a.device != dev or weight.device != dev or lora_b.device != dev:
        return False
    if bias is not None:
        if not isinstance(bias, _Tensor) or bias.dtype not in _FLOAT_DTYPE_SET:
            return False
        bsh = bias.shape
        if len(bsh) != 1 or bsh[0] != ws[0] or bias.device != dev:
            return False
    return True


def check_cora_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
) -> None:
    """Validate the arguments of ``fused_cora_linear``; raise ``TypeError``/``ValueError``."""
    if not DEBUG and _valid_fast(x, weight, lora_a, lora_b, bias, scaling):
        return
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_tensor("lora_a", lora_a)
    _check_tensor("lora_b", lora_b)
    _check_tensor("bias", bias, allow_none=True)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")

    if x.dim() not in (2, 3):
        raise ValueError(
            f"x must be (B, L, d_in) or (B, d_in), got a {x.dim()}-D tensor of shape {_shape(x)}"
        )
    batch, d_in = x.shape[0], x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(
            f"weight must be (d_out, d_in) = (d_out, {d_in}) to match x's last dimension, "
            f"got {_shape(weight)}"
        )
    d_out = weight.shape[0]
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}; "
            f"cast one of them (e.g. weight.to(x.dtype))"
        )
    if lora_a.dim() == 3:
        if lora_a.shape[0] != batch or lora_a.shape[1] != d_in:
            raise ValueError(
                f"lora_a must be (B, d_in, r) = ({batch}, {d_in}, r) with one A per sample of x, "
                f"or (d_in, r) = ({d_in}, r) shared by all samples; got {_shape(lora_a)}"
            )
    elif lora_a.dim() == 2:
        if lora_a.shape[0] != d_in:
            raise ValueError(
                f"lora_a must be (d_in, r) = ({d_in}, r) when shared by all samples, "
                f"or (B, d_in, r) = ({batch}, {d_in}, r); got {_shape(lora_a)}"
            )
    else:
        raise ValueError(
            f"lora_a must be (B, d_in, r) or (d_in, r), got a {lora_a.dim()}-D tensor "
            f"of shape {_shape(lora_a)}"
        )
    rank = lora_a.shape[-1]
    if rank < 1:
        raise ValueError(f"the rank r (last dimension of lora_a) must be >= 1, got {rank}")
    if lora_b.dim() != 2 or lora_b.shape[0] != d_out or lora_b.shape[1] != rank:
        raise ValueError(
            f"lora_b must be (d_out, r) = ({d_out}, {rank}) (nn.Linear(r, d_out).weight layout), "
            f"got {_shape(lora_b)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d_out):
        raise ValueError(f"bias must be (d_out,) = ({d_out},), got {_shape(bias)}")

    device = x.device
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(
                f"all tensors must be on one device: x is on {device} but {name} is on {t.device}"
            )
