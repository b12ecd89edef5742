"""Issue 27: nothing a command did not create is changed, numerical and OS failures are one
line, interrupts exit 130 with the resume command. Every case runs the real CLI (``main`` in
this process, or ``python -m llmrec.cli`` in a subprocess where a signal, a file-size limit or
a read-only folder is involved) on the small synthetic dataset with the tiny LLM.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmrec.cli import main

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--rank", "2", "--alpha", "4", "--generator", "mlp", "--max-his", "3",
    "--tiny-hidden", "16", "--tiny-layers", "1", "--tiny-heads", "2", "--tiny-kv-heads", "1",
    "--tiny-vocab", "300", "--backend", "torch", "--batch-size", "16",
    "--eval-batch-size", "256", "--max-length", "160", "--no-progress",
]  # fmt: skip


def cli(argv, capsys):
    """``llmrec argv`` in this process: (exit status, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """A failed command's stderr: exactly one ``error:`` line, no traceback."""
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


def run_subprocess(argv, *, preexec=None, timeout=300, wait_for=None, sig=signal.SIGINT):
    """``python -m llmrec.cli argv``; with ``wait_for`` (a path), ``sig`` once it exists."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmrec.cli", *map(str, argv)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec,
    )  # fmt: skip
    if wait_for is not None:
        deadline = time.monotonic() + timeout
        while not Path(wait_for).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never reached the interrupt point"
            time.sleep(0.05)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def temporaries(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and "tmp-" in p.name]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny CSV data, an MF run on it and a small CoRA run."""
    root = tmp_path_factory.mktemp("rel3")
    data, mf, cora = root / "data", root / "mf", root / "cora"
    assert main(["make-data", "--out", str(data), "--format", "csv", "--users", "30", "--items",
                 "20", "--per-user", "12", "--dim", "2"]) == 0  # fmt: skip
    assert main(["train-cf", "--data", str(data), "--out", str(mf), "--dim", "8", "--epochs", "3",
                 "--no-progress"]) == 0  # fmt: skip
    train = ["train", "--method", "cora", "--data", data, "--cf", mf, "--epochs", "1",
             "--max-steps", "4", "--eval-every", "2", *TINY]  # fmt: skip
    assert main([str(a) for a in [*train, "--out", cora]]) == 0
    return {"root": root, "data": data, "mf": mf, "cora": cora, "train": train}


# ---------------------------------------------------------------------------------------------
# 1. a command writes only where it may


def test_a_run_never_writes_into_a_dataset_or_a_foreign_directory(env, tmp_path, capsys):
    data, mf = env["data"], env["mf"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    before = {d: snapshot(d) for d in (data, foreign, mf)}
    cases = [
        (["train-cf", "--data", data, "--out", data, "--epochs", "1"], "is a dataset directory"),
        (["train-cf", "--data", data, "--out", data, "--force", "--epochs", "1"],
         "is a dataset directory"),
        ([*env["train"], "--out", data, "--force"], "is a dataset directory"),
        (["train-cf", "--data", data, "--out", foreign, "--epochs", "1"], "did not create"),
        (["train-cf", "--data", data, "--out", foreign, "--force", "--epochs", "1"],
         "--force moves aside only runs"),
        ([*env["train"], "--out", foreign, "--force"], "did not create"),
        (["make-data", "--out", mf], "is a run directory"),
        (["make-data", "--out", foreign], "did not create"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        assert expected in one_error_line(err), (argv, err)
    assert {d: snapshot(d) for d in (data, foreign, mf)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # nothing moved aside


def test_no_output_path_inside_what_the_command_reads(env, tmp_path, capsys):
    data, mf, cora = env["data"], env["mf"], env["cora"]
    before = {d: snapshot(d) for d in (data, mf, cora)}
    cases = [
        (["evaluate", "--run", cora, "--predictions", cora / "best.safetensors"], "inside the run"),
        (["evaluate", "--run", mf, "--predictions", mf / "model.safetensors"], "inside the run"),
        (["evaluate", "--run", mf, "--metrics", mf / "run.json"], "inside the run"),
        (["evaluate", "--run", mf, "--metrics", mf / "metrics.json"], "a new .json or .csv"),
        (["evaluate", "--run", mf, "--predictions", mf / "sub" / "p.csv"], "inside the run"),
        (["evaluate", "--run", mf, "--predictions", mf / "p.safetensors"], "inside the run"),
        # the data the run read, found through its run.json
        (["evaluate", "--run", mf, "--metrics", data / "train.csv"], "inside the dataset"),
        (["train-cf", "--data", data, "--out", tmp_path / "a", "--predictions",
          data / "test.csv"], "inside the dataset"),
        ([*env["train"], "--out", tmp_path / "b", "--predictions", mf / "embeddings.safetensors"],
         "inside the run"),
        ([*env["train"], "--out", mf / "sub"], "inside the run"),
        (["recommend", "--run", cora, "--retrieve", "3", "--out", cora / "metrics.json"],
         "inside the run"),
        (["recommend", "--run", cora, "--retrieve", "3", "--lists", mf / "run.json"],
         "inside the run"),
        (["compare", mf, cora, "--plot", cora / "best.safetensors"], "inside the run"),
        (["compare", mf, "--no-plot", "--json", mf / "metrics.json"], "inside the run"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        assert expected in one_error_line(err), (argv, err)
    assert {d: snapshot(d) for d in (data, mf, cora)} == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_evaluate_may_write_new_report_files_directly_into_the_run_it_reads(env, capsys):
    """Its default report is RUN/eval_<split>.json; another report name beside it is the
    same kind of file (experiments/smollm2/run.sh writes RUN/eval_test_all.json)."""
    mf = env["mf"]
    before = snapshot(mf)
    argv = ["evaluate", "--run", mf, "--rows", "all", "--no-progress",
            "--metrics", mf / "eval_test_all.json", "--predictions", mf / "all_predictions.csv"]  # fmt: skip
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    after = snapshot(mf)
    new = set(after) - set(before)
    assert new == {"eval_test_all.json", "all_predictions.csv"}, new
    assert {k: after[k] for k in before} == before  # every file the run had is unchanged
    for name in new:
        (mf / name).unlink()


def test_force_still_moves_a_run_aside(env, tmp_path, capsys):
    old = tmp_path / "old"
    argv = ["train-cf", "--data", env["data"], "--dim", "8", "--epochs", "1", "--no-progress"]
    assert cli([*argv, "--out", old], capsys)[0] == 0
    first = snapshot(old)
    rc, err = cli([*argv, "--out", old, "--force"], capsys)
    assert rc == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("old.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == first


# ---------------------------------------------------------------------------------------------
# 2. numerical failure and undefined metrics


@pytest.mark.parametrize(
    "extra, expected",
    [
        # one CF step per epoch: the loss stays finite, the scores of epoch 1 are not
        (["--lr", "1e30"], "epoch 1: the model's scores hold NaN"),
        # several steps per epoch: the second step's loss is NaN
        (["--lr", "1e30", "--batch-size", "16"], "epoch 1, step 2: the training loss is nan"),
    ],
)
def test_train_cf_stops_at_a_non_finite_loss(env, tmp_path, capsys, extra, expected):
    out = tmp_path / "mf"
    rc, err = cli(["train-cf", "--data", env["data"], "--out", out, "--epochs", "3",
                   "--no-progress", *extra], capsys)  # fmt: skip
    assert rc == 2
    line = one_error_line(err)
    assert expected in line and "lower --lr (now 1e+30)" in line, line
    assert not (out / "model.safetensors").exists() and not temporaries(out)
    assert json.loads((out / "run.json").read_text())["complete"] is False


def test_train_stops_at_a_non_finite_loss_and_keeps_the_last_good_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "cora"
    base = [*env["train"], "--out", out, "--warmup-steps", "0", "--max-steps", "8"]
    assert cli([*base, "--max-steps", "2"], capsys)[0] == 0  # a good run with a checkpoint
    good = snapshot(out / "checkpoints")
    best = (out / "best.safetensors").read_bytes()
    rc, err = cli([*base, "--resume", "--lr", "1e30"], capsys)
    assert rc == 2
    line = one_error_line(err)
    # step 3 (lr 1e30) is the first update that breaks the weights: step 4's loss is NaN
    assert "step 4: the training loss is nan" in line, line
    assert "the last good checkpoint ckpt-000001-step00000002 is kept" in line, line
    assert "lower --lr (now 1e+30)" in line, line
    assert snapshot(out / "checkpoints") == good  # the last good checkpoint, untouched
    assert (out / "best.safetensors").read_bytes() == best
    assert not temporaries(out)
    # from the start: no checkpoint to keep, the line says so
    rc, err = cli([*env["train"], "--out", tmp_path / "b", "--warmup-steps", "0",
                   "--eval-every", "1", "--lr", "1e30"], capsys)  # fmt: skip
    assert rc == 2 and "step 1" in one_error_line(err)


def _one_class_data(env, root: Path) -> Path:
    import shutil

    import pandas as pd

    data = root / "one_class"
    shutil.copytree(env["data"], data)
    for split in ("valid", "valid_small"):
        frame = pd.read_csv(data / f"{split}.csv")
        frame["label"] = 1
        frame.to_csv(data / f"{split}.csv", index=False)
    return data


def test_a_one_class_validation_split_is_refused_before_training(env, tmp_path, capsys):
    data = _one_class_data(env, tmp_path)
    cases = [
        ["train-cf", "--data", data, "--out", tmp_path / "mf", "--epochs", "1", "--no-progress"],
        ["train", "--method", "cora", "--data", data, "--cf", env["mf"], "--out",
         tmp_path / "cora", *TINY],
        # no --cf: refused before the MF that would otherwise be trained first
        ["train", "--method", "cora", "--data", data, "--out", tmp_path / "cora2", *TINY],
    ]  # fmt: skip
    for argv in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        line = one_error_line(err)
        assert "has only label 1: its AUC is undefined" in line, line
    assert not (tmp_path / "mf" / "model.safetensors").exists()
    assert not (tmp_path / "cora2" / "cf").exists()


# ---------------------------------------------------------------------------------------------
# 3. interrupts and operating-system failures


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job may inherit SIG_IGN


def _resume_argv(line: str) -> list:
    import shlex

    assert "; resume with: llmrec " in line, line
    return shlex.split(line.split("; resume with: llmrec ", 1)[1])


@pytest.mark.parametrize("command", ["train-cf", "train"])
def test_ctrl_c_is_one_line_exit_130_and_prints_the_resume_command(env, tmp_path, capsys, command):
    out = tmp_path / "run"
    if command == "train-cf":
        argv = ["train-cf", "--data", env["data"], "--out", out, "--batch-size", "16",
                "--epochs", "100", "--patience", "100", "--no-progress"]  # fmt: skip
        reached = out / "cf_state.safetensors"
    else:
        argv = [*env["train"], "--out", out, "--epochs", "30", "--max-steps", "400",
                "--save-every", "1"]  # fmt: skip
        reached = out / "checkpoints" / "latest"
    rc, err = run_subprocess(argv, preexec=_default_sigint, wait_for=reached)
    assert rc == 130, err
    line = one_error_line(err)
    assert f"llmrec {command}: error: interrupted" in line, line
    assert not temporaries(out)
    again = _resume_argv(line)
    assert again[-1] == "--resume" and again[0] == command
    rc, err = cli([*again[:-1], "--max-steps", "8", "--resume"] if command == "train" else again,
                  capsys)  # fmt: skip
    assert rc == 0, err
    assert (out / "metrics.json").exists()


def test_sigterm_is_one_line_exit_143_and_prints_the_resume_command(env, tmp_path, capsys):
    """How a scheduler (or torchrun, for the ranks of a failed job) stops a run."""
    out = tmp_path / "run"
    argv = [*env["train"], "--out", out, "--epochs", "30", "--max-steps", "400",
            "--save-every", "1"]  # fmt: skip
    rc, err = run_subprocess(argv, wait_for=out / "checkpoints" / "latest", sig=signal.SIGTERM)
    assert rc == 143, err
    line = one_error_line(err)
    assert "llmrec train: error: terminated (SIGTERM)" in line, line
    assert not temporaries(out)
    again = _resume_argv(line)
    rc, err = cli([*again[:-1], "--max-steps", "8", "--resume"], capsys)
    assert rc == 0, err


def test_an_interrupt_before_anything_resumable_leaves_nothing(env, tmp_path, capsys, monkeypatch):
    import llmrec.cf.cf_run as cf_run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cf_run, "write_run_info", interrupted)
    out = tmp_path / "new"
    rc, err = cli(["train-cf", "--data", env["data"], "--out", out, "--no-progress"], capsys)
    assert rc == 130
    assert "interrupted; nothing was kept" in one_error_line(err)
    assert not out.exists()


def _file_size_limit(limit: int):
    def apply():
        _default_sigint()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_and_leaves_no_temporaries(env, tmp_path):
    # train-cf: run.json fits, the first 30 KB state file does not: a resumable run stays
    out = tmp_path / "mf"
    rc, err = run_subprocess(
        ["train-cf", "--data", env["data"], "--out", out, "--dim", "256", "--no-progress"],
        preexec=_file_size_limit(20_000),
    )
    assert rc == 1
    line = one_error_line(err)
    assert "File too large" in line and "resume with: llmrec train-cf" in line, line
    assert not temporaries(out)
    assert json.loads((out / "run.json").read_text())["complete"] is False
    # train: the tiny LLM does not fit, before run.json: the new OUT is removed
    out = tmp_path / "cora"
    rc, err = run_subprocess([*env["train"], "--out", out], preexec=_file_size_limit(20_000))
    assert rc == 1
    line = one_error_line(err)
    assert "File too large" in line and "nothing was kept" in line, line
    assert not out.exists()


def test_no_space_left_while_evaluating(env, tmp_path, capsys, monkeypatch):
    import errno

    import llmrec.safe_files as safe_files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = snapshot(env["mf"])
    monkeypatch.setattr(safe_files.os, "fsync", full)
    rc, err = cli(["evaluate", "--run", env["mf"], "--metrics", tmp_path / "m.json"], capsys)
    assert rc == 1
    assert "No space left on device" in one_error_line(err)
    assert not temporaries(tmp_path) and not (tmp_path / "m.json").exists()
    monkeypatch.undo()
    now = snapshot(env["mf"])
    assert {k: v for k, v in now.items() if k != ".llmrec.lock"} == {
        k: v for k, v in before.items() if k != ".llmrec.lock"
    }


def test_unwritable_or_impossible_outputs(env, tmp_path, capsys, monkeypatch):
    import llmrec.output_guard as output_guard

    (tmp_path / "afile").write_text("x")
    cases = [
        (["train-cf", "--data", env["data"], "--out", tmp_path / "afile" / "run"], "is a file"),
        ([*env["train"], "--out", tmp_path / "afile" / "a" / "b"], "is a file"),
        (["evaluate", "--run", env["mf"], "--predictions", tmp_path / "afile" / "p.csv"],
         "is a file"),
        (["train-cf", "--data", env["data"], "--out", tmp_path / "afile"], "not a directory"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        assert expected in one_error_line(err), err
    # a read-only folder (the tests may run as root, who may write anywhere: simulated)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        output_guard.os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m)
    )
    for argv in (
        ["train-cf", "--data", env["data"], "--out", ro / "run"],
        ["evaluate", "--run", env["mf"], "--metrics", ro / "m.json"],
        ["compare", env["mf"], "--plot", ro / "p.png"],
    ):
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        assert f"{ro} is not writable" in one_error_line(err), err
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 4. inputs that change under a finished run


def _edit_in_place(csv: Path) -> None:
    """Same path, same row count, other content: every label flipped."""
    import pandas as pd

    frame = pd.read_csv(csv)
    frame["label"] = 1 - frame["label"]
    frame.to_csv(csv, index=False)


@pytest.fixture
def own_runs(env, tmp_path, capsys):
    """A private copy of the data, an MF run and a CoRA run on it (2 steps, a checkpoint)."""
    import shutil

    data, mf, cora = tmp_path / "data", tmp_path / "mf", tmp_path / "cora"
    shutil.copytree(env["data"], data)
    cf = ["train-cf", "--data", data, "--out", mf, "--dim", "8", "--epochs", "2", "--no-progress"]
    assert cli(cf, capsys)[0] == 0
    train = ["train", "--method", "cora", "--data", data, "--cf", mf, "--out", cora,
             "--epochs", "1", "--max-steps", "2", "--save-every", "1", *TINY]  # fmt: skip
    assert cli(train, capsys)[0] == 0
    from llmrec.run_store import read_run_info

    recorded = read_run_info(cora)["inputs"]  # relative in the file, absolute once read
    assert set(recorded) == {"data", "cf"}
    assert str(mf / "embeddings.safetensors") in recorded["cf"]
    assert str(data / "test.csv") in recorded["data"]
    return {"data": data, "mf": mf, "cora": cora, "cf": cf, "train": train}


def test_an_edited_dataset_is_noticed_by_every_command(own_runs, tmp_path, capsys):
    data, mf, cora = own_runs["data"], own_runs["mf"], own_runs["cora"]
    _edit_in_place(data / "test.csv")
    cases = [
        ["evaluate", "--run", mf],
        ["evaluate", "--run", cora],
        [
            "recommend",
            "--run",
            cora,
            "--retrieve",
            "5",
            "--users",
            "3",
            "--out",
            tmp_path / "r.json",
        ],
        ["compare", mf, cora, "--no-plot"],
        [*own_runs["cf"], "--resume"],
        [*own_runs["train"], "--max-steps", "3", "--resume"],
    ]
    for argv in cases:
        before = snapshot(cora)
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        line = one_error_line(err)
        assert f"its data input {data / 'test.csv'} changed" in line, line
        assert "--accept-changed-inputs" in line
        assert snapshot(cora) == before
    # accepted explicitly: the command runs and run.json records the change
    rc, err = cli(["evaluate", "--run", mf, "--accept-changed-inputs", "--no-progress"], capsys)
    assert rc == 0, err
    info = json.loads((mf / "run.json").read_text())
    assert "test.csv changed" in info["accepted_input_changes"][0]["change"]
    assert cli(["evaluate", "--run", mf, "--no-progress"], capsys)[0] == 0  # accepted once
    # a resume that accepts keeps the record in the rewritten run.json
    rc, err = cli([*own_runs["train"], "--max-steps", "3", "--resume", "--accept-changed-inputs"],
                  capsys)  # fmt: skip
    assert rc == 0, err
    assert json.loads((cora / "run.json").read_text())["accepted_input_changes"]


def test_a_replaced_or_removed_cf_run_is_noticed(own_runs, tmp_path, capsys):
    mf, cora = own_runs["mf"], own_runs["cora"]
    rc, _ = cli([*own_runs["cf"][:-1], "--epochs", "3", "--no-progress", "--force"], capsys)
    assert rc == 0  # the CF run the LLM run read is replaced
    rc, err = cli(["evaluate", "--run", cora], capsys)
    assert rc == 2
    assert f"its cf input {mf / 'embeddings.safetensors'} changed" in one_error_line(err)
    (mf / "embeddings.safetensors").unlink()
    rc, err = cli(["evaluate", "--run", cora, "--accept-changed-inputs"], capsys)
    assert rc == 2  # a missing file is accepted as a change, then cannot be read: one line
    one_error_line(err)
    rc, err = cli(["compare", cora, "--no-plot"], capsys)
    assert rc == 2
    assert "embeddings.safetensors is gone" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# 7. oddities: checkpoints at an epoch end, the train loss of a resumed epoch


def _checkpoint_steps(run: Path) -> list:
    return sorted(int(p.name.rsplit("step", 1)[1]) for p in (run / "checkpoints").glob("ckpt-*"))


@pytest.mark.parametrize(
    "every", [["--eval-every", "0", "--save-every", "7"], ["--eval-every", "7"]]
)
def test_one_checkpoint_per_step_when_the_interval_divides_the_epoch(env, tmp_path, capsys, every):
    out = tmp_path / "run"  # 14 steps per epoch (215 rows, batch 16), 2 epochs
    rc, err = cli([*env["train"], "--out", out, "--epochs", "2", "--max-steps", "28",
                   "--keep-checkpoints", "0", *every], capsys)  # fmt: skip
    assert rc == 0, err
    assert _checkpoint_steps(out) == [7, 14, 21, 28]


def test_a_resumed_epoch_reports_the_loss_of_all_its_steps(env, tmp_path, capsys):
    argv = [*env["train"], "--epochs", "1", "--max-steps", "14", "--eval-every", "0",
            "--save-every", "5"]  # fmt: skip
    whole = tmp_path / "whole"
    assert cli([*argv, "--out", whole], capsys)[0] == 0
    resumed = tmp_path / "resumed"
    env_vars = dict(os.environ, LLMREC_TEST_KILL_AT="checkpoint:latest@2")  # after step 10
    proc = subprocess.run(
        [sys.executable, "-m", "llmrec.cli", *map(str, [*argv, "--out", resumed])],
        env={**env_vars, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert cli([*argv, "--out", resumed, "--resume"], capsys)[0] == 0

    def losses(run):
        return [r["train_loss"] for r in json.loads((run / "metrics.json").read_text())["train"]
                ["stages"][-1].get("history", [])] or [
            r["train_loss"] for r in map(json.loads, (run / "train_log.jsonl").open())
            if r.get("kind") != "step"  # the validation records
        ]  # fmt: skip

    # the same additions in the same order (the sum is checkpointed): equal, not just close
    assert losses(resumed) == losses(whole)


# ---------------------------------------------------------------------------------------------
# 5. sizes that cannot fit


def test_sizes_that_cannot_fit_are_refused_before_allocating(env, tmp_path, capsys):
    before = snapshot(env["cora"])
    cases = [
        ([*env["train"], "--out", tmp_path / "a", "--tiny-hidden", "1000000"], "the tiny LLM needs"),
        ([*env["train"], "--out", tmp_path / "b", "--tiny-hidden", "4096", "--tiny-layers",
          "100000"], "the tiny LLM needs"),
        ([*env["train"], "--out", tmp_path / "c", "--rank", "100000"],
         "--rank 100000 exceeds the LLM's hidden size 16"),
        (["recommend", "--run", env["cora"], "--retrieve", "1000", "--out", tmp_path / "r.json"],
         "--retrieve 1000: the catalogue has 20 items"),
        (["recommend", "--run", env["cora"], "--retrieve", "21", "--out", tmp_path / "r.json"],
         "choose K <= 20"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        assert expected in one_error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind
    now = snapshot(env["cora"])
    assert {k: v for k, v in now.items() if k != ".llmrec.lock"} == {
        k: v for k, v in before.items() if k != ".llmrec.lock"
    }


def test_coras_training_state_is_estimated_before_it_is_built(monkeypatch):
    """Vicuna-7B's shape (hidden 4096, 32 layers, d_cf 256): rank 16 fits 24 GiB, rank 4096
    (a generator output layer of 8.6e9 weights) is refused by name before any allocation."""
    from llmrec import memory_check
    from llmrec.errors import RunConfigError

    monkeypatch.setattr(memory_check, "available_bytes", lambda: 24 << 30)
    memory_check.check_fits(memory_check.cora_training_bytes(256, 4096, 16, 32), "CoRA", "x")
    needed = memory_check.cora_training_bytes(256, 4096, 4096, 32)
    assert needed == 16 * (2 * 256 * 4096 * 4096 + 32 * 4 * 4096 * 4096)
    with pytest.raises(RunConfigError, match=r"CoRA at --rank 4096 needs about 1[0-9]{2}\.\d GiB"):
        memory_check.check_fits(needed, "CoRA at --rank 4096", "lower --rank")


def test_an_allocation_the_machine_refuses_is_one_line(env, tmp_path):
    def limited():
        _default_sigint()
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GiB of address space

    # a tiny LLM of hidden 8192 in 2 layers (~6 GiB): within the free memory the size check
    # reads, far beyond the 3 GiB of address space this process may have
    out = tmp_path / "big"
    rc, err = run_subprocess([*env["train"], "--out", out, "--tiny-hidden", "8192",
                              "--tiny-layers", "2"], preexec=limited)  # fmt: skip
    assert rc == 1
    line = one_error_line(err)
    assert "out of memory" in line and "lower --rank" in line, line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 6. long inputs: the length rule is applied when the data is read


def _long_title_data(env, root: Path, length: int) -> Path:
    import shutil

    import pandas as pd

    data = root / "long"
    shutil.copytree(env["data"], data)
    for split in ("train", "valid", "valid_small", "test"):
        frame = pd.read_csv(data / f"{split}.csv", keep_default_na=False)
        frame["title"] = ["Long " * (length // 5) + str(i) for i in frame["iid"]]
        frame.to_csv(data / f"{split}.csv", index=False)
    return data


def test_long_titles_are_cut_when_the_data_is_read(env, tmp_path):
    from llmrec.data import load_data
    from llmrec.data.loader import MAX_TITLE_CHARS

    data = load_data(_long_title_data(env, tmp_path, 10_000))
    for split in ("train", "test"):
        titles = data[split]["title"]
        assert titles.str.len().max() == MAX_TITLE_CHARS
        his = [t for ts in data[split]["his_title"] for t in ts]
        assert max(map(len, his)) <= MAX_TITLE_CHARS
    assert data["train"]["his"].map(len).sum() > 0  # histories (the CF slots) kept whole


@pytest.mark.parametrize("method", ["collm", "cora"])
def test_a_10000_character_title_trains_and_evaluates(env, tmp_path, capsys, method):
    data = _long_title_data(env, tmp_path, 10_000)
    out = tmp_path / method
    argv = ["train", "--method", method, "--data", data, "--cf", env["mf"], "--out", out,
            "--epochs", "1", "--max-steps", "2", "--max-train-rows", "32", "--max-valid-rows",
            "16", "--max-test-rows", "16", "--tiny-hidden", "32", "--tiny-layers", "1",
            "--tiny-heads", "2", "--tiny-kv-heads", "1", "--tiny-vocab", "400", "--backend",
            "torch", "--no-progress"]  # fmt: skip
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    rc, err = cli(["evaluate", "--run", out, "--rows", "all", "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads((out / "eval_test.json").read_text())["test"]["auc"] is not None


def test_a_failed_start_never_removes_a_folder_another_live_run_holds(tmp_path):
    from llmrec.output_guard import remove_if_unmade
    from llmrec.run_store import RunLock

    out = tmp_path / "new"
    lock = RunLock(out)  # a second process that raced into the same new --out
    try:
        assert remove_if_unmade(out) is False and out.is_dir()
    finally:
        lock.release()
    assert remove_if_unmade(out) is True and not out.exists()
