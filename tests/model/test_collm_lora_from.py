"""``--collm-lora-from``: CoLLM's step 2 on the LoRA of a finished run (the reference's ``ckpt``).

CoLLM's step 1 is TALLRec's text-only LoRA on the same rows; the first test holds the code to
that claim (the two trainings give the same tensors), so a TALLRec run can stand in for it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_cli import synthetic_data, train_tiny

from llmrec.cli import main

#: the same rows and schedule for both methods: 32 training rows, batch 16, 2 steps
ROWS = ["--batch-size", "16", "--max-train-rows", "32", "--max-valid-rows", "16",
        "--max-test-rows", "16", "--lr", "1e-2"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_from")
    data = synthetic_data(root)
    # one CF table for both, as in the experiment (CoLLM would otherwise train its own first)
    cf = root / "cf"
    assert main(["train-cf", "--model", "mf", "--dim", "8", "--epochs", "1", "--data", str(data),
                 "--out", str(cf), "--no-progress"]) == 0  # fmt: skip
    tallrec = train_tiny("tallrec", data, root / "tallrec", *ROWS, "--cf", str(cf))
    # one LLM for both too: the tiny LLM's tokenizer is trained on the method's prompts, so
    # CoLLM runs on the LLM the TALLRec run saved (as both run on SmolLM2 in the experiment)
    collm = train_collm(data, root / "collm", tallrec, "--cf", str(cf))
    return root, data, tallrec, collm, cf


def train_collm(data, out, tallrec, *extra):
    argv = ["train", "--method", "collm", "--data", str(data), "--out", str(out), "--epochs", "1",
            "--llm", str(tallrec / "llm"), "--backend", "torch", "--no-progress", *ROWS, *extra]  # fmt: skip
    assert main(argv) == 0
    return out


def lora_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if "lora_" in k}


def test_collm_step1_is_tallrec(runs):
    _, _, tallrec, collm, _ = runs
    want, got = (
        lora_tensors(tallrec / "best.safetensors"),
        lora_tensors(collm / "step1" / "best.safetensors"),
    )
    assert set(got) == set(want) and len(want) > 0
    for k in want:
        # trained (lora_B starts at zero), and the same arithmetic in the same order
        assert want[k].abs().sum() > 0, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_step2_trains_on_the_given_lora_and_keeps_it_frozen(runs):
    root, data, tallrec, _, cf = runs
    out = train_collm(data, root / "from_tallrec", tallrec, "--cf", str(cf),
                      "--collm-lora-from", str(tallrec))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    stages = metrics["train"]["stages"]
    assert [s["stage"] for s in stages] == ["cie"]
    assert not (out / "step1").exists()
    src = tallrec / "best.safetensors"
    assert stages[0]["lora_from"]["path"] == str(src)
    import hashlib

    assert stages[0]["lora_from"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    want, state = lora_tensors(src), load_file(str(out / "best.safetensors"))
    for k, v in want.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    # the CIE did train on top of it
    assert metrics["train"]["steps"] == 2 and any(k.startswith("cie.") for k in state)
    # evaluate reopens the run without needing the step-1 file again
    src_copy = src.read_bytes()
    src.unlink()
    try:
        assert main(["evaluate", "--run", str(out), "--no-progress"]) == 0
    finally:
        src.write_bytes(src_copy)
    again = json.loads((out / "eval_test.json").read_text())
    assert again["test"]["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)


def _refused(capsys, *argv) -> str:
    rc = main(["train", "--method", "collm", *argv])
    assert rc == 2
    return capsys.readouterr().err


def test_refusals(runs, tmp_path, capsys):
    _, data, tallrec, _, cf = runs
    base = ["--data", str(data), "--epochs", "1", "--llm", str(tallrec / "llm"), "--cf", str(cf),
            "--backend", "torch", "--no-progress", *ROWS]  # fmt: skip

    out = tmp_path / "one_step"
    err = _refused(capsys, "--out", str(out), *base, "--collm-tuning", "one-step",
                   "--collm-lora-from", str(tallrec))  # fmt: skip
    assert "one-step has no step 1" in err and not out.exists()

    err = _refused(capsys, "--out", str(tmp_path / "missing"), *base,
                   "--collm-lora-from", str(tmp_path / "nope"))  # fmt: skip
    assert "no state file there" in err and "--collm-lora-from takes" in err

    state = load_file(str(tallrec / "best.safetensors"))
    cases = {
        # another rank's LoRA: the file says so
        "alpha": ({k: v for k, v in state.items()}, {"lora_rank": "8", "lora_alpha": "32"},
                  "lora_alpha 32"),
        # a state without the LoRA (a CoRA generator, say)
        "keys": ({"generator.w": torch.zeros(2)}, {}, "lacks"),
        # the right names, another width
        "shape": ({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) for k, v in state.items()},
                  {}, "shapes differ"),
    }  # fmt: skip
    for name, (tensors, meta, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", **meta})
        err = _refused(capsys, "--out", str(tmp_path / f"run_{name}"), *base,
                       "--collm-lora-from", str(path))  # fmt: skip
        assert "--collm-lora-from" in err and message in err, (name, err)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tallrec / "best.safetensors").read_bytes()[:-64])
    err = _refused(capsys, "--out", str(tmp_path / "run_trunc"), *base,
                   "--collm-lora-from", str(truncated))  # fmt: skip
    assert "truncated" in err
