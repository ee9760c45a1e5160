"""One definition per problem: numpy, torch and UFL agree; f is derived; bad input is named."""

import math
import re
import time
import tracemalloc

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
    math_namespace,
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


# -- the declared period is checked -------------------------------------------------------------
def _sine(eps, period, dim=1):
    def coefficient(x, m):
        return 2.0 + m.sin(2.0 * m.pi * x[0] / eps)

    return MultiscaleProblem(coefficient, lambda x, m: 1.0, eps, dim=dim, period=period)


def test_period_in_x_instead_of_y_is_named_with_a_suggestion():
    # The common mistake: the period of K in x (eps), not in the fast variable y = x/eps.
    with pytest.raises(
        ValueError,
        match=r"coefficient: K is not periodic with period ε·p = 0\.0001 along x1 .*"
        r"max \|K\(x \+ ε p1 e1\) - K\(x\)\| = .*did you mean period=\(1\.0,\)\?",
    ):
        _sine(0.01, (0.01,))


@pytest.mark.parametrize(
    ("coefficient", "period", "suggestion"),
    [
        # sin(x/eps) has the period 2π in y.
        (lambda x, m: 2.0 + m.sin(x[0] / 0.01), (1.0,), r"period=\(6\.28318530718,\)"),
        # The paper's 2D coefficient has the period vector (2, 1), not (1, 1).
        (
            lambda x, m: 3.0 + m.sin(m.pi * x[0] / 0.01) + m.sin(2.0 * m.pi * x[1] / 0.01),
            (1.0, 1.0),
            r"along x1 .*period=\(2\.0, 1\.0\)",
        ),
        # Wrong only along x2, and half the period: the smallest period that fits is suggested.
        (
            lambda x, m: 3.0 + m.sin(2 * m.pi * x[0] / 0.01) + m.sin(2.0 * m.pi * x[1] / 0.01),
            (1.0, 0.5),
            r"along x2 \(x\[1\]\).*period=\(1\.0, 1\.0\)",
        ),
    ],
)
def test_wrong_period_suggests_one_that_passes(coefficient, period, suggestion):
    with pytest.raises(ValueError, match="coefficient: K is not periodic.*" + suggestion):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.01, dim=len(period), period=period)
    # The suggestion itself passes the check.
    text = re.search(r"period=(\([^)]*\))\?", _error_text(coefficient, period)).group(1)
    fixed = tuple(float(v) for v in text.strip("(),").split(","))
    MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.01, dim=len(period), period=fixed)


def _error_text(coefficient, period):
    try:
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.01, dim=len(period), period=period)
    except ValueError as error:
        return str(error)
    raise AssertionError("no error")


def test_wrong_period_of_a_tensor_is_named():
    def coefficient(x, m):
        s = m.sin(2 * m.pi * x[0] / 0.05)
        c = m.cos(2 * m.pi * x[1] / 0.05)
        return [[3.0 + s, 0.5 * c], [0.5 * c, 2.0 + 0.5 * s]]

    MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.05, dim=2, period=(1.0, 1.0))
    with pytest.raises(
        ValueError,
        match=r"not periodic with period ε·p = 0\.0333333 along x2.*period=\(1\.0, 1\.0\)",
    ):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.05, dim=2, period=(1.0, 2.0 / 3.0))


@pytest.mark.parametrize(
    "coefficient",
    [
        # Quasi-periodic: incommensurate frequencies.
        lambda x, m: (
            3.0 + m.sin(2 * m.pi * x[0] / 0.01) + m.sin(2 * math.sqrt(2) * m.pi * x[0] / 0.01)
        ),
        # Locally periodic a(x, x/eps): also varies on the slow scale.
        lambda x, m: 2.0 + x[0] + m.sin(2 * m.pi * x[0] / 0.01),
    ],
)
def test_non_periodic_coefficient_with_a_period_says_period_none(coefficient):
    with pytest.raises(
        ValueError, match=r"not periodic with period .*declares period=None"
    ) as info:
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.01, dim=1, period=(1.0,))
    assert "did you mean" not in str(info.value)
    # Declared as non-periodic, the same coefficient is accepted (the check is skipped).
    MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.01, dim=1, period=None)


@pytest.mark.parametrize("eps", [1e-6, 1e-9, 0.3, 1.0])
def test_correct_period_passes_at_any_scale(eps):
    # Rounding of sin(2πx/ε) at x/ε ~ 1e9 must not read as a wrong period; ε·p >= |Ω| neither.
    assert paper_1d(eps).period == (1.0,)
    # A constant coefficient and a non-periodic q and l are fine with a period.
    problem = MultiscaleProblem(
        lambda x, m: 2.0, lambda x, m: m.exp(x[0] * x[1]), eps, dim=2, period=(1.0, 3.0)
    )
    assert problem.alpha == problem.beta == 2.0


# -- coefficient checks that see narrow spikes ------------------------------------------------
def _periodic_bump(y, m, centre, sharpness):
    """exp(-sharpness (y - centre)^2) near the centre, repeated with period 1 in y."""
    return m.exp(-sharpness * (m.sin(m.pi * (y - centre)) / m.pi) ** 2)


def _missed_by_random_points(coefficient, dim, count=20_000):
    """Whether the former check's 20 000 random points (its seed) all see K > 0."""
    x = Box.unit(dim).sample_interior(count, np.random.default_rng(20240531))
    values = coefficient(tuple(x[:, j] for j in range(dim)), math_namespace("numpy"))
    return float(np.min(values)) > 0


def test_negative_spike_in_the_period_cell_is_found():
    eps = 0.01

    def coefficient(x, m):
        y = x[0] / eps
        return 2.0 + m.sin(2 * m.pi * y) - 3.0 * _periodic_bump(y, m, 0.3, 1e9)

    # The spike is so narrow that 20 000 random points (the former check) do not see it.
    assert _missed_by_random_points(coefficient, 1)
    with pytest.raises(
        ValueError, match=r"coefficient: K must be positive \(uniformly elliptic\), but K = -0\.0"
    ) as info:
        MultiscaleProblem(coefficient, lambda x, m: 1.0, eps, dim=1, period=(1.0,))
    location = float(re.search(r"at x = \(([-\d.e]+),\)", str(info.value)).group(1))
    assert (location / eps) % 1.0 == pytest.approx(0.3, abs=1e-3)


def test_brief_spike_form_is_found():
    # K = 2 + sin(2πy) - 3 exp(-1e4 (y - 0.3)^2) on the cell, y = x/ε.
    eps = 0.05

    def coefficient(x, m):
        y = x[0] / eps
        return 2.0 + m.sin(2 * m.pi * y) - 3.0 * _periodic_bump(y, m, 0.3, 1e4)

    with pytest.raises(ValueError, match=r"K must be positive .*but K = -0\.04\d* at x = \("):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, eps, dim=1, period=(1.0,))


def test_negative_point_spike_in_2d_cell_is_found():
    eps = 0.1

    def coefficient(x, m):
        y0, y1 = x[0] / eps, x[1] / eps
        bump = _periodic_bump(y0, m, 0.3, 1e6) * _periodic_bump(y1, m, 0.6, 1e6)
        return 2.0 + 0.5 * m.sin(2 * m.pi * y0) - 3.0 * bump

    assert _missed_by_random_points(coefficient, 2)
    with pytest.raises(ValueError, match=r"K must be positive .*K = -0\.5\d* at x = \(.*, .*\)"):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, eps, dim=2, period=(1.0, 1.0))


def test_indefinite_spike_of_a_tensor_is_found():
    eps = 0.1

    def coefficient(x, m):
        y0, y1 = x[0] / eps, x[1] / eps
        s = 3.0 * _periodic_bump(y0, m, 0.3, 1e6) * _periodic_bump(y1, m, 0.6, 1e6)
        return [[2.0 + m.sin(2 * m.pi * y0), s], [s, 2.0]]

    with pytest.raises(
        ValueError, match=r"K must be positive .*its smallest eigenvalue is -0\.5\d* at x = \("
    ):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, eps, dim=2, period=(1.0, 1.0))


def test_negative_spike_of_a_non_periodic_coefficient_is_found():
    def coefficient(x, m):
        return 2.0 + m.sin(2 * m.pi * x[0] / 0.01) - 4.0 * m.exp(-1e9 * (x[0] - 0.3003) ** 2)

    assert _missed_by_random_points(coefficient, 1)
    with pytest.raises(ValueError, match=r"but K = -1\.8\d* at x = \(0\.3003,\)"):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.01, dim=1)


def test_spike_above_beta_and_alpha_violation_name_the_point():
    def coefficient(x, m):
        y = x[0] / 0.1
        return 2.0 + 0.5 * m.sin(2 * m.pi * y) + 3.0 * _periodic_bump(y, m, 0.3, 1e8)

    with pytest.raises(ValueError, match=r"K <= beta = 3\.0 violated, max K = 5\.\d* at x = \("):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.1, dim=1, period=(1.0,), beta=3.0)
    with pytest.raises(ValueError, match=r"K >= alpha = 2\.0 violated, min K = 1\.5 at x = \("):
        MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.1, dim=1, period=(1.0,), alpha=2.0)
    # Without beta, the estimate sees the peak.
    problem = MultiscaleProblem(coefficient, lambda x, m: 1.0, 0.1, dim=1, period=(1.0,))
    assert problem.beta > 5.0


# -- evaluation through the namespace m ---------------------------------------------------------
def _if_on_coordinates(x, m):
    return 1.0 if x[0] > 0.5 else 2.0


def _detached(x, m):
    if isinstance(x[0], torch.Tensor):
        return 2.0 + torch.as_tensor(np.sin(x[0].detach().numpy()))
    return 2.0 + m.sin(x[0])


BAD_DEFINITIONS = [
    ("np.sin", lambda x, m: 2.0 + np.sin(2 * np.pi * x[0])),
    ("math.sin", lambda x, m: 2.0 + math.sin(2 * math.pi * x[0])),
    ("np.exp", lambda x, m: 1.0 + np.exp(x[0])),
    ("np.where", lambda x, m: np.where(x[0] > 0.5, 1.0, 2.0)),
    ("if", _if_on_coordinates),
    ("max", lambda x, m: max(x[0], 0.5) + 1.0),
]


@pytest.mark.parametrize("which", ["coefficient", "source", "distance"])
def test_numpy_math_or_python_if_is_named_at_construction(which):
    # One test per definition, the kinds in a loop (the suite's per-test gc costs ~0.4 s).
    for kind, bad in BAD_DEFINITIONS:
        good = {
            "coefficient": lambda x, m: 2.0 + m.sin(x[0]),
            "source": lambda x, m: 1.0,
            "distance": lambda x, m: x[0] * (1.0 - x[0]),
        }
        good[which] = bad
        with pytest.raises(ValueError, match=rf"^{which}: .* namespace m \(m\.sin.*m\.where"):
            MultiscaleProblem(
                good["coefficient"], good["source"], 0.1, dim=1, distance=good["distance"]
            )
            pytest.fail(f"{which} with {kind} was accepted")


def test_original_error_is_appended():
    with pytest.raises(ValueError, match=r"coefficient: .*torch tensors.*\(RuntimeError: .*numpy"):
        MultiscaleProblem(lambda x, m: 2.0 + np.sin(x[0]), lambda x, m: 1.0, 0.1, dim=1)


def test_detached_torch_result_is_named():
    with pytest.raises(ValueError, match=r"coefficient: K on torch tensors is not connected"):
        MultiscaleProblem(_detached, lambda x, m: 1.0, 0.1, dim=1)


def test_constants_and_m_where_are_valid_definitions():
    def coefficient(x, m):
        return [[m.where(x[0] > 0.5, 2.0, 3.0), 0.0], [0.0, 1.5]]

    problem = MultiscaleProblem(
        coefficient, lambda x, m: 0.0, 0.1, dim=2, distance=lambda x, m: 1.0
    )
    assert problem.is_tensor
    assert problem.q(np.full((3, 2), 0.2)).tolist() == [0.0] * 3
    assert MultiscaleProblem(lambda x, m: 1, lambda x, m: 0, 0.1, dim=1).alpha == 1.0


@pytest.mark.parametrize(
    ("coefficient", "source", "match"),
    [
        (lambda x, m: [[2.0, 0.0], [0.0]], lambda x, m: 1.0, r"coefficient: K: a tensor must be"),
        (lambda x, m: 2.0, lambda x, m: [[1.0, 0.0], [0.0, 1.0]], r"source: q must be a scalar"),
        ("not callable", lambda x, m: 1.0, r"coefficient: K must be a function g\(x, m\)"),
    ],
)
def test_malformed_definitions_are_named(coefficient, source, match):
    with pytest.raises(ValueError, match=match):
        MultiscaleProblem(coefficient, source, 0.1, dim=2)


# -- wrong coordinates ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("which", "dim", "index", "hint"),
    [
        ("coefficient", 1, 1, r"\(use x\[0\]\)"),
        ("source", 2, 2, r"\(use x\[0\] and x\[1\]\)"),
        ("distance", 1, 3, r"\(use x\[0\]\)"),
    ],
)
def test_coordinate_beyond_the_dimension_is_named(which, dim, index, hint):
    definitions = {
        "coefficient": lambda x, m: 2.0 + 0.0 * x[0],
        "source": lambda x, m: 1.0,
        "distance": None,
    }
    definitions[which] = lambda x, m: 1.0 + x[index]
    with pytest.raises(
        ValueError, match=rf"^{which}: uses x\[{index}\], but the problem is {dim}D {hint}$"
    ):
        MultiscaleProblem(
            definitions["coefficient"],
            definitions["source"],
            0.1,
            dim=dim,
            distance=definitions["distance"],
        )


def test_negative_coordinate_index_and_slices_still_work():
    problem = MultiscaleProblem(
        lambda x, m: 2.0 + m.sin(x[-1]) * sum(x[0:2]) ** 0, lambda x, m: 1.0, 0.1, dim=2
    )
    np.testing.assert_allclose(problem.K(np.array([[0.0, 0.5]])), 2.0 + np.sin(0.5))


# -- integer and other arguments --------------------------------------------------------------
def test_numpy_integers_are_accepted():
    problem = MultiscaleProblem(
        lambda x, m: 2.0 + 0.0 * x[0],
        lambda x, m: 1.0,
        np.float64(0.1),
        dim=np.int64(2),
        lifting_direction=np.int32(1),
        period=np.array([1.0, 1.0]),
        alpha=np.float32(1.0),
    )
    assert problem.dim == 2 and type(problem.dim) is int
    assert problem.lifting_direction == 1 and type(problem.lifting_direction) is int
    assert problem.default_resolution(np.int64(4)) == 40
    assert weierstrass_1d(terms=np.int64(4)).finest_scale == pytest.approx(2 / 27)
    assert Box.unit(np.int64(3)).dim == 3
    assert problem.with_lifting_direction(np.int64(0)).lifting_direction == 0


INVALID_ARGUMENTS = [
    (
        lambda: MultiscaleProblem(lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=True),
        r"dim must be an integer in \[1, 3\], got True",
    ),
    (
        lambda: MultiscaleProblem(lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=2.0),
        r"dim must be an integer in \[1, 3\], got 2\.0",
    ),
    (
        lambda: MultiscaleProblem(
            lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=2, lifting_direction=np.bool_(True)
        ),
        r"lifting_direction must be an integer in \[0, 1\]",
    ),
    (
        lambda: MultiscaleProblem(
            lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=2, lifting_direction=np.int64(2)
        ),
        r"lifting_direction must be an integer in \[0, 1\], got np\.int64\(2\)",
    ),
    (lambda: weierstrass_1d(terms=True), r"terms must be an integer >= 1, got True"),
    (lambda: weierstrass_1d(terms=2.0), r"terms must be an integer >= 1"),
    (lambda: weierstrass_1d(p="0.5"), r"p must be a number in \(0, 1\)"),
    (
        lambda: paper_1d(0.1).default_resolution(0),
        r"elements_per_period must be an integer >= 1",
    ),
    (lambda: paper_1d("0.1"), r"eps must be a finite number > 0"),
    (
        lambda: MultiscaleProblem(lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=1, period=1.0),
        r"period must be a sequence of 1 numbers > 0",
    ),
    (
        lambda: MultiscaleProblem(lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=1, alpha="1"),
        r"alpha must be a finite number > 0",
    ),
    (
        lambda: MultiscaleProblem(lambda x, m: 2.0, lambda x, m: 1.0, 0.1, domain=(0, 1)),
        r"domain must be a Box",
    ),
    (
        lambda: MultiscaleProblem(
            lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=2, effective_tensor=[[1.0]]
        ),
        r"effective_tensor must be a finite 2x2 array",
    ),
    (
        lambda: MultiscaleProblem(lambda x, m: 2.0, lambda x, m: 1.0, 0.1, dim=1, name=3),
        r"name must be a non-empty string",
    ),
    (lambda: quasi_periodic_1d(0.1, cos_amplitudes=0.5), r"cos_amplitudes must be a sequence"),
    (lambda: laminate_2d(0.1, amplitude=None), r"amplitude must be a finite number"),
    (lambda: Box((0.0, "a"), (1.0, 1.0)), r"domain: lower must be finite numbers"),
]


def test_arguments_are_validated_with_name_and_range():
    for build, match in INVALID_ARGUMENTS:
        with pytest.raises(ValueError, match=match):
            build()


# -- the checks stay cheap ----------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: paper_2d(0.001), lambda: paper_1d(1e-6)])
def test_construction_is_cheap(build):
    build()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        build()
        best = min(best, time.perf_counter() - start)
    # Measured about 0.06 s (paper_2d) and 0.02 s (paper_1d) on 2 cores; generous for load.
    assert best < 1.0


def test_construction_memory_does_not_grow_with_one_over_eps():
    peaks = []
    for eps in (1e-3, 1e-9):
        tracemalloc.start()
        paper_1d(eps)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # About 4 MB either way: the grids are capped, not 1/ε in size.
    assert max(peaks) < 64 * 2**20
    assert peaks[1] < 2 * peaks[0] + 2**20
