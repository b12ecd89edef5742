"""Named sets of ``llmrec train`` defaults: ``paper`` (the default) and ``fast``.

``paper`` reproduces the optimisation each seed system published for ML-1M; every value
carries its source (a paper section or a file of the authors' code). ``fast`` is the
project's earlier quick configuration (3 epochs at lr 1e-4, one evaluation per epoch, a
64-dim MF), kept so smoke tests and tutorials stay cheap. A preset only sets defaults: any
flag given on the command line wins (``--preset paper --lr 1e-4`` trains at 1e-4).

A preset is an overlay on the option dataclasses (:mod:`llmrec.config`): ``train`` sets
fields of :class:`~llmrec.config.TrainConfig` (``lr``, ...) and ``cf_dim`` of
:class:`~llmrec.config.RunConfig`, the size of the MF ``llmrec train`` fits when no ``--cf``
is given. Method internals that the seed systems fix (the Q-Former's LayerNorm / FFN /
dropout / init, CoRA's LoRA dropout, A-LLMRec's losses, encoders, projections, candidates,
the prompt bytes) are the defaults of the methods' ``Options`` and of
:mod:`llmrec.methods.cora.generator` / :mod:`llmrec.data.prompts` in every preset; README.md ("Paper vs
this project") lists them all with their sources, and the deliberate departures.

The sources abbreviated below:

* ``CoRA cfg``: VanillaCreamer/CoRA ``train_configs/plora_pretrain_mf_ood_movie.yaml``, its
  ML-1M run (``init_lr`` 1e-3, ``min_lr`` 8e-5, ``warmup_lr`` 1e-5, ``warmup_steps`` 200,
  ``iters_per_epoch`` 100, ``max_epoch`` 1000, ``weight_decay`` 1e-3, ``batch_size_train`` 8;
  ``lora_config`` r 16, alpha 32, q/k/v/o, dropout 0.05; MF d 256);
* ``CoLLM cfg``: zyang1580/CoLLM ``train_configs/collm_pretrain_mf_ood.yaml`` (ML-1M:
  ``batch_size_train`` 16, ``init_lr`` 1e-3, ``iters_per_epoch`` 50, ``max_epoch`` 200,
  ``rec_config.embedding_size`` 256);
* ``LAVIS runner``: ``minigpt4/runners/runner_base.py`` and ``common/optims.py`` of both
  repositories (validation after every ``iters_per_epoch`` iterations, AdamW with no weight
  decay on ``ndim < 2`` parameters, betas ``(0.9, run_cfg.get("beta2", 0.999))``, no
  gradient clipping, ``LinearWarmupCosineLRScheduler``);
* ``A-LLMRec main``: ghdtjr/A-LLMRec ``main.py`` (``--stage2_lr`` 1e-4, ``--batch_size2`` 2,
  ``--stage1_lr`` 1e-4, ``--batch_size1`` 16; plain Adam, no schedule);
* ``A-LLMRec train_model``: its ``train_model.py`` (both stages ``torch.optim.Adam(...,
  betas=(0.9, 0.98))``; ``inference_`` loads stage 1's epoch 10 and stage 2's epoch 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Preset",
    "Value",
    "preset_defaults",
    "preset_help",
    "preset_options",
]


@dataclass(frozen=True)
class Value:
    """A preset value and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class Preset:
    """``train``: values of :class:`~llmrec.config.TrainConfig` / ``RunConfig`` fields (by
    field name) for every method; ``methods``: per-method values that replace those of
    ``train``."""

    name: str
    description: str
    train: Mapping[str, Value]
    methods: Mapping[str, Mapping[str, Value]] = field(default_factory=dict)
    #: per-method ``Options`` values that replace the option defaults (``--method-kwargs``
    #: and ``--<method>-<option>`` flags win over them)
    options: Mapping[str, Mapping[str, Value]] = field(default_factory=dict)

    def values(self, method: str) -> Dict[str, Value]:
        """The preset's :class:`Value` of every flag for ``method``."""
        return {**self.train, **self.methods.get(method, {})}


_LAVIS = "LAVIS runner"

PAPER = Preset(
    "paper",
    "each seed system's published ML-1M optimisation (README: Paper vs this project)",
    train={
        "lr": Value(1e-3, "CoRA §5.1 (lr picked from {1e-2, 1e-3, 1e-4}); CoRA cfg init_lr"),
        "warmup_steps": Value(200, "CoRA cfg / CoLLM cfg warmup_steps"),
        # LAVIS warms up linearly from warmup_lr to init_lr: 1e-5 / 1e-3
        "warmup_start_ratio": Value(0.01, "CoRA cfg warmup_lr 1e-5 (of init_lr 1e-3)"),
        "warmup_ratio": Value(0.0, "warm-up given in steps (warmup_steps)"),
        "min_lr_ratio": Value(0.08, "CoRA cfg min_lr 8e-5 (of init_lr 1e-3)"),
        # the cosine horizon: max_epoch x iters_per_epoch iterations; runs stop early long
        # before it, so the lr stays near 1e-3 (data epochs are not the limit)
        "max_steps": Value(100_000, "CoRA cfg max_epoch 1000 x iters_per_epoch 100"),
        "epochs": Value(1000, "no data-epoch limit (the reference loops over the data)"),
        "eval_every": Value(100, f"CoRA cfg iters_per_epoch 100; {_LAVIS} validates each"),
        "patience": Value(20, f"{_LAVIS}: stop after 20 validations without gain (CoRA)"),
        "grad_clip": Value(0.0, f"{_LAVIS}: no gradient clipping"),
        "weight_decay": Value(1e-3, "CoRA cfg / CoLLM cfg weight_decay (not on 1-D params)"),
        "adam_betas": Value([0.9, 0.999], f"{_LAVIS}: AdamW betas (0.9, run_cfg beta2 0.999)"),
        "batch_size": Value(16, "CoLLM cfg batch_size_train 16"),
        "cf_dim": Value(256, "CoLLM cfg rec_config.embedding_size 256 (MF d 256)"),
    },
    methods={
        "cora": {
            "batch_size": Value(8, "CoRA cfg (ML-1M) batch_size_train 8"),
        },
        "collm": {
            "max_steps": Value(10_000, "CoLLM cfg max_epoch 200 x iters_per_epoch 50"),
            "eval_every": Value(50, f"CoLLM cfg iters_per_epoch 50; {_LAVIS} validates each"),
        },
        "allmrec": {
            # A-LLMRec trains stage 2 with plain Adam at a constant rate for fixed epochs
            "lr": Value(1e-4, "A-LLMRec main --stage2_lr 1e-4"),
            "batch_size": Value(2, "A-LLMRec main --batch_size2 2"),
            "weight_decay": Value(0.0, "A-LLMRec main: Adam, no weight decay"),
            "adam_betas": Value([0.9, 0.98], "A-LLMRec train_model: Adam betas=(0.9, 0.98)"),
            "warmup_steps": Value(0, "A-LLMRec main: no schedule"),
            "warmup_start_ratio": Value(None, "A-LLMRec main: no schedule"),
            "min_lr_ratio": Value(1.0, "A-LLMRec main: constant lr"),
            "max_steps": Value(None, "A-LLMRec main: fixed epochs"),
            # train_model.py's loop runs main's --num_epochs (100), but inference_ loads the
            # stage-2 checkpoint of epoch 5 (phase2_epoch = 5): the one its results come from
            "epochs": Value(5, "A-LLMRec train_model inference_: phase2_epoch = 5"),
            "eval_every": Value(0, "A-LLMRec main: no validation; here one per epoch"),
            "patience": Value(10, "A-LLMRec main: no early stopping"),
        },
    },
    options={
        "allmrec": {
            "stage1_rows": Value(
                "next_item",
                "A-LLMRec model pre_train_phase1: next-item positives vs one random negative",
            ),
            "stage1_batch_size": Value(32, "A-LLMRec main --batch_size1 32 (issue 29)"),
        },
    },
)

FAST = Preset(
    "fast",
    "the project's quick defaults (before the paper preset): 3 epochs, lr 1e-4, MF d 64",
    train={
        "lr": Value(1e-4, "this project"),
        "warmup_steps": Value(None, "this project: warmup_ratio of the steps"),
        "warmup_start_ratio": Value(None, "this project: warm-up from (step + 1) / warmup"),
        "warmup_ratio": Value(0.05, "this project"),
        "min_lr_ratio": Value(0.0, "this project: cosine to 0"),
        "max_steps": Value(None, "this project"),
        "epochs": Value(3, "this project"),
        "eval_every": Value(0, "this project: one validation per epoch"),
        "patience": Value(2, "this project"),
        "grad_clip": Value(1.0, "this project"),
        "weight_decay": Value(1e-3, "this project"),
        "adam_betas": Value([0.9, 0.999], "this project (torch's AdamW default)"),
        "batch_size": Value(8, "this project"),
        "cf_dim": Value(64, "this project"),
    },
    options={
        # A-LLMRec's stage 1 at the reference's batch 16 / lr 1e-4 is slow on a CPU
        "allmrec": {
            "stage1_lr": Value(1e-3, "this project"),
            "stage1_batch_size": Value(512, "this project"),
            "train_candidates": Value(10, "this project"),
        },
    },
)

PRESETS: Dict[str, Preset] = {p.name: p for p in (PAPER, FAST)}
DEFAULT_PRESET = "paper"


def preset_defaults(name: str, method: str) -> Dict[str, Any]:
    """``{flag destination: value}`` of preset ``name`` for ``method`` (ValueError if unknown)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return {k: v.value for k, v in PRESETS[name].values(method).items()}


def preset_options(name: str, method: str) -> Dict[str, Any]:
    """``{option: value}`` preset ``name`` sets in ``method``'s ``Options`` (flags win)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return {k: v.value for k, v in PRESETS[name].options.get(method, {}).items()}


def preset_help(key: str, default: Any, method: Optional[str] = None) -> Optional[str]:
    """``"paper: 0.001, fast: 0.0001"``: what each preset trains with for field ``key``
    (a ``RunConfig`` / ``TrainConfig`` field, or with ``method`` one of its options), or
    None when no preset sets it. A preset that leaves it alone shows ``default``."""
    from llmrec.cli_options import show_value

    def value(p: Preset):
        table = p.options.get(method, {}) if method else p.train
        return table[key].value if key in table else default

    if not any(key in (p.options.get(method, {}) if method else p.train) for p in PRESETS.values()):
        return None
    values = ", ".join(f"{n}: {show_value(value(p))}" for n, p in PRESETS.items())
    if not method:  # a method's own value under a preset
        values += "".join(
            f"; {m} under {n}: {show_value(v[key].value)}"
            for n, p in PRESETS.items()
            for m, v in p.methods.items()
            if key in v
        )
    return f"preset {values}"
