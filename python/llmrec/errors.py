"""Every error a user can cause, in one place: the CLI prints it as one line and exits 2.

A bad argument, a data file that breaks the schema, a run directory in use or of another
run, a corrupt checkpoint, an LLM that cannot be loaded: each raises one of the classes
below (all :class:`ValueError`); anything else escaping the CLI is a bug.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "AdapterError",
    "CFEmbeddingError",
    "CheckpointError",
    "DataValidationError",
    "LLMLoadError",
    "LLMRecError",
    "NumericalError",
    "RunConfigError",
]


class LLMRecError(ValueError):
    """Bad input (argument, data file, run directory, checkpoint); the message names it."""


class RunConfigError(LLMRecError):
    """The run's options are inconsistent (resume into another config, out dir in use, ...)."""


class AdapterError(LLMRecError):
    """An adapter folder is missing, edited, corrupt or does not fit the base model."""


class CheckpointError(LLMRecError):
    """A checkpoint cannot be used with this model (other shapes, missing, corrupt)."""


class DataValidationError(LLMRecError):
    """A data file does not follow the schema; the message names the file and the row."""


class CFEmbeddingError(LLMRecError):
    """A CF embedding file is missing, malformed or does not match the data."""


class NumericalError(LLMRecError):
    """Training diverged (a non-finite loss or score) or a metric it needs is undefined."""


class LLMLoadError(ValueError):
    """The LLM or its tokenizer cannot be loaded from the given path."""


#: what the CLI reports as a one-line error (exit status 2)
USER_ERRORS = (LLMRecError, LLMLoadError)
