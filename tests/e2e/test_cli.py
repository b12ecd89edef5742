"""The ``llmrec`` CLI: --help, make-data, train-cf, train, evaluate, files, input errors."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from llmrec.cf import save_cf_embeddings
from llmrec.cli import main

TINY_ARGS = [
    "--rank", "4",
    "--alpha", "8",
    "--generator", "mlp",
    "--max-his", "3",
    "--tiny-hidden", "32",
    "--tiny-layers", "1",
    "--tiny-heads", "2",
    "--tiny-kv-heads", "1",
    "--tiny-vocab", "512",
    "--backend", "torch",
    "--batch-size", "16",
    "--eval-batch-size", "128",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def cf_run(tmp_path_factory):
    """make-data (CSV) then train-cf MF on it, with a predictions file."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    assert main(["make-data", "--out", str(data), "--format", "csv", "--users", "80",
                 "--items", "60", "--per-user", "25"]) == 0  # fmt: skip
    out = root / "mf"
    rc = main(["train-cf", "--model", "mf", "--data", str(data), "--out", str(out), "--dim", "16",
               "--lr", "1e-2", "--epochs", "30", "--predictions", str(out / "pred.csv"),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    return root, data, out


@pytest.mark.parametrize("command", [None, "train-cf", "train", "evaluate", "make-data"])
def test_help(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: llmrec" in text
    expected = {
        None: ["train-cf", "train", "evaluate"],
        "train-cf": ["--model", "--data", "--out", "--predictions"],
        "train": ["--method", "--cf", "--llm", "--resume", "--max-steps", "--max-train-rows"],
        "evaluate": ["--run", "--split"],
        "make-data": ["--format"],
    }[command]
    for word in expected:
        assert word in text


def test_console_script_entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "llmrec")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "llmrec.cli"]
    proc = subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--method" in proc.stdout


def test_train_cf_writes_metrics_predictions_embeddings(cf_run):
    _, data, out = cf_run
    m = json.loads((out / "metrics.json").read_text())
    test = m["test"]
    for key in ("auc", "uauc", "warm", "cold"):
        assert key in test
    assert {"auc", "uauc"} <= set(test["warm"]) and {"auc", "uauc"} <= set(test["cold"])
    assert test["auc"] > 0.7, "MF learns the synthetic factors"
    assert m["config"]["model"] == "mf" and m["wall_time_s"] > 0
    pred = pd.read_csv(out / "pred.csv")
    assert list(pred.columns) == ["uid", "iid", "label", "score"]
    assert len(pred) == len(pd.read_csv(data / "test.csv"))
    assert (out / "embeddings.safetensors").exists() and (out / "model.safetensors").exists()
    # evaluate reproduces the test metrics from the run directory
    assert main(["evaluate", "--run", str(out), "--data", str(data), "--no-progress"]) == 0
    ev = json.loads((out / "eval_test.json").read_text())
    assert ev["test"]["auc"] == pytest.approx(test["auc"], abs=1e-9)


def test_train_cora_cli_then_evaluate_and_resume(cf_run, capsys):
    root, data, cf = cf_run
    out = root / "cora"
    argv = ["train", "--method", "cora", "--llm", "tiny", "--data", str(data), "--cf", str(cf),
            "--out", str(out), "--epochs", "1", "--max-steps", "6", "--max-train-rows", "400",
            "--predictions", str(out / "pred.csv"), *TINY_ARGS]  # fmt: skip
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["steps"] == 6
    assert {"auc", "uauc", "warm", "cold"} <= set(m["test"])
    assert m["config"]["method"] == "cora" and m["wall_time_s"] > 0
    assert "test AUC" in capsys.readouterr().err
    pred = pd.read_csv(out / "pred.csv")
    assert list(pred.columns) == ["uid", "iid", "label", "score"]
    assert len(pred) == len(pd.read_csv(data / "test.csv"))
    for f in ("run.json", "best.safetensors", "llm/tokenizer.json", "checkpoints/latest"):
        assert (out / f).exists(), f
    # evaluate rebuilds the run (tiny LLM from OUT/llm, CF, best state) and agrees
    assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    ev = json.loads((out / "eval_test.json").read_text())
    assert ev["test"]["auc"] == pytest.approx(m["test"]["auc"], abs=1e-6)
    # without --resume a finished run is not overwritten; with it nothing is retrained
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["train"]["steps"] == 6
    assert again["test"]["auc"] == pytest.approx(m["test"]["auc"], abs=1e-6)
    # a larger budget continues the run from its last checkpoint
    more = [*argv, "--resume", "--max-steps", "9"]
    assert main(more) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 9
    # one record per optimizer step across the three calls, each step once, and the evaluations
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, 10))
    assert all(r["tokens_per_s"] > 0 and r["memory_bytes"] > 0 for r in log if r["kind"] == "step")
    assert [r["step"] for r in log if r["kind"] == "eval"] == [6, 9]
    # options that change the data order cannot change on resume
    assert main([*more, "--batch-size", "8"]) == 2
    assert "train.batch_size: 16 -> 8" in capsys.readouterr().err


def test_default_data_is_the_embedded_synthetic_set(tmp_path):
    out = tmp_path / "mf"
    assert main(["train-cf", "--out", str(out), "--epochs", "3", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["source"] == "synthetic" and m["test"]["rows"] > 0


def test_input_errors_exit_2_before_training(cf_run, tmp_path, capsys):
    _, data, _ = cf_run
    # CF embeddings for another dataset
    save_cf_embeddings(
        tmp_path / "cf" / "embeddings.safetensors", torch.randn(5, 4), torch.randn(7, 4), "mf"
    )
    out = tmp_path / "run"
    rc = main(
        ["train", "--data", str(data), "--cf", str(tmp_path / "cf"), "--out", str(out), *TINY_ARGS]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "user_emb has 5 rows" in err
    assert not (out / "checkpoints").exists()
    # an LLM directory without a tokenizer
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--llm",
            str(tmp_path / "llm"),
            "--out",
            str(out),
            *TINY_ARGS,
        ]
    )
    assert rc == 2 and "no tokenizer found" in capsys.readouterr().err
    # a data file that breaks the schema names the file and the row
    bad = pd.read_csv(data / "valid.csv")
    bad.loc[2, "uid"] = -1
    (tmp_path / "bad").mkdir()
    for split in ("train", "test"):
        (tmp_path / "bad" / f"{split}.csv").write_text((data / f"{split}.csv").read_text())
    bad.to_csv(tmp_path / "bad" / "valid.csv", index=False)
    rc = main(["train-cf", "--data", str(tmp_path / "bad"), "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "valid.csv: row 2 (file line 4): uid id -1 is out of range" in capsys.readouterr().err


def test_tiny_seed_draws_another_llm_on_the_same_rows(tmp_path):
    """``--tiny-seed`` changes the random tiny LLM and nothing else; by default it is --seed."""
    from safetensors.torch import load_file
    from tiny_cli import TINY_LLM, synthetic_data

    data = synthetic_data(tmp_path)
    common = ["train", "--method", "frozen", "--data", str(data), "--max-test-rows", "12",
              "--max-valid-rows", "8", "--tiny-layers", "1", *TINY_LLM]  # fmt: skip
    draws = {
        "default": ([], 0),
        "zero": (["--tiny-seed", "0"], 0),
        "one": (["--tiny-seed", "1"], 1),
    }
    weights, tests = {}, {}
    for name, (extra, seed) in draws.items():
        out = tmp_path / name
        assert main([*common, "--out", str(out), *extra]) == 0
        assert json.loads((out / "run.json").read_text())["config"]["tiny_seed"] == seed
        weights[name] = load_file(str(out / "llm" / "model.safetensors"))
        tests[name] = json.loads((out / "metrics.json").read_text())["test"]
    assert all(torch.equal(weights["default"][k], weights["zero"][k]) for k in weights["zero"])
    assert any(not torch.equal(weights["default"][k], weights["one"][k]) for k in weights["one"])
    # the same rows scored, by another LLM
    assert tests["default"]["rows"] == tests["one"]["rows"] == 12
    assert tests["default"]["auc"] == tests["zero"]["auc"] != tests["one"]["auc"]


def test_tensorboard_without_the_package_is_one_line_before_anything(
    cf_run, tmp_path, capsys, monkeypatch
):
    _, data, cf = cf_run
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--cf", str(cf), "--out", str(out), "--tensorboard",
            *TINY_ARGS]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard needs the tensorboard package" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, choices",
    [
        ("--collm-tuning", {"two-step", "one-step"}),
        ("--allmrec-text-encoder", {"sbert", "random"}),
        ("--allmrec-aligner", {"reference", "mlp"}),
        ("--allmrec-projection", {"reference", "mlp"}),
        ("--allmrec-stage1-rows", {"labels", "next_item"}),
    ],
)
def test_method_flags_of_a_fixed_set_list_their_choices(flag, choices, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert f"{flag} {{" in help_text
    listed = help_text.split(f"{flag} {{", 1)[1].split("}", 1)[0]
    assert set(listed.split(",")) == choices
    # a value outside the set stops at the command line, before anything is read
    with pytest.raises(SystemExit) as stop:
        main(["train", "--out", str(tmp_path / "run"), flag, "bogus"])
    assert stop.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "kill") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_while_a_failure_is_handled_keeps_the_one_line_error(cf_run, monkeypatch, capsys):
    """Under torchrun a surviving rank meets its dead peer's error and, a moment later,
    torchrun's SIGTERM: arriving while the first failure is classified, the signal must not
    replace the one-line message with a traceback (tests/e2e/test_ddp.py met it once)."""
    import signal

    import llmrec.cli as cli

    _, _, mf = cf_run

    def peer_failed(args):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")

    def sigterm_then_no(exc):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode
        return False

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "_cmd_compare", peer_failed)
    monkeypatch.setattr(cli, "_is_out_of_memory", sigterm_then_no)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["compare", str(mf)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    assert len(err) == 1 and err[0].startswith("llmrec compare: error: another process of this "
                                               "torchrun job failed"), err  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller
