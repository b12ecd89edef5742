"""Timing and peak-memory measurement, on the GPU and on the CPU.

GPU, for comparisons (issue 25): :func:`time_gpu_interleaved` times several methods within
each repetition (the order rotating, the L2 flushed before every call, CUDA events), so
clock and thermal drift reach every method alike, and reports each method's spread;
:func:`time_gpu_graph` times a method captured in a CUDA graph (GPU time without host
launch cost) and :func:`time_host_us` its host time per call (no synchronisation), the two
reported separately; :func:`measure_bandwidth_gbps` measures the device's copy bandwidth in
the same run, for rooflines from measured rather than data-sheet bandwidth.

GPU, one method: :func:`time_gpu` uses ``triton.testing.do_bench`` (CUDA events, warm-up, the L2 cache
flushed before every repetition by zeroing a 256 MB buffer, median), or the same procedure by
hand with CUDA events when Triton is missing.

CPU: :func:`time_cpu_interleaved` times several methods of one workload *side by side*: after
a warm-up of each, it runs rounds in which every method is called once, in turn, with
``time.perf_counter`` around each call, until a time budget is spent, and reports medians.
Interleaving exposes every method to the same background load, so their ratios stay
meaningful on a shared, noisy machine.

Peak memory is the largest amount allocated during one call beyond what was allocated before
it (outputs and workspace; the inputs excluded): ``torch.cuda.max_memory_allocated`` on the
GPU, the allocation events of ``torch.profiler`` (``profile_memory=True``) on the CPU.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = [
    "OthersCpuMonitor",
    "Timing",
    "cpu_busy_fraction",
    "interleaved_order",
    "measure_bandwidth_gbps",
    "peak_memory_mb",
    "time_cpu_interleaved",
    "time_gpu",
    "time_gpu_graph",
    "time_gpu_interleaved",
    "time_host_us",
    "wait_for_idle",
]


@dataclass
class Timing:
    """Per-call times of one method, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)
    median_ms: Optional[float] = None

    @property
    def reps(self) -> int:
        return len(self.samples_ms)

    def summarise(self) -> Timing:
        if self.samples_ms:
            self.median_ms = statistics.median(self.samples_ms)
        return self

    def quantile(self, q: float) -> Optional[float]:
        if not self.samples_ms:
            return None
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    budget_s: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warmup: int = 2,
) -> dict[str, Timing]:
    """Median wall-clock time of each CPU callable, the methods interleaved round by round."""
    timings = {name: Timing() for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside a timed call
    try:
        start = time.perf_counter()
        rounds = 0
        while rounds < max_rounds and (
            rounds < min_rounds or time.perf_counter() - start < budget_s
        ):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                out = fn()
                t1 = time.perf_counter()
                del out
                timings[name].samples_ms.append((t1 - t0) * 1e3)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: t.summarise() for name, t in timings.items()}


def _do_bench_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> list[float]:
    """``do_bench`` by hand: CUDA events, L2 flushed before every call, times in ms."""
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate))
    n_rep = max(1, int(rep_ms / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_gpu(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Median GPU time of ``fn`` (CUDA events, warm-up, L2 flushed between repetitions)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return Timing(samples_ms=_do_bench_events(fn, warmup_ms, rep_ms)).summarise()
    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except (AssertionError, TypeError, ValueError):
        # an older Triton without return_mode="all": the same procedure by hand
        return Timing(samples_ms=_do_bench_events(fn, warmup_ms, rep_ms)).summarise()
    if not isinstance(times, (list, tuple)):
        times = [times]
    return Timing(samples_ms=[float(t) for t in times]).summarise()


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    # Kineto logs two lines per profiler session at its default level; 6 silences them
    # (read when a session starts, so setting it here is early enough).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        out = fn()
        del out
    # Every event carries the net bytes it allocated itself (children excluded); a positive
    # amount is placed at the start of its op, a negative one at its end, so the running
    # sum's maximum is an upper estimate of the peak (allocations freed inside one op are
    # not seen, which only matters for an op's private workspace).
    deltas = []
    for ev in prof.events():
        m = ev.self_cpu_memory_usage
        if m > 0:
            deltas.append((ev.time_range.start, m))
        elif m < 0:
            deltas.append((ev.time_range.end, m))
    deltas.sort(key=lambda d: d[0])
    current = peak = 0
    for _, m in deltas:
        current += m
        peak = max(peak, current)
    return peak


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory allocated by one call of ``fn`` beyond what was allocated before it, MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    if device.type == "cpu":
        return _cpu_peak_bytes(fn) / 2**20
    return None


def _cpu_times() -> Optional[tuple[int, int]]:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def cpu_busy_fraction(interval_s: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs busy over ``interval_s`` (Linux ``/proc/stat``), or ``None``.

    Call it while this process is idle: it then measures what *other* processes use.
    """
    a = _cpu_times()
    time.sleep(interval_s)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    total, idle = b[0] - a[0], b[1] - a[1]
    return max(0.0, min(1.0, 1.0 - idle / total))


def wait_for_idle(max_wait_s: float, threshold: float = 0.25, interval_s: float = 0.5):
    """Sleep until other processes use less than ``threshold`` of the CPUs, or ``max_wait_s``.

    Returns ``(busy_fraction_last_seen, seconds_waited)``.
    """
    start = time.perf_counter()
    busy = cpu_busy_fraction(interval_s)
    while busy is not None and busy > threshold and time.perf_counter() - start < max_wait_s:
        busy = cpu_busy_fraction(interval_s)
    return busy, time.perf_counter() - start


class OthersCpuMonitor:
    """Share of the CPUs used by *other* processes over a stretch of this process's work.

    ``(busy time of all CPUs from /proc/stat - this process's CPU time) / (wall time x CPUs)``;
    ``None`` where ``/proc/stat`` is unreadable.
    """

    def __enter__(self) -> OthersCpuMonitor:
        self.share: Optional[float] = None
        self._t0 = time.perf_counter()
        self._stat0 = _cpu_times()
        self._self0 = _self_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        stat1, self1 = _cpu_times(), _self_cpu_s()
        wall = time.perf_counter() - self._t0
        if self._stat0 is None or stat1 is None or wall <= 0:
            return
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy_all = ((stat1[0] - self._stat0[0]) - (stat1[1] - self._stat0[1])) / tick
        others = busy_all - (self1 - self._self0)
        self.share = max(0.0, min(1.0, others / (wall * (os.cpu_count() or 1))))


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def interleaved_order(names: list[str], rep: int) -> list[str]:
    """The order of the methods in repetition ``rep``: rotated by one per repetition, so no
    method always runs first (after the flush) or last."""
    k = rep % len(names) if names else 0
    return names[k:] + names[:k]


def time_gpu_interleaved(
    fns: dict[str, Callable[[], object]], reps: int = 50, warmup: int = 3, flush: bool = True
) -> dict[str, Timing]:
    """GPU time per call of each method (ms), interleaved within each repetition.

    Every call is preceded by an L2 flush (zeroing a 256 MB buffer) unless ``flush`` is
    false, and bracketed by CUDA events; one synchronisation at the end. ``Timing.quantile``
    gives the spread (p25/p75).
    """
    names = list(fns)
    cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda") if flush else None
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    events = {n: [] for n in names}
    for rep in range(reps):
        for name in interleaved_order(names, rep):
            if cache is not None:
                cache.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {
        n: Timing(samples_ms=[s.elapsed_time(e) for s, e in events[n]]).summarise() for n in names
    }


def time_gpu_graph(fn: Callable[[], object], replays: int = 50, warmup: int = 3) -> Timing:
    """GPU time per call of ``fn`` captured in a CUDA graph (ms): launch cost on the host is
    gone, what remains is the kernels' time. ``fn`` must be capturable (static shapes, no host
    synchronisation); its inputs are whatever it closes over."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        samples.append((start, end))
    torch.cuda.synchronize()
    return Timing(samples_ms=[s.elapsed_time(e) for s, e in samples]).summarise()


def time_host_us(fn: Callable[[], object], calls: int = 100, repeats: int = 5) -> float:
    """Host time per call of ``fn`` (us): back-to-back calls without synchronisation, the
    best of ``repeats`` loops (other processes only ever add time). On a GPU this is the time
    the host takes to issue the work, reported beside the GPU time, never mixed into it."""
    for _ in range(3):
        fn()
    best = float("inf")
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return best


def measure_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """The device's memory bandwidth measured now (GB/s): a device-to-device copy of
    ``nbytes`` counts ``2 * nbytes`` moved (read + write); the median of ``reps`` copies."""
    src = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    timing = time_gpu_interleaved({"copy": lambda: dst.copy_(src)}, reps=reps, flush=False)
    return 2 * nbytes / (timing["copy"].median_ms * 1e-3) / 1e9
