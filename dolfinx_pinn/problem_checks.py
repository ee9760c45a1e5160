"""The construction-time checks of a multiscale problem: its arguments and its definitions.

A mistake in a problem's definition otherwise surfaces much later, far from its cause: a
``np.sin`` or a Python ``if`` on the coordinates fails inside autograd or form compilation,
``x[1]`` in 1D fails in an unrelated backend, the period of x given instead of the period of
y = x/ε gives a wrong cell problem without a word, and a coefficient that dips below zero between
grid points breaks the ellipticity every solver relies on. :class:`MultiscaleProblem
<dolfinx_pinn.problems.MultiscaleProblem>` therefore runs the checks of this module once, when it
is built, and names the definition, the point and the fix. They live here, apart from the
problem, because they are long (sampling, zooming into extremes, period suggestions) and are not
part of what a problem *is*: :mod:`~dolfinx_pinn.problems` keeps the definitions and their
evaluation.

What is checked, in the order of the construction:

* the arguments (:func:`as_int`, :func:`as_real`, :func:`as_positive`, :func:`real_sequence`,
  :func:`as_period`, :func:`as_effective_tensor`, :func:`as_bounds`), each error naming the
  argument and the allowed range;
* :func:`check_definitions`: each definition evaluated once through numpy, torch (with autograd)
  and UFL, so that a numpy/math call, a Python ``if`` or a coordinate beyond the dimension
  (:class:`Coordinates`) is named at once;
* :func:`check_period`: ``K(x + ε p_j e_j) = K(x)`` for the declared period vector, suggesting
  one that passes where the check fails;
* :func:`coefficient_bounds`: K finite, symmetric and positive on a sample whose size does not
  grow with 1/ε (a domain grid, random points, dense period cells and zoom grids around the
  extremes found), within the given bounds, which it returns or estimates; q and l finite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import basix.ufl
import numpy as np
import numpy.typing as npt
import torch
import ufl

if TYPE_CHECKING:
    from dolfinx_pinn.problems import Box, MultiscaleProblem, _Definition

__all__ = [
    "CoordinateIndexError",
    "Coordinates",
    "StructureError",
    "as_bounds",
    "as_effective_tensor",
    "as_int",
    "as_period",
    "as_positive",
    "as_real",
    "check_definitions",
    "check_period",
    "coefficient_bounds",
    "coordinate_components",
    "real_sequence",
]


# -- arguments ---------------------------------------------------------------------------------
def as_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """An integer argument, checked against ``[low, high]``.

    Numpy integers (``np.int64(3)`` from an array or a config) are integers too; a bool is not,
    although Python counts it as one, because ``True`` where a count is meant is a mistake.

    Args:
        value: The argument.
        name: Its name, for the message.
        low: The smallest allowed value.
        high: The largest allowed value (``None``: no upper limit).

    Returns:
        The value as an ``int``.

    Raises:
        ValueError: naming the argument and the allowed range.
    """
    allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    if not (low <= int(value) and (high is None or int(value) <= high)):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


def as_real(value: Any, name: str, requirement: str = "a finite number") -> float:
    """A real-number argument as a float (numpy scalars included; bools and strings rejected).

    Args:
        value: The argument.
        name: Its name, for the message.
        requirement: What it must be, for the message.

    Returns:
        The value as a finite ``float``.

    Raises:
        ValueError: naming the argument, when it is not a finite real number.
    """
    if not isinstance(value, (bool, np.bool_, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(number):
                return number
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def as_positive(value: Any, name: str, requirement: str = "a finite number > 0") -> float:
    """A positive real-number argument (``eps``, ``finest_scale``, ``alpha``) as a float.

    Args:
        value: The argument.
        name: Its name, for the message.
        requirement: What it must be, for the message.

    Returns:
        The value as a finite ``float`` > 0.

    Raises:
        ValueError: naming the argument, when it is not a finite real number > 0.
    """
    number = as_real(value, name, requirement)
    if not number > 0:
        raise ValueError(f"{name} must be {requirement}, got {number}")
    return number


def real_sequence(values: Any, name: str) -> tuple[float, ...]:
    """A sequence of finite real numbers (a factory's amplitudes or frequencies) as floats.

    Args:
        values: The argument.
        name: Its name, for the message.

    Returns:
        The entries as floats.

    Raises:
        ValueError: naming the argument, when it is not a sequence of finite numbers.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a sequence of finite numbers, got {values!r}")
    return tuple(as_real(v, f"{name} entries") for v in values)


def as_period(period: Any, dim: int) -> tuple[float, ...] | None:
    """The period vector of the fast variable y = x/ε as floats, or ``None`` (not periodic).

    Args:
        period: The argument: ``None`` or one number > 0 per dimension.
        dim: The spatial dimension.

    Returns:
        The period as a tuple of floats, or ``None``.

    Raises:
        ValueError: when it is not ``None`` nor ``dim`` finite numbers > 0.
    """
    if period is None:
        return None
    if isinstance(period, (str, bytes)) or not isinstance(period, (Sequence, np.ndarray)):
        raise ValueError(
            f"period must be a sequence of {dim} numbers > 0 (the period vector of "
            f"y = x/eps) or None, got {period!r}"
        )
    period = tuple(as_real(p, "period entries", "finite and > 0") for p in period)
    if len(period) != dim:
        raise ValueError(f"period must have one entry per dimension ({dim}), got {len(period)}")
    if not all(p > 0 for p in period):
        raise ValueError(f"period entries must be finite and > 0, got {period}")
    return period


def as_effective_tensor(value: npt.ArrayLike | None, dim: int) -> np.ndarray | None:
    """A known homogenised tensor ``K*`` as a finite ``(dim, dim)`` float array, or ``None``.

    Args:
        value: The argument (a number in 1D, or a nested sequence or array).
        dim: The spatial dimension.

    Returns:
        The tensor, or ``None``.

    Raises:
        ValueError: when it is not a finite ``dim x dim`` array of numbers.
    """
    if value is None:
        return None
    try:
        tensor = np.atleast_2d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(
            f"effective_tensor must be a {dim}x{dim} array of numbers, got {value!r}"
        ) from None
    if tensor.shape != (dim, dim) or not np.all(np.isfinite(tensor)):
        raise ValueError(
            f"effective_tensor must be a finite {dim}x{dim} array, got shape {tensor.shape}"
        )
    return tensor


def as_bounds(alpha: Any, beta: Any) -> tuple[float | None, float | None]:
    """The given bounds ``alpha <= K <= beta`` as floats (``None`` where to be estimated).

    Args:
        alpha: The lower bound of K, or ``None``.
        beta: The upper bound of K, or ``None``.

    Returns:
        ``(alpha, beta)``, each a float > 0 or ``None``.

    Raises:
        ValueError: when a bound is not a finite number > 0, or ``alpha > beta``.
    """
    low = None if alpha is None else as_positive(alpha, "alpha")
    high = None if beta is None else as_positive(beta, "beta")
    if low is not None and high is not None and low > high:
        raise ValueError(f"alpha must not exceed beta, got alpha={low}, beta={high}")
    return low, high


# -- coordinates and messages ------------------------------------------------------------------
def _coordinate_names(dim: int) -> str:
    names = [f"x[{j}]" for j in range(dim)]
    return names[0] if dim == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class CoordinateIndexError(IndexError):
    """``x[j]`` with ``j`` outside the problem's dimension, with the index kept for the message.

    Args:
        index: The index used.
        dim: The problem's dimension.
    """

    def __init__(self, index: int, dim: int) -> None:
        super().__init__(
            f"x[{index}] is out of range: the problem is {dim}D (use {_coordinate_names(dim)})"
        )
        self.index = index


class Coordinates(tuple):  # type: ignore[type-arg]
    """The coordinate components ``x[0], ..., x[d-1]`` passed to a definition.

    A plain tuple, except that an index beyond the dimension (``x[1]`` in 1D) raises an
    IndexError that keeps the index, so that the construction can name it.
    """

    __slots__ = ()

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)) and not -len(self) <= index < len(self):
            raise CoordinateIndexError(int(index), len(self))
        return super().__getitem__(index)


def coordinate_components(points: np.ndarray | torch.Tensor, dim: int) -> Coordinates:
    """The columns of points ``(N, dim)`` (numpy or torch) as :class:`Coordinates`.

    Args:
        points: The points, numpy or torch.
        dim: The problem's dimension.

    Returns:
        The coordinate components ``x[0], ..., x[dim-1]``, each ``(N,)``.

    Raises:
        ValueError: when the points do not have shape ``(N, dim)``.
    """
    if points.ndim != 2 or points.shape[1] != dim:
        raise ValueError(f"points must have shape (N, {dim}), got {tuple(points.shape)}")
    return Coordinates(points[:, j] for j in range(dim))


class StructureError(ValueError):
    """A definition returned a nested list that is not a ``d x d`` tensor."""


def _format_point(point: npt.ArrayLike) -> str:
    """A point as ``(0.3003,)`` or ``(0.25, 0.5)`` for messages."""
    entries = [f"{float(c):.6g}" for c in np.atleast_1d(np.asarray(point, dtype=np.float64))]
    return "(" + ", ".join(entries) + ("," if len(entries) == 1 else "") + ")"


def _format_period(period: Sequence[float]) -> str:
    """A period tuple as the user would type it: ``(1.0,)`` or ``(2.0, 1.0)``."""
    entries = []
    for value in period:
        text = f"{value:.12g}"
        entries.append(text if any(c in text for c in ".en") else text + ".0")
    return "(" + ", ".join(entries) + ("," if len(entries) == 1 else "") + ")"


def _brief(error: BaseException) -> str:
    """The first line of an error, shortened, to append to a clearer message."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- probing the definitions through numpy, torch and UFL --------------------------------------
_SYMBOLS = {"coefficient": "K", "source": "q", "distance": "l"}
_NAMESPACE_HINT = (
    "write it with the math namespace m (m.sin, m.exp, m.sqrt, ..., and m.where(condition, a, b) "
    "for a branch) instead of numpy or math functions or a Python if on the coordinates"
)
_BACKENDS = (
    ("numpy", "numpy arrays"),
    ("torch", "torch tensors that require grad"),
    ("ufl", "UFL coordinates"),
)


@lru_cache(maxsize=3)
def _ufl_probe_coordinate(dim: int) -> Any:
    """A UFL SpatialCoordinate of an abstract P1 mesh: a UFL probe without a dolfinx mesh or MPI."""
    cell = ("interval", "triangle", "tetrahedron")[dim - 1]
    return ufl.SpatialCoordinate(ufl.Mesh(basix.ufl.element("Lagrange", cell, 1, shape=(dim,))))


def _probe_points(domain: Box) -> np.ndarray:
    """Five distinct interior points of ``domain`` (``(5, d)``), each coordinate different.

    More than one point, so that ``math.sin`` or a Python ``if`` on an array or tensor fails.
    """
    fractions = np.array([0.137, 0.371, 0.529, 0.713, 0.891])
    unit = np.stack([np.roll(fractions, j) for j in range(domain.dim)], axis=1)
    return np.asarray(domain.lower) + unit * domain.lengths


def check_definitions(
    domain: Box, coefficient: _Definition, source: _Definition, distance: _Definition
) -> bool:
    """Evaluate each definition once through numpy, torch and UFL, at construction.

    A definition written with ``np.sin``/``math.sin`` or a Python ``if`` on the coordinates
    works in one backend and fails much later in another (in autograd, in form compilation),
    with a message that names neither the definition nor the fix. Probing all three here
    names it at once.

    Args:
        domain: The problem's domain, in which the definitions are probed.
        coefficient: The coefficient K, a scalar or a ``d x d`` tensor.
        source: The source q, a scalar.
        distance: The hard-boundary factor l, a scalar.

    Returns:
        Whether the coefficient is a tensor.

    Raises:
        ValueError: naming the definition: the call fails in a backend (a numpy or math
            function, a Python ``if``, a coordinate index beyond the dimension), the result is
            not of the backend's type, the torch result is detached from ``x``, or the shape is
            wrong.
    """
    points = _probe_points(domain)
    is_tensor = _probe(coefficient, "coefficient", points, allow_tensor=True)
    _probe(source, "source", points, allow_tensor=False)
    _probe(distance, "distance", points, allow_tensor=False)
    return is_tensor


def _backend_coordinates(points: np.ndarray, dim: int, backend: str) -> Coordinates:
    """The probe points as the coordinates of ``backend`` (torch: requiring grad)."""
    if backend == "numpy":
        return coordinate_components(points, dim)
    if backend == "torch":
        tensor = torch.tensor(points, dtype=torch.float64, requires_grad=True)
        return coordinate_components(tensor, dim)
    coordinate = _ufl_probe_coordinate(dim)
    return Coordinates(coordinate[j] for j in range(dim))


def _evaluate_in_backends(definition: _Definition, label: str, points: np.ndarray) -> list[Any]:
    """The definition's numpy, torch and UFL values; raise, naming ``label``, where one fails."""
    symbol, dim, function = _SYMBOLS[label], definition.dim, definition.function
    if not callable(function):
        raise ValueError(
            f"{label}: {symbol} must be a function g(x, m), got {type(function).__name__}"
        )
    results = []
    for backend, described in _BACKENDS:
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"), torch.enable_grad():
                warnings.simplefilter("ignore")
                x = _backend_coordinates(points, dim, backend)
                results.append(definition.evaluate(x, backend))
        except CoordinateIndexError as error:
            raise ValueError(
                f"{label}: uses x[{error.index}], but the problem is {dim}D (use "
                f"{_coordinate_names(dim)})"
            ) from error
        except StructureError as error:
            raise ValueError(f"{label}: {symbol}: {error}") from error
        except Exception as error:
            raise ValueError(
                f"{label}: {symbol}(x, m) cannot be evaluated on {described}: "
                f"{_NAMESPACE_HINT} ({_brief(error)})"
            ) from error
    return results


def _varies_smoothly(definition: _Definition, points: np.ndarray, values: np.ndarray) -> bool:
    """Whether the numpy values change under a tiny shift of the points.

    A torch result without a graph is right for a constant or a piecewise constant
    definition (``m.where(x[0] > 0.5, 1.0, 2.0)`` has zero derivative), and wrong where the
    definition varies continuously (the graph was cut, e.g. through ``.detach().numpy()``).
    """
    shift = 1e-7 * np.maximum(np.abs(points), 1.0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        moved = definition.evaluate(coordinate_components(points + shift, definition.dim), "numpy")
    changed = np.abs(moved - values).reshape(len(points), -1).max(axis=1) > 0
    # A jump of a piecewise constant definition lies within the shift at one point at most.
    return int(np.count_nonzero(changed)) > len(points) // 2


def _probe(definition: _Definition, label: str, points: np.ndarray, allow_tensor: bool) -> bool:
    """Probe one definition (see :func:`check_definitions`); return whether it is a tensor.

    Args:
        definition: The definition.
        label: ``"coefficient"``, ``"source"`` or ``"distance"``, for the messages.
        points: A few distinct points ``(N, d)``, ``N >= 2``.
        allow_tensor: Whether a ``d x d`` nested list is allowed (the coefficient only).
    """
    symbol, dim = _SYMBOLS[label], definition.dim
    numpy_value, torch_value, ufl_value = _evaluate_in_backends(definition, label, points)
    tensor = numpy_value.ndim == 3
    shape = (len(points), dim, dim) if tensor else (len(points),)
    if numpy_value.shape != shape:
        raise ValueError(
            f"{label}: {symbol} on {len(points)} points must have shape {shape}, got "
            f"{numpy_value.shape}"
        )
    if tensor and not allow_tensor:
        raise ValueError(f"{label}: {symbol} must be a scalar expression, got a nested list")
    if not isinstance(torch_value, torch.Tensor) or tuple(torch_value.shape) != shape:
        raise ValueError(
            f"{label}: {symbol} on torch tensors must give a torch tensor of shape {shape}, "
            f"got {type(torch_value).__name__} {getattr(torch_value, 'shape', '')}: "
            f"{_NAMESPACE_HINT}"
        )
    if not torch_value.requires_grad and _varies_smoothly(definition, points, numpy_value):
        raise ValueError(
            f"{label}: {symbol} on torch tensors is not connected to the autograd graph of x "
            f"(was x converted to numpy or to a float?): {_NAMESPACE_HINT}"
        )
    ufl_shape = (dim, dim) if tensor else ()
    if not isinstance(ufl_value, ufl.core.expr.Expr) or ufl_value.ufl_shape != ufl_shape:
        raise ValueError(
            f"{label}: {symbol} on UFL coordinates must give a UFL expression of shape "
            f"{ufl_shape}, got {type(ufl_value).__name__}: {_NAMESPACE_HINT}"
        )
    return tensor


# -- the period ----------------------------------------------------------------------------------
def check_period(problem: MultiscaleProblem) -> None:
    """Check that K(x + ε p_j e_j) = K(x) for the declared period vector ``p``.

    A wrong period (the common mistake: ``period=(eps,)``, the period in x instead of in
    y = x/ε) otherwise gives a wrong cell problem and wrong harmonics without a word. The
    message suggests a period that passes the same check where one is found among p/ε, 1,
    2π and p and their small rational multiples.

    Args:
        problem: The problem, its definitions already probed (:func:`check_definitions`).

    Raises:
        ValueError: naming the direction, the deviation found and a suggestion.
    """
    if problem.period is None:
        return
    unit = np.random.default_rng(20240607).random((256, problem.dim))
    lower, lengths = np.asarray(problem.domain.lower), problem.domain.lengths
    gradient = _gradient_scale(problem, lower + unit * lengths)
    failures = []
    for axis in range(problem.dim):
        found = _period_deviation(problem, axis, problem.period[axis], unit, gradient)
        if found is not None and found[0] > found[1]:
            failures.append((axis, found))
    if not failures:
        return
    suggestion: list[float] | None = list(problem.period)
    for axis, _ in failures:
        candidate = _suggest_period(problem, axis, unit, gradient)
        if candidate is None or suggestion is None:
            suggestion = None
        else:
            suggestion[axis] = candidate
    raise ValueError(_period_message(problem.eps, problem.period, failures, suggestion))


def _period_message(
    eps: float,
    period: tuple[float, ...],
    failures: list[tuple[int, tuple[float, float, np.ndarray]]],
    suggestion: list[float] | None,
) -> str:
    """The message of :func:`check_period`: the first failing direction and the suggestion."""
    axis, (difference, tolerance, where) = failures[0]
    j = axis + 1
    message = (
        f"coefficient: K is not periodic with period ε·p = {eps * period[axis]:.6g} "
        f"along x{j} (x[{axis}]) (max |K(x + ε p{j} e{j}) - K(x)| = {difference:.3g} at x = "
        f"{_format_point(where)}, tolerance {tolerance:.2g})"
    )
    if len(failures) > 1:
        message += ", nor along " + ", ".join(f"x{a + 1}" for a, _ in failures[1:])
    if suggestion is not None:
        message += (
            f"; did you mean period={_format_period(suggestion)}? (p is the period of the "
            "fast variable y = x/ε, not of x)"
        )
    else:
        message += (
            "; no period among p/ε, 1, 2π, p and their small multiples fits: p is the period "
            "of the fast variable y = x/ε, and a coefficient that is not periodic in y "
            "(quasi-periodic, or also varying on the slow scale) declares period=None"
        )
    return message


def _gradient_scale(problem: MultiscaleProblem, points: np.ndarray) -> float:
    """The largest |∂K/∂x| over ``points`` (0 for a constant K), for the rounding tolerance."""
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = problem.K(torch.tensor(points[:1], dtype=torch.float64, requires_grad=True))
        if not probe.requires_grad:
            return 0.0
        gradient = np.abs(problem.grad_K(points))
    finite = gradient[np.isfinite(gradient)]
    return float(finite.max()) if finite.size else 0.0


def _period_deviation(
    problem: MultiscaleProblem, axis: int, period: float, unit: np.ndarray, gradient: float
) -> tuple[float, float, np.ndarray] | None:
    """The largest |K(x + ε·period·e_axis) - K(x)| on a sample, its tolerance, and where.

    The tolerance is relative (1e-10 of max |K|) plus the rounding of the coordinates seen
    through the gradient of K (64 ulp of |x| times max |∇K|): at ε = 1e-6 the argument of
    sin(2πx/ε) is about 6e6, and its rounding alone moves K by about 1e-9.

    Returns:
        ``None`` where K is not finite on the whole sample (reported by the other checks).
    """
    shift = problem.eps * period
    lower, lengths = np.asarray(problem.domain.lower), problem.domain.lengths
    span = lengths.copy()
    span[axis] = max(lengths[axis] - shift, 0.0)
    points = lower + unit * span
    shifted = points.copy()
    shifted[:, axis] += shift
    with np.errstate(all="ignore"):
        base = problem.K(points).reshape(len(points), -1)
        moved = problem.K(shifted).reshape(len(points), -1)
    finite = np.all(np.isfinite(base) & np.isfinite(moved), axis=1)
    if not np.any(finite):
        return None
    difference = np.abs(moved - base)[finite].max(axis=1)
    scale = float(np.abs(base[finite]).max())
    reach = float(max(np.abs(points).max(), np.abs(shifted).max()))
    tolerance = 1e-10 * scale + 64.0 * np.finfo(np.float64).eps * reach * gradient
    where = int(np.argmax(difference))
    return float(difference[where]), tolerance, points[finite][where]


def _suggest_period(
    problem: MultiscaleProblem, axis: int, unit: np.ndarray, gradient: float
) -> float | None:
    """The smallest candidate period along ``axis`` that passes the check, if any."""
    declared = problem.period[axis]  # type: ignore[index]
    ratios = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0, 1.5, 2.0 / 3.0, 4.0, 0.25, 5.0, 6.0)
    candidates = {
        float(f"{base * ratio:.15g}")
        for base in (declared / problem.eps, 1.0, 2.0 * math.pi, declared)
        for ratio in ratios
    }
    for candidate in sorted(candidates):
        # A period far below 1 in y means that ε was not the fine scale: not a suggestion.
        if candidate < 1e-3 or math.isclose(candidate, declared, rel_tol=1e-9):
            continue
        found = _period_deviation(problem, axis, candidate, unit, gradient)
        if found is not None and found[0] <= found[1]:
            return candidate
    return None


# -- the sample of K: blocks, screening, zoom ----------------------------------------------------
_Block = tuple[np.ndarray, tuple[int, ...] | None, np.ndarray]
"""Sample points ``(N, d)``, their grid shape (``None`` if scattered) and spacing ``(d,)``."""
_ScreenedBlock = tuple[np.ndarray, tuple[int, ...] | None, np.ndarray, np.ndarray, np.ndarray]
"""A :data:`_Block` with the smallest and largest eigenvalue of K at each point."""

# Grid points per period direction in the cell checks, and the fractions of the free room
# (domain minus one cell) at which the cell is placed: a corner at full resolution, then the
# opposite corner, the centre and an irrational position at half resolution, so that a
# coefficient that also varies on the slow scale is seen.
_CELL_POINTS_PER_AXIS = {1: 4096, 2: 256, 3: 40}
_SLOW_POSITIONS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.618, 0.382, 0.854))
# Domain grid: points per finest scale, capped in total (lower when the cells are checked).
_DOMAIN_POINTS_PER_SCALE = 64
_DOMAIN_POINTS_CAP = 200_000
_DOMAIN_POINTS_CAP_PERIODIC = 20_000
# Zoom grids around the extremes found: points per axis, centres per kind and block, levels.
_ZOOM_POINTS_PER_AXIS = {1: 65, 2: 17, 3: 9}
_ZOOM_CENTRES = 4
_ZOOM_LEVELS = 3


def _sample_blocks(problem: MultiscaleProblem) -> list[_Block]:
    """The point sets of the coefficient checks, each ``(points, grid shape, spacing)``.

    A domain grid with 64 points per finest scale where its size allows (at most 200 000
    points, 20 000 for a periodic problem), 20 000 random points, and for a periodic problem
    a dense grid of the period cell (4096, 256² or 40³ points) at a corner of the domain and
    coarser ones at three other positions. The sizes are capped, so that neither time nor
    memory grows like 1/ε; periodicity (checked first) makes the cell grid representative of
    the whole domain however small ε is.
    """
    dim, domain, period = problem.dim, problem.domain, problem.period
    rng = np.random.default_rng(20240531)
    lower, lengths = np.asarray(domain.lower), domain.lengths
    cap = _DOMAIN_POINTS_CAP_PERIODIC if period else _DOMAIN_POINTS_CAP
    wanted = _DOMAIN_POINTS_PER_SCALE * lengths.max() / problem.finest_scale
    per_axis = int(min(max(64, wanted), cap ** (1 / dim)))
    axes = [lower[j] + lengths[j] * np.linspace(0.0, 1.0, per_axis) for j in range(dim)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, dim)
    spacing = lengths / (per_axis - 1)
    blocks: list[_Block] = [
        (grid, (per_axis,) * dim, spacing),
        (domain.sample_interior(20_000, rng), None, spacing),
    ]
    if period is not None:
        extent = np.minimum(problem.eps * np.asarray(period), lengths)
        for index, position in enumerate(_SLOW_POSITIONS):
            count = _CELL_POINTS_PER_AXIS[dim] // (1 if index == 0 else 2)
            cell_axes = [extent[j] * np.arange(count) / count for j in range(dim)]
            cell = np.stack(np.meshgrid(*cell_axes, indexing="ij"), axis=-1)
            origin = lower + np.asarray(position[:dim]) * (lengths - extent)
            blocks.append((origin + cell.reshape(-1, dim), (count,) * dim, extent / count))
    return blocks


def _coefficient_sample(problem: MultiscaleProblem, points: np.ndarray) -> np.ndarray:
    """K at ``points`` as ``(N, d, d)`` or ``(N,)``; raise, naming where, if not finite."""
    with np.errstate(all="ignore"):
        values = problem.K(points)
    finite = np.all(np.isfinite(values.reshape(len(points), -1)), axis=1)
    if not np.all(finite):
        where = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            "coefficient: K is not finite everywhere on the domain (NaN or inf: K = "
            f"{values[where].tolist()} at x = {_format_point(points[where])})"
        )
    return values


def _eigenvalue_range(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest eigenvalues of symmetric ``(N, d, d)`` matrices in closed form.

    Used to screen many points cheaply (batched ``eigvalsh`` costs about 0.5 µs per 2x2 matrix,
    a large share of the construction time); the extremes found are recomputed exactly.
    """
    d = values.shape[-1]
    if d == 1:
        return values[:, 0, 0], values[:, 0, 0]
    if d == 2:
        mean = 0.5 * (values[:, 0, 0] + values[:, 1, 1])
        radius = np.hypot(0.5 * (values[:, 0, 0] - values[:, 1, 1]), values[:, 0, 1])
        return mean - radius, mean + radius
    # Symmetric 3x3: the trigonometric solution of the characteristic cubic.
    a, b, c = values[:, 0, 0], values[:, 1, 1], values[:, 2, 2]
    u, v, w = values[:, 0, 1], values[:, 0, 2], values[:, 1, 2]
    q = (a + b + c) / 3.0
    p = np.sqrt(((a - q) ** 2 + (b - q) ** 2 + (c - q) ** 2 + 2.0 * (u**2 + v**2 + w**2)) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    # det((K - qI) / p) written out (batched np.linalg.det is an LU per matrix: 5x slower).
    a, b, c, u, v, w = ((t - s) / safe for t, s in ((a, q), (b, q), (c, q), (u, 0), (v, 0), (w, 0)))
    determinant = a * (b * c - w * w) - u * (u * c - w * v) + v * (u * w - b * v)
    r = np.clip(determinant / 2.0, -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    highest = q + 2.0 * p * np.cos(phi)
    lowest = q + 2.0 * p * np.cos(phi + 2.0 * math.pi / 3.0)
    return lowest, highest


def _extreme_range(values: np.ndarray, is_tensor: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per point the smallest and largest eigenvalue of K (K itself for a scalar)."""
    return _eigenvalue_range(values) if is_tensor else (values, values)


def _extreme_indices(values: np.ndarray, shape: tuple[int, ...] | None, count: int) -> np.ndarray:
    """Indices of local minima of ``values`` (on a grid of ``shape``) worth zooming into.

    The ``count`` smallest local minima, and the ``count`` sharpest ones (the largest mean
    rise to the grid neighbours): a narrow dip between grid points stays above the minimum
    of the rest (a trough that is flat along one direction has as many local minima as grid
    points along it), but it is the sharpest dip of the grid.
    """
    if shape is None:
        count = min(count, len(values))
        return np.argpartition(values, count - 1)[:count]
    grid = values.reshape(shape)
    local = np.ones(shape, dtype=bool)
    rise = np.zeros(shape)
    for axis in range(len(shape)):
        if shape[axis] > 1:
            for step in (1, -1):
                neighbour = np.roll(grid, step, axis=axis)
                local &= grid <= neighbour
                rise += neighbour - grid
    candidates = np.flatnonzero(local.reshape(-1))
    if len(candidates) <= 2 * count:
        return candidates
    lowest = candidates[np.argpartition(values[candidates], count - 1)[:count]]
    sharpness = -rise.reshape(-1)[candidates]
    sharpest = candidates[np.argpartition(sharpness, count - 1)[:count]]
    return np.unique(np.concatenate([lowest, sharpest]))


def _zoom(
    problem: MultiscaleProblem, blocks: list[_ScreenedBlock]
) -> tuple[np.ndarray, np.ndarray]:
    """Points and values of K on zoom grids around the lowest and highest values found.

    Each level zooms into the local extremes of the previous one with a grid ``(r - 1) / 2``
    times finer: a dip (or peak) of K seen between two points of a grid is resolved to about
    1/32 000 of its spacing in 1D, 1/500 in 2D and 1/64 in 3D.
    """
    dim = problem.dim
    lower, upper = np.asarray(problem.domain.lower), np.asarray(problem.domain.upper)
    r = _ZOOM_POINTS_PER_AXIS[dim]
    unit = np.linspace(-1.0, 1.0, r)
    offsets = np.stack(np.meshgrid(*([unit] * dim), indexing="ij"), axis=-1)
    offsets = offsets.reshape(-1, dim)
    all_points, all_values = [], []
    for _ in range(_ZOOM_LEVELS):
        centres, spacings = [], []
        for points, shape, spacing, low, high in blocks:
            for sign, values in ((1.0, low), (-1.0, high)):
                chosen = _extreme_indices(sign * values, shape, _ZOOM_CENTRES)
                centres.append(points[chosen])
                per_point = spacing[chosen] if spacing.ndim == 2 else spacing
                spacings.append(np.broadcast_to(per_point, (len(chosen), dim)))
        centre, step = np.concatenate(centres), np.concatenate(spacings)
        zoomed = centre[:, None, :] + offsets[None, :, :] * step[:, None, :]
        zoomed = np.clip(zoomed.reshape(-1, dim), lower, upper)
        values = _coefficient_sample(problem, zoomed)
        low, high = _extreme_range(values, problem.is_tensor)
        all_points.append(zoomed)
        all_values.append(values)
        # The next level zooms with each point's own, finer spacing.
        step = np.repeat(step * 2.0 / (r - 1), len(offsets), axis=0)
        blocks = [(zoomed, None, step, low, high)]
    return np.concatenate(all_points), np.concatenate(all_values)


def _exact_extreme(
    values: np.ndarray, screened: np.ndarray, points: np.ndarray, smallest: bool, is_tensor: bool
) -> tuple[float, str]:
    """The exact extreme eigenvalue of K among the best screened points, and where it is."""
    if not is_tensor:
        where = int(np.argmin(screened) if smallest else np.argmax(screened))
        return float(screened[where]), _format_point(points[where])
    count = min(64, len(screened))
    order = np.argpartition(screened if smallest else -screened, count - 1)[:count]
    eigenvalues = np.linalg.eigvalsh(values[order])
    exact = eigenvalues[:, 0] if smallest else eigenvalues[:, -1]
    best = int(np.argmin(exact) if smallest else np.argmax(exact))
    return float(exact[best]), _format_point(points[order[best]])


# -- the bounds ----------------------------------------------------------------------------------
def coefficient_bounds(
    problem: MultiscaleProblem, alpha: float | None, beta: float | None
) -> tuple[float, float]:
    """Check K (finite, symmetric, elliptic, in [α, β]), q and l on a sample; get α, β.

    The sample (see :func:`_sample_blocks`) is screened with closed-form eigenvalues and zoomed
    into around the extremes found, so that a narrow spike of K between grid points is not
    missed; the extremes are recomputed exactly. q and l need not be periodic: they are checked
    on the domain grid and the random points, not on the cells.

    Args:
        problem: The problem, its period already checked (:func:`check_period`).
        alpha: The given lower bound of K (of its smallest eigenvalue), as from
            :func:`as_bounds`, or ``None`` to estimate it.
        beta: The given upper bound of K (of its largest eigenvalue), or ``None``.

    Returns:
        ``(alpha, beta)``: the given bounds, or the extremes of K on the sample where omitted.

    Raises:
        ValueError: naming what is wrong and where.
    """
    blocks = _sample_blocks(problem)
    points, values, low, high = _screen(problem, blocks)
    tensor = problem.is_tensor
    lowest, lowest_at = _exact_extreme(values, low, points, smallest=True, is_tensor=tensor)
    highest, highest_at = _exact_extreme(values, high, points, smallest=False, is_tensor=tensor)
    what = "its smallest eigenvalue is" if tensor else "K ="
    if lowest <= 0.0:
        raise ValueError(
            f"coefficient: K must be positive (uniformly elliptic), but {what} {lowest:.6g} "
            f"at x = {lowest_at}"
        )
    if alpha is not None and lowest < alpha * (1 - 1e-12):
        raise ValueError(
            f"coefficient: K >= alpha = {alpha} violated, min K = {lowest:.6g} at x = {lowest_at}"
        )
    if beta is not None and highest > beta * (1 + 1e-12):
        raise ValueError(
            f"coefficient: K <= beta = {beta} violated, max K = {highest:.6g} at x = {highest_at}"
        )
    _check_finite(problem, np.concatenate([block for block, _, _ in blocks[:2]]))
    return (lowest if alpha is None else float(alpha), highest if beta is None else float(beta))


def _screen(
    problem: MultiscaleProblem, blocks: list[_Block]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """K on the blocks and on zoom grids around their extremes: points, K, screened min, max.

    Raises:
        ValueError: where K is not finite, or a tensor K is not symmetric.
    """
    points = np.concatenate([block for block, _, _ in blocks])
    values = _coefficient_sample(problem, points)
    if problem.is_tensor:
        _check_symmetric(points, values)
    low, high = _extreme_range(values, problem.is_tensor)
    annotated: list[_ScreenedBlock] = []
    offset = 0
    for block, shape, spacing in blocks:
        size = len(block)
        annotated.append(
            (block, shape, spacing, low[offset : offset + size], high[offset : offset + size])
        )
        offset += size
    zoomed, zoomed_values = _zoom(problem, annotated)
    zoomed_low, zoomed_high = _extreme_range(zoomed_values, problem.is_tensor)
    return (
        np.concatenate([points, zoomed]),
        np.concatenate([values, zoomed_values]),
        np.concatenate([low, zoomed_low]),
        np.concatenate([high, zoomed_high]),
    )


def _check_symmetric(points: np.ndarray, values: np.ndarray) -> None:
    """Raise, naming where, if the tensors ``values`` ``(N, d, d)`` are not symmetric."""
    asym = np.abs(values - np.swapaxes(values, 1, 2)).max()
    if asym > 1e-12 * np.abs(values).max():
        where = int(np.argmax(np.abs(values - np.swapaxes(values, 1, 2)).max(axis=(1, 2))))
        raise ValueError(
            f"coefficient: tensor K is not symmetric (max |K - K^T| = {asym:.3g} at x = "
            f"{_format_point(points[where])})"
        )


def _check_finite(problem: MultiscaleProblem, points: np.ndarray) -> None:
    """Raise, naming where, if q or l is not finite at ``points``."""
    for label, evaluate, symbol in (
        ("source", problem.q, "q"),
        ("distance", problem.distance, "l"),
    ):
        if label == "distance" and not problem.distance_is_definition:
            continue  # a mesh domain's potential distance: finite by construction
        with np.errstate(all="ignore"):
            sample = evaluate(points)
        if not np.all(np.isfinite(sample)):
            where = int(np.flatnonzero(~np.isfinite(sample))[0])
            raise ValueError(
                f"{label}: {symbol} is not finite everywhere on the domain (NaN or inf: "
                f"{symbol} = {sample[where]} at x = {_format_point(points[where])})"
            )
