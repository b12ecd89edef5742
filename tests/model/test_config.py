"""Every option of ``llmrec train`` is defined once, as a dataclass field (issue 26).

The flags are generated from :mod:`llmrec.config` and the methods' ``Options``; these tests
read the generated parser and the built configs, never a hand-kept list of flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec.cli import build_parser, train_config
from llmrec.command_options import InputCheckOptions
from llmrec.config import RunConfig, TrainConfig, resume_keys
from llmrec.method import available_methods, parse_options, resume_options

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*extra) -> RunConfig:
    return train_config(build_parser("train").parse_args(["train", "--out", "x", *extra]))


def _train_parser():
    parser = build_parser("train")
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_train_flag_comes_from_one_dataclass_field():
    by_dest = {}
    for action in _train_parser()._actions:
        for flag in action.option_strings:
            by_dest.setdefault(action.dest, []).append(flag)
    # the subcommand's own selectors, then fields: run./train./tiny., a method's option, or
    # the input check every command that reads a run shares (InputCheckOptions: it belongs
    # to the command, not to the run it reads)
    hand_written = {"help", "method", "preset", "method_flags"}
    shared = {f.name for f in dataclasses.fields(InputCheckOptions)}
    for dest in by_dest:
        assert (
            dest in hand_written
            or dest in shared
            or dest.split(".")[0] in ("run", "train", "tiny")
            or (dest.startswith("method:"))
        ), dest
    assert shared <= set(by_dest)
    fields = {f"run.{f.name}" for f in dataclasses.fields(RunConfig)}
    fields |= {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}
    assert {d for d in by_dest if d.startswith(("run.", "train."))} <= fields
    flags = [f for fl in by_dest.values() for f in fl]
    assert len(flags) == len(set(flags))  # no flag defined twice


def test_help_shows_what_each_preset_trains_with():
    actions = {a.option_strings[0]: a for a in _train_parser()._actions if a.option_strings}
    assert "paper: 0.001" in actions["--lr"].help and "fast: 0.0001" in actions["--lr"].help
    # the paper preset is the default, and is what trains without flags
    assert _cfg().train.lr == 1e-3 and _cfg("--preset", "fast").train.lr == 1e-4


def test_backend_sets_only_the_methods_that_have_it():
    assert parse_options(available_methods()["collm"], _cfg("--method", "collm",
                         "--backend", "torch")).backend == "torch"  # fmt: skip
    frozen = _cfg("--method", "frozen", "--backend", "torch")
    assert frozen.method_kwargs == {}  # the zero-shot baseline has no backend: left alone
    # a method's own prefixed flag is refused for another method
    with pytest.raises(SystemExit, match="applies to --method collm only"):
        _cfg("--method", "cora", "--collm-lora-rank", "4")


def test_cora_options_are_coras_own_and_distinct_from_collms_lora_rank():
    cfg = _cfg("--rank", "4", "--alpha", "8", "--generator", "mlp", "--no-fuse-qkv")
    assert not hasattr(cfg, "rank")  # no method option on the run config
    opts = parse_options(available_methods()["cora"], cfg)
    assert (opts.rank, opts.alpha, opts.generator, opts.fuse_qkv) == (4, 8.0, "mlp", False)
    collm = parse_options(available_methods()["collm"], _cfg("--method", "collm", "--rank", "4"))
    assert collm.lora_rank == 8  # CoRA's --rank is not CoLLM's LoRA rank


def test_resume_keys_come_from_field_metadata():
    keys = set(resume_keys(RunConfig))
    assert {"method", "data", "llm", "max_his", "max_length", "tiny", "tiny_seed"} <= keys
    assert {"train.batch_size", "train.seed", "train.group_by_length"} <= keys
    assert not {"out", "device", "resume", "force", "train.lr", "max_test_rows"} & keys
    # a method's options must match, except those declared free (the kernel backend)
    cora = available_methods()["cora"]
    must = resume_options(cora, _cfg("--rank", "4").to_dict())
    assert must["rank"] == 4 and "backend" not in must and "fuse_qkv" not in must


def test_a_run_json_from_before_the_split_still_reads_its_cora_options():
    old = {"method": "cora", "rank": 4, "alpha": 8.0, "generator": "mlp", "backend": "torch",
           "method_kwargs": {}, "train": {"lr": 1e-3}}  # fmt: skip
    opts = parse_options(available_methods()["cora"], RunConfig.from_dict(old))
    assert (opts.rank, opts.alpha, opts.generator, opts.backend) == (4, 8.0, "mlp", "torch")


def test_llmrec_help_imports_neither_torch_nor_sklearn():
    code = (
        "import sys, contextlib, io\n"
        "from llmrec.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'sklearn', 'transformers'))))\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    "argv",
    [
        # README quickstart and tutorial command lines (flags only; nothing trains)
        ["--method", "cora", "--cf", "runs/mf", "--llm", "tiny", "--data", "D", "--out", "o",
         "--max-train-rows", "4000", "--max-valid-rows", "1000", "--epochs", "1",
         "--batch-size", "16", "--lr", "1e-3"],
        ["--method", "collm", "--cf", "runs/mf", "--data", "D", "--out", "o", "--epochs", "1",
         "--batch-size", "16", "--lr", "1e-3", "--method-kwargs", '{"tuning": "two-step"}'],
        ["--method", "allmrec", "--cf", "runs/mf", "--data", "D", "--out", "o",
         "--method-kwargs", '{"valid_episodes": 50}', "--allmrec-generate", "false"],
        ["--method", "cora", "--preset", "fast", "--rank", "4", "--alpha", "8", "--generator",
         "mlp", "--generator-kwargs", '{"mlp_hidden": 32}', "--target-modules",
         "q_proj,v_proj", "--no-fuse-qkv", "--backend", "torch", "--cora-lora-dropout", "0.1",
         "--tiny-hidden", "16", "--tiny-heads", "2", "--tiny-kv-heads", "1", "--out", "o"],
        ["--method", "collm", "--collm-lora-from", "runs/t", "--collm-lora-rank", "4",
         "--backend", "torch", "--out", "o"],
    ],
)  # fmt: skip
def test_existing_command_lines_still_parse(argv):
    cfg = train_config(build_parser("train").parse_args(["train", *argv]))
    parse_options(available_methods()[cfg.method], cfg)  # and the method reads its options
    assert cfg.method == argv[1] and cfg.out == os.path.abspath("o")


def test_cora_target_modules_take_auto_and_refuse_projections_cora_cannot_patch(capsys):
    opts = parse_options(available_methods()["cora"], _cfg("--target-modules", "auto"))
    assert opts.target_modules == ["auto"]
    fused = parse_options(available_methods()["cora"], _cfg("--target-modules", "qkv_proj,o_proj"))
    assert fused.target_modules == ["qkv_proj", "o_proj"]
    for bad, why in (("down_proj", "MLP width"), ("auto,q_proj", "stands alone"), ("", "")):
        with pytest.raises(SystemExit):
            _cfg("--target-modules", bad)
        assert why in capsys.readouterr().err


def test_llm_keeps_a_hub_id_as_given_and_makes_a_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cfg("--llm", "HuggingFaceTB/SmolLM2-135M").llm == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "org" / "model").mkdir(parents=True)  # a local folder that looks like an ID
    assert _cfg("--llm", "org/model").llm == str(tmp_path / "org" / "model")
    assert _cfg("--llm", "smollm2").llm == "smollm2"


def test_runs_written_before_answer_score_keep_the_yes_logit_and_cannot_resume_as_yes_no(
    tmp_path,
):
    from llmrec.errors import RunConfigError
    from llmrec.run_store import check_resume_config

    new = RunConfig(out=str(tmp_path))
    assert new.answer_score == "yes-no" and "answer_score" in resume_keys(RunConfig)
    old = new.to_dict()
    del old["answer_score"]  # a run.json from before the option
    assert RunConfig.from_dict(old).answer_score == "yes"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-1")
    (tmp_path / "run.json").write_text(json.dumps({"kind": "llm", "config": old}))
    new.resume = True
    with pytest.raises(RunConfigError, match="answer_score: 'yes' -> 'yes-no'"):
        check_resume_config(new, tmp_path)
    new.answer_score = "yes"
    check_resume_config(new, tmp_path)


@pytest.mark.parametrize("command", ["evaluate", "recommend", "export", "make-data"])
def test_every_flag_of_the_option_commands_comes_from_one_dataclass_field(command):
    from llmrec.cli_options import flag_of
    from llmrec.command_options import COMMAND_OPTIONS

    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    cls = COMMAND_OPTIONS[command]
    hints = __import__("typing").get_type_hints(cls)
    declared = {flag_of(f, hints[f.name]): f.name for f in dataclasses.fields(cls)}
    for action in sub._actions:
        if action.dest == "help":
            continue
        if not action.option_strings:  # export's RUN and DIR: fields the parser fills
            assert cls.__dataclass_fields__[action.dest].metadata["cli"] is False
            continue
        (flag,) = action.option_strings
        assert declared.get(flag) == action.dest, flag


def test_command_defaults_are_the_dataclass_defaults_and_reach_args(tmp_path):
    from llmrec.command_options import EvaluateOptions, command_options
    from llmrec.llm_training import run_evaluation
    from llmrec.scoring_parts import DEFAULT_CHUNK_ROWS

    args = build_parser("evaluate").parse_args(["evaluate", "--run", "r", "--data", "d"])
    opts = command_options(args)
    assert opts == EvaluateOptions(run="r", data=os.path.abspath("d"))
    # the chunk size a later --resume must find is the one default of the scoring layer
    default = inspect_default(run_evaluation, "chunk_rows")
    assert opts.chunk_rows == DEFAULT_CHUNK_ROWS == default
    # the output and input checks read args: every field is there, flags given or not
    assert args.predictions is None and args.progress is True and args.part is None
    args = build_parser("evaluate").parse_args(
        ["evaluate", "--run", "r", "--part", "2/3", "--no-progress", "--chunk-rows", "64"]
    )
    opts = command_options(args)
    assert (opts.part, opts.progress, opts.chunk_rows) == ((2, 3), False, 64)
    args = build_parser("export").parse_args(["export", "runA", "out", "--state", "s.st"])
    opts = command_options(args)
    assert (opts.run, opts.dir, opts.state, opts.device) == (
        "runA", "out", os.path.abspath("s.st"), "cpu",
    )  # fmt: skip


def inspect_default(fn, name):
    import inspect

    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--run", "r", "--part", "0/2"],
        ["evaluate", "--run", "r", "--chunk-rows", "0"],
        ["recommend", "--run", "r", "--retrieve", "-1"],
        ["recommend", "--run", "r", "--retrieve", "5", "--full-users", "-1"],
        ["recommend", "--run", "r", "--retrieve", "5", "--index", "flat"],
        ["export", "r"],
    ],
)
def test_bad_command_flags_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser(argv[0]).parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "-1", "must be > 0, got -1"),
        ("--lr", "0", "must be > 0, got 0"),
        ("--lr", "inf", "must be a finite number, got inf"),
        ("--lr", "nan", "must be a finite number, got nan"),
        ("--lr", "fast", "expected a number, got 'fast'"),
    ],
)
def test_a_bad_number_says_which_values_are_allowed(flag, value, message, capsys):
    """An unbounded range names its one bound: "(0, inf]" read as if inf were allowed."""
    with pytest.raises(SystemExit) as exc:
        build_parser("train").parse_args(["train", "--out", "x", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "inf]" not in err
