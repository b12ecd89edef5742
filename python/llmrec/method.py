"""The method interface: what a recommender method is, and the registry the CLI reads.

A method (CoRA, CoLLM, A-LLMRec, a zero-shot baseline, ...) is a :class:`Method` subclass
with typed :class:`Method.Options` (a dataclass; every field becomes a CLI flag and a key of
``--method-kwargs``), registered with :func:`register`. It says how to

* :meth:`Method.build` its model from a :class:`RunContext` (the run's data, CF tables, LLM);
  the model follows the :class:`Recommender` protocol;
* split training into :meth:`Method.stages`: each :class:`Stage` gives training and
  validation batches, a :class:`~llmrec.config.TrainConfig` and a validation metric, and is
  run by the method-agnostic :class:`llmrec.training_loop.Trainer`;
* :meth:`Method.evaluate` a split (default: AUC / UAUC over all, warm and cold rows).

Built-in methods live in the :mod:`llmrec.methods` package, one folder or module each, and
are found by importing that package's modules: adding a method is adding one there
(docs/architecture.md). A method defined anywhere else only needs to call :func:`register`
before the CLI runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Protocol, Type

import numpy as np
import torch

from llmrec.cli_options import coerce_option
from llmrec.config import RunConfig, TrainConfig, field_default
from llmrec.data.batching import RecCollator, make_examples, pad_id_of
from llmrec.data.lengths import longest_title_row
from llmrec.errors import RunConfigError
from llmrec.metrics import evaluate_predictions
from llmrec.training_loop import AUC, BatchSource, Metric

__all__ = [
    "METHODS",
    "Method",
    "NoOptions",
    "Recommender",
    "RunContext",
    "Stage",
    "available_methods",
    "get_method",
    "option_fields",
    "parse_options",
    "register",
    "resume_options",
    "split_metrics",
]


class Recommender(Protocol):
    """What the trainer and the evaluation need from a method's model.

    ``loss(batch)`` a scalar tensor; ``score(batch)`` ``(B,)`` float scores, larger = more
    likely relevant; ``trainable_state()`` name -> tensor of everything a checkpoint keeps;
    ``trainable_parameters()`` what the current stage optimises; ``save_trainable(path)`` /
    ``load_trainable(path)`` a safetensors file of ``trainable_state()``.
    """

    def loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor: ...

    def score(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor: ...

    def trainable_state(self) -> Dict[str, torch.Tensor]: ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def save_trainable(self, path) -> None: ...

    def load_trainable(self, path) -> None: ...


@dataclass
class NoOptions:
    """A method without options."""


@dataclass
class Stage:
    """One training stage: batches, optimisation settings, the metric it selects on.

    ``subdir``: the stage's directory under the run (checkpoints, ``best.safetensors``); the
    last stage uses the run directory itself (``""``). ``enter()`` runs before the stage
    trains or, when it finished earlier, before its best state is loaded (e.g. to choose the
    parameters it trains). ``info``: extra entries of the stage's summary in the metrics.
    """

    name: str
    train: Optional[BatchSource]
    valid: Optional[BatchSource]
    config: TrainConfig
    metric: Metric = AUC
    subdir: str = ""
    enter: Optional[Callable[[], None]] = None
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a run has loaded before its model is built (all methods read the same)."""

    cfg: RunConfig
    data: Any  # llmrec.data.RecData
    llm: Any
    tokenizer: Any
    device: torch.device
    env: Any  # llmrec.training_loop.DistEnv
    log: Callable[[str], None]
    cf_path: Optional[str] = None
    user_table: Optional[torch.Tensor] = None
    item_table: Optional[torch.Tensor] = None

    @property
    def cf_dim(self) -> int:
        return int(self.user_table.shape[1]) if self.user_table is not None else 0

    @property
    def valid_split(self) -> str:
        return self.cfg.valid_split or self.data.validation_split()

    def rows(self, split: str):
        """A split's frame, subsampled as the run's budget says (fixed seeds per split)."""
        cfg, seed = self.cfg, self.cfg.train.seed
        if split == "train":
            return subsample(self.data["train"], cfg.max_train_rows, seed)
        if split == self.valid_split:
            return subsample(self.data[split], cfg.max_valid_rows, seed + 1)
        return subsample(self.data[split], cfg.max_test_rows, seed + 2)


def subsample(df, n: Optional[int], seed: int):
    """``n`` random rows of ``df`` in their original order (all rows when ``n`` is None)."""
    if n is None or n >= len(df):
        return df
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(df), size=n, replace=False))
    return df.iloc[idx].reset_index(drop=True)


def split_metrics(scores: np.ndarray, df) -> dict:
    """AUC / UAUC over all, warm and cold rows of ``df`` for ``scores`` ``(len(df),)``."""
    return evaluate_predictions(
        df["uid"].to_numpy(),
        df["label"].to_numpy(),
        scores,
        df["not_cold"].to_numpy(),
        items=df["iid"].to_numpy(),
    )


class Method:
    """Base of every method; subclasses set ``name`` and override what differs."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: prompt template of the default batches (``"cora"`` or ``"collm"``)
    template: ClassVar[str] = "cora"
    uses_cf: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    #: refuse ``torchrun`` with more than one process
    single_process: ClassVar[bool] = False
    #: ``(key, header, format)`` of test-block metrics ``llmrec compare`` shows for the method
    report_columns: ClassVar[tuple] = ()
    #: a row's score depends on the user's other rows of the frame scored (A-LLMRec ranks a
    #: user's rows among each other): chunked scoring keeps each user's rows in one chunk
    scores_by_user: ClassVar[bool] = False

    def build(self, ctx: RunContext, opts) -> Recommender:
        raise NotImplementedError

    def source(self, ctx: RunContext, df, template: Optional[str] = None) -> RecCollator:
        """Pointwise batches of ``df``'s rows (prompt + CF rows + label)."""
        ex = make_examples(
            df,
            ctx.tokenizer,
            template=template or self.template,
            max_his=ctx.cfg.max_his,
            max_length=ctx.cfg.max_length,
        )
        return RecCollator(ex, pad_id_of(ctx.tokenizer), ctx.user_table, ctx.item_table, ctx.cf_dim)

    def check_prompt_lengths(self, ctx: RunContext, opts) -> None:
        """Step 4 of the length rule (:mod:`llmrec.data.lengths`) before any model is built:
        the prompt of the data's longest title (in tokens, after the cut) with no history must
        fit ``--max-length``, else :class:`~llmrec.data.lengths.PromptTooLong` (one line).
        Every other row then fits by dropping history, so no split fails later."""
        self.source(ctx, longest_title_row(ctx.data, ctx.tokenizer))

    def stages(self, ctx: RunContext, model, opts) -> List[Stage]:
        """One stage on the run's train rows, early stopping on the validation AUC."""
        train = self.source(ctx, ctx.rows("train")) if self.trains else None
        valid = self.source(ctx, ctx.rows(ctx.valid_split))
        return [Stage("train", train, valid, ctx.cfg.train)]

    def score_frame(self, ctx: RunContext, model, opts, df, predict, desc: str = "test"):
        """Scores ``(len(df),)`` float of ``df``'s rows; ``predict(source, desc)`` scores a
        batch source with the trainer. Chunked scoring (``llmrec evaluate --resume``) calls
        this per chunk (whole users per chunk when :attr:`scores_by_user`)."""
        return predict(self.source(ctx, df), desc)

    def extra_metrics(self, ctx: RunContext, model, opts, df, predict) -> Dict[str, Any]:
        """Test metrics beyond the rows' (A-LLMRec's ranking episodes), computed once per
        evaluation of ``df``, chunked or not."""
        return {}

    def evaluate(self, ctx: RunContext, model, opts, df, predict, full: bool = True):
        """``(metrics block, scores (len(df),))`` of ``df``. ``full`` False: the pointwise
        metrics only (validation)."""
        scores = self.score_frame(ctx, model, opts, df, predict, "test" if full else "valid")
        block = split_metrics(scores, df)
        if full:
            block.update(self.extra_metrics(ctx, model, opts, df, predict))
        return block, scores

    def eval_rows(self, ctx: RunContext, split: str, rows: str = "run"):
        """The rows ``llmrec evaluate`` scores.

        ``rows="run"``: the rows the run itself used for ``split`` (its ``--max-train-rows``,
        ``--max-valid-rows`` or ``--max-test-rows`` subsample, the same seeded rows), so the
        run's own metrics are reproduced; a split the run never scored is taken whole.
        ``rows="all"``: the whole split.
        """
        if rows not in ("run", "all"):
            raise ValueError(f"rows must be 'run' or 'all', got {rows!r}")
        if rows == "run" and split in ("train", ctx.valid_split, "test"):
            return ctx.rows(split)
        return ctx.data[split]

    def train_summary(self, opts) -> Dict[str, Any]:
        """Extra entries of the metrics' ``train`` block."""
        return {}


# ---------------------------------------------------------------------------------------------
# registry

METHODS: Dict[str, Type[Method]] = {}
_BUILTINS_LOADED = False


def register(cls: Type[Method], overwrite: bool = False) -> Type[Method]:
    """Add a :class:`Method` subclass to the registry (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError("register() takes a Method subclass with a name")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    if cls.name in METHODS and METHODS[cls.name] is not cls and not overwrite:
        raise ValueError(f"method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    package = importlib.import_module("llmrec.methods")
    for mod in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"llmrec.methods.{mod.name}")


def available_methods() -> Dict[str, Type[Method]]:
    """Every registered method (the built-in ones included), by name."""
    _load_builtins()
    return dict(sorted(METHODS.items()))


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name`` (:class:`RunConfigError` if none)."""
    methods = available_methods()
    if name not in methods:
        raise RunConfigError(f"unknown method {name!r}; registered: {sorted(methods)}")
    return methods[name]()


# ---------------------------------------------------------------------------------------------
# options


def option_fields(method: Type[Method]) -> List[tuple]:
    """``(name, type, default)`` of every option of ``method`` (types resolved)."""
    hints = typing.get_type_hints(method.Options)
    return [
        (f.name, hints.get(f.name, Any), field_default(f))
        for f in dataclasses.fields(method.Options)
    ]


def parse_options(method: Type[Method], cfg: RunConfig):
    """The method's ``Options`` from a run config: ``method_kwargs`` (the options given by
    flag, ``--method-kwargs`` or preset), else a top-level key of an older ``run.json``
    (:data:`llmrec.config.LEGACY_METHOD_KEYS`), else the option's default."""
    kwargs = dict(cfg.method_kwargs or {})
    fields = option_fields(method)
    unknown = sorted(set(kwargs) - {n for n, _, _ in fields})
    if unknown:
        raise RunConfigError(
            f"--method-kwargs: {unknown} are not options of {method.name!r} "
            f"(it has {[n for n, _, _ in fields] or 'none'})"
        )
    legacy = getattr(cfg, "legacy_options", {})
    values = {}
    for name, tp, default in fields:
        if name in kwargs:
            values[name] = coerce_option(name, tp, kwargs[name])
        elif name in legacy:
            values[name] = coerce_option(name, tp, legacy[name])
        else:
            values[name] = default
    return method.Options(**values)


def resume_options(method: Type[Method], config: dict) -> Dict[str, Any]:
    """The options of ``method`` a resumed run must keep, resolved from a ``run.json``
    config dict: every option but those declared ``resume=False`` (e.g. the kernel backend)."""
    opts = dataclasses.asdict(parse_options(method, RunConfig.from_dict(config)))
    free = {f.name for f in dataclasses.fields(method.Options) if f.metadata.get("resume") is False}
    return {k: v for k, v in opts.items() if k not in free}
