"""The counter-based dropout mask of the LoRA branch (``dropout(x)`` before the shrink).

``fused_cora_linear(..., dropout_p=p, dropout_seed=seed, dropout_offset=offset)`` computes
``S = s * dropout(x) A_b`` with ``dropout(x) = x * keep / (1 - p)``. ``keep`` is a pure
function of ``(seed, offset + element index)`` so the backward regenerates it instead of
storing a ``(B, L, d_in)`` mask (as flash-attention does): element ``(b, l, k)`` of the
logical ``(B, L, K)`` ``x`` has index ``(b * L + l) * K + k`` whatever x's strides, and is
kept when the top 31 bits of Triton's ``tl.randint(seed, offset + index)`` (Philox4x32-10, first
output word; counter ``(index_lo, index_hi, 0, 0)``, key ``(seed_lo, seed_hi)``) are at least
:func:`keep_threshold`. :func:`philox_randint` computes the same numbers in plain PyTorch
(int64 arithmetic on uint32 values), so the torch and Triton backends drop the same elements
bit for bit; ``tests/ops/test_cora_dropout.py`` checks it against ``tl.randint``.

The comparison is on integers, not on ``tl.rand``'s float, so both sides agree exactly.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_dropout_args",
    "draw_seed",
    "dropout_mask",
    "keep_scale",
    "keep_threshold",
    "philox_randint",
]

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
MAX_SEED = 2**63 - 1


def _mulhilo(const: int, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit halves of ``const * v`` for uint32 values held in int64.

    The 64-bit product overflows int64, so ``const`` is split into 16-bit halves: both partial
    products stay below 2**48.
    """
    p1 = v * (const & 0xFFFF)
    p2 = v * (const >> 16)
    hi = ((p1 >> 16) + p2) >> 16
    lo = (p1 + ((p2 & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)`` for int64 ``offsets >= 0``: uint32 values in int64.

    Args:
        seed: ``0 <= seed < 2**63``.
        offsets: int64 tensor of any shape and device.

    Returns:
        int64 tensor of ``offsets``' shape, values in ``[0, 2**32)``.
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = c2
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def keep_threshold(p: float) -> int:
    """Elements whose 31-bit random value is below this are dropped: ``round(p * 2**31)``."""
    return min(round(p * 2**31), 2**31 - 1)


def keep_scale(p: float) -> float:
    """``1 / (1 - p)``, the factor on kept elements (folded into the shrink's fp32 scale)."""
    return 1.0 / (1.0 - p)


def dropout_mask(
    shape: tuple[int, int, int], p: float, seed: int, offset: int, device: torch.device
) -> torch.Tensor:
    """The keep mask, bool ``shape = (B, L, K)``, of ``dropout(x)`` for a ``(B, L, K)`` x."""
    numel = shape[0] * shape[1] * shape[2]
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return ((philox_randint(seed, idx) >> 1) >= keep_threshold(p)).view(shape)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: one ``torch.randint`` draw.

    Drawn per call by the patched modules (not a per-module counter): it follows
    ``torch.manual_seed`` and a restored RNG state (resume), and activation checkpointing,
    which restores the CPU RNG state before it recomputes a forward, replays the same seed,
    hence the same mask. Under ``torch.compile`` the draw is a graph break.
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def check_dropout_args(p: object, seed: object, offset: object) -> None:
    """Validate ``dropout_p``, ``dropout_seed``, ``dropout_offset``; raise a clear error."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p == 0:
        return
    if seed is None:
        raise ValueError(
            "dropout_p > 0 needs dropout_seed (an int; e.g. llmrec_kernels.dropout.draw_seed()):"
            " the backward regenerates the mask from it"
        )
    for name, v in (("dropout_seed", seed), ("dropout_offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"{name} must be in [0, 2**63), got {v}")
