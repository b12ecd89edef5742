"""The shrink ``S = s x A_b`` alone: Triton's split-K shrink against its plain shrink (issue 16).

Methods (``op = "shrink"``, ``mode = "fwd"``, per-sample ``A``):

* ``triton[plain]``: one program per row tile and sample, all of K (the path before issue 16);
* ``triton[split-K]``: K split as the cost model sizes it for this GPU
  (:func:`llmrec_kernels.triton.dispatch.split_for_bandwidth`), partials summed in a fixed
  order by a second kernel, even where the dispatcher would keep the plain shrink;
* ``triton[auto]``: what the dispatcher launches (one of the two);
* ``torch[bmm]``: ``s * torch.bmm(x, A)`` upcast to fp32, the plain-PyTorch floor.

The predicted times of the first three are in ``python -m benchmarks --dispatch``; these rows
are what a GPU run measures against them. On a CPU only ``torch[bmm]`` runs.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks.methods import Case, MethodCase, Workload, _triton_skip_reason, error_fields
from benchmarks.roofline import Cost

__all__ = ["SHRINK_METHODS", "build_shrink_case"]

SHRINK_METHODS = ("triton[plain]", "triton[split-K]", "triton[auto]", "torch[bmm]")


def shrink_cost(batch: int, length: int, d_in: int, rank: int, elem: int) -> Cost:
    """Read x and every A_b once, write S (fp32)."""
    m = batch * length
    return Cost(
        flops=2.0 * m * d_in * rank,
        bytes=float(elem * (m * d_in + batch * d_in * rank) + 4 * m * rank),
    )


def _triton_calls(x, a, scaling) -> dict[str, Callable[[], torch.Tensor]]:
    from llmrec_kernels.triton import cora_linear as launcher
    from llmrec_kernels.triton import dispatch
    from llmrec_kernels.triton.configs import shrink_config

    batch, length, k = x.shape
    rank = a.shape[-1]
    padded = launcher._pad_rank(a)
    strides = launcher._a_strides(padded)
    key = launcher._key(x.dtype)
    gpu = launcher._gpu_spec(x)
    cfg = shrink_config(length, x.dtype, key[-1])  # key[-1]: batch-invariant mode
    forced = dispatch.split_for_bandwidth(batch, length, k, rank, x.dtype, cfg, gpu)

    def call(allow_split: bool, k_split=None):
        def run():
            s = torch.empty((batch, length, rank), dtype=torch.float32, device=x.device)
            launcher._shrink(x, padded, strides, s, scaling, key, gpu, allow_split, k_split)
            return s

        return run

    return {
        "triton[plain]": call(False),
        "triton[split-K]": call(True, forced),
        "triton[auto]": call(True),
    }


def build_shrink_case(wl: Workload, device: torch.device, mem_budget: int, seed: int = 0) -> Case:
    """Inputs and the methods' calls for a ``shrink`` workload."""
    dt, elem = wl.dtype, torch.tensor([], dtype=wl.dtype).element_size()
    batch, length, d_in, r = wl.B, wl.L, wl.d_in, wl.r
    need = (elem + 8) * (batch * length * d_in + batch * d_in * r)
    if need > mem_budget:
        return Case(wl, [], skip_reason=f"inputs need ~{need / 2**30:.1f} GiB, over the budget")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, length, d_in, generator=gen).to(device=device, dtype=dt)
    a = (torch.randn(batch, d_in, r, generator=gen) * d_in**-0.5).to(device=device, dtype=dt)
    scaling = 32.0 / r
    oracle: dict[str, torch.Tensor] = {}

    def get_oracle() -> torch.Tensor:
        if not oracle:
            oracle["s"] = scaling * torch.bmm(x.double(), a.double())
        return oracle["s"]

    calls: dict[str, Callable[[], torch.Tensor]] = {
        "torch[bmm]": lambda: (scaling * torch.bmm(x, a)).float()
    }
    reason = _triton_skip_reason(device)
    if reason is None:
        calls.update(_triton_calls(x, a, scaling))
    cost = shrink_cost(batch, length, d_in, r, elem)
    methods = []
    for name in SHRINK_METHODS:
        if name not in calls:
            methods.append(MethodCase(name, skip_reason=reason))
            continue
        fn = calls[name]

        def timed(fn=fn):
            with torch.no_grad():
                return fn()

        def check(fn=fn):
            return error_fields(timed(fn), get_oracle())

        backend = "triton" if name.startswith("triton") else "torch"
        methods.append(MethodCase(name, fn=timed, check=check, cost=cost, backend=backend))
    case = Case(wl, methods)
    case._keep.extend([x, a, oracle])
    return case
