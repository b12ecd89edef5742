"""Drop-in CoRA patching of Hugging Face decoder attention (LLaMA, Mistral, Qwen2/3, Gemma 2, Phi-3).

Three calls::

    apply_cora_to_llama(model, rank=16, alpha=32)   # in place; freezes the model
    with cora_weights(model, lora_a):               # lora_a: (B, hidden_size, rank)
        out = model(input_ids, attention_mask=mask)
    remove_cora(model)                              # the original modules come back

Every target projection ``P`` (by default the attention projections ``q_proj``, ``k_proj``,
``v_proj`` (or Phi-3's ``qkv_proj``) and ``o_proj`` of every decoder layer, those that read the
hidden state) is replaced by a :class:`CoRALinear` that keeps the original ``P.weight`` and
``P.bias`` parameters (same objects, same state-dict keys) and adds one trainable factor,
``P.lora_B.weight`` of shape ``(out_features, rank)``, zero-initialised. Inside
:func:`cora_weights` every patched projection computes::

    y_b = x_b W^T + bias + (alpha / rank) (x_b A_b) B^T        (b = index in the batch dim)

through :func:`llmrec_kernels.fused_cora_linear`, never forming ``W + s B A_b^T``. Outside it,
a patched projection runs ``F.linear(x, W, bias)``, exactly what ``nn.Linear`` runs, so the
model gives bit-identical results to the unpatched one (the frozen backbone).

With ``fuse_qkv=True`` the q, k and v weights of an attention block are moved into one
contiguous ``(d_q + d_k + d_v, d_in)`` buffer and the original parameters become views into it
(no second copy); one ``fused_cora_linear`` call computes q, k and v with a single shared
``x A_b`` and the result is split. The attention code is not modified: whichever of q/k/v is
called first computes all three, and the other two return the pending slices when they are
called with the same input tensor. Only plain float ``nn.Linear`` parameters that are the whole
of their own storage are ever moved (:class:`FusedQKV`): views into storage someone else
manages (FSDP's flat parameters) are left where they are and concatenated per call instead.

Quantised and wrapped projections (bitsandbytes ``Linear4bit``/``Linear8bitLt``, peft LoRA
layers, anything that is not a plain float ``nn.Linear``) are patched too: the module is kept,
untouched, as ``<path>.base_layer``, its own ``forward`` computes the base product and
:func:`lowrank_delta` adds ``s (x A_b) B^T``. The targets are checked against the model before
anything changes (:func:`find_target_modules`); a refused patch leaves the model as it was.

Gradient checkpointing: :func:`cora_weights` wraps the ``_gradient_checkpointing_func`` of the
model's checkpointed layers for the duration of the block so that ``lora_a`` is passed to every
checkpointed call as an extra tensor *argument*. The recomputation in the backward pass then
uses the A of the forward it replays, even if ``backward()`` runs after the ``with`` block has
been left or inside a later block with another A (both reentrant and non-reentrant
checkpointing). ``transformers`` is never imported by this module.

``torch.compile``: a patched forward inside :func:`cora_weights` compiles as one graph
(``fullgraph=True``, no graph break, training included): the per-sample A is read from the
shared state as a graph input, the fused q/k/v operands are buffers held by the group (see
:class:`FusedQKV` for what keeps them valid) and the op is a registered custom op. Training
with ``lora_dropout > 0`` too: each call's seed is drawn from torch's CPU generator by an op
of the graph (:func:`llmrec_kernels.dropout.draw_seed_in_graph`), the draw eager code makes,
so the compiled masks are the eager ones. Only a wrapped base (quantised, peft) with dropout
runs its projection eagerly (:func:`run_eagerly`, a graph break).

CUDA-graph decode (``mode="reduce-overhead"``): a CUDA graph replays fixed addresses, so A
must live in one buffer for the whole decode; :func:`static_lora_a` makes it::

    a_buf = static_lora_a(model, batch_size, device="cuda")     # (B, hidden_size, rank)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with cora_weights(model, a_buf):
        for batch in batches:                                    # fixed (B, L) shapes
            a_buf.copy_(generator(batch))                        # new A, same address
            logits = step(input_ids=batch_ids, use_cache=False).logits

(with a KV cache, use a ``transformers.StaticCache`` so that every decode step has one
shape). Enter the block once around the loop: its entry re-checks the fused layout
eagerly, outside the graph. ``tests/patching/test_hf_compile.py`` runs this on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from llmrec_kernels._torch_impl import s_dtype
from llmrec_kernels.cora_linear import fused_cora_linear
from llmrec_kernels.dropout import call_seed, dropout_mask, keep_scale, seed_key
from llmrec_kernels.hf_targets import (
    DEFAULT_TARGET_MODULES,
    adopt_base,
    default_lora_dtype,
    device_of,
    find_target_modules,
    hidden_size_of,
)
from llmrec_kernels.qkv_fusion import FusedQKV, can_share_buffer, on_device

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "CoRALinear",
    "apply_cora_to_llama",
    "cora_modules",
    "cora_weights",
    "find_target_modules",
    "is_cora_patched",
    "lora_b_parameters",
    "lowrank_delta",
    "parameter_bytes",
    "remove_cora",
    "static_lora_a",
    "unfuse_qkv",
]

_QKV_NAMES = ("q_proj", "k_proj", "v_proj")
_STATE_ATTR = "_cora_state"
_WRAPPER_FLAG = "_cora_checkpoint_inner"
_NO_DROPOUT: dict = {}


@dataclass(eq=False)
class _CoRAState:
    """Shared by every patched projection of one model: the current A and the settings."""

    hidden_size: int
    rank: int
    alpha: float
    backend: str
    lora_a: Optional[torch.Tensor] = None
    # LoRA dropout on x before x A_b, in training mode only (the reference's 0.05).
    lora_dropout: float = 0.0
    # (parent module, child name, CoRALinear) for every patched projection, in model order.
    patched: list = field(default_factory=list)
    # (parameter, requires_grad before patching) for every parameter of the model.
    requires_grad: list = field(default_factory=list)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def dropout_args(self, module: nn.Module, x: torch.Tensor) -> dict:
        """The op's dropout arguments for one call of ``module`` on ``x``: none in eval mode.

        One seed per call from torch's CPU generator (:func:`llmrec_kernels.dropout.draw_seed`):
        reproducible under ``torch.manual_seed`` and a restored RNG state, and replayed by
        activation checkpointing's recomputation, which restores that state first. Compiled,
        the same draw is an op of the graph
        (:func:`~llmrec_kernels.dropout.draw_seed_in_graph`): no graph break, the eager masks.
        """
        # Decode and eval: one attribute test, no call (host cost per projection).
        if self.lora_dropout and module.training:
            seed = call_seed(x, module._seed_key)
            return {"dropout_p": self.lora_dropout, "dropout_seed": seed}
        return _NO_DROPOUT


def lowrank_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_seed: Optional[int] = None,
) -> torch.Tensor:
    """The low-rank part of :func:`fused_cora_linear`, ``s (dropout(x) A_b) B^T``, alone.

    For projections whose base product is not a plain weight (quantised, wrapped): the base
    runs through the module's own ``forward`` and this is added to it. The same arithmetic
    as the op's torch backend (``x A`` in ``x``'s dtype, scaled in fp32 or fp64, expanded in
    ``x``'s dtype) and the same dropout mask for the same seed; differentiable in ``x``,
    ``lora_a`` and ``lora_b`` through plain autograd.

    Args:
        x: ``(B, L, d_in)`` or ``(B, d_in)``, floating point.
        lora_a: ``(B, d_in, r)`` (one A per sample) or ``(d_in, r)`` (shared).
        lora_b: ``(d_out, r)``.
        scaling: ``s``.
        dropout_p, dropout_seed: as :func:`fused_cora_linear` (offset 0).

    Returns:
        ``(B, L, d_out)`` (``(B, d_out)`` for 2-D ``x``) in the dtype of ``x``.
    """
    one_token = x.dim() == 2
    x3 = x.unsqueeze(1) if one_token else x
    dt = x3.dtype
    a = lora_a if lora_a.dtype == dt else lora_a.to(dt)
    if dropout_p:
        keep = dropout_mask(tuple(x3.shape), dropout_p, dropout_seed, 0, x3.device)
        x3 = torch.where(keep, x3, x3.new_zeros(()))
        scaling = scaling * keep_scale(dropout_p)
    shrunk = torch.bmm(x3, a) if a.dim() == 3 else torch.matmul(x3, a)
    if dt != torch.float32:
        shrunk = shrunk.to(s_dtype(dt))
    shrunk = shrunk * scaling
    b = lora_b if lora_b.dtype == dt else lora_b.to(dt)
    y = torch.matmul(shrunk.to(dt), b.t())
    return y.squeeze(1) if one_token else y


class CoRALinear(nn.Module):
    """A frozen linear projection plus a per-sample low-rank delta ``s (x A_b) B^T``.

    Two kinds of base, chosen by :func:`is_plain_linear`:

    * a plain float ``nn.Linear``: its parameters become this module's ``weight`` and
      ``bias`` (the same objects, the same state-dict keys) and the whole projection is one
      :func:`fused_cora_linear` call;
    * any other linear-like module (a bitsandbytes ``Linear4bit``/``Linear8bitLt``, a peft
      LoRA layer, ...): it is kept, unchanged, as the child ``base_layer`` (its state-dict
      keys gain a ``base_layer.`` segment), its own ``forward`` computes the base product and
      :func:`lowrank_delta` adds the per-sample term. Nothing of it is re-pointed or copied.

    Attributes:
        weight: (plain base) the original ``(out_features, in_features)`` parameter (the same
            object; with q/k/v fusion a view into the fused buffer), frozen.
        bias: (plain base) the original ``(out_features,)`` parameter or ``None``, frozen.
        base_layer: (other bases) the original module.
        lora_B: ``nn.Linear(rank, out_features, bias=False)``; ``lora_B.weight`` is
            ``(out_features, rank)``, zero-initialised, trainable.

    ``forward(x)``: ``x`` is ``(B, L, in_features)`` or ``(B, in_features)`` in the dtype the
    base takes. Inside :func:`cora_weights` the result is ``base(x) + s (x A_b) B^T`` with
    ``A_b = lora_a[b]``; outside, exactly the base's result (``F.linear(x, weight, bias)``
    for a plain base, ``base_layer(x)`` otherwise).
    """

    def __init__(
        self,
        base: nn.Module,
        state: _CoRAState,
        path: str,
        lora_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        adopt_base(self, base, path)
        if lora_dtype is None:
            lora_dtype = default_lora_dtype(base)
        self.lora_B = nn.Linear(
            state.rank, self.out_features, bias=False, device=device_of(base), dtype=lora_dtype
        )
        nn.init.zeros_(self.lora_B.weight)
        # Plain attributes (not submodules): no duplicate parameters or state-dict keys.
        self.__dict__["_base"] = base
        self.__dict__["_state"] = state
        self.__dict__["_group"] = None
        self.__dict__["_group_index"] = 0
        self.path = path
        self._seed_key = seed_key(path)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda() give each parameter its own storage: the fused q/k/v
        # buffers are then stale (re-fused at the next eager call or cora_weights entry).
        out = super()._apply(fn, recurse)
        if self._group is not None:
            self._group.stale = True
        return out

    @property
    def rank(self) -> int:
        return self._state.rank

    @property
    def scaling(self) -> float:
        return self._state.scaling

    def extra_repr(self) -> str:
        fused = ", fused_qkv" if self._group is not None else ""
        bias = "" if self.wraps_module else f"bias={self.bias is not None}, "
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{bias}rank={self.rank}, scaling={self.scaling:g}{fused}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_a = self._state.lora_a
        if lora_a is None:
            if self.wraps_module:
                return self.base_layer(x)
            return F.linear(x, self.weight, self.bias)
        if x.dim() not in (2, 3):
            raise ValueError(
                f"{self.path}: inside cora_weights a patched projection takes x of shape "
                f"(B, L, {self.in_features}) or (B, {self.in_features}), got {tuple(x.shape)}"
            )
        if lora_a.dim() == 3 and lora_a.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.path}: cora_weights was given lora_a for {lora_a.shape[0]} samples but the "
                f"module received a batch of {x.shape[0]}; lora_a[b] is the A of sample b of the "
                "batch (with generate(num_beams=n) or num_return_sequences=n pass "
                "lora_a.repeat_interleave(n, dim=0))"
            )
        if (
            self.wraps_module
            and self._state.lora_dropout
            and self.training
            and torch.compiler.is_compiling()
        ):
            # the plain-PyTorch delta of a wrapped base reads its seed on the host
            return run_eagerly(self._project, x, lora_a)
        return self._project(x, lora_a)

    def _project(self, x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        if self.wraps_module:
            # The base's own product (dequantising, or with its own LoRA), then our term.
            y = self.base_layer(x)
            delta = lowrank_delta(
                x,
                on_device(lora_a, x.device),
                self.lora_B.weight,
                self._state.scaling,
                **self._state.dropout_args(self, x),
            )
            return y + delta.to(y.dtype)
        if self._group is not None:
            return self._group.output(self, x, lora_a)
        return fused_cora_linear(
            x,
            self.weight,
            on_device(lora_a, x.device),
            self.lora_B.weight,
            self.bias,
            scaling=self._state.scaling,
            backend=self._state.backend,
            **self._state.dropout_args(self, x),
        )


@torch.compiler.disable
def run_eagerly(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)`` outside any ``torch.compile`` graph (one graph break; eager: a call).

    A projection over a wrapped base (quantised, peft) with dropout in training mode builds
    its mask in plain PyTorch from a host seed, which ``torch.compile`` cannot trace (a
    graph break inside, or a recompile per seed): the patched modules
    (:class:`CoRALinear`, :class:`llmrec_kernels.lora.LoRALinear`) run such a
    projection through this, with the same draws in the same order as without compile; the
    rest of the graph stays compiled. Defined here, not in :mod:`llmrec_kernels.dropout`:
    the decorator imports ``torch._dynamo`` (and Triton), which ``import llmrec_kernels``
    must not.
    """
    return fn(*args)


def _get_state(model: nn.Module) -> Optional[_CoRAState]:
    state = getattr(model, _STATE_ATTR, None)
    if isinstance(state, _CoRAState):
        return state
    for m in model.modules():
        if isinstance(m, CoRALinear):
            return m._state
    return None


def is_cora_patched(model: nn.Module) -> bool:
    """True when ``model`` (or a module inside it) was patched by :func:`apply_cora_to_llama`."""
    return _get_state(model) is not None


def cora_modules(model: nn.Module) -> dict[str, CoRALinear]:
    """``{path: CoRALinear}`` for every patched projection inside ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CoRALinear)}


def lora_b_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<path>.lora_B.weight": parameter}`` for every patched projection (the trainables)."""
    return {f"{name}.lora_B.weight": m.lora_B.weight for name, m in cora_modules(model).items()}


def apply_cora_to_llama(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32,
    target_modules: Union[str, Sequence[str], None] = DEFAULT_TARGET_MODULES,
    fuse_qkv: bool = True,
    backend: str = "auto",
    lora_dtype: Optional[torch.dtype] = None,
    lora_dropout: float = 0.0,
) -> nn.Module:
    """Patch the attention projections of a decoder model with CoRA, in place.

    Args:
        model: a transformers causal LM or decoder body (LLaMA, Mistral, Qwen2, Qwen3, Gemma 2,
            Phi-3, ...; GQA is fine), possibly with quantised projections (bitsandbytes 4-bit
            or 8-bit) or inside peft (``PeftModel`` / ``LoraModel``). Every target must read
            the hidden state: ``in_features == config.hidden_size`` (one ``A_b`` of shape
            ``(hidden_size, rank)`` per sample is shared by all of them, as in CoRA).
            A plain float ``nn.Linear`` target runs the whole projection in the fused op; any
            other (quantised, peft) keeps its own ``forward`` for the base product (peft's
            LoRA included) and gets the per-sample term added (:class:`CoRALinear`).
        rank: ``r >= 1``, the width of ``A_b`` and ``B``.
        alpha: LoRA alpha; the delta is scaled by ``alpha / rank``.
        target_modules: last path components to patch (``"q_proj"``, ...; a single string is
            one name), each present in the model and reading the hidden state. The default
            (``None`` or :data:`DEFAULT_TARGET_MODULES` itself) is the model's attention
            projections that read the hidden state, :func:`find_target_modules`.
        fuse_qkv: compute the patched q/k/v projections of each attention block with one
            fused call over ``[W_q; W_k; W_v]`` and one shared ``x A_b``. Only plain float
            ``nn.Linear`` weights are fused; self-contained ones are moved into one buffer
            (views: no extra memory), others are concatenated per call (see
            :class:`FusedQKV`). Quantised and peft projections are never fused.
        backend: passed to :func:`fused_cora_linear` (``"auto"``, ``"triton"``, ``"cuda"``,
            ``"torch"``).
        lora_dtype: dtype of the ``lora_B`` factors; default: the weights' dtype for fp32/fp64
            models, fp32 for fp16/bf16 and quantised models.
        lora_dropout: ``0 <= p < 1``, dropout on ``x`` before ``x A_b`` while a patched module
            is in training mode (inside the fused op; the reference uses 0.05). The fused q/k/v
            projections share one mask. Not with ``backend="cuda"``.

    Returns:
        ``model`` itself, with every parameter frozen (``requires_grad=False``) except the new
        ``<path>.lora_B.weight`` (``(out_features, rank)``, zeros, trainable). The outputs are
        unchanged until :func:`cora_weights` supplies per-sample A.

    Raises:
        ValueError: rank < 1, an already patched model, a named target absent from the model,
            or a target whose ``in_features`` is not the hidden size (e.g. ``down_proj``).
        TypeError: a ``model`` that is not an ``nn.Module``, malformed ``target_modules`` or a
            target that is not a linear projection.
        Every check runs before the model is changed: a refused patch leaves it as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, (int, float))
        or not 0.0 <= lora_dropout < 1.0
    ):
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if is_cora_patched(model):
        raise ValueError("model is already patched with CoRA; call remove_cora(model) first")

    candidates = find_target_modules(model, target_modules)
    hidden = hidden_size_of(model, candidates)
    state = _CoRAState(
        hidden_size=hidden,
        rank=rank,
        alpha=float(alpha),
        backend=backend,
        lora_dropout=float(lora_dropout),
    )
    # Built before the model is touched: a module CoRALinear refuses changes nothing.
    replacements = [
        (parent, child_name, CoRALinear(child, state, full, lora_dtype=lora_dtype))
        for parent, child_name, child, full in candidates
    ]

    state.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    by_parent: dict[int, list[CoRALinear]] = {}
    for parent, child_name, patched in replacements:
        setattr(parent, child_name, patched)
        state.patched.append((parent, child_name, patched))
        if child_name in _QKV_NAMES and not patched.wraps_module:
            by_parent.setdefault(id(parent), []).append(patched)

    if fuse_qkv:
        for members in by_parent.values():
            if len(members) < 2:
                continue
            members.sort(key=lambda m: _QKV_NAMES.index(m.path.rsplit(".", 1)[-1]))
            if can_share_buffer([m.weight for m in members]):
                FusedQKV(members)

    model.__dict__[_STATE_ATTR] = state
    return model


def unfuse_qkv(model: nn.Module) -> nn.Module:
    """Give every fused q/k/v projection of ``model`` its own weight and ``lora_B`` storage
    back (same values) and stop fusing them: no parameter then shares storage with another
    module's, which FSDP (``fully_shard``) and other sharding wrappers expect. Outputs are
    unchanged (each call concatenates its operands). Returns ``model``; a model without
    fused groups is left as it is."""
    state = _get_state(model)
    if state is not None:
        for _, _, patched in state.patched:
            if patched._group is not None and patched._group_index == 0:
                patched._group.release()
    return model


def remove_cora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_cora_to_llama`: put the original modules back.

    The original module objects return (a quantised or peft module exactly as it was; a plain
    ``nn.Linear`` with the current weight and bias parameters: after
    q/k/v fusion the weights stay views into the shared buffer: same values, no extra memory),
    the ``lora_B`` factors are dropped and every parameter gets back the ``requires_grad`` it
    had before patching. Returns ``model``; raises ``ValueError`` if it is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _CoRAState):
        if is_cora_patched(model):
            raise ValueError(
                "remove_cora must be given the model that apply_cora_to_llama was applied to"
            )
        raise ValueError("model is not patched with CoRA (apply_cora_to_llama was not applied)")
    for parent, child_name, patched in state.patched:
        if patched.wraps_module:
            base = patched.base_layer
        else:
            base = patched._base
            # The same objects unless .to() with module-parameter overwriting replaced them.
            if base.weight is not patched.weight:
                base.weight = patched.weight
            if base.bias is not patched.bias:
                base.bias = patched.bias
        setattr(parent, child_name, base)
        if patched._group is not None:
            patched._group._clear()
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    state.patched.clear()
    state.requires_grad.clear()
    state.lora_a = None
    del model.__dict__[_STATE_ATTR]
    return model


def _make_checkpoint_wrapper(inner: Callable, state: _CoRAState) -> Callable:
    """Wrap a checkpoint function so the current A becomes a tensor input of the checkpoint."""

    def checkpoint_with_cora(function: Callable, *args: Any, **kwargs: Any) -> Any:
        lora_a = state.lora_a
        if lora_a is None:
            return inner(function, *args, **kwargs)

        def run(*inputs: Any) -> Any:
            *fn_args, a = inputs
            previous = state.lora_a
            state.lora_a = a
            try:
                return function(*fn_args)
            finally:
                state.lora_a = previous

        return inner(run, *args, lora_a, **kwargs)

    setattr(checkpoint_with_cora, _WRAPPER_FLAG, inner)
    return checkpoint_with_cora


def _check_lora_a(state: _CoRAState, lora_a: Optional[torch.Tensor]) -> None:
    if lora_a is None:
        return
    if not isinstance(lora_a, torch.Tensor):
        raise TypeError(f"lora_a must be a torch.Tensor or None, got {type(lora_a).__name__}")
    if not lora_a.is_floating_point():
        raise TypeError(f"lora_a must be a floating-point tensor, got {lora_a.dtype}")
    d, r = state.hidden_size, state.rank
    ok = (lora_a.dim() == 3 and tuple(lora_a.shape[1:]) == (d, r)) or (
        lora_a.dim() == 2 and tuple(lora_a.shape) == (d, r)
    )
    if not ok:
        raise ValueError(
            f"lora_a must be (B, hidden_size, rank) = (B, {d}, {r}), one A per sample, or "
            f"({d}, {r}) shared by all samples; got {tuple(lora_a.shape)}"
        )


@contextlib.contextmanager
def cora_weights(model: nn.Module, lora_a: Optional[torch.Tensor]) -> Iterator[nn.Module]:
    """Run the patched projections of ``model`` with per-sample ``A`` inside the block.

    Args:
        model: a model patched by :func:`apply_cora_to_llama` (or a module inside it, e.g. the
            decoder body ``model.model`` of a ``LlamaForCausalLM``).
        lora_a: ``(B, hidden_size, rank)``, ``A_b = lora_a[b]`` for sample ``b`` of every batch
            run inside the block (left padding is fine: samples are rows of the batch dim); or
            ``(hidden_size, rank)`` shared by every sample; or ``None`` for the frozen backbone
            (no per-sample term). Any floating dtype (computed in the activations' dtype);
            best on the model's device (each layer moves it to its input's device otherwise).
            Gradients flow back to it (e.g. into a generator).

    Works with ``generate()`` and its KV cache (A stays fixed per sample across decode steps),
    and with gradient checkpointing: the backward pass may run inside or after the block.
    Blocks nest; leaving a block restores the previous A.

    Raises:
        ValueError: the model is not patched, or ``lora_a`` has the wrong shape.
            A batch-size mismatch is reported by the first patched module that sees the batch.
    """
    state = _get_state(model)
    if state is None:
        raise ValueError("model is not patched with CoRA; call apply_cora_to_llama(model) first")
    _check_lora_a(state, lora_a)
    # Outside any compiled region: re-fuse q/k/v groups whose members drifted apart, so a
    # compiled forward inside the block sees the fused layout it trusts.
    for _, _, patched in state.patched:
        if patched._group is not None and patched._group_index == 0:
            patched._group.ensure_fused()

    wrapped = []
    for m in model.modules():
        inner = m.__dict__.get("_gradient_checkpointing_func")
        if callable(inner) and not hasattr(inner, _WRAPPER_FLAG):
            m.__dict__["_gradient_checkpointing_func"] = _make_checkpoint_wrapper(inner, state)
            wrapped.append((m, inner))
    previous = state.lora_a
    state.lora_a = lora_a
    try:
        yield model
    finally:
        state.lora_a = previous
        for m, inner in wrapped:
            if (
                getattr(m.__dict__.get("_gradient_checkpointing_func"), _WRAPPER_FLAG, None)
                is inner
            ):
                m.__dict__["_gradient_checkpointing_func"] = inner


def static_lora_a(
    model: nn.Module,
    batch_size: int,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A zero ``(batch_size, hidden_size, rank)`` A buffer for CUDA-graph decode.

    Pass it to :func:`cora_weights` once and ``copy_`` each batch's A into it: a graph
    captured by ``torch.compile(mode="reduce-overhead")`` then reads the new A without
    re-capture or an input copy (the buffer is marked as a static address for
    ``torch.compile``). ``device``: default, the device of the model's first parameter.

    Raises:
        ValueError: the model is not patched, or ``batch_size < 1``.
    """
    state = _get_state(model)
    if state is None:
        raise ValueError("model is not patched with CoRA; call apply_cora_to_llama(model) first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if device is None:
        device = next(model.parameters()).device
    buf = torch.zeros(batch_size, state.hidden_size, state.rank, device=device, dtype=dtype)
    torch._dynamo.mark_static_address(buf)
    return buf


def parameter_bytes(module: nn.Module, trainable_only: bool = False) -> int:
    """Bytes held by the parameters of ``module``, counting each shared storage once.

    Parameters that are views into one buffer (fused q/k/v) count the buffer once; this is
    the real memory, unlike ``sum(p.numel() * p.element_size())``.
    """
    seen: dict[tuple, int] = {}
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        storage = p.untyped_storage()
        key = (p.device.type, p.device.index, storage.data_ptr())
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())
