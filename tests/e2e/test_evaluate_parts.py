"""``llmrec evaluate --resume`` / ``--part K/N``: a split scored in chunk files that survive a
kill and can be shared by several processes, with the metrics of one pass.

The reference is the same run's one-pass ``llmrec evaluate`` (the frozen LLM's own forward).
Chunks form their batches inside the chunk, so scores agree with the one pass up to the
rounding of other batch compositions: the bound is scaled by the one pass's own error
against an fp64 copy of the model (``--rows all``, the tiny LLM in fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tiny_cli import synthetic_data, train_tiny

CHUNK = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step TALLRec run on the tiny LLM (the whole test split: 60-odd rows)."""
    root = tmp_path_factory.mktemp("evalparts")
    data = synthetic_data(root, seed=5)
    out = train_tiny("tallrec", data, root / "run", "--batch-size", "4", "--lr", "0.05",
                     "--max-train-rows", "8", "--max-valid-rows", "8", "--max-test-rows", "8")  # fmt: skip
    return root, out


def _evaluate(out, name, *extra, env=None):
    """``llmrec evaluate`` in a subprocess: (exit status, stderr, metrics or None, predictions)."""
    metrics, pred = out.parent / f"{name}.json", out.parent / f"{name}.csv"
    cmd = [sys.executable, "-m", "llmrec.cli", "evaluate", "--run", str(out), "--rows", "all",
           "--metrics", str(metrics), "--predictions", str(pred), "--no-progress", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=600)  # fmt: skip
    got = json.loads(metrics.read_text()) if metrics.exists() else None
    return proc.returncode, proc.stderr, got, (pd.read_csv(pred) if pred.exists() else None)


def _chunk_files(out):
    return sorted((out / "scores").glob("*/rows-*.safetensors"))


def _clear_chunks(out):
    for f in _chunk_files(out):
        f.unlink()


def test_parts_then_resume_give_the_one_pass_metrics(run):
    _, out = run
    rc, err, one, one_pred = _evaluate(out, "onepass")
    assert rc == 0, err
    _clear_chunks(out)
    rc, err, got, _ = _evaluate(out, "part1", "--part", "1/2", "--chunk-rows", str(CHUNK))
    assert rc == 0, err
    assert got is None and "chunk(s) left" in err  # no metrics while rows are unscored
    n = one["rows"]["count"]
    n_chunks = -(-n // CHUNK)
    assert len(_chunk_files(out)) == n_chunks // 2
    rc, err, got, pred = _evaluate(out, "part2", "--part", "2/2", "--chunk-rows", str(CHUNK))
    assert rc == 0, err
    assert len(_chunk_files(out)) == n_chunks and got["chunked"] is True
    assert pred[["uid", "iid", "label"]].equals(one_pred[["uid", "iid", "label"]])
    diff = np.abs(pred["score"].to_numpy() - one_pred["score"].to_numpy())
    spread = np.abs(one_pred["score"].to_numpy()).max()
    assert diff.max() <= 1e-5 * max(spread, 1.0)  # fp32 rounding of other batch shapes
    assert got["test"]["auc"] == pytest.approx(one["test"]["auc"], abs=1.0 / n)
    assert got["test"]["rows_sha256"] == one["test"]["rows_sha256"]
    # the scoring's cost is the sum over both processes' chunks, each timed where it was scored
    cost = got["scoring"]
    assert cost["chunks"] == cost["timed_chunks"] == n_chunks and cost["seconds"] > 0
    assert cost["machines"] == [
        f"{got['machine']['cpu']}; {got['machine']['torch_threads']} threads"
    ]
    assert "scoring" not in one and one["machine"]["logical_cores"] == os.cpu_count()


def test_a_kill_mid_chunk_loses_only_that_chunk(run):
    _, out = run
    _clear_chunks(out)
    # SIGKILL at the second chunk file's rename: the first is kept, nothing half-written
    rc, err, got, _ = _evaluate(out, "killed", "--resume", "--chunk-rows", str(CHUNK),
                                env={"LLMREC_TEST_KILL_AT": f"write:rows-{CHUNK:07d}-{2 * CHUNK:07d}.safetensors"})  # fmt: skip
    kept = _chunk_files(out)
    assert rc != 0 and got is None
    assert len(kept) == 1  # a half-written temporary may remain: the next call removes it
    stamp = kept[0].stat().st_mtime_ns
    rc, err, got, _ = _evaluate(out, "resumed", "--resume", "--chunk-rows", str(CHUNK))
    assert rc == 0 and got is not None, err
    assert kept[0].stat().st_mtime_ns == stamp  # reused, not rescored
    assert not list((out / "scores").glob("*/.*tmp*"))


def test_an_edited_chunk_is_refused_with_one_line(run):
    _, out = run
    rc, err, _, _ = _evaluate(out, "full", "--resume", "--chunk-rows", str(CHUNK))
    assert rc == 0, err
    victim = _chunk_files(out)[0]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # one score's bytes
    victim.write_bytes(bytes(raw))
    rc, err, got, _ = _evaluate(out, "edited", "--resume", "--chunk-rows", str(CHUNK))
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc != 0 and got is None
    assert "checksum mismatch" in lines[-1] and "delete it" in lines[-1]
    assert "Traceback" not in err
    victim.unlink()


def test_bad_part_and_cf_runs_are_refused():
    from llmrec.scoring_parts import parse_part

    assert parse_part("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--part"):
            parse_part(bad)


def test_chunks_of_whole_groups():
    from llmrec.scoring_parts import _chunk_bounds

    groups = np.array([1, 1, 1, 2, 3, 3, 3, 3, 4, 5, 5])
    assert _chunk_bounds(11, 3, None) == [(0, 3), (3, 6), (6, 9), (9, 11)]
    # a chunk ends where the group of its last row ends; a group larger than a chunk is whole
    assert _chunk_bounds(11, 3, groups) == [(0, 3), (3, 8), (8, 11)]
    assert _chunk_bounds(11, 2, groups) == [(0, 3), (3, 8), (8, 11)]
    assert _chunk_bounds(11, 1, groups) == [(0, 3), (3, 4), (4, 8), (8, 9), (9, 11)]
    assert _chunk_bounds(11, 100, groups) == [(0, 11)]
    assert _chunk_bounds(0, 4, np.array([], np.int64)) == _chunk_bounds(0, 4, None) == []
    with pytest.raises(ValueError, match="contiguous"):
        _chunk_bounds(4, 2, np.array([1, 2, 1, 3]))


@pytest.fixture(scope="module")
def allmrec_run(tmp_path_factory):
    """A tiny A-LLMRec run: it ranks each user's rows among each other, so its chunks hold
    whole users."""
    root = tmp_path_factory.mktemp("evalparts_allm")
    data = synthetic_data(root, seed=6)
    kw = {"text_encoder": "random", "stage1_epochs": 1, "candidates": 4, "train_candidates": 3,
          "episodes": 6, "valid_episodes": 0, "generate": False, "latent_dim": 8,
          "ae_hidden": 8}  # fmt: skip
    return train_tiny("allmrec", data, root / "run", "--batch-size", "8",
                      "--max-train-rows", "24", "--max-test-rows", "12",
                      "--method-kwargs", json.dumps(kw))  # fmt: skip


def test_allmrec_scores_in_chunks_of_whole_users_as_in_one_pass(allmrec_run):
    out = allmrec_run
    rc, err, one, one_pred = _evaluate(out, "allm_one")
    assert rc == 0, err
    rc, err, got, _ = _evaluate(out, "allm_p1", "--part", "1/2", "--chunk-rows", "5")
    assert rc == 0 and got is None, err
    rc, err, got, pred = _evaluate(out, "allm_p2", "--part", "2/2", "--chunk-rows", "5")
    assert rc == 0 and got is not None, err
    assert pred[["uid", "iid", "label"]].equals(one_pred[["uid", "iid", "label"]])
    diff = np.abs(pred["score"].to_numpy() - one_pred["score"].to_numpy())
    assert diff.max() <= 1e-5 * max(np.abs(one_pred["score"].to_numpy()).max(), 1.0)
    # no user's rows were split between chunks
    frame = pred.sort_values("uid", kind="stable")
    for path in sorted((out / "scores").glob("*/rows-*.safetensors")):
        start, stop = (int(v) for v in path.stem.split("-")[1:])
        inside = set(frame["uid"].iloc[start:stop])
        assert not inside & (set(frame["uid"].iloc[:start]) | set(frame["uid"].iloc[stop:]))
    # the ranking episodes are scored once either way
    assert got["test"]["hit@1"] == one["test"]["hit@1"]
    assert got["test"]["episodes"] == one["test"]["episodes"] == 6
