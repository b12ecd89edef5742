"""The trainer's engines in one process: gradient accumulation (``grad_accum_steps``) and
Hugging Face gradient checkpointing (``gradient_checkpointing``).

Both are checked on the update they produce: N micro-batches of B rows must train as one batch
of N*B rows, and a checkpointed LLM must train as the plain one; each against the same run in
float64 (the tolerance rule of ``tests/tolerance.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_oracle
from torch import nn

from llmrec.config import TrainConfig
from llmrec.errors import RunConfigError
from llmrec.training_loop import Trainer


class Rows:
    """A batch source of ``n`` random rows: ``x`` ``(n, 6)`` and ``labels`` ``(n,)``."""

    def __init__(self, n: int, dtype: torch.dtype, seed: int = 0, vocab: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g).to(dtype)
        self.labels = (torch.rand(n, generator=g) > 0.5).to(dtype)
        self.ids = torch.randint(1, max(vocab, 2), (n, 5), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __call__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"x": self.x[idx], "labels": self.labels[idx], "input_ids": self.ids[idx]}


class Scorer(nn.Module):
    """A small MLP score with every parameter trained."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)

    def score(self, batch):
        return self.net(batch["x"]).squeeze(-1)

    def loss(self, batch):
        return F.binary_cross_entropy_with_logits(self.score(batch), batch["labels"])

    def trainable_parameters(self):
        return iter(self.parameters())

    def trainable_state(self):
        return dict(self.named_parameters())

    def save_trainable(self, path):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.named_parameters()}, str(path))

    def load_trainable(self, path):
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))


def _train(model, rows, out, **cfg) -> dict:
    settings = dict(epochs=2, lr=5e-2, warmup_steps=0, progress=False, group_by_length=False)
    config = TrainConfig(**{**settings, **cfg})
    Trainer(model, rows, None, config, out).fit()
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("rows", [48, 46])  # 46: a last step of one full and one partial batch
def test_two_micro_batches_of_4_train_as_one_batch_of_8(tmp_path, rows):
    got = _train(Scorer(torch.float32), Rows(rows, torch.float32), tmp_path / "accum",
                 batch_size=4, grad_accum_steps=2)  # fmt: skip
    ref = _train(Scorer(torch.float32), Rows(rows, torch.float32), tmp_path / "ref", batch_size=8)
    oracle = _train(Scorer(torch.float64), Rows(rows, torch.float64), tmp_path / "f64",
                    batch_size=8)  # fmt: skip
    plain = _train(Scorer(torch.float32), Rows(rows, torch.float32), tmp_path / "b4", batch_size=4)
    for name in ref:
        assert_close_to_oracle(got[name], ref[name], oracle[name], name)
    # batch 4 without accumulation trains otherwise: the comparison can tell them apart
    assert max((plain[k] - ref[k]).abs().max() for k in ref) > 1e-3


def test_accumulation_counts_optimizer_steps(tmp_path):
    trainer = Trainer(Scorer(torch.float32), Rows(46, torch.float32), None,
                      TrainConfig(batch_size=4, grad_accum_steps=3, progress=False), tmp_path)  # fmt: skip
    assert trainer.steps_per_epoch() == 4  # ceil(46 / 12)


class LLMScorer(nn.Module):
    """The last position's logit of token 1 from a tiny LLaMA; its MLPs train."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(4)
        config = transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, vocab_size=50, max_position_embeddings=32,
        )  # fmt: skip
        self.llm = transformers.LlamaForCausalLM(config).to(dtype)
        self.llm.requires_grad_(False)
        for layer in self.llm.model.layers:
            layer.mlp.requires_grad_(True)
        self.calls = 0
        # a pre-hook: a recomputation stops as soon as the last saved tensor is back
        self.llm.model.layers[0].mlp.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def score(self, batch):
        return self.llm(input_ids=batch["input_ids"], use_cache=False).logits[:, -1, 1]

    def loss(self, batch):
        return F.binary_cross_entropy_with_logits(self.score(batch), batch["labels"])

    def trainable_parameters(self):
        return (p for p in self.parameters() if p.requires_grad)

    def trainable_state(self):
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    save_trainable = Scorer.save_trainable
    load_trainable = Scorer.load_trainable


def test_gradient_checkpointing_trains_as_the_plain_model(tmp_path):
    rows = lambda dtype: Rows(16, dtype, vocab=50)  # noqa: E731
    ckpt_model = LLMScorer(torch.float32)
    got = _train(ckpt_model, rows(torch.float32), tmp_path / "ckpt", batch_size=8, epochs=1,
                 gradient_checkpointing=True)  # fmt: skip
    assert ckpt_model.llm.model.layers[0].gradient_checkpointing
    plain_model = LLMScorer(torch.float32)
    ref = _train(plain_model, rows(torch.float32), tmp_path / "plain", batch_size=8, epochs=1)
    oracle = _train(LLMScorer(torch.float64), rows(torch.float64), tmp_path / "f64",
                    batch_size=8, epochs=1)  # fmt: skip
    # the checkpointed layers ran their forward again in every backward (2 steps)
    assert ckpt_model.calls == plain_model.calls + 2
    for name in ref:
        assert_close_to_oracle(got[name], ref[name], oracle[name], name)


def test_gradient_checkpointing_without_a_hugging_face_model_is_refused(tmp_path):
    cfg = TrainConfig(gradient_checkpointing=True, progress=False)
    with pytest.raises(RunConfigError, match="gradient-checkpointing"):
        Trainer(Scorer(torch.float32), Rows(8, torch.float32), None, cfg, tmp_path)


def test_grad_accum_steps_is_checked_on_resume():
    """It changes which rows make an optimizer step: --resume must see the same value (a run
    written before the option existed, without the key, resumes as before)."""
    from dataclasses import asdict

    from llmrec.config import RunConfig, resume_keys, resume_mismatches

    old = asdict(RunConfig(train=TrainConfig(grad_accum_steps=2)))
    new = asdict(RunConfig(train=TrainConfig(grad_accum_steps=4)))
    assert resume_mismatches(old, new, resume_keys(RunConfig)) == ["train.grad_accum_steps: 2 -> 4"]
    del old["train"]["grad_accum_steps"]
    assert resume_mismatches(old, new, resume_keys(RunConfig)) == []
