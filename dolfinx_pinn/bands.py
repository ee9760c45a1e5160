"""A boundary band: fine finite elements along the boundary of a 2D mesh domain.

Away from the boundary the solution of a periodic problem is its two-scale expansion, which
:class:`~dolfinx_pinn.basis.TwoScaleBasis` holds. Within a few periods of the boundary it is
not: the boundary-layer correctors of homogenization (Bensoussan, Lions & Papanicolaou,
*Asymptotic Analysis for Periodic Structures*, ch. 1 §4; Gérard-Varet & Masmoudi, Acta Math.
2012) decay exponentially away from the boundary on the scale ε but have no closed form on a
boundary oblique to the period lattice, around a hole or at a re-entrant corner, and an
oblique Neumann boundary turns them into an O(1) error of the flux (the README has the
measurements on the gmsh plate).

:class:`BoundaryBand` therefore splits the domain in two overlapping parts, as an overlapping
Schwarz method does: a band ``{x : dist(x, ∂Ω) < w}`` with ``w`` a few longest periods, solved
by fine Lagrange elements with the problem's boundary data on ∂Ω and the basis's values on the
band's inner boundary, and the interior ``{dist > w - o}``, where the basis is fitted by least
squares to the PDE and to the band's solution in the overlap ``w - o < dist < w - o/2``.
:meth:`BoundaryBand.couple` finds the fixed point of the two solves (the basis's values on the
band's inner boundary that reproduce themselves) by GMRES on those values; the band's matrix
and the basis's normal equations are factorised once, so each iteration is one back-substitution
of each. The delivered solution (:class:`~dolfinx_pinn.corners.PatchedNetwork` with the band)
is the band's function where ``dist < w - o/2`` and the basis elsewhere.

The band's cost grows like ``|∂Ω| w / h²`` with ``h`` a fixed fraction of ε, that is like
``ε⁻¹`` in 2D where a fine solve of the whole domain grows like ``ε⁻²``. Where no interior is
left (a domain only a few periods across), the band is the whole domain and the solve is a fine
finite-element solve, which the metrics say (``whole_domain``).

MPI: the band's cells are gathered from the distributed mesh and every rank holds the whole
band on ``MPI.COMM_SELF`` and solves it (the same matrix and data, so the same result); the
least-squares points stay distributed and their sums are reduced. Every rank runs the same
GMRES iterations on values broadcast from rank 0.
"""

from __future__ import annotations

import math
import time
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

import basix.ufl
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from torch import nn

from dolfinx_pinn.errors import PointwiseFunction
from dolfinx_pinn.ksp import create_ksp, unique_prefix
from dolfinx_pinn.problems import MultiscaleProblem

__all__ = ["BoundaryBand"]

#: The tag of the band's inner boundary (the interface with the basis's part).
INTERFACE = -2


class BoundaryBand:
    """Fine Lagrange elements in a band along ∂Ω of a 2D mesh domain.

    Args:
        problem: A 2D problem on a :class:`~dolfinx_pinn.geometry.MeshDomain` with a period
            vector (boundary data or the lifted problem (4.8)).
        periods: The band's width ``w`` in longest periods ``ε max p_j`` (> 0).
        overlap: The overlap ``o`` as a fraction of ``w`` (in (0, 1)).
        degree: Lagrange degree of the band (>= 1).
        cells_per_period: The band's mesh is the domain's mesh restricted to the band and
            refined until its cells are at most ``ε min p_j / cells_per_period`` (>= 1).

    MPI: collective on the communicator of the domain's mesh.

    Raises:
        ValueError: naming the argument out of range, or a problem the band cannot serve.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        *,
        periods: float = 1.5,
        overlap: float = 0.5,
        degree: int = 2,
        cells_per_period: int = 6,
    ) -> None:
        from dolfinx_pinn.geometry import MeshDomain

        domain = problem.domain
        if not isinstance(domain, MeshDomain) or problem.dim != 2:
            raise ValueError("problem: the boundary band serves 2D mesh domains")
        if problem.period is None:
            raise ValueError("problem: the boundary band needs a period vector")
        if not (isinstance(periods, (int, float)) and math.isfinite(periods) and periods > 0):
            raise ValueError(f"periods must be a finite number > 0, got {periods!r}")
        if not (isinstance(overlap, (int, float)) and 0 < overlap < 1):
            raise ValueError(f"overlap must be a number in (0, 1), got {overlap!r}")
        if not (isinstance(degree, int) and degree >= 1):
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        if not (isinstance(cells_per_period, int) and cells_per_period >= 1):
            raise ValueError(f"cells_per_period must be an integer >= 1, got {cells_per_period!r}")
        started = time.perf_counter()
        self.problem, self.domain, self.comm = problem, domain, domain.mesh.comm
        self.degree, self.cells_per_period = degree, cells_per_period
        longest = problem.eps * float(max(problem.period))
        self.width = float(periods) * longest
        self.overlap = float(overlap) * self.width
        #: Points closer to ∂Ω than this take the band's values, the others the basis's.
        self.switch = self.width - 0.5 * self.overlap
        self.cell_size = problem.eps * float(min(problem.period)) / cells_per_period
        coarse = self._gather_band_cells()
        self.mesh = self._refine(coarse)
        area = fem.assemble_scalar(fem.form(fem.Constant(self.mesh, 1.0) * ufl.dx(self.mesh)))
        #: The band's share of |Ω|.
        self.fraction = min(1.0, float(area) / self.domain.measure)
        self._setup_space()
        self.function = fem.Function(self.space, name="u_band")
        self._evaluator: PointwiseFunction | None = None
        self.iterations = 0
        self.seconds = {"setup": time.perf_counter() - started}

    # -- the band's mesh ---------------------------------------------------------------------------
    def _gather_band_cells(self) -> dmesh.Mesh:
        """The domain's cells within ``w`` of ∂Ω as one mesh on COMM_SELF."""
        mesh = self.domain.mesh
        tdim = mesh.topology.dim
        owned = mesh.topology.index_map(tdim).size_local
        nodes = mesh.geometry.dofmaps[0][:owned]
        if nodes.shape[1] != 3:
            raise ValueError("problem: the boundary band needs a mesh of affine triangles")
        x = mesh.geometry.x[:, :2]
        distance = self.domain.boundary_distance(x)[nodes].min(axis=1)
        diameter = mesh.h(tdim, np.arange(owned, dtype=np.int32)) if owned else np.zeros(0)
        # A point within w of ∂Ω lies in a cell with a vertex within w + the cell's diameter.
        chosen = distance < self.width + diameter
        corners = x[nodes[chosen]].reshape(-1, 2)
        gathered = self.comm.allgather(corners)
        everything = np.concatenate(gathered)
        # Vertices shared between ranks have the same coordinates bit for bit.
        vertices, inverse = np.unique(everything, axis=0, return_inverse=True)
        cells = inverse.reshape(-1, 3).astype(np.int64)
        element = basix.ufl.element("Lagrange", "triangle", 1, shape=(2,))
        return dmesh.create_mesh(MPI.COMM_SELF, cells, ufl.Mesh(element), vertices)

    def _refine(self, mesh: dmesh.Mesh) -> dmesh.Mesh:
        """Refine until the cells are at most :attr:`cell_size`, trimming every level.

        Each level keeps the cells within ``w`` of ∂Ω (plus their diameter), so that the band
        stays ``w`` wide whatever the size of the domain's cells.
        """
        for _ in range(16):
            mesh = self._trim(mesh)
            cells = np.arange(mesh.topology.index_map(2).size_local, dtype=np.int32)
            if mesh.h(2, cells).max() <= self.cell_size * (1 + 1e-12):
                break
            mesh.topology.create_entities(1)
            mesh, _, _ = dmesh.refine(mesh)
        return mesh

    def _trim(self, mesh: dmesh.Mesh) -> dmesh.Mesh:
        cells = np.arange(mesh.topology.index_map(2).size_local, dtype=np.int32)
        nodes = mesh.geometry.dofmaps[0]
        distance = self.domain.boundary_distance(mesh.geometry.x[:, :2])[nodes].min(axis=1)
        keep = distance < self.width + mesh.h(2, cells)
        if keep.all():
            return mesh
        return dmesh.create_submesh(mesh, 2, cells[keep])[0]

    # -- the finite-element problem ----------------------------------------------------------------
    def _setup_space(self) -> None:
        problem, mesh = self.problem, self.mesh
        mesh.topology.create_connectivity(1, 2)
        facets = dmesh.exterior_facet_indices(mesh.topology)
        midpoints = dmesh.compute_midpoints(mesh, 1, facets)[:, :2]
        on_boundary = self.domain.boundary_distance(midpoints) < 1e-9 * self.domain.diameter
        tags = np.where(on_boundary, self.domain._nearest_tags(midpoints), INTERFACE)
        self.full = not np.any(tags == INTERFACE)
        self.space = V = fem.functionspace(mesh, ("Lagrange", self.degree))
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        x = ufl.SpatialCoordinate(mesh)
        dx = ufl.Measure("dx", mesh, metadata={"quadrature_degree": 2 * self.degree + 4})
        order = np.argsort(facets)
        facet_tags = dmesh.meshtags(mesh, 1, facets[order], tags[order].astype(np.int32))
        ds = ufl.Measure("ds", mesh, subdomain_data=facet_tags)
        a = ufl.inner(problem.K_matrix(x) * ufl.grad(u), ufl.grad(v)) * dx
        data = problem.boundary
        bcs = []
        if data is None:  # the lifted problem (4.8): u = 0 on ∂Ω
            L = problem.q(x) * v * dx - ufl.inner(problem.flux_lifting(x), ufl.grad(v)) * dx
            dofs = fem.locate_dofs_topological(V, 1, facets[tags != INTERFACE])
            bcs.append(fem.dirichletbc(np.float64(0.0), dofs, V))
        else:
            from dolfinx_pinn.boundary import _evaluate

            L = problem.q(x) * v * dx
            for group, value in data.neumann:
                for tag in group:
                    L = L + _evaluate(value, x, "ufl") * v * ds(int(tag))
            physical = tags != INTERFACE
            for group, value in data.dirichlet:
                chosen = facets[physical] if group is None else facets[np.isin(tags, group)]
                dofs = fem.locate_dofs_topological(V, 1, chosen)
                bcs.append(fem.dirichletbc(data._fe_function(value, V), dofs))
        self.interface_dofs = fem.locate_dofs_topological(V, 1, facets[tags == INTERFACE])
        self.interface_points = V.tabulate_dof_coordinates()[self.interface_dofs, :2]
        self._interface_data = fem.Function(V)
        bcs.append(fem.dirichletbc(self._interface_data, self.interface_dofs))
        self._bcs = bcs
        self._a, self._L = fem.form(a), fem.form(L)
        from dolfinx.fem.petsc import assemble_matrix, create_vector

        self._matrix = assemble_matrix(self._a, bcs=bcs)
        self._matrix.assemble()
        self._rhs = create_vector(V)
        self._ksp = create_ksp(MPI.COMM_SELF, self._matrix, unique_prefix("boundary_band"))

    @property
    def num_dofs(self) -> int:
        """The band's number of dofs."""
        return int(self.space.dofmap.index_map.size_global)

    def solve(self, interface_values: np.ndarray) -> fem.Function:
        """The band's solution for the values ``(M,)`` at :attr:`interface_points` (local)."""
        from dolfinx.fem.petsc import apply_lifting, assemble_vector, set_bc

        if self._ksp is None:
            raise RuntimeError("the boundary band's solver was destroyed")
        self._interface_data.x.array[self.interface_dofs] = interface_values
        with self._rhs.localForm() as local:
            local.set(0.0)
        assemble_vector(self._rhs, self._L)
        apply_lifting(self._rhs, [self._a], [self._bcs])
        self._rhs.ghostUpdate(PETSc.InsertMode.ADD, PETSc.ScatterMode.REVERSE)
        set_bc(self._rhs, self._bcs)
        self._ksp.solve(self._rhs, self.function.x.petsc_vec)
        reason = self._ksp.getConvergedReason()
        if reason < 0:
            raise RuntimeError(f"the boundary band's solve failed (KSPConvergedReason {reason})")
        self.function.x.scatter_forward()
        self._evaluator = None
        return self.function

    # -- the coupling with the basis ---------------------------------------------------------------
    def couple(
        self,
        network: nn.Module,
        *,
        points_per_unknown: float = 4.0,
        seed: int = 0,
        data_weight: float = 100.0,
        ridge: float = 1e-10,
        rtol: float = 1e-10,
        max_iterations: int = 200,
    ) -> dict[str, Any]:
        """Fit the basis's output layer and the band to each other (collective).

        Args:
            network: The basis (its output layer is overwritten; its values on the band's
                inner boundary are the initial guess).
            points_per_unknown: Points farther than ``w - o`` from ∂Ω per unknown of the
                basis (a scrambled Sobol' set in the bounding box, the same on any number of
                ranks and split over them): they carry the PDE rows, those in the overlap also
                the band's values.
            seed: The seed of the points.
            data_weight: The weight of the overlap's rows against the PDE rows (each block
                normalised by its number of rows).
            ridge: The relative ridge of the normal equations.
            rtol: GMRES's relative tolerance on the interface values.
            max_iterations: At most this many GMRES iterations.

        Returns:
            What the coupling did: iterations, the fixed-point residual, seconds, whether
            GMRES converged, and the point counts.

        Raises:
            ValueError: when fewer interior points than twice the unknowns lie in the basis's
                part (the caller then takes the band as the whole domain).
        """
        from dolfinx_pinn.least_squares import boundary_rows, pde_rows

        started = time.perf_counter()
        comm = self.comm
        layer = network.output
        n = layer.weight.shape[1]
        x, distance = self._interior_points(math.ceil(points_per_unknown * n), seed)
        data = distance < self.switch
        counts = comm.allreduce(np.array([len(x), data.sum()]), op=MPI.SUM)
        if counts[0] < 2 * n or counts[1] == 0:
            raise ValueError(
                f"points: {counts[0]} interior and {counts[1]} overlap points for {n} unknowns"
            )
        rows_p, target_p = pde_rows(network, self.problem, torch.from_numpy(x))
        rows_d = boundary_rows(network, torch.from_numpy(x[data]))
        rows_p, target_p, rows_d = (t.detach().numpy() for t in (rows_p, target_p, rows_d))
        weight_p, weight_d = 1.0 / counts[0], data_weight / counts[1]
        normal = comm.allreduce(weight_p * rows_p.T @ rows_p + weight_d * rows_d.T @ rows_d)
        pde_rhs = comm.allreduce(weight_p * rows_p.T @ target_p)
        scale = 1.0 / np.sqrt(np.maximum(np.diag(normal), np.finfo(float).tiny))
        scaled = normal * scale[:, None] * scale[None, :]
        scaled[np.diag_indices(n)] += ridge
        factor = scipy.linalg.cho_factor(scaled)
        bias = float(layer.bias) if layer.bias is not None else 0.0
        at_interface = boundary_rows(network, torch.from_numpy(self.interface_points))
        at_interface = at_interface.detach().numpy()
        evaluator = PointwiseFunction(self.function)
        located = evaluator._located(x[data])

        def fit(interface_values: np.ndarray) -> np.ndarray:
            self.solve(interface_values)
            values = evaluator._value(*located) - bias
            rhs = pde_rhs + comm.allreduce(weight_d * rows_d.T @ values)
            coefficients = scale * scipy.linalg.cho_solve(factor, scale * rhs)
            # The same numbers on every rank, so that every rank's GMRES takes the same steps.
            return comm.bcast(coefficients, root=0)

        def iterate(interface_values: np.ndarray) -> np.ndarray:
            self.iterations += 1
            return at_interface @ fit(interface_values) + bias

        with torch.no_grad():
            guess = network(torch.from_numpy(self.interface_points)).reshape(-1).numpy()
        offset = iterate(np.zeros(len(guess)))
        operator = scipy.sparse.linalg.LinearOperator(
            (len(guess), len(guess)), matvec=lambda g: g - (iterate(g) - offset), dtype=float
        )
        residuals: list[float] = []
        solution, info = scipy.sparse.linalg.gmres(
            operator,
            offset,
            x0=guess,
            rtol=rtol,
            restart=max_iterations,
            maxiter=max_iterations,
            callback=residuals.append,
            callback_type="pr_norm",
        )
        coefficients = fit(solution)
        mismatch = float(np.max(np.abs(at_interface @ coefficients + bias - solution)))
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(coefficients)[None, :])
        self._evaluator = None
        self.seconds["coupling"] = time.perf_counter() - started
        return {
            "gmres_iterations": len(residuals),
            "band_solves": self.iterations,
            "converged": info == 0,
            "interface_mismatch": mismatch,
            "interior_points": int(counts[0]),
            "overlap_points": int(counts[1]),
            "coupling_seconds": self.seconds["coupling"],
        }

    def _interior_points(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of ``count`` Sobol' points farther than ``w - o`` from ∂Ω."""
        from dolfinx_pinn.coarse import sobol_points

        domain = self.domain
        total = 1 << max(10, math.ceil(math.log2(count)))
        while True:
            points = sobol_points(domain.lower, domain.upper, total, seed)
            points = points[domain.contains(points)]
            distance = domain.boundary_distance(points)
            keep = distance > self.width - self.overlap
            if keep.sum() >= count or total >= 1 << 24:
                break
            total *= 2
        points, distance = points[keep][: max(count, 1)], distance[keep][: max(count, 1)]
        rank, size = self.comm.rank, self.comm.size
        return points[rank::size], distance[rank::size]

    def solve_alone(self) -> None:
        """The band's solve when it is the whole domain (no inner boundary)."""
        started = time.perf_counter()
        self.solve(np.zeros(0))
        self.iterations += 1
        self.seconds["coupling"] = time.perf_counter() - started

    # -- the delivered solution --------------------------------------------------------------------
    def value_and_gradient(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mask, u (M,), ∇u (M, 2))`` at the points ``(N, 2)`` the band's values serve."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        mask = ~self.basis_region(points)
        if self._evaluator is None:
            self._evaluator = PointwiseFunction(self.function)
        if not mask.any():
            return mask, np.zeros(0), np.zeros((0, 2))
        value, gradient = self._evaluator.value_and_gradient(points[mask])
        return mask, value, gradient

    def basis_region(self, points: np.ndarray) -> np.ndarray:
        """A mask ``(N,)`` of the points ``(N, 2)`` where the basis is the solution."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.full:
            return np.zeros(len(points), dtype=bool)
        return self.domain.boundary_distance(points) >= self.switch

    def describe(self) -> dict[str, Any]:
        """The band's size and cost for reports."""
        return {
            "width": self.width,
            "overlap": self.overlap,
            "whole_domain": bool(self.full),
            "fraction_of_area": self.fraction,
            "degree": self.degree,
            "cells_per_period": self.cells_per_period,
            "dofs": self.num_dofs,
            "interface_dofs": len(self.interface_dofs),
            "seconds": dict(self.seconds),
        }

    def destroy(self) -> None:
        """Free the solver's PETSc objects (they live on COMM_SELF); the function stays."""
        for item in (self._ksp, self._matrix, self._rhs):
            item.destroy()
        self._ksp = None
