"""GPU time of the Hopper mainloop (:mod:`llmrec_kernels.triton.hopper`) against cuBLAS.

``python -m benchmarks.hopper_mainloop [--shapes 8x256,32x512] [--d 4096] [--rank 16]
[--rounds 3] [--json out.json]`` on a CUDA machine; nothing here runs without one.

Workloads: one projection ``d x d`` at rank ``r``, per-sample ``A``, bf16 (issue 25's
setting: d 4096, r 16, prefill 8 x 256 and 32 x 512). Methods, per workload:

* forward ``y = x W^T + b + s (x A_b) B^T``:
  ``base`` = ``F.linear(x, W, b)`` alone (cuBLAS, the floor); ``hopper`` = the persistent
  TMA kernel with its shrink pass; ``hopper_flat`` = the same with the tile and K loops
  flattened into one pipelined loop (``flatten=True``); ``hopper_wide`` = 128 x 256 tiles
  (``hopper.WIDE_16BIT``); which is fastest decides the defaults;
  ``torch`` = the torch backend's forward
  (``F.linear`` + ``bmm`` + ``addmm_``); ``triton`` = the Triton backend's kernels without
  the Hopper hook (the Ampere-style mainloop it replaces on sm_90);
* dx ``dx = dy W + (s dy B) A_b^T``: ``base`` = ``dy @ W``; ``hopper`` = the dS pass and the
  persistent dx kernel (``hopper_wide``: 128 x 256 tiles); ``torch`` = the torch backend's
  backward asked for dx only.

Each method's time is the median of :func:`benchmarks.timing.time_gpu_interleaved`
(``10 * rounds`` repetitions, every method once per repetition in rotating order, the L2
flushed before every call), reported with its spread (min, max), so background drift hits
all methods alike. Errors are
``max |out - fp64| / max |fp64|`` against the same maths in float64 on the GPU.

On a GPU other than sm_90 the Hopper kernels run their pointer path (``use_tma=False``, the
sm_80 variant); the record says which.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_SHAPES", "parse_shapes", "run"]

DEFAULT_SHAPES = ((8, 256), (32, 512))


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"8x256,32x512"`` -> ``((8, 256), (32, 512))``; ValueError naming the bad item."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shapes: {item!r} is not BxL with positive integers")
        shapes.append((int(parts[0]), int(parts[1])))
    return tuple(shapes)


def _validate(shapes, d: int, rank: int, dtype: torch.dtype, rounds: int) -> None:
    if not shapes:
        raise ValueError("shapes must name at least one (batch, length)")
    for shape in shapes:
        if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise ValueError(f"shapes: {shape!r} is not a (batch, length) of positive ints")
    if not isinstance(d, int) or d <= 0 or d % 8:
        raise ValueError(f"d must be a positive multiple of 8 (16-byte rows), got {d!r}")
    if not isinstance(rank, int) or not 1 <= rank <= 128:
        raise ValueError(f"rank must be in [1, 128], got {rank!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")


def _rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    scale = float(oracle.abs().max()) or 1.0
    return float((out.double() - oracle).abs().max()) / scale


def _time_rounds(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    """Interleaved GPU time of every method (``10 * rounds`` repetitions, each method once per
    repetition in rotating order, L2 flushed before every call): median, min and max ms."""
    from benchmarks.timing import time_gpu_interleaved

    timings = time_gpu_interleaved(methods, reps=10 * rounds)
    return {
        name: {"ms": t.median_ms, "min_ms": min(t.samples_ms), "max_ms": max(t.samples_ms)}
        for name, t in timings.items()
    }


def run(
    shapes=DEFAULT_SHAPES,
    d: int = 4096,
    rank: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    rounds: int = 3,
    device: Optional[torch.device] = None,
    scaling: float = 2.0,
) -> list[dict]:
    """Time forward and dx of each ``(batch, length)`` in ``shapes``; one record per workload.

    Args:
        shapes: ``(batch, length)`` pairs; rows ``M = batch * length``.
        d: ``d_in = d_out`` (a multiple of 8: TMA needs 16-byte row pitches).
        rank: LoRA rank ``r`` in [1, 128].
        dtype: fp16 or bf16.
        rounds: how many times each method is timed in turn (median reported).
        device: a CUDA device (default: the current one).
        scaling: the LoRA scale ``s``.

    Returns:
        Records ``{"workload", "batch", "length", "gpu", "tma", "methods": {name: {"ms",
        "min_ms", "max_ms", "x_base"}}, "errors": {name: rel. error vs fp64}}``.

    Raises:
        ValueError / TypeError for bad arguments, RuntimeError without a CUDA device.
    """
    _validate(shapes, d, rank, dtype, rounds)
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks.hopper_mainloop needs a CUDA device (none present)")
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")

    sm90 = torch.cuda.get_device_capability(device) == (9, 0)
    records = []
    for batch, length in shapes:
        records += _measure(batch, length, d, rank, dtype, rounds, device, scaling, sm90)
        torch.cuda.empty_cache()
    return records


def _measure(batch, length, d, rank, dtype, rounds, device, scaling, sm90) -> list[dict]:
    """The forward and dx records of one ``(batch, length)`` (see :func:`run`)."""
    from llmrec_kernels import _torch_impl
    from llmrec_kernels.triton import cora_linear as triton_backend
    from llmrec_kernels.triton import hopper

    use_tma = sm90 and hopper.tma_available()
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = rand(batch, length, d)
    weight = rand(d, d, scale=d**-0.5)
    lora_a = rand(batch, d, rank, scale=d**-0.5)
    lora_b = rand(d, rank, scale=rank**-0.5)
    bias = rand(d)
    dy = rand(batch, length, d)
    _, s = _torch_impl.forward(x, weight, lora_a, lora_b, bias, scaling)

    def triton_without_hook():
        enabled, hopper.ENABLED = hopper.ENABLED, False
        try:
            return triton_backend.forward(x, weight, lora_a, lora_b, bias, scaling)
        finally:
            hopper.ENABLED = enabled

    fwd = {
        "base": lambda: F.linear(x, weight, bias),
        "hopper": lambda: hopper.forward(x, weight, lora_a, lora_b, bias, scaling, use_tma=use_tma),
        "torch": lambda: _torch_impl.forward(x, weight, lora_a, lora_b, bias, scaling),
        "triton": triton_without_hook,
    }
    dx = {
        "base": lambda: torch.matmul(dy, weight),
        "hopper": lambda: hopper.backward(
            dy, x, weight, lora_a, lora_b, s, scaling, True, False, False, use_tma=use_tma
        ),
        "hopper_wide": lambda: hopper.backward(
            dy,
            x,
            weight,
            lora_a,
            lora_b,
            s,
            scaling,
            True,
            False,
            False,
            use_tma=use_tma,
            config=hopper.WIDE_16BIT,
        ),
        "torch": lambda: _torch_impl.backward(
            dy, x, weight, lora_a, lora_b, s, scaling, True, False, False
        ),
    }
    x64, w64, a64, b64 = (t.double() for t in (x, weight, lora_a, lora_b))
    y64 = F.linear(x64, w64, bias.double()) + scaling * torch.bmm(x64, a64) @ b64.T
    dx64 = dy.double() @ w64 + (scaling * dy.double() @ b64) @ a64.transpose(1, 2)
    records = []
    for workload, methods, oracle in (("forward", fwd, y64), ("dx", dx, dx64)):
        times = _time_rounds(methods, rounds)
        for entry in times.values():
            entry["x_base"] = entry["ms"] / times["base"]["ms"]
        errors = {}
        for name, fn in methods.items():
            if name == "base":
                continue
            out = fn()
            errors[name] = _rel_err(out[0] if isinstance(out, tuple) else out, oracle)
        records.append(
            {
                "workload": workload, "batch": batch, "length": length, "d": d, "rank": rank,
                "dtype": str(dtype), "gpu": torch.cuda.get_device_name(device), "tma": use_tma,
                "methods": times, "errors": errors,
            }
        )  # fmt: skip
    return records


def _table(records: list[dict]) -> str:
    lines = [f"{'workload':8s} {'BxL':>8s} {'method':8s} {'ms':>9s} {'x base':>7s} {'err':>9s}"]
    for rec in records:
        for name, t in rec["methods"].items():
            err = rec["errors"].get(name)
            lines.append(
                f"{rec['workload']:8s} {rec['batch']}x{rec['length']:<5d} {name:8s} "
                f"{t['ms']:9.4f} {t['x_base']:7.3f} {'' if err is None else f'{err:9.2e}'}"
            )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x256,32x512", help="BxL[,BxL...]")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the records here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the arguments and write an empty record list (the GPU check's CPU dry run)",
    )
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if args.dry_run:
        shapes = parse_shapes(args.shapes)
        _validate(shapes, args.d, args.rank, dtype, args.rounds)
        print(f"dry run: would time forward and dx of {shapes} at d {args.d} r {args.rank}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump([], fh)
        return 0
    records = run(parse_shapes(args.shapes), args.d, args.rank, dtype, args.rounds)
    print(_table(records))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
