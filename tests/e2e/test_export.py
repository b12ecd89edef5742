"""The adapter format (issue 28 item 2): ``llmrec export``, ``from_pretrained`` bit for bit,
refused folders, and run folders that survive a move.

The reference for every score is the run itself: :func:`llmrec.llm_training.reopen_run`
rebuilds the run from its own files (``run.json``, ``best.safetensors``, the tiny LLM it
saved), and its model scores the test rows. The adapter path shares none of that: a fresh
base model loaded from the saved LLM folder, the method rebuilt from
``adapter_config.json`` and the tensors read from ``adapter_model.safetensors``. The scores
must be equal bit for bit (same CPU, same kernels, same weights: no tolerance applies).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_cli import synthetic_data, train_tiny

from llmrec.cli import main

CORA = ["--rank", "4", "--generator", "mlp", "--max-his", "3", "--max-steps", "3"]
# TALLRec scores the "Yes" logit alone: the adapter must carry the score it was trained on
OTHERS = {"tallrec": ["--max-his", "3", "--max-steps", "3", "--answer-score", "yes"],
          "collm": ["--max-his", "3", "--max-steps", "2", "--collm-tuning", "one-step"]}  # fmt: skip


def cli(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dataset and a tiny CoRA, TALLRec and CoLLM run on it (a few steps each)."""
    root = tmp_path_factory.mktemp("export")
    data = synthetic_data(root)
    out = {"root": root, "data": data}
    out["cora"] = train_tiny("cora", data, root / "cora", *CORA)
    for method, extra in OTHERS.items():
        out[method] = train_tiny(method, data, root / method, *extra)
    return out


def run_scores(run_dir: Path):
    """``(test batch, scores)`` of the run reopened from its own files (the reference)."""
    from llmrec.llm_training import reopen_run

    run = reopen_run(run_dir, device="cpu", progress=False)
    df = run.method.eval_rows(run.ctx, "test")
    source = run.method.source(run.ctx, df)
    batch = source(range(len(df)))
    run.model.eval()
    with torch.no_grad():
        return batch, run.model.score(batch), run.ctx


def fresh_base(run_dir: Path):
    """The run's tiny LLM loaded anew from its folder: an unpatched base model."""
    from llmrec.tiny_llm import load_llm

    return load_llm(run_dir / "llm")


@pytest.mark.parametrize("method", ["cora", "tallrec", "collm"])
def test_export_then_from_pretrained_scores_bit_for_bit(runs, method, tmp_path, capsys):
    import llmrec

    run_dir = runs[method]
    batch, want, ctx = run_scores(run_dir)
    rc, err = cli(["export", run_dir, tmp_path / "adapter"], capsys)
    assert rc == 0, err
    folder = tmp_path / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["method"] == method and config["base_model"]["hidden_size"] == 32
    assert config["base_model"]["weights_sha256"]  # the tiny LLM's weights identify it
    if method != "tallrec":
        assert config["cf_dim"] == ctx.cf_dim > 0 and config["cf"]["sha256"]
    assert config["answer_score"] == ("yes" if method == "tallrec" else "yes-no")
    base, tokenizer = fresh_base(run_dir)
    with torch.no_grad():
        untrained = fresh_base(run_dir)[0]
    model = llmrec.from_pretrained(
        base, folder, tokenizer, user_table=ctx.user_table, item_table=ctx.item_table
    )
    with torch.no_grad():
        got = model.score(batch)
    assert got.dtype == want.dtype and torch.equal(got, want)
    # the adapter's tensors are the run's best state, each one exactly
    from safetensors.torch import load_file

    best = load_file(str(run_dir / "best.safetensors"))
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert best.keys() == adapter.keys()
    assert all(torch.equal(best[k], adapter[k]) for k in best)
    # and they matter: the same base model without them scores otherwise
    from llmrec.llm import answer_logit, decoder_body

    with torch.no_grad():
        out = decoder_body(untrained)(  # CoLLM's slot sentinels (< 0) read as token 0
            input_ids=batch["input_ids"].clamp_min(0), attention_mask=batch["attention_mask"]
        )
        plain = answer_logit(untrained, out.last_hidden_state[:, -1], model.yes_token_id)
    assert not torch.equal(plain, got)


def test_save_pretrained_round_trip_in_python(runs, tmp_path):
    """The Python API alone: save a reopened run's model, load it on a fresh base."""
    import llmrec
    from llmrec.llm_training import reopen_run

    run_dir = runs["cora"]
    run = reopen_run(run_dir, device="cpu", progress=False)
    llmrec.save_pretrained(run.model, tmp_path / "a", method="cora", options=run.opts)
    batch, want, _ = run_scores(run_dir)
    base, tok = fresh_base(run_dir)
    model = llmrec.from_pretrained(base, tmp_path / "a", tok)
    with torch.no_grad():
        assert torch.equal(model.score(batch), want)
    # the reopened run saves itself with its base model's and CF records
    llmrec.save_run_adapter(run, tmp_path / "b")
    # options the method does not take, or an unknown method: refused before any writing
    from llmrec.errors import LLMRecError

    for method, options in (("cora", {"ranks": 4}), ("lora9", {})):
        with pytest.raises(LLMRecError, match=r"ranks|unknown method"):
            llmrec.save_pretrained(run.model, tmp_path / "c", method=method, options=options)
        assert not (tmp_path / "c").exists()
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["base_model"]["weights_sha256"] and config["cf"]["sha256"]
    assert (
        config["tensors"]
        == json.loads((tmp_path / "a" / "adapter_config.json").read_text())["tensors"]
    )


def test_export_refuses_occupied_or_protected_folders(runs, tmp_path, capsys):
    run_dir, data = runs["cora"], runs["data"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    cases = [
        (["export", run_dir, busy], "not an adapter folder"),
        (["export", run_dir, busy, "--force"], "not an adapter folder"),
        (["export", run_dir, run_dir / "adapter"], "inside the run"),
        (["export", run_dir, data / "adapter"], "inside the dataset"),
        (["export", run_dir, runs["tallrec"]], "run directory"),
        (["export", runs["root"] / "nowhere", tmp_path / "x"], "no run.json"),
    ]
    for argv, words in cases:
        rc, err = cli(argv, capsys)
        assert rc == 2, argv
        assert words in one_error_line(err), err
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    assert not (run_dir / "adapter").exists() and not (data / "adapter").exists()
    assert not (tmp_path / "x").exists()
    # an adapter folder is replaced only with --force
    assert cli(["export", run_dir, tmp_path / "a"], capsys)[0] == 0
    rc, err = cli(["export", run_dir, tmp_path / "a"], capsys)
    assert rc == 2 and "--force" in one_error_line(err)
    assert cli(["export", run_dir, tmp_path / "a", "--force"], capsys)[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


@pytest.fixture
def exported(runs, tmp_path, capsys):
    folder = tmp_path / "adapter"
    assert cli(["export", runs["cora"], folder], capsys)[0] == 0
    return folder


def _edit(folder: Path, change) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c.pop("method"), "missing keys ['method']"),
        (lambda c: c.update(method="lora9"), "unknown method 'lora9'"),
        (lambda c: c.update(extra=1), "unknown keys ['extra']"),
        (lambda c: c.update(format_version=7), "format_version 7"),
        (lambda c: c["options"].update(rank=8), "options edited?"),
        (lambda c: c["options"].update(ranks=8), "not options of 'cora'"),
        (lambda c: c["base_model"].update(hidden_size=64), "hidden_size 32"),
        (lambda c: c.update(cf_dim=c["cf_dim"] + 1), "options edited?"),
        (lambda c: c.update(weights_sha256="0" * 64), "weights_sha256 differs"),
        (lambda c: c.update(answer_score="maybe"), "answer_score must be one of"),
        (lambda c: c["tensors"].popitem(), "tensors differ"),
        (lambda c: c["tensors"][next(iter(c["tensors"]))].update(shape=[1]), "lists [1]"),
    ],
)
def test_edited_config_is_refused_in_one_line(runs, exported, change, words):
    import llmrec
    from llmrec.errors import AdapterError

    _edit(exported, change)
    base, tok = fresh_base(runs["cora"])
    with pytest.raises(AdapterError) as exc:
        llmrec.from_pretrained(base, exported, tok)
    message = str(exc.value)
    assert "\n" not in message and words in message, message


def test_corrupt_or_missing_files_and_wrong_inputs_are_refused(runs, exported, tmp_path):
    import llmrec
    from llmrec.errors import AdapterError

    base, tok = fresh_base(runs["cora"])
    weights = exported / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="checksum mismatch"):
        llmrec.from_pretrained(base, exported, tok)
    weights.unlink()
    with pytest.raises(AdapterError, match="file not found"):
        llmrec.from_pretrained(base, exported, tok)
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        llmrec.from_pretrained(base, tmp_path / "nothing", tok)
    (exported / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not readable JSON"):
        llmrec.from_pretrained(base, exported, tok)


def test_wrong_base_or_cf_dims_are_refused(runs, tmp_path, capsys):
    import llmrec
    from llmrec.errors import AdapterError

    folder = tmp_path / "a"
    assert cli(["export", runs["cora"], folder], capsys)[0] == 0
    base, tok = fresh_base(runs["cora"])
    cf_dim = json.loads((folder / "adapter_config.json").read_text())["cf_dim"]
    with pytest.raises(AdapterError, match=f"CF embeddings of size {cf_dim}"):
        llmrec.from_pretrained(base, folder, tok, user_table=torch.zeros(5, cf_dim + 1))
    with pytest.raises(AdapterError, match="the base model is bfloat16"):
        llmrec.from_pretrained(base.to(torch.bfloat16), folder, tok)
    base, tok = fresh_base(runs["cora"])
    llmrec.from_pretrained(base, folder, tok)
    with pytest.raises(AdapterError, match="already patched"):  # patched by the call before
        llmrec.from_pretrained(base, folder, tok)
    other, tok2 = fresh_base(runs["tallrec"])  # another tiny LLM of the same sizes
    other.config.num_hidden_layers = 3
    with pytest.raises(AdapterError, match="num_hidden_layers 3"):
        llmrec.from_pretrained(other, folder, tok2)


# ---------------------------------------------------------------------------------------------
# run folders that survive a move


def test_a_moved_run_folder_still_evaluates_the_same(tmp_path, capsys):
    """Data, a CF run and an LLM run side by side; their parent folder moves; ``llmrec
    evaluate`` of the moved run finds everything and writes the same predictions."""
    root = tmp_path / "project"
    data = synthetic_data(root)
    mf = root / "mf"
    assert cli(["train-cf", "--data", data, "--out", mf, "--dim", "8", "--epochs", "2",
                "--no-progress"], capsys)[0] == 0  # fmt: skip
    run = train_tiny("cora", data, root / "cora", "--cf", str(mf), *CORA)
    rc, err = cli(["evaluate", "--run", run, "--predictions", tmp_path / "before.csv",
                   "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, err
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["data"] == "../d" and info["cf_path"] == "../mf"
    assert info["config"]["out"] == "."
    assert all(not Path(p).is_absolute() for files in info["inputs"].values() for p in files)
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert not root.exists()
    rc, err = cli(["evaluate", "--run", moved / "cora", "--predictions", tmp_path / "after.csv",
                   "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, err
    before, after = pd.read_csv(tmp_path / "before.csv"), pd.read_csv(tmp_path / "after.csv")
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    # and so does the CF run, and an export of the moved run
    assert cli(["evaluate", "--run", moved / "mf", "--no-progress"], capsys)[0] == 0
    assert cli(["export", moved / "cora", tmp_path / "adapter"], capsys)[0] == 0
    # the run folder moved alone: its inputs stayed where the run was written, found there
    moved.rename(root)
    alone = tmp_path / "alone"
    shutil.move(str(root / "cora"), alone)
    rc, err = cli(["evaluate", "--run", alone, "--predictions", tmp_path / "alone.csv",
                   "--no-progress"], capsys)  # fmt: skip
    assert rc == 0, err
    pd.testing.assert_frame_equal(before, pd.read_csv(tmp_path / "alone.csv"), check_exact=True)


def test_a_run_with_absolute_paths_still_loads(runs, tmp_path, capsys):
    """A run.json written before paths were relative (absolute everywhere) reads as before."""
    from llmrec.run_store import read_run_info

    run = tmp_path / "old"
    shutil.copytree(runs["tallrec"], run)
    now = read_run_info(run)  # absolute, as older versions wrote them
    old = json.loads((run / "run.json").read_text())
    old.pop("written_in")
    old["config"], old["inputs"] = now["config"], now["inputs"]
    (run / "run.json").write_text(json.dumps(old))
    assert read_run_info(run)["config"]["data"] == str(runs["data"])
    rc, err = cli(["evaluate", "--run", run, "--no-progress"], capsys)
    assert rc == 0, err


def test_allmrec_round_trip_needs_its_data_and_tables(tmp_path, capsys):
    """A-LLMRec's model reads the CF item table and the training rows' statistics when it is
    built: rebuilt with them it scores every row as the run does; without them, one line."""
    import numpy as np

    import llmrec
    from llmrec.errors import AdapterError
    from llmrec.llm_training import reopen_run

    data = synthetic_data(tmp_path)
    kw = {"text_encoder": "random", "stage1_epochs": 1, "candidates": 4, "train_candidates": 3,
          "episodes": 4, "valid_episodes": 0, "generate": False, "latent_dim": 8,
          "ae_hidden": 8}  # fmt: skip
    run_dir = train_tiny("allmrec", data, tmp_path / "allm", "--batch-size", "8",
                         "--max-train-rows", "24", "--max-test-rows", "12",
                         "--method-kwargs", json.dumps(kw))  # fmt: skip
    assert cli(["export", run_dir, tmp_path / "adapter"], capsys)[0] == 0
    run = reopen_run(run_dir, device="cpu", progress=False)
    ctx, df = run.ctx, run.method.eval_rows(run.ctx, "test")
    _, want = run.method.evaluate(ctx, run.model, run.opts, df, run.predict, full=False)
    base, tok = fresh_base(run_dir)
    with pytest.raises(AdapterError, match="data="):
        llmrec.from_pretrained(base, tmp_path / "adapter", tok)
    base, tok = fresh_base(run_dir)
    model = llmrec.from_pretrained(
        base, tmp_path / "adapter", tok, user_table=ctx.user_table,
        item_table=ctx.item_table, data=ctx.data,
    )  # fmt: skip
    _, got = run.method.evaluate(ctx, model, run.opts, df, run.predict, full=False)
    assert np.array_equal(got, want)


def test_allmrec_on_sasrec_exports_its_history_encoding(tmp_path, capsys):
    """An A-LLMRec run fed by a SASRec CF run reads each row's history through SASRec: its
    adapter records that, refuses a plain user table, and scores as the run does when
    given the SASRec run's user vectors."""
    import numpy as np

    import llmrec
    from llmrec.cf.cf_run import CFRunConfig, train_cf_run
    from llmrec.cf.user_vectors import load_user_vectors
    from llmrec.errors import AdapterError
    from llmrec.llm_training import reopen_run

    data = synthetic_data(tmp_path)
    sasrec = tmp_path / "sasrec"
    train_cf_run(CFRunConfig(model="sasrec", data=str(data), out=str(sasrec), dim=8, layers=1,
                             his_len=10, epochs=1, progress=False))  # fmt: skip
    kw = {"text_encoder": "random", "stage1_epochs": 1, "candidates": 4, "train_candidates": 3,
          "episodes": 4, "valid_episodes": 0, "generate": False, "latent_dim": 8,
          "ae_hidden": 8}  # fmt: skip
    run_dir = train_tiny("allmrec", data, tmp_path / "allm", "--batch-size", "8",
                         "--max-train-rows", "24", "--max-test-rows", "12", "--cf", str(sasrec),
                         "--method-kwargs", json.dumps(kw))  # fmt: skip
    assert cli(["export", run_dir, tmp_path / "adapter"], capsys)[0] == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["options"]["user_vectors"] == "history"
    run = reopen_run(run_dir, device="cpu", progress=False)
    ctx, df = run.ctx, run.method.eval_rows(run.ctx, "test")
    _, want = run.method.evaluate(ctx, run.model, run.opts, df, run.predict, full=False)
    base, tok = fresh_base(run_dir)
    with pytest.raises(AdapterError, match="user_table=UserVectors"):
        llmrec.from_pretrained(base, tmp_path / "adapter", tok, user_table=ctx.user_table,
                               item_table=ctx.item_table, data=ctx.data)  # fmt: skip
    base, tok = fresh_base(run_dir)
    users = load_user_vectors(sasrec, ctx.user_table, ctx.data)
    model = llmrec.from_pretrained(base, tmp_path / "adapter", tok, user_table=users,
                                   item_table=ctx.item_table, data=ctx.data)  # fmt: skip
    _, got = run.method.evaluate(ctx, model, run.opts, df, run.predict, full=False)
    assert np.array_equal(got, want)
