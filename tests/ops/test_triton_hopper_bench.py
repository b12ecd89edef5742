"""The Hopper benchmark entry point (``benchmarks/hopper_mainloop.py``): importable without a
GPU, and its argument checks, which run before anything needs one."""

from __future__ import annotations

import pytest
import torch

from benchmarks import hopper_mainloop


def test_parse_shapes():
    assert hopper_mainloop.parse_shapes("8x256,32x512") == ((8, 256), (32, 512))
    assert hopper_mainloop.parse_shapes(" 1X1 ") == ((1, 1),)
    for bad in ("8x", "8x256x2", "0x4", "ax4", "8x256,", "-1x4"):
        with pytest.raises(ValueError, match="shapes"):
            hopper_mainloop.parse_shapes(bad)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(shapes=()), ValueError, "shapes"),
        (dict(shapes=((8, 0),)), ValueError, "shapes"),
        (dict(shapes=((8,),)), ValueError, "shapes"),
        (dict(d=4095), ValueError, "d must be"),
        (dict(d=0), ValueError, "d must be"),
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=129), ValueError, "rank"),
        (dict(dtype=torch.float32), TypeError, "dtype"),
        (dict(rounds=0), ValueError, "rounds"),
    ],
)
def test_bad_arguments_raise_before_any_gpu_work(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        hopper_mainloop.run(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_without_a_gpu_the_error_says_so():
    with pytest.raises(RuntimeError, match="CUDA"):
        hopper_mainloop.run(shapes=((1, 16),), d=64)
    with pytest.raises(RuntimeError, match="CUDA"):
        hopper_mainloop.main(["--shapes", "1x16", "--d", "64"])
