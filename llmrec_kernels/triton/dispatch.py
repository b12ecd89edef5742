"""The Triton backend's dispatcher: split-K or plain shrink, GEMM tiles by occupancy, a cost model.

No GPU has run these kernels yet; the choices follow a roofline model whose predictions are
what a GPU run (``benchmarks/gpu_check.sh``) checks. :func:`explain` returns the choice and
the predicted times for one shape on one GPU of :data:`GPUS`; ``python -m benchmarks
--dispatch`` prints the table below for the decode and prefill grid.

Cost model
----------
Each kernel costs ``launch + max(bytes / BW, flops / peak, latency)``:

* ``launch``: the GPU-side cost of one kernel in a back-to-back stream (launch, ramp-up,
  tail), :attr:`GpuSpec.launch_us` = 2 us. Host time is not in it: ``python -m
  benchmarks.host_overhead`` measures that, and at decode a CUDA graph (or the host running
  ahead) is what makes GPU time the bound;
* ``BW = min(HBM bandwidth, bytes in flight / latency)`` (Little's law, latency 0.6 us). A
  program streaming through a cp.async ring keeps ``min(stages - 1, steps)`` K-steps in
  flight; the resident programs (at most ``sm_count * 8`` for the shrink) add up. This is
  what makes the plain decode shrink slow: one program per sample keeps ~8.7 KB in flight
  (bf16, BLOCK_K 128, r 16), about 15 GB/s, where the H100's 3.35 TB/s needs ~2 MB;
* ``flops / peak``: the busiest SM runs ``ceil(CTAs / SMs)`` tiles, up to ``c`` at once
  (1 for 128 x 128, 2 below), at ``min(0.5, c * e)`` of its tensor-core peak, where a tile's
  own efficiency ``e = 0.5 * min(1, BM * BN / (BM + BN) / 64)`` (0.5 for 128 x 128, 0.25 for
  64 x 64: operand reuse per shared-memory byte). The ceiling 0.5, and the H200's launch
  (5 us) and latency (0.8 us), are fitted to the H200 run of 2026-11-30
  (``python -m benchmarks.calibrate_cost_model``: RMS log error 0.51 before, 0.16 after,
  ``benchmarks/results/cost-model-calibration-h200.txt``); the H100 and A100 keep the
  estimated 2 us and 0.6 us;
* the split-K shrink adds one launch of the fixed-order reduction, which reads and writes
  ``(SPLIT + 1) * M * R`` fp32 values.

The dispatcher splits K when the model predicts the split-K shrink (with its reduction) to be
faster than the plain one: the smallest split whose bytes in flight reach ``BW * latency``,
capped by the K-steps and by the resident programs. The GEMM tile follows the wave rule of
:func:`llmrec_kernels.triton.configs.gemm_gpu_config`. Batch-invariant mode instead fixes
the shrink to its 16-row tile and split-K with :data:`BATCH_INVARIANT_K_SPLIT` elements per
split (the plain shrink when ``K`` is no larger) and the GEMM to the largest tile (128 x 128
in 16-bit): the second table below gives its predicted cost.

Predictions (LLaMA-7B projection, K = N = 4096, r 16, bf16, per-sample A; ``op`` = shrink +
GEMM (+ reduction); ``old`` = the dispatcher before issue 16: plain shrink, fixed M classes):

.. code-block:: text

    gpu   shape                 M  GEMM tile  CTAs waves       shrink plain us chosen us     x  GEMM us  op old  op new     x
    -------------------------------------------------------------------------------------------------------------------------
    H100  decode 1x1            1      16x64    64  0.48 split 32x128     11.6       5.2  2.23     13.2    24.8    18.4  1.35
    H100  decode 32x1          32      32x64    64  0.48  split 8x512     11.6       5.9  1.95     15.5    27.1    21.4  1.26
    H100  decode 128x1        128      64x64   128  0.97 split 2x2048     11.6       9.9  1.17     20.0    49.6    29.9  1.66
    H100  prefill 8x256      2048    128x128   512  3.88 split 4x1024     18.4      10.1  1.82    145.9   164.3   156.0  1.05
    H100  prefill 32x512    16384    128x128  4096 31.03        plain     43.6      43.6  1.00   1153.0  1196.6  1196.6  1.00
    H200  decode 1x1            1      16x64    64  0.48 split 32x128     17.8      11.6  1.53     17.7    35.5    29.3  1.21
    H200  decode 32x1          32      32x64    64  0.48 split 16x256     17.8      11.7  1.52     18.5    36.3    30.2  1.20
    H200  decode 128x1        128      64x64   128  0.97 split 4x1024     17.8      14.5  1.23     23.0    58.8    37.5  1.57
    H200  prefill 8x256      2048    128x128   512  3.88  split 6x704     26.9      14.7  1.83    148.9   175.8   163.6  1.07
    H200  prefill 32x512    16384    128x128  4096 31.03        plain     34.1      34.1  1.00   1156.0  1190.0  1190.0  1.00
    A100  decode 1x1            1      16x64    64  0.59 split 32x128     11.6       5.2  2.23     31.2    42.8    36.4  1.18
    A100  decode 32x1          32      32x64    64  0.59  split 5x896     11.6       6.8  1.71     37.0    48.6    43.8  1.11
    A100  decode 128x1        128      64x64   128  1.19        plain     11.6      11.6  1.00     48.6   106.9    60.2  1.77
    A100  prefill 8x256      2048    128x128   512  4.74 split 2x2048     18.4      13.5  1.36    468.4   486.9   481.9  1.01
    A100  prefill 32x512    16384    128x128  4096 37.93        plain     70.4      70.4  1.00   3546.8  3617.1  3617.1  1.00

Batch-invariant mode (:func:`llmrec_kernels.batch_invariant`), H100; ``op old`` as above:

.. code-block:: text

    gpu   shape                 M  GEMM tile  CTAs waves       shrink plain us chosen us     x  GEMM us  op old  op new     x
    -------------------------------------------------------------------------------------------------------------------------
    H100  decode 1x1            1    128x128    32  0.24  split 8x512     11.6       5.8  2.00     38.0    24.8    43.8  0.57
    H100  decode 32x1          32    128x128    32  0.24  split 8x512     11.6       5.9  1.95     38.0    27.1    43.9  0.62
    H100  decode 128x1        128    128x128    32  0.24  split 8x512     11.6       9.9  1.17     38.0    49.6    47.9  1.03
    H100  prefill 8x256      2048    128x128   512  3.88  split 8x512     18.4      10.3  1.79    145.9   164.3   156.1  1.05
    H100  prefill 32x512    16384    128x128  4096 31.03  split 8x512     43.6      51.0  0.86   1153.0  1196.6  1203.9  0.99

Host side: the split-K path costs one more launch and one workspace allocation per call
(``python -m benchmarks.host_overhead``, no-op launches on a 2-core CPU: about +3.5 us over
the plain path's ~13 us; a real Triton launch costs more). Where the host bounds decode (no
CUDA graph, Python ahead of the GPU by less than a kernel), that can eat the GPU-side gain;
folding the fixed-order sum into the GEMM's epilogue (it reads S only there) would remove the
extra launch.

Uncertainty: outside the H200 the latency, the tile efficiencies and the launch cost are
estimates (the H200 fit reproduces its shrink and prefill times within -31%..+21%); the shrink times hinge on the latency (a 0.8 us latency lowers the plain decode
shrink's bandwidth by a quarter and raises its split-K speed-up accordingly), the prefill
GEMM times on the tile efficiency. What the model is confident about is the direction: at
decode the plain shrink is bound by bytes in flight, not by HBM.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

from llmrec_kernels.triton.configs import (
    GemmConfig,
    ShrinkConfig,
    _gemm_table,
    block_r,
    gemm_gpu_config,
    shrink_gpu_config,
)

__all__ = [
    "BATCH_INVARIANT_K_SPLIT",
    "GPUS",
    "Choice",
    "GpuSpec",
    "explain",
    "gpu_spec_for_device",
    "prediction_table",
    "shrink_split",
    "split_for_bandwidth",
]

# Batch-invariant mode: K elements per split, whatever M (a multiple of every BLOCK_K).
BATCH_INVARIANT_K_SPLIT = 512
# Resident shrink programs per SM the model assumes (the AOT table: 7-16 at rank 16, fewer at 128).
_SHRINK_CTAS_PER_SM = 8


@dataclasses.dataclass(frozen=True, eq=False)
class GpuSpec:
    """What the cost model needs of a GPU (dense peaks, SXM boards).

    Compared and hashed by identity (``eq=False``): launch plans are cached per spec, and a
    field-wise hash would cost the decode path a microsecond per call. Specs are singletons:
    :data:`GPUS` and one per device from :func:`gpu_spec_for_device`.
    """

    name: str
    arch: int
    sm_count: int
    hbm_gbps: float
    bf16_tflops: float
    fp32_tflops: float  # FMA units: IEEE fp32 dots
    latency_us: float = 0.6
    launch_us: float = 2.0

    @property
    def bytes_in_flight_needed(self) -> float:
        """Little's law: the bytes in flight that sustain the HBM bandwidth."""
        return self.hbm_gbps * 1e9 * self.latency_us * 1e-6


GPUS = {
    "A100": GpuSpec("A100-SXM4-80GB", 80, 108, 2039.0, 312.0, 19.5),
    "H100": GpuSpec("H100-SXM5", 90, 132, 3350.0, 989.0, 67.0),
    # Launch cost and latency fitted to the H200 run of 2026-11-30
    # (benchmarks/results/cost-model-calibration-h200.txt); the others are estimates.
    "H200": GpuSpec("H200-SXM", 90, 132, 4800.0, 989.0, 67.0, latency_us=0.8, launch_us=5.0),
}
# What the AOT check and the CPU path (no device to ask) size their grids for.
ARCH_DEFAULT = {80: GPUS["A100"], 90: GPUS["H100"]}
DEFAULT_GPU = GPUS["H100"]


@functools.cache
def gpu_spec_for_device(index: int) -> GpuSpec:
    """The spec of CUDA device ``index``: a known board by name, else H100-like per SM."""
    props = torch.cuda.get_device_properties(index)
    sms = props.multi_processor_count
    for key, spec in GPUS.items():
        if key in props.name:
            return dataclasses.replace(spec, sm_count=sms)
    base = DEFAULT_GPU
    return dataclasses.replace(
        base,
        name=props.name,
        arch=props.major * 10 + props.minor,
        sm_count=sms,
        hbm_gbps=base.hbm_gbps * sms / base.sm_count,
        bf16_tflops=base.bf16_tflops * sms / base.sm_count,
        fp32_tflops=base.fp32_tflops * sms / base.sm_count,
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _peak_tflops(gpu: GpuSpec, dtype: torch.dtype) -> float:
    return gpu.fp32_tflops if dtype == torch.float32 else gpu.bf16_tflops


def _kernel_us(gpu: GpuSpec, nbytes: float, inflight: float, flops_us: float) -> float:
    bw = min(gpu.hbm_gbps * 1e9, inflight / (gpu.latency_us * 1e-6))
    return gpu.launch_us + max(nbytes / bw * 1e6, flops_us, gpu.latency_us)


def shrink_us(
    groups: int,
    rows: int,
    k: int,
    rank: int,
    dtype: torch.dtype,
    cfg: ShrinkConfig,
    gpu: GpuSpec,
    k_split: int = 0,
    shared_a: bool = False,
) -> float:
    """Predicted GPU time of the shrink over ``groups`` samples of ``rows`` rows (us).

    ``k_split`` 0: the plain shrink; else split-K with ``k_split`` elements per split,
    reduction included.
    """
    e, br = _elem(dtype), block_r(rank)
    split = _cdiv(k, k_split) if k_split else 1
    steps = _cdiv(k_split if k_split else k, cfg.BLOCK_K)
    programs = _cdiv(rows, cfg.BLOCK_M) * groups * split
    step_bytes = cfg.BLOCK_K * (br + min(rows, cfg.BLOCK_M)) * e
    resident = min(programs, gpu.sm_count * _SHRINK_CTAS_PER_SM)
    inflight = resident * min(max(1, cfg.num_stages - 1), steps) * step_bytes
    m = groups * rows
    nbytes = m * k * e + (1 if shared_a else groups) * k * br * e + m * rank * 4
    flops = 2.0 * _cdiv(rows, cfg.BLOCK_M) * cfg.BLOCK_M * groups * k * br
    flops_us = flops / (_peak_tflops(gpu, dtype) * 1e6)
    t = _kernel_us(gpu, nbytes + (split * m * rank * 4 if k_split else 0), inflight, flops_us)
    if k_split:
        t += _kernel_us(gpu, (split + 1) * m * rank * 4, math.inf, 0.0)
    return t


# Fitted to the H200 run of 2026-11-30 (benchmarks/calibrate_cost_model.py): the Triton
# mainloop sustained about half of the tensor-core peak at prefill (it was assumed 0.8, which
# predicted wins that measured as losses).
_MAX_TILE_EFFICIENCY = 0.5


def _tile_efficiency(cfg: GemmConfig) -> float:
    """The fraction of an SM's tensor-core peak one CTA of this tile sustains alone."""
    reuse = cfg.BLOCK_M * cfg.BLOCK_N / (cfg.BLOCK_M + cfg.BLOCK_N)
    return _MAX_TILE_EFFICIENCY * min(1.0, reuse / 64)


def _gemm_ctas_per_sm(cfg: GemmConfig) -> int:
    """Resident CTAs per SM (the AOT table: 1 for 128 x 128 at 8 warps, 2 or more below)."""
    return 1 if cfg.BLOCK_M * cfg.BLOCK_N >= 128 * 128 else 2


def gemm_us(m: int, n: int, k: int, rank: int, dtype: torch.dtype, cfg: GemmConfig, gpu: GpuSpec):
    """Predicted GPU time of the forward GEMM with its low-rank epilogue (us), and its CTAs."""
    e = _elem(dtype)
    ctas = _cdiv(m, cfg.BLOCK_M) * _cdiv(n, cfg.BLOCK_N)
    steps = _cdiv(k, cfg.BLOCK_K)
    step_bytes = cfg.BLOCK_K * (min(m, cfg.BLOCK_M) + cfg.BLOCK_N) * e
    inflight = min(ctas, 2 * gpu.sm_count) * min(max(1, cfg.num_stages - 1), steps) * step_bytes
    nbytes = e * (m * k + n * k + m * n) + m * rank * 4 + n * block_r(rank) * e
    per_cta = 2.0 * cfg.BLOCK_M * cfg.BLOCK_N * (k + block_r(rank))
    # The busiest SM runs ceil(CTAs / SMs) tiles, up to _gemm_ctas_per_sm of them at once.
    per_sm = _cdiv(ctas, gpu.sm_count)
    concurrent = min(per_sm, _gemm_ctas_per_sm(cfg))
    rate = _peak_tflops(gpu, dtype) * 1e12 / gpu.sm_count
    rate *= min(_MAX_TILE_EFFICIENCY, concurrent * _tile_efficiency(cfg))
    flops_us = per_sm * per_cta / rate * 1e6
    return _kernel_us(gpu, nbytes, inflight, flops_us), ctas


@functools.lru_cache(maxsize=4096)
def shrink_split(
    groups: int,
    rows: int,
    k: int,
    rank: int,
    dtype: torch.dtype,
    cfg: ShrinkConfig,
    gpu: Optional[GpuSpec],
    batch_invariant: bool = False,
) -> int:
    """K elements per split of the forward shrink with tile ``cfg``; 0: the plain shrink.

    ``groups`` samples of ``rows`` rows each (rows already merged when A is shared); ``gpu``
    None (the interpreter, or no device to size for) keeps the plain shrink, except in
    batch-invariant mode, whose split depends on ``k`` and ``cfg`` alone.
    """
    if batch_invariant:
        k_split = _cdiv(BATCH_INVARIANT_K_SPLIT, cfg.BLOCK_K) * cfg.BLOCK_K
        return k_split if k > k_split else 0
    if gpu is None or k <= cfg.BLOCK_K:
        return 0
    k_split = split_for_bandwidth(groups, rows, k, rank, dtype, cfg, gpu)
    if k_split >= k:
        return 0
    plain = shrink_us(groups, rows, k, rank, dtype, cfg, gpu)
    split = shrink_us(groups, rows, k, rank, dtype, cfg, gpu, k_split)
    return k_split if split < plain else 0


def split_for_bandwidth(groups, rows, k, rank, dtype, cfg, gpu) -> int:
    """The largest K-slice (fewest splits) whose programs keep enough bytes in flight."""
    e, br = _elem(dtype), block_r(rank)
    row_tiles = _cdiv(rows, cfg.BLOCK_M) * groups
    step_bytes = cfg.BLOCK_K * (br + min(rows, cfg.BLOCK_M)) * e
    steps = _cdiv(k, cfg.BLOCK_K)
    need = gpu.bytes_in_flight_needed
    slots = gpu.sm_count * _SHRINK_CTAS_PER_SM
    best = cfg.BLOCK_K
    for steps_per_split in range(steps, 0, -1):
        split = _cdiv(steps, steps_per_split)
        if split > 1 and _cdiv(steps, split) != steps_per_split:
            continue  # the same split count as a larger slice
        programs = row_tiles * split
        inflight = (
            min(programs, slots) * min(max(1, cfg.num_stages - 1), steps_per_split) * step_bytes
        )
        if inflight >= need or programs >= slots:
            best = steps_per_split * cfg.BLOCK_K
            break
    return best


@dataclasses.dataclass(frozen=True)
class Choice:
    """The dispatcher's choice for one forward call and the model's predicted times (us)."""

    gpu: str
    batch: int
    length: int
    gemm: GemmConfig
    gemm_ctas: int
    gemm_waves: float
    shrink: ShrinkConfig
    split: int  # 1: the plain shrink
    k_split: int
    shrink_plain_us: float
    shrink_us: float
    gemm_us: float
    op_old_us: float
    op_us: float

    @property
    def shrink_speedup(self) -> float:
        return self.shrink_plain_us / self.shrink_us

    @property
    def op_speedup(self) -> float:
        return self.op_old_us / self.op_us


def explain(
    batch: int,
    length: int,
    d_in: int = 4096,
    d_out: int = 4096,
    rank: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    gpu: str | GpuSpec = "H100",
    shared_a: bool = False,
    batch_invariant: bool = False,
) -> Choice:
    """What the Triton backend's forward launches for ``x (batch, length, d_in)`` on ``gpu``.

    Returns the GEMM tile and grid, the shrink (plain or split-K, with the split), and the
    predicted times: the plain shrink, the chosen shrink, the GEMM, the whole op as the
    dispatcher before issue 16 ran it (plain shrink, fixed-M GEMM tile) and as it runs now.
    """
    spec = GPUS[gpu] if isinstance(gpu, str) else gpu
    rows = batch * length
    groups, per = (1, rows) if shared_a else (batch, length)
    cfg = shrink_gpu_config(per, dtype, batch_invariant)
    k_split = shrink_split(groups, per, d_in, rank, dtype, cfg, spec, batch_invariant)
    split = _cdiv(d_in, k_split) if k_split else 1
    plain_cfg = shrink_gpu_config(per, dtype)
    t_plain = shrink_us(groups, per, d_in, rank, dtype, plain_cfg, spec, 0, shared_a)
    t_shrink = shrink_us(groups, per, d_in, rank, dtype, cfg, spec, k_split, shared_a)
    gcfg = gemm_gpu_config("fwd", rows, dtype, rank, d_out, spec.sm_count, batch_invariant)
    t_gemm, ctas = gemm_us(rows, d_out, d_in, rank, dtype, gcfg, spec)
    old_cfg = next(c for mr, c in _gemm_table("fwd", dtype, block_r(rank)) if rows <= mr)
    t_gemm_old, _ = gemm_us(rows, d_out, d_in, rank, dtype, old_cfg, spec)
    return Choice(
        spec.name, batch, length, gcfg, ctas, ctas / spec.sm_count, cfg, split, k_split,
        t_plain, t_shrink, t_gemm, t_plain + t_gemm_old, t_shrink + t_gemm,
    )  # fmt: skip


# (label, batch, length): the decode and prefill grid of issue 16 (LLaMA-7B, r 16, bf16).
GRID = (("decode", 1, 1), ("decode", 32, 1), ("decode", 128, 1),
        ("prefill", 8, 256), ("prefill", 32, 512))  # fmt: skip


def prediction_table(
    gpus: tuple[str | GpuSpec, ...] = ("H100", "H200", "A100"),
    grid=GRID,
    batch_invariant: bool = False,
    **shape,
) -> str:
    """The dispatcher's choices and predicted times over ``grid``, one row per GPU and shape.

    ``gpus``: names of :data:`GPUS`, or specs (shown as ``this``: the local GPU).
    """
    head = (
        f"{'gpu':5} {'shape':16} {'M':>6} {'GEMM tile':>10} {'CTAs':>5} {'waves':>5} "
        f"{'shrink':>12} {'plain us':>8} {'chosen us':>9} {'x':>5} {'GEMM us':>8} "
        f"{'op old':>7} {'op new':>7} {'x':>5}"
    )
    lines = [head, "-" * len(head)]
    for g in gpus:
        name = g if isinstance(g, str) else "this"  # a GpuSpec: the local GPU
        for label, b, seq in grid:
            c = explain(b, seq, gpu=g, batch_invariant=batch_invariant, **shape)
            shrink = f"split {c.split}x{c.k_split}" if c.split > 1 else "plain"
            lines.append(
                f"{name:5} {f'{label} {b}x{seq}':16} {b * seq:6d} "
                f"{f'{c.gemm.BLOCK_M}x{c.gemm.BLOCK_N}':>10} {c.gemm_ctas:5d} "
                f"{c.gemm_waves:5.2f} {shrink:>12} {c.shrink_plain_us:8.1f} {c.shrink_us:9.1f} "
                f"{c.shrink_speedup:5.2f} {c.gemm_us:8.1f} {c.op_old_us:7.1f} {c.op_us:7.1f} "
                f"{c.op_speedup:5.2f}"
            )
    return "\n".join(lines)
