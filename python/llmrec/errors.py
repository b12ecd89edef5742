"""The project's error type for bad input: the CLI prints it as one line and exits 2.

Every problem a user can cause (a bad argument, a data file that breaks the schema, a run
directory in use or of another run, a corrupt checkpoint) raises a subclass of
:class:`LLMRecError`; anything else escaping the CLI is a bug.
"""

from __future__ import annotations

__all__ = ["LLMRecError"]


class LLMRecError(ValueError):
    """Bad input (argument, data file, run directory, checkpoint); the message names it."""
