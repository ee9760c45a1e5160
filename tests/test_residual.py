"""Tests of the PDE residual: every derivative method against finite differences and exactness."""

from mpi4py import MPI  # noqa: F401  (isort: skip)

import os
import warnings

import numpy as np
import pytest
import torch

from dolfinx_pinn import networks
from dolfinx_pinn.networks import (
    MLP,
    HardBoundaryNet,
    MultiscaleFourierNet,
    TransfiniteBoundaryNet,
    TwoScaleNet,
)
from dolfinx_pinn.problems import MultiscaleProblem, paper_1d, paper_2d
from dolfinx_pinn.reference import exact_1d
from dolfinx_pinn.residual import (
    BoundaryBlock,
    PDEBlock,
    _Bound,
    derivatives,
    parameter_names,
    pde_residual,
)


def _tensor_problem() -> MultiscaleProblem:
    eps = 0.5

    def coefficient(x, m):
        a = 2.0 + m.sin(2.0 * m.pi * x[0] / eps)
        b = 0.3 * m.cos(2.0 * m.pi * x[1] / eps)
        return [[a, b], [b, 2.5 + 0.5 * m.sin(2.0 * m.pi * (x[0] + x[1]) / eps)]]

    def source(x, m):
        return 1.0 + x[0] * x[1]

    return MultiscaleProblem(coefficient, source, eps, dim=2, period=(1.0, 1.0), name="tensor")


PROBLEMS = {
    "1d": lambda: paper_1d(0.5),
    "2d": lambda: paper_2d(0.5),
    "tensor": _tensor_problem,
}


def _networks(problem):
    d = problem.dim
    two_scale = TwoScaleNet(d, problem.eps, problem.period, k_max=2, width=8, seed=3)
    return {
        "mlp-tanh": MLP(d, 10, 3, "tanh", seed=1),
        "mlp-silu": MLP(d, 10, 2, "silu", seed=1),
        "mlp-sin": MLP(d, 10, 2, "sin", seed=1),
        "fourier": MultiscaleFourierNet(d, (1.0, 1.0 / problem.eps), 12, 2, seed=2),
        "two-scale": two_scale,
        "hard": HardBoundaryNet(MLP(d, 8, 2, seed=4), problem),
        "transfinite": TransfiniteBoundaryNet(two_scale, problem),
    }


def _finite_difference_residual(net, problem, x, h=4e-4):
    """-div(K grad v) - f by nested 4th-order central differences (no autograd)."""
    d = problem.dim
    stencil = [(-2, 1.0), (-1, -8.0), (1, 8.0), (2, -1.0)]

    def gradient(points):
        columns = []
        for j in range(d):
            e = torch.zeros(d, dtype=points.dtype)
            e[j] = h
            columns.append(sum(c * net(points - s * e) for s, c in stencil) / (-12 * h))
        return torch.stack(columns, dim=1)

    def flux(points):
        return (problem.K_matrix(points) @ gradient(points).unsqueeze(-1))[..., 0]

    divergence = torch.zeros(x.shape[0], dtype=x.dtype)
    for j in range(d):
        e = torch.zeros(d, dtype=x.dtype)
        e[j] = h
        divergence += sum(c * flux(x - s * e)[:, j] for s, c in stencil) / (-12 * h)
    with torch.enable_grad():
        f = problem.f(x).detach()
    return -divergence - f


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_residual_matches_finite_differences(name):
    problem = PROBLEMS[name]()
    rng = np.random.default_rng(7)
    x = torch.tensor(0.1 + 0.8 * rng.random((6, problem.dim)))
    for label, net in _networks(problem).items():
        with torch.no_grad():
            reference = _finite_difference_residual(net, problem, x)
        scale = 1.0 + reference.abs().max()
        for method in ("jet", "func", "autograd"):
            residual = pde_residual(net, problem, x, method=method).detach()
            error = (residual - reference).abs().max() / scale
            assert error < 1e-6, (label, method, float(error))


@pytest.mark.parametrize("full_hessian", [False, True])
def test_derivative_methods_agree(full_hessian):
    problem = paper_2d(0.5)
    x = torch.rand(5, 2, dtype=torch.float64)
    for label, net in _networks(problem).items():
        ref = derivatives(net, x, "autograd", full_hessian)
        for method in ("jet", "func"):
            out = derivatives(net, x, method, full_hessian)
            for a, b in zip(out, ref, strict=True):
                assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), (label, method)


class _ExactSolution(torch.autograd.Function):
    """u from exact_1d with u' = (c - Q)/K - 1 as a differentiable torch expression."""

    @staticmethod
    def forward(x, exact, derivative):
        return exact.torch_u(x[:, 0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.derivative = inputs[2]

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return (grad_output * ctx.derivative(x))[:, None], None, None


@pytest.mark.parametrize("eps", [1 / 15, 0.01])
def test_residual_of_exact_solution_vanishes(eps):
    problem = paper_1d(eps)
    exact = exact_1d(problem)

    source_factor = [-3.0]

    def derivative(x):
        Q = source_factor[0] * (x[:, 0] ** 2 - x[:, 0])  # ∫_0^x q for q = -3(2x - 1)
        return (exact.c - Q) / problem.K(x) - 1.0

    class Exact(torch.nn.Module):
        def forward(self, x):
            return _ExactSolution.apply(x, exact, derivative)

    x = torch.tensor(np.random.default_rng(1).random((200, 1)))
    residual = pde_residual(Exact(), problem, x, method="autograd").detach()
    f = problem.f(x).detach()
    assert residual.abs().max() < 1e-10 * f.abs().max()
    # A slightly wrong source integral leaves a visible residual: the test can fail.
    source_factor[0] = -3.0 * (1 + 1e-2)
    residual = pde_residual(Exact(), problem, x, method="autograd").detach()
    assert residual.abs().max() > 1e-6 * f.abs().max()


@pytest.mark.parametrize("strategy", ["outer", "vmap"])
def test_block_jacobians_match_autograd(strategy):
    problem = _tensor_problem()
    x = torch.rand(7, 2, dtype=torch.float64)
    for label, net in _networks(problem).items():
        names = parameter_names(net)
        parameters = dict(net.named_parameters())
        for block in (
            PDEBlock(problem, x, jacobian_strategy=strategy),
            BoundaryBlock(
                x, 3.0, target=torch.ones(7, dtype=torch.float64), jacobian_strategy=strategy
            ),
        ):
            r, J = block.jacobian(net)
            assert torch.allclose(r, block.values(net).detach(), atol=1e-12)
            for row in (0, 4):
                grads = torch.autograd.grad(
                    block.values(net)[row],
                    [parameters[n] for n in names],
                    allow_unused=True,
                    materialize_grads=True,
                )
                flat = torch.cat([g.reshape(-1) for g in grads])
                assert torch.allclose(J[row], flat, atol=1e-10, rtol=1e-9), (label, strategy)


def test_pde_block_weights_and_validation():
    problem = paper_1d(0.1)
    x = torch.rand(50, 1, dtype=torch.float64)
    net = MLP(1, 6, 1, seed=0)
    block = PDEBlock(problem, x)
    plain = pde_residual(net, problem, x)
    assert torch.allclose(block.loss(net), (plain**2).sum() / 50)
    with pytest.raises(ValueError, match="points"):
        PDEBlock(problem, torch.rand(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight"):
        PDEBlock(problem, x, weight=-1.0)
    with pytest.raises(ValueError, match="method"):
        pde_residual(net, problem, x, method="fd")
    with pytest.raises(ValueError, match="jacobian_strategy"):
        PDEBlock(problem, x, jacobian_strategy="fast")


# -- the compiled jet ----------------------------------------------------------------------------
def _compiled_networks(problem):
    """The three network types of the throughput benchmark, small."""
    d = problem.dim
    return {
        "mlp": HardBoundaryNet(MLP(d, 6, 2, seed=1), problem),
        "fourier": HardBoundaryNet(
            MultiscaleFourierNet(d, (1.0, 1.0 / problem.eps), 8, 2, seed=2), problem
        ),
        "two-scale": TwoScaleNet(d, problem.eps, problem.period, k_max=2, width=5, seed=3),
    }


def _residual_and_gradient(net, block):
    net.zero_grad()
    rows = block.values(net)
    (rows * rows).sum().backward()
    return rows.detach(), torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile the jets with the ``aot_eager`` backend (same graphs, no C++ compilation)."""
    monkeypatch.setattr(networks, "JET_COMPILE_BACKEND", "aot_eager")


@pytest.mark.parametrize("name", ["1d", "2d"])
def test_compiled_jet_matches_autograd(name, aot_eager):
    """Residual rows and the parameter gradient of the loss equal nested autograd's."""
    problem = PROBLEMS[name]()
    x = torch.tensor(0.05 + 0.9 * np.random.default_rng(3).random((9, problem.dim)))
    for label, net in _compiled_networks(problem).items():
        block = PDEBlock(problem, x, method="autograd")
        rows, gradient = _residual_and_gradient(net, block)
        for method in ("jet", "jet_compiled"):
            block.method = method
            for _ in range(2):  # the second call reuses the compiled graph and the cached l
                other_rows, other_gradient = _residual_and_gradient(net, block)
                scale = 1.0 + rows.abs().max()
                assert (other_rows - rows).abs().max() < 1e-12 * scale, (label, method)
                error = (other_gradient - gradient).abs().max() / gradient.abs().max()
                assert error < 1e-12, (label, method, float(error))


def test_compiled_jet_gradcheck_and_vmap_jacobian(aot_eager):
    """gradcheck of the compiled rows in the parameters; the vmap Jacobian falls back to jet."""
    problem = paper_2d(0.5)
    net = HardBoundaryNet(MLP(2, 3, 2, seed=5), problem)
    x = torch.rand(4, 2, dtype=torch.float64)
    block = PDEBlock(problem, x, method="jet_compiled", jacobian_strategy="vmap")
    names = parameter_names(net)
    bound = _Bound(net, block.values)

    def rows(*values):
        state = {f"model.{n}": v for n, v in zip(names, values, strict=True)}
        return torch.func.functional_call(bound, state, ())

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    assert torch.autograd.gradcheck(rows, inputs)
    r, J = block.jacobian(net)
    r_ref, J_ref = PDEBlock(problem, x, jacobian_strategy="outer").jacobian(net)
    assert torch.allclose(r, r_ref, atol=1e-12)
    assert torch.allclose(J, J_ref, atol=1e-10, rtol=1e-10)


def test_compiled_jet_recompiles_once_for_a_new_point_count(aot_eager):
    """New points and new parameter values reuse the graph; a second count makes N dynamic."""
    from torch._dynamo.utils import counters

    net = MLP(2, 4, 2, seed=6)
    before = counters["stats"]["unique_graphs"]
    for count in (5, 5, 7, 9, 9):
        x = torch.rand(count, 2, dtype=torch.float64)
        with torch.no_grad():
            net.output.bias.add_(0.1)
        out = derivatives(net, x, "jet_compiled")
        ref = derivatives(net, x, "jet")
        for a, b in zip(out, ref, strict=True):
            assert torch.allclose(a, b, atol=1e-13, rtol=1e-13)
    assert counters["stats"]["unique_graphs"] - before <= 2
    with pytest.raises(RuntimeError):  # an input error is raised, not taken for a compile failure
        derivatives(net, torch.rand(4, 3, dtype=torch.float64), "jet_compiled")
    assert not any(key[0] is MLP for key in networks._COMPILE_FAILURES)


def test_compiled_jet_falls_back_with_a_warning(monkeypatch):
    """A backend that fails leaves a RuntimeWarning and the eager jet's values."""

    def broken(graph, example_inputs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(networks, "JET_COMPILE_BACKEND", broken)
    net = MLP(1, 4, 1, seed=7)
    x = torch.rand(3, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="eager jet"):
        out = derivatives(net, x, "jet_compiled")
    for a, b in zip(out, derivatives(net, x, "jet"), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="compiled_jet"):
        derivatives(torch.nn.Linear(1, 1), x, "jet_compiled")


@pytest.mark.skipif(
    os.environ.get("DOLFINX_PINN_INDUCTOR_TESTS") != "1",
    reason="Inductor compiles C++ (5-25 s); set DOLFINX_PINN_INDUCTOR_TESTS=1",
)
def test_inductor_jet_matches_autograd():
    """The Inductor kernels (float64, CPU) give the residual and gradient to round-off."""
    problem = paper_2d(0.5)
    net = HardBoundaryNet(MLP(2, 6, 2, seed=1), problem)
    x = torch.rand(11, 2, dtype=torch.float64)
    block = PDEBlock(problem, x, method="autograd")
    rows, gradient = _residual_and_gradient(net, block)
    block.method = "jet_compiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        other_rows, other_gradient = _residual_and_gradient(net, block)
    assert (other_rows - rows).abs().max() < 1e-12 * (1.0 + rows.abs().max())
    assert (other_gradient - gradient).abs().max() < 1e-12 * gradient.abs().max()
