"""``llmrec train --compile``: the LLM's decoder layers run compiled (Inductor), the run
records it, and its scores are the eager run's up to rounding.

The compiled layer's arithmetic (with and without LoRA dropout) is checked against an fp64
oracle in ``tests/patching/test_hf_compile.py``; here the flag's path through the CLI.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("transformers")

from tiny_cli import synthetic_data, train_tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same CoRA run (the paper preset: LoRA dropout 0.05) eager and with --compile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    root = tmp_path_factory.mktemp("compile")
    data = synthetic_data(root, items=40, seed=4)
    graphs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()
        counters.clear()
        out = root / name
        train_tiny("cora", data, out, "--batch-size", "8", "--max-train-rows", "16",
                   "--lr", "1e-5", "--max-valid-rows", "8", "--max-test-rows", "24",
                   "--predictions", str(out / "pred.csv"), "--rank", "4", "--generator",
                   "mlp", *extra, layers=2)  # fmt: skip
        graphs[name] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return root, graphs


def test_compile_compiles_the_layers_and_is_recorded(runs):
    root, graphs = runs
    assert graphs["eager"] == 0 and graphs["compiled"] > 0
    assert json.loads((root / "compiled" / "run.json").read_text())["config"]["compile"] is True
    assert json.loads((root / "eager" / "run.json").read_text())["config"]["compile"] is False


def test_compiled_scores_are_the_eager_ones_up_to_rounding(runs):
    root, _ = runs
    eager = pd.read_csv(root / "eager" / "pred.csv")
    compiled = pd.read_csv(root / "compiled" / "pred.csv")
    assert eager[["uid", "iid"]].equals(compiled[["uid", "iid"]])
    # two Adam steps at lr 1e-5 from the same seed and dropout masks: fp32 rounding of the
    # fused kernels moves a score by far less than 1e-3 (a step moves a weight by <= 1e-5)
    diff = (eager["score"] - compiled["score"]).abs().max()
    assert diff < 1e-3, diff
    assert (eager["score"] - eager["score"].mean()).abs().max() > 1e-3  # scores not constant


def test_evaluate_reopens_a_compiled_run(runs):
    from llmrec.cli import main

    root, _ = runs
    out = root / "compiled"
    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    again = json.loads((out / "eval_test.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())
    assert again["test"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-6)


def test_compiling_the_layers_raises_the_recompile_limit_and_never_lowers_it():
    """A training run meets more variants of the one layer frame (grad or not on its input,
    padding mask or none, a short last batch, validation) than dynamo's default 8, past
    which the layers would silently run eagerly."""
    import torch._dynamo
    from torch import nn

    from llmrec.llm import LAYER_RECOMPILE_LIMIT, compile_decoder_layers

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()

    cfg = torch._dynamo.config
    # config.patch restores the setting (monkeypatch's undo deletes a config module's entry)
    with cfg.patch(recompile_limit=8):
        assert compile_decoder_layers(LM()) == 2
        assert cfg.recompile_limit == LAYER_RECOMPILE_LIMIT >= 16
    with cfg.patch(recompile_limit=100):
        compile_decoder_layers(LM())
        assert cfg.recompile_limit == 100
