"""Training of the LLM methods (CoRA, and any method registered in :data:`METHODS`).

The loop (:class:`Trainer`): AdamW over the method's ``trainable_parameters()``, linear
warm-up then cosine decay, evaluation of the validation AUC at every epoch end (and every
``eval_every`` steps when set), early stopping after ``patience`` evaluations without
improvement, the best trainable state kept in ``best.safetensors``, bf16/fp16 autocast on a
GPU, and DDP under ``torchrun``: each rank reads its share of every epoch, gradients of the
trainable parameters are averaged with ``all_reduce`` after every backward (so the generator
and the ``lora_B`` factors stay identical on all ranks), evaluation scores are gathered from
all ranks before the AUC is computed.

Checkpoints (``<out>/checkpoints/ckpt-<seq>-step<step>/``) hold the trainable state (the
method's ``save_trainable``) and ``trainer.safetensors`` (optimizer moments, RNG state and
the loop's position in safetensors metadata). A checkpoint directory is written under a
temporary name and renamed into place, then the ``latest`` pointer file is replaced
atomically, so an interrupted run always finds a complete checkpoint. ``resume=True``
continues from it: finished epochs and steps are not repeated, and the data order, learning
rate and optimizer moments continue as if uninterrupted.

Methods plug in through :func:`register_method`: a builder
``build(llm, tokenizer, cf_dim, options) -> model`` whose model has ``score(batch)``,
``loss(batch)``, ``trainable_parameters()``, ``save_trainable(path)`` and
``load_trainable(path)`` (the CoRA contract), plus the prompt template it needs.
:func:`run_training` / :func:`run_evaluation` assemble data, CF embeddings, the LLM and the
method from a :class:`RunConfig`; the ``llmrec`` CLI is a thin layer over them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.data.batching import MODEL_KEYS, RecCollator, make_examples, pad_id_of
from llmrec.metrics import auc, evaluate_predictions, json_safe

__all__ = [
    "METHODS",
    "CheckpointError",
    "DistEnv",
    "FrozenLLMScorer",
    "MethodSpec",
    "RunConfig",
    "RunConfigError",
    "TrainConfig",
    "Trainer",
    "check_trainable_compatible",
    "get_method",
    "init_distributed",
    "lr_factor",
    "register_method",
    "run_evaluation",
    "run_training",
]

LATEST = "latest"
BEST = "best.safetensors"
TRAINABLE = "trainable.safetensors"
TRAINER = "trainer.safetensors"
RUN_FILE = "run.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this model (other shapes, missing, corrupt)."""


class RunConfigError(ValueError):
    """The run's options are inconsistent (resume into another config, out dir in use, ...)."""


# ---------------------------------------------------------------------------------------------
# method registry


@dataclass
class MethodSpec:
    """How ``llmrec train --method NAME`` builds a model.

    ``build(llm, tokenizer, cf_dim, options)`` returns a model with the CoRA contract;
    ``options`` is :meth:`RunConfig.method_options` (rank, alpha, generator, ...,
    ``method_kwargs``: the free-form ``--method-kwargs`` JSON for method-specific options).
    ``template`` is the prompt template key (``"cora"`` or ``"collm"``); ``uses_cf`` says
    whether CF embeddings are needed; ``trains`` is False for zero-shot scorers.
    ``runner``, when set, replaces :func:`run_training` for the method (multi-stage
    schedules); it is called as ``runner(cfg, env=, log=, callback=, data=)`` and returns
    the metrics dict. ``examples``, when set, replaces
    :func:`llmrec.data.make_examples` (same signature) for training, validation, test and
    ``llmrec evaluate``, e.g. for prompts with placeholder tokens. ``evaluator``, when set,
    replaces the scoring in :func:`run_evaluation`: ``evaluator(run_dir, cfg, split=,
    metrics_path=, predictions=)`` with ``cfg`` the run's config (its own LLM).
    """

    name: str
    build: Callable[[nn.Module, Any, int, Dict[str, Any]], nn.Module]
    template: str = "cora"
    uses_cf: bool = True
    trains: bool = True
    description: str = ""
    runner: Optional[Callable[..., dict]] = None
    examples: Optional[Callable[..., Any]] = None
    evaluator: Optional[Callable[..., dict]] = None


METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, overwrite: bool = False) -> MethodSpec:
    """Add a method to :data:`METHODS` (``overwrite`` to replace an existing one)."""
    if spec.name in METHODS and not overwrite:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise RunConfigError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def _build_cora(llm, tokenizer, cf_dim: int, options: Dict[str, Any]) -> nn.Module:
    from llmrec.cora import CoRARecommender

    return CoRARecommender(
        llm,
        tokenizer,
        cf_dim,
        rank=int(options.get("rank", 16)),
        alpha=float(options.get("alpha", 32)),
        generator=options.get("generator", "qformer"),
        target_modules=tuple(
            options.get("target_modules", ("q_proj", "k_proj", "v_proj", "o_proj"))
        ),
        fuse_qkv=bool(options.get("fuse_qkv", True)),
        backend=options.get("backend", "auto"),
        generator_kwargs=options.get("generator_kwargs") or None,
    )


class FrozenLLMScorer(nn.Module):
    """Zero-shot baseline: the frozen LLM's "Yes" logit at the last position, no CF input.

    Nothing trains; it gives the level a method must beat (about 0.5 AUC for a random LLM).
    """

    def __init__(self, llm: nn.Module, tokenizer, cf_dim: int = 0, options=None):
        super().__init__()
        from llmrec.data.batching import answer_token_ids

        self.llm = llm
        self.llm.requires_grad_(False)
        self.yes_token_id = answer_token_ids(tokenizer)[0]

    def score(self, batch) -> torch.Tensor:
        body = self.llm.get_decoder() if hasattr(self.llm, "get_decoder") else self.llm.model
        out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        head = self.llm.get_output_embeddings()
        logit = out.last_hidden_state[:, -1].float() @ head.weight[self.yes_token_id].float()
        if getattr(head, "bias", None) is not None:
            logit = logit + head.bias[self.yes_token_id].float()
        return logit

    def forward(self, batch) -> torch.Tensor:
        return self.score(batch)

    def loss(self, batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.score(batch), batch["labels"].float())

    def trainable_parameters(self):
        return iter(())

    def save_trainable(self, path) -> None:
        from safetensors.torch import save_file

        save_file({}, str(path), metadata={"method": "frozen"})

    def load_trainable(self, path) -> None:
        return None


register_method(
    MethodSpec(
        "cora",
        _build_cora,
        template="cora",
        description="CoRA: per-(user, item) LoRA generated from CF embeddings",
    )
)
register_method(
    MethodSpec(
        "frozen",
        lambda llm, tok, cf_dim, options: FrozenLLMScorer(llm, tok),
        template="cora",
        uses_cf=False,
        trains=False,
        description="zero-shot frozen LLM (Yes logit), no CF and no training: a baseline",
    )
)


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``llmrec.<module>.<name>``, imported at the first call (no import cycle)."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"llmrec.{module}"), name)(*args, **kwargs)

    return call


register_method(
    MethodSpec(
        "collm",
        _lazy("collm", "build_collm"),
        template="collm",
        runner=_lazy("collm", "run_collm"),
        examples=_lazy("collm", "make_collm_examples"),
        description="CoLLM: CF embeddings mapped into <UserID>/<TargetItemID> slots + LoRA "
        "q/v; two-step (default) or one-step tuning, see --method-kwargs",
    )
)
register_method(
    MethodSpec(
        "allmrec",
        _lazy("allmrec", "build_allmrec"),
        template="cora",
        runner=_lazy("allmrec", "run_allmrec"),
        evaluator=_lazy("allmrec", "evaluate_allmrec"),
        description="A-LLMRec: CF/SBERT-aligned item and user soft prompts, frozen LLM "
        "generates the next title (Hit@1; scored Hit@K/NDCG@K and AUC)",
    )
)


# ---------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    gloo on the CPU, nccl on CUDA. A single process returns a trivial :class:`DistEnv`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def _all_reduce_mean(tensors: List[torch.Tensor], env: DistEnv) -> None:
    if not env.enabled or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def _broadcast(tensors: List[torch.Tensor], env: DistEnv) -> None:
    if not env.enabled:
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


# ---------------------------------------------------------------------------------------------
# schedule, config


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr before update ``step`` (0-based): linear warm-up, cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    eval_batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    max_steps: Optional[int] = None
    patience: int = 2
    grad_clip: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    precision: str = "auto"
    seed: int = 0
    progress: bool = True
    save_rank_state: bool = False


def _resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_trainable_atomic(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    model.save_trainable(str(tmp))
    os.replace(tmp, path)


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


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    pointer = Path(out_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / TRAINABLE).exists() or not (path / TRAINER).exists():
        raise CheckpointError(f"{pointer}: points to {path}, which is not a complete checkpoint")
    return path


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class LoopState:
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # batches of the current epoch already done
    global_step: int = 0
    best_auc: float = -1.0
    best_step: int = -1
    bad_evals: int = 0
    last_eval_step: int = -1
    seq: int = 0  # checkpoint counter
    done: bool = False
    stopped_early: bool = False
    history: List[dict] = field(default_factory=list)


class Trainer:
    """Train ``model`` (the CoRA contract) on ``train`` with early stopping on ``valid`` AUC.

    ``train`` / ``valid`` are :class:`RecCollator` s (examples + CF tables + padding).
    ``callback(event, state)`` is called with ``"checkpoint"`` after every checkpoint and
    ``"eval"`` after every evaluation (tests use it to interrupt a run).
    """

    def __init__(
        self,
        model,
        train: Optional[RecCollator],
        valid: Optional[RecCollator],
        cfg: TrainConfig,
        out_dir,
        *,
        device="cpu",
        env: Optional[DistEnv] = None,
        log: Optional[Callable[[str], None]] = None,
        callback: Optional[Callable[[str, LoopState], None]] = None,
    ):
        self.model = model
        self.train_data = train
        self.valid_data = valid
        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.env = env or DistEnv()
        self.log = log or (lambda msg: None)
        self.callback = callback
        self.params = [p for p in model.trainable_parameters()]
        self.amp_dtype = _resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.state = LoopState()
        self.optimizer = (
            torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            if self.params
            else None
        )

    # -- helpers ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_KEYS}

    def steps_per_epoch(self) -> int:
        if self.train_data is None:
            return 0
        n = len(self.train_data.examples) // self.env.world_size
        return max(1, math.ceil(n / self.cfg.batch_size)) if n else 0

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
        n = len(self.train_data.examples)
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).numpy()
        per_rank = n // self.env.world_size
        return perm[self.env.rank :: self.env.world_size][:per_rank]

    # -- prediction --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data: RecCollator, desc: str = "predict") -> np.ndarray:
        """Scores for every example of ``data`` (all ranks share the work and get all scores)."""
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        n = len(data.examples)
        order = np.argsort(data.examples.lengths(), kind="stable")  # less padding per batch
        mine = order[self.env.rank :: self.env.world_size]
        scores = np.empty(len(mine), dtype=np.float64)
        bs = self.cfg.eval_batch_size
        bar = tqdm(
            range(0, len(mine), bs),
            desc=desc,
            disable=not (self.cfg.progress and self.env.is_main),
            leave=False,
        )
        for start in bar:
            idx = mine[start : start + bs]
            with self._autocast():
                out = self.model.score(self._to_device(data(idx)))
            scores[start : start + len(idx)] = out.float().cpu().numpy()
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

    def evaluate(self, data: RecCollator, desc: str = "valid") -> float:
        return auc(data.examples.label, self.predict(data, desc))

    # -- checkpoints -----------------------------------------------------------------------
    def _state_json(self) -> str:
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

            ck = self.out / "checkpoints"
            ck.mkdir(parents=True, exist_ok=True)
            name = f"ckpt-{self.state.seq:06d}-step{self.state.global_step:08d}"
            tmp = ck / f".tmp-{name}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            self.model.save_trainable(str(tmp / TRAINABLE))
            tensors, groups = (
                _optimizer_tensors(self.optimizer) if self.optimizer is not None else ({}, [])
            )
            tensors["rng.torch"] = torch.get_rng_state()
            meta = {"trainer_state": self._state_json(), "param_groups": json.dumps(groups)}
            save_file(tensors, str(tmp / TRAINER), metadata=meta)
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            path = ck / name
            os.replace(tmp, path)
            _fsync_dir(ck)
            _atomic_write_text(ck / LATEST, name + "\n")
            keep = max(1, self.cfg.keep_checkpoints)
            old = sorted(p for p in ck.glob("ckpt-*") if p.is_dir())
            for p in old[:-keep]:
                shutil.rmtree(p, ignore_errors=True)
        self.env.barrier()
        if self.callback is not None:
            self.callback("checkpoint", self.state)
        return path

    def load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open

        check_trainable_compatible(self.model, path / TRAINABLE)
        self.model.load_trainable(str(path / TRAINABLE))
        with safe_open(str(path / TRAINER), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        st = json.loads(meta["trainer_state"])
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
        value = self.evaluate(self.valid_data)
        improved = value > st.best_auc
        record = {
            "step": st.global_step,
            "epoch": st.epoch + (st.step_in_epoch / max(1, self.steps_per_epoch())),
            "valid_auc": value,
            "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0,
            "time": time.time(),
        }
        st.history.append(record)
        st.last_eval_step = st.global_step
        if improved:
            st.best_auc, st.best_step, st.bad_evals = value, st.global_step, 0
            if self.env.is_main:
                _save_trainable_atomic(self.model, self.out / BEST)
        else:
            st.bad_evals += 1
            if st.bad_evals >= self.cfg.patience:
                st.stopped_early = True
        self.log(
            f"step {st.global_step}: valid AUC {value:.4f} "
            f"(best {st.best_auc:.4f} at step {st.best_step})"
            + (" - early stop" if st.stopped_early else "")
        )
        if self.env.is_main:
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
        if self.callback is not None:
            self.callback("eval", st)

    def _train_step(self, batch: Dict[str, torch.Tensor], lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            loss = self.model.loss(self._to_device(batch))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        _all_reduce_mean(grads, self.env)
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
        return float(loss.detach())

    def fit(self, resume: bool = False) -> LoopState:
        """Train until ``epochs`` / ``max_steps`` / early stopping; then load the best state."""
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            ckpt = latest_checkpoint(self.out)
            if ckpt is None:
                self.log(f"--resume: no checkpoint under {self.out}/checkpoints; starting fresh")
                torch.manual_seed(self.cfg.seed)
            else:
                self.load_checkpoint(ckpt)
                # a run that stopped on its budget continues when --epochs/--max-steps grew
                if self.state.done and not self.state.stopped_early:
                    self.state.done = False
        else:
            torch.manual_seed(self.cfg.seed)
        _broadcast(self.params, self.env)
        st = self.state
        if not self.params or self.train_data is None or self.cfg.epochs <= 0:
            st.done = True
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
            bs = self.cfg.batch_size
            stop = False
            while st.step_in_epoch < spe and st.global_step < total:
                b = st.step_in_epoch
                batch = self.train_data(indices[b * bs : (b + 1) * bs])
                lr = self.cfg.lr * lr_factor(st.global_step, total, warmup, self.cfg.min_lr_ratio)
                loss = self._train_step(batch, lr)
                st.step_in_epoch += 1
                st.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=st.epoch)
                if self.cfg.eval_every and st.global_step % self.cfg.eval_every == 0:
                    self._eval_and_track()
                    self.save_checkpoint()
                    if st.stopped_early:
                        stop = True
                        break
                elif self.cfg.save_every and st.global_step % self.cfg.save_every == 0:
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
            self.model.save_trainable(str(self.out / f"rank-{self.env.rank}.safetensors"))
        self.env.barrier()
        if (self.out / BEST).exists() and st.best_step >= 0:
            self.model.load_trainable(str(self.out / BEST))
        elif self.env.is_main:
            _save_trainable_atomic(self.model, self.out / BEST)
        self.env.barrier()
        return st


# ---------------------------------------------------------------------------------------------
# run assembly (what the CLI calls)


@dataclass
class RunConfig:
    """Everything ``llmrec train`` needs; stored in ``<out>/run.json``."""

    method: str = "cora"
    data: Optional[str] = None  # None: the embedded synthetic dataset
    cf: Optional[str] = None  # None: train an MF first (into <out>/cf)
    llm: str = "tiny"
    out: str = "runs/cora"
    # prompts
    max_his: int = 10
    max_length: int = 512
    # method options (CoRA)
    rank: int = 16
    alpha: float = 32.0
    generator: str = "qformer"
    generator_kwargs: Dict[str, Any] = field(default_factory=dict)
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    fuse_qkv: bool = True
    backend: str = "auto"
    method_kwargs: Dict[str, Any] = field(default_factory=dict)  # method-specific options
    # tiny LLM
    tiny: Dict[str, Any] = field(default_factory=dict)
    tiny_seed: int = 0
    # subsampling (small budgets)
    max_train_rows: Optional[int] = None
    max_valid_rows: Optional[int] = None
    max_test_rows: Optional[int] = None
    valid_split: Optional[str] = None  # None: valid_small when present, else valid
    test_split: str = "test"
    # loop
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    llm_dtype: str = "auto"
    resume: bool = False
    init_from: Optional[str] = None
    predictions: Optional[str] = None

    def method_options(self) -> Dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "generator": self.generator,
            "generator_kwargs": dict(self.generator_kwargs),
            "target_modules": list(self.target_modules),
            "fuse_qkv": self.fuse_qkv,
            "backend": self.backend,
            "method_kwargs": dict(self.method_kwargs),
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        train = TrainConfig(**d.pop("train", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(train=train, **{k: v for k, v in d.items() if k in known})


#: fields that must not change when a run is resumed (they change the model or the data)
RESUME_MUST_MATCH = (
    "method",
    "data",
    "llm",
    "max_his",
    "max_length",
    "rank",
    "alpha",
    "generator",
    "generator_kwargs",
    "target_modules",
    "method_kwargs",
    "tiny",
    "tiny_seed",
    "max_train_rows",
    "max_valid_rows",
    "valid_split",
    "train.batch_size",  # the position inside an epoch is counted in batches
    "train.seed",  # the data order
)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunConfigError(f"--device {name}: no CUDA device available")
    return torch.device(name)


def _llm_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise RunConfigError(f"--llm-dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return table[name]


def load_run_data(data_path: Optional[str]):
    """The dataset at ``data_path``, or the embedded synthetic dataset when it is None."""
    from llmrec.data import load_data, make_synthetic

    if data_path is None:
        return make_synthetic()
    return load_data(data_path)


def _subsample(df, n: Optional[int], seed: int):
    if n is None or n >= len(df):
        return df
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(df), size=n, replace=False))
    return df.iloc[idx].reset_index(drop=True)


def _tiny_corpus(data, template: str, max_his: int, limit: int = 20000) -> List[str]:
    from llmrec.data.prompts import TEMPLATES, build_prompts

    train = data["train"]
    if len(train) > limit:
        train = train.sample(n=limit, random_state=0)
    texts = build_prompts(train["his_title"], train["title"], template=template, max_his=max_his)
    texts.append(TEMPLATES.get(template, template))
    texts.extend(sorted(set(data.item_titles().values())))
    texts.extend(["Yes", "No"] * 10)
    return texts


def prepare_llm(cfg: RunConfig, data, template: str, env: DistEnv, device, dtype):
    """Load the LLM and tokenizer: a local HF dir, or the tiny model kept in ``<out>/llm``."""
    from llmrec.tiny_llm import build_tiny_llm, check_tokenizer_files, load_llm, save_llm

    if cfg.llm != "tiny":
        check_tokenizer_files(cfg.llm)
        return load_llm(cfg.llm, dtype=dtype, device=device)
    tiny_dir = Path(cfg.out) / "llm"
    if env.is_main and not (tiny_dir / "config.json").exists():
        llm, tok = build_tiny_llm(
            _tiny_corpus(data, template, cfg.max_his), config=cfg.tiny, seed=cfg.tiny_seed
        )
        tmp = Path(cfg.out) / f".llm.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_llm(llm, tok, tmp, extra={"tiny": cfg.tiny, "seed": cfg.tiny_seed})
        os.replace(tmp, tiny_dir)
    env.barrier()
    return load_llm(tiny_dir, dtype=dtype, device=device)


def _ensure_cf(cfg: RunConfig, data, env: DistEnv, log) -> str:
    """The CF embedding path; trains a quick MF into ``<out>/cf`` when none was given."""
    if cfg.cf is not None:
        return cfg.cf
    from llmrec.cf import CFConfig, build_cf_model, save_cf_embeddings, train_cf

    cf_dir = Path(cfg.out) / "cf"
    target = cf_dir / "embeddings.safetensors"
    if env.is_main and not target.exists():
        log("no --cf given: training an MF model first (saved under OUT/cf)")
        torch.manual_seed(cfg.train.seed)
        model = build_cf_model("mf", data.n_users, data.n_items, dim=64)
        cf_cfg = CFConfig(lr=3e-3, seed=cfg.train.seed, valid_split="valid")
        res = train_cf(model, data, cf_cfg, progress=cfg.train.progress)
        user, item = model.export(data)
        save_cf_embeddings(target, user, item, "mf", best_valid_auc=res.best_valid_auc)
    env.barrier()
    return str(cf_dir)


_MISSING = object()


def _check_resume_config(cfg: RunConfig, out: Path) -> None:
    run_file = out / RUN_FILE
    has_ckpt = (out / "checkpoints" / LATEST).exists()
    if not cfg.resume:
        if has_ckpt:
            raise RunConfigError(
                f"{out} already holds a run with checkpoints; pass --resume to continue it or "
                "choose another --out"
            )
        return
    if not run_file.exists():
        return
    old = json.loads(run_file.read_text()).get("config", {})
    new = cfg.to_dict()

    def get(d, key):
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return _MISSING
            d = d[part]
        return d

    diffs = [
        f"{k}: {get(old, k)!r} -> {get(new, k)!r}"
        for k in RESUME_MUST_MATCH
        if get(old, k) is not _MISSING and json.dumps(get(old, k)) != json.dumps(get(new, k))
    ]
    if diffs:
        raise RunConfigError(
            f"--resume: the options differ from the run in {out} ({'; '.join(diffs)})"
        )


@dataclass
class PreparedRun:
    cfg: RunConfig
    spec: MethodSpec
    data: Any
    model: Any
    tokenizer: Any
    device: torch.device
    env: DistEnv
    cf_path: Optional[str]
    user_table: Optional[torch.Tensor]
    item_table: Optional[torch.Tensor]

    def collator(self, df, max_rows: Optional[int] = None, seed: int = 0) -> RecCollator:
        df = _subsample(df, max_rows, seed)
        ex = (self.spec.examples or make_examples)(
            df,
            self.tokenizer,
            template=self.spec.template,
            max_his=self.cfg.max_his,
            max_length=self.cfg.max_length,
        )
        cf_dim = self.user_table.shape[1] if self.user_table is not None else 0
        return RecCollator(ex, pad_id_of(self.tokenizer), self.user_table, self.item_table, cf_dim)


def prepare_run(cfg: RunConfig, env: Optional[DistEnv] = None, log=None, data=None) -> PreparedRun:
    """Load and check everything a run needs, in order of cost, before any training.

    Raises the validation errors (:class:`~llmrec.data.DataValidationError`,
    :class:`~llmrec.cf.CFEmbeddingError`, :class:`~llmrec.tiny_llm.LLMLoadError`,
    :class:`CheckpointError`, :class:`RunConfigError`) as early as possible.
    """
    from llmrec.cf import load_cf_embeddings
    from llmrec.tiny_llm import check_tokenizer_files

    env = env or DistEnv()
    log = log or (lambda m: None)
    spec = get_method(cfg.method)
    device = _device(cfg.device)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    dtype = _llm_dtype(cfg.llm_dtype, device)
    _resolve_precision(cfg.train.precision, device)
    if cfg.llm != "tiny":
        check_tokenizer_files(cfg.llm)  # before reading any data or weights
    data = data if data is not None else load_run_data(cfg.data)
    for split in (cfg.valid_split or data.validation_split(), cfg.test_split):
        if split not in data:
            raise RunConfigError(f"{data.source}: no {split!r} split (has {sorted(data.splits)})")
    cf_path, user_table, item_table = None, None, None
    if spec.uses_cf:
        cf_path = _ensure_cf(cfg, data, env, log)  # trains an MF only when no --cf is given
        emb = load_cf_embeddings(cf_path, data.n_users, data.n_items)
        user_table, item_table = emb.user, emb.item
    if cfg.init_from is not None and not Path(cfg.init_from).exists():
        raise CheckpointError(f"{cfg.init_from}: --init-from checkpoint not found")
    llm, tokenizer = prepare_llm(cfg, data, spec.template, env, device, dtype)
    cf_dim = user_table.shape[1] if user_table is not None else 0
    torch.manual_seed(cfg.train.seed)  # the trainable initialisation depends on the seed only
    model = spec.build(llm, tokenizer, cf_dim, cfg.method_options())
    model.to(device)
    if cfg.init_from is not None:
        check_trainable_compatible(model, cfg.init_from)
        model.load_trainable(cfg.init_from)
    if cfg.resume:
        ckpt = latest_checkpoint(Path(cfg.out))
        if ckpt is not None:
            check_trainable_compatible(model, ckpt / TRAINABLE)
    return PreparedRun(
        cfg, spec, data, model, tokenizer, device, env, cf_path, user_table, item_table
    )


def _write_predictions(path: Path, df, scores: np.ndarray) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    out = pd.DataFrame(
        {"uid": df["uid"].to_numpy(), "iid": df["iid"].to_numpy(), "label": df["label"].to_numpy()}
    )
    out["score"] = scores
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    out.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _split_metrics(scores: np.ndarray, df) -> dict:
    return evaluate_predictions(
        df["uid"].to_numpy(), df["label"].to_numpy(), scores, df["not_cold"].to_numpy()
    )


def run_training(
    cfg: RunConfig,
    *,
    env: Optional[DistEnv] = None,
    log: Optional[Callable[[str], None]] = None,
    callback=None,
    data=None,
) -> dict:
    """Train ``cfg.method``, evaluate the best state on the test split, write the run files.

    Returns the metrics dict (also written to ``<out>/metrics.json`` by rank 0).
    """
    spec = get_method(cfg.method)
    if spec.runner is not None:
        return spec.runner(cfg, env=env, log=log, callback=callback, data=data)
    start = time.perf_counter()
    env = env or DistEnv()
    log = log or (lambda m: None)
    out = Path(cfg.out)
    _check_resume_config(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare_run(cfg, env, log, data=data)
    if env.is_main:
        run_info = {
            "kind": "llm",
            "method": cfg.method,
            "config": cfg.to_dict(),
            "cf_path": prep.cf_path,
            "data": prep.data.summary(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        _atomic_write_text(out / RUN_FILE, json.dumps(json_safe(run_info), indent=2) + "\n")
    valid_split = cfg.valid_split or prep.data.validation_split()
    seed = cfg.train.seed
    train_c = (
        prep.collator(prep.data["train"], cfg.max_train_rows, seed) if prep.spec.trains else None
    )
    valid_df = _subsample(prep.data[valid_split], cfg.max_valid_rows, seed + 1)
    valid_c = prep.collator(valid_df)
    trainer = Trainer(
        prep.model,
        train_c,
        valid_c,
        cfg.train,
        out,
        device=prep.device,
        env=env,
        log=log,
        callback=callback,
    )
    t_train = time.perf_counter()
    state = trainer.fit(resume=cfg.resume)
    train_time = time.perf_counter() - t_train
    test_df = _subsample(prep.data[cfg.test_split], cfg.max_test_rows, seed + 2)
    test_c = prep.collator(test_df)
    test_scores = trainer.predict(test_c, desc=cfg.test_split)
    valid_scores = trainer.predict(valid_c, desc=valid_split)
    metrics = {
        "method": cfg.method,
        cfg.test_split: _split_metrics(test_scores, test_df),
        "valid": {"split": valid_split, **_split_metrics(valid_scores, valid_df)},
        "train": {
            "rows": len(train_c.examples) if train_c is not None else 0,
            "steps": state.global_step,
            "epochs_completed": state.epoch,
            "best_step": state.best_step,
            "best_valid_auc": state.best_auc if state.best_step >= 0 else None,
            "stopped_early": state.stopped_early,
            "train_time_s": train_time,
            "world_size": env.world_size,
        },
        "config": cfg.to_dict(),
        "data": prep.data.summary(),
        "device": str(prep.device),
        "wall_time_s": time.perf_counter() - start,
    }
    if env.is_main:
        _atomic_write_text(out / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
        if cfg.predictions:
            _write_predictions(Path(cfg.predictions), test_df, test_scores)
    env.barrier()
    return metrics


def run_evaluation(
    run_dir,
    *,
    data_path: Optional[str] = None,
    split: str = "test",
    predictions: Optional[str] = None,
    metrics_path: Optional[str] = None,
    batch_size: Optional[int] = None,
    device: str = "auto",
    env: Optional[DistEnv] = None,
    progress: bool = True,
) -> dict:
    """Score ``split`` with a finished run (LLM method or CF model) and write its metrics."""
    start = time.perf_counter()
    env = env or DistEnv()
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        raise RunConfigError(f"{run_dir}: no {RUN_FILE} (not a run directory written by llmrec)")
    info = json.loads(run_file.read_text())
    if info.get("kind") == "cf":
        from llmrec.cf.run import evaluate_cf_run

        return evaluate_cf_run(
            run_dir,
            info,
            data_path=data_path,
            split=split,
            predictions=predictions,
            metrics_path=metrics_path,
            device=device,
        )
    cfg = RunConfig.from_dict(info["config"])
    cfg.out = str(run_dir)
    if cfg.llm == "tiny":  # never build a fresh random LLM here: use the run's own
        cfg.llm = str(run_dir / "llm")
        if not (run_dir / "llm" / "config.json").exists():
            raise RunConfigError(f"{run_dir}: the run's tiny LLM (llm/) is missing")
    if data_path is not None:
        cfg.data = data_path
    cfg.cf = info.get("cf_path") or cfg.cf
    cfg.device = device
    cfg.resume = False
    cfg.init_from = None
    cfg.train.progress = progress
    if batch_size:
        cfg.train.eval_batch_size = batch_size
    evaluator = get_method(cfg.method).evaluator
    if evaluator is not None:
        return evaluator(
            run_dir, cfg, split=split, metrics_path=metrics_path, predictions=predictions
        )
    prep = prepare_run(cfg, env)
    best = run_dir / BEST
    if prep.spec.trains:
        check_trainable_compatible(prep.model, best)
        prep.model.load_trainable(str(best))
    df = prep.data[split]
    coll = prep.collator(df)
    trainer = Trainer(prep.model, None, None, cfg.train, run_dir, device=prep.device, env=env)
    scores = trainer.predict(coll, desc=split)
    metrics = {
        "method": cfg.method,
        "run": str(run_dir),
        split: _split_metrics(scores, df),
        "config": cfg.to_dict(),
        "data": prep.data.summary(),
        "wall_time_s": time.perf_counter() - start,
    }
    if env.is_main:
        target = Path(metrics_path) if metrics_path else run_dir / f"eval_{split}.json"
        _atomic_write_text(target, json.dumps(json_safe(metrics), indent=2) + "\n")
        if predictions:
            _write_predictions(Path(predictions), df, scores)
    return metrics
