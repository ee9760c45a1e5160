"""Relative errors of a network against a reference: one interface for every kind of reference.

:func:`reference_errors` turns what a user may hold as a reference into one callable
``errors(model) -> (relative L², relative H¹ seminorm)``:

- an object with ``value(points)`` / ``gradient(points)`` (such as
  :func:`dolfinx_pinn.reference.exact_1d`) or a pair ``(u, grad_u)`` of numpy callables: a
  tensor-product Gauss-Legendre quadrature on the problem's box (:class:`ReferenceErrors`), no
  mesh needed, the same on every rank;
- a dolfinx Function (a fine FE solution): quadrature on its mesh in parallel
  (:func:`dolfinx_pinn.reference.relative_errors`, collective on the mesh's communicator).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "PointwiseFunction",
    "ReferenceErrors",
    "network_values_and_gradients",
    "pointwise_reference",
    "reference_errors",
]

_GAUSS_NODES = 6


class ReferenceErrors:
    """Relative L² and H¹-seminorm errors of a network against a reference, by quadrature.

    A tensor-product Gauss-Legendre rule on a uniform grid of the problem's box that resolves
    the finest scale (``cells_per_scale`` cells per ``problem.finest_scale``); where that would
    take more than ``max_points`` points, a scrambled Sobol' set of ``max_points`` points (see
    :func:`_quadrature`). No mesh is needed. For a dolfinx Function reference use
    :func:`dolfinx_pinn.reference.relative_errors`.

    Args:
        problem: The problem (domain and finest scale).
        reference: An object with ``value(points)``/``gradient(points)`` (such as
            :func:`dolfinx_pinn.reference.exact_1d`), or a pair ``(u, grad_u)`` of numpy
            callables on points ``(N, d)`` returning ``(N,)`` and ``(N, d)``.
        cells_per_scale: Grid cells per finest oscillation.
        max_points: Cap on the number of quadrature points.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        reference: Any,
        cells_per_scale: int = 2,
        max_points: int = 400_000,
    ) -> None:
        if hasattr(reference, "value") and hasattr(reference, "gradient"):
            value, gradient = reference.value, reference.gradient
        elif isinstance(reference, tuple) and len(reference) == 2 and all(map(callable, reference)):
            value, gradient = reference
        else:
            raise ValueError(
                "reference must have value/gradient methods or be a pair (u, grad_u) of callables"
            )
        self.points, self.weights = _quadrature(problem, cells_per_scale, max_points)
        dim = problem.dim
        self.reference_value = np.asarray(value(self.points), dtype=np.float64).reshape(-1)
        self.reference_gradient = np.asarray(gradient(self.points), dtype=np.float64).reshape(
            -1, dim
        )
        self._norms = (
            float(np.sum(self.weights * self.reference_value**2)),
            float(np.sum(self.weights * (self.reference_gradient**2).sum(axis=1))),
        )
        if min(self._norms) <= 0:
            raise ValueError("reference: its L² norm or H¹ seminorm is zero")

    def __call__(self, model: nn.Module, chunk: int = 4096) -> tuple[float, float]:
        """``(relative L², relative H¹ seminorm)`` of ``model`` (points ``(N, d)`` -> ``(N,)``)."""
        value, gradient = network_values_and_gradients(model, self.points, chunk)
        l2 = np.sum(self.weights * (value - self.reference_value) ** 2)
        h1 = np.sum(self.weights * ((gradient - self.reference_gradient) ** 2).sum(axis=1))
        return float(np.sqrt(l2 / self._norms[0])), float(np.sqrt(h1 / self._norms[1]))


def network_values_and_gradients(
    module: nn.Module, points: np.ndarray, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Values ``(N,)`` and gradients ``(N, d)`` of a network at points, in chunks.

    A network with analytic first derivatives (``value_and_gradient``, the two-scale basis)
    skips autograd, which costs several times more through its Fourier families.
    """
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float64
    analytic = getattr(module, "value_and_gradient", None)
    values, grads = [], []
    for start in range(0, len(points), chunk):
        x = torch.tensor(points[start : start + chunk], dtype=dtype, device=device)
        if analytic is not None:
            with torch.no_grad():
                v, g = analytic(x)
        else:
            x.requires_grad_(True)
            with torch.enable_grad():
                v = module(x).reshape(-1)
                (g,) = torch.autograd.grad(v.sum(), x)
        values.append(v.detach().cpu().double().numpy().reshape(-1))
        grads.append(g.detach().cpu().double().numpy())
    dim = points.shape[1]
    return (
        np.concatenate(values) if values else np.zeros(0),
        np.concatenate(grads) if grads else np.zeros((0, dim)),
    )


def _quadrature(
    problem: MultiscaleProblem, cells_per_scale: int, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights on the problem's box: Gauss-Legendre resolving the finest scale, or QMC.

    A tensor Gauss rule with ``cells_per_scale`` cells per finest oscillation integrates the
    two-scale error exactly enough; when that needs more than ``max_points`` points (ε far below
    the domain size), a regular rule on coarser cells would sample every period at the same few
    phases (aliasing: the integral of an oscillating error could come out 0 or 10 times too
    large), so a scrambled Sobol' set of ``max_points`` equal-weight points is used instead,
    whose phases ``x/ε mod p`` are equidistributed.
    """
    domain, dim = problem.domain, problem.dim
    counts = [
        max(8, math.ceil(cells_per_scale * domain.lengths[j] / problem.finest_scale))
        for j in range(dim)
    ]
    if math.prod(counts) * _GAUSS_NODES**dim > max_points:
        from dolfinx_pinn.coarse import sobol_points

        points = sobol_points(domain.lower, domain.upper, max_points, seed=7)
        return points, np.full(len(points), domain.measure / len(points))
    nodes, weights = np.polynomial.legendre.leggauss(_GAUSS_NODES)
    axes, axis_weights = [], []
    for j, cells in enumerate(counts):
        breaks = np.linspace(domain.lower[j], domain.upper[j], cells + 1)
        h = np.diff(breaks)
        axes.append((breaks[:-1, None] + 0.5 * h[:, None] * (nodes + 1.0)).ravel())
        axis_weights.append((0.5 * h[:, None] * weights).ravel())
    grid = np.meshgrid(*axes, indexing="ij")
    weight_grid = np.meshgrid(*axis_weights, indexing="ij")
    points = np.stack([g.ravel() for g in grid], axis=1)
    return points, np.prod(np.stack([w.ravel() for w in weight_grid], axis=1), axis=1)


class _FunctionErrors:
    """Errors against a dolfinx Function by quadrature on its mesh (collective)."""

    def __init__(self, reference: Any) -> None:
        self.reference = reference

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        from dolfinx_pinn.reference import relative_errors

        return relative_errors(model, self.reference)


def reference_errors(problem: MultiscaleProblem, reference: Any) -> Any:
    """``errors(model) -> (l2, h1)`` for any supported reference, or None for ``None``.

    Args:
        problem: The problem (domain and finest scale of the quadrature).
        reference: ``None``, a dolfinx Function, an object with ``value``/``gradient`` or a
            pair of callables.

    Raises:
        ValueError: naming ``reference`` when it is none of these.
    """
    if reference is None:
        return None
    if _is_dolfinx_function(reference):
        return _FunctionErrors(reference)
    return ReferenceErrors(problem, reference)


def _is_dolfinx_function(reference: Any) -> bool:
    try:
        from dolfinx.fem import Function
    except ImportError:  # pragma: no cover - the network side alone (e.g. on a GPU machine)
        return False
    return isinstance(reference, Function)


class PointwiseFunction:
    """``u`` and ``∇u`` of a dolfinx Function as numpy callables at points ``(N, d)``.

    The gradient is interpolated into the discontinuous vector space of the same degree (exact
    for Lagrange elements); :meth:`value_and_gradient` locates the points once for both.

    MPI: serial meshes only (every point must lie in a cell this process holds).
    """

    def __init__(self, uh: Any) -> None:
        import basix.ufl
        import dolfinx
        import ufl

        mesh = uh.function_space.mesh
        if mesh.comm.size > 1:
            raise ValueError("uh: pointwise_reference needs a serial mesh (e.g. on MPI.COMM_SELF)")
        self.dim = dim = mesh.geometry.dim
        element = basix.ufl.element(
            "DG", mesh.basix_cell(), uh.function_space.element.basix_element.degree, shape=(dim,)
        )
        space = dolfinx.fem.functionspace(mesh, element)
        self._gradient = dolfinx.fem.Function(space)
        self._gradient.interpolate(
            dolfinx.fem.Expression(ufl.grad(uh), space.element.interpolation_points)
        )
        self._uh, self._mesh = uh, mesh
        self._tree = dolfinx.geometry.bb_tree(mesh, mesh.topology.dim)
        self._midpoint_tree: Any = None
        extent = np.ptp(mesh.geometry.x, axis=0).max() if len(mesh.geometry.x) else 1.0
        self._tolerance = 1e-12 * float(extent)

    def _located(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import dolfinx

        points = np.asarray(points, dtype=np.float64).reshape(-1, self.dim)
        padded = np.zeros((len(points), 3))
        padded[:, : self.dim] = points
        candidates = dolfinx.geometry.compute_collisions_points(self._tree, padded)
        colliding = dolfinx.geometry.compute_colliding_cells(self._mesh, candidates, padded)
        counts = np.diff(colliding.offsets)
        cells = np.full(len(points), -1, dtype=np.int32)
        cells[counts > 0] = colliding.array[colliding.offsets[:-1][counts > 0]]
        missing = np.flatnonzero(counts == 0)
        if len(missing):
            # Points on the boundary can fall outside it by round-off: take the closest cell
            # when it is within round-off of the point.
            tdim = self._mesh.topology.dim
            if self._midpoint_tree is None:
                all_cells = np.arange(
                    self._mesh.topology.index_map(tdim).size_local, dtype=np.int32
                )
                self._midpoint_tree = dolfinx.geometry.create_midpoint_tree(
                    self._mesh, tdim, all_cells
                )
            closest = dolfinx.geometry.compute_closest_entity(
                self._tree, self._midpoint_tree, self._mesh, padded[missing]
            )
            distance = np.sqrt(
                dolfinx.geometry.squared_distance(self._mesh, tdim, closest, padded[missing])
            )
            if np.any(closest < 0) or np.any(distance > self._tolerance):
                raise ValueError("points: some lie outside the function's mesh")
            cells[missing] = closest
        return padded, cells

    def _value(self, padded: np.ndarray, cells: np.ndarray) -> np.ndarray:
        if len(padded) == 0:
            return np.zeros(0)
        # eval squeezes a single point's row away
        return np.asarray(self._uh.eval(padded, cells)).reshape(len(padded), -1)[:, 0]

    def _grad(self, padded: np.ndarray, cells: np.ndarray) -> np.ndarray:
        if len(padded) == 0:
            return np.zeros((0, self.dim))
        return np.asarray(self._gradient.eval(padded, cells)).reshape(len(padded), self.dim)

    def value(self, points: np.ndarray) -> np.ndarray:
        """``u`` at points ``(N, d)``, shape ``(N,)``."""
        return self._value(*self._located(points))

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """``∇u`` at points ``(N, d)``, shape ``(N, d)``."""
        return self._grad(*self._located(points))

    def value_and_gradient(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both, the points located once."""
        located = self._located(points)
        return self._value(*located), self._grad(*located)


def pointwise_reference(uh: Any) -> tuple[Any, Any]:
    """``(u, grad u)`` of a dolfinx Function as numpy callables at points ``(N, d)``.

    For :class:`ReferenceErrors` on its own points (a QMC set where a Gauss grid would alias)
    instead of quadrature on the Function's mesh; see :class:`PointwiseFunction`.

    MPI: serial meshes only (every point must lie in a cell this process holds).
    """
    function = PointwiseFunction(uh)
    return function.value, function.gradient
