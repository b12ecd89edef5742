"""``llmrec compare RUN_DIR...``: one table (and one plot) of the metrics of many runs.

Every method writes the same metrics layout (``<run>/metrics.json``: ``method`` or, for CF
runs, ``model``; a ``test`` block with ``auc``, ``uauc``, ``warm`` / ``cold`` sub-blocks and,
for ranking methods, ``hit@K`` / ``ndcg@K``; ``train.train_time_s``; ``wall_time_s``), so
any mix of CF, CoRA, CoLLM and A-LLMRec runs goes in one table. A run directory without
``metrics.json`` but with ``eval_<split>.json`` (``llmrec evaluate``) is read from that; a
JSON file may be given instead of a directory. ``recommend_k*_*.json`` files (``llmrec
recommend --retrieve K``) in a run directory add the retrieval recall@K and the per-user
time. Missing values print as ``-``.

Runs scored on different rows are not comparable: a metrics block records the sha256 of its
rows (``rows_sha256``, :func:`llmrec.metrics.rows_digest`), and runs whose digests differ
are refused unless ``allow_different_rows`` (``--allow-different-rows``), which marks each
row with the first 8 hex digits of its digest (column ``rows id``). A run written before the
digest existed is not checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

__all__ = [
    "COLUMNS",
    "columns",
    "compare_runs",
    "load_metrics",
    "plot_rows",
    "render_table",
    "summarize",
]

#: (key, header, format) of the table's columns, in order
COLUMNS = [
    ("run", "run", "s"),
    ("method", "method", "s"),
    ("llm", "LLM", "s"),
    ("rows", "test rows", "d"),
    ("rows_id", "rows id", "s"),  # shown only when runs of different rows are allowed
    ("auc", "AUC", ".4f"),
    ("uauc", "UAUC", ".4f"),
    ("warm_auc", "warm AUC", ".4f"),
    ("warm_uauc", "warm UAUC", ".4f"),
    ("cold_auc", "cold AUC", ".4f"),
    ("cold_uauc", "cold UAUC", ".4f"),
    ("retrieval", "retrieval R@K", "s"),
    ("train_time_s", "train s", ".0f"),
    ("wall_time_s", "wall s", ".0f"),
]


def columns() -> List[tuple]:
    """:data:`COLUMNS` with every registered method's ``report_columns`` (e.g. A-LLMRec's
    Hit@1 / NDCG@10) before the retrieval column."""
    from llmrec.method import available_methods

    extra: List[tuple] = []
    for cls in available_methods().values():
        extra.extend(c for c in cls.report_columns if c not in extra)
    at = [k for k, _, _ in COLUMNS].index("retrieval")
    return COLUMNS[:at] + extra + COLUMNS[at:]


PLOT_METRICS = [
    ("auc", "AUC"),
    ("uauc", "UAUC"),
    ("warm_auc", "warm AUC"),
    ("cold_auc", "cold AUC"),
]


def load_metrics(path: Union[str, Path], split: str = "test") -> tuple[dict, Path]:
    """The metrics dict of a run directory (or a metrics JSON file) and the file read."""
    path = Path(path)
    if path.is_dir():
        for name in ("metrics.json", f"eval_{split}.json"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(
                f"{path}: no metrics.json or eval_{split}.json (is it a run directory written by "
                "`llmrec train`, `llmrec train-cf` or `llmrec evaluate`?)"
            )
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such run directory or metrics file")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc


def _num(x) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _retrieval(run_dir: Path) -> Optional[str]:
    best = None
    for f in sorted(run_dir.glob("recommend_k*_*.json")):
        try:
            rec = json.loads(f.read_text())["recommend"]
        except (json.JSONDecodeError, KeyError):
            continue
        k = rec.get("k")
        r = _num(rec.get("retrieval", {}).get(f"recall@{k}"))
        t = _num(rec.get("time_per_user_s", {}).get("total"))
        if r is not None and (best is None or k > best[0]):
            kind = rec.get("index", {}).get("kind", "?")
            best = (k, f"{r:.3f} (K={k} {kind}{f', {t:.2f}s/user' if t is not None else ''})")
    return best[1] if best else None


def summarize(
    metrics: dict, name: str, split: str = "test", run_dir: Optional[Path] = None
) -> dict:
    """One table row from a metrics dict."""
    block = metrics.get(split) or {}
    cfg = metrics.get("config") or {}
    method = metrics.get("method") or metrics.get("model") or "?"
    if "model" in metrics and "method" not in metrics:
        method = f"{method} (CF)"
    tuning = (metrics.get("train") or {}).get("tuning")
    if tuning:
        method = f"{method} ({tuning})"
    llm = cfg.get("llm")
    if llm == "tiny" and isinstance(cfg.get("tiny"), dict) and cfg["tiny"].get("hidden_size"):
        llm = f"tiny-{cfg['tiny']['hidden_size']}"
    row = {
        "run": name,
        "method": method,
        "llm": llm if isinstance(llm, str) else "-",
        "rows": block.get("rows"),
        "rows_id": None,
        "auc": _num(block.get("auc")),
        "uauc": _num(block.get("uauc")),
        "train_time_s": _num((metrics.get("train") or {}).get("train_time_s")),
        "wall_time_s": _num(metrics.get("wall_time_s")),
    }
    for part in ("warm", "cold"):
        sub = block.get(part) or {}
        row[f"{part}_auc"] = _num(sub.get("auc"))
        row[f"{part}_uauc"] = _num(sub.get("uauc"))
    for key, _, _ in columns():
        if key not in row and key != "retrieval":
            row[key] = _num(block.get(key))
    row["retrieval"] = _retrieval(run_dir) if run_dir is not None else None
    return row


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "s":
        return str(value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def _visible(rows: Sequence[dict]) -> List[tuple]:
    """Columns with at least one value (the identity columns always)."""
    keep = []
    for key, header, fmt in columns():
        if key in ("run", "method") or any(r.get(key) not in (None, "-") for r in rows):
            keep.append((key, header, fmt))
    return keep


def render_table(rows: Sequence[dict], title: str = "llmrec runs", markdown: bool = False) -> str:
    """The table as text: rich's box drawing, or a Markdown table with ``markdown=True``."""
    cols = _visible(rows)
    if markdown:
        lines = ["| " + " | ".join(h for _, h, _ in cols) + " |"]
        lines.append("|" + "|".join(" --- " for _ in cols) + "|")
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
        return "\n".join(lines)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for key, header, fmt in cols:
        table.add_column(
            header, justify="left" if fmt == "s" else "right", no_wrap=key != "retrieval"
        )
    for r in rows:
        table.add_row(*(_fmt(r.get(k), f) for k, _, f in cols))
    console = Console(width=max(120, 14 * len(cols)), record=True)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def plot_rows(rows: Sequence[dict], path: Union[str, Path], title: str = "llmrec runs") -> Path:
    """Grouped bars of AUC / UAUC / warm / cold AUC per run (a second panel for Hit@1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    has_hit = any(r.get("hit@1") is not None for r in rows)
    fig, axes = plt.subplots(
        1, 2 if has_hit else 1, figsize=(max(6, 1.6 * len(rows) + 3) * (1.5 if has_hit else 1), 4.5),
        gridspec_kw={"width_ratios": [3, 1]} if has_hit else None, squeeze=False,
    )  # fmt: skip
    ax = axes[0, 0]
    x = np.arange(len(rows))
    width = 0.8 / len(PLOT_METRICS)
    for j, (key, label) in enumerate(PLOT_METRICS):
        vals = [r.get(key) if r.get(key) is not None else np.nan for r in rows]
        ax.bar(x + (j - (len(PLOT_METRICS) - 1) / 2) * width, vals, width, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['run']}\n{r['method']}" for r in rows], fontsize=8)
    ax.set_ylabel("test")
    lo = [r.get(k) for r in rows for k, _ in PLOT_METRICS if r.get(k) is not None]
    ax.set_ylim(max(0.0, min(lo, default=0.5) - 0.05), min(1.0, max(lo, default=0.5) + 0.05))
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title)
    if has_hit:
        ax2 = axes[0, 1]
        sub = [r for r in rows if r.get("hit@1") is not None]
        keys = [
            ("hit@1", "Hit@1 (scored)"),
            ("hit@1_generated", "Hit@1 (generated)"),
            ("ndcg@10", "NDCG@10"),
        ]
        xs = np.arange(len(sub))
        w = 0.8 / len(keys)
        for j, (key, label) in enumerate(keys):
            vals = [r.get(key) if r.get(key) is not None else np.nan for r in sub]
            ax2.bar(xs + (j - 1) * w, vals, w, label=label)
        ax2.set_xticks(xs)
        ax2.set_xticklabels([r["run"] for r in sub], fontsize=8)
        ax2.set_title("ranking (candidates)")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare_runs(
    paths: Sequence[Union[str, Path]],
    *,
    split: str = "test",
    plot: Optional[Union[str, Path]] = None,
    json_out: Optional[Union[str, Path]] = None,
    markdown: bool = False,
    sort: Optional[str] = None,
    allow_different_rows: bool = False,
) -> tuple[List[dict], str]:
    """Rows for ``paths`` (run directories or metrics files), the rendered table; optionally
    a PNG plot and the rows as JSON. Run names are the directory names (made unique).

    Raises ValueError (one line) when two runs' ``split`` blocks record different
    ``rows_sha256``, unless ``allow_different_rows``: then each row's ``rows_id`` shows its
    digest's first 8 hex digits.
    """
    rows: List[dict] = []
    digests: List[Optional[str]] = []
    names: Dict[str, int] = {}
    for p in paths:
        metrics, file = load_metrics(p, split)
        run_dir = Path(p) if Path(p).is_dir() else None
        name = (run_dir or file.parent).name if run_dir else file.stem
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            name = f"{name}#{names[name]}"
        rows.append(summarize(metrics, name, split, run_dir))
        digest = (metrics.get(split) or {}).get("rows_sha256")
        digests.append(digest if isinstance(digest, str) else None)
    if len({d for d in digests if d is not None}) > 1:
        if not allow_different_rows:
            groups: Dict[str, List[str]] = {}
            for row, digest in zip(rows, digests):
                if digest is not None:
                    groups.setdefault(digest, []).append(str(row["run"]))
            listed = " vs ".join(f"{', '.join(names)} ({d[:8]})" for d, names in groups.items())
            raise ValueError(
                f"the runs were scored on different {split} rows: {listed}; compare runs of "
                "the same data and --max-test-rows, or pass --allow-different-rows to show "
                "them marked"
            )
        for row, digest in zip(rows, digests):
            row["rows_id"] = digest[:8] if digest else None
    if sort:
        rows.sort(key=lambda r: (r.get(sort) is None, -(r.get(sort) or 0)))
    text = render_table(rows, title=f"llmrec runs ({split})", markdown=markdown)
    if plot:
        plot_rows(rows, plot, title=f"llmrec runs ({split})")
    if json_out:  # atomic: a full disk leaves no half-written file
        from llmrec.safe_files import atomic_write_text

        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_out, json.dumps(rows, indent=2) + "\n")
    return rows, text


def add_compare_parser(sub) -> None:
    """Register ``llmrec compare`` on an argparse subparsers object."""
    p = sub.add_parser(
        "compare",
        help="one table (and a PNG plot) of the metrics of many runs",
        description="Read RUN/metrics.json (or RUN/eval_<split>.json, or a metrics JSON file) of "
        "every run given (CF, CoRA, CoLLM, A-LLMRec, ...), print one table and plot it.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or metrics files")
    p.add_argument("--split", default="test", help="metrics block to compare (test)")
    p.add_argument("--plot", default="compare.png", help="PNG to write (compare.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write a plot")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--sort", default=None, help="sort by a column key, e.g. auc (descending)")
    p.add_argument(
        "--allow-different-rows",
        action="store_true",
        help="put runs scored on different rows side by side, each marked with its rows' "
        "sha256 (refused without it)",
    )
    p.add_argument(
        "--accept-changed-inputs",
        action="store_true",
        help="compare runs whose inputs changed since they recorded their sha256 (recorded "
        "in each RUN/run.json)",
    )


def cmd_compare(args) -> int:
    import sys

    try:
        _, text = compare_runs(
            args.runs,
            split=args.split,
            plot=None if args.no_plot else args.plot,
            json_out=args.json,
            markdown=args.markdown,
            sort=args.sort,
            allow_different_rows=args.allow_different_rows,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"llmrec compare: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(text)
    if not args.no_plot:
        print(f"[llmrec] plot -> {args.plot}", file=sys.stderr)
    return 0
