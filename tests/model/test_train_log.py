"""The per-step training log: one ``train_log.jsonl`` line per optimizer step (loss, lr,
throughput, memory) besides the validation records, kept exact across a kill and
``--resume``, and the optional TensorBoard copy of the same scalars.

A logistic-regression "recommender" stands in for a model: the loop knows no method, and the
log's properties do not depend on the model's size.
"""

import json
import resource
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmrec.config import TrainConfig
from llmrec.errors import RunConfigError
from llmrec.training_loop import Trainer, lr_factor


class Logistic(torch.nn.Module):
    """``score = x @ w + b``; loss: binary cross-entropy against ``labels``."""

    def __init__(self, features: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(features, 1)

    def loss(self, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            self.score(batch), batch["labels"]
        )

    def score(self, batch):
        return self.linear(batch["x"]).squeeze(-1)

    def trainable_parameters(self):
        return iter(self.parameters())

    def save_trainable(self, path):
        save_file({k: v.detach().clone() for k, v in self.state_dict().items()}, str(path))

    def load_trainable(self, path):
        self.load_state_dict(load_file(str(path)))


class Rows:
    """``n`` rows of 4 features, labels from a fixed direction; an ``attention_mask`` of
    ``1 + row % 5`` ones per row when ``with_mask`` (tokens known); ``fail_at``: the call
    number that raises KeyboardInterrupt (a kill between two steps)."""

    def __init__(self, n: int, with_mask: bool = False, fail_at: int = 0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) > 0).float()
        self.with_mask, self.fail_at, self.calls = with_mask, fail_at, 0

    def __len__(self):
        return len(self.y)

    def __call__(self, idx):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        idx = torch.as_tensor(idx)
        batch = {"x": self.x[idx], "labels": self.y[idx]}
        if self.with_mask:
            lengths = 1 + idx % 5
            batch["attention_mask"] = (torch.arange(5) < lengths[:, None]).long()
        return batch

    def labels(self):
        return self.y.numpy()


CFG = TrainConfig(epochs=2, batch_size=8, lr=0.1, warmup_steps=2, progress=False, patience=9)


def _fit(out: Path, train: Rows, cfg: TrainConfig = CFG, resume: bool = False):
    torch.manual_seed(0)
    trainer = Trainer(Logistic(), train, Rows(24), cfg, out)
    trainer.fit(resume=resume)
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_every_step_is_logged_with_loss_lr_throughput_memory(tmp_path):
    log = _fit(tmp_path / "run", Rows(40))  # 5 steps per epoch, 10 in all
    steps = [r for r in log if r["kind"] == "step"]
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert [r["step"] for r in evals] == [5, 10]
    assert all("valid_auc" in r for r in evals)
    # the step record of step s comes before the evaluation at s
    order = [(r["step"], r["kind"]) for r in log]
    assert order.index((5, "step")) < order.index((5, "eval")) < order.index((6, "step"))
    for r in steps:
        assert r["lr"] == pytest.approx(CFG.lr * lr_factor(r["step"] - 1, 10, 2), rel=1e-12)
        assert r["epoch"] == pytest.approx(r["step"] / 5)
        assert r["rows_per_s"] == pytest.approx(8 / r["step_time_s"], rel=1e-9)
        assert "tokens_per_s" not in r  # no token counts in these batches
        assert r["memory_kind"] == "peak_rss"
    # the peak RSS only grows, and is this process's (KiB on Linux)
    memory = [r["memory_bytes"] for r in steps]
    assert memory == sorted(memory)
    scale = 1 if sys.platform == "darwin" else 1024
    assert 0 < memory[-1] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    # the evaluation's train_loss is the mean of the logged step losses since the last one
    assert evals[0]["train_loss"] == sum(r["loss"] for r in steps[:5]) / 5
    assert evals[1]["train_loss"] == sum(r["loss"] for r in steps[5:]) / 5


def test_tokens_per_second_where_the_batch_has_an_attention_mask(tmp_path):
    train = Rows(40, with_mask=True)
    log = _fit(tmp_path / "run", train, TrainConfig(**{**CFG.__dict__, "epochs": 1}))
    steps = [r for r in log if r["kind"] == "step"]
    assert len(steps) == 5
    # every row of the epoch once: the tokens of the five steps are the mask's total
    total_tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    assert total_tokens == pytest.approx(float((1 + torch.arange(40) % 5).sum()), rel=1e-9)
    assert all("rows_per_s" not in r for r in steps)


def test_resume_after_a_kill_logs_each_step_once_as_the_uninterrupted_run(tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "save_every": 3})
    whole = _fit(tmp_path / "whole", Rows(40), cfg)
    out = tmp_path / "killed"
    # the 9th batch never comes: steps 7 and 8 are logged after the checkpoint of step 6
    with pytest.raises(KeyboardInterrupt):
        _fit(out, Rows(40, fail_at=9), cfg)
    left = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in left if r["kind"] == "step"] == list(range(1, 9))
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 9, "lo')  # a line torn by the kill
    resumed = _fit(out, Rows(40), cfg, resume=True)
    assert [(r["step"], r["kind"]) for r in resumed] == [(r["step"], r["kind"]) for r in whole]

    def same_run(record):  # what does not depend on the clock or the process
        return {k: record.get(k) for k in ("kind", "step", "epoch", "loss", "lr", "train_loss")}

    assert [same_run(r) for r in resumed] == [same_run(r) for r in whole]


def test_tensorboard_gets_the_same_scalars(tmp_path, monkeypatch):
    written = []

    class Writer:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("closed",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    out = tmp_path / "run"
    log = _fit(out, Rows(40), TrainConfig(**{**CFG.__dict__, "tensorboard": True}))
    assert written[0] == ("dir", str(out / "tensorboard"))
    assert written[-1] == ("closed",)
    losses = [(v, s) for tag, v, s in (w for w in written if len(w) == 3) if tag == "train/loss"]
    assert losses == [(r["loss"], r["step"]) for r in log if r["kind"] == "step"]
    aucs = [(v, s) for tag, v, s in (w for w in written if len(w) == 3) if tag == "valid/valid_auc"]
    assert aucs == [(r["valid_auc"], r["step"]) for r in log if r["kind"] == "eval"]


def test_tensorboard_missing_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(RunConfigError, match="--tensorboard needs the tensorboard package") as e:
        _fit(tmp_path / "run", Rows(40), TrainConfig(**{**CFG.__dict__, "tensorboard": True}))
    assert "\n" not in str(e.value)
