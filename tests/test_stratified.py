"""Tests of the stratified (layer-concentrated) collocation points and their weights.

Serial and under ``mpirun -n 2``: the ranks draw their shares of every group, and the weights
use the global counts.
"""

from mpi4py import MPI  # isort: skip

import math

import numpy as np
import pytest

from dolfinx_pinn.coarse import sobol_points
from dolfinx_pinn.stratified import PointGroup, StratifiedPoints, layer_groups

COMM = MPI.COMM_WORLD


def test_layer_groups_geometry():
    faces, corners = layer_groups([0.0, 0.0], [1.0, 2.0], [0.1, 0.3], 100, 40)
    assert len(faces.boxes) == 4 and len(corners.boxes) == 4
    # Slabs normal to x1 are 0.1 thick over the whole x2 edge, those normal to x2 0.3 thick.
    assert math.isclose(faces.volume, 2 * 0.1 * 2.0 + 2 * 0.3 * 1.0)
    assert math.isclose(corners.volume, 4 * 0.1 * 0.3)
    # Overlaps count: a point in a corner lies in two slabs and one corner box.
    x = np.array([[0.05, 0.1], [0.5, 1.0], [0.5, 0.1]])
    assert np.allclose(faces.density(x) / (100 / faces.volume), [2, 0, 1])
    assert np.allclose(corners.density(x) / (40 / corners.volume), [1, 0, 0])
    # A width above half the edge is capped there (the slabs then cover the box).
    wide, _ = layer_groups([0.0], [1.0], [0.9], 10, 0)
    assert math.isclose(wide.volume, 1.0)


def test_draw_counts_and_bounds():
    group = PointGroup("g", (((0.0, 0.0), (0.2, 1.0)), ((0.8, 0.0), (1.0, 0.5))), 1000)
    x = group.draw(301, seed=4)
    assert x.shape == (301, 2)
    in_first = np.all((x >= [0.0, 0.0]) & (x <= [0.2, 1.0]), axis=1)
    in_second = np.all((x >= [0.8, 0.0]) & (x <= [1.0, 0.5]), axis=1)
    assert np.all(in_first ^ in_second)
    # Whole counts in proportion to the volumes (0.2 : 0.1).
    assert abs(int(in_first.sum()) - 201) <= 1


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_weights_integrate(dim):
    """Σ w g over the uniform and the extra points is a quadrature of ∫ g on the box."""
    lower, upper = np.zeros(dim), np.array([1.0, 2.0, 0.5][:dim])
    measure = float(np.prod(upper - lower))
    uniform_count = 4096
    groups = layer_groups(lower, upper, [0.05] * dim, 3000, 1000)
    sampler = StratifiedPoints(measure, uniform_count, groups)
    uniform = sobol_points(lower, upper, uniform_count, seed=1)[COMM.rank :: COMM.size]
    extra = sampler.draw(COMM.rank, COMM.size, seed=2)
    assert COMM.allreduce(len(extra), MPI.SUM) == sampler.extra_count == 4000
    points = np.concatenate([uniform, extra])
    weights = sampler.weights(points)
    assert np.all(weights > 0)

    def integrand(x):
        # Large near the faces: the extra points must not bias it.
        return np.exp(-np.min(np.minimum(x - lower, upper - x), axis=1) / 0.02) + x[:, 0] ** 2

    total = COMM.allreduce(float(weights @ integrand(points)), MPI.SUM)
    fine = sobol_points(lower, upper, 2**20, seed=9)
    exact = measure * float(integrand(fine).mean())
    assert abs(total - exact) < 2e-2 * exact, (total, exact)
    # The weights sum to |Ω| (the constant is integrated to Monte-Carlo accuracy).
    assert abs(COMM.allreduce(float(weights.sum()), MPI.SUM) - measure) < 2e-2 * measure
    # Uniform points only: the weight |Ω| / M of (3.24).
    plain = StratifiedPoints(measure, uniform_count, []).weights(uniform)
    assert np.allclose(plain, measure / uniform_count)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="measure"):
        StratifiedPoints(0.0, 10, [])
    with pytest.raises(ValueError, match="uniform_count"):
        StratifiedPoints(1.0, 0, [])
