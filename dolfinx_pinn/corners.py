"""Corner patches: local fine solves where two faces of a 2D box meet.

The boundary-layer correctors of :class:`~dolfinx_pinn.basis.TwoScaleBasis` cancel the
correctors' fast trace on each face of the box, but each face's layer leaves a trace of its own
on the adjacent faces, ``exp(-Re λ t/ε)`` times a periodic function of the distance t to the
corner. No tangential polynomial of the other faces' layers holds that, so within a few ε of
each corner the Dirichlet condition is missed by O(ε) of the solution (the README has the
measurements). The exact remedy is a corner-layer corrector, a solution of the cell operator in the
quarter-plane with the faces' traces as data; it has no closed form.

:class:`CornerPatches` computes it numerically instead: near each corner the solution is
replaced by the finite-element solution of the fine problem on a square patch of a few periods,
with the problem's data on the box's faces and the network's values as Dirichlet data on the
patch's inner sides (one overlapping Schwarz step, the network being the outer solve). The
network's error on the inner sides is what remains inside (maximum principle), and it is small
there: a patch of side ``periods`` times the longest period reaches beyond the corner layers.
The side is fixed in units of ε (``periods`` longest periods, capped at ``max_fraction`` of
the box's shortest side so that the patches never overlap) and the number of dofs per patch is
fixed (``dofs``, with at least ``min_cells_per_period`` cells per shortest period), so the cost
of the patches depends neither on ε nor on the coefficient: each coefficient gets the finest
mesh that budget allows (a steep inclusion needs more cells per period than a sine).

:class:`PatchedNetwork` is the delivered solution: the network outside the patches, the
patches' solutions inside, with first derivatives (values and gradients, also through
autograd); second derivatives inside the patches are not those of a smooth function, so the
PDE residual of a patched solve is the network's.

MPI: the patch meshes live on ``MPI.COMM_SELF``; rank r solves the patches ``r, r + size, ...``
and the others receive their dof values, so every rank holds the same patches and evaluation
is local.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
import ufl
from dolfinx import fem
from dolfinx import mesh as dmesh
from torch import nn

from dolfinx_pinn.errors import PointwiseFunction
from dolfinx_pinn.ksp import DIRECT, solve_linear
from dolfinx_pinn.problems import Box, MultiscaleProblem

__all__ = ["CornerPatches", "PatchedNetwork"]


class CornerPatches:
    """Fine finite-element solves on square patches at the four corners of a 2D box.

    Args:
        problem: The lifted problem (4.8) on a 2D box with a period vector.
        values: The network's values at points ``(N, 2)`` -> ``(N,)`` (the Dirichlet data on
            the patches' inner sides).
        periods: The patch side in units of ``ε`` times the longest period (> 0).
        dofs: About the number of dofs per patch: ``⌊√dofs⌋ // degree`` cells per side
            (>= 100).
        min_cells_per_period: The fewest cells per shortest period ``ε min p_j`` (>= 1): where
            the budget would give fewer, the side is shortened.
        degree: Lagrange degree of the patches (>= 1).
        max_fraction: The largest side as a fraction of the box's shortest side (in (0, 0.5]).
        comm: The communicator the patches are shared over (collective on it).

    Raises:
        ValueError: naming the argument out of range, or a problem the patches cannot serve.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        values: Callable[[np.ndarray], np.ndarray],
        *,
        periods: float,
        dofs: int = 40_000,
        min_cells_per_period: int = 6,
        degree: int = 4,
        max_fraction: float = 0.25,
        comm: MPI.Comm = MPI.COMM_WORLD,
    ) -> None:
        if problem.dim != 2 or not isinstance(problem.domain, Box):
            raise ValueError(f"problem: corner patches need a 2D box, got {problem.name!r}")
        if problem.period is None:
            raise ValueError(f"problem {problem.name!r}: corner patches need a period vector")
        if problem.boundary is not None:
            raise ValueError("problem: corner patches serve the lifted problem (4.8) only")
        if not (isinstance(periods, (int, float)) and math.isfinite(periods) and periods > 0):
            raise ValueError(f"periods must be a finite number > 0, got {periods!r}")
        if not (isinstance(dofs, int) and dofs >= 100):
            raise ValueError(f"dofs must be an integer >= 100, got {dofs!r}")
        if not (isinstance(min_cells_per_period, int) and min_cells_per_period >= 1):
            raise ValueError(
                f"min_cells_per_period must be an integer >= 1, got {min_cells_per_period!r}"
            )
        if not (isinstance(degree, int) and degree >= 1):
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        if not (isinstance(max_fraction, (int, float)) and 0 < max_fraction <= 0.5):
            raise ValueError(f"max_fraction must be in (0, 0.5], got {max_fraction!r}")
        domain = problem.domain
        period = np.asarray(problem.period, dtype=np.float64) * problem.eps
        lower, upper = np.asarray(domain.lower, float), np.asarray(domain.upper, float)
        self.cells = max(1, int(math.sqrt(dofs)) // degree)
        # The side: ``periods`` longest periods, no more than the box allows, and no more than
        # the budget resolves with min_cells_per_period (a strongly anisotropic period vector
        # gets fewer of its long periods rather than a mesh that grows with their ratio).
        self.side = float(
            min(
                periods * period.max(),
                max_fraction * (upper - lower).min(),
                self.cells * period.min() / min_cells_per_period,
            )
        )
        self.cells_per_period = float(self.cells * period.min() / self.side)
        self.ramp = float(min(self.side, period.max()))
        self.degree = degree
        self.boxes: list[tuple[np.ndarray, np.ndarray]] = []
        self.functions: list[fem.Function] = []
        corners = []
        for corner in ((0, 0), (1, 0), (0, 1), (1, 1)):
            low = np.where(np.asarray(corner) == 0, lower, upper - self.side)
            corners.append(np.where(np.asarray(corner) == 0, lower, upper))
            self.boxes.append((low, low + self.side))
            self.functions.append(self._space(low))
        for index, function in enumerate(self.functions):
            owner = index % comm.size
            if comm.rank == owner:
                self._solve(problem, function, values, corners[index], self.boxes[index])
            if comm.size > 1:
                function.x.array[:] = comm.bcast(
                    function.x.array if comm.rank == owner else None, root=owner
                )
        self._evaluators = [PointwiseFunction(function) for function in self.functions]

    def _space(self, low: np.ndarray) -> fem.Function:
        mesh = dmesh.create_rectangle(
            MPI.COMM_SELF, [low, low + self.side], [self.cells, self.cells]
        )
        return fem.Function(fem.functionspace(mesh, ("Lagrange", self.degree)))

    def _solve(
        self,
        problem: MultiscaleProblem,
        solution: fem.Function,
        values: Callable[[np.ndarray], np.ndarray],
        corner: np.ndarray,
        box: tuple[np.ndarray, np.ndarray],
    ) -> None:
        space = solution.function_space
        mesh = space.mesh
        u, v = ufl.TrialFunction(space), ufl.TestFunction(space)
        x = ufl.SpatialCoordinate(mesh)
        dx = ufl.Measure("dx", domain=mesh, metadata={"quadrature_degree": 2 * self.degree + 4})
        a = ufl.inner(problem.K_matrix(x) * ufl.grad(u), ufl.grad(v)) * dx
        L = problem.q(x) * v * dx - ufl.inner(problem.flux_lifting(x), ufl.grad(v)) * dx
        mesh.topology.create_connectivity(1, 2)
        dofs = fem.locate_dofs_topological(space, 1, dmesh.exterior_facet_indices(mesh.topology))
        at = space.tabulate_dof_coordinates()[dofs, :2]
        domain = problem.domain
        on_faces = np.any(
            np.isclose(at, domain.lower, rtol=0, atol=1e-12 * self.side)
            | np.isclose(at, domain.upper, rtol=0, atol=1e-12 * self.side),
            axis=1,
        )
        # The network's values on the inner sides, less their value where each side meets the
        # box's face, ramped out over one longest period: the data must be continuous (a jump at
        # the junction is a singularity the mesh would chase: the H¹ error of the patches on
        # the product coefficient was 1.6e-4 with the jump, 3.5e-5 without) and the face's
        # data there is 0. The ramp is short because the network's boundary misfit there is of
        # the size of its misfit anywhere along the face (a ramp over the whole side measured
        # rel. L² 1.17e-4 against 1.06e-4 on paper_2d(0.02)).
        inner = at[~on_faces]
        g = np.asarray(values(np.ascontiguousarray(inner)), dtype=np.float64).reshape(-1)
        low, high = box
        for j in range(2):
            side = np.where(np.isclose(corner[j], low[j]), high[j], low[j])
            on_side = np.isclose(inner[:, j], side, rtol=0, atol=1e-12 * self.side)
            junction = np.array(corner, dtype=np.float64)
            junction[j] = side
            at_junction = float(np.asarray(values(junction[None, :])).reshape(-1)[0])
            distance = np.abs(inner[on_side, 1 - j] - corner[1 - j])
            weight = np.maximum(0.0, 1.0 - distance / self.ramp)
            g[on_side] -= at_junction * weight
        data = fem.Function(space)
        data.x.array[dofs[~on_faces]] = g
        bc = fem.dirichletbc(data, dofs)
        solve_linear(a, L, [bc], "corner_patch", None, DIRECT, solution=solution)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """The index of the patch holding each point ``(N, 2)``, -1 outside every patch."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        index = np.full(len(points), -1)
        for k, (low, high) in enumerate(self.boxes):
            inside = np.all((points >= low) & (points <= high), axis=1)
            index[inside & (index < 0)] = k
        return index

    def value_and_gradient(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mask, u (M,), ∇u (M, 2))`` of the points ``(N, 2)`` inside a patch (``mask``)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        index = self.contains(points)
        mask = index >= 0
        value = np.zeros(int(mask.sum()))
        gradient = np.zeros((int(mask.sum()), 2))
        where = index[mask]
        inside = points[mask]
        for k, evaluator in enumerate(self._evaluators):
            chosen = where == k
            if np.any(chosen):
                value[chosen], gradient[chosen] = evaluator.value_and_gradient(inside[chosen])
        return mask, value, gradient

    def describe(self) -> dict[str, Any]:
        """The patches' size for reports."""
        return {
            "side": self.side,
            "cells": self.cells,
            "cells_per_period": self.cells_per_period,
            "degree": self.degree,
            "dofs_per_patch": int(self.functions[0].function_space.dofmap.index_map.size_local),
        }


class _PatchValues(torch.autograd.Function):
    """The patches' values with their gradients as the backward (first derivatives only)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: torch.Tensor, gradient: torch.Tensor) -> Any:
        ctx.save_for_backward(gradient)
        return value

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> Any:
        (gradient,) = ctx.saved_tensors
        return upstream[:, None] * gradient, None, None


class PatchedNetwork(nn.Module):
    """A network with local finite-element solutions in place of its values where they serve.

    Args:
        network: The solution network (points ``(N, 2)`` -> ``(N,)``).
        patches: The :class:`CornerPatches` or a :class:`~dolfinx_pinn.bands.BoundaryBand`:
            anything whose ``value_and_gradient(points)`` returns ``(mask, u, ∇u)`` of the
            points it serves.
    """

    prefers_jet = False

    def __init__(self, network: nn.Module, patches: Any) -> None:
        super().__init__()
        self.network = network
        self.patches = patches

    def _patched(
        self, x: torch.Tensor, value: torch.Tensor, gradient: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask, v, g = self.patches.value_and_gradient(x.detach().cpu().numpy())
        if not mask.any():
            return value, gradient
        index = torch.as_tensor(np.nonzero(mask)[0], device=x.device)
        kw = {"dtype": value.dtype, "device": value.device}
        v_t, g_t = torch.as_tensor(v, **kw), torch.as_tensor(g, **kw)
        inside = _PatchValues.apply(x[index], v_t, g_t)
        value = value.index_put((index,), inside)
        if gradient is not None:
            gradient = gradient.index_put((index,), g_t)
        return value, gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, 2)``."""
        return self._patched(x, self.network(x).reshape(-1))[0]

    def value_and_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u (N,)`` and ``∇u (N, 2)``."""
        if hasattr(self.network, "value_and_gradient"):
            value, gradient = self.network.value_and_gradient(x)
        else:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                value = self.network(x).reshape(-1)
                (gradient,) = torch.autograd.grad(value.sum(), x)
        value, gradient = self._patched(x.detach(), value.detach(), gradient.detach())
        assert gradient is not None
        return value, gradient
