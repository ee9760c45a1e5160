"""Periodic homogenisation: cell problems, the homogenised problem and the two-scale corrector.

This module implements the classical pieces of Hoang & Schwab, Section 2 [HS 2.4-2.7]:

* the periodic cell problems [HS 2.5] on a cell ``Y = [0, p_1] x ... x [0, p_d]``,

      -div_y(a(y) (e_i + grad_y N^i)) = 0 in Y,   N^i Y-periodic with zero mean,

  solved with P1 finite elements in DOLFINx. Periodicity is imposed exactly by a restriction
  matrix ``P`` (a distributed PETSc matrix mapping the periodic dofs to all dofs: each dof on
  an upper face is a copy of its partner on the lower face), the reduced system ``P^T A P`` is
  factorised once by MUMPS, the constant is fixed by pinning one dof and the mean is then
  subtracted. The homogenised tensor is ``a^0_ij = |Y|^-1 int_Y a (e_j + grad N^j) . e_i dy``
  (the mean over the cell, so that a cell of any size gives the same tensor);
* the homogenised problem with the lifting of the fine problem (4.8): the package solves
  ``-div(K grad u) = q + div(K e_i)`` with ``u = 0``, i.e. ``w = u + x_i`` solves
  ``-div(K grad w) = q`` with ``w = x_i`` on the boundary. The two-scale expansion is applied
  to ``w`` (its boundary data is not oscillating): ``w_0`` solves ``-div(a^0 grad w_0) = q``,
  ``w_0 = x_i`` on the boundary, and the first-order approximation is
  ``w ~ w_0 + eps sum_j d_j w_0(x) N^j(x/eps)``; ``u = w - x_i`` is recovered by the lifting;
* the error ``||grad u^eps - (grad u_0 + grad_y u_1(., ./eps))|| / ||grad u^eps||`` of
  [HS 2.7] against a fine finite-element solution, and its fitted rate in eps;
* the warm start of a two-scale network (e.g. ``TwoScaleNet``) from ``u_0 + eps u_1`` by a
  least-squares (L-BFGS) fit of values and gradients.

Cell coefficient. For a :class:`~dolfinx_pinn.problems.MultiscaleProblem` with a period
vector ``p`` the coefficient is ``K^eps(x) = a(x/eps)`` with ``a(y) = K(eps y)``: the cell is the
box of the period vector ``[0, p_1] x ... x [0, p_d]`` (not rescaled to the unit cube), so
``N^j(x/eps)`` is evaluated directly at ``y = x/eps``. A plain definition ``a(y, m)`` over
:func:`~dolfinx_pinn.problems.math_namespace` is also accepted (cell ``[0, 1]^d`` unless
``cell_lengths`` is given); it may return a scalar or a ``d x d`` nested list. A discontinuous
coefficient (a checkerboard) is written with ``m.where`` and is exact when the cell mesh is
aligned with the interfaces (the quadrature points lie inside the cells). A locally periodic
``a(x, y, m)`` is solved at given slow points ``x``.

Point evaluation. The cell and coarse meshes are the lattice triangulations of
``dolfinx.mesh.create_interval/rectangle/box`` (the Kuhn/Freudenthal triangulation: every
lattice box is cut along its main diagonal). Their P1 functions are gathered to every rank as
lattice values (:class:`LatticeFunction`) and evaluated without collectives on numpy arrays and
on torch tensors (differentiable).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

import basix
import dolfinx
import dolfinx.fem.petsc
import numpy as np
import numpy.typing as npt
import torch
import ufl

from dolfinx_pinn.ksp import DIRECT, create_ksp, solve_linear, unique_prefix
from dolfinx_pinn.problems import MultiscaleProblem, math_namespace

__all__ = [
    "CellProblem",
    "CellSolution",
    "LatticeFunction",
    "TwoScaleApproximation",
    "TwoScaleErrorStudy",
    "WarmStartResult",
    "cell_problem_from",
    "solve_cell_problem",
    "solve_homogenized",
    "two_scale_error",
    "two_scale_error_study",
    "voigt_reuss_bounds",
    "warm_start_two_scale",
]


# -- lattice P1 functions ----------------------------------------------------------------------
class LatticeFunction:
    """A continuous piecewise-linear function on the Kuhn triangulation of a box lattice.

    The lattice has ``counts[j]`` cells of size ``h_j = lengths[j] / counts[j]`` in direction j;
    every lattice box is split into ``d!`` simplices along its main diagonal, exactly as the
    meshes of ``dolfinx.mesh.create_interval/rectangle/box`` (triangles with the ``right``
    diagonal). A P1 function on such a mesh is therefore represented exactly by its nodal values.

    Args:
        values: Nodal values of shape ``(counts[0] + 1, ..., counts[d-1] + 1, k)``: ``k``
            functions on the same lattice.
        lower: Lower corner of the box.
        lengths: Edge lengths of the box.
        periodic: Evaluate the periodic extension (points are wrapped into the box) instead of
            requiring points inside the box (points outside are clamped to the nearest cell).

    Evaluation is local to the calling rank (no MPI).
    """

    def __init__(
        self,
        values: npt.ArrayLike,
        lower: Sequence[float],
        lengths: Sequence[float],
        periodic: bool = False,
    ) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float64)
        self.dim = len(lengths)
        if self.values.ndim != self.dim + 1:
            raise ValueError(
                f"values must have shape (n_0 + 1, ..., n_(d-1) + 1, k) for d = {self.dim}, "
                f"got {self.values.shape}"
            )
        self.lower = np.asarray(lower, dtype=np.float64)
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.counts = np.asarray(self.values.shape[: self.dim]) - 1
        if np.any(self.counts < 1):
            raise ValueError(
                f"values: need at least two nodes per direction, got {self.values.shape}"
            )
        self.spacing = self.lengths / self.counts
        self.periodic = periodic
        self.num_functions = self.values.shape[-1]
        self._flat = self.values.reshape(-1, self.num_functions)
        self._strides = np.array(
            [int(np.prod(self.values.shape[j + 1 : self.dim])) for j in range(self.dim)]
        )
        self._torch_cache: dict[tuple[Any, Any], torch.Tensor] = {}

    def _locate(self, scaled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.periodic:
            scaled = np.mod(scaled, self.counts)
        base = np.clip(np.floor(scaled).astype(np.int64), 0, self.counts - 1)
        return base, scaled - base

    def __call__(self, points: Any) -> Any:
        """Values at points ``(N, d)`` (numpy or torch): shape ``(N, k)``."""
        if isinstance(points, torch.Tensor):
            return self._evaluate_torch(points)
        points = np.asarray(points, dtype=np.float64)
        self._check(points.shape)
        scaled = (points - self.lower) / self.spacing
        base, local = self._locate(scaled)
        order = np.argsort(-local, axis=1, kind="stable")
        rows = np.arange(len(points))
        flat_index = base @ self._strides
        previous = self._flat[flat_index]
        result = previous.copy()
        for k in range(self.dim):
            axis = order[:, k]
            flat_index = flat_index + self._strides[axis]
            current = self._flat[flat_index]
            result += local[rows, axis][:, None] * (current - previous)
            previous = current
        return result

    def gradient(self, points: npt.ArrayLike) -> np.ndarray:
        """Gradients at points ``(N, d)`` (numpy): shape ``(N, k, d)``.

        On a simplex face the gradient of the simplex chosen by the (stable) ordering is used.
        """
        points = np.asarray(points, dtype=np.float64)
        self._check(points.shape)
        scaled = (points - self.lower) / self.spacing
        base, local = self._locate(scaled)
        order = np.argsort(-local, axis=1, kind="stable")
        rows = np.arange(len(points))
        flat_index = base @ self._strides
        previous = self._flat[flat_index]
        gradient = np.zeros((len(points), self.num_functions, self.dim))
        for k in range(self.dim):
            axis = order[:, k]
            flat_index = flat_index + self._strides[axis]
            current = self._flat[flat_index]
            gradient[rows, :, axis] = (current - previous) / self.spacing[axis][:, None]
            previous = current
        return gradient

    def _check(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"points must have shape (N, {self.dim}), got {tuple(shape)}")

    def _evaluate_torch(self, points: torch.Tensor) -> torch.Tensor:
        self._check(tuple(points.shape))
        key = (points.dtype, points.device)
        if key not in self._torch_cache:
            self._torch_cache[key] = torch.as_tensor(
                self._flat, dtype=points.dtype, device=points.device
            )
        flat = self._torch_cache[key]
        lower = torch.as_tensor(self.lower, dtype=points.dtype, device=points.device)
        spacing = torch.as_tensor(self.spacing, dtype=points.dtype, device=points.device)
        counts = torch.as_tensor(self.counts, device=points.device)
        strides = torch.as_tensor(self._strides, device=points.device)
        scaled = (points - lower) / spacing
        if self.periodic:
            scaled = torch.remainder(scaled, counts.to(points.dtype))
        base = torch.minimum(torch.clamp(torch.floor(scaled.detach()).long(), min=0), counts - 1)
        local = scaled - base.to(points.dtype)
        order = torch.argsort(-local.detach(), dim=1, stable=True)
        flat_index = (base * strides).sum(dim=1)
        previous = flat[flat_index]
        result = previous
        for k in range(self.dim):
            axis = order[:, k]
            flat_index = flat_index + strides[axis]
            current = flat[flat_index]
            weight = torch.gather(local, 1, axis[:, None])
            result = result + weight * (current - previous)
            previous = current
        return result


def _lattice_indices(coordinates: np.ndarray, lower: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    scaled = (coordinates - lower) / spacing
    indices = np.rint(scaled).astype(np.int64)
    if not np.allclose(scaled, indices, atol=1e-6):
        raise ValueError("mesh: the dof coordinates do not lie on a box lattice")
    return indices


def _gather_lattice(
    functions: Sequence[dolfinx.fem.Function],
    lower: np.ndarray,
    lengths: np.ndarray,
    counts: np.ndarray,
    periodic: bool = False,
) -> LatticeFunction:
    """Gather P1 functions on a lattice mesh to every rank (collective on the mesh's comm)."""
    space = functions[0].function_space
    comm = space.mesh.comm
    dim = len(counts)
    owned = space.dofmap.index_map.size_local
    spacing = lengths / counts
    indices = _lattice_indices(space.tabulate_dof_coordinates()[:owned, :dim], lower, spacing)
    values = np.stack([f.x.array[:owned] for f in functions], axis=-1)
    all_indices = np.concatenate(comm.allgather(indices))
    all_values = np.concatenate(comm.allgather(values))
    lattice = np.full((*(counts + 1), len(functions)), np.nan)
    lattice[tuple(all_indices.T)] = all_values
    if np.isnan(lattice).any():
        raise ValueError("mesh: the P1 dofs do not cover the box lattice (not a lattice mesh?)")
    return LatticeFunction(lattice, lower, lengths, periodic=periodic)


# -- coefficients ------------------------------------------------------------------------------
def _evaluate_definition(
    function: Callable[..., Any], args: tuple[Any, ...], backend: str, like: Any
) -> Any:
    """Evaluate a definition returning a scalar or a nested d x d list, as array/UFL."""
    m = math_namespace(backend)
    value = function(*args, m)
    if isinstance(value, (list, tuple)):
        if backend == "ufl":
            return ufl.as_matrix([[ufl.as_ufl(entry) for entry in row] for row in value])
        rows = [
            [np.broadcast_to(np.asarray(entry, dtype=np.float64), like.shape) for entry in row]
            for row in value
        ]
        return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)
    if backend == "ufl":
        return ufl.as_ufl(value)
    return np.broadcast_to(np.asarray(value, dtype=np.float64), like.shape).astype(np.float64)


def _check_elliptic(values: np.ndarray, dim: int) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError("coefficient: a(y) is not finite on the cell (NaN or inf)")
    if values.ndim == 1:
        lowest = float(values.min())
    else:
        if values.shape[1:] != (dim, dim):
            raise ValueError(f"coefficient: a tensor coefficient must be {dim} x {dim}")
        if not np.allclose(values, np.swapaxes(values, 1, 2), atol=1e-12 * np.abs(values).max()):
            raise ValueError("coefficient: the tensor a(y) is not symmetric")
        lowest = float(np.linalg.eigvalsh(values).min())
    if not lowest > 0:
        raise ValueError(
            f"coefficient: a(y) must be positive definite on the cell, min = {lowest:.4g}"
        )


def _cell_counts(cell_lengths: np.ndarray, n: int | Sequence[int]) -> np.ndarray:
    if np.isscalar(n):
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"n must be a positive integer (cells per unit length), got {n!r}")
        raw = n * cell_lengths
        counts = np.rint(raw).astype(np.int64)
        if not np.allclose(raw, counts, rtol=1e-10) or np.any(counts < 1):
            raise ValueError(
                f"n = {n} cells per unit length does not give an integer cell count on the cell "
                f"lengths {cell_lengths.tolist()}: pass one count per direction"
            )
        return counts
    counts = np.asarray([int(c) for c in n], dtype=np.int64)  # type: ignore[union-attr]
    if len(counts) != len(cell_lengths) or np.any(counts < 1):
        raise ValueError(
            f"n must be positive cell counts, one per direction ({len(cell_lengths)}), got {n}"
        )
    return counts


def _create_box_mesh(
    comm: MPI.Comm, lower: np.ndarray, upper: np.ndarray, counts: np.ndarray
) -> Any:
    from dolfinx import mesh as dmesh

    dim = len(counts)
    if dim == 1:
        return dmesh.create_interval(comm, int(counts[0]), [float(lower[0]), float(upper[0])])
    if dim == 2:
        return dmesh.create_rectangle(
            comm,
            [lower.tolist(), upper.tolist()],
            counts.tolist(),
            cell_type=dmesh.CellType.triangle,
        )
    return dmesh.create_box(
        comm,
        [lower.tolist(), upper.tolist()],
        counts.tolist(),
        cell_type=dmesh.CellType.tetrahedron,
    )


def _flux(coefficient: Any, vector: Any) -> Any:
    return ufl.dot(coefficient, vector) if len(coefficient.ufl_shape) == 2 else coefficient * vector


def _make_ksp(
    comm: MPI.Comm, operator: PETSc.Mat, prefix: str, options: dict[str, Any] | None
) -> PETSc.KSP:
    """A KSP with the package's precedence (:mod:`dolfinx_pinn.ksp`), MUMPS LU by default."""
    return create_ksp(comm, operator, prefix, options, DIRECT)


# -- cell problems -----------------------------------------------------------------------------
@dataclass
class CellSolution:
    """Solution of the periodic cell problems [HS 2.5].

    Attributes:
        correctors: The correctors ``N^i`` (zero mean, periodic) as DOLFINx P1 functions.
        tensor: The homogenised tensor ``a^0`` (``d x d`` numpy array, identical on all ranks).
        cell_lengths: The cell ``[0, p_1] x ... x [0, p_d]``.
        counts: Cells per direction of the cell mesh.
        lattice: The correctors as a periodic :class:`LatticeFunction` (``k = d`` values),
            available on every rank.
        slow_point: The slow point ``x`` of a locally periodic coefficient, else ``None``.
    """

    correctors: list[dolfinx.fem.Function]
    tensor: np.ndarray
    cell_lengths: np.ndarray
    counts: np.ndarray
    lattice: LatticeFunction
    slow_point: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Spatial dimension."""
        return len(self.cell_lengths)

    def correctors_at(self, y: Any) -> Any:
        """``N^j(y)`` at points ``(N, d)`` of the fast variable (periodically extended): ``(N, d)``.

        numpy or torch (differentiable) input; local to the calling rank.
        """
        return self.lattice(y)

    def corrector_gradients_at(self, y: npt.ArrayLike) -> np.ndarray:
        """``grad_y N^j(y)`` at points ``(N, d)``: shape ``(N, d, d)``, index ``[n, j, k]``."""
        return self.lattice.gradient(y)


def _cell_coefficient(
    coefficient: MultiscaleProblem | Callable[..., Any],
    dim: int | None,
    cell_lengths: Sequence[float] | None,
    locally_periodic: bool,
) -> tuple[int, np.ndarray, Callable[..., Any], Callable[..., Any]]:
    """The cell's dimension and edge lengths, and a(y) (or a(x, y)) for UFL and numpy.

    A periodic problem gives ``a(y) = K(ε y)`` on the box of its period vector; a plain
    definition ``a(y, m)`` (``a(x, y, m)`` when locally periodic) is evaluated through the
    package's math namespaces.
    """
    if isinstance(coefficient, MultiscaleProblem):
        problem = coefficient
        if problem.period is None:
            raise ValueError(f"coefficient: problem {problem.name!r} has no period vector")
        if locally_periodic:
            raise ValueError("locally_periodic: a MultiscaleProblem defines a periodic a(y)")
        if dim is not None and dim != problem.dim:
            raise ValueError(f"dim = {dim} does not match the problem's dimension {problem.dim}")
        lengths = np.asarray(problem.period, dtype=np.float64)
        if cell_lengths is not None and not np.allclose(cell_lengths, lengths):
            raise ValueError(
                f"cell_lengths {list(cell_lengths)} differ from the problem's period "
                f"{lengths.tolist()}"
            )
        eps = problem.eps

        def ufl_coefficient(y: Any, x: Any) -> Any:
            return problem.K(eps * y)

        def numpy_coefficient(y: np.ndarray, x: Any) -> np.ndarray:
            return problem.K(eps * y)

        dim = problem.dim
    elif callable(coefficient):
        if dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3 for a plain coefficient definition, got {dim}")
        lengths = (
            np.ones(dim) if cell_lengths is None else np.asarray(cell_lengths, dtype=np.float64)
        )
        if lengths.shape != (dim,) or not np.all(np.isfinite(lengths) & (lengths > 0)):
            raise ValueError(
                f"cell_lengths must be {dim} finite positive numbers, got {cell_lengths}"
            )
        expected = 3 if locally_periodic else 2
        try:
            parameters = len(inspect.signature(coefficient).parameters)
        except (TypeError, ValueError):
            parameters = expected
        if parameters != expected:
            raise ValueError(
                f"coefficient: expected a definition with {expected} arguments "
                f"({'a(x, y, m)' if locally_periodic else 'a(y, m)'}), got {parameters}"
            )
        definition = coefficient

        def ufl_coefficient(y: Any, x: Any) -> Any:
            components = tuple(y[j] for j in range(dim))
            args = (
                (tuple(x[j] for j in range(dim)), components) if locally_periodic else (components,)
            )
            return _evaluate_definition(definition, args, "ufl", None)

        def numpy_coefficient(y: np.ndarray, x: Any) -> np.ndarray:
            components = tuple(y[:, j] for j in range(dim))
            if locally_periodic:
                slow = tuple(np.full(len(y), x[j]) for j in range(dim))
                args: tuple[Any, ...] = (slow, components)
            else:
                args = (components,)
            return _evaluate_definition(definition, args, "numpy", y[:, 0])
    else:
        raise ValueError(
            "coefficient must be a MultiscaleProblem or a callable definition, got "
            f"{type(coefficient)}"
        )
    return int(dim), lengths, ufl_coefficient, numpy_coefficient  # type: ignore[arg-type]


class CellProblem:
    """The periodic cell problems [HS 2.5] on ``Y = [0, p_1] x ... x [0, p_d]`` with P1 elements.

    Args:
        coefficient: A periodic :class:`~dolfinx_pinn.problems.MultiscaleProblem` (then
            ``a(y) = K(eps y)`` and the cell is the box of its period vector), a definition
            ``a(y, m)`` or, with ``locally_periodic=True``, ``a(x, y, m)``; it returns a scalar
            or a ``d x d`` nested list (SPD).
        n: Cells per unit length of ``y`` (an int; the cell then has ``n p_j`` cells in
            direction j, which must be integers) or one cell count per direction.
        dim: Dimension (1, 2 or 3) of a plain definition.
        cell_lengths: The cell edge lengths for a plain definition (default all 1).
        locally_periodic: The definition is ``a(x, y, m)``; :meth:`solve` then needs a slow point.
        comm: MPI communicator of the cell mesh.
        quadrature_degree: Quadrature degree of the forms (default: UFL's estimate).
        petsc_options: PETSc options of the reduced solve (default MUMPS LU).

    The reduced matrix ``P^T A P`` is assembled and factorised once (per slow point); the ``d``
    correctors are solved with that factorisation. Collective on ``comm``; call :meth:`destroy`
    (or use the object as a context manager) to free the PETSc objects.
    """

    def __init__(
        self,
        coefficient: MultiscaleProblem | Callable[..., Any],
        n: int | Sequence[int],
        *,
        dim: int | None = None,
        cell_lengths: Sequence[float] | None = None,
        locally_periodic: bool = False,
        comm: MPI.Comm = MPI.COMM_WORLD,
        quadrature_degree: int | None = None,
        petsc_options: dict[str, Any] | None = None,
    ) -> None:
        dim, lengths, ufl_coefficient, numpy_coefficient = _cell_coefficient(
            coefficient, dim, cell_lengths, locally_periodic
        )
        if quadrature_degree is not None and not (
            isinstance(quadrature_degree, int) and quadrature_degree >= 1
        ):
            raise ValueError(
                f"quadrature_degree must be a positive integer, got {quadrature_degree!r}"
            )

        self.dim = int(dim)  # type: ignore[arg-type]
        self.comm = comm
        self.cell_lengths = lengths
        self.counts = _cell_counts(lengths, n)
        self.locally_periodic = locally_periodic
        self._numpy_coefficient = numpy_coefficient
        self._petsc_options = dict(petsc_options or {})
        self._prefix = unique_prefix("cell")
        self.volume = float(np.prod(lengths))

        self.mesh = _create_box_mesh(comm, np.zeros(self.dim), lengths, self.counts)
        self.space = dolfinx.fem.functionspace(self.mesh, ("Lagrange", 1))
        y = ufl.SpatialCoordinate(self.mesh)
        self._slow_point = dolfinx.fem.Constant(self.mesh, np.zeros(self.dim))
        a_y = ufl_coefficient(y, self._slow_point)
        self._direction = dolfinx.fem.Constant(self.mesh, np.zeros(self.dim))
        self._test_direction = dolfinx.fem.Constant(self.mesh, np.zeros(self.dim))
        self._work = dolfinx.fem.Function(self.space)
        trial, test = ufl.TrialFunction(self.space), ufl.TestFunction(self.space)
        metadata = {} if quadrature_degree is None else {"quadrature_degree": quadrature_degree}
        dx = ufl.Measure("dx", domain=self.mesh, metadata=metadata)
        self._bilinear = dolfinx.fem.form(
            ufl.inner(_flux(a_y, ufl.grad(trial)), ufl.grad(test)) * dx
        )
        self._linear = dolfinx.fem.form(
            -ufl.inner(_flux(a_y, self._direction), ufl.grad(test)) * dx
        )
        self._tensor_entry = dolfinx.fem.form(
            ufl.inner(_flux(a_y, self._direction + ufl.grad(self._work)), self._test_direction) * dx
        )
        self._mean = dolfinx.fem.form(self._work * dx)

        self._restriction, self._pinned = self._build_restriction()
        self._matrix: PETSc.Mat | None = None
        self._reduced: PETSc.Mat | None = None
        self._ksp: PETSc.KSP | None = None
        self._assembled_at: np.ndarray | None = None
        self._rhs = dolfinx.fem.petsc.create_vector(self.space)
        # Both live in the reduced (column) space of P.
        self._reduced_rhs = self._restriction.createVecRight()
        self._reduced_solution = self._restriction.createVecRight()

    # -- periodic restriction --------------------------------------------------------------------
    def _build_restriction(self) -> tuple[PETSc.Mat, int]:
        """The restriction matrix P (all dofs x periodic dofs) and the pinned reduced index."""
        index_map = self.space.dofmap.index_map
        owned = index_map.size_local
        start = index_map.local_range[0]
        total = index_map.size_global
        spacing = self.cell_lengths / self.counts
        coordinates = self.space.tabulate_dof_coordinates()[:owned, : self.dim]
        indices = _lattice_indices(coordinates, np.zeros(self.dim), spacing)
        # Cell meshes are small: every rank gets the whole lattice -> global dof table, so a
        # slave whose master lives on another rank needs no point-to-point search.
        all_indices = np.concatenate(self.comm.allgather(indices))
        all_global = np.concatenate(
            self.comm.allgather(np.arange(start, start + owned, dtype=np.int64))
        )
        lattice_to_global = np.full(self.counts + 1, -1, dtype=np.int64)
        lattice_to_global[tuple(all_indices.T)] = all_global
        master_of = np.empty(total, dtype=np.int64)
        master_of[all_global] = lattice_to_global[tuple((all_indices % self.counts).T)]
        is_master = master_of == np.arange(total)
        reduced_of = np.full(total, -1, dtype=np.int64)
        reduced_of[is_master] = np.arange(int(is_master.sum()))
        reduced_total = int(is_master.sum())
        reduced_owned = int(is_master[start : start + owned].sum())
        columns = reduced_of[master_of[start : start + owned]].astype(PETSc.IntType)
        indptr = np.arange(owned + 1, dtype=PETSc.IntType)
        restriction = PETSc.Mat().createAIJ(
            size=((owned, total), (reduced_owned, reduced_total)),
            csr=(indptr, columns, np.ones(owned)),
            comm=self.comm,
        )
        restriction.assemble()
        pinned = int(reduced_of[lattice_to_global[(0,) * self.dim]])
        return restriction, pinned

    def _assemble(self, slow_point: np.ndarray | None) -> None:
        if self._ksp is not None and (
            slow_point is None or np.array_equal(slow_point, self._assembled_at)
        ):
            return
        if slow_point is not None:
            self._slow_point.value[:] = slow_point
        self._destroy_operators()
        self._matrix = dolfinx.fem.petsc.assemble_matrix(self._bilinear)
        self._matrix.assemble()
        self._reduced = self._matrix.PtAP(self._restriction)
        start, end = self._reduced.getOwnershipRange()
        rows = [self._pinned] if start <= self._pinned < end else []
        # Pinning one dof removes the constants from the kernel; the pinned equation is implied
        # by the others (the rows of the periodic system sum to zero), so nothing is lost.
        self._reduced.zeroRowsColumns(rows, diag=1.0)
        self._ksp = _make_ksp(self.comm, self._reduced, self._prefix, self._petsc_options)
        self._assembled_at = None if slow_point is None else slow_point.copy()

    def _validate_coefficient(self, slow_point: np.ndarray | None) -> None:
        rng = np.random.default_rng(7)
        samples = rng.random((512, self.dim)) * self.cell_lengths
        _check_elliptic(np.asarray(self._numpy_coefficient(samples, slow_point)), self.dim)

    def solve(self, slow_point: npt.ArrayLike | None = None) -> CellSolution:
        """Solve the ``d`` cell problems and compute ``a^0`` (collective on ``comm``).

        Args:
            slow_point: The slow variable ``x`` (shape ``(d,)``) of a locally periodic
                coefficient; must be omitted for a periodic one.

        Returns:
            A :class:`CellSolution` with new corrector functions.
        """
        point = None
        if self.locally_periodic:
            if slow_point is None:
                raise ValueError(
                    "slow_point: a locally periodic coefficient needs the slow point x"
                )
            point = np.asarray(slow_point, dtype=np.float64).reshape(-1)
            if point.shape != (self.dim,) or not np.all(np.isfinite(point)):
                raise ValueError(f"slow_point must be {self.dim} finite numbers, got {slow_point}")
        elif slow_point is not None:
            raise ValueError("slow_point: only a locally periodic coefficient takes a slow point")
        if self._ksp is None or point is not None:
            self._validate_coefficient(point)
        self._assemble(point)
        assert self._ksp is not None
        correctors = []
        for i in range(self.dim):
            self._direction.value[:] = np.eye(self.dim)[i]
            with self._rhs.localForm() as local:
                local.set(0.0)
            dolfinx.fem.petsc.assemble_vector(self._rhs, self._linear)
            self._rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            self._restriction.multTranspose(self._rhs, self._reduced_rhs)
            start, end = self._reduced_rhs.getOwnershipRange()
            if start <= self._pinned < end:
                self._reduced_rhs.setValue(self._pinned, 0.0)
            self._reduced_rhs.assemble()
            self._ksp.solve(self._reduced_rhs, self._reduced_solution)
            reason = self._ksp.getConvergedReason()
            if reason < 0:
                raise RuntimeError(f"cell problem {i}: the PETSc solve failed (reason {reason})")
            corrector = dolfinx.fem.Function(self.space, name=f"N{i}")
            self._restriction.mult(self._reduced_solution, corrector.x.petsc_vec)
            corrector.x.scatter_forward()
            self._work.x.array[:] = corrector.x.array
            mean = self.comm.allreduce(dolfinx.fem.assemble_scalar(self._mean), op=MPI.SUM)
            corrector.x.array[:] -= mean / self.volume
            correctors.append(corrector)
        tensor = np.zeros((self.dim, self.dim))
        for j, corrector in enumerate(correctors):
            self._work.x.array[:] = corrector.x.array
            self._direction.value[:] = np.eye(self.dim)[j]
            for i in range(self.dim):
                self._test_direction.value[:] = np.eye(self.dim)[i]
                local = dolfinx.fem.assemble_scalar(self._tensor_entry)
                tensor[i, j] = self.comm.allreduce(local, op=MPI.SUM) / self.volume
        lattice = _gather_lattice(
            correctors, np.zeros(self.dim), self.cell_lengths, self.counts, periodic=True
        )
        return CellSolution(
            correctors, tensor, self.cell_lengths.copy(), self.counts.copy(), lattice, point
        )

    def homogenized_tensor(self, slow_point: npt.ArrayLike | None = None) -> np.ndarray:
        """Only the homogenised tensor ``a^0`` (at ``slow_point`` for a locally periodic a)."""
        return self.solve(slow_point).tensor

    def _destroy_operators(self) -> None:
        for name in ("_ksp", "_reduced", "_matrix"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.destroy()
                setattr(self, name, None)

    def destroy(self) -> None:
        """Free the PETSc objects (collective on ``comm``)."""
        self._destroy_operators()
        for name in ("_restriction", "_rhs", "_reduced_rhs", "_reduced_solution"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.destroy()
                setattr(self, name, None)

    def __enter__(self) -> CellProblem:
        return self

    def __exit__(self, *args: object) -> None:
        self.destroy()


def solve_cell_problem(
    coefficient: MultiscaleProblem | Callable[..., Any],
    n: int | Sequence[int],
    **kwargs: Any,
) -> CellSolution:
    """Solve the periodic cell problems once and free the solver (collective).

    Args:
        coefficient: As in :class:`CellProblem`.
        n: Cells per unit length of ``y`` or per direction.
        **kwargs: Further :class:`CellProblem` arguments (``dim``, ``cell_lengths``, ``comm``, ...).
            ``slow_point`` is passed to :meth:`CellProblem.solve`.

    Returns:
        The :class:`CellSolution`.
    """
    slow_point = kwargs.pop("slow_point", None)
    with CellProblem(coefficient, n, **kwargs) as cell:
        return cell.solve(slow_point)


def cell_problem_from(problem: MultiscaleProblem, n: int = 16, **kwargs: Any) -> CellSolution:
    """The cell solution of a periodic problem, ``a(y) = K(eps y)`` on the box of its period."""
    return solve_cell_problem(problem, n, **kwargs)


def voigt_reuss_bounds(
    coefficient: Callable[..., Any],
    dim: int,
    cell_lengths: Sequence[float] | None = None,
    samples: int = 200_000,
) -> tuple[float, float]:
    """Reuss (harmonic mean) and Voigt (arithmetic mean) bounds of a scalar ``a(y, m)``.

    Every eigenvalue of ``a^0`` lies between them. Monte-Carlo means over ``samples`` points
    (a fixed seed); local, no MPI.
    """
    lengths = np.ones(dim) if cell_lengths is None else np.asarray(cell_lengths, dtype=np.float64)
    rng = np.random.default_rng(11)
    y = rng.random((samples, dim)) * lengths
    values = _evaluate_definition(
        coefficient, (tuple(y[:, j] for j in range(dim)),), "numpy", y[:, 0]
    )
    if values.ndim != 1:
        raise ValueError("coefficient: the Voigt-Reuss bounds here are for a scalar a(y)")
    return float(1.0 / np.mean(1.0 / values)), float(np.mean(values))


# -- homogenised problem and two-scale reconstruction -------------------------------------------
def _box_counts(problem: MultiscaleProblem, n: int | Sequence[int]) -> np.ndarray:
    counts = np.full(problem.dim, int(n)) if np.isscalar(n) else np.asarray(n, dtype=np.int64)  # type: ignore[arg-type]
    if counts.shape != (problem.dim,) or np.any(counts < 1):
        raise ValueError(f"n must be a positive cell count (or one per direction), got {n}")
    return counts


def solve_homogenized(
    problem: MultiscaleProblem,
    tensor: npt.ArrayLike,
    n: int | Sequence[int] = 64,
    *,
    comm: MPI.Comm = MPI.COMM_WORLD,
    petsc_options: dict[str, Any] | None = None,
) -> dolfinx.fem.Function:
    """Solve the homogenised problem for the lifted solution ``w_0`` (collective on ``comm``).

    ``-div(a^0 grad w_0) = q`` in the domain, ``w_0 = x_i`` on the boundary (i the problem's
    lifting direction), with P1 elements on the problem's lattice mesh ``n`` (cells per
    direction). ``u_0 = w_0 - x_i`` is the homogenised limit of the package's ``u`` (4.8).

    Args:
        problem: The multiscale problem (its source q, domain and lifting direction).
        tensor: The homogenised tensor ``a^0`` (``d x d``, SPD).
        n: Cells per direction of the coarse mesh.
        comm: MPI communicator.
        petsc_options: PETSc options (default MUMPS LU).

    Returns:
        ``w_0`` as a DOLFINx P1 function on the coarse mesh.
    """
    tensor = np.atleast_2d(np.asarray(tensor, dtype=np.float64))
    if tensor.shape != (problem.dim, problem.dim) or not np.all(np.isfinite(tensor)):
        raise ValueError(
            f"tensor must be a finite {problem.dim} x {problem.dim} array, got {tensor.shape}"
        )
    if (
        not np.allclose(tensor, tensor.T, atol=1e-8 * np.abs(tensor).max())
        or np.linalg.eigvalsh(0.5 * (tensor + tensor.T)).min() <= 0
    ):
        raise ValueError("tensor must be symmetric positive definite")
    counts = _box_counts(problem, n)
    mesh = problem.create_mesh(comm, counts.tolist())
    space = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    a0 = dolfinx.fem.Constant(mesh, 0.5 * (tensor + tensor.T))
    w, v = ufl.TrialFunction(space), ufl.TestFunction(space)
    x = ufl.SpatialCoordinate(mesh)
    bilinear = ufl.inner(ufl.dot(a0, ufl.grad(w)), ufl.grad(v)) * ufl.dx
    # A zero Constant keeps the form non-empty when q is the literal 0 (e.g. laminate_2d).
    source = problem.q(x) + dolfinx.fem.Constant(mesh, 0.0)
    linear = source * v * ufl.dx
    direction = problem.lifting_direction
    boundary_data = dolfinx.fem.Function(space)
    boundary_data.interpolate(lambda points: points[direction])
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
    dofs = dolfinx.fem.locate_dofs_topological(space, tdim - 1, facets)
    bc = dolfinx.fem.dirichletbc(boundary_data, dofs)
    solution = dolfinx.fem.Function(space, name="w0")
    return solve_linear(
        bilinear, linear, [bc], "homogenized", petsc_options, DIRECT, solution=solution
    )


class TwoScaleApproximation:
    """The first-order two-scale approximation ``u ~ u_0 + eps u_1(x, x/eps)`` [HS 2.4-2.6].

    With the lifting ``w = u + x_i`` of (4.8):
    ``w(x) ~ w_0(x) + eps sum_j G_j(x) N^j(x/eps)`` and ``u = w - x_i``, where ``G ~ grad w_0``
    is the gradient of the P1 ``w_0`` recovered at the nodes by second-order finite differences
    on the coarse lattice (a continuous P1 field, so that ``u_1`` is continuous). The gradient
    :meth:`gradient` is the leading-order ``grad u_0 + grad_y u_1(x, x/eps)`` of [HS 2.7].

    Evaluation is local to each rank (the coarse solution and the correctors are gathered at
    construction, collective on their communicators); numpy and torch (differentiable) inputs.

    Args:
        problem: The periodic multiscale problem (eps, period, lifting direction).
        cell: The :class:`CellSolution` of its cell problems.
        homogenized: ``w_0`` from :func:`solve_homogenized` (a P1 function on a lattice mesh
            of the problem's domain).
    """

    def __init__(
        self, problem: MultiscaleProblem, cell: CellSolution, homogenized: dolfinx.fem.Function
    ) -> None:
        if problem.period is None or not np.allclose(problem.period, cell.cell_lengths):
            raise ValueError(
                "cell: the cell lengths must equal the problem's period vector "
                f"({problem.period}), got {cell.cell_lengths.tolist()}"
            )
        if cell.slow_point is not None:
            raise ValueError(
                "cell: the reconstruction needs a periodic (not locally periodic) cell solution"
            )
        problem.check_mesh(homogenized.function_space.mesh)
        self.problem = problem
        self.cell = cell
        self.eps = problem.eps
        lower = np.asarray(problem.domain.lower, dtype=np.float64)
        lengths = problem.domain.lengths
        mesh = homogenized.function_space.mesh
        num_cells = mesh.topology.index_map(mesh.topology.dim).size_global
        counts = self._coarse_counts(homogenized, lower, lengths, num_cells)
        w0 = _gather_lattice([homogenized], lower, lengths, counts).values[..., 0]
        spacing = lengths / counts
        gradient = (
            np.gradient(w0, *spacing, edge_order=2)
            if problem.dim > 1
            else [np.gradient(w0, spacing[0], edge_order=2)]
        )
        self.coarse = LatticeFunction(np.stack([w0, *gradient], axis=-1), lower, lengths)
        self.homogenized_tensor = cell.tensor

    @staticmethod
    def _coarse_counts(
        function: dolfinx.fem.Function, lower: np.ndarray, lengths: np.ndarray, num_cells: int
    ) -> np.ndarray:
        space = function.function_space
        comm = space.mesh.comm
        owned = space.dofmap.index_map.size_local
        coordinates = space.tabulate_dof_coordinates()[:owned, : len(lengths)]
        # The smallest positive coordinate step per axis is the lattice spacing.
        counts = []
        for j in range(len(lengths)):
            values = np.unique(np.concatenate(comm.allgather(np.round(coordinates[:, j], 12))))
            counts.append(len(values) - 1)
        counts_array = np.asarray(counts, dtype=np.int64)
        simplices = math.factorial(len(lengths)) * int(np.prod(counts_array))
        if simplices != num_cells:
            raise ValueError(
                "homogenized: the function must be P1 on a lattice (Kuhn) mesh of the domain"
            )
        return counts_array

    def _split(self, x: Any) -> tuple[Any, Any, Any]:
        coarse = self.coarse(x)
        return coarse[:, 0], coarse[:, 1:], self.cell.lattice(x / self.eps)

    def w(self, x: Any) -> Any:
        """The lifted approximation ``w_0 + eps sum_j G_j N^j(x/eps)`` at points ``(N, d)``."""
        w0, gradient, correctors = self._split(x)
        return w0 + self.eps * (gradient * correctors).sum(axis=1)

    def __call__(self, x: Any) -> Any:
        """``u_0 + eps u_1`` at points ``(N, d)`` (numpy or torch): shape ``(N,)``."""
        return self.w(x) - x[:, self.problem.lifting_direction]

    def homogenized(self, x: Any) -> Any:
        """``u_0 = w_0 - x_i`` at points ``(N, d)``."""
        return self.coarse(x)[:, 0] - x[:, self.problem.lifting_direction]

    def corrector(self, x: Any) -> Any:
        """``u_1(x, x/eps) = sum_j G_j(x) N^j(x/eps)`` at points ``(N, d)``."""
        _, gradient, correctors = self._split(x)
        return (gradient * correctors).sum(axis=1)

    def gradient(self, x: npt.ArrayLike) -> np.ndarray:
        """``grad u_0 + grad_y u_1(x, x/eps)`` [HS 2.7] at points ``(N, d)`` (numpy): ``(N, d)``."""
        x = np.asarray(x, dtype=np.float64)
        coarse = self.coarse(x)
        gradient = coarse[:, 1:]
        corrector_gradients = self.cell.lattice.gradient(x / self.eps)  # (N, j, k)
        result = gradient + np.einsum("nj,njk->nk", gradient, corrector_gradients)
        result[:, self.problem.lifting_direction] -= 1.0
        return result


# -- error study --------------------------------------------------------------------------------
def _solve_fine(
    problem: MultiscaleProblem, counts: Sequence[int], comm: MPI.Comm
) -> dolfinx.fem.Function:
    """P1 solution of the fine problem (4.8) on the lattice mesh ``counts`` (MUMPS)."""
    from dolfinx_pinn.reference import solve_fine

    return solve_fine(problem, n=list(counts), comm=comm)


def two_scale_error(
    approximation: TwoScaleApproximation, fine: dolfinx.fem.Function, quadrature_degree: int = 4
) -> tuple[float, float]:
    """Relative errors of the two-scale approximation against a fine FE solution of (4.8).

    Returns ``(energy, l2)``: ``||grad u_h - (grad u_0 + grad_y u_1)|| / ||grad u_h||`` [HS 2.7]
    and ``||u_h - (u_0 + eps u_1)|| / ||u_h||``, by quadrature on the fine mesh's owned cells
    (collective on its communicator).
    """
    mesh = fine.function_space.mesh
    approximation.problem.check_mesh(mesh)
    tdim = mesh.topology.dim
    cell_type = mesh.topology.cell_type
    points, weights = basix.make_quadrature(basix.CellType[cell_type.name], quadrature_degree)
    num_owned = mesh.topology.index_map(tdim).size_local
    cells = np.arange(num_owned, dtype=np.int32)
    x = ufl.SpatialCoordinate(mesh)
    evaluate = {
        "x": ufl.as_vector([x[j] for j in range(tdim)]),
        "grad": ufl.grad(fine),
        "u": fine,
        "detJ": abs(ufl.JacobianDeterminant(mesh)),
    }
    values = {
        name: dolfinx.fem.Expression(expression, points).eval(mesh, cells)
        for name, expression in evaluate.items()
    }
    flat_x = values["x"].reshape(-1, tdim)
    quadrature = (values["detJ"].reshape(num_owned, -1) * weights).reshape(-1)
    grad_fine = values["grad"].reshape(-1, tdim)
    u_fine = values["u"].reshape(-1)
    grad_error = np.sum((grad_fine - approximation.gradient(flat_x)) ** 2, axis=1)
    value_error = (u_fine - approximation(flat_x)) ** 2
    sums = np.array(
        [
            quadrature @ grad_error,
            quadrature @ np.sum(grad_fine**2, axis=1),
            quadrature @ value_error,
            quadrature @ u_fine**2,
        ]
    )
    sums = mesh.comm.allreduce(sums, op=MPI.SUM)
    return float(np.sqrt(sums[0] / sums[1])), float(np.sqrt(sums[2] / sums[3]))


@dataclass
class TwoScaleErrorStudy:
    """Result of :func:`two_scale_error_study`.

    Attributes:
        eps: The scales.
        energy_errors: ``||grad(u^eps - u_0 - eps u_1)|| / ||grad u^eps||`` (the [HS 2.7] form).
        l2_errors: ``||u^eps - u_0 - eps u_1|| / ||u^eps||``.
        homogenized_l2_errors: ``||u^eps - u_0|| / ||u^eps||`` (without the corrector).
        rate: Fitted exponent r of ``energy_error ~ C eps^r`` (the paper proves r >= 1/2).
        constant: The fitted C.
        tensor: The homogenised tensor used.
        fine_counts: Fine-mesh cells per direction for each eps.
    """

    eps: list[float]
    energy_errors: list[float]
    l2_errors: list[float]
    homogenized_l2_errors: list[float]
    rate: float
    constant: float
    tensor: np.ndarray
    fine_counts: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "eps": self.eps,
            "energy_errors": self.energy_errors,
            "l2_errors": self.l2_errors,
            "homogenized_l2_errors": self.homogenized_l2_errors,
            "rate": self.rate,
            "constant": self.constant,
            "tensor": self.tensor.tolist(),
            "fine_counts": self.fine_counts,
        }


def two_scale_error_study(
    problem_factory: Callable[[float], MultiscaleProblem],
    eps_values: Sequence[float],
    *,
    cell_resolution: int = 8,
    coarse_n: int = 64,
    comm: MPI.Comm = MPI.COMM_WORLD,
    fine_solver: Callable[[MultiscaleProblem, Sequence[int], MPI.Comm], dolfinx.fem.Function]
    | None = None,
) -> TwoScaleErrorStudy:
    """The two-scale error against fine FE solutions for a sequence of eps (collective).

    For each eps the fine problem (4.8) is solved with P1 elements on the lattice mesh with
    ``cell_resolution / eps`` cells per unit length: it is then aligned with the cell mesh
    (``cell_resolution`` cells per unit length of y), so the pulled-back correctors are exactly
    fine-mesh P1 functions and the comparison is between consistent discretisations. The cell
    problem and the homogenised problem (``coarse_n`` cells per direction) are solved once when
    the cell coefficient ``K(eps y)`` does not depend on eps (checked on samples).

    Args:
        problem_factory: ``eps -> MultiscaleProblem`` (periodic), e.g. ``paper_2d``.
        eps_values: At least two scales in (0, 1].
        cell_resolution: Cells per unit length of the fast variable.
        coarse_n: Cells per direction of the homogenised problem's mesh.
        comm: MPI communicator.
        fine_solver: ``(problem, counts, comm) -> u_h`` (default:
            :func:`dolfinx_pinn.reference.solve_fine`, P1 with MUMPS).

    Returns:
        A :class:`TwoScaleErrorStudy`.
    """
    eps_list = [float(e) for e in eps_values]
    if len(eps_list) < 2 or not all(0 < e <= 1 for e in eps_list):
        raise ValueError(f"eps_values must hold at least two scales in (0, 1], got {eps_values}")
    if not (isinstance(cell_resolution, int) and cell_resolution >= 1):
        raise ValueError(f"cell_resolution must be a positive integer, got {cell_resolution!r}")
    fine_solver = fine_solver or _solve_fine
    problems = [problem_factory(e) for e in eps_list]
    reference = problems[0]
    if reference.period is None:
        raise ValueError("problem_factory: the problems must be periodic (have a period vector)")
    rng = np.random.default_rng(3)
    samples = rng.random((256, reference.dim)) * np.asarray(reference.period)
    base = reference.K(reference.eps * samples)
    same_cell = all(
        p.period == reference.period
        and np.allclose(p.K(p.eps * samples), base, rtol=1e-12, atol=1e-12)
        for p in problems
    )
    cell = cell_problem_from(reference, cell_resolution, comm=comm)
    homogenized = solve_homogenized(reference, cell.tensor, coarse_n, comm=comm)
    energy, l2, l2_homogenized, fine_counts = [], [], [], []
    for problem in problems:
        if not same_cell and problem is not reference:
            cell = cell_problem_from(problem, cell_resolution, comm=comm)
            homogenized = solve_homogenized(problem, cell.tensor, coarse_n, comm=comm)
        counts = (
            np.rint(cell_resolution * problem.domain.lengths / problem.eps).astype(int).tolist()
        )
        fine = fine_solver(problem, counts, comm)
        approximation = TwoScaleApproximation(problem, cell, homogenized)
        e_energy, e_l2 = two_scale_error(approximation, fine)
        energy.append(e_energy)
        l2.append(e_l2)
        l2_homogenized.append(_homogenized_l2_error(approximation, fine))
        fine_counts.append(counts)
    slope, intercept = np.polyfit(np.log(eps_list), np.log(energy), 1)
    return TwoScaleErrorStudy(
        eps_list,
        energy,
        l2,
        l2_homogenized,
        float(slope),
        float(np.exp(intercept)),
        cell.tensor,
        fine_counts,
    )


def _homogenized_l2_error(
    approximation: TwoScaleApproximation, fine: dolfinx.fem.Function
) -> float:
    mesh = fine.function_space.mesh
    points, weights = basix.make_quadrature(basix.CellType[mesh.topology.cell_type.name], 4)
    num_owned = mesh.topology.index_map(mesh.topology.dim).size_local
    cells = np.arange(num_owned, dtype=np.int32)
    x = ufl.SpatialCoordinate(mesh)
    xs = dolfinx.fem.Expression(
        ufl.as_vector([x[j] for j in range(mesh.topology.dim)]), points
    ).eval(mesh, cells)
    us = dolfinx.fem.Expression(fine, points).eval(mesh, cells).reshape(-1)
    dets = dolfinx.fem.Expression(abs(ufl.JacobianDeterminant(mesh)), points).eval(mesh, cells)
    quadrature = (dets.reshape(num_owned, -1) * weights).reshape(-1)
    u0 = approximation.homogenized(xs.reshape(-1, mesh.topology.dim))
    sums = mesh.comm.allreduce(
        np.array([quadrature @ (us - u0) ** 2, quadrature @ us**2]), op=MPI.SUM
    )
    return float(np.sqrt(sums[0] / sums[1]))


# -- warm start of a two-scale network ------------------------------------------------------------
@dataclass
class WarmStartResult:
    """Result of :func:`warm_start_two_scale`.

    Attributes:
        initial_error: Relative L2 misfit ``||v - (u_0 + eps u_1)|| / ||u_0 + eps u_1||`` at the
            fit points before the fit.
        final_error: The same after the fit.
        evaluations: Loss evaluations of L-BFGS.
        approximation: The :class:`TwoScaleApproximation` that was fitted.
    """

    initial_error: float
    final_error: float
    evaluations: int
    approximation: TwoScaleApproximation


def _warm_start_loss(
    net: torch.nn.Module,
    approximation: TwoScaleApproximation,
    points: np.ndarray,
    gradient_weight: float,
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], float]:
    """The value misfit, the (relative, discrete H1) loss and the target's norm of the fit."""
    target = torch.as_tensor(approximation(points), dtype=torch.float64)
    x = torch.as_tensor(points, dtype=torch.float64)
    target_gradient = torch.as_tensor(approximation.gradient(points), dtype=torch.float64)
    norm = float(torch.linalg.norm(target))
    gradient_scale = float((target_gradient**2).sum(dim=1).mean())

    def misfit() -> torch.Tensor:
        return net(x).reshape(-1) - target

    def loss_function() -> torch.Tensor:
        if gradient_weight == 0:
            return (misfit() ** 2).mean() / (norm**2 / len(target))
        points_with_grad = x.clone().requires_grad_(True)
        value = net(points_with_grad).reshape(-1)
        (gradient,) = torch.autograd.grad(value.sum(), points_with_grad, create_graph=True)
        value_term = ((value - target) ** 2).mean() / (norm**2 / len(target))
        gradient_term = ((gradient - target_gradient) ** 2).sum(dim=1).mean() / gradient_scale
        return value_term + gradient_weight * gradient_term

    return misfit, loss_function, norm


def warm_start_two_scale(
    net: torch.nn.Module,
    problem: MultiscaleProblem,
    approximation: TwoScaleApproximation | None = None,
    *,
    num_points: int = 4096,
    iterations: int = 500,
    seed: int = 0,
    cell_resolution: int = 32,
    coarse_n: int = 128,
    comm: MPI.Comm = MPI.COMM_WORLD,
    gradient_weight: float = 1.0,
) -> WarmStartResult:
    """Fit a network to the two-scale approximation ``u_0 + eps u_1`` by least squares.

    The network (e.g. :class:`dolfinx_pinn.networks.TwoScaleNet`, whose exact fast harmonics
    carry the Fourier structure of the corrector [HS 4.1]) is fitted in place by L-BFGS
    (strong Wolfe line search) to the values of ``u = w - x_i`` (the package's unknown of
    (4.8)) at uniform random interior points and boundary points, so that the hybrid solver can
    start near the two-scale solution. With ``gradient_weight > 0`` the fit is in a discrete H1
    sense: the misfit of the gradient to ``grad u_0 + grad_y u_1`` [HS 2.7] (relative, at the
    same points) is added, which the PDE residual of the solver cares about.

    Args:
        net: A torch module mapping points ``(N, d)`` to ``(N,)`` or ``(N, 1)`` (float64).
        problem: The periodic problem.
        approximation: A ready :class:`TwoScaleApproximation`; by default one is built from
            the cell problem (``cell_resolution`` cells per unit length of y) and the
            homogenised problem (``coarse_n`` cells per direction), collectively on ``comm``.
        num_points: Fit points (10 % of them on the boundary).
        iterations: Maximal L-BFGS iterations.
        seed: Seed of the fit points.
        cell_resolution: See ``approximation``.
        coarse_n: See ``approximation``.
        comm: MPI communicator: the parameters of rank 0 are broadcast, so all ranks hold the
            same network (collective).
        gradient_weight: Weight of the relative gradient misfit (0: values only).

    Returns:
        A :class:`WarmStartResult`.
    """
    if not (isinstance(num_points, int) and num_points >= 10):
        raise ValueError(f"num_points must be an integer >= 10, got {num_points!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (math.isfinite(gradient_weight) and gradient_weight >= 0):
        raise ValueError(f"gradient_weight must be a finite number >= 0, got {gradient_weight}")
    if approximation is None:
        cell = cell_problem_from(problem, cell_resolution, comm=comm)
        homogenized = solve_homogenized(problem, cell.tensor, coarse_n, comm=comm)
        approximation = TwoScaleApproximation(problem, cell, homogenized)
    rng = np.random.default_rng(seed)
    boundary_count = num_points // 10 if problem.dim > 1 else 2
    points = np.vstack(
        [
            problem.domain.sample_interior(num_points - boundary_count, rng),
            problem.domain.sample_boundary(boundary_count, rng),
        ]
    )
    misfit, loss_function, norm = _warm_start_loss(net, approximation, points, gradient_weight)
    with torch.no_grad():
        initial = float(torch.linalg.norm(misfit())) / norm
    optimizer = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=iterations,
        max_eval=int(1.25 * iterations) + 1,
        history_size=50,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = loss_function()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = comm.bcast({k: v.detach().clone() for k, v in net.state_dict().items()}, root=0)
    net.load_state_dict(state)
    with torch.no_grad():
        final = float(torch.linalg.norm(misfit())) / norm
    return WarmStartResult(initial, final, evaluations, approximation)
