"""Recalibrate the Triton dispatcher's cost model (:mod:`llmrec_kernels.triton.dispatch`)
from a GPU run's records, and report its prediction error before and after.

``python -m benchmarks.calibrate_cost_model benchmarks/results/gpu-check-h200-2026-11-30/bench.json
--out benchmarks/results/cost-model-calibration-h200.txt``

Fitted: the GEMM tile efficiency ceiling (``dispatch._MAX_TILE_EFFICIENCY``), the per-kernel
launch cost and the memory latency of the GPU's spec, by grid search minimising the RMS of
``log(predicted / measured)`` over the records the model describes: the shrink alone (plain
and split-K, five shapes) and the prefill projection forward (shrink + fused GEMM; decode
projections are left out, as their measured time is the Python launcher's, 60-100 us, which
the GPU-side model does not include; they are listed for reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from pathlib import Path

import torch

from llmrec_kernels.triton import dispatch
from llmrec_kernels.triton.configs import shrink_gpu_config

__all__ = ["collect", "fit", "main", "predict"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def collect(bench: dict) -> list[dict]:
    """The records the model predicts: ``{kind, B, L, d_in, d_out, r, dtype, measured_us}``."""
    rows = []
    for r in bench["records"]:
        if r.get("status") != "ok":
            continue
        kind = None
        if r["op"] == "shrink" and r["method"] in ("triton[plain]", "triton[split-K]"):
            kind = "shrink plain" if r["method"] == "triton[plain]" else "shrink split-K"
        elif r["op"] == "proj" and r["mode"] == "fwd" and r["method"] == "ours[triton]":
            kind = "proj fwd decode" if r["L"] == 1 else "proj fwd prefill"
        if kind:
            rows.append({
                "kind": kind, "B": r["B"], "L": r["L"], "d_in": r["d_in"], "d_out": r["d_out"],
                "r": r["r"], "dtype": r["dtype"], "measured_us": r["median_ms"] * 1e3,
            })  # fmt: skip
    return rows


def predict(row: dict, spec: dispatch.GpuSpec, efficiency: float) -> float:
    """The model's GPU time of one record (us) with the given spec and efficiency ceiling."""
    saved = dispatch._MAX_TILE_EFFICIENCY
    dispatch._MAX_TILE_EFFICIENCY = efficiency
    try:
        dt = DTYPES[row["dtype"]]
        b, length = row["B"], row["L"]
        choice = dispatch.explain(b, length, row["d_in"], row["d_out"], row["r"], dt, spec)
        if row["kind"].startswith("shrink"):
            cfg = shrink_gpu_config(length, dt)
            k_split = choice.k_split if row["kind"] == "shrink split-K" else 0
            return dispatch.shrink_us(b, length, row["d_in"], row["r"], dt, cfg, spec, k_split)
        return choice.op_us
    finally:
        dispatch._MAX_TILE_EFFICIENCY = saved


def _rms_log_error(rows, spec, efficiency) -> float:
    errs = [math.log(predict(r, spec, efficiency) / r["measured_us"]) for r in rows]
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def fit(rows: list[dict], base: dispatch.GpuSpec) -> tuple[dispatch.GpuSpec, float, float]:
    """``(spec, efficiency, rms log error)`` minimising the error over ``rows``."""
    best = None
    for eff, launch, latency in itertools.product(
        [x / 100 for x in range(30, 85, 2)], [x / 2 for x in range(2, 21)], (0.4, 0.6, 0.8, 1.0)
    ):
        spec = dataclasses.replace(base, launch_us=launch, latency_us=latency)
        err = _rms_log_error(rows, spec, eff)
        if best is None or err < best[2]:
            best = (spec, eff, err)
    return best


def report(rows, base, base_eff, fitted, fitted_eff, source) -> str:
    used = [r for r in rows if r["kind"] != "proj fwd decode"]
    lines = [
        f"Cost model of llmrec_kernels/triton/dispatch.py against measured GPU times ({source}).",
        "Predicted = the model's GPU-side time; measured = the suite's median (CUDA events).",
        f"before: tile efficiency ceiling {base_eff:.2f}, launch {base.launch_us:.1f} us, "
        f"latency {base.latency_us:.1f} us: RMS log error {_rms_log_error(used, base, base_eff):.3f}",
        f"after:  tile efficiency ceiling {fitted_eff:.2f}, launch {fitted.launch_us:.1f} us, "
        f"latency {fitted.latency_us:.1f} us: RMS log error {_rms_log_error(used, fitted, fitted_eff):.3f}",
        "(decode projection rows are not fitted: their measured time is host-bound)",
        "",
        f"{'kind':18} {'B':>4} {'L':>4} {'r':>3} {'measured':>9} {'before':>8} {'err':>7} "
        f"{'after':>8} {'err':>7}",
    ]
    for r in rows:
        before, after = predict(r, base, base_eff), predict(r, fitted, fitted_eff)
        m = r["measured_us"]
        lines.append(
            f"{r['kind']:18} {r['B']:4d} {r['L']:4d} {r['r']:3d} {m:9.1f} {before:8.1f} "
            f"{(before / m - 1) * 100:+6.0f}% {after:8.1f} {(after / m - 1) * 100:+6.0f}%"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path)
    parser.add_argument("--gpu", default="H200", choices=sorted(dispatch.GPUS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = collect(json.loads(args.bench.read_text()))
    base = dispatch.GPUS[args.gpu]
    base_eff = 0.8  # the ceiling before this calibration
    used = [r for r in rows if r["kind"] != "proj fwd decode"]
    if not used:  # a CPU run (the GPU check's dry run) times no Triton kernel
        text = f"{args.bench}: no timed Triton shrink or forward records, nothing to calibrate\n"
    else:
        fitted, eff, _ = fit(used, base)
        text = report(rows, base, base_eff, fitted, eff, args.bench)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
