"""The counter-based dropout mask of the LoRA branch (``dropout(x)`` before the shrink).

``fused_cora_linear(..., dropout_p=p, dropout_seed=seed, dropout_offset=offset)`` computes
``S = s * dropout(x) A_b`` with ``dropout(x) = x * keep / (1 - p)``. ``keep`` is a pure
function of ``(seed, offset + element index)`` so the backward regenerates it instead of
storing a ``(B, L, d_in)`` mask (as flash-attention does): element ``(b, l, k)`` of the
logical ``(B, L, K)`` ``x`` has index ``g = offset + (b * L + l) * K + k`` whatever x's
strides.

One Philox4x32-10 call (Triton's ``tl.randint4x(seed, g >> 3)``: counter
``(c_lo, c_hi, 0, 0)``, key ``(seed_lo, seed_hi)``) gives four 32-bit words, that is eight
16-bit values; element ``g`` reads half ``g & 1`` (low first) of word ``(g >> 1) & 3`` and is
kept when that value is at least :func:`keep_threshold` ``= round(p * 2**16)``. Eight
elements per call make the mask 8x cheaper than one call per element, which matters on the
CPU (the torch path computes Philox with int64 tensor arithmetic); 16 bits quantise ``p`` to
``2**-16`` (flash-attention uses 8 bits), and the kept elements are scaled by ``1 / (1 - p)``
of the nominal ``p`` (a relative bias below ``2**-17 / (1 - p)``).
:func:`philox4x` computes the same words in plain PyTorch (int64 arithmetic on uint32
values), so the torch and Triton backends drop the same elements bit for bit;
``tests/ops/test_cora_dropout.py`` checks it against ``tl.randint4x``.

The comparison is on integers, not on ``tl.rand``'s float, so both sides agree exactly.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Union

import torch

__all__ = [
    "call_seed",
    "check_dropout_args",
    "draw_seed",
    "draw_seed_in_graph",
    "dropout_mask",
    "keep_scale",
    "keep_threshold",
    "philox4x",
    "philox_randint",
    "seed_int",
    "seed_key",
]

#: dropout elements per Philox call (4 words of 32 bits, 16 bits per element)
ELEMENTS_PER_CALL = 8

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
MAX_SEED = 2**63 - 1


def philox4x(seed: Union[int, torch.Tensor], counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, counters)`` for int64 ``counters >= 0``: four uint32 words.

    Args:
        seed: ``0 <= seed < 2**63``, an int or a 0-d int64 tensor (the same arithmetic).
        counters: int64 tensor of any shape and device.

    Returns:
        four int64 tensors of ``counters``' shape, values in ``[0, 2**32)``.
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = counters & _M32
    c1 = counters >> 32
    c2 = torch.zeros_like(c0)
    c3 = c2
    for _ in range(10):
        # uint32 x uint32 in int64 wraps modulo 2**64 (two's complement, as ATen's CPU and
        # CUDA kernels compute it), which keeps all 64 bits of the product: its low word is
        # the product's, and the arithmetic shift's high word is right in the low 32 bits.
        # c1 and c3 carry unmasked products, so the new c0 and c2 are masked before they are
        # multiplied: 10 tensor ops a round instead of 22 for a product split in halves.
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        c0 = (prod_b >> 32).bitwise_xor_(c1).bitwise_and_(_M32).bitwise_xor_(k0)
        c2 = (prod_a >> 32).bitwise_xor_(c3).bitwise_and_(_M32).bitwise_xor_(k1)
        c1, c3 = prod_b, prod_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1.bitwise_and_(_M32), c2, c3.bitwise_and_(_M32)


def philox_randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: the first word of :func:`philox4x`."""
    return philox4x(seed, offsets)[0]


def keep_threshold(p: float) -> int:
    """Elements whose 16-bit random value is below this are dropped: ``round(p * 2**16)``."""
    return min(round(p * 2**16), 2**16 - 1)


def keep_scale(p: float) -> float:
    """``1 / (1 - p)``, the factor on kept elements (folded into the shrink's fp32 scale)."""
    return 1.0 / (1.0 - p)


#: CPU masks kept between a forward and its backward (bytes): the torch path's Philox costs
#: about as much as the projection's GEMM on a CPU, so the backward looks its mask up here
#: instead of computing it again (same numbers either way); the GPU kernels regenerate.
CPU_MASK_CACHE_BYTES = 256 * 2**20
_cpu_masks: OrderedDict = OrderedDict()


def dropout_mask(
    shape: tuple[int, int, int],
    p: float,
    seed: Union[int, torch.Tensor],
    offset: int,
    device: torch.device,
) -> torch.Tensor:
    """The keep mask, bool ``shape = (B, L, K)``, of ``dropout(x)`` for a ``(B, L, K)`` x.

    ``seed``: an int, or a 0-d int64 CPU tensor (:func:`draw_seed_in_graph`), read on the
    host in eager code and traced as a graph input under ``torch.compile``.

    On the CPU the most recent masks (up to :data:`CPU_MASK_CACHE_BYTES`) are cached by
    ``(shape, p, seed, offset)``; treat the result as read-only.
    """
    device = torch.device(device)
    if isinstance(seed, torch.Tensor):
        if torch.compiler.is_compiling():
            # traced: the Philox arithmetic becomes part of the compiled graph (fused)
            return _compute_mask(shape, p, seed, offset, device)
        seed = int(seed)
    if device.type != "cpu":
        return _compute_mask(shape, p, seed, offset, device)
    key = (tuple(shape), p, seed, offset)
    mask = _cpu_masks.get(key)
    if mask is not None:
        _cpu_masks.move_to_end(key)
        return mask
    mask = _compute_mask(shape, p, seed, offset, device)
    _cpu_masks[key] = mask
    total = sum(m.numel() for m in _cpu_masks.values())
    while total > CPU_MASK_CACHE_BYTES and len(_cpu_masks) > 1:
        total -= _cpu_masks.popitem(last=False)[1].numel()
    return mask


def _compute_mask(
    shape: tuple[int, int, int],
    p: float,
    seed: Union[int, torch.Tensor],
    offset: int,
    device: torch.device,
) -> torch.Tensor:
    numel = shape[0] * shape[1] * shape[2]
    if numel == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    first, last = offset // ELEMENTS_PER_CALL, (offset + numel - 1) // ELEMENTS_PER_CALL
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox4x(seed, counters), dim=1)  # (calls, 4)
    # element g: word (g >> 1) & 3, half g & 1 (low 16 bits first): the flat order below;
    # the high half is >= t exactly when the word is >= t << 16 (words are below 2**32)
    threshold = keep_threshold(p)
    keep = torch.stack(((words & 0xFFFF) >= threshold, words >= (threshold << 16)), dim=2)
    start = offset - first * ELEMENTS_PER_CALL
    return keep.view(-1)[start : start + numel].view(shape)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: one ``torch.randint`` draw.

    Drawn per call by the patched modules (not a per-module counter): it follows
    ``torch.manual_seed`` and a restored RNG state (resume), and activation checkpointing,
    which restores the CPU RNG state before it recomputes a forward, replays the same seed,
    hence the same mask. Compiled code draws the same value through
    :func:`draw_seed_in_graph` instead (a host int would be a graph break).
    """
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@torch.library.custom_op(
    "llmrec_kernels::draw_dropout_seed",
    mutates_args=(),
    tags=(torch.Tag.nondeterministic_seeded,),
)
def draw_seed_in_graph(x: torch.Tensor, key: int) -> torch.Tensor:
    """:func:`draw_seed` as an op a compiled graph keeps: a 0-d int64 CPU tensor.

    It draws from torch's CPU generator when the graph runs, as eager code would at that
    point, so a compiled model's masks are the eager model's, without a graph break. ``x``
    (the projection's input) orders the draw after the code that made ``x``; ``key`` (a
    constant per projection, e.g. its name's hash) keeps graph passes from merging the
    draws of projections that share ``x`` (common-subexpression elimination sees equal
    arguments, not randomness). The value depends on neither.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


@draw_seed_in_graph.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


def call_seed(x: torch.Tensor, key: int) -> Union[int, torch.Tensor]:
    """The dropout seed of one projection call on ``x`` (any shape and dtype): an int from
    :func:`draw_seed` in eager code, the same draw as a 0-d int64 CPU tensor from
    :func:`draw_seed_in_graph` under ``torch.compile``. ``key``: :func:`seed_key`."""
    if torch.compiler.is_compiling():
        return draw_seed_in_graph(x, key)
    return draw_seed()


def seed_key(path: str) -> int:
    """The :func:`draw_seed_in_graph` key of a projection: a hash of the last part of its
    module path (``q_proj``), the same in every layer, so one compiled layer serves all."""
    return zlib.crc32(path.rsplit(".", 1)[-1].encode()) & 0x7FFFFFFF


def seed_int(seed: Union[int, torch.Tensor]) -> int:
    """A dropout seed as a Python int (reads a tensor seed on the host)."""
    return int(seed) if isinstance(seed, torch.Tensor) else seed


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
            "dropout_p > 0 needs dropout_seed (an int, e.g. llmrec_kernels.dropout.draw_seed(), or"
            " a 0-d int64 CPU tensor):"
            " the backward regenerates the mask from it"
        )
    if isinstance(seed, torch.Tensor):
        # a drawn seed (draw_seed_in_graph); its value is not read here (no graph break)
        if seed.dim() != 0 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise ValueError(
                "a tensor dropout_seed must be a 0-d int64 CPU tensor, got "
                f"{tuple(seed.shape)} {seed.dtype} on {seed.device}"
            )
        seed = 0
    for name, v in (("dropout_seed", seed), ("dropout_offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"{name} must be in [0, 2**63), got {v}")
