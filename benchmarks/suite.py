"""The benchmark runner: workload grids, measurement of every method, JSON-ready records."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from benchmarks import methods as M
from benchmarks.methods import Case, MethodCase, Workload, available_memory_bytes
from benchmarks.roofline import lookup_peak, roofline
from benchmarks.timing import (
    OthersCpuMonitor,
    Timing,
    cpu_busy_fraction,
    measure_bandwidth_gbps,
    peak_memory_mb,
    time_cpu_interleaved,
    time_gpu,
    time_gpu_graph,
    time_gpu_interleaved,
    time_host_us,
    wait_for_idle,
)

__all__ = [
    "SuiteConfig",
    "default_workloads",
    "machine_label",
    "run_suite",
    "tiny_workloads",
]

GPU_SHAPES = {
    "d": 4096,
    "ffn": 11008,
    "heads": 32,
    "bl": ((1, 1), (32, 1), (128, 1), (8, 256), (32, 512)),
}
CPU_SHAPES = {
    "d": 1024,
    "ffn": 2752,
    "heads": 8,
    "bl": ((1, 1), (32, 1), (128, 1), (8, 64), (32, 128)),
}
RANKS = (8, 16, 64)


@dataclass
class SuiteConfig:
    """What to run and how long to time it."""

    device: torch.device
    dtype: torch.dtype
    workloads: list[Workload]
    quick: bool = False
    preset: str = "full"
    cpu_budget_s: float = 2.0  # CPU: seconds of interleaved rounds per workload
    cpu_min_rounds: int = 5
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0
    gpu_reps: int = 50  # interleaved repetitions per method (each after an L2 flush)
    host_calls: int = 20  # back-to-back calls per host-time loop
    measured_bandwidth_gbps: Optional[float] = None  # set by run_suite on a GPU
    mem_fraction: float = 0.5  # of the free memory, for the skip-if-too-big estimates
    wait_idle_s: float = 0.0  # CPU: wait up to this long for other processes to go quiet
    idle_threshold: float = 0.25
    cpu_retries: int = 3  # with wait_idle_s > 0: re-time a workload disturbed by others
    progress: bool = True
    extra_meta: dict = field(default_factory=dict)


def _shapes(device: torch.device) -> dict:
    return GPU_SHAPES if device.type == "cuda" else CPU_SHAPES


def tiny_workloads(dtype: torch.dtype) -> list[Workload]:
    """Toy shapes (d 64) covering every op and mode: a seconds-long end-to-end smoke run."""
    layer = (("ffn", 128), ("heads", 4))
    scoring = (("ffn", 128), ("heads", 4), ("layers", 2), ("vocab", 256), ("cf_dim", 16))
    return [
        Workload("host", "fwd", 1, 1, 64, 64, 4, dtype),
        Workload("proj", "fwd", 1, 1, 64, 64, 4, dtype),
        Workload("proj", "fwd", 4, 1, 64, 64, 4, dtype),
        Workload("shrink", "fwd", 4, 1, 64, 64, 4, dtype),
        Workload("proj", "fwd_bwd", 2, 8, 64, 64, 4, dtype),
        Workload("qkv", "fwd", 2, 8, 64, 192, 4, dtype),
        Workload("decoder_layer", "fwd_bwd", 2, 8, 64, 64, 4, dtype, layer),
        Workload("scoring", "score", 2, 8, 64, 64, 4, dtype, scoring),
    ]


# The projection workloads of issue 25's "Done when" list, each tagged with its role (the
# summary of benchmarks/gpu_check.sh finds its records by it): (op, mode, B, L) at d 4096 on
# a GPU, and toy sizes of the same kinds for the CPU dry run.
GPU_CHECK_ROLES = {
    "prefill_32x512": (("proj", "fwd", 32, 512), ("proj", "fwd", 4, 32)),
    "prefill_8x256": (("proj", "fwd", 8, 256), ("proj", "fwd", 2, 16)),
    "train_8x256": (("proj", "fwd_bwd", 8, 256), ("proj", "fwd_bwd", 2, 16)),
    "decode_b32": (("proj", "fwd", 32, 1), ("proj", "fwd", 4, 1)),
    "decode_b32_qkv": (("qkv", "fwd", 32, 1), ("qkv", "fwd", 4, 1)),
    "layer_8x256": (("decoder_layer", "fwd_bwd", 8, 256), ("decoder_layer", "fwd_bwd", 2, 8)),
    "shrink_b32": (("shrink", "fwd", 32, 1), ("shrink", "fwd", 4, 1)),
    "shrink_8x256": (("shrink", "fwd", 8, 256), ("shrink", "fwd", 2, 16)),
}


def gpu_check_workloads(dtype: torch.dtype, tiny: bool = False) -> list[Workload]:
    """The GPU check's workloads (bf16 r 16 d 4096 on a GPU; d 64 r 4 with ``tiny``)."""
    d, r = (64, 4) if tiny else (GPU_SHAPES["d"], 16)
    ffn, heads = (128, 4) if tiny else (GPU_SHAPES["ffn"], GPU_SHAPES["heads"])
    out = []
    for role, (full, toy) in GPU_CHECK_ROLES.items():
        op, mode, b, length = toy if tiny else full
        extra: tuple = (("role", role),)
        if op == "decoder_layer":
            extra += (("ffn", ffn), ("heads", heads))
        d_out = 3 * d if op == "qkv" else d
        out.append(Workload(op, mode, b, length, d, d_out, r, dtype, extra))
    return out


def default_workloads(
    device: torch.device, dtype: torch.dtype, quick: bool = False, tiny: bool = False
) -> list[Workload]:
    """The grid: LLaMA-7B shapes on a GPU, scaled down (d 1024, L / 4) on a CPU."""
    if tiny:
        return tiny_workloads(dtype)
    sh = _shapes(device)
    d, bls = sh["d"], sh["bl"]
    decode_b32, prefill_b8 = bls[1], bls[3]
    layer_extra = (("ffn", sh["ffn"]), ("heads", sh["heads"]))
    out: list[Workload] = []
    # Host cost per call at decode: d 64 (the GEMMs cost next to nothing) and the model's d.
    for host_d in (64, d):
        for bl in bls[:2]:
            out.append(Workload("host", "fwd", bl[0], bl[1], host_d, host_d, 16, dtype))

    def proj(op, mode, bl, r):
        d_out = 3 * d if op == "qkv" else d
        out.append(Workload(op, mode, bl[0], bl[1], d, d_out, r, dtype))

    # The shrink alone: Triton's split-K against its plain shrink over the decode and
    # prefill grid (issue 16; predictions: python -m benchmarks --dispatch).
    for bl in bls:
        out.append(Workload("shrink", "fwd", bl[0], bl[1], d, d, 16, dtype))

    if quick:
        for bl in bls:
            proj("proj", "fwd", bl, 16)
        for bl in (decode_b32, prefill_b8):
            proj("proj", "fwd_bwd", bl, 16)
            proj("qkv", "fwd", bl, 16)
        proj("qkv", "fwd_bwd", prefill_b8, 16)
        layer_bls = (prefill_b8,)
    else:
        for op in ("proj", "qkv"):
            for mode in ("fwd", "fwd_bwd"):
                for r in RANKS:
                    for bl in bls:
                        proj(op, mode, bl, r)
        layer_bls = (prefill_b8, bls[4])
    for bl in layer_bls:
        out.append(Workload("decoder_layer", "fwd_bwd", bl[0], bl[1], d, d, 16, dtype, layer_extra))
    from benchmarks import model_workloads

    out.extend(model_workloads.scoring_workloads(device, dtype, quick))
    return out


def machine_label(device: torch.device) -> str:
    """Short machine name for result files: ``cpu-2core`` or the GPU's name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")
    return f"cpu-{os.cpu_count()}core"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=5,
        )  # fmt: skip
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty() -> Optional[bool]:
    """True when the kernel package has uncommitted changes (the run measured those)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        res = subprocess.run(
            ["git", "status", "--porcelain", "--", "llmrec_kernels", "python", "csrc"],
            cwd=root, capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return bool(res.stdout.strip()) if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages (other processes competing for the CPU), if known."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def _build_case(wl: Workload, device: torch.device, mem_budget: int) -> Case:
    if wl.op in ("proj", "qkv"):
        return M.build_projection_case(wl, device, mem_budget)
    if wl.op == "host":
        from benchmarks import host_overhead

        return host_overhead.build_host_case(wl, device, mem_budget)
    if wl.op == "shrink":
        from benchmarks import shrink_workloads

        return shrink_workloads.build_shrink_case(wl, device, mem_budget)
    from benchmarks import model_workloads

    if wl.op == "decoder_layer":
        return model_workloads.build_decoder_layer_case(wl, device, mem_budget)
    if wl.op == "scoring":
        return model_workloads.build_scoring_case(wl, device, mem_budget)
    raise ValueError(f"unknown op {wl.op!r}")


def _base_record(wl: Workload, device_name: str, method: str) -> dict:
    return {
        "op": wl.op,
        "mode": wl.mode,
        "method": method,
        "backend": None,
        "B": wl.B,
        "L": wl.L,
        "d_in": wl.d_in,
        "d_out": wl.d_out,
        "r": wl.r,
        "dtype": str(wl.dtype).replace("torch.", ""),
        "device": device_name,
        "status": "skipped",
        "skip_reason": None,
        "median_ms": None,
        "p25_ms": None,
        "p75_ms": None,
        "min_ms": None,
        "reps": 0,
        "tflops": None,
        "gbps": None,
        "roofline_pct": None,
        "roofline_note": None,
        "peak_mem_mb": None,
        "max_abs_err": None,
        "max_abs_err_grad": None,
        "max_rel_err": None,  # max |err| / max |fp64 result|: what the table prints
        "max_rel_err_grad": None,
        "host_us": None,  # the host op: wall-clock us per call (see benchmarks.host_overhead)
        "samples_per_s": None,
        "x_base": None,
        "speedup_vs_naive": None,
        **{k: v for k, v in wl.extra},
    }


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def _measure_host(case: Case, runnable: dict, recs: dict, cfg: SuiteConfig) -> None:
    """The ``host`` op: us per call of every method (interleaved loops, the best kept)."""
    import contextlib

    from benchmarks import host_overhead

    rounds = max(cfg.cpu_min_rounds, 15)
    times = host_overhead.interleaved_host_us(
        {n: mc.fn for n, mc in runnable.items()}, calls=100, repeats=rounds
    )
    host_only = {mc.name: mc.host_fn for mc in case.methods if mc.fn is None and mc.host_fn}
    if host_only:
        guard = (
            host_overhead.cached_noop_triton_launches()
            if cfg.device.type == "cpu"
            else contextlib.nullcontext()
        )
        with guard:
            times.update(host_overhead.interleaved_host_us(host_only, calls=100, repeats=rounds))
    for name, us in times.items():
        rec = recs[name]
        rec["host_us"] = us
        if name in runnable:
            rec["status"] = "ok"
            rec["median_ms"] = rec["min_ms"] = rec["p25_ms"] = rec["p75_ms"] = us / 1e3
            rec["reps"] = rounds
            rec["roofline_note"] = "host cost only: no FLOP/byte model"


def _measure_gpu(case: Case, runnable: dict, recs: dict, timings: dict, cfg: SuiteConfig) -> None:
    """GPU time of every runnable method, interleaved within each repetition (L2 flushed,
    CUDA events; issue 25), then per method its host time per call and, for inference
    forwards, its GPU time under CUDA-graph replay, the two reported apart."""
    try:
        timings.update(
            time_gpu_interleaved({n: mc.fn for n, mc in runnable.items()}, reps=cfg.gpu_reps)
        )
    except Exception:
        # One method failing inside the interleaved loop must not lose the others: time
        # each alone, recording which one fails.
        for name, mc in runnable.items():
            try:
                timings[name] = time_gpu(mc.fn, cfg.gpu_warmup_ms, cfg.gpu_rep_ms)
            except Exception as exc:
                recs[name]["status"] = "error"
                recs[name]["skip_reason"] = f"failed while timing: {_short(exc)}"
    graphable = case.workload.mode == "fwd" and case.workload.op in ("proj", "qkv", "shrink")
    for name in timings:
        mc, rec = runnable[name], recs[name]
        rec["host_us_per_call"] = time_host_us(mc.fn, calls=cfg.host_calls, repeats=3)
        if name == "ours[triton]":  # the same calls through Triton's JIT launcher (item 4)
            from llmrec_kernels.triton.launch import cached_launches

            with cached_launches(False):
                rec["host_us_per_call_jit"] = time_host_us(mc.fn, calls=cfg.host_calls, repeats=3)
        rec["graph_ms"] = None
        if graphable:
            try:
                rec["graph_ms"] = time_gpu_graph(mc.fn).median_ms
            except Exception as exc:  # not capturable: say so, keep the eager numbers
                rec["graph_note"] = f"not capturable: {_short(exc)}"


def _measure_case(case: Case, cfg: SuiteConfig, device_name: str, peak, allow_tf32) -> list[dict]:
    wl = case.workload
    recs: dict[str, dict] = {}
    runnable: dict[str, MethodCase] = {}
    for mc in case.methods:
        rec = _base_record(wl, device_name, mc.name)
        rec["backend"] = mc.backend
        recs[mc.name] = rec
        if mc.fn is None:
            rec["skip_reason"] = mc.skip_reason or "not runnable here"
            continue
        try:
            if mc.check is not None:
                rec.update(mc.check())
            rec["peak_mem_mb"] = peak_memory_mb(mc.fn, cfg.device)
        except Exception as exc:
            rec["status"] = "error"
            rec["skip_reason"] = f"failed: {_short(exc)}"
            continue
        runnable[mc.name] = mc

    timings: dict[str, Timing] = {}
    if wl.op == "host":
        _measure_host(case, runnable, recs, cfg)
        runnable = {}
    if not runnable:
        pass
    elif cfg.device.type == "cuda":
        _measure_gpu(case, runnable, recs, timings, cfg)
    elif runnable:
        # Time; when waiting for a quiet machine was asked for and other processes still
        # used more than the threshold during the timing, wait and time again (keep the
        # least disturbed attempt).
        best, n_attempts = None, 0
        for attempt in range(1 + (cfg.cpu_retries if cfg.wait_idle_s > 0 else 0)):
            if attempt > 0:
                wait_for_idle(cfg.wait_idle_s, cfg.idle_threshold)
            with OthersCpuMonitor() as mon:
                t = time_cpu_interleaved(
                    {n: mc.fn for n, mc in runnable.items()},
                    budget_s=cfg.cpu_budget_s,
                    min_rounds=cfg.cpu_min_rounds,
                    warmup=1,
                )
            n_attempts += 1
            share = 1.0 if mon.share is None else mon.share
            if best is None or share < best[0]:
                best = (share, t, mon.share)
            if share <= cfg.idle_threshold:
                break
        _, timings, others = best
        for rec in recs.values():
            rec["others_cpu_during"] = None if others is None else round(others, 3)
            rec["timing_attempts"] = n_attempts

    for name, t in timings.items():
        rec, mc = recs[name], runnable[name]
        rec["status"] = "ok"
        rec["median_ms"] = t.median_ms
        rec["p25_ms"], rec["p75_ms"] = t.quantile(0.25), t.quantile(0.75)
        rec["reps"] = t.reps
        rec["min_ms"] = min(t.samples_ms)
        seconds = t.median_ms / 1e3
        if mc.cost is not None:
            rec["tflops"] = mc.cost.flops / seconds / 1e12
            rec["gbps"] = mc.cost.bytes / seconds / 1e9
            pct, note = roofline(
                mc.cost, seconds, peak, wl.dtype, allow_tf32, cfg.measured_bandwidth_gbps
            )
            rec["roofline_pct"], rec["roofline_note"] = pct, note
        else:
            rec["roofline_note"] = "no FLOP/byte model for this workload"
        if mc.items_per_call:
            rec["samples_per_s"] = mc.items_per_call / seconds

    base = recs.get(M.BASE, {}).get("median_ms")
    naive = recs.get(M.NAIVE, {}).get("median_ms")
    for rec in recs.values():
        if rec["median_ms"] is None:
            continue
        if base:
            rec["x_base"] = rec["median_ms"] / base
        if naive:
            rec["speedup_vs_naive"] = naive / rec["median_ms"]
    return list(recs.values())


def run_suite(cfg: SuiteConfig, on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every workload of ``cfg``; return ``{"meta": ..., "records": [...], "checks": [...]}``."""
    device = cfg.device
    started = time.perf_counter()
    load_start = _loadavg()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak = lookup_peak(device_name)
        # rooflines from the bandwidth measured in this run, not the data sheet's
        bandwidth = measure_bandwidth_gbps(device)
        cfg.measured_bandwidth_gbps = bandwidth
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        device_name = f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"
        peak, allow_tf32 = None, False
        bandwidth = None

    records: list[dict] = []
    iterator = cfg.workloads
    bar = None
    if cfg.progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the bench extra is not installed: no progress bar
            tqdm = None
        if tqdm is not None:
            bar = tqdm(
                cfg.workloads, desc="workloads", unit="wl", file=sys.stderr, dynamic_ncols=True
            )
            iterator = bar
    for wl in iterator:
        if bar is not None:
            bar.set_postfix_str(wl.label, refresh=True)
        mem_budget = int(available_memory_bytes(device) * cfg.mem_fraction)
        try:
            case = _build_case(wl, device, mem_budget)
        except Exception as exc:
            case = Case(wl, [], skip_reason=f"could not build the workload: {_short(exc)}")
        if case.skip_reason is not None:
            rec = _base_record(wl, device_name, "*")
            rec["skip_reason"] = case.skip_reason
            new = [rec]
        else:
            busy = waited = None
            if device.type == "cpu":
                if cfg.wait_idle_s > 0:
                    busy, waited = wait_for_idle(cfg.wait_idle_s, cfg.idle_threshold)
                else:
                    busy = cpu_busy_fraction(0.2)
            new = _measure_case(case, cfg, device_name, peak, allow_tf32)
            for rec in new:
                rec["others_cpu_before"] = None if busy is None else round(busy, 3)
                rec["waited_idle_s"] = None if waited is None else round(waited, 1)
        case.close()
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        load = _loadavg()
        for rec in new:
            rec["load_1m"] = None if load is None else load[0]
        records.extend(new)
        if on_record is not None:
            for rec in new:
                on_record(rec)

    from benchmarks.report import target_checks

    meta = {
        "machine": machine_label(device),
        "device": device_name,
        "device_type": device.type,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "quick": cfg.quick,
        "preset": cfg.preset,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "versions": _versions(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "timing": (
            f"methods interleaved within each of {cfg.gpu_reps} repetitions (order rotating, "
            "L2 flushed before every call, CUDA events), median and p25/p75; host_us_per_call "
            "(no sync) and graph_ms (CUDA-graph replay, inference forwards) per method"
            if device.type == "cuda"
            else "wall-clock median, methods interleaved round by round after warm-up "
            f"(>= {cfg.cpu_min_rounds} rounds, ~{cfg.cpu_budget_s:g} s per workload)"
        ),
        "peak_table": None if peak is None else peak.name,
        "measured_bandwidth_gbps": bandwidth,
        "allow_tf32": allow_tf32,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "max_abs_err_reference": "float64 computation of the same inputs (x W^T + s (x A) B^T)",
        "max_rel_err": "max |err| / max |float64 result| (each gradient against its own scale)",
        **cfg.extra_meta,
    }
    return {"meta": meta, "records": records, "checks": target_checks(records)}
