"""Two-process DDP on the CPU (gloo) under torchrun: ranks end with identical trainable state.

The run is also compared with a single process using the same global batch: rank ``r`` reads
``perm[r::2]``, so the two ranks' steps ``b`` together are exactly the single process's batch
``b``, and averaging their gradients must give the same training up to float rounding (each
rank's step is two micro-batches of 8, ``--grad-accum-steps 2``: 2 x 2 x 8 = 32 rows).

Faults: one rank killed (SIGKILL) mid-run ends the whole job with exit status != 0 within a
timeout, the surviving rank saying so in one line; ``--resume`` then completes and gives the
uninterrupted run's result exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
    "--save-every", "2",
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


STEP_ARGS = ["--batch-size", "8", "--grad-accum-steps", "2", "--save-rank-state"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data, f = make_synthetic(
        n_users=60, n_items=50, per_user=20, dim=4, max_title_words=2, return_factors=True
    )
    write_data(data, root / "data")
    save_cf_embeddings(
        root / "cf" / "embeddings.safetensors",
        torch.tensor(f.user, dtype=torch.float32),
        torch.tensor(f.item, dtype=torch.float32),
        "truth",
    )
    return root, data


def _torchrun_cmd(root: Path, out: Path, *extra: str) -> list:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "llmrec.cli", "train",
        "--data", str(root / "data"), "--cf", str(root / "cf"), "--out", str(out),
        "--predictions", str(out.parent / f"{out.name}-pred.csv"), *STEP_ARGS, *ARGS, *extra,
    ]  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def uninterrupted(inputs):
    root, _ = inputs
    out = root / "ddp"
    proc = subprocess.run(
        _torchrun_cmd(root, out), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _scores(path: Path) -> np.ndarray:
    import pandas as pd

    return pd.read_csv(path)["score"].to_numpy()


def test_two_process_gloo_ranks_identical_and_match_single_process(inputs, uninterrupted):
    root, data = inputs
    out = uninterrupted
    r0 = load_file(str(out / "rank-0.safetensors"))
    r1 = load_file(str(out / "rank-1.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ on {k}"
    assert any("lora_B" in k and r0[k].abs().sum() > 0 for k in r0), "lora_B trained"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2
    assert metrics["train"]["steps"] == 10  # 320 rows / 2 ranks / (2 x 8)
    assert metrics["test"]["rows"] == 100, "scores gathered from both ranks"

    single = root / "single"
    cfg = RunConfig(
        method="cora",
        data=str(root / "data"),
        cf=str(root / "cf"),
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
        predictions=str(root / "single-pred.csv"),
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
    # the same predictions, up to the float rounding of another summation order
    np.testing.assert_allclose(
        _scores(root / "ddp-pred.csv"), _scores(root / "single-pred.csv"), rtol=1e-3, atol=1e-4
    )
    assert metrics["test"]["auc"] == pytest.approx(ref["test"]["auc"], abs=0.02)


def _ranks(torchrun_pid: int) -> dict:
    """``{rank: pid}`` of the worker processes under a torchrun launcher."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == torchrun_pid:
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.slow  # two torchrun launches: about 80 s on a busy 2-core machine
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes in /proc")
def test_a_killed_rank_fails_the_job_in_one_line_and_resume_gives_the_same_result(
    inputs, uninterrupted
):
    root, _ = inputs
    out = root / "killed"
    cmd = _torchrun_cmd(root, out)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("checkpoints/ckpt-*")):  # the first step-2 checkpoint
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        ranks = _ranks(proc.pid)
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)  # a failed peer must not hang the job
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    # torchrun reports the failed rank in its own block; the surviving rank (stopped by
    # torchrun's SIGTERM, or failing on its dead peer first) says what happened in one line
    ours = [line for line in stderr.splitlines() if "llmrec train: error:" in line]
    assert len(ours) == 1, stderr[-3000:]
    assert "another process of" in ours[0] and "--resume" in ours[0], ours
    assert not (out / "metrics.json").exists()

    done = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    want = load_file(str(uninterrupted / "rank-0.safetensors"))
    got = load_file(str(out / "rank-0.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"resumed run differs on {k}"
    assert np.array_equal(_scores(root / "killed-pred.csv"), _scores(root / "ddp-pred.csv"))
