"""Tests of the optimizers: loss balancing, the Adam schedule, Gauss-Newton to 1e-6."""

from mpi4py import MPI  # noqa: F401  (isort: skip)

import math

import numpy as np
import pytest
import torch

from dolfinx_pinn.networks import MLP, TransfiniteBoundaryNet, TwoScaleNet
from dolfinx_pinn.optim import (
    Adam,
    GaussNewton,
    LeastSquaresObjective,
    LossBalancer,
    OutputLayerProjection,
    make_optimizer,
)
from dolfinx_pinn.pinn import ReferenceErrors
from dolfinx_pinn.problems import paper_1d
from dolfinx_pinn.reference import exact_1d
from dolfinx_pinn.residual import BoundaryBlock, PDEBlock, ResidualBlock


def test_loss_balancer_formula():
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    a, b = (
        torch.tensor([3.0, 4.0], dtype=torch.float64),
        torch.tensor([0.0, 0.5], dtype=torch.float64),
    )
    losses = {"pde": (a * theta).sum(), "boundary": (b * theta).sum()}  # ‖∇‖ = 5 and 0.5
    balancer = LossBalancer(["pde", "boundary"], alpha=0.9, every=10)
    norms = balancer.gradient_norms(losses, [theta])
    assert norms == pytest.approx({"pde": 5.0, "boundary": 0.5})
    weights = balancer.update(0, losses, [theta])
    assert weights["pde"] == pytest.approx(0.9 + 0.1 * 5.5 / 5.0)
    assert weights["boundary"] == pytest.approx(0.9 + 0.1 * 5.5 / 0.5)
    # Only every f steps.
    assert balancer.update(3, losses, [theta]) == weights
    again = balancer.update(10, losses, [theta])
    assert again["boundary"] == pytest.approx(0.9 * weights["boundary"] + 0.1 * 11.0)


def test_loss_balancer_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        LossBalancer(["a"], alpha=1.0)
    with pytest.raises(ValueError, match="every"):
        LossBalancer(["a"], every=0)


def _linear_objective(rows=40, form_model_seed=0):
    """Rows affine in the output layer only (hidden layers frozen): a linear least squares."""
    problem = paper_1d(0.1)
    net = MLP(1, 4, 1, "sin", seed=form_model_seed)
    with torch.no_grad():  # features sin(kπx): a well-conditioned linear least squares
        net.hidden[0].weight.copy_(math.pi * torch.arange(1.0, 5.0, dtype=torch.float64)[:, None])
        net.hidden[0].bias.zero_()
    for p in net.hidden.parameters():
        p.requires_grad_(False)
    x = torch.tensor(np.random.default_rng(0).random((rows, 1)))
    target = torch.sin(3 * x[:, 0])
    return LeastSquaresObjective(net, [PDEBlock(problem, x), BoundaryBlock(x, 0.5, target=target)])


@pytest.mark.parametrize("form", ["normal", "qr", "gram"])
def test_gauss_newton_solves_linear_least_squares(form):
    objective = _linear_objective(rows=2 if form == "gram" else 40)
    r, J = objective.residual_and_jacobian()
    step = torch.linalg.lstsq(J, -r[:, None], driver="gelsd").solution[:, 0]
    optimal = float(((r + J @ step) ** 2).sum())
    initial = float(r @ r)
    optimizer = GaussNewton(objective, damping=1e-10, form=form)
    for _ in range(4):
        info = optimizer.step()
    assert info["form"] == form
    assert info["loss"] - optimal <= 1e-6 * (initial - optimal), (info, optimal)


def test_gauss_newton_rejects_bad_input():
    objective = _linear_objective()
    with pytest.raises(ValueError, match="form"):
        GaussNewton(objective, form="cg")
    with pytest.raises(ValueError, match="damping"):
        GaussNewton(objective, damping=0.0)

    class Coupling(ResidualBlock):
        name = "coupling"
        affine_in_output = False

        def values(self, model):
            return model(torch.zeros(1, 1, dtype=torch.float64)) ** 2

    nonlinear = LeastSquaresObjective(objective.model, [*objective.blocks, Coupling()])
    with pytest.raises(ValueError, match="variable_projection"):
        GaussNewton(nonlinear, variable_projection=True)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("sgd", objective)


def test_generic_block_jacobian_by_jacrev():
    objective = _linear_objective()

    class Mean(ResidualBlock):
        name = "mean"

        def values(self, model):
            return model(torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]).mean().reshape(1)

    block = Mean()
    _r, J = block.jacobian(objective.model)
    grads = torch.autograd.grad(block.values(objective.model)[0], objective.parameters)
    assert torch.allclose(J[0], torch.cat([g.reshape(-1) for g in grads]))


def test_adam_paper_schedule():
    objective = _linear_objective()
    adam = Adam(objective)
    assert adam.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert adam.optimizer.defaults["betas"] == (0.9, 0.999)
    schedule = adam.scheduler.lr_lambdas[0]
    assert schedule(999) == 1.0 and schedule(1000) == 0.75 and schedule(2500) == 0.75**2
    info = adam.step()
    assert info["lr"] == pytest.approx(5e-4) and set(info["terms"]) == {"pde", "boundary"}
    with pytest.raises(ValueError, match="lr"):
        Adam(objective, lr=-1.0)


def test_lbfgs_decreases_loss():
    objective = _linear_objective()
    before = objective.loss_value()
    info = make_optimizer("lbfgs", objective, max_iter=10).step()
    assert info["loss"] < 0.5 * before


def test_gauss_newton_two_scale_reaches_1e6():
    """The flagship: TwoScaleNet + Gauss-Newton (variable projection) on paper_1d(0.01)."""
    torch.manual_seed(0)
    problem = paper_1d(0.01)
    points = torch.tensor(problem.domain.sample_interior(3000, np.random.default_rng(0)))
    net = TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem)
    objective = LeastSquaresObjective(net, [PDEBlock(problem, points)])
    errors = ReferenceErrors(problem, exact_1d(problem))
    initial_l2, _ = errors(net)
    optimizer = GaussNewton(objective, variable_projection=True)
    history = []
    for _ in range(3):
        optimizer.step()
        history.append(errors(net))
        if history[-1][0] <= 1e-6:
            break
    l2, h1 = history[-1]
    assert initial_l2 > 0.5
    assert l2 <= 1e-6, history
    assert h1 <= 1e-4, history
    assert math.isfinite(objective.loss_value())


def _two_scale_objective(points: int = 1500, seed: int = 0, **network: int) -> tuple:
    problem = paper_1d(1 / 15)
    x = torch.tensor(problem.domain.sample_interior(points, np.random.default_rng(seed)))
    net = TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=seed, **network), problem)
    return problem, net, LeastSquaresObjective(net, [PDEBlock(problem, x, weight=1 / points)])


@pytest.mark.parametrize(
    ("form", "network", "l2_bound"),
    [
        # The normal equations square the condition number: a small, well-conditioned basis.
        ("normal", {"k_max": 4, "width": 8}, 0.2),
        # QR keeps the digits of the default two-scale basis (coefficients of ~1e6).
        ("qr", {}, 1e-5),
    ],
)
def test_projection_is_the_least_squares_minimiser(form, network, l2_bound):
    """One projection step reaches the minimum of a direct (SVD) least squares."""
    problem, net, objective = _two_scale_objective(**network)
    errors = ReferenceErrors(problem, exact_1d(problem))
    initial_l2, _ = errors(net)
    r, J = objective.residual_and_jacobian()
    phi = J[:, objective.output_columns()].numpy()
    # Affine rows: r(c) = r0 + Φ (c - c0); the minimum of ‖r‖² by numpy's SVD least squares.
    change, *_ = np.linalg.lstsq(phi, -r.numpy(), rcond=1e-13)
    best = float(np.sum((r.numpy() + phi @ change) ** 2))
    info = OutputLayerProjection(objective, form=form).step()
    assert info["form"] == form
    assert info["previous_loss"] == pytest.approx(float(r @ r), rel=1e-12)
    assert info["loss"] == pytest.approx(objective.loss_value(), rel=1e-12)
    assert info["loss"] == pytest.approx(best, rel=0.05)
    assert info["loss"] <= best * (1 + 1e-6)
    l2, _ = errors(net)
    assert initial_l2 > 0.5
    assert l2 <= l2_bound


def test_projection_caches_the_fixed_jacobian():
    """The PDE rows' Jacobian is computed once while the hidden layers stay; recomputed after."""
    _, net, objective = _two_scale_objective(points=600)
    projection = make_optimizer("projection", objective)
    assert isinstance(projection, OutputLayerProjection)
    first = projection.step()
    cache = projection._cache
    second = projection.step()
    assert projection._cache is cache
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-8, abs=1e-24)
    with torch.no_grad():
        net.network.slow.hidden[0].bias.add_(0.1)  # new hidden features
    third = projection.step()
    assert projection._cache is not cache
    assert third["loss"] == pytest.approx(objective.loss_value(), rel=1e-12)


def test_projection_rejects_bad_input():
    _, net, objective = _two_scale_objective(points=50)
    with pytest.raises(ValueError, match="form"):
        OutputLayerProjection(objective, form="gram")
    with pytest.raises(ValueError, match="ridge"):
        OutputLayerProjection(objective, ridge=-1.0)
    with pytest.raises(ValueError, match="rcond"):
        OutputLayerProjection(objective, rcond=float("nan"))
    distributed = LeastSquaresObjective(net, objective.blocks, allreduce=lambda t: t)
    with pytest.raises(ValueError, match="qr"):
        OutputLayerProjection(distributed, form="qr")

    class NotAffine(ResidualBlock):
        name = "not_affine"
        affine_in_output = False

    with pytest.raises(ValueError, match="affine"):
        OutputLayerProjection(LeastSquaresObjective(net, [NotAffine()]))
