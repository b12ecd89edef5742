"""TALLRec-style tuning (``llmrec.methods.tallrec``): text-only prompts, LoRA on q/v.

End to end through the CLI on synthetic data and a tiny random LLaMA, and the model's
properties: only the LoRA factors train, the CF embeddings never reach the score, the
trainable state round-trips through safetensors and a mismatched file is refused.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tiny_cli import synthetic_data, train_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """``llmrec train --method tallrec`` on a small synthetic dataset."""
    root = tmp_path_factory.mktemp("tallrec")
    return train_tiny("tallrec", synthetic_data(root), root / "run", "--batch-size", "8",
                      "--max-train-rows", "24", "--max-valid-rows", "16")  # fmt: skip


def test_cli_trains_and_evaluation_reproduces_the_metrics(run_dir):
    from llmrec.cli import main

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "tallrec"
    assert metrics["train"]["stages"][0]["steps"] >= 1
    assert main(["evaluate", "--run", str(run_dir), "--no-progress"]) == 0
    again = json.loads((run_dir / "eval_test.json").read_text())
    assert again["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def _model(rank=4, seed=0):
    from llmrec.methods.tallrec import TALLRecRecommender
    from llmrec.tiny_llm import build_tiny_llm

    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 400}  # fmt: skip
    texts = ["#Question: A user liked movie t1. #Answer: Yes", "No Yes movie user liked"] * 20
    llm, tok = build_tiny_llm(texts, cfg, seed=seed)
    model = TALLRecRecommender(llm, tok, lora_rank=rank, lora_dropout=0.0, backend="torch")
    return model, tok


def _batch(tok, n=4):
    ids = torch.randint(3, len(tok), (n, 9), generator=torch.Generator().manual_seed(1))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([1.0, 0.0] * (n // 2)),
        "user_emb": torch.randn(n, 6),
        "item_emb": torch.randn(n, 6),
    }


def test_only_the_lora_factors_train_and_cf_never_reaches_the_score():
    model, tok = _model()
    batch = _batch(tok)
    trainable = dict(model.trainable_state())
    assert trainable and all(("lora_A" in k or "lora_B" in k) for k in trainable)
    frozen = {k: v.detach().clone() for k, v in model.llm.named_parameters() if not v.requires_grad}
    opt = torch.optim.SGD(list(model.trainable_parameters()), lr=0.5)
    before = {k: v.detach().clone() for k, v in trainable.items()}
    for _ in range(2):  # lora_B starts at zero: the second step moves lora_A too
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    assert all(not torch.equal(before[k], v) for k, v in trainable.items())
    for k, v in model.llm.named_parameters():
        if k in frozen:
            assert torch.equal(frozen[k], v), f"{k} moved"
    with torch.no_grad():
        other = dict(batch, user_emb=torch.randn(4, 6) * 100, item_emb=torch.randn(4, 6) * 100)
        assert torch.equal(model.score(batch), model.score(other))


def test_trainable_state_round_trips_and_a_mismatched_file_is_refused(tmp_path):
    model, tok = _model(seed=0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_()
    path = tmp_path / "lora.safetensors"
    model.save_trainable(path)
    fresh, _ = _model(seed=0)
    fresh.load_trainable(path)
    batch = _batch(tok)
    with torch.no_grad():
        assert torch.equal(model.score(batch), fresh.score(batch))
    other_rank, _ = _model(rank=8)
    with pytest.raises(ValueError, match="do not match"):
        other_rank.load_trainable(path)
