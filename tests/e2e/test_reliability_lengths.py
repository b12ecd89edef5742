"""Issue 27, long inputs: a 10,000-character title and 500-item histories train and evaluate
with every method through the real CLI (the length rule of ``llmrec.data.lengths`` makes every
prompt fit ``--max-length``), and a ``--max-length`` no prompt can fit is one line before
anything trains, with nothing left behind. The rule itself, token for token against references
built without it, is tested in ``tests/model/test_length_rule.py``.
"""

import json
import math
from pathlib import Path

import pytest
from tiny_cli import TINY_LLM

from llmrec.cli import main

LONG_ITEM = 1
HISTORY = 500
#: the rows each run trains, validates and tests on: few, so five methods stay cheap
ROWS = ["--max-train-rows", "24", "--max-valid-rows", "12", "--max-test-rows", "12"]
#: A-LLMRec: random title embeddings, small candidate sets
ALLMREC = {"text_encoder": "random", "stage1_epochs": 1, "candidates": 4, "train_candidates": 3,
           "episodes": 4, "valid_episodes": 4, "max_new_tokens": 4, "latent_dim": 8,
           "ae_hidden": 8}  # fmt: skip


def cli(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Synthetic data whose item 1 has a 10,000-character title (as a target and inside the
    histories) and whose every history holds 500 items; an MF run on it."""
    from llmrec.data import make_synthetic, write_data

    root = tmp_path_factory.mktemp("lengths")
    data = make_synthetic(n_users=24, n_items=20, per_user=10, seed=2)
    titles = {}
    for df in data.splits.values():
        titles.update(zip(df["iid"].tolist(), df["title"].tolist()))
    titles[LONG_ITEM] = "The Long Title " + "and so on " * 999  # 10,005 characters
    history = [2 + j % 19 for j in range(HISTORY)]
    history[HISTORY // 2] = history[-3] = LONG_ITEM  # the long title inside every history
    for df in data.splits.values():
        df["title"] = [titles[i] for i in df["iid"]]
        df["his"] = [list(history)] * len(df)
        df["his_title"] = [[titles[i] for i in history]] * len(df)
    path = write_data(data, root / "data")
    assert main(["train-cf", "--data", str(path), "--out", str(root / "mf"), "--dim", "8",
                 "--epochs", "1", "--no-progress"]) == 0  # fmt: skip
    return {"data": path, "mf": root / "mf"}


@pytest.mark.parametrize("method", ["cora", "collm", "tallrec", "frozen", "allmrec"])
def test_long_titles_and_histories_train_and_evaluate_with_every_method(
    long_data, tmp_path, capsys, method
):
    out = tmp_path / method
    extra = ["--method-kwargs", json.dumps(ALLMREC)] if method == "allmrec" else []
    argv = ["train", "--method", method, "--data", long_data["data"], "--cf", long_data["mf"],
            "--out", out, "--epochs", "1", "--max-steps", "2", "--max-his", str(HISTORY),
            "--max-length", "384", "--tiny-layers", "1", *TINY_LLM, *ROWS, *extra]  # fmt: skip
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    rc, err = cli(["evaluate", "--run", out, "--rows", "all", "--no-progress"], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "eval_test.json").read_text())["test"]
    assert math.isfinite(metrics["auc"])


def _refused(argv, capsys, out: Path, *expected: str) -> None:
    rc, err = cli(argv, capsys)
    assert rc == 2, err
    line = one_error_line(err)
    for text in expected:
        assert text in line, line
    assert not out.exists()  # refused before the run wrote anything: nothing left behind


def test_a_max_length_no_prompt_fits_is_refused_before_training(long_data, tmp_path, capsys):
    base = ["train", "--data", long_data["data"], "--cf", long_data["mf"], "--epochs", "1",
            "--tiny-layers", "1", *TINY_LLM, *ROWS]  # fmt: skip
    for method in ("cora", "collm"):
        out = tmp_path / method
        _refused([*base, "--method", method, "--out", out, "--max-length", "40"], capsys, out,
                 "--max-length 40 is too small", "raise --max-length to at least")  # fmt: skip
    # A-LLMRec takes at least 1024 tokens: 20 candidates whose titles all have 96 tokens
    # once cut (160 CJK characters, two or three byte tokens each) cannot fit
    from llmrec.data import load_data, write_data

    data = load_data(long_data["data"])
    for df in data.splits.values():
        df["title"] = ["".join(chr(0x4E00 + (97 * i + 31 * k) % 2000) for k in range(200))
                       for i in df["iid"]]  # fmt: skip
        df["his"] = [[0]] * len(df)
        df["his_title"] = [[""]] * len(df)
    cjk = write_data(data, tmp_path / "cjk")
    out = tmp_path / "allmrec"
    kwargs = json.dumps({**ALLMREC, "candidates": 20, "train_candidates": 20})
    _refused([*base, "--data", cjk, "--method", "allmrec", "--out", out, "--method-kwargs",
              kwargs], capsys, out, "--max-length 1024 is too small",
             "--allmrec-candidates")  # fmt: skip
