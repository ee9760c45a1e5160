"""Tests of the periodic cell problems, the homogenised problem and the two-scale corrector.

All tests run serially and under ``mpirun -n 2``; the MPI-aware ones compare a computation on
``MPI.COMM_WORLD`` with one on ``MPI.COMM_SELF``.
"""

from mpi4py import MPI  # isort: skip

import math

import numpy as np
import pytest
import torch

from dolfinx_pinn.homogenization import (
    CellProblem,
    TwoScaleApproximation,
    cell_problem_from,
    solve_cell_problem,
    solve_homogenized,
    two_scale_error_study,
    voigt_reuss_bounds,
    warm_start_two_scale,
)
from dolfinx_pinn.problems import laminate_2d, paper_1d, paper_2d

A1, A2 = 1.0, 4.0


def layers(axis: int):
    """Two-phase layers normal to ``axis`` (a1 on y_axis < 1/2, a2 above)."""

    def coefficient(y, m):
        return m.where(y[axis] < 0.5, A1, A2)

    return coefficient


def checkerboard(y, m):
    """The two-phase checkerboard (a1 on the diagonal squares)."""
    return m.where((y[0] - 0.5) * (y[1] - 0.5) > 0, A1, A2)


HARMONIC = 2.0 * A1 * A2 / (A1 + A2)
ARITHMETIC = 0.5 * (A1 + A2)


def test_harmonic_mean_1d():
    # Mesh-aligned two-phase layers: the P1 corrector is exact, a0 is the harmonic mean.
    tensor = solve_cell_problem(layers(0), 8, dim=1).tensor
    assert tensor.shape == (1, 1)
    assert abs(tensor[0, 0] - HARMONIC) < 1e-10
    # Smooth coefficient: P1 converges at second order towards (int 1/a)^-1 = sqrt(3).
    errors = [
        abs(cell_problem_from(paper_1d(0.1), n).tensor[0, 0] - math.sqrt(3.0)) for n in (16, 32)
    ]
    assert errors[1] < 1e-3
    assert errors[0] / errors[1] > 3.5


@pytest.mark.parametrize("axis", [0, 1])
def test_laminate_2d_closed_form(axis):
    tensor = solve_cell_problem(layers(axis), 8, dim=2).tensor
    expected = np.full(2, ARITHMETIC)
    expected[axis] = HARMONIC
    assert np.allclose(tensor, np.diag(expected), atol=1e-6, rtol=0)


def test_laminate_3d_closed_form():
    tensor = solve_cell_problem(layers(2), 4, dim=3).tensor
    assert np.allclose(tensor, np.diag([ARITHMETIC, ARITHMETIC, HARMONIC]), atol=1e-6, rtol=0)


def test_laminate_problem_effective_tensor():
    # The problem's own single definition K(eps y) on the box of its period vector.
    problem = laminate_2d(0.05)
    errors = [
        np.abs(cell_problem_from(problem, n).tensor - problem.effective_tensor).max()
        for n in (8, 16)
    ]
    assert errors[1] < 1e-2
    assert errors[0] / errors[1] > 3.5


def test_checkerboard_keller_dykhne():
    exact = math.sqrt(A1 * A2)
    errors = []
    for n in (8, 16, 32):
        tensor = solve_cell_problem(checkerboard, n, dim=2).tensor
        # Symmetric under y0 <-> y1 (the Kuhn mesh is too): isotropic to rounding.
        assert abs(tensor[0, 0] - tensor[1, 1]) < 1e-10 * exact
        assert abs(tensor[0, 1]) < 1e-10 * exact
        errors.append(abs(tensor[0, 0] - exact) / exact)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05
    assert errors[2] / errors[1] < 0.8


def smooth_scalar(y, m):
    return (
        2.0
        + m.sin(2 * m.pi * y[0]) * m.cos(2 * m.pi * y[1])
        + 0.5 * m.sin(2 * m.pi * (y[0] + y[1]))
    )


def smooth_tensor(y, m):
    off = 0.3 * m.sin(2 * m.pi * y[0])
    return [[2.0 + m.cos(2 * m.pi * y[1]), off], [off, 1.5 + 0.5 * m.sin(2 * m.pi * y[0])]]


@pytest.mark.parametrize("coefficient", [smooth_scalar, smooth_tensor])
def test_symmetry_positivity_and_bounds(coefficient):
    tensor = solve_cell_problem(coefficient, 12, dim=2).tensor
    assert np.allclose(tensor, tensor.T, atol=1e-10)
    eigenvalues = np.linalg.eigvalsh(tensor)
    assert eigenvalues.min() > 0
    if coefficient is smooth_scalar:
        reuss, voigt = voigt_reuss_bounds(coefficient, 2)
        assert reuss * (1 - 1e-3) <= eigenvalues.min()
        assert eigenvalues.max() <= voigt * (1 + 1e-3)
        # Not trivially equal to a bound: the coefficient varies in both directions.
        assert voigt - eigenvalues.max() > 1e-2 and eigenvalues.min() - reuss > 1e-2


def test_parallel_matches_serial_and_corrector_properties():
    problem = paper_2d(0.1)  # cell [0, 2] x [0, 1], a(y) = 3 + sin(pi y0) + sin(2 pi y1)
    world = cell_problem_from(problem, 6, comm=MPI.COMM_WORLD)
    single = cell_problem_from(problem, 6, comm=MPI.COMM_SELF)
    assert np.allclose(world.tensor, single.tensor, atol=1e-12, rtol=0)
    assert np.allclose(world.lattice.values, single.lattice.values, atol=1e-10, rtol=0)
    values = world.lattice.values
    # Periodic: the upper faces repeat the lower ones.
    assert np.allclose(values[-1], values[0], atol=1e-14)
    assert np.allclose(values[:, -1], values[:, 0], atol=1e-14)
    # Zero mean (exact P1 mean: trapezoidal rule on the lattice of a periodic function).
    assert np.abs(values[:-1, :-1].mean(axis=(0, 1))).max() < 1e-12
    # The separable coefficient gives a diagonal tensor; N^1 does not depend on y0 etc.
    assert abs(world.tensor[0, 1]) < 1e-10
    rng = np.random.default_rng(0)
    y = rng.random((50, 2)) * 10 - 3  # periodic extension
    numpy_values = world.correctors_at(y)
    torch_values = world.correctors_at(torch.tensor(y)).numpy()
    assert np.allclose(numpy_values, torch_values, atol=1e-14)
    shifted = world.correctors_at(y + np.array([2.0, -3.0]))
    assert np.allclose(numpy_values, shifted, atol=1e-12)


def test_locally_periodic_slow_points():
    def coefficient(x, y, m):
        return (1.0 + x[0]) * m.where(y[0] < 0.5, A1, A2)

    with CellProblem(coefficient, 4, dim=2, locally_periodic=True) as cell:
        for x0 in (0.0, 0.5, 2.0):
            tensor = cell.solve(np.array([x0, 0.3])).tensor
            expected = (1.0 + x0) * np.diag([HARMONIC, ARITHMETIC])
            assert np.allclose(tensor, expected, atol=1e-8, rtol=0)
        with pytest.raises(ValueError, match="slow_point"):
            cell.solve()


def test_invalid_input():
    with pytest.raises(ValueError, match="n must"):
        solve_cell_problem(smooth_scalar, 0, dim=2)
    with pytest.raises(ValueError, match="positive definite"):
        solve_cell_problem(lambda y, m: m.sin(2 * m.pi * y[0]), 4, dim=2)
    with pytest.raises(ValueError, match="dim"):
        solve_cell_problem(smooth_scalar, 4)
    with pytest.raises(ValueError, match="integer cell count"):
        solve_cell_problem(smooth_scalar, 3, dim=2, cell_lengths=(0.5, 1.0))
    with pytest.raises(ValueError, match="tensor"):
        solve_homogenized(paper_2d(0.1), np.eye(3), 4)


def test_laminate_reconstruction_is_the_corrector():
    # q = 0: w0 = x_0 exactly, so u0 = 0 and u0 + eps u1 = eps N^0(x/eps) (G = e_0).
    problem = laminate_2d(0.25)
    cell = cell_problem_from(problem, 8)
    homogenized = solve_homogenized(problem, cell.tensor, 8)
    approximation = TwoScaleApproximation(problem, cell, homogenized)
    rng = np.random.default_rng(1)
    x = rng.random((40, 2))
    assert np.abs(approximation.homogenized(x)).max() < 1e-12
    expected = problem.eps * cell.correctors_at(x / problem.eps)[:, 0]
    assert np.allclose(approximation(x), expected, atol=1e-12)
    torch_values = approximation(torch.tensor(x)).numpy()
    assert np.allclose(torch_values, expected, atol=1e-12)
    gradient = approximation.gradient(x)
    expected_gradient = cell.corrector_gradients_at(x / problem.eps)[:, 0, :]
    assert np.allclose(gradient, expected_gradient, atol=1e-10)


def test_two_scale_rate_paper_2d():
    study = two_scale_error_study(paper_2d, [1 / 4, 1 / 8, 1 / 16], cell_resolution=6, coarse_n=48)
    errors = study.energy_errors
    assert errors[0] > errors[1] > errors[2]
    assert study.rate >= 0.4, study.as_dict()
    assert errors[-1] < 0.35
    # The corrector matters: without it the energy error would be O(1).
    assert np.allclose(study.tensor, study.tensor.T, atol=1e-10)


def test_warm_start_two_scale_net():
    networks = pytest.importorskip("dolfinx_pinn.networks")
    problem = paper_1d(1 / 8)
    cell = cell_problem_from(problem, 32)
    approximation = TwoScaleApproximation(
        problem, cell, solve_homogenized(problem, cell.tensor, 64)
    )
    net = networks.TwoScaleNet.for_problem(problem, k_max=3, width=12, depth=2, seed=0)
    result = warm_start_two_scale(net, problem, approximation, num_points=512, iterations=150)
    assert result.final_error < 0.1 < result.initial_error
    # The fitted network reproduces u0 + eps u1 away from the fit points too.
    x = torch.linspace(0.0, 1.0, 301, dtype=torch.float64)[:, None]
    with torch.no_grad():
        misfit = torch.linalg.norm(net(x).reshape(-1) - approximation(x))
    assert float(misfit / torch.linalg.norm(approximation(x))) < 0.15
    # Every rank holds the same parameters.
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    assert np.array_equal(flat, MPI.COMM_WORLD.bcast(flat, root=0))
