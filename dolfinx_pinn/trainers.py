"""From settings to a training loop: the optimizer, the schedules and the callbacks of a run.

:func:`build_training_loop` is what ``HybridSolver.train`` and ``PINNSolver.train`` call: the
keyword arguments are validated by the dataclasses of :mod:`dolfinx_pinn.options` (so each
default lives there), the optimizer is built by name (or taken as given), and the callbacks of
:mod:`dolfinx_pinn.callbacks` are put in the order the loop needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dolfinx_pinn.callbacks import (
    Callback,
    Checkpoint,
    DivergenceGuard,
    EarlyStopping,
    Evaluation,
    FunctionCallback,
    Progress,
    SignalHandler,
    Tau2Schedule,
    TimeLimit,
)
from dolfinx_pinn.objectives import GatheredObjective
from dolfinx_pinn.optim import LBFGS, Adam, GaussNewton, OutputLayerProjection
from dolfinx_pinn.options import (
    CoarseOptions,
    LossOptions,
    OptimizerOptions,
    RunOptions,
    per_optimizer,
    split_options,
)
from dolfinx_pinn.schedules import tau2_schedule
from dolfinx_pinn.training import TrainingLoop

__all__ = ["build_training_loop", "make_optimizer_for"]

# Settings of the solvers' constructors, not of a training run.
_CONSTRUCTOR_KEYS = {
    "tau1", "tau2", "h", "delta", "compress_state", "full_tensor", "estimator", "lazy",
    "output", "device", "seed", "reference", "fine_elements_per_period", "fine_degree", "figures",
    "n_interior", "n_boundary", "sampling",
}  # fmt: skip


def make_optimizer_for(
    objective: Any,
    settings: OptimizerOptions,
    extra: Mapping[str, Any],
    variable_projection: bool | None = None,
) -> Any:
    """The optimizer of ``settings.name`` on an objective (rows gathered for QR under MPI).

    Args:
        objective: A :class:`~dolfinx_pinn.objectives.PINNObjective` (or a subclass).
        settings: The validated optimizer settings.
        extra: Further keyword arguments of the optimizer's constructor (``max_rejections``,
            ``rcond``, ``ridge``, ``memory_limit``, ...); unknown ones raise a ValueError.
        variable_projection: Gauss-Newton's variable projection as the user gave it; ``None``:
            on where every block is affine in the output layer (with the lazy coarse state).
    """
    name = settings.name
    if name != "adam" and not getattr(objective, "least_squares", True):
        raise NotImplementedError(
            f"optimizer: {name!r} does not support full_tensor=True; use 'adam'"
        )
    try:
        if name == "adam":
            if extra:
                raise ValueError(f"unknown options for Adam: {sorted(extra)}")
            return Adam(
                objective,
                lr=settings.lr,
                decay_rate=settings.decay_rate,
                decay_steps=settings.decay_steps,
                balancing=settings.balancing,
                balance_every=settings.balance_every,
                balance_alpha=settings.balance_alpha,
            )
        if name == "lbfgs":
            return LBFGS(objective, **extra)
        lazy = getattr(getattr(objective, "coarse_state", None), "lazy", True)
        if name == "projection" and not lazy:
            raise ValueError(
                "optimizer: 'projection' needs lazy=True (the coupling rows are affine in the "
                "output layer only with the linearised coarse state)"
            )
        rows = objective
        if settings.form in ("auto", "qr", "gram") and hasattr(objective, "comm"):
            # All rows on every rank, in the order of their points: the serial QR least
            # squares (which keeps the accuracy the normal equations lose), the same matrix
            # whatever the number of ranks (in serial too, so that 1 and N ranks agree).
            rows = GatheredObjective(objective)
        if name == "projection":
            return OutputLayerProjection(rows, form=settings.form, **extra)
        return GaussNewton(
            rows,
            damping=settings.damping,
            form=settings.form,
            variable_projection=(
                settings.variable_projection and lazy
                if variable_projection is None
                else variable_projection
            ),
            **extra,
        )
    except TypeError as error:  # an unknown keyword argument
        raise ValueError(f"optimizer {name!r}: {error}") from None


def build_training_loop(
    objective: Any,
    optimizer: str | Any,
    steps: int,
    options: Mapping[str, Any],
    *,
    description: str,
    tau2: float | None = None,
) -> TrainingLoop:
    """A training loop for ``train(optimizer, steps, **options)`` of the solver wrappers.

    Args:
        objective: The objective.
        optimizer: A name (``"adam"``, ``"lbfgs"``, ``"gauss_newton"``/``"gn"``,
            ``"projection"``) or an optimizer object (with ``step``/``state_dict``/``settings``).
        steps: The total number of steps, >= 0.
        options: The keyword arguments of ``train`` (see the fields of
            :class:`~dolfinx_pinn.options.OptimizerOptions`, ``LossOptions`` (τ2 schedule),
            ``CoarseOptions`` (lazy update) and ``RunOptions`` (evaluation, target, checkpoints,
            progress), plus ``checkpoint_dir``, ``resume`` (True or a folder), ``callback``
            and further optimizer arguments).
        description: The progress label.
        tau2: The objective's initial τ2 (hybrid objectives only).

    Raises:
        ValueError: naming the option that is unknown or out of range.
    """
    options = dict(options)
    callback = options.pop("callback", None)
    checkpoint_dir = options.pop("checkpoint_dir", None)
    resume = options.pop("resume", None)
    misplaced = sorted(_CONSTRUCTOR_KEYS & set(options))
    if misplaced:
        raise ValueError(f"train: {misplaced} are settings of the solver's constructor")
    (opt_kw, loss_kw, coarse_kw, run_kw), extra = split_options(
        options, OptimizerOptions, LossOptions, CoarseOptions, RunOptions
    )
    name = optimizer if isinstance(optimizer, str) else "adam"
    settings = OptimizerOptions(name=name, steps=steps, **opt_kw)
    run = RunOptions(**run_kw)
    if isinstance(optimizer, str):
        built = make_optimizer_for(objective, settings, extra, opt_kw.get("variable_projection"))
    else:
        if extra or opt_kw:
            raise ValueError(f"options {sorted({**extra, **opt_kw})} need an optimizer by name")
        built = optimizer
    callbacks: list[Callback] = []
    if tau2 is not None:
        callbacks.append(_tau2_and_lazy_update(objective, settings.name, tau2, loss_kw, coarse_kw))
    elif loss_kw or coarse_kw:
        raise ValueError(f"options {sorted({**loss_kw, **coarse_kw})} need the hybrid solver")
    errors = objective.errors if objective.has_reference else None
    evaluation = Evaluation(errors, run.eval_every)
    problem = objective.problem
    bounds = (problem.alpha, problem.beta) if tau2 is not None else None
    callbacks += [evaluation, EarlyStopping(evaluation, run.target_l2), DivergenceGuard(bounds)]
    if callback is not None:
        callbacks.append(FunctionCallback(callback))
    if settings.time_limit is not None:
        callbacks.append(TimeLimit(settings.time_limit))
    if run.progress:
        callbacks.append(Progress(description))
    folder = _checkpoint_folder(checkpoint_dir, resume, run)
    if folder is not None:
        callbacks.append(Checkpoint(folder, run.checkpoint_every, resume=bool(resume)))
    callbacks.append(SignalHandler())
    loop = TrainingLoop(objective, built, callbacks)
    loop.history["optimizer"] = name if isinstance(optimizer, str) else type(optimizer).__name__
    return loop


def _tau2_and_lazy_update(
    objective: Any,
    optimizer: str,
    tau2: float,
    loss_kw: Mapping[str, Any],
    coarse_kw: Mapping[str, Any],
) -> Tau2Schedule:
    """Configure the hybrid objective's lazy update; its τ2 schedule as a callback."""
    defaults = per_optimizer(optimizer)
    loss = LossOptions(tau2=tau2, **loss_kw)
    coarse = CoarseOptions(**coarse_kw)
    objective.coarse_state.configure(coarse.lazy_every or defaults["lazy_every"], coarse.lazy_tol)
    decay_steps = loss.tau2_decay_steps or defaults["tau2_decay_steps"]
    schedule = tau2_schedule(loss.tau2_schedule, tau2, loss.tau2_decay, decay_steps, loss.tau2_min)
    return Tau2Schedule(schedule)


def _checkpoint_folder(
    checkpoint_dir: str | os.PathLike | None, resume: Any, run: RunOptions
) -> Path | None:
    if run.checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_dir: needed with checkpoint_every")
    if resume is True or resume is False or resume is None:
        folder = None if checkpoint_dir is None else Path(checkpoint_dir)
        if resume and folder is None:
            raise ValueError("resume: True needs checkpoint_dir (or give the folder as resume=)")
    else:
        folder = Path(resume)
    if resume and not folder.is_dir():
        raise ValueError(f"resume: no checkpoint folder {folder}")
    return folder
