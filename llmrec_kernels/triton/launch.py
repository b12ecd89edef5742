"""Cached Triton launches: after a kernel's first launch for a specialisation, its compiled
kernel's launcher is called directly (issue 25 item 4).

``kernel[grid](*args, **meta)`` goes through Triton's JIT launcher on every call: it binds the
arguments, specialises each one (dtype, 16-byte alignment of pointers, ``== 1`` and divisibility
by 16 of integers), builds and hashes a cache key, checks the kernel's global values, builds
launch metadata and only then calls the compiled kernel's C launcher. At decode that Python
is longer than the kernel (63-84 us per Triton call on an H200 against ~10 us of GPU work).

:func:`launch` keeps, per launch plan (:class:`LaunchMeta`, the cached compile-time kwargs of
one tile config), the compiled kernel of every specialisation it has met, under a key at
least as fine as Triton's specialisation, computed with C-level ``map``/``reduce`` calls:

* the tensors' dtypes, and whether every data pointer is 16-byte aligned (each pointer's low
  bits when one is not);
* the scalar arguments' values and types: a plan fixes the shapes, so the sizes and strides
  repeat call after call, and equal values specialise alike (Triton looks at ``== 1``,
  divisibility by 16 and the 32/64-bit range of integers);
* the per-call keyword arguments (``extra``: ``HAS_BIAS``, dropout's seed, offset and
  threshold) by name and by Triton's class of their values (``== 1``, divisible by 16,
  width), so a new dropout seed every step still hits;
* the kernel and the device.

The key is never coarser than Triton's (``tests/ops/test_triton_launch.py`` checks it against
Triton's own ``native_specialize_impl``), so a hit runs exactly the binary the JIT would pick.
A miss runs the JIT launcher (which compiles or finds the kernel and launches it) and records
the compiled kernel; the next call with that key calls its launcher with the argument list the
JIT would pass (every parameter in order, constexprs included).

The JIT launcher is kept (degrades) whenever the fast path could differ from it: under
``TRITON_INTERPRET=1`` (kernels are then ``InterpretedFunction``), for non-CUDA tensors (the
AOT tracer's meta tensors), for kernels that are not
plain ``JITFunction`` (the no-op and recording stand-ins of the host benchmarks and tests),
with launch hooks installed (profilers: the JIT builds their metadata), for plain-dict kwargs
(no plan to cache on), and when ``LLMREC_TRITON_LAUNCH_CACHE=0`` is set at import or inside
:func:`cached_launches(False) <cached_launches>`. Not covered: a change of Triton's global
knobs (``TRITON_DEBUG`` and the like) after the first launch, which the JIT would see.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
from collections.abc import Iterator
from typing import Any, Optional

import torch

try:  # the package imports without triton; then every launch is the plain call
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - exercised where triton is absent
    JITFunction = None
    _knobs = None

__all__ = [
    "LaunchMeta",
    "cached_launches",
    "cached_launches_enabled",
    "launch",
    "launcher_count",
    "specialisation_key",
]

# Kernel types whose compiled launchers may be called directly (tests add stand-ins).
FAST_KERNEL_TYPES: tuple = () if JITFunction is None else (JITFunction,)
_ENABLED = [os.environ.get("LLMREC_TRITON_LAUNCH_CACHE", "1") != "0"]
_MAX_LAUNCHERS = 64  # per plan: specialisations of one tile config are few
_EMPTY: dict = {}
_INT32_MIN, _INT32_MAX, _INT64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


class LaunchMeta(dict):
    """A launch plan's compile-time keyword arguments (``BLOCK_M=..``, ``num_warps=..``), and
    the compiled launches found for them (``launchers``, filled by :func:`launch`).

    Made once per cached plan (``functools.lru_cache`` in :mod:`llmrec_kernels.triton.
    cora_linear`): a cleared plan cache drops its launchers with it.
    """

    __slots__ = ("launchers",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.launchers: dict = {}


def cached_launches_enabled() -> bool:
    """Whether :func:`launch` may call compiled launchers directly."""
    return _ENABLED[0]


@contextlib.contextmanager
def cached_launches(enabled: bool = True) -> Iterator[None]:
    """Turn the cached launch path on or off inside the block (benchmarks compare both)."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def _int_class(v: int) -> str:
    if v == 1:
        return "one"  # Triton passes 1 as a compile-time constant
    width = "i32" if _INT32_MIN <= v <= _INT32_MAX else ("i64" if v <= _INT64_MAX else "u64")
    return width + ("D" if v % 16 == 0 else "")


def _value_classes(values) -> tuple:
    """Triton's classes of per-call values (dropout seeds change every step: keyed by class,
    not by value, so a new seed still hits)."""
    return tuple(
        _int_class(v) if type(v) is int else (type(v), None if type(v) is float else v)
        for v in values
    )


_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr


def specialisation_key(tensors: tuple, scalars: tuple, extra: dict) -> tuple:
    """A key never coarser than what Triton's JIT specialises a launch on (module docstring).

    ``tensors``: the leading pointer arguments; ``scalars``: the ints/floats that follow,
    keyed by value and type (a plan's shapes are fixed, so values repeat; ``True``, ``1`` and
    ``1.0`` are equal but typed apart); ``extra``: per-call kwargs, keyed by name and class.
    Built from C-level ``map``/``reduce`` calls: host time at decode.
    """
    align = functools.reduce(operator.or_, map(_DATA_PTR, tensors), 0) & 15
    if align:  # some pointer is not 16-byte aligned: which ones, exactly
        align = tuple([t.data_ptr() & 15 for t in tensors])
    return (
        tuple(map(_DTYPE, tensors)), align, scalars, tuple(map(type, scalars)),
        (tuple(extra), _value_classes(extra.values())) if extra else None,
    )  # fmt: skip


def _hooks_idle() -> bool:
    """True when no launch hook (profiler) is installed: the JIT would build no metadata."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _device_and_stream(tensor: torch.Tensor) -> Optional[tuple[int, int]]:
    """The current CUDA device and its current stream's handle (what Triton's driver reads);
    ``None`` when ``tensor`` (the launch's first argument) is not a CUDA tensor (the AOT
    tracer's meta tensors: the JIT path, which the tracer records)."""
    if not tensor.is_cuda:
        return None
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def _param_tail(kernel, n_args: int, meta: dict, extra: dict) -> Optional[tuple[list, list]]:
    """``(values, slots)`` of the parameters after the ``n_args`` positional ones: the fixed
    values (``meta`` entries, defaults) and ``(index, name)`` of each per-call ``extra`` one;
    ``None`` when a parameter has no value (the JIT would fail: leave it to the JIT)."""
    values, slots = [], []
    for i, param in enumerate(kernel.params[n_args:]):
        name = param.name
        if name in extra:
            values.append(None)
            slots.append((i, name))
        elif name in meta:
            values.append(meta[name])
        elif param.has_default:
            values.append(param.default)
        else:
            return None
    return values, slots


def _record(kernel, compiled, n_args: int, meta: LaunchMeta, extra: dict, key: tuple) -> None:
    """Keep ``compiled`` (the JIT's kernel for this launch) under ``key`` in ``meta``."""
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return  # a compile hook declined, or an asynchronous compile still running
    tail = _param_tail(kernel, n_args, meta, extra)
    if tail is None:
        return
    if len(meta.launchers) >= _MAX_LAUNCHERS:
        meta.launchers.clear()
    values, slots = tail
    meta.launchers[key] = (kernel, compiled.run, compiled.function, compiled.packed_metadata,
                           tuple(values), tuple(slots))  # fmt: skip


def launch(
    kernel: Any,
    grid: tuple,
    tensors: tuple,
    scalars: tuple,
    meta: dict,
    extra: Optional[dict] = None,
) -> None:
    """``kernel[grid](*tensors, *scalars, **extra, **meta)``, through the cached compiled
    launcher when it is known (module docstring).

    ``tensors``: the kernel's leading pointer parameters; ``scalars``: the int/float
    parameters that follow them, positionally; ``meta``: compile-time kwargs and launch
    options, a :class:`LaunchMeta` for the cache; ``extra``: per-call kwargs (``HAS_BIAS``,
    dropout's seed, offset and threshold), or ``None``.
    """
    extra = extra or _EMPTY
    device_stream = None
    if (
        _ENABLED[0]
        and type(meta) is LaunchMeta
        and isinstance(kernel, FAST_KERNEL_TYPES)
        and _hooks_idle()
    ):
        device_stream = _device_and_stream(tensors[0])
    if device_stream is None:
        kernel[grid](*tensors, *scalars, **extra, **meta)
        return
    device, stream = device_stream
    # id(): a JITFunction hashes its source's cache key (slow); the entry keeps the kernel,
    # so an id reused by another kernel object is caught below.
    key = (id(kernel), device, specialisation_key(tensors, scalars, extra))
    entry = meta.launchers.get(key)
    if entry is None or entry[0] is not kernel:
        compiled = kernel.run(*tensors, *scalars, grid=grid, warmup=False, **extra, **meta)
        _record(kernel, compiled, len(tensors) + len(scalars), meta, extra, key)
        return
    _, run, function, packed, tail, slots = entry
    if slots:
        tail = list(tail)
        for index, name in slots:
            tail[index] = extra[name]
    run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
        stream, function, packed, None, None, None, *tensors, *scalars, *tail,
    )  # fmt: skip


def launcher_count(meta: dict) -> int:
    """How many compiled launches ``meta`` holds (0 for a plain dict): for tests and reports."""
    return len(meta.launchers) if type(meta) is LaunchMeta else 0
