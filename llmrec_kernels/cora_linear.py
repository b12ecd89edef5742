"""``fused_cora_linear``: a linear layer with a per-sample low-rank delta (CoRA).

``y = x W^T + bias + scaling * (x A_b) B^T`` where every sample ``b`` of the batch has its own
``A_b`` (or one ``A`` is shared, which is plain LoRA). The dense ``W + scaling * B A_b^T`` is
never formed.

The op is registered with ``torch.library.custom_op`` as two ops, ``llmrec_kernels::
cora_linear_fwd`` and ``llmrec_kernels::cora_linear_bwd``, with fake (meta)
implementations and an autograd formula, so it works under ``torch.compile(fullgraph=True)``
and passes ``torch.library.opcheck``. The dropout seed is a tensor argument (compiled graphs
draw it: :mod:`llmrec_kernels.dropout`). The ops take a new name whenever their arguments
change: Inductor's on-disk cache would otherwise replay calls with the old arguments. The
backend (Triton, CUDA or PyTorch) is resolved in Python before the op is called; see
:mod:`llmrec_kernels.backends`.

Host cost: the custom-op dispatcher costs tens of microseconds per call, more than the maths
of a decode step on the torch backend. When nothing can observe the op (no input needs a
gradient, not under ``torch.compile``/``torch.export``, no ``torch.func`` transform, no
``__torch_function__`` subclass) the backend's forward is called directly: the same function
the op would run, so the result is identical. Eager calls that need a gradient skip the
dispatcher too, through :class:`_CoraLinearEager`, an ``autograd.Function`` over the same
backend functions (bit for bit the op's results; about 150 us less per forward + backward
on a CPU). Under ``torch.autocast`` the op behaves as ``F.linear`` does: ``x``, ``W`` and the
bias are cast to the autocast dtype and the op runs in it (:func:`_autocast_cast`).

:func:`fused_cora_linear_multi` computes several projections that share ``x`` and ``A``
(fused q/k/v) in one call and gives each output its own gradient, so the backward never
concatenates the outputs' gradients; on the torch backend their low-rank gradients are summed
before they meet ``A`` (:func:`llmrec_kernels._torch_impl.backward_multi`).

LoRA dropout: ``dropout_p > 0`` makes the shrink read ``dropout(x)`` (``S = s dropout(x) A``;
the base GEMM still reads ``x``) with a counter-based mask that the backward regenerates from
``(dropout_seed, dropout_offset)`` (:mod:`llmrec_kernels.dropout`); the torch and Triton
backends drop the same elements. The CUDA backend has no dropout and refuses it. ``dropout_p
= 0`` (the default) is the op without dropout, with no extra work on any path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from llmrec_kernels import _multi, _torch_impl
from llmrec_kernels._validation import check_cora_linear_args
from llmrec_kernels.backends import get_backend, resolve_backend
from llmrec_kernels.dropout import check_dropout_args, seed_int

__all__ = ["fused_cora_linear", "fused_cora_linear_multi"]


_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function
# One cheap test per call; the public functions handle autocast themselves (_autocast_cast).
_any_autocast = getattr(
    torch._C,
    "_is_any_autocast_enabled",
    lambda: torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled(),
)
_functorch_active = torch._C._are_functorch_transforms_active


def _needs_grad(tensors: tuple) -> bool:
    """True when autograd will record a call on ``tensors`` (``None`` entries are skipped)."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def _direct_call_ok(tensors: tuple) -> bool:
    """True when calling the backend directly is indistinguishable from calling the op.

    ``tensors`` holds every tensor argument (``None`` for a missing bias is fine).
    """
    if _is_compiling() or _functorch_active() or _has_torch_function(tensors):
        return False
    return not _needs_grad(tensors)


def _forward_no_grad(
    backend, x, weight, lora_a, lora_b, bias, scaling, dropout=None
) -> torch.Tensor:
    """``y`` straight from the backend, for calls that :func:`_direct_call_ok` allows (no
    ``S`` is kept: a backend that needs none for ``y`` skips making it)."""
    return get_backend(backend).forward(x, weight, lora_a, lora_b, bias, scaling, False, dropout)[0]


def _dropout_spec(
    dropout_p: float, dropout_seed: Optional[torch.Tensor], dropout_offset: int
) -> Optional[tuple]:
    """The backends' ``dropout`` argument: ``None`` (no dropout) or ``(p, seed, offset)``
    with an int seed (the custom ops carry it as a 0-d tensor, read here, inside the op)."""
    if dropout_p > 0:
        return (dropout_p, seed_int(dropout_seed), dropout_offset)
    return None


def _op_dropout(dropout: tuple) -> tuple:
    """``(p, seed, offset)`` as the custom ops take it: the seed a 0-d int64 CPU tensor (a
    value a compiled graph passes along, not a constant it specialises on)."""
    if not dropout:
        return ()
    p, seed, offset = dropout
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    return (p, seed, offset)


def _eager_dropout(dropout: tuple) -> Optional[tuple]:
    """``(p, seed, offset)`` with an int seed for the backends called directly."""
    if not dropout:
        return None
    p, seed, offset = dropout
    return (p, seed_int(seed), offset)


def _check_dropout(dropout_p, dropout_seed, dropout_offset, backend: str) -> None:
    check_dropout_args(dropout_p, dropout_seed, dropout_offset)
    if dropout_p > 0 and not get_backend(backend).HAS_DROPOUT:
        raise ValueError(
            f"the {backend.upper()} backend has no LoRA dropout (dropout_p > 0); use "
            "backend='triton' or 'torch', or dropout_p=0"
        )


@torch.library.custom_op("llmrec_kernels::cora_linear_fwd", mutates_args=())
def _cora_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    backend: str,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    dropout_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(B, L, d_in)`` -> ``(y (B, L, d_out) in x.dtype, s = scaling * x A (B, L, r))``.

    ``s`` is fp32 (fp64 for fp64 inputs) and is kept for the backward; with dropout it is
    ``scaling * dropout(x) A``.
    """
    return _backend_forward(
        x, weight, lora_a, lora_b, bias, scaling, backend, dropout_p, dropout_seed, dropout_offset
    )


def _backend_forward(
    x, weight, lora_a, lora_b, bias, scaling, backend, dropout_p=0.0, dropout_seed=None,
    dropout_offset=0,
):  # fmt: skip
    """The body of ``cora_linear_fwd``, callable without the custom-op dispatcher."""
    dropout = _dropout_spec(dropout_p, dropout_seed, dropout_offset)
    return get_backend(backend).forward(x, weight, lora_a, lora_b, bias, scaling, True, dropout)


@_cora_linear_forward.register_fake
def _(x, weight, lora_a, lora_b, bias, scaling, backend, dropout_p=0.0, dropout_seed=None,
      dropout_offset=0):  # fmt: skip
    batch, length, _ = x.shape
    y = x.new_empty((batch, length, weight.shape[0]))
    s = x.new_empty((batch, length, lora_a.shape[-1]), dtype=_torch_impl.s_dtype(x.dtype))
    return y, s


@torch.library.custom_op("llmrec_kernels::cora_linear_bwd", mutates_args=())
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
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    dropout_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dA, dB)`` of the forward; a gradient not asked for is an empty tensor.

    The dropout arguments are the forward's: the mask is regenerated from them.
    """
    return _backend_backward(
        dy, x, weight, lora_a, lora_b, s_scaled, scaling, backend, need_dx, need_da, need_db,
        dropout_p, dropout_seed, dropout_offset,
    )  # fmt: skip


def _backend_backward(
    dy, x, weight, lora_a, lora_b, s_scaled, scaling, backend, need_dx, need_da, need_db,
    dropout_p=0.0, dropout_seed=None, dropout_offset=0,
):  # fmt: skip
    """The body of ``cora_linear_bwd``: the backend's gradients, an empty tensor of its
    own for each not asked for (a custom op returns tensors, none aliasing another)."""
    dx, da, db = get_backend(backend).backward(
        dy, x, weight, lora_a, lora_b, s_scaled, scaling, need_dx, need_da, need_db,
        _dropout_spec(dropout_p, dropout_seed, dropout_offset),
    )  # fmt: skip
    return (
        dx if need_dx else x.new_empty(0),
        da if need_da else x.new_empty(0),
        db if need_db else x.new_empty(0),
    )


@_cora_linear_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, s_scaled, scaling, backend, need_dx, need_da, need_db,
      dropout_p=0.0, dropout_seed=None, dropout_offset=0):  # fmt: skip
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    da = lora_a.new_empty(lora_a.shape) if need_da else x.new_empty(0)
    db = lora_b.new_empty(lora_b.shape) if need_db else x.new_empty(0)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, backend, *dropout = inputs
    _, s_scaled = output
    # the seed tensor (dropout[1]) goes through save_for_backward, not a ctx attribute
    seed = dropout[1] if len(dropout) > 1 else None
    ctx.save_for_backward(x, weight, lora_a, lora_b, s_scaled, seed)
    ctx.scaling = scaling
    ctx.backend = backend
    ctx.n_dropout = len(dropout)
    ctx.dropout_p = dropout[0] if dropout else 0.0
    ctx.dropout_offset = dropout[2] if len(dropout) > 2 else 0
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _ds_unused):
    """The op's input gradients (through the backward custom op)."""
    x, weight, lora_a, lora_b, s_scaled, seed = ctx.saved_tensors
    need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
    dx = da = db = None
    if need_dx or need_da or need_db:
        dx, da, db = _cora_linear_backward(
            dy, x, weight, lora_a, lora_b, s_scaled, ctx.scaling, ctx.backend,
            need_dx, need_da, need_db, ctx.dropout_p, seed, ctx.dropout_offset,
        )  # fmt: skip
        dx = dx if need_dx else None
        da = da if need_da else None
        db = db if need_db else None
    dw, dbias = _weight_and_bias_grads(dy, x, need_dw, need_dbias, ctx.bias_dtype)
    return (dx, dw, da, db, dbias, None, None) + (None,) * ctx.n_dropout


_cora_linear_forward.register_autograd(_backward, setup_context=_setup_context)


def _weight_and_bias_grads(dy, x, need_dw, need_dbias, bias_dtype):
    """``(dW, dbias)`` of one projection, ``None`` where not needed."""
    dw = dbias = None
    if need_dw:
        # The frozen-weight gradient is rare (full fine-tuning); plain PyTorch is enough.
        dw = dy.reshape(-1, dy.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])
    if need_dbias:
        acc_dtype = torch.promote_types(dy.dtype, torch.float32)
        dbias = dy.sum(dim=(0, 1), dtype=acc_dtype).to(bias_dtype)
    return dw, dbias


class _CoraLinearEager(torch.autograd.Function):
    """The op's autograd formula without the custom-op dispatcher, for eager calls.

    The dispatcher and ``register_autograd``'s wrapper cost more host time than the maths of a
    small step (measured on a CPU: about 390 us against 240 us for the factored PyTorch
    form, forward and backward at B 8, d 256; on an H200 the op's forward+backward took about
    0.5 ms more than the factored form at B 8 x L 256). Eager calls that need a gradient run the
    same backend functions through this ``autograd.Function``: one autograd node whose only
    output is ``y`` (``S`` is saved, not returned, so autograd neither tracks it nor makes a
    zero gradient for it); compiled, ``torch.func`` and ``__torch_function__`` calls keep the
    custom op (:func:`fused_cora_linear` picks). ``dropout``: ``None`` or ``(p, seed, offset)``.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling, backend, dropout):
        y, s_scaled = get_backend(backend).forward(
            x, weight, lora_a, lora_b, bias, scaling, True, dropout
        )
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        # S is this call's own intermediate (nothing else holds it, so nothing can modify it
        # in place): kept as an attribute, without a saved variable's version tracking.
        ctx.s_scaled = s_scaled
        ctx.scaling, ctx.backend, ctx.dropout = scaling, backend, dropout
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: no double backward (Triton)
    def backward(ctx, dy):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s_scaled = ctx.s_scaled
        need_dx, need_dw, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        dx = da = db = None
        if need_dx or need_da or need_db:
            dx, da, db = get_backend(ctx.backend).backward(
                dy, x, weight, lora_a, lora_b, s_scaled, ctx.scaling, need_dx, need_da, need_db,
                ctx.dropout,
            )  # fmt: skip
        dw = dbias = None
        if need_dw or need_dbias:
            dw, dbias = _weight_and_bias_grads(dy, x, need_dw, need_dbias, ctx.bias_dtype)
        return dx, dw, da, db, dbias, None, None, None


def _autocast_cast(x: torch.Tensor):
    """Under ``torch.autocast`` for ``x``'s device: a function casting a floating tensor to
    the autocast dtype (``None`` passes through); else ``None``.

    The op then behaves as ``F.linear`` does under autocast: ``x``, ``W`` and the bias are
    cast to the autocast dtype and the op runs in it with autocast off inside (which would
    otherwise reach the backends' own matmuls and mix dtypes); ``A`` and ``B`` keep their
    dtype (the op computes them in ``x``'s). The casts are differentiable, so gradients
    reach fp32 leaves in fp32.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t


def fused_cora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    backend: str = "auto",
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    dropout_offset: int = 0,
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
        dropout_p: LoRA dropout on the shrink's input, ``0 <= p < 1``: the result is
            ``x W^T + bias + scaling (dropout(x) A) B^T``, ``dropout(x) = x * keep / (1 - p)``.
            Applied whenever ``p > 0`` (pass 0 in eval mode). Not on the CUDA backend.
        dropout_seed: int in ``[0, 2**63)``, required when ``dropout_p > 0``. The mask is a
            pure function of ``(dropout_seed, dropout_offset + (b * L + l) * d_in + k)``
            (:mod:`llmrec_kernels.dropout`), the same on every backend and regenerated by the
            backward; reuse a seed only to reuse a mask.
        dropout_offset: int ``>= 0``, shifts the element counter (several masks from one seed).

    Returns:
        ``(B, L, d_out)`` (``(B, d_out)`` for 2-D ``x``) in the dtype of ``x``. Differentiable
        in ``x``, ``lora_a``, ``lora_b``, ``bias`` and, when it requires grad, ``weight``.
        The low-rank intermediate ``x A`` and every accumulation are kept in fp32.

    Raises:
        TypeError: a non-tensor, an integer dtype, or ``weight`` in another dtype than ``x``.
        ValueError: mismatched shapes, tensors on different devices, an unknown backend,
            ``dropout_p`` outside ``[0, 1)``, a missing seed, dropout on the CUDA backend.
    """
    if _any_autocast() and isinstance(x, torch.Tensor):
        cast = _autocast_cast(x)
        if cast is not None:
            with torch.autocast(x.device.type, enabled=False):
                return fused_cora_linear(
                    cast(x), cast(weight), lora_a, lora_b, cast(bias), scaling, backend,
                    dropout_p, dropout_seed, dropout_offset,
                )  # fmt: skip
    check_cora_linear_args(x, weight, lora_a, lora_b, bias, scaling)
    if type(scaling) is not float:
        scaling = float(scaling)
    one_token = x.dim() == 2
    x3 = x.unsqueeze(1) if one_token else x
    tensors = (x, weight, lora_a, lora_b, bias)
    training = _needs_grad(tensors)
    if x.is_cuda:  # the shape class matters only to a GPU's dispatch table
        concrete = resolve_backend(
            backend, x.device, x.dtype, lora_a.shape[-1], x3.shape[0] * x3.shape[1],
            x3.shape[1], training,
        )  # fmt: skip
    else:
        concrete = resolve_backend(backend, x.device, x.dtype, lora_a.shape[-1])
    drop_args: tuple = ()
    if dropout_p:  # one truth test on the hot path; 0 and 0.0 skip all of this
        _check_dropout(dropout_p, dropout_seed, dropout_offset, concrete)
        drop_args = (float(dropout_p), dropout_seed, dropout_offset)
    # One test of whether anything can observe the op, shared by the two fast paths.
    if _is_compiling() or _functorch_active() or _has_torch_function(tensors):
        y = _cora_linear_forward(
            x3, weight, lora_a, lora_b, bias, scaling, concrete, *_op_dropout(drop_args)
        )[0]
    elif training:
        y = _CoraLinearEager.apply(
            x3, weight, lora_a, lora_b, bias, scaling, concrete, _eager_dropout(drop_args)
        )
    else:  # nothing can observe the op: the backend's forward, no S kept
        y = get_backend(concrete).forward(
            x3, weight, lora_a, lora_b, bias, scaling, False, _eager_dropout(drop_args)
        )[0]
    return y.squeeze(1) if one_token else y


def _op_forward(backend: str):
    """The forward custom op with the backends' one-projection signature."""

    def forward(x, weight, lora_a, lora_b, bias, scaling, need_s=True, dropout=None):
        return _cora_linear_forward(
            x, weight, lora_a, lora_b, bias, scaling, backend, *_op_dropout(dropout)
        )

    return forward


def _op_backward(backend: str):
    """The backward custom op with the backends' one-projection signature."""

    def backward(dy, x, weight, lora_a, lora_b, s_scaled, scaling, need_dx, need_da, need_db,
                 dropout=None):  # fmt: skip
        return _cora_linear_backward(
            dy, x, weight, lora_a, lora_b, s_scaled, scaling, backend, need_dx, need_da,
            need_db, *_op_dropout(dropout),
        )  # fmt: skip

    return backward


class _MultiCoRALinear(torch.autograd.Function):
    """Projections sharing ``x`` and ``A``, each output its own tensor and its own gradient.

    For training. The outputs are separate tensors, not slices of one ``(B, L, sum(sizes))``
    result: a slice keeps the whole buffer alive as long as any slice lives (attention keeps
    ``v`` for its backward, so the pre-RoPE ``q`` and ``k`` could never be freed), which costs
    more memory than unfused projections. Autograd hands the backward each output's gradient
    separately, so no ``(B, L, sum(sizes))`` concatenation of gradients is formed either: each
    projection's backward runs on its own gradient and the ``x``/``A`` gradients are summed.

    The torch backend computes ``x A`` once and expands it into each output; the kernel
    backends run one fused-op call per projection (each recomputes the rank-``r`` shrink, a
    ``r / d_j`` fraction of its GEMM). The fused weight and ``B`` are detached values (views of
    the members' shared storage, or one copy); the gradients go to the members, inputs
    ``8 ..`` (weights, then ``B``s, then biases). ``dropout`` is ``()`` or the op's
    ``(p, seed, offset)``: one mask for every projection (they share the one ``dropout(x) A``).
    """

    @staticmethod
    def forward(ctx, x, lora_a, fused_w, fused_b, fused_bias, scaling, backend, dropout, *members):
        n = len(members) // 3
        sizes = tuple(w.shape[0] for w in members[:n])
        impl = get_backend(backend)
        drop = dropout or None
        if impl.TRACEABLE or not _is_compiling():
            outs, s = impl.forward_multi(
                x, fused_w, lora_a, fused_b, fused_bias, scaling, sizes, drop
            )
        else:  # compiled code reaches kernel backends through the custom op
            outs, s = _multi.forward_multi(
                _op_forward(backend), x, fused_w, lora_a, fused_b, fused_bias, scaling, sizes,
                drop,
            )  # fmt: skip
        # a traced seed tensor goes through save_for_backward; an eager int seed stays in ctx
        traced = bool(dropout) and isinstance(dropout[1], torch.Tensor)
        ctx.save_for_backward(x, lora_a, fused_w, fused_b, s, dropout[1] if traced else None)
        ctx.scaling, ctx.backend, ctx.sizes = scaling, backend, sizes
        ctx.dropout = (dropout[0], None, dropout[2]) if traced else (dropout or None)
        ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in members[2 * n :])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, lora_a, fused_w, fused_b, s, traced_seed = ctx.saved_tensors
        dropout = ctx.dropout
        if dropout is not None and traced_seed is not None:
            dropout = (dropout[0], traced_seed, dropout[2])
        sizes, n = ctx.sizes, len(ctx.sizes)
        needs = ctx.needs_input_grad
        need_dx, need_da = needs[0], needs[1]
        need_dw, need_db, need_dbias = (
            needs[8 : 8 + n],
            needs[8 + n : 8 + 2 * n],
            needs[8 + 2 * n :],
        )
        dx = da = None
        dws, dbs, dbiases = [None] * n, [None] * n, [None] * n
        if need_dx or need_da or any(need_db):
            impl = get_backend(ctx.backend)
            args = (
                grads, x, fused_w, lora_a, fused_b, s, ctx.scaling, sizes, need_dx, need_da,
                tuple(need_db), dropout,
            )  # fmt: skip
            if impl.TRACEABLE or not _is_compiling():
                dx, da, dbs = impl.backward_multi(*args)
            else:
                dx, da, dbs = _multi.backward_multi(_op_backward(ctx.backend), *args)
        for j, dy in enumerate(grads):
            if need_dw[j] or need_dbias[j]:
                dws[j], dbiases[j] = _weight_and_bias_grads(
                    dy, x, need_dw[j], need_dbias[j], ctx.bias_dtypes[j]
                )
        return (dx, da, None, None, None, None, None, None, *dws, *dbs, *dbiases)


def fused_cora_linear_multi(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
    scaling: float = 1.0,
    backend: str = "auto",
    fused_weight: Optional[torch.Tensor] = None,
    fused_lora_b: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
    dropout_offset: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Several CoRA projections of one ``x`` and one ``A`` (fused q/k/v) in one fused call.

    Output ``j`` is ``x W_j^T + bias_j + scaling (x A) B_j^T``; one shrink ``x A`` serves them
    all and one fused forward computes them over ``[W_0; W_1; ...]``.

    Args:
        x: ``(B, L, d_in)`` or ``(B, d_in)``, as :func:`fused_cora_linear`.
        weights: ``W_j`` ``(d_j, d_in)``, one dtype (that of ``x``), one device.
        lora_a: ``(B, d_in, r)`` or ``(d_in, r)``.
        lora_bs: ``B_j`` ``(d_j, r)``, one dtype.
        biases: ``None`` or one ``(d_j,)`` tensor or ``None`` per projection.
        scaling, backend: as :func:`fused_cora_linear`.
        fused_weight: optional ``(sum d_j, d_in)`` tensor equal to ``cat(weights)``, e.g. the
            buffer the weights are views of; used as a value only (gradients go to
            ``weights``). Without it the weights are concatenated (a copy) on every call.
        fused_lora_b: optional ``(sum d_j, r)`` tensor equal to ``cat(lora_bs)``, likewise.
        dropout_p, dropout_seed, dropout_offset: as :func:`fused_cora_linear`; one mask serves
            every projection (one ``dropout(x) A``), where separate LoRA modules would each
            draw their own.

    Returns:
        A tuple of ``(B, L, d_j)`` (``(B, d_j)`` for 2-D ``x``) in the dtype of ``x``: slices
        of one result. Differentiable in ``x``, ``lora_a`` and every member that requires
        grad; each output's gradient is used separately (no concatenation of gradients).

    Raises:
        TypeError, ValueError: as :func:`fused_cora_linear`, and for mismatched list lengths.
    """
    if _any_autocast() and isinstance(x, torch.Tensor):
        cast = _autocast_cast(x)
        if cast is not None:
            with torch.autocast(x.device.type, enabled=False):
                return fused_cora_linear_multi(
                    cast(x), [cast(w) for w in weights], lora_a, lora_bs,
                    None if biases is None else [cast(b) for b in biases], scaling, backend,
                    None if fused_weight is None else cast(fused_weight), fused_lora_b,
                    dropout_p, dropout_seed, dropout_offset,
                )  # fmt: skip
    n = len(weights)
    if n == 0 or len(lora_bs) != n or (biases is not None and len(biases) != n):
        raise ValueError(
            f"weights, lora_bs and biases must be non-empty and of one length, got {n}, "
            f"{len(lora_bs)} and {'None' if biases is None else len(biases)}"
        )
    biases = [None] * n if biases is None else list(biases)
    if fused_weight is None:
        fused_weight = torch.cat([w.detach() for w in weights], dim=0)
    if fused_lora_b is None:
        fused_lora_b = torch.cat([b.detach() for b in lora_bs], dim=0)
    fused_bias = None
    if any(b is not None for b in biases):
        ref = next(b for b in biases if b is not None)
        fused_bias = torch.cat(
            [
                b.detach() if b is not None else ref.new_zeros(w.shape[0])
                for b, w in zip(biases, weights)
            ]
        )
    check_cora_linear_args(x, fused_weight, lora_a, fused_lora_b, fused_bias, scaling)
    if not _is_compiling():
        for j, (w, b) in enumerate(zip(weights, lora_bs)):
            if w.shape[1:] != fused_weight.shape[1:] or b.shape[1:] != fused_lora_b.shape[1:]:
                raise ValueError(
                    f"member {j}: weight {tuple(w.shape)} / lora_b {tuple(b.shape)} do not "
                    f"match the fused weight {tuple(fused_weight.shape)} / lora_b "
                    f"{tuple(fused_lora_b.shape)}"
                )
        if sum(w.shape[0] for w in weights) != fused_weight.shape[0]:
            raise ValueError("the members' output sizes do not add up to the fused weight's")
    members = (*weights, *lora_bs, *biases)
    tensors = (x, lora_a, *members)
    training = _needs_grad(tensors)
    tokens, length = (x.shape[0], 1) if x.dim() == 2 else (x.shape[0] * x.shape[1], x.shape[1])
    concrete = resolve_backend(
        backend, x.device, x.dtype, lora_a.shape[-1], tokens, length, training
    )
    dropout: tuple = ()
    if dropout_p:
        _check_dropout(dropout_p, dropout_seed, dropout_offset, concrete)
        dropout = (float(dropout_p), dropout_seed, dropout_offset)
    one_token = x.dim() == 2
    x3 = x.unsqueeze(1) if one_token else x
    if not training:
        # Nothing is saved for a backward: one fused call, its output split into views.
        if _direct_call_ok(tensors):
            y = _forward_no_grad(
                concrete, x3, fused_weight, lora_a, fused_lora_b, fused_bias, float(scaling),
                _eager_dropout(dropout),
            )  # fmt: skip
        else:
            y, _ = _cora_linear_forward(
                x3, fused_weight, lora_a, fused_lora_b, fused_bias, float(scaling), concrete,
                *_op_dropout(dropout),
            )  # fmt: skip
        outs = y.split([w.shape[0] for w in weights], dim=-1)
    else:
        if dropout and not _is_compiling():
            dropout = _eager_dropout(dropout)  # a tensor seed stays a tensor when traced
        outs = _MultiCoRALinear.apply(
            x3, lora_a, fused_weight, fused_lora_b, fused_bias, float(scaling), concrete,
            dropout, *members,
        )  # fmt: skip
    return tuple(o.squeeze(1) for o in outs) if one_token else tuple(outs)
