"""What several methods share and no method owns: option fields common to several methods.

A method never imports another method; what two of them need lives here or below
(:mod:`llmrec.data`, :mod:`llmrec.llm`).
"""

from __future__ import annotations

from typing import Any

from llmrec.config import option

__all__ = ["backend_option"]


def backend_option() -> Any:
    """The ``backend`` option of a method whose patched projections run on a kernel backend:
    one ``--backend`` flag for every such method (free to change on ``--resume``)."""
    from llmrec_kernels.backends import BACKENDS

    return option(
        "auto",
        help="kernel backend of the patched projections (auto: on a GPU the kernel its measured "
        "dispatch table shows faster than PyTorch, else PyTorch; PyTorch on the CPU)",
        flag="--backend",
        choices=list(BACKENDS),
        resume=False,
    )
