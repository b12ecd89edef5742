"""The LLM training loop: CoRA learns a CF-only signal, schedule, resume, checkpoints, bad input.

Everything runs a tiny random LLaMA (hidden 32, one layer) on small synthetic data whose
labels depend on the CF factors only; CoRA runs the factored PyTorch path (``backend="torch"``;
the test session sets ``TRITON_INTERPRET=1``, under which ``auto`` would pick the much slower
Triton interpreter).
"""

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmrec.cf import CFEmbeddingError, save_cf_embeddings
from llmrec.data import DataValidationError, make_synthetic, write_data
from llmrec.llm_training import (
    CheckpointError,
    RunConfig,
    RunConfigError,
    TrainConfig,
    lr_factor,
    run_evaluation,
    run_training,
)
from llmrec.tiny_llm import LLMLoadError, build_tiny_llm

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 512,
}


@pytest.fixture(scope="module")
def llm_dir(signal, tmp_path_factory):
    """A saved tiny LLM + tokenizer shared by the tests that need the same LLM twice."""
    from llmrec.data import build_prompts
    from llmrec.tiny_llm import save_llm

    data, _ = signal
    texts = build_prompts(data["train"]["his_title"], data["train"]["title"], max_his=3)
    llm, tok = build_tiny_llm(texts, config=TINY, seed=0)
    return str(save_llm(llm, tok, tmp_path_factory.mktemp("llm") / "tiny"))


@pytest.fixture(scope="module")
def signal(tmp_path_factory):
    """Synthetic data with labels = sign(<p_u, q_i> + noise), and the true factors as CF."""
    root = tmp_path_factory.mktemp("signal")
    data, f = make_synthetic(
        n_users=100, n_items=80, per_user=30, dim=4, max_title_words=2, seed=0, return_factors=True
    )
    write_data(data, root / "data")
    save_cf_embeddings(
        root / "cf" / "embeddings.safetensors",
        torch.tensor(f.user, dtype=torch.float32),
        torch.tensor(f.item, dtype=torch.float32),
        "truth",
    )
    return data, root


#: CoRA's options in these tests (``rank=...`` given to ``_cfg`` replaces one)
CORA = {"rank": 4, "alpha": 8, "generator": "mlp", "generator_kwargs": {"mlp_hidden": 64},
        "backend": "torch"}  # fmt: skip


def _cfg(root: Path, out: Path, **kw) -> RunConfig:
    train = kw.pop("train", {})
    method = kw.pop("method", "cora")
    cora = {**CORA, **{k: kw.pop(k) for k in list(kw) if k in CORA}}
    base = RunConfig(
        method=method,
        data=str(root / "data"),
        cf=str(root / "cf"),
        llm="tiny",
        out=str(out),
        max_his=3,
        method_kwargs=cora if method == "cora" else {},
        tiny=dict(TINY),
        train=TrainConfig(
            **{
                "epochs": 1,
                "batch_size": 32,
                "eval_batch_size": 256,
                "lr": 1e-2,
                "progress": False,
                **train,
            }
        ),
    )
    return replace(base, **kw)


def test_lr_schedule_warmup_then_cosine():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10])), "linear warm-up"
    assert all(a >= b for a, b in zip(f[10:], f[11:])), "cosine decay"
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(total, total, warmup, min_ratio=0.1) == pytest.approx(0.1)


def test_cora_learns_cf_signal_frozen_llm_does_not(signal, tmp_path):
    """CoRA + tiny LLM beats 0.5 clearly; the same frozen LLM without CoRA stays near 0.5."""
    data, root = signal
    cora = run_training(_cfg(root, tmp_path / "cora"), data=data)
    # the same tiny LLM (built from the same corpus and seed), scored without CoRA
    frozen = run_training(
        _cfg(root, tmp_path / "frozen", method="frozen", llm=str(tmp_path / "cora" / "llm")),
        data=data,
    )
    assert cora["test"]["auc"] > 0.65, cora["test"]
    assert cora["test"]["uauc"] > 0.6, cora["test"]
    assert abs(frozen["test"]["auc"] - 0.5) < 0.1, frozen["test"]
    assert frozen["train"]["steps"] == 0
    # the CoRA model at step 0 is the frozen LLM exactly (lora_B starts at zero)
    assert cora["train"]["best_valid_auc"] > frozen["valid"]["auc"] + 0.1


def test_resume_after_interruption_matches_uninterrupted_run(signal, llm_dir, tmp_path):
    data, root = signal
    small = {"max_train_rows": 320, "max_valid_rows": 120, "max_test_rows": 120, "llm": llm_dir}
    ref_out = tmp_path / "ref"
    ref = run_training(
        _cfg(root, ref_out, train={"save_every": 3, "epochs": 2}, **small), data=data
    )

    seconds_at = {}

    def crash(event, state):
        if event != "checkpoint":
            return
        seconds_at[state.global_step] = state.train_time_s
        if state.global_step == 3:
            time.sleep(1.0)  # a slow first segment: the resumed run's train time must hold it
        if state.global_step == 12:  # mid-epoch 2 (10 steps/epoch)
            raise KeyboardInterrupt("simulated interruption")

    out = tmp_path / "run"
    cfg = _cfg(root, out, train={"save_every": 3, "epochs": 2}, **small)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, data=data, callback=crash)
    assert not (out / "metrics.json").exists()
    # a run with checkpoints is never silently restarted
    with pytest.raises(RunConfigError, match="--resume"):
        run_training(cfg, data=data)
    # a half-written checkpoint from a crash is ignored
    (out / "checkpoints" / ".tmp-ckpt-999999-step00000099-1").mkdir()
    resumed_steps = []
    start = time.perf_counter()
    done = run_training(
        replace(cfg, resume=True),
        data=data,
        callback=lambda e, s: resumed_steps.append(s.global_step),
    )
    resumed_wall = time.perf_counter() - start
    assert min(resumed_steps) > 12, "finished steps are not repeated"
    # the train time spans both segments: the checkpoint's seconds (the sleep included) plus
    # at most the resumed call's wall time
    assert seconds_at[12] > seconds_at[6] >= seconds_at[3] + 1.0
    spent = done["train"]["train_time_s"]
    assert seconds_at[12] < spent < seconds_at[12] + resumed_wall
    assert done["train"]["stages"][0]["train_time_s"] == spent
    assert done["train"]["steps"] == ref["train"]["steps"] == 20
    assert done["train"]["best_valid_auc"] == pytest.approx(
        ref["train"]["best_valid_auc"], abs=1e-6
    )
    assert done["test"]["auc"] == pytest.approx(ref["test"]["auc"], abs=1e-6)
    a, b = load_file(str(out / "best.safetensors")), load_file(str(ref_out / "best.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    log_a = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["step"] for x in (ref_out / "train_log.jsonl").read_text().splitlines()]
    assert log_a == log_b
    # checkpoints are pruned to the last two, `latest` names a complete one
    kept = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*"))
    assert len(kept) == 2
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == kept[-1] and (out / "checkpoints" / latest / "trainable.safetensors").exists()


def test_evaluate_reproduces_training_metrics(signal, tmp_path):
    data, root = signal
    out = tmp_path / "run"
    m = run_training(_cfg(root, out, max_train_rows=200, max_test_rows=None), data=data)
    ev = run_evaluation(out, split="test", predictions=str(tmp_path / "p.csv"), progress=False)
    assert ev["test"]["auc"] == pytest.approx(m["test"]["auc"], abs=1e-6)
    assert ev["test"]["uauc"] == pytest.approx(m["test"]["uauc"], abs=1e-6)
    assert json.loads((out / "eval_test.json").read_text())["test"]["rows"] == len(data["test"])


# -- bad input: raised before any training ------------------------------------------------------
def _nothing_trained(out: Path) -> bool:
    return not (out / "checkpoints").exists() and not (out / "train_log.jsonl").exists()


def test_cf_embeddings_of_other_sizes_rejected(signal, tmp_path):
    data, root = signal
    save_cf_embeddings(
        tmp_path / "cf" / "embeddings.safetensors", torch.randn(51, 4), torch.randn(81, 4), "mf"
    )
    out = tmp_path / "run"
    with pytest.raises(CFEmbeddingError, match=r"user_emb has 51 rows but the data has 100 users"):
        run_training(_cfg(root, out, cf=str(tmp_path / "cf")), data=data)
    assert _nothing_trained(out) and not (out / "llm").exists()


def test_llm_dir_without_tokenizer_rejected(signal, tmp_path):
    data, root = signal
    llm, _ = build_tiny_llm(["a b c Yes No"] * 4, config=TINY)
    llm.save_pretrained(str(tmp_path / "llm"))  # weights only, no tokenizer
    out = tmp_path / "run"
    with pytest.raises(LLMLoadError, match="no tokenizer found"):
        run_training(_cfg(root, out, llm=str(tmp_path / "llm")), data=data)
    assert _nothing_trained(out)


def test_checkpoint_of_other_shape_rejected(signal, llm_dir, tmp_path):
    data, root = signal
    first = tmp_path / "rank4"
    small = {"max_train_rows": 64, "max_valid_rows": 64, "max_test_rows": 64, "llm": llm_dir}
    run_training(_cfg(root, first, **small), data=data)
    out = tmp_path / "rank8"
    cfg = _cfg(root, out, rank=8, init_from=str(first / "best.safetensors"), **small)
    with pytest.raises(CheckpointError, match=r"another model shape.*shape mismatch"):
        run_training(cfg, data=data)
    assert _nothing_trained(out)
    # resuming a run with options that change the model is refused as well
    with pytest.raises(RunConfigError, match=r"rank: 4 -> 8"):
        run_training(_cfg(root, first, rank=8, resume=True, **small), data=data)
    # and a checkpoint whose shapes differ is refused even when run.json is gone
    (first / "run.json").unlink()
    with pytest.raises(CheckpointError, match="another model shape"):
        run_training(_cfg(root, first, rank=8, resume=True, **small), data=data)


def test_bad_data_rejected_before_training(tmp_path, signal):
    _, root = signal
    bad = tmp_path / "data"
    shutil.copytree(root / "data", bad)
    (bad / "test.parquet").unlink()
    out = tmp_path / "run"
    with pytest.raises(DataValidationError, match=r"test\.parquet or test\.csv"):
        run_training(_cfg(root, out, data=str(bad)))
    assert _nothing_trained(out)


def test_methods_plug_in_through_the_registry(signal, llm_dir, tmp_path):
    from dataclasses import dataclass

    from llmrec.method import METHODS, Method, register
    from llmrec.methods.frozen import FrozenLLMScorer

    data, root = signal
    seen = {}

    class Plugin(Method):
        name = "test-plugin"
        uses_cf = False
        trains = False

        @dataclass
        class Options:
            alpha_beta: int = 1

        def build(self, ctx, opts):
            seen["opts"] = opts
            return FrozenLLMScorer(ctx.llm, ctx.tokenizer)

        def source(self, ctx, df, template=None):
            seen.setdefault("examples", []).append(len(df))
            return super().source(ctx, df, template)

    class Other(Plugin):
        pass

    register(Plugin)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(Other)
        cfg = _cfg(root, tmp_path / "p", method="test-plugin", llm=llm_dir, max_test_rows=50)
        m = run_training(replace(cfg, method_kwargs={"alpha_beta": "3"}), data=data)
        assert seen["opts"].alpha_beta == 3 and 50 in seen["examples"]
        assert m["test"]["rows"] == 50
        with pytest.raises(RunConfigError, match="not options of"):
            run_training(replace(cfg, out=str(tmp_path / "k"), method_kwargs={"x": 1}), data=data)
        from llmrec.cli import build_parser

        args = build_parser().parse_args(["train", "--method", "test-plugin", "--out", "x"])
        assert args.method == "test-plugin"
    finally:
        METHODS.pop("test-plugin", None)
    with pytest.raises(RunConfigError, match="unknown method"):
        run_training(_cfg(root, tmp_path / "q", method="test-plugin"), data=data)
