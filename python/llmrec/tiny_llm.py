"""A tiny randomly initialised LLaMA and a tokenizer trained locally, plus LLM loading.

No model hub is reachable on the project's machines, so ``--llm tiny`` builds:

* a byte-level BPE tokenizer trained with the ``tokenizers`` library on the dataset's text
  (prompts and titles), wrapped as a :class:`transformers.PreTrainedTokenizerFast`, with
  ``<s>`` / ``</s>`` / ``<unk>`` / ``<pad>`` and the words "Yes" and "No" as single tokens
  (``tokenizer("Yes", add_special_tokens=False).input_ids`` has one id);
* a small :class:`transformers.LlamaForCausalLM` (default: hidden 64, 2 layers, 4 heads,
  2 KV heads) with random weights from a fixed seed.

:func:`load_llm` loads either that or a local Hugging Face directory (Vicuna, LLaMA, Qwen2),
checking the tokenizer files first so a directory without a tokenizer fails before the
(large) weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Iterable, Optional, Union

import torch

from llmrec.errors import LLMLoadError

__all__ = [
    "LLMLoadError",
    "TinyLLMConfig",
    "build_tiny_llm",
    "check_tokenizer_files",
    "load_llm",
    "train_tiny_tokenizer",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
ANSWER_WORDS = ["Yes", "No"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def tiny_intermediate_size(hidden_size: int) -> int:
    """LLaMA's FFN width rule (8/3 of the hidden size, rounded up to a multiple of 8)."""
    return max(8, (hidden_size * 8 // 3 + 7) // 8 * 8)


class TinyLLMConfig(dict):
    """Defaults of the tiny model; any key of :class:`transformers.LlamaConfig` may be added."""

    DEFAULTS: ClassVar[dict] = {
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": tiny_intermediate_size(64),
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }

    def __init__(self, **overrides):
        super().__init__({**self.DEFAULTS, **overrides})


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE on ``texts``; return a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # "Yes" / "No" are always one token each, wherever they occur
    tok.add_tokens([AddedToken(w, single_word=False, normalized=False) for w in ANSWER_WORDS])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        truncation_side="left",
    )


def build_tiny_llm(
    texts: Iterable[str], config: Optional[dict] = None, seed: int = 0
) -> tuple[torch.nn.Module, object]:
    """``(LlamaForCausalLM, tokenizer)``: random weights from ``seed``, tokenizer on ``texts``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = TinyLLMConfig(**(config or {}))
    tokenizer = train_tiny_tokenizer(texts, vocab_size=cfg["vocab_size"])
    cfg["vocab_size"] = len(tokenizer)
    llama_cfg = LlamaConfig(
        **cfg,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    fork_devices = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_cfg)
    model.eval()
    return model, tokenizer


def check_tokenizer_files(path: Union[str, Path]) -> None:
    """Raise :class:`LLMLoadError` unless ``path`` holds a loadable tokenizer's files."""
    path = Path(path)
    if not path.is_dir():
        raise LLMLoadError(f"{path}: LLM path is not a directory (give a local HF model dir)")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise LLMLoadError(
            f"{path}: no tokenizer found (none of {list(TOKENIZER_FILES)}); the LLM directory "
            "must contain its tokenizer (save it with tokenizer.save_pretrained(path))"
        )


def load_llm(
    path: Union[str, Path],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    attn_implementation: Optional[str] = None,
):
    """Load ``(model, tokenizer)`` from a local HF directory; the model is frozen, in eval mode.

    The tokenizer is checked and loaded before the weights; it is set to pad and truncate
    on the left. ``attn_implementation`` (``"eager"``, ``"sdpa"``, ...) is passed to
    Hugging Face; None keeps its default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_tokenizer_files(path)
    if not (path / "config.json").exists():
        raise LLMLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise LLMLoadError(f"{path}: the tokenizer cannot be loaded: {exc}") from exc
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), **{dtype_kw: dtype}, **extra)
    except Exception as exc:
        raise LLMLoadError(f"{path}: the model cannot be loaded: {exc}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def save_llm(model, tokenizer, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    if extra:
        (path / "llmrec_tiny.json").write_text(json.dumps(extra, indent=2) + "\n")
    return path
