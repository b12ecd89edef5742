"""Train CF models with BCE and early stopping on validation AUC; export/load embeddings.

Embedding files (``embeddings.safetensors``) hold ``user_emb`` ``(n_users + 1, d)`` and
``item_emb`` ``(n_items + 1, d)`` float32 tensors (row 0 = padding) and metadata
``{"format": "llmrec-cf-v1", "model", "dim", "n_users", "n_items"}``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from llmrec.cf.models import bce, pad_histories
from llmrec.cf.next_item import NextItemPairs, ranking_rows
from llmrec.errors import CFEmbeddingError, NumericalError
from llmrec.metrics import auc
from llmrec.run_store import RUN_FILE
from llmrec.safe_files import read_json, save_safetensors, verify_safetensors

__all__ = [
    "EMBEDDINGS_FILE",
    "OBJECTIVES",
    "CFConfig",
    "CFEmbeddingError",
    "CFEmbeddings",
    "load_cf_embeddings",
    "predict_cf",
    "save_cf_embeddings",
    "train_cf",
]

EMBEDDINGS_FILE = "embeddings.safetensors"
FORMAT = "llmrec-cf-v1"


@dataclass
class CFConfig:
    epochs: int = 200
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0
    valid_split: str = "valid"
    his_len: int = 50
    # "labels": BCE on the labelled training rows; "next-item": each positive training row
    # against one random unrated item (llmrec.cf.next_item.NextItemPairs)
    objective: str = "labels"


@dataclass
class CFResult:
    best_epoch: int
    best_valid_auc: float
    epochs_run: int
    history: List[dict] = field(default_factory=list)
    # seconds of training, summed over the resumed segments (redone work counts once)
    wall_time_s: float = 0.0


def _tensors(df: pd.DataFrame, needs_his: bool, his_len: int) -> Dict[str, torch.Tensor]:
    out = {
        "uid": torch.as_tensor(df["uid"].to_numpy(np.int64, copy=True)),
        "iid": torch.as_tensor(df["iid"].to_numpy(np.int64, copy=True)),
        "labels": torch.as_tensor(df["label"].to_numpy(np.float32, copy=True)),
    }
    if needs_his:
        out["his"] = pad_histories(df["his"].tolist(), his_len)
    return out


OBJECTIVES = ("labels", "next-item")


class _TrainBatches:
    """One epoch's shuffled training batches of ``cfg.objective`` (tensors on the CPU).

    ``labels``: batches of ``batch_size`` labelled rows. ``next-item``: batches of
    ``batch_size`` positive rows, each followed by its negative (``2 * batch_size`` rows).
    The shuffle draws from ``gen`` alone, so "labels" draws what it drew before the option.
    """

    def __init__(self, data, cfg: CFConfig, needs_his: bool):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
        self.pairs = None
        train_df = data["train"]
        if cfg.objective == "next-item":
            self.pairs = NextItemPairs(train_df, data.n_items, seed=cfg.seed)
            train_df = self.pairs.positives
        self.rows = _tensors(train_df, needs_his, cfg.his_len)
        self.n, self.batch_size = len(train_df), cfg.batch_size

    def __call__(self, epoch: int, gen: torch.Generator):
        negatives = self.pairs.negatives(epoch) if self.pairs is not None else None
        perm = torch.randperm(self.n, generator=gen)
        for start in range(0, self.n, self.batch_size):
            idx = perm[start : start + self.batch_size]
            batch = {k: v[idx] for k, v in self.rows.items()}
            yield batch if negatives is None else NextItemPairs.pair(batch, negatives[idx])


def validation_rows(data, cfg: CFConfig) -> pd.DataFrame:
    """The rows whose AUC selects the epoch: ``labels``: the labelled ``cfg.valid_split``;
    ``next-item``: its positives against one unrated item each
    (:func:`llmrec.cf.next_item.ranking_rows`). The like/dislike labels do not measure the
    next-item task (a next-item model that learnt popularity alone may rank them at chance)."""
    if cfg.objective == "next-item":
        return ranking_rows(data, cfg.valid_split, seed=cfg.seed)
    return data[cfg.valid_split]


def _needs_his(model) -> bool:
    return getattr(model, "kind", "") == "sasrec"


@torch.no_grad()
def predict_cf(model, df: pd.DataFrame, batch_size: int = 4096, his_len: int = 50) -> np.ndarray:
    """Logits of ``model`` for every row of ``df``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    t = _tensors(df, _needs_his(model), his_len)
    outs = []
    for start in range(0, len(df), batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in t.items()}
        outs.append(model(batch).float().cpu())
    model.train(was_training)
    return torch.cat(outs).numpy()


def _save_state(
    path: Path, model, opt, gen, best, bad: int, history: List[dict], stop: bool, seconds: float
):
    """Everything the loop needs to continue after the epoch just finished (one file)."""
    import json

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best[2].items()})
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"], tensors["rng.gen"] = torch.get_rng_state(), gen.get_state()
    meta = {"loop": json.dumps({"best_auc": best[0], "best_epoch": best[1], "bad": bad,
                                "history": history, "stop": stop, "seconds": seconds}),
            "param_groups": json.dumps(sd["param_groups"])}  # fmt: skip
    save_safetensors(path, tensors, metadata=meta)


def _load_state(path: Path, model, opt, gen, device):
    """``(best, bad, history, stop, seconds)`` of :func:`_save_state`'s file, model/opt/RNGs
    restored (``seconds`` 0 in a file of an older version)."""
    import json

    verify_safetensors(path, CFEmbeddingError)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    loop = json.loads(meta["loop"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: Dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v.to(device) if key != "step" else v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.gen"])
    best_sd = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
    best = (loop["best_auc"], loop["best_epoch"], best_sd)
    return best, loop["bad"], loop["history"], loop["stop"], float(loop.get("seconds", 0.0))


def train_cf(
    model,
    data,
    cfg: CFConfig,
    *,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    state_path: Optional[Union[str, Path]] = None,
    resume: bool = False,
) -> CFResult:
    """BCE training with Adam (L2 ``weight_decay``) on the rows of ``cfg.objective``; keeps
    the weights of the best validation AUC (on :func:`validation_rows`).

    With ``state_path`` the loop's whole state is saved there (atomically) after every epoch;
    ``resume`` continues from it when it exists, with the result of an uninterrupted run.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    if getattr(model, "kind", "") == "lightgcn":
        model.set_graph(data["train"])
    batches = _TrainBatches(data, cfg, _needs_his(model))
    valid_df = validation_rows(data, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    history: List[dict] = []
    bad, stop, before = 0, False, 0.0
    if resume and state_path is not None and Path(state_path).exists():
        best, bad, history, stop, before = _load_state(Path(state_path), model, opt, gen, device)
        if log is not None:
            log(f"resumed the CF training after epoch {len(history)}")
    start_time = time.perf_counter()
    first = len(history) + 1
    bar = tqdm(
        range(first, cfg.epochs + 1 if not stop else first),
        desc=f"train-cf {model.kind}",
        disable=not progress,
    )
    epoch = len(history)
    for epoch in bar:
        model.train()
        total, n = 0.0, 0
        for step, rows in enumerate(batches(epoch, gen), 1):
            batch = {k: v.to(device) for k, v in rows.items()}
            loss = bce(model(batch), batch["labels"])
            if not torch.isfinite(loss):  # before it reaches the weights
                raise NumericalError(
                    f"epoch {epoch}, step {step}: the training loss is "
                    f"{float(loss.detach())} (not finite); stopped, nothing of this epoch was saved; "
                    f"lower --lr (now {cfg.lr:g}) and start again with --force"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch["labels"])
            n += len(batch["labels"])
        try:
            valid_auc = auc(valid_df["label"], predict_cf(model, valid_df, his_len=cfg.his_len))
        except NumericalError as exc:
            raise NumericalError(f"epoch {epoch}: {exc} (now {cfg.lr:g}); nothing of this "
                                 "epoch was saved") from None  # fmt: skip
        history.append({"epoch": epoch, "train_loss": total / n, "valid_auc": valid_auc})
        bar.set_postfix(loss=f"{total / n:.4f}", valid_auc=f"{valid_auc:.4f}")
        if log is not None:
            log(f"epoch {epoch}: train_loss {total / n:.4f} valid_auc {valid_auc:.4f}")
        if valid_auc > best[0]:
            best = (valid_auc, epoch, copy.deepcopy(model.state_dict()))
            bad = 0
        else:
            bad += 1
            stop = bad >= cfg.patience
        if state_path is not None:
            seconds = before + time.perf_counter() - start_time
            _save_state(Path(state_path), model, opt, gen, best, bad, history, stop, seconds)
        if stop:
            break
    model.load_state_dict(best[2])
    return CFResult(
        best_epoch=best[1],
        best_valid_auc=best[0],
        epochs_run=epoch,
        history=history,
        wall_time_s=before + time.perf_counter() - start_time,
    )


@dataclass
class CFEmbeddings:
    user: torch.Tensor
    item: torch.Tensor
    meta: Dict[str, str]
    path: str = ""

    @property
    def dim(self) -> int:
        return int(self.user.shape[1])

    def check_matches(self, n_users: int, n_items: int, data_source: str = "the data") -> None:
        """Raise :class:`CFEmbeddingError` unless the tables have ``n + 1`` rows each."""
        problems = []
        if self.user.shape[0] != n_users + 1:
            problems.append(
                f"user_emb has {self.user.shape[0]} rows but {data_source} has {n_users} users "
                f"(needs {n_users + 1} rows: ids 1..{n_users} plus padding row 0)"
            )
        if self.item.shape[0] != n_items + 1:
            problems.append(
                f"item_emb has {self.item.shape[0]} rows but {data_source} has {n_items} items "
                f"(needs {n_items + 1} rows: ids 1..{n_items} plus padding row 0)"
            )
        if problems:
            raise CFEmbeddingError(
                f"{self.path}: CF embeddings do not match the data: "
                + "; ".join(problems)
                + ". Were they trained on another dataset? Re-run `llmrec train-cf` on this data."
            )


def save_cf_embeddings(
    path: Union[str, Path], user: torch.Tensor, item: torch.Tensor, model: str, **meta
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "model": model,
        "dim": str(user.shape[1]),
        "n_users": str(user.shape[0] - 1),
        "n_items": str(item.shape[0] - 1),
        **{k: str(v) for k, v in meta.items()},
    }
    tensors = {"user_emb": user.detach().float(), "item_emb": item.detach().float()}
    return save_safetensors(path, tensors, metadata=metadata)


def load_cf_embeddings(
    path: Union[str, Path], n_users: Optional[int] = None, n_items: Optional[int] = None
) -> CFEmbeddings:
    """Load ``embeddings.safetensors`` (``path`` may be the file or its directory)."""
    path = Path(path)
    if path.is_dir():
        run_file = path / RUN_FILE
        if run_file.exists() and read_json(run_file, CFEmbeddingError).get("complete") is False:
            raise CFEmbeddingError(
                f"{path}: the CF run did not finish (killed?); `llmrec train-cf --resume` it"
            )
        path = path / EMBEDDINGS_FILE
    if not path.exists():
        raise CFEmbeddingError(
            f"{path}: no CF embedding file (train one with `llmrec train-cf --out DIR`)"
        )
    verify_safetensors(path, CFEmbeddingError)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = {"user_emb", "item_emb"} - keys
            if missing:
                raise CFEmbeddingError(
                    f"{path}: missing tensor(s) {sorted(missing)} (has {sorted(keys)})"
                )
            user, item = f.get_tensor("user_emb"), f.get_tensor("item_emb")
            meta = dict(f.metadata() or {})
    except CFEmbeddingError:
        raise
    except Exception as exc:
        raise CFEmbeddingError(f"{path}: not a readable safetensors file: {exc}") from exc
    if user.ndim != 2 or item.ndim != 2 or user.shape[1] != item.shape[1]:
        raise CFEmbeddingError(
            f"{path}: user_emb {tuple(user.shape)} and item_emb {tuple(item.shape)} must be "
            "2-D with the same width"
        )
    for name, table in (("user_emb", user), ("item_emb", item)):
        if not torch.isfinite(table).all():
            row = int((~torch.isfinite(table)).any(dim=1).nonzero()[0])
            raise CFEmbeddingError(
                f"{path}: {name} holds NaN or infinite values (first in row {row}); retrain "
                "the CF model"
            )
    emb = CFEmbeddings(user=user.float(), item=item.float(), meta=meta, path=str(path))
    if n_users is not None and n_items is not None:
        emb.check_matches(n_users, n_items)
    return emb


def config_dict(cfg: CFConfig) -> dict:
    return asdict(cfg)
