"""The training loop, for any model of any method: it knows no method.

:class:`Trainer` takes a model (the :class:`llmrec.method.Recommender` protocol: ``loss``,
``score``, ``trainable_parameters``, ``save_trainable`` / ``load_trainable``), a source of
training batches, a source of validation batches with a :class:`Metric`, and a
:class:`~llmrec.config.TrainConfig`. It runs AdamW over the trainable parameters (no weight
decay on 1-D ones: :func:`param_groups`) with linear warm-up then cosine decay, evaluates the metric at every epoch end (and every ``eval_every``
steps when set), stops after ``patience`` evaluations without improvement, keeps the best
trainable state in ``best.safetensors``, autocasts to bf16/fp16 on a GPU, and under
``torchrun`` trains under :class:`torch.nn.parallel.DistributedDataParallel`: each rank reads
its share of every epoch, DDP averages the gradients of the trainable parameters (only those:
the frozen base is neither broadcast nor reduced), evaluation scores are gathered from all
ranks before the metric is computed. ``grad_accum_steps`` N runs N micro-batches per optimizer
step (DDP's ``no_sync`` on all but the last), ``gradient_checkpointing`` turns on Hugging
Face's non-reentrant activation checkpointing in the model's LLM (:func:`enable_gradient_checkpointing`).
Without validation batches it trains for the configured epochs and keeps the last state.

Checkpoints (``<out>/checkpoints/ckpt-<seq>-step<step>/``, written by
:func:`llmrec.run_store.write_checkpoint`) hold the trainable state and ``trainer.safetensors``
(optimizer moments, RNG state and the loop's position in safetensors metadata).
``fit(resume=True)`` continues from the latest one: finished epochs and steps are not
repeated, and the data order, learning rate and optimizer moments continue as if
uninterrupted. A multi-stage method runs one trainer per stage, each in its own directory.

A batch source is any object with ``__len__`` (rows) and ``__call__(indices) -> dict`` of
tensors (:class:`llmrec.data.RecCollator`); an optional ``lengths()`` lets prediction batch
rows of similar length together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol

import numpy as np
import torch

from llmrec.config import TrainConfig
from llmrec.errors import CheckpointError, NumericalError, RunConfigError
from llmrec.metrics import auc, json_safe
from llmrec.run_store import (
    BEST,
    TRAIN_LOG,
    TRAINABLE,
    TRAINER,
    latest_checkpoint,
    recover_checkpoints,
    resume_train_log,
    rewrite_jsonl,
    write_checkpoint,
)
from llmrec.safe_files import save_trainable_atomic, verify_safetensors
from llmrec.train_engine import (
    DistEnv,
    batch_rows,
    enable_gradient_checkpointing,
    init_distributed,
    step_summary,
    wrap_ddp,
)
from llmrec.train_log import TrainLog, step_record

__all__ = [
    "AUC",
    "BatchSource",
    "DistEnv",
    "LoopState",
    "Metric",
    "Trainer",
    "check_trainable_compatible",
    "enable_gradient_checkpointing",
    "init_distributed",
    "lr_factor",
    "param_groups",
    "resolve_precision",
]


class BatchSource(Protocol):
    """Rows that become batches: ``len(source)`` rows, ``source(indices)`` a batch dict.

    Optional: ``lengths()`` ``(len(source),)`` (prediction batches rows of similar length),
    or ``batches(batch_size)``, the prediction's index batches themselves (each row once).
    """

    def __len__(self) -> int: ...

    def __call__(self, indices) -> Dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Metric:
    """A validation metric, larger is better: ``fn(scores, source) -> float`` where
    ``scores`` ``(len(source),)`` float64 are the model's scores of the source's rows."""

    name: str
    fn: Callable[[np.ndarray, Any], float]

    def __call__(self, scores: np.ndarray, source) -> float:
        return float(self.fn(scores, source))


#: ROC AUC of the scores against the source's labels (``source.labels()``)
AUC = Metric("auc", lambda scores, source: auc(source.labels(), scores))


# ---------------------------------------------------------------------------------------------
# schedule, config


def group_by_length(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    batches_per_group: int = 64,
) -> np.ndarray:
    """``order`` rearranged so that consecutive ``batch_size`` slices hold similar lengths.

    ``order`` (a random permutation of row indices) is cut into groups of
    ``batches_per_group`` batches; each group is sorted by ``lengths[row]`` and cut into
    batches, and the batches of the whole epoch are shuffled with ``generator``. Which rows
    share a group stays random, so a batch is a random draw of similar-length rows and the
    loss sees no length-ordered curriculum. A trailing partial batch stays last (the trainer
    drops the rows of an incomplete batch in the same place as without grouping).
    """
    group = batch_size * batches_per_group
    parts = []
    for start in range(0, len(order), group):
        chunk = order[start : start + group]
        parts.append(chunk[np.argsort(lengths[chunk], kind="stable")])
    ordered = np.concatenate(parts) if parts else order
    n_full = len(ordered) // batch_size
    batches = ordered[: n_full * batch_size].reshape(n_full, batch_size)
    perm = torch.randperm(n_full, generator=generator).numpy()
    return np.concatenate([batches[perm].reshape(-1), ordered[n_full * batch_size :]])


def lr_factor(
    step: int, total: int, warmup: int, min_ratio: float = 0.0, start_ratio: Optional[float] = None
) -> float:
    """Multiplier of the base lr before update ``step`` (0-based): linear warm-up, cosine.

    ``start_ratio`` None: the warm-up rises as ``(step + 1) / warmup`` (the project's quick
    schedule). A float: it rises linearly from ``start_ratio`` at step 0 to 1 at step
    ``warmup`` (LAVIS' ``warmup_lr_schedule``, which CoLLM and CoRA run: from ``warmup_lr``
    1e-5 to ``init_lr`` 1e-3). After the warm-up: cosine from 1 down to ``min_ratio`` at
    ``total`` (LAVIS' ``min_lr`` 8e-5 is ``min_ratio`` 0.08 of 1e-3).
    """
    if warmup > 0 and step < warmup:
        if start_ratio is None:
            return (step + 1) / warmup
        return start_ratio + (1.0 - start_ratio) * step / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _accum_steps(cfg: TrainConfig) -> int:
    # a config written before the field existed steps once per batch
    return getattr(cfg, "grad_accum_steps", 1)


def _warmup_start(cfg: TrainConfig) -> Optional[float]:
    # a config written before the field existed warms up as it did then
    return getattr(cfg, "warmup_start_ratio", None)


def param_groups(params: List[torch.nn.Parameter], cfg: TrainConfig) -> List[dict]:
    """AdamW parameter groups: weight decay ``cfg.weight_decay`` on tensors of 2 or more
    dimensions, none on 1-D ones (biases, LayerNorm gains and shifts).

    The LAVIS runner of CoLLM and CoRA (``minigpt4/runners/runner_base.py``, ``optimizer``)
    puts every parameter with ``ndim < 2`` (or a name holding ``bias``/``ln``/``bn``) in a
    group without weight decay; here the 1-D rule alone, since the trainable tensors come
    without names. Empty groups are dropped.
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``--precision`` on ``device`` (None: no autocast)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise RunConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise RunConfigError(f"--precision {precision} needs a CUDA device (autocast on GPU)")
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ---------------------------------------------------------------------------------------------
# checkpoints


def _trainable_shapes(model) -> Dict[str, tuple]:
    state = getattr(model, "trainable_state", None)
    if callable(state):
        return {k: tuple(v.shape) for k, v in state().items()}
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "probe.safetensors"
        model.save_trainable(str(p))
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def check_trainable_compatible(model, path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` holds exactly the model's trainable shapes.

    Reads only the safetensors header (no tensor data); called before any training.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    verify_safetensors(path, CheckpointError)
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint: {exc}") from exc
    own = _trainable_shapes(model)
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    mismatched = [
        f"{k}: checkpoint {saved[k]} vs model {own[k]}"
        for k in sorted(set(own) & set(saved))
        if saved[k] != own[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. " + "; ".join(mismatched[:3]))
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"{path}: checkpoint is from another model shape ({' | '.join(parts)}); check "
            "--method/--rank/--generator/--llm/--cf against the run that wrote it"
        )


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[Dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], groups) -> None:
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class LoopState:
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # batches of the current epoch already done
    global_step: int = 0
    best_auc: float = -1.0  # the best value of the validation metric (AUC unless set)
    best_step: int = -1
    bad_evals: int = 0
    last_eval_step: int = -1
    seq: int = 0  # checkpoint counter
    done: bool = False
    stopped_early: bool = False
    history: List[dict] = field(default_factory=list)
    # seconds spent in fit() to reach this state, summed over the resumed segments (the work
    # a kill threw away, redone after the resume, counts once)
    train_time_s: float = 0.0
    # training loss summed since the last evaluation, in the checkpoint so that the record
    # after a resume averages every step since that evaluation, not only the resumed ones
    loss_sum: float = 0.0
    loss_steps: int = 0


class Trainer:
    """Train ``model`` on ``train`` batches with early stopping on ``metric`` over ``valid``.

    ``train`` / ``valid`` are batch sources (see the module doc; either may be None: no
    training, or no validation). ``metric`` defaults to :data:`AUC`. ``callback(event,
    state)`` is called with ``"checkpoint"`` after every checkpoint and ``"eval"`` after every
    evaluation (tests use it to interrupt a run).
    """

    def __init__(
        self,
        model,
        train: Optional[BatchSource],
        valid: Optional[BatchSource],
        cfg: TrainConfig,
        out_dir,
        *,
        metric: Metric = AUC,
        device="cpu",
        env: Optional[DistEnv] = None,
        log: Optional[Callable[[str], None]] = None,
        callback: Optional[Callable[[str, LoopState], None]] = None,
    ):
        self.model = model
        self.train_data = train
        self.valid_data = valid
        self.metric = metric
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.env = env or DistEnv()
        self.log = log or (lambda msg: None)
        self.callback = callback
        self.params = [p for p in model.trainable_parameters()]
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        # the DDP wrapper of model.loss under torchrun, inside fit() only
        self._ddp: Optional[torch.nn.Module] = None
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.state = LoopState()
        # (perf_counter at fit()'s start, state.train_time_s then); None outside fit()
        self._clock: Optional[tuple] = None
        # the open train_log.jsonl (and TensorBoard) of the main rank, inside fit() only
        self._train_log: Optional[TrainLog] = None
        self.optimizer = (
            torch.optim.AdamW(
                param_groups(self.params, cfg), lr=cfg.lr, betas=tuple(cfg.adam_betas)
            )
            if self.params
            else None
        )

    # -- helpers ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    def steps_per_epoch(self) -> int:
        if self.train_data is None:
            return 0
        n = len(self.train_data) // self.env.world_size
        return max(1, math.ceil(n / self._step_rows())) if n else 0

    def _step_rows(self) -> int:
        """Rows of one optimizer step on one rank: ``grad_accum_steps`` micro-batches."""
        return self.cfg.batch_size * _accum_steps(self.cfg)

    def total_steps(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch()
        if self.cfg.max_steps is not None:
            total = min(total, self.cfg.max_steps)
        return total

    def warmup_steps(self) -> int:
        if self.cfg.warmup_steps is not None:
            return self.cfg.warmup_steps
        return round(self.cfg.warmup_ratio * self.total_steps())

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        n = len(self.train_data)
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).numpy()
        lengths = getattr(self.train_data, "lengths", None)
        world = self.env.world_size
        if self.cfg.group_by_length and callable(lengths):
            # grouped by the global batch (every rank's batch b together), before the ranks
            # take their rows: DDP then trains on the batches one process would
            perm = group_by_length(perm, lengths(), self._step_rows() * world, g)
        per_rank = n // world
        return perm[self.env.rank :: world][:per_rank]

    # -- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data: BatchSource, desc: str = "predict") -> np.ndarray:
        """Scores for every example of ``data`` (all ranks share the work and get all scores)."""
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        n = len(data)
        bs = self.cfg.eval_batch_size
        plan = getattr(data, "batches", None)
        if callable(plan):
            # the source knows which examples share work (A-LLMRec: one prompt per episode)
            batches = [np.asarray(b, dtype=np.int64) for b in plan(bs)]
            mine_batches = batches[self.env.rank :: self.env.world_size]
        else:
            lengths = getattr(data, "lengths", None)
            # rows of similar length together: less padding per batch
            order = np.argsort(lengths(), kind="stable") if callable(lengths) else np.arange(n)
            own = order[self.env.rank :: self.env.world_size]
            mine_batches = [own[s : s + bs] for s in range(0, len(own), bs)]
        mine = np.concatenate(mine_batches) if mine_batches else np.empty(0, dtype=np.int64)
        scores = np.empty(len(mine), dtype=np.float64)
        bar = tqdm(
            mine_batches,
            desc=desc,
            disable=not (self.cfg.progress and self.env.is_main),
            leave=False,
        )
        start = 0
        for idx in bar:
            with self._autocast():
                out = self.model.score(self._to_device(data(idx)))
            scores[start : start + len(idx)] = out.float().cpu().numpy()
            start += len(idx)
        self.model.train(was_training)
        if self.env.enabled:
            parts: List[Any] = [None] * self.env.world_size
            torch.distributed.all_gather_object(parts, (mine, scores))
            full = np.empty(n, dtype=np.float64)
            for idx, sc in parts:
                full[idx] = sc
            return full
        full = np.empty(n, dtype=np.float64)
        full[mine] = scores
        return full

    def evaluate(self, data: BatchSource, desc: str = "valid") -> float:
        """The metric of the model's scores over ``data``."""
        return self.metric(self.predict(data, desc), data)

    # -- checkpoints -----------------------------------------------------------------------
    def _tick(self) -> None:
        """Bring ``state.train_time_s`` up to now (fit() set the clock)."""
        if self._clock is not None:
            start, before = self._clock
            self.state.train_time_s = before + time.perf_counter() - start

    def _state_json(self) -> str:
        self._tick()
        st = dataclasses.asdict(self.state)
        st["best_auc"] = st["best_auc"] if math.isfinite(st["best_auc"]) else -1.0
        st["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        st["world_size"] = self.env.world_size
        return json.dumps(json_safe(st))

    def save_checkpoint(self) -> Optional[Path]:
        self.state.seq += 1
        path = None
        if self.env.is_main:
            from safetensors.torch import save_file

            def fill(tmp: Path) -> None:
                self.model.save_trainable(str(tmp / TRAINABLE))
                opt = self.optimizer
                tensors, groups = _optimizer_tensors(opt) if opt is not None else ({}, [])
                tensors["rng.torch"] = torch.get_rng_state()
                meta = {"trainer_state": self._state_json(), "param_groups": json.dumps(groups)}
                save_file(tensors, str(tmp / TRAINER), metadata=meta)

            name = f"ckpt-{self.state.seq:06d}-step{self.state.global_step:08d}"
            path = write_checkpoint(self.out, name, fill, keep=self.cfg.keep_checkpoints)
        self.env.barrier()
        if self.callback is not None:
            self.callback("checkpoint", self.state)
        return path

    def load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open

        check_trainable_compatible(self.model, path / TRAINABLE)
        verify_safetensors(path / TRAINER, CheckpointError)
        self.model.load_trainable(str(path / TRAINABLE))
        try:
            with safe_open(str(path / TRAINER), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            st = json.loads(meta["trainer_state"])
        except Exception as exc:
            raise CheckpointError(f"{path / TRAINER}: unreadable trainer state ({exc})") from None
        if st.get("world_size", 1) != self.env.world_size:
            raise CheckpointError(
                f"{path}: written by a run with {st.get('world_size')} process(es); resume "
                f"with the same number (now {self.env.world_size}) so the data order matches"
            )
        scaler = st.pop("scaler", None)
        st.pop("world_size", None)
        self.state = LoopState(**st)
        if self.state.best_auc is None:
            self.state.best_auc = -1.0
        if self.optimizer is not None:
            _load_optimizer(self.optimizer, tensors, json.loads(meta["param_groups"]))
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if scaler and self.scaler is not None:
            self.scaler.load_state_dict(scaler)
        self.log(
            f"resumed from {path} (epoch {self.state.epoch}, step {self.state.global_step}, "
            f"best valid AUC {self.state.best_auc:.4f})"
        )

    # -- training ----------------------------------------------------------------------------
    def _eval_and_track(self) -> None:
        st = self.state
        record = {
            "kind": "eval",
            "step": st.global_step,
            "epoch": st.epoch + (st.step_in_epoch / max(1, self.steps_per_epoch())),
            "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0,
            "time": time.time(),
        }
        if st.loss_steps:
            record["train_loss"] = st.loss_sum / st.loss_steps
            st.loss_sum, st.loss_steps = 0.0, 0
        st.last_eval_step = st.global_step
        if self.valid_data is None:  # nothing to select on: the last state is kept
            st.history.append(record)
            self.log(f"step {st.global_step}: train loss {record.get('train_loss', 0.0):.4f}")
            self._append_log(record)
            if self.callback is not None:
                self.callback("eval", st)
            return
        try:
            value = self.evaluate(self.valid_data)
        except NumericalError as exc:  # diverged: the state of this step is not saved
            raise NumericalError(f"step {st.global_step}: {exc} (now {self.cfg.lr:g})") from None
        record[f"valid_{self.metric.name}"] = value
        st.history.append(record)
        if value > st.best_auc:
            st.best_auc, st.best_step, st.bad_evals = value, st.global_step, 0
            if self.env.is_main:
                save_trainable_atomic(self.model, self.out / BEST)
        else:
            st.bad_evals += 1
            if st.bad_evals >= self.cfg.patience:
                st.stopped_early = True
        name = "AUC" if self.metric.name == "auc" else self.metric.name
        self.log(
            f"step {st.global_step}: valid {name} {value:.4f} "
            f"(best {st.best_auc:.4f} at step {st.best_step})"
            + (" - early stop" if st.stopped_early else "")
        )
        self._append_log(record)
        if self.callback is not None:
            self.callback("eval", st)

    def _append_log(self, record: dict) -> None:
        if self.env.is_main and self._train_log is not None:
            self._train_log.write(record)

    def _train_step(self, batches: List[Dict[str, torch.Tensor]], lr: float) -> float:
        """One optimizer step over its micro-batches; returns the step's loss.

        Each micro-batch's mean loss is weighted by its share of the step's rows, so the
        gradient is that of the mean over all of them (N equal micro-batches: the batch N times
        larger). Under DDP only the last micro-batch's backward synchronises (``no_sync``).
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = [batch_rows(b) for b in batches]
        total_rows = max(1, sum(rows))
        value = 0.0
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            sync = self._ddp.no_sync() if self._ddp is not None and not last else None
            with sync or contextlib.nullcontext():
                with self._autocast():
                    if self._ddp is not None:
                        loss = self._ddp(self._to_device(batch))
                    else:
                        loss = self.model.loss(self._to_device(batch))
                part = float(loss.detach())
                self._stop_if_not_finite(part, loss.device)
                if len(batches) > 1:
                    loss = loss * (rows[j] / total_rows)
                    value += part * rows[j] / total_rows
                else:
                    value = part
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
        for p in self.params:
            if p.grad is None:  # a parameter this step did not reach still steps (moments)
                p.grad = torch.zeros_like(p)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip and self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.loss_sum += value
        self.state.loss_steps += 1
        return value

    def _stop_if_not_finite(self, value: float, device) -> None:
        """Stop at the first non-finite loss, before it reaches the weights (every rank
        stops together under DDP); the last checkpoint and best state stay as they are."""
        bad = not math.isfinite(value)
        if self.env.enabled:
            import torch.distributed as dist

            flag = torch.tensor([float(bad)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if bad:
            ckpt = latest_checkpoint(self.out)
            kept = f"the last good checkpoint {ckpt.name} is kept" if ckpt else "no checkpoint yet"
            raise NumericalError(
                f"step {self.state.global_step + 1}: the training loss is {value} (not finite); "
                f"stopped ({kept}); lower --lr (now {self.cfg.lr:g}) or set --grad-clip, then "
                "--resume"
            )

    def fit(self, resume: bool = False) -> LoopState:
        """Train until ``epochs`` / ``max_steps`` / early stopping; then load the best state."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.env.is_main:
            recover_checkpoints(self.out, self.log)  # orphans of a kill, before anyone reads
        self.env.barrier()
        ckpt = latest_checkpoint(self.out) if resume else None
        if resume and ckpt is None:
            self.log(f"--resume: no checkpoint under {self.out}/checkpoints; starting fresh")
        if ckpt is None:
            torch.manual_seed(self.cfg.seed)
        else:
            self.load_checkpoint(ckpt)
            # a run that stopped on its budget continues when --epochs/--max-steps grew
            if self.state.done and not self.state.stopped_early:
                self.state.done = False
        if self.env.is_main:  # the checkpoint's history and steps: no torn or repeated line
            kept = resume_train_log(
                self.out / TRAIN_LOG, self.state.history, self.state.global_step
            )
            rewrite_jsonl(self.out / TRAIN_LOG, kept)
            self._train_log = TrainLog(self.out, tensorboard=self.cfg.tensorboard)
        try:
            return self._fit(resume)
        finally:
            self._ddp = None  # its hooks go with it: the next stage wraps its own parameters
            if self._train_log is not None:
                self._train_log.close()
                self._train_log = None

    def _fit(self, resume: bool) -> LoopState:
        from tqdm.auto import tqdm

        self._clock = (time.perf_counter(), self.state.train_time_s)
        st = self.state
        if not self.params or self.train_data is None or self.cfg.epochs <= 0:
            st.done = True
        if self.env.enabled and not st.done:  # broadcasts rank 0's trainable state
            accumulates = _accum_steps(self.cfg) > 1  # no_sync: no static graph
            self._ddp = wrap_ddp(self.model, self.params, self.device, static_graph=not accumulates)
        total, warmup = self.total_steps(), self.warmup_steps()
        spe = self.steps_per_epoch()
        if not st.done:
            self.log(
                f"training: {len(self.params)} trainable tensors "
                f"({sum(p.numel() for p in self.params):,} values), {spe} steps/epoch x "
                f"{self.cfg.epochs} epochs, {total} steps total (warm-up {warmup}), "
                f"world size {self.env.world_size}"
            )
            self.model.train()
        bar = tqdm(
            total=total,
            initial=st.global_step,
            desc="train",
            disable=st.done or not (self.cfg.progress and self.env.is_main),
        )
        while not st.done:
            if st.epoch >= self.cfg.epochs or st.global_step >= total:
                st.done = True
                break
            indices = self._epoch_indices(st.epoch)
            bs, step_rows = self.cfg.batch_size, self._step_rows()
            stop = False
            while st.step_in_epoch < spe and st.global_step < total:
                b = st.step_in_epoch
                step_start = time.perf_counter()
                mine = indices[b * step_rows : (b + 1) * step_rows]
                batches = [self.train_data(mine[j : j + bs]) for j in range(0, len(mine), bs)]
                lr = self.cfg.lr * lr_factor(
                    st.global_step, total, warmup, self.cfg.min_lr_ratio, _warmup_start(self.cfg)
                )
                loss = self._train_step(batches, lr)
                st.step_in_epoch += 1
                st.global_step += 1
                if self.env.is_main:
                    self._append_log(
                        step_record(
                            step=st.global_step,
                            epoch=st.epoch + st.step_in_epoch / spe,
                            loss=loss,
                            lr=lr,
                            batch=step_summary(batches),
                            seconds=time.perf_counter() - step_start,
                            world_size=self.env.world_size,
                            device=self.device,
                        )
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=st.epoch)
                # the epoch-end checkpoint below follows at once: no second one of this step
                ends = st.step_in_epoch >= spe or st.global_step >= total
                if self.cfg.eval_every and st.global_step % self.cfg.eval_every == 0:
                    self._eval_and_track()
                    if st.stopped_early:
                        self.save_checkpoint()
                        stop = True
                        break
                    if not ends:
                        self.save_checkpoint()
                elif self.cfg.save_every and st.global_step % self.cfg.save_every == 0 and not ends:
                    self.save_checkpoint()
            if stop:
                st.done = True
                break
            if st.step_in_epoch >= spe:
                st.epoch += 1
                st.step_in_epoch = 0
            if st.last_eval_step != st.global_step:
                self._eval_and_track()
            if st.stopped_early or st.epoch >= self.cfg.epochs or st.global_step >= total:
                st.done = True
            self.save_checkpoint()
        bar.close()
        if self.cfg.save_rank_state:  # each rank's own final state (checks DDP sync)
            save_trainable_atomic(self.model, self.out / f"rank-{self.env.rank}.safetensors")
        self.env.barrier()
        if (self.out / BEST).exists() and st.best_step >= 0 and self.valid_data is not None:
            verify_safetensors(self.out / BEST, CheckpointError)
            self.model.load_trainable(str(self.out / BEST))
        elif self.env.is_main:
            save_trainable_atomic(self.model, self.out / BEST)
        self.env.barrier()
        self._tick()
        return st


# ---------------------------------------------------------------------------------------------
