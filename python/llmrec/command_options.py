"""Every option of ``llmrec evaluate``, ``recommend``, ``export`` and ``make-data`` (and the
input check that ``train`` and ``train-cf`` share with them), defined once.

As :mod:`llmrec.config` does for ``llmrec train``: each option is one typed dataclass field
(:func:`llmrec.config.option`) with its help text, parser, choices and default;
:mod:`llmrec.cli_options` turns the fields into ``argparse`` flags, and
:func:`command_options` reads a parsed command line back into the dataclass, so a default
lives in one place (the chunk size of ``evaluate --resume``, which names the chunk folder a
later ``--resume`` must find, is :data:`llmrec.scoring_parts.DEFAULT_CHUNK_ROWS`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional, Tuple

from llmrec.config import (
    ACCEPT_CHANGED_INPUTS_HELP,
    absolute_path,
    device_name,
    nonneg_int,
    option,
    output_file,
    positive_int,
)
from llmrec.data.loader import SPLITS
from llmrec.scoring_parts import DEFAULT_CHUNK_ROWS, parse_part

__all__ = [
    "COMMAND_OPTIONS",
    "INDEX_KINDS",
    "EvaluateOptions",
    "ExportOptions",
    "InputCheckOptions",
    "MakeDataOptions",
    "RecommendOptions",
    "command_options",
]

#: the Faiss index kinds of ``llmrec recommend --index`` (:mod:`llmrec.retrieval`)
INDEX_KINDS = ("exact", "ivf", "hnsw")

_RUN_HELP = "run directory written by train or train-cf"
_DATA_HELP = "dataset directory (default: the run's data)"


def _part(text: str) -> Tuple[int, int]:
    try:
        return parse_part(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(kw_only=True)
class InputCheckOptions:
    """The check of a run's recorded inputs (:mod:`llmrec.input_digests`), an option of every
    command that reads a run: ``evaluate``, ``recommend``, ``export``, and ``train`` /
    ``train-cf`` with ``--resume``."""

    accept_changed_inputs: bool = option(False, help=ACCEPT_CHANGED_INPUTS_HELP)


@dataclass
class EvaluateOptions(InputCheckOptions):
    """``llmrec evaluate``: score a split with a finished run."""

    run: str = option(required=True, metavar="RUN", help=_RUN_HELP)
    data: Optional[str] = option(None, help=_DATA_HELP, convert=absolute_path, metavar="DIR")
    split: str = option("test", choices=SPLITS, help="split to score")
    rows: str = option(
        "run",
        choices=("run", "all"),
        help="run: the rows the run scored for this split (its --max-*-rows subsample, so its "
        "metrics are reproduced); all: the whole split",
    )
    state: Optional[str] = option(
        None,
        metavar="PATH",
        convert=absolute_path,
        help="score this trainable state instead of RUN/best.safetensors: a .safetensors file "
        "or a checkpoint directory (RUN/checkpoints/ckpt-...)",
    )
    metrics: Optional[str] = option(
        None, parse=output_file, metavar="PATH", help="metrics JSON path (RUN/eval_<split>.json)"
    )
    predictions: Optional[str] = option(
        None, parse=output_file, metavar="PATH", help="predictions CSV"
    )
    batch_size: Optional[int] = option(
        None, parse=positive_int, help="eval batch size (default: the run's)"
    )
    resume: bool = option(
        False,
        help="score in chunks saved under RUN/scores and reuse the chunks an earlier "
        "(interrupted) call saved; metrics once every chunk is there",
    )
    part: Optional[Tuple[int, int]] = option(
        None,
        parse=_part,
        metavar="K/N",
        help="score only the K-th of N equal ranges of chunks (implies --resume): N machines "
        "or sessions share a split; copy their RUN/scores into one run and run --resume to "
        "write the metrics",
    )
    chunk_rows: int = option(
        DEFAULT_CHUNK_ROWS, parse=positive_int, help="rows per chunk file of --resume/--part"
    )
    device: str = option(
        "auto", parse=device_name, metavar="DEVICE", help="auto, cpu, cuda or cuda:N"
    )
    progress: bool = option(True, help="tqdm progress bars")


@dataclass
class RecommendOptions(InputCheckOptions):
    """``llmrec recommend``: retrieval-first top-N lists re-ranked by a finished run."""

    run: str = option(required=True, metavar="RUN", help=_RUN_HELP)
    retrieve: int = option(
        required=True, parse=positive_int, metavar="K", help="candidates retrieved per user"
    )
    index: str = option("exact", choices=INDEX_KINDS, help="Faiss index over CF item embeddings")
    users: Optional[int] = option(
        None, parse=positive_int, help="random sample of users (default: every test user)"
    )
    top_n: int = option(10, parse=positive_int, help="list length scored")
    full_users: int = option(
        2, parse=nonneg_int, help="users also scored on every item, for timing"
    )
    data: Optional[str] = option(None, help=_DATA_HELP, convert=absolute_path, metavar="DIR")
    out: Optional[str] = option(
        None,
        parse=output_file,
        metavar="PATH",
        help="metrics JSON (RUN/recommend_k<K>_<index>.json)",
    )
    lists: Optional[str] = option(None, parse=output_file, metavar="PATH", help="top-N lists CSV")
    batch_size: int = option(64, parse=positive_int, help="LLM batch size")
    device: str = option(
        "auto", parse=device_name, metavar="DEVICE", help="auto, cpu, cuda or cuda:N"
    )
    seed: int = option(0, parse=int, help="seed of the user sample")
    progress: bool = option(True, help="tqdm progress bars")


@dataclass
class ExportOptions(InputCheckOptions):
    """``llmrec export RUN DIR``: a run's best state as an adapter folder."""

    run: str = option(cli=False, help="run directory written by `llmrec train`")
    dir: str = option(cli=False, help="the adapter folder to write")
    force: bool = option(False, help="replace the adapter already in DIR")
    data: Optional[str] = option(None, help=_DATA_HELP, convert=absolute_path, metavar="DIR")
    state: Optional[str] = option(
        None,
        metavar="PATH",
        convert=absolute_path,
        help="export this trainable state instead of RUN/best.safetensors",
    )
    device: str = option(
        "cpu", parse=device_name, metavar="DEVICE", help="where the run is rebuilt"
    )


@dataclass
class MakeDataOptions:
    """``llmrec make-data``: a synthetic dataset whose labels depend on latent CF factors
    only (:func:`llmrec.data.make_synthetic`)."""

    out: str = option(required=True, metavar="DIR", help="the dataset directory to write")
    format: str = option("parquet", choices=("parquet", "csv"), help="file format of the splits")
    users: int = option(200, parse=positive_int, help="users")
    items: int = option(100, parse=positive_int, help="items")
    per_user: int = option(40, parse=positive_int, help="rated items per user")
    dim: int = option(4, parse=positive_int, help="latent factor size")
    seed: int = option(0, parse=int, help="seed of the factors and the ratings")


#: the option dataclass of each command that has one here
COMMAND_OPTIONS = {
    "evaluate": EvaluateOptions,
    "recommend": RecommendOptions,
    "export": ExportOptions,
    "make-data": MakeDataOptions,
}


def command_options(args: argparse.Namespace):
    """The options dataclass of a parsed command line of :data:`COMMAND_OPTIONS`
    (each flag given, else the field's default), also written back onto ``args`` so the
    output rules and input checks that read ``args`` see every value."""
    from llmrec.cli_options import given_fields

    cls = COMMAND_OPTIONS[args.command]
    given = given_fields(args, cls, "")
    for f in fields(cls):  # positional arguments (export's RUN and DIR) are plain attributes
        if not f.metadata.get("cli", True) and hasattr(args, f.name):
            given[f.name] = getattr(args, f.name)
    opts = cls(**given)
    for f in fields(cls):
        setattr(args, f.name, getattr(opts, f.name))
    return opts
