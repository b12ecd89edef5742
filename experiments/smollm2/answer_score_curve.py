"""Learning curves of CoRA on SmolLM2 under the two answer scores (issue 29).

    python experiments/smollm2/answer_score_curve.py [CURVE_RUNS]   # default runs/smollm2/answer_curve

Reads each run's ``train_log.jsonl`` (validation AUC every 20 steps, training loss per step)
and the frozen LLM's validation AUC on the same rows (the curves' step 0), written by
``experiments/smollm2/answer_score_curve.sh``; writes ``answer_score_curve.md`` and
``answer_score_curve.png`` beside this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCORES = ("yes", "yes-no")


def read_curves(root: Path) -> dict:
    """``{score: {"valid": [(step, auc)], "loss": [(step, loss)]}}`` from the runs under root."""
    curves = {}
    for score in SCORES:
        log, frozen = root / f"cora_{score}" / "train_log.jsonl", root / f"frozen_{score}"
        if not log.exists():
            continue
        valid, loss = [], []
        if (frozen / "metrics.json").exists():
            valid.append((0, json.loads((frozen / "metrics.json").read_text())["valid"]["auc"]))
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "eval":
                valid.append((rec["step"], rec["valid_auc"]))
            elif rec["kind"] == "step":
                loss.append((rec["step"], rec["loss"]))
        curves[score] = {"valid": valid, "loss": loss}
    return curves


def markdown(curves: dict) -> str:
    steps = sorted({s for c in curves.values() for s, _ in c["valid"]})
    lines = ["| step | " + " | ".join(f"valid AUC, {s}" for s in curves) + " | "
             + " | ".join(f"train loss, {s} (mean of the last 20 steps)" for s in curves) + " |",
             "|---" * (1 + 2 * len(curves)) + "|"]  # fmt: skip
    for step in steps:
        aucs = [dict(c["valid"]).get(step) for c in curves.values()]
        losses = []
        for c in curves.values():
            window = [v for s, v in c["loss"] if step - 20 < s <= step]
            losses.append(sum(window) / len(window) if window and step else None)
        cells = [f"{v:.4f}" if v is not None else "-" for v in aucs + losses]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for score, c in curves.items():
        ax_auc.plot(*zip(*c["valid"]), "o-", label=f"--answer-score {score}")
        ax_loss.plot(*zip(*c["loss"]), "-", lw=1, label=f"--answer-score {score}")
    ax_auc.set(xlabel="optimizer step (batch 8)", ylabel="validation AUC (200 rows)",
               title="CoRA on SmolLM2-135M, 800 training rows")  # fmt: skip
    ax_loss.set(xlabel="optimizer step", ylabel="training BCE", yscale="log", title="loss")
    for ax in (ax_auc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2/answer_curve")
    curves = read_curves(root)
    if not curves:
        raise SystemExit(f"{root}: no cora_yes / cora_yes-no runs")
    text = markdown(curves)
    (HERE / "answer_score_curve.md").write_text(text)
    plot(curves, HERE / "answer_score_curve.png")
    print(text)


if __name__ == "__main__":
    main()
