"""What is minimised: the plain PINN objective, the hybrid objective and its full-tensor form.

- :class:`PINNObjective`: a network and its residual blocks on collocation points, the PDE
  rows ``√w (A^ε v - f^ε)`` and (for a network without a built-in boundary condition) the τ1
  boundary rows of (3.24), with the relative errors against a reference and predictions.
- :class:`HybridObjective`: the reduced objective (3.3) of Algorithm 3.1,
  ``Ĵ(θ) = J^M(v_θ) + τ2 R(y_h(θ), v_θ)``: the PINN objective, a :class:`CoarseState` (the
  coarse P1 state y_h(K̃[v_θ]) of (4.18), exact or lazily linearised) and a
  :class:`CouplingBlock` (the rows ``√τ2 √w (Q̄v - ŷ)`` of (3.25)). One ``backward()`` of its
  losses gives the whole gradient, the adjoint solve included.
- :class:`FullTensorHybridObjective`: Algorithm 4.1, a d-output network (output i lifted in
  direction e_i) whose whole ``K̃ = F T⁻¹`` (4.7) drives a tensor coarse problem.
- :class:`GatheredObjective`: the rows of every rank on every rank, sorted by their points, for
  the QR forms of the least-squares optimizers under MPI: the same matrix whatever the number of
  ranks.

Every objective offers what the training loop (:mod:`dolfinx_pinn.training`) and the optimizers
(:mod:`dolfinx_pinn.optim`) use: ``losses()``, ``blocks``, ``parameters``, ``allreduce``,
``prepare(step)``, ``record(terms)``, ``coarse_time``, ``errors()``, ``state_dict()`` and
``fingerprint()``.

MPI: see :mod:`dolfinx_pinn.coupling`. The network is replicated; each rank holds the rows of
its owned points and coarse nodes; every loss term is a global sum whose backward gives this
rank's share, and ``reduce_gradients()`` sums the shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.callbacks import fingerprint_digest
from dolfinx_pinn.coarse import CoarseProblem, CoarseSolve, CollocationPoints, LinearizedState
from dolfinx_pinn.coupling import (
    CompressionOperator,
    CouplingTerm,
    allreduce_sum,
    upscaled_coefficient,
    upscaled_coefficient_from_gradient,
    upscaled_tensor_from_gradients,
)
from dolfinx_pinn.errors import reference_errors
from dolfinx_pinn.exceptions import NonFiniteLoss
from dolfinx_pinn.optim import LeastSquaresObjective
from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import (
    BoundaryBlock,
    EmptyBlock,
    PDEBlock,
    ResidualBlock,
)

__all__ = [
    "CoarseState",
    "CouplingBlock",
    "FullTensorHybridObjective",
    "GatheredObjective",
    "HybridObjective",
    "OutputNetwork",
    "PINNObjective",
]

# Coupling columns below this fraction of the largest are round-off (see CouplingBlock).
_ROUND_OFF_COLUMNS = 1e-12


def _allreduce(comm: MPI.Comm) -> Any:
    if comm.size == 1:
        return None
    return lambda tensor: allreduce_sum(tensor.detach(), comm)


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteLoss(name, value.detach().cpu().tolist())


class OutputNetwork(nn.Module):
    """Output ``index`` of a multi-output network as a scalar network ``(N, d) -> (N,)``."""

    def __init__(self, network: nn.Module, index: int) -> None:
        super().__init__()
        self.network = network
        self.index = index
        self.dim = getattr(network, "dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.network(x)[:, self.index]


class PINNObjective(LeastSquaresObjective):
    """The PINN objective (3.24) of a network on this rank's collocation points.

    Args:
        problem: The problem (K, ∇·K and f from its single definition).
        network: The network v_θ (replicated on every rank).
        interior: This rank's interior points ``(M_r, d)`` (a tensor on the network's device).
        weight: The Monte-Carlo weight ``|Ω|/M`` of each squared PDE row (M the global count).
        boundary: This rank's boundary points ``(M_b,r, d)`` of the τ1 penalty, or None.
        boundary_weight: ``τ1 |∂Ω| / M_b`` (M_b the global count).
        has_boundary: Whether any rank has boundary points (every rank must hold the same
            blocks); default: ``boundary`` is not None.
        method: The derivative method of the PDE rows (see :mod:`dolfinx_pinn.residual`).
        comm: The communicator of the points (default ``COMM_SELF``: serial).
        reference: A reference for :meth:`errors` (see
            :func:`dolfinx_pinn.errors.reference_errors`).
        solution: The scalar network the errors and predictions are of (default ``network``).
        extra_blocks: Further residual blocks (the hybrid objective's coupling rows).
        boundary_target: The boundary values g at ``boundary`` (default 0).
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        network: nn.Module,
        interior: torch.Tensor,
        *,
        weight: float,
        boundary: torch.Tensor | None = None,
        boundary_weight: float | None = None,
        has_boundary: bool | None = None,
        method: str = "auto",
        comm: MPI.Comm | None = None,
        reference: Any = None,
        solution: nn.Module | None = None,
        extra_blocks: tuple[ResidualBlock, ...] = (),
        boundary_target: torch.Tensor | None = None,
    ) -> None:
        self.problem = problem
        self.comm = MPI.COMM_SELF if comm is None else comm
        self.pde_block = PDEBlock(problem, interior, weight=weight, method=method)
        has_boundary = (boundary is not None) if has_boundary is None else has_boundary
        blocks: list[ResidualBlock] = [self.pde_block]
        self.boundary_block: BoundaryBlock | None = None
        if has_boundary:
            if boundary is not None and len(boundary):
                if boundary_weight is None:
                    raise ValueError("boundary_weight: needed with boundary points")
                self.boundary_block = BoundaryBlock(boundary, boundary_weight, boundary_target)
                blocks.append(self.boundary_block)
            else:
                blocks.append(EmptyBlock("boundary", interior.dtype, interior.device))
        blocks.extend(extra_blocks)
        super().__init__(network, blocks, _allreduce(self.comm))
        self.network = network
        self.solution = network if solution is None else solution
        self.reference = reference
        self._errors = reference_errors(problem, reference)
        self.dtype, self.device = interior.dtype, interior.device
        self.has_boundary_term = has_boundary

    @property
    def interior_points(self) -> torch.Tensor:
        """This rank's interior points."""
        return self.pde_block.points

    @property
    def has_reference(self) -> bool:
        """Whether :meth:`errors` can be called."""
        return self._errors is not None

    def errors(self) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors of the solution against the reference.

        Collective for a dolfinx Function reference.
        """
        if self._errors is None:
            raise ValueError("reference: the solver was created without a reference")
        return self._errors(self.solution)

    def predict(self, points: np.ndarray) -> np.ndarray:
        """The solution's values at numpy points ``(N, d)`` (local, no communication)."""
        x = torch.as_tensor(np.asarray(points)[:, : self.problem.dim], dtype=self.dtype)
        with torch.no_grad():
            return self.solution(x.to(self.device)).reshape(-1).cpu().numpy()

    # -- the training loop's interface -----------------------------------------------------------
    coarse_time = 0.0

    def prepare(self, step: int) -> None:
        """Nothing to do before a step of the plain PINN."""

    def record(self, terms: Mapping[str, float] | None) -> dict[str, Any]:
        """The loss terms of a step record (evaluated afresh when the optimizer gave none)."""
        if terms is None:
            with torch.enable_grad():
                terms = {name: float(loss.detach()) for name, loss in self.losses().items()}
        for name, value in terms.items():
            if not math.isfinite(value):
                raise NonFiniteLoss(name, value)
        return {**terms, "loss": sum(terms.values())}

    def state_dict(self) -> dict[str, Any]:
        """The network's parameters."""
        return {"network": self.network.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.network.load_state_dict(state["network"])

    def fingerprint(self) -> dict[str, Any]:
        """The problem, network and points a checkpoint must share (collective)."""
        problem = self.problem
        x = self.interior_points.detach().cpu().numpy().astype(np.float64)
        local = np.array([len(x), float(np.sum(x)), float(np.sum(x * x))])
        totals = self.comm.allreduce(local, MPI.SUM)
        return {
            "problem": {
                "name": problem.name,
                "dim": problem.dim,
                "eps": problem.eps,
                "period": None if problem.period is None else list(problem.period),
                "lifting_direction": problem.lifting_direction,
            },
            "network": {
                "class": type(self.network).__name__,
                "parameters": {n: list(p.shape) for n, p in self.network.named_parameters()},
            },
            "points": {
                "interior": int(totals[0]),
                "checksum": fingerprint_digest([round(float(v), 9) for v in totals[1:]]),
                "blocks": self.term_names,
            },
        }


class CoarseState:
    """The coarse state y_h(K̃) at the owned dofs: exact, or linearised between refreshes.

    With ``lazy=False`` every call is a :class:`~dolfinx_pinn.coarse.CoarseSolve` (state solve
    forward, adjoint solve backward). With ``lazy=True`` (the lazy coarse update) the state is
    ``y_h(K̃₀) + S (K̃ - K̃₀)`` with ``S = ∂y_h/∂K̃(K̃₀)`` (:class:`LinearizedState`, no PETSc
    solve at all); every ``every`` steps :meth:`maybe_refresh` solves the state and S again if
    ``max|K̃ - K̃₀| > tol``. The surrogate agrees with y_h to first order at K̃₀ and its gradient
    is exact for the surrogate, so Adam and the Taylor test see a consistent function.

    Args:
        coarse: The coarse problem.
        lazy: The lazy coarse update.
        every: T_K, steps between refresh checks (100 in the paper), >= 1.
        tol: Refresh when ``max|K̃ - K̃₀| > tol`` (1e-2 in the paper), >= 0.
        dtype: The dtype of the tensors.
        device: Their device.
    """

    def __init__(
        self,
        coarse: CoarseProblem,
        *,
        lazy: bool,
        every: int = 100,
        tol: float = 1e-2,
        dtype: torch.dtype = torch.float64,
        device: torch.device | None = None,
    ) -> None:
        self.coarse = coarse
        self.lazy = bool(lazy)
        self.configure(every, tol)
        self.dtype, self.device = dtype, device
        self.linearization: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.refreshes = 0

    def configure(self, every: int, tol: float) -> None:
        """Set T_K and the refresh tolerance (they depend on the optimizer)."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"lazy_every must be an integer >= 1, got {every!r}")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"lazy_tol must be a finite number >= 0, got {tol}")
        self.every, self.tol = every, float(tol)

    def __call__(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """y_h at the owned dofs for an admissible K̃ (differentiable; collective)."""
        if not self.lazy:
            return CoarseSolve.apply(K_tilde, self.coarse)
        if self.linearization is None:
            self.refresh(K_tilde)
        assert self.linearization is not None
        state, sensitivity, anchor = self.linearization
        return LinearizedState.apply(K_tilde, state, sensitivity, anchor, self.coarse.comm)

    def refresh(self, K_tilde: torch.Tensor) -> None:
        """Solve the state and its sensitivity at K̃ (the anchor; collective)."""
        parameter = K_tilde.detach().cpu().numpy().astype(np.float64)
        parameter = parameter.reshape(self.coarse.parameter_shape)
        state, sensitivity = self.coarse.solve_sensitivity(parameter)
        kw = {"dtype": self.dtype, "device": self.device}
        self.linearization = (
            torch.as_tensor(state, **kw),
            torch.as_tensor(sensitivity, **kw),
            torch.as_tensor(parameter.reshape(-1), **kw),
        )
        self.refreshes += 1

    def needs_check(self, step: int) -> bool:
        """Whether :meth:`maybe_refresh` has anything to do at this step."""
        return self.lazy and (self.linearization is None or step % self.every == 0)

    def maybe_refresh(self, step: int, K_tilde: torch.Tensor) -> None:
        """The lazy update of a step: refresh if there is no anchor or K̃ moved beyond tol."""
        if not self.needs_check(step):
            return
        if self.linearization is None:
            self.refresh(K_tilde)
            return
        anchor = self.linearization[2]
        if float((K_tilde.detach().reshape(-1) - anchor).abs().max()) > self.tol:
            self.refresh(K_tilde)

    def with_sensitivity(self, K_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_h, S)`` at K̃, detached: the linearisation (lazy) or a fresh solve (collective)."""
        if self.lazy:
            if self.linearization is None:
                self.refresh(K_tilde)
            assert self.linearization is not None
            state, sensitivity, anchor = self.linearization
            return state + sensitivity @ (K_tilde.detach().reshape(-1) - anchor), sensitivity
        parameter = K_tilde.detach().cpu().numpy().reshape(self.coarse.parameter_shape)
        state, sensitivity = self.coarse.solve_sensitivity(parameter)
        kw = {"dtype": self.dtype, "device": self.device}
        return torch.as_tensor(state, **kw), torch.as_tensor(sensitivity, **kw)

    def state_dict(self) -> dict[str, Any]:
        """The anchor and the refresh count."""
        return {"linearization": self.linearization, "refreshes": self.refreshes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        linearization = state["linearization"]
        self.linearization = (
            None if linearization is None else tuple(t.to(self.device) for t in linearization)  # type: ignore[assignment]
        )
        self.refreshes = int(state["refreshes"])


class CouplingBlock(ResidualBlock):
    """The coupling rows ``√τ2 √w (Q̄v - ŷ)`` at the owned coarse nodes, for least squares.

    The Jacobian is ``√(τ2 w)(Q̄ ∂v/∂θ - (∂ŷ/∂K̃) ∂K̃/∂θ)`` with the state sensitivity from
    :meth:`CoarseState.with_sensitivity`; with the lazy state the rows are affine in the
    output layer (K̃ and Q̄v are), so the output-layer projection applies.

    Args:
        objective: The hybrid objective (its K̃, state, compression and τ2).
    """

    name = "coupling"

    def __init__(self, objective: HybridObjective) -> None:
        self.objective = objective
        self._values = BoundaryBlock(objective.compression_points, 1.0, name="values")

    @property
    def affine_in_output(self) -> bool:  # type: ignore[override]  # noqa: D102
        # K̃ and Q̄v are affine in the output layer; so is the linearised state, not y_h(K̃).
        return self.objective.coarse_state.lazy

    def values(self, model: nn.Module) -> torch.Tensor:  # noqa: D102
        objective = self.objective
        K = objective.admissible_coefficient(objective.upscaled_coefficient())
        target = objective.coupling.target(objective.coarse_state(K))
        rows = objective.coupling.rows(objective.compressed_values(), target)
        return math.sqrt(objective.tau2) * rows

    def jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        objective = self.objective
        coupling = objective.coupling
        K, gradient_K = objective.upscaled_coefficient_gradient()
        inside = objective.problem.alpha < float(K) < objective.problem.beta
        gradient_K = gradient_K * float(inside)  # the clip of admissible_coefficient
        state, sensitivity = objective.coarse_state.with_sensitivity(
            objective.admissible_coefficient(K)
        )
        target = coupling.target(state).detach()
        if coupling.compress_state:
            sensitivity = torch.stack(
                [coupling.target(sensitivity[:, j]) for j in range(sensitivity.shape[1])], dim=1
            ).detach()
        values, value_jacobian = self._values.jacobian(model)
        compression = objective.compression
        scale = math.sqrt(objective.tau2)
        rows = scale * coupling.rows(compression.matmul(values[:, None])[:, 0], target)
        jacobian = (scale * math.sqrt(coupling.weight)) * (
            compression.matmul(value_jacobian) - sensitivity @ gradient_K[None, :]
        )
        # Columns of pure round-off (e.g. the output bias of a transfinite network, which
        # cancels up to ~1e-16) would be scaled to unit norm by Gauss-Newton's column scaling
        # and get huge least-squares coefficients: zero them.
        norms = objective.allreduce_tensor((jacobian * jacobian).sum(dim=0)).sqrt()
        if norms.numel():
            jacobian[:, norms <= _ROUND_OFF_COLUMNS * float(norms.max())] = 0.0
        return rows.detach(), jacobian.detach()


class HybridObjective(PINNObjective):
    """The reduced objective (3.3) of Algorithm 3.1 (collective on ``coarse.comm``).

    Args:
        problem: The problem (4.8).
        network: The network v_θ (replicated).
        coarse: The coarse problem (``"entry"`` parametrisation: the scalar K̃_ii).
        points: The collocation points on the coarse mesh.
        compression: The compression operator Q̄ (3.26) on those points.
        tau1: The boundary penalty τ1 > 0 (networks without a built-in boundary condition).
        tau2: The initial coupling weight τ2 >= 0 (the τ2 schedule sets it per step).
        compress_state: The coupling (2.16) instead of (2.10).
        lazy: The lazy coarse update (see :class:`CoarseState`).
        method: The derivative method of the PDE rows.
        reference: A reference for :meth:`errors`.
        device: The torch device of the network.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        network: nn.Module,
        coarse: CoarseProblem,
        points: CollocationPoints,
        compression: CompressionOperator,
        *,
        tau1: float = 1.0,
        tau2: float = 1.0,
        compress_state: bool = False,
        lazy: bool = True,
        method: str = "auto",
        reference: Any = None,
        device: torch.device | None = None,
        solution: nn.Module | None = None,
    ) -> None:
        dtype = torch.float64
        self.points = points
        self.coarse = coarse
        self.compression = compression
        self.interior_weight = points.measure / points.global_interior_count
        interior = points.torch_interior(device, dtype)
        if points.global_interior_count < 1 or len(interior) < 1:
            raise ValueError("n_interior: every rank needs collocation points; raise n_interior")
        has_boundary, boundary, boundary_weight, target, boundary_blocks = self._boundary_rows(
            problem, network, tau1, device, dtype
        )
        self.compression_points = compression.points(device, dtype)
        # R without τ2; the τ2 of each step is this objective's (the schedule sets it).
        self.coupling = CouplingTerm(compression, compress_state=compress_state)
        self._tau2 = 0.0
        self.tau2 = tau2
        self.coarse_state = CoarseState(coarse, lazy=lazy, dtype=dtype, device=device)
        super().__init__(
            problem,
            network,
            interior,
            weight=self.interior_weight,
            boundary=boundary,
            boundary_weight=boundary_weight,
            has_boundary=has_boundary,
            method=method,
            comm=coarse.comm,
            reference=reference,
            solution=solution,
            extra_blocks=(*boundary_blocks, CouplingBlock(self)),
            boundary_target=target,
        )
        i = problem.lifting_direction
        with torch.no_grad():
            self._K_rows = problem.K_matrix(interior)[:, i, :].detach()
        self.last: dict[str, torch.Tensor] = {}

    def _boundary_rows(
        self,
        problem: MultiscaleProblem,
        network: nn.Module,
        tau1: float,
        device: torch.device | None,
        dtype: torch.dtype,
    ) -> tuple[bool, torch.Tensor | None, float | None, torch.Tensor | None, list[ResidualBlock]]:
        """The soft boundary rows ``v = 0`` of (3.24) on ∂Ω, unless the network is hard.

        Returns ``(has_boundary, points, weight, target, further blocks)``; a subclass for
        other boundary data (:mod:`dolfinx_pinn.boundary_value`) overrides it.
        """
        points = self.points
        hard = bool(getattr(network, "satisfies_boundary_condition", False))
        has_boundary = not hard and points.global_boundary_count > 0
        boundary = points.torch_boundary(device, dtype) if has_boundary else None
        boundary_weight = (
            tau1 * points.boundary_measure / points.global_boundary_count if has_boundary else None
        )
        return has_boundary, boundary, boundary_weight, None, []

    # -- τ2 -------------------------------------------------------------------------------------
    @property
    def tau2(self) -> float:
        """The coupling weight of the current step (the τ2 schedule sets it)."""
        return self._tau2

    @tau2.setter
    def tau2(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"tau2 must be a finite number >= 0, got {value}")
        self._tau2 = float(value)

    @property
    def coarse_time(self) -> float:  # type: ignore[override]
        """Wall time of this rank's coarse PETSc solves so far."""
        return self.coarse.solve_time

    def allreduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A detached sum over the ranks."""
        return allreduce_sum(tensor.detach(), self.comm)

    # -- K̃ and the coarse state ---------------------------------------------------------------
    def upscaled_coefficient(self) -> torch.Tensor:
        """K̃[v_θ] of (4.10), replicated on every rank, differentiable (collective)."""
        return upscaled_coefficient(
            self.problem,
            self.network,
            self.interior_points,
            comm=self.comm,
            measure=self.points.measure,
            global_count=self.points.global_interior_count,
        )

    def upscaled_coefficient_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K̃, ∂K̃/∂θ)`` with the full (rank-reduced) gradient as a flat vector (collective)."""
        K = self.upscaled_coefficient()
        grads = torch.autograd.grad(K.reshape(-1).sum(), self.parameters, allow_unused=True)
        flat = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if g is None
                else g.reshape(-1)
                for p, g in zip(self.parameters, grads, strict=True)
            ]
        )
        return K.detach(), self.allreduce_tensor(flat)

    def admissible_coefficient(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """K̃ clipped to the bounds [α, β] of K^ε, which contain every upscaled coefficient.

        A network far from the solution (e.g. at initialisation) can give K̃ <= 0 and a
        non-coercive coarse problem; the clip keeps the state defined (its gradient is zero
        outside the bounds, where the coupling then acts through Q̄v only).
        """
        return K_tilde.clamp(min=self.problem.alpha, max=self.problem.beta)

    def state(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """y_h at the owned coarse dofs for the network's K̃ (clipped first; collective)."""
        _check_finite("K_tilde", K_tilde)
        return self.coarse_state(self.admissible_coefficient(K_tilde))

    def target(self, state: torch.Tensor) -> torch.Tensor:
        """ŷ = y_h (2.10) or Q̄y_h (2.16) at the owned nodes."""
        return self.coupling.target(state)

    def compressed_values(self) -> torch.Tensor:
        """Q̄v at the owned coarse nodes (differentiable)."""
        return self.compression(self.solution(self.compression_points).reshape(-1))

    # -- losses ---------------------------------------------------------------------------------
    def _terms_and_values(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The PDE/boundary terms, K̃ and the network's values at the compression points."""
        rows, jet = self.pde_block.rows_and_jet(self.network)
        terms = {"pde": self.global_sum((rows * rows).sum())}
        K = upscaled_coefficient_from_gradient(
            jet[1], self._K_rows, self.interior_weight, self.comm, self.problem.lifting_direction
        )
        if self.has_boundary_term:
            terms["boundary"] = self.global_sum(self.blocks[1].loss(self.network))
        count = len(jet[0])
        extra = self.network(self.compression_points[count:]).reshape(-1)
        return terms, K, torch.cat([jet[0].reshape(-1), extra])

    def losses(self) -> dict[str, torch.Tensor]:
        """The terms of Ĵ, replicated and differentiable (collective).

        One pass of the network with second derivatives at the owned interior points gives the
        PDE rows, K̃ (4.10) and the owned columns of Q̄v.
        """
        terms, K, values = self._terms_and_values()
        for name, value in (*terms.items(), ("K_tilde", K)):
            _check_finite(name, value)
        R = self._coupling_R(values, self.state(K))
        terms["coupling"] = self.tau2 * R
        self.last = {"K_tilde": K.detach(), "R": R.detach()}
        return terms

    def _coupling_R(self, values: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.coupling.R(self.compression(values.reshape(-1)), state)

    def prepare(self, step: int) -> None:
        """The lazy coarse update of a step (collective)."""
        if not self.coarse_state.needs_check(step):
            return
        K = self.upscaled_coefficient().detach()
        _check_finite("K_tilde", K)
        self.coarse_state.maybe_refresh(step, self.admissible_coefficient(K))

    def record(self, terms: Mapping[str, float] | None) -> dict[str, Any]:
        """The terms, R, K̃, τ2 and the refresh count of a step (collective)."""
        if terms is None:
            with torch.enable_grad():
                terms = {name: float(loss.detach()) for name, loss in self.losses().items()}
        record = super().record(terms)
        record.update(
            R=float(self.last["R"]),
            **self._K_record(self.last["K_tilde"]),
            tau2=self.tau2,
            refreshes=self.coarse_state.refreshes,
        )
        return record

    def _K_record(self, K: torch.Tensor) -> dict[str, Any]:
        return {"K_tilde": float(K.reshape(-1)[0])}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The network and the coarse state."""
        return {**super().state_dict(), "coarse_state": self.coarse_state.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.coarse_state.load_state_dict(state["coarse_state"])

    def fingerprint(self) -> dict[str, Any]:
        """The PINN fingerprint and the coarse problem and coupling (collective)."""
        fingerprint = super().fingerprint()
        points = fingerprint.pop("points")
        fingerprint["coarse"] = {
            "dofs": self.coarse.num_global_dofs,
            "parametrization": self.coarse.parametrization,
            "delta": self.compression.delta,
            "lazy": self.coarse_state.lazy,
            "compress_state": self.coupling.compress_state,
        }
        fingerprint["points"] = points
        return fingerprint


class FullTensorHybridObjective(HybridObjective):
    """Algorithm 4.1: a d-output network gives the whole K̃ = F T⁻¹ (collective).

    Output i is the fine solution u_i of (4.8) lifted in direction e_i (its PDE rows use the
    right-hand side of ``problem.with_lifting_direction(i)``); ``T_{:,i} = ⟨∇u_i + e_i⟩``,
    ``F_{:,i} = ⟨K^ε(∇u_i + e_i)⟩`` (Monte Carlo, reduced over the ranks). The coarse problem
    takes the symmetrised tensor (``parametrization="tensor"``). Every u_i has the same slow
    part, the homogenised u_0 (``div(K* e_i) = 0`` for a constant K*), so each output's Q̄u_i
    is coupled to the one coarse state: ``R = Σ_i Σ_nodes w (Q̄u_i - ŷ)²``. Errors and
    predictions are of the output of the problem's own lifting direction. Adam only: it has no
    least-squares rows.
    """

    least_squares = False

    def __init__(
        self, problem: MultiscaleProblem, network: nn.Module, *args: Any, **kwargs: Any
    ) -> None:
        self.outputs = [OutputNetwork(network, i) for i in range(problem.dim)]
        super().__init__(
            problem, network, *args, solution=self.outputs[problem.lifting_direction], **kwargs
        )
        interior = self.interior_points
        with torch.no_grad():
            self._K_matrix = problem.K_matrix(interior).detach()
        # K^ε and ∇·K^ε do not depend on the lifting direction; f^ε = q + ∇·(K^ε e_i) does.
        self._f_directions = [
            PDEBlock(problem.with_lifting_direction(j), interior).f for j in range(problem.dim)
        ]

    def upscaled_coefficient(self) -> torch.Tensor:
        """The d×d ``F T⁻¹`` of (4.7) (not symmetrised; collective, differentiable)."""
        x = self.interior_points.detach().requires_grad_(True)
        values = self.network(x)
        gradients = [
            torch.autograd.grad(values[:, i].sum(), x, create_graph=True)[0]
            for i in range(self.problem.dim)
        ]
        return self._tensor(gradients)

    def _tensor(self, gradients: list[torch.Tensor]) -> torch.Tensor:
        return upscaled_tensor_from_gradients(
            torch.stack(gradients, dim=1), self._K_matrix, self.points.weight, self.comm
        )

    def admissible_coefficient(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """The symmetrised K̃ with its eigenvalues clipped to [α, β] (zero gradient if clipped).

        K* is symmetric; the Monte-Carlo ``F T⁻¹`` only up to sampling error. The same on every
        rank (replicated input, deterministic LAPACK).
        """
        symmetric = 0.5 * (K_tilde + K_tilde.T)
        eigenvalues, vectors = np.linalg.eigh(symmetric.detach().cpu().numpy())
        alpha, beta = self.problem.alpha, self.problem.beta
        if alpha <= eigenvalues.min() and eigenvalues.max() <= beta:
            return symmetric
        projected = (vectors * np.clip(eigenvalues, alpha, beta)) @ vectors.T
        return torch.as_tensor(projected, dtype=K_tilde.dtype, device=K_tilde.device)

    def _terms_and_values(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        pde = torch.zeros((), dtype=self.dtype, device=self.device)
        jets = []
        for output, f in zip(self.outputs, self._f_directions, strict=True):
            rows, jet = self.pde_block.rows_and_jet(output, f=f)
            pde = pde + (rows * rows).sum()
            jets.append(jet)
        terms = {"pde": self.global_sum(pde)}
        K = self._tensor([jet[1] for jet in jets])
        if self.has_boundary_term:
            boundary = self.blocks[1]
            local = sum((boundary.loss(output) for output in self.outputs), start=pde * 0.0)
            terms["boundary"] = self.global_sum(local)
        count = len(jets[0][0])
        extra = self.network(self.compression_points[count:])
        point_values = torch.stack([jet[0] for jet in jets], dim=1)
        return terms, K, torch.cat([point_values, extra.reshape(len(extra), -1)])

    def _coupling_R(self, values: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        target = self.coupling.target(state)
        local = sum(
            (
                torch.sum(self.coupling.rows(self.compression(values[:, i]), target) ** 2)
                for i in range(values.shape[1])
            ),
            start=state.sum() * 0.0,
        )
        return allreduce_sum(local, self.comm)

    def _K_record(self, K: torch.Tensor) -> dict[str, Any]:
        i = self.problem.lifting_direction
        tensor = K.detach().cpu()
        return {"K_tilde": float(tensor[i, i]), "K_tilde_tensor": tensor.tolist()}


class GatheredObjective(LeastSquaresObjective):
    """Every rank's rows on every rank, ordered by their points, for the QR least squares.

    The least-squares optimizers then run the same dense problem on every rank (memory: all
    rows times all parameters per rank). The rows are sorted by the coordinates of their
    points (the collocation points, boundary points and coarse nodes do not depend on the
    partition), so the matrix is the same whatever the number of ranks, and so is the result
    to round-off. Collective on ``objective.comm``.

    Args:
        objective: The distributed objective (a :class:`PINNObjective` or a subclass).
    """

    gathered = True

    def __init__(self, objective: PINNObjective) -> None:
        super().__init__(objective.model, objective.blocks)
        self.inner = objective
        self.comm = objective.comm

    def _keys(self, block: ResidualBlock, count: int) -> np.ndarray:
        """The coordinates of each row's point (zeros, i.e. rank order, for other blocks)."""
        dim = self.inner.problem.dim
        points = getattr(block, "points", None)
        if isinstance(block, CouplingBlock):
            points = torch.as_tensor(block.objective.coarse.dof_coordinates)
        if points is None or tuple(points.shape) != (count, dim):
            return np.zeros((count, dim))
        return np.asarray(points.detach().cpu().numpy(), dtype=np.float64)

    def _gather(self, block: ResidualBlock, *tensors: torch.Tensor) -> list[torch.Tensor]:
        keys = self._keys(block, tensors[0].shape[0])
        parts = self.comm.allgather([keys, *(t.cpu().numpy() for t in tensors)])
        all_keys = np.concatenate([part[0] for part in parts])
        order = np.lexsort(all_keys.T[::-1])
        kw = {"dtype": tensors[0].dtype, "device": tensors[0].device}
        return [
            torch.as_tensor(np.concatenate([part[i + 1] for part in parts])[order], **kw)
            for i in range(len(tensors))
        ]

    def block_jacobian(self, block: ResidualBlock) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        rows, jacobian = self._gather(block, *super().block_jacobian(block))
        return rows, jacobian

    def block_values(self, block: ResidualBlock) -> torch.Tensor:  # noqa: D102
        return self._gather(block, super().block_values(block))[0]

    def loss_value(self) -> float:  # noqa: D102
        with torch.no_grad():
            local = sum(float(self._values_no_graph(block)) for block in self.blocks)
        return float(self.comm.allreduce(local, MPI.SUM))
