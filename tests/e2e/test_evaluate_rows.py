"""``llmrec evaluate --rows`` and ``--state``: which rows and which trainable state are scored.

A run trained with ``--max-test-rows`` is evaluated again on exactly the rows it scored, so
its metrics are reproduced; ``--rows all`` scores the whole split; ``--state`` scores one of
the run's checkpoints instead of its best state (a learning curve from one run).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tiny_cli import synthetic_data, train_tiny

TEST_ROWS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A TALLRec run (no CF needed) of 3 steps, a checkpoint after every step, all kept."""
    root = tmp_path_factory.mktemp("evalrows")
    data = synthetic_data(root, seed=3)
    out = train_tiny("tallrec", data, root / "run", "--batch-size", "4", "--lr", "0.05",
                     "--max-train-rows", "12", "--max-valid-rows", "8", "--max-test-rows",
                     str(TEST_ROWS), "--save-every", "1", "--keep-checkpoints", "0",
                     "--predictions", str(root / "run" / "train_pred.csv"))  # fmt: skip
    return data, out


def _evaluate(out, *extra):
    from llmrec.cli import main

    # outside the run: no output may name a file inside a run the command reads
    metrics = out.parent / f"eval{len(extra)}.json"
    pred = out.parent / f"eval{len(extra)}.csv"
    rc = main(["evaluate", "--run", str(out), "--metrics", str(metrics), "--predictions",
               str(pred), "--no-progress", *extra])  # fmt: skip
    assert rc == 0
    return json.loads(metrics.read_text()), pd.read_csv(pred)


def test_default_rows_are_the_runs_own_and_reproduce_its_metrics(run):
    _, out = run
    trained = json.loads((out / "metrics.json").read_text())
    ev, pred = _evaluate(out)
    assert ev["rows"] == {"which": "run", "count": TEST_ROWS}
    assert ev["test"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-6)
    assert ev["test"]["uauc"] == pytest.approx(trained["test"]["uauc"], abs=1e-6)
    train_pred = pd.read_csv(out / "train_pred.csv")
    assert pred[["uid", "iid", "label"]].equals(train_pred[["uid", "iid", "label"]])
    assert pred["score"].to_numpy() == pytest.approx(train_pred["score"].to_numpy(), abs=1e-5)


def test_rows_all_scores_the_whole_split(run):
    data, out = run
    ev, pred = _evaluate(out, "--rows", "all")
    from llmrec.data import load_run_data

    whole = load_run_data(str(data))["test"]
    assert len(whole) > TEST_ROWS
    assert ev["rows"] == {"which": "all", "count": len(whole)} and len(pred) == len(whole)


def _checkpoints(out):
    """``{step: checkpoint dir}``; the epoch's end adds a second one at its last step."""
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    return {int(p.name.split("step")[1]): p for p in ckpts}


def test_keep_checkpoints_0_keeps_every_one(run):
    _, out = run
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    # one per step: the epoch's last step is not checkpointed twice (issue 27)
    assert sorted(_checkpoints(out)) == [1, 2, 3] and len(ckpts) == 3, ckpts


def test_state_scores_a_checkpoint_instead_of_the_best(run):
    _, out = run
    _, best_pred = _evaluate(out)
    last, before = _checkpoints(out)[3], _checkpoints(out)[1]
    # one epoch, validated at its end: the best state is the last step's
    ev_last, pred_last = _evaluate(out, "--state", str(last))
    assert ev_last["state"].endswith("trainable.safetensors")
    assert pred_last["score"].to_numpy() == pytest.approx(best_pred["score"].to_numpy(), abs=1e-6)
    # a file works as a directory does, and an earlier step scores differently
    _, pred_before = _evaluate(out, "--state", str(before / "trainable.safetensors"))
    assert abs(pred_before["score"] - best_pred["score"]).max() > 1e-4


def test_state_errors_are_one_clear_line(run, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from llmrec.cli import main

    _, out = run
    assert main(["evaluate", "--run", str(out), "--state", str(tmp_path / "nope")]) == 2
    assert "no state file there" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    save_file({"generator.w": torch.zeros(2, 2)}, str(other))
    assert main(["evaluate", "--run", str(out), "--state", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and str(other) in err
