"""Host (Python + dispatch) cost per call of ``fused_cora_linear``, in microseconds.

At decode (one token per sample) the GEMMs are tiny and a call's cost is the host's: argument
checks, backend resolution, the custom-op dispatch, tile-config choice and the kernel launch.
This module times that cost on decode-sized inputs, in ``torch.inference_mode``, against the
same maths as three plain PyTorch calls (``F.linear``, ``bmm``, ``addmm_``) and ``F.linear``
alone (the calls of a method run back to back inside one ``torch.inference_mode`` block, as
in a decode loop):

* ``plain3``: ``y = F.linear(x, W); s = bmm(x, A); y.addmm_(s, B^T, alpha=scale)``: the floor
  for the torch backend (what ``ours[torch]`` runs, without the wrapper);
* ``base``: ``F.linear(x, W)`` alone;
* ``ours[torch]``: ``fused_cora_linear(..., backend="torch")``, the whole public call;
* ``ours[triton]``: the Triton launcher's Python side (config choice, allocation, grid and
  argument packing) and its cached launches (:mod:`llmrec_kernels.triton.launch`: the cache
  key and the call into the compiled launcher) with compiled kernels that launch nothing
  (:func:`cached_noop_triton_launches`), so it runs on a CPU and measures only host work
  (the driver's launch is not included: it needs a GPU); on a GPU (``--device cuda``) the
  real launches run and the time is host time per call (no synchronisation inside the loop);
* ``ours[cuda]``: ``fused_cora_linear(..., backend="cuda")`` where the extension is built.

Run ``python -m benchmarks.host_overhead`` for a table; the suite's ``host`` op records the
same numbers (``host_us``) in its JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "HOST_SHAPES",
    "build_host_case",
    "cached_noop_triton_launches",
    "host_methods",
    "interleaved_host_us",
    "noop_triton_launches",
    "time_host_us",
]

# (B, L, d, r): decode batches; d small so the GEMMs cost next to nothing and host work shows.
HOST_SHAPES = ((1, 1, 64, 16), (32, 1, 64, 16), (1, 1, 1024, 16), (32, 1, 1024, 16))


def time_host_us(
    fn: Callable[[], object], calls: int = 200, repeats: int = 7, warmup: int = 20
) -> float:
    """Best over ``repeats`` loops of the mean wall-clock time per call of ``fn``, in us.

    Loops of ``calls`` back-to-back calls inside one ``torch.inference_mode`` block, as in a
    decode loop (no synchronisation: on a GPU this is the host's time to issue the work); the
    garbage collector is off inside a loop. The least disturbed loop
    is kept: on a shared machine other processes only ever add time.
    """
    per_call = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
    try:
        for _ in range(repeats):
            with torch.inference_mode():
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_call.append((time.perf_counter() - start) / calls * 1e6)
    finally:
        if was_enabled:
            gc.enable()
    return min(per_call)


class _NoOpKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return _noop


def _noop(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def noop_triton_launches() -> Iterator[object]:
    """Import the Triton launcher with every kernel launch replaced by a no-op; yield the module.

    The launcher chooses its tile configs from the GPU tables (the interpreter's are
    bypassed) so that the measured Python is the one a GPU run executes.
    """
    import os

    from llmrec_kernels.triton import cora_linear as launcher

    names = [n for n in dir(launcher) if n.startswith("_cora_") or n.endswith("_kernel")]
    saved = {n: getattr(launcher, n) for n in names}
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        for n in names:
            setattr(launcher, n, _NoOpKernel())
        yield launcher
    finally:
        for n, k in saved.items():
            setattr(launcher, n, k)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        clear = getattr(launcher, "clear_config_cache", None)
        if clear is not None:
            clear()


class _NoOpCompiled:
    """Stands in for a compiled Triton kernel: its launcher counts launches, runs nothing."""

    function = 0
    packed_metadata = None

    def __init__(self, launches: list):
        self.launches = launches

    def run(self, *args) -> None:
        self.launches.append(None)


class _Launches(list):
    """One entry per cached launch; ``jit_launches`` counts those that went through the JIT."""

    jit_launches = 0


@contextlib.contextmanager
def cached_noop_triton_launches() -> Iterator[tuple[object, _Launches]]:
    """Import the Triton launcher with every kernel a real ``JITFunction`` whose compiled
    kernel launches nothing, and the cached launch path on a stand-in CUDA device (stream
    0); yield ``(module, launches)``.

    What it measures is the host work of a GPU call whose compiled kernels are cached
    (:mod:`llmrec_kernels.triton.launch`): the launcher's Python, the cache key and the call
    into the compiled launcher, but not the driver's launch itself (it needs a GPU).
    """
    import os

    from triton.runtime.jit import JITFunction

    from llmrec_kernels.triton import cora_linear as launcher
    from llmrec_kernels.triton import launch as launch_mod

    launches = _Launches()
    compiled = _NoOpCompiled(launches)

    def jit_run(*args, grid, warmup, **kwargs):
        launches.jit_launches += 1
        return compiled

    names = [n for n in dir(launcher) if n.startswith("_cora_") or n.endswith("_kernel")]
    saved = {n: getattr(launcher, n) for n in names}
    saved_device = launch_mod._device_and_stream
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    launcher.clear_config_cache()
    try:
        for n in names:
            jit = JITFunction(getattr(saved[n], "fn", saved[n]))
            jit.run = jit_run  # shadows JITFunction.run, as the AOT tracer does
            setattr(launcher, n, jit)
        launch_mod._device_and_stream = lambda tensor: (0, 0)
        yield launcher, launches
    finally:
        for n, k in saved.items():
            setattr(launcher, n, k)
        launch_mod._device_and_stream = saved_device
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        launcher.clear_config_cache()


def _inputs(b: int, length: int, d: int, r: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return rand(b, length, d), rand(d, d) * d**-0.5, rand(b, d, r), rand(d, r)


def host_methods(
    b: int, length: int, d: int, r: int, dtype: torch.dtype, device: torch.device
) -> dict[str, tuple[Optional[Callable[[], object]], Optional[str]]]:
    """``{method: (fn, skip_reason)}``; ``fn`` runs one call in inference mode.

    ``ours[triton]`` on a CPU must be called inside :func:`cached_noop_triton_launches`.
    """
    from llmrec_kernels import fused_cora_linear

    x, w, a, bm = _inputs(b, length, d, r, dtype, device)
    s = 2.0

    def plain3():
        y = F.linear(x, w)
        sh = torch.bmm(x, a)
        y.view(-1, d).addmm_(sh.view(-1, r), bm.t(), alpha=s)
        return y

    def base():
        return F.linear(x, w)

    def ours(backend: str):
        def call():
            return fused_cora_linear(x, w, a, bm, None, s, backend=backend)

        return call

    out: dict[str, tuple[Optional[Callable[[], object]], Optional[str]]] = {
        "plain3": (plain3, None),
        "base": (base, None),
        "ours[torch]": (ours("torch"), None),
    }
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        out["ours[triton]"] = (None, "triton is not installed")
    elif device.type == "cuda":
        out["ours[triton]"] = (ours("triton"), None)
    else:

        def triton_host():
            from llmrec_kernels.triton import cora_linear as launcher

            return launcher.forward(x, w, a, bm, None, s)

        out["ours[triton]"] = (triton_host, None)
    if device.type == "cuda":
        from llmrec_kernels import _cuda

        reason = _cuda.unavailable_reason()
        out["ours[cuda]"] = (None, reason) if reason else (ours("cuda"), None)
    else:
        out["ours[cuda]"] = (None, "no GPU (the CUDA kernels need one)")
    return out


def interleaved_host_us(
    fns: dict[str, Callable[[], object]], calls: int = 100, repeats: int = 15
) -> dict[str, float]:
    """:func:`time_host_us` of several methods, their loops interleaved round by round.

    Every round times one loop of each method in turn, so background load hits them alike;
    the best loop of each is kept.
    """
    for fn in fns.values():
        time_host_us(fn, calls=1, repeats=1, warmup=20)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], time_host_us(fn, calls=calls, repeats=1, warmup=0))
    return best


def build_host_case(wl, device: torch.device, mem_budget: int = 0):
    """The suite's ``host`` op: a :class:`benchmarks.methods.Case` of the methods above.

    Each runnable method gets an error check against an fp64 computation; ``ours[triton]`` on
    a CPU is a skipped method whose ``host_fn`` (the launcher with no-op launches) the suite
    times inside :func:`cached_noop_triton_launches`.
    """
    from benchmarks.methods import Case, MethodCase, error_fields

    b, length, d, r = wl.B, wl.L, wl.d_in, wl.r
    methods = host_methods(b, length, d, r, wl.dtype, device)
    x, w, a, bm = _inputs(b, length, d, r, wl.dtype, device)
    x64, w64 = x.double(), w.double()
    y64 = F.linear(x64, w64) + 2.0 * torch.bmm(x64, a.double()) @ bm.double().t()
    base64 = F.linear(x64, w64)
    cases = []
    for name, (fn, reason) in methods.items():
        if fn is None:
            cases.append(MethodCase(name, skip_reason=reason))
            continue
        if name == "ours[triton]" and device.type != "cuda":
            cases.append(
                MethodCase(
                    name,
                    skip_reason="no GPU: host_us is the launcher's Python, cached no-op launches",
                    host_fn=fn,
                    backend="triton",
                )
            )
            continue
        ref = base64 if name == "base" else y64

        def check(_fn=fn, _ref=ref):
            return error_fields(_fn(), _ref)

        backend = name[len("ours[") : -1] if name.startswith("ours[") else None
        cases.append(MethodCase(name, fn=fn, check=check, backend=backend))
    return Case(wl, cases)


def measure(
    shapes=HOST_SHAPES, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[dict]:
    """One record per (shape, method): ``host_us`` or ``skip_reason``."""
    dev = torch.device(device)
    rows = []
    for b, length, d, r in shapes:
        methods = host_methods(b, length, d, r, dtype, dev)
        runnable = {name: fn for name, (fn, _) in methods.items() if fn is not None}
        guard = cached_noop_triton_launches() if dev.type == "cpu" else contextlib.nullcontext()
        with guard:
            times = interleaved_host_us(runnable)
        for name, (fn, reason) in methods.items():
            rec = {"B": b, "L": length, "d": d, "r": r, "method": name, "host_us": times.get(name)}
            if fn is None:
                rec["skip_reason"] = reason
            rows.append(rec)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(device=args.device)
    plain = {(r["B"], r["d"]): r["host_us"] for r in rows if r["method"] == "plain3"}
    print(f"{'B':>3} {'L':>2} {'d':>5} {'r':>3}  {'method':<13} {'host us':>8}  {'/plain3':>7}")
    for r in rows:
        us = r["host_us"]
        ratio = "" if us is None else f"{us / plain[(r['B'], r['d'])]:.2f}"
        val = "skip" if us is None else f"{us:.1f}"
        print(
            f"{r['B']:>3} {r['L']:>2} {r['d']:>5} {r['r']:>3}  {r['method']:<13} {val:>8}  {ratio:>7}"
        )


if __name__ == "__main__":
    main()
