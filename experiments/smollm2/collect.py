"""The SmolLM2 experiment's table, recomputed from every run's test predictions.

    python experiments/smollm2/collect.py [RUNS_DIR] [--data DIR] [--fresh] [--readme README.md]

The main table scores every method on the whole test split (``test_predictions.csv``:
MF's own, and each LLM run's ``llmrec evaluate --rows all`` predictions, written by
``run.sh`` with ``FULL_TEST=1``); a run still scoring it is left out. Every method is also
scored on the runs' seeded 2,000-row subsample (``subsample_predictions.csv``), the rows of
the other seeds' runs and of the learning curve, so those compare on equal rows. The
metrics are recomputed here with one function, not copied from each run's
``metrics.json``; the row sets are named by :func:`llmrec.metrics.rows_digest`, the digest
``llmrec evaluate`` and ``llmrec compare`` print. Writes ``experiments/smollm2/results.json``
and ``results.md`` (the README's table) beside this file, and ``learning_curve.png``.

Runs live on one machine's disk and are git-ignored, so a later machine may hold only the
runs it re-ran: an entry of the committed ``results.json`` whose run directory is absent
here is kept (marked with the commit it was collected at), as long as it was scored on the
same rows; ``--fresh`` drops them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data import load_run_data
from llmrec.metrics import evaluate_predictions, rows_digest

HERE = Path(__file__).resolve().parent
#: (run directory, label) in the table's order
RUNS = [
    ("mf", "MF (d 256)"),
    ("zeroshot", "SmolLM2 zero-shot"),
    ("tallrec", "TALLRec-style LoRA (text only)"),
    ("collm", "CoLLM (two-step)"),
    ("cora", "CoRA"),
    ("allmrec", "A-LLMRec (lr 1e-4, the reference's)"),
    ("allmrec_lr1e-3", "A-LLMRec (lr 1e-3)"),
    ("cora_tiny", "ablation: CoRA on the random tiny LLM"),
    ("cora_nocf", "ablation: CoRA on SmolLM2, CF embeddings zeroed"),
]
#: A-LLMRec's own test metrics, copied from its metrics.json: the target among ``candidates``
#: titles (the target and unseen random items) ranked by their log-likelihood, and the
#: generated title matched to the target (``hit@1_generated``, A-LLMRec's own measure)
RANKING_KEYS = ("hit@1", "popularity_hit@1", "cf_dot_hit@1", "hit@5", "hit@10", "ndcg@5",
                "ndcg@10", "hit@1_generated", "hit@1_generated_exact", "episodes",
                "candidates")  # fmt: skip
#: ML-1M test AUC of each method on Vicuna-7B as the CoRA paper reports it (Table 2)
PUBLISHED = {"mf": 0.6482, "tallrec": 0.7097, "collm": 0.7295, "cora": 0.7361}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=HERE)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _keys(pred) -> set:
    return set(zip(pred["uid"], pred["iid"]))


def _same_rows(named: dict, what: str):
    """The one ``(uid, iid)`` set of ``named``'s predictions ({name: frame}); None if empty."""
    keys = None
    for name, pred in named.items():
        k = _keys(pred)
        if keys is not None and k != keys:
            raise SystemExit(f"{name}: its {what} rows differ from the other LLM runs'")
        keys = k
    return keys


def collect(runs_dir: Path, data_dir: str) -> dict:
    data = load_run_data(data_dir)
    test = data["test"][["uid", "iid", "label", "not_cold"]]
    rows = {}
    for name, label in RUNS:
        run = runs_dir / name
        if not (run / "test_predictions.csv").exists():
            continue  # not run here, or still scoring the whole split
        sub_path = run / "subsample_predictions.csv"
        rows[name] = {
            "label": label,
            "pred": pd.read_csv(run / "test_predictions.csv"),
            "sub": pd.read_csv(sub_path) if sub_path.exists() else None,
            "metrics": _json(run / "metrics.json"),
            "eval": _json(run / "eval_test_all.json"),
        }
    llm = {n: r for n, r in rows.items() if n != "mf"}
    keys = _same_rows({n: r["pred"] for n, r in llm.items()}, "test")
    sub_keys = _same_rows({n: r["sub"] for n, r in llm.items() if r["sub"] is not None},
                          "subsample")  # fmt: skip
    if sub_keys is None:  # no LLM run here yet: a curve or seed run names the subsample
        found = next(iter(sorted(runs_dir.glob("*/*/test_predictions.csv"))), None)
        sub_keys = _keys(pd.read_csv(found, usecols=["uid", "iid"])) if found else None
    out = {"machine": {"cpu": _cpu(), "cores": __import__("os").cpu_count()},
           "commit": _commit(), "test_rows_sha256": _rows_digest(test, keys),
           "test_rows": len(keys) if keys else None,
           "subsample_rows_sha256": _rows_digest(test, sub_keys),
           "subsample_rows": len(sub_keys) if sub_keys else None, "methods": {}}  # fmt: skip
    for name, r in rows.items():
        m = _test_metrics(r["pred"], test, keys)
        sub = _subsample_pred(r) if sub_keys else None
        sub_m = _test_metrics(sub, test, sub_keys) if sub is not None else None
        train = r["metrics"].get("train", {})
        cfg = r["metrics"].get("config", {})
        scoring = r["eval"].get("scoring") or {}
        out["methods"][name] = {
            "label": r["label"],
            "rows": int(m["rows"]),
            "auc": m["auc"], "uauc": m["uauc"],
            "warm_auc": m["warm"]["auc"], "warm_uauc": m["warm"]["uauc"],
            "cold_auc": m["cold"]["auc"], "cold_uauc": m["cold"]["uauc"],
            "warm_rows": int(m["warm"]["rows"]), "cold_rows": int(m["cold"]["rows"]),
            "subsample_auc": sub_m["auc"] if sub_m else None,
            "subsample_uauc": sub_m["uauc"] if sub_m else None,
            # MF fits the whole train split (the CF embeddings every LLM method reads)
            "train_rows": train.get("rows") if name != "mf" else len(data["train"]),
            # the budget: optimizer steps at the batch size (CoLLM: both steps)
            "steps": train.get("steps"),
            "batch_size": (cfg.get("train") or {}).get("batch_size"),
            "answer_score": cfg.get("answer_score"),
            "train_time_s": train.get("train_time_s"),
            "wall_time_s": r["metrics"].get("wall_time_s"),
            # the whole split's scoring, summed over the chunks of every session that wrote one
            "scoring_time_s": scoring.get("seconds"),
            "scoring_chunks": scoring.get("chunks"),
            "scoring_timed_chunks": scoring.get("timed_chunks"),
            "machine": r["metrics"].get("machine") or r["eval"].get("machine"),
            "llm": cfg.get("llm"), "llm_dtype": cfg.get("llm_dtype"),
            "published_vicuna7b_auc": PUBLISHED.get(name),
        }  # fmt: skip
        _count_reused_step(out["methods"][name], train, runs_dir)
        ranking = {k: v for k, v in r["metrics"].get("test", {}).items() if k in RANKING_KEYS}
        if ranking:
            out["methods"][name]["ranking"] = ranking
    out["seeds"] = _seeds(runs_dir, rows, test, sub_keys)
    out["curve"] = _curve(runs_dir, rows, test, sub_keys)
    out["tiny_draws"] = _tiny_draws(runs_dir, test, sub_keys, out["curve"])
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _subsample_pred(r: dict):
    """A run's predictions on the subsample: its ``subsample_predictions.csv``, or the whole
    split's (MF's, and a run scored on the subsample only) to be cut to the subsample."""
    return r["sub"] if r["sub"] is not None else r["pred"]


def _seeds(runs_dir: Path, rows: dict, test, sub_keys) -> list:
    """Each method's AUC / UAUC under every seed run here (``RUNS/seed<S>/<name>``, written
    by ``SEED=S FULL_TEST=0 run.sh``) beside seed 0's, all on the 2,000-row subsample: the
    spread of one method."""
    points = []
    for seed_dir in sorted(runs_dir.glob("seed*")):
        seed = int(seed_dir.name[4:])
        for name, label in RUNS:
            pred = seed_dir / name / "test_predictions.csv"
            if name not in rows or not pred.exists():
                continue
            other = pd.read_csv(pred)
            if sub_keys is None or _keys(other) != sub_keys:
                raise SystemExit(f"{pred}: scored on other test rows than seed 0's subsample")
            base = _test_metrics(_subsample_pred(rows[name]), test, sub_keys)
            m = _test_metrics(other, test, sub_keys)
            points.append({"name": name, "label": label, "seed": seed, "auc": m["auc"],
                           "uauc": m["uauc"], "seed0_auc": base["auc"],
                           "seed0_uauc": base["uauc"]})  # fmt: skip
    return points


def seeds_markdown(res: dict) -> str:
    lines = ["| method | seed | AUC | UAUC |", "|---|---|---|---|"]
    for name, m in res["methods"].items():
        others = [p for p in res.get("seeds", []) if p["name"] == name]
        if not others:
            continue
        aucs = [others[0]["seed0_auc"]] + [p["auc"] for p in others]
        lines.append(f"| {m['label']} | 0 | {_f(aucs[0])} | {_f(others[0]['seed0_uauc'])} |")
        for p in others:
            lines.append(f"| | {p['seed']} | {_f(p['auc'])} | {_f(p['uauc'])} |")
        lines.append(f"| | range | {_f(max(aucs) - min(aucs))} | |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def _rows_digest(test, keys) -> str | None:
    """:func:`llmrec.metrics.rows_digest` of ``test``'s rows whose ``(uid, iid)`` is in
    ``keys``: the digest ``llmrec evaluate`` writes for the same rows (``rows_sha256``)."""
    if keys is None:
        return None
    rows = test[[k in keys for k in zip(test["uid"], test["iid"])]]
    return rows_digest(rows["uid"], rows["iid"], rows["label"])


def merge_earlier(res: dict, earlier: dict) -> dict:
    """``res`` plus the entries of an ``earlier`` collection whose runs ``res`` lacks (a run
    re-run here replaces its earlier entry). Each kept entry names the commit it was
    collected at. Method entries are kept only from a collection of the same whole-split
    rows, curve, seed and tiny-LLM entries only from one of the same subsample; other rows
    stop the merge."""
    commit = earlier.get("commit", "unknown")

    def same(field: str) -> bool:
        new, old = res.get(field), earlier.get(field)
        if new and old and new != old:
            raise SystemExit(f"results.json's {field} differs from the runs here; rerun "
                             "with --fresh")  # fmt: skip
        return bool(old) and (not new or new == old)

    merged = dict(res)
    if earlier.get("methods") and same("test_rows_sha256"):
        methods = {}
        for name, _ in RUNS:
            if name in res["methods"]:
                methods[name] = res["methods"][name]
            elif name in earlier["methods"]:
                old = dict(earlier["methods"][name])
                old.setdefault("collected_at_commit", commit)
                methods[name] = old
        merged["methods"] = methods
        for field in ("test_rows_sha256", "test_rows"):
            merged[field] = res.get(field) or earlier.get(field)
    if not same("subsample_rows_sha256"):
        return merged
    for field in ("subsample_rows_sha256", "subsample_rows"):
        merged[field] = res.get(field) or earlier.get(field)

    def union(new: list, old: list, key) -> list:
        have = {key(p) for p in new}
        kept = [dict(p, collected_at_commit=p.get("collected_at_commit", commit))
                for p in old if key(p) not in have]  # fmt: skip
        return new + kept

    curve = union(res["curve"], earlier.get("curve", []), lambda p: (p["llm"], p["train_rows"]))
    merged["curve"] = sorted(curve, key=lambda p: (p["llm"], p["train_rows"] or 0))
    draws = earlier.get("tiny_draws", [])
    draws = union(res["tiny_draws"], draws, lambda p: (p["train_rows"], p["draw"]))
    merged["tiny_draws"] = sorted(draws, key=lambda p: (p["train_rows"], p["draw"]))
    seeds = union(res["seeds"], earlier.get("seeds", []), lambda p: (p["name"], p["seed"]))
    merged["seeds"] = sorted(seeds, key=lambda p: (p["name"], p["seed"]))
    return merged


def _count_reused_step(entry: dict, train: dict, runs_dir: Path) -> None:
    """A CoLLM run whose step 1 is another run's LoRA (``--collm-lora-from``): name that run
    and add its training time, so the table's train time is the method's whole cost. The
    step-1 run need not be scored on the whole split (``run.sh collm`` trains it without)."""
    for stage in train.get("stages", []):
        src = stage.get("lora_from")
        if not src:
            continue
        run = Path(src["path"]).resolve().parent
        name = next((n for n, _ in RUNS if (runs_dir / n).resolve() == run), None)
        if name is None or not (run / "metrics.json").exists():
            raise SystemExit(f"{entry['label']}: its step 1 ({src['path']}) is not a "
                             "finished run here")  # fmt: skip
        entry["step1_run"] = name
        step1 = _json(run / "metrics.json").get("train", {}).get("train_time_s")
        if entry["train_time_s"] is not None and step1 is not None:
            entry["train_time_s"] += step1
        entry["label"] += f", step 1 from the `{name}` run"


def _test_metrics(pred, test, keys) -> dict:
    """AUC / UAUC (all, warm, cold) of ``pred``'s scores on the experiment's test rows:
    ``test``'s rows (for ``not_cold``), cut to the LLM runs' ``keys`` (``(uid, iid)`` pairs)."""
    pred = pred.merge(test, on=["uid", "iid", "label"], how="inner")
    if keys is not None:
        pred = pred[[k in keys for k in zip(pred["uid"], pred["iid"])]]
    return evaluate_predictions(
        pred["uid"].to_numpy(), pred["label"].to_numpy(), pred["score"].to_numpy(),
        pred["not_cold"].to_numpy(),
    )  # fmt: skip


#: (learning-curve series, run directory of its full-budget point, curve run prefix)
CURVES = [("SmolLM2", "cora", "cora_"), ("tiny random LLM", "cora_tiny", "cora_tiny_")]


def _curve(runs_dir: Path, rows: dict, test, sub_keys) -> list:
    """CoRA's subsample metrics against its training rows, per LLM: the full-budget run of
    the table (``rows``) and the smaller budgets from runs/curve/<prefix><rows>."""
    points = []
    for series, full, prefix in CURVES:
        if full in rows and sub_keys is not None:
            r = rows[full]
            m = _test_metrics(_subsample_pred(r), test, sub_keys)
            train = r["metrics"].get("train", {})
            points.append({
                "llm": series, "run": full, "train_rows": train.get("rows"),
                "auc": m["auc"], "uauc": m["uauc"],
                "warm_auc": m["warm"]["auc"], "cold_auc": m["cold"]["auc"],
                "train_time_s": train.get("train_time_s"),
                "llm_dtype": (r["metrics"].get("config") or {}).get("llm_dtype"),
            })  # fmt: skip
        for d in sorted((runs_dir / "curve").glob(prefix + "[0-9]*")):
            point = _run_point(d, test, sub_keys)
            if point is not None:
                points.append({"llm": series, **point})
    return sorted(points, key=lambda p: (p["llm"], p["train_rows"] or 0))


def _run_point(run: Path, test, keys) -> dict | None:
    """A finished run's test metrics on the experiment's rows (None while it runs)."""
    pred_path, metrics_path = run / "test_predictions.csv", run / "metrics.json"
    if not (pred_path.exists() and metrics_path.exists()):
        return None
    pred = pd.read_csv(pred_path)
    if keys is not None and _keys(pred) != keys:
        raise SystemExit(f"{run}: its test rows differ from the other runs' subsample")
    m = _test_metrics(pred, test, keys)
    metrics = json.loads(metrics_path.read_text())
    train = metrics.get("train", {})
    return {
        "run": run.name, "train_rows": train.get("rows"), "auc": m["auc"], "uauc": m["uauc"],
        "warm_auc": m["warm"]["auc"], "cold_auc": m["cold"]["auc"],
        "train_time_s": train.get("train_time_s"),
        "llm_dtype": (metrics.get("config") or {}).get("llm_dtype"),
    }  # fmt: skip


def _tiny_draws(runs_dir: Path, test, keys, curve: list) -> list:
    """CoRA on other random tiny LLMs (``--tiny-seed``; runs/tiny_draws/cora_tiny_<rows>_s<seed>)
    beside draw 0, the curve's own tiny runs at the same rows."""
    points = [dict(p, draw=0) for p in curve if p["llm"] == "tiny random LLM"]
    for d in sorted((runs_dir / "tiny_draws").glob("cora_tiny_*_s*")):
        point = _run_point(d, test, keys)
        if point is not None:
            draw = int(d.name.rsplit("_s", 1)[1])
            points.append({"llm": "tiny random LLM", "draw": draw, **point})
    rows_with_draws = {p["train_rows"] for p in points if p["draw"] != 0}
    return sorted(
        (p for p in points if p["train_rows"] in rows_with_draws),
        key=lambda p: (p["train_rows"], p["draw"]),
    )


def tiny_draws_markdown(res: dict) -> str:
    draws = res.get("tiny_draws") or []
    if not draws:
        return ""
    lines = [
        "| train rows | tiny LLM draw (--tiny-seed) | AUC | UAUC | warm AUC | cold AUC |",
        "|---|---|---|---|---|---|",
    ]
    for p in draws:
        lines.append(
            f"| {p['train_rows']} | {p['draw']} | {_f(p['auc'])} | {_f(p['uauc'])} | "
            f"{_f(p['warm_auc'])} | {_f(p['cold_auc'])} |"
        )
    for rows in sorted({p["train_rows"] for p in draws}):
        aucs = np.array([p["auc"] for p in draws if p["train_rows"] == rows])
        lines.append(
            f"| {rows} | mean +- sd of {len(aucs)} | {aucs.mean():.4f} +- {aucs.std(ddof=1):.4f}"
            " | | | |"
            if len(aucs) > 1
            else f"| {rows} | 1 draw | {aucs[0]:.4f} | | | |"
        )
    return "\n".join(lines) + "\n"


def curve_markdown(res: dict) -> str:
    if not res.get("curve"):
        return ""
    lines = [
        "| LLM | train rows | AUC | UAUC | warm AUC | cold AUC | train time | dtype | "
        "collected at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["curve"]:
        lines.append(
            f"| {p['llm']} | {p['train_rows']} | {_f(p['auc'])} | {_f(p['uauc'])} | "
            f"{_f(p['warm_auc'])} | {_f(p['cold_auc'])} | {_minutes(p['train_time_s'])} | "
            f"{p.get('llm_dtype') or '-'} | {p.get('collected_at_commit', res['commit'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(res: dict, path: Path) -> bool:
    """AUC (all / warm / cold) against training rows, one colour per LLM; False if no points."""
    if not res.get("curve"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, key, title in zip(axes, ("auc", "warm_auc", "cold_auc"), ("all", "warm", "cold")):
        for series, colour in zip([c[0] for c in CURVES], ("tab:blue", "tab:orange")):
            pts = [p for p in res["curve"] if p["llm"] == series and p["train_rows"]]
            if pts:
                ax.plot([p["train_rows"] for p in pts], [p[key] for p in pts], "o-",
                        color=colour, label=f"CoRA on {series}", zorder=3)  # fmt: skip
            others = [p for p in res.get("tiny_draws") or [] if p["llm"] == series and p["draw"]]
            if others:
                ax.plot([p["train_rows"] for p in others], [p[key] for p in others], "x",
                        color=colour, label="other tiny LLM draws")  # fmt: skip
        mf = res["methods"].get("mf")
        if mf:
            ax.axhline(mf[key], color="grey", ls="--", lw=1, label="MF")
        ax.set_xscale("log")
        ticks = sorted({p["train_rows"] for p in res["curve"] if p["train_rows"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"test AUC, {title} rows")
        ax.set_xlabel("training rows")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _f(v, spec=".4f"):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec)


def _minutes(seconds) -> str:
    if not seconds:
        return "-"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _budget(m: dict) -> str:
    steps, batch = m.get("steps"), m.get("batch_size")
    return f"{steps} x {batch}" if steps and batch else "-"


def _scoring(m: dict) -> str:
    """The whole split's scoring time: every chunk's own time, summed (``-`` where chunks
    were written before chunks recorded their time)."""
    seconds, chunks, timed = (
        m.get("scoring_time_s"),
        m.get("scoring_chunks"),
        m.get("scoring_timed_chunks"),
    )
    if not chunks or not timed:
        return "-"
    return _minutes(seconds) + ("" if timed == chunks else f" ({timed} of {chunks} chunks)")


def _machine(m: dict) -> str | None:
    info = m.get("machine")
    if not info:
        return None
    return f"{info.get('gpu') or info.get('cpu')}, {info.get('torch_threads')} threads"


def markdown(res: dict) -> str:
    lines = [
        "| method | AUC | UAUC | warm AUC | cold AUC | cold UAUC | AUC on the subsample | "
        "train rows | steps x batch | train time | test scoring time | paper AUC (Vicuna-7B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in res["methods"].values():
        trained = bool(m["train_rows"])
        lines.append(
            f"| {m['label']} | {_f(m['auc'])} | {_f(m['uauc'])} | {_f(m['warm_auc'])} | "
            f"{_f(m['cold_auc'])} | {_f(m['cold_uauc'])} | {_f(m.get('subsample_auc'))} | "
            f"{m['train_rows'] or '-'} | {_budget(m) if trained else '-'} | "
            f"{_minutes(m['train_time_s']) if trained else '-'} | {_scoring(m)} | "
            f"{_f(m['published_vicuna7b_auc'])} |"
        )
    any_m = next(iter(res["methods"].values()), None)
    if any_m:
        lines.append("")
        kept = sorted({m["collected_at_commit"] for m in res["methods"].values()
                       if "collected_at_commit" in m})  # fmt: skip
        earlier = f" (rows marked in results.json collected at {', '.join(kept)})" if kept else ""
        machines = sorted({_machine(m) for m in res["methods"].values()} - {None})
        where = (
            "; ".join(machines)
            if machines
            else (f"{res['machine']['cpu']}, {res['machine']['cores']} cores")
        )
        lines.append(
            f"{any_m['rows']} test rows ({any_m['warm_rows']} warm, {any_m['cold_rows']} cold), "
            f"the whole test split: rows digest {str(res.get('test_rows_sha256'))[:12]}. "
            f"The subsample: {res.get('subsample_rows')} of them, digest "
            f"{str(res.get('subsample_rows_sha256'))[:12]}. Run on {where}; "
            f"collected at commit {res['commit']}{earlier}."
        )
    return "\n".join(lines) + "\n"


def ranking_markdown(res: dict) -> str:
    lines = []
    for m in res["methods"].values():
        r = m.get("ranking")
        if not r:
            continue
        cols = [k for k in RANKING_KEYS[:-2] if k in r]
        if not lines:
            lines = ["| method | episodes | candidates | " + " | ".join(cols) + " |",
                     "|---|---|---|" + "---|" * len(cols)]  # fmt: skip
        lines.append(
            f"| {m['label']} | {r.get('episodes', '-')} | {r.get('candidates', '-')} | "
            + " | ".join(_f(r[k]) for k in cols)
            + " |"
        )
    return "\n".join(lines) + "\n" if lines else ""


#: the README lines between these markers are the main table (``--readme``)
README_MARKERS = ("<!-- smollm2-results:begin -->", "<!-- smollm2-results:end -->")


def write_readme(path: Path, table: str) -> None:
    """Replace the lines between :data:`README_MARKERS` in ``path`` with ``table``."""
    text = path.read_text()
    begin, end = README_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path}: needs one {begin} line before one {end} line")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table.rstrip()}\n{end}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="?", default="runs/smollm2", type=Path)
    p.add_argument("--data", default=str(HERE.parents[1].parent / "shared" / "data" / "ml-1m"))
    p.add_argument("--fresh", action="store_true",
                   help="drop results.json's entries whose runs are not in RUNS")  # fmt: skip
    p.add_argument("--readme", type=Path, default=None,
                   help="also write the main table into this README between its "
                   f"{README_MARKERS[0]} and {README_MARKERS[1]} lines")  # fmt: skip
    args = p.parse_args()
    res = collect(args.runs, args.data)
    if not args.fresh and (HERE / "results.json").exists():
        res = merge_earlier(res, json.loads((HERE / "results.json").read_text()))
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    if ranking_markdown(res):
        text += "\nRanking (the test target among its candidates' titles):\n\n"
        text += ranking_markdown(res)
    if seeds_markdown(res):
        text += "\nSeeds (on the subsample; another seed draws other training rows and "
        text += "initial weights):\n\n" + seeds_markdown(res)
    if res["curve"]:
        text += "\nLearning curve (CoRA, on the subsample):\n\n" + curve_markdown(res)
        plot_curve(res, HERE / "learning_curve.png")
    if res["tiny_draws"]:
        text += "\nCoRA on other random tiny LLMs (the subsample):\n\n" + tiny_draws_markdown(res)
    (HERE / "results.md").write_text(text)
    if args.readme is not None:
        write_readme(args.readme, markdown(res))
    print(text)


if __name__ == "__main__":
    main()
