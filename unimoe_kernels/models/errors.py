"""Errors of a training run that the user fixes (a damaged checkpoint, a diverged run), as opposed
to bugs: the jobs print them as one `error:` line, and their messages name the file or the cause."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot go on as asked; the message says what and where."""


class CheckpointError(RunError):
    """A checkpoint directory that cannot be read or written as asked; the message names the file."""


class TrainingDiverged(RunError, FloatingPointError):
    """The loss or the weights stopped being finite; nothing non-finite was saved."""


__all__ = ["RunError", "CheckpointError", "TrainingDiverged"]
