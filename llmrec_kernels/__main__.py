"""Self-check: ``python -m llmrec_kernels``.

Runs ``fused_cora_linear`` on the available device against the naive reference (dense
per-sample weights) and an fp64 oracle, forward and backward, and prints the error and the
time of each. Exits non-zero when an error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from llmrec_kernels import fused_cora_linear
from llmrec_kernels.backends import resolve_backend
from llmrec_kernels.reference import cora_linear_factored, cora_linear_naive

_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _time_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (and Triton compilation)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # fmt: skip
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1, the Triton kernels run in the (slow) interpreter")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    b, seq, d_in, d_out, rank = args.batch, args.seq, args.d_in, args.d_out, args.rank
    x = rand(b, seq, d_in).requires_grad_()
    weight = rand(d_out, d_in, scale=d_in**-0.5)
    lora_a = rand(b, d_in, rank, scale=d_in**-0.5).requires_grad_()
    lora_b = rand(d_out, rank, scale=rank**-0.5).requires_grad_()
    bias = rand(d_out).requires_grad_()
    scaling = 2.0
    grad_out = rand(b, seq, d_out)
    backend = resolve_backend("auto", device, dtype, rank)

    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, lora_a, lora_b, bias)]
    ref = cora_linear_factored(*inputs64, scaling=scaling)
    ref_grads = torch.autograd.grad(ref, [inputs64[i] for i in (0, 2, 3, 4)], grad_out.double())

    print(
        f"llmrec_kernels self-check on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{dtype}, B={b} L={seq} d_in={d_in} d_out={d_out} r={rank}; auto backend: {backend}"
    )
    header = f"{'method':<28}{'fwd ms':>10}{'fwd+bwd ms':>12}{'max rel err':>14}"
    print(header)
    print("-" * len(header))
    methods = {
        f"fused_cora_linear [{backend}]": lambda *a: fused_cora_linear(*a, scaling=scaling),
        "naive (dense per sample)": lambda *a: cora_linear_naive(*a, scaling=scaling),
        "factored PyTorch": lambda *a: cora_linear_factored(*a, scaling=scaling),
    }
    tol = _TOLERANCE[dtype]
    failed = False
    for name, fn in methods.items():
        args_ = (x, weight, lora_a, lora_b, bias)
        with torch.no_grad():
            fwd_ms = _time_ms(lambda fn=fn, a=args_: fn(*a), args.repeats, device)

        def fwd_bwd(fn=fn, a=args_):
            out = fn(*a)
            return torch.autograd.grad(out, [x, lora_a, lora_b, bias], grad_out)

        fb_ms = _time_ms(fwd_bwd, args.repeats, device)
        out = fn(*args_)
        grads = torch.autograd.grad(out, [x, lora_a, lora_b, bias], grad_out)
        err = max([_rel_err(out, ref)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)])
        flag = "" if err <= tol else f"  > tolerance {tol:g}"
        failed |= err > tol
        print(f"{name:<28}{fwd_ms:>10.3f}{fb_ms:>12.3f}{err:>14.2e}{flag}")
    print("errors: forward output and the gradients of x, lora_a, lora_b, bias vs an fp64 oracle")
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
