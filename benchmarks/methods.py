"""The methods compared on one CoRA projection, and the projection workloads' cases.

Methods (in table order):

* ``naive``: dense per-sample weights ``W + s B A_b^T``, one matmul per sample
  (:func:`llmrec_kernels.reference.cora_linear_naive`): the baseline.
* ``reference``: the reference CoRA code's way: ``F.linear(x, W, b)`` plus ``bmm`` of the
  fp32-upcast ``x`` with ``A_b`` and then ``B_m``, once per patched module, so on the fused
  q/k/v workload ``x`` is upcast and ``x A_b`` recomputed three times (docs/design.md §2).
  (For fp32 inputs ``x.float()`` is a no-op: the upcast costs nothing on the CPU fp32 runs.)
* ``factored``: the unfused factored PyTorch form
  (:func:`llmrec_kernels.reference.cora_linear_factored`).
* ``ours[triton]``, ``ours[cuda]``, ``ours[torch]``: :func:`llmrec_kernels.fused_cora_linear`
  with each backend forced (``auto`` resolves to ``torch`` on a GPU and on a CPU);
  on the q/k/v workload one call over the concatenated ``[W_q; W_k; W_v]`` with one shared
  shrink, split afterwards.
* ``base``: the base GEMM alone, ``x W^T`` (the floor the delta should cost little above).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from benchmarks.roofline import Cost, projection_cost
from llmrec_kernels import fused_cora_linear
from llmrec_kernels.reference import cora_linear_factored, cora_linear_naive

__all__ = [
    "METHODS",
    "Case",
    "MethodCase",
    "Workload",
    "build_projection_case",
    "error_fields",
    "max_rel_err",
    "reference_way",
]

NAIVE, REFERENCE, FACTORED, BASE = "naive", "reference", "factored", "base"
OURS = ("ours[triton]", "ours[cuda]", "ours[torch]")
METHODS = (NAIVE, REFERENCE, FACTORED, *OURS, BASE)

Outputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Workload:
    """One benchmarked configuration.

    ``op``: ``proj`` (one d x d projection: any of q/k/v/o of LLaMA-7B), ``qkv`` (q, k and v
    fused, ``d_out = 3 d``), ``decoder_layer`` (one patched LLaMA decoder layer) or
    ``scoring`` (CoRA scoring of a small patched model). ``mode``: ``fwd`` (inference forward,
    no autograd), ``fwd_bwd`` (forward and backward to x, A and B; W frozen) or ``score``.
    """

    op: str
    mode: str
    B: int
    L: int
    d_in: int
    d_out: int
    r: int
    dtype: torch.dtype
    extra: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.op} {self.mode} B={self.B} L={self.L} d={self.d_in}->{self.d_out} r={self.r}"

    def get(self, key: str, default=None):
        return dict(self.extra).get(key, default)


@dataclass
class MethodCase:
    """One method on one workload: the timed call, or why it cannot run."""

    name: str
    fn: Optional[Callable[[], object]] = None
    skip_reason: Optional[str] = None
    check: Optional[Callable[[], dict]] = None  # -> {"max_abs_err": ..., "max_rel_err": ...}
    # Host cost only (the ``host`` op): a call to time when ``fn`` cannot run here, e.g. the
    # Triton launcher with no-op launches on a CPU (see benchmarks.host_overhead).
    host_fn: Optional[Callable[[], object]] = None
    cost: Optional[Cost] = None
    backend: Optional[str] = None
    items_per_call: Optional[int] = None  # samples per call, for throughput workloads


@dataclass
class Case:
    """The methods of one workload, built on one device; ``close()`` frees the inputs."""

    workload: Workload
    methods: list[MethodCase]
    skip_reason: Optional[str] = None
    _keep: list = field(default_factory=list)

    def close(self) -> None:
        self.methods.clear()
        self._keep.clear()


def reference_way(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    splits: tuple[int, ...],
    scaling: float,
) -> tuple[torch.Tensor, ...]:
    """The reference CoRA code's patched linear, once per module of ``splits``.

    Each module ``m`` computes ``F.linear(x, W_m) + s * (bmm(x.float(), A_b) @ B_m^T)``
    with the low-rank branch in fp32 (``x`` upcast in every module, ``x A_b`` recomputed by
    every module) and the result cast back to ``x``'s dtype.
    """
    outs = []
    a32 = lora_a.float()
    start = 0
    for n in splits:
        w_m, b_m = weight[start : start + n], lora_b[start : start + n]
        y = F.linear(x, w_m)
        x32 = x.float()
        delta = torch.bmm(x32, a32) if a32.dim() == 3 else torch.matmul(x32, a32)
        delta = F.linear(delta, b_m.float()) * scaling
        outs.append(y + delta.to(y.dtype))
        start += n
    return tuple(outs)


def _as_tensor(out: Outputs) -> torch.Tensor:
    return torch.cat(out, dim=-1) if isinstance(out, tuple) else out


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max().item())


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref| / max |ref|``: the error relative to the fp64 result's scale.

    An absolute error means nothing without the scale of the values (bf16 gradients of
    magnitude 1e4 are off by 10 at best); this is what the tables print.
    """
    ref = ref.double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return _max_abs(a, ref) / (scale if scale > 0 else 1.0)


def error_fields(y, ref_y, grads=(), ref_grads=()) -> dict:
    """``max_abs_err``/``max_rel_err`` of ``y``, and ``*_grad`` (worst over the gradients)."""
    out = {"max_abs_err": _max_abs(y, ref_y), "max_rel_err": max_rel_err(y, ref_y)}
    pairs = list(zip(grads, ref_grads))
    if pairs:
        out["max_abs_err_grad"] = max(_max_abs(g, rg) for g, rg in pairs)
        out["max_rel_err_grad"] = max(max_rel_err(g, rg) for g, rg in pairs)
    return out


def _triton_skip_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "no GPU (Triton's CPU interpreter is not a performance path)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("llmrec_kernels.triton.cora_linear") is None:
        return "llmrec_kernels.triton.cora_linear does not exist yet"
    return None


def _cuda_skip_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "no GPU (the CUDA kernels need one)"
    from llmrec_kernels import _cuda

    return _cuda.unavailable_reason()


def ours_skip_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``fused_cora_linear(backend=...)`` cannot be benchmarked here, or ``None``."""
    if backend == "triton":
        return _triton_skip_reason(device)
    if backend == "cuda":
        return _cuda_skip_reason(device)
    return None


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (GPU: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def build_projection_case(
    wl: Workload, device: torch.device, mem_budget: int, seed: int = 0
) -> Case:
    """Inputs and the methods' calls for a ``proj`` or ``qkv`` workload."""
    dt, elem = wl.dtype, torch.tensor([], dtype=wl.dtype).element_size()
    batch, length, d_in, d_out, r = wl.B, wl.L, wl.d_in, wl.d_out, wl.r
    splits = (d_out // 3,) * 3 if wl.op == "qkv" else (d_out,)
    backward = wl.mode == "fwd_bwd"
    scaling = 32.0 / r  # alpha 32, as in the reference (s = 2 at r = 16)
    m = batch * length

    # Memory: the inputs, outputs and gradients every method needs, and fp64 copies for
    # the error check; the naive method also holds dense per-sample weights.
    common = elem * (d_in * d_out + batch * d_in * r + d_out * r + 2 * m * (d_in + d_out))
    common += 8 * (d_in * d_out + batch * d_in * r + 2 * m * (d_in + d_out))
    if common > mem_budget:
        return Case(
            wl, [], skip_reason=f"inputs need ~{_gib(common)}, over the {_gib(mem_budget)} budget"
        )

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dt)

    x = rand(batch, length, d_in)
    weight = rand(d_out, d_in, std=d_in**-0.5)
    # A_b as the generator makes it: an L2-normalised d_in*r vector per sample
    lora_a = torch.randn(batch, d_in * r, generator=gen)
    lora_a = torch.nn.functional.normalize(lora_a, dim=1).reshape(batch, d_in, r)
    lora_a = lora_a.to(device=device, dtype=dt)
    lora_b = rand(d_out, r, std=0.5)
    dy = rand(batch, length, d_out) if backward else None

    impls: dict[str, Callable[..., Outputs]] = {
        NAIVE: lambda x_, a_, b_: cora_linear_naive(x_, weight, a_, b_, None, scaling),
        REFERENCE: lambda x_, a_, b_: reference_way(x_, weight, a_, b_, splits, scaling),
        FACTORED: lambda x_, a_, b_: cora_linear_factored(x_, weight, a_, b_, None, scaling),
        BASE: lambda x_, a_, b_: F.linear(x_, weight),
    }
    for name in OURS:
        backend = name[len("ours[") : -1]

        def ours(x_, a_, b_, _backend=backend):
            y = fused_cora_linear(x_, weight, a_, b_, None, scaling, backend=_backend)
            return y.split(splits, dim=-1) if len(splits) > 1 else y

        impls[name] = ours

    # fp64 oracle, computed once on first use
    oracle: dict[str, object] = {}

    def get_oracle():
        if not oracle:
            x64, w64 = x.double(), weight.double()
            a64, b64 = lora_a.double(), lora_b.double()
            if backward:
                x64.requires_grad_(True)
                a64.requires_grad_(True)
                b64.requires_grad_(True)
            with torch.set_grad_enabled(backward):
                y64 = cora_linear_factored(x64, w64, a64, b64, None, scaling)
                base64 = F.linear(x64, w64)
            oracle["y"], oracle["base"] = y64.detach(), base64.detach()
            if backward:
                oracle["grads"] = [
                    g.detach() for g in torch.autograd.grad(y64, (x64, a64, b64), dy.double())
                ]
                oracle["base_grads"] = [(dy.double() @ w64).detach()]
        return oracle

    def make_call(name: str) -> tuple[Callable[[], object], Callable[[], dict]]:
        impl = impls[name]
        if not backward:

            def fwd():
                with torch.no_grad():
                    return impl(x, lora_a, lora_b)

            def check():
                ref = get_oracle()["base" if name == BASE else "y"]
                return error_fields(_as_tensor(fwd()), ref)

            return fwd, check

        xg = x.detach().clone().requires_grad_(True)
        ag = lora_a.detach().clone().requires_grad_(name != BASE)
        bg = lora_b.detach().clone().requires_grad_(name != BASE)
        leaves = (xg,) if name == BASE else (xg, ag, bg)
        dys = dy.split(splits, dim=-1) if len(splits) > 1 else dy

        def fwd_bwd_with_y():
            y = impl(xg, ag, bg)
            grads = torch.autograd.grad(y, leaves, dys if isinstance(y, tuple) else dy)
            return y, grads

        def fwd_bwd():
            return fwd_bwd_with_y()[1]

        def check():
            y, grads = fwd_bwd_with_y()
            o = get_oracle()
            ref_y = o["base" if name == BASE else "y"]
            ref_g = o["base_grads" if name == BASE else "grads"]
            return error_fields(_as_tensor(y).detach(), ref_y, grads, ref_g)

        return fwd_bwd, check

    cost_full = projection_cost(batch, length, d_in, d_out, r, elem, backward=backward)
    cost_base = projection_cost(batch, length, d_in, d_out, r, elem, backward, lowrank=False)
    # naive holds one dense (d_out, d_in) weight per sample for autograd (two in flight
    # in the forward alone), plus its per-sample outputs
    naive_mem = common + elem * d_out * d_in * (2 * batch if backward else 2) + elem * m * d_out

    methods = []
    for name in METHODS:
        reason = None
        if name.startswith("ours["):
            reason = ours_skip_reason(name[len("ours[") : -1], device)
        elif name == NAIVE and naive_mem > mem_budget:
            reason = (
                f"dense per-sample weights need ~{_gib(naive_mem)}, over the "
                f"{_gib(mem_budget)} memory budget"
            )
        if reason is not None:
            methods.append(MethodCase(name, skip_reason=reason))
            continue
        fn, check = make_call(name)
        backend = name[len("ours[") : -1] if name.startswith("ours[") else None
        methods.append(
            MethodCase(
                name,
                fn=fn,
                check=check,
                cost=cost_base if name == BASE else cost_full,
                backend=backend,
            )
        )
    case = Case(wl, methods)
    case._keep.extend([x, weight, lora_a, lora_b, dy, oracle])
    return case
