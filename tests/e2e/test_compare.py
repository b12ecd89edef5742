"""``llmrec compare``: one table and one plot over runs of every method."""

from __future__ import annotations

import json

import pytest

from llmrec.compare import compare_runs, load_metrics, summarize


def block(auc, uauc, extra=None):
    b = {
        "auc": auc,
        "uauc": uauc,
        "rows": 100,
        "warm": {"auc": auc + 0.01, "uauc": uauc},
        "cold": {"auc": auc - 0.1, "uauc": None},
    }
    b.update(extra or {})
    return b


def write(run, name, metrics):
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(json.dumps(metrics))
    return run


@pytest.fixture
def runs(tmp_path):
    mf = write(
        tmp_path / "mf",
        "metrics.json",
        {"model": "mf", "test": block(0.65, 0.64), "wall_time_s": 4.0},
    )
    cora = write(
        tmp_path / "cora",
        "metrics.json",
        {"method": "cora", "test": block(0.60, 0.55), "config": {"llm": "tiny", "tiny": {"hidden_size": 64}},
         "train": {"train_time_s": 100.0}, "wall_time_s": 120.0},
    )  # fmt: skip
    collm = write(
        tmp_path / "collm",
        "metrics.json",
        {
            "method": "collm",
            "test": block(0.62, 0.56),
            "train": {"tuning": "two-step", "train_time_s": 80},
        },
    )
    allm = write(
        tmp_path / "allmrec",
        "metrics.json",
        {
            "method": "allmrec",
            "test": block(0.52, 0.51, {"hit@1": 0.2, "hit@1_generated": 0.0, "ndcg@10": 0.4}),
        },
    )
    rec = {"recommend": {"k": 50, "index": {"kind": "hnsw"}, "retrieval": {"recall@50": 0.12},
                         "time_per_user_s": {"total": 0.5}}}  # fmt: skip
    write(collm, "recommend_k50_hnsw.json", rec)
    evaluated = write(
        tmp_path / "evaluated", "eval_test.json", {"method": "cora", "test": block(0.58, 0.5)}
    )
    return [mf, cora, collm, allm, evaluated]


def test_one_table_for_every_method(runs, tmp_path):
    rows, text = compare_runs(runs, plot=tmp_path / "cmp.png", json_out=tmp_path / "rows.json")
    assert [r["run"] for r in rows] == ["mf", "cora", "collm", "allmrec", "evaluated"]
    assert [r["method"] for r in rows] == ["mf (CF)", "cora", "collm (two-step)", "allmrec", "cora"]
    for word in (
        "AUC",
        "UAUC",
        "warm AUC",
        "cold AUC",
        "Hit@1",
        "NDCG@10",
        "0.6500",
        "0.5200",
        "tiny-64",
    ):
        assert word in text, word
    assert rows[3]["hit@1"] == 0.2 and rows[0]["hit@1"] is None
    assert rows[2]["retrieval"].startswith("0.120 (K=50 hnsw")
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((tmp_path / "rows.json").read_text())[1]["auc"] == 0.6


def test_markdown_sorting_and_missing_values(runs):
    rows, text = compare_runs(runs, markdown=True, sort="auc")
    lines = text.splitlines()
    assert lines[0].startswith("| run | method |") and len(lines) == 2 + len(runs)
    assert rows[0]["run"] == "mf"
    assert "| - |" in text or " - |" in text  # missing values (cold UAUC, Hit@1 of AUC-only runs)


def test_summarize_handles_nan_and_missing_blocks():
    row = summarize({"method": "x", "test": {"auc": float("nan")}}, "r")
    assert row["auc"] is None and row["warm_auc"] is None and row["rows"] is None
    row = summarize({"method": "x"}, "r")
    assert row["uauc"] is None


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics\.json"):
        load_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such run"):
        load_metrics(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_metrics(tmp_path / "bad.json")


def test_cli_compare(runs, tmp_path, capsys):
    from llmrec.cli import build_parser, main

    try:
        build_parser().parse_args(["compare", str(runs[0])])
    except SystemExit:
        pytest.skip("`llmrec compare` is not wired into the CLI yet")
    assert main(["compare", *map(str, runs), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "collm" in out and "allmrec" in out and (tmp_path / "p.png").exists()


def test_rows_digest_is_of_the_row_set_not_its_order():
    import hashlib
    import struct

    import numpy as np

    from llmrec.metrics import rows_digest

    users, items, labels = np.array([3, 1, 3, 2]), np.array([7, 9, 2, 9]), np.array([1, 0, 0, 1])
    # the reference: the sorted (uid, iid, label) triples packed as little-endian int64
    triples = sorted(zip(users.tolist(), items.tolist(), labels.tolist()))
    packed = b"".join(struct.pack("<qqq", *t) for t in triples)
    assert rows_digest(users, items, labels) == hashlib.sha256(packed).hexdigest()
    order = np.array([2, 0, 3, 1])
    assert rows_digest(users[order], items[order], labels[order]) == rows_digest(
        users, items, labels
    )
    flipped = labels.copy()
    flipped[0] = 0
    assert rows_digest(users, items, flipped) != rows_digest(users, items, labels)
    assert rows_digest(users[:3], items[:3], labels[:3]) != rows_digest(users, items, labels)


def test_runs_scored_on_different_rows_are_refused_or_marked(tmp_path, capsys):
    import pandas as pd

    from llmrec.cli import main
    from llmrec.metrics import rows_digest

    runs = {}
    for name, per_user in (("a", 20), ("a2", 20), ("b", 24)):
        data = tmp_path / f"data-{per_user}"
        if not data.exists():
            assert main(["make-data", "--out", str(data), "--format", "csv", "--users", "40",
                         "--items", "30", "--per-user", str(per_user)]) == 0  # fmt: skip
        runs[name] = tmp_path / name
        assert main(["train-cf", "--model", "mf", "--data", str(data), "--out", str(runs[name]),
                     "--dim", "8", "--epochs", "2", "--no-progress"]) == 0  # fmt: skip
    test = pd.read_csv(tmp_path / "data-20" / "test.csv")
    recorded = json.loads((runs["a"] / "metrics.json").read_text())["test"]["rows_sha256"]
    assert recorded == rows_digest(test["uid"], test["iid"], test["label"])
    capsys.readouterr()
    # the same rows: compared as before, no rows id column
    assert main(["compare", str(runs["a"]), str(runs["a2"]), "--no-plot", "--markdown"]) == 0
    assert "rows id" not in capsys.readouterr().out
    # other rows: one line, exit 2
    argv = ["compare", str(runs["a"]), str(runs["b"]), "--no-plot", "--markdown"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scored on different test rows" in err[0], err
    assert "--allow-different-rows" in err[0]
    # allowed: each run is marked with its rows' digest
    assert main([*argv, "--allow-different-rows"]) == 0
    out = capsys.readouterr().out
    other = json.loads((runs["b"] / "metrics.json").read_text())["test"]["rows_sha256"]
    assert "rows id" in out and recorded[:8] in out and other[:8] in out
