"""Two-process DDP on the CPU (gloo) under torchrun: ranks end with identical trainable state.

The run is also compared with a single process using the doubled batch: rank ``r`` reads
``perm[r::2]``, so the two ranks' batches ``b`` together are exactly the single process's
batch ``b``, and averaging their gradients must give the same training up to float rounding.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmrec.cf import save_cf_embeddings
from llmrec.data import make_synthetic, write_data
from llmrec.llm_training import RunConfig, TrainConfig, run_training

ARGS = [
    "--method", "cora",
    "--generator", "mlp",
    "--generator-kwargs", '{"mlp_hidden": 32}',
    "--rank", "4",
    "--alpha", "8",
    "--lr", "1e-2",
    "--epochs", "1",
    "--max-train-rows", "320",
    "--max-valid-rows", "100",
    "--max-test-rows", "100",
    "--max-his", "3",
    "--tiny-hidden", "32",
    "--tiny-layers", "1",
    "--tiny-heads", "2",
    "--tiny-kv-heads", "1",
    "--tiny-vocab", "512",
    "--backend", "torch",
    "--eval-batch-size", "64",
    "--no-progress",
    "--preset", "fast",  # the schedule of the TrainConfig defaults the single run uses
    # a dropout mask is a function of the row's place in its batch: a rank's row 0 and the
    # single process's row 0 of the doubled batch are different rows, so exact equality
    # needs dropout off
    "--cora-lora-dropout", "0",
]  # fmt: skip


def test_two_process_gloo_ranks_identical_and_match_single_process(tmp_path):
    data, f = make_synthetic(
        n_users=60, n_items=50, per_user=20, dim=4, max_title_words=2, return_factors=True
    )
    write_data(data, tmp_path / "data")
    save_cf_embeddings(
        tmp_path / "cf" / "embeddings.safetensors",
        torch.tensor(f.user, dtype=torch.float32),
        torch.tensor(f.item, dtype=torch.float32),
        "truth",
    )
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "llmrec.cli", "train",
        "--data", str(tmp_path / "data"), "--cf", str(tmp_path / "cf"), "--out", str(out),
        "--batch-size", "16", "--save-rank-state", *ARGS,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = load_file(str(out / "rank-0.safetensors"))
    r1 = load_file(str(out / "rank-1.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ on {k}"
    assert any("lora_B" in k and r0[k].abs().sum() > 0 for k in r0), "lora_B trained"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2
    assert metrics["train"]["steps"] == 10  # 320 rows / 2 ranks / 16
    assert metrics["test"]["rows"] == 100, "scores gathered from both ranks"

    single = tmp_path / "single"
    cfg = RunConfig(
        method="cora",
        data=str(tmp_path / "data"),
        cf=str(tmp_path / "cf"),
        llm=str(out / "llm"),
        out=str(single),
        max_his=3,
        method_kwargs={
            "lora_dropout": 0.0,
            "rank": 4,
            "alpha": 8,
            "generator": "mlp",
            "generator_kwargs": {"mlp_hidden": 32},
            "backend": "torch",
        },
        max_train_rows=320,
        max_valid_rows=100,
        max_test_rows=100,
        train=TrainConfig(
            epochs=1,
            batch_size=32,
            eval_batch_size=64,
            lr=1e-2,
            progress=False,
            save_rank_state=True,
        ),
    )
    ref = run_training(cfg, data=data)
    assert ref["train"]["steps"] == 10
    s0 = load_file(str(single / "rank-0.safetensors"))
    for k in r0:
        torch.testing.assert_close(r0[k], s0[k], rtol=1e-3, atol=1e-4, msg=f"DDP vs single on {k}")
    assert metrics["test"]["auc"] == pytest.approx(ref["test"]["auc"], abs=0.02)
