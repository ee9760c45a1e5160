"""Schedules of a scalar over the training steps: τ2 (the coupling weight) and learning rates.

A schedule is a pure function of the step, so that a resumed run continues it exactly; its
``state_dict()`` holds its settings, which a checkpoint compares on resume.

- :class:`Constant`: the paper's constant τ2.
- :class:`StepDecay`: ``value · rate^⌊step/every⌋``, and ``0`` once that falls below
  ``floor`` (``floor=None``: never). With ``rate < 1`` for τ2 this is the continuation τ2 → 0
  that removes the upscaling-consistency bias of Theorem 3.2 at the end; for a learning rate it
  is the paper's decay (0.75 every 1000 steps).
"""

from __future__ import annotations

import math
from typing import Any

from dolfinx_pinn.exceptions import CheckpointMismatch

__all__ = ["Constant", "Schedule", "StepDecay", "tau2_schedule"]

SCHEDULE_NAMES = ("constant", "continuation")


class Schedule:
    """A scalar as a function of the (0-based) step."""

    def __call__(self, step: int) -> float:  # noqa: D102
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The settings (a schedule has no other state)."""
        return {"kind": type(self).__name__, **vars(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a checkpoint was written with the same schedule."""
        if state != self.state_dict():
            raise CheckpointMismatch(
                f"resume: the checkpoint was written with the schedule {state}, this run has "
                f"{self.state_dict()}"
            )


class Constant(Schedule):
    """The same value at every step.

    Args:
        value: The value, a finite number >= 0.
    """

    def __init__(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"value must be a finite number >= 0, got {value!r}")
        self.value = float(value)

    def __call__(self, step: int) -> float:  # noqa: D102
        return self.value


class StepDecay(Schedule):
    """``value · rate^⌊step/every⌋``, 0 once below ``floor``.

    Args:
        value: The initial value, > 0.
        rate: The factor per ``every`` steps, in (0, 1].
        every: Steps per factor, >= 1.
        floor: Values below it become 0 (``None``: no floor), >= 0.
        name: The quantity's name in error messages (e.g. ``"tau2"``).
    """

    def __init__(
        self,
        value: float,
        rate: float,
        every: int,
        floor: float | None = None,
        *,
        name: str = "value",
    ) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
            raise ValueError(f"{name}_decay must lie in (0, 1], got {rate!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{name}_decay_steps must be an integer >= 1, got {every!r}")
        if floor is not None and not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"{name}_min must be a finite number >= 0, got {floor!r}")
        self.value, self.rate, self.every = float(value), float(rate), int(every)
        self.floor = None if floor is None else float(floor)

    def __call__(self, step: int) -> float:  # noqa: D102
        value = self.value * self.rate ** (step // self.every)
        return 0.0 if self.floor is not None and value < self.floor else value


def tau2_schedule(
    name: str, tau2: float, decay: float, decay_steps: int, minimum: float
) -> Schedule:
    """The τ2 schedule by name: ``"constant"`` or ``"continuation"``.

    Raises:
        ValueError: naming ``tau2_schedule``, ``tau2_decay``, ... when out of range.
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"tau2_schedule must be one of {SCHEDULE_NAMES}, got {name!r}")
    if not (isinstance(decay, (int, float)) and 0 < decay < 1):
        raise ValueError(f"tau2_decay must lie in (0, 1), got {decay!r}")
    if not (isinstance(minimum, (int, float)) and math.isfinite(minimum) and minimum >= 0):
        raise ValueError(f"tau2_min must be a finite number >= 0, got {minimum!r}")
    if name == "constant":
        return Constant(tau2)
    return StepDecay(tau2, decay, decay_steps, minimum, name="tau2")
