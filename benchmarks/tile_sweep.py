"""Time the Triton GEMM tiles against cuBLAS at prefill/training shapes, on one GPU.

``python -m benchmarks.tile_sweep [--out sweep.json]``

The first H200 run of the benchmark suite (benchmarks/results/gpu-check-h200-2026-11-30/)
found the Triton forward and dx GEMMs 1.2-1.7x slower than the factored cuBLAS path at
M = 2048 and 16384. This script asks whether another tile closes the gap: for each candidate
:class:`~llmrec_kernels.triton.configs.GemmConfig` it times the whole Triton forward
(shrink + fused GEMM) and the dx-only backward, side by side with the torch backend's
forward and dx (cuBLAS) and the base ``F.linear``, with ``triton.testing.do_bench`` (median,
CUDA events), and checks each result against the torch backend (relative error). The
candidates are set by replacing the config lookup, so the kernels are the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llmrec_kernels import _torch_impl
from llmrec_kernels.triton import cora_linear as triton_impl
from llmrec_kernels.triton.configs import GemmConfig

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the first is the shipped tile.
CANDIDATES = (
    GemmConfig(128, 128, 64, 8, 8, 3),
    GemmConfig(128, 128, 64, 8, 4, 4),
    GemmConfig(128, 128, 64, 8, 8, 4),
    GemmConfig(128, 256, 64, 8, 8, 3),
    GemmConfig(256, 128, 64, 8, 8, 3),
    GemmConfig(128, 128, 128, 8, 8, 3),
    GemmConfig(64, 256, 64, 8, 4, 4),
    GemmConfig(128, 64, 64, 8, 4, 4),
)
SHAPES = ((8, 256), (32, 512))  # (B, L) at K = N = 4096, r 16, bf16, per-sample A


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _sweep_shape(b, length, d, r, dt, dev, candidates, do_bench, scaling) -> list[dict]:
    """Rows of timings for one ``(B, L)``: cuBLAS references first, then each candidate."""
    gen = torch.Generator(device=dev).manual_seed(b * 100003 + length)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=torch.float32, generator=gen).mul(scale).to(dt)

    x, dy = rand(b, length, d), rand(b, length, d)
    w, bias = rand(d, d, scale=d**-0.5), rand(d)
    a, bm = rand(b, d, r, scale=d**-0.5), rand(d, r, scale=r**-0.5)
    y_ref, s_ref = _torch_impl.forward(x, w, a, bm, bias, scaling)
    dx_ref = _torch_impl.backward(dy, x, w, a, bm, s_ref, scaling, True, False, False)[0]
    shape, rows = f"{b}x{length}", []
    refs = {
        "base F.linear": lambda: torch.nn.functional.linear(x, w, bias),
        "torch fwd": lambda: _torch_impl.forward(x, w, a, bm, bias, scaling),
        "torch dx": lambda: _torch_impl.backward(
            dy, x, w, a, bm, s_ref, scaling, True, False, False
        ),
    }
    for name, fn in refs.items():
        rows.append(
            {"shape": shape, "what": name, "config": None, "ms": do_bench(fn), "rel_err": 0.0}
        )
    shipped = triton_impl.gemm_config
    for cfg in candidates:
        tile = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} g{cfg.GROUP_M} w{cfg.num_warps} s{cfg.num_stages}"
        triton_impl.gemm_config = lambda *_a, _c=cfg, **_k: _c
        triton_impl.clear_config_cache()
        try:
            y, s = triton_impl.forward(x, w, a, bm, bias, scaling)
            dx = triton_impl.backward(dy, x, w, a, bm, s, scaling, True, False, False)[0]
            fwd = do_bench(lambda: triton_impl.forward(x, w, a, bm, bias, scaling))
            bwd = do_bench(
                lambda s=s: triton_impl.backward(dy, x, w, a, bm, s, scaling, True, False, False)
            )
        except Exception as exc:  # a tile that does not compile (shared memory, ...)
            print(f"{shape} {tile}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        finally:
            triton_impl.gemm_config = shipped
            triton_impl.clear_config_cache()
        rows.append(
            {
                "shape": shape,
                "what": "triton fwd",
                "config": tile,
                "ms": fwd,
                "rel_err": _rel(y, y_ref),
            }
        )
        rows.append(
            {
                "shape": shape,
                "what": "triton dx",
                "config": tile,
                "ms": bwd,
                "rel_err": _rel(dx, dx_ref),
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tile_sweep", description=__doc__)
    p.add_argument("--out", type=Path, default=None, help="JSON file of every timing")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, TRITON_INTERPRET=1, tiny shapes: checks the script, times nothing useful",
    )
    args = p.parse_args(argv)
    if args.smoke:
        dev, shapes, candidates = torch.device("cpu"), ((2, 3),), CANDIDATES[:1]

        def do_bench(fn):
            fn()
            return float("nan")
    elif not torch.cuda.is_available():
        print("tile_sweep needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    else:
        from triton.testing import do_bench

        dev, shapes, candidates = torch.device("cuda"), SHAPES, CANDIDATES
    # The interpreter's bf16 tl.dot is wrong (README): the smoke run uses fp16.
    dt = torch.float16 if args.smoke else torch.bfloat16
    d, r, scaling = args.dim, args.rank, 2.0
    rows = []
    for b, length in shapes:
        rows += _sweep_shape(b, length, d, r, dt, dev, candidates, do_bench, scaling)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)"
    base = {(rw["shape"], rw["what"]): rw["ms"] for rw in rows if rw["config"] is None}
    print(f"{name}, {str(dt)[6:]}, K = N = {d}, r {r}, per-sample A")
    print(f"{'shape':8} {'what':12} {'tile':26} {'ms':>8} {'x torch':>8} {'rel err':>8}")
    for rw in rows:
        ref = base.get((rw["shape"], rw["what"].replace("triton", "torch")), rw["ms"])
        print(
            f"{rw['shape']:8} {rw['what']:12} {rw['config'] or '-':26} {rw['ms']:8.3f} "
            f"{rw['ms'] / ref:8.2f} {rw['rel_err']:8.1e}"
        )
    if args.out:
        args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
