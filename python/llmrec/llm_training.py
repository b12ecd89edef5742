"""A run of an LLM method from start to end: what ``llmrec train`` / ``evaluate`` call.

:func:`run_training` loads and checks everything in order of cost before any training (the
data, the CF embeddings, the LLM: :func:`prepare_context`), builds the method's model
(:mod:`llmrec.method`), runs each of its stages with :class:`llmrec.training_loop.Trainer`, then
evaluates the best state on the test and validation splits and writes the run directory
(:mod:`llmrec.run_store`). :func:`run_evaluation` reopens a finished run (LLM method or CF model)
and scores a split. Nothing here knows any particular method.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from llmrec.config import RunConfig, TrainConfig
from llmrec.data import load_run_data
from llmrec.errors import CheckpointError, RunConfigError
from llmrec.input_digests import digest_inputs
from llmrec.llm import (
    attn_implementation,
    check_tokenizer_files,
    compile_decoder_layers,
    load_run_llm,
    resolve_llm,
    torch_dtype,
)
from llmrec.method import (
    METHODS,
    Method,
    RunContext,
    Stage,
    available_methods,
    get_method,
    parse_options,
    register,
    resume_options,
    split_metrics,
)
from llmrec.metrics import check_both_classes
from llmrec.run_store import (
    BEST,
    RUN_FILE,
    TRAINABLE,
    RunLock,
    check_resume_config,
    check_stage_dir_free,
    claim_run_dir,
    latest_checkpoint,
    machine_info,
    read_run_info,
    read_stage_done,
    reopen_config,
    write_metrics,
    write_run_info,
    write_stage_done,
)
from llmrec.safe_files import state_file_in, verify_safetensors
from llmrec.scoring_parts import DEFAULT_CHUNK_ROWS
from llmrec.train_log import require_tensorboard
from llmrec.training_loop import (
    DistEnv,
    Trainer,
    check_trainable_compatible,
    init_distributed,
    lr_factor,
    resolve_precision,
)

__all__ = [
    "BEST",
    "METHODS",
    "RUN_FILE",
    "CheckpointError",
    "DistEnv",
    "OpenRun",
    "RunConfig",
    "RunConfigError",
    "TrainConfig",
    "Trainer",
    "available_methods",
    "check_trainable_compatible",
    "get_method",
    "init_distributed",
    "load_run_data",
    "lr_factor",
    "prepare_context",
    "register",
    "reopen_run",
    "run_evaluation",
    "run_training",
]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunConfigError(f"--device {name}: no CUDA device available")
    return torch.device(name)


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
        model = build_cf_model("mf", data.n_users, data.n_items, dim=cfg.cf_dim)
        cf_cfg = CFConfig(lr=3e-3, seed=cfg.train.seed, valid_split="valid")
        res = train_cf(model, data, cf_cfg, progress=cfg.train.progress)
        user, item = model.export(data)
        save_cf_embeddings(target, user, item, "mf", best_valid_auc=res.best_valid_auc)
    env.barrier()
    return str(cf_dir)


def prepare_context(
    cfg: RunConfig,
    method: Method,
    env: Optional[DistEnv] = None,
    log=None,
    data=None,
    training: bool = False,
) -> RunContext:
    """Load and check what a run needs, in order of cost, before any model is built.

    ``training``: also refuse a validation split with one class (its AUC is undefined).

    Raises the validation errors (:class:`~llmrec.data.DataValidationError`,
    :class:`~llmrec.cf.CFEmbeddingError`, :class:`~llmrec.llm.LLMLoadError`,
    :class:`CheckpointError`, :class:`RunConfigError`) as early as possible.
    """
    from llmrec.cf import load_cf_embeddings

    env = env or DistEnv()
    log = log or (lambda m: None)
    if method.single_process and env.enabled:
        raise RunConfigError(f"{method.name} runs in a single process (no torchrun)")
    device = _device(cfg.device)
    if env.enabled and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    dtype = torch_dtype(cfg.llm_dtype, device)
    resolve_precision(cfg.train.precision, device)
    llm_source = cfg.llm
    if cfg.llm != "tiny":
        # a named or GGUF model is fetched/converted (and a GGUF file hashed) here, once,
        # before any data is read; the LLM is then loaded from the resolved directory
        llm_source = str(resolve_llm(cfg.llm, log))
        check_tokenizer_files(llm_source)
    data = data if data is not None else load_run_data(cfg.data)
    for split in (cfg.valid_split or data.validation_split(), cfg.test_split):
        if split not in data:
            raise RunConfigError(f"{data.source}: no {split!r} split (has {sorted(data.splits)})")
    if training and method.trains:  # a one-class split: no metric to stop on
        valid_split = cfg.valid_split or data.validation_split()
        check_both_classes(data[valid_split]["label"], valid_split)
    cf_path, user_table, item_table = None, None, None
    if method.uses_cf:
        cf_path = _ensure_cf(cfg, data, env, log)  # trains an MF only when no --cf is given
        emb = load_cf_embeddings(cf_path, data.n_users, data.n_items)
        user_table, item_table = emb.user, emb.item
    if cfg.init_from is not None and not Path(cfg.init_from).exists():
        raise CheckpointError(f"{cfg.init_from}: --init-from checkpoint not found")
    llm, tokenizer = load_run_llm(
        llm_source, cfg.out, data=data, template=method.template, max_his=cfg.max_his,
        tiny=cfg.tiny, tiny_seed=cfg.tiny_seed, env=env, device=device, dtype=dtype,
        attn_implementation=attn_implementation(cfg.llm_attn, device, dtype), log=log,
    )  # fmt: skip
    return RunContext(cfg, data, llm, tokenizer, device, env, log, cf_path, user_table, item_table)


def build_model(ctx: RunContext, method: Method, opts):
    """The method's model on the run's device; ``init_from`` loaded, a resume checked."""
    cfg = ctx.cfg
    method.check_prompt_lengths(ctx, opts)  # a --max-length no prompt fits: refused here
    torch.manual_seed(cfg.train.seed)  # the trainable initialisation depends on the seed only
    model = method.build(ctx, opts)
    model.to(ctx.device)
    if cfg.compile:  # after the method patched the LLM's layers
        compile_decoder_layers(ctx.llm)
    if cfg.init_from is not None:
        check_trainable_compatible(model, cfg.init_from)
        model.load_trainable(cfg.init_from)
    if cfg.resume:
        ckpt = latest_checkpoint(Path(cfg.out))
        if ckpt is not None:
            check_trainable_compatible(model, ckpt / TRAINABLE)
    return model


def _run_stages(ctx: RunContext, model, stages: List[Stage], callback) -> tuple:
    """Train every stage in order; ``(stage summaries, last loop state, last trainer)``.

    An earlier stage that finished (its ``stage_done.json``) is not repeated on resume: its
    best state is loaded instead.
    """
    cfg, out = ctx.cfg, Path(ctx.cfg.out)
    infos, state, trainer = [], None, None
    for k, stage in enumerate(stages):
        last = k == len(stages) - 1
        sdir = out / stage.subdir if stage.subdir else out
        if stage.enter is not None:
            stage.enter()
        if not last:
            check_stage_dir_free(sdir, cfg.resume)
            done = read_stage_done(sdir) if cfg.resume else None
            if done is not None:
                ctx.log(f"stage {stage.name} already finished: loading its best state")
                verify_safetensors(sdir / BEST, CheckpointError)
                model.load_trainable(str(sdir / BEST))
                infos.append(done)
                continue
        ctx.log(f"stage {k + 1}/{len(stages)}: {stage.name}")
        trainer = Trainer(
            model, stage.train, stage.valid, stage.config, sdir, metric=stage.metric,
            device=ctx.device, env=ctx.env, log=ctx.log, callback=callback,
        )  # fmt: skip
        state = trainer.fit(resume=cfg.resume)
        best = state.best_auc if state.best_step >= 0 else None
        info = {
            "stage": stage.name,
            **stage.info,
            "steps": state.global_step,
            "best_step": state.best_step,
            f"best_valid_{stage.metric.name}": best,
            # the stage's whole training time, over every resumed segment
            "train_time_s": state.train_time_s,
        }
        if stage.valid is None:
            info["history"] = state.history
        infos.append(info)
        if not last and ctx.env.is_main:
            write_stage_done(sdir, info)
    return infos, state, trainer


def run_training(
    cfg: RunConfig,
    *,
    env: Optional[DistEnv] = None,
    log: Optional[Callable[[str], None]] = None,
    callback=None,
    data=None,
) -> dict:
    """Train ``cfg.method``, evaluate the best state on the test split, write the run files.

    Returns the metrics dict (also written to ``<out>/metrics.json`` by rank 0). Rank 0
    holds ``<out>``'s lock for the whole run (:func:`llmrec.run_store.claim_run_dir`): another
    run of another kind, method or config in ``<out>`` is refused unless ``cfg.force``.
    """
    env = env or DistEnv()
    log = log or (lambda m: None)
    method = get_method(cfg.method)
    opts = parse_options(type(method), cfg)  # bad options fail before the directory is touched
    if cfg.train.tensorboard and env.is_main:
        require_tensorboard()
    lock: Optional[RunLock] = None
    if env.is_main:
        lock = claim_run_dir(
            cfg.out, "llm", "method", cfg.method, resume=cfg.resume, force=cfg.force, log=log
        )
    env.barrier()
    try:
        return _train_and_evaluate(cfg, method, opts, env, log, callback, data)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(cfg: RunConfig, method, opts, env: DistEnv, log, callback, data) -> dict:
    start = time.perf_counter()
    out = Path(cfg.out)
    check_resume_config(cfg, out, lambda config: resume_options(type(method), config))
    out.mkdir(parents=True, exist_ok=True)
    ctx = prepare_context(cfg, method, env, log, data=data, training=True)
    model = build_model(ctx, method, opts)
    if env.is_main:
        write_run_info(
            out, "llm", "method", cfg.method, cfg.to_dict(), cf_path=ctx.cf_path,
            data=ctx.data.summary(), options=dataclasses.asdict(opts),
            inputs=digest_inputs(data=cfg.data, cf=ctx.cf_path, llm=_local_llm(cfg.llm)),
        )  # fmt: skip
    stages = method.stages(ctx, model, opts)
    infos, st, trainer = _run_stages(ctx, model, stages, callback)
    metric = stages[-1].metric.name
    test_df = ctx.rows(cfg.test_split)
    test_block, test_scores = method.evaluate(ctx, model, opts, test_df, trainer.predict)
    valid_df = ctx.rows(ctx.valid_split)
    valid_block, _ = method.evaluate(ctx, model, opts, valid_df, trainer.predict, full=False)
    metrics = {
        "method": cfg.method,
        cfg.test_split: test_block,
        "valid": {"split": ctx.valid_split, **valid_block},
        "train": {
            "rows": len(ctx.rows("train")) if method.trains else 0,
            "steps": sum(s["steps"] for s in infos),
            "epochs_completed": st.epoch,
            "best_step": st.best_step,
            f"best_valid_{metric}": st.best_auc if st.best_step >= 0 else None,
            "stopped_early": st.stopped_early,
            "train_time_s": sum(s["train_time_s"] for s in infos),
            "world_size": env.world_size,
            **method.train_summary(opts),
            "stages": infos,
        },
        "config": cfg.to_dict(),
        "options": dataclasses.asdict(opts),  # the method's options, resolved
        "data": ctx.data.summary(),
        "device": str(ctx.device),
        "machine": machine_info(str(ctx.device)),
        "wall_time_s": time.perf_counter() - start,
    }
    if env.is_main:
        write_metrics(
            out, metrics, predictions=cfg.predictions, pred_df=test_df, scores=test_scores
        )
    env.barrier()
    return metrics


def _local_llm(llm: str) -> Optional[str]:
    """A local LLM directory or file (its weights are inputs of the run), else None."""
    return llm if llm != "tiny" and Path(llm).exists() else None


@dataclass
class OpenRun:
    """A finished LLM run, reopened: its context, method, options and model (best state, or
    ``state``: the trainable file loaded, ``None`` for a method that trains nothing)."""

    ctx: RunContext
    method: Method
    opts: Any
    model: Any
    state: Optional[Path] = None

    def predict(self, source, desc: str = "predict"):
        trainer = Trainer(
            self.model, None, None, self.ctx.cfg.train, self.ctx.cfg.out,
            device=self.ctx.device, env=self.ctx.env,
        )  # fmt: skip
        return trainer.predict(source, desc)


def reopen_run(
    run_dir,
    *,
    data_path=None,
    device="auto",
    progress=True,
    batch_size=None,
    env=None,
    data=None,
    state=None,
) -> OpenRun:
    """Rebuild a finished LLM run from its ``run.json`` with its own LLM and best state.

    ``state``: another trainable state of the same run to load instead of ``RUN/best``: a
    ``.safetensors`` file or a checkpoint directory holding ``trainable.safetensors``.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    cfg = reopen_config(run_dir, info, data_path=data_path, device=device, progress=progress)
    if batch_size:
        cfg.train.eval_batch_size = batch_size
    method = get_method(cfg.method)
    opts = parse_options(type(method), cfg)
    if not method.trains and state is not None:
        raise RunConfigError(f"{run_dir}: method {cfg.method!r} trains nothing; --state has no use")
    path = _state_file(run_dir, state) if method.trains else None  # checked before the LLM loads
    ctx = prepare_context(cfg, method, env, data=data)
    model = build_model(ctx, method, opts)
    if path is not None:
        check_trainable_compatible(model, path)
        model.load_trainable(str(path))
    return OpenRun(ctx, method, opts, model, path)


def _state_file(run_dir: Path, state) -> Path:
    """``RUN/best.safetensors``, or the file ``state`` names (a checkpoint directory: its
    ``trainable.safetensors``)."""
    if state is None:
        return run_dir / BEST
    return state_file_in(
        state, TRAINABLE, CheckpointError,
        "give a .safetensors file or a checkpoint directory with trainable.safetensors",
    )  # fmt: skip


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
    rows: str = "run",
    state: Optional[str] = None,
    resume: bool = False,
    part: Optional[tuple] = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Optional[dict]:
    """Score ``split`` with a finished run (LLM method or CF model) and write its metrics.

    ``rows``: ``"run"`` scores the rows the run used for the split (its subsample, so its own
    metrics are reproduced), ``"all"`` the whole split (see :meth:`Method.eval_rows`).
    ``state``: a trainable state to score instead of the run's best (a checkpoint).
    ``resume``: score in chunk files that a later call reuses (:mod:`llmrec.scoring_parts`);
    ``part`` ``(K, N)``: only the K-th of N ranges of chunks (implies ``resume``);
    ``chunk_rows``: rows per chunk. Returns None, writing no metrics, while chunks are missing.
    """
    env = env or DistEnv()
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    # the run is read and eval_<split>.json written: not while another process writes it
    lock = RunLock(run_dir, "evaluate") if env.is_main and os.access(run_dir, os.W_OK) else None
    try:
        return _evaluate_locked(
            run_dir, info, data_path, split, predictions, metrics_path, batch_size, device,
            env, progress, rows, state, resume or part is not None, part, chunk_rows,
        )  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _score_in_chunks(run, info, df, run_dir, part, progress, chunk_rows):
    """``(scores, costs)`` of ``df`` from chunk files under ``RUN/scores``
    (:mod:`llmrec.scoring_parts`): scores None while chunks are missing; costs as
    :func:`~llmrec.scoring_parts.chunk_costs`. A method that ranks a user's rows among each
    other (``scores_by_user``) is scored in chunks of whole users, ``df`` ordered by user."""
    from llmrec.scoring_parts import chunk_costs, score_key, score_resumably

    ctx = run.ctx
    kind = type(run.method)
    if kind.evaluate is not Method.evaluate and kind.score_frame is Method.score_frame:
        raise RunConfigError(
            f"evaluate --resume/--part: method {ctx.cfg.method!r} overrides evaluate but not "
            "score_frame, so its chunks cannot be scored as its evaluate scores; score it in "
            "one pass"
        )
    by_user = run.method.scores_by_user
    order = np.argsort(df["uid"].to_numpy(), kind="stable") if by_user else np.arange(len(df))
    frame = df.iloc[order]
    inputs = {g: sorted(v.values()) for g, v in (info.get("inputs") or {}).items()
              if isinstance(v, dict)}  # fmt: skip
    key = score_key(frame, ctx.cfg.to_dict(), run.state, inputs, ctx.cfg.train.eval_batch_size,
                    chunk_rows)  # fmt: skip
    if by_user:
        key["whole_users"] = True

    def score_rows(chunk):
        return run.method.score_frame(ctx, run.model, run.opts, chunk, run.predict, "test")

    def log(msg: str) -> None:  # evaluate's context logs nothing; these lines say what is left
        print(f"[llmrec] {msg}", file=sys.stderr, flush=True)

    groups = frame["uid"].to_numpy() if by_user else None
    got = score_resumably(frame, score_rows, run_dir, key, part, log=log, progress=progress,
                          machine=_machine_line(machine_info(str(ctx.device))), groups=groups)  # fmt: skip
    if got is None:
        return None, None
    scores = np.empty(len(df))
    scores[order] = got
    return scores, chunk_costs(run_dir, key)


def _machine_line(info: dict) -> str:
    """One line for a chunk file's metadata: CPU (or GPU) and torch's threads."""
    return f"{info['gpu'] or info['cpu']}; {info['torch_threads']} threads"


def _evaluate_locked(
    run_dir,
    info,
    data_path,
    split,
    predictions,
    metrics_path,
    batch_size,
    device,
    env,
    progress,
    rows="run",
    state=None,
    resume=False,
    part=None,
    chunk_rows=DEFAULT_CHUNK_ROWS,
) -> Optional[dict]:
    start = time.perf_counter()
    if info.get("kind") == "cf":
        from llmrec.cf.cf_run import evaluate_cf_run

        if state is not None:
            raise RunConfigError(f"{run_dir}: a CF run has one model file; --state is for LLM runs")
        if resume:
            raise RunConfigError(f"{run_dir}: a CF run scores in seconds; --resume/--part are "
                                 "for LLM runs")  # fmt: skip

        return evaluate_cf_run(
            run_dir, info, data_path=data_path, split=split, predictions=predictions,
            metrics_path=metrics_path, device=device,
        )  # fmt: skip
    run = reopen_run(
        run_dir, data_path=data_path, device=device, progress=progress,
        batch_size=batch_size, env=env, state=state,
    )  # fmt: skip
    ctx = run.ctx
    if split not in ctx.data:
        raise RunConfigError(
            f"{ctx.data.source}: no {split!r} split (has {sorted(ctx.data.splits)})"
        )
    df = run.method.eval_rows(ctx, split, rows)
    scoring = None
    if resume:
        scores, scoring = _score_in_chunks(run, info, df, run_dir, part, progress, chunk_rows)
        if scores is None:
            return None
        block = split_metrics(scores, df)
        block.update(run.method.extra_metrics(ctx, run.model, run.opts, df, run.predict))
    else:
        block, scores = run.method.evaluate(ctx, run.model, run.opts, df, run.predict)
    metrics = {
        "method": ctx.cfg.method,
        "run": str(run_dir),
        split: block,
        "rows": {"which": rows, "count": len(df)},
        "state": None if run.state is None else str(run.state),
        "chunked": bool(resume),
        "config": ctx.cfg.to_dict(),
        "data": ctx.data.summary(),
        "machine": machine_info(str(ctx.device)),
        "wall_time_s": time.perf_counter() - start,
    }
    if scoring is not None:  # the chunks' own scoring times, over every process that wrote one
        metrics["scoring"] = scoring
    if env.is_main:
        write_metrics(
            run_dir, metrics, metrics_path=metrics_path or run_dir / f"eval_{split}.json",
            predictions=predictions, pred_df=df, scores=scores,
        )  # fmt: skip
    return metrics
