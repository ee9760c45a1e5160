"""Tests of the fine-scale networks: shapes, structure, boundary conditions, seeding."""

from mpi4py import MPI  # noqa: F401  (isort: skip)

import math

import numpy as np
import pytest
import torch

from dolfinx_pinn.networks import (
    MLP,
    HardBoundaryNet,
    MultiscaleFourierNet,
    TransfiniteBoundaryNet,
    TwoScaleNet,
    count_parameters,
    fast_wavevectors,
)
from dolfinx_pinn.problems import paper_1d, paper_2d


def test_mlp_shapes_dtype_and_glorot():
    for activation in ("tanh", "silu", "swish", "sin"):
        for dim in (1, 2, 3):
            net = MLP(dim, width=12, depth=3, activation=activation, seed=1)
            x = torch.rand(17, dim, dtype=torch.float64)
            out = net(x)
            assert out.shape == (17,) and out.dtype == torch.float64
            assert count_parameters(net) == (dim + 1) * 12 + 2 * 13 * 12 + 13
            for layer in [*net.hidden, net.output]:
                assert torch.all(layer.bias == 0)
    # Glorot normal: std sqrt(2 / (fan_in + fan_out)) (statistically, on a big layer).
    big = MLP(1, width=400, depth=2, seed=3)
    assert big.hidden[1].weight.std().item() == pytest.approx(math.sqrt(2 / 800), rel=0.05)


def test_mlp_dtype_override_and_seed():
    a = MLP(2, 8, 2, seed=5)
    b = MLP(2, 8, 2, seed=5)
    c = MLP(2, 8, 2, seed=6)
    x = torch.rand(4, 2, dtype=torch.float64)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    single = MLP(2, 8, 2, dtype=torch.float32, seed=5)
    assert single(x.float()).dtype == torch.float32


def test_mlp_rejects_bad_input():
    for kwargs, match in [
        ({"dim": 0}, "dim"),
        ({"dim": 4}, "dim"),
        ({"dim": 1, "width": 0}, "width"),
        ({"dim": 1, "depth": 0}, "depth"),
        ({"dim": 1, "activation": "relu"}, "activation"),
    ]:
        with pytest.raises(ValueError, match=match):
            MLP(**kwargs)


def test_network_rejects_wrong_point_shape():
    with pytest.raises(ValueError, match="shape"):
        MLP(2, 4, 1)(torch.rand(5, 3, dtype=torch.float64))


def test_multiscale_fourier_parameter_count_and_shared_layers():
    width, depth, m, scales = 24, 3, 7, (1.0, 15.0, 40.0)
    net = MultiscaleFourierNet(1, scales, width, depth, features=m, seed=0)
    expected = (2 * m + 1) * width + (depth - 1) * (width + 1) * width + len(scales) * width + 1
    assert count_parameters(net) == expected
    # The Gaussian matrices are fixed buffers with the requested scales.
    assert not any(p is net.frequencies for p in net.parameters())
    assert net.frequencies.shape == (3, m, 1)
    big = MultiscaleFourierNet(1, (1.0, 50.0), width=4, features=4000, seed=1)
    assert big.frequencies[1].std().item() == pytest.approx(50.0, rel=0.05)
    # Shared hidden layers: one parameter set, used by every feature map; the output layer
    # sees K * width concatenated states.
    assert net.output.in_features == len(scales) * width
    x = torch.rand(9, 1, dtype=torch.float64)
    states = []
    for k in range(len(scales)):
        phase = 2 * math.pi * x @ net.frequencies[k].T
        h = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)
        for layer in net.hidden:
            h = torch.tanh(layer(h))
        states.append(h)
    manual = net.output(torch.cat(states, dim=1))[:, 0]
    assert torch.allclose(net(x), manual, atol=1e-14)


def test_multiscale_fourier_paper_setting():
    problem = paper_1d(1 / 15)
    net = MultiscaleFourierNet.for_problem(problem, seed=0)
    assert net.scales == (1.0, pytest.approx(15.0))
    assert len(net.hidden) == 2 and net.hidden[0].out_features == 128


def test_fast_wavevectors_count():
    for dim, k_max in [(1, 3), (2, 2), (3, 1)]:
        vectors = fast_wavevectors(dim, k_max)
        assert vectors.shape == (((2 * k_max + 1) ** dim - 1) // 2, dim)
        as_set = {tuple(v.tolist()) for v in vectors}
        assert not any(tuple((-v).tolist()) in as_set for v in vectors)
    assert fast_wavevectors(2, 0).shape == (0, 2)


def test_two_scale_net_kmax_zero_is_v0():
    net = TwoScaleNet(2, eps=0.1, period=(2.0, 1.0), k_max=0, width=10, seed=2)
    x = torch.rand(11, 2, dtype=torch.float64)
    assert net.slow.out_features == 1
    assert torch.allclose(net(x), net.slow(x), atol=0)


def test_two_scale_net_formula():
    eps, period = 0.05, (2.0, 1.0)
    net = TwoScaleNet(2, eps=eps, period=period, k_max=2, width=8, seed=3)
    x = torch.rand(13, 2, dtype=torch.float64)
    slow = net.slow.forward_all(x)
    vectors = fast_wavevectors(2, 2)
    expected = slow[:, 0].clone()
    n = len(vectors)
    for j, k in enumerate(vectors):
        phase = (
            2 * math.pi * (k[0] * x[:, 0] / (eps * period[0]) + k[1] * x[:, 1] / (eps * period[1]))
        )
        expected += eps * (
            slow[:, 1 + j] * torch.cos(phase) + slow[:, 1 + n + j] * torch.sin(phase)
        )
    assert torch.allclose(net(x), expected, atol=1e-13)


def test_two_scale_net_rejects_bad_input():
    with pytest.raises(ValueError, match="eps"):
        TwoScaleNet(1, eps=0.0)
    with pytest.raises(ValueError, match="period"):
        TwoScaleNet(2, eps=0.1, period=(1.0,))
    with pytest.raises(ValueError, match="k_max"):
        TwoScaleNet(1, eps=0.1, k_max=-1)
    with pytest.raises(ValueError, match="input_scale"):
        TwoScaleNet(1, eps=0.1, input_scale=-1.0)


def test_boundary_conditions_vanish_on_the_boundary():
    for problem in (paper_1d(0.1), paper_2d(0.1)):
        rng = np.random.default_rng(0)
        boundary = torch.tensor(problem.domain.sample_boundary(40, rng))
        interior = torch.tensor(problem.domain.sample_interior(40, rng))
        inner = TwoScaleNet.for_problem(problem, k_max=2, width=8, seed=1)
        for net in (HardBoundaryNet(inner, problem), TransfiniteBoundaryNet(inner, problem)):
            assert net.satisfies_boundary_condition
            assert net(boundary).abs().max() < 1e-13
            assert net(interior).abs().max() > 1e-3


def test_hard_boundary_is_distance_times_network():
    problem = paper_1d(0.1)
    inner = MLP(1, 8, 2, seed=0)
    net = HardBoundaryNet(inner, problem)
    x = torch.rand(10, 1, dtype=torch.float64)
    assert torch.allclose(net(x), 4 * x[:, 0] * (1 - x[:, 0]) * inner(x), atol=1e-15)
    with pytest.raises(ValueError, match="distance"):
        HardBoundaryNet(MLP(2, 4, 1), problem)


def test_transfinite_1d_subtracts_linear_interpolant():
    problem = paper_1d(0.1)
    inner = MLP(1, 8, 2, seed=0)
    net = TransfiniteBoundaryNet(inner, problem)
    x = torch.rand(10, 1, dtype=torch.float64)
    ends = inner(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    expected = inner(x) - (1 - x[:, 0]) * ends[0] - x[:, 0] * ends[1]
    assert torch.allclose(net(x), expected, atol=1e-15)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_feature_major_laplacian_jet_equals_the_stream_jet(dim):
    """The one-matrix jet of a scalar MLP equals the per-stream jet (values and gradients)."""
    for activation in ("tanh", "silu", "sin"):
        net = MLP(dim, 7, 3, activation, seed=2)
        x = torch.rand(9, dim, dtype=torch.float64)
        fast = net.jet(x)
        slow = tuple(t[..., 0] for t in net.jet_all(x))
        for a, b in zip(fast, slow, strict=True):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-13, rtol=1e-13)
        weights = torch.rand(3, dtype=torch.float64)
        grads = [
            torch.autograd.grad(
                sum(w * t.sum() for w, t in zip(weights, jet, strict=True)), net.parameters()
            )
            for jet in (fast, slow)
        ]
        for a, b in zip(*grads, strict=True):
            assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)


def test_hard_boundary_caches_the_distance_jet_per_point_set():
    """The cached jet of l is reused for the same points and recomputed after a change."""
    problem = paper_2d(0.5)
    net = HardBoundaryNet(MLP(2, 5, 2, seed=3), problem)
    x = torch.rand(6, 2, dtype=torch.float64)
    first = net._distance_jet(x, False, None)
    assert net._distance_jet(x, False, None) is first
    assert net._distance_jet(x.clone(), False, None) is not first
    hessian = net._distance_jet(x, True, None)
    assert hessian[2].shape == (6, 2, 2)
    x.mul_(0.5)  # an in-place change bumps the version counter
    changed = net._distance_jet(x, False, None)
    assert changed is not first
    assert torch.allclose(changed[0], problem.distance(x))
    value = net.jet(x)[0]
    assert torch.allclose(value, net(x), atol=1e-14)
    leaf = x.clone().requires_grad_(True)  # points that need gradients are never cached
    assert net._distance_jet(leaf, False, None) is not net._distance_jet(leaf, False, None)


def test_l1_wavevectors_keep_the_axis_harmonics():
    """|k|_1 <= K: the cross-polytope (2K² + 2K)/2 vectors, every axis harmonic up to K."""
    for k_max in range(0, 8):
        vectors = fast_wavevectors(2, k_max, norm="l1")
        assert vectors.shape == (k_max * k_max + k_max, 2)
        assert (vectors.abs().sum(dim=1) <= k_max).all()
        rows = {tuple(v) for v in vectors.int().tolist()}
        assert all((k, 0) in rows and (0, k) in rows for k in range(1, k_max + 1))
    assert torch.equal(fast_wavevectors(1, 5, norm="l1"), fast_wavevectors(1, 5))
    with pytest.raises(ValueError, match="norm"):
        fast_wavevectors(2, 3, norm="l2")
    net = TwoScaleNet.for_problem(paper_2d(0.1), k_max=6, width=4, wavevector_norm="l1", seed=0)
    assert net.num_harmonics == 42
    with pytest.raises(ValueError, match="norm"):
        TwoScaleNet.for_problem(paper_2d(0.1), k_max=2, wavevector_norm="cube")
