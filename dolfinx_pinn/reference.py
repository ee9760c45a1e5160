"""Fine-scale reference solutions, error norms and upscaled coefficients.

Everything a later number is measured against lives here:

- :func:`solve_fine` solves the fine problem (4.8) with DOLFINx + PETSc on a mesh resolving ε;
- :func:`exact_1d` is the closed form [HS (5.3)] of any 1D problem, by composite Gauss-Legendre
  quadrature that resolves every oscillation;
- :func:`relative_errors` integrates relative L² and H¹-seminorm errors of a candidate (a dolfinx
  Function, a torch network or callables) on a reference mesh, in parallel;
- :func:`upscaled_coefficient` is (4.10) and :func:`upscaled_tensor` is Algorithm 4.1.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mpi4py import MPI
from petsc4py import PETSc

import basix
import basix.ufl
import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import default_scalar_type, fem
from dolfinx import mesh as dmesh
from dolfinx.fem.petsc import LinearProblem

from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "ExactSolution1D",
    "GradientCallable",
    "box_partition",
    "default_fine_resolution",
    "exact_1d",
    "fine_solver_options",
    "relative_errors",
    "solve_fine",
    "solve_fine_directions",
    "upscaled_coefficient",
    "upscaled_tensor",
]

_instance_counter = itertools.count()


def fine_solver_options(solver: str) -> dict[str, Any]:
    """PETSc options of the fine solve.

    Args:
        solver: ``"mumps"`` (LU, the default) or ``"gamg"`` (CG + smoothed aggregation AMG).

    Returns:
        A dict of PETSc options for the KSP.
    """
    if solver == "mumps":
        return {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
    if solver == "gamg":
        return {
            "ksp_type": "cg",
            "pc_type": "gamg",
            "ksp_rtol": 1e-12,
            "ksp_atol": 1e-14,
            "ksp_max_it": 2000,
        }
    raise ValueError(f"solver must be 'mumps' or 'gamg', got {solver!r}")


def default_fine_resolution(
    problem: MultiscaleProblem, degree: int = 1, elements_per_period: int | None = None
) -> list[int]:
    """Cells per direction of the default fine mesh of :func:`solve_fine`.

    Along axis j the finest oscillation has length ``eps * period[j]`` (``finest_scale`` for a
    non-periodic coefficient); it gets ``elements_per_period`` cells (default 100 for P1, 24 for
    P2, 12 for P3 and higher; never fewer than 20).

    Args:
        problem: The problem.
        degree: Lagrange degree.
        elements_per_period: Override of the cells per oscillation.

    Returns:
        One cell count per direction.
    """
    if elements_per_period is None:
        elements_per_period = {1: 100, 2: 24}.get(degree, 12)
    if elements_per_period < 1:
        raise ValueError(f"elements_per_period must be >= 1, got {elements_per_period}")
    scales = (
        [problem.eps * p for p in problem.period]
        if problem.period is not None
        else [problem.finest_scale] * problem.dim
    )
    return [
        max(2, int(np.ceil(elements_per_period * length / scale - 1e-9)))
        for length, scale in zip(problem.domain.lengths, scales, strict=True)
    ]


def _default_quadrature_degree(degree: int) -> int:
    # The oscillating coefficient is not a polynomial: a few degrees above the exact degree of
    # the polynomial part (2*degree - 2 for the stiffness) keep the quadrature error far below
    # the discretisation error on meshes that resolve ε.
    return 2 * degree + 4


def solve_fine(
    problem: MultiscaleProblem,
    n: int | Sequence[int] | None = None,
    degree: int = 1,
    comm: MPI.Comm = MPI.COMM_WORLD,
    *,
    mesh: dmesh.Mesh | None = None,
    solver: str = "mumps",
    petsc_options: dict[str, Any] | None = None,
    elements_per_period: int | None = None,
    quadrature_degree: int | None = None,
) -> fem.Function:
    """Solve the fine-scale problem (4.8) with Lagrange finite elements.

    Finds u in V_h ⊂ H¹_0 with ∫ K∇u·∇v = ∫ q v - ∫ (K e_i)·∇v for all v, the weak form of
    -∇·(K∇u) = q + ∇·(K e_i); the lifted solution is w = u + x_i.

    Args:
        problem: The multiscale problem.
        n: Cells per direction (default: ``elements_per_period`` cells per finest oscillation).
        degree: Lagrange degree.
        comm: MPI communicator of the mesh (collective on it).
        mesh: A mesh to use instead of a uniform box mesh (must match the problem's domain).
        solver: ``"mumps"`` (LU) or ``"gamg"`` (CG + GAMG); see :func:`fine_solver_options`.
        petsc_options: Options overriding those of ``solver``.
        elements_per_period: Cells per finest oscillation of the default mesh, along each axis
            (default 100 for P1, 24 for P2, 12 for P3 and higher: a relative L² error below 1e-4
            on the paper's 1D problem).
        quadrature_degree: Quadrature degree of the forms (default ``2*degree + 4``).

    Returns:
        The solution u_h (a ``dolfinx.fem.Function``).
    """
    if not (isinstance(degree, int) and degree >= 1):
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    if mesh is None:
        if n is None:
            n = default_fine_resolution(problem, degree, elements_per_period)
        mesh = problem.create_mesh(comm, n)
    else:
        problem.check_mesh(mesh)
    options = fine_solver_options(solver)
    options.update(petsc_options or {})
    options.setdefault("ksp_error_if_not_converged", True)

    V = fem.functionspace(mesh, ("Lagrange", degree))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(mesh)
    dx = ufl.Measure(
        "dx",
        domain=mesh,
        metadata={"quadrature_degree": quadrature_degree or _default_quadrature_degree(degree)},
    )
    K = problem.K_matrix(x)
    a = ufl.inner(K * ufl.grad(u), ufl.grad(v)) * dx
    L = problem.q(x) * v * dx - ufl.inner(problem.flux_lifting(x), ufl.grad(v)) * dx
    bc = _homogeneous_dirichlet(V)
    linear_problem = LinearProblem(
        a,
        L,
        bcs=[bc],
        petsc_options_prefix=f"dolfinx_pinn_fine_{next(_instance_counter)}_",
        petsc_options=options,
    )
    try:
        uh = linear_problem.solve()
    except PETSc.Error as error:  # pragma: no cover - depends on PETSc failure modes
        raise RuntimeError(f"fine solve failed ({solver}): {error}") from None
    finally:
        linear_problem.solver.destroy()
        linear_problem.A.destroy()
        linear_problem.b.destroy()
        linear_problem.x.destroy()
    uh.name = f"u_{problem.name}"
    return uh


def solve_fine_directions(
    problem: MultiscaleProblem,
    n: int | Sequence[int] | None = None,
    degree: int = 1,
    comm: MPI.Comm = MPI.COMM_WORLD,
    **kwargs: Any,
) -> list[fem.Function]:
    """The d fine solutions u_0, ..., u_{d-1} of (4.8), one per lifting direction, on one mesh.

    This is the input of Algorithm 4.1 (:func:`upscaled_tensor`). Collective on ``comm``.

    Args:
        problem: The problem (its own lifting direction is ignored).
        n: Cells per direction (default as :func:`solve_fine`).
        degree: Lagrange degree.
        comm: MPI communicator.
        **kwargs: Further arguments of :func:`solve_fine` (``mesh``, ``solver``, ...).

    Returns:
        ``[u_0, ..., u_{d-1}]``.
    """
    mesh = kwargs.pop("mesh", None)
    if mesh is None:
        if n is None:
            n = default_fine_resolution(problem, degree, kwargs.get("elements_per_period"))
        mesh = problem.create_mesh(comm, n)
    return [
        solve_fine(problem.with_lifting_direction(i), degree=degree, mesh=mesh, **kwargs)
        for i in range(problem.dim)
    ]


def _homogeneous_dirichlet(V: fem.FunctionSpace) -> fem.DirichletBC:
    mesh = V.mesh
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dmesh.exterior_facet_indices(mesh.topology)
    dofs = fem.locate_dofs_topological(V, tdim - 1, facets)
    return fem.dirichletbc(default_scalar_type(0), dofs, V)


# -- the exact 1D solution ---------------------------------------------------------------------
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


class ExactSolution1D:
    """The exact solution of a 1D problem (4.8) by the closed form [HS (5.3)].

    For the lifted problem -(K w')' = q, w(a) = a, w(b) = b and u = w - x: K w' = c - Q with
    Q(x) = ∫_a^x q, so u' = (c - Q)/K - 1 and c = (L + ∫ Q/K) / ∫ 1/K from u(b) = 0. All integrals
    are composite Gauss-Legendre rules (24 nodes) on subintervals of at most 1/8 of the finest
    oscillation, so the result is exact to round-off for smooth coefficients.

    Args:
        problem: A 1D problem with scalar K.
        subintervals_per_scale: Subintervals per ``problem.finest_scale``.

    Attributes:
        c: The flux constant.
        K_tilde: The exact upscaled coefficient (4.10), ⟨K (u' + 1)⟩_Ω.
    """

    def __init__(self, problem: MultiscaleProblem, subintervals_per_scale: int = 8) -> None:
        if problem.dim != 1 or problem.is_tensor:
            raise ValueError(f"problem: exact_1d needs a 1D problem with scalar K, got {problem}")
        self.problem = problem
        (self._a,), (self._b,) = problem.domain.lower, problem.domain.upper
        length = self._b - self._a
        count = max(64, int(np.ceil(subintervals_per_scale * length / problem.finest_scale)))
        self._breaks = np.linspace(self._a, self._b, count + 1)
        h = np.diff(self._breaks)
        nodes = self._breaks[:-1, None] + 0.5 * h[:, None] * (_GL_NODES + 1.0)
        weights = 0.5 * h[:, None] * _GL_WEIGHTS
        # Q at the breakpoints, then at the nodes of each subinterval from its left breakpoint.
        q_integrals = (weights * self._eval(problem.q, nodes)).sum(axis=1)
        self._Q_breaks = np.concatenate([[0.0], np.cumsum(q_integrals)])
        Q_nodes = self._Q(nodes.ravel()).reshape(nodes.shape)
        inverse_K = 1.0 / self._eval(problem.K, nodes)
        self._J1_breaks = np.concatenate([[0.0], np.cumsum((weights * inverse_K).sum(axis=1))])
        self._J2_breaks = np.concatenate(
            [[0.0], np.cumsum((weights * Q_nodes * inverse_K).sum(axis=1))]
        )
        self.c = (length + self._J2_breaks[-1]) / self._J1_breaks[-1]
        self.K_tilde = float((self.c * length - (weights * Q_nodes).sum()) / length)

    @staticmethod
    def _eval(function: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        return np.asarray(function(x.reshape(-1, 1)), dtype=np.float64).reshape(x.shape)

    def _locate(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self._breaks, x, side="right") - 1, 0, len(self._breaks) - 2)

    def _partial(self, integrand: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """∫ from the breakpoint left of each x to x, by Gauss-Legendre."""
        left = self._breaks[self._locate(x)]
        half = 0.5 * (x - left)
        nodes = left[:, None] + half[:, None] * (_GL_NODES + 1.0)
        return half * (integrand(nodes) * _GL_WEIGHTS).sum(axis=1)

    def _Q(self, x: np.ndarray) -> np.ndarray:
        return self._Q_breaks[self._locate(x)] + self._partial(
            lambda t: self._eval(self.problem.q, t), x
        )

    @staticmethod
    def _as_points(x: npt.ArrayLike) -> np.ndarray:
        return np.asarray(x, dtype=np.float64).reshape(-1)

    def _chunks(self, x: np.ndarray, function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.concatenate([function(x[s : s + 4096]) for s in range(0, max(len(x), 1), 4096)])[
            : len(x)
        ]

    def u(self, x: npt.ArrayLike) -> np.ndarray:
        """The exact solution at points of shape ``(N,)`` or ``(N, 1)``; returns ``(N,)``."""
        x = self._as_points(x)

        def values(t: np.ndarray) -> np.ndarray:
            k = self._locate(t)
            inverse_K = lambda s: 1.0 / self._eval(self.problem.K, s)  # noqa: E731
            j1 = self._J1_breaks[k] + self._partial(inverse_K, t)
            j2 = self._J2_breaks[k] + self._partial(
                lambda s: self._Q(s.ravel()).reshape(s.shape) * inverse_K(s), t
            )
            return self.c * j1 - j2 - (t - self._a)

        return self._chunks(x, values)

    def du(self, x: npt.ArrayLike) -> np.ndarray:
        """u'(x) = (c - Q)/K - 1 at points of shape ``(N,)`` or ``(N, 1)``; returns ``(N,)``."""
        x = self._as_points(x)
        return (self.c - self._Q(x)) / self._eval(self.problem.K, x) - 1.0

    def value(self, points: npt.ArrayLike) -> np.ndarray:
        """U at points ``(N, 1)`` (the :class:`GradientCallable` protocol)."""
        return self.u(points)

    def gradient(self, points: npt.ArrayLike) -> np.ndarray:
        """∇u at points ``(N, 1)``, shape ``(N, 1)``."""
        return self.du(points)[:, None]

    def torch_u(self, x: torch.Tensor) -> torch.Tensor:
        """U on a torch tensor ``(N,)`` or ``(N, 1)`` (no autograd), same device and dtype."""
        return torch.as_tensor(self.u(x.detach().cpu().numpy()), dtype=x.dtype, device=x.device)

    def torch_du(self, x: torch.Tensor) -> torch.Tensor:
        """U' on a torch tensor ``(N,)`` or ``(N, 1)`` (no autograd), same device and dtype."""
        return torch.as_tensor(self.du(x.detach().cpu().numpy()), dtype=x.dtype, device=x.device)


def exact_1d(problem: MultiscaleProblem) -> ExactSolution1D:
    """The exact solution of a 1D problem (4.8) for any coefficient, [HS (5.3)].

    Args:
        problem: A 1D problem with a scalar coefficient.

    Returns:
        An :class:`ExactSolution1D` with ``u``, ``du`` (numpy), ``torch_u``, ``torch_du``,
        ``c`` and ``K_tilde``.
    """
    return ExactSolution1D(problem)


# -- errors ------------------------------------------------------------------------------------
@runtime_checkable
class GradientCallable(Protocol):
    """Anything with ``value(points) -> (N,)`` and ``gradient(points) -> (N, d)`` on numpy."""

    def value(self, points: np.ndarray) -> np.ndarray:
        """Values at points ``(N, d)``."""
        ...

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """Gradients at points ``(N, d)``."""
        ...


@dataclass
class _QuadratureData:
    points: np.ndarray  # (cells, nq, d) physical points
    weights: np.ndarray  # (cells, nq) weights times |det J|
    reference_points: np.ndarray
    cells: np.ndarray


def _quadrature(mesh: dmesh.Mesh, degree: int) -> _QuadratureData:
    tdim = mesh.topology.dim
    cell_type = basix.CellType[mesh.topology.cell_name()]
    reference_points, reference_weights = basix.make_quadrature(cell_type, degree)
    cells = np.arange(mesh.topology.index_map(tdim).size_local, dtype=np.int32)
    x = ufl.SpatialCoordinate(mesh)
    coordinates = fem.Expression(x, reference_points).eval(mesh, cells)
    detJ = fem.Expression(abs(ufl.JacobianDeterminant(mesh)), reference_points).eval(mesh, cells)
    return _QuadratureData(
        points=coordinates.reshape(len(cells), len(reference_weights), -1)[:, :, :tdim],
        weights=detJ.reshape(len(cells), -1) * reference_weights,
        reference_points=reference_points,
        cells=cells,
    )


def _function_on_quadrature(
    u: fem.Function, mesh: dmesh.Mesh, data: _QuadratureData
) -> tuple[np.ndarray, np.ndarray]:
    """Values ``(cells, nq)`` and gradients ``(cells, nq, d)`` of u at the quadrature points."""
    tdim = mesh.topology.dim
    shape = data.weights.shape
    if u.function_space.mesh is mesh:
        values = fem.Expression(u, data.reference_points).eval(mesh, data.cells)
        grads = fem.Expression(ufl.grad(u), data.reference_points).eval(mesh, data.cells)
        return values.reshape(shape), grads.reshape(*shape, -1)[:, :, :tdim]
    # Another mesh: interpolate u and its (piecewise-polynomial, hence exactly representable)
    # gradient into quadrature spaces of the reference mesh, i.e. evaluate them exactly at the
    # reference quadrature points, wherever in the partition they live.
    source_mesh = u.function_space.mesh
    degree = u.function_space.ufl_element().embedded_superdegree
    gradient_space = fem.functionspace(
        source_mesh, ("Discontinuous Lagrange", max(degree - 1, 0), (source_mesh.geometry.dim,))
    )
    gradient = fem.Function(gradient_space)
    gradient.interpolate(fem.Expression(ufl.grad(u), gradient_space.element.interpolation_points))
    cell_type = mesh.basix_cell()
    rule_degree = _degree_of_rule(cell_type, len(data.reference_points))
    results = []
    for function, value_shape in ((u, ()), (gradient, (source_mesh.geometry.dim,))):
        element = basix.ufl.quadrature_element(
            cell_type, value_shape=value_shape, degree=rule_degree
        )
        target = fem.Function(fem.functionspace(mesh, element))
        num_cells = (
            mesh.topology.index_map(tdim).size_local + mesh.topology.index_map(tdim).num_ghosts
        )
        all_cells = np.arange(num_cells, dtype=np.int32)
        interpolation_data = fem.create_interpolation_data(
            target.function_space, function.function_space, all_cells, padding=1e-10
        )
        target.interpolate_nonmatching(function, all_cells, interpolation_data)
        block = target.function_space.dofmap.bs
        dofs = target.function_space.dofmap.list[data.cells]
        array = target.x.array.reshape(-1, block)[dofs]
        results.append(array)
    return results[0].reshape(shape), results[1].reshape(*shape, -1)[:, :, :tdim]


def _degree_of_rule(cell_type: basix.CellType, num_points: int) -> int:
    for degree in range(0, 40):
        if len(basix.make_quadrature(cell_type, degree)[1]) == num_points:
            return degree
    raise RuntimeError("could not recover the quadrature degree")  # pragma: no cover


def _candidate_on_quadrature(
    candidate: Any, mesh: dmesh.Mesh, data: _QuadratureData
) -> tuple[np.ndarray, np.ndarray]:
    shape = data.weights.shape
    flat_points = data.points.reshape(-1, data.points.shape[-1])
    if isinstance(candidate, fem.Function):
        return _function_on_quadrature(candidate, mesh, data)
    if isinstance(candidate, torch.nn.Module):
        parameter = next(candidate.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float64
        values, grads = [], []
        for start in range(0, len(flat_points), 8192):
            x = torch.tensor(flat_points[start : start + 8192], dtype=dtype, device=device)
            x.requires_grad_(True)
            v = candidate(x).reshape(-1)
            (g,) = torch.autograd.grad(v.sum(), x)
            values.append(v.detach().cpu().double().numpy())
            grads.append(g.detach().cpu().double().numpy())
        return (
            np.concatenate(values).reshape(shape) if values else np.zeros(shape),
            np.concatenate(grads).reshape(*shape, -1)
            if grads
            else np.zeros((*shape, mesh.topology.dim)),
        )
    if isinstance(candidate, GradientCallable):
        value, gradient = candidate.value, candidate.gradient
    elif (
        isinstance(candidate, (tuple, list))
        and len(candidate) == 2
        and all(map(callable, candidate))
    ):
        value, gradient = candidate
    else:
        raise TypeError(
            "candidate/reference must be a dolfinx Function, a torch.nn.Module, an object with "
            "value/gradient methods, or a pair of callables (u, grad_u) on points (N, d); "
            f"got {type(candidate)}"
        )
    values = np.asarray(value(flat_points), dtype=np.float64).reshape(shape)
    grads = np.asarray(gradient(flat_points), dtype=np.float64).reshape(*shape, -1)
    return values, grads


def relative_errors(
    candidate: Any,
    reference: Any,
    *,
    mesh: dmesh.Mesh | None = None,
    quadrature_degree: int | None = None,
) -> tuple[float, float]:
    """Relative L² and H¹-seminorm errors ‖c - r‖/‖r‖ and |c - r|₁/|r|₁.

    The integrals are computed on the reference mesh (or, for a reference given as callables,
    on the candidate's mesh or ``mesh``) with a Gauss rule of degree ``quadrature_degree``
    (default ``2*degree + 4`` >= 2·degree + 2, with ``degree`` that of the Function on the mesh),
    each rank summing over its owned cells.

    Collective on the mesh's communicator.

    Args:
        candidate: A dolfinx Function (on any mesh), a torch network mapping points ``(N, d)``
            to values ``(N,)``, an object with ``value``/``gradient`` methods (such as
            :class:`ExactSolution1D`), or a pair of numpy callables ``(u, grad_u)``.
        reference: The same kinds as ``candidate``.
        mesh: The integration mesh when neither argument is a dolfinx Function.
        quadrature_degree: Degree of the Gauss rule.

    Returns:
        ``(relative_l2, relative_h1_seminorm)``.
    """
    degree = 1
    if isinstance(reference, fem.Function):
        mesh = reference.function_space.mesh
        degree = reference.function_space.ufl_element().embedded_superdegree
    elif isinstance(candidate, fem.Function) and mesh is None:
        mesh = candidate.function_space.mesh
        degree = candidate.function_space.ufl_element().embedded_superdegree
    if mesh is None:
        raise ValueError("mesh: give an integration mesh when neither argument is a Function")
    quadrature_degree = quadrature_degree or _default_quadrature_degree(degree)
    if quadrature_degree < 2 * degree + 2:
        raise ValueError(
            f"quadrature_degree must be >= 2*degree + 2 = {2 * degree + 2}, got {quadrature_degree}"
        )
    data = _quadrature(mesh, quadrature_degree)
    c_values, c_grads = _candidate_on_quadrature(candidate, mesh, data)
    r_values, r_grads = _candidate_on_quadrature(reference, mesh, data)
    local = np.array(
        [
            (data.weights * (c_values - r_values) ** 2).sum(),
            (data.weights * r_values**2).sum(),
            (data.weights * ((c_grads - r_grads) ** 2).sum(axis=-1)).sum(),
            (data.weights * (r_grads**2).sum(axis=-1)).sum(),
        ]
    )
    total = mesh.comm.allreduce(local, op=MPI.SUM)
    if total[1] <= 0 or total[3] <= 0:
        raise ValueError("reference: its L² norm or H¹ seminorm is zero, relative errors undefined")
    return float(np.sqrt(total[0] / total[1])), float(np.sqrt(total[2] / total[3]))


# -- upscaling ---------------------------------------------------------------------------------
def _dx(mesh: dmesh.Mesh, u: fem.Function, quadrature_degree: int | None) -> ufl.Measure:
    degree = u.function_space.ufl_element().embedded_superdegree
    return ufl.Measure(
        "dx",
        domain=mesh,
        metadata={"quadrature_degree": quadrature_degree or _default_quadrature_degree(degree)},
    )


def upscaled_coefficient(
    problem: MultiscaleProblem, u: fem.Function, quadrature_degree: int | None = None
) -> float:
    """The upscaled coefficient (4.10): K̃_ii = ⟨(K (∇u + e_i))·e_i⟩_Ω, i the lifting direction.

    For |Ω| = 1 this is the paper's ∫_Ω K (∂_i u + 1) dx; in general it is the Ω-average, which
    is what (4.7) gives with ⟨∇w_i⟩_Ω = e_i (4.9).

    Collective on the mesh's communicator.

    Args:
        problem: The problem u solves (its lifting direction i).
        u: The fine solution of (4.8) (a dolfinx Function).
        quadrature_degree: Quadrature degree (default ``2*degree + 4``).

    Returns:
        K̃_ii, the same on every rank.
    """
    mesh = u.function_space.mesh
    problem.check_mesh(mesh)
    i = problem.lifting_direction
    x = ufl.SpatialCoordinate(mesh)
    e_i = ufl.unit_vector(i, problem.dim)
    flux = problem.K_matrix(x) * (ufl.grad(u) + e_i)
    value = fem.assemble_scalar(fem.form(flux[i] * _dx(mesh, u, quadrature_degree)))
    return float(mesh.comm.allreduce(value, op=MPI.SUM) / problem.domain.measure)


def box_partition(
    problem: MultiscaleProblem, mesh: dmesh.Mesh, blocks: int | Sequence[int]
) -> dmesh.MeshTags:
    """Cell tags of a partition of the box domain into ``blocks`` equal boxes per direction.

    Each cell goes to the box that contains its midpoint; tags are 0, 1, ... in C order.

    Args:
        problem: The problem (its domain).
        mesh: The mesh to tag.
        blocks: Boxes per direction (an int for all directions, or one per direction).

    Returns:
        Cell ``MeshTags`` (owned and ghost cells).
    """
    tdim = mesh.topology.dim
    counts = np.full(tdim, blocks) if np.isscalar(blocks) else np.asarray(blocks)
    if counts.shape != (tdim,) or np.any(counts < 1):
        raise ValueError(f"blocks must be a positive count per dimension, got {blocks}")
    index_map = mesh.topology.index_map(tdim)
    cells = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
    midpoints = dmesh.compute_midpoints(mesh, tdim, cells)[:, :tdim]
    relative = (midpoints - np.asarray(problem.domain.lower)) / problem.domain.lengths
    index = np.clip(np.floor(relative * counts).astype(np.int64), 0, counts - 1)
    tags = np.ravel_multi_index(tuple(index.T), tuple(counts)).astype(np.int32)
    return dmesh.meshtags(mesh, tdim, cells, tags)


def upscaled_tensor(
    problem: MultiscaleProblem,
    solutions: Sequence[fem.Function],
    cell_tags: dmesh.MeshTags | None = None,
    quadrature_degree: int | None = None,
) -> np.ndarray:
    """Algorithm 4.1: one d×d upscaled tensor per subdomain V_j from the d fine solutions.

    With w_i = u_i + x_i the solution of the fine problem lifted in direction i, T^j_i = ⟨∇w_i⟩_Vj
    and F^j_i = ⟨K∇w_i⟩_Vj, the tensor solves the matrix equation (4.7) K̃^j T^j = F^j.

    Collective on the mesh's communicator.

    Args:
        problem: The problem (any lifting direction: solution i must solve the problem lifted in
            direction i, see :meth:`MultiscaleProblem.with_lifting_direction`).
        solutions: ``d`` fine solutions u_0, ..., u_{d-1} on one mesh.
        cell_tags: A partition of the cells into tags 0..N-1 (default: one subdomain, Ω).
        quadrature_degree: Quadrature degree (default ``2*degree + 4``).

    Returns:
        An array of shape ``(N, d, d)`` (``(1, d, d)`` without tags), the same on every rank.
    """
    d = problem.dim
    if len(solutions) != d:
        raise ValueError(
            f"solutions: need one fine solution per direction ({d}), got {len(solutions)}"
        )
    mesh = solutions[0].function_space.mesh
    if any(u.function_space.mesh is not mesh for u in solutions):
        raise ValueError(
            "solutions: all fine solutions must live on one mesh (see solve_fine_directions)"
        )
    problem.check_mesh(mesh)
    tdim = mesh.topology.dim
    num_owned = mesh.topology.index_map(tdim).size_local
    if cell_tags is None:
        tag_of_cell = np.zeros(num_owned, dtype=np.int64)
    else:
        tag_of_cell = np.full(num_owned, -1, dtype=np.int64)
        owned = cell_tags.indices < num_owned
        tag_of_cell[cell_tags.indices[owned]] = cell_tags.values[owned]
        if np.any(tag_of_cell < 0):
            raise ValueError("cell_tags: every cell must carry a tag")
    num_tags = int(mesh.comm.allreduce(int(tag_of_cell.max(initial=-1)) + 1, op=MPI.MAX))

    # Cellwise integrals by assembling against the DG0 test function, summed per tag.
    DG0 = fem.functionspace(mesh, ("Discontinuous Lagrange", 0))
    v = ufl.TestFunction(DG0)
    x = ufl.SpatialCoordinate(mesh)
    K = problem.K_matrix(x)
    dx = _dx(mesh, solutions[0], quadrature_degree)

    def per_tag(integrand: ufl.core.expr.Expr) -> np.ndarray:
        vector = fem.assemble_vector(fem.form(integrand * v * dx))
        local = np.bincount(tag_of_cell, weights=vector.array[:num_owned], minlength=num_tags)
        return mesh.comm.allreduce(local, op=MPI.SUM)

    volumes = per_tag(ufl.as_ufl(1.0))
    if np.any(volumes <= 0):
        raise ValueError("cell_tags: every tag 0..N-1 must mark at least one cell")
    T = np.zeros((num_tags, d, d))
    F = np.zeros((num_tags, d, d))
    for i, u in enumerate(solutions):
        grad_w = ufl.grad(u) + ufl.unit_vector(i, d)
        flux = K * grad_w
        for j in range(d):
            T[:, j, i] = per_tag(grad_w[j]) / volumes
            F[:, j, i] = per_tag(flux[j]) / volumes
    condition = np.linalg.cond(T)
    if np.any(condition > 1e12):
        raise ValueError(
            "cell_tags: the averaged gradients T^j are (nearly) linearly dependent on some "
            "subdomain; use larger subdomains"
        )
    return F @ np.linalg.inv(T)
