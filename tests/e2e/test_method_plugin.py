"""Adding a method is adding one module to ``python/llmrec/methods/`` and nothing else.

The toy method of :mod:`toy_bilinear` (next to this file, written as a method module is) is
copied into a temporary folder that the test appends to the ``llmrec.methods`` package's
path, as if the file were dropped into ``python/llmrec/methods/``; nothing registers it but
the module itself. It then trains, evaluates and compares through the ``llmrec`` CLI with its
generated option flags, multi-stage training and the run folder, with no edit anywhere else.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import llmrec.method
import llmrec.methods
from llmrec.cli import main
from llmrec.method import METHODS, available_methods
from llmrec.metrics import auc

TINY = ["--tiny-hidden", "16", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-kv-heads", "1",
        "--tiny-vocab", "400", "--no-progress"]  # fmt: skip
MODULE = "llmrec.methods.toy_bilinear"


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    """``toy_bilinear.py`` in the methods folder, found by the registry like a built-in."""
    folder = tmp_path / "methods"
    folder.mkdir()
    shutil.copy(Path(__file__).with_name("toy_bilinear.py"), folder / "toy_bilinear.py")
    monkeypatch.setattr(llmrec.methods, "__path__", [*llmrec.methods.__path__, str(folder)])
    monkeypatch.setattr(llmrec.method, "_BUILTINS_LOADED", False)
    assert "toy-bilinear" in available_methods()  # found by the registry's scan alone
    yield sys.modules[MODULE]
    METHODS.pop("toy-bilinear", None)
    sys.modules.pop(MODULE, None)


def test_a_method_from_one_file_trains_evaluates_and_compares_through_the_cli(tmp_path, toy):
    data = tmp_path / "data"
    assert main(["make-data", "--out", str(data), "--users", "60", "--items", "40",
                 "--per-user", "20"]) == 0  # fmt: skip
    out = tmp_path / "toy"
    argv = ["train", "--method", "toy-bilinear", "--data", str(data), "--out", str(out),
            "--toy-bilinear-scale", "2.5", "--method-kwargs", '{"warm_epochs": 2}',
            "--epochs", "2", "--batch-size", "32", "--lr", "1e-2",
            "--predictions", str(out / "pred.csv"), *TINY]  # fmt: skip
    assert main(argv) == 0
    assert toy.BUILT[-1] == toy.Toy.Options(scale=2.5, warm_epochs=2)  # flag and JSON read

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "toy-bilinear"
    assert [s["stage"] for s in metrics["train"]["stages"]] == ["warm", "train"]
    assert (out / "warm" / "best.safetensors").exists() and (out / "best.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["config"]["method_kwargs"] == {
        "warm_epochs": 2,
        "scale": 2.5,
    }
    # the metrics file's test AUC is the AUC of the predictions written next to it
    import pandas as pd

    pred = pd.read_csv(out / "pred.csv")
    assert metrics["test"]["auc"] == pytest.approx(auc(pred["label"], pred["score"]))
    # the synthetic labels follow the CF factors: the bilinear score must beat chance
    assert metrics["test"]["auc"] > 0.6

    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    ev = json.loads((out / "eval_test.json").read_text())
    # reopened with its best state, the run scores the test split as it did after training
    assert ev["method"] == "toy-bilinear"
    assert ev["test"]["auc"] == pytest.approx(metrics["test"]["auc"])
    # its evaluate adds a metric: chunked scoring, which calls score_frame per chunk and
    # extra_metrics once, cannot reproduce an evaluate override, so it is refused in one line
    assert main(["evaluate", "--run", str(out), "--resume", "--metrics",
                 str(tmp_path / "chunked.json"), "--no-progress"]) == 2  # fmt: skip
    assert not (tmp_path / "chunked.json").exists()

    table = tmp_path / "rows.json"
    assert main(["compare", str(out), "--no-plot", "--json", str(table)]) == 0
    (row,) = json.loads(table.read_text())
    assert row["method"] == "toy-bilinear" and row["auc"] == pytest.approx(metrics["test"]["auc"])
    assert row["w_trace"] == pytest.approx(metrics["test"]["w_trace"])  # its own column


def test_a_flag_of_another_method_is_refused(tmp_path, toy):
    with pytest.raises(SystemExit, match="applies to --method toy-bilinear"):
        main(["train", "--method", "cora", "--out", str(tmp_path / "x"),
              "--toy-bilinear-scale", "2", *TINY])  # fmt: skip
