"""Small ``llmrec train`` runs for the CLI tests: a synthetic dataset and a tiny random LLaMA.

Only what several test files share: the tiny LLM's size flags, a dataset written to a
directory and one training call that must succeed.
"""

from __future__ import annotations

from pathlib import Path

#: a 1- or 2-layer LLaMA of width 32 on the torch backend, without progress bars
TINY_LLM = ["--tiny-hidden", "32", "--tiny-heads", "2", "--tiny-kv-heads", "1",
            "--tiny-vocab", "400", "--backend", "torch", "--no-progress"]  # fmt: skip


def synthetic_data(root: Path, *, users: int = 30, items: int = 25, per_user: int = 10,
                   seed: int = 2) -> Path:  # fmt: skip
    """``make_synthetic`` written under ``root/d``; returns the directory."""
    from llmrec.data import make_synthetic, write_data

    return write_data(
        make_synthetic(n_users=users, n_items=items, per_user=per_user, seed=seed), root / "d"
    )


def train_tiny(method: str, data: Path, out: Path, *extra: str, layers: int = 1) -> Path:
    """``llmrec train --method METHOD`` on the tiny LLM for one epoch; returns ``out``."""
    from llmrec.cli import main

    rc = main(["train", "--method", method, "--data", str(data), "--out", str(out),
               "--epochs", "1", "--tiny-layers", str(layers), *TINY_LLM, *extra])  # fmt: skip
    assert rc == 0, f"llmrec train --method {method} failed"
    return out
