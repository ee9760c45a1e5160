"""Fine-scale references: the FE solve against the closed form, K̃, Algorithm 4.1, errors."""

import math

from mpi4py import MPI

import numpy as np
import pytest
import scipy.integrate
import torch
from dolfinx import fem

from dolfinx_pinn.problems import laminate_2d, paper_1d, paper_2d, quasi_periodic_1d
from dolfinx_pinn.reference import (
    box_partition,
    default_fine_resolution,
    exact_1d,
    relative_errors,
    solve_fine,
    solve_fine_directions,
    upscaled_coefficient,
    upscaled_tensor,
)

ONE_D_PROBLEMS = {
    "paper_1d_eps_1_15": lambda: paper_1d(1 / 15),
    "paper_1d_eps_0_01": lambda: paper_1d(0.01),
    "quasi_periodic_1d": lambda: quasi_periodic_1d(0.05),
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# -- the exact 1D solution -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ONE_D_PROBLEMS)
def test_exact_1d_matches_adaptive_quadrature(name):
    """The composite-Gauss closed form agrees with scipy's adaptive quadrature of (5.3)."""
    problem = ONE_D_PROBLEMS[name]()
    exact = exact_1d(problem)
    K = lambda t: float(problem.K(np.array([[t]]))[0])  # noqa: E731
    q = lambda t: float(problem.q(np.array([[t]]))[0])  # noqa: E731
    limit = int(20 / problem.finest_scale) + 50
    Q = lambda t: scipy.integrate.quad(q, 0.0, t, limit=limit)[0]  # noqa: E731
    options = {"limit": limit, "epsabs": 1e-14, "epsrel": 1e-13}
    J1 = scipy.integrate.quad(lambda t: 1.0 / K(t), 0.0, 1.0, **options)[0]
    J2 = scipy.integrate.quad(lambda t: Q(t) / K(t), 0.0, 1.0, **options)[0]
    c = (1.0 + J2) / J1
    assert _rel(exact.c, c) < 1e-10
    # K̃ = ⟨K (u' + 1)⟩ = c - ⟨Q⟩ on the unit interval.
    K_tilde = c - scipy.integrate.quad(Q, 0.0, 1.0, **options)[0]
    assert abs(exact.K_tilde - K_tilde) < 1e-8
    # u(1) = 0 and u(0) = 0, u' by (5.3) at a few points.
    assert abs(exact.u(np.array([0.0]))[0]) < 1e-14
    assert abs(exact.u(np.array([1.0]))[0]) < 1e-10
    for t in (0.123, 0.5, 0.871):
        assert abs(exact.du(np.array([t]))[0] - ((c - Q(t)) / K(t) - 1.0)) < 1e-9
        u_t = c * scipy.integrate.quad(lambda s: 1.0 / K(s), 0, t, **options)[0]
        u_t -= scipy.integrate.quad(lambda s: Q(s) / K(s), 0, t, **options)[0] + t
        assert abs(exact.u(np.array([t]))[0] - u_t) < 1e-9


def test_exact_1d_derivative_is_consistent():
    """U' is the derivative of u (central differences) and the torch forms agree with numpy."""
    exact = exact_1d(paper_1d(0.01))
    x = np.linspace(0.05, 0.95, 37)
    h = 1e-6
    central = (exact.u(x + h) - exact.u(x - h)) / (2 * h)
    assert np.max(np.abs(central - exact.du(x))) < 1e-6
    t = torch.tensor(x[:, None], dtype=torch.float64)
    np.testing.assert_array_equal(exact.torch_u(t).numpy(), exact.u(x))
    np.testing.assert_array_equal(exact.torch_du(t).numpy(), exact.du(x))


def test_exact_1d_paper_value_and_effective_coefficient():
    """K̃ of the paper's problem is close to K* = √3, the harmonic mean of 2 + sin."""
    harmonic = (
        1.0 / scipy.integrate.quad(lambda t: 1.0 / (2.0 + math.sin(2 * math.pi * t)), 0, 1)[0]
    )
    assert abs(harmonic - math.sqrt(3.0)) < 1e-12
    assert abs(exact_1d(paper_1d(1 / 15)).K_tilde - math.sqrt(3.0)) < 1e-3
    assert abs(exact_1d(paper_1d(0.01)).K_tilde - math.sqrt(3.0)) < 1e-4


# -- the fine solve against the closed form --------------------------------------------------------
@pytest.mark.parametrize("name", ONE_D_PROBLEMS)
def test_solve_fine_default_resolution(name):
    """At the default resolution the FE solution is within 1e-4 (relative L²) of (5.3)."""
    problem = ONE_D_PROBLEMS[name]()
    uh = solve_fine(problem)
    assert default_fine_resolution(problem)[0] >= 20 / problem.finest_scale
    l2, h1 = relative_errors(uh, exact_1d(problem))
    assert l2 <= 1e-4
    assert h1 <= 2.5e-2  # P1 H¹ error ≈ (2π/100)/√12 at 100 cells per period


@pytest.mark.parametrize("name", ONE_D_PROBLEMS)
def test_solve_fine_convergence_orders(name):
    """P1 converges with order 2 in L² and 1 in the H¹ seminorm, over three meshes."""
    problem = ONE_D_PROBLEMS[name]()
    exact = exact_1d(problem)
    base = default_fine_resolution(problem, elements_per_period=20)[0]
    errors = np.array([relative_errors(solve_fine(problem, n=base * k), exact) for k in (1, 2, 4)])
    orders = np.log2(errors[:-1] / errors[1:])
    assert np.all(np.abs(orders[:, 0] - 2.0) < 0.1), orders
    assert np.all(np.abs(orders[:, 1] - 1.0) < 0.1), orders


def test_solve_fine_gamg_equals_mumps():
    """CG + GAMG converges to the MUMPS solution (2D, P2)."""
    problem = paper_2d(0.1)
    direct = solve_fine(problem, n=40, degree=2)
    iterative = solve_fine(problem, degree=2, mesh=direct.function_space.mesh, solver="gamg")
    l2, h1 = relative_errors(iterative, direct)
    assert l2 < 1e-9 and h1 < 1e-8


def test_solve_fine_2d_higher_degree_converges():
    """The 2D problem: P2 at the default resolution against a finer P3 solution."""
    problem = paper_2d(0.1)
    fine = solve_fine(problem, n=60, degree=3)
    l2_coarse, _ = relative_errors(solve_fine(problem, n=30, degree=2), fine)
    l2_finer, h1_finer = relative_errors(solve_fine(problem, n=60, degree=2), fine)
    assert l2_finer < l2_coarse / 4
    assert l2_finer < 1e-3 and h1_finer < 2e-2


# -- K̃ by (4.10) ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("eps", "n"), [(1 / 15, 2000), (0.01, 5000)])
def test_upscaled_coefficient_reproduces_paper(eps, n):
    """K̃[u_h] = 1.732 ± 0.001 for h = 5e-4 (ε = 1/15) and h = 2e-4 (ε = 0.01), near exact."""
    problem = paper_1d(eps)
    uh = solve_fine(problem, n=n)
    K_tilde = upscaled_coefficient(problem, uh)
    assert abs(K_tilde - 1.732) <= 1e-3
    # The gap to the exact value is the O((h/ε)²) error of the flux average.
    h_over_eps = 1.0 / (n * eps)
    assert abs(K_tilde - exact_1d(problem).K_tilde) < 2.0 * h_over_eps**2


def test_upscaled_coefficient_converges_to_exact():
    """K̃[u_h] → K̃[u] (the closed form) with order 2 in h."""
    problem = paper_1d(1 / 15)
    exact = exact_1d(problem).K_tilde
    gaps = np.array(
        [
            abs(upscaled_coefficient(problem, solve_fine(problem, n=n)) - exact)
            for n in (600, 1200, 2400)
        ]
    )
    orders = np.log2(gaps[:-1] / gaps[1:])
    assert np.all(np.abs(orders - 2.0) < 0.15), orders
    assert gaps[-1] < 1e-4


# -- Algorithm 4.1 ---------------------------------------------------------------------------------
def test_upscaled_tensor_laminate():
    """K̃_11 is near the harmonic mean, K̃_22 the arithmetic mean, closer as ε decreases."""
    errors = []
    for eps in (1 / 8, 1 / 16):
        problem = laminate_2d(eps)
        harmonic, arithmetic = np.diag(problem.effective_tensor)
        solutions = solve_fine_directions(problem, degree=2, elements_per_period=8)
        (tensor,) = upscaled_tensor(problem, solutions)
        assert abs(tensor[1, 1] - arithmetic) < 1e-10
        assert abs(tensor[0, 1]) < 1e-10 and abs(tensor[1, 0]) < 1e-10
        errors.append(abs(tensor[0, 0] - harmonic))
    # The gap is the O(ε) boundary layer of the Dirichlet condition across the layers.
    assert errors[1] < 1e-2
    assert errors[1] < 0.7 * errors[0]


def test_upscaled_tensor_partition_and_single_direction_agree():
    """The one-subdomain tensor equals (4.10) on the diagonal; blocks average to Ω's fluxes."""
    problem = paper_2d(0.25)
    solutions = solve_fine_directions(problem, n=48, degree=2)
    (tensor,) = upscaled_tensor(problem, solutions)
    for i in range(2):
        K_ii = upscaled_coefficient(problem.with_lifting_direction(i), solutions[i])
        # (4.10) is the flux average; with ⟨∇w_i⟩ = e_i (4.9) it is the tensor's diagonal.
        assert _rel(tensor[i, i], K_ii) < 1e-10
    blocks = upscaled_tensor(
        problem, solutions, box_partition(problem, solutions[0].function_space.mesh, 2)
    )
    assert blocks.shape == (4, 2, 2)
    assert np.all(
        np.linalg.eigvalsh(0.5 * (blocks + blocks.transpose(0, 2, 1))) > problem.alpha - 1e-8
    )
    assert np.all(
        np.linalg.eigvalsh(0.5 * (blocks + blocks.transpose(0, 2, 1))) < problem.beta + 1e-8
    )


# -- relative errors -------------------------------------------------------------------------------
def test_relative_errors_across_meshes_and_kinds():
    """A Function on another mesh, a torch network and numpy callables give the same errors."""
    problem = paper_1d(1 / 15)
    exact = exact_1d(problem)
    reference = solve_fine(problem, n=1200)
    candidate = solve_fine(problem, n=300)
    # Nested meshes: the P1 candidate interpolated into the reference space is the same function.
    same_mesh = fem.Function(reference.function_space)
    mesh = reference.function_space.mesh
    index_map = mesh.topology.index_map(mesh.topology.dim)
    cells = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
    data = fem.create_interpolation_data(same_mesh.function_space, candidate.function_space, cells)
    same_mesh.interpolate_nonmatching(candidate, cells, data)
    l2_cross, h1_cross = relative_errors(candidate, reference)
    l2_same, h1_same = relative_errors(same_mesh, reference)
    assert _rel(l2_cross, l2_same) < 1e-10 and _rel(h1_cross, h1_same) < 1e-10

    class ExactNetwork(torch.nn.Module):
        """The closed form as a differentiable torch module (u'(x) via a custom gradient)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _ExactFunction.apply(x)

    class _ExactFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return exact.torch_u(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad[:, None] * exact.torch_du(x)[:, None]

    by_network = relative_errors(ExactNetwork(), reference)
    by_object = relative_errors(exact, reference)
    by_pair = relative_errors((exact.u, lambda p: exact.du(p)[:, None]), reference)
    np.testing.assert_allclose(by_network, by_object, rtol=1e-12)
    np.testing.assert_allclose(by_pair, by_object, rtol=1e-12)
    # The candidate's own error against the exact solution, integrated on its mesh.
    l2, h1 = relative_errors(candidate, exact)
    assert 0 < l2 < 5e-3 and 0 < h1 < 0.15  # 20 cells per period


# -- parallel: every quantity equal on 1 and 2 ranks -----------------------------------------------
def test_quantities_equal_on_world_and_self():
    """The FE solution, K̃, errors and the tensor agree between COMM_WORLD and COMM_SELF."""
    results = {}
    for comm in (MPI.COMM_WORLD, MPI.COMM_SELF):
        problem = paper_1d(1 / 15)
        exact = exact_1d(problem)
        uh = solve_fine(problem, n=900, comm=comm)
        l2, h1 = relative_errors(uh, exact)
        laminate = laminate_2d(0.25)
        solutions = solve_fine_directions(laminate, n=32, degree=2, comm=comm)
        tensor = upscaled_tensor(
            laminate, solutions, box_partition(laminate, solutions[0].function_space.mesh, 2)
        )
        results[comm.size if comm is MPI.COMM_SELF else "world"] = (
            upscaled_coefficient(problem, uh),
            l2,
            h1,
            tensor,
            uh.x.array.copy(),
            uh.function_space.tabulate_dof_coordinates()[:, 0].copy(),
        )
    world, serial = results["world"], results[1]
    for a, b in zip(world[:3], serial[:3], strict=True):
        assert _rel(a, b) < 1e-10
    np.testing.assert_allclose(world[3], serial[3], rtol=1e-10, atol=1e-12)
    # The local values of the distributed solution equal the serial solution at the same points.
    order = np.argsort(serial[5])
    located = np.searchsorted(serial[5][order], world[5] - 1e-12)
    np.testing.assert_allclose(serial[5][order][located], world[5], atol=1e-12)
    np.testing.assert_allclose(world[4], serial[4][order][located], rtol=1e-10, atol=1e-13)


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_named():
    problem = paper_1d(0.1)
    with pytest.raises(ValueError, match="degree"):
        solve_fine(problem, degree=0)
    with pytest.raises(ValueError, match="solver"):
        solve_fine(problem, solver="hypre")
    with pytest.raises(ValueError, match="elements_per_period"):
        solve_fine(problem, elements_per_period=0)
    with pytest.raises(ValueError, match="mesh"):
        solve_fine(problem, mesh=paper_2d(0.1).create_mesh(MPI.COMM_WORLD, 4))
    uh = solve_fine(problem, n=100)
    with pytest.raises(ValueError, match="quadrature_degree"):
        relative_errors(uh, exact_1d(problem), quadrature_degree=2)
    with pytest.raises(ValueError, match="mesh"):
        relative_errors(exact_1d(problem), exact_1d(problem))
    with pytest.raises(ValueError, match="problem"):
        exact_1d(paper_2d(0.1))
    laminate = laminate_2d(0.5)
    first = solve_fine(laminate, n=8)
    second = solve_fine(laminate.with_lifting_direction(1), n=8)
    with pytest.raises(ValueError, match="solutions"):
        upscaled_tensor(laminate, [first, second])
    with pytest.raises(ValueError, match="solutions"):
        upscaled_tensor(laminate, [first])
    with pytest.raises(ValueError, match="blocks"):
        box_partition(laminate, first.function_space.mesh, 0)
