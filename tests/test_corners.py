"""Tests of the corner patches (:mod:`dolfinx_pinn.corners`): the local solve and the wrapper."""

from mpi4py import MPI  # isort: skip

import warnings

import numpy as np
import pytest
import torch

import dolfinx_pinn as dp
from dolfinx_pinn.auto import ConvergenceWarning
from dolfinx_pinn.corners import CornerPatches, PatchedNetwork
from dolfinx_pinn.errors import pointwise_reference

COMM = MPI.COMM_WORLD


def test_patch_is_the_fine_solution_restricted():
    """With the fine solution's own values on the inner sides, on a mesh aligned with the fine
    mesh and the same quadrature, the patch solve is that solution restricted to the patch:
    the Galerkin equations of the patch's interior dofs involve the patch's cells only."""
    problem = dp.paper_2d(0.1)
    # h = ε / 8 in both: 80 cells over the box, 20 over the patch of side 0.25.
    fine = dp.solve_fine(
        problem, n=80, degree=3, comm=MPI.COMM_SELF, quadrature_degree=8, solver="mumps"
    )
    value, gradient = pointwise_reference(fine)
    patches = CornerPatches(
        problem, value, periods=4.0, dofs=3721, min_cells_per_period=8, degree=3, comm=COMM
    )
    assert patches.side == pytest.approx(0.25) and patches.cells == 20
    x = np.random.default_rng(3).random((4000, 2))
    mask, u, du = patches.value_and_gradient(x)
    assert mask.sum() > 800  # a quarter of the box
    scale = np.abs(value(x)).max()
    assert np.abs(u - value(x[mask])).max() < 1e-10 * scale
    assert np.abs(du - gradient(x[mask])).max() < 1e-8 * np.abs(gradient(x)).max()
    # The box's faces carry the problem's data (0), the inner sides the given values.
    t = np.linspace(0, 0.25, 7)
    faces = np.concatenate([np.stack([t, 0 * t], 1), np.stack([1 + 0 * t, 1 - t], 1)])
    assert np.abs(patches.value_and_gradient(faces)[1]).max() < 1e-12 * scale


def test_patched_network_values_and_autograd():
    """Outside the patches the network; inside the patches' values, and autograd through
    ``forward`` gives the same gradients as ``value_and_gradient``."""
    problem = dp.paper_2d(0.1)
    network = torch.nn.Sequential(
        torch.nn.Linear(2, 8, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 1, dtype=torch.float64),
    )

    def values(points):
        with torch.no_grad():
            return network(torch.from_numpy(points)).reshape(-1).numpy()

    patches = CornerPatches(
        problem, values, periods=1.0, dofs=400, min_cells_per_period=4, comm=COMM
    )
    patched = PatchedNetwork(network, patches)
    x = torch.from_numpy(np.random.default_rng(4).random((600, 2))).requires_grad_(True)
    v = patched(x)
    (g,) = torch.autograd.grad(v.sum(), x)
    v2, g2 = patched.value_and_gradient(x.detach())
    assert torch.allclose(v, v2, rtol=0, atol=1e-14) and torch.allclose(g, g2, rtol=0, atol=1e-12)
    mask, pu, pdu = patches.value_and_gradient(x.detach().numpy())
    assert 0 < mask.sum() < len(mask)
    inside = torch.from_numpy(mask)
    base = network(x.detach()).reshape(-1)
    assert torch.equal(v2[~inside], base[~inside].detach())
    assert np.array_equal(v2[inside].numpy(), pu) and np.array_equal(g2[inside].numpy(), pdu)


def test_bad_settings_are_named():
    problem = dp.paper_2d(0.1)
    with pytest.raises(ValueError, match="periods"):
        CornerPatches(problem, lambda p: np.zeros(len(p)), periods=0.0)
    with pytest.raises(ValueError, match="dofs"):
        CornerPatches(problem, lambda p: np.zeros(len(p)), periods=1.0, dofs=10)
    with pytest.raises(ValueError, match="2D box"):
        CornerPatches(dp.paper_1d(0.1), lambda p: np.zeros(len(p)), periods=1.0)
    with pytest.raises(ValueError, match="corner_patches"):
        dp.solve(problem, corner_patches=-1.0)


def test_solve_reports_the_patches():
    """``solve`` on a 2D box patches the corners by default (``corner_patches=0``: none); the
    PDE residual indicator stays the network's, the boundary residual is the patched one's."""
    problem = dp.paper_2d(0.1)
    settings = {"basis": {"degrees": (8, 6, 4), "layer_degree": 4, "k_max": 6}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = dp.solve(problem, corner_patches=0, **settings)
        patched = dp.solve(problem, **settings)
    assert plain.metrics["corner_patches"] is None
    described = patched.metrics["corner_patches"]
    assert described["side"] == pytest.approx(0.25) and described["degree"] == 4
    assert described["cells"] == 50 and described["dofs_per_patch"] == 201**2
    plain_ind, patched_ind = plain.metrics["indicators"], patched.metrics["indicators"]
    assert patched_ind["pde_residual"] == pytest.approx(plain_ind["pde_residual"], rel=1e-12)
    assert patched_ind["boundary_residual"] < plain_ind["boundary_residual"]
    x = np.array([[0.5, 0.5], [0.01, 0.02], [0.99, 0.995]])
    assert patched.value(x)[0] == pytest.approx(plain.value(x)[0], rel=1e-12)
    assert patched.value(x)[1] != plain.value(x)[1]
