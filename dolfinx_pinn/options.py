"""The settings of a run, one dataclass per concern, each default written once.

The command line's TOML sections are these dataclasses (``[problem]`` is
:class:`ProblemOptions`, ``[optimizer]`` :class:`OptimizerOptions`, ...; the schema of
:mod:`dolfinx_pinn.cli` is generated from them), and the keyword arguments of
``HybridSolver.train`` / ``PINNSolver.train`` are validated by the same classes. Every field is
checked in ``__post_init__``: a wrong type or a value out of range raises an
:class:`OptionError` naming ``section.key`` and the allowed range. numpy integers are accepted
where an integer is expected (and stored as ``int``); booleans are not integers.

Some defaults depend on the optimizer (``None`` in the dataclass): see :func:`per_optimizer`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "OPTIMIZER_ALIASES",
    "SECTIONS",
    "CoarseOptions",
    "LossOptions",
    "NetworkOptions",
    "OptimizerOptions",
    "OptionError",
    "Options",
    "PointsOptions",
    "ProblemOptions",
    "RunOptions",
    "per_optimizer",
    "split_options",
]

#: Other names of the optimizers.
OPTIMIZER_ALIASES = {"gn": "gauss_newton", "lm": "gauss_newton"}


class OptionError(ValueError):
    """A setting out of range, naming ``section.key``."""


def option(
    default: Any,
    doc: str,
    check: Callable[[Any], bool] | None = None,
    allowed: str = "",
    choices: tuple[str, ...] | None = None,
    *,
    train: bool = False,
) -> Any:
    """A dataclass field with its documentation and its check.

    ``train=True`` marks a setting of a training run (an argument of ``train()``), the others
    are settings of the solver's construction.
    """
    if choices is not None:
        check = lambda value: value in choices  # noqa: E731
        allowed = "one of " + ", ".join(repr(c) for c in choices)
    metadata = {"doc": doc, "check": check, "allowed": allowed, "train": train}
    return field(default=default, metadata=metadata)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda value: value >= minimum


def _runtime_types(annotation: Any) -> tuple[type, ...]:
    """The isinstance types of a field annotation (``float`` admits ``int``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        parts: tuple[type, ...] = ()
        for argument in typing.get_args(annotation):
            parts += _runtime_types(argument)
        return parts
    if annotation is float:
        return (float, int)
    if annotation is type(None) or annotation is None:
        return (type(None),)
    return (annotation,)


def type_name(types_: tuple[type, ...]) -> str:
    """``"number"``, ``"integer or none"``, ...: the types in words."""
    names = {float: "number", int: "integer", str: "string", bool: "boolean", type(None): "none"}
    if float in types_:
        types_ = tuple(t for t in types_ if t is not int)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types_))


@dataclass(frozen=True)
class Options:
    """Base class: validates every field in ``__post_init__``."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            key = f"{self.section}.{item.name}"
            allowed = _runtime_types(hints[item.name])
            if isinstance(value, np.integer) and int in allowed:
                value = int(value)
                object.__setattr__(self, item.name, value)
            if isinstance(value, np.floating) and float in allowed:
                value = float(value)
                object.__setattr__(self, item.name, value)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise OptionError(
                    f"{key} must be of type {type_name(allowed)}, got {type(value).__name__} "
                    f"{value!r}"
                )
            check = item.metadata.get("check")
            if value is not None and check is not None and not check(value):
                raise OptionError(f"{key} must be {item.metadata['allowed']}, got {value!r}")

    @classmethod
    def keys(cls) -> dict[str, dataclasses.Field]:
        """The fields by name."""
        return {item.name: item for item in dataclasses.fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, tuple[type, ...]]:
        """The isinstance types of every field."""
        hints = typing.get_type_hints(cls)
        return {name: _runtime_types(hints[name]) for name in cls.keys()}

    @classmethod
    def training_keys(cls) -> list[str]:
        """The fields that are arguments of ``train()``."""
        return [name for name, item in cls.keys().items() if item.metadata.get("train")]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default of every field."""
        return {name: item.default for name, item in cls.keys().items()}

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict."""
        return dataclasses.asdict(self)


PROBLEMS = ("paper_1d", "paper_2d", "laminate_2d")
NETWORKS = ("auto", "two_scale", "ms_pinn", "mlp")
BOUNDARIES = ("transfinite", "hard", "soft")
OPTIMIZERS = ("adam", "lbfgs", "gauss_newton", "projection")
SAMPLINGS = ("stratified", "sobol")
SCHEDULES = ("constant", "continuation")
REFERENCES = ("auto", "exact", "fine", "none")
ESTIMATORS = ("mean", "linear")
FORMS = ("auto", "normal", "gram", "qr")


@dataclass(frozen=True)
class ProblemOptions(Options):
    """``[problem]``: which problem."""

    section: ClassVar[str] = "problem"
    name: str = option("paper_1d", "the problem factory", choices=PROBLEMS)
    eps: float = option(0.01, "the fine scale ε", _positive, "> 0")


@dataclass(frozen=True)
class NetworkOptions(Options):
    """``[network]``: the network and how it meets the boundary condition."""

    section: ClassVar[str] = "network"
    kind: str = option(
        "auto",
        "auto (dolfinx_pinn.solve's own choice; [points], [loss] and [optimizer] then unused), "
        "TwoScaleNet, MultiscaleFourierNet or MLP",
        choices=NETWORKS,
    )
    width: int | None = option(
        None, "neurons per hidden layer (default per kind)", _optional(_at_least(1)), ">= 1"
    )
    depth: int | None = option(
        None, "hidden layers (default per kind)", _optional(_at_least(1)), ">= 1"
    )
    k_max: int = option(14, "largest harmonic of TwoScaleNet", _at_least(0), ">= 0")
    wavevector_norm: str = option(
        "max", "TwoScaleNet: norm of k_max ('l1': axis harmonics)", choices=("max", "l1")
    )
    boundary: str = option("transfinite", "how the boundary condition is met", choices=BOUNDARIES)
    seed: int = option(0, "initialisation seed (the same on every rank)", _at_least(0), ">= 0")


@dataclass(frozen=True)
class CoarseOptions(Options):
    """``[coarse]``: the coarse problem, the coupling and the lazy coarse update."""

    section: ClassVar[str] = "coarse"
    h: float | None = option(
        None, "coarse mesh size (default 0.004 in 1D, 0.04 in 2D)", _optional(_positive), "> 0"
    )
    delta: float | None = option(
        None,
        "compression diameter δ (default: whole periods, at least h)",
        _optional(_positive),
        "> 0",
    )
    compress_state: bool = option(False, "coupling (2.16) instead of (2.10)")
    full_tensor: bool = option(
        False, "Algorithm 4.1: a d-output MLP gives the whole K̃ (mlp, soft boundary, adam)"
    )
    estimator: str = option("mean", "compression estimator", choices=ESTIMATORS)
    lazy: bool = option(True, "lazy coarse update (linearised state between refreshes)")
    lazy_every: int | None = option(
        None,
        "T_K: steps between refresh checks (100 Adam, 1 otherwise)",
        _optional(_at_least(1)),
        ">= 1",
        train=True,
    )
    lazy_tol: float = option(
        1e-2, "refresh when |K̃ - K̃₀| exceeds this", _non_negative, ">= 0", train=True
    )


@dataclass(frozen=True)
class PointsOptions(Options):
    """``[points]``: the collocation points."""

    section: ClassVar[str] = "points"
    n_interior: int = option(2000, "interior collocation points M_Ω", _at_least(1), ">= 1")
    n_boundary: int | None = option(
        None, "boundary points (soft BC, d > 1)", _optional(_at_least(1)), ">= 1"
    )
    sampling: str = option(
        "stratified", "interior points: random per coarse cell, or Sobol'", choices=SAMPLINGS
    )


@dataclass(frozen=True)
class LossOptions(Options):
    """``[loss]``: the weights of the loss terms and the τ2 schedule."""

    section: ClassVar[str] = "loss"
    tau1: float = option(1.0, "boundary penalty τ1", _positive, "> 0")
    tau2: float = option(1.0, "coupling weight τ2 (initial value)", _non_negative, ">= 0")
    tau2_schedule: str = option("constant", "τ2 schedule", choices=SCHEDULES, train=True)
    tau2_decay: float = option(
        0.1, "continuation factor", lambda v: 0 < v < 1, "in (0, 1)", train=True
    )
    tau2_decay_steps: int | None = option(
        None,
        "steps per factor (500 Adam, 1 otherwise)",
        _optional(_at_least(1)),
        ">= 1",
        train=True,
    )
    tau2_min: float = option(1e-8, "τ2 below this becomes 0", _non_negative, ">= 0", train=True)


@dataclass(frozen=True)
class OptimizerOptions(Options):
    """``[optimizer]``: the optimizer and its settings."""

    section: ClassVar[str] = "optimizer"
    name: str = option("adam", "the optimizer", choices=OPTIMIZERS)
    steps: int = option(1000, "iterations", _at_least(0), ">= 0")
    lr: float = option(5e-4, "Adam: initial learning rate", _positive, "> 0", train=True)
    decay_rate: float = option(
        0.75, "Adam: lr factor per decay_steps", lambda v: 0 < v <= 1, "in (0, 1]", train=True
    )
    decay_steps: int = option(1000, "Adam: steps per lr decay", _at_least(1), ">= 1", train=True)
    balancing: bool = option(True, "Adam: gradient-norm loss balancing", train=True)
    balance_every: int = option(
        100, "Adam: steps per balancing update", _at_least(1), ">= 1", train=True
    )
    balance_alpha: float = option(
        0.9,
        "Adam: balancing moving-average factor",
        lambda v: 0 <= v < 1,
        "in [0, 1, train=True)",
        train=True,
    )
    damping: float = option(1e-3, "Gauss-Newton: initial damping", _positive, "> 0", train=True)
    form: str = option(
        "auto",
        "Gauss-Newton/projection: linear algebra form (auto: QR, rows gathered under MPI; "
        "normal: normal equations summed over ranks)",
        choices=FORMS,
        train=True,
    )
    variable_projection: bool = option(True, "Gauss-Newton: re-solve the output layer", train=True)
    time_limit: float | None = option(
        None, "stop after this many seconds", _optional(_positive), "> 0", train=True
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", OPTIMIZER_ALIASES.get(self.name, self.name))
        super().__post_init__()


@dataclass(frozen=True)
class RunOptions(Options):
    """``[run]``: device, reference, evaluation, checkpoints and outputs."""

    section: ClassVar[str] = "run"
    output: str = option("out_dolfinx_pinn", "the run folder")
    device: str = option(
        "cpu",
        "'cpu', 'cuda' (GPU rank mod n) or 'auto'",
        lambda v: v in ("cpu", "cuda", "auto") or v.startswith("cuda:"),
        "'cpu', 'cuda', 'cuda:k' or 'auto'",
    )
    seed: int = option(0, "seed of the collocation points", _at_least(0), ">= 0")
    reference: str = option(
        "auto",
        "exact (1D), fine FEM solve, none; auto: exact in 1D, fine otherwise",
        choices=REFERENCES,
    )
    fine_elements_per_period: int = option(
        24, "cells per ε of the fine reference", _at_least(2), ">= 2"
    )
    fine_degree: int = option(
        1, "Lagrange degree of the fine reference", lambda v: 1 <= v <= 4, "in [1, 4]"
    )
    eval_every: int = option(
        100, "steps between error evaluations", _at_least(1), ">= 1", train=True
    )
    target_l2: float | None = option(
        None,
        "stop at this relative L² error (needs a reference)",
        _optional(_positive),
        "> 0",
        train=True,
    )
    checkpoint_every: int | None = option(
        None, "steps between checkpoints", _optional(_at_least(1)), ">= 1", train=True
    )
    resume: bool = option(False, "continue from the run folder's checkpoint", train=True)
    progress: bool = option(
        True, "progress on rank 0 (tqdm in a terminal, lines otherwise)", train=True
    )
    figures: bool = option(True, "write PNG figures")


#: The TOML sections, in order.
SECTIONS: dict[str, type[Options]] = {
    cls.section: cls
    for cls in (
        ProblemOptions,
        NetworkOptions,
        CoarseOptions,
        PointsOptions,
        LossOptions,
        OptimizerOptions,
        RunOptions,
    )
}


def per_optimizer(name: str) -> dict[str, int]:
    """The defaults that depend on the optimizer (the ``None`` fields above).

    Adam takes many small steps: τ2 decays every 500 of them and the lazy coarse update checks
    K̃ every 100 (the paper's T_K); the least-squares optimizers take few large steps, so both
    happen every step.
    """
    name = OPTIMIZER_ALIASES.get(name, name)
    if name in ("adam", "lbfgs"):
        return {"tau2_decay_steps": 500, "lazy_every": 100}
    return {"tau2_decay_steps": 1, "lazy_every": 1}


def split_options(
    options: Mapping[str, Any], *classes: type[Options]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sort keyword arguments by the dataclass that has them; returns the rest separately."""
    parts: list[dict[str, Any]] = [{} for _ in classes]
    rest = {}
    for key, value in options.items():
        for index, cls in enumerate(classes):
            if key in cls.keys() and key not in ("name", "steps"):
                parts[index][key] = value
                break
        else:
            rest[key] = value
    return parts, rest
