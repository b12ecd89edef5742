"""``benchmarks/gpu_check.sh --dry-run``: the one-command GPU check runs end to end on a CPU.

On a GPU machine the same script installs the project, runs the GPU tests and the bf16
benchmark grid; here it collects the GPU tests and runs the benchmark on toy CPU shapes, so a
broken step is found in CI rather than in the few minutes a GPU is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False, timeout=900,
    )  # fmt: skip


def test_dry_run_writes_every_artefact(tmp_path):
    out = tmp_path / "check"
    proc = _run("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("env.txt", "install.log", "gpu-tests.log", "dispatch.txt", "bench.json",
                 "bench.md", "summary.md"):  # fmt: skip
        assert (out / name).is_file(), f"{name} missing: {sorted(p.name for p in out.iterdir())}"
    summary = (out / "summary.md").read_text()
    for step in ("install", "gpu-tests", "dispatch", "bench", "dispatch-table"):
        assert f"| {step} | ok |" in summary, summary
    # the dispatcher's predictions for the decode and prefill grid, split-K at decode
    dispatch = (out / "dispatch.txt").read_text()
    assert "H100  decode 1x1" in dispatch and "split 32x128" in dispatch, dispatch
    assert '"shrink"' in (out / "bench.json").read_text()
    assert "tests collected" in (out / "gpu-tests.log").read_text()
    assert "torch:" in (out / "env.txt").read_text()
    # the table writer ran on the run's records (a CPU run: its table names the CPU device)
    tables = list((out / "dispatch_tables").glob("*.json"))
    assert len(tables) == 1 and '"schema": 1' in tables[0].read_text()


def test_refuses_unknown_option_and_a_cpu_without_dry_run(tmp_path):
    proc = _run("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    if torch.cuda.is_available():
        return  # the real check would run here
    proc = _run(str(tmp_path / "x"))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
