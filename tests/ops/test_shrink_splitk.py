"""The split-K shrink, the occupancy dispatcher and batch-invariant mode (issue 16).

* the split-K forward (forced, under the interpreter or on a GPU) against an fp64 oracle at
  odd shapes: K not a multiple of the block, ranks 4/5/8/16, M 1/3/17, shared and
  per-sample A, fp32/fp16 (bf16 on a GPU: the interpreter's bf16 ``tl.dot`` is wrong);
* determinism: two runs are bitwise equal (no atomics);
* the dispatcher: split-K at decode on a 132-SM GPU, not at large M, the same answer every
  time; GEMM tiles by waves; the launcher launches what the dispatcher chose;
* batch-invariant mode: a sample's output row is bitwise the same in batches of 1, 5 and 33,
  and no config depends on M.

Numbers follow ``tests/tolerance.py``: fp64 oracle, same-precision plain-PyTorch reference.
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerance import assert_close_to_oracle

from llmrec_kernels import batch_invariant, fused_cora_linear
from llmrec_kernels.backends import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels = pytest.mark.skipif(
    not (HAS_CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1"
)


def _launcher():
    from llmrec_kernels.triton import cora_linear

    return cora_linear


class _CountingKernel:
    """Delegates ``kernel[grid](...)`` to the real kernel and counts the launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def force_split(monkeypatch):
    """``force(k_split)``: the launcher's forward takes split-K with ``k_split`` per split.

    After the test, at least one split-K reduction must have been launched.
    """
    from llmrec_kernels.triton import dispatch

    launcher = _launcher()
    counter = _CountingKernel(launcher._cora_splitk_reduce_kernel)
    monkeypatch.setattr(launcher, "_cora_splitk_reduce_kernel", counter)

    forced = []

    def force(k_split: int) -> None:
        monkeypatch.setattr(dispatch, "shrink_split", lambda *args: k_split)
        launcher.clear_config_cache()
        forced.append(k_split)

    yield force
    monkeypatch.undo()
    launcher.clear_config_cache()
    assert counter.launches > 0 or not forced, "the split-K path never ran"


def _inputs(b, length, k, n, r, dtype, shared, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(b, length, k)
    w = rand(n, k, scale=k**-0.5)
    a = rand(k, r, scale=k**-0.5) if shared else rand(b, k, r, scale=k**-0.5)
    bm = rand(n, r, scale=r**-0.5)
    bias = rand(n)
    return x, w, a, bm, bias


def _oracles(x, w, a, bm, bias, s):
    """``(S, y)`` in fp64 and in x's precision with plain PyTorch (independent of the kernels)."""

    def run(x, w, a, bm, bias):
        a3 = a if a.dim() == 3 else a.expand(x.shape[0], *a.shape)
        shrink = s * torch.bmm(x, a3)
        return shrink, torch.nn.functional.linear(x, w, bias) + shrink @ bm.t()

    exact = run(*(t.double() for t in (x, w, a, bm, bias)))
    same = run(x, w, a, bm, bias)
    return exact, same


# (B, L, K, N, r, K elements per split): K 37 and 1000 are not multiples of any BLOCK_K; the
# splits end mid-block (37 = 32 + 5, 1000 = 10 * 96 + 40); M = B * L is 1, 3 or 17.
CASES = [
    (1, 1, 37, 24, 4, 32),
    (3, 1, 1000, 40, 5, 96),
    (17, 1, 1000, 24, 8, 256),
    (1, 3, 1000, 24, 16, 128),
    (1, 17, 37, 40, 16, 32),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_kernels
@pytest.mark.parametrize("shared", [False, True], ids=["perSampleA", "sharedA"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}xL{}-K{}-N{}-r{}-ks{}".format(*c))
def test_splitk_forward_matches_fp64(case, dtype, shared, force_split, device):
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 tl.dot is wrong in Triton's interpreter (checked on a GPU)")
    b, length, k, n, r, k_split = case
    force_split(k_split)
    x, w, a, bm, bias = _inputs(b, length, k, n, r, dtype, shared, device)
    scaling = 0.75
    with torch.inference_mode():
        y, s = _launcher().forward(x, w, a, bm, bias, scaling)
    (s64, y64), (s_ref, y_ref) = _oracles(x, w, a, bm, bias, scaling)
    assert s.dtype == torch.float32 and y.dtype == dtype
    assert_close_to_oracle(s, s_ref, s64, "split-K S", dtype=dtype)
    assert_close_to_oracle(y, y_ref, y64, "split-K y")


@needs_kernels
@pytest.mark.parametrize("shared", [False, True], ids=["perSampleA", "sharedA"])
def test_splitk_is_deterministic_and_close_to_the_plain_shrink(shared, force_split, device):
    x, w, a, bm, bias = _inputs(5, 1, 1000, 24, 8, torch.float32, shared, device, seed=3)
    launcher = _launcher()
    with torch.inference_mode():
        _y_plain, s_plain = launcher.forward(x, w, a, bm, bias, 2.0)
        force_split(128)
        runs = [launcher.forward(x, w, a, bm, bias, 2.0) for _ in range(2)]
    (y1, s1), (y2, s2) = runs
    assert torch.equal(s1, s2) and torch.equal(y1, y2)  # bitwise: fixed-order sum
    (s64, _), (s_ref, _) = _oracles(x, w, a, bm, bias, 2.0)
    assert_close_to_oracle(s1, s_ref, s64, "split-K S")
    assert_close_to_oracle(s_plain, s_ref, s64, "plain S")


@needs_kernels
def test_gradients_after_a_split_k_forward(force_split, device):
    """Training through the op: the backward reads the split-K forward's S (dB = dy^T S)."""
    force_split(64)
    x, w, a, bm, bias = _inputs(3, 2, 200, 24, 5, torch.float32, False, device, seed=5)
    dy = _inputs(3, 2, 24, 1, 1, torch.float32, True, device, seed=6)[0]

    def grads(x, w, a, bm, bias, backend=None):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, bm)]
        if backend is None:
            xx, aa, bb = leaves
            y = torch.nn.functional.linear(xx, w, bias) + 0.5 * torch.bmm(xx, aa) @ bb.t()
        else:
            y = fused_cora_linear(leaves[0], w, leaves[1], leaves[2], bias, 0.5, backend=backend)
        return torch.autograd.grad(y, leaves, dy.to(y.dtype))

    got = grads(x, w, a, bm, bias, "triton")
    ref = grads(x, w, a, bm, bias)
    exact = grads(*(t.double() for t in (x, w, a, bm, bias)))
    for g, r, e, name in zip(got, ref, exact, ("dx", "dA", "dB")):
        assert_close_to_oracle(g, r, e, name)


# ----------------------------------------------------------------------------- dispatcher


def _dispatch():
    from llmrec_kernels.triton import configs, dispatch

    return configs, dispatch


def _split(groups, rows, k=4096, rank=16, dtype=torch.bfloat16, gpu="H100", invariant=False):
    configs, dispatch = _dispatch()
    cfg = configs.shrink_gpu_config(rows, dtype, invariant)
    spec = dispatch.GPUS[gpu] if gpu else None
    return dispatch.shrink_split(groups, rows, k, rank, dtype, cfg, spec, invariant)


@pytest.mark.parametrize("gpu", ["H100", "H200", "A100"])
def test_decode_on_a_full_gpu_chooses_split_k(gpu):
    # Decode: one row per sample, per-sample A (B = 1 and 32) or merged rows (shared A).
    for groups, rows in ((1, 1), (32, 1), (1, 32)):
        k_split = _split(groups, rows, gpu=gpu)
        assert 0 < k_split < 4096 and k_split % 64 == 0, (gpu, groups, rows, k_split)
    # B = 1 keeps one program per K-step: nothing else fills the GPU.
    assert _split(1, 1, gpu=gpu) == 128
    # Unknown device (the interpreter): the plain shrink.
    assert _split(1, 1, gpu=None) == 0


@pytest.mark.parametrize("gpu", ["H100", "A100"])
def test_large_m_keeps_the_plain_shrink(gpu):
    # 32 x 512 rows (prefill 16384): 256 row tiles already keep HBM busy.
    assert _split(32, 512, gpu=gpu) == 0
    assert _split(1, 16384, gpu=gpu) == 0
    # A K of one block has nothing to split.
    assert _split(1, 1, k=128, gpu=gpu) == 0


def test_dispatcher_choice_is_stable():
    _, dispatch = _dispatch()
    shapes = ((1, 1), (32, 1), (128, 1), (8, 256), (32, 512))
    first = [_split(g, r) for g, r in shapes]
    dispatch.shrink_split.cache_clear()
    assert [_split(g, r) for g, r in shapes] == first
    # More samples at decode never ask for more splits (same GPU, same K).
    decode = [_split(b, 1) for b in (1, 8, 32, 128, 512)]
    splits = [-(-4096 // ks) if ks else 1 for ks in decode]
    assert splits == sorted(splits, reverse=True) and splits[-1] == 1, splits
    assert dispatch.explain(32, 1) == dispatch.explain(32, 1)


def test_gemm_tiles_by_waves():
    configs, _ = _dispatch()
    bf16 = torch.bfloat16

    def tile(rows, cols, sms=132, **kw):
        cfg = configs.gemm_gpu_config("fwd", rows, bf16, 16, cols, sms, **kw)
        return cfg.BLOCK_M, cfg.BLOCK_N

    # M 128, N 4096: 32 CTAs of 128 x 128 leave 100 SMs idle; 128 CTAs of 64 x 64 do not.
    assert tile(128, 4096) == (64, 64)
    assert tile(512, 4096) == (128, 128)  # 128 CTAs: ~1 wave
    assert tile(2048, 4096) == (128, 128)
    # Fewer SMs: the big tile already fills them.
    assert tile(384, 4096, sms=64) == (128, 128) and tile(384, 4096) == (64, 64)
    # Decode classes keep their row-matched tiles; no SM count: the fixed table.
    assert tile(1, 4096) == (16, 64) and tile(32, 4096) == (32, 64)
    assert tile(128, 4096, sms=None) == (128, 128)


def test_explain_predicts_split_k_speedup_at_decode():
    _, dispatch = _dispatch()
    for gpu in ("H100", "H200", "A100"):
        c = dispatch.explain(1, 1, gpu=gpu)
        assert c.split > 1 and c.shrink_speedup > 1.5 and c.op_speedup > 1.1
        big = dispatch.explain(32, 512, gpu=gpu)
        assert big.split == 1 and big.shrink_speedup == 1.0
    table = dispatch.prediction_table()
    assert table.count("\n") == 2 + 3 * len(dispatch.GRID) - 1
    # The module docstring carries the table this code prints (kept in sync by hand).
    assert dispatch.prediction_table(gpus=("H100",)).splitlines()[2] in dispatch.__doc__


def test_launcher_launches_what_the_dispatcher_chose(monkeypatch):
    """Meta tensors, launches recorded: decode on the default sm_90 spec runs split-K."""
    from benchmarks.host_overhead import noop_triton_launches

    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((self.name, grid))

    # The recorders must be undone before noop_triton_launches restores the real kernels.
    with noop_triton_launches() as launcher, monkeypatch.context() as patch:
        for name in ("_cora_shrink_kernel", "_cora_shrink_splitk_kernel",
                     "_cora_splitk_reduce_kernel", "_cora_linear_fwd_kernel"):  # fmt: skip
            patch.setattr(launcher, name, Recorder(name))

        def run(b, length, dropout=None):
            launched.clear()
            launcher.clear_config_cache()
            x = torch.empty(b, length, 4096, dtype=torch.bfloat16, device="meta")
            w = torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")
            a = torch.empty(b, 4096, 16, dtype=torch.bfloat16, device="meta")
            bm = torch.empty(4096, 16, dtype=torch.bfloat16, device="meta")
            launcher.forward(x, w, a, bm, None, 2.0, dropout=dropout)
            return list(launched)

        assert run(32, 1) == [
            ("_cora_shrink_splitk_kernel", (1, 8, 32)),
            ("_cora_splitk_reduce_kernel", (1,)),
            ("_cora_linear_fwd_kernel", (64,)),
        ]
        assert [n for n, _ in run(32, 512)] == ["_cora_shrink_kernel", "_cora_linear_fwd_kernel"]
        # M = 128 rows: 128 CTAs of 64 x 64, not 32 of 128 x 128.
        assert run(128, 1)[-1] == ("_cora_linear_fwd_kernel", (128,))
        # a training forward with LoRA dropout: the plain shrink (it applies the mask), even
        # at the decode shape that splits without dropout
        assert [n for n, _ in run(32, 1, (0.05, 7, 0))] == [
            "_cora_shrink_kernel",
            "_cora_linear_fwd_kernel",
        ]


# ----------------------------------------------------------------------- batch invariance


def test_batch_invariant_configs_do_not_depend_on_m():
    configs, _ = _dispatch()
    for dtype in (torch.bfloat16, torch.float32):
        seen = set()
        for rows in (1, 5, 33, 2048, 16384):
            g = configs.gemm_gpu_config("fwd", rows, dtype, 16, 4096, 132, batch_invariant=True)
            s = configs.shrink_gpu_config(rows, dtype, batch_invariant=True)
            seen.add((g, s, _split(rows, 1, dtype=dtype, invariant=True)))
            seen.add((g, s, _split(1, rows, dtype=dtype, invariant=True)))
        assert len(seen) == 1, seen
        # and without the mode they do (the property is not vacuous)
        assert len({configs.gemm_gpu_config("fwd", r, dtype, 16, 4096, 132) for r in (1, 33)}) == 2


@needs_kernels
@pytest.mark.parametrize("shared", [False, True], ids=["perSampleA", "sharedA"])
def test_a_sample_gives_the_same_bits_in_any_batch(shared, monkeypatch, device):
    """Sample 0 alone, in a batch of 5 and in a batch of 33: bitwise equal outputs.

    The dispatcher is live, sized for a small GPU (4 SMs, 33 GB/s) on which the split-K
    choice changes with the batch at K = 600 (10 splits at B 1, 2 at B 5, none at B 33), so
    without the mode the bits differ; in batch-invariant mode K is split by 512 whatever B.
    """
    import dataclasses

    from llmrec_kernels.triton import dispatch

    launcher = _launcher()
    small = dataclasses.replace(dispatch.GPUS["H100"], name="small", sm_count=4, hbm_gbps=33.0)
    monkeypatch.setattr(launcher, "_gpu_spec", lambda tensor: small)
    x, w, a, bm, bias = _inputs(33, 1, 600, 24, 5, torch.float32, shared, device, seed=7)

    def sample0(invariant: bool):
        launcher.clear_config_cache()
        ys, ss = [], []
        with batch_invariant(invariant), torch.inference_mode():
            for b in (1, 5, 33):
                y, s = launcher.forward(x[:b], w, a if shared else a[:b], bm, bias, 0.5)
                ys.append(y[0])
                ss.append(s[0])
        launcher.clear_config_cache()
        return ys, ss

    rows, shrinks = sample0(True)
    assert all(torch.equal(rows[0], r) for r in rows[1:])
    assert all(torch.equal(shrinks[0], s) for s in shrinks[1:])
    if not shared:  # shared A merges the rows: one program, split alike at every B
        _plain_rows, plain_shrinks = sample0(False)
        assert not all(torch.equal(plain_shrinks[0], s) for s in plain_shrinks[1:])
    with batch_invariant(), torch.inference_mode():
        y_public = fused_cora_linear(x, w, a, bm, bias, 0.5, backend="triton")
    launcher.clear_config_cache()
    assert torch.equal(y_public[0], rows[0])
    (_, y64), (_, y_ref) = _oracles(x[:1], w, a if shared else a[:1], bm, bias, 0.5)
    assert_close_to_oracle(rows[0], y_ref[0], y64[0], "batch-invariant y")


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["perSampleA", "sharedA"])
def test_dispatcher_split_on_the_gpu_bf16(shared):
    """LLaMA-7B decode shapes in bf16 through the dispatcher's own choice, on a GPU."""
    x, w, a, bm, bias = _inputs(32, 1, 4096, 4096, 16, torch.bfloat16, shared, "cuda")
    launcher = _launcher()
    launcher.clear_config_cache()
    with torch.inference_mode():
        y, s = launcher.forward(x, w, a, bm, bias, 2.0)
        y2, s2 = launcher.forward(x, w, a, bm, bias, 2.0)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    (s64, y64), (s_ref, y_ref) = _oracles(x, w, a, bm, bias, 2.0)
    assert_close_to_oracle(s, s_ref.float(), s64, "S", dtype=torch.bfloat16)
    assert_close_to_oracle(y, y_ref, y64, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_batch_invariance_on_the_gpu(dtype):
    """On a GPU the JIT specialises M == 1 and M % 16 == 0 apart: the bits must still agree."""
    x, w, a, bm, bias = _inputs(33, 1, 4096, 4096, 16, dtype, False, "cuda", seed=11)
    launcher = _launcher()
    launcher.clear_config_cache()
    with batch_invariant(), torch.inference_mode():
        rows = [launcher.forward(x[:b], w, a[:b], bm, bias, 2.0)[0][0] for b in (1, 5, 16, 33)]
    launcher.clear_config_cache()
    assert all(torch.equal(rows[0], r) for r in rows[1:])
