"""The errors a user can cause, below every other module so that any layer may raise them.

The command line prints one line for each (``malloc <command>: error: <message>``) and exits with status 2; every
other exception is a bug and keeps its traceback. Each message names the input (file, key, folder) and says what
was expected.
"""

from __future__ import annotations


class MallocError(Exception):
    """An error a user can cause: bad config, data, scheme, results folder or checkpoint."""


class ResultsError(MallocError, ValueError):
    """A results folder or file that a run cannot use: unwritable, corrupt, or holding another config's run."""


class CheckpointError(ResultsError):
    """A checkpoint that cannot be loaded: truncated, not a checkpoint, for another model, or holding code."""


class TrainingError(MallocError):
    """Training that cannot produce a model: its loss or validation metric stopped being finite (e.g. too high a
    learning rate)."""


__all__ = ["CheckpointError", "MallocError", "ResultsError", "TrainingError"]
