"""``llmrec train-cf`` / ``llmrec evaluate`` for CF runs: train, export, score, write files.

A CF run directory holds ``run.json`` (``"kind": "cf"``, the config and ``"complete"``),
``model.safetensors`` (the full CF model), ``embeddings.safetensors`` (the user/item tables for
the LLM methods), ``metrics.json`` and, when asked, a predictions CSV (``uid, iid, label,
score``). ``run.json`` is written first with ``"complete": false`` and rewritten with ``true``
after every other file, so a killed run is never taken for a finished one (``train --cf``
refuses it). ``cf_state.safetensors`` holds the training loop's state after every epoch:
``--resume`` continues an unfinished run from its last finished epoch (to the result of an
uninterrupted run) and returns a finished one's metrics as they are.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from llmrec.cf.cf_training import (
    OBJECTIVES,
    CFConfig,
    CFEmbeddingError,
    predict_cf,
    save_cf_embeddings,
    train_cf,
)
from llmrec.cf.models import build_cf_model
from llmrec.config import (
    absolute_path,
    device_name,
    float_in,
    nonneg_float,
    option,
    output_file,
    positive_float,
    positive_int,
    resume_keys,
    resume_mismatches,
    with_legacy_defaults,
)
from llmrec.errors import RunConfigError
from llmrec.input_digests import digest_inputs
from llmrec.metrics import check_both_classes, evaluate_predictions
from llmrec.run_store import (
    METRICS_FILE,
    RUN_FILE,
    claim_run_dir,
    machine_info,
    read_run_info,
    write_metrics,
    write_run_info,
)
from llmrec.safe_files import read_json, save_safetensors, verify_safetensors

__all__ = ["CFRunConfig", "evaluate_cf_run", "train_cf_run"]


def _cf_models() -> list:
    from llmrec.cf.models import CF_MODELS

    return sorted(CF_MODELS)


_R = "run"


@dataclass
class CFRunConfig:
    """Everything ``llmrec train-cf`` needs; stored in ``<out>/run.json``. Each field is its
    own flag (:func:`llmrec.config.option`); ``--resume`` must keep every field but the
    output and device ones."""

    model: str = option("mf", help="the CF model", choices=_cf_models(), resume=True, group=_R)
    data: Optional[str] = option(
        None,
        help="dataset directory (train/valid/valid_small/test as .parquet or .csv, CoLLM "
        "schema); default: the embedded synthetic dataset",
        convert=absolute_path,
        resume=True,
        metavar="DIR",
        group=_R,
    )
    out: str = option(
        "runs/cf",
        help="run directory to write",
        convert=absolute_path,
        required=True,
        metavar="OUT",
        group=_R,
    )
    # on the command line the --preset's cf_dim: paper 256 (CoLLM's ML-1M MF,
    # collm_pretrain_mf_ood.yaml embedding_size), fast 64 (llmrec.cli.cf_run_config)
    dim: int = option(64, help="embedding size d_cf", parse=positive_int, resume=True)
    layers: int = option(
        2, help="LightGCN propagation layers / SASRec blocks", parse=positive_int, resume=True
    )
    heads: int = option(1, help="SASRec attention heads", parse=positive_int, resume=True)
    his_len: int = option(50, help="SASRec history length", parse=positive_int, resume=True)
    dropout: float = option(
        0.2, help="SASRec dropout", parse=float_in(0, 1, hi_open=True), resume=True
    )
    init_std: float = option(0.1, help="embedding init std", cli=False, resume=True)
    lr: float = option(3e-3, help="Adam learning rate", parse=positive_float, resume=True)
    weight_decay: float = option(1e-4, help="L2 decay", parse=nonneg_float, resume=True)
    batch_size: int = option(1024, help="batch size", parse=positive_int, resume=True)
    epochs: int = option(200, help="max epochs", parse=positive_int, resume=True)
    patience: int = option(10, help="early-stopping patience", parse=positive_int, resume=True)
    seed: int = option(0, help="random seed", parse=int, resume=True, group=_R)
    valid_split: str = option("valid", help="split for early stopping", resume=True)
    objective: str = option(
        "labels",
        help="training rows: 'labels' = BCE on the labelled training rows; 'next-item' = "
        "SASRec's task (as A-LLMRec's pre_train/sasrec): each positive training row (its "
        "history of earlier positives) against one item the user did not rate in the training "
        "split, drawn afresh each epoch (batches of --batch-size positives plus their "
        "negatives); its early stopping keeps the best AUC of the validation positives "
        "against one item each the user rated in neither split (the like/dislike AUC does not "
        "measure this task; the reference trains a fixed 200 epochs and selects nothing)",
        choices=list(OBJECTIVES),
        resume=True,
    )
    device: str = option("cpu", help="cpu or cuda", parse=device_name, metavar="DEVICE")
    predictions: Optional[str] = option(
        None,
        help="also write test predictions (uid, iid, label, score) to this CSV",
        parse=output_file,
        metavar="PATH",
        convert=absolute_path,
        group=_R,
    )
    progress: bool = option(True, help="tqdm progress bars", group=_R)
    resume: bool = option(
        False, help="OUT holds this CF run: keep it when finished, else train it again"
    )
    force: bool = option(
        False,
        help="OUT holds another run: move it aside to OUT.old-<time> (never deleted), start anew",
        group=_R,
    )


#: what a CF run written before an option existed did (before ``objective``: the labels)
LEGACY_DEFAULTS = {"objective": "labels"}

#: what ``best_valid_auc`` measures, per objective (``llmrec.cf.cf_training.validation_rows``)
SELECTED_ON = {
    "labels": "AUC of the labelled validation split",
    "next-item": "AUC of the validation positives against one unrated item each",
}

#: the CF training loop's state after its last finished epoch (for ``--resume``)
STATE_FILE = "cf_state.safetensors"


def _model_kwargs(cfg: CFRunConfig) -> dict:
    kw = {"dim": cfg.dim, "init_std": cfg.init_std}
    if cfg.model in ("lightgcn", "sasrec"):
        kw["n_layers"] = cfg.layers
    if cfg.model == "sasrec":
        kw.update(n_heads=cfg.heads, max_len=cfg.his_len, dropout=cfg.dropout)
    return kw


def _metrics(df: pd.DataFrame, scores: np.ndarray) -> dict:
    return evaluate_predictions(
        df["uid"].to_numpy(),
        df["label"].to_numpy(),
        scores,
        df["not_cold"].to_numpy(),
        items=df["iid"].to_numpy(),
    )


def train_cf_run(
    cfg: CFRunConfig, *, data=None, log: Optional[Callable[[str], None]] = None
) -> dict:
    """Train ``cfg.model``, export embeddings, evaluate valid/test; return the metrics.

    Holds ``cfg.out``'s lock for the run (:func:`llmrec.run_store.claim_run_dir`).
    """
    log = log or (lambda m: None)
    lock = claim_run_dir(
        cfg.out, "cf", "model", cfg.model, resume=cfg.resume, force=cfg.force, log=log
    )
    try:
        done = _check_cf_resume(cfg, log)
        return done if done is not None else _train_cf_locked(cfg, data, log)
    finally:
        lock.release()


def _check_cf_resume(cfg: CFRunConfig, log) -> Optional[dict]:
    """On ``--resume``: refuse another config; a finished run's metrics (else None)."""
    out = Path(cfg.out)
    if not cfg.resume or not (out / RUN_FILE).exists():
        return None
    info = read_run_info(out)
    old = with_legacy_defaults(info["config"], LEGACY_DEFAULTS)
    diffs = resume_mismatches(old, dataclasses.asdict(cfg), resume_keys(CFRunConfig))
    if diffs:
        raise RunConfigError(f"--resume: the options differ from the run in {out} "
                             f"({'; '.join(diffs)})")  # fmt: skip
    if info.get("complete", True) and (out / METRICS_FILE).exists():
        log(f"{out}: the CF run already finished; nothing to do")
        return read_json(out / METRICS_FILE, RunConfigError)
    log(f"{out}: the CF run did not finish; continuing it")
    return None


def _train_cf_locked(cfg: CFRunConfig, data, log) -> dict:
    from llmrec.data import load_run_data

    start = time.perf_counter()
    data = data if data is not None else load_run_data(cfg.data)
    if cfg.valid_split not in data:
        raise RunConfigError(
            f"{data.source}: no {cfg.valid_split!r} split (has {sorted(data.splits)})"
        )
    check_both_classes(data[cfg.valid_split]["label"], cfg.valid_split)  # before any writing
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    inputs = digest_inputs(data=cfg.data)
    write_run_info(out, "cf", "model", cfg.model, config, data=data.summary(), complete=False,
                   inputs=inputs)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_cf_model(cfg.model, data.n_users, data.n_items, **_model_kwargs(cfg))
    tcfg = CFConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        patience=cfg.patience,
        seed=cfg.seed,
        valid_split=cfg.valid_split,
        his_len=cfg.his_len,
        objective=cfg.objective,
    )
    if cfg.resume and (out / STATE_FILE).exists():
        log(f"{out}: continuing the CF training after its last finished epoch")
    res = train_cf(  # no per-epoch log lines: the progress bar shows them
        model, data, tcfg, device=cfg.device, progress=cfg.progress,
        state_path=out / STATE_FILE, resume=cfg.resume,
    )  # fmt: skip
    save_safetensors(out / "model.safetensors", model.state_dict())
    user, item = model.export(data)
    save_cf_embeddings(
        out / "embeddings.safetensors", user, item, cfg.model, best_valid_auc=res.best_valid_auc
    )
    test_df = data["test"]
    test_scores = predict_cf(model, test_df, his_len=cfg.his_len)
    valid_df = data[cfg.valid_split]
    metrics = {
        "model": cfg.model,
        "objective": cfg.objective,
        "test": _metrics(test_df, test_scores),
        "valid": {"split": cfg.valid_split, **_metrics(valid_df, predict_cf(model, valid_df))},
        "train": {
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "best_valid_auc": res.best_valid_auc,
            "selected_on": SELECTED_ON[cfg.objective],
            "train_time_s": res.wall_time_s,
            "history": res.history,
        },
        "config": dataclasses.asdict(cfg),
        "data": data.summary(),
        "machine": machine_info(str(cfg.device)),
        "wall_time_s": time.perf_counter() - start,
    }
    write_metrics(out, metrics, predictions=cfg.predictions, pred_df=test_df, scores=test_scores)
    write_run_info(out, "cf", "model", cfg.model, config, data=data.summary(), complete=True,
                   inputs=inputs)  # fmt: skip
    return metrics


def cf_run_config(run_dir: Path, info: Optional[dict] = None) -> CFRunConfig:
    """The :class:`CFRunConfig` a finished CF run recorded in its ``run.json``."""
    run_dir = Path(run_dir)
    if info is None:
        info = read_json(run_dir / RUN_FILE, CFEmbeddingError)
    if info.get("complete") is False:
        raise RunConfigError(f"{run_dir}: the CF run did not finish (train-cf --resume it)")
    return CFRunConfig(
        **{k: v for k, v in info["config"].items() if k in CFRunConfig.__annotations__}
    )


def load_cf_model(run_dir: Path, cfg: CFRunConfig, data) -> torch.nn.Module:
    """The trained CF model of a run (its ``model.safetensors``) for ``data``'s ids, on the
    CPU in train mode; CFEmbeddingError (one line) for a missing, unreadable, non-finite or
    mismatched file."""
    model = build_cf_model(cfg.model, data.n_users, data.n_items, **_model_kwargs(cfg))
    model_file = Path(run_dir) / "model.safetensors"
    verify_safetensors(model_file, CFEmbeddingError)
    try:
        state = load_file(str(model_file))
    except Exception as exc:
        raise CFEmbeddingError(f"{model_file}: not a readable safetensors file ({exc})") from None
    bad_values = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad_values:
        raise CFEmbeddingError(f"{model_file}: NaN or infinite values in {bad_values[:3]}")
    own = model.state_dict()
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CFEmbeddingError(
            f"{model_file}: CF model does not match the data "
            f"({', '.join(f'{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in bad)})"
        )
    model.load_state_dict(state, strict=False)
    if cfg.model == "lightgcn":
        model.set_graph(data["train"])
    return model


def evaluate_cf_run(
    run_dir,
    info: dict,
    *,
    data_path: Optional[str] = None,
    split: str = "test",
    predictions: Optional[str] = None,
    metrics_path: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    from llmrec.data import load_run_data

    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = cf_run_config(run_dir, info)
    data = load_run_data(data_path if data_path is not None else cfg.data)
    if split not in data:
        raise RunConfigError(f"{data.source}: no {split!r} split (has {sorted(data.splits)})")
    model = load_cf_model(run_dir, cfg, data)
    dev = "cpu" if device == "auto" else device
    model.to(dev)
    df = data[split]
    scores = predict_cf(model, df, his_len=cfg.his_len)
    metrics = {
        "model": cfg.model,
        "run": str(run_dir),
        split: _metrics(df, scores),
        "config": dataclasses.asdict(cfg),
        "data": data.summary(),
        "machine": machine_info(str(dev)),
        "wall_time_s": time.perf_counter() - start,
    }
    target = Path(metrics_path) if metrics_path else run_dir / f"eval_{split}.json"
    write_metrics(
        run_dir, metrics, metrics_path=target, predictions=predictions, pred_df=df, scores=scores
    )
    return metrics
