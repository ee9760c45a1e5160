"""The training loop: an objective, an optimizer and callbacks.

One loop serves the plain PINN and the hybrid solver alike. Each step:

1. ``on_step_begin`` of the callbacks (the τ2 schedule sets the objective's τ2);
2. ``objective.prepare(step)`` (the hybrid objective's lazy coarse update);
3. ``optimizer.step()`` — a record with at least ``loss`` (and, where the optimizer evaluated
   them, the loss ``terms`` and balancing ``weights``);
4. ``objective.record(terms)`` — the loss terms (evaluated afresh if the optimizer gave none)
   and diagnostics (K̃, R, τ2, ...);
5. the record, with its timings, is appended to the :class:`~dolfinx_pinn.history.History`;
6. ``on_step_end`` of the callbacks (evaluation, early stopping, progress, checkpoints,
   signals), which may request a stop.

A non-finite loss term (:class:`~dolfinx_pinn.exceptions.NonFiniteLoss`) becomes a
``RuntimeError`` that says where the last good checkpoint is. The loop's
:meth:`~TrainingLoop.state_dict` gathers the state of the objective, the optimizer and every
callback for :class:`~dolfinx_pinn.callbacks.Checkpoint`.

Collective on the objective's communicator.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TypeVar

from mpi4py import MPI

from dolfinx_pinn.callbacks import Callback, random_state, set_random_state
from dolfinx_pinn.exceptions import NonFiniteLoss
from dolfinx_pinn.history import History

__all__ = ["TrainingLoop"]

C = TypeVar("C", bound=Callback)


class TrainingLoop:
    """Runs an optimizer on an objective with callbacks (collective).

    Args:
        objective: The objective (``losses``/``record``/``prepare``/``state_dict``/
            ``fingerprint``; see :mod:`dolfinx_pinn.objectives`).
        optimizer: An optimizer of :mod:`dolfinx_pinn.optim` (``step``, ``state_dict``,
            ``load_state_dict``, ``settings``).
        callbacks: The callbacks, called in this order.
        history: The history to extend (default: a new one with the objective's term names).
        comm: The communicator (default: the objective's, else ``COMM_WORLD``).
    """

    def __init__(
        self,
        objective: Any,
        optimizer: Any,
        callbacks: Sequence[Callback] = (),
        *,
        history: History | None = None,
        comm: MPI.Comm | None = None,
    ) -> None:
        self.objective = objective
        self.optimizer = optimizer
        self.callbacks = list(callbacks)
        self.comm = comm or getattr(objective, "comm", None) or MPI.COMM_WORLD
        names = getattr(objective, "term_names", [])
        self.history = history if history is not None else History(names)
        self.step = 0
        self.steps = 0
        self.elapsed = 0.0
        self.stop_reason: str | None = None
        self.completed_normally = False
        self.last_checkpoint: Any = None

    def run(self, steps: int) -> History:
        """Train up to ``steps`` steps in total (a resumed run counts its earlier steps)."""
        self.steps, self.stop_reason, self.completed_normally = steps, None, False
        self._call("on_train_begin")
        try:
            while self.step < self.steps and self.stop_reason is None:
                self._call("on_step_begin")
                started, coarse = time.perf_counter(), self.objective.coarse_time
                try:
                    self.objective.prepare(self.step)
                    record = dict(self.optimizer.step())
                    after_step = time.perf_counter()
                    weights = record.pop("weights", None) or {}
                    record.update(self.objective.record(record.pop("terms", None)))
                    record.update({f"weight_{name}": w for name, w in weights.items()})
                except NonFiniteLoss as error:
                    raise RuntimeError(
                        f"{error} at step {self.step + 1}; {self.checkpoint_note()}"
                    ) from error
                finished = time.perf_counter()
                coarse = self.objective.coarse_time - coarse
                self.step += 1
                self.elapsed += finished - started
                record.update(
                    step=self.step,
                    time=self.elapsed,
                    time_network=after_step - started - coarse,
                    time_coarse=coarse,
                    time_other=finished - after_step,
                )
                self.history.append(record)
                for callback in self.callbacks:
                    started = time.perf_counter()
                    callback.on_step_end(self, record)
                    self.elapsed += time.perf_counter() - started
            self.completed_normally = True
        finally:
            self._call("on_train_end")
        return self.history

    def _call(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self)

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (the callbacks of this step still run)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def find(self, kind: type[C]) -> C | None:
        """The first callback of a type, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def checkpoint_note(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        if self.last_checkpoint is not None:
            return f"the last good checkpoint is {self.last_checkpoint}"
        return "no checkpoint was written (set checkpoint_every and checkpoint_dir to keep one)"

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state of the whole run (this rank's part)."""
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "callbacks": {key: c.state_dict() for key, c in self._keyed_callbacks()},
            "random": random_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a callback the checkpoint does not know starts afresh."""
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.history.load_state_dict(state["history"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        for key, callback in self._keyed_callbacks():
            if key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][key])
        set_random_state(state["random"])

    def _keyed_callbacks(self) -> list[tuple[str, Callback]]:
        """``(kind.n, callback)``: the n-th callback of each kind, stable when others change."""
        counts: dict[str, int] = {}
        keyed = []
        for callback in self.callbacks:
            kind = type(callback).__name__
            keyed.append((f"{kind}.{counts.get(kind, 0)}", callback))
            counts[kind] = counts.get(kind, 0) + 1
        return keyed

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this run."""
        return {
            "objective": self.objective.fingerprint(),
            "optimizer": {"kind": type(self.optimizer).__name__, **self.optimizer.settings()},
            "ranks": self.comm.size,
        }
