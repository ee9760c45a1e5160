"""One definition per problem: numpy, torch and UFL agree; f is derived; bad input is named."""

import math

from mpi4py import MPI

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh

from dolfinx_pinn.problems import (
    Box,
    MultiscaleProblem,
    laminate_2d,
    paper_1d,
    paper_2d,
    quasi_periodic_1d,
    weierstrass_1d,
)


def _rotated_tensor_problem() -> MultiscaleProblem:
    """An anisotropic SPD tensor coefficient with oscillating entries."""

    def coefficient(x, m):
        s = m.sin(2 * m.pi * x[0] / 0.2)
        c = m.cos(2 * m.pi * x[1] / 0.2)
        return [[3.0 + s, 0.5 * c], [0.5 * c, 2.0 + 0.5 * s]]

    def source(x, m):
        return x[0] * x[1]

    return MultiscaleProblem(coefficient, source, 0.2, dim=2, period=(1.0, 1.0), name="tensor")


FACTORIES = [
    lambda: paper_1d(1 / 15),
    lambda: paper_2d(0.1),
    lambda: quasi_periodic_1d(0.05),
    lambda: weierstrass_1d(),
    lambda: laminate_2d(0.125),
    _rotated_tensor_problem,
]


def _ufl_at_points(problem: MultiscaleProblem, which: str):
    """Evaluate a UFL definition with dolfinx at points inside the cells of a small mesh."""
    mesh = problem.create_mesh(MPI.COMM_SELF, 7)
    tdim = mesh.topology.dim
    reference_points = np.array([[0.2, 0.3, 0.1][:tdim], [0.6, 0.1, 0.2][:tdim]])
    x = ufl.SpatialCoordinate(mesh)
    # A constant definition (the laminate's q = 0) carries no mesh: attach it by a zero Constant.
    expression = getattr(problem, which)(x)
    zero = fem.Constant(mesh, np.zeros(expression.ufl_shape))
    expression = expression + zero
    num_cells = mesh.topology.index_map(tdim).size_local
    cells = np.arange(num_cells, dtype=np.int32)
    values = fem.Expression(expression, reference_points, comm=mesh.comm).eval(mesh, cells)
    points = fem.Expression(x, reference_points).eval(mesh, cells)
    points = points.reshape(-1, mesh.geometry.dim)[:, :tdim]
    return points, values.reshape(len(points), *values.shape[2:])


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("which", ["K", "q", "f", "distance"])
def test_backends_agree(factory, which):
    problem = factory()
    points, ufl_values = _ufl_at_points(problem, which)
    numpy_values = getattr(problem, which)(points)
    torch_values = getattr(problem, which)(torch.tensor(points)).detach().numpy()
    scale = max(1.0, np.abs(numpy_values).max())
    np.testing.assert_allclose(
        numpy_values, ufl_values.reshape(numpy_values.shape), atol=1e-11 * scale
    )
    np.testing.assert_allclose(numpy_values, torch_values, atol=1e-12 * scale, rtol=0)


def test_derived_rhs_paper_1d():
    eps = 0.01
    problem = paper_1d(eps)
    x = np.random.default_rng(1).random((50, 1))
    expected = -3 * (2 * x[:, 0] - 1) + 2 * np.pi / eps * np.cos(2 * np.pi * x[:, 0] / eps)
    np.testing.assert_allclose(problem.f(x), expected, rtol=1e-13, atol=1e-10)


def test_derived_rhs_tensor_and_direction():
    problem = _rotated_tensor_problem()
    x = np.random.default_rng(2).random((30, 2))
    h = 1e-6
    for i in range(2):
        p = problem.with_lifting_direction(i)
        # ∇·(K e_i) = Σ_j ∂_j K_ji by central differences of the numpy evaluation.
        divergence = np.zeros(len(x))
        for j in range(2):
            shift = np.zeros(2)
            shift[j] = h
            divergence += (p.K(x + shift)[:, j, i] - p.K(x - shift)[:, j, i]) / (2 * h)
        np.testing.assert_allclose(p.f(x), p.q(x) + divergence, rtol=1e-7, atol=1e-6)


def test_torch_f_is_differentiable():
    problem = paper_2d()
    x = torch.rand(10, 2, dtype=torch.float64)
    value = problem.f(x, create_graph=True)
    assert value.shape == (10,)
    assert value.dtype == torch.float64


def test_distance_function_vanishes_on_boundary():
    problem = paper_2d()
    rng = np.random.default_rng(3)
    boundary = problem.domain.sample_boundary(200, rng)
    np.testing.assert_allclose(problem.distance(boundary), 0.0, atol=1e-14)
    assert problem.distance(np.array([[0.5, 0.5]]))[0] == pytest.approx(1.0)
    x = rng.random((20, 1))
    np.testing.assert_allclose(paper_1d(0.1).distance(x), 4 * x[:, 0] * (1 - x[:, 0]))


def test_box_measures_and_sampling():
    box = Box((0.0, -1.0), (2.0, 1.0))
    assert box.measure == 4.0
    assert box.boundary_measure == 8.0
    rng = np.random.default_rng(0)
    assert np.all(box.contains(box.sample_interior(100, rng)))
    on_boundary = box.sample_boundary(100, rng)
    assert np.all(box.contains(on_boundary))
    assert Box.unit(1).boundary_measure == 2.0


def test_bounds_and_effective_tensors():
    assert paper_1d(0.1).effective_tensor[0, 0] == pytest.approx(math.sqrt(3))
    laminate = laminate_2d(0.1)
    np.testing.assert_allclose(laminate.effective_tensor, np.diag([math.sqrt(3), 2.0]))
    quasi = quasi_periodic_1d(0.05)
    x = np.linspace(0, 1, 20001)[:, None]
    assert quasi.K(x).min() >= quasi.alpha
    w = weierstrass_1d(A=3.0, p=0.5, a=3.0, terms=5)
    assert w.K(x).min() >= w.alpha > 0
    assert w.finest_scale == pytest.approx(2 / 81)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: paper_1d(0.0), "eps"),
        (lambda: paper_1d(-0.1), "eps"),
        (lambda: paper_1d(float("nan")), "eps"),
        (lambda: paper_2d(float("inf")), "eps"),
        (lambda: MultiscaleProblem(lambda x, m: 1 + 0 * x[0], lambda x, m: 1.0, 0.1, dim=4), "dim"),
        (
            lambda: MultiscaleProblem(
                lambda x, m: 1 + 0 * x[0], lambda x, m: 1.0, 0.1, dim=2, period=(1.0,)
            ),
            "period",
        ),
        (
            lambda: MultiscaleProblem(
                lambda x, m: 1 + 0 * x[0], lambda x, m: 1.0, 0.1, dim=1, lifting_direction=1
            ),
            "lifting_direction",
        ),
        (
            lambda: MultiscaleProblem(
                lambda x, m: m.sin(2 * m.pi * x[0] / 0.1), lambda x, m: 1.0, 0.1, dim=1
            ),
            "coefficient",
        ),
        (
            lambda: MultiscaleProblem(lambda x, m: m.log(x[0] - 0.5), lambda x, m: 1.0, 0.1, dim=1),
            "coefficient",
        ),
        (
            lambda: MultiscaleProblem(
                lambda x, m: 2 + 0 * x[0], lambda x, m: 1.0, 0.1, dim=1, alpha=3
            ),
            "alpha",
        ),
        (
            lambda: MultiscaleProblem(
                lambda x, m: [[2 + 0 * x[0], 1.0], [0.0, 2.0]], lambda x, m: 1.0, 0.1, dim=2
            ),
            "symmetric",
        ),
        (
            lambda: MultiscaleProblem(
                lambda x, m: [[1 + 0 * x[0], 2.0], [2.0, 1.0]], lambda x, m: 1.0, 0.1, dim=2
            ),
            "positive",
        ),
        (
            lambda: MultiscaleProblem(
                lambda x, m: 1 + 0 * x[0], lambda x, m: 1 / (x[0] - x[0]), 0.1, dim=1
            ),
            "source",
        ),
        (lambda: weierstrass_1d(A=1.5), "A"),
        (lambda: quasi_periodic_1d(0.1, a0=1.0), "a0"),
        (lambda: laminate_2d(0.1, mean=1.0, amplitude=2.0), "amplitude"),
        (lambda: Box((0.0,), (0.0,)), "domain"),
    ],
)
def test_invalid_input_is_named(build, name):
    with np.errstate(all="ignore"), pytest.raises(ValueError, match=name):
        build()


def test_mesh_mismatch_is_named():
    problem = paper_2d()
    interval = dmesh.create_interval(MPI.COMM_WORLD, 4, [0.0, 1.0])
    with pytest.raises(ValueError, match="mesh: topological dimension 1"):
        problem.check_mesh(interval)
    shifted = dmesh.create_rectangle(MPI.COMM_WORLD, [[0.0, 0.0], [2.0, 1.0]], [4, 4])
    with pytest.raises(ValueError, match="mesh: its bounding box"):
        problem.check_mesh(shifted)
    problem.check_mesh(problem.create_mesh(MPI.COMM_WORLD, 4))


def test_ufl_coordinate_dimension_checked():
    mesh = dmesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    with pytest.raises(ValueError, match="dimension mismatch"):
        paper_1d(0.1).K(ufl.SpatialCoordinate(mesh))
