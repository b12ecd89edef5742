"""Write a GPU's measured dispatch table from the benchmark suite's records.

``python -m benchmarks.dispatch_table bench.json --out llmrec_kernels/dispatch_tables/`` reads
the suite's JSON (``python -m benchmarks --device cuda ...``), compares every custom backend
with the torch path *in that run*, and writes ``<gpu key>.json`` (schema of
:mod:`llmrec_kernels.dispatch_table`). For each ``(dtype, mode, shape class)`` the records of
the projection workloads (one projection and fused q/k/v, every size of the class) are
grouped; a custom backend is chosen only when the geometric mean of its time / torch time is
at most ``1 - MIN_SPEEDUP`` and no record of the class is slower than the torch path, else
the torch path.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from llmrec_kernels.dispatch_table import MIN_SPEEDUP, SCHEMA, gpu_key, shape_class

__all__ = ["build_table", "main"]

CUSTOM = ("triton", "cuda")
OPS = ("proj", "qkv")


def _ours(record: dict) -> str | None:
    method = record.get("method", "")
    if method.startswith("ours[") and record.get("backend") in (*CUSTOM, "torch"):
        return record["backend"]
    return None


def build_table(bench: dict) -> dict:
    """The dispatch table (a JSON-ready dict) of one benchmark run."""
    times: dict = defaultdict(dict)  # (dtype, mode, cls, workload) -> {backend: ms}
    for r in bench["records"]:
        backend = _ours(r)
        if r.get("op") not in OPS or backend is None or r.get("status") != "ok":
            continue
        cls = shape_class(r["B"] * r["L"], r["L"])
        workload = (r["op"], r["B"], r["L"], r["d_in"], r["d_out"], r["r"])
        times[(r["dtype"], r["mode"], cls, workload)][backend] = r["median_ms"]
    ratios: dict = defaultdict(lambda: defaultdict(list))  # (dtype, mode, cls) -> backend -> [x]
    for (dtype, mode, cls, _), by_backend in times.items():
        torch_ms = by_backend.get("torch")
        if not torch_ms:
            continue
        for backend in CUSTOM:
            if backend in by_backend:
                ratios[(dtype, mode, cls)][backend].append(by_backend[backend] / torch_ms)
    choices = []
    for (dtype, mode, cls), by_backend in sorted(ratios.items()):
        summary = {
            b: {
                "geomean": math.exp(sum(math.log(x) for x in xs) / len(xs)),
                "worst": max(xs),
                "records": len(xs),
            }
            for b, xs in by_backend.items()
        }
        eligible = [
            (s["geomean"], b)
            for b, s in summary.items()
            if s["geomean"] <= 1.0 - MIN_SPEEDUP and s["worst"] <= 1.0
        ]
        geomean, backend = min(eligible) if eligible else (1.0, "torch")
        choices.append(
            {
                "dtype": dtype,
                "mode": mode,
                "shape_class": cls,
                "backend": backend,
                "ratio_vs_torch": round(geomean, 4),
                "measured": {b: {k: round(v, 4) for k, v in s.items()} for b, s in summary.items()},
            }
        )
    meta = bench.get("meta", {})
    return {
        "schema": SCHEMA,
        "gpu": meta.get("device", ""),
        "gpu_key": gpu_key(meta.get("device", "")),
        "min_speedup": MIN_SPEEDUP,
        "run": {k: meta.get(k) for k in ("date", "git_commit", "versions", "command")},
        "choices": choices,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="the suite's JSON (python -m benchmarks --out)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write <gpu key>.json")
    args = parser.parse_args(argv)
    table = build_table(json.loads(args.bench.read_text()))
    if not table["gpu_key"]:
        raise SystemExit(f"{args.bench}: no device name in meta; not a GPU run")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{table['gpu_key']}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    for c in table["choices"]:
        print(f"{c['dtype']:9s} {c['mode']:8s} {c['shape_class']:14s} -> {c['backend']:6s} "
              f"({c['ratio_vs_torch']:.3f} x torch)")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
