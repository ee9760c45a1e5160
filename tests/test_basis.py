"""Tests of the structured two-scale basis and its analytic least squares.

Serial and under ``mpirun -n 2``: the least-squares tests split the points over the ranks and
sum (normal equations) or gather (QR) across them, so every rank must get the same answer.
"""

from mpi4py import MPI  # isort: skip

import itertools
import math

import numpy as np
import pytest
import torch

from dolfinx_pinn.basis import (
    LAYER_TAIL_TOLERANCE,
    FourierCellProblem,
    LegendreSlowBasis,
    TwoScaleBasis,
    _independent_traces,
    choose_config,
    total_degree_indices,
)
from dolfinx_pinn.catalogue import inclusion_2d
from dolfinx_pinn.homogenization import cell_problem_from
from dolfinx_pinn.least_squares import (
    boundary_rows,
    coefficient_data,
    default_points,
    pde_rows,
    solve_output_layer,
)
from dolfinx_pinn.problems import MultiscaleProblem, paper_1d, paper_2d
from dolfinx_pinn.reference import exact_1d
from dolfinx_pinn.residual import PDEBlock

COMM = MPI.COMM_WORLD


def allreduce(tensor: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(COMM.allreduce(tensor.numpy(), op=MPI.SUM)))


def allgather(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in COMM.allgather(tensor.numpy())]


def product_2d(eps: float) -> MultiscaleProblem:
    """The non-separable coefficient of issue 13: 2 + sin(2πx1/ε) sin(2πx2/ε), q = 1 + x1 x2."""

    def coefficient(x, m):
        return 2.0 + m.sin(2 * m.pi * x[0] / eps) * m.sin(2 * m.pi * x[1] / eps)

    def source(x, m):
        return 1.0 + x[0] * x[1]

    return MultiscaleProblem(coefficient, source, eps, dim=2, period=(1.0, 1.0), name="product")


def small_2d(problem: MultiscaleProblem, **overrides) -> TwoScaleBasis:
    settings = {"degrees": (6, 4, 3), "layer_degree": 4, "k_max": 6}
    settings.update(overrides)
    return TwoScaleBasis.for_problem(problem, **settings)


def autograd_jet(net, x):
    x = x.clone().requires_grad_(True)
    value = net(x)
    (gradient,) = torch.autograd.grad(value.sum(), x, create_graph=True)
    rows = [
        torch.autograd.grad(gradient[:, j].sum(), x, retain_graph=True)[0]
        for j in range(x.shape[1])
    ]
    return value.detach(), gradient.detach(), torch.stack(rows, 1)


def randomise(net: TwoScaleBasis, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.output.weight.copy_(torch.randn(net.output.weight.shape, generator=generator))
        net.output.bias.fill_(0.3)


def test_legendre_jet_against_autograd():
    basis = LegendreSlowBasis([0.0, -1.0], [1.0, 3.0], total_degree_indices(2, 7))
    x = torch.rand(50, 2, dtype=torch.float64) * torch.tensor([1.0, 3.0]) + torch.tensor(
        [0.0, -1.0]
    )
    _value, gradient, hessian = basis.jet(x)
    for s in (0, 5, 17, basis.size - 1):
        xs = x.clone().requires_grad_(True)
        v = basis.jet(xs)[0][:, s]
        (g,) = torch.autograd.grad(v.sum(), xs, create_graph=True)
        h = torch.stack(
            [torch.autograd.grad(g[:, j].sum(), xs, retain_graph=True)[0] for j in range(2)], 1
        )
        assert torch.allclose(gradient[:, :, s], g, rtol=1e-12, atol=1e-10)
        assert torch.allclose(hessian[:, :, :, s], h, rtol=1e-12, atol=1e-9)
    # Orthogonality on the box (the reason for Legendre): a Gauss rule of the tensor degree.
    nodes, weights = np.polynomial.legendre.leggauss(10)
    grid = np.stack(np.meshgrid(0.5 * (nodes + 1), -1 + 1.5 * (nodes + 1), indexing="ij"), -1)
    w = np.outer(weights, weights).reshape(-1) * 0.75
    values = basis.jet(torch.as_tensor(grid.reshape(-1, 2)))[0].numpy()
    gram = values.T @ (w[:, None] * values) / 3.0
    assert np.allclose(gram, np.eye(basis.size), atol=1e-11)


@pytest.mark.parametrize("dim", [1, 2])
def test_jets_against_autograd(dim):
    problem = paper_1d(0.07) if dim == 1 else paper_2d(0.1)
    net = TwoScaleBasis.for_problem(problem, k_max=8) if dim == 1 else small_2d(problem)
    randomise(net)
    x = torch.rand(40, dim, dtype=torch.float64)
    value, gradient, hessian = autograd_jet(net, x)
    v, g, h = net.jet(x, full_hessian=True)
    scale = float(hessian.detach().abs().max())
    assert torch.allclose(v, value, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g, gradient, rtol=1e-11, atol=1e-10 * float(gradient.abs().max()))
    assert float((h.detach() - hessian).abs().max()) < 1e-11 * scale
    _, _, laplacian = net.jet(x)
    assert (
        float((laplacian.detach() - torch.diagonal(hessian, 0, 1, 2).sum(-1)).abs().max())
        < 1e-11 * scale
    )
    value2, gradient2 = net.value_and_gradient(x)
    assert torch.allclose(value2, value, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gradient2, gradient, rtol=1e-11, atol=1e-10 * float(gradient.abs().max()))
    directions = torch.tensor([[1.0] + [0.5] * (dim - 1)], dtype=torch.float64)
    _, gd, _hd = net.jet(x, full_hessian=True, directions=directions)
    expected = (gradient * directions).sum(1)
    assert torch.allclose(gd[:, 0], expected, rtol=1e-11, atol=1e-10 * float(gradient.abs().max()))
    assert net.satisfies_boundary_condition is False
    assert isinstance(list(net.modules())[-1], torch.nn.Linear) or net.output is not None


@pytest.mark.parametrize(
    ("period", "modes"),
    [
        # a 2D lattice without the harmonic 1 along x1 (its base is then 2 · 2π/p_1)
        ((1.0, 2.0), [(h1, h2) for h1 in range(-6, 7, 2) for h2 in range(-5, 6) if h1 * h2 < 9]),
        ((1.0, 0.5, 2.0), [h for h in itertools.product(range(-3, 4), repeat=3) if sum(h) != 1]),
        ((1.0, math.sqrt(2.0)), [(1, 0), (0, 1), (2, 3)]),  # a lattice all the same
    ],
)
def test_fourier_family_against_direct_sum(period, modes):
    """The per-axis evaluation equals ``s Re Σ c e^{iκ·x/ε}`` and its derivatives."""
    from dolfinx_pinn.basis import _FourierFamily

    eps, dim = 0.07, len(period)
    rng = np.random.default_rng(5)
    modes = np.array(modes, dtype=np.int64)
    kappa = 2.0 * np.pi * modes / np.array(period)
    coefficients = rng.standard_normal((len(modes), 3)) + 1j * rng.standard_normal((len(modes), 3))
    scales = np.array([1.0, eps, eps**2])
    family = _FourierFamily(eps, kappa, coefficients, scales)
    assert family.lattice is not None
    x = rng.random((64, dim))
    waves = np.exp(1j * (x / eps) @ kappa.T)  # (N, H)
    c = coefficients * scales
    k = kappa / eps
    expected = (
        (waves @ c).real,
        np.einsum("nh,hj,hr->njr", waves, 1j * k, c).real,
        np.einsum("nh,hj,hm,hr->njmr", waves, -k, k, c).real,
    )
    value, gradient, hessian = family.jet(torch.as_tensor(x))
    for got, want in zip((value, gradient, hessian), expected, strict=True):
        assert np.abs(got.numpy() - want).max() < 1e-11 * np.abs(want).max()
    # Wave vectors off any lattice take the phase-table path, with the same results.
    skew = kappa + np.array([0.0] * (dim - 1) + [1e-3]) * modes[:, :1]
    off = _FourierFamily(eps, skew, coefficients, scales)
    waves = np.exp(1j * (x / eps) @ skew.T)
    assert off.lattice is None
    assert np.abs(off.jet(torch.as_tensor(x))[0].numpy() - (waves @ c).real).max() < 1e-11 * (
        np.abs(waves @ c).max()
    )


def test_layer_exponentials_against_direct():
    """The per-axis outer product equals ``exp(i κ·x/ε)`` on the Bloch modes' grid."""
    net = small_2d(paper_2d(0.05))
    layer = net.fast[1]
    assert layer.lattice is not None
    x = torch.rand(50, 2, dtype=torch.float64)
    direct = torch.exp(1j * ((x / layer.eps) @ layer.kappa.T))
    assert float((layer.exponentials(x) - direct).abs().max()) < 1e-12
    # Not a full grid (one wave vector fewer): the phase table, the same values.
    from dolfinx_pinn.basis import _LayerFamily

    part = _LayerFamily(
        layer.eps, layer.axis, layer.face, layer.lam.numpy(), layer.modes[:-1].numpy(),
        layer.kappa[:-1].numpy(), layer.alpha.numpy(), layer.scale,
    )  # fmt: skip
    assert part.lattice is None
    assert float((part.exponentials(x) - direct[:, :-1]).abs().max()) < 1e-12


@pytest.mark.parametrize("name", ["paper_2d", "product"])
def test_operator_rows_match_generic_residual(name):
    problem = paper_2d(0.1) if name == "paper_2d" else product_2d(0.2)
    net = small_2d(problem)
    randomise(net, 1)
    x = torch.rand(64, 2, dtype=torch.float64)
    rows, f = pde_rows(net, problem, x)
    block = PDEBlock(problem, x, weight=1.0, method="jet")
    generic = block.values(net).detach()
    analytic = rows @ net.output.weight[0].detach() - f
    assert float((analytic - generic).abs().max()) < 1e-10 * float(generic.abs().max())
    # The same rows from the feature jets (the path for networks without operator_rows).
    _, gradient, hessian = net.feature_jet(x, full_hessian=True)
    from dolfinx_pinn.least_squares import coefficient_data

    K, drift, _ = coefficient_data(problem, x)
    generic_rows = -(
        torch.einsum("njk,njkm->nm", K, hessian) + torch.einsum("nj,njm->nm", drift, gradient)
    )
    assert float((generic_rows - rows).abs().max()) < 1e-10 * float(rows.abs().max())
    assert torch.allclose(boundary_rows(net, x), net.feature_jet(x)[0])


@pytest.mark.parametrize("form", ["normal", "qr"])
def test_solve_against_numpy_lstsq(form):
    problem = paper_2d(0.1)
    net = small_2d(problem, boundary_layers=False)
    interior, boundary = default_points(problem, net.num_features, rank=COMM.rank, size=COMM.size)
    result = solve_output_layer(
        problem,
        net,
        interior,
        boundary,
        form=form,
        chunk_size=97,
        allreduce=allreduce,
        allgather=allgather,
    )
    # Dense reference on all rows of all ranks.
    all_interior, all_boundary = default_points(problem, net.num_features)
    rows, f = pde_rows(net, problem, all_interior)
    w_pde = math.sqrt(problem.domain.measure / len(all_interior))
    w_bc = math.sqrt(1e4 * problem.domain.boundary_measure / len(all_boundary))
    J = torch.cat([w_pde * rows, w_bc * boundary_rows(net, all_boundary)]).numpy()
    r = np.concatenate([w_pde * f.numpy(), np.zeros(len(all_boundary))])
    scale = np.linalg.norm(J, axis=0)
    solution = np.linalg.lstsq(J / scale, r, rcond=None)[0] / scale
    misfit = lambda c: np.linalg.norm(J @ c - r) / np.linalg.norm(r)  # noqa: E731
    assert abs(misfit(result.coefficients.numpy()) - misfit(solution)) < 1e-6 * misfit(solution)
    assert abs(result.relative_residual - misfit(solution)) < 1e-6 * misfit(solution)
    # The function (not the redundant coefficients) agrees.
    x = torch.rand(200, 2, dtype=torch.float64)
    phi = net.feature_jet(x)[0].detach().numpy()
    assert (
        np.abs(phi @ result.coefficients.numpy() - phi @ solution).max()
        < 1e-6 * np.abs(phi @ solution).max()
    )
    # Same answer on every rank.
    gathered = COMM.allgather(result.coefficients.numpy())
    assert all(np.array_equal(gathered[0], g) for g in gathered)
    assert torch.allclose(net.output.weight[0].detach(), result.coefficients)


def test_fourier_cell_problem():
    # 1D: a0 is the harmonic mean (sqrt(3) for 2 + sin), to round-off by spectral accuracy.
    cell = FourierCellProblem(paper_1d(0.1), order=3, tol=1e-15)
    assert abs(cell.tensor[0, 0] - math.sqrt(3.0)) < 1e-13
    # 2D: the same tensor as the P1 cell problems of the homogenization module, which converge at
    # second order (32 cells per unit length still differ by 6e-4): Richardson-extrapolated from
    # 16 and 32 cells they agree to ~4e-6.
    problem = paper_2d(0.1)
    spectral = FourierCellProblem(problem, k_max=10, order=2)
    fe = (4.0 * cell_problem_from(problem, 32).tensor - cell_problem_from(problem, 16).tensor) / 3
    assert np.abs(spectral.tensor - fe).max() < 5e-5
    assert abs(spectral.tensor[0, 1]) < 1e-12
    # The corrector solves the cell problem: -div(K grad(x_i + eps N^i(x/eps))) = 0.
    net = TwoScaleBasis(
        problem, choose_config(problem, order=1, degrees=(0, 0), boundary_layers=False, k_max=12)
    )
    x = torch.rand(100, 2, dtype=torch.float64)
    from dolfinx_pinn.least_squares import coefficient_data

    K, drift, _ = coefficient_data(problem, x)
    rows = net.operator_rows(x, K, drift)  # columns: 1, eps N^1, eps N^2
    for i in range(2):
        residual = (
            rows[:, 1 + i] - drift[:, i]
        )  # A(eps N^i) - div(K e_i) = -div(K grad(x_i + eps N^i))
        # Spectral truncation at k_max = 12: 5e-7-1.4e-6 (16: 1e-7).
        assert float(residual.abs().max()) < 1e-5 * float(drift.abs().max())
    # Boundary-layer modes solve the homogeneous cell equation and decay into the domain.
    lam, P, kappa = spectral.bloch_modes(axis=0, sign=1)
    assert np.all(lam.real > 0) and abs(lam[0].real - 2 * math.pi) < 0.5
    y = np.random.default_rng(0).random((50, 2)) * 2
    for n in range(3):
        phase = np.exp(1j * y @ kappa.T)

        def theta(yy, n=n):
            return np.exp(-lam[n] * yy[:, 0]) * (np.exp(1j * yy @ kappa.T) @ P[:, n])

        h = 1e-4
        a = lambda yy: problem.K(problem.eps * yy)  # noqa: E731
        flux = []
        for j in range(2):
            e = np.zeros(2)
            e[j] = h / 2
            grad_plus = (
                theta(y + e + np.eye(2)[j] * h / 2) - theta(y + e - np.eye(2)[j] * h / 2)
            ) / h
            grad_minus = (
                theta(y - e + np.eye(2)[j] * h / 2) - theta(y - e - np.eye(2)[j] * h / 2)
            ) / h
            flux.append((a(y + e) * grad_plus - a(y - e) * grad_minus) / h)
        residual = np.abs(flux[0] + flux[1]) / (np.abs(lam[n]) ** 2 * np.abs(theta(y)).max() * 5)
        assert residual.max() < 1e-3, residual.max()
        del phase


def test_layer_truncation_from_the_tail():
    """The layers' Bloch truncation grows until their strong residual is small (inclusion)."""
    problem = inclusion_2d(0.05)
    cell = FourierCellProblem(problem, 12, 2)
    keys = cell.keys(2)

    def layer_residual(k_max):
        lam, P, kappa, alpha, _, tail = cell.boundary_layer(0, 0, 0.0, keys, k_max)
        y = np.random.default_rng(1).random((60, 2)) * [0.5, 1.0]

        def theta(yy):  # the layers of the face x_1 = 0 at the fast variable yy
            modes = np.exp(-np.outer(yy[:, 0], lam)) * (np.exp(1j * yy @ kappa.T) @ P)
            return (modes @ alpha).real

        h, flux = 1e-4, 0.0
        for j in range(2):
            e = np.eye(2)[j] * h / 2
            inner = [(theta(y + s * e + e) - theta(y + s * e - e)) / h for s in (1, -1)]
            a = [problem.K(problem.eps * (y + s * e))[:, None] for s in (1, -1)]
            flux = flux + (a[0] * inner[0] - a[1] * inner[1]) / h
        # relative to the size of a second derivative of the layer
        scale = np.abs(theta(y)).max(axis=0) * np.abs(lam[0]) ** 2
        return float((np.abs(flux) / scale).max()), tail, int(np.abs(kappa).max() / (2 * math.pi))

    coarse, coarse_tail, _ = layer_residual(6)
    fine, fine_tail, k_max = layer_residual(None)
    assert coarse_tail > LAYER_TAIL_TOLERANCE > fine_tail
    assert k_max > 6 and fine < 0.2 * coarse, (coarse, fine)
    with pytest.raises(ValueError, match="layer_k_max"):
        cell.boundary_layer(0, 0, 0.0, keys, 0)


def test_layers_of_dependent_traces_are_dropped():
    """Constant or repeated traces add no layer column; the rest keep their span."""
    rng = np.random.default_rng(4)
    traces = rng.standard_normal((12, 3)) + 1j * rng.standard_normal((12, 3))
    dependent = np.hstack(
        [traces, np.zeros((12, 1)), 2.0 * traces[:, :1] - 1e-6 * traces[:, 1:2], 1e-9 * traces]
    )
    mix = _independent_traces(dependent)
    assert mix.shape == (8, 3) and np.isrealobj(mix)
    combined = dependent @ mix
    # the kept combinations span the independent traces: each is reproduced from them
    coefficients, *_ = np.linalg.lstsq(combined, traces, rcond=None)
    assert np.abs(combined @ coefficients - traces).max() < 1e-12
    assert np.linalg.cond(combined) < 10
    # paper_2d: N_1 and N_11 have constant traces on the faces x_1 = c (K = a(y_1) + b(y_2))
    net = small_2d(paper_2d(0.05), layer_order=2)
    keys = 5  # (0,), (1,), (0, 0), (0, 1), (1, 1)
    layers = [f.size for f in net.fast[1:]]
    assert all(size < keys for size in layers) and net.trace_misfit < 1e-8


def test_for_problem_choices():
    one = TwoScaleBasis.for_problem(paper_1d(1e-3))
    assert one.config.order >= 4 and not one.describe()["boundary_layers"]
    # The harmonic set comes from the corrector spectrum: a contrast of 41 needs more modes.
    contrast = MultiscaleProblem(
        lambda x, m: 1.05 + m.sin(2 * m.pi * x[0] / 1e-3),
        lambda x, m: 1.0 + 0 * x[0],
        1e-3,
        dim=1,
        period=(1.0,),
    )
    assert TwoScaleBasis.for_problem(contrast).num_harmonics > 2 * one.num_harmonics
    config = choose_config(paper_2d(0.05))
    assert config.boundary_layers and config.degrees[0] == 32  # source width ~0.07
    # A smooth source gets the floor (the slow coefficients carry more than the source).
    assert choose_config(product_2d(0.05)).degrees[0] == 24
    two = small_2d(paper_2d(0.05))
    assert two.describe()["boundary_layers"] and two.trace_misfit < 1e-8
    assert small_2d(paper_2d(0.05), boundary_layers=False).num_features < two.num_features
    # Nothing grows with 1/eps: the same sizes at eps and eps/10.
    assert small_2d(paper_2d(0.01)).num_features == two.num_features
    with pytest.raises(ValueError, match="unknown setting"):
        TwoScaleBasis.for_problem(paper_2d(0.1), k_maximum=3)
    with pytest.raises(ValueError, match="period"):
        MultiscaleProblem(lambda x, m: 2.0 + 0 * x[0], lambda x, m: 1.0 + 0 * x[0], 0.1, dim=1)
        TwoScaleBasis(
            MultiscaleProblem(lambda x, m: 2.0 + 0 * x[0], lambda x, m: 1.0 + 0 * x[0], 0.1, dim=1)
        )


@pytest.mark.parametrize(
    ("rows", "eps", "bound"),
    [
        ("strong", 1e-4, 1e-7),
        # The flux form keeps its digits where the strong rows lose them like ε⁻² (2e-4 here).
        ("flux", 1e-6, 1e-9),
    ],
)
def test_paper_1d_end_to_end(rows, eps, bound):
    problem = paper_1d(eps)
    net = TwoScaleBasis.for_problem(problem)
    interior, boundary = default_points(
        problem, net.num_features, factor=4.0, rank=COMM.rank, size=COMM.size
    )
    result = solve_output_layer(
        problem, net, interior, boundary, form="qr", rows=rows,
        allreduce=allreduce, allgather=allgather,
    )  # fmt: skip
    assert result.unknowns < 100 and result.rows_form == rows
    assert (result.flux_constant is not None) == (rows == "flux")
    exact = exact_1d(problem)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    breaks = np.linspace(0.0, 1.0, 4001)
    h = np.diff(breaks)
    x = (breaks[:-1, None] + 0.5 * h[:, None] * (nodes + 1)).ravel()
    w = (0.5 * h[:, None] * weights).ravel()
    with torch.no_grad():
        value, gradient = net.value_and_gradient(torch.as_tensor(x[:, None]))
    u = exact.u(x)
    l2 = math.sqrt((w * (value.numpy() - u) ** 2).sum() / (w * u**2).sum())
    du = exact.du(x)
    h1 = math.sqrt((w * (gradient.numpy()[:, 0] - du) ** 2).sum() / (w * du**2).sum())
    assert l2 < bound and h1 < bound, (l2, h1)
    if rows == "flux":  # K u' + F = c with F = Q + K - K(0); exact_1d's c has K(u' + 1) + Q
        K0 = float(problem.K(torch.zeros(1, 1, dtype=torch.float64)).reshape(-1)[0])
        assert result.flux_constant == pytest.approx(exact.c - K0, rel=1e-9)


def test_antiderivative_against_closed_forms():
    from dolfinx_pinn.least_squares import antiderivative

    x = torch.rand(300, 1, dtype=torch.float64) * 2.0 - 0.5
    smooth = antiderivative(lambda t: torch.cos(3.0 * t[:, 0]), -0.5, x)
    expected = (torch.sin(3.0 * x[:, 0]) - math.sin(-1.5)) / 3.0
    assert float((smooth - expected).abs().max()) < 1e-14
    # An oscillating integrand (2000 periods between the points): the panels are halved.
    k = 2 * math.pi / 1e-3
    fast = antiderivative(lambda t: torch.sin(k * t[:, 0]), -0.5, x)
    expected = (math.cos(-0.5 * k) - torch.cos(k * x[:, 0])) / k
    assert float((fast - expected).abs().max()) < 1e-13
    with pytest.raises(ValueError, match="non-finite"):
        antiderivative(lambda t: 1.0 / t[:, 0], -0.5, x)


def test_flux_rows_need_a_1d_problem():
    problem = paper_2d(0.1)
    net = small_2d(problem)
    x = torch.rand(20, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="rows: 'flux' needs a 1D problem"):
        solve_output_layer(problem, net, x, None, rows="flux")
    with pytest.raises(ValueError, match="rows must be"):
        solve_output_layer(problem, net, x, None, rows="weak")


def test_weighted_rows_against_numpy_lstsq():
    """Per-point weights (a stratified point set) give the weighted least-squares minimiser."""
    problem = paper_2d(0.1)
    net = small_2d(problem, boundary_layers=False)
    all_interior, all_boundary = default_points(problem, net.num_features)
    generator = torch.Generator().manual_seed(3)
    all_weights = 0.5 + torch.rand(len(all_interior), generator=generator, dtype=torch.float64)
    interior, boundary = default_points(problem, net.num_features, rank=COMM.rank, size=COMM.size)
    # default_points splits the same global set round-robin over the ranks.
    local_weights = all_weights[COMM.rank :: COMM.size]
    assert torch.equal(interior, all_interior[COMM.rank :: COMM.size])
    result = solve_output_layer(
        problem,
        net,
        interior,
        boundary,
        interior_weights=local_weights,
        allreduce=allreduce,
        allgather=allgather,
    )
    rows, f = pde_rows(net, problem, all_interior)
    w = torch.sqrt(all_weights)[:, None]
    w_bc = math.sqrt(1e4 * problem.domain.boundary_measure / len(all_boundary))
    J = torch.cat([w * rows, w_bc * boundary_rows(net, all_boundary)]).numpy()
    r = np.concatenate([(w[:, 0] * f).numpy(), np.zeros(len(all_boundary))])
    scale = np.linalg.norm(J, axis=0)
    solution = np.linalg.lstsq(J / scale, r, rcond=None)[0] / scale
    misfit = np.linalg.norm(J @ solution - r) / np.linalg.norm(r)
    assert abs(result.relative_residual - misfit) < 1e-6 * misfit
    x = torch.rand(200, 2, dtype=torch.float64)
    phi = net.feature_jet(x)[0].detach().numpy()
    assert (
        np.abs(phi @ result.coefficients.numpy() - phi @ solution).max()
        < 1e-6 * np.abs(phi @ solution).max()
    )
    with pytest.raises(ValueError, match="interior_weights"):
        solve_output_layer(problem, net, interior, boundary, interior_weights=local_weights[:-1])
    with pytest.raises(ValueError, match="interior_weights"):
        solve_output_layer(problem, net, interior, boundary, interior_weights=-local_weights)


def test_tied_features_consistent():
    """Tied features: forward, gradient and Hessian against autograd; rows against the jets."""
    problem = paper_2d(0.05)
    net = small_2d(problem, tied=True, degrees=(8, 7, 6), free_degrees=(3, -1))
    assert net.num_features < net.num_expanded
    randomise(net, seed=3)
    x = torch.rand(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    value, gradient, hessian = net.jet(x, full_hessian=True)
    v, g, h = autograd_jet(net, x)
    scale = float(hessian.detach().abs().max())
    assert torch.allclose(value, v, atol=1e-12 * float(v.abs().max()))
    assert torch.allclose(gradient, g, atol=1e-12 * float(g.abs().max()))
    assert torch.allclose(hessian, h, atol=1e-11 * scale)
    features, feature_gradients, feature_hessians = net.feature_jet(x, full_hessian=True)
    weights = net.output.weight[0].detach()
    assert torch.allclose(features @ weights + 0.3, value, atol=1e-12 * float(v.abs().max()))
    assert torch.allclose(feature_hessians @ weights, hessian, atol=1e-11 * scale)
    rows, _ = pde_rows(net, problem, x)
    K, drift, _ = coefficient_data(problem, x)
    expected = -(
        torch.einsum("njk,njkm->nm", K, feature_hessians)
        + torch.einsum("nj,njm->nm", drift, feature_gradients)
    )
    assert torch.allclose(rows, expected, atol=1e-11 * float(expected.abs().max()))
    assert torch.allclose(net.value_rows(x), features, rtol=0, atol=1e-13)


@pytest.mark.parametrize("order", [2, 3])
def test_tied_residual_is_order_eps(order):
    """A tied feature is the truncated expansion: its residual is -a⁰:∇²φ + O(ε^(order-1))."""
    errors = []
    for eps in (0.04, 0.02, 0.01):
        problem = paper_2d(eps)
        net = TwoScaleBasis.for_problem(
            problem,
            tied=True,
            degrees=(8, 7, 6, 5)[: order + 1],
            free_degrees=(-1,) * order,
            boundary_layers=False,
        )
        generator = torch.Generator().manual_seed(1)
        x = 0.2 + 0.6 * torch.rand(4000, 2, dtype=torch.float64, generator=generator)
        rows, _ = pde_rows(net, problem, x)
        _, _, hessian = net.slow.jet(x)
        tied = net._blocks[0][2]
        homogenised = -torch.einsum(
            "jk,njks->ns", torch.as_tensor(net.cell_tensor), hessian[..., tied]
        )
        columns = [5, 20, 40]
        difference = (rows[:, columns] - homogenised[:, columns]).pow(2).mean(0).sqrt()
        errors.append(float((difference / homogenised[:, columns].pow(2).mean(0).sqrt()).max()))
    assert errors[0] < 0.1
    # Halving ε halves the residual (order 2) or quarters it (order 3), which no free-block sum
    # of the same functions does: their residual is O(1/ε²) unless the blocks are tied.
    for coarse, fine in itertools.pairwise(errors):
        assert 0.8 * 2 ** (order - 1) < coarse / fine < 1.25 * 2 ** (order - 1), errors


def test_tied_default_and_overrides():
    config = choose_config(paper_2d(0.05))
    assert config.tied and config.order == 3 and config.layer_order == 2
    assert config.degrees == (32, 31, 30, 29) and config.free_degrees == (30, 26, -1)
    # Degrees of one's own are free blocks unless tied is asked for too; their number sets the
    # order, and the layers follow it down.
    own = choose_config(paper_2d(0.05), degrees=(6, 4, 3))
    assert not own.tied and own.order == 2 and own.layer_order == 2
    assert choose_config(paper_2d(0.05), degrees=(6, 4)).layer_order == 1
    with pytest.raises(ValueError, match="degrees: with tied"):
        choose_config(paper_2d(0.05), degrees=(6, 4, 3), tied=True, free_degrees=(2, 1))
    with pytest.raises(ValueError, match="free_degrees"):
        choose_config(paper_2d(0.05), degrees=(6, 5, 4), tied=True, free_degrees=(9, 1))
    # 3D keeps the free blocks.
    cube = MultiscaleProblem(
        lambda x, m: 2.0 + m.sin(2 * m.pi * x[0] / 0.2),
        lambda x, m: 1.0 + 0 * x[0],
        0.2,
        dim=3,
        period=(1.0, 1.0, 1.0),
    )
    assert not choose_config(cube).tied
