"""The coarse-scale problem (4.18) and its adjoint as a differentiable PyTorch layer.

DOLFINx owns the coarse mesh, the assembly and the MPI-parallel PETSc solves; PyTorch owns the
network. :class:`CoarseSolve` joins them: its forward solves the state system
``B(K̃) y_h = F`` of (3.23), its backward solves the adjoint system ``B(K̃)^T p = dL/dy_h`` of
(3.18)/(3.23) and returns the exact discrete sensitivity ``dL/dK̃ = -p^T (∂B/∂K̃) y_h``, assembled
from one UFL form for every parametrisation of K̃.

The coarse problem is, with P1 elements on a user-given simplex mesh and homogeneous Dirichlet
conditions,

    find y_h in Y_h:  ∫_Ω K̃ ∇y_h · ∇v dx = ∫_Ω q v dx   for all v in Y_h,

or, for a problem with boundary data (:mod:`dolfinx_pinn.boundary`), y_h = g on Γ_D (the values
lifted into the right-hand side, renewed with K̃) and ``+ ∫_{Γ_N} h v ds`` on the right. The
adjoint and the sensitivity keep homogeneous conditions: g does not depend on K̃.

where K̃ is (a) one constant ``d x d`` tensor (``parametrization="tensor"``), (b) only its
``(i, i)`` entry with the other entries fixed (``"entry"``, Assumption 4.3 of Hintermüller &
Korolev, i the problem's lifting direction), or (c) one tensor per subdomain of a partition
(``"subdomains"``, Algorithm 4.1), stored as a DG0 tensor field.

MPI: every rank holds the same (replicated) K̃; vectors cross the torch/PETSc boundary as the
values at this rank's OWNED coarse dofs only, in the local dof order of
``CoarseProblem.space``. The gradient returned for K̃ is reduced over the ranks, so every rank
holds the full ``dL/dK̃`` of the global objective (see :mod:`dolfinx_pinn.coupling` for the
convention that makes this exact).

:class:`CollocationPoints` samples the Monte-Carlo collocation points cell by cell on the coarse
mesh, with one random generator per cell seeded by the cell's global input index, so that the
point set does not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, Literal

from mpi4py import MPI
from petsc4py import PETSc

import dolfinx
import dolfinx.common
import dolfinx.fem.petsc
import dolfinx.geometry
import numpy as np
import numpy.typing as npt
import torch
import ufl

from dolfinx_pinn.ksp import DIRECT_SOLVER_MAX_DOFS, create_ksp, default_options, unique_prefix
from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "DIRECT_SOLVER_MAX_DOFS",
    "CoarseProblem",
    "CoarseSolve",
    "CollocationPoints",
    "KTildeParametrization",
    "LinearizedState",
    "check_mesh",
    "coarse_solve",
    "sobol_points",
]

Parametrization = Literal["tensor", "entry", "subdomains"]

#: The name under which the coarse PETSc work is timed (``dolfinx.common.list_timings``).
TIMER_NAME = "dolfinx_pinn: coarse solves"


def _simplex_check(mesh: dolfinx.mesh.Mesh) -> None:
    cell_type = mesh.topology.cell_type
    allowed = (
        dolfinx.mesh.CellType.interval,
        dolfinx.mesh.CellType.triangle,
        dolfinx.mesh.CellType.tetrahedron,
    )
    if cell_type not in allowed:
        raise ValueError(
            f"mesh: cells must be intervals, triangles or tetrahedra, got {cell_type.name}"
        )
    degree = mesh.geometry.cmaps[0].degree
    if degree != 1:
        raise ValueError(f"mesh: an affine (degree 1) geometry is needed, got degree {degree}")


def check_mesh(problem: MultiscaleProblem, mesh: dolfinx.mesh.Mesh) -> None:
    """Raise a ValueError if ``mesh`` does not match the problem's dimension or domain.

    Collective on ``mesh.comm``; see ``MultiscaleProblem.check_mesh``.
    """
    problem.check_mesh(mesh)


class KTildeParametrization:
    """How the parameter K̃ of the coarse problem describes its ``d x d`` tensor(s).

    - ``"tensor"``: one constant tensor, a parameter of shape ``(d, d)``;
    - ``"entry"``: only the ``(i, i)`` entry (i the problem's lifting direction), the other
      entries fixed (Assumption 4.3 of Hintermüller & Korolev), a parameter of shape ``()``;
    - ``"subdomains"``: one tensor per cell tag value (Algorithm 4.1), shape
      ``(n_subdomains, d, d)`` in increasing order of the tag values.

    Args:
        kind: ``"tensor"``, ``"entry"`` or ``"subdomains"``.
        mesh: The coarse mesh.
        entry_index: i of ``"entry"``.
        fixed_tensor: The fixed tensor of ``"entry"`` (default the identity).
        cell_tags: For ``"subdomains"``: a ``dolfinx.mesh.MeshTags`` of the cells, or an
            integer array with one tag per local cell (owned cells first); every owned cell
            needs a tag. Collective on the mesh's communicator.
    """

    KINDS = ("tensor", "entry", "subdomains")

    def __init__(
        self,
        kind: str,
        mesh: dolfinx.mesh.Mesh,
        entry_index: int,
        fixed_tensor: npt.ArrayLike | None = None,
        cell_tags: dolfinx.mesh.MeshTags | npt.ArrayLike | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(
                f"parametrization must be 'tensor', 'entry' or 'subdomains', got {kind!r}"
            )
        self.kind = kind
        self.dim = d = mesh.topology.dim
        self.entry_index = entry_index
        fixed = np.eye(d) if fixed_tensor is None else np.array(fixed_tensor, dtype=np.float64)
        if fixed.shape != (d, d) or not np.all(np.isfinite(fixed)):
            raise ValueError(
                f"fixed_tensor must be a finite {d}x{d} array, got shape {fixed.shape}"
            )
        self.fixed_tensor = fixed
        self.num_owned_cells = mesh.topology.index_map(d).size_local
        self.subdomain_values: np.ndarray | None = None
        self.cell_subdomain: np.ndarray | None = None
        if kind == "subdomains":
            self._setup_subdomains(mesh, cell_tags)
        elif cell_tags is not None:
            raise ValueError("cell_tags is only used with parametrization='subdomains'")

    def _setup_subdomains(self, mesh: dolfinx.mesh.Mesh, cell_tags: Any) -> None:
        tdim, owned_count = mesh.topology.dim, self.num_owned_cells
        num_local_cells = owned_count + mesh.topology.index_map(tdim).num_ghosts
        if cell_tags is None:
            raise ValueError("cell_tags: needed with parametrization='subdomains'")
        tags = np.full(num_local_cells, np.iinfo(np.int64).min, dtype=np.int64)
        if isinstance(cell_tags, dolfinx.mesh.MeshTags):
            if cell_tags.dim != tdim:
                raise ValueError(f"cell_tags must tag cells (dim {tdim}), got dim {cell_tags.dim}")
            tags[cell_tags.indices] = cell_tags.values
        else:
            array = np.asarray(cell_tags)
            if array.ndim != 1 or array.shape[0] not in (owned_count, num_local_cells):
                raise ValueError(
                    "cell_tags: need one integer tag per owned (or local) cell, "
                    f"{owned_count} or {num_local_cells}, got shape {array.shape}"
                )
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"cell_tags must be integers, got dtype {array.dtype}")
            tags[: array.shape[0]] = array
        owned = tags[:owned_count]
        comm = mesh.comm
        missing = int(comm.allreduce(int(np.sum(owned == np.iinfo(np.int64).min)), MPI.SUM))
        if missing:
            raise ValueError(f"cell_tags: {missing} owned cells have no tag")
        values = np.unique(np.concatenate(comm.allgather(np.unique(owned))))
        self.subdomain_values = values
        self.cell_subdomain = np.searchsorted(values, owned)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the parameter: ``(d, d)``, ``()`` or ``(n_subdomains, d, d)``."""
        d = self.dim
        if self.kind == "tensor":
            return (d, d)
        if self.kind == "entry":
            return ()
        assert self.subdomain_values is not None
        return (len(self.subdomain_values), d, d)

    def tensors(self, parameter: npt.ArrayLike) -> np.ndarray:
        """The ``d x d`` tensors ``(n, d, d)`` a parameter describes (validated).

        Raises:
            ValueError: when the shape is wrong, an entry is not finite, or a tensor is not
                positive definite (its symmetric part, checked before PETSc is called).
        """
        if isinstance(parameter, torch.Tensor):
            parameter = parameter.detach().cpu().numpy()
        value = np.asarray(parameter, dtype=np.float64)
        if self.kind == "entry" and value.shape == (1,):
            value = value.reshape(())
        if value.shape != self.shape:
            raise ValueError(
                f"K_tilde must have shape {self.shape} for parametrization {self.kind!r}, "
                f"got {value.shape}"
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"K_tilde must be finite, got {value.tolist()}")
        if self.kind == "entry":
            tensor = self.fixed_tensor.copy()
            tensor[self.entry_index, self.entry_index] = float(value)
            tensors = tensor[None]
        else:
            tensors = value[None] if self.kind == "tensor" else value
        symmetric = 0.5 * (tensors + np.swapaxes(tensors, -1, -2))
        smallest = np.linalg.eigvalsh(symmetric)[:, 0]
        scale = np.abs(tensors).reshape(len(tensors), -1).max(axis=1)
        if np.any(smallest <= 1e-12 * np.maximum(scale, 1e-300)):
            worst = int(np.argmin(smallest))
            raise ValueError(
                "K_tilde must be positive definite (the coarse form must be coercive); tensor "
                f"{worst} has smallest eigenvalue {smallest[worst]:.3e}: {tensors[worst].tolist()}"
            )
        return tensors

    def reduce_gradient(self, per_cell: np.ndarray, comm: MPI.Comm) -> np.ndarray:
        """The gradient with respect to the parameter from per-owned-cell tensor gradients."""
        d = self.dim
        if self.kind == "subdomains":
            assert self.cell_subdomain is not None and self.subdomain_values is not None
            partial = np.zeros((len(self.subdomain_values), d * d))
            np.add.at(partial, self.cell_subdomain, per_cell)
            return comm.allreduce(partial, MPI.SUM).reshape(-1, d, d)
        total = comm.allreduce(per_cell.sum(axis=0), MPI.SUM).reshape(d, d)
        if self.kind == "entry":
            return np.asarray(total[self.entry_index, self.entry_index])
        return total


class _StiffnessMatrix:
    """``B(K̃)`` of (3.23): ``Σ_ab K̃_ab A^{ab}`` from matrices assembled once, or assembled.

    For one constant tensor (``"tensor"``, ``"entry"``) the ``A^{ab} = ∫ ∂_b φ_l ∂_a φ_k`` (zero
    Dirichlet rows and columns) and the identity on the Dirichlet rows are assembled once, so a
    new K̃ costs a few sparse additions; per subdomain the DG0 field K̃ is assembled. Collective.
    """

    def __init__(self, coarse: CoarseProblem, dx: ufl.Measure, affine: bool) -> None:
        space, bc, d = coarse.space, coarse.bc, coarse.dim
        y, v = ufl.TrialFunction(space), ufl.TestFunction(space)
        self.bc = bc
        # One UFL form for every parametrisation: K̃ is a DG0 tensor field.
        self.form = dolfinx.fem.form(ufl.inner(coarse.coefficient * ufl.grad(y), ufl.grad(v)) * dx)
        self.matrix = dolfinx.fem.petsc.create_matrix(self.form)
        # Assemble once (K̃ = I) so that B holds the full P1 pattern that the A^{ab} share.
        coarse.coefficient.x.array.reshape(-1, d * d)[:] = np.eye(d).reshape(d * d)
        dolfinx.fem.petsc.assemble_matrix(self.matrix, self.form, bcs=[bc], diag=1.0)
        self.matrix.assemble()
        self.basis: dict[tuple[int, int], PETSc.Mat] = {}
        self.bc_diagonal: PETSc.Mat | None = None
        if not affine:
            return
        for a in range(d):
            for b in range(d):
                form = dolfinx.fem.form(y.dx(b) * v.dx(a) * dx)
                matrix = dolfinx.fem.petsc.assemble_matrix(form, bcs=[bc], diag=0.0)
                matrix.assemble()
                self.basis[(a, b)] = matrix
        # The identity on the Dirichlet rows: the difference of two assemblies.
        form = dolfinx.fem.form(y.dx(0) * v.dx(0) * dx)
        with_diagonal = dolfinx.fem.petsc.assemble_matrix(form, bcs=[bc], diag=1.0)
        with_diagonal.assemble()
        with_diagonal.axpy(
            -1.0, self.basis[(0, 0)], structure=PETSc.Mat.Structure.SAME_NONZERO_PATTERN
        )
        self.bc_diagonal = with_diagonal

    def update(self, tensor: np.ndarray | None) -> None:
        """``B`` for one constant tensor, or (``None``) by assembly of the coefficient field."""
        matrix = self.matrix
        matrix.zeroEntries()
        if tensor is None:
            dolfinx.fem.petsc.assemble_matrix(matrix, self.form, bcs=[self.bc], diag=1.0)
            matrix.assemble()
            return
        # All A^{ab} come from the same P1 sparsity pattern as B.
        same_pattern = PETSc.Mat.Structure.SAME_NONZERO_PATTERN
        for (a, b), basis in self.basis.items():
            if tensor[a, b] != 0.0:
                matrix.axpy(tensor[a, b], basis, structure=same_pattern)
        assert self.bc_diagonal is not None
        matrix.axpy(1.0, self.bc_diagonal, structure=same_pattern)

    def destroy(self) -> None:
        for matrix in self.basis.values():
            matrix.destroy()
        if self.bc_diagonal is not None:
            self.bc_diagonal.destroy()
        self.matrix.destroy()


class CoarseProblem:
    """The coarse problem (4.18) with cached operators and KSPs (collective on ``mesh.comm``).

    The state KSP and the adjoint KSP are built once, each with its own PETSc options prefix
    (``dolfinx_pinn_state_<n>_`` and ``dolfinx_pinn_adjoint_<n>_``, ``n`` unique per instance,
    see :attr:`state_prefix`, :attr:`adjoint_prefix`), and reused for every new K̃; their options
    follow the precedence of :mod:`dolfinx_pinn.ksp` (options under these prefixes on the
    command line win; defaults MUMPS LU up to :data:`DIRECT_SOLVER_MAX_DOFS` global dofs, CG +
    GAMG above). For the ``"tensor"`` and ``"entry"`` parametrisations the matrix is
    ``B = Σ_ab K̃_ab A^{ab}`` with the ``A^{ab}`` assembled once, so a new K̃ costs no
    reassembly. Every solve is timed with a ``dolfinx.common.Timer`` (:data:`TIMER_NAME`), and
    this instance's total is :attr:`solve_time`.

    Args:
        problem: The multiscale problem (its source ``q`` and dimension are used).
        mesh: A dolfinx mesh of intervals, triangles or tetrahedra of ``problem.domain`` (any
            partition, any ghost mode).
        parametrization: ``"tensor"`` (K̃ of shape ``(d, d)``), ``"entry"`` (K̃ of shape ``()``:
            the ``(i, i)`` entry, ``i = problem.lifting_direction``) or ``"subdomains"`` (K̃ of
            shape ``(n_subdomains, d, d)``, one tensor per cell tag value, in increasing order
            of the tag values).
        fixed_tensor: For ``"entry"``: the fixed ``d x d`` tensor whose ``(i, i)`` entry is
            replaced by the parameter (default: the identity, i.e. ``K̃ = diag(.., k, ..)``
            with ones elsewhere on the diagonal).
        cell_tags: For ``"subdomains"``: a ``dolfinx.mesh.MeshTags`` of the cells, or an integer
            array with one tag per local cell (owned cells first, as in dolfinx); every owned
            cell needs a tag.
        petsc_options: Options of the state KSP, replacing the automatic defaults (options
            already in ``PETSc.Options()`` / on the command line under the prefix still win).
        adjoint_petsc_options: Default options of the adjoint KSP (default: as the state).
        solver: ``"auto"``, ``"direct"`` (MUMPS LU) or ``"iterative"`` (CG + GAMG).

    Raises:
        ValueError: when the mesh does not match the problem, is not a simplex mesh, or a
            parameter is out of range.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        mesh: dolfinx.mesh.Mesh,
        *,
        parametrization: Parametrization = "tensor",
        fixed_tensor: npt.ArrayLike | None = None,
        cell_tags: dolfinx.mesh.MeshTags | npt.ArrayLike | None = None,
        petsc_options: Mapping[str, Any] | None = None,
        adjoint_petsc_options: Mapping[str, Any] | None = None,
        solver: Literal["auto", "direct", "iterative"] = "auto",
    ) -> None:
        check_mesh(problem, mesh)
        _simplex_check(mesh)
        if solver not in ("auto", "direct", "iterative"):
            raise ValueError(f"solver must be 'auto', 'direct' or 'iterative', got {solver!r}")
        self._destroyed = False
        self.problem = problem
        self.mesh = mesh
        self.comm: MPI.Comm = mesh.comm
        self.dim = d = problem.dim
        self.parameters = KTildeParametrization(
            parametrization, mesh, problem.lifting_direction, fixed_tensor, cell_tags
        )
        self.parametrization: Parametrization = parametrization
        tdim = mesh.topology.dim

        self.space = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
        index_map = self.space.dofmap.index_map
        self.num_owned_dofs: int = index_map.size_local
        self.num_global_dofs: int = index_map.size_global
        self.tensor_space = dolfinx.fem.functionspace(mesh, ("DG", 0, (d, d)))
        self.coefficient = dolfinx.fem.Function(self.tensor_space, name="K_tilde")
        self.state = dolfinx.fem.Function(self.space, name="y_h")
        self.adjoint = dolfinx.fem.Function(self.space, name="p_h")

        # Dirichlet condition on the whole boundary (on Γ_D with the problem's boundary data:
        # zero here, for the matrix; the values g enter the right-hand side by lifting).
        mesh.topology.create_connectivity(tdim - 1, tdim)
        boundary_facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
        data = problem.boundary
        if data is not None:
            boundary_facets = data.dirichlet_facets(mesh)
        boundary_dofs = dolfinx.fem.locate_dofs_topological(self.space, tdim - 1, boundary_facets)
        self.bc = dolfinx.fem.dirichletbc(0.0, boundary_dofs, self.space)
        self.boundary_dofs = boundary_dofs

        v = ufl.TestFunction(self.space)
        dx = ufl.dx(domain=mesh)
        x = ufl.SpatialCoordinate(mesh)
        source = problem.q(x)
        if isinstance(source, ufl.constantvalue.Zero) or (
            isinstance(source, ufl.constantvalue.ScalarValue) and float(source) == 0.0
        ):
            # UFL drops a zero integrand entirely; keep a (zero) form with a Constant.
            source = dolfinx.fem.Constant(mesh, 0.0)
        neumann = None if data is None else data.neumann_form(v)
        linear = source * v * dx
        self._L_form = dolfinx.fem.form(linear if neumann is None else linear + neumann)
        # dL/dK̃ per DG0 dof: the derivative of -a(K̃; y_h, p_h) in the direction of K̃.
        p_h, y_h = self.adjoint, self.state
        residual_like = -ufl.inner(self.coefficient * ufl.grad(y_h), ufl.grad(p_h)) * dx
        self._gradient_form = dolfinx.fem.form(
            ufl.derivative(residual_like, self.coefficient, ufl.TestFunction(self.tensor_space))
        )
        self._gradient_vector = dolfinx.fem.petsc.create_vector(self.tensor_space)
        self._stiffness = _StiffnessMatrix(self, dx, parametrization != "subdomains")
        self.matrix = self._stiffness.matrix
        self.rhs = dolfinx.fem.petsc.assemble_vector(self._L_form)
        self.rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        dolfinx.fem.petsc.set_bc(self.rhs, [self.bc])
        # Non-zero Dirichlet data: F - B(K̃) g on the free rows, g on Γ_D, renewed with K̃.
        self._value_bcs = (
            None if data is None or data.homogeneous_dirichlet else data.dirichlet_bcs(self.space)
        )
        self._adjoint_rhs = self.rhs.duplicate()
        self._current_key: bytes | None = None

        # KSPs, one per solve, each with its own prefix.
        defaults = default_options(solver, self.num_global_dofs)
        state_options = dict(petsc_options) if petsc_options else defaults
        adjoint_options = dict(adjoint_petsc_options) if adjoint_petsc_options else state_options
        self.state_prefix = unique_prefix("state")
        self.adjoint_prefix = self.state_prefix.replace("_state_", "_adjoint_")
        self.state_ksp = create_ksp(self.comm, self.matrix, self.state_prefix, state_options)
        self.adjoint_ksp = create_ksp(self.comm, self.matrix, self.adjoint_prefix, adjoint_options)
        self.solve_time = 0.0
        self._sensitivity: _Sensitivity | None = None

    # -- setup -------------------------------------------------------------------------------
    # -- K̃ -----------------------------------------------------------------------------------
    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The shape of the K̃ parameter: ``(d, d)``, ``()`` or ``(n_subdomains, d, d)``."""
        return self.parameters.shape

    @property
    def entry_index(self) -> int:
        """The index i of the ``"entry"`` parametrisation (the problem's lifting direction)."""
        return self.parameters.entry_index

    @property
    def fixed_tensor(self) -> np.ndarray:
        """The fixed tensor of the ``"entry"`` parametrisation."""
        return self.parameters.fixed_tensor

    @property
    def subdomain_values(self) -> np.ndarray | None:
        """The cell tag values of the ``"subdomains"`` parametrisation, in order."""
        return self.parameters.subdomain_values

    def full_tensors(self, parameter: npt.ArrayLike) -> np.ndarray:
        """The ``d x d`` tensors ``(n, d, d)`` described by a parameter (validated)."""
        return self.parameters.tensors(parameter)

    def assemble(self, parameter: npt.ArrayLike) -> None:
        """Assemble ``B(K̃)`` for a parameter (collective); a no-op when K̃ is unchanged."""
        self._check_alive()
        tensors = self.full_tensors(parameter)
        key = tensors.tobytes()
        if key == self._current_key:
            return
        self._set_coefficient(tensors)
        self._stiffness.update(None if self.parametrization == "subdomains" else tensors[0])
        if self._value_bcs is not None:
            self._lift_rhs()
        self._current_key = key
        # A new operator: both KSPs refactorise / rebuild their preconditioners.
        self.state_ksp.setOperators(self.matrix)
        self.adjoint_ksp.setOperators(self.matrix)

    def _lift_rhs(self) -> None:
        """The right-hand side with the Dirichlet values g lifted by the current B(K̃)."""
        rhs, bcs = self.rhs, self._value_bcs
        assert bcs is not None
        with rhs.localForm() as local:
            local.set(0.0)
        dolfinx.fem.petsc.assemble_vector(rhs, self._L_form)
        dolfinx.fem.petsc.apply_lifting(rhs, [self._stiffness.form], bcs=[bcs])
        rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        dolfinx.fem.petsc.set_bc(rhs, bcs)

    def _set_coefficient(self, tensors: np.ndarray) -> None:
        d = self.dim
        values = self.coefficient.x.array.reshape(-1, d * d)
        if self.parametrization == "subdomains":
            parameters = self.parameters
            owned_dofs = self.tensor_space.dofmap.list[: parameters.num_owned_cells, 0]
            values[owned_dofs] = tensors[parameters.cell_subdomain].reshape(-1, d * d)
            self.coefficient.x.scatter_forward()
        else:
            values[:] = tensors[0].reshape(d * d)

    # -- solves ------------------------------------------------------------------------------
    def _timed(self) -> _SolveTimer:
        return _SolveTimer(self)

    def solve_state(self, parameter: npt.ArrayLike) -> np.ndarray:
        """Solve ``B(K̃) y_h = F`` (collective); returns a copy of y_h at the owned dofs."""
        with self._timed():
            self.assemble(parameter)
            vector = self.state.x.petsc_vec
            self.state_ksp.solve(self.rhs, vector)
            self._check_converged(self.state_ksp, "state")
            self.state.x.scatter_forward()
            return self.state.x.array[: self.num_owned_dofs].copy()

    def solve_sensitivity(self, parameter: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """The state y_h(K̃) and its sensitivity ``S = ∂y_h/∂K̃`` at the owned dofs (collective).

        Column a of S solves ``B(K̃) S_a = -(∂B/∂K̃_a) y_h`` with the state KSP (factorised
        by the state solve), the right-hand side assembled from ``-∫ (E_a ∇y_h)·∇v dx``, E_a
        the direction of parameter entry a (``"entry"``: one column; ``"tensor"``: d² columns
        in row-major order). This is the exact derivative of the discrete state, used by the
        lazy coarse update and by the Gauss-Newton rows of the coupling.

        Returns:
            ``(y_h (n,), S (n, p))`` with n the owned dofs and p the entries of K̃.
        """
        if self.parametrization not in ("entry", "tensor"):
            raise ValueError(
                "parametrization must be 'entry' or 'tensor' for the state sensitivity, "
                f"got {self.parametrization!r}"
            )
        state = self.solve_state(parameter)
        if self._sensitivity is None:
            self._sensitivity = _Sensitivity(self)
        with self._timed():
            return state, self._sensitivity.columns()

    @property
    def num_parameters(self) -> int:
        """The number of entries of K̃ (1 for ``"entry"``, d² for ``"tensor"``)."""
        return int(np.prod(self.parameter_shape, dtype=int))

    def solve_adjoint(self, parameter: npt.ArrayLike, rhs_owned: npt.ArrayLike) -> np.ndarray:
        """Solve ``B(K̃)^T p_h = rhs`` (collective); returns p_h at the owned dofs.

        The right-hand side is zeroed on the Dirichlet dofs: y_h vanishes there whatever K̃, so
        those components carry no sensitivity.
        """
        self.assemble(parameter)
        rhs_owned = np.asarray(rhs_owned, dtype=np.float64)
        if rhs_owned.shape != (self.num_owned_dofs,):
            raise ValueError(
                f"rhs_owned must have shape ({self.num_owned_dofs},), got {rhs_owned.shape}"
            )
        with self._timed():
            self._adjoint_rhs.array[:] = rhs_owned
            dolfinx.fem.petsc.set_bc(self._adjoint_rhs, [self.bc], alpha=0.0)
            vector = self.adjoint.x.petsc_vec
            self.adjoint_ksp.solveTranspose(self._adjoint_rhs, vector)
            self._check_converged(self.adjoint_ksp, "adjoint")
            self.adjoint.x.scatter_forward()
            return self.adjoint.x.array[: self.num_owned_dofs].copy()

    def parameter_gradient(self, state_owned: npt.ArrayLike | None = None) -> np.ndarray:
        """``dL/dK̃ = -p_h^T (∂B/∂K̃) y_h`` from the current adjoint (collective).

        Assembled from the UFL form ``derivative(-a(K̃; y_h, p_h), K̃)`` on the DG0 tensor space
        and summed per parameter entry; the result is reduced over the ranks (every rank holds
        the same gradient, of shape :attr:`parameter_shape`).

        Args:
            state_owned: y_h at the owned dofs (default: the last state solved).
        """
        with self._timed():
            return self._parameter_gradient(state_owned)

    def _parameter_gradient(self, state_owned: npt.ArrayLike | None) -> np.ndarray:
        if state_owned is not None:
            self.state.x.array[: self.num_owned_dofs] = state_owned
            self.state.x.scatter_forward()
        vector = self._gradient_vector
        with vector.localForm() as local:
            local.set(0.0)
        dolfinx.fem.petsc.assemble_vector(vector, self._gradient_form)
        d = self.dim
        # DG0: each owned cell's dof is owned and assembled only there (no ghost accumulation).
        local = vector.getArray(readonly=True).reshape(-1, d * d)
        owned_dofs = self.tensor_space.dofmap.list[: self.parameters.num_owned_cells, 0]
        return self.parameters.reduce_gradient(local[owned_dofs], self.comm)

    def _check_converged(self, ksp: PETSc.KSP, label: str) -> None:
        reason = ksp.getConvergedReason()
        if reason < 0:
            raise RuntimeError(
                f"the coarse {label} solve did not converge (KSPConvergedReason {reason}); "
                f"adjust the options under the prefix {ksp.getOptionsPrefix()!r}"
            )

    # -- torch entry points --------------------------------------------------------------------
    def solve(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """y_h(K̃) at the owned dofs, differentiable in K̃ (see :class:`CoarseSolve`)."""
        return CoarseSolve.apply(K_tilde, self)

    def function(self, values_owned: torch.Tensor | npt.ArrayLike) -> dolfinx.fem.Function:
        """A new P1 Function from owned dof values, ghosts updated (collective)."""
        if isinstance(values_owned, torch.Tensor):
            values_owned = values_owned.detach().cpu().numpy()
        function = dolfinx.fem.Function(self.space)
        function.x.array[: self.num_owned_dofs] = np.asarray(values_owned, dtype=np.float64)
        function.x.scatter_forward()
        return function

    @property
    def dof_coordinates(self) -> np.ndarray:
        """Coordinates ``(num_owned_dofs, d)`` of the owned coarse nodes."""
        return self.space.tabulate_dof_coordinates()[: self.num_owned_dofs, : self.dim].copy()

    @property
    def owned_global_dofs(self) -> np.ndarray:
        """Global indices of the owned dofs (the rows of parallel operators)."""
        index_map = self.space.dofmap.index_map
        return index_map.local_to_global(np.arange(self.num_owned_dofs, dtype=np.int32))

    # -- lifetime ----------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this CoarseProblem has been destroyed")

    def destroy(self) -> None:
        """Destroy the PETSc objects (collective); the instance is unusable afterwards."""
        if self._destroyed:
            return
        self._destroyed = True
        if self._sensitivity is not None:
            self._sensitivity.destroy()
        for ksp in (self.state_ksp, self.adjoint_ksp):
            ksp.destroy()
        self._stiffness.destroy()
        for obj in (self.rhs, self._adjoint_rhs, self._gradient_vector):
            obj.destroy()

    def __enter__(self) -> CoarseProblem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (
            f"CoarseProblem({self.problem.name!r}, {self.parametrization!r}, "
            f"{self.num_global_dofs} dofs on {self.comm.size} rank(s))"
        )


class _SolveTimer:
    """Times a block of PETSc work with ``dolfinx.common.Timer`` and adds it to the instance."""

    def __init__(self, coarse: CoarseProblem) -> None:
        self.coarse = coarse
        self.timer = dolfinx.common.Timer(TIMER_NAME)

    def __enter__(self) -> _SolveTimer:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.coarse.solve_time += self.timer.stop().total_seconds()
        self.timer.flush()


class _Sensitivity:
    """The right-hand sides ``-∫ (E_a ∇y_h)·∇v`` of the state sensitivity (one form, d×d E)."""

    def __init__(self, coarse: CoarseProblem) -> None:
        self.coarse = coarse
        d, mesh = coarse.dim, coarse.mesh
        self._direction = dolfinx.fem.Constant(mesh, np.zeros((d, d)))
        v = ufl.TestFunction(coarse.space)
        form = -ufl.inner(self._direction * ufl.grad(coarse.state), ufl.grad(v)) * ufl.dx(
            domain=mesh
        )
        self._form = dolfinx.fem.form(form)
        self._rhs = dolfinx.fem.petsc.create_vector(coarse.space)
        self._solution = self._rhs.duplicate()
        if coarse.parametrization == "entry":
            i = coarse.entry_index
            entries = [(i, i)]
        else:
            entries = [(a, b) for a in range(d) for b in range(d)]
        self.directions = []
        for a, b in entries:
            direction = np.zeros((d, d))
            direction[a, b] = 1.0
            self.directions.append(direction)

    def columns(self) -> np.ndarray:
        """S at the owned dofs for the state last solved (the state KSP is factorised)."""
        coarse = self.coarse
        columns = []
        for direction in self.directions:
            self._direction.value[:] = direction
            with self._rhs.localForm() as local:
                local.set(0.0)
            dolfinx.fem.petsc.assemble_vector(self._rhs, self._form)
            self._rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            dolfinx.fem.petsc.set_bc(self._rhs, [coarse.bc], alpha=0.0)
            coarse.state_ksp.solve(self._rhs, self._solution)
            coarse._check_converged(coarse.state_ksp, "sensitivity")
            columns.append(self._solution.array[: coarse.num_owned_dofs].copy())
        return np.stack(columns, axis=1)

    def destroy(self) -> None:
        self._rhs.destroy()
        self._solution.destroy()


class LinearizedState(torch.autograd.Function):
    """``y = y₀ + S (K̃ - K̃₀)`` at the owned dofs; backward ``S^T g`` summed over the ranks.

    The lazy coarse update's surrogate of :class:`CoarseSolve`: like it, the gradient returned
    for the replicated K̃ is the full (rank-reduced) one. Collective in backward.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        K_tilde: torch.Tensor,
        state: torch.Tensor,
        sensitivity: torch.Tensor,
        anchor: torch.Tensor,
        comm: MPI.Comm,
    ) -> torch.Tensor:
        ctx.sensitivity = sensitivity
        ctx.comm = comm
        ctx.shape = K_tilde.shape
        return state + sensitivity @ (K_tilde.reshape(-1) - anchor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        local = ctx.sensitivity.T @ grad
        if ctx.comm.size > 1:
            values = np.ascontiguousarray(local.detach().cpu().numpy(), dtype=np.float64)
            total = np.empty_like(values)
            ctx.comm.Allreduce(values, total, op=MPI.SUM)
            local = torch.as_tensor(total, dtype=grad.dtype, device=grad.device)
        return local.reshape(ctx.shape), None, None, None, None


class CoarseSolve(torch.autograd.Function):
    """``y_h = CoarseSolve.apply(K_tilde, coarse)``: the coarse state as a torch operation.

    Forward (collective): validates K̃ (before PETSc), assembles ``B(K̃)``, solves the state
    system and returns y_h at this rank's owned dofs on K̃'s device and dtype.

    Backward (collective): receives ``dL/dy_h`` at the owned dofs, solves ``B^T p = dL/dy_h``
    with the adjoint KSP and returns ``dL/dK̃ = -p^T (∂B/∂K̃) y_h``, reduced over the ranks.
    Every rank must call backward (the solve is collective), also a rank whose loss does not
    depend on y_h: torch then passes zeros.
    """

    @staticmethod
    def forward(ctx: Any, K_tilde: torch.Tensor, coarse: CoarseProblem) -> torch.Tensor:  # noqa: D102
        parameter = K_tilde.detach().cpu().numpy().astype(np.float64)
        state = coarse.solve_state(parameter)
        ctx.coarse = coarse
        ctx.parameter = parameter
        ctx.state = state
        ctx.parameter_shape = K_tilde.shape
        return torch.as_tensor(state, dtype=K_tilde.dtype, device=K_tilde.device)

    @staticmethod
    def backward(ctx: Any, grad_state: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None
        coarse: CoarseProblem = ctx.coarse
        rhs = grad_state.detach().cpu().numpy().astype(np.float64)
        coarse.solve_adjoint(ctx.parameter, rhs)
        gradient = coarse.parameter_gradient(ctx.state)
        out = torch.as_tensor(gradient, dtype=grad_state.dtype, device=grad_state.device)
        return out.reshape(ctx.parameter_shape), None


def coarse_solve(K_tilde: torch.Tensor, coarse: CoarseProblem) -> torch.Tensor:
    """Functional form of :class:`CoarseSolve` (collective on ``coarse.comm``)."""
    return CoarseSolve.apply(K_tilde, coarse)


# -- collocation points ------------------------------------------------------------------------
def sobol_points(lower: npt.ArrayLike, upper: npt.ArrayLike, count: int, seed: int) -> np.ndarray:
    """The first ``count`` points of a scrambled Sobol' sequence over the box ``[lower, upper]``.

    The same points on every rank for the same seed (the generator is seeded by ``(seed, 2)``);
    a count that is not a power of 2 still gives a low-discrepancy prefix.
    """
    from scipy.stats import qmc

    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    sequence = qmc.Sobol(len(lower), scramble=True, seed=np.random.default_rng([seed, 2]))
    unit = sequence.random_base2(max(0, math.ceil(math.log2(max(count, 1)))))[:count]
    return lower + (upper - lower) * unit


def _unit_simplex_samples(rng: np.random.Generator, count: int, vertices: int) -> np.ndarray:
    """Uniform barycentric coordinates ``(count, vertices)`` on a simplex (Dirichlet(1,..,1))."""
    exponential = -np.log1p(-rng.random((count, vertices)))
    return exponential / exponential.sum(axis=1, keepdims=True)


def _simplex_measure(vertices: np.ndarray) -> float:
    """Measure of a k-simplex given its ``k + 1`` vertices ``(k + 1, gdim)``."""
    edges = vertices[1:] - vertices[0]
    k = edges.shape[0]
    if k == 0:
        return 1.0
    gram = edges @ edges.T
    return math.sqrt(max(np.linalg.det(gram), 0.0)) / math.factorial(k)


def geometric_cell_keys(vertices: np.ndarray) -> np.ndarray:
    """Partition-independent integer keys ``(cells,)`` of cells from their sorted vertices.

    A 63-bit BLAKE2 hash of the float64 coordinates of each cell's vertices (``(cells, k, d)``,
    sorted the same way on every rank): the same cell of the same mesh gets the same key
    whatever the partition, for meshes without a usable ``original_cell_index``.
    """
    data = np.ascontiguousarray(vertices, dtype=np.float64) + 0.0  # -0.0 -> 0.0
    keys = np.empty(len(data), dtype=np.int64)
    for cell, row in enumerate(data):
        digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
        keys[cell] = int.from_bytes(digest, "little") >> 1
    return keys


class CollocationPoints:
    """Monte-Carlo collocation points tied to a coarse simplex mesh (collective on mesh.comm).

    Each cell (a stratum) gets its share of the points: ``floor(density·|T|)`` plus
    one more with probability equal to the fractional part, uniform in the cell. The random
    generator of a cell is seeded by ``(seed, global input index of the cell)`` (dolfinx's
    ``original_cell_index``) and the cell's vertices are sorted by coordinates before the
    mapping, so the point SET does not depend on the number of ranks or the partition. Each
    rank holds the points of its owned cells (the PINN loss sums over these only, so every
    point counts once); points needed near a partition boundary by the compression operator
    are exchanged by :class:`dolfinx_pinn.coupling.CompressionOperator`.

    With ``sampling="sobol"`` the interior points are instead the first points of one scrambled
    Sobol' sequence over the mesh's bounding box (the same sequence on every rank, each rank
    keeping those in its owned cells): a low-discrepancy set whose quadrature error decays
    faster than Monte Carlo's. Measured on ``paper_2d(0.1)`` (TwoScaleNet, output-layer least
    squares on 16 000 points): relative L² 4.1e-4 with Sobol, 1.4e-3 with uniform random and
    1.8e-3 with the per-cell ``"stratified"`` default. A point on a face shared by two ranks'
    cells (probability zero) would be counted on both.

    Boundary points are sampled the same way on the boundary facets (per unit (d-1)-measure),
    owned by the rank that owns the facet's cell; in 1D each boundary vertex is one point.

    Args:
        mesh: The coarse simplex mesh.
        density: Interior points per unit measure; or give ``count`` (total over Ω) instead.
        count: Total number of interior points wanted (density = count / |Ω|).
        boundary_density: Boundary points per unit boundary measure (or ``boundary_count``).
        boundary_count: Total number of boundary points wanted (ignored in 1D).
        seed: The seed of the whole point set.
        sampling: ``"stratified"`` (uniform random points per cell, the default) or
            ``"sobol"`` (a scrambled Sobol' sequence, see above) for the interior points.
        cell_keys: What seeds a cell's generator: ``"auto"`` (``original_cell_index``, the
            cell's input index, where the mesh has one for every owned cell; else as
            ``"geometry"``) or ``"geometry"`` (a hash of the cell's sorted vertex coordinates,
            :func:`geometric_cell_keys`). Use ``"geometry"`` for a refined mesh or a submesh:
            their input indices depend on the partition (or do not exist), the coordinates do
            not.
    """

    SAMPLINGS = ("stratified", "sobol")

    def __init__(
        self,
        mesh: dolfinx.mesh.Mesh,
        *,
        density: float | None = None,
        count: int | None = None,
        boundary_density: float | None = None,
        boundary_count: int | None = None,
        seed: int = 0,
        sampling: str = "stratified",
        cell_keys: str = "auto",
    ) -> None:
        _simplex_check(mesh)
        if sampling not in self.SAMPLINGS:
            raise ValueError(f"sampling must be one of {self.SAMPLINGS}, got {sampling!r}")
        self.sampling = sampling
        self.mesh = mesh
        self.comm: MPI.Comm = mesh.comm
        tdim = mesh.topology.dim
        self.dim = tdim
        if not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        num_owned_cells = mesh.topology.index_map(tdim).size_local
        geometry = mesh.geometry.x[:, :tdim]
        cell_nodes = mesh.geometry.dofmaps[0][:num_owned_cells]
        # Sort each cell's vertices lexicographically: partition-independent ordering.
        vertices = geometry[cell_nodes]  # (cells, tdim + 1, tdim)
        order = np.lexsort(vertices.transpose(2, 0, 1)[::-1], axis=-1)
        vertices = np.take_along_axis(vertices, order[..., None], axis=1)
        self._cell_vertices = vertices
        measures = np.array([_simplex_measure(v) for v in vertices])
        total_measure = self.comm.allreduce(float(measures.sum()), MPI.SUM)
        self.measure = total_measure
        self.density = self._resolve_density(density, count, total_measure, "density", "count")
        if cell_keys not in ("auto", "geometry"):
            raise ValueError(f"cell_keys must be 'auto' or 'geometry', got {cell_keys!r}")
        original = None
        if cell_keys == "auto":
            try:
                original = np.asarray(mesh.topology.original_cell_index, dtype=np.int64)
            except RuntimeError:  # a submesh has no input indices
                original = None
        if original is None or len(original) < num_owned_cells:
            original = geometric_cell_keys(vertices)
        else:
            original = original[:num_owned_cells]
        self._original_index = original

        if sampling == "sobol":
            self.interior, self.interior_cells = self._sobol_points()
        else:
            self.interior, self.interior_cells = self._stratified_points(measures, original)
        self.global_interior_count = int(self.comm.allreduce(len(self.interior), MPI.SUM))
        self.boundary, self.boundary_measure = self._sample_boundary(
            boundary_density, boundary_count, num_owned_cells, original
        )
        self.global_boundary_count = int(self.comm.allreduce(len(self.boundary), MPI.SUM))

    def _stratified_points(
        self, measures: np.ndarray, original: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Uniform random points per owned cell, seeded by the cell's input index."""
        tdim, vertices_of = self.dim, self._cell_vertices
        points, cells = [], []
        for cell in range(len(measures)):
            rng = np.random.default_rng([self.seed, 0, int(original[cell])])
            expected = self.density * measures[cell]
            n = math.floor(expected)
            n += int(rng.random() < expected - n)
            if n:
                lam = _unit_simplex_samples(rng, n, tdim + 1)
                points.append(lam @ vertices_of[cell])
                cells.append(np.full(n, cell, dtype=np.int32))
        if not points:
            return np.zeros((0, tdim), dtype=np.float64), np.zeros(0, dtype=np.int32)
        return np.concatenate(points), np.concatenate(cells)

    def _sobol_points(self) -> tuple[np.ndarray, np.ndarray]:
        """The owned part of one scrambled Sobol' sequence over the bounding box (collective)."""
        tdim, mesh = self.dim, self.mesh
        num_owned = len(self._cell_vertices)
        local = mesh.geometry.x[:, :tdim]
        lower = np.full(tdim, np.inf) if len(local) == 0 else local.min(axis=0)
        upper = np.full(tdim, -np.inf) if len(local) == 0 else local.max(axis=0)
        lower, upper = np.ascontiguousarray(lower), np.ascontiguousarray(upper)
        self.comm.Allreduce(MPI.IN_PLACE, lower, MPI.MIN)
        self.comm.Allreduce(MPI.IN_PLACE, upper, MPI.MAX)
        box_measure = float(np.prod(upper - lower))
        count = max(1, round(self.density * box_measure))
        candidates = sobol_points(lower, upper, count, self.seed)
        padded = np.zeros((count, 3))
        padded[:, :tdim] = candidates
        tree = dolfinx.geometry.bb_tree(mesh, tdim, entities=np.arange(num_owned, dtype=np.int32))
        collisions = dolfinx.geometry.compute_collisions_points(tree, padded)
        colliding = dolfinx.geometry.compute_colliding_cells(mesh, collisions, padded)
        offsets = colliding.offsets
        inside = np.flatnonzero(np.diff(offsets) > 0)
        cells = colliding.array[offsets[inside]].astype(np.int32)
        return np.ascontiguousarray(candidates[inside]), cells

    @staticmethod
    def _resolve_density(
        density: float | None, count: int | None, measure: float, name: str, count_name: str
    ) -> float:
        if (density is None) == (count is None):
            raise ValueError(f"{name}/{count_name}: give exactly one of them")
        if count is not None:
            if not (isinstance(count, (int, np.integer)) and count >= 1):
                raise ValueError(f"{count_name} must be an integer >= 1, got {count!r}")
            return float(count) / measure
        assert density is not None
        if not (math.isfinite(density) and density > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {density}")
        return float(density)

    def _sample_boundary(
        self,
        density: float | None,
        count: int | None,
        num_owned_cells: int,
        original: np.ndarray,
    ) -> tuple[np.ndarray, float]:
        mesh, tdim = self.mesh, self.dim
        mesh.topology.create_connectivity(tdim - 1, tdim)
        facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
        facet_to_cell = mesh.topology.connectivity(tdim - 1, tdim)
        facet_cells = np.array([facet_to_cell.links(f)[0] for f in facets], dtype=np.int64)
        keep = facet_cells < num_owned_cells
        facets, facet_cells = facets[keep], facet_cells[keep]
        facet_nodes = dolfinx.mesh.entities_to_geometry(mesh, tdim - 1, facets)
        geometry = mesh.geometry.x[:, :tdim]
        if tdim == 1:
            points = geometry[facet_nodes.reshape(-1)]
            order = np.lexsort(points.T[::-1]) if len(points) else np.zeros(0, dtype=np.int64)
            return points[order], 2.0
        if density is None and count is None:
            return np.zeros((0, tdim)), self.comm.allreduce(0.0, MPI.SUM)
        facet_vertices = geometry[facet_nodes]
        measures = np.array([_simplex_measure(v) for v in facet_vertices])
        total = self.comm.allreduce(float(measures.sum()), MPI.SUM)
        rate = self._resolve_density(density, count, total, "boundary_density", "boundary_count")
        self.boundary_density = rate
        points = []
        for k in range(len(facets)):
            vertices = facet_vertices[k]
            vertices = vertices[np.lexsort(vertices.T[::-1])]
            # The facet is identified by its cell and its sorted first vertex: rank-independent.
            cell_vertices = self._cell_vertices[facet_cells[k]]
            missing = [
                j
                for j in range(tdim + 1)
                if not np.any(np.all(np.isclose(cell_vertices[j], vertices), axis=1))
            ]
            rng = np.random.default_rng(
                [self.seed, 1, int(original[facet_cells[k]]), int(missing[0]) if missing else 0]
            )
            expected = rate * measures[k]
            n = math.floor(expected)
            n += int(rng.random() < expected - n)
            if n:
                points.append(_unit_simplex_samples(rng, n, tdim) @ vertices)
        array = np.concatenate(points) if points else np.zeros((0, tdim))
        return array, total

    @property
    def weight(self) -> float:
        """The Monte-Carlo weight ``|Ω| / M_Ω`` of one interior point (global M_Ω)."""
        return self.measure / max(self.global_interior_count, 1)

    def torch_interior(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The owned interior points as a torch tensor ``(n, d)``."""
        return torch.as_tensor(self.interior, dtype=dtype, device=device)

    def torch_boundary(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The owned boundary points as a torch tensor ``(n, d)``."""
        return torch.as_tensor(self.boundary, dtype=dtype, device=device)
