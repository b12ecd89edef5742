"""A method defined in this file alone trains, evaluates and compares through the ``llmrec``
CLI: the registry, the generic option flags, multi-stage training and the run layer need no
edit anywhere else."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.cli import main
from llmrec.method import METHODS, Method, Stage, register
from llmrec.metrics import auc

TINY = ["--tiny-hidden", "16", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-kv-heads", "1",
        "--tiny-vocab", "400", "--no-progress"]  # fmt: skip


BUILT = []  # the options every Toy.build saw


class Bilinear(nn.Module):
    """``score = scale * e_u^T W e_i``; ``W`` trains. It reads no prompt at all."""

    def __init__(self, cf_dim: int, scale: float):
        super().__init__()
        self.w = nn.Parameter(torch.eye(cf_dim) * 0.1)
        self.scale = scale

    def score(self, batch):
        return self.scale * ((batch["user_emb"] @ self.w) * batch["item_emb"]).sum(-1)

    def loss(self, batch):
        return F.binary_cross_entropy_with_logits(self.score(batch), batch["labels"].float())

    def trainable_state(self):
        return {"w": self.w}

    def trainable_parameters(self):
        yield self.w

    def save_trainable(self, path):
        from safetensors.torch import save_file

        save_file({"w": self.w.detach().cpu().contiguous()}, str(path))

    def load_trainable(self, path):
        from safetensors.torch import load_file

        with torch.no_grad():
            self.w.copy_(load_file(str(path))["w"])


class Toy(Method):
    name = "toy-bilinear"
    description = "a bilinear CF score (test plug-in)"
    report_columns = (("w_trace", "trace W", ".3f"),)

    @dataclass
    class Options:
        scale: float = 1.0
        warm_epochs: int = 1

    def build(self, ctx, opts):
        BUILT.append(opts)
        return Bilinear(ctx.cf_dim, opts.scale)

    def stages(self, ctx, model, opts):
        (main_stage,) = super().stages(ctx, model, opts)
        warm = Stage(
            "warm",
            main_stage.train,
            main_stage.valid,
            type(ctx.cfg.train)(**{**vars(ctx.cfg.train), "epochs": opts.warm_epochs}),
            subdir="warm",
        )
        return [warm, main_stage]

    def evaluate(self, ctx, model, opts, df, predict, full=True):
        block, scores = super().evaluate(ctx, model, opts, df, predict, full)
        block["w_trace"] = float(model.w.detach().trace())
        return block, scores


@pytest.fixture()
def toy():
    register(Toy)
    yield Toy
    METHODS.pop(Toy.name, None)
    BUILT.clear()


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
    assert BUILT[-1] == Toy.Options(scale=2.5, warm_epochs=2)  # flag and JSON both read

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

    table = tmp_path / "rows.json"
    assert main(["compare", str(out), "--no-plot", "--json", str(table)]) == 0
    (row,) = json.loads(table.read_text())
    assert row["method"] == "toy-bilinear" and row["auc"] == pytest.approx(metrics["test"]["auc"])
    assert row["w_trace"] == pytest.approx(metrics["test"]["w_trace"])  # its own column


def test_a_flag_of_another_method_is_refused(tmp_path, toy):
    with pytest.raises(SystemExit, match="applies to --method toy-bilinear"):
        main(["train", "--method", "cora", "--out", str(tmp_path / "x"),
              "--toy-bilinear-scale", "2", *TINY])  # fmt: skip
