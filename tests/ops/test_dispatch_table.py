"""Measured dispatch: the table writer's rule and ``backend="auto"`` reading a table.

``auto`` picks a custom kernel on a GPU only for a (dtype, mode, shape class) where the GPU
check measured it at least 3% faster than the torch path in the same run; otherwise, and with
no table for the GPU, the torch path. Checked on the CPU with synthetic tables (the device
name lookup is stubbed; nothing touches a GPU) and with the H200 run's real records.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks.dispatch_table import build_table
from llmrec_kernels import backends, dispatch_table
from llmrec_kernels.dispatch_table import gpu_key, shape_class

H200_BENCH = (
    Path(__file__).resolve().parents[2] / "benchmarks/results/gpu-check-h200-2026-11-30/bench.json"
)
CUDA0 = torch.device("cuda", 0)


def _record(op, mode, backend, b, length, ms, dtype="bfloat16"):
    return {
        "op": op, "mode": mode, "method": f"ours[{backend}]", "backend": backend, "B": b,
        "L": length, "d_in": 4096, "d_out": 4096, "r": 16, "dtype": dtype, "status": "ok",
        "median_ms": ms,
    }  # fmt: skip


def _bench(records):
    return {"meta": {"device": "NVIDIA Test GPU 80GB"}, "records": records}


def _choice(table, mode, cls):
    return next(c for c in table["choices"] if c["mode"] == mode and c["shape_class"] == cls)


def test_shape_classes_and_gpu_keys():
    assert shape_class(32, 1) == "decode" and shape_class(128 * 4, 4) == "decode"
    assert shape_class(8 * 256, 256) == "prefill"
    assert shape_class(32 * 512, 512) == "prefill-large"
    assert gpu_key("NVIDIA H200") == "nvidia-h200"
    assert gpu_key("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_writer_picks_a_kernel_only_when_it_is_3_percent_faster_everywhere_in_its_class():
    records = []
    # decode: triton 5% faster in both workloads -> triton
    for b in (1, 32):
        records += [
            _record("proj", "fwd", "torch", b, 1, 1.0),
            _record("proj", "fwd", "triton", b, 1, 0.95),
        ]
    # prefill: triton 2% faster -> torch (below the 3% rule)
    records += [
        _record("proj", "fwd", "torch", 8, 256, 1.0),
        _record("proj", "fwd", "triton", 8, 256, 0.98),
    ]
    # prefill-large: cuda 20% faster on one workload, 1% slower on the other -> torch
    for b, ms in ((32, 0.8), (64, 1.01)):
        records += [
            _record("qkv", "fwd", "torch", b, 512, 1.0),
            _record("qkv", "fwd", "cuda", b, 512, ms),
        ]
    # training decode: cuda 10%, triton 4% faster -> the faster, cuda
    records += [
        _record("proj", "fwd_bwd", "torch", 32, 1, 1.0),
        _record("proj", "fwd_bwd", "triton", 32, 1, 0.96),
        _record("proj", "fwd_bwd", "cuda", 32, 1, 0.90),
    ]
    table = build_table(_bench(records))
    assert table["gpu_key"] == "nvidia-test-gpu-80gb"
    assert _choice(table, "fwd", "decode")["backend"] == "triton"
    assert _choice(table, "fwd", "prefill")["backend"] == "torch"
    assert _choice(table, "fwd", "prefill-large")["backend"] == "torch"
    assert _choice(table, "fwd_bwd", "decode")["backend"] == "cuda"
    assert _choice(table, "fwd_bwd", "decode")["ratio_vs_torch"] == pytest.approx(0.9)


def test_the_h200_run_picks_the_torch_path_everywhere():
    """The one full GPU measurement (H200, 2026-11-30): no custom kernel was 3% faster than
    the torch path across a whole class, so its table routes every call to torch."""
    table = build_table(json.loads(H200_BENCH.read_text()))
    assert table["gpu_key"] == "nvidia-h200" and len(table["choices"]) == 6
    assert {c["backend"] for c in table["choices"]} == {"torch"}


@pytest.fixture
def gpu_with_table(tmp_path, monkeypatch):
    """A fake GPU named 'Test GPU' whose table is written by the test; fresh caches."""
    monkeypatch.setattr(dispatch_table, "_device_key", lambda index: "test-gpu")
    monkeypatch.setattr(dispatch_table, "TABLE_DIR", tmp_path)
    monkeypatch.delenv(dispatch_table.ENV_TABLE, raising=False)
    monkeypatch.setattr(backends, "_RESOLVED", {})
    monkeypatch.setenv(backends.ENV_BACKEND, "")
    dispatch_table.load_table.cache_clear()

    def write(choices):
        table = {"schema": 1, "gpu": "Test GPU", "gpu_key": "test-gpu", "choices": choices}
        (tmp_path / "test-gpu.json").write_text(json.dumps(table))
        dispatch_table.load_table.cache_clear()
        backends._RESOLVED.clear()

    yield write
    dispatch_table.load_table.cache_clear()


def _entry(mode, cls, backend, ratio, dtype="bfloat16"):
    return {
        "dtype": dtype,
        "mode": mode,
        "shape_class": cls,
        "backend": backend,
        "ratio_vs_torch": ratio,
    }


def _auto(tokens, length, training=False, dtype=torch.bfloat16):
    return backends.resolve_backend("auto", CUDA0, dtype, 16, tokens, length, training)


@pytest.mark.skipif(not backends.triton_available(), reason="needs the triton package")
def test_auto_follows_the_table(gpu_with_table):
    gpu_with_table([])  # a table with no entries: torch everywhere
    assert _auto(32, 1) == "torch"
    gpu_with_table(
        [
            _entry("fwd", "decode", "triton", 0.90),
            _entry("fwd", "prefill", "triton", 0.99),  # not 3% faster: refused on load too
            _entry("fwd_bwd", "decode", "triton", 0.95, dtype="float16"),
        ]
    )
    assert _auto(32, 1) == "triton"
    assert _auto(32, 1, training=True) == "torch"  # no training entry for bf16
    assert _auto(32, 1, training=True, dtype=torch.float16) == "triton"
    assert _auto(8 * 256, 256) == "torch"
    assert _auto(32 * 512, 512) == "torch"  # class absent
    # the CPU never reads a table
    assert (
        backends.resolve_backend("auto", torch.device("cpu"), torch.float64, 16, 32, 1) == "torch"
    )


def test_auto_without_a_table_runs_torch(gpu_with_table):
    assert _auto(32, 1) == "torch" and _auto(4096, 512, True) == "torch"


def test_auto_never_picks_a_backend_that_cannot_run_the_call(gpu_with_table):
    """The table says cuda, but the extension is not built here: torch."""
    gpu_with_table([_entry("fwd", "decode", "cuda", 0.5)])
    assert _auto(32, 1) == "torch"


def test_env_table_overrides_the_packaged_one(gpu_with_table, tmp_path, monkeypatch):
    gpu_with_table([_entry("fwd", "decode", "triton", 0.9)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": 1, "choices": []}))
    monkeypatch.setenv(dispatch_table.ENV_TABLE, str(other))
    backends._RESOLVED.clear()
    assert _auto(32, 1) == "torch"


def test_a_table_of_another_schema_is_refused(gpu_with_table, tmp_path):
    (tmp_path / "test-gpu.json").write_text(json.dumps({"schema": 99, "choices": []}))
    dispatch_table.load_table.cache_clear()
    with pytest.raises(ValueError, match="schema"):
        _auto(32, 1)


def test_packaged_tables_are_valid():
    for path in dispatch_table.TABLE_DIR.glob("*.json"):
        assert dispatch_table._validate(json.loads(path.read_text()), str(path)) is not None
        assert path.stem == json.loads(path.read_text())["gpu_key"]


def test_cost_model_constants_are_the_fit_to_the_h200_run():
    """The dispatcher's tile-efficiency ceiling and H200 launch/latency are what the
    calibration script fits to the H200 records, and the fit lowers the prediction error."""
    from benchmarks.calibrate_cost_model import _rms_log_error, collect, fit
    from llmrec_kernels.triton import dispatch

    rows = [
        r for r in collect(json.loads(H200_BENCH.read_text())) if r["kind"] != "proj fwd decode"
    ]
    assert len(rows) == 16
    spec, eff, err = fit(rows, dispatch.GPUS["H200"])
    assert eff == dispatch._MAX_TILE_EFFICIENCY
    assert (spec.launch_us, spec.latency_us) == (
        dispatch.GPUS["H200"].launch_us,
        dispatch.GPUS["H200"].latency_us,
    )
    uncalibrated = dataclasses.replace(dispatch.GPUS["H200"], launch_us=2.0, latency_us=0.6)
    assert err < 0.5 * _rms_log_error(rows, uncalibrated, 0.8)
