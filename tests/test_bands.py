"""Tests of the boundary band (:mod:`dolfinx_pinn.bands`): the band's solve and its coupling."""

from mpi4py import MPI  # isort: skip

import warnings

import dolfinx
import numpy as np
import pytest

import dolfinx_pinn as dp
from dolfinx_pinn.auto import ConvergenceWarning
from dolfinx_pinn.bands import BoundaryBand

COMM = MPI.COMM_WORLD


def _square_problem(eps: float, cells: int = 10, comm: MPI.Comm = COMM) -> dp.MultiscaleProblem:
    """The unit square as a mesh domain, paper_2d's coefficient, u = x1 x2 on ∂Ω."""
    mesh = dolfinx.mesh.create_unit_square(comm, cells, cells)
    return dp.MultiscaleProblem(
        dp.paper_2d(eps).coefficient_definition,
        lambda x, m: 1.0 + x[0],
        eps,
        dim=2,
        period=(2.0, 1.0),
        domain=mesh,
        alpha=1.0,
        beta=5.0,
        dirichlet=lambda x, m: x[0] * x[1],
    )


def _owned_midpoints(uh) -> tuple[np.ndarray, np.ndarray]:
    mesh = uh.function_space.mesh
    cells = np.arange(mesh.topology.index_map(2).size_local, dtype=np.int32)
    return dolfinx.mesh.compute_midpoints(mesh, 2, cells), cells


def test_whole_domain_band_is_the_fine_solve():
    """A band wider than the domain is the fine solve on the refined mesh (the same cells, the
    same degree and quadrature): equal to the solver's tolerance, on 1 or 2 ranks."""
    problem = _square_problem(0.25, cells=6)
    band = BoundaryBand(problem, periods=10.0, degree=2, cells_per_period=4)
    assert band.full and band.fraction == pytest.approx(1.0) and len(band.interface_dofs) == 0
    band.solve_alone()
    fine = dp.solve_fine(
        problem, degree=2, mesh=problem.domain.refined_mesh(band.cell_size), solver="mumps"
    )
    points, cells = _owned_midpoints(fine)
    expected = fine.eval(points, cells).reshape(-1)
    mask, value, gradient = band.value_and_gradient(points[:, :2])
    assert mask.all() and gradient.shape == (len(points), 2)
    assert np.abs(value - expected).max() < 1e-10 * np.abs(expected).max()
    assert not band.basis_region(points[:, :2]).any()
    band.destroy()


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"periods": 0.0}, "periods"),
        ({"overlap": 1.0}, "overlap"),
        ({"degree": 0}, "degree"),
        ({"cells_per_period": 0}, "cells_per_period"),
    ],
)
def test_bad_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        BoundaryBand(_square_problem(0.25, cells=4), **settings)


def test_band_needs_a_2d_mesh_domain():
    with pytest.raises(ValueError, match="2D mesh domains"):
        BoundaryBand(dp.paper_2d(0.1))
    with pytest.raises(ValueError, match="boundary_band"):
        dp.solve(_square_problem(0.25, cells=4), boundary_band=-1.0)


@pytest.mark.filterwarnings("ignore::dolfinx_pinn.auto.ConvergenceWarning")
def test_coupled_band_against_a_fine_reference():
    """The band coupled to the basis in the interior (GMRES on the inner boundary's values):
    the fixed point is reached, the two parts agree in the overlap, and the solution is
    closer to a fine P2 reference than the basis alone."""
    problem = _square_problem(0.05)
    reference = dp.solve_fine(
        problem,
        degree=2,
        mesh=problem.domain.refined_mesh(problem.finest_scale / 8),
        solver="gamg",
    )
    basis = {"degrees": (16, 15, 14), "free_degrees": (10, 6)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alone = dp.solve(problem, reference=reference, basis=basis, boundary_band=0.0)
    solution = dp.solve(problem, reference=reference, basis=basis)
    report = solution.metrics["boundary_band"]
    assert not report["whole_domain"] and report["converged"], report
    assert report["interface_mismatch"] < 1e-8
    assert 0.0 < report["fraction_of_area"] < 1.0
    # The delivered solution: the band's values near ∂Ω, the basis's farther in; the two
    # agree across the switch to the basis's accuracy there (measured 1e-3 of the maximum).
    band = solution.network.patches
    side = np.linspace(0.2, 0.8, 9)
    inner = band.switch + np.array([-1e-9, 1e-9])
    across = np.array([[x, d] for x in side for d in inner])
    values = solution.value(across).reshape(-1, 2)
    assert np.abs(values[:, 0] - values[:, 1]).max() < 1e-2 * np.abs(values).max()
    assert "pde_residual" in solution.metrics["indicators"]
    l2, h1 = solution.metrics["rel_l2"], solution.metrics["rel_h1"]
    assert l2 < 0.5 * alone.metrics["rel_l2"] and h1 < 0.5 * alone.metrics["rel_h1"], (
        l2,
        h1,
        alone.metrics["rel_l2"],
        alone.metrics["rel_h1"],
    )


@pytest.mark.filterwarnings("ignore::dolfinx_pinn.auto.ConvergenceWarning")
def test_coupled_band_ranks_agree():
    """The coupled solution on 1 and N ranks: the band is the same on every rank and the
    coupling's points are one Sobol' set split over the ranks, so the fixed point is the same
    to GMRES's tolerance (the first least squares, whose points depend on the partition, is
    only the initial guess)."""
    settings = {"basis": {"degrees": (10, 9, 8), "free_degrees": (6, 4), "hole_degree": 4}}
    serial = dp.solve(
        _square_problem(0.1, cells=8, comm=MPI.COMM_SELF), comm=MPI.COMM_SELF, **settings
    )
    parallel = dp.solve(_square_problem(0.1, cells=8), **settings)
    assert not serial.metrics["boundary_band"]["whole_domain"]
    x = np.random.default_rng(2).random((400, 2))
    scale = np.abs(serial.value(x)).max()
    assert np.abs(serial.value(x) - parallel.value(x)).max() < 1e-8 * scale
    gradient = np.abs(serial.gradient(x)).max()
    assert np.abs(serial.gradient(x) - parallel.gradient(x)).max() < 1e-6 * gradient


def test_pointwise_function_takes_boundary_points_off_by_round_off():
    """Boundary points can lie outside the mesh by round-off (x2 = 0.6 + 1e-16 on a gmsh
    plate): the closest cell serves them; a point truly outside still raises."""
    from dolfinx_pinn.errors import PointwiseFunction

    mesh = dolfinx.mesh.create_unit_square(MPI.COMM_SELF, 4, 4)
    space = dolfinx.fem.functionspace(mesh, ("Lagrange", 2))
    u = dolfinx.fem.Function(space)
    u.interpolate(lambda x: 1.0 + x[0] * x[1])
    function = PointwiseFunction(u)
    points = np.array([[0.3, 1.0 + 2e-16], [1.0 + 1e-16, 0.7], [0.5, 0.5]])
    value, gradient = function.value_and_gradient(points)
    np.testing.assert_allclose(value, 1.0 + points[:, 0] * points[:, 1], rtol=1e-12)
    np.testing.assert_allclose(gradient, points[:, ::-1], atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        function.value(np.array([[0.5, 1.001]]))
    assert function.value(np.zeros((0, 2))).shape == (0,)
