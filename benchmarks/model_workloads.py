"""Model-level workloads: a patched LLaMA decoder layer, and CoRA scoring throughput.

Both need ``transformers`` and the patching layer (:mod:`llmrec_kernels.hf`,
:class:`llmrec.cora.CoRARecommender`); when one is missing the workload's methods are
skipped with the reason in the table.

Decoder layer: a one-layer ``LlamaModel`` with random weights at LLaMA-7B shapes (scaled down
on a CPU), fed ``inputs_embeds``, forward and backward to the embeddings, the per-sample A
and every ``lora_B`` (the frozen weights get no gradient). Methods:

* ``reference``: q, k, v and o patched the reference CoRA code's way (each module runs
  ``F.linear`` plus ``bmm`` of the fp32-upcast ``x`` with ``A_b``, then its fp32 ``lora_B``);
* ``ours[fused_qkv]`` / ``ours[unfused]``: ``apply_cora_to_llama(..., fuse_qkv=True/False)``
  inside ``cora_weights(model, A)``;
* ``base``: the same layer unpatched (gradient to the embeddings only): the floor.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.methods import Case, MethodCase, Workload, error_fields
from benchmarks.roofline import Cost, projection_cost

__all__ = [
    "ReferenceCoRALinear",
    "build_decoder_layer_case",
    "build_scoring_case",
    "patch_reference_way",
    "scoring_workloads",
]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALPHA = 32.0


def _our_backend(device: torch.device) -> str:
    """``auto`` (Triton) on a GPU; ``torch`` on a CPU, even under ``TRITON_INTERPRET=1``."""
    return "auto" if device.type == "cuda" else "torch"


def _missing(module: str) -> Optional[str]:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not available (not written yet or not installed)"


class _AHolder:
    """The per-sample A shared by every reference-patched module (one A_b per sample)."""

    lora_a: Optional[torch.Tensor] = None


class ReferenceCoRALinear(nn.Module):
    """A projection patched the reference CoRA code's way (docs/design.md §2, with its defects)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, holder: _AHolder):
        super().__init__()
        self.base = base
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        self.lora_B.float()
        self.scaling = scaling
        self.holder = holder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        a = self.holder.lora_a
        if a is None:
            return y
        x32 = x.to(self.lora_B.weight.dtype)  # a full-activation copy per module in bf16
        delta = self.lora_B(torch.bmm(x32, a.to(x32.dtype))) * self.scaling
        return y + delta.to(y.dtype)


def patch_reference_way(model: nn.Module, rank: int, alpha: float = ALPHA) -> _AHolder:
    """Replace q/k/v/o of every attention module of ``model`` with :class:`ReferenceCoRALinear`."""
    holder = _AHolder()
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name in TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, ReferenceCoRALinear(child, rank, alpha / rank, holder))
    return holder


def _llama_config(wl: Workload, n_layers: int = 1, vocab: int = 256):
    from transformers import LlamaConfig

    heads = int(wl.get("heads"))
    return LlamaConfig(
        hidden_size=wl.d_in,
        intermediate_size=int(wl.get("ffn")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(2048, wl.L),
        attn_implementation="sdpa",
    )


def _layer_cost(wl: Workload, elem: int) -> Cost:
    """GEMMs of the layer (projection model, backward to inputs only) plus attention."""
    d, ffn, r, b, length = wl.d_in, int(wl.get("ffn")), wl.r, wl.B, wl.L
    flops = bytes_ = 0.0
    for d_in, d_out, lowrank in [(d, d, True)] * 4 + [(d, ffn, False)] * 2 + [(ffn, d, False)]:
        c = projection_cost(b, length, d_in, d_out, r, elem, backward=True, lowrank=lowrank)
        flops += c.flops
        bytes_ += c.bytes
    flops += 3 * 4.0 * b * length * length * d  # QK^T and PV forward, twice that backward
    return Cost(flops=flops, bytes=bytes_)


def _set_lora_b(model: nn.Module, values: dict[str, torch.Tensor]) -> int:
    """Copy ``values[q_proj]``... into every ``*.{q,k,v,o}_proj.lora_B.weight``; return count."""
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("lora_B.weight"):
                continue
            for target in TARGETS:
                if f"{target}.lora_B" in name and p.shape == values[target].shape:
                    p.copy_(values[target])
                    n += 1
    return n


def _lora_b_params(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]


def build_decoder_layer_case(wl: Workload, device: torch.device, mem_budget: int) -> Case:
    """One patched LLaMA decoder layer, forward + backward, reference way against ours."""
    reason = _missing("transformers")
    if reason:
        return Case(wl, [], skip_reason=reason)
    from transformers import LlamaModel

    dt, elem = wl.dtype, torch.tensor([], dtype=wl.dtype).element_size()
    d, ffn, b, length, r = wl.d_in, int(wl.get("ffn")), wl.B, wl.L, wl.r
    params = 4 * d * d + 3 * d * ffn
    acts = b * length * (12 * d + 4 * ffn) + b * int(wl.get("heads")) * length * length
    need = 4 * params * elem + 8 * params + 6 * acts * 8  # four models, an fp64 oracle
    if need > mem_budget:
        return Case(
            wl,
            [],
            skip_reason=f"needs ~{need / 2**30:.1f} GiB, over the {mem_budget / 2**30:.1f} GiB budget",
        )

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base_model = LlamaModel(_llama_config(wl)).to(device=device, dtype=dt).eval()
    for p in base_model.parameters():
        p.requires_grad_(False)
    x = torch.randn(b, length, d, generator=gen).to(device=device, dtype=dt)
    dy = torch.randn(b, length, d, generator=gen).to(device=device, dtype=dt)
    lora_a = F.normalize(torch.randn(b, d * r, generator=gen), dim=1).reshape(b, d, r)
    lora_a = lora_a.to(device)  # fp32, as the generator produces it
    b_vals = {t: (torch.randn(d, r, generator=gen) * 0.5).to(device) for t in TARGETS}
    cost = _layer_cost(wl, elem)
    cost_base = Cost(
        flops=cost.flops - sum(12.0 * b * length * r * 2 * d for _ in TARGETS),
        bytes=cost.bytes,
    )

    # fp64 oracle: the reference-patched layer in float64
    oracle: dict[str, object] = {}

    def get_oracle():
        if not oracle:
            m64 = copy.deepcopy(base_model).double()
            h64 = patch_reference_way(m64, r)
            _set_lora_b_ref(m64, b_vals)
            x64 = x.double().requires_grad_(True)
            a64 = lora_a.double().requires_grad_(True)
            h64.lora_a = a64
            y = m64(inputs_embeds=x64, use_cache=False).last_hidden_state
            gx, ga = torch.autograd.grad(y, (x64, a64), dy.double())
            h64.lora_a = None
            yb = m64(inputs_embeds=x64, use_cache=False).last_hidden_state
            (gxb,) = torch.autograd.grad(yb, (x64,), dy.double())
            oracle.update(y=y.detach(), gx=gx, ga=ga, yb=yb.detach(), gxb=gxb)
            del m64
        return oracle

    def errors(y, grads, base: bool = False) -> dict:
        o = get_oracle()
        ref_y = o["yb"] if base else o["y"]
        refs = [o["gxb"]] if base else [o["gx"], o["ga"]]
        return error_fields(y, ref_y, grads, refs)

    methods: list[MethodCase] = []
    keep: list = [base_model, x, dy, lora_a, oracle]

    # base: the unpatched layer
    xg = x.detach().clone().requires_grad_(True)

    def base_run(_m=base_model, _x=xg):
        y = _m(inputs_embeds=_x, use_cache=False).last_hidden_state
        return y, torch.autograd.grad(y, (_x,), dy)

    # reference way
    ref_model = copy.deepcopy(base_model)
    holder = patch_reference_way(ref_model, r)
    _set_lora_b_ref(ref_model, b_vals)
    keep.append(ref_model)
    xr = x.detach().clone().requires_grad_(True)
    ar = lora_a.detach().clone().requires_grad_(True)
    ref_b = _lora_b_params(ref_model)

    def ref_run(_m=ref_model, _x=xr, _a=ar):
        holder.lora_a = _a
        try:
            y = _m(inputs_embeds=_x, use_cache=False).last_hidden_state
            grads = torch.autograd.grad(y, (_x, _a, *ref_b), dy)
        finally:
            holder.lora_a = None
        return y, grads

    runs = {"reference": (ref_run, False)}

    hf_reason = _missing("llmrec_kernels.hf")
    for fuse in (True, False):
        name = "ours[fused_qkv]" if fuse else "ours[unfused]"
        if hf_reason:
            runs[name] = (None, hf_reason)
            continue
        from llmrec_kernels import hf

        m = copy.deepcopy(base_model)
        hf.apply_cora_to_llama(
            m, rank=r, alpha=ALPHA, target_modules=TARGETS, fuse_qkv=fuse,
            backend=_our_backend(device),
        )  # fmt: skip
        n_set = _set_lora_b(m, b_vals)
        keep.append(m)
        xo = x.detach().clone().requires_grad_(True)
        ao = lora_a.detach().clone().requires_grad_(True)
        ob = _lora_b_params(m)
        if n_set != len(TARGETS):
            runs[name] = (None, f"could not map the patched lora_B parameters ({n_set} of 4 set)")
            continue

        def our_run(_m=m, _x=xo, _a=ao, _b=ob):
            with hf.cora_weights(_m, _a):
                y = _m(inputs_embeds=_x, use_cache=False).last_hidden_state
                grads = torch.autograd.grad(y, (_x, _a, *_b), dy)
            return y, grads

        runs[name] = (our_run, False)
    runs["base"] = (base_run, False)
    backend = _our_backend(device)

    for name, (run, skip) in runs.items():
        if run is None:
            methods.append(MethodCase(name, skip_reason=skip))
            continue
        is_base = name == "base"

        def check(_run=run, _base=is_base):
            y, grads = _run()
            return errors(y.detach(), grads[: 1 if _base else 2], base=_base)

        methods.append(
            MethodCase(
                name,
                fn=lambda _run=run: _run()[1],
                check=check,
                cost=cost_base if is_base else cost,
                backend=backend if name.startswith("ours") else None,
            )
        )
    case = Case(wl, methods)
    case._keep.extend(keep)
    return case


def _set_lora_b_ref(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, ReferenceCoRALinear):
                target = name.rsplit(".", 1)[-1]
                mod.lora_B.weight.copy_(values[target].to(mod.lora_B.weight.dtype))


def scoring_workloads(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Workload]:
    """CoRA scoring throughput (samples/s) of a small patched LLaMA, prompts of length L."""
    if device.type == "cuda":
        cfg = {"d": 2048, "ffn": 5504, "heads": 16, "layers": 8, "L": 192, "batches": (16, 64)}
    else:
        cfg = {"d": 512, "ffn": 1376, "heads": 8, "layers": 4, "L": 64, "batches": (8, 32)}
    batches = cfg["batches"][:1] if quick else cfg["batches"]
    extra = (
        ("ffn", cfg["ffn"]), ("heads", cfg["heads"]), ("layers", cfg["layers"]),
        ("vocab", 32000), ("cf_dim", 256),
    )  # fmt: skip
    return [
        Workload("scoring", "score", bsz, cfg["L"], cfg["d"], cfg["d"], 16, dtype, extra)
        for bsz in batches
    ]


def _yes_logit_reference(llm, holder, generator, batch, yes_id):
    """The reference CoRA code's scoring: full-vocabulary logits at every position."""
    holder.lora_a = generator(batch["user_emb"], batch["item_emb"])
    try:
        logits = llm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    finally:
        holder.lora_a = None
    return logits[:, -1, yes_id].float()


def build_scoring_case(wl: Workload, device: torch.device, mem_budget: int) -> Case:
    """CoRA scoring, inference: ``CoRARecommender.score`` against the reference CoRA way.

    Methods: ``reference`` (projections patched the reference way, full-vocabulary logits at
    every position, the "Yes" column of the last one), ``ours[fused_qkv]`` and
    ``ours[unfused]`` (:meth:`llmrec.cora.CoRARecommender.score`: the decoder body, then one
    ``lm_head`` row at the last position), ``base`` (the same ``score`` without CF input: the
    frozen backbone). The generator (Q-Former, paper sizes) runs inside every CoRA method.
    """
    reason = _missing("transformers") or _missing("llmrec_kernels.hf") or _missing("llmrec.cora")
    if reason:
        return Case(wl, [], skip_reason=reason)
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmrec.cora import CoRARecommender

    dt = wl.dtype
    d, r, b, length = wl.d_in, wl.r, wl.B, wl.L
    vocab, cf_dim, n_layers = int(wl.get("vocab")), int(wl.get("cf_dim")), int(wl.get("layers"))
    elem = torch.tensor([], dtype=dt).element_size()
    params = n_layers * (4 * d * d + 3 * d * int(wl.get("ffn"))) + 2 * vocab * d
    need = 4 * params * elem + 8 * params + b * length * vocab * 4 * 2
    if need > mem_budget:
        return Case(
            wl,
            [],
            skip_reason=f"needs ~{need / 2**30:.1f} GiB, over the {mem_budget / 2**30:.1f} GiB budget",
        )
    config = LlamaConfig(
        hidden_size=d, intermediate_size=int(wl.get("ffn")), num_hidden_layers=n_layers,
        num_attention_heads=int(wl.get("heads")), num_key_value_heads=int(wl.get("heads")),
        vocab_size=vocab, max_position_embeddings=max(2048, length),
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base_llm = LlamaForCausalLM(config).to(device=device, dtype=dt).eval()
    yes_id = 3
    # left-padded prompts of 60-100% of L tokens
    lengths = torch.randint(int(0.6 * length), length + 1, (b,), generator=gen)
    mask = (torch.arange(length)[None, :] >= (length - lengths)[:, None]).long()
    ids = torch.randint(4, vocab, (b, length), generator=gen) * mask
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "user_emb": torch.randn(b, cf_dim, generator=gen).to(device),
        "item_emb": torch.randn(b, cf_dim, generator=gen).to(device),
    }
    b_vals = {t: (torch.randn(d, r, generator=gen) * 0.5).to(device) for t in TARGETS}
    backend = _our_backend(device)

    recs = {}
    for fuse in (True, False):
        llm = copy.deepcopy(base_llm)
        # no tokenizer: the "Yes" logit alone (a "No" id would come from one); the same cost
        rec = CoRARecommender(
            llm, None, cf_dim, rank=r, alpha=ALPHA, generator="qformer", fuse_qkv=fuse,
            backend=backend, yes_token_id=yes_id, answer_score="yes",
        ).eval()  # fmt: skip
        _set_lora_b(rec.llm, b_vals)
        recs[fuse] = rec
    generator = recs[True].generator
    recs[False].generator.load_state_dict(generator.state_dict())

    ref_llm = copy.deepcopy(base_llm)
    holder = patch_reference_way(ref_llm, r)
    _set_lora_b_ref(ref_llm, b_vals)
    no_cf = {k: v for k, v in batch.items() if k not in ("user_emb", "item_emb")}

    oracle: dict[str, torch.Tensor] = {}

    def get_oracle():
        if not oracle:
            m64 = copy.deepcopy(ref_llm).double()
            h64 = next(m.holder for m in m64.modules() if isinstance(m, ReferenceCoRALinear))
            g64 = copy.deepcopy(generator).double()
            with torch.no_grad():
                oracle["cora"] = _yes_logit_reference(m64, h64, g64, batch, yes_id).double()
                out = m64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                oracle["base"] = out.logits[:, -1, yes_id].double()
            del m64, g64
        return oracle

    runs = {
        "reference": (
            lambda: _yes_logit_reference(ref_llm, holder, generator, batch, yes_id),
            "cora",
        ),
        "ours[fused_qkv]": (lambda: recs[True].score(batch), "cora"),
        "ours[unfused]": (lambda: recs[False].score(batch), "cora"),
        "base": (lambda: recs[True].score(no_cf), "base"),
    }
    methods = []
    for name, (run, ref_key) in runs.items():

        def fn(_run=run):
            with torch.no_grad():
                return _run()

        def check(_fn=fn, _key=ref_key):
            return error_fields(_fn(), get_oracle()[_key])

        methods.append(
            MethodCase(
                name,
                fn=fn,
                check=check,
                items_per_call=b,
                backend=backend if name.startswith("ours") or name == "base" else None,
            )
        )
    case = Case(wl, methods)
    case._keep.extend([base_llm, recs, ref_llm, batch, oracle])
    return case
