"""The training history: one type, written by the training loop and read by the outputs.

A :class:`History` is a dict of lists, so that ``history["loss"][-1]`` and
``json.dumps(history)`` work as for a plain dict:

- per step (all of the same length as ``history["step"]``): ``step``, ``time`` and every key of
  the step records (``loss``, each loss term by name, ``lr`` or ``damping``, ``K_tilde``, ...);
  a key a record does not have is ``None`` for that step;
- per evaluation: ``eval_step``, ``eval_time``, ``l2``, ``h1``;
- ``history["terms"]``: the loss terms by name (the same list objects as ``history[name]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["EVALUATION_KEYS", "History"]

#: The per-evaluation lists.
EVALUATION_KEYS = ("eval_step", "eval_time", "l2", "h1")


class History(dict):
    """Per-step and per-evaluation lists of a training run.

    Args:
        terms: The loss-term names (their lists are also under ``history["terms"]``).
        **metadata: Constant entries (e.g. ``optimizer="adam"``).
    """

    def __init__(self, terms: Iterable[str] = (), **metadata: Any) -> None:
        super().__init__(step=[], time=[], loss=[])
        for key in EVALUATION_KEYS:
            self[key] = []
        self.term_names = list(terms)
        self["terms"] = {}
        for name in self.term_names:
            self.setdefault(name, [])
            self["terms"][name] = self[name]
        self.update(metadata)

    @property
    def num_steps(self) -> int:
        """The number of recorded steps."""
        return len(self["step"])

    def step_keys(self) -> list[str]:
        """The per-step keys, ``step`` first."""
        n = self.num_steps
        return [
            key
            for key, value in self.items()
            if isinstance(value, list) and key not in EVALUATION_KEYS and len(value) == n
        ]

    def append(self, record: Mapping[str, Any]) -> None:
        """Add one step; new keys are filled with ``None`` for the earlier steps."""
        if "step" not in record:
            raise ValueError("record: a step record needs its 'step'")
        n = self.num_steps
        existing = self.step_keys()
        for key, value in record.items():
            if key in EVALUATION_KEYS or key == "terms":
                raise ValueError(f"record: {key!r} is reserved for the evaluations")
            column = self.get(key)
            if not isinstance(column, list) or len(column) != n:
                if key in self and not isinstance(column, list):
                    raise ValueError(f"record: {key!r} is a constant entry of the history")
                column = self[key] = [None] * n
            column.append(value)
        for key in existing:
            if key not in record:
                self[key].append(None)

    def add_evaluation(self, step: int, time: float, l2: float, h1: float) -> None:
        """Record the relative errors at ``step``."""
        self["eval_step"].append(step)
        self["eval_time"].append(time)
        self["l2"].append(l2)
        self["h1"].append(h1)

    def last(self, key: str, default: Any = None) -> Any:
        """The last value of a per-step or per-evaluation list (``default`` if empty)."""
        column = self.get(key)
        return column[-1] if column else default

    def evaluated_at(self, step: int) -> bool:
        """Whether the errors were evaluated at ``step``."""
        return bool(self["eval_step"]) and self["eval_step"][-1] == step

    def state_dict(self) -> dict[str, Any]:
        """A plain, picklable copy (for checkpoints)."""
        return {
            "term_names": list(self.term_names),
            "entries": {
                key: list(value) if isinstance(value, list) else value
                for key, value in self.items()
                if key != "terms"
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.clear()
        self.term_names = list(state["term_names"])
        self.update(
            {
                key: list(value) if isinstance(value, list) else value
                for key, value in state["entries"].items()
            }
        )
        self["terms"] = {name: self.setdefault(name, []) for name in self.term_names}

    def finite(self, key: str) -> list[float]:
        """The finite numbers of a per-step list (``None`` and NaN left out)."""
        return [
            float(v)
            for v in self.get(key, [])
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
