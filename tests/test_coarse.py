"""Tests of dolfinx_pinn.coarse: the coarse state/adjoint layer and the collocation points."""

from mpi4py import MPI

import dolfinx
import dolfinx.fem.petsc
import numpy as np
import pytest
import torch
import ufl

from dolfinx_pinn import paper_1d, paper_2d
from dolfinx_pinn.coarse import CoarseProblem, CoarseSolve, CollocationPoints
from dolfinx_pinn.coupling import allreduce_sum

COMM = MPI.COMM_WORLD


def _problem(dim: int):
    return paper_1d(0.1) if dim == 1 else paper_2d(0.1)


def _parameter(coarse: CoarseProblem, dim: int) -> torch.Tensor:
    """A valid, deliberately non-symmetric K̃ (so the adjoint's transpose matters)."""
    if coarse.parametrization == "entry":
        return torch.tensor(1.7, dtype=torch.float64)
    tensor = np.eye(dim) * 2.0
    if dim == 2:
        tensor = np.array([[2.0, 0.3], [-0.2, 1.4]])
    if coarse.parametrization == "tensor":
        return torch.tensor(tensor)
    count = len(coarse.subdomain_values)
    return torch.tensor(np.stack([tensor * (1.0 + 0.5 * j) for j in range(count)]))


def _cell_tags(mesh) -> np.ndarray:
    """Two subdomains: cells left/right of x = 0.4 (by midpoint)."""
    tdim = mesh.topology.dim
    num_cells = mesh.topology.index_map(tdim).size_local
    midpoints = dolfinx.mesh.compute_midpoints(mesh, tdim, np.arange(num_cells, dtype=np.int32))
    return (midpoints[:, 0] > 0.4).astype(np.int32)


def _coarse(dim: int, parametrization: str, comm=COMM, n: int | None = None) -> CoarseProblem:
    problem = _problem(dim)
    mesh = problem.create_mesh(comm, n or (24 if dim == 1 else 6))
    tags = _cell_tags(mesh) if parametrization == "subdomains" else None
    return CoarseProblem(problem, mesh, parametrization=parametrization, cell_tags=tags)


def _functional(coarse: CoarseProblem):
    """A nonlinear scalar functional of y_h, the same value on every rank."""
    x = coarse.dof_coordinates
    weights = torch.as_tensor(1.0 + np.sin(3.0 * x[:, 0]) + x[:, -1] ** 2)

    def functional(K: torch.Tensor) -> torch.Tensor:
        y = CoarseSolve.apply(K, coarse)
        local = torch.sum(weights * y) + 10.0 * torch.sum(weights * y**2)
        return allreduce_sum(local, coarse.comm)

    return functional


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("parametrization", ["tensor", "entry", "subdomains"])
def test_gradcheck(dim: int, parametrization: str) -> None:
    with _coarse(dim, parametrization) as coarse:
        K = _parameter(coarse, dim).requires_grad_(True)
        functional = _functional(coarse)
        assert torch.autograd.gradcheck(functional, (K,), eps=1e-6, atol=1e-9, rtol=1e-6)


def test_gradient_respects_needs_input_grad() -> None:
    with _coarse(2, "tensor") as coarse:
        K = _parameter(coarse, 2)  # no requires_grad
        y = CoarseSolve.apply(K, coarse)
        assert not y.requires_grad


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("parametrization", ["tensor", "entry"])
def test_forward_matches_linear_problem(dim: int, parametrization: str) -> None:
    with _coarse(dim, parametrization, n=40 if dim == 1 else 12) as coarse:
        K = _parameter(coarse, dim)
        y = coarse.solve(K).numpy()
        tensor = coarse.full_tensors(K)[0]
        mesh = coarse.mesh
        V = coarse.space
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        constant = dolfinx.fem.Constant(mesh, tensor)
        q = coarse.problem.q(ufl.SpatialCoordinate(mesh))
        reference = dolfinx.fem.petsc.LinearProblem(
            ufl.inner(constant * ufl.grad(u), ufl.grad(v)) * ufl.dx,
            q * v * ufl.dx,
            bcs=[coarse.bc],
            petsc_options_prefix="test_coarse_reference_",
            petsc_options={
                "ksp_type": "preonly",
                "pc_type": "lu",
                "pc_factor_mat_solver_type": "mumps",
            },
        )
        expected = reference.solve().x.array[: coarse.num_owned_dofs]
        scale = COMM.allreduce(np.abs(expected).max(initial=0.0), MPI.MAX)
        error = COMM.allreduce(np.abs(y - expected).max(initial=0.0), MPI.MAX)
        assert scale > 1e-3
        assert error <= 1e-12 * max(scale, 1.0)


def test_subdomain_gradient_sums_to_tensor_gradient() -> None:
    """dL/dK̃ per subdomain, summed, equals dL/dK̃ of one constant tensor (same K̃ everywhere)."""
    with _coarse(2, "tensor") as constant, _coarse(2, "subdomains") as split:
        tensor = _parameter(constant, 2).requires_grad_(True)
        _functional(constant)(tensor).backward()
        stacked = tensor.detach().expand(2, 2, 2).clone().requires_grad_(True)
        _functional(split)(stacked).backward()
        assert torch.allclose(stacked.grad.sum(dim=0), tensor.grad, rtol=1e-12, atol=1e-14)


def test_same_state_on_world_and_self() -> None:
    """y_h on COMM_WORLD (parallel under mpirun) equals the serial solve at the same nodes."""
    with (
        _coarse(2, "tensor", COMM, n=10) as parallel,
        _coarse(2, "tensor", MPI.COMM_SELF, n=10) as serial,
    ):
        K = _parameter(parallel, 2)
        y_parallel = parallel.solve(K).numpy()
        y_serial = serial.solve(K).numpy()
        from scipy.spatial import cKDTree

        _, index = cKDTree(serial.dof_coordinates).query(parallel.dof_coordinates)
        assert np.allclose(y_parallel, y_serial[index], rtol=1e-12, atol=1e-14)


def test_bad_coefficients_raise_before_petsc() -> None:
    with _coarse(2, "tensor") as coarse:
        with pytest.raises(ValueError, match="positive definite"):
            coarse.solve(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64))
        with pytest.raises(ValueError, match="finite"):
            coarse.solve(torch.tensor([[1.0, 0.0], [0.0, float("nan")]], dtype=torch.float64))
        with pytest.raises(ValueError, match="shape"):
            coarse.solve(torch.tensor(1.0, dtype=torch.float64))
    with _coarse(2, "entry") as coarse, pytest.raises(ValueError, match="positive definite"):
        coarse.solve(torch.tensor(-1.0, dtype=torch.float64))


def test_mesh_of_another_dimension_raises() -> None:
    mesh = paper_1d(0.1).create_mesh(COMM, 8)
    with pytest.raises(ValueError, match="dimension"):
        CoarseProblem(paper_2d(0.1), mesh)


def test_bad_arguments_raise() -> None:
    problem = paper_2d(0.1)
    mesh = problem.create_mesh(COMM, 4)
    with pytest.raises(ValueError, match="parametrization"):
        CoarseProblem(problem, mesh, parametrization="diagonal")
    with pytest.raises(ValueError, match="cell_tags"):
        CoarseProblem(problem, mesh, parametrization="subdomains")
    with pytest.raises(ValueError, match="fixed_tensor"):
        CoarseProblem(problem, mesh, parametrization="entry", fixed_tensor=np.eye(3))
    with pytest.raises(ValueError, match="density"):
        CollocationPoints(mesh)
    with pytest.raises(ValueError, match="density"):
        CollocationPoints(mesh, density=-1.0)


def test_petsc_options_and_destroy() -> None:
    problem = paper_2d(0.1)
    mesh = problem.create_mesh(COMM, 8)
    options = {"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-14}
    with (
        CoarseProblem(problem, mesh, petsc_options=options) as iterative,
        CoarseProblem(problem, mesh) as direct,
    ):
        assert iterative.state_ksp.getType() == "cg"
        assert iterative.state_ksp.getOptionsPrefix().startswith("dolfinx_pinn_state_")
        assert iterative.adjoint_ksp.getOptionsPrefix().startswith("dolfinx_pinn_adjoint_")
        assert iterative.state_prefix != direct.state_prefix
        assert direct.state_ksp.getPC().getType() == "lu"
        K = torch.tensor([[2.0, 0.1], [0.1, 1.0]], dtype=torch.float64)
        assert np.allclose(iterative.solve(K).numpy(), direct.solve(K).numpy(), atol=1e-12)
    with pytest.raises(RuntimeError, match="destroyed"):
        iterative.solve(K)
    iterative.destroy()  # idempotent


@pytest.mark.parametrize("dim", [1, 2])
def test_collocation_points_independent_of_ranks(dim: int) -> None:
    problem = _problem(dim)
    n = 16 if dim == 1 else 6
    kwargs = {"density": 900.0, "boundary_density": 50.0, "seed": 7}
    parallel = CollocationPoints(problem.create_mesh(COMM, n), **kwargs)
    serial = CollocationPoints(problem.create_mesh(MPI.COMM_SELF, n), **kwargs)

    def gathered(points: np.ndarray) -> np.ndarray:
        array = np.concatenate(COMM.allgather(points))
        return array[np.lexsort(array.T)]

    for mine, theirs in (
        (parallel.interior, serial.interior),
        (parallel.boundary, serial.boundary),
    ):
        mine, theirs = gathered(mine), theirs[np.lexsort(theirs.T)]
        assert mine.shape == theirs.shape
        assert np.allclose(mine, theirs, rtol=0, atol=1e-14)
    # Density: the expected count per cell, up to one point per cell.
    cells = n if dim == 1 else 2 * n * n
    assert abs(parallel.global_interior_count - 900.0) <= cells
    assert problem.domain.contains(parallel.interior).all()
    assert parallel.weight == pytest.approx(1.0 / parallel.global_interior_count)
    different = CollocationPoints(problem.create_mesh(MPI.COMM_SELF, n), density=900.0, seed=8)
    assert not np.array_equal(different.interior[:5], serial.interior[:5])


def test_collocation_points_are_uniform() -> None:
    """Stratified uniform sampling: the sample mean of x and x² match 1/2 and 1/3 closely."""
    problem = paper_2d(0.1)
    points = CollocationPoints(problem.create_mesh(COMM, 8), count=20000, seed=3)
    total = COMM.allreduce(points.interior.sum(axis=0), MPI.SUM) / points.global_interior_count
    squares = COMM.allreduce((points.interior**2).sum(axis=0), MPI.SUM)
    squares = squares / points.global_interior_count
    assert np.allclose(total, 0.5, atol=5e-3)
    assert np.allclose(squares, 1.0 / 3.0, atol=5e-3)


@pytest.mark.parametrize("dim", [1, 2])
def test_sobol_points_independent_of_ranks(dim: int) -> None:
    """Sobol' points: the same set (and the requested count) on any number of ranks."""
    problem = _problem(dim)
    n = 16 if dim == 1 else 6
    kwargs = {"count": 1000, "seed": 4, "sampling": "sobol"}
    parallel = CollocationPoints(problem.create_mesh(COMM, n), **kwargs)
    serial = CollocationPoints(problem.create_mesh(MPI.COMM_SELF, n), **kwargs)
    gathered = np.concatenate(COMM.allgather(parallel.interior))
    gathered = gathered[np.lexsort(gathered.T)]
    assert parallel.global_interior_count == serial.global_interior_count == 1000
    assert np.allclose(gathered, serial.interior[np.lexsort(serial.interior.T)], atol=1e-14)
    assert problem.domain.contains(parallel.interior).all()
    # Each point lies in the owned cell it is filed under.
    mesh = parallel.mesh
    vertices = parallel._cell_vertices[parallel.interior_cells]
    for point, cell in zip(parallel.interior[:50], vertices[:50], strict=True):
        lam = np.linalg.lstsq(
            np.vstack([cell.T, np.ones(len(cell))]), np.append(point, 1.0), rcond=None
        )[0]
        assert lam.min() >= -1e-12
    assert mesh.topology.index_map(mesh.topology.dim).size_local > parallel.interior_cells.max()


def test_sobol_points_have_low_discrepancy() -> None:
    """The sample means of x and x² are far closer to 1/2 and 1/3 than Monte Carlo's 1/√M."""
    problem = paper_2d(0.1)
    points = CollocationPoints(problem.create_mesh(COMM, 8), count=4096, seed=3, sampling="sobol")
    count = points.global_interior_count
    total = COMM.allreduce(points.interior.sum(axis=0), MPI.SUM) / count
    squares = COMM.allreduce((points.interior**2).sum(axis=0), MPI.SUM) / count
    assert np.allclose(total, 0.5, atol=2e-4)  # Monte Carlo: ~ 0.29 / 64 = 4.5e-3
    assert np.allclose(squares, 1.0 / 3.0, atol=2e-4)
    with pytest.raises(ValueError, match="sampling"):
        CollocationPoints(problem.create_mesh(COMM, 2), count=10, sampling="halton")
