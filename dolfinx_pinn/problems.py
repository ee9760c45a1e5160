"""Multiscale test problems, each written once and evaluated by torch, UFL and numpy alike.

A problem is the fine-scale equation (4.8) of Hintermüller & Korolev,

    -div(K^ε ∇u) = f^ε := q + div(K^ε e_i)  in Ω,    u = 0 on ∂Ω,

i.e. w = u + x_i solves -div(K^ε ∇w) = q with w = x_i on the boundary. The coefficient K^ε (a
scalar or an SPD tensor), the source q and the hard-boundary distance function l are plain Python
functions ``g(x, m)`` of the coordinate components ``x[0], ..., x[d-1]`` and a small math namespace
``m`` (``m.sin``, ``m.cos``, ``m.exp``, ``m.sqrt``, ``m.tanh``, ``m.log``, ``m.pi``, ``m.where``).
The same function is called with numpy arrays, torch tensors or UFL expressions, so the three can
never disagree. The right-hand side f^ε is derived from K^ε by differentiation (torch autograd,
UFL ``grad``), never typed a second time.

Point arrays (numpy or torch) have shape ``(N, d)``; a UFL evaluation takes
``ufl.SpatialCoordinate(mesh)``.

This module holds what a problem is: its domain (:class:`Box`, or a DOLFINx mesh of any shape
as a :class:`~dolfinx_pinn.geometry.MeshDomain`), its definitions and their evaluation and
derivatives (:class:`MultiscaleProblem`), and the problems of the papers (the factories). A
problem with ``dirichlet=``/``neumann=`` data (:class:`~dolfinx_pinn.boundary.BoundaryData`) is
the general boundary-value problem ``-div(K^ε ∇u) = q``, ``u = g`` on Γ_D, ``(K^ε ∇u)·n = h`` on
Γ_N instead of the lifted (4.8); the factories keep (4.8).

Every problem is checked once when it is built (arguments; each definition through the three
backends; the period; K finite, symmetric and elliptic within its bounds on a dense
sample); those checks are the concern of :mod:`~dolfinx_pinn.problem_checks`, which the
construction calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from mpi4py import MPI

import numpy as np
import numpy.typing as npt
import torch
import ufl

from dolfinx_pinn.boundary import BoundaryData
from dolfinx_pinn.geometry import MeshDomain
from dolfinx_pinn.problem_checks import (
    StructureError,
    as_bounds,
    as_effective_tensor,
    as_int,
    as_period,
    as_positive,
    as_real,
    check_definitions,
    check_period,
    coefficient_bounds,
    coordinate_components,
    real_sequence,
)

__all__ = [
    "Box",
    "MultiscaleProblem",
    "laminate_2d",
    "math_namespace",
    "paper_1d",
    "paper_2d",
    "paper_3d",
    "quasi_periodic_1d",
    "weierstrass_1d",
]

Expression = Callable[[Sequence[Any], SimpleNamespace], Any]
"""A definition ``g(x, m)`` over coordinate components ``x`` and a math namespace ``m``."""


def _ufl_where(condition: Any, true_value: Any, false_value: Any) -> Any:
    return ufl.conditional(condition, true_value, false_value)


_NUMPY_MATH = SimpleNamespace(
    backend="numpy",
    pi=math.pi,
    sin=np.sin,
    cos=np.cos,
    exp=np.exp,
    sqrt=np.sqrt,
    tanh=np.tanh,
    log=np.log,
    where=np.where,
)
_TORCH_MATH = SimpleNamespace(
    backend="torch",
    pi=math.pi,
    sin=torch.sin,
    cos=torch.cos,
    exp=torch.exp,
    sqrt=torch.sqrt,
    tanh=torch.tanh,
    log=torch.log,
    where=torch.where,
)
_UFL_MATH = SimpleNamespace(
    backend="ufl",
    pi=math.pi,
    sin=ufl.sin,
    cos=ufl.cos,
    exp=ufl.exp,
    sqrt=ufl.sqrt,
    tanh=ufl.tanh,
    log=ufl.ln,
    where=_ufl_where,
)


def math_namespace(backend: str) -> SimpleNamespace:
    """Return the math namespace of a backend.

    Args:
        backend: ``"numpy"``, ``"torch"`` or ``"ufl"``.

    Returns:
        The namespace passed as ``m`` to problem definitions.
    """
    try:
        return {"numpy": _NUMPY_MATH, "torch": _TORCH_MATH, "ufl": _UFL_MATH}[backend]
    except KeyError:
        raise ValueError(f"backend must be 'numpy', 'torch' or 'ufl', got {backend!r}") from None


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``[lower_0, upper_0] x ... x [lower_{d-1}, upper_{d-1}]``.

    Args:
        lower: Lower corner, one entry per dimension.
        upper: Upper corner, one entry per dimension.
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]

    def __post_init__(self) -> None:
        try:
            lower = tuple(self.lower)
            upper = tuple(self.upper)
        except TypeError:
            raise ValueError(
                f"domain: lower and upper must be sequences of numbers, got {self.lower!r} and "
                f"{self.upper!r}"
            ) from None
        if len(lower) != len(upper) or not 1 <= len(lower) <= 3:
            raise ValueError(
                "domain: lower and upper corners must have the same length 1, 2 or 3, got "
                f"{self.lower} and {self.upper}"
            )
        requirement = "finite numbers with lower < upper"
        lower = tuple(as_real(lo, "domain: lower", requirement) for lo in lower)
        upper = tuple(as_real(hi, "domain: upper", requirement) for hi in upper)
        for lo, hi in zip(lower, upper, strict=True):
            if not hi > lo:
                raise ValueError(f"domain: need finite lower < upper, got {lower}, {upper}")
        # Plain float tuples (also from numpy arrays or ints): hashable, comparable, printable.
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    @classmethod
    def unit(cls, dim: int) -> Box:
        """The unit interval, square or cube."""
        dim = as_int(dim, "dim", 1, 3)
        return cls((0.0,) * dim, (1.0,) * dim)

    @property
    def dim(self) -> int:
        """Spatial dimension."""
        return len(self.lower)

    @property
    def lengths(self) -> np.ndarray:
        """Edge lengths."""
        return np.asarray(self.upper) - np.asarray(self.lower)

    @property
    def measure(self) -> float:
        """Volume |Omega| (length, area or volume)."""
        return float(np.prod(self.lengths))

    @property
    def boundary_measure(self) -> float:
        """Measure of the boundary (in 1D the counting measure of the two end points)."""
        if self.dim == 1:
            return 2.0
        lengths = self.lengths
        return float(sum(2.0 * self.measure / lengths[j] for j in range(self.dim)))

    def contains(self, points: npt.ArrayLike, tol: float = 1e-12) -> np.ndarray:
        """Whether each of the points ``(N, d)`` lies in the closed box."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, self.dim)
        return np.all(
            (points >= np.asarray(self.lower) - tol) & (points <= np.asarray(self.upper) + tol),
            axis=1,
        )

    def sample_interior(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Uniform random points in the interior, shape ``(count, d)``."""
        unit = rng.random((count, self.dim))
        return np.asarray(self.lower) + unit * self.lengths

    def sample_boundary(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Uniform random points on the boundary (by area), shape ``(count, d)``.

        In 1D the two end points are returned alternately.
        """
        lower, lengths = np.asarray(self.lower), self.lengths
        if self.dim == 1:
            return (lower + lengths * (np.arange(count) % 2)).reshape(-1, 1)
        face_areas = np.array([self.measure / lengths[j] for j in range(self.dim)])
        faces = rng.choice(
            2 * self.dim, size=count, p=np.tile(face_areas, 2) / (2 * face_areas.sum())
        )
        points = lower + rng.random((count, self.dim)) * lengths
        axis, side = faces % self.dim, faces // self.dim
        points[np.arange(count), axis] = lower[axis] + side * lengths[axis]
        return points

    def boundary_distance(self, points: npt.ArrayLike) -> np.ndarray:
        """The distance ``(N,)`` from points inside the box to its boundary."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, self.dim)
        lower, upper = np.asarray(self.lower), np.asarray(self.upper)
        return np.minimum(points - lower, upper - points).min(axis=1)

    def distance_function(self) -> Expression:
        """The default hard-boundary factor ``l(x) = prod_j 4 (x_j - a_j)(b_j - x_j) / L_j^2``.

        It vanishes on the boundary, equals 1 at the centre and, in 1D on (0, 1), is the paper's
        ``4x(1 - x)``.
        """
        lower, upper = self.lower, self.upper

        def distance(x: Sequence[Any], m: SimpleNamespace) -> Any:
            value = 1.0
            for j, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
                value = value * (4.0 * (x[j] - lo) * (hi - x[j]) / (hi - lo) ** 2)
            return value

        return distance


def _unit(x: Sequence[Any], m: SimpleNamespace) -> Any:
    return 1.0


def _as_domain(domain: Any) -> Box | MeshDomain | None:
    """A Box or MeshDomain as given, a dolfinx mesh as a MeshDomain, None as None."""
    if domain is None or isinstance(domain, (Box, MeshDomain)):
        return domain
    import dolfinx.mesh

    if isinstance(domain, dolfinx.mesh.Mesh):
        return MeshDomain(domain)
    raise ValueError(
        f"domain must be a Box, a MeshDomain or a dolfinx Mesh, got {type(domain).__name__}"
    )


def _broadcast(value: Any, like: Any, backend: str) -> Any:
    """Turn a constant entry of a definition (e.g. ``0.0`` in a tensor) into a full array."""
    if backend == "numpy":
        return np.broadcast_to(np.asarray(value, dtype=np.float64), like.shape).astype(np.float64)
    if backend == "torch":
        if isinstance(value, torch.Tensor):
            return value.expand(like.shape) if value.shape != like.shape else value
        return torch.full_like(like, float(value))
    return ufl.as_ufl(value)


@dataclass(frozen=True)
class _Definition:
    """A scalar or ``d x d`` tensor definition evaluated with any backend."""

    function: Expression
    dim: int

    def evaluate(self, x: Any, backend: str) -> Any:
        """Evaluate on coordinate components ``x`` with ``backend``.

        Returns numpy ``(N,)``/``(N, d, d)``, torch likewise, or a UFL scalar/matrix.
        """
        m = math_namespace(backend)
        value = self.function(x, m)
        if isinstance(value, (list, tuple)):
            if len(value) != self.dim or not all(
                isinstance(row, (list, tuple)) and len(row) == self.dim for row in value
            ):
                raise StructureError(
                    f"a tensor must be a {self.dim}x{self.dim} nested list of expressions, got "
                    f"{[len(row) if isinstance(row, (list, tuple)) else '-' for row in value]} "
                    "entries per row"
                )
            like = x[0]
            rows = [[_broadcast(entry, like, backend) for entry in row] for row in value]
            if backend == "numpy":
                return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)
            if backend == "torch":
                return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)
            return ufl.as_matrix(rows)
        return _broadcast(value, x[0], backend) if backend != "ufl" else ufl.as_ufl(value)


class MultiscaleProblem:
    """An elliptic multiscale problem (4.8) with a single definition of K, q and l.

    Args:
        coefficient: ``K(x, m)``: a scalar expression, or a ``d x d`` nested sequence of
            expressions for an SPD tensor.
        source: ``q(x, m)``, the source of the fine problem.
        eps: The fine scale ε > 0.
        domain: A :class:`Box` (default: the unit interval/square/cube of ``dim``), a
            :class:`~dolfinx_pinn.geometry.MeshDomain` (a mesh with facet tags) or a dolfinx
            mesh of any shape (intervals, triangles, tetrahedra; distributed or not). The
            definitions must be evaluable on the mesh's bounding box, where they are checked.
        dim: Spatial dimension (taken from ``domain`` when omitted).
        period: Period vector ``p`` of the fast variable ``y = x/ε`` (K is ``p``-periodic in
            ``y``: ``K(x + ε p_j e_j) = K(x)``, which is checked), or ``None`` for a coefficient
            that is not periodic in ``y`` (quasi-periodic, fractal, or a locally periodic
            ``a(x, x/ε)`` that also varies with ``x``).
        lifting_direction: The index ``i`` of the lifting ``w = u + x_i`` in (4.8).
        alpha: Lower bound of K (of its smallest eigenvalue); estimated from a sample if omitted.
        beta: Upper bound of K (of its largest eigenvalue); estimated from a sample if omitted.
        distance: The hard-boundary factor ``l(x, m)`` vanishing on the boundary (default:
            :meth:`Box.distance_function`; on a mesh domain the potential distance of
            :meth:`~dolfinx_pinn.geometry.MeshDomain.potential_distance`, vanishing on Γ_D).
        finest_scale: The shortest length the coefficient varies on, which a mesh must
            resolve (default ``eps * min(period)``, or ``eps`` without a period).
        effective_tensor: The homogenised tensor ``K*`` where it is known in closed form.
        name: A short name for files and reports.
        dirichlet: Dirichlet data g (a number, a definition ``g(x, m)``, a dolfinx Function on
            the domain's mesh) for the whole boundary, or ``{facet tag: g}``. With boundary data
            the problem is the general ``-div(K^ε ∇u) = q`` (no lifting, f = q) with these
            conditions (see :mod:`~dolfinx_pinn.boundary`); without, it is (4.8).
        neumann: ``{facet tag: h}``, the outward flux ``(K^ε ∇u)·n = h`` on those facets;
            exterior facets with no data are insulated (h = 0).

    Raises:
        ValueError: naming the parameter and the allowed range, when an argument is out of range
            (integers may be numpy integers, not bools), or naming the definition
            (coefficient, source, distance), when it cannot be evaluated by numpy, torch (with
            autograd) and UFL alike (a ``np.sin``/``math.sin`` call or a Python ``if`` on the
            coordinates instead of the namespace ``m``; ``x[j]`` beyond the dimension), when K is
            not periodic with the declared period (suggesting one that is, where found), or K
            is not finite, not symmetric, not positive or outside ``[alpha, beta]`` on the
            sample, with the point found. The sample: a capped grid of the domain, random
            points, for a periodic K a dense grid of the period cell at several positions, and
            zoom grids around the extremes found, so that a narrow spike of K is not missed;
            its size does not grow with 1/ε (construction takes about 0.1 s).
    """

    def __init__(
        self,
        coefficient: Expression,
        source: Expression,
        eps: float,
        *,
        domain: Box | MeshDomain | Any = None,
        dim: int | None = None,
        period: Sequence[float] | None = None,
        lifting_direction: int = 0,
        alpha: float | None = None,
        beta: float | None = None,
        distance: Expression | None = None,
        finest_scale: float | None = None,
        effective_tensor: npt.ArrayLike | None = None,
        name: str = "problem",
        dirichlet: Any = None,
        neumann: Any = None,
    ) -> None:
        if dim is None and domain is None:
            raise ValueError("dim: give the dimension or a domain")
        if dim is not None:
            dim = as_int(dim, "dim", 1, 3)
        domain = _as_domain(domain)
        domain = Box.unit(dim) if domain is None else domain  # type: ignore[arg-type]
        if dim is not None and domain.dim != dim:
            raise ValueError(f"domain has dimension {domain.dim} but dim is {dim}")
        self.domain = domain
        self.dim = domain.dim
        self.eps = eps = as_positive(eps, "eps")
        self.period = period = as_period(period, self.dim)
        self.lifting_direction = as_int(lifting_direction, "lifting_direction", 0, self.dim - 1)
        if finest_scale is None:
            finest_scale = eps * min(period) if period is not None else eps
        self.finest_scale = as_positive(finest_scale, "finest_scale", "finite and > 0")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.boundary = (
            None
            if dirichlet is None and neumann is None
            else BoundaryData(domain, dirichlet, neumann)
        )
        distance = domain.distance_function() if distance is None else distance
        # On a mesh domain the default factor is the potential distance of Γ_D, a sum over the
        # boundary facets with no UFL form: the probe of the definitions uses a constant.
        self.distance_is_definition = distance is not None
        self._coefficient = _Definition(coefficient, self.dim)
        self._source = _Definition(source, self.dim)
        self._distance = _Definition(distance if distance is not None else _unit, self.dim)
        # Each definition once through numpy, torch and UFL: a numpy/math call, a Python if or a
        # wrong coordinate is named here, not later inside autograd or form compilation.
        self.is_tensor = check_definitions(domain, self._coefficient, self._source, self._distance)
        self.coefficient_definition = coefficient
        self.source_definition = source
        self.distance_definition = distance
        self.name = name
        self.effective_tensor = as_effective_tensor(effective_tensor, self.dim)
        # The period first: the dense cell grids of the bounds check stand for the whole domain
        # only where K is periodic.
        alpha, beta = as_bounds(alpha, beta)
        check_period(self)
        self.alpha, self.beta = coefficient_bounds(self, alpha, beta)

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, definition: _Definition, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return definition.evaluate(coordinate_components(x, self.dim), "torch")
        if isinstance(x, np.ndarray):
            return definition.evaluate(coordinate_components(x, self.dim), "numpy")
        if isinstance(x, ufl.core.expr.Expr):
            if x.ufl_shape != (self.dim,):
                raise ValueError(
                    f"x: a UFL coordinate of shape ({self.dim},) is needed, got {x.ufl_shape} "
                    "(mesh/problem dimension mismatch?)"
                )
            return definition.evaluate(tuple(x[j] for j in range(self.dim)), "ufl")
        raise TypeError(
            f"x must be a numpy array, a torch tensor or a UFL expression, got {type(x)}"
        )

    def K(self, x: Any) -> Any:
        """The coefficient K^ε at points ``(N, d)`` (numpy or torch) or a UFL coordinate.

        Returns shape ``(N,)`` (scalar) or ``(N, d, d)`` (tensor); a UFL scalar or matrix.
        """
        return self._evaluate(self._coefficient, x)

    def q(self, x: Any) -> Any:
        """The source q at points ``(N, d)`` or a UFL coordinate."""
        return self._evaluate(self._source, x)

    def distance(self, x: Any) -> Any:
        """The hard-boundary factor l(x) at points ``(N, d)`` or a UFL coordinate.

        On a mesh domain without a ``distance`` definition: the potential distance of Γ_D
        (numpy or torch points only).
        """
        if not self.distance_is_definition:
            tags = None if self.boundary is None else self.boundary.dirichlet_tags
            return self.domain.potential_distance(x, tags)  # type: ignore[union-attr]
        return self._evaluate(self._distance, x)

    @property
    def is_lifted(self) -> bool:
        """Whether this is the lifted problem (4.8) (no boundary data given)."""
        return self.boundary is None

    def K_matrix(self, x: Any) -> Any:
        """K as a ``d x d`` tensor (a scalar K times the identity)."""
        value = self.K(x)
        if self.is_tensor:
            return value
        if isinstance(value, torch.Tensor):
            return value[:, None, None] * torch.eye(
                self.dim, dtype=value.dtype, device=value.device
            )
        if isinstance(value, np.ndarray):
            return value[:, None, None] * np.eye(self.dim)
        return value * ufl.Identity(self.dim)

    def flux_lifting(self, x: Any) -> Any:
        """The lifting flux ``K e_i`` (i the lifting direction): ``(N, d)`` or a UFL vector."""
        i = self.lifting_direction
        if self.is_tensor:
            value = self.K(x)
            return value[..., :, i] if not isinstance(value, ufl.core.expr.Expr) else value[:, i]
        value = self.K(x)
        if isinstance(value, torch.Tensor):
            return value[:, None] * torch.eye(self.dim, dtype=value.dtype, device=value.device)[i]
        if isinstance(value, np.ndarray):
            return value[:, None] * np.eye(self.dim)[i]
        return value * ufl.unit_vector(i, self.dim)

    def grad_K(self, x: torch.Tensor | np.ndarray, create_graph: bool = False) -> Any:
        """∇K^ε by torch autograd: ``(N, d)`` for scalar K, ``(N, d, d, d)`` (∂_k K_ab) for tensors.

        Args:
            x: Points ``(N, d)``; numpy in, numpy out (computed in float64 torch).
            create_graph: Keep the graph for higher derivatives (torch input only).
        """
        as_numpy = isinstance(x, np.ndarray)
        points = torch.as_tensor(x, dtype=torch.float64) if as_numpy else x
        # enable_grad: the derivative is part of the definition, also inside a caller's no_grad.
        with torch.enable_grad():
            points = points.detach().requires_grad_(True)
            value = self.K(points)
            flat = value.flatten(1) if value.dim() > 1 else value[:, None]
            columns = [
                torch.autograd.grad(
                    flat[:, k].sum(), points, create_graph=create_graph, retain_graph=True
                )[0]
                for k in range(flat.shape[1])
            ]
        gradient = torch.stack(columns, dim=1).reshape(*value.shape, self.dim)
        if not self.is_tensor:
            gradient = gradient.reshape(value.shape[0], self.dim)
        return gradient.detach().numpy() if as_numpy else gradient

    def f(self, x: Any, create_graph: bool = False) -> Any:
        """The right-hand side f^ε = q + ∇·(K^ε e_i) of (4.8), derived from K.

        numpy and torch inputs go through torch autograd (float64); a UFL coordinate gives
        ``q + div(K e_i)``.
        """
        if self.boundary is not None:
            return self.q(x)
        if isinstance(x, ufl.core.expr.Expr):
            return self.q(x) + ufl.div(self.flux_lifting(x))
        i = self.lifting_direction
        gradient = self.grad_K(x, create_graph=create_graph)
        if self.is_tensor:
            # ∇·(K e_i) = Σ_j ∂_j K_{j i}
            divergence = sum(gradient[:, j, i, j] for j in range(self.dim))
        else:
            divergence = gradient[:, i]
        return self.q(x) + divergence

    # -- helpers -------------------------------------------------------------------------------
    def with_lifting_direction(self, direction: int) -> MultiscaleProblem:
        """A copy of this problem with another lifting direction ``i`` (for Algorithm 4.1).

        The copy is the lifted problem (4.8) on the same domain: boundary data are not kept
        (Algorithm 4.1 upscales from the d lifted problems).
        """
        return MultiscaleProblem(
            self.coefficient_definition,
            self.source_definition,
            self.eps,
            domain=self.domain,
            period=self.period,
            lifting_direction=direction,
            alpha=self.alpha,
            beta=self.beta,
            distance=self.distance_definition,
            finest_scale=self.finest_scale,
            effective_tensor=self.effective_tensor,
            name=self.name,
        )

    def default_resolution(self, elements_per_period: int = 20) -> int:
        """Cells per unit length so that each finest oscillation gets ``elements_per_period``."""
        elements_per_period = as_int(elements_per_period, "elements_per_period", 1)
        return math.ceil(elements_per_period / self.finest_scale)

    def create_mesh(
        self,
        comm: MPI.Comm,
        n: int | Sequence[int],
        cell_type: Any = None,
        ghost_mode: Any = None,
    ) -> Any:
        """Create a dolfinx mesh of the problem's domain.

        On a mesh domain: the domain's mesh, uniformly refined until its cell diameters are at
        most those of the box mesh, ``|lengths / n|`` (``comm``, ``cell_type`` and ``ghost_mode``
        are the mesh's own).

        Args:
            comm: MPI communicator (collective).
            n: Cells per direction (an int for all directions, or one per direction).
            cell_type: ``dolfinx.mesh.CellType`` (default interval/triangle/tetrahedron).
            ghost_mode: ``dolfinx.mesh.GhostMode`` (default ``shared_facet``).

        Returns:
            A ``dolfinx.mesh.Mesh``.
        """
        from dolfinx import mesh as dmesh

        counts = [int(n)] * self.dim if np.isscalar(n) else [int(c) for c in n]  # type: ignore[arg-type]
        if len(counts) != self.dim or min(counts) < 1:
            raise ValueError(f"n must be a positive cell count per dimension, got {n}")
        if isinstance(self.domain, MeshDomain):
            # The domain's own mesh, refined until its cells are no larger (in diameter) than the
            # cells of the box mesh with these counts over the bounding box.
            box_cell = np.asarray(self.domain.lengths) / np.asarray(counts, dtype=np.float64)
            return self.domain.refined_mesh(float(np.linalg.norm(box_cell)))
        ghost_mode = dmesh.GhostMode.shared_facet if ghost_mode is None else ghost_mode
        lower, upper = self.domain.lower, self.domain.upper
        if self.dim == 1:
            return dmesh.create_interval(
                comm, counts[0], [lower[0], upper[0]], ghost_mode=ghost_mode
            )
        if self.dim == 2:
            return dmesh.create_rectangle(
                comm,
                [list(lower), list(upper)],
                counts,
                cell_type=cell_type or dmesh.CellType.triangle,
                ghost_mode=ghost_mode,
            )
        return dmesh.create_box(
            comm,
            [list(lower), list(upper)],
            counts,
            cell_type=cell_type or dmesh.CellType.tetrahedron,
            ghost_mode=ghost_mode,
        )

    def check_mesh(self, mesh: Any) -> None:
        """Raise a ValueError if ``mesh`` does not match the problem's dimension or domain."""
        tdim, gdim = mesh.topology.dim, mesh.geometry.dim
        if tdim != self.dim:
            raise ValueError(
                f"mesh: topological dimension {tdim} does not match the problem's dimension "
                f"{self.dim}"
            )
        coords = mesh.geometry.x[:, : self.dim]
        local_lo = coords.min(axis=0) if coords.size else np.full(self.dim, np.inf)
        local_hi = coords.max(axis=0) if coords.size else np.full(self.dim, -np.inf)
        lo = np.empty(self.dim)
        hi = np.empty(self.dim)
        # Buffer reductions: the pickle-based lowercase allreduce cannot take MPI.MIN on arrays.
        mesh.comm.Allreduce(np.ascontiguousarray(local_lo, dtype=np.float64), lo, op=MPI.MIN)
        mesh.comm.Allreduce(np.ascontiguousarray(local_hi, dtype=np.float64), hi, op=MPI.MAX)
        scale = float(np.max(self.domain.lengths))
        if not (
            np.allclose(lo, self.domain.lower, atol=1e-10 * scale)
            and np.allclose(hi, self.domain.upper, atol=1e-10 * scale)
        ):
            raise ValueError(
                f"mesh: its bounding box {lo.tolist()}-{hi.tolist()} does not match the problem's "
                f"domain {list(self.domain.lower)}-{list(self.domain.upper)} (gdim {gdim})"
            )

    def __repr__(self) -> str:
        kind = "tensor" if self.is_tensor else "scalar"
        return (
            f"MultiscaleProblem(name={self.name!r}, dim={self.dim}, eps={self.eps:g}, {kind} K "
            f"in [{self.alpha:.4g}, {self.beta:.4g}], lifting_direction={self.lifting_direction})"
        )


# -- factories ---------------------------------------------------------------------------------
def _paper_source_1d(x: Sequence[Any], m: SimpleNamespace) -> Any:
    return -3.0 * (2.0 * x[0] - 1.0)


def paper_1d(eps: float) -> MultiscaleProblem:
    """The 1D problem (4.29) of Hintermüller & Korolev.

    Ω = (0, 1), K^ε = 2 + sin(2πx/ε), q = -3(2x - 1), so f^ε = q + ∂_x K^ε; K* = √3.

    Args:
        eps: The period ε > 0.
    """

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 2.0 + m.sin(2.0 * m.pi * x[0] / eps)

    return MultiscaleProblem(
        coefficient,
        _paper_source_1d,
        eps,
        dim=1,
        period=(1.0,),
        alpha=1.0,
        beta=3.0,
        effective_tensor=[[math.sqrt(3.0)]],
        name="paper_1d",
    )


def paper_2d(eps: float = 0.1) -> MultiscaleProblem:
    """The 2D problem (4.11) of Hintermüller & Korolev (heat conduction, Section 4).

    Ω = (0, 1)², K^ε = 3 + sin(πx₁/ε) + sin(2πx₂/ε), q = 10 exp(-100|x - 0.5|²). The fast
    variable y = x/ε has the period vector (2, 1).

    Args:
        eps: The scale ε > 0 (the paper: 0.1).
    """

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 3.0 + m.sin(m.pi * x[0] / eps) + m.sin(2.0 * m.pi * x[1] / eps)

    def source(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 10.0 * m.exp(-100.0 * ((x[0] - 0.5) ** 2 + (x[1] - 0.5) ** 2))

    return MultiscaleProblem(
        coefficient,
        source,
        eps,
        dim=2,
        period=(2.0, 1.0),
        alpha=1.0,
        beta=5.0,
        name="paper_2d",
    )


def paper_3d(eps: float = 0.1, domain: Any = None) -> MultiscaleProblem:
    """The 3D analogue of the 2D problem (4.11) of Hintermüller & Korolev.

    Ω = (0, 1)³ (or ``domain``), K^ε = 4 + sin(πx₁/ε) + sin(2πx₂/ε) + sin(2πx₃/ε),
    q = 10 exp(-100|x - 0.5|²), the lifted problem (4.8). As in (4.11) the coefficient is a sum
    of one oscillation per axis, the first with twice the period of the others (period vector
    (2, 1, 1) of y = x/ε); the mean is raised from 3 to 4 so that the third oscillation keeps
    K within [1, 7], the same lower bound α = 1 as (4.11)'s [1, 5].

    Args:
        eps: The scale ε > 0.
        domain: Another domain (a Box or a mesh of any 3D part; default the unit cube).
    """

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return (
            4.0
            + m.sin(m.pi * x[0] / eps)
            + m.sin(2.0 * m.pi * x[1] / eps)
            + m.sin(2.0 * m.pi * x[2] / eps)
        )

    def source(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 10.0 * m.exp(-100.0 * ((x[0] - 0.5) ** 2 + (x[1] - 0.5) ** 2 + (x[2] - 0.5) ** 2))

    return MultiscaleProblem(
        coefficient,
        source,
        eps,
        dim=3,
        domain=domain,
        period=(2.0, 1.0, 1.0),
        alpha=1.0,
        beta=7.0,
        name="paper_3d",
    )


def quasi_periodic_1d(
    eps: float,
    a0: float = 2.5,
    cos_amplitudes: Sequence[float] = (0.5, 0.125, 0.5 / 9.0),
    sin_amplitudes: Sequence[float] = (0.5, 0.125, 0.5 / 9.0),
    cos_frequencies: Sequence[float] = (
        2.0 * math.pi,
        2.0 * math.pi * math.sqrt(2.0),
        2.0 * math.pi * math.sqrt(3.0),
    ),
    sin_frequencies: Sequence[float] = (
        math.pi * math.sqrt(5.0),
        math.pi * math.sqrt(7.0),
        math.pi * math.sqrt(11.0),
    ),
) -> MultiscaleProblem:
    """The almost-periodic coefficient of Hoang & Schwab, §5.3 (with constant a_n, b_n).

    a(x) = a₀ + Σ_n [a_n cos(ξ_n x/ε) + b_n sin(ζ_n x/ε)] on (0, 1), q = -3(2x - 1). The default
    frequencies are incommensurate multiples of π (1, √2, √3 and √5/2, √7/2, √11/2 times 2π) and
    the amplitudes decay like 1/n², as in (5.16); positivity needs a₀ > Σ|a_n| + Σ|b_n|.

    Args:
        eps: The scale ε > 0.
        a0: The mean a₀.
        cos_amplitudes: The a_n.
        sin_amplitudes: The b_n.
        cos_frequencies: The ξ_n.
        sin_frequencies: The ζ_n.
    """
    a0 = as_real(a0, "a0")
    cos_amplitudes, sin_amplitudes, cos_frequencies, sin_frequencies = (
        real_sequence(values, label)
        for values, label in (
            (cos_amplitudes, "cos_amplitudes"),
            (sin_amplitudes, "sin_amplitudes"),
            (cos_frequencies, "cos_frequencies"),
            (sin_frequencies, "sin_frequencies"),
        )
    )
    if len(cos_amplitudes) != len(cos_frequencies):
        raise ValueError("cos_amplitudes and cos_frequencies must have the same length")
    if len(sin_amplitudes) != len(sin_frequencies):
        raise ValueError("sin_amplitudes and sin_frequencies must have the same length")
    frequencies = [abs(f) for f in (*cos_frequencies, *sin_frequencies)]
    if not frequencies or not all(math.isfinite(f) and f > 0 for f in frequencies):
        raise ValueError("cos_frequencies/sin_frequencies must be finite and nonzero")
    lower = a0 - sum(abs(a) for a in cos_amplitudes) - sum(abs(b) for b in sin_amplitudes)
    if not lower > 0:
        raise ValueError(
            f"a0 = {a0} must exceed the sum of the amplitudes so that a(x) > 0 (a0 - sum = {lower})"
        )
    cos_terms = tuple(zip(cos_amplitudes, cos_frequencies, strict=True))
    sin_terms = tuple(zip(sin_amplitudes, sin_frequencies, strict=True))

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        value = a0
        for amplitude, frequency in cos_terms:
            value = value + amplitude * m.cos(frequency * x[0] / eps)
        for amplitude, frequency in sin_terms:
            value = value + amplitude * m.sin(frequency * x[0] / eps)
        return value

    return MultiscaleProblem(
        coefficient,
        _paper_source_1d,
        eps,
        dim=1,
        alpha=lower,
        finest_scale=2.0 * math.pi * eps / max(frequencies),
        name="quasi_periodic_1d",
    )


def weierstrass_1d(
    A: float = 3.0, p: float = 0.5, a: float = 3.0, terms: int = 5
) -> MultiscaleProblem:
    """A Weierstrass-type fractal coefficient, Hoang & Schwab §5.2 example (i).

    K(x) = A + Σ_{k<terms} p^k cos(a^k π x) on (0, 1), q = -3(2x - 1). The finest period
    2/a^(terms-1) plays the role of ε.

    Args:
        A: The offset; positivity needs A > Σ_k |p|^k.
        p: The amplitude ratio, 0 < p < 1.
        a: The frequency ratio, a > 1.
        terms: The number of terms n >= 1.
    """
    A = as_real(A, "A")
    p = as_real(p, "p", "a number in (0, 1)")
    a = as_real(a, "a", "a finite number > 1")
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if not a > 1:
        raise ValueError(f"a must be > 1, got {a}")
    terms = as_int(terms, "terms", 1)
    lower = A - sum(p**k for k in range(terms))
    if not lower > 0:
        raise ValueError(f"A = {A} must exceed sum_k p^k = {A - lower} so that K > 0")

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        value = A
        for k in range(terms):
            value = value + p**k * m.cos(a**k * m.pi * x[0])
        return value

    finest = 2.0 / a ** (terms - 1)
    return MultiscaleProblem(
        coefficient,
        _paper_source_1d,
        finest,
        dim=1,
        alpha=lower,
        finest_scale=finest,
        name="weierstrass_1d",
    )


def laminate_2d(eps: float, mean: float = 2.0, amplitude: float = 1.0) -> MultiscaleProblem:
    """A laminate: K = mean + amplitude·sin(2πx₁/ε) on (0, 1)², layers normal to x₁, q = 0.

    Its homogenised tensor is known in closed form: the harmonic mean across the layers and the
    arithmetic mean along them, K* = diag(√(mean² - amplitude²), mean).

    Args:
        eps: The layer period ε > 0.
        mean: The mean of K.
        amplitude: The amplitude of the oscillation, |amplitude| < mean.
    """
    mean = as_real(mean, "mean")
    amplitude = as_real(amplitude, "amplitude")
    if not abs(amplitude) < mean:
        raise ValueError(f"amplitude must satisfy |amplitude| < mean, got {amplitude}, {mean}")

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return mean + amplitude * m.sin(2.0 * m.pi * x[0] / eps)

    def source(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 0.0

    return MultiscaleProblem(
        coefficient,
        source,
        eps,
        dim=2,
        period=(1.0, 1.0),
        alpha=mean - abs(amplitude),
        beta=mean + abs(amplitude),
        effective_tensor=np.diag([math.sqrt(mean**2 - amplitude**2), mean]),
        name="laminate_2d",
    )
