"""Tests of dolfinx_pinn.coupling: Q̄ (3.26), τ₂R (3.25)/(2.16), the adjoint and MPI consistency."""

import copy

from mpi4py import MPI

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from dolfinx_pinn import paper_1d, paper_2d
from dolfinx_pinn.coarse import CoarseProblem, CollocationPoints
from dolfinx_pinn.coupling import (
    CompressionOperator,
    CouplingTerm,
    allreduce_gradients,
    allreduce_sum,
    upscaled_coefficient,
)

COMM = MPI.COMM_WORLD


def _network(dim: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 1),
    ).double()


class _Setup:
    """A coarse problem, points, Q̄ and τ₂R on a communicator."""

    def __init__(
        self,
        comm,
        dim=2,
        n=None,
        count=None,
        delta=None,
        estimator="mean",
        compress_state=False,
        tau2=3.0,
    ):
        self.problem = paper_1d(0.1) if dim == 1 else paper_2d(0.1)
        self.mesh = self.problem.create_mesh(comm, n or (20 if dim == 1 else 8))
        self.coarse = CoarseProblem(self.problem, self.mesh, parametrization="entry")
        self.points = CollocationPoints(
            self.mesh, count=count or (600 if dim == 1 else 4000), seed=11
        )
        self.compression = CompressionOperator(
            self.coarse, self.points, delta=delta, estimator=estimator
        )
        self.coupling = CouplingTerm(self.compression, tau2=tau2, compress_state=compress_state)

    def objective(self, model: torch.nn.Module) -> torch.Tensor:
        K = upscaled_coefficient(self.problem, model, self.points)
        return self.coupling(model(self.compression.points()), K)

    def destroy(self):
        self.compression.destroy()
        self.coarse.destroy()


@pytest.mark.parametrize("compress_state", [False, True])
@pytest.mark.parametrize("dim", [1, 2])
def test_taylor(dim: int, compress_state: bool) -> None:
    """τ₂R(θ + h dθ): first-order remainder O(h), second-order O(h²) over five halvings."""
    setup = _Setup(COMM, dim=dim, compress_state=compress_state)
    model = _network(dim)
    value = setup.objective(model)
    value.backward()
    allreduce_gradients(model.parameters(), COMM)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    generator = torch.Generator().manual_seed(5)
    direction = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    direction /= direction.norm()
    slope = float(gradient @ direction)
    first, second = [], []
    for k in range(6):
        h = 0.2 / 2**k
        perturbed = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(theta + h * direction, perturbed.parameters())
        shifted = float(setup.objective(perturbed).detach())
        first.append(abs(shifted - float(value.detach())))
        second.append(abs(shifted - float(value.detach()) - h * slope))
    rates1 = np.log2(np.array(first[:-1]) / np.array(first[1:]))
    rates2 = np.log2(np.array(second[:-1]) / np.array(second[1:]))
    assert abs(slope) > 1e-6
    assert np.all(np.abs(rates1 - 1.0) < 0.15), rates1
    assert np.all(np.abs(rates2 - 2.0) < 0.15), rates2
    setup.destroy()


@pytest.mark.parametrize("compress_state", [False, True])
def test_adjoint_rhs_is_paper_formula(compress_state: bool) -> None:
    """dL/dy_h seen by the adjoint solve equals -2τ₂(P_h[θ] - P_h[y_h]) (sign: p_paper = -p)."""
    setup = _Setup(COMM, dim=2, compress_state=compress_state)
    model = _network(2)
    K = upscaled_coefficient(setup.problem, model, setup.points)
    y = setup.coarse.solve(K)
    captured = {}
    y.register_hook(lambda grad: captured.setdefault("grad", grad.detach().clone()))
    compressed = setup.compression(model(setup.compression.points()))
    setup.coupling.from_state(compressed, y).backward()
    expected = setup.coupling.adjoint_rhs(compressed, y)
    assert np.allclose(captured["grad"].numpy(), -expected, rtol=1e-12, atol=1e-14)
    setup.destroy()


@pytest.mark.skip_in_parallel
def test_adjoint_rhs_independent_hat_functions() -> None:
    """(2.16) in 1D: P_h built from hat functions φ_j evaluated by formula, not by the package."""
    tau2 = 2.0
    setup = _Setup(MPI.COMM_SELF, dim=1, n=20, compress_state=True, tau2=tau2)
    model = _network(1)
    K = upscaled_coefficient(setup.problem, model, setup.points)
    y = setup.coarse.solve(K)
    captured = {}
    y.register_hook(lambda grad: captured.setdefault("grad", grad.detach().clone()))
    values = model(setup.compression.points())
    compressed = setup.compression(values)
    setup.coupling.from_state(compressed, y).backward()
    nodes = setup.coarse.dof_coordinates[:, 0]
    points = setup.compression.points_numpy[:, 0]
    h = 1.0 / 20
    hats = np.maximum(0.0, 1.0 - np.abs(points[:, None] - nodes[None, :]) / h)  # φ_j(x_r)
    Q = setup.compression.matrix().to_dense().numpy()
    G = Q @ hats  # column j: Q̄φ_j at the nodes
    w = setup.coupling.weight
    qv = compressed.detach().numpy()
    P_theta = w * G.T @ qv
    P_y = w * G.T @ (G @ y.detach().numpy())
    assert np.allclose(
        captured["grad"].numpy(), -2 * tau2 * (P_theta - P_y), rtol=1e-11, atol=1e-13
    )
    setup.destroy()


@pytest.mark.parametrize("compress_state", [False, True])
def test_same_on_world_and_self(compress_state: bool) -> None:
    """y_h, R and dR/dθ on COMM_WORLD (2 ranks under mpirun) equal the serial ones."""
    results = []
    for comm in (COMM, MPI.COMM_SELF):
        # h = 0.04 < δ/2 = 0.05 (the paper's setting): balls reach beyond one cell layer.
        setup = _Setup(comm, dim=2, n=25, count=6000, compress_state=compress_state)
        model = _network(2, seed=3)
        K = upscaled_coefficient(setup.problem, model, setup.points)
        y = setup.coarse.solve(K)
        value = setup.coupling(model(setup.compression.points()), K)
        value.backward()
        allreduce_gradients(model.parameters(), comm)
        gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
        results.append(
            (
                setup.coarse.dof_coordinates,
                y.detach().numpy(),
                float(value.detach()),
                gradient,
                float(K.detach()),
            )
        )
        setup.destroy()
    (x_par, y_par, r_par, g_par, k_par), (x_ser, y_ser, r_ser, g_ser, k_ser) = results
    _, index = cKDTree(x_ser).query(x_par)
    assert np.allclose(y_par, y_ser[index], rtol=1e-10, atol=1e-12)
    assert r_par == pytest.approx(r_ser, rel=1e-10)
    assert k_par == pytest.approx(k_ser, rel=1e-12)
    assert np.linalg.norm(g_par - g_ser) <= 1e-10 * np.linalg.norm(g_ser)


def test_linear_function_reproduced() -> None:
    setup = _Setup(COMM, dim=2, estimator="linear")
    X = setup.compression.points()
    compressed = setup.compression(1.0 + 2.0 * X[:, 0] - 3.0 * X[:, 1]).numpy()
    x = setup.coarse.dof_coordinates
    error = np.abs(compressed - (1.0 + 2.0 * x[:, 0] - 3.0 * x[:, 1])).max(initial=0.0)
    assert COMM.allreduce(error, MPI.MAX) < 1e-12
    assert COMM.allreduce(int((~setup.compression.boundary_layer).sum()), MPI.SUM) > 0
    # The plain mean of (3.26) is only Monte-Carlo accurate: not exact, but close.
    plain = CompressionOperator(setup.coarse, setup.points, estimator="mean")
    compressed = plain(1.0 + 2.0 * X[:, 0] - 3.0 * X[:, 1]).numpy()
    error = COMM.allreduce(
        np.abs(compressed - (1.0 + 2.0 * x[:, 0] - 3.0 * x[:, 1])).max(initial=0.0), MPI.MAX
    )
    assert 1e-6 < error < 0.2
    plain.destroy()
    setup.destroy()


@pytest.mark.parametrize("estimator", ["mean", "linear"])
def test_periodic_function_gives_cell_mean(estimator: str) -> None:
    """Period ε, δ = 2ε: Q̄f at interior nodes is the period mean 1 within the MC error."""
    eps = 0.1
    setup = _Setup(COMM, dim=1, n=20, count=4000, delta=2 * eps, estimator=estimator)
    X = setup.compression.points()[:, 0]
    compressed = setup.compression(1.0 + torch.sin(2 * np.pi * X / eps)).numpy()
    interior = ~setup.compression.boundary_layer
    counts = setup.compression.points_per_node[interior]
    # std of sin over a period: 1/sqrt(2); 5 standard errors.
    bound = 5.0 / np.sqrt(2.0) / np.sqrt(counts)
    assert np.all(np.abs(compressed[interior] - 1.0) <= bound)
    # The boundary layer takes the network's value at the node.
    x = setup.coarse.dof_coordinates[:, 0]
    layer = setup.compression.boundary_layer
    assert np.allclose(compressed[layer], 1.0 + np.sin(2 * np.pi * x[layer] / eps), atol=1e-14)
    assert COMM.allreduce(int(interior.sum()), MPI.SUM) > 5
    setup.destroy()


def test_too_small_delta_raises() -> None:
    setup = _Setup(COMM, dim=2)
    with pytest.raises(ValueError, match="delta"):
        CompressionOperator(setup.coarse, setup.points, delta=1e-3)
    with pytest.raises(ValueError, match="delta"):
        CompressionOperator(setup.coarse, setup.points, delta=-1.0)
    with pytest.raises(ValueError, match="values"):
        setup.compression(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="tau2"):
        CouplingTerm(setup.compression, tau2=0.0)
    setup.destroy()


def test_upscaled_coefficient_monte_carlo() -> None:
    """(4.10) for v = a·x: K̃_11 = |Ω|/M Σ K(x_r)(a_1 + 1), the same on every rank."""
    setup = _Setup(COMM, dim=2)
    model = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight[:] = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    K = upscaled_coefficient(setup.problem, model, setup.points)
    local = setup.problem.K(setup.points.interior).sum() * 1.3
    expected = COMM.allreduce(local, MPI.SUM) / setup.points.global_interior_count
    assert float(K.detach()) == pytest.approx(expected, rel=1e-12)
    assert np.allclose(COMM.allgather(float(K.detach())), float(K.detach()), rtol=0, atol=0)
    K.backward()
    allreduce_gradients(model.parameters(), COMM)
    assert float(model.weight.grad[0, 0]) == pytest.approx(expected / 1.3, rel=1e-12)
    assert float(model.weight.grad[0, 1]) == pytest.approx(0.0, abs=1e-14)
    setup.destroy()


def test_allreduce_sum_backward_is_identity() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    total = allreduce_sum(x * (COMM.rank + 1), COMM)
    expected = sum(r + 1 for r in range(COMM.size))
    assert torch.allclose(total.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64) * expected)
    total.sum().backward()
    assert torch.allclose(x.grad, torch.full((2,), float(COMM.rank + 1), dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compression_on_cuda() -> None:
    setup = _Setup(COMM, dim=2)
    model = _network(2)
    cpu_value = setup.compression.evaluate(model)
    model_cuda = copy.deepcopy(model).cuda()
    values = model_cuda(setup.compression.points("cuda"))
    compressed = setup.compression(values)
    assert compressed.device.type == "cuda"
    assert torch.allclose(compressed.cpu(), cpu_value, rtol=1e-12)
    compressed.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model_cuda.parameters())
    setup.destroy()
