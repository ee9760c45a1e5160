"""Fine-scale references: the FE solve against the closed form, K̃, Algorithm 4.1, errors."""

import copy
import functools
import itertools
import math
import os
import subprocess
import sys
import time
import tracemalloc

from mpi4py import MPI

import numpy as np
import pytest
import scipy.integrate
import torch
from dolfinx import fem

from dolfinx_pinn import reference
from dolfinx_pinn.problems import (
    Box,
    MultiscaleProblem,
    laminate_2d,
    paper_1d,
    paper_2d,
    quasi_periodic_1d,
)
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


def test_sampled_errors_against_quadrature():
    """Past ``max_points`` the QMC estimate agrees with the Gauss rule, and across partitions.

    A 2D two-scale case (laminate, ε = 1/8): a P2 reference, a coarser P1 Function on another
    mesh, a network and a pair of callables. The estimate from 2^15 points lies within a few per
    cent of the quadrature value, and it is the same on COMM_WORLD and COMM_SELF (the points are
    global; each is evaluated where an owned cell holds it).
    """
    problem = laminate_2d(0.125)
    results = {}
    for comm in (MPI.COMM_WORLD, MPI.COMM_SELF):
        reference_h = solve_fine(problem, n=48, degree=2, comm=comm)
        coarse = solve_fine(problem, n=20, degree=1, comm=comm)
        network = torch.nn.Sequential(
            torch.nn.Linear(2, 8, dtype=torch.float64),
            torch.nn.Tanh(),
            torch.nn.Linear(8, 1, dtype=torch.float64),
        )
        torch.manual_seed(3)
        for parameter in network.parameters():
            torch.nn.init.normal_(parameter, std=0.5)

        def pair_value(points: np.ndarray) -> np.ndarray:
            return points[:, 0] * (1.0 - points[:, 0]) + 0.1 * np.sin(8.0 * points[:, 1])

        def pair_gradient(points: np.ndarray) -> np.ndarray:
            return np.column_stack([1.0 - 2.0 * points[:, 0], 0.8 * np.cos(8.0 * points[:, 1])])

        rows = []
        for candidate in (coarse, network, (pair_value, pair_gradient)):
            exact = relative_errors(candidate, reference_h)
            sampled = relative_errors(candidate, reference_h, max_points=1, samples=2**15)
            rows.append((exact, sampled))
        results["world" if comm is MPI.COMM_WORLD else "self"] = rows
    for exact, sampled in results["self"]:
        np.testing.assert_allclose(sampled, exact, rtol=0.05)
    # Equal up to (most likely) the few points within the collision tolerance of a facet, which a
    # partition may assign to the neighbouring cell: there a discontinuous gradient differs.
    for (_, world), (_, serial) in zip(results["world"], results["self"], strict=True):
        np.testing.assert_allclose(world, serial, rtol=1e-5)
    with pytest.raises(ValueError, match="samples"):
        relative_errors(coarse, reference_h, max_points=1, samples=0)


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


# -- exact_1d at any ε -----------------------------------------------------------------------------
# The paper's problem in closed form, independently of the package's quadrature. With w = 1/K,
# K = 2 + sin(2πx/ε), θ = 2πx/ε and κ = ε/2π: w = 1/√3 + ψ' with the periodic ψ = κ Ψ(θ),
# Ψ = Φ - θ/√3, Φ(θ) = ∫_0^θ dθ'/(2 + sin θ') (an arctan of tan(θ/2)); ψ = ψ̄ + χ' with the
# periodic χ = κ² X(θ), X = ∫_0^θ (Ψ - Ψ̄); χ = χ̄ + ω' with ω = O(κ³). Integrating by parts
# with Q = 3x - 3x², q = 3 - 6x, q' = -6 and R = ∫_0^x Q:
#     J1 = ∫_0^x w = x/√3 + ψ(x),
#     J2 = ∫_0^x Q w = R/√3 + Q (ψ - ψ̄) - q χ + q' (χ̄ x + ω(x)),
# exact (q'' = 0 ends the expansion), with ω = κ³ ∫_0^θ (X - X̄). At x = 1 (1/ε an integer) the
# periodic terms vanish, so K̃ = c - ∫Q = √3 (1 - 6 χ̄) = √3 (1 - 6 κ² X̄) for every such ε.
_SQRT3 = math.sqrt(3.0)
_QUAD = {"epsabs": 1e-14, "epsrel": 1e-12, "limit": 200}


def _Phi(theta: float) -> float:
    """∫_0^θ dθ'/(2 + sin θ') for θ in [0, 2π]."""
    if theta == math.pi:
        return 2.0 * math.pi / (3.0 * _SQRT3)
    value = (2.0 / _SQRT3) * (math.atan((2.0 * math.tan(0.5 * theta) + 1.0) / _SQRT3) - math.pi / 6)
    return value + 2.0 * math.pi / _SQRT3 if theta > math.pi else value


def _Psi(theta: float) -> float:
    return _Phi(theta) - theta / _SQRT3


@functools.cache
def _cell_means() -> tuple[float, float]:
    """Ψ̄ and X̄ = (1/2π) ∫_0^{2π} (2π - θ)(Ψ - Ψ̄) dθ, the means of Ψ and X over a period."""
    two_pi = 2.0 * math.pi
    psi_mean = scipy.integrate.quad(_Psi, 0.0, two_pi, points=[math.pi], **_QUAD)[0] / two_pi
    x_mean = (
        scipy.integrate.quad(
            lambda t: (two_pi - t) * (_Psi(t) - psi_mean), 0.0, two_pi, points=[math.pi], **_QUAD
        )[0]
        / two_pi
    )
    return psi_mean, x_mean


def _X(theta: float) -> float:
    """X(θ) = ∫_0^θ (Ψ - Ψ̄), split where the arctan form of Φ changes branch."""
    psi_mean = _cell_means()[0]
    inner = [0.0, theta] if theta <= math.pi else [0.0, math.pi, theta]
    return sum(
        scipy.integrate.quad(lambda t: _Psi(t) - psi_mean, lo, hi, **_QUAD)[0]
        for lo, hi in itertools.pairwise(inner)
    )


def _paper_two_scale(eps: float, x: float) -> tuple[float, float]:
    """J1(x) and J2(x) of ``paper_1d(eps)`` by the closed form above (ω included)."""
    psi_mean, x_mean = _cell_means()
    kappa = eps / (2.0 * math.pi)
    theta = 2.0 * math.pi * (x / eps - math.floor(x / eps))
    psi, chi = kappa * _Psi(theta), kappa**2 * _X(theta)
    # ω is multiplied by κ³ < 1e-5: a loose tolerance suffices (and the inner quad is noisy).
    omega = kappa**3 * scipy.integrate.quad(lambda t: _X(t) - x_mean, 0.0, theta, epsabs=1e-10)[0]
    Q, R, q = 3.0 * x - 3.0 * x * x, 1.5 * x * x - x**3, 3.0 - 6.0 * x
    J1 = x / _SQRT3 + psi
    J2 = R / _SQRT3 + Q * (psi - kappa * psi_mean) - q * chi - 6.0 * (kappa**2 * x_mean * x + omega)
    return J1, J2


def _paper_K_tilde(eps: float) -> float:
    """K̃ of ``paper_1d(eps)`` in closed form, for 1/ε an integer."""
    return _SQRT3 * (1.0 - 6.0 * (eps / (2.0 * math.pi)) ** 2 * _cell_means()[1])


def test_two_scale_closed_form_is_right():
    """The closed form's pieces against plain quadrature: Φ, and u at ε = 1/15 (few periods)."""
    for theta in (0.3, 2.0, math.pi, 4.0, 6.0):
        integral = scipy.integrate.quad(lambda t: 1.0 / (2.0 + math.sin(t)), 0.0, theta, **_QUAD)
        assert abs(_Phi(theta) - integral[0]) < 1e-14
    eps, x = 1 / 15, 0.4321
    K = lambda t: 2.0 + math.sin(2 * math.pi * t / eps)  # noqa: E731
    points = np.linspace(0.0, x, 8 * 7 + 1)[1:-1].tolist()
    options = {**_QUAD, "limit": 500, "points": points}
    J1 = scipy.integrate.quad(lambda t: 1.0 / K(t), 0.0, x, **options)[0]
    J2 = scipy.integrate.quad(lambda t: (3 * t - 3 * t * t) / K(t), 0.0, x, **options)[0]
    closed = _paper_two_scale(eps, x)
    assert abs(closed[0] - J1) < 1e-14 and abs(closed[1] - J2) < 1e-14


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_exact_1d_small_eps_against_closed_form(eps):
    """At ε = 1e-3 and 1e-5 (10^5 periods) c, K̃, u and u' equal the closed form to 1e-12."""
    exact = exact_1d(paper_1d(eps))
    assert exact.algorithm == "periodic"
    J1_b, J2_b = _paper_two_scale(eps, 1.0)
    c = (1.0 + J2_b) / J1_b
    assert _rel(exact.c, c) < 1e-13
    assert abs(exact.K_tilde - (c - 0.5)) < 1e-13
    assert abs(exact.K_tilde - _paper_K_tilde(eps)) < 1e-13
    x = np.array([0.0, 1.234567e-6, 0.1234567, 0.5, 0.87654321, 1.0 - 3.3e-6, 1.0])
    expected = [c * J1 - J2 - t for t in x for J1, J2 in [_paper_two_scale(eps, t)]]
    np.testing.assert_allclose(exact.u(x), expected, rtol=0, atol=1e-12)
    Q = 3 * x - 3 * x * x
    expected_du = (c - Q) / (2.0 + np.sin(2 * np.pi * x / eps)) - 1.0
    np.testing.assert_allclose(exact.du(x), expected_du, rtol=0, atol=1e-12)


def test_exact_1d_eps_1e6_is_fast_and_tends_to_the_homogenised_value():
    """ε = 1e-6 (10^6 periods) builds in well under a second and K̃ = √3 to round-off."""
    problem = paper_1d(1e-6)
    start = time.perf_counter()
    exact = exact_1d(problem)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed  # about 0.1 s; generous for a loaded machine
    assert abs(exact.K_tilde - _paper_K_tilde(1e-6)) < 1e-13
    assert abs(exact.K_tilde - math.sqrt(3.0)) < 1e-13
    x = np.array([0.0, 0.3, 0.7071, 1.0])
    J1_b, J2_b = _paper_two_scale(1e-6, 1.0)
    c = (1.0 + J2_b) / J1_b
    expected = [c * J1 - J2 - t for t in x for J1, J2 in [_paper_two_scale(1e-6, t)]]
    np.testing.assert_allclose(exact.u(x), expected, rtol=0, atol=1e-12)


def test_exact_1d_is_continuous_across_periods_and_blocks():
    """U is continuous at period starts (table, interpolant and product rule meet) at ε = 1e-6."""
    eps = 1e-6
    exact = exact_1d(paper_1d(eps))
    periods = np.random.default_rng(7).integers(1, 10**6, 2000)
    periods = np.concatenate([periods, np.arange(0, 10**6 + 1, 31250)[1:-1]])
    delta = 1e-12
    x = periods * eps
    jump = exact.u(x + delta) - exact.u(x - delta)
    # u' is bounded by (c + max Q)/min K + 1 < 4, so a continuous u changes by < 8e-12.
    assert np.max(np.abs(jump)) < 1e-11
    # Derivative consistency across the oscillation at h << ε.
    t = np.random.default_rng(8).random(50)
    h = 2e-9
    central = (exact.u(t + h) - exact.u(t - h)) / (2 * h)
    assert np.max(np.abs(central - exact.du(t))) < 1e-4


def test_exact_1d_memory_in_process():
    """Peak numpy memory of ε = 1e-5 and 1e-6 plus 2·10^5 u and 10^6 u' points stays bounded."""
    x = np.random.default_rng(0).random(10**6)
    peaks = []
    for eps in (1e-5, 1e-6):
        tracemalloc.start()
        try:
            exact = exact_1d(paper_1d(eps))
            exact.u(x[: 2 * 10**5])
            exact.du(x)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # 10^6 outputs are 8 MB each; the chunks and tables add a few MB, whatever ε.
    assert max(peaks) < 80 * 2**20, peaks


@pytest.mark.skip_in_parallel
def test_exact_1d_peak_rss_in_a_subprocess():
    """Peak RSS of exact_1d(paper_1d(1e-5)) plus u at 10^5 points, over the import baseline.

    A fresh interpreter with torch and DOLFINx imported holds about 800 MB here (its import
    transients have reached 1 GB), so the peak is reset after the imports (Linux's clear_refs)
    and the increase measured: about 40 MB, bounded by 150 MB (the previous algorithm needed
    about 3 TB at this ε).
    """
    script = (
        "import resource\n"
        "from mpi4py import MPI\n"
        "import numpy as np\n"
        "from dolfinx_pinn.problems import paper_1d\n"
        "from dolfinx_pinn.reference import exact_1d\n"
        "def status(key):\n"
        "    lines = open('/proc/self/status').read().splitlines()\n"
        "    return next(int(s.split()[1]) for s in lines if s.startswith(key)) / 1024\n"
        "try:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := current RSS\n"
        "except OSError:\n"
        "    print('no-reset')\n"
        "    raise SystemExit\n"
        "baseline = status('VmRSS')\n"
        "exact = exact_1d(paper_1d(1e-5))\n"
        "exact.u(np.random.default_rng(0).random(10**5))\n"
        "print(baseline, status('VmHWM'))\n"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in list(environment):  # a serial MPI job of its own
        if key.startswith(("PMI_", "OMPI_", "MPI_LOCALNRANKS", "HYDRA_")):
            environment.pop(key)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    if completed.stdout.split()[-1] == "no-reset":
        pytest.skip("the peak RSS cannot be reset on this system (/proc/self/clear_refs)")
    baseline, peak = map(float, completed.stdout.split()[-2:])
    assert peak - baseline < 150.0, (baseline, peak)
    assert peak < baseline + 150.0 < 2000.0, (baseline, peak)


def _composite_reference_paper_source(problem, x: np.ndarray, per_scale: int = 8):
    """(c, K̃, u(x), u'(x)) by a plain composite 32-point Gauss rule, the exact Q = 3x - 3x².

    The previous algorithm, written out for a source q = -3(2x - 1) on (0, 1): independent of
    the package's chunks, checkpoints and integration matrices.
    """
    nodes, weights = np.polynomial.legendre.leggauss(32)
    count = int(np.ceil(per_scale / problem.finest_scale))
    breaks = np.linspace(0.0, 1.0, count + 1)
    h = np.diff(breaks)[:, None]
    t = breaks[:-1, None] + 0.5 * h * (nodes + 1.0)
    w = 0.5 * h * weights
    K = lambda s: problem.K(s.reshape(-1, 1)).reshape(s.shape)  # noqa: E731
    Q = lambda s: 3.0 * s - 3.0 * s * s  # noqa: E731
    J1_breaks = np.concatenate([[0.0], np.cumsum((w / K(t)).sum(axis=1))])
    J2_breaks = np.concatenate([[0.0], np.cumsum((w * Q(t) / K(t)).sum(axis=1))])
    c = (1.0 + J2_breaks[-1]) / J1_breaks[-1]
    K_tilde = c - 0.5
    k = np.clip(np.searchsorted(breaks, x, side="right") - 1, 0, count - 1)
    half = 0.5 * (x - breaks[k])
    s = breaks[k][:, None] + half[:, None] * (nodes + 1.0)
    J1 = J1_breaks[k] + half * ((1.0 / K(s)) @ weights)
    J2 = J2_breaks[k] + half * ((Q(s) / K(s)) @ weights)
    return c, K_tilde, c * J1 - J2 - x, (c - Q(x)) / K(x) - 1.0


def test_exact_1d_non_periodic_small_eps_against_the_composite_rule():
    """quasi_periodic_1d at ε = 1e-3 (chunked composite rule) equals a plain composite rule."""
    problem = quasi_periodic_1d(1e-3)
    exact = exact_1d(problem)
    assert exact.algorithm == "composite"
    x = np.concatenate([[0.0, 1.0], np.random.default_rng(1).random(500)])
    c, K_tilde, u, du = _composite_reference_paper_source(problem, x)
    assert _rel(exact.c, c) < 1e-12
    assert abs(exact.K_tilde - K_tilde) < 1e-12
    np.testing.assert_allclose(exact.u(x), u, rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact.du(x), du, rtol=0, atol=1e-12)
    assert abs(exact.u(np.array([1.0]))[0]) < 1e-14


def test_exact_1d_chunks_and_checkpoints_do_not_change_the_result(monkeypatch):
    """Tiny chunks and few checkpoints (a point then crosses whole subintervals) change nothing."""
    problem = quasi_periodic_1d(1e-3)
    x = np.concatenate([[0.0, 1.0], np.random.default_rng(2).random(3000)])
    default = exact_1d(problem)
    monkeypatch.setattr(reference, "_MAX_CHECKPOINTS", 1000)  # 14 subintervals per checkpoint
    monkeypatch.setattr(reference, "_SWEEP_SUBINTERVALS", 100)
    monkeypatch.setattr(reference, "_CHUNK_NODES", 5000)
    chunked = exact_1d(problem)
    assert _rel(chunked.c, default.c) < 1e-14
    assert abs(chunked.K_tilde - default.K_tilde) < 1e-14
    np.testing.assert_allclose(chunked.u(x), default.u(x), rtol=0, atol=1e-14)
    np.testing.assert_allclose(chunked.du(x), default.du(x), rtol=0, atol=1e-14)


def _periodic_problem(eps: float, period: tuple[float, ...] | None, source=None):
    """A periodic K with two harmonics on (0.3, 2.15), not a whole number of periods."""

    def coefficient(x, m):
        y = x[0] / eps
        return 2.0 + m.sin(2.0 * m.pi * y) + 0.4 * m.cos(6.0 * m.pi * y + 0.3)

    def smooth_source(x, m):
        return 10.0 * m.exp(-10.0 * (x[0] - 1.0) ** 2) + m.cos(x[0])

    return MultiscaleProblem(
        coefficient,
        source or smooth_source,
        eps,
        domain=Box((0.3,), (2.15,)),
        period=period,
        finest_scale=eps / 3.0,
        name="two_harmonics",
    )


@pytest.mark.parametrize("eps", [1e-2, 7.77e-4])
def test_exact_1d_periodic_algorithm_equals_composite_rule(eps):
    """A smooth non-polynomial q, a domain off 0 and a remainder: periodic = composite rule."""
    periodic = exact_1d(_periodic_problem(eps, (1.0,)))
    composite = exact_1d(_periodic_problem(eps, None))
    assert (periodic.algorithm, composite.algorithm) == ("periodic", "composite")
    x = np.concatenate([[0.3, 2.15], 0.3 + 1.85 * np.random.default_rng(3).random(2000)])
    # The composite rule samples K at x/ε up to 3e3, where rounding costs it about 1e-13.
    assert _rel(periodic.c, composite.c) < 1e-12
    assert abs(periodic.K_tilde - composite.K_tilde) < 1e-12
    np.testing.assert_allclose(periodic.u(x), composite.u(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(periodic.du(x), composite.du(x), rtol=0, atol=1e-12)
    assert abs(periodic.u(np.array([2.15]))[0]) < 1e-14


def test_exact_1d_falls_back_to_the_composite_rule():
    """Few periods, a declared period K does not have, and an oscillating q stay correct."""
    assert exact_1d(paper_1d(1 / 15)).algorithm == "composite"  # 15 periods
    problem = copy.copy(paper_1d(1e-3))
    problem.period = (1.1,)  # not K's period (the problem's own check would refuse it)
    with pytest.warns(RuntimeWarning, match="period"):
        wrong = exact_1d(problem)
    assert wrong.algorithm == "composite"
    assert abs(wrong.c - exact_1d(paper_1d(1e-3)).c) < 1e-12
    # A q on the fast scale: slow blocks refine until one period each, or the composite rule.
    oscillating = lambda x, m: 1.0 + m.cos(2.0 * m.pi * x[0] / 7.3e-4)  # noqa: E731
    fast_q = exact_1d(_periodic_problem(1e-3, (1.0,), oscillating))
    reference_rule = exact_1d(_periodic_problem(1e-3, None, oscillating))
    x = 0.3 + 1.85 * np.random.default_rng(4).random(500)
    np.testing.assert_allclose(fast_q.u(x), reference_rule.u(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="subintervals_per_scale"):
        reference.ExactSolution1D(paper_1d(0.1), subintervals_per_scale=0)


def test_discrete_gauss_rule_sums_polynomials_exactly():
    """The Gauss rule of the counting measure sums degree 27 exactly, for 30 to 10^6 terms."""
    for count in (30, 1000, 10**6):
        nodes, weights = reference._discrete_gauss(count, 14)
        for degree in (0, 5, 27):
            i = np.arange(count, dtype=np.float64)
            g = lambda t: ((t - count / 3) / count) ** degree  # noqa: E731
            assert _rel(weights @ g(nodes), math.fsum(g(i))) < 1e-13
