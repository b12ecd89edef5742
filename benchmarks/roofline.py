"""Roofline model: peak tables for GPUs and lower-bound FLOP/byte counts of the workloads.

``roofline_pct`` is the time a workload would take at the device's peak (the larger of its
compute time at peak FLOP/s and its memory time at peak bandwidth, from the lower-bound
counts below) as a percentage of the measured time: 100 means the kernel runs at the
roofline. The counts are those of the *op* (the minimum work of ``x W^T + s (x A_b) B^T``),
the same for every method, so a method that does more work (the naive dense per-sample
weights) shows a lower percentage rather than a higher FLOP rate.

CPUs have no entry: their ``roofline_pct`` is ``None`` with the reason in ``roofline_note``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "GPU_PEAKS",
    "Cost",
    "DevicePeak",
    "lookup_peak",
    "projection_cost",
    "roofline",
]


@dataclass(frozen=True)
class DevicePeak:
    """Published dense (no sparsity) peaks of one GPU model."""

    name: str
    bf16_tflops: float  # tensor-core bf16/fp16 with fp32 accumulation, dense
    tf32_tflops: float  # tensor-core tf32, dense
    fp32_tflops: float  # CUDA-core fp32 (non-tensor)
    bandwidth_tbs: float  # DRAM bandwidth, TB/s (1e12 bytes/s)

    def flops_per_s(self, dtype: torch.dtype, allow_tf32: bool = False) -> float:
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_tflops * 1e12
        if dtype == torch.float32:
            return (self.tf32_tflops if allow_tf32 else self.fp32_tflops) * 1e12
        raise KeyError(f"no peak for {dtype}")


# Vendor datasheet / whitepaper figures, dense (the sparsity figures are twice these).
# Matched against torch.cuda.get_device_name() in order: the first entry whose every
# keyword occurs in the name (case-insensitive) wins, so the more specific entries come first.
GPU_PEAKS: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    (("H200", "NVL"), DevicePeak("H200 NVL", 835.5, 417.5, 60.0, 4.8)),
    (("H200",), DevicePeak("H200 SXM", 989.4, 494.7, 66.9, 4.8)),
    (("H100", "PCIE"), DevicePeak("H100 PCIe", 756.0, 378.0, 51.2, 2.0)),
    (("H100", "NVL"), DevicePeak("H100 NVL", 835.5, 417.5, 60.0, 3.9)),
    (("H100",), DevicePeak("H100 SXM", 989.4, 494.7, 66.9, 3.35)),
    (("A100", "PCIE", "40GB"), DevicePeak("A100 PCIe 40GB", 312.0, 156.0, 19.5, 1.555)),
    (("A100", "PCIE"), DevicePeak("A100 PCIe 80GB", 312.0, 156.0, 19.5, 1.935)),
    (("A100", "40GB"), DevicePeak("A100 SXM 40GB", 312.0, 156.0, 19.5, 1.555)),
    (("A100",), DevicePeak("A100 SXM 80GB", 312.0, 156.0, 19.5, 2.039)),
    (("L40S",), DevicePeak("L40S", 362.05, 183.0, 91.6, 0.864)),
    (("4090",), DevicePeak("GeForce RTX 4090", 165.2, 82.6, 82.6, 1.008)),
)


def lookup_peak(device_name: str) -> Optional[DevicePeak]:
    """The peak entry for a ``torch.cuda.get_device_name()`` string, or ``None``."""
    upper = device_name.upper()
    for keywords, peak in GPU_PEAKS:
        if all(k in upper for k in keywords):
            return peak
    return None


@dataclass(frozen=True)
class Cost:
    """Lower-bound work of one call: FLOPs and DRAM bytes (each tensor read/written once)."""

    flops: float
    bytes: float


def projection_cost(
    batch: int,
    length: int,
    d_in: int,
    d_out: int,
    rank: int,
    elem_bytes: int,
    backward: bool = False,
    lowrank: bool = True,
    shared_a: bool = False,
) -> Cost:
    """FLOPs and bytes of ``y = x W^T + s (x A_b) B^T`` (docs/design.md §4), optionally + backward.

    Forward: ``2 M d_in d_out + 2 M r (d_in + d_out)`` FLOPs; bytes read W, x, A, B and write
    y. Backward with W frozen (gradients of x, A, B): ``dx = dy W + dS A^T``, ``dS = s dy B``,
    ``dA = x^T dS``, ``dB = s dy^T S``: ``2 M d_in d_out + 4 M r (d_in + d_out)`` FLOPs;
    bytes read dy, x, W, A, B and write dx, dA, dB. ``lowrank=False`` gives the base GEMM
    alone (``x W^T``, backward ``dx = dy W``).
    """
    m = batch * length
    n_a = 1 if shared_a else batch
    flops = 2.0 * m * d_in * d_out
    elems = d_in * d_out + m * d_in + m * d_out
    if lowrank:
        flops += 2.0 * m * rank * (d_in + d_out)
        elems += n_a * d_in * rank + rank * d_out
    if backward:
        flops += 2.0 * m * d_in * d_out
        elems += m * d_out + d_in * d_out + m * d_in  # read dy, W; write dx
        if lowrank:
            flops += 4.0 * m * rank * (d_in + d_out)
            # read x, A, B (again) and write dA, dB
            elems += m * d_in + 2 * (n_a * d_in * rank + rank * d_out)
    return Cost(flops=flops, bytes=float(elems * elem_bytes))


def roofline(
    cost: Cost,
    seconds: float,
    peak: Optional[DevicePeak],
    dtype: torch.dtype,
    allow_tf32: bool = False,
    measured_bandwidth_gbps: Optional[float] = None,
) -> tuple[Optional[float], str]:
    """``(roofline_pct, note)``; ``roofline_pct`` is ``None`` when there is no peak to compare.

    ``measured_bandwidth_gbps``: the bandwidth measured in the same run
    (:func:`benchmarks.timing.measure_bandwidth_gbps`), used instead of the data sheet's.
    """
    if peak is None:
        return None, "no peak table for this device (CPU or unknown GPU): roofline_pct not reported"
    try:
        flops_peak = peak.flops_per_s(dtype, allow_tf32)
    except KeyError:
        return None, f"no {peak.name} peak for {dtype}"
    t_compute = cost.flops / flops_peak
    bandwidth = (
        measured_bandwidth_gbps * 1e9 if measured_bandwidth_gbps else peak.bandwidth_tbs * 1e12
    )
    t_memory = cost.bytes / bandwidth
    bound = "compute" if t_compute >= t_memory else "memory"
    pct = 100.0 * max(t_compute, t_memory) / seconds
    where = "measured bandwidth" if measured_bandwidth_gbps else "peak"
    return pct, f"{bound}-bound at {peak.name} {where}"
