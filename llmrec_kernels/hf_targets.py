"""Which modules of a Hugging Face model CoRA (and plain LoRA) patch, checked before any change.

A target is a projection that reads the hidden state (CoRA's per-sample ``A_b`` is
``hidden x r``). Quantised and peft-wrapped projections are found here too: the patching
computes their base product through their own forward and never re-points their weights.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "AUTO_TARGETS",
    "DEFAULT_TARGET_MODULES",
    "adopt_base",
    "default_lora_dtype",
    "device_of",
    "find_linear_modules",
    "find_target_modules",
    "float_dtype_of",
    "hidden_size_of",
    "is_plain_linear",
    "linear_shape",
    "modules_named",
]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# What the default targets mean on a model: its attention projections that read the hidden
# state (Phi-3's fused qkv_proj included; an o_proj reading heads x head_dim != hidden, as in
# Gemma 2 and Qwen3, left out with a warning).
AUTO_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose product is ``F.linear(x, weight, bias)`` with plain float
    parameters: its weight can be handed to the fused op as it is.

    Quantised linears (bitsandbytes ``Linear4bit``/``Linear8bitLt``: ``nn.Linear`` subclasses
    with their own ``forward`` and packed parameter subclasses), wrappers (peft's LoRA layers)
    and modules whose ``forward`` was replaced on the instance (accelerate's offloading hooks)
    are not: their product is their own ``forward``.
    """
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    # accelerate's offloading hooks replace forward on the instance (and may leave the weight
    # on the meta device until that forward runs): such a module computes through its own.
    if "forward" in module.__dict__:
        return False
    weight, bias = module.weight, module.bias
    if type(weight) is not nn.Parameter or not weight.is_floating_point():
        return False
    if weight.device.type == "meta":
        return False
    if tuple(weight.shape) != (module.out_features, module.in_features):
        return False
    return bias is None or (type(bias) is nn.Parameter and bias.is_floating_point())


def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(in_features, out_features)`` of a linear-like module (an ``nn.Linear``, a quantised
    linear, a peft layer over one), or ``None`` when it declares none."""
    seen = 0
    while module is not None and seen < 8:
        d_in = getattr(module, "in_features", None)
        d_out = getattr(module, "out_features", None)
        if isinstance(d_in, int) and isinstance(d_out, int) and d_in > 0 and d_out > 0:
            return d_in, d_out
        module = getattr(module, "base_layer", None)
        seen += 1
    return None


def float_dtype_of(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the first floating-point parameter of ``module`` (None if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def device_of(module: nn.Module) -> Optional[torch.device]:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def hidden_size_of(model: nn.Module, candidates: list) -> int:
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if isinstance(hidden, int):
        return hidden
    sizes = {linear_shape(m)[0] for _, _, m, _ in candidates}
    if len(sizes) != 1:
        raise ValueError(
            f"cannot infer the hidden size: the target modules have in_features {sorted(sizes)} "
            "and the model has no config.hidden_size"
        )
    return sizes.pop()


def modules_named(model: nn.Module, names: Sequence[str]) -> tuple[list, list]:
    """``([(parent, child name, child, path)] of every module named one of names,
    sorted names of the model's linear-like modules)``; never descends into a target."""
    found, linear_names = [], set()
    for path, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) or linear_shape(child) is not None:
                linear_names.add(child_name)
            if child_name in names:
                full = f"{path}.{child_name}" if path else child_name
                found.append((module, child_name, child, full))
    # A target inside another target (peft's q_proj.base_layer is not one, but a user's
    # wrapper could reuse a name): only the outermost is a target.
    paths = {f for _, _, _, f in found}
    found = [e for e in found if not any(e[3].startswith(p + ".") for p in paths)]
    return found, sorted(linear_names)


def find_linear_modules(model: nn.Module, target_modules: Sequence[str]) -> list:
    """``[(parent, child name, module, path)]`` of every linear projection whose last path
    component is in ``target_modules``: ``nn.Linear`` modules and linear-like ones (quantised
    linears, peft LoRA layers; anything declaring ``in_features``/``out_features``).

    Raises:
        ValueError: no module is named one of ``target_modules`` (the message lists the
            model's linear module names).
        TypeError: a module with a target name is not a linear projection.
    """
    found, linear_names = modules_named(model, tuple(target_modules))
    if not found:
        raise ValueError(
            f"no linear module of the model is named one of {list(target_modules)}; "
            f"its linear modules are named {linear_names or 'nothing'}"
        )
    not_linear = [
        f"{full} ({type(child).__name__})"
        for _, _, child, full in found
        if linear_shape(child) is None
    ]
    if not_linear:
        raise TypeError(
            f"target_modules name modules that are not linear projections: "
            f"{', '.join(not_linear[:4])}{' ...' if len(not_linear) > 4 else ''}"
        )
    return found


def find_target_modules(
    model: nn.Module, target_modules: Union[str, Sequence[str], None] = None
) -> list:
    """The projections :func:`apply_cora_to_llama` would patch, checked against the model.

    Args:
        model: the model to patch.
        target_modules: last path components (every one must name a module of the model, and
            every such module must read the hidden state); ``None`` (or the
            :data:`DEFAULT_TARGET_MODULES` object itself): the model's attention projections
            ``q_proj``, ``k_proj``, ``v_proj``, ``qkv_proj`` (Phi-3), ``o_proj`` that read
            the hidden state, with a warning naming any left out (Gemma 2's and Qwen3's
            ``o_proj`` read ``heads x head_dim`` features).

    Returns:
        ``[(parent, child name, module, path)]`` in model order.

    Raises:
        ValueError: a named target absent from the model, a target whose ``in_features`` is
            not the hidden size (one shared ``A_b`` of shape ``(hidden_size, rank)`` reads
            every target's input; e.g. ``down_proj``), or nothing to patch.
        TypeError: malformed ``target_modules`` or a target that is not a linear projection.
    """
    auto = target_modules is None or target_modules is DEFAULT_TARGET_MODULES
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    names = AUTO_TARGETS if auto else tuple(target_modules)
    if not names or not all(isinstance(t, str) for t in names):
        raise TypeError(
            f"target_modules must be a non-empty sequence of str, got {target_modules!r}"
        )
    found = find_linear_modules(model, names)
    present = {name for _, name, _, _ in found}
    missing = [n for n in names if n not in present]
    if missing and not auto:
        _, linear_names = modules_named(model, ())
        raise ValueError(
            f"target_modules {missing} match no module of the model; its linear modules are "
            f"named {linear_names}"
        )
    hidden = hidden_size_of(model, found)
    misfit: dict[str, str] = {}
    for _, name, child, full in found:
        d_in = linear_shape(child)[0]
        if d_in != hidden and name not in misfit:
            misfit[name] = f"{full} reads {d_in} features"
    if misfit and not auto:
        raise ValueError(
            f"{'; '.join(misfit.values())}, not the hidden size {hidden}: CoRA shares one A_b "
            f"of shape (hidden_size, rank) across the targets, so every target must read the "
            f"hidden state; leave {sorted(misfit)} out of target_modules"
        )
    if misfit:
        warnings.warn(
            f"CoRA leaves {sorted(misfit)} unpatched: {'; '.join(misfit.values())}, not the "
            f"hidden size {hidden} that the shared A_b reads",
            stacklevel=3,
        )
        found = [e for e in found if e[1] not in misfit]
        if not found:
            raise ValueError("no attention projection of the model reads the hidden state")
    return found


def adopt_base(owner: nn.Module, base: nn.Module, what: str) -> None:
    """Make ``owner`` (a patched projection) compute ``base``'s product: a plain float
    ``nn.Linear`` lends its ``weight``/``bias`` as they are; any other linear (quantised,
    peft-wrapped) is kept whole as ``owner.base_layer`` and run through its own forward.
    Sets ``owner.in_features``, ``owner.out_features`` and ``owner.wraps_module``."""
    shape = linear_shape(base)
    if shape is None:
        raise TypeError(
            f"{what}: {type(base).__name__} is not a linear projection (it declares no "
            "in_features/out_features)"
        )
    owner.in_features, owner.out_features = shape
    owner.wraps_module = not is_plain_linear(base)
    if owner.wraps_module:
        owner.base_layer = base
    else:
        owner.weight = base.weight
        owner.bias = base.bias


def default_lora_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of trainable low-rank factors beside ``base``: its float dtype when that is
    fp32 or fp64, else fp32 (16-bit and quantised bases train their factors in fp32)."""
    w_dtype = float_dtype_of(base)
    return w_dtype if w_dtype in (torch.float32, torch.float64) else torch.float32
