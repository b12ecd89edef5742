"""``benchmarks/gpu_check.sh --dry-run``: the one-command GPU check runs end to end on a CPU.

On a GPU machine the same script installs the project, runs the GPU tests, the "Done when"
workloads of issue 25, the Hopper mainloop and the whole-model workload at LLaMA-7B shape;
here it collects the GPU tests and runs every benchmark step on toy CPU shapes, so a broken
step is found in CI rather than in the few minutes a GPU is lent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check_summary import ratio_rows

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

# Issue 25, "Done when", the GPU list: (words of the ratio's row, target). Written out here
# rather than imported, so a ratio dropped from the summary fails this test.
DONE_WHEN_GPU = (
    ("prefill forward 32x512: best ours / base", 1.05),
    ("prefill forward 8x256: best fused kernel / base", 1.10),
    ("prefill forward 8x256: best fused kernel / torch path", 0.97),
    ("training step fwd+bwd 8x256", 1.25),
    ("decode forward B 32: best ours / base", 1.30),
    ("decode forward B 32: best custom kernel / torch path", 1.00),
    ("decoder layer fwd+bwd 8x256: best ours / base", 1.05),
    ("whole-model CoRA scoring", 1.08),
    ("every error vs fp64", 1.00),
)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "check"
    proc = _run("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_dry_run_writes_every_artefact(dry_run):
    out = dry_run
    for name in ("env.txt", "install.log", "gpu-tests.log", "dispatch.txt", "bench.json",
                 "bench.md", "hopper.json", "whole_model.json", "whole_model.md",
                 "cost-model-calibration.txt", "targets.json", "summary.md"):  # fmt: skip
        assert (out / name).is_file(), f"{name} missing: {sorted(p.name for p in out.iterdir())}"
    summary = (out / "summary.md").read_text()
    for step in ("install", "gpu-tests", "dispatch", "bench", "hopper", "whole-model",
                 "dispatch-table", "cost-model", "targets"):  # fmt: skip
        assert f"| {step} | ok |" in summary, summary
    # the dispatcher's predictions for the decode and prefill grid, split-K at decode
    dispatch = (out / "dispatch.txt").read_text()
    assert "H100  decode 1x1" in dispatch and "split 32x128" in dispatch, dispatch
    # the GPU tests include the CUDA-graph capture and reduce-overhead decode tests
    tests = (out / "gpu-tests.log").read_text()
    assert "tests collected" in tests
    assert "test_manual_cuda_graph_of_a_patched_model_decode_step" in tests
    assert "test_reduce_overhead_compile_of_a_patched_model_decode_step" in tests
    assert "torch:" in (out / "env.txt").read_text()
    # the table writer ran on the run's records (a CPU run: its table names the CPU device)
    tables = list((out / "dispatch_tables").glob("*.json"))
    assert len(tables) == 1 and '"schema": 1' in tables[0].read_text()


def test_dry_run_measures_every_done_when_workload(dry_run):
    records = json.loads((dry_run / "bench.json").read_text())["records"]
    roles = {r.get("role") for r in records if r["status"] == "ok"}
    assert {"prefill_32x512", "prefill_8x256", "train_8x256", "decode_b32",
            "layer_8x256"} <= roles, roles  # fmt: skip
    # base, the torch path and plain factored PyTorch are timed in each projection workload
    for role in ("prefill_32x512", "train_8x256", "decode_b32"):
        timed = {r["method"] for r in records if r.get("role") == role and r["median_ms"]}
        assert {"base", "ours[torch]", "factored"} <= timed, (role, timed)
    whole = json.loads((dry_run / "whole_model.json").read_text())
    assert [r["method"] for r in whole["records"]] == ["base", "ours", "reference"]
    for rec in whole["records"]:
        assert rec["status"] == "ok", rec
        assert rec["train_tokens_per_s"] > 0 and rec["score_tokens_per_s"] > 0
    assert whole["meta"]["layers"] >= 1


def test_summary_lists_every_done_when_ratio(dry_run):
    summary = (dry_run / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "<=" in line]
    for words, target in DONE_WHEN_GPU:
        row = next((r for r in rows if words in r), None)
        assert row is not None, f"no row for {words!r} in\n{summary}"
        assert f"| <= {target:.2f} |" in row, row
        assert row.rstrip(" |").rsplit("|", 1)[-1].strip() in ("pass", "FAIL", "not measured")
    assert "## Whole model" in summary and "| reference |" in summary


def test_step_limits_fit_six_minutes():
    text = SCRIPT.read_text()
    limits = {k: int(v) for k, v in re.findall(r"\$\{LIMIT_(\w+):-(\d+)\}", text)}
    assert set(limits) >= {"INSTALL", "TESTS", "EXTENSION", "CUDA_TESTS", "BENCH", "HOPPER",
                           "WHOLE", "SUMMARY"}, limits  # fmt: skip
    # the tests run while the extension builds; the wait for it ends 6 s after its limit
    background = max(limits["TESTS"], limits["EXTENSION"] + 6)
    foreground = sum(v for k, v in limits.items() if k not in ("TESTS", "EXTENSION"))
    assert background + foreground <= 360, limits
    # the GPU run's cap (the dry run on a CPU has its own, wider one)
    total = int(
        re.search(r'DRY_RUN" -eq 0 \]; then TOTAL="\$\{GPU_CHECK_TOTAL:-(\d+)', text).group(1)
    )
    assert total + 15 <= 360  # the cap on every step, plus the verdict table's grace


def _rec(role, method, ms, err=None, graph_ms=None):
    return {"role": role, "method": method, "status": "ok", "median_ms": ms,
            "max_rel_err": err, "max_rel_err_grad": None, "graph_ms": graph_ms}  # fmt: skip


def test_ratios_judge_records_against_their_targets():
    bench = [
        _rec("prefill_32x512", "base", 1.0), _rec("prefill_32x512", "ours[torch]", 1.04),
        _rec("prefill_32x512", "ours[triton]", 1.2),
        _rec("prefill_8x256", "base", 1.0), _rec("prefill_8x256", "ours[torch]", 1.2),
        _rec("prefill_8x256", "ours[triton]", 1.15),
        _rec("decode_b32", "base", 1.0, 1e-3, graph_ms=0.5), _rec("decode_b32", "ours[torch]", 1.5, 2e-3),
        _rec("decode_b32", "ours[cuda]", 1.2, 3e-3, graph_ms=0.55),
    ]  # fmt: skip
    hopper = [{"workload": "forward", "batch": 8, "length": 256,
               "methods": {"base": {"ms": 2.0}, "torch": {"ms": 2.4}, "hopper": {"ms": 2.1}}}]  # fmt: skip
    whole = {"meta": {"layers": 30, "layers_of": 32},
             "records": [{"method": "base", "status": "ok", "score_s": 1.0},
                         {"method": "ours", "status": "ok", "score_s": 1.1}]}  # fmt: skip
    rows = {r["key"]: r for r in ratio_rows(bench, hopper, whole)}
    assert rows["prefill_32x512"]["value"] == pytest.approx(1.04)
    assert rows["prefill_32x512"]["status"] == "pass"
    # 8x256: the Hopper mainloop's 1.05x base beats the suite's Triton 1.15x
    assert rows["prefill_8x256_base"]["value"] == pytest.approx(1.05)
    assert "hopper" in rows["prefill_8x256_base"]["which"]
    assert rows["prefill_8x256_torch"]["value"] == pytest.approx(2.1 / 2.4)
    assert rows["prefill_8x256_torch"]["status"] == "pass"
    assert rows["decode_b32_base"]["value"] == pytest.approx(1.2)
    assert "under graph replay 1.100" in rows["decode_b32_base"]["which"]
    assert rows["decode_b32_torch"]["value"] == pytest.approx(1.2 / 1.5)
    assert rows["errors"]["value"] == pytest.approx(1.5) and rows["errors"]["status"] == "FAIL"
    assert rows["scoring_whole_model"]["value"] == pytest.approx(1.1)
    assert rows["scoring_whole_model"]["status"] == "FAIL"
    assert rows["train_8x256"]["status"] == "not measured"
    assert rows["layer_8x256"]["value"] is None


def test_refuses_unknown_option_and_a_cpu_without_dry_run(tmp_path):
    proc = _run("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    if torch.cuda.is_available():
        return  # the real check would run here
    proc = _run(str(tmp_path / "x"))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
