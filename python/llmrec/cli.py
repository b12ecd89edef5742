"""The ``llmrec`` command line: ``train-cf``, ``train``, ``evaluate``, ``make-data``,
``recommend`` (retrieve-then-score, :mod:`llmrec.retrieval`), ``compare`` (:mod:`llmrec.compare`).

Every subcommand writes a JSON metrics file (``test.auc``, ``test.uauc``, warm/cold blocks,
the run's config and its wall time) and, with ``--predictions PATH``, a CSV with one row
per test row (``uid, iid, label, score``). Without ``--data`` the embedded synthetic
dataset is used. Input errors (bad data, CF embeddings that do not match the data, an LLM
directory without a tokenizer, a checkpoint of another shape) are reported before any
training and exit with status 2. ``llmrec train`` runs under ``torchrun`` as well (DDP).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from llmrec.config import absolute_path as _abs

if TYPE_CHECKING:  # the CLI imports the model layer only for the command that runs
    from llmrec.cf.cf_run import CFRunConfig
from llmrec.errors import USER_ERRORS

__all__ = ["build_parser", "main"]


def _log(msg: str) -> None:
    print(f"[llmrec] {msg}", file=sys.stderr, flush=True)


_HELP = {
    "train-cf": "train a CF model (MF, LightGCN, SASRec) and export its embeddings",
    "train": "train an LLM method (CoRA) on top of a frozen LLM and CF embeddings",
    "evaluate": "score a split with a finished run (CF or LLM) and write its metrics",
    "recommend": "retrieve top-K items per user (Faiss over CF item embeddings), score only those",
    "make-data": "write the synthetic dataset (CoLLM schema) to a directory",
    "export": "write a run's best state as an adapter folder (adapter_config.json + safetensors)",
}


def _add_train_cf(sub) -> None:
    from llmrec.cf.cf_run import CFRunConfig
    from llmrec.cli_options import add_field_flags, show_value
    from llmrec.command_options import InputCheckOptions
    from llmrec.presets import DEFAULT_PRESET, PRESETS, preset_help

    p = sub.add_parser(
        "train-cf",
        help=_HELP["train-cf"],
        description="Train a CF model with BCE and early stopping on validation AUC; write "
        "OUT/embeddings.safetensors (user_emb, item_emb) for `llmrec train --cf OUT`, "
        "OUT/model.safetensors, OUT/run.json and OUT/metrics.json.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="the default of --dim, as under `llmrec train`: paper (256, CoLLM's ML-1M MF; "
        "default) or fast (64). --dim given explicitly wins.",
    )
    groups = {"run": p.add_argument_group("run"), None: p.add_argument_group("model")}

    def shown(name, default):
        if name == "dim":  # the preset's MF size (`llmrec train`'s cf_dim)
            return preset_help("cf_dim", default) or f"default {default}"
        return f"default {show_value(default, ',')}"

    add_field_flags(groups.get, CFRunConfig, "cf.", defaults=shown)
    add_field_flags(lambda _: groups["run"], InputCheckOptions, "")


def _add_train(sub) -> None:
    from llmrec.cli_options import add_field_flags, add_method_flags, show_value
    from llmrec.command_options import InputCheckOptions
    from llmrec.config import RunConfig, TinyLLMOptions, TrainConfig
    from llmrec.method import available_methods
    from llmrec.presets import DEFAULT_PRESET, PRESETS, preset_help

    registry = available_methods()
    methods = "; ".join(f"{k}: {v.description}" for k, v in registry.items())
    p = sub.add_parser(
        "train",
        help=_HELP["train"],
        description="Train an LLM recommender: AdamW with warm-up and cosine decay, early "
        "stopping on validation AUC, atomic safetensors checkpoints (--resume), bf16/fp16 "
        "autocast on GPU, DDP under torchrun. Methods: " + methods + ". Every flag's "
        "default is the --preset's value (paper unless given); flags given explicitly win.",
    )
    p.add_argument("--method", choices=sorted(registry), default="cora")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="the defaults of the optimisation flags and of the MF size: paper (each seed "
        "system's published ML-1M settings; default) or fast (quick: 3 epochs, lr 1e-4, "
        "MF d 64). Flags given explicitly win.",
    )
    groups: dict = {}

    def group(title):
        if title is None:
            return p
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        return groups[title]

    def shown(name, default):
        return preset_help(name, default) or f"default {show_value(default, ',')}"

    add_field_flags(group, RunConfig, "run.", defaults=shown)
    add_field_flags(group, TrainConfig, "train.", defaults=shown)
    add_field_flags(lambda _: group("tiny LLM (--llm tiny)"), TinyLLMOptions, "tiny.")
    add_field_flags(lambda _: group("run"), InputCheckOptions, "")
    p.set_defaults(
        method_flags=add_method_flags(
            p, registry, lambda m, name, default: preset_help(name, default, method=m)
        )
    )


def _add_command(sub, name: str, description: str) -> None:
    """A subcommand whose arguments are the fields of its options dataclass
    (:data:`llmrec.command_options.COMMAND_OPTIONS`): a field the flags leave out
    (``cli=False``: export's RUN and DIR) is a positional argument."""
    import dataclasses

    from llmrec.cli_options import add_field_flags
    from llmrec.command_options import COMMAND_OPTIONS

    cls = COMMAND_OPTIONS[name]
    p = sub.add_parser(name, help=_HELP[name], description=description)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            p.add_argument(f.name, metavar=f.name.upper(), help=f.metadata["help"])
    add_field_flags(lambda _: p, cls, "")


def _add_evaluate(sub) -> None:
    _add_command(
        sub,
        "evaluate",
        "Rebuild a run from RUN/run.json, load its best state (or --state) and score the rows "
        "it used for a split (--rows all: the whole split); writes RUN/eval_<split>.json (or "
        "--metrics).",
    )


def _add_recommend(sub) -> None:
    _add_command(
        sub,
        "recommend",
        "Retrieval-first recommendation with a finished run: a Faiss index over the run's CF "
        "item embeddings gives K candidates per user, the run's model (CoLLM, CoRA, ...) scores "
        "only those K. Writes RUN/recommend_k<K>_<index>.json: retrieval recall@K against the "
        "full catalogue, HR/NDCG/recall@N of the re-ranked list, seconds per user for K "
        "candidates against scoring every item.",
    )


def _add_export(sub) -> None:
    _add_command(
        sub,
        "export",
        "Rebuild a finished LLM run (its LLM, CF embeddings and data) with its best state (or "
        "--state) and write DIR/adapter_config.json and DIR/adapter_model.safetensors: the "
        "method, its options, the base model and CF records, every trained tensor. "
        "llmrec.from_pretrained(base_model, DIR) rebuilds the model on a fresh base (docs/"
        "training.md). DIR must be new or empty (or an adapter folder, with --force); never "
        "inside a run or dataset.",
    )


def _add_make_data(sub) -> None:
    _add_command(
        sub,
        "make-data",
        "Write a synthetic dataset whose labels depend on latent CF factors only.",
    )


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``llmrec`` argument parser; ``train``'s methods and their options come from the
    method registry (:func:`llmrec.method.available_methods`).

    ``command``: build only that subcommand's flags (the others get their name and help
    only), so ``llmrec --help`` or ``llmrec compare`` never import torch; None builds all.
    """
    from llmrec.compare import add_compare_parser

    parser = _Parser(
        prog="llmrec",
        description="Train and evaluate CF models and LLM recommenders (CoRA, CoLLM, "
        "A-LLMRec, ...) on CoLLM-schema data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    builders = {
        "train-cf": _add_train_cf,
        "train": _add_train,
        "evaluate": _add_evaluate,
        "recommend": _add_recommend,
        "export": _add_export,
        "make-data": _add_make_data,
    }
    for name, add in builders.items():
        if command is None or command == name:
            add(sub)
        else:
            sub.add_parser(name, help=_HELP[name])
    add_compare_parser(sub)  # torch-free
    return parser


def _command_of(argv: List[str]) -> str:
    """The subcommand named in ``argv`` ("" when none is)."""
    first = next((a for a in argv if not a.startswith("-")), "")
    return first if first in _HELP else ""


def _summary(metrics: dict, split: str = "test") -> str:
    m = metrics.get(split, {})

    def f(x):
        return "n/a" if x is None or x != x else f"{x:.4f}"

    parts = [f"{split} AUC {f(m.get('auc'))} UAUC {f(m.get('uauc'))}"]
    for k in ("warm", "cold"):
        if k in m:
            parts.append(f"{k} AUC {f(m[k].get('auc'))} UAUC {f(m[k].get('uauc'))}")
    return " | ".join(parts)


def cf_run_config(args: argparse.Namespace) -> CFRunConfig:
    """The :class:`~llmrec.cf.cf_run.CFRunConfig` of parsed ``train-cf`` arguments: every
    flag given, and ``dim`` from ``--preset`` (its ``cf_dim``, the size ``llmrec train``
    fits) unless ``--dim`` is given."""
    from llmrec.cf.cf_run import CFRunConfig
    from llmrec.cli_options import given_fields
    from llmrec.presets import PRESETS

    given = given_fields(args, CFRunConfig, "cf.")
    given.setdefault("dim", PRESETS[args.preset].train["cf_dim"].value)
    return CFRunConfig(**given)


def _cmd_train_cf(args) -> int:
    from llmrec.cf.cf_run import CFRunConfig, train_cf_run
    from llmrec.cli_options import given_fields
    from llmrec.errors import RunConfigError

    given = given_fields(args, CFRunConfig, "cf.")
    if given.get("resume") and given.get("force"):
        raise RunConfigError("--resume and --force contradict each other; choose one")
    cfg = cf_run_config(args)
    metrics = train_cf_run(cfg, log=_log)
    out = getattr(args, "cf.out")
    _log(_summary(metrics) + f" | {metrics['wall_time_s']:.1f}s -> {out}/metrics.json")
    return 0


def train_config(args) -> RunConfig:  # noqa: F821  (imported lazily)
    """The :class:`~llmrec.config.RunConfig` of parsed ``llmrec train`` arguments: each value
    the flag's if given, else the preset's, else the dataclass default."""
    from llmrec.cli_options import given_fields, given_method_options
    from llmrec.config import RunConfig, TinyLLMOptions, TrainConfig
    from llmrec.errors import RunConfigError
    from llmrec.presets import preset_defaults, preset_options

    preset = preset_defaults(args.preset, args.method)
    train_keys = set(TrainConfig.__dataclass_fields__)
    train = {k: v for k, v in preset.items() if k in train_keys}
    run = {k: v for k, v in preset.items() if k not in train_keys}
    train.update(given_fields(args, TrainConfig, "train."))
    run.update(given_fields(args, RunConfig, "run."))
    tiny = TinyLLMOptions(**given_fields(args, TinyLLMOptions, "tiny."))
    llm = run.get("llm", "tiny")
    if llm == "tiny":
        tiny.check()
    if run.get("resume") and run.get("force"):
        raise RunConfigError("--resume and --force contradict each other; choose one")
    run["method_kwargs"] = {
        **preset_options(args.preset, args.method),
        **run.get("method_kwargs", {}),
        **given_method_options(args, args.method_flags, args.method),
    }
    tcfg = TrainConfig(**train)
    if run.get("tiny_seed") is None:  # --tiny-seed defaults to --seed
        run["tiny_seed"] = tcfg.seed
    return RunConfig(
        method=args.method, preset=args.preset, tiny=tiny.hf_config(), train=tcfg, **run
    )


def _cmd_train(args) -> int:
    from llmrec.llm_training import init_distributed, run_training

    cfg = train_config(args)
    env = init_distributed(cfg.device)
    try:
        log = _log if env.is_main else (lambda m: None)
        metrics = run_training(cfg, env=env, log=log)
        if env.is_main:
            out = getattr(args, "run.out")
            _log(_summary(metrics) + f" | {metrics['wall_time_s']:.1f}s -> {out}/metrics.json")
    finally:
        if env.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _cmd_evaluate(args) -> int:
    from llmrec.llm_training import run_evaluation

    opts = args.options
    metrics = run_evaluation(
        opts.run,
        data_path=opts.data,
        split=opts.split,
        predictions=opts.predictions,
        metrics_path=opts.metrics,
        batch_size=opts.batch_size,
        device=opts.device,
        progress=opts.progress,
        rows=opts.rows,
        state=opts.state,
        resume=opts.resume,
        part=opts.part,
        chunk_rows=opts.chunk_rows,
    )
    if metrics is None:
        return 0  # chunks of other parts are missing; score_resumably said which
    _log(_summary(metrics, opts.split) + f" | {metrics['wall_time_s']:.1f}s")
    return 0


def _cmd_export(args) -> int:
    from llmrec.adapter import export_run

    opts = args.options
    out = export_run(
        opts.run, _abs(opts.dir), force=opts.force, data_path=opts.data,
        device=opts.device, state=opts.state,
    )  # fmt: skip
    _log(f"wrote the adapter of {opts.run} to {out}")
    return 0


def _cmd_compare(args) -> int:
    from llmrec.compare import cmd_compare

    return cmd_compare(args)


def _cmd_recommend(args) -> int:
    from llmrec.retrieval import run_recommend

    opts = args.options
    res = run_recommend(
        opts.run,
        opts.retrieve,
        index_kind=opts.index,
        users=opts.users,
        top_n=opts.top_n,
        full_users=opts.full_users,
        data_path=opts.data,
        device=opts.device,
        batch_size=opts.batch_size,
        out=opts.out,
        lists_path=opts.lists,
        progress=opts.progress,
        seed=opts.seed,
    )
    r, k, n = res["recommend"], args.retrieve, args.top_n
    full = r.get("full_catalogue", {})
    _log(
        f"{r['users']} users: retrieval recall@{k} {r['retrieval'][f'recall@{k}']:.4f} | "
        f"NDCG@{n} retrieval {r['retrieval'][f'ndcg@{n}']:.4f} -> LLM {r['llm_rerank'][f'ndcg@{n}']:.4f}"
        f" | {r['time_per_user_s']['total']:.3f}s/user"
        + (f" vs {full['time_per_user_s']:.3f}s/user for all items" if full else "")
    )
    return 0


def _cmd_make_data(args) -> int:
    from llmrec.data import make_synthetic, write_data

    opts = args.options
    data = make_synthetic(
        n_users=opts.users, n_items=opts.items, per_user=opts.per_user, dim=opts.dim,
        seed=opts.seed,
    )  # fmt: skip
    write_data(data, opts.out, fmt=opts.format)
    _log(f"wrote {data.summary()['rows']} to {opts.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    handlers = {
        "train-cf": _cmd_train_cf,
        "train": _cmd_train,
        "evaluate": _cmd_evaluate,
        "make-data": _cmd_make_data,
        "recommend": _cmd_recommend,
        "compare": _cmd_compare,
        "export": _cmd_export,
    }
    if args.command in ("evaluate", "recommend", "export", "make-data"):
        from llmrec.command_options import command_options

        args.options = command_options(args)  # every value, also onto args for the checks
    no_progress = (
        getattr(args, "progress", True) is False or getattr(args, "train.progress", True) is False
    )
    if (
        no_progress and args.command in ("train", "evaluate", "recommend")
    ) or args.command == "export":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bars
    from llmrec import output_guard
    from llmrec.input_digests import verify_command_inputs

    created = _new_out_dir(args)
    previous_sigterm = _catch_sigterm()
    try:
        try:
            output_guard.check_command_paths(args)  # before anything is written
            verify_command_inputs(args, _log)  # the inputs a run recorded are still the same
            return handlers[args.command](args)
        except BaseException:
            # Already failing: torchrun's SIGTERM to the surviving ranks of a failed job can
            # land while the failure below is classified and its temporaries removed; raised
            # there, it would replace the one-line message with a traceback.
            _ignore_sigterm(previous_sigterm)
            raise
    except USER_ERRORS as exc:
        _clean_after_failure(args, created)
        return _fail(args.command, str(exc), 2)
    except KeyboardInterrupt:
        _clean_after_failure(args, created)
        return _fail(args.command, "interrupted" + _resume_hint(args, argv, created), 130)
    except _Terminated:
        _clean_after_failure(args, created)
        why = "; under torchrun: another process of the job failed" if _distributed() else ""
        return _fail(args.command, f"terminated (SIGTERM{why})" + _resume_hint(args, argv, created), 143)  # fmt: skip
    except Exception as exc:
        if _is_out_of_memory(exc):
            _clean_after_failure(args, created)
            msg = str(exc).split("\n")[0][:300]
            return _fail(args.command, f"out of memory ({msg}); lower --rank, --tiny-hidden, "
                         "--batch-size or --retrieve" + _resume_hint(args, argv, created), 1)  # fmt: skip
        if _distributed() and _is_peer_failure(exc):
            _clean_after_failure(args, created)
            msg = str(exc).strip().split("\n")[0][:200]
            return _fail(args.command, f"another process of this torchrun job failed ({msg})"
                         + _resume_hint(args, argv, created), 1)  # fmt: skip
        if not _is_os_error(exc):
            raise  # a bug: its traceback is wanted
        _clean_after_failure(args, created)
        return _fail(args.command, f"{exc}" + _resume_hint(args, argv, created), 1)
    finally:
        if previous_sigterm is not None:  # main() may run inside a longer-lived program
            import signal

            signal.signal(signal.SIGTERM, previous_sigterm)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread: how torchrun stops the ranks of a failed job."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _ignore_sigterm(previous) -> None:
    """Ignore SIGTERM from now on, where :func:`_catch_sigterm` set the handler (``previous``
    is what it replaced; ``None``: not the main thread, left as it is)."""
    if previous is not None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _catch_sigterm():
    """SIGTERM becomes :class:`_Terminated` (one line, temporaries removed, exit 143)."""
    import signal

    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (a caller's worker thread): left as it is
        return None


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_peer_failure(exc: BaseException) -> bool:
    """A collective that failed because another rank went away (gloo or nccl)."""
    if type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError"):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL")
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocation the machine could not serve (host or GPU memory)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _is_os_error(exc: Exception) -> bool:
    """An operating-system failure: an OSError, or safetensors' own error for a failed
    write (``SafetensorError: ... I/O error: File too large (os error 27)``)."""
    if isinstance(exc, OSError):
        return True
    return type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc)


def _fail(command: str, message: str, status: int) -> int:
    msg = " ".join(message.split())  # one line, whatever the message holds
    print(f"llmrec {command}: error: {msg}", file=sys.stderr, flush=True)
    return status


def _new_out_dir(args) -> Optional[Path]:
    """The run (or dataset) directory this command will create, None when it exists."""
    name = {"train": "run.out", "train-cf": "cf.out", "make-data": "out"}.get(args.command)
    out = getattr(args, name, None) if name else None
    if not isinstance(out, str) or os.path.lexists(out):
        return None
    return Path(out).absolute()


def _clean_after_failure(args, created: Optional[Path]) -> None:
    """This process's temporaries removed; a directory it created that holds nothing
    resumable removed (rank 0 only under torchrun)."""
    from llmrec import output_guard

    output_guard.remove_own_temporaries(output_guard.written_dirs(args))
    if os.environ.get("RANK", "0") == "0":
        output_guard.remove_if_unmade(created)


def _resume_hint(args, argv: List[str], created: Optional[Path]) -> str:
    """``; resume with: llmrec ... --resume`` for a run that left something to resume."""
    import shlex

    name = {"train": "run.out", "train-cf": "cf.out"}.get(args.command)
    out = getattr(args, name, None) if name else None
    if out is None or not (Path(out) / "run.json").exists():
        return "; nothing was kept" if created is not None else ""
    again = [a for a in argv if a != "--force"]
    if "--resume" not in again:
        again.append("--resume")
    launch = "the same torchrun launch of " if _distributed() else ""
    return f"; resume with: {launch}llmrec {shlex.join(again)}"


if __name__ == "__main__":
    sys.exit(main())
