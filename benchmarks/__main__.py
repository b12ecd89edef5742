"""``python -m benchmarks``: run the benchmark report, print a table, write JSON and a plot.

python -m benchmarks --quick                 # < 5 min on 2 CPU cores
python -m benchmarks --out r.json --plot r.png
python -m benchmarks --render r.json --markdown r.md   # re-render a saved run
python -m benchmarks --dispatch              # the Triton dispatcher's choices, predicted (CPU)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="CoRA kernels against naive PyTorch, the reference CoRA code's way and "
        "the base GEMM, with a roofline model.",
    )
    p.add_argument("--quick", action="store_true", help="a small subset (< 5 min on 2 CPU cores)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="toy shapes, seconds long: a smoke run of the whole pipeline",
    )
    p.add_argument(
        "--gpu-check",
        action="store_true",
        help="only the workloads of issue 25's 'Done when' list (benchmarks/gpu_check.sh)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="JSON file (default: benchmarks/results/<machine>-<date>[-quick].json)",
    )
    p.add_argument("--plot", type=Path, help="PNG file (default: the JSON path with .png)")
    p.add_argument(
        "--markdown",
        type=Path,
        help="also write a Markdown summary (median ms per method, r 16) and the full table",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU",
    )
    p.add_argument(
        "--ops",
        default=None,
        help="comma-separated subset of host,proj,qkv,shrink,decoder_layer,scoring",
    )
    p.add_argument(
        "--budget", type=float, default=None, help="CPU: seconds of timed rounds per workload"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="CPU: before each workload wait up to S seconds for other processes to use < 25%% of the CPUs",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="with --wait-idle: time a disturbed workload again up to this many times",
    )
    p.add_argument("--render", type=Path, help="do not run: print/plot a saved JSON file")
    p.add_argument(
        "--dispatch",
        action="store_true",
        help="do not run: print the Triton dispatcher's choices (split-K shrink, GEMM tile) and "
        "the cost model's predicted times and speed-ups for the LLaMA-7B decode and prefill "
        "grid on H100/H200/A100 (and this GPU, if any); with --out, also write them there",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def _markdown(results: dict, summary, full) -> str:
    meta = results["meta"]
    return (
        f"Machine: {meta['machine']}: {meta['device']}, {meta['dtype']}, {meta['date']}\n\n"
        "Median ms per method (r 16):\n\n"
        f"{summary(results)}\n\nAll records:\n\n{full(results)}\n"
    )


def dispatch_report() -> str:
    """The dispatcher's choices and predicted times (:mod:`llmrec_kernels.triton.dispatch`)."""
    from llmrec_kernels.triton import dispatch

    gpus: list = ["H100", "H200", "A100"]
    parts = []
    if torch.cuda.is_available():
        gpus.insert(0, dispatch.gpu_spec_for_device(torch.cuda.current_device()))
    parts.append(
        "Triton dispatcher, LLaMA-7B projection (K = N = 4096, r 16, bf16, per-sample A):\n"
        "choices and cost-model predictions in us (x = speed-up; op old = plain shrink and\n"
        "fixed-M GEMM tiles, as before issue 16). Model: llmrec_kernels/triton/dispatch.py.\n"
    )
    parts.append(dispatch.prediction_table(tuple(gpus)))
    parts.append("\nBatch-invariant mode (llmrec_kernels.batch_invariant()), H100:\n")
    parts.append(dispatch.prediction_table(("H100",), batch_invariant=True))
    return "\n".join(parts)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from benchmarks.report import (
        markdown_table,
        plot_results,
        print_table,
        summary_markdown,
        target_checks,
        write_json,
    )

    try:
        from rich.console import Console

        console = Console(width=max(Console().width, 220))
        say = console.print
    except ImportError:  # the bench extra is not installed: plain text
        console, say = None, print
    if args.dispatch:
        text = dispatch_report()
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    if args.render is not None:
        results = json.loads(args.render.read_text())
        results["checks"] = target_checks(results["records"])  # derived from the records
        print_table(results, console)
        if args.plot:
            plot_results(results, args.plot)
        if args.markdown:
            args.markdown.write_text(_markdown(results, summary_markdown, markdown_table))
        return 0

    from benchmarks.suite import SuiteConfig, default_workloads, machine_label, run_suite

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]

    meta = {"command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)}
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        msg = "TRITON_INTERPRET=1 is set: Triton kernels run in the interpreter, not a performance path"
        say(f"warning: {msg}")
        meta["warning"] = msg

    if args.gpu_check:
        from benchmarks.suite import gpu_check_workloads

        workloads = gpu_check_workloads(dtype, tiny=args.tiny)
    else:
        workloads = default_workloads(device, dtype, quick=args.quick, tiny=args.tiny)
    if args.ops:
        wanted = {o.strip() for o in args.ops.split(",") if o.strip()}
        workloads = [w for w in workloads if w.op in wanted]
    cfg = SuiteConfig(
        device=device,
        dtype=dtype,
        workloads=workloads,
        quick=args.quick,
        preset=("gpu-check-" if args.gpu_check else "")
        + ("tiny" if args.tiny else ("quick" if args.quick else "full")),
        progress=not args.no_progress,
        extra_meta=meta,
    )
    cfg.wait_idle_s = args.wait_idle
    cfg.cpu_retries = max(0, args.retries)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget is not None:
        cfg.cpu_budget_s = args.budget
    elif args.quick:
        cfg.cpu_budget_s, cfg.cpu_min_rounds = 1.5, 5
    if args.tiny:
        cfg.cpu_budget_s = min(cfg.cpu_budget_s, 0.05)
        cfg.cpu_min_rounds = 2
        cfg.gpu_warmup_ms, cfg.gpu_rep_ms = 5.0, 10.0

    label = machine_label(device)
    date = _dt.date.today().isoformat()
    preset = "-tiny" if args.tiny else ("-quick" if args.quick else "")
    out = args.out or RESULTS_DIR / f"{label}-{date}{preset}.json"
    # Each record is appended here as soon as it is measured, so a run that is killed (a time
    # limit, a lost GPU lease) keeps what it timed; removed once the full JSON is written.
    partial = out.with_suffix(".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text("")

    def keep(record: dict) -> None:
        with partial.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    started = time.perf_counter()
    results = run_suite(cfg, on_record=keep)
    plot = args.plot or out.with_suffix(".png")
    written = plot_results(results, plot)
    results["meta"]["plot"] = None if written is None else plot.name
    results["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(results, out)
    partial.unlink(missing_ok=True)
    if args.markdown:
        args.markdown.write_text(_markdown(results, summary_markdown, markdown_table))
    print_table(results, console)
    what = f"{out} and {plot}" if written is not None else f"{out} (no plot: matplotlib missing)"
    say(f"wrote {what} in {results['meta']['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
