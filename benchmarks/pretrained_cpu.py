"""CPU throughput of a real pretrained LLM (SmolLM2-135M): CoRA against the unpatched model.

    python -m benchmarks.pretrained_cpu [--llm smollm2] [--data DIR] [--batch 8] [--out F.json]

For each weight dtype (fp32, bf16) and attention implementation (SDPA, eager) it times, on
one batch of real ML-1M prompts (left-padded, as training batches them):

* ``cora train``: :meth:`llmrec.cora.CoRARecommender.loss` and its backward (the
  generator's A, every ``lora_B``), the step ``llmrec train --method cora`` takes;
* ``base train``: the same frozen model unpatched, its "Yes" logit and BCE loss, backward
  to the input embeddings (what any soft-prompt method, CoLLM, A-LLMRec, pays at least);
* ``cora score`` / ``base score``: the same forwards without gradients.

``--configs bf16-eager-compile`` (any ``<dtype>-<attention>-compile``) times the same steps
with every model's decoder layers compiled, as ``llmrec train --compile`` runs them.

The methods of one configuration are timed interleaved, round by round, so their ratio is
measured side by side; tokens/s counts the prompts' real (non-pad) tokens. The padding cost
of a random batch against a length-grouped one (``--group-by-length``, the trainer's
default) is timed the same way on the base train step.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.suite import _cpu_model
from benchmarks.timing import time_cpu_interleaved

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _batches(tokenizer, data_dir, batch: int, cf_dim: int, seed: int = 0):
    """``(random batch, length-grouped batch)`` of ML-1M (or the embedded synthetic) rows."""
    from llmrec.data import load_run_data
    from llmrec.data.batching import RecCollator, make_examples, pad_id_of

    data = load_run_data(str(data_dir) if data_dir and Path(data_dir).exists() else None)
    df = data["train"].sample(n=min(len(data["train"]), 64 * batch), random_state=seed)
    ex = make_examples(df.reset_index(drop=True), tokenizer, template="cora", max_his=10)
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(int(df["uid"].max()) + 1, cf_dim, generator=g)
    items = torch.randn(int(df["iid"].max()) + 1, cf_dim, generator=g)
    collate = RecCollator(ex, pad_id_of(tokenizer), users, items)
    lengths = ex.lengths()
    random_rows = np.arange(batch)
    # a batch as group_by_length makes one: rows of similar length (here: near the median)
    order = np.argsort(lengths, kind="stable")
    mid = len(order) // 2
    grouped_rows = order[mid - batch // 2 : mid - batch // 2 + batch]
    return collate(random_rows), collate(grouped_rows)


def _base_loss(llm, batch, yes_id):
    from llmrec.llm import answer_logit, decoder_body

    emb = llm.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = decoder_body(llm)(
        inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False
    )
    logit = answer_logit(llm, out.last_hidden_state[:, -1], yes_id)
    return F.binary_cross_entropy_with_logits(logit, batch["labels"])


def _base_score(llm, batch, yes_id):
    from llmrec.llm import answer_logit, decoder_body

    out = decoder_body(llm)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return answer_logit(llm, out.last_hidden_state[:, -1], yes_id)


def _measure_config(
    path, dtype_name, dtype, attn, data_dir, batch, budget_s, min_rounds, compile_layers=False
):
    """The records of one (dtype, attention) configuration, its steps timed interleaved.

    ``compile_layers``: every model's decoder layers are compiled first
    (:func:`llmrec.llm.compile_decoder_layers`, as ``llmrec train --compile``); the compile
    happens in the warm-up call, outside the timed rounds.
    """
    from llmrec.cora import CoRARecommender
    from llmrec.llm import answer_token_ids, compile_decoder_layers
    from llmrec.tiny_llm import load_llm

    cf_dim = 256
    base, tok = load_llm(path, dtype=dtype, attn_implementation=attn)
    yes_id = answer_token_ids(tok)[0]
    random_batch, grouped = _batches(tok, data_dir, batch, cf_dim)
    torch.manual_seed(0)
    cora = CoRARecommender(copy.deepcopy(base), tok, cf_dim, rank=16, alpha=32.0, backend="torch")
    # the same model with the reference's LoRA dropout (0.05, training mode): the mask's cost
    cora_drop = CoRARecommender(
        copy.deepcopy(base), tok, cf_dim, rank=16, alpha=32.0, backend="torch",
        generator=copy.deepcopy(cora.generator), lora_dropout=0.05,
    ).train()  # fmt: skip
    # a trained state's lora_B is not zero: give the low-rank branch real work
    with torch.no_grad():
        for model in (cora, cora_drop):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    if compile_layers:
        torch._dynamo.reset()
        for llm in (base, cora.llm, cora_drop.llm):
            compile_decoder_layers(llm)

    def cora_train(b=grouped, model=cora):
        model.loss(b).backward()
        for p in model.parameters():
            p.grad = None

    def base_train(b=grouped):
        _base_loss(base, b, yes_id).backward()

    def cora_score(b=grouped):
        with torch.no_grad():
            return cora.score(b)

    def base_score(b=grouped):
        with torch.no_grad():
            return _base_score(base, b, yes_id)

    fns = {
        "cora train": cora_train,
        "cora train, lora dropout 0.05": lambda: cora_train(model=cora_drop),
        "base train": base_train,
        "base train, random batch": lambda: base_train(random_batch),
        "cora score": cora_score,
        "base score": base_score,
    }
    timings = time_cpu_interleaved(fns, budget_s=budget_s, min_rounds=min_rounds, warmup=1)
    batches = {"grouped": grouped, "random": random_batch}
    out = []
    for name, timing in timings.items():
        s = timing.summarise()
        mask = batches["random" if "random" in name else "grouped"]["attention_mask"]
        real = int(mask.sum())
        out.append({
            "dtype": dtype_name, "attn": attn + ("+compile" if compile_layers else ""),
            "compiled": compile_layers, "step": name, "median_ms": s.median_ms,
            "reps": s.reps, "tokens": real, "padded_tokens": int(mask.numel()),
            "tokens_per_s": real / (s.median_ms / 1e3),
        })  # fmt: skip
    return out


def run(
    llm_spec: str, data_dir, batch: int, budget_s: float, min_rounds: int, configs=None
) -> dict:
    """Every configuration's records and the machine they were measured on."""
    from llmrec.llm import resolve_llm

    path = resolve_llm(llm_spec, log=lambda m: print(m, file=sys.stderr))
    results = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for attn in ("sdpa", "eager"):
            for compiled in (False, True):
                name = f"{dtype_name}-{attn}" + ("-compile" if compiled else "")
                # the compiled configurations only when asked for (each compiles 3 models)
                if (configs and name not in configs) or (not configs and compiled):
                    continue
                print(f"timing {name} ...", file=sys.stderr, flush=True)
                results += _measure_config(path, dtype_name, dtype, attn, data_dir, batch,
                                           budget_s, min_rounds, compiled)  # fmt: skip
    return {
        "llm": llm_spec,
        "batch": batch,
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg": list(os.getloadavg()),
        },
        "torch": torch.__version__,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "results": results,
    }


def _md_row(by: dict, dtype: str, attn: str) -> str:
    def tps(step: str) -> float:
        return by[(dtype, attn, step)]["tokens_per_s"]

    pad = (
        by[(dtype, attn, "base train, random batch")]["median_ms"]
        / (by[(dtype, attn, "base train")]["median_ms"])
    )
    return (
        f"| {dtype} | {attn} | {tps('cora train'):.0f} | "
        f"{tps('cora train, lora dropout 0.05'):.0f} | {tps('base train'):.0f} | "
        f"{tps('cora train') / tps('base train'):.2f} | {tps('cora score'):.0f} | "
        f"{tps('base score'):.0f} | {tps('cora score') / tps('base score'):.2f} | "
        f"{pad:.2f}x the time |"
    )


def markdown(res: dict) -> str:
    by = {(r["dtype"], r["attn"], r["step"]): r for r in res["results"]}
    lines = [
        f"SmolLM2-135M on {res['machine']['cpu']} ({res['machine']['threads']} threads), "
        f"batch {res['batch']} of ML-1M CoRA prompts, tokens/s of real tokens, {res['date']}",
        "",
        "| dtype | attention | cora train | cora train, dropout 0.05 | base train | "
        "cora/base train | cora score | base score | cora/base score | "
        "padding cost (random vs grouped batch) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype in ("fp32", "bf16"):
        for attn in ("sdpa", "eager", "sdpa+compile", "eager+compile"):
            if (dtype, attn, "base train") in by:
                lines.append(_md_row(by, dtype, attn))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrained_cpu",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--llm", default="smollm2", help="a name, .gguf file or HF directory")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="ML-1M directory (else synthetic)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of rounds per config")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--configs", default=None,
                   help="subset, e.g. bf16-eager,fp32-sdpa,bf16-eager-compile (default: the "
                   "four without -compile)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/)")
    args = p.parse_args(argv)
    configs = set(args.configs.split(",")) if args.configs else None
    res = run(args.llm, args.data, args.batch, args.budget, args.min_rounds, configs)
    out = args.out or RESULTS_DIR / f"pretrained-cpu-{os.cpu_count()}core-{_dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    print(f"-> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
