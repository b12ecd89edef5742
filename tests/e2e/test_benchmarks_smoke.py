"""Smoke test of the benchmark report runner, end to end on toy shapes (no pytest-benchmark).

Runs ``python -m benchmarks --tiny`` in-process: every op and mode, JSON and PNG written,
records well-formed, methods that cannot run here skipped with a reason (never silently).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a top-level folder of the repository, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.__main__ import main
from benchmarks.report import REQUIRED_FIELDS

pytest.importorskip("matplotlib")
pytest.importorskip("rich")


@pytest.fixture
def one_thread():
    # one thread: no OpenMP barrier stalls when other processes load the CPUs
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(120)
def test_report_runner_tiny(tmp_path, one_thread, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        ["--tiny", "--device", "cpu", "--threads", "1", "--no-progress",
         "--out", str(out), "--plot", str(plot), "--markdown", str(tmp_path / "r.md")]
    )  # fmt: skip
    assert rc == 0
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| workload |" in (tmp_path / "r.md").read_text()
    printed = capsys.readouterr().out
    assert "CoRA benchmarks" in printed

    results = json.loads(out.read_text())
    assert results["meta"]["preset"] == "tiny"
    assert results["meta"]["device_type"] == "cpu"
    records = results["records"]
    assert {r["op"] for r in records} >= {"proj", "qkv", "decoder_layer", "scoring"}
    for rec in records:
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        assert not missing, (rec["method"], missing)
        assert rec["status"] in ("ok", "skipped", "error")
        if rec["status"] == "ok":
            assert rec["median_ms"] > 0 and rec["reps"] >= 2
            assert rec["max_abs_err"] is not None and rec["max_abs_err"] < 1e-3, rec
            assert rec["peak_mem_mb"] is not None
            assert rec["roofline_pct"] is None and rec["roofline_note"]  # CPU: no peak table
        else:
            assert rec["skip_reason"], rec  # never silently
            # a workload that raised while being built is a defect, not a skip
            assert not rec["skip_reason"].startswith("could not build"), rec

    def methods(op, mode):
        return {r["method"]: r for r in records if r["op"] == op and r["mode"] == mode}

    fwd = methods("proj", "fwd")
    for name in ("naive", "reference", "factored", "ours[torch]", "base"):
        assert fwd[name]["status"] == "ok", fwd[name]
    assert (
        fwd["ours[triton]"]["status"] == "skipped" and "GPU" in fwd["ours[triton]"]["skip_reason"]
    )
    assert fwd["ours[cuda]"]["status"] == "skipped"
    assert fwd["ours[torch]"]["tflops"] > 0 and fwd["ours[torch]"]["gbps"] > 0
    bwd = methods("proj", "fwd_bwd")
    assert bwd["ours[torch]"]["max_abs_err_grad"] < 1e-3
    shrink = methods("shrink", "fwd")  # the split-K vs plain shrink rows: GPU only
    assert shrink["torch[bmm]"]["status"] == "ok"
    for name in ("triton[plain]", "triton[split-K]", "triton[auto]"):
        assert shrink[name]["status"] == "skipped" and "GPU" in shrink[name]["skip_reason"]
    layer = methods("decoder_layer", "fwd_bwd")
    assert layer["reference"]["status"] == "ok"
    for name in ("ours[fused_qkv]", "ours[unfused]"):
        assert layer[name]["status"] in ("ok", "skipped"), layer[name]


def test_a_run_cut_short_keeps_its_records(tmp_path, monkeypatch):
    """Every record is appended to ``<out>.partial.jsonl`` as it is measured: a run killed
    mid-grid (a time limit, a lost GPU lease) keeps what it timed; a finished run removes it."""
    import benchmarks.suite as suite

    def dies_after_two(cfg, on_record=None):
        for i in range(2):
            on_record({"op": "proj", "method": f"m{i}", "median_ms": float(i + 1)})
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(suite, "run_suite", dies_after_two)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--tiny", "--device", "cpu", "--no-progress", "--ops", "host", "--out", str(out)])
    partial = out.with_suffix(".partial.jsonl")
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [r["method"] for r in kept] == ["m0", "m1"] and not out.exists()

    monkeypatch.undo()
    rc = main(["--tiny", "--device", "cpu", "--threads", "1", "--no-progress", "--ops", "host",
               "--out", str(out), "--plot", str(tmp_path / "r.png")])  # fmt: skip
    assert rc == 0 and out.exists() and not partial.exists()


def test_tile_sweep_smoke(tmp_path):
    """``benchmarks.tile_sweep --smoke`` (interpreter, fp16): the GPU script's logic, its
    monkeypatched tile reaching the shipped kernels and the errors it reports."""
    if os.environ.get("TRITON_INTERPRET") != "1":  # --smoke runs on CPU tensors
        pytest.skip("needs Triton's interpreter (the test suite sets it without a GPU)")
    pytest.importorskip("triton")
    from benchmarks import tile_sweep

    out = tmp_path / "sweep.json"
    assert tile_sweep.main(["--smoke", "--dim", "48", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    triton_rows = [r for r in rows if r["what"].startswith("triton")]
    assert {r["what"] for r in triton_rows} == {"triton fwd", "triton dx"}
    assert all(r["rel_err"] < 1e-2 for r in triton_rows), triton_rows


# ------------------------------------------------------------- timing fidelity (issue 25)


def test_interleaved_order_rotates_every_method_through_every_slot():
    from benchmarks.timing import interleaved_order

    names = ["base", "torch", "triton"]
    orders = [interleaved_order(names, rep) for rep in range(6)]
    assert all(sorted(o) == sorted(names) for o in orders)
    for slot in range(3):
        firsts = [o[slot] for o in orders]
        assert all(firsts.count(n) == 2 for n in names), (slot, firsts)


def test_roofline_uses_the_bandwidth_measured_in_the_run():
    from benchmarks.roofline import Cost, lookup_peak, roofline

    peak = lookup_peak("NVIDIA H200")
    cost = Cost(flops=1.0, bytes=1e9)  # memory-bound
    sheet, note = roofline(cost, 1e-3, peak, torch.bfloat16)
    measured, note_m = roofline(
        cost, 1e-3, peak, torch.bfloat16, measured_bandwidth_gbps=peak.bandwidth_tbs * 500
    )
    assert measured == pytest.approx(2 * sheet) and "measured bandwidth" in note_m
    assert "peak" in note


@pytest.mark.gpu
def test_graph_time_host_time_and_bandwidth_on_a_gpu():
    from benchmarks.timing import (
        measure_bandwidth_gbps,
        time_gpu_graph,
        time_gpu_interleaved,
        time_host_us,
    )

    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def fn():
        return torch.nn.functional.linear(x, w)

    graph = time_gpu_graph(fn)
    eager = time_gpu_interleaved({"a": fn, "b": fn}, reps=20)
    host = time_host_us(fn)
    assert graph.median_ms > 0 and host > 0
    # a GEMV of 32 MB cannot beat the copy bandwidth measured in the same run by much
    bandwidth = measure_bandwidth_gbps(torch.device("cuda"), nbytes=1 << 28, reps=5)
    assert 100 < bandwidth < 20_000
    assert 2 * 4096 * 4096 / (graph.median_ms * 1e-3) / 1e9 < 1.5 * bandwidth
    assert eager["a"].quantile(0.25) <= eager["a"].median_ms <= eager["a"].quantile(0.75)


def test_whole_model_layer_count_follows_free_memory():
    from benchmarks.whole_model import WholeModelConfig, layers_that_fit

    cfg = WholeModelConfig(tiny=False)
    gib = 2**30
    counts = [layers_that_fit(cfg, free * gib) for free in (8, 24, 40, 79, 139)]
    assert counts == sorted(counts), counts  # more memory never gives fewer layers
    assert counts[0] == 1 and counts[-1] == 32  # at least one layer, at most the model's 32
    # a LLaMA-7B layer's bf16 weights alone are ~0.4 GiB: 24 GiB cannot hold all 32 twice
    assert counts[1] < 32
    # the count fits: what it budgets per layer times the count stays under the free memory
    from benchmarks.whole_model import _layer_bytes

    assert counts[2] * _layer_bytes(cfg, 2) < 40 * gib


def test_whole_model_rejects_bad_arguments():
    from benchmarks.whole_model import main as whole_main

    with pytest.raises(SystemExit):
        whole_main(["--tiny", "--layers", "0"])
    with pytest.raises(SystemExit):
        whole_main(["--tiny", "--reps", "0"])


def test_host_checks_judge_the_torch_path_and_only_report_the_triton_launcher(capsys):
    """The CPU's no-op launches cannot judge the GPU's 35 us target: INFO, never PASS/FAIL;
    the torch path's ratio to three plain calls is judged against 1.5."""
    from benchmarks.report import print_table, target_checks

    def rec(method, us):
        return {"op": "host", "device": "cpu", "B": 1, "L": 1, "d_in": 64, "r": 16,
                "method": method, "host_us": us}  # fmt: skip

    checks = target_checks(
        [rec("plain3", 10.0), rec("ours[torch]", 16.0), rec("ours[triton]", 90.0)]
    )
    by_method = {("triton" if "Triton" in c["target"] else "torch"): c for c in checks}
    assert by_method["torch"]["pass"] is False and by_method["torch"]["ratio"] == 1.6
    assert by_method["triton"]["pass"] is None
    print_table({"meta": {"device": "cpu", "dtype": "float32", "machine": "test"},
                 "records": [], "checks": checks})  # fmt: skip
    out = capsys.readouterr().out
    assert "FAIL host us ours[torch]" in out and "INFO host us of the Triton launcher" in out
    assert "PASS" not in out
