"""Output of a run: the rich table, the JSON file, the PNG plot, the done-when checks."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

__all__ = [
    "REQUIRED_FIELDS",
    "markdown_table",
    "plot_results",
    "print_table",
    "summary_markdown",
    "target_checks",
    "write_json",
]

REQUIRED_FIELDS = (
    "op", "mode", "method", "B", "L", "d_in", "d_out", "r", "dtype", "device", "status",
    "skip_reason", "median_ms", "tflops", "gbps", "roofline_pct", "peak_mem_mb", "max_abs_err",
)  # fmt: skip

# The done-when targets (CPU, d 1024, r 16, fp32, projection forward).
TARGETS = (
    # (label, B, L, numerator method, denominator method, comparison, bound)
    ("ours vs naive at B 32, L 1", 32, 1, "naive", "ours", ">=", 20.0),
    ("ours vs naive at B 8, L 64", 8, 64, "naive", "ours", ">=", 2.0),
    ("ours / base GEMM at B 8, L 64", 8, 64, "ours", "base", "<=", 1.25),
)


def _find(records, op, mode, b, length, r, method, d=None, dtype=None) -> Optional[dict]:
    for rec in records:
        if (
            rec["op"] == op
            and rec["mode"] == mode
            and rec["B"] == b
            and rec["L"] == length
            and rec["r"] == r
            and rec["method"] == method
            and (d is None or rec["d_in"] == d)
            and (dtype is None or rec["dtype"] == dtype)
            and rec["median_ms"] is not None
        ):
            return rec
    return None


def target_checks(records: list[dict]) -> list[dict]:
    """The done-when ratios, where the run has the workloads they need (CPU, d 1024, fp32)."""
    checks = []
    ours = "ours[torch]"
    for label, b, length, num, den, cmp, bound in TARGETS:
        get = {
            m: _find(records, "proj", "fwd", b, length, 16, m, d=1024, dtype="float32")
            for m in ("naive", ours, "base")
        }
        get["ours"] = get.pop(ours)
        n, d = get[num], get[den]
        if n is None or d is None or not str(n["device"]).startswith("cpu"):
            continue
        ratio = n["median_ms"] / d["median_ms"]
        ok = ratio >= bound if cmp == ">=" else ratio <= bound
        check = {
            "target": label,
            "ratio": ratio,
            "bound": f"{cmp} {bound:g}",
            "pass": ok,
            "numerator_ms": n["median_ms"],
            "denominator_ms": d["median_ms"],
            "method": ours,
        }
        if num == "naive" and get["base"] is not None:
            # the most any implementation no faster than the base GEMM could reach
            check["naive_over_base"] = n["median_ms"] / get["base"]["median_ms"]
        checks.append(check)
    checks.extend(_memory_checks(records))
    checks.extend(_host_checks(records))
    return checks


def _host_checks(records: list[dict]) -> list[dict]:
    """Host op (CPU): ours[torch] per call <= 1.5 x the three plain calls; the Triton
    launcher's host time with cached no-op launches, reported without a verdict
    (``"pass": None``): it includes neither a driver launch nor a GPU, so it cannot judge
    issue 25's target (<= 35 us per Triton call), which the GPU check measures; the unit
    test bounds it against a calibration loop."""
    checks = []
    shapes: dict = defaultdict(dict)
    for rec in records:
        on_cpu = str(rec["device"]).startswith("cpu")
        if rec["op"] == "host" and rec.get("host_us") is not None and on_cpu:
            shapes[(rec["B"], rec["L"], rec["d_in"], rec["r"])][rec["method"]] = rec["host_us"]
    for (b, length, d, r), us in sorted(shapes.items()):
        where = f"B {b}, L {length}, d {d}, r {r}"
        if "ours[torch]" in us and "plain3" in us:
            ratio = us["ours[torch]"] / us["plain3"]
            checks.append(
                {
                    "target": f"host us ours[torch] / three plain calls, {where}",
                    "ratio": ratio, "bound": "<= 1.5", "pass": ratio <= 1.5,
                    "numerator_ms": us["ours[torch]"], "denominator_ms": us["plain3"],
                    "method": "host cost", "unit": "us",
                }
            )  # fmt: skip
        if "ours[triton]" in us:
            checks.append(
                {
                    "target": f"host us of the Triton launcher (cached no-op launches) / the "
                    f"GPU target of 35 us, {where}",
                    "ratio": us["ours[triton]"] / 35.0, "bound": "judged on a GPU",
                    "pass": None,
                    "numerator_ms": us["ours[triton]"], "denominator_ms": 35.0,
                    "method": "host cost", "unit": "us",
                }
            )  # fmt: skip
    return checks


def _memory_checks(records: list[dict]) -> list[dict]:
    """Decoder layer, training step (bf16, CPU): fused q/k/v peak memory <= unfused, and
    CoRA's extra over the base model <= a quarter of the reference CoRA path's extra."""
    checks = []
    layers: dict = defaultdict(dict)
    for rec in records:
        if (
            rec["op"] == "decoder_layer"
            and rec["dtype"] == "bfloat16"
            and str(rec["device"]).startswith("cpu")
            and rec.get("peak_mem_mb") is not None
        ):
            layers[(rec["B"], rec["L"], rec["d_in"])][rec["method"]] = rec["peak_mem_mb"]
    for (b, length, d), peak in sorted(layers.items()):
        if not {"base", "reference", "ours[fused_qkv]", "ours[unfused]"} <= set(peak):
            continue
        ref_extra = peak["reference"] - peak["base"]
        fused, unfused = peak["ours[fused_qkv]"], peak["ours[unfused]"]
        where = f"decoder layer B {b}, L {length}, d {d}, bf16"
        checks.append(
            {
                "target": f"fused q/k/v peak MB / unfused, {where}",
                "ratio": fused / unfused, "bound": "<= 1", "pass": fused <= unfused,
                "numerator_ms": fused, "denominator_ms": unfused, "method": "peak memory", "unit": "MB",
            }
        )  # fmt: skip
        if ref_extra > 0:
            extra = max(fused, unfused) - peak["base"]
            checks.append(
                {
                    "target": f"CoRA extra MB over base / reference's extra, {where}",
                    "ratio": extra / ref_extra, "bound": "<= 0.25",
                    "pass": extra <= 0.25 * ref_extra,
                    "numerator_ms": extra, "denominator_ms": ref_extra, "method": "peak memory", "unit": "MB",
                }
            )  # fmt: skip
    return checks


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    out = {
        **results,
        "records": [{k: clean(v) for k, v in rec.items()} for rec in results["records"]],
    }
    path.write_text(json.dumps(out, indent=1) + "\n")


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _err(rec: dict) -> str:
    e, g = rec.get("max_rel_err"), rec.get("max_rel_err_grad")
    if e is None:
        return "-"
    return f"{e:.1e}" if g is None else f"{e:.1e}/{g:.1e}"


def _rows(records: list[dict]):
    for rec in records:
        note = rec.get("skip_reason") or ""
        if rec["status"] == "ok" and rec.get("roofline_pct") is None and rec.get("roofline_note"):
            note = ""
        timing = _fmt(rec["median_ms"], ".3f")
        if rec.get("samples_per_s") is not None:
            timing += f" ({rec['samples_per_s']:.0f}/s)"
        yield [
            f"{rec['op']} {rec['mode']}",
            str(rec["r"]),
            f"{rec['B']}x{rec['L']}",
            rec["method"],
            timing,
            _fmt(rec.get("x_base"), ".2f"),
            _fmt(rec.get("speedup_vs_naive"), ".1f"),
            _fmt(rec["tflops"], ".3f"),
            _fmt(rec["gbps"], ".1f"),
            _fmt(rec["roofline_pct"], ".1f"),
            _fmt(rec["peak_mem_mb"], ".1f"),
            _fmt(rec.get("host_us"), ".1f"),
            _err(rec),
            note,
        ]


HEADERS = [
    "workload", "r", "BxL", "method", "median ms", "x base", "vs naive", "TFLOP/s", "GB/s",
    "roofline %", "peak MB", "host us", "rel err (y/grad)", "skipped / note",
]  # fmt: skip


def _verdict(passed: Optional[bool]) -> str:
    """PASS, FAIL, or INFO for a measurement this machine cannot judge (``None``)."""
    return "INFO" if passed is None else ("PASS" if passed else "FAIL")


_VERDICT_MARKUP = {
    "PASS": "[green]PASS[/green]",
    "FAIL": "[red]FAIL[/red]",
    "INFO": "[dim]INFO[/dim]",
}


def print_table(results: dict, console=None) -> None:
    """Print the records as a rich table (plain Markdown without rich), then the checks."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(markdown_table(results))
        for c in results.get("checks", []):
            print(f"{_verdict(c['pass'])} {c['target']}: {c['ratio']:.2f} ({c['bound']})")
        return

    console = console or Console(width=220)
    meta = results["meta"]
    title = escape(f"CoRA benchmarks on {meta['device']} ({meta['dtype']}, {meta['machine']})")
    table = Table(title=title, show_lines=False, header_style="bold")
    widths = {"workload": 21, "BxL": 6, "method": 15, "median ms": 9}
    for h in HEADERS:
        table.add_column(
            h, overflow="fold", no_wrap=h in widths, min_width=widths.get(h),
            ratio=3 if h == "skipped / note" else None,
        )  # fmt: skip
    previous = None
    for rec, row in zip(results["records"], _rows(results["records"])):
        key = (rec["op"], rec["mode"], rec["r"], rec["B"], rec["L"])
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        style = None
        if rec["status"] == "skipped":
            style = "dim"
        elif rec["status"] == "error":
            style = "red"
        elif rec["method"].startswith("ours"):
            style = "bold"
        table.add_row(*(escape(c) for c in row), style=style)
    console.print(table)
    notes = {r["roofline_note"] for r in results["records"] if r.get("roofline_pct") is None}
    notes.discard(None)
    for n in sorted(notes):
        console.print(f"[dim]roofline %: {escape(n)}[/dim]")
    for c in results.get("checks", []):
        mark = _VERDICT_MARKUP[_verdict(c["pass"])]
        ceiling = c.get("naive_over_base")
        extra = f"; naive / base = {ceiling:.2f}" if ceiling is not None else ""
        console.print(
            f"{mark} {escape(c['target'])}: {c['ratio']:.2f} (target {c['bound']}; "
            f"{c['numerator_ms']:.3f} {c.get('unit', 'ms')} / "
            f"{c['denominator_ms']:.3f} {c.get('unit', 'ms')}, "
            f"{escape(c['method'])}{extra})"
        )


def markdown_table(results: dict, ops: Optional[tuple[str, ...]] = None) -> str:
    """The records as a Markdown table (for the README)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    for rec, row in zip(results["records"], _rows(results["records"])):
        if ops is not None and rec["op"] not in ops:
            continue
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def summary_markdown(results: dict, rank: int = 16) -> str:
    """A compact Markdown pivot: one row per workload (rank ``rank``), median ms per method.

    Columns: every method present, then ``ours / base`` and ``naive / ours`` (``ours`` being
    the backend ``auto`` resolves to: ``torch`` on a GPU and on a CPU, see
    :mod:`llmrec_kernels.backends`; ``ours[fused_qkv]`` for the model workloads). Skipped
    methods show "skip".
    """
    ours = "ours[torch]"
    rows: dict[tuple, dict[str, dict]] = {}
    for rec in results["records"]:
        if rec["op"] in ("proj", "qkv") and rec["r"] != rank:
            continue
        rows.setdefault(
            (rec["op"], rec["mode"], rec["B"], rec["L"], rec["d_in"], rec["d_out"]), {}
        )[rec["method"]] = rec
    methods: list[str] = []
    for recs in rows.values():
        for m, rec in recs.items():
            if m != "*" and m not in methods and rec["status"] != "skipped":
                methods.append(m)
    head = ["workload", "B x L", *methods, "ours / base", "naive / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order = {"proj": 0, "qkv": 1, "decoder_layer": 2, "scoring": 3}
    keys = sorted(rows, key=lambda k: (order.get(k[0], 9), k[1], k[3] > 1, k[2], k[3]))
    for key in keys:
        (op, mode, b, length, d_in, d_out), recs = key, rows[key]
        cells = [f"{op} {mode} {d_in}->{d_out}", f"{b} x {length}"]
        for m in methods:
            rec = recs.get(m)
            if rec is None or rec["median_ms"] is None:
                cells.append("skip" if rec is not None or "*" in recs else "")
            else:
                cells.append(f"{rec['median_ms']:.3f}")
        o = recs.get(ours) or recs.get("ours[fused_qkv]")
        base, naive = recs.get("base"), recs.get("naive")
        ok = o is not None and o["median_ms"] is not None
        cells.append(
            f"{o['median_ms'] / base['median_ms']:.2f}" if ok and base and base["median_ms"] else ""
        )
        cells.append(
            f"{naive['median_ms'] / o['median_ms']:.1f}"
            if ok and naive and naive["median_ms"]
            else ""
        )
        lines.append("| " + " | ".join(cells) + " |")
    skipped: dict[str, set] = {}
    for recs in rows.values():
        for m, rec in recs.items():
            if m not in methods and m != "*" and rec.get("skip_reason"):
                skipped.setdefault(m, set()).add(rec["skip_reason"])
    for m, reasons in skipped.items():
        lines.append(f"\n`{m}`: skipped everywhere ({'; '.join(sorted(reasons))}).")
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> Optional[Path]:
    """Median time against batch size, one line per method, one panel per workload family.

    Returns the path written, or ``None`` (no timed record, or matplotlib not installed).
    """
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["records"] if r["median_ms"] is not None]
    if not records:
        return None
    ranks = sorted({r["r"] for r in records if r["op"] in ("proj", "qkv")})
    rank = 16 if 16 in ranks else (ranks[0] if ranks else None)
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["op"] in ("proj", "qkv") and r["r"] != rank:
            continue
        phase = "L=1 (decode)" if r["L"] == 1 else ("L>1 (prefill)" if r["L"] > 1 else "")
        panels[(r["op"], r["mode"], phase)].append(r)
    order = {"proj": 0, "qkv": 1, "decoder_layer": 2, "scoring": 3}
    keys = sorted(panels, key=lambda k: (order.get(k[0], 9), k[1], k[2]))
    ncols = 2
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), squeeze=False)
    methods = []
    for k in keys:
        for r in panels[k]:
            if r["method"] not in methods:
                methods.append(r["method"])
    cmap = plt.get_cmap("tab10")
    colours = {m: cmap(i % 10) for i, m in enumerate(methods)}
    for ax, key in zip(axes.flat, keys):
        op, mode, phase = key
        by_method: dict[str, list] = defaultdict(list)
        for r in panels[key]:
            by_method[r["method"]].append((r["B"], r["median_ms"], r["L"]))
        for m, pts in by_method.items():
            pts.sort()
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                color=colours[m], linewidth=2.2 if m.startswith("ours") else 1.2,
                linestyle="--" if m in ("base", "naive") else "-",
            )  # fmt: skip
        bls = sorted({(r["B"], r["L"]) for r in panels[key]})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([b for b, _ in bls])
        ax.set_xticklabels([f"{b}" if ll <= 1 else f"{b}\nL={ll}" for b, ll in bls])
        d_in, d_out = panels[key][0]["d_in"], panels[key][0]["d_out"]
        rtxt = f", r={rank}" if op in ("proj", "qkv") else ""
        ax.set_title(f"{op} {mode} {phase} d={d_in}->{d_out}{rtxt}", fontsize=9)
        ax.set_xlabel("batch B")
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    meta = results["meta"]
    fig.suptitle(
        f"CoRA benchmarks: median time vs batch, {meta['device']}, {meta['dtype']}", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
