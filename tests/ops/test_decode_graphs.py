"""Decode under CUDA graphs: a capturable decode path.

A decode step of ``fused_cora_linear`` (one token per sample, no gradient) is the base GEMV,
the shrink and one expand-add. To be captured in a CUDA graph it may not synchronise with the
host (``.item()``, ``.tolist()``, data-dependent shapes) and its output shapes must follow
from its input shapes alone.

On the CPU: every ATen op of a decode call is recorded under a dispatch mode and none of them
reads a value back to the host or has a data-dependent output shape, on every backend this
machine runs (the Triton kernels through the interpreter; their launches are not ATen ops);
a patched tiny LLaMA's decode step compiles with ``torch.compile(fullgraph=True)``. On a GPU
(the GPU check): manual ``torch.cuda.CUDAGraph`` capture and replay of one call and of a
patched model's decode step, and ``torch.compile(mode="reduce-overhead")`` of that step,
against eager results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tolerance import assert_close_to_oracle
from torch.utils._python_dispatch import TorchDispatchMode

from llmrec_kernels import fused_cora_linear
from llmrec_kernels.backends import CONCRETE_BACKENDS, CoraShapes, get_backend
from llmrec_kernels.cora_linear import fused_cora_linear_multi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "patching"))

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Ops that read a tensor's value on the host or whose output shape depends on values.
HOST_SYNC_OPS = {
    "_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique",
    "_unique2", "equal", "is_nonzero", "allclose", "_assert_async", "repeat_interleave",
}  # fmt: skip


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _decode_inputs(batch=4, d=32, r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    return (
        rand(batch, d), [rand(d, d, scale=d**-0.5) for _ in range(3)],
        rand(batch, d, r, scale=d**-0.5), [rand(d, r, scale=r**-0.5) for _ in range(3)],
    )  # fmt: skip


def _runnable(name: str, dtype=torch.float32) -> bool:
    return get_backend(name).supports(CoraShapes(4, 1, 32, 32, 4), dtype, DEVICE)


@pytest.mark.parametrize("name", [n for n in CONCRETE_BACKENDS if _runnable(n)])
def test_decode_call_never_syncs_with_the_host(name):
    x, ws, a, bs = _decode_inputs()
    with torch.inference_mode(), _Recorder() as rec:
        y = fused_cora_linear(x, ws[0], a, bs[0], None, 2.0, backend=name)
        outs = fused_cora_linear_multi(x, ws, a, bs, None, 2.0, name)
    assert y.shape == (4, 32) and [o.shape for o in outs] == [(4, 32)] * 3
    assert not HOST_SYNC_OPS.intersection(rec.names), rec.names


def test_patched_model_decode_step_compiles_into_one_graph():
    """A patched tiny LLaMA's one-token step (KV cache, per-sample A) under
    ``torch.compile(fullgraph=True)``: no graph break, so nothing in it needs the host."""
    pytest.importorskip("transformers")
    from test_hf_patching import make_model, patch_random, random_a

    from llmrec_kernels.hf import cora_weights

    model = make_model("llama", "sdpa", 0)
    patch_random(model, 1, fuse_qkv=True, backend="torch")
    model.eval()
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    a = random_a(2)
    torch._dynamo.reset()
    with torch.no_grad(), cora_weights(model, a):
        step = ids[:, -1:]
        compiled = torch.compile(
            lambda i: model(input_ids=i, use_cache=False).logits, fullgraph=True, backend="eager"
        )
        got = compiled(step)
        want = model(input_ids=step, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops, traced


# ------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_manual_cuda_graph_capture_and_replay_of_a_decode_call(name):
    x, ws, a, bs = _decode_inputs(batch=32, d=256, r=16, dtype=torch.bfloat16)
    static_x, static_a = x.clone(), a.clone()
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: compile the kernels, fill the caches
                fused_cora_linear(static_x, ws[0], static_a, bs[0], None, 2.0, backend=name)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fused_cora_linear(static_x, ws[0], static_a, bs[0], None, 2.0, backend=name)
        for seed in range(3):  # new inputs copied in place, the graph replayed
            nx, _, na, _ = _decode_inputs(
                batch=32, d=256, r=16, dtype=torch.bfloat16, seed=seed + 7
            )
            static_x.copy_(nx)
            static_a.copy_(na)
            graph.replay()
            want = fused_cora_linear(nx, ws[0], na, bs[0], None, 2.0, backend=name)
            torch.testing.assert_close(static_y, want, rtol=0, atol=0)


def _gpu_model(dtype=torch.bfloat16):
    pytest.importorskip("transformers")
    from test_hf_patching import make_model, patch_random, random_a

    model = make_model("llama", "sdpa", 0)
    patch_random(model, 1, fuse_qkv=True, backend="auto")
    model = model.to(device="cuda", dtype=dtype).eval()
    step = torch.randint(0, 100, (8, 1), generator=torch.Generator().manual_seed(3)).cuda()
    return model, step, random_a(8).to("cuda", dtype)


@pytest.mark.gpu
def test_manual_cuda_graph_of_a_patched_model_decode_step():
    from llmrec_kernels.hf import cora_weights

    model, step, a = _gpu_model()
    with torch.no_grad(), cora_weights(model, a):
        want = model(input_ids=step, use_cache=False).logits
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(input_ids=step, use_cache=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(input_ids=step, use_cache=False).logits
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(static_logits, want, rtol=0, atol=0)


@pytest.mark.gpu
def test_reduce_overhead_compile_of_a_patched_model_decode_step():
    from llmrec_kernels.hf import cora_weights

    model, step, a = _gpu_model()
    oracle_model, _, a64 = _gpu_model(torch.float64)
    with torch.no_grad(), cora_weights(oracle_model, a64):
        oracle = oracle_model(input_ids=step, use_cache=False).logits
    torch._dynamo.reset()
    with torch.no_grad(), cora_weights(model, a):
        want = model(input_ids=step, use_cache=False).logits
        compiled = torch.compile(
            lambda i: model(input_ids=i, use_cache=False).logits, mode="reduce-overhead"
        )
        for _ in range(3):  # record, then replay the CUDA graph
            got = compiled(step).clone()
    # inductor may fuse differently from eager: judged against fp64 like the eager bf16 model
    assert_close_to_oracle(got, want, oracle, "reduce-overhead logits")
