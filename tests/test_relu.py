"""Tests of the ReLU emulations: P1 functions (exact), Yarotsky's square/product, sin/cos."""

from mpi4py import MPI  # isort: skip

import math

import dolfinx
import dolfinx.geometry
import numpy as np
import pytest
import torch

from dolfinx_pinn.relu import (
    cos_network,
    network_size,
    p1_to_relu,
    product_error_bound,
    product_network,
    sin_network,
    square_error_bound,
    square_network,
)


def evaluate_fe(function: dolfinx.fem.Function, points: np.ndarray) -> np.ndarray:
    """Point values of a FE function on a serial (COMM_SELF) mesh."""
    mesh = function.function_space.mesh
    padded = np.zeros((len(points), 3))
    padded[:, : points.shape[1]] = points
    tree = dolfinx.geometry.bb_tree(mesh, mesh.topology.dim)
    candidates = dolfinx.geometry.compute_collisions_points(tree, padded)
    colliding = dolfinx.geometry.compute_colliding_cells(mesh, candidates, padded)
    cells = np.array([colliding.links(i)[0] for i in range(len(points))], dtype=np.int32)
    return function.eval(padded, cells).reshape(-1)


def network_values(network: torch.nn.Sequential, points: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return network(torch.as_tensor(points, dtype=torch.float64))[:, 0].numpy()


def interval_function(comm: MPI.Comm) -> dolfinx.fem.Function:
    """A P1 function on a non-uniform interval mesh of [-1, 2]."""
    mesh = dolfinx.mesh.create_interval(comm, 23, [-1.0, 2.0])
    x = mesh.geometry.x
    x[:, 0] = -1.0 + 3.0 * ((x[:, 0] + 1.0) / 3.0) ** 1.7  # graded, same map on every rank
    space = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    function = dolfinx.fem.Function(space)
    function.interpolate(lambda p: np.sin(3.0 * p[0]) + p[0] ** 2)
    return function


def triangle_function(comm: MPI.Comm, diagonal: str, perturb: bool) -> dolfinx.fem.Function:
    """A P1 function on a (perturbed) triangulation of [0, 2] x [0, 1]."""
    mesh = dolfinx.mesh.create_rectangle(
        comm,
        [[0.0, 0.0], [2.0, 1.0]],
        [7, 5],
        cell_type=dolfinx.mesh.CellType.triangle,
        diagonal=dolfinx.mesh.DiagonalType[diagonal],
    )
    if perturb:
        # A smooth interior perturbation keeps the hexagonal patches of "right"/"left" convex
        # (no flat angles); patches with flat angles ("crossed", "left_right") turn non-convex.
        x = mesh.geometry.x
        x[:, 0] += 0.04 * np.sin(np.pi * x[:, 0] / 2.0) * np.sin(np.pi * x[:, 1])
    space = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    function = dolfinx.fem.Function(space)
    function.interpolate(lambda p: np.sin(3.0 * p[0]) * np.cos(2.0 * p[1]) + 0.1 * p[0])
    return function


def test_p1_interval_exact():
    rng = np.random.default_rng(0)
    points = -1.0 + 3.0 * rng.random((400, 1))
    serial = p1_to_relu(interval_function(MPI.COMM_SELF))
    expected = evaluate_fe(interval_function(MPI.COMM_SELF), points)
    assert np.abs(network_values(serial, points) - expected).max() < 1e-12
    parallel = p1_to_relu(interval_function(MPI.COMM_WORLD))
    assert np.abs(network_values(parallel, points) - expected).max() < 1e-12
    size = network_size(parallel)
    assert size.depth == 2 and size.width <= 23


@pytest.mark.parametrize(
    ("diagonal", "perturb"),
    [("right", True), ("left", True), ("left_right", False), ("crossed", False)],
)
def test_p1_triangles_exact(diagonal, perturb):
    rng = np.random.default_rng(1)
    points = rng.random((400, 2)) * [2.0, 1.0]
    serial_function = triangle_function(MPI.COMM_SELF, diagonal, perturb)
    expected = evaluate_fe(serial_function, points)
    serial = p1_to_relu(serial_function)
    assert np.abs(network_values(serial, points) - expected).max() < 1e-12
    parallel = p1_to_relu(triangle_function(MPI.COMM_WORLD, diagonal, perturb))
    assert np.abs(network_values(parallel, points) - expected).max() < 1e-12
    size = network_size(parallel)
    assert size.depth <= 6  # O(1) depth: log2(max valence) + 2 affine maps


def test_p1_rejects_non_convex_patches():
    # Perturbed, the crossed mesh's lattice vertices get star-shaped, non-convex patches:
    # Lemma 4.1 (and the min-of-planes hat) needs locally convex triangulations.
    with pytest.raises(ValueError, match="non-convex"):
        p1_to_relu(triangle_function(MPI.COMM_WORLD, "crossed", True))


def test_p1_rejects_other_spaces():
    mesh = dolfinx.mesh.create_unit_square(MPI.COMM_WORLD, 2, 2)
    function = dolfinx.fem.Function(dolfinx.fem.functionspace(mesh, ("Lagrange", 2)))
    with pytest.raises(ValueError, match="P1"):
        p1_to_relu(function)
    function = dolfinx.fem.Function(dolfinx.fem.functionspace(mesh, ("Lagrange", 1)))
    function.x.array[:] = 1.0
    with pytest.raises(ValueError, match="max_parameters"):
        p1_to_relu(function, max_parameters=10)


@pytest.mark.parametrize("m", range(1, 9))
def test_square_within_bound(m):
    x = np.linspace(0.0, 1.0, 2**12 + 1)[:, None]  # contains the dyadic midpoints (worst case)
    error = network_values(square_network(m), x) - x[:, 0] ** 2
    bound = square_error_bound(m)
    assert bound == 2.0 ** (-2 * m - 2)
    assert error.min() >= -1e-14  # the interpolant lies above x^2
    assert error.max() <= bound * (1 + 1e-9)
    assert error.max() >= 0.99 * bound  # and the bound is attained: it is sharp
    # Scaled to [-3, 3]: the bound scales with 3^2.
    x = np.linspace(-3.0, 3.0, 2001)[:, None]
    error = network_values(square_network(m, 3.0), x) - x[:, 0] ** 2
    assert np.abs(error).max() <= square_error_bound(m, 3.0) * (1 + 1e-9)
    size = network_size(square_network(m))
    assert (size.depth, size.width) == (m + 2, 4)


@pytest.mark.parametrize("m", range(1, 9))
def test_product_within_bound(m):
    bound = 2.5
    axis = np.linspace(-bound, bound, 121)
    x, y = np.meshgrid(axis, axis, indexing="ij")
    points = np.stack([x.ravel(), y.ravel()], axis=1)
    error = network_values(product_network(m, bound), points) - points[:, 0] * points[:, 1]
    assert np.abs(error).max() <= product_error_bound(m, bound) * (1 + 1e-9)
    assert np.abs(error).max() >= 0.2 * product_error_bound(m, bound)
    size = network_size(product_network(m, bound))
    assert size.width == 8 and size.depth == m + 2


@pytest.mark.parametrize("frequency", [1.0, 37.0])
def test_sin_cos_exponential_decay(frequency):
    bound = 2.0
    t = np.linspace(-bound, bound, 8001)[:, None]
    cos_errors, sin_errors, depths = [], [], []
    for level in range(1, 7):
        cosine = cos_network(frequency, bound, level=level)
        sine = sin_network(frequency, bound, level=level)
        cos_errors.append(np.abs(network_values(cosine, t) - np.cos(frequency * t[:, 0])).max())
        sin_errors.append(np.abs(network_values(sine, t) - np.sin(frequency * t[:, 0])).max())
        depths.append(network_size(cosine).depth)
    for errors in (cos_errors, sin_errors):
        ratios = np.array(errors[1:]) / np.array(errors[:-1])
        assert np.all(ratios < 0.3), errors  # about 1/4 per level: geometric decay
        assert errors[-1] < 2e-4
    # log(error) against depth: error ~ exp(-c sqrt(depth)) with depth ~ 3 k^2 [HS Lemma 3.2].
    slope = np.polyfit(np.sqrt(depths), np.log(cos_errors), 1)[0]
    assert slope < -0.5
    assert depths[-1] <= 3 * 6**2 + 2 * math.log2(frequency * bound) + 20


def test_trig_delta_and_validation():
    t = np.linspace(-1.0, 1.0, 2001)[:, None]
    for delta in (1e-2, 1e-4):
        network = cos_network(5.0, 1.0, delta=delta)
        assert np.abs(network_values(network, t) - np.cos(5.0 * t[:, 0])).max() <= delta
    with pytest.raises(ValueError, match="exactly one"):
        cos_network(1.0, 1.0)
    with pytest.raises(ValueError, match="bound"):
        sin_network(1.0, -1.0, level=2)
    with pytest.raises(ValueError, match="m must"):
        square_network(0)
    with pytest.raises(ValueError, match="frequency"):
        cos_network(0.0, level=2)
