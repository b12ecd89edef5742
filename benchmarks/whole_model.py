"""Whole-model CoRA workload at LLaMA-7B shape: one training step and one scoring pass.

A ``LlamaModel`` with random weights (bf16; hidden 4096, 32 heads, intermediate 11008, as
many of the 32 layers as the free GPU memory allows, the count computed and reported) runs,
per method:

* a CoRA training step: a linear generator maps a CF embedding to the per-sample ``A``
  (``B x hidden x r``), the model runs forward on ``B x L`` tokens, a logistic loss on one
  logit of the last position goes backward; only the generator and every ``lora_B`` train
  (the frozen weights get no gradient);
* a scoring pass: the same forward under ``no_grad`` on more prompts.

Methods: ``ours`` (:func:`llmrec_kernels.hf.apply_cora_to_llama` with fused q/k/v, run inside
:func:`llmrec_kernels.hf.cora_weights`), ``reference`` (q/k/v/o patched the reference CoRA
code's way, :func:`benchmarks.model_workloads.patch_reference_way`: a per-module fp32 upcast
of ``x`` and separate q/k/v shrinks) and ``base`` (the unpatched model; its "training step"
is forward + backward to the input embeddings, the floor). Tokens/s and peak memory for each.

Only one patched copy lives at a time beside the unpatched model, so methods are timed one
after the other (each: warm-up, then CUDA-event repetitions); on a CPU (``--tiny``) the
shapes are toy and the numbers only prove the pipeline runs.

    python -m benchmarks.whole_model [--tiny] [--layers N] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.model_workloads import ALPHA, TARGETS, patch_reference_way
from benchmarks.whole_model_report import markdown

__all__ = ["WholeModelConfig", "layers_that_fit", "main", "run"]

LLAMA_7B = {"hidden": 4096, "heads": 32, "ffn": 11008, "layers": 32, "vocab": 32000}
TINY = {"hidden": 64, "heads": 4, "ffn": 128, "layers": 2, "vocab": 256}


class WholeModelConfig:
    """Shapes and repetitions of one run (``tiny``: toy shapes for a CPU smoke run)."""

    def __init__(self, tiny: bool, layers: Optional[int] = None, reps: int = 3) -> None:
        self.shape = dict(TINY if tiny else LLAMA_7B)
        self.rank = 16 if not tiny else 4
        self.cf_dim = 256 if not tiny else 16
        self.train_bl = (8, 256) if not tiny else (2, 16)
        self.score_bl = (64, 192) if not tiny else (4, 16)
        self.layers = layers
        self.reps = reps
        self.warmup = 2


def _layer_bytes(cfg: WholeModelConfig, elem: int) -> int:
    """Memory one layer adds to the run: its weights twice (the unpatched model and one patched
    copy) and the training step's saved activations (with the reference way's fp32 copies)."""
    s = cfg.shape
    d, ffn = s["hidden"], s["ffn"]
    weights = (4 * d * d + 3 * d * ffn) * elem
    b, length = cfg.train_bl
    tokens = b * length
    acts = tokens * (12 * d + 4 * ffn) * elem + 4 * tokens * d * 4  # + fp32 x per module
    acts += b * s["heads"] * length * length * elem  # attention probabilities (sdpa math path)
    return 2 * weights + int(1.5 * acts)


def layers_that_fit(cfg: WholeModelConfig, free_bytes: int, elem: int = 2) -> int:
    """How many of the model's layers fit in ``free_bytes`` (at least 1, at most the model's)."""
    s = cfg.shape
    d = s["hidden"]
    fixed = 2 * 2 * s["vocab"] * d * elem  # embeddings of both copies (and their gradient room)
    fixed += cfg.cf_dim * d * cfg.rank * 4 * 4  # the fp32 generator, its grad and Adam-free slack
    b, length = cfg.score_bl
    fixed += 6 * b * length * max(d, s["ffn"]) * elem  # scoring's transient activations
    fixed += 2 << 30  # allocator fragmentation, cuBLAS workspaces, the CUDA context's slack
    usable = int(0.9 * free_bytes) - fixed
    return max(1, min(s["layers"], usable // _layer_bytes(cfg, elem)))


def _build_base(cfg: WholeModelConfig, n_layers: int, device, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    s = cfg.shape
    config = LlamaConfig(
        hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=n_layers,
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], vocab_size=s["vocab"],
        max_position_embeddings=2048, attn_implementation="sdpa",
    )  # fmt: skip
    # Built on the device in the target dtype: initialising 7B parameters on the host takes
    # minutes, on the GPU a second.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaModel(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``: after ``warmup`` calls, ``reps`` calls each synchronised."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _peak_gib(fn: Callable[[], object], device: torch.device, resident: int) -> Optional[float]:
    """Peak GPU memory of one call as if the measured model were alone on the device: its
    ``resident`` bytes (weights, generator) plus the most the call allocated beyond what was
    allocated before it (the unpatched model kept beside a patched copy is not counted)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (resident + torch.cuda.max_memory_allocated(device) - before) / 2**30


def _resident_bytes(*modules: nn.Module) -> int:
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _batch(cfg: WholeModelConfig, bl, device, gen) -> dict:
    b, length = bl
    ids = torch.randint(4, cfg.shape["vocab"], (b, length), generator=gen)
    return {
        "input_ids": ids.to(device),
        "cf": torch.randn(b, cfg.cf_dim, generator=gen).to(device),
        "label": torch.randint(0, 2, (b,), generator=gen).float().to(device),
    }


def _method_fns(name, model, cfg, generator, train, score, yes_id):
    """(train_step, score_pass) callables of one method on ``model``."""
    d, r = cfg.shape["hidden"], cfg.rank
    w_yes = model.embed_tokens.weight[yes_id]

    def lora_a(cf):
        return generator(cf).view(cf.shape[0], d, r)

    if name == "ours":
        from llmrec_kernels import hf

        def forward(batch):
            with hf.cora_weights(model, lora_a(batch["cf"])):
                return model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state

        trainable = [*generator.parameters(), *hf.lora_b_parameters(model).values()]
    elif name == "reference":
        holder = next(m.holder for m in model.modules() if hasattr(m, "holder"))

        def forward(batch):
            holder.lora_a = lora_a(batch["cf"])
            try:
                return model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
            finally:
                holder.lora_a = None

        trainable = [*generator.parameters()]
        trainable += [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    else:  # base: the frozen model, forward + backward to the input embeddings

        def forward(batch):
            emb = model.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
            batch["_emb"] = emb
            return model(inputs_embeds=emb, use_cache=False).last_hidden_state

        trainable = []

    def train_step():
        hidden = forward(train)
        logit = hidden[:, -1].float() @ w_yes.float()
        loss = F.binary_cross_entropy_with_logits(logit, train["label"])
        targets = trainable or [train["_emb"]]
        return torch.autograd.grad(loss, targets)

    def score_pass():
        with torch.no_grad():
            return forward(score)[:, -1].float() @ w_yes.float()

    return train_step, score_pass


def run(
    cfg: WholeModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    say: Callable[[str], None] = print,
    on_update: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Measure every method; return ``{"meta": ..., "records": [...]}`` (see the module doc).

    ``on_update`` gets the results so far after each method (a run cut short keeps them).
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        n_layers = cfg.layers or layers_that_fit(cfg, free, torch.finfo(dtype).bits // 8)
        mem_note = f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free before building"
    else:
        n_layers, mem_note = cfg.layers or cfg.shape["layers"], "CPU"
    say(f"whole model: {n_layers} of {cfg.shape['layers']} layers ({mem_note})")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base_model = _build_base(cfg, n_layers, device, dtype)
    d, r = cfg.shape["hidden"], cfg.rank
    generator0 = nn.Linear(cfg.cf_dim, d * r, device=device)  # fp32, as CoRA's generator
    with torch.no_grad():
        generator0.weight.mul_(1.0 / (d**0.5))
    train = _batch(cfg, cfg.train_bl, device, gen)
    score = _batch(cfg, cfg.score_bl, device, gen)
    b_vals = {t: (torch.randn(d, r, generator=gen) * 0.02).to(device) for t in TARGETS}
    backend = "auto" if device.type == "cuda" else "torch"
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "layers": n_layers,
        "layers_of": cfg.shape["layers"],
        "memory": mem_note,
        "shape": cfg.shape,
        "rank": r,
        "train_BxL": list(cfg.train_bl),
        "score_BxL": list(cfg.score_bl),
        "reps": cfg.reps,
        "timing": "sequential per method: warm-up, then synchronised wall-clock repetitions",
    }
    records: list[dict] = []
    for name in ("base", "ours", "reference"):
        rec = {"method": name, "layers": n_layers, "status": "ok"}
        model = base_model if name == "base" else copy.deepcopy(base_model)
        generator = copy.deepcopy(generator0)
        try:
            if name == "ours":
                from llmrec_kernels import hf

                hf.apply_cora_to_llama(
                    model, rank=r, alpha=ALPHA, target_modules=TARGETS, fuse_qkv=True,
                    backend=backend,
                )  # fmt: skip
                with torch.no_grad():
                    for pname, p in hf.lora_b_parameters(model).items():
                        target = next((t for t in TARGETS if t in pname), None)
                        if target is not None and p.shape == b_vals[target].shape:
                            p.copy_(b_vals[target])
            elif name == "reference":
                patch_reference_way(model, r)
                with torch.no_grad():
                    for mname, mod in model.named_modules():
                        if hasattr(mod, "holder"):
                            target = mname.rsplit(".", 1)[-1]
                            mod.lora_B.weight.copy_(b_vals[target])
            train_step, score_pass = _method_fns(name, model, cfg, generator, train, score, 3)
            resident = _resident_bytes(model, generator)
            rec["resident_gib"] = resident / 2**30
            for kind, fn, bl in (
                ("train", train_step, cfg.train_bl),
                ("score", score_pass, cfg.score_bl),
            ):
                secs = _time(fn, device, cfg.warmup, cfg.reps)
                med = statistics.median(secs)
                rec[f"{kind}_s"] = med
                rec[f"{kind}_spread_s"] = [min(secs), max(secs)]
                rec[f"{kind}_tokens_per_s"] = bl[0] * bl[1] / med
                rec[f"{kind}_peak_gib"] = _peak_gib(fn, device, resident)
        except Exception as exc:  # one failing method must not lose the others' numbers
            rec["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        records.append(rec)
        say(json.dumps(rec))
        if on_update is not None:
            on_update({"meta": meta, "records": records})
        # Drop every reference to the patched copy (the step closures hold it too) before the
        # next copy is made: only one patched copy may live beside the unpatched model.
        model = generator = train_step = score_pass = fn = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"meta": meta, "records": records}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.whole_model", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (a smoke run)")
    parser.add_argument("--layers", type=int, default=None, help="default: as many as fit")
    parser.add_argument("--reps", type=int, default=None, help="default: 3 (1 with --tiny)")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.reps is None:
        args.reps = 1 if args.tiny else 3
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        print("whole_model: no CUDA device (use --tiny on a CPU)", file=sys.stderr)
        return 2
    cfg = WholeModelConfig(args.tiny, args.layers, args.reps)

    def keep(results: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    results = run(cfg, device, dtype, on_update=keep)
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0 if all(r["status"] == "ok" for r in results["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())
