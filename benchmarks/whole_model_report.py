"""The whole-model benchmark's table (:mod:`benchmarks.whole_model`), apart from its runner:
the GPU check's summary step writes it without importing torch (it has seconds to run)."""

from __future__ import annotations

__all__ = ["markdown"]


def markdown(results: dict) -> str:
    """A table of tokens/s, peak memory and the ratio to the unpatched model."""
    m = results["meta"]
    lines = [
        f"Whole model, LLaMA-7B shape ({m['layers']} of {m['layers_of']} layers, {m['memory']}), "
        f"{m['dtype']}, r {m['rank']}, train {m['train_BxL']}, score {m['score_BxL']}, {m['device']}",
        "",
        "Peak GiB: the measured model's own weights plus the most the step allocated.",
        "",
        "| method | train tok/s | train x base | train peak GiB | score tok/s | score x base | score peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = next((r for r in results["records"] if r["method"] == "base"), {})

    def ratio(rec, kind):
        a, b = rec.get(f"{kind}_s"), base.get(f"{kind}_s")
        return f"{a / b:.3f}" if a and b else "-"

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for rec in results["records"]:
        if rec["status"] != "ok":
            lines.append(f"| {rec['method']} | {rec['status']} | | | | | |")
            continue
        lines.append(
            f"| {rec['method']} | {fmt(rec['train_tokens_per_s'], '.0f')} | {ratio(rec, 'train')} "
            f"| {fmt(rec['train_peak_gib'], '.2f')} | {fmt(rec['score_tokens_per_s'], '.0f')} "
            f"| {ratio(rec, 'score')} | {fmt(rec['score_peak_gib'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"
