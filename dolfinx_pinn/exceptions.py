"""The package's exceptions, each saying what went wrong in one line.

All are subclasses of the built-in exception a caller would expect (``ValueError`` for a bad
setting, ``RuntimeError`` for a failed run, ``KeyboardInterrupt`` for a signal), so existing
``except`` clauses keep working; the command line turns each into one ``dolfinx-pinn: error:``
line and an exit code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CheckpointMismatch", "DivergenceError", "NonFiniteLoss", "TrainingInterrupted"]


class DivergenceError(RuntimeError):
    """The run diverged (the message says how, and where the last good checkpoint is)."""


class CheckpointMismatch(ValueError):
    """A checkpoint does not belong to this run (the message names the setting that differs)."""


class NonFiniteLoss(FloatingPointError):
    """A loss term (or K̃) is NaN or infinite; ``name`` and ``value`` say which."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(f"the loss term {name!r} is not finite ({value})")
        self.name, self.value = name, value


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run; ``signum`` is the signal (exit code ``128 + signum``)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
