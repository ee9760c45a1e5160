"""Callbacks of the training loop: each concern of a run as an object with its own state.

The loop (:class:`dolfinx_pinn.training.TrainingLoop`) calls ``on_train_begin``,
``on_step_begin``, ``on_step_end`` and ``on_train_end`` of every callback in order, as
Lightning and DeepXDE do. A callback stops the run with ``loop.request_stop(reason)``; its
``state_dict()`` goes into every checkpoint, so that a resumed run continues bit for bit.

- :class:`Tau2Schedule`: sets the objective's τ2 from a :mod:`~dolfinx_pinn.schedules` schedule.
- :class:`Evaluation`: the relative errors against the reference every ``every`` steps.
- :class:`EarlyStopping`: stop at a target error, or when the optimizer stalls.
- :class:`TimeLimit`: stop after a wall time.
- :class:`DivergenceGuard`: stop with a clear error when the loss explodes or K̃ leaves [α, β].
- :class:`Progress`: tqdm on rank 0 in a terminal, a line every few percent otherwise.
- :class:`Checkpoint`: save (and resume) the whole state with a fingerprint of the run.
- :class:`SignalHandler`: SIGINT/SIGTERM save a checkpoint and stop all ranks after the step.
- :class:`FunctionCallback`: ``callback(step, record)`` of the solver wrappers.

MPI: every decision that ends the loop is agreed over the ranks (the loss, K̃ and the errors
are replicated; signals and time are reduced), so no rank leaves a collective call alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpi4py import MPI

import numpy as np
import torch

from dolfinx_pinn.exceptions import CheckpointMismatch, DivergenceError, TrainingInterrupted
from dolfinx_pinn.schedules import Schedule

if TYPE_CHECKING:
    from dolfinx_pinn.training import TrainingLoop

__all__ = [
    "Callback",
    "Checkpoint",
    "CheckpointMismatch",
    "DivergenceError",
    "DivergenceGuard",
    "EarlyStopping",
    "Evaluation",
    "FunctionCallback",
    "Progress",
    "SignalHandler",
    "Tau2Schedule",
    "TimeLimit",
    "TrainingInterrupted",
]


class Callback:
    """A hook of the training loop; override what is needed."""

    def on_train_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        pass

    def on_step_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        pass

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        pass

    def on_train_end(self, loop: TrainingLoop) -> None:  # noqa: D102
        pass

    def state_dict(self) -> dict[str, Any]:
        """The callback's state for a checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class Tau2Schedule(Callback):
    """Sets ``objective.tau2`` to ``schedule(step)`` before every step.

    Args:
        schedule: The τ2 schedule (:func:`dolfinx_pinn.schedules.tau2_schedule`).
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def on_step_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        loop.objective.tau2 = self.schedule(loop.step)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return self.schedule.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self.schedule.load_state_dict(dict(state))


class Evaluation(Callback):
    """Relative L² and H¹ errors at step 0, every ``every`` steps and at the end (collective).

    Args:
        errors: ``errors() -> (l2, h1)`` (the objective's), or None for no reference.
        every: Steps between evaluations, >= 1.
    """

    def __init__(self, errors: Callable[[], tuple[float, float]] | None, every: int) -> None:
        _check_int("eval_every", every, 1)
        self.errors = errors
        self.every = every

    def evaluate(self, loop: TrainingLoop) -> float | None:
        """Evaluate now (unless already done at this step); returns the L² error."""
        if self.errors is None:
            return None
        if loop.history.evaluated_at(loop.step):
            return loop.history["l2"][-1]
        l2, h1 = self.errors()
        loop.history.add_evaluation(loop.step, loop.elapsed, l2, h1)
        return l2

    def on_train_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        if loop.step == 0:
            self.evaluate(loop)

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        if loop.step % self.every == 0 or loop.step == loop.steps:
            self.evaluate(loop)

    def on_train_end(self, loop: TrainingLoop) -> None:  # noqa: D102
        if loop.completed_normally:
            self.evaluate(loop)


class EarlyStopping(Callback):
    """Stop at a target relative L² error, or when the optimizer reports a stall at τ2 = 0.

    Args:
        evaluation: The :class:`Evaluation` whose errors are compared (needs a reference).
        target_l2: Stop once the relative L² error is at most this (checked every step).
        stop_on_stall: Stop when a step record says ``stalled`` (Gauss-Newton at its round-off
            floor) and the objective's τ2 is 0 (a stall while τ2 still changes is no end).
    """

    def __init__(
        self,
        evaluation: Evaluation | None = None,
        target_l2: float | None = None,
        stop_on_stall: bool = True,
    ) -> None:
        if target_l2 is not None:
            if not (
                isinstance(target_l2, (int, float)) and math.isfinite(target_l2) and target_l2 > 0
            ):
                raise ValueError(f"target_l2 must be a finite number > 0, got {target_l2!r}")
            if evaluation is None or evaluation.errors is None:
                raise ValueError("target_l2: needs a reference (the solver has none)")
        self.evaluation = evaluation
        self.target_l2 = target_l2
        self.stop_on_stall = stop_on_stall

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        if self.target_l2 is not None and self.evaluation is not None:
            l2 = self.evaluation.evaluate(loop)
            if l2 is not None and l2 <= self.target_l2:
                loop.request_stop(f"reached the target relative L² error {self.target_l2:g}")
                return
        if self.stop_on_stall and record.get("stalled") and not record.get("tau2"):
            loop.request_stop("the optimizer stalled (no decrease at the round-off floor)")


class TimeLimit(Callback):
    """Stop once the loop's wall time reaches ``seconds`` (rank 0's clock decides).

    Args:
        seconds: The limit, > 0.
    """

    def __init__(self, seconds: float) -> None:
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"time_limit must be a finite number > 0, got {seconds!r}")
        self.seconds = float(seconds)

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        reached = loop.elapsed >= self.seconds
        if loop.comm.size > 1:
            reached = bool(loop.comm.bcast(reached, root=0))
        if reached:
            loop.request_stop(f"reached the time limit of {self.seconds:g} s")


class DivergenceGuard(Callback):
    """Stop with a :class:`DivergenceError` when the run diverges.

    Diverging means, for ``patience`` consecutive steps: the loss is above ``growth`` times the
    best loss so far, or the network's upscaled coefficient K̃ is far outside the bounds
    [α, β] of the coefficient, ``|K̃| > bound_factor · β`` (the upscaled coefficient of the
    solution lies in [α, β]; a randomly initialised network's K̃ is often outside for a while,
    which the coarse problem's clip absorbs, but not by orders of magnitude). Both are
    replicated, so every rank stops at the same step. While a step looks diverging,
    :class:`Checkpoint` writes nothing, so that the last checkpoint stays a good one.

    Args:
        bounds: ``(α, β)`` of the problem, or None to skip the K̃ check.
        growth: The loss factor, > 1.
        patience: Consecutive steps, >= 1.
        bound_factor: The K̃ check's factor, > 1.
    """

    def __init__(
        self,
        bounds: tuple[float, float] | None = None,
        growth: float = 1e6,
        patience: int = 20,
        bound_factor: float = 100.0,
    ) -> None:
        if not (math.isfinite(growth) and growth > 1):
            raise ValueError(f"growth must be a finite number > 1, got {growth!r}")
        _check_int("patience", patience, 1)
        self.bounds = bounds
        if not (math.isfinite(bound_factor) and bound_factor > 1):
            raise ValueError(f"bound_factor must be a finite number > 1, got {bound_factor!r}")
        self.growth, self.patience, self.bound_factor = float(growth), patience, bound_factor
        self.best = math.inf
        self.best_step = 0
        self.strikes = 0

    def _problem(self, record: Mapping[str, Any]) -> str | None:
        loss = record.get("loss")
        if isinstance(loss, float) and math.isfinite(loss) and loss > self.growth * self.best:
            return (
                f"the loss {loss:.3e} is more than {self.growth:g} times its best "
                f"{self.best:.3e} (step {self.best_step})"
            )
        K = record.get("K_tilde")
        if self.bounds is not None and isinstance(K, float):
            alpha, beta = self.bounds
            if not abs(K) <= self.bound_factor * beta:
                return f"K̃ = {K:.6g} lies far outside the bounds [{alpha:.4g}, {beta:.4g}] of K"
        return None

    @property
    def healthy(self) -> bool:
        """Whether the last step looked sound."""
        return self.strikes == 0

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        problem = self._problem(record)
        loss = record.get("loss")
        if isinstance(loss, float) and math.isfinite(loss) and loss < self.best:
            self.best, self.best_step = loss, loop.step
        self.strikes = self.strikes + 1 if problem else 0
        if self.strikes >= self.patience:
            raise DivergenceError(
                f"training diverged at step {loop.step}: {problem} for {self.patience} steps; "
                f"{loop.checkpoint_note()} (lower the learning rate or the damping)"
            )

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"best": self.best, "best_step": self.best_step, "strikes": self.strikes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.strikes = int(state["strikes"])


class Progress(Callback):
    """Progress on rank 0: tqdm in a terminal, else one line every ``percent`` of the steps.

    Args:
        description: The label.
        percent: Lines per percent of the run when the output is not a terminal.
        stream: The stream (default ``sys.stderr``).
    """

    def __init__(self, description: str, percent: float = 5.0, stream: Any = None) -> None:
        self.description = description
        self.percent = percent
        self.stream = stream
        self._bar: Any = None
        self._next_line = 0

    def _out(self) -> Any:
        return sys.stderr if self.stream is None else self.stream

    def on_train_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        if loop.comm.rank != 0 or loop.steps <= loop.step:
            return
        out = self._out()
        if getattr(out, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=loop.steps, initial=loop.step, desc=self.description, leave=False, file=out
            )
        self._next_line = loop.step

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        if loop.comm.rank != 0:
            return
        loss = record.get("loss")
        K = record.get("K_tilde")
        postfix = {"loss": f"{loss:.3e}" if isinstance(loss, float) else loss}
        if isinstance(K, float):
            postfix["K"] = f"{K:.4f}"
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(postfix)
            return
        if loop.step >= self._next_line or loop.step == loop.steps:
            every = max(1, math.ceil(loop.steps * self.percent / 100))
            self._next_line = loop.step + every
            details = ", ".join(f"{k} {v}" for k, v in postfix.items())
            print(
                f"{self.description}: step {loop.step}/{loop.steps} "
                f"({loop.elapsed:.1f} s), {details}",
                file=self._out(),
                flush=True,
            )

    def on_train_end(self, loop: TrainingLoop) -> None:  # noqa: D102
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Checkpoint(Callback):
    """Checkpoints of the whole run state, one file per rank, and resume with a fingerprint.

    Each file holds the loop's :meth:`~dolfinx_pinn.training.TrainingLoop.state_dict` (network,
    optimizer, objective, schedules, callbacks, history, random generators) and a fingerprint
    of the run (problem, network, points, coarse problem, optimizer settings, rank count).
    Files are written atomically (a temporary file, then a rename) and only while the
    :class:`DivergenceGuard` sees a healthy run. On resume the ranks compare what they found
    collectively: a missing file, files of different steps, another rank count or a setting
    that differs raise a :class:`CheckpointMismatch` naming it, on every rank (never a hang).

    Args:
        folder: The checkpoint folder (created on rank 0).
        every: Steps between checkpoints (None: only on a signal).
        resume: Continue from the folder's checkpoint.
    """

    def __init__(
        self, folder: str | os.PathLike, every: int | None = None, resume: bool = False
    ) -> None:
        if every is not None:
            _check_int("checkpoint_every", every, 1)
        self.folder = Path(folder)
        self.every = every
        self.resume = bool(resume)
        self.last_path: Path | None = None

    def path(self, comm: MPI.Comm) -> Path:
        """This rank's file."""
        return self.folder / f"checkpoint.rank{comm.rank}.pt"

    def save(self, loop: TrainingLoop) -> Path | None:
        """Write this rank's file now (collective); None while the run looks diverging."""
        guard = loop.find(DivergenceGuard)
        if guard is not None and not guard.healthy:
            return None
        comm = loop.comm
        if comm.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        comm.barrier()
        path = self.path(comm)
        temporary = path.with_suffix(".tmp")
        state = {"fingerprint": loop.fingerprint(), "n_ranks": comm.size, **loop.state_dict()}
        torch.save(state, temporary)
        os.replace(temporary, path)
        comm.barrier()
        self.last_path = loop.last_checkpoint = path
        return path

    def load(self, loop: TrainingLoop) -> None:
        """Resume from the folder (collective); raises :class:`CheckpointMismatch`."""
        comm = loop.comm
        path = self.path(comm)
        found = comm.allgather(path.is_file())
        if not all(found):
            others = sorted(self.folder.glob("checkpoint.rank*.pt")) if self.folder.is_dir() else []
            hint = f" (the folder holds {len(others)} rank file(s))" if others else ""
            missing = [rank for rank, ok in enumerate(found) if not ok]
            raise CheckpointMismatch(
                f"resume: no checkpoint {self.folder}/checkpoint.rank<r>.pt for rank(s) "
                f"{missing} of {comm.size}{hint}"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            problem = None
        except Exception as error:
            state, problem = None, f"{path} is not readable ({type(error).__name__}: {error})"
        problems = comm.allgather(problem)
        if any(problems):
            raise CheckpointMismatch(f"resume: {next(p for p in problems if p)}")
        assert state is not None
        steps = comm.allgather(int(state["step"]))
        if len(set(steps)) > 1:
            raise CheckpointMismatch(
                f"resume: the rank files of {self.folder} hold different steps {steps}; "
                "delete the folder or resume from a consistent copy"
            )
        if state["n_ranks"] != comm.size:
            raise CheckpointMismatch(
                f"resume: the checkpoint was written on {state['n_ranks']} rank(s), this run has "
                f"{comm.size}; resume with mpirun -n {state['n_ranks']}"
            )
        difference = _first_difference(state["fingerprint"], loop.fingerprint())
        differences = comm.allgather(difference)
        if any(differences):
            raise CheckpointMismatch(f"resume: {next(d for d in differences if d)}")
        loop.load_state_dict(state)
        self.last_path = loop.last_checkpoint = path

    def on_train_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        if self.resume:
            self.load(loop)

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        if self.every and loop.step % self.every == 0:
            self.save(loop)


class SignalHandler(Callback):
    """SIGINT/SIGTERM: finish the step, save a checkpoint, stop every rank.

    The first signal sets a flag that the ranks agree on after the step; the loop then writes a
    checkpoint (with a :class:`Checkpoint` callback) and raises :class:`TrainingInterrupted`. A
    second signal raises at once, inside a long step. Handlers are installed for the run only
    (and not at all outside the main thread).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise TrainingInterrupted(
                f"training interrupted at once by a second {signal.Signals(signum).name}", signum
            )
        self.received = signum

    def on_train_begin(self, loop: TrainingLoop) -> None:  # noqa: D102
        self.received = None
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self._previous.clear()

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        local = 0 if self.received is None else int(self.received)
        signum = loop.comm.allreduce(local, MPI.MAX) if loop.comm.size > 1 else local
        if not signum:
            return
        checkpoint = loop.find(Checkpoint)
        if checkpoint is not None:
            checkpoint.save(loop)
        raise TrainingInterrupted(
            f"training interrupted by {signal.Signals(signum).name} after step {loop.step}; "
            f"{loop.checkpoint_note()}",
            signum,
        )

    def on_train_end(self, loop: TrainingLoop) -> None:  # noqa: D102
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class FunctionCallback(Callback):
    """Calls ``function(step, record)`` after every step.

    Args:
        function: The callable.
    """

    def __init__(self, function: Callable[[int, dict[str, Any]], None]) -> None:
        if not callable(function):
            raise ValueError(f"callback must be callable, got {function!r}")
        self.function = function

    def on_step_end(self, loop: TrainingLoop, record: dict[str, Any]) -> None:  # noqa: D102
        self.function(loop.step, record)


# -- helpers -----------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _first_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The first setting in which two fingerprints differ, as a sentence (None if equal)."""
    old, new = _flatten(saved), _flatten(current)
    # In the order of the fingerprint (the problem first, the point checksum last).
    for key in [*new, *(key for key in old if key not in new)]:
        if old.get(key) != new.get(key):
            return (
                f"the checkpoint was written with {key} = {old.get(key)!r}, this run has "
                f"{new.get(key)!r}; start a new run folder or restore the setting"
            )
    return None


def fingerprint_digest(values: Any) -> str:
    """A short hash of JSON-able data (e.g. the coordinates' checksum) for a fingerprint."""
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def random_state() -> dict[str, Any]:
    """The states of torch's, numpy's and Python's global generators (and CUDA's)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002  (the global state is saved)
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_random_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`random_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
