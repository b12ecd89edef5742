"""Nothing lost, ever (issue 12): run-directory ownership, kills at any step, checksums,
and one-line errors (exit status 2) for every bad argument, data file and run file.

The kill tests run ``llmrec`` in a subprocess with ``LLMREC_TEST_KILL_AT=<step>``, which makes
the run layer SIGKILL its own process at that step (:func:`llmrec.safe_files.kill_point`), then
resume in this process and compare against an uninterrupted run of the same command.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.cf import save_cf_embeddings
from llmrec.cli import main
from llmrec.data import make_synthetic, write_data
from llmrec.run_store import LOCK_FILE, RunLock

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--rank", "2", "--alpha", "4", "--generator", "mlp", "--max-his", "3",
    "--tiny-hidden", "16", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-kv-heads", "1",
    "--tiny-vocab", "300", "--backend", "torch", "--batch-size", "16",
    "--eval-batch-size", "256", "--max-length", "160", "--no-progress",
]  # fmt: skip


def cli(argv, capsys=None):
    """``llmrec argv`` in this process: (exit status, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def error_line(err: str) -> str:
    """The error of a failed command: exactly one line that says ``error:``."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


def cli_subprocess(argv, kill_at=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    )
    env.pop("LLMREC_TEST_KILL_AT", None)
    if kill_at:
        env["LLMREC_TEST_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "llmrec.cli", *map(str, argv)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def temporaries(run: Path):
    return [p for p in run.rglob("*") if p.name.startswith(".") and ".tmp-" in p.name]


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def flip_data_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n + (len(raw) - 8 - n) // 2] ^= 0xFF  # a byte inside the tensor data
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny data (CSV), an MF run on it and a finished CoRA run (save and eval every 2 steps)."""
    root = tmp_path_factory.mktemp("rel")
    data = root / "data"
    write_data(make_synthetic(n_users=30, n_items=20, per_user=12, dim=2, seed=0), data, "csv")
    mf = root / "mf"
    rc, _ = cli(["train-cf", "--data", data, "--out", mf, "--dim", "8", "--epochs", "3",
                 "--no-progress"])  # fmt: skip
    assert rc == 0
    train = ["train", "--method", "cora", "--data", data, "--cf", mf, "--epochs", "2",
             "--max-steps", "6", "--eval-every", "2", *TINY]  # fmt: skip
    cora = root / "cora"
    assert cli([*train, "--out", cora])[0] == 0
    return {"root": root, "data": data, "mf": mf, "cora": cora, "train": train}


# ---------------------------------------------------------------------------------------------
# ownership: refusal, --force, lock


def test_another_kind_or_method_or_model_is_refused(env, capsys):
    root, data, mf, cora = env["root"], env["data"], env["mf"], env["cora"]
    before = {d: snapshot(d) for d in (mf, cora)}
    cases = [
        # the train reads mf (--cf): refused before its kind is even looked at (issue 27)
        ([*env["train"], "--out", mf], "inside the run"),
        (["train-cf", "--data", data, "--out", cora, "--epochs", "1"], "holds a llm run"),
        (["train", "--method", "frozen", "--data", data, "--cf", mf, "--out", cora, *TINY],
         "holds a llm run of 'cora'"),
        (["train-cf", "--model", "lightgcn", "--data", data, "--out", mf, "--epochs", "1"],
         "holds a cf run of 'mf'"),
        # same kind and method, but no --resume: a finished run is never overwritten
        (["train-cf", "--data", data, "--out", mf, "--dim", "8", "--epochs", "3"], "--resume"),
        ([*env["train"], "--out", cora], "--resume"),
        # --resume into another kind is still refused
        ([*env["train"], "--out", mf, "--resume"], "inside the run"),
        (["train", "--method", "cora", "--data", data, "--out", mf, "--resume", *TINY],
         "holds a cf run"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, err = cli([*argv, "--no-progress"], capsys)
        assert rc == 2, argv
        assert expected in error_line(err), (argv, err)
    for d, snap in before.items():  # not one byte changed (the lock file aside)
        now = snapshot(d)
        now.pop(LOCK_FILE, None), snap.pop(LOCK_FILE, None)
        assert now == snap, d
    assert not temporaries(root)


def test_force_moves_the_old_run_aside(env, capsys):
    root, data = env["root"], env["data"]
    out = root / "forced"
    assert cli(["train-cf", "--data", data, "--out", out, "--dim", "8", "--epochs", "2",
                "--no-progress"])[0] == 0  # fmt: skip
    old = snapshot(out)
    rc, err = cli(["train-cf", "--model", "lightgcn", "--data", data, "--out", out, "--dim", "8",
                   "--epochs", "2", "--force", "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, err
    aside = sorted(root.glob("forced.old-*"))
    assert len(aside) == 1 and "moved the old" in err
    moved = snapshot(aside[0])
    assert {k: v for k, v in moved.items() if k != LOCK_FILE} == {
        k: v for k, v in old.items() if k != LOCK_FILE
    }
    assert json.loads((out / "run.json").read_text())["model"] == "lightgcn"


def test_train_cf_resume_keeps_a_finished_run(env, capsys):
    data, mf = env["data"], env["mf"]
    before = (mf / "metrics.json").read_text()
    rc, err = cli(["train-cf", "--data", data, "--out", mf, "--dim", "8", "--epochs", "3",
                   "--resume", "--no-progress"], capsys)  # fmt: skip
    assert rc == 0 and "already finished" in err
    assert (mf / "metrics.json").read_text() == before
    rc, err = cli(["train-cf", "--data", data, "--out", mf, "--dim", "16", "--epochs", "3",
                   "--resume", "--no-progress"], capsys)  # fmt: skip
    assert rc == 2 and "dim: 8 -> 16" in error_line(err)


def test_a_live_run_locks_its_directory(env, capsys):
    root, data = env["root"], env["data"]
    out = root / "locked"
    lock = RunLock(out)  # another open file: flock conflicts even inside one process
    try:
        for argv in (
            ["train-cf", "--data", data, "--out", out, "--epochs", "1"],
            [*env["train"], "--out", out],
            [*env["train"], "--out", out, "--resume"],
        ):
            rc, err = cli([*argv, "--no-progress"], capsys)
            assert rc == 2
            assert f"pid {os.getpid()}" in error_line(err) and "in use" in err
    finally:
        lock.release()
    # evaluate and recommend read the run and write into it: not while it is written
    lock = RunLock(env["mf"])
    try:
        rc, err = cli(["evaluate", "--run", env["mf"], "--no-progress"], capsys)
        assert rc == 2 and "in use" in error_line(err)
    finally:
        lock.release()
    pytest.importorskip("faiss")
    lock = RunLock(env["cora"])
    try:
        rc, err = cli(["recommend", "--run", env["cora"], "--retrieve", "5", "--no-progress"],
                      capsys)  # fmt: skip
        assert rc == 2 and "in use" in error_line(err)
        assert not list(Path(env["cora"]).glob("recommend_*"))
    finally:
        lock.release()


def test_a_dead_holders_lock_is_no_obstacle(env, capsys):
    out = env["root"] / "stale"
    code = (f"from llmrec.run_store import RunLock; import os, signal; l = RunLock({str(out)!r}); "
            "os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                          "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)])})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    assert "pid" in (out / LOCK_FILE).read_text()  # the dead holder's record is still there
    rc, err = cli(["train-cf", "--data", env["data"], "--out", out, "--dim", "8", "--epochs",
                   "1", "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, err
    assert "the lock of a dead process (run pid " in err
    assert (out / LOCK_FILE).read_text() == ""  # released cleanly: no record left


# ---------------------------------------------------------------------------------------------
# kills at chosen steps: resumable with no manual step, same result as without the kills


def test_killed_at_every_step_resumes_to_the_same_metrics(env, capsys):
    root, train = env["root"], env["train"]
    reference = json.loads((env["cora"] / "metrics.json").read_text())
    out = root / "killed"
    argv = [*train, "--out", out]
    steps = [
        ("llm:saved", lambda: any(p.name.startswith(".llm.tmp-") for p in out.iterdir())),
        ("checkpoint:filled", lambda: list((out / "checkpoints").glob(".tmp-ckpt-*"))),
        ("write:best.safetensors", lambda: list(out.glob(".best.tmp-*"))),
        ("append:train_log.jsonl", lambda: (out / "train_log.jsonl").exists()),
        # an orphan: a checkpoint renamed into place whose `latest` was never written
        ("checkpoint:renamed@2", lambda: (out / "checkpoints" / "latest").exists()),
    ]
    for k, (step, left) in enumerate(steps):
        proc = cli_subprocess(argv + (["--resume"] if k else []), kill_at=step)
        assert proc.returncode == -signal.SIGKILL, (step, proc.stderr[-2000:])
        assert left(), f"the kill at {step} did not leave what it should"
    rc, err = cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert "adopted" in err
    assert not temporaries(out)
    got = json.loads((out / "metrics.json").read_text())
    assert got["train"]["steps"] == reference["train"]["steps"]
    assert got["test"]["auc"] == reference["test"]["auc"]
    assert got["valid"]["auc"] == reference["valid"]["auc"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(x) for x in (env["cora"] / "train_log.jsonl").read_text().splitlines()]
    for kind in ("step", "eval"):
        steps_logged = [r["step"] for r in log if r["kind"] == kind]
        assert steps_logged == sorted(set(steps_logged)), steps_logged  # no repeated record
        assert steps_logged == [r["step"] for r in ref_log if r["kind"] == kind]


def test_killed_train_cf_is_never_taken_for_a_finished_run(env, capsys):
    root, data = env["root"], env["data"]
    out = root / "cf_killed"
    argv = ["train-cf", "--data", data, "--out", out, "--dim", "8", "--epochs", "2",
            "--no-progress"]  # fmt: skip
    proc = cli_subprocess(argv, kill_at="write:embeddings.safetensors")
    assert proc.returncode == -signal.SIGKILL
    assert (out / "model.safetensors").exists() and not (out / "embeddings.safetensors").exists()
    rc, err = cli([*env["train"], "--cf", out, "--out", root / "on_killed_cf"], capsys)
    assert rc == 2 and "did not finish" in error_line(err)
    rc, err = cli(["evaluate", "--run", out, "--no-progress"], capsys)
    assert rc == 2 and "did not finish" in error_line(err)
    rc, err = cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["complete"] is True
    assert not temporaries(out)


def test_train_cf_killed_mid_training_resumes_to_the_same_metrics(env, capsys):
    root, data, mf = env["root"], env["data"], env["mf"]
    out = root / "cf_mid"
    argv = ["train-cf", "--data", data, "--out", out, "--dim", "8", "--epochs", "3",
            "--no-progress"]  # fmt: skip
    # killed while writing the loop state after epoch 2: the state of epoch 1 is on disk
    proc = cli_subprocess(argv, kill_at="write:cf_state.safetensors@2")
    assert proc.returncode == -signal.SIGKILL
    rc, err = cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert "continuing the CF training" in err
    got, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, mf))
    for key in ("test", "valid"):
        assert got[key] == ref[key], key
    assert got["train"]["history"] == ref["train"]["history"]
    assert got["train"]["best_epoch"] == ref["train"]["best_epoch"]
    assert not temporaries(out)


# ---------------------------------------------------------------------------------------------
# checksums and the latest pointer


def test_corrupt_or_truncated_tensor_files_are_refused(env, capsys):
    root, cora, mf = env["root"], env["cora"], env["mf"]
    # best.safetensors with one flipped byte: evaluate refuses it
    run = root / "corrupt_best"
    shutil.copytree(cora, run)
    flip_data_byte(run / "best.safetensors")
    rc, err = cli(["evaluate", "--run", run, "--no-progress"], capsys)
    assert rc == 2 and "checksum mismatch" in error_line(err)
    # trainer.safetensors flipped, then truncated: --resume refuses it
    run = root / "corrupt_trainer"
    shutil.copytree(cora, run)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    flip_data_byte(latest / "trainer.safetensors")
    argv = [*env["train"], "--out", run, "--resume", "--max-steps", "8"]
    rc, err = cli(argv, capsys)
    assert rc == 2 and "checksum mismatch" in error_line(err)
    raw = (latest / "trainer.safetensors").read_bytes()
    (latest / "trainer.safetensors").write_bytes(raw[: len(raw) // 2])
    rc, err = cli(argv, capsys)
    assert rc == 2 and "truncated" in error_line(err)
    # the CF model, flipped then truncated: evaluate refuses it
    run = root / "corrupt_cf"
    shutil.copytree(mf, run)
    flip_data_byte(run / "model.safetensors")
    rc, err = cli(["evaluate", "--run", run, "--no-progress"], capsys)
    assert rc == 2 and "checksum mismatch" in error_line(err)
    (run / "model.safetensors").write_bytes((mf / "model.safetensors").read_bytes()[:100])
    rc, err = cli(["evaluate", "--run", run, "--no-progress"], capsys)
    assert rc == 2 and "truncated" in error_line(err)
    # CF embeddings: flipped byte
    shutil.copy(mf / "embeddings.safetensors", run / "embeddings.safetensors")
    flip_data_byte(run / "embeddings.safetensors")
    rc, err = cli([*env["train"], "--cf", run / "embeddings.safetensors", "--out",
                   root / "on_corrupt_cf"], capsys)  # fmt: skip
    assert rc == 2 and "checksum mismatch" in error_line(err)


def test_latest_may_only_name_a_checkpoint_of_its_own_run(env, capsys):
    root = env["root"]
    run = root / "escaped"
    shutil.copytree(env["cora"], run)
    name = (env["cora"] / "checkpoints" / "latest").read_text().strip()
    (run / "checkpoints" / "latest").write_text(f"../../cora/checkpoints/{name}\n")
    rc, err = cli([*env["train"], "--out", run, "--resume", "--max-steps", "8"], capsys)
    assert rc == 2 and "not a checkpoint of this run" in error_line(err)


def test_nan_cf_embeddings_are_refused(env, capsys):
    root = env["root"]
    user, item = torch.randn(31, 8), torch.randn(21, 8)
    item[5, 2] = float("nan")
    save_cf_embeddings(root / "nan_cf" / "embeddings.safetensors", user, item, "mf")
    rc, err = cli([*env["train"], "--cf", root / "nan_cf", "--out", root / "on_nan"], capsys)
    assert rc == 2 and "item_emb holds NaN or infinite values (first in row 5)" in error_line(err)


# ---------------------------------------------------------------------------------------------
# one-line errors: arguments


BAD_TRAIN_ARGS = [
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-2"], "--epochs"),
    (["--max-train-rows", "0"], "--max-train-rows"),
    (["--max-train-rows", "-5"], "--max-train-rows"),
    (["--max-steps", "0"], "--max-steps"),
    (["--device", "tpu"], "--device"),
    (["--tiny-heads", "3"], "--tiny-heads 3 must divide --tiny-hidden"),
    (["--target-modules", "bogus_proj"], "--target-modules"),
    (["--generator-kwargs", '{"nonsense": 1}'], "['nonsense'] not accepted"),
    (["--warmup-ratio", "2"], "--warmup-ratio"),
    (["--predictions", "."], "is a directory"),
    (["--resume", "--force"], "contradict"),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_TRAIN_ARGS, ids=lambda x: str(x))
def test_bad_train_arguments_are_one_line_errors(env, tmp_path, capsys, extra, expected):
    out = tmp_path / "run"
    rc, err = cli([*env["train"], "--out", out, *extra], capsys)
    assert rc == 2
    assert expected in error_line(err)
    assert not (out / "run.json").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train-cf", "--lr", "nan"], "--lr"),
        (["train-cf", "--epochs", "0"], "--epochs"),
        (["train-cf", "--device", "tpu"], "--device"),
        (["evaluate", "--split", "bogus"], "--split"),
        (["evaluate", "--predictions", "."], "is a directory"),
        (["evaluate", "--split", "valid_small"], "no 'valid_small' split"),
    ],
)
def test_bad_arguments_of_other_commands(env, tmp_path, capsys, argv, expected):
    where = ["--run", env["mf"]] if argv[0] == "evaluate" else ["--out", tmp_path / "x"]
    if "valid_small" in argv:  # a dataset without that split
        data = _bad_data(env, tmp_path, "no_small", lambda d: (d / "valid_small.csv").unlink())
        where += ["--data", data]
    rc, err = cli([*argv, *where], capsys)
    assert rc == 2 and expected in error_line(err)


# ---------------------------------------------------------------------------------------------
# one-line errors: data and run files


def _bad_data(env, tmp_path, name, edit):
    """A copy of the test data (CSV) with ``edit(dir)`` applied."""
    d = tmp_path / name
    shutil.copytree(env["data"], d)
    edit(d)
    return d


def _set_csv(col, row, value, split="valid"):
    def edit(d):
        df = pd.read_csv(d / f"{split}.csv", keep_default_na=False, dtype=str)
        df.loc[row, col] = value
        df.to_csv(d / f"{split}.csv", index=False)

    return edit


def _parquet_non_utf8(d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pd.read_csv(d / "train.csv", keep_default_na=False)
    (d / "train.csv").unlink()
    df["his"] = [np.asarray(json.loads(h), dtype=np.int64) for h in df["his"]]
    df["his_title"] = [np.asarray(json.loads(t), dtype=object) for t in df["his_title"]]
    titles = [t.encode() for t in df["title"]]
    titles[4] = b"Caf\xe9 (1999)"  # latin-1, not UTF-8
    table = pa.Table.from_pandas(df.drop(columns=["title"]), preserve_index=False)
    pq.write_table(table.append_column("title", pa.array(titles, pa.binary())),
                   d / "train.parquet")  # fmt: skip


def _warm_unseen_item(d):
    """An item of valid (flagged warm) that train never has."""
    train = pd.read_csv(d / "train.csv", keep_default_na=False, dtype=str)
    valid = pd.read_csv(d / "valid.csv", keep_default_na=False, dtype=str)
    train = train[train["iid"] != valid.loc[0, "iid"]]
    train.to_csv(d / "train.csv", index=False)
    valid.loc[0, "not_cold"] = "1"
    valid.to_csv(d / "valid.csv", index=False)


DATA_CASES = [
    ("non_utf8_title", _parquet_non_utf8, "train.parquet: row 4: column 'title' is not valid UTF-8"),
    ("meta_list", lambda d: (d / "meta.json").write_text("[30, 20]"), "meta.json: expected an object"),
    ("meta_str", lambda d: (d / "meta.json").write_text('{"n_users": "30"}'), "n_users must be"),
    ("his_inf", _set_csv("his", 1, "[0, Infinity]"), "valid.csv: row 1"),
    ("his_1e300", _set_csv("his", 1, "[0, 1e300]"), "valid.csv: row 1"),
    ("iid_1e12", _set_csv("iid", 2, "1000000000000"), "valid.csv: row 2"),
    ("uid_inf", _set_csv("uid", 3, "inf"), "valid.csv: row 3"),
    ("uid_1e30", _set_csv("uid", 3, "1e30"), "valid.csv: row 3"),
    ("both_files", lambda d: shutil.copy(d / "test.csv", d / "test.parquet"),
     "both test.parquet and test.csv exist"),
    ("train_cold", _set_csv("not_cold", 2, "0", split="train"), "train.csv: row 2: not_cold is 0"),
    ("warm_unseen", _warm_unseen_item, "not_cold is 1 but item"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "edit", "expected"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_a_one_line_error(env, tmp_path, capsys, name, edit, expected):
    data = _bad_data(env, tmp_path, name, edit)
    if name in ("iid_1e12", "his_1e300"):  # without meta.json only the id bound catches it
        (data / "meta.json").unlink()
    rc, err = cli(["train-cf", "--data", data, "--out", tmp_path / "out", "--epochs", "1",
                   "--no-progress"], capsys)  # fmt: skip
    assert rc == 2
    line = error_line(err)
    assert expected in line, line
    assert "-9223372036854775808" not in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [('{"kind": "llm", "conf', "not readable JSON"), ("[1, 2]", "malformed"), ("", "JSON")],
)
def test_truncated_or_malformed_run_json(env, tmp_path, capsys, content, expected):
    run = tmp_path / "run"
    shutil.copytree(env["mf"], run)
    (run / "run.json").write_text(content)
    rc, err = cli(["evaluate", "--run", run, "--no-progress"], capsys)
    assert rc == 2 and expected in error_line(err)
    # nor can a new run be started into it without --force
    rc, err = cli(["train-cf", "--data", env["data"], "--out", run, "--epochs", "1",
                   "--no-progress"], capsys)  # fmt: skip
    assert rc == 2 and expected in error_line(err)
