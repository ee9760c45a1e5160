"""The general boundary-value problem in the hybrid solver: network, rows and coarse coefficient.

For a problem with boundary data (:mod:`dolfinx_pinn.boundary`),

    -div(K^ε ∇u) = q  in Ω,    u = g  on Γ_D,    (K^ε ∇u)·n = h  on Γ_N,

the pieces of the lifted hybrid method (4.8) change as follows.

* The network: :class:`DirichletNet` ``v = G + φ N`` with φ the problem's distance function
  (on a mesh domain the potential distance of Γ_D,
  :meth:`~dolfinx_pinn.geometry.MeshDomain.potential_distance`) and G the extension of g
  (:meth:`~dolfinx_pinn.boundary.BoundaryData.lift`); or any network with the soft τ1 rows
  ``√(τ1 |Γ_D| / M_D) (v - g)`` at points of Γ_D.
* Neumann rows ``√(τ1 |Γ_N| / M_N) ((K^ε ∇v)·n - h)`` at points of Γ_N, insulated facets
  included (:class:`NeumannBlock`), whether the Dirichlet condition is hard or soft.
* The coarse coefficient: (4.10) averages the flux of the network over Ω against the mean
  gradient e_i, which is the upscaled coefficient only for the lifted problem (4.8), whose
  boundary data ``w = x_i`` force ``⟨∇w⟩_Ω = e_i`` (4.9). For general data ``⟨K^ε ∇u⟩`` and
  ``⟨∇u⟩`` are not related by the effective tensor (sources, boundary layers and Neumann
  fluxes all enter), so the coarse problem takes a tensor independent of the data
  (:func:`coarse_coefficient`): the homogenised tensor a⁰ of the periodic cell problems
  [HS 2.5] for a periodic coefficient (the ε → 0 limit of every upscaled tensor; one cell
  solve of seconds, whatever ε), a known ``effective_tensor``, or else Algorithm 4.1 from the d
  lifted fine problems on the domain (:func:`~dolfinx_pinn.reference.upscaled_tensor`: d fine
  solves, the price of a non-periodic coefficient). It is fixed during the training: the
  coarse state y_h is the homogenised solution with the user's data and the coupling (3.25)
  steers the slow part of v towards it while τ2 → 0 (the continuation) removes the O(ε)
  homogenisation error at the end.

:class:`BoundaryValueObjective` is the hybrid objective with these rows and this coefficient;
:class:`~dolfinx_pinn.solver.HybridSolver` uses it for every problem with boundary data.

Measured on ``paper_2d(0.1)`` as a mesh domain (see ``benchmarks/bench_geometry.py``, the
``hard_bc`` rows): TwoScaleNet with the output-layer least squares reaches the same accuracy
with ``v = φ N`` (potential distance) as with the transfinite projection of the box, both
keeping the slow/fast separation of the network: φ is slow, so ``φ (a_k cos(k·y))`` is again
a slow function times a fast harmonic.
"""

from __future__ import annotations

import math
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.networks import HardBoundaryNet, _input_jet, _product_jet, jet_cacheable
from dolfinx_pinn.objectives import HybridObjective
from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import EmptyBlock, ResidualBlock, _PointwiseBlock

__all__ = ["BoundaryValueObjective", "DirichletNet", "NeumannBlock", "coarse_coefficient"]

Jet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_JET_CHUNK = 1024  # points per chunk of the distance/lift jets (memory: points x facets)


# -- the hard Dirichlet condition ------------------------------------------------------------------
def _function_jets(
    functions: list[Any], x: torch.Tensor, full_hessian: bool, directions: torch.Tensor | None
) -> list[Jet]:
    """Jets of parameter-free scalar functions at points ``(N, d)``, in chunks of points.

    Each value depends on its own point only, so batched nested autograd gives every point's
    gradient and Hessian (1 + d backward passes): 4-5x faster than ``torch.func``'s
    ``vmap(jacfwd(jacrev))`` for the potential distance, whose cost is a sum over facets.
    """
    d = x.shape[1]
    jets: list[list[list[torch.Tensor]]] = [[[], [], []] for _ in functions]
    with torch.enable_grad():
        for start in range(0, len(x), _JET_CHUNK):
            points = x[start : start + _JET_CHUNK].detach().requires_grad_(True)
            for k, function in enumerate(functions):
                value = function(points).reshape(-1)
                gradient = _grad(value, points, create_graph=True)
                rows = [_grad(gradient[:, j], points, retain_graph=j < d - 1) for j in range(d)]
                for part, tensor in zip(
                    jets[k], (value, gradient, torch.stack(rows, dim=1)), strict=True
                ):
                    part.append(tensor.detach())
    tangents = _input_jet(x, directions)  # (N, r, d)
    out = []
    for value_parts, gradient_parts, hessian_parts in jets:
        hessian = torch.cat(hessian_parts)
        grad = (tangents @ torch.cat(gradient_parts).unsqueeze(-1))[..., 0]
        projected = tangents @ hessian @ tangents.transpose(1, 2)
        second = projected if full_hessian else torch.diagonal(projected, dim1=1, dim2=2).sum(-1)
        out.append((torch.cat(value_parts), grad, second))
    return out


def _grad(
    output: torch.Tensor,
    points: torch.Tensor,
    *,
    create_graph: bool = False,
    retain_graph: bool = True,
) -> torch.Tensor:
    """``d(Σ output)/d points``; zeros where the output does not depend on the points.

    A constant G (g a number) or a linear one (its gradient constant) has no graph to
    differentiate: its derivatives are zero.
    """
    if not output.requires_grad:
        return torch.zeros_like(points)
    (gradient,) = torch.autograd.grad(
        output.sum(),
        points,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return torch.zeros_like(points) if gradient is None else gradient


class DirichletNet(HardBoundaryNet):
    """``v = G + φ N``: the Dirichlet data g hard-wired on Γ_D of any domain.

    φ is the problem's distance function (vanishing on Γ_D only: Neumann facets stay free) and
    G the extension of g into Ω (absent for g = 0, where this is :class:`HardBoundaryNet`).
    Both are parameter-free: their jets (value, gradient, Laplacian or Hessian, by
    ``torch.func`` in chunks of points) are cached for fixed point sets, so the residual costs
    one jet of N. φ is slow (it varies on the scale of the domain), so with a
    :class:`~dolfinx_pinn.networks.TwoScaleNet` N the product keeps its slow/fast separation.

    Args:
        network: The network N.
        problem: The problem (its distance and, with boundary data, its Dirichlet data).

    Raises:
        ValueError: for Dirichlet data given as a dolfinx Function (use the soft rows).
    """

    #: ``method="auto"`` takes the jet: φ and G are evaluated once per point set (cached), where
    #: nested autograd would differentiate their sums over the boundary facets at every step.
    prefers_jet = True

    def __init__(self, network: nn.Module, problem: MultiscaleProblem) -> None:
        super().__init__(network, problem)
        data = problem.boundary
        self.lift = None
        if data is not None and not data.homogeneous_dirichlet:
            if data.has_function:
                raise ValueError(
                    "problem: Dirichlet data given as a Function have no smooth extension; use "
                    "a network without a hard boundary condition (the soft τ1 rows)"
                )
            self.lift = data.lift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, d)``."""
        value = self.distance(x) * self.network(x)
        return value if self.lift is None else value + self.lift(x)

    def _fixed_jets(
        self, x: torch.Tensor, full_hessian: bool, directions: torch.Tensor | None
    ) -> list[Jet]:
        """The jets of φ (and G), cached like :meth:`HardBoundaryNet._distance_jet`."""
        functions = [self.distance] + ([] if self.lift is None else [self.lift])
        cacheable = jet_cacheable(x, directions)
        if not cacheable:
            return _function_jets(functions, x, full_hessian, directions)
        cache: list[tuple[torch.Tensor, int, bool, list[Jet]]] = self.__dict__.setdefault(
            "_jet_cache", []
        )
        for points, version, hessian, jets in cache:
            if points is x and version == x._version and hessian == full_hessian:
                return jets
        jets = [
            (a.detach(), b.detach(), c.detach())
            for a, b, c in _function_jets(functions, x, full_hessian, None)
        ]
        cache.insert(0, (x, x._version, full_hessian, jets))
        del cache[4:]
        return jets

    def _combine(self, fixed: list[Jet], inner: Jet, full_hessian: bool) -> Jet:
        value, grad, second = _product_jet(fixed[0], inner, full_hessian)
        if self.lift is None:
            return value, grad, second
        lift = fixed[1]
        return value + lift[0], grad + lift[1], second + lift[2]

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """See :meth:`~dolfinx_pinn.networks.HardBoundaryNet.jet`."""
        fixed = self._fixed_jets(x, full_hessian, directions)
        return self._combine(fixed, self.network.jet(x, full_hessian, directions), full_hessian)

    def compiled_jet(self, x: torch.Tensor, full_hessian: bool = False) -> Jet:
        """The jet with the inner network compiled; φ and G stay eager (cached)."""
        fixed = self._fixed_jets(x, full_hessian, None)
        inner = self.network.compiled_jet(x, full_hessian)  # type: ignore[operator]
        return self._combine(fixed, inner, full_hessian)


def hard_boundary_network(network: nn.Module, problem: MultiscaleProblem) -> nn.Module:
    """The hard boundary condition that suits a problem's domain and data.

    The transfinite projection (exact, slow/fast separating) for the lifted problem on a box,
    :class:`DirichletNet` otherwise (any mesh domain, any Dirichlet data given by definitions).
    """
    from dolfinx_pinn.networks import TransfiniteBoundaryNet
    from dolfinx_pinn.problems import Box

    if problem.is_lifted and isinstance(problem.domain, Box):
        return TransfiniteBoundaryNet(network, problem)
    return DirichletNet(network, problem)


# -- Neumann rows ----------------------------------------------------------------------------------
class NeumannBlock(_PointwiseBlock):
    """The rows ``√w ((K^ε ∇v)·n - h)(x_i)`` at points of Γ_N with outward normals n.

    Args:
        problem: The problem (K^ε).
        points: Points ``(M, d)`` on Γ_N.
        normals: Their outward unit normals ``(M, d)``.
        target: h at the points ``(M,)``.
        weight: The loss weight of each squared row, e.g. ``τ1 |Γ_N| / M_N``.
        name: The name of the loss term.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        points: torch.Tensor,
        normals: torch.Tensor,
        target: torch.Tensor,
        weight: float,
        name: str = "neumann",
    ) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight}")
        self.points = points.detach()
        self.weight = math.sqrt(float(weight))
        with torch.no_grad():
            K = problem.K_matrix(self.points)
        # The conormal K^T n (K symmetric: K n), so that the row is ∇v · (K n) - h.
        self.conormal = torch.einsum("nab,na->nb", K, normals.to(points.dtype)).detach()
        self.target = target.detach()
        self.name = name

    def _data(self) -> tuple[torch.Tensor, ...]:
        return (self.conormal, self.target)

    def _rows(
        self, model: nn.Module, x: torch.Tensor, conormal: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        points = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = model(points).reshape(-1)
            (gradient,) = torch.autograd.grad(value.sum(), points, create_graph=True)
        return (gradient * conormal).sum(dim=1) - target

    def _rows_for_jacobian(
        self, model: nn.Module, x: torch.Tensor, conormal: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        gradient = model.jet(x)[1]  # type: ignore[operator]
        return (gradient * conormal).sum(dim=1) - target


# -- the coarse coefficient ------------------------------------------------------------------------
def coarse_coefficient(problem: MultiscaleProblem, comm: MPI.Comm = MPI.COMM_WORLD) -> np.ndarray:
    """The ``d x d`` tensor of the coarse problem of a general problem (see the module doc).

    ``problem.effective_tensor`` when known; for a periodic coefficient the homogenised tensor
    of the cell problems (P1, 32 cells per unit of y in 1D/2D, 16 in 3D); otherwise
    Algorithm 4.1 on the d lifted fine problems of the domain (P2, 8 cells per finest scale).
    Collective on ``comm``; the same tensor on every rank, symmetrised.
    """
    if problem.effective_tensor is not None:
        tensor = np.asarray(problem.effective_tensor, dtype=np.float64)
    elif problem.period is not None:
        from dolfinx_pinn.homogenization import cell_problem_from

        n = 16 if problem.dim == 3 else 32
        tensor = cell_problem_from(problem, n, comm=comm).tensor
    else:
        from dolfinx_pinn.reference import solve_fine_directions, upscaled_tensor

        lifted = problem.with_lifting_direction(0)
        solutions = solve_fine_directions(lifted, degree=2, comm=comm, elements_per_period=8)
        tensor = upscaled_tensor(lifted, solutions)[0]
    return 0.5 * (tensor + tensor.T)


# -- the objective ---------------------------------------------------------------------------------
class BoundaryValueObjective(HybridObjective):
    """The hybrid objective of a problem with boundary data (collective on ``coarse.comm``).

    As :class:`~dolfinx_pinn.objectives.HybridObjective`, except: the coarse coefficient is the
    fixed tensor of the coarse problem's ``"entry"`` parametrisation (:func:`coarse_coefficient`,
    its (i, i) entry the parameter), the soft boundary rows are ``v - g`` on Γ_D only, and the
    Neumann rows of :class:`NeumannBlock` join them. Arguments as for the hybrid objective.
    """

    def _boundary_rows(
        self,
        problem: MultiscaleProblem,
        network: nn.Module,
        tau1: float,
        device: torch.device | None,
        dtype: torch.dtype,
    ) -> tuple[bool, torch.Tensor | None, float | None, torch.Tensor | None, list[ResidualBlock]]:
        """The soft Dirichlet rows (points, weight, target) and the Neumann block."""
        data = problem.boundary
        assert data is not None
        points = self.points
        comm = points.comm
        boundary = np.asarray(points.boundary, dtype=np.float64).reshape(-1, problem.dim)
        tags = data.point_tags(boundary)
        dirichlet = data.is_dirichlet(tags)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        hard = bool(getattr(network, "satisfies_boundary_condition", False))
        count_d = int(comm.allreduce(int(dirichlet.sum()), MPI.SUM))
        count_n = int(comm.allreduce(int((~dirichlet).sum()), MPI.SUM))
        has_dirichlet = not hard and count_d > 0
        soft = target = weight = None
        if has_dirichlet:
            soft = torch.as_tensor(boundary[dirichlet], **kw)
            target = torch.as_tensor(
                data.dirichlet_values(boundary[dirichlet], tags[dirichlet]), **kw
            )
            weight = tau1 * data.dirichlet_measure / count_d
        extra: list[ResidualBlock] = []
        if count_n:
            extra.append(
                self._neumann_block(
                    problem, boundary[~dirichlet], tags[~dirichlet], tau1, count_n, kw
                )
            )
        return has_dirichlet, soft, weight, target, extra

    def _neumann_block(
        self,
        problem: MultiscaleProblem,
        points: np.ndarray,
        tags: np.ndarray,
        tau1: float,
        count: int,
        kw: dict[str, Any],
    ) -> ResidualBlock:
        data = problem.boundary
        assert data is not None
        if not len(points):
            return EmptyBlock("neumann", kw["dtype"], kw["device"])
        normals = problem.domain.boundary_normals(points)  # type: ignore[union-attr]
        measure = problem.domain.boundary_measure - data.dirichlet_measure
        return NeumannBlock(
            problem,
            torch.as_tensor(points, **kw),
            torch.as_tensor(normals, **kw),
            torch.as_tensor(data.neumann_values(points, tags), **kw),
            tau1 * measure / count,
        )

    # -- the fixed coarse coefficient -------------------------------------------------------------
    def upscaled_coefficient(self) -> torch.Tensor:
        """The fixed (i, i) entry of the coarse tensor (not a function of the network)."""
        i = self.problem.lifting_direction
        value = float(self.coarse.fixed_tensor[i, i])
        return torch.tensor(value, dtype=self.dtype, device=self.device)

    def upscaled_coefficient_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K̃, 0)``: the coarse coefficient does not depend on θ."""
        count = sum(p.numel() for p in self.parameters)
        return self.upscaled_coefficient(), torch.zeros(count, dtype=self.dtype, device=self.device)

    def _terms_and_values(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        terms, _, values = super()._terms_and_values()
        for block in self.blocks:
            if block.name == "neumann":
                terms["neumann"] = self.global_sum(block.loss(self.network))
        return terms, self.upscaled_coefficient(), values
