"""Adapters in the style of peft: a trained method's state as a folder that rebuilds it.

An adapter folder holds two files:

* ``adapter_config.json``: what the model is (the method and its resolved options, the CF
  embedding size, the tensors' names, shapes and dtypes, the base model's name or path,
  revision, architecture sizes and, for local weights, their sha256, the CF embeddings'
  sha256 as the run recorded them, the digest of the weights file);
* ``adapter_model.safetensors``: every tensor the method trains (CoRA's generator and
  ``lora_B`` matrices, CoLLM's CF encoder and LoRA factors, TALLRec's LoRA, A-LLMRec's
  aligner, projections and statistics), written by the model's own ``save_trainable``.

:func:`save_pretrained` writes one for a model, :func:`export_run` (``llmrec export RUN
DIR``) for a finished run's best state, :func:`from_pretrained` rebuilds the method's model
on a fresh, unpatched base model, so that it scores every row bit for bit as the run did.
A folder that does not pass :func:`read_adapter_config`'s checks is refused with one line
(:class:`~llmrec.errors.AdapterError`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from llmrec.config import ANSWER_SCORES
from llmrec.errors import AdapterError, LLMRecError, RunConfigError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterConfig",
    "export_run",
    "from_pretrained",
    "is_adapter_dir",
    "read_adapter_config",
    "save_pretrained",
    "save_run_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "llmrec-adapter"
FORMAT_VERSION = 1

PathLike = Union[str, Path]

#: every key of adapter_config.json and the JSON type it must have
_KEYS: Dict[str, tuple] = {
    "format": (str,),
    "format_version": (int,),
    "llmrec_version": (str,),
    "method": (str,),
    "options": (dict,),
    "cf_dim": (int,),
    "yes_token_id": (int, type(None)),
    "answer_score": (str,),
    "base_model": (dict,),
    "cf": (dict, type(None)),
    "run": (dict, type(None)),
    "tensors": (dict,),
    "weights_sha256": (str,),
}
_BASE_SIZES = ("hidden_size", "num_hidden_layers", "vocab_size")


@dataclass
class AdapterConfig:
    """The checked content of an ``adapter_config.json`` (see the module's docstring).

    ``tensors``: ``{name: {"shape": [...], "dtype": "float32"}}``; ``base_model``: at least
    ``name_or_path``, ``model_type``, ``dtype`` and :data:`_BASE_SIZES`.
    """

    method: str
    options: Dict[str, Any]
    cf_dim: int
    yes_token_id: Optional[int]
    answer_score: str
    base_model: Dict[str, Any]
    cf: Optional[Dict[str, Any]]
    run: Optional[Dict[str, Any]]
    tensors: Dict[str, Dict[str, Any]]
    weights_sha256: str
    llmrec_version: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# writing


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def base_model_info(llm, name_or_path: Optional[str] = None, **extra) -> Dict[str, Any]:
    """What an adapter records of its base model ``llm`` (a transformers causal LM).

    ``name_or_path``: how the user names it (``--llm``; default the model's own
    ``name_or_path``); ``extra``: ``revision``, ``weights_sha256`` (``{file: sha256}``).
    """
    config = llm.config
    info = {
        "name_or_path": name_or_path or getattr(config, "_name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "model_type": getattr(config, "model_type", None),
        "dtype": _dtype_name(llm.get_input_embeddings().weight.dtype),
        **{k: int(getattr(config, k)) for k in _BASE_SIZES},
        "weights_sha256": None,
    }
    info.update({k: v for k, v in extra.items() if v is not None})
    return info


def save_pretrained(
    model,
    directory: PathLike,
    *,
    method: str,
    options,
    base_model: Optional[Dict[str, Any]] = None,
    cf: Optional[Dict[str, Any]] = None,
    run: Optional[Dict[str, Any]] = None,
    force: bool = False,
) -> Path:
    """Write ``model``'s trainable state as an adapter folder ``directory``; returns it.

    Args:
        model: a method's model (a :class:`~llmrec.method.Recommender` with ``.llm``, e.g.
            :class:`~llmrec.CoRARecommender`), trained.
        directory: the folder to write; it must be new or empty, or (with ``force``) an
            adapter folder, whose two files are then replaced.
        method: the registered method's name (``"cora"``, ``"collm"``, ``"tallrec"``, ...).
        options: the method's ``Options`` (dataclass or dict) the model was built with.
        base_model: what to record of the base model beyond :func:`base_model_info`
            (``name_or_path``, ``revision``, ``weights_sha256``).
        cf: the CF embeddings' record (``{"sha256": {file: digest}, ...}``); run: the run's.

    The weights file is the model's ``save_trainable`` output, sealed with its sha256
    (:func:`llmrec.safe_files.save_trainable_atomic`); the config is written last, so a
    folder whose config names another weights digest is refused on load. A new folder is
    written under a temporary name and renamed into place.
    """
    from llmrec import __version__
    from llmrec.config import RunConfig
    from llmrec.method import get_method, parse_options

    # a registered method and options it takes, else one line (before anything is written)
    options = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    parse_options(type(get_method(method)), RunConfig(method=method, method_kwargs=options))
    directory = Path(directory)
    _check_target(directory, force)
    tensors = {
        name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        for name, t in model.trainable_state().items()
    }
    yes = getattr(model, "yes_token_id", None)
    config = AdapterConfig(
        method=method,
        options=options,
        cf_dim=int(getattr(model, "cf_dim", 0) or 0),
        yes_token_id=None if yes is None else int(yes),
        # the score the model was trained on: "Yes" - "No", or "Yes" alone (llmrec.llm)
        answer_score="yes" if getattr(model, "no_token_id", 0) is None else "yes-no",
        base_model=base_model_info(model.llm, **(base_model or {})),
        cf=cf,
        run=run,
        tensors=tensors,
        weights_sha256="",
        llmrec_version=__version__,
    )
    if directory.exists():  # an empty folder, or an adapter folder replaced (force)
        _write_files(model, directory, config)
        return directory
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_files(model, tmp, config)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_files(model, folder: Path, config: AdapterConfig) -> None:
    from safetensors import safe_open

    from llmrec.safe_files import CHECKSUM_KEY, atomic_write_json, save_trainable_atomic

    weights = folder / ADAPTER_WEIGHTS
    save_trainable_atomic(model, weights)
    with safe_open(str(weights), framework="pt") as f:
        config.weights_sha256 = (f.metadata() or {})[CHECKSUM_KEY]
    atomic_write_json(folder / ADAPTER_CONFIG, config.to_dict())


def is_adapter_dir(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding an ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _check_target(directory: Path, force: bool) -> None:
    """Refuse a target that is a file, a non-empty folder of something else, or an adapter
    folder without ``force``; never a run or a dataset, ``force`` included."""
    from llmrec.output_guard import check_writable_parent, is_dataset, is_run

    if not directory.exists():
        check_writable_parent(directory, "DIR")
        return
    if not directory.is_dir():
        raise AdapterError(f"{directory}: exists and is not a directory")
    if is_run(directory) or is_dataset(directory):
        what = "run" if is_run(directory) else "dataset"
        raise AdapterError(
            f"{directory} is a {what} directory; an adapter is never written into one, "
            "--force included: choose another DIR"
        )
    if not any(directory.iterdir()):
        return
    if not is_adapter_dir(directory):
        raise AdapterError(
            f"{directory} is a non-empty directory that is not an adapter folder; choose a "
            "new or empty DIR"
        )
    if not force:
        raise AdapterError(
            f"{directory} already holds an adapter; pass --force (force=True) to replace it"
        )


# ---------------------------------------------------------------------------------------------
# reading and checking


def read_adapter_config(directory: PathLike) -> AdapterConfig:
    """The checked ``adapter_config.json`` of ``directory``, the weights file verified.

    Raises :class:`~llmrec.errors.AdapterError` (one line) for a missing folder or file,
    unreadable JSON, another format, missing, unknown or mistyped keys, an unregistered
    method, options the method does not take, and a weights file that is corrupt, that holds
    other tensors or shapes than the config lists, or whose digest the config does not name.
    """
    from llmrec.safe_files import read_json

    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"{directory}: no {ADAPTER_CONFIG} (not an adapter folder written by "
            "`llmrec export` or llmrec.save_pretrained)"
        )
    raw = read_json(path, AdapterError)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AdapterError(f"{path}: not an llmrec adapter config (format {FORMAT!r} expected)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{path}: format_version {raw.get('format_version')!r}; this llmrec reads "
            f"{FORMAT_VERSION} (written by another llmrec version?)"
        )
    missing = sorted(set(_KEYS) - set(raw))
    unknown = sorted(set(raw) - set(_KEYS))
    if missing or unknown:
        problems = [f"missing keys {missing}"] if missing else []
        problems += [f"unknown keys {unknown}"] if unknown else []
        raise AdapterError(f"{path}: " + "; ".join(problems))
    for key, types in _KEYS.items():
        if not isinstance(raw[key], types) or (isinstance(raw[key], bool) and bool not in types):
            raise AdapterError(f"{path}: {key!r} has the wrong type ({type(raw[key]).__name__})")
    config = AdapterConfig(**raw)
    _check_method(path, config)
    _check_base_record(path, config.base_model)
    _check_weights(directory, config)
    return config


def _check_method(path: Path, config: AdapterConfig) -> None:
    from llmrec.method import available_methods

    methods = available_methods()
    if config.method not in methods:
        raise AdapterError(
            f"{path}: unknown method {config.method!r} (registered: {sorted(methods)})"
        )
    if config.cf_dim < 0:
        raise AdapterError(f"{path}: cf_dim must be >= 0, got {config.cf_dim}")
    if config.answer_score not in ANSWER_SCORES:
        raise AdapterError(
            f"{path}: answer_score must be one of {list(ANSWER_SCORES)}, got "
            f"{config.answer_score!r}"
        )
    if methods[config.method].uses_cf and config.cf_dim < 1:
        raise AdapterError(f"{path}: method {config.method!r} needs cf_dim >= 1")
    _method_options(path, config)  # options the method does not take: refused here


def _method_options(path: Path, config: AdapterConfig):
    """The method's ``Options`` from the config (one line when they do not parse)."""
    from llmrec.config import RunConfig
    from llmrec.method import available_methods, parse_options

    method = available_methods()[config.method]
    try:
        return parse_options(method, RunConfig(method=config.method, method_kwargs=config.options))
    except (LLMRecError, TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: options: {exc}") from None


def _check_base_record(path: Path, base: Mapping[str, Any]) -> None:
    for key in _BASE_SIZES:
        value = base.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterError(
                f"{path}: base_model.{key} must be a positive integer, got {value!r}"
            )


def _tensors_differ(want: Mapping[str, Any], have: Mapping[str, Any], where: str) -> str:
    """What differs between the tensors ``where`` lists (``{name: {"shape", "dtype"}}``) and
    ``have`` (``{name: shape}`` or ``{name: (shape, dtype)}``); "" when nothing does."""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        return f"tensors differ from {where}'s (missing {missing[:3]}, unlisted {extra[:3]})"
    for name, spec in want.items():
        shape, dtype = have[name] if isinstance(have[name], tuple) else (have[name], None)
        listed = spec.get("shape") if isinstance(spec, dict) else spec
        listed_dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if shape != listed or (dtype is not None and dtype != listed_dtype):
            mine = f"{dtype} {shape}" if dtype else f"shape {shape}"
            theirs = f"{listed_dtype} {listed}" if dtype else f"{listed}"
            return f"tensor {name} has {mine}, {where} lists {theirs}"
    return ""


def _check_weights(directory: Path, config: AdapterConfig) -> None:
    from safetensors import safe_open

    from llmrec.safe_files import CHECKSUM_KEY, verify_safetensors

    weights = directory / ADAPTER_WEIGHTS
    verify_safetensors(weights, AdapterError)  # missing, truncated or corrupt: one line
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # a header safetensors itself cannot parse
        raise AdapterError(f"{weights}: not a readable safetensors file ({exc})") from None
    if meta.get(CHECKSUM_KEY) != config.weights_sha256:
        raise AdapterError(
            f"{weights}: not the weights {ADAPTER_CONFIG} names (weights_sha256 differs); "
            "the two files come from different adapters"
        )
    problem = _tensors_differ(config.tensors, stored, where=ADAPTER_CONFIG)
    if problem:
        raise AdapterError(f"{weights}: {problem}")


# ---------------------------------------------------------------------------------------------
# rebuilding


class _NoData:
    """The data of a context that has none: a method whose model needs it says so."""

    def __init__(self, method: str):
        self.method = method

    def _refuse(self, *_):
        raise AdapterError(
            f"method {self.method!r} needs the run's dataset to rebuild its model: pass "
            "data=llmrec.data.load_run_data(DIR) to from_pretrained"
        )

    __getitem__ = _refuse
    __getattr__ = _refuse


def from_pretrained(
    base_model,
    adapter_dir: PathLike,
    tokenizer=None,
    *,
    user_table: Optional[torch.Tensor] = None,
    item_table: Optional[torch.Tensor] = None,
    data=None,
    backend: Optional[str] = None,
):
    """The method's model rebuilt on ``base_model`` with the adapter's trained tensors.

    Args:
        base_model: a fresh, unpatched transformers causal LM, the one the adapter was
            trained on (same architecture sizes and dtype; its weights decide the scores).
            It is patched in place and frozen, as in training.
        adapter_dir: a folder written by :func:`save_pretrained` or ``llmrec export``.
        tokenizer: the base model's tokenizer (default: loaded from the model's
            ``name_or_path``); it resolves the "Yes" token, checked against the recorded id.
        user_table, item_table: the CF embeddings ``(n_users + 1, d_cf)`` /
            ``(n_items + 1, d_cf)`` float; checked against the adapter's ``cf_dim`` when
            given, needed by A-LLMRec (the scoring batches of CoRA and CoLLM carry rows of
            them, see :class:`llmrec.data.batching.RecCollator`). An A-LLMRec adapter
            trained on a SASRec CF run (``user_vectors`` ``history``) needs the model that
            encodes histories: pass ``user_table=llmrec.cf.user_vectors.load_user_vectors(
            cf_run, table, data)``.
        data: the dataset (:func:`llmrec.data.load_run_data`), for a method whose model
            needs it to be built (A-LLMRec).
        backend: the kernel backend of the patched projections (default: the adapter's).

    Returns the model (``score(batch)`` ``(B,)`` float32 logits) in eval mode on the base
    model's device. Raises :class:`~llmrec.errors.AdapterError` (one line) when the folder
    fails :func:`read_adapter_config` or does not fit ``base_model`` or the tables.
    """
    from llmrec.config import RunConfig
    from llmrec.method import get_method
    from llmrec.training_loop import DistEnv

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    _check_base(adapter_dir, config, base_model)
    _check_tables(adapter_dir, config, user_table, item_table)
    if backend is not None and "backend" in config.options:
        config.options["backend"] = backend
    opts = _method_options(adapter_dir / ADAPTER_CONFIG, config)
    method = get_method(config.method)
    tokenizer = tokenizer if tokenizer is not None else _base_tokenizer(base_model)
    device = base_model.get_input_embeddings().weight.device
    cfg = RunConfig(
        method=config.method, method_kwargs=config.options, answer_score=config.answer_score
    )
    ctx = _AdapterContext(
        cfg, data if data is not None else _NoData(config.method), base_model, tokenizer,
        device, DistEnv(), lambda m: None, None, user_table, item_table,
        adapter_cf_dim=config.cf_dim,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays untouched
        torch.manual_seed(cfg.train.seed)
        try:
            model = method.build(ctx, opts)
        except (LLMRecError, ValueError) as exc:
            raise AdapterError(f"{adapter_dir}: cannot rebuild {config.method}: {exc}") from None
        except (AttributeError, TypeError) as exc:  # e.g. A-LLMRec without its CF tables
            raise AdapterError(
                f"{adapter_dir}: cannot rebuild {config.method} ({type(exc).__name__}: {exc}); "
                "pass the CF tables (user_table=, item_table=) and data= it needs"
            ) from None
    model.to(device)
    _check_model(adapter_dir, config, model)
    try:
        model.load_trainable(str(adapter_dir / ADAPTER_WEIGHTS))
    except ValueError as exc:
        raise AdapterError(f"{adapter_dir}: {exc}") from None
    model.eval()
    return model


@dataclass
class _AdapterContext:
    """A :class:`~llmrec.method.RunContext` whose ``cf_dim`` is the adapter's (the CF
    tables are optional when rebuilding)."""

    cfg: Any
    data: Any
    llm: Any
    tokenizer: Any
    device: torch.device
    env: Any
    log: Any
    cf_path: Optional[str] = None
    user_table: Optional[torch.Tensor] = None
    item_table: Optional[torch.Tensor] = None
    adapter_cf_dim: int = 0

    @property
    def cf_dim(self) -> int:
        return self.adapter_cf_dim


def _base_tokenizer(base_model):
    from llmrec.errors import LLMLoadError

    name = getattr(base_model.config, "_name_or_path", None)
    if not name:
        raise AdapterError("give the base model's tokenizer: tokenizer=... (the model names none)")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise LLMLoadError(
            f"{name}: the tokenizer cannot be loaded ({exc}); give tokenizer="
        ) from None
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    return tokenizer


def _check_base(adapter_dir: Path, config: AdapterConfig, base_model) -> None:
    """The base model's sizes and dtype must be those the adapter was trained on."""
    base = config.base_model
    have = getattr(base_model, "config", None)
    if have is None or not hasattr(base_model, "get_input_embeddings"):
        raise AdapterError(f"{adapter_dir}: base_model must be a transformers causal LM")
    for key in _BASE_SIZES:
        value = getattr(have, key, None)
        if value != base[key]:
            raise AdapterError(
                f"{adapter_dir}: the base model has {key} {value}, the adapter was trained on "
                f"{base[key]} ({base.get('name_or_path')}); load that model"
            )
    patched = [
        name for name, m in base_model.named_modules()
        if type(m).__module__.startswith("llmrec_kernels")
    ]  # fmt: skip
    if patched:  # a second patch would stack on the first: other scores, silently
        raise AdapterError(
            f"{adapter_dir}: the base model is already patched ({patched[0]}, ...); load a "
            "fresh one for each adapter"
        )
    dtype = _dtype_name(base_model.get_input_embeddings().weight.dtype)
    if base.get("dtype") and dtype != base["dtype"]:
        raise AdapterError(
            f"{adapter_dir}: the base model is {dtype}, the adapter was trained on a "
            f"{base['dtype']} base; load it as {base['dtype']} (the scores depend on it)"
        )


def _check_tables(adapter_dir: Path, config: AdapterConfig, user_table, item_table) -> None:
    for name, table in (("user_table", user_table), ("item_table", item_table)):
        table = getattr(table, "table", table)  # a UserVectors: its exported table
        if table is None:
            continue
        if table.dim() != 2 or int(table.shape[1]) != config.cf_dim:
            raise AdapterError(
                f"{adapter_dir}: {name} has shape {tuple(table.shape)}; the adapter needs CF "
                f"embeddings of size {config.cf_dim} (rows x {config.cf_dim})"
            )


def _check_model(adapter_dir: Path, config: AdapterConfig, model) -> None:
    """The rebuilt model must hold exactly the tensors the config lists, shapes and dtypes."""
    own = {
        name: (list(t.shape), _dtype_name(t.dtype)) for name, t in model.trainable_state().items()
    }
    problem = _tensors_differ(config.tensors, own, where="the adapter")
    if problem:
        raise AdapterError(
            f"{adapter_dir}: the rebuilt {config.method} model does not fit: {problem} "
            "(options edited?)"
        )
    yes = getattr(model, "yes_token_id", None)
    if config.yes_token_id is not None and yes is not None and int(yes) != config.yes_token_id:
        raise AdapterError(
            f"{adapter_dir}: the tokenizer's answer token is id {yes}, the adapter's "
            f"{config.yes_token_id}: another tokenizer than the base model's"
        )


# ---------------------------------------------------------------------------------------------
# a run's best state


def export_run(
    run_dir: PathLike,
    directory: PathLike,
    *,
    force: bool = False,
    data_path: Optional[str] = None,
    device: str = "cpu",
    state: Optional[str] = None,
) -> Path:
    """``llmrec export RUN DIR``: the run's best state (or ``state``) as an adapter folder.

    The run is reopened (:func:`llmrec.llm_training.reopen_run`: its LLM, CF embeddings and
    data; ``data_path`` when the data moved) and its model saved with
    :func:`save_pretrained`, recording the base model (``--llm`` as given, its revision, the
    weights' sha256 for a local folder, GGUF file or the tiny LLM) and the CF embeddings'
    digest from ``run.json``. ``directory`` may not lie inside the run, its data or its CF run.
    """
    from llmrec.llm_training import reopen_run
    from llmrec.run_store import read_run_info

    run_dir, directory = Path(run_dir), Path(directory)
    info = read_run_info(run_dir)
    if info["kind"] != "llm":
        raise RunConfigError(
            f"{run_dir}: a CF run has no adapter (its embeddings.safetensors is its export)"
        )
    _check_not_inside(directory, run_dir, info, data_path)
    _check_target(directory, force)
    run = reopen_run(run_dir, data_path=data_path, device=device, progress=False, state=state)
    return save_run_adapter(run, directory, force=force)


def save_run_adapter(run, directory: PathLike, *, force: bool = False) -> Path:
    """A reopened run's model (:class:`llmrec.llm_training.OpenRun`, the state it loaded)
    written with :func:`save_pretrained`, with the run's base model and CF records."""
    from llmrec.run_store import read_run_info

    run_dir = Path(run.ctx.cfg.out)
    if not run.method.trains:
        raise RunConfigError(f"{run_dir}: method {run.method.name!r} trains nothing to export")
    info = read_run_info(run_dir)
    return save_pretrained(
        run.model, directory, method=run.method.name, options=run.opts,
        base_model=_base_record(run_dir, info), cf=_cf_record(info),
        run={"created": info.get("created"), "state": run.state.name if run.state else None},
        force=force,
    )  # fmt: skip


def _check_not_inside(directory: Path, run_dir: Path, info: dict, data_path) -> None:
    from llmrec.output_guard import check_outputs

    config = info["config"]
    reads = [("RUN", run_dir), ("the run's data", data_path or config.get("data"))]
    if info.get("cf_path"):
        reads.append(("the run's CF run", info["cf_path"]))
    check_outputs([("DIR", directory)], [(f, p) for f, p in reads if isinstance(p, (str, Path))])


def _base_record(run_dir: Path, info: dict) -> Dict[str, Any]:
    """``name_or_path``, ``revision`` and ``weights_sha256`` of the run's LLM."""
    from llmrec.input_digests import digest_inputs
    from llmrec.pretrained import is_hub_id

    llm = info["config"].get("llm", "tiny")
    record: Dict[str, Any] = {"name_or_path": llm}
    if llm == "tiny":  # the random LLM saved in the run: its weights are its identity
        record["weights_sha256"] = _by_name(digest_inputs(llm=run_dir / "llm").get("llm"))
    elif info.get("inputs", {}).get("llm"):  # a local folder or GGUF file, hashed by the run
        record["weights_sha256"] = _by_name(info["inputs"]["llm"])
    if isinstance(llm, str) and is_hub_id(llm) and "@" in llm:
        record["revision"] = llm.partition("@")[2]
    return record


def _cf_record(info: dict) -> Optional[Dict[str, Any]]:
    files = (info.get("inputs") or {}).get("cf")
    if not info.get("cf_path"):
        return None
    return {"path": info["cf_path"], "sha256": _by_name(files)}


def _by_name(files: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    """``{file name: sha256}`` of ``{path: sha256}`` (the folder is not part of the identity)."""
    return None if not files else {Path(p).name: d for p, d in sorted(files.items())}
