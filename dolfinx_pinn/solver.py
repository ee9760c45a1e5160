"""The hybrid PINN / finite-element solver, Algorithm 3.1 of Hintermüller & Korolev.

:class:`HybridSolver` minimises the reduced objective (3.3)

    Ĵ(θ) = J^M(v_θ) + τ2 R(y_h(θ), v_θ),

where J^M is the PINN loss (3.24) over the Monte-Carlo collocation points, K̃[v_θ] the upscaled
coefficient (4.10) of the network, y_h(θ) the coarse P1 solution of (4.18) for K̃[v_θ] (a
distributed PETSc solve, :class:`dolfinx_pinn.coarse.CoarseSolve`) and R the coupling (3.25)
between the compression Q̄v (3.26) and y_h (or Q̄y_h, variant (2.16)). One ``backward()`` gives
the whole gradient: autograd for the explicit part and, through ``CoarseSolve``'s backward, the
adjoint solve (3.18) for the part through y_h.

Optimizers:

- ``"adam"``: the paper's Adam (β = (0.9, 0.999), lr decay ``lr0 · rate^⌊it/steps⌋``) with
  gradient-norm loss balancing every 100 steps (:class:`dolfinx_pinn.optim.LossBalancer`).
- ``"gauss_newton"``: :class:`dolfinx_pinn.optim.GaussNewton` on the stacked residual
  ``[PINN rows; √τ2 · coupling rows]``; the coupling rows' Jacobian is
  ``√(τ2 w)(Q̄ ∂v/∂θ - (∂y_h/∂K̃) ∂K̃/∂θ)`` with the state sensitivity from one extra
  solve per entry of K̃. Under MPI the default (``form="auto"``) gathers all rows on every
  rank and runs the serial QR least squares (identical on every rank; it keeps the accuracy
  that the normal equations, ``form="normal"``, lose: 8e-7 against 2e-4 on ``paper_1d(0.01)``).
- ``"projection"``: :class:`dolfinx_pinn.optim.OutputLayerProjection`, the variable-projection
  step alone: the hidden layers stay fixed and each step solves the output layer exactly for
  the stacked rows (affine in it with the lazy, linearised state), the PDE rows' Jacobian
  computed once. With a τ2 continuation the coupling pins the slow part in the first steps
  and vanishes at the end. ``form="normal"`` sums the normal equations over ranks (no
  gathering); ``"auto"`` gathers the rows for QR like Gauss-Newton. On ``paper_2d(0.1)`` with
  a TwoScaleNet (width 64, ``|k|_1 <= 7``) and 20 000 Sobol' points it reaches relative L²
  2.1e-4 and H¹ 1.2e-3 in about two minutes on two cores (``benchmarks/bench_hybrid.py``).
- The coarse problem uses K̃ clipped to the bounds [α, β] of K^ε (a network far from the
  solution can give K̃ <= 0, a non-coercive coarse problem).

Lazy coarse update: with ``lazy=True`` the coarse state is replaced between refreshes by its
first-order expansion ``y_h(K̃) ≈ y_h(K̃₀) + S (K̃ - K̃₀)``, ``S = ∂y_h/∂K̃ (K̃₀)``, which costs no
PETSc solve at all; every ``lazy_every`` steps (T_K, 100 for Adam) the refresh solves the state
and S again if ``max|K̃ - K̃₀| > lazy_tol`` (1e-2). The surrogate agrees with y_h to first
order at K̃₀ (its gradient there is the exact one) and its gradient is exact for the surrogate
objective, so Adam and the Taylor test see a consistent function. With ``lazy=False`` every
step solves the state and the adjoint.

Full-tensor mode (``full_tensor=True``, Algorithm 4.1): the network has d outputs, output i
the fine solution u_i of (4.8) lifted in direction e_i (its PDE rows use the right-hand side of
``problem.with_lifting_direction(i)``), and the whole ``K̃ = F T⁻¹`` of (4.7) comes from them,
``T_{:,i} = ⟨∇u_i + e_i⟩``, ``F_{:,i} = ⟨K^ε(∇u_i + e_i)⟩`` (Monte Carlo, reduced over the
ranks). The coarse problem takes the symmetrised d×d tensor (``parametrization="tensor"``). Every
u_i has the same slow part, the homogenised u_0 of ``-div(K* ∇u_0) = q`` (``div(K* e_i) = 0``
for a constant K*), so each output's compression Q̄u_i is coupled to the one coarse state:
``R = Σ_i Σ_nodes w (Q̄u_i - ŷ)²``. The errors, :meth:`predict` and the outputs use the output
of the problem's own lifting direction. Adam only.

τ2 schedule: ``"constant"`` (the paper) or ``"continuation"``: ``τ2 · decay^⌊it/steps⌋`` and 0
once below ``tau2_min``, so the coupling preconditions the slow component early and the
upscaling-consistency bias (Theorem 3.2) vanishes at the end.

MPI (see :mod:`dolfinx_pinn.coupling` for the convention): the network is replicated with the
same initial weights; each rank evaluates the PINN rows on the collocation points of its owned
coarse cells (the point set does not depend on the number of ranks) and the compression rows of
its owned coarse nodes; every loss term is a global sum (``allreduce_sum``, identity backward),
so the local backward gives this rank's share and :func:`allreduce_gradients` the full
gradient, each term counted once. The coarse solves are distributed PETSc solves. The history on
1 and 2 ranks agrees to round-off.

Example:
    >>> from mpi4py import MPI
    >>> from dolfinx_pinn import paper_1d
    >>> from dolfinx_pinn.networks import TransfiniteBoundaryNet, TwoScaleNet
    >>> from dolfinx_pinn.reference import exact_1d
    >>> from dolfinx_pinn.solver import HybridSolver
    >>> problem = paper_1d(0.01)
    >>> net = TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem)
    >>> solver = HybridSolver(problem, net, n_interior=3000, reference=exact_1d(problem))
    >>> history = solver.train("gauss_newton", steps=6, tau2_schedule="continuation")
    >>> solver.destroy()
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

import dolfinx
import dolfinx.fem.petsc
import numpy as np
import torch
import ufl
from torch import nn

from dolfinx_pinn.coarse import CoarseProblem, CoarseSolve, CollocationPoints
from dolfinx_pinn.coupling import (
    CompressionOperator,
    allreduce_gradients,
    allreduce_sum,
    upscaled_coefficient,
    upscaled_tensor_from_gradients,
)
from dolfinx_pinn.optim import (
    GaussNewton,
    LeastSquaresObjective,
    LossBalancer,
    OutputLayerProjection,
)
from dolfinx_pinn.pinn import ReferenceErrors, select_device
from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import (
    BoundaryBlock,
    PDEBlock,
    ResidualBlock,
    _residual_from_jet,
    derivatives,
)

__all__ = [
    "DEFAULT_COARSE_H",
    "HybridSolver",
    "LinearizedState",
    "StateSensitivity",
    "rank_device",
]

#: Default coarse mesh sizes h per dimension (the paper: 0.004 in 1D, about 0.04 in 2D).
DEFAULT_COARSE_H = {1: 0.004, 2: 0.04, 3: 0.1}
OPTIMIZER_NAMES = ("adam", "gauss_newton", "projection")
_ROUND_OFF_COLUMNS = 1e-12
SCHEDULES = ("constant", "continuation")


def rank_device(device: str | torch.device, comm: MPI.Comm) -> torch.device:
    """The torch device of this rank: ``"cuda"`` means GPU ``rank mod n_gpus``.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:k"``, ``"auto"`` or a torch device.
        comm: The communicator whose rank picks the GPU.
    """
    if isinstance(device, str) and device == "cuda":
        select_device("cuda")  # raises a ValueError without CUDA
        return torch.device("cuda", comm.rank % torch.cuda.device_count())
    resolved = select_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", comm.rank % torch.cuda.device_count())
    return resolved


class _Output(nn.Module):
    """Output ``index`` of a multi-output network as a scalar network ``(N, d) -> (N,)``."""

    def __init__(self, network: nn.Module, index: int) -> None:
        super().__init__()
        self.network = network
        self.index = index
        self.dim = getattr(network, "dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[:, self.index]


def _output_count(network: nn.Module, problem: MultiscaleProblem, device: torch.device) -> int:
    """The number of outputs of a network, from one evaluation at the domain's centre."""
    lower, upper = np.asarray(problem.domain.lower), np.asarray(problem.domain.upper)
    centre = torch.as_tensor(0.5 * (lower + upper), dtype=torch.float64, device=device)
    with torch.no_grad():
        out = network(centre[None, : problem.dim])
    return 1 if out.ndim == 1 else int(out.reshape(1, -1).shape[1])


class _Timer:
    """Accumulates wall time of wrapped calls (the coarse PETSc work)."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        return timed


class StateSensitivity:
    """The coarse state y_h(K̃) and its sensitivity ``S = ∂y_h/∂K̃`` (collective).

    ``S[:, a]`` solves ``B(K̃) S_a = -(∂B/∂K̃_a) y_h`` with the state KSP (already factorised by
    the state solve), the right-hand side assembled from ``-∫ (E_a ∇y_h)·∇v dx`` with ``E_a`` the
    direction of the parameter entry a. Supports the ``"entry"`` and ``"tensor"``
    parametrisations.

    Args:
        coarse: The coarse problem.
        timer: Optional timer wrapped around the solves.
    """

    def __init__(self, coarse: CoarseProblem) -> None:
        if coarse.parametrization not in ("entry", "tensor"):
            raise ValueError(
                "parametrization must be 'entry' or 'tensor' for the state sensitivity, "
                f"got {coarse.parametrization!r}"
            )
        self.coarse = coarse
        d = coarse.dim
        mesh = coarse.mesh
        self._direction = dolfinx.fem.Constant(mesh, np.zeros((d, d)))
        v = ufl.TestFunction(coarse.space)
        form = -ufl.inner(self._direction * ufl.grad(coarse.state), ufl.grad(v)) * ufl.dx(
            domain=mesh
        )
        self._form = dolfinx.fem.form(form)
        self._rhs = dolfinx.fem.petsc.create_vector(coarse.space)
        self._solution = self._rhs.duplicate()
        if coarse.parametrization == "entry":
            i = coarse.entry_index
            direction = np.zeros((d, d))
            direction[i, i] = 1.0
            self.directions = [direction]
        else:
            self.directions = []
            for a in range(d):
                for b in range(d):
                    direction = np.zeros((d, d))
                    direction[a, b] = 1.0
                    self.directions.append(direction)

    @property
    def num_parameters(self) -> int:
        """The number of entries of K̃."""
        return len(self.directions)

    def __call__(self, parameter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(y_h, S)`` at the owned dofs, shapes ``(n,)`` and ``(n, p)`` (collective)."""
        coarse = self.coarse
        state = coarse.solve_state(parameter)
        columns = []
        n = coarse.num_owned_dofs
        for direction in self.directions:
            self._direction.value[:] = direction
            with self._rhs.localForm() as local:
                local.set(0.0)
            dolfinx.fem.petsc.assemble_vector(self._rhs, self._form)
            self._rhs.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            dolfinx.fem.petsc.set_bc(self._rhs, [coarse.bc], alpha=0.0)
            coarse.state_ksp.solve(self._rhs, self._solution)
            if coarse.state_ksp.getConvergedReason() < 0:
                raise RuntimeError("the coarse sensitivity solve did not converge")
            columns.append(self._solution.array[:n].copy())
        return state, np.stack(columns, axis=1)

    def destroy(self) -> None:
        """Destroy the PETSc vectors (collective)."""
        self._rhs.destroy()
        self._solution.destroy()


class LinearizedState(torch.autograd.Function):
    """``y = y₀ + S (K̃ - K̃₀)`` at the owned dofs; backward ``S^T g`` summed over the ranks.

    The lazy coarse update's surrogate of :class:`~dolfinx_pinn.coarse.CoarseSolve`: like it,
    the gradient returned for the replicated K̃ is the full (rank-reduced) one.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        K_tilde: torch.Tensor,
        state: torch.Tensor,
        sensitivity: torch.Tensor,
        anchor: torch.Tensor,
        comm: MPI.Comm,
    ) -> torch.Tensor:
        ctx.sensitivity = sensitivity
        ctx.comm = comm
        ctx.shape = K_tilde.shape
        return state + sensitivity @ (K_tilde.reshape(-1) - anchor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        local = ctx.sensitivity.T @ grad
        total = allreduce_sum(local, ctx.comm) if ctx.comm.size > 1 else local
        return total.reshape(ctx.shape), None, None, None, None


class _CouplingBlock(ResidualBlock):
    """The rows ``√(τ2 w) (Q̄v - ŷ)`` at the owned coarse nodes, for Gauss-Newton."""

    name = "coupling"

    def __init__(self, solver: HybridSolver) -> None:
        self.solver = solver
        self.tau2 = 1.0

    @property
    def affine_in_output(self) -> bool:  # type: ignore[override]
        # K̃ and Q̄v are affine in the output layer; so is the linearised state, not y_h(K̃).
        return self.solver.lazy

    def values(self, model: nn.Module) -> torch.Tensor:
        solver = self.solver
        K = solver.upscaled_coefficient()
        target = solver.target(solver.state(K))
        scale = math.sqrt(self.tau2 * solver.coupling_weight)
        return scale * (solver.compressed_values() - target)

    def jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        solver = self.solver
        objective = solver._objective
        assert objective is not None
        parameters = objective.parameters
        K = solver.upscaled_coefficient()
        grads = torch.autograd.grad(K.reshape(-1).sum(), parameters, allow_unused=True)
        flat = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if g is None
                else g.reshape(-1)
                for p, g in zip(parameters, grads, strict=True)
            ]
        )
        gradient_K = solver._allreduce(flat)[None, :]  # (1, P): K̃ is a scalar ("entry")
        inside = solver.problem.alpha < float(K.detach()) < solver.problem.beta
        gradient_K = gradient_K * float(inside)  # the clip of admissible_coefficient
        K = solver.admissible_coefficient(K.detach())
        if solver.lazy:
            assert solver._linearization is not None
            state_t, sensitivity_t, anchor = solver._linearization
            state = state_t + sensitivity_t @ (K.detach().reshape(-1) - anchor)
        else:
            start = time.perf_counter()
            state_np, sensitivity_np = solver.sensitivity(K.detach().cpu().numpy().reshape(()))
            solver._timer.total += time.perf_counter() - start
            state = torch.as_tensor(state_np, dtype=K.dtype, device=K.device)
            sensitivity_t = torch.as_tensor(sensitivity_np, dtype=K.dtype, device=K.device)
        target = solver.target(state).detach()
        if solver.compress_state:
            sensitivity_t = torch.stack(
                [solver.target(sensitivity_t[:, j]) for j in range(sensitivity_t.shape[1])],
                dim=1,
            ).detach()
        value_rows = BoundaryBlock(solver.compression_points, 1.0, name="values")
        values, value_jacobian = value_rows.jacobian(model)
        matrix, _ = solver.compression._csr_pair(values.device)
        compressed = matrix @ values
        compressed_jacobian = matrix @ value_jacobian
        scale = math.sqrt(self.tau2 * solver.coupling_weight)
        rows = scale * (compressed - target)
        jacobian = scale * (compressed_jacobian - sensitivity_t @ gradient_K)
        # Columns of pure round-off (e.g. the output bias of a transfinite network, which
        # cancels up to ~1e-16) would be scaled to unit norm by Gauss-Newton's column scaling
        # and get huge least-squares coefficients: zero them.
        norms = solver._allreduce((jacobian * jacobian).sum(dim=0)).sqrt()
        noise = norms <= _ROUND_OFF_COLUMNS * float(norms.max()) if norms.numel() else norms
        jacobian[:, noise] = 0.0
        return rows.detach(), jacobian.detach()


class _GatheredObjective(LeastSquaresObjective):
    """All ranks' rows gathered on every rank (in rank order), for the serial QR forms.

    The Gauss-Newton step then runs the same dense least squares on every rank (memory: all
    rows times all parameters per rank). Collective on ``comm``.
    """

    def __init__(self, model: nn.Module, blocks: list[ResidualBlock], comm: MPI.Comm) -> None:
        super().__init__(model, blocks)
        self.comm = comm

    def _gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        parts = self.comm.allgather([t.cpu().numpy() for t in tensors])
        kw = {"dtype": tensors[0].dtype, "device": tensors[0].device}
        return [
            torch.as_tensor(np.concatenate([part[i] for part in parts]), **kw)
            for i in range(len(tensors))
        ]

    def block_jacobian(self, block: ResidualBlock) -> tuple[torch.Tensor, torch.Tensor]:
        rows, jacobian = self._gather(*super().block_jacobian(block))
        return rows, jacobian

    def block_values(self, block: ResidualBlock) -> torch.Tensor:
        return self._gather(super().block_values(block))[0]

    def loss_value(self) -> float:
        with torch.no_grad():
            local = sum(float(self._values_no_graph(block)) for block in self.blocks)
        return float(self.comm.allreduce(local, MPI.SUM))


class HybridSolver:
    """Algorithm 3.1: a network on the fine scale steered by a DOLFINx coarse problem.

    Args:
        problem: The multiscale problem (4.8).
        network: The network v_θ (replicated: built with the same seed on every rank); with
            ``satisfies_boundary_condition`` no boundary rows are used.
        comm: The communicator of the coarse mesh and of the collocation points (default
            ``MPI.COMM_WORLD``). Collective: every rank of it must create the solver.
        coarse_mesh: A dolfinx simplex mesh of the domain (default: a uniform mesh of size
            ``coarse_h``).
        coarse_h: The coarse mesh size h (default :data:`DEFAULT_COARSE_H`), > 0.
        n_interior: The global number M_Ω of interior collocation points, >= 1.
        n_boundary: The global number of boundary points of the τ1 penalty (not in 1D, where
            the two end points are used; default ``max(4, n_interior // 10)``).
        tau1: The boundary penalty weight τ1 > 0.
        tau2: The coupling weight τ2 >= 0 (its initial value for a continuation).
        delta: The compression diameter δ > 0 (default ε).
        compress_state: Use the coupling (2.16) (``R = Σ w (Q̄v - Q̄y_h)²``) instead of (2.10).
        estimator: ``"mean"`` (3.26) or ``"linear"`` (see :class:`CompressionOperator`).
        lazy: The lazy coarse update (the linearised state between refreshes).
        method: Derivative method of the PDE residual (see :mod:`dolfinx_pinn.residual`).
        device: ``"cpu"``, ``"cuda"`` (GPU ``rank mod n_gpus``), ``"auto"`` or a torch device.
        seed: Seed of the collocation points and of torch's generator.
        sampling: The interior collocation points: ``"stratified"`` (uniform random per coarse
            cell) or ``"sobol"`` (a scrambled Sobol' sequence; see
            :class:`~dolfinx_pinn.coarse.CollocationPoints`).
        reference: A reference for the errors: an object with ``value``/``gradient`` (such as
            :func:`dolfinx_pinn.reference.exact_1d`), a pair of callables, or a dolfinx
            Function (then :func:`dolfinx_pinn.reference.relative_errors`, collective).
        petsc_options: Options of the coarse KSPs (default MUMPS LU).
        full_tensor: Algorithm 4.1: the network has d outputs (output i lifted in direction
            e_i) and gives the whole K̃ (a d×d tensor); see the module doc. Adam only; the
            derivative ``method`` must not be ``"jet"`` (the jets are scalar).

    Raises:
        ValueError: naming the parameter, when an input is out of range.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        network: nn.Module,
        *,
        comm: MPI.Comm | None = None,
        coarse_mesh: dolfinx.mesh.Mesh | None = None,
        coarse_h: float | None = None,
        n_interior: int = 2000,
        n_boundary: int | None = None,
        tau1: float = 1.0,
        tau2: float = 1.0,
        delta: float | None = None,
        compress_state: bool = False,
        estimator: str = "mean",
        lazy: bool = True,
        method: str = "auto",
        device: str | torch.device = "cpu",
        seed: int = 0,
        sampling: str = "stratified",
        reference: Any = None,
        petsc_options: dict[str, Any] | None = None,
        full_tensor: bool = False,
    ) -> None:
        comm = MPI.COMM_WORLD if comm is None else comm
        if coarse_mesh is not None:
            comm = coarse_mesh.comm
        if not (isinstance(n_interior, int) and n_interior >= 1):
            raise ValueError(f"n_interior must be an integer >= 1, got {n_interior!r}")
        if not (isinstance(tau1, (int, float)) and math.isfinite(tau1) and tau1 > 0):
            raise ValueError(f"tau1 must be a finite number > 0, got {tau1!r}")
        if not (isinstance(tau2, (int, float)) and math.isfinite(tau2) and tau2 >= 0):
            raise ValueError(f"tau2 must be a finite number >= 0, got {tau2!r}")
        if getattr(network, "dim", problem.dim) != problem.dim:
            raise ValueError(f"network: dimension {network.dim} != problem dimension {problem.dim}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.full_tensor = bool(full_tensor)
        if self.full_tensor and method == "jet":
            raise ValueError(
                "method: 'jet' needs a scalar network; full_tensor=True needs "
                "'auto', 'autograd' or 'func'"
            )
        self.problem = problem
        self.comm = comm
        self.device = rank_device(device, comm)
        self.seed = seed
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.lazy = bool(lazy)
        self.compress_state = bool(compress_state)
        torch.manual_seed(seed)
        self.network = network.to(self.device)
        self.dtype = next(network.parameters()).dtype
        if self.dtype != torch.float64:
            raise ValueError(f"network: float64 parameters are needed, got {self.dtype}")
        outputs = _output_count(network, problem, self.device)
        expected = problem.dim if self.full_tensor else 1
        if outputs != expected:
            raise ValueError(
                f"network: {outputs} output(s), but full_tensor={self.full_tensor} needs "
                f"{expected} (one per lifting direction e_i with full_tensor=True)"
            )
        # The network of the problem's own lifting direction: errors, predictions, outputs.
        self._outputs = [_Output(self.network, i) for i in range(problem.dim)]
        self.solution: nn.Module = (
            self._outputs[problem.lifting_direction] if self.full_tensor else self.network
        )

        # -- coarse mesh, points, operators ------------------------------------------------
        if coarse_mesh is None:
            h = DEFAULT_COARSE_H.get(problem.dim, 0.1) if coarse_h is None else coarse_h
            if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
                raise ValueError(f"coarse_h must be a finite number > 0, got {coarse_h!r}")
            cells = [max(2, round(length / h)) for length in problem.domain.lengths]
            coarse_mesh = problem.create_mesh(comm, cells)
        self.mesh = coarse_mesh
        self.coarse = CoarseProblem(
            problem,
            coarse_mesh,
            parametrization="tensor" if self.full_tensor else "entry",
            petsc_options=petsc_options,
        )
        self._timer = _Timer()
        for name in ("solve_state", "solve_adjoint", "parameter_gradient"):
            setattr(self.coarse, name, self._timer.wrap(getattr(self.coarse, name)))
        self.sensitivity = StateSensitivity(self.coarse)
        hard = bool(getattr(network, "satisfies_boundary_condition", False))
        if not hard and problem.dim > 1 and n_boundary is None:
            n_boundary = max(4, n_interior // 10)
        if n_boundary is not None and not (isinstance(n_boundary, int) and n_boundary >= 1):
            raise ValueError(f"n_boundary must be an integer >= 1, got {n_boundary!r}")
        self.points = CollocationPoints(
            coarse_mesh,
            count=n_interior,
            boundary_count=None if (hard or problem.dim == 1) else n_boundary,
            seed=seed,
            sampling=sampling,
        )
        self.compression = CompressionOperator(
            self.coarse, self.points, delta=delta, estimator=estimator
        )
        self.coupling_weight = problem.domain.measure / self.coarse.num_global_dofs
        dtype, dev = self.dtype, self.device
        self.interior_points = self.points.torch_interior(dev, dtype)
        self.compression_points = self.compression.points(dev, dtype)
        if self.points.global_interior_count < 1 or len(self.interior_points) < 1:
            raise ValueError("n_interior: every rank needs collocation points; raise n_interior")
        weight = self.points.measure / self.points.global_interior_count
        self.pde_block = PDEBlock(problem, self.interior_points, weight=weight, method=method)
        # Row i of K^ε at the owned points: the flux component of (4.10).
        i = problem.lifting_direction
        with torch.no_grad():
            self._K_rows = problem.K_matrix(self.interior_points)[:, i, :].detach()
        self._K_matrix: torch.Tensor | None = None
        self._f_directions: list[torch.Tensor] = []
        if self.full_tensor:
            # K^ε and ∇·K^ε do not depend on the lifting direction; f^ε = q + ∇·(K^ε e_i) does.
            with torch.no_grad():
                self._K_matrix = problem.K_matrix(self.interior_points).detach()
            self._f_directions = [
                PDEBlock(problem.with_lifting_direction(j), self.interior_points).f
                for j in range(problem.dim)
            ]
        self.boundary_block: BoundaryBlock | None = None
        if not hard and self.points.global_boundary_count > 0:
            boundary_weight = (
                self.tau1 * self.points.boundary_measure / self.points.global_boundary_count
            )
            if len(self.points.boundary):
                self.boundary_block = BoundaryBlock(
                    self.points.torch_boundary(dev, dtype), boundary_weight
                )
        self.has_boundary_term = not hard and self.points.global_boundary_count > 0
        self.errors = self._make_errors(reference)
        self.reference = reference
        self._linearization: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.refreshes = 0
        self._objective: LeastSquaresObjective | None = None
        self.history: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None
        self._destroyed = False

    # -- building blocks ---------------------------------------------------------------------
    def _make_errors(self, reference: Any) -> Callable[[], tuple[float, float]] | None:
        if reference is None:
            return None
        if isinstance(reference, dolfinx.fem.Function):
            from dolfinx_pinn.reference import relative_errors

            return lambda: relative_errors(self.solution, reference)
        errors = ReferenceErrors(self.problem, reference)
        return lambda: errors(self.solution)

    def relative_errors(self) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors of the network against the reference."""
        if self.errors is None:
            raise ValueError("reference: the solver was created without a reference")
        return self.errors()

    def upscaled_coefficient(self) -> torch.Tensor:
        """K̃[v_θ] of (4.10), replicated on every rank, differentiable (collective).

        With ``full_tensor`` the d×d tensor ``F T⁻¹`` of (4.7) (not symmetrised).
        """
        if self.full_tensor:
            x = self.interior_points.detach().requires_grad_(True)
            values = self.network(x)
            gradients = [
                torch.autograd.grad(values[:, i].sum(), x, create_graph=True)[0]
                for i in range(self.problem.dim)
            ]
            return self._upscaled_tensor(gradients)
        return upscaled_coefficient(
            self.problem,
            self.network,
            self.interior_points,
            comm=self.comm,
            measure=self.points.measure,
            global_count=self.points.global_interior_count,
        )

    def _upscaled_tensor(self, gradients: list[torch.Tensor]) -> torch.Tensor:
        """``F T⁻¹`` from the gradients ``∇u_i`` ``(N, d)`` at the owned points (collective)."""
        assert self._K_matrix is not None
        return upscaled_tensor_from_gradients(
            torch.stack(gradients, dim=1), self._K_matrix, self.points.weight, self.comm
        )

    def admissible_coefficient(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """K̃ clipped to the bounds [α, β] of K^ε, which contain every upscaled coefficient.

        A network far from the solution (e.g. at initialisation) can give a K̃ ≤ 0 and a
        non-coercive coarse problem; the clip keeps the state defined (its gradient is zero
        outside the bounds, where the coupling then acts through Q̄v only).

        With ``full_tensor`` the tensor is symmetrised (K* is symmetric; the Monte-Carlo
        ``F T⁻¹`` only up to sampling error), and if an eigenvalue leaves [α, β] the
        eigenvalues are clipped, with a zero gradient like the scalar clip. The same on every
        rank (replicated input, deterministic LAPACK).
        """
        if not self.full_tensor:
            return K_tilde.clamp(min=self.problem.alpha, max=self.problem.beta)
        symmetric = 0.5 * (K_tilde + K_tilde.T)
        eigenvalues, vectors = np.linalg.eigh(symmetric.detach().cpu().numpy())
        alpha, beta = self.problem.alpha, self.problem.beta
        if alpha <= eigenvalues.min() and eigenvalues.max() <= beta:
            return symmetric
        projected = (vectors * np.clip(eigenvalues, alpha, beta)) @ vectors.T
        return torch.as_tensor(projected, dtype=K_tilde.dtype, device=K_tilde.device)

    def state(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """y_h at the owned coarse dofs: exact (``CoarseSolve``) or linearised (lazy).

        K̃ is clipped to [α, β] first (see :meth:`admissible_coefficient`).
        """
        if not bool(torch.isfinite(K_tilde).all()):
            raise RuntimeError(
                f"the upscaled coefficient K_tilde is not finite ({K_tilde.detach().tolist()})"
            )
        K_tilde = self.admissible_coefficient(K_tilde)
        if self.lazy:
            if self._linearization is None:
                self.refresh(K_tilde)
            assert self._linearization is not None
            state, sensitivity, anchor = self._linearization
            return LinearizedState.apply(K_tilde, state, sensitivity, anchor, self.comm)
        return CoarseSolve.apply(K_tilde, self.coarse)

    def refresh(self, K_tilde: torch.Tensor) -> None:
        """Solve the state and its sensitivity at K̃ (the lazy update's anchor; collective)."""
        K_tilde = self.admissible_coefficient(K_tilde.detach())
        parameter = K_tilde.cpu().numpy().astype(np.float64).reshape(self.coarse.parameter_shape)
        start = time.perf_counter()
        state, sensitivity = self.sensitivity(parameter)
        self._timer.total += time.perf_counter() - start
        kw = {"dtype": self.dtype, "device": self.device}
        self._linearization = (
            torch.as_tensor(state, **kw),
            torch.as_tensor(sensitivity, **kw),
            torch.as_tensor(parameter.reshape(-1), **kw),
        )
        self.refreshes += 1

    def target(self, state: torch.Tensor) -> torch.Tensor:
        """ŷ = y_h (2.10) or Q̄y_h (2.16) at the owned nodes."""
        return self.compression.compress_state(state) if self.compress_state else state

    def compressed_values(self) -> torch.Tensor:
        """Q̄v at the owned coarse nodes (differentiable)."""
        return self.compression(self.solution(self.compression_points).reshape(-1))

    def losses(self, tau2: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The terms of Ĵ (replicated, differentiable), K̃ and the unweighted R (collective).

        Returns:
            ``({"pde", ["boundary"], "coupling" = τ2 R}, K̃, R)``; with ``full_tensor`` the PDE
            and boundary terms and R are sums over the d outputs and K̃ is the d×d ``F T⁻¹``.
        """
        terms: dict[str, torch.Tensor] = {}
        # One pass of the network with second derivatives at the owned interior points gives
        # the PDE rows, K̃ (4.10) and the owned columns of Q̄v (per output in full-tensor mode).
        block, problem = self.pde_block, self.problem
        outputs = self._outputs if self.full_tensor else [self.network]
        forcing = self._f_directions if self.full_tensor else [block.f]
        pde = torch.zeros((), dtype=self.dtype, device=self.device)
        jets = []
        for output, f in zip(outputs, forcing, strict=True):
            jet = derivatives(
                output, self.interior_points, block.method, full_hessian=problem.is_tensor
            )
            rows = block.weight * _residual_from_jet(
                jet, block.K, block.drift, f, problem.is_tensor
            )
            pde = pde + (rows * rows).sum()
            jets.append(jet)
        terms["pde"] = allreduce_sum(pde, self.comm)
        if self.full_tensor:
            point_values = torch.stack([jet[0] for jet in jets], dim=1)  # (N, d)
            K = self._upscaled_tensor([jet[1] for jet in jets])
        else:
            point_values, gradient = jets[0][0], jets[0][1]
            i = problem.lifting_direction
            shifted = gradient + torch.eye(problem.dim, dtype=self.dtype, device=self.device)[i]
            flux = torch.einsum("nj,nj->n", self._K_rows, shifted)
            K = allreduce_sum(flux.sum() * self.points.weight, self.comm)
        if self.has_boundary_term:
            local = torch.zeros((), dtype=self.dtype, device=self.device)
            if self.boundary_block is not None:
                for output in outputs:
                    local = local + self.boundary_block.loss(output)
            terms["boundary"] = allreduce_sum(local, self.comm)
        for name, value in (*terms.items(), ("K_tilde", K)):
            if not bool(torch.isfinite(value).all()):
                raise RuntimeError(
                    f"the loss term {name!r} is not finite ({value.detach().tolist()}); "
                    f"the last good checkpoint is {self.last_checkpoint}"
                )
        target = self.target(self.state(K))
        count = len(point_values)
        extra = self.network(self.compression_points[count:])
        values = torch.cat([point_values.reshape(count, -1), extra.reshape(len(extra), -1)])
        # Every output u_i has the same slow part (the homogenised solution), so each Q̄u_i is
        # coupled to the one coarse state.
        local = torch.zeros((), dtype=self.dtype, device=self.device)
        for column in range(values.shape[1]):
            difference = self.compression(values[:, column]) - target
            local = local + (difference * difference).sum()
        R = allreduce_sum(self.coupling_weight * local, self.comm)
        terms["coupling"] = tau2 * R
        return terms, K, R

    def objective_value(self, tau2: float | None = None) -> torch.Tensor:
        """Ĵ(θ) = J^M + τ2 R, differentiable (collective): ``backward()`` gives this rank's share.

        Call :func:`dolfinx_pinn.coupling.allreduce_gradients` afterwards for the full gradient.
        """
        terms, _, _ = self.losses(self.tau2 if tau2 is None else tau2)
        return sum(terms.values())  # type: ignore[return-value]

    def gradient(self, tau2: float | None = None) -> tuple[float, torch.Tensor]:
        """``(Ĵ(θ), ∇Ĵ(θ))`` with the full gradient as one flat vector (collective)."""
        parameters = [p for p in self.network.parameters() if p.requires_grad]
        for p in parameters:
            p.grad = None
        value = self.objective_value(tau2)
        value.backward()
        allreduce_gradients(parameters, self.comm)
        flat = torch.cat(
            [
                torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
                for p in parameters
            ]
        )
        return float(value.detach()), flat.detach().clone()

    # -- schedules ---------------------------------------------------------------------------
    @staticmethod
    def tau2_at(
        step: int, tau2: float, schedule: str, decay: float, decay_steps: int, minimum: float
    ) -> float:
        """τ2 of a step: constant, or ``τ2 · decay^⌊step/decay_steps⌋`` (0 below ``minimum``)."""
        if schedule == "constant":
            return tau2
        value = tau2 * decay ** (step // decay_steps)
        return value if value >= minimum else 0.0

    # -- training ----------------------------------------------------------------------------
    def train(
        self,
        optimizer: str = "adam",
        steps: int = 1000,
        *,
        lr: float = 5e-4,
        decay_rate: float = 0.75,
        decay_steps: int = 1000,
        balancing: bool = True,
        balance_every: int = 100,
        balance_alpha: float = 0.9,
        tau2_schedule: str = "constant",
        tau2_decay: float = 0.1,
        tau2_decay_steps: int | None = None,
        tau2_min: float = 1e-8,
        lazy_every: int | None = None,
        lazy_tol: float = 1e-2,
        eval_every: int = 100,
        checkpoint_every: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | bool | None = None,
        progress: bool = True,
        time_limit: float | None = None,
        target_l2: float | None = None,
        callback: Callable[[int, dict[str, Any]], None] | None = None,
        **gauss_newton: Any,
    ) -> dict[str, Any]:
        """Run Algorithm 3.1 for ``steps`` iterations (collective); returns the history.

        Args:
            optimizer: ``"adam"``, ``"gauss_newton"`` (alias ``"gn"``) or ``"projection"``
                (the output layer by least squares, the hidden layers fixed; needs
                ``lazy=True``).
            steps: The total number of iterations (including those of a resumed run), >= 0.
            lr: Adam's initial learning rate lr(0) > 0 (the paper: 5e-4).
            decay_rate: Adam's lr factor per ``decay_steps``, in (0, 1].
            decay_steps: Steps per lr decay, >= 1.
            balancing: Gradient-norm loss balancing (Adam only).
            balance_every: Steps between balancing updates (100), >= 1.
            balance_alpha: The balancing moving-average factor in [0, 1).
            tau2_schedule: ``"constant"`` or ``"continuation"``.
            tau2_decay: The continuation factor per ``tau2_decay_steps``, in (0, 1).
            tau2_decay_steps: Steps per continuation factor (default 1 for Gauss-Newton, 500
                for Adam).
            tau2_min: τ2 is set to 0 once the continuation takes it below this.
            lazy_every: T_K, steps between lazy refresh checks (default 100 for Adam, 1 for
                Gauss-Newton).
            lazy_tol: Refresh when ``max|K̃ - K̃₀| > lazy_tol``.
            eval_every: Steps between error evaluations (with a reference), >= 1.
            checkpoint_every: Steps between checkpoints (and on SIGINT/SIGTERM), or None.
            checkpoint_dir: Folder of the checkpoints (one file per rank).
            resume: A checkpoint folder (or True for ``checkpoint_dir``) to continue from.
            progress: A tqdm progress bar on rank 0.
            time_limit: Stop after this many seconds.
            target_l2: Stop once the relative L² error is at most this (checked every step).
            callback: Called as ``callback(step, record)`` after each step.
            **gauss_newton: Options of :class:`~dolfinx_pinn.optim.GaussNewton` (``damping``,
                ``form``, ``variable_projection`` (default: ``lazy``), ...) or, for
                ``"projection"``, of :class:`~dolfinx_pinn.optim.OutputLayerProjection`
                (``form``, ``ridge``, ``rcond``).

        Returns:
            The history (see :attr:`history`): lists per step ``step``, ``loss``, ``pde``,
            ``boundary``, ``coupling`` (= τ2 R), ``R``, ``K_tilde`` (K̃_ii, i the lifting
            direction), ``K_tilde_tensor`` (with ``full_tensor``: K̃ as nested lists),
            ``tau2``, ``lr``,
            ``weight_<term>``, ``time``, ``time_network``, ``time_coarse``, ``time_other``,
            ``refreshes``; per evaluation ``eval_step``, ``l2``, ``h1``.

        Raises:
            ValueError: naming an argument out of range.
            NotImplementedError: for Gauss-Newton with ``full_tensor``.
            RuntimeError: when a loss term becomes NaN/inf (the last checkpoint is kept).
        """
        optimizer = {"gn": "gauss_newton", "lm": "gauss_newton"}.get(optimizer, optimizer)
        if optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES}, got {optimizer!r}")
        if optimizer != "adam" and self.full_tensor:
            # The coupling block's Jacobian and the stacked PDE rows handle one scalar output.
            raise NotImplementedError(
                f"optimizer: {optimizer!r} does not support full_tensor=True; use 'adam'"
            )
        if optimizer == "projection" and not self.lazy:
            raise ValueError(
                "optimizer: 'projection' needs lazy=True (the coupling rows are affine in the "
                "output layer only with the linearised coarse state)"
            )
        _check_int("steps", steps, 0)
        _check_int("decay_steps", decay_steps, 1)
        _check_int("balance_every", balance_every, 1)
        _check_int("eval_every", eval_every, 1)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not 0 < decay_rate <= 1:
            raise ValueError(f"decay_rate must lie in (0, 1], got {decay_rate}")
        if tau2_schedule not in SCHEDULES:
            raise ValueError(f"tau2_schedule must be one of {SCHEDULES}, got {tau2_schedule!r}")
        if not 0 < tau2_decay < 1:
            raise ValueError(f"tau2_decay must lie in (0, 1), got {tau2_decay}")
        if tau2_decay_steps is None:
            tau2_decay_steps = 500 if optimizer == "adam" else 1
        _check_int("tau2_decay_steps", tau2_decay_steps, 1)
        if lazy_every is None:
            lazy_every = 100 if optimizer == "adam" else 1
        _check_int("lazy_every", lazy_every, 1)
        if not (math.isfinite(lazy_tol) and lazy_tol >= 0):
            raise ValueError(f"lazy_tol must be a finite number >= 0, got {lazy_tol}")
        if checkpoint_every is not None:
            _check_int("checkpoint_every", checkpoint_every, 1)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_dir: needed with checkpoint_every")
        if resume is True:
            resume = checkpoint_dir
        if resume and not Path(resume).is_dir():
            raise ValueError(f"resume: no checkpoint folder {resume}")
        checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir)

        def tau2_of(step: int) -> float:
            return self.tau2_at(
                step, self.tau2, tau2_schedule, tau2_decay, tau2_decay_steps, tau2_min
            )

        parameters = [p for p in self.network.parameters() if p.requires_grad]
        names = ["pde", *(["boundary"] if self.has_boundary_term else []), "coupling"]
        balancer = LossBalancer(names, alpha=balance_alpha, every=balance_every)
        adam = gn = None
        if optimizer == "adam":
            if gauss_newton:
                raise ValueError(f"unknown options for Adam: {sorted(gauss_newton)}")
            adam = torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999))
        else:
            blocks: list[ResidualBlock] = [self.pde_block]
            if self.boundary_block is not None:
                blocks.append(self.boundary_block)
            coupling_block = _CouplingBlock(self)
            blocks.append(coupling_block)
            form = gauss_newton.get("form", "auto")
            if self.comm.size == 1:
                self._objective = LeastSquaresObjective(self.network, blocks)
            elif form in ("auto", "qr", "gram"):
                # Gather the rows on every rank: the serial QR least squares (which keeps the
                # accuracy the normal equations lose), identical on every rank.
                self._objective = _GatheredObjective(self.network, blocks, self.comm)
            else:
                self._objective = LeastSquaresObjective(
                    self.network, blocks, allreduce=self._allreduce
                )
            if optimizer == "projection":
                gn = OutputLayerProjection(self._objective, **gauss_newton)
            else:
                gauss_newton.setdefault("variable_projection", self.lazy)
                gn = GaussNewton(self._objective, **gauss_newton)

        history = self.history = _empty_history(names, self.full_tensor)
        start_step = 0
        if resume:
            start_step = self._load_checkpoint(Path(resume), adam, gn, balancer)
            history = self.history
        self.refreshes = history.get("refreshes_total", 0)
        elapsed = history["time"][-1] if history["time"] else 0.0

        def evaluate(step: int) -> float | None:
            if self.errors is None:
                return None
            l2, h1 = self.errors()
            history["eval_step"].append(step)
            history["l2"].append(l2)
            history["h1"].append(h1)
            return l2

        if start_step == 0:
            evaluate(0)
        stop = _StopFlag()
        bar = None
        if progress and self.comm.rank == 0 and steps > start_step:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start_step, desc=f"hybrid {optimizer}", leave=False)
        stop.install()
        try:
            for step in range(start_step, steps):
                tau2 = tau2_of(step)
                t0 = time.perf_counter()
                coarse0 = self._timer.total
                if optimizer == "adam":
                    assert adam is not None
                    record = self._adam_step(
                        step,
                        tau2,
                        adam,
                        balancer,
                        balancing,
                        lr,
                        decay_rate,
                        decay_steps,
                        parameters,
                        lazy_every,
                        lazy_tol,
                    )
                else:
                    assert gn is not None
                    record = self._gauss_newton_step(
                        step, tau2, gn, coupling_block, lazy_every, lazy_tol
                    )
                t1 = time.perf_counter()
                coarse_time = self._timer.total - coarse0
                done = step + 1 == steps or (time_limit is not None and elapsed >= time_limit)
                l2 = None
                if (step + 1) % eval_every == 0 or done or target_l2 is not None:
                    l2 = evaluate(step + 1)
                t2 = time.perf_counter()
                elapsed += t2 - t0
                record.update(
                    step=step + 1,
                    time=elapsed,
                    time_network=(t1 - t0) - coarse_time,
                    time_coarse=coarse_time,
                    time_other=t2 - t1,
                    refreshes=self.refreshes,
                )
                _append(history, record)
                history["refreshes_total"] = self.refreshes
                if callback is not None:
                    callback(step + 1, record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3e}", K=f"{record['K_tilde']:.4f}")
                interrupted = stop.agreed(self.comm)
                if checkpoint_path is not None and (
                    interrupted or (checkpoint_every and (step + 1) % checkpoint_every == 0)
                ):
                    self._save_checkpoint(checkpoint_path, step + 1, adam, gn, balancer)
                if interrupted:
                    raise KeyboardInterrupt(
                        f"training interrupted by a signal after step {step + 1}; "
                        f"checkpoint: {self.last_checkpoint}"
                    )
                if target_l2 is not None and l2 is not None and l2 <= target_l2:
                    break
                if done or record.get("stalled", False):
                    break
        finally:
            stop.uninstall()
            if bar is not None:
                bar.close()
        return history

    def _allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return allreduce_sum(tensor.detach(), self.comm)

    def _lazy_refresh(self, step: int, lazy_every: int, lazy_tol: float) -> None:
        """The lazy coarse update of a step: check K̃ is finite, refresh y_h if it moved."""
        if not self.lazy:
            return
        K = self.upscaled_coefficient().detach()
        if not bool(torch.isfinite(K).all()):
            raise RuntimeError(
                f"the loss term 'K_tilde' is not finite ({K.tolist()}); "
                f"the last good checkpoint is {self.last_checkpoint}"
            )
        self._lazy_check(step, K, lazy_every, lazy_tol)

    def _lazy_check(self, step: int, K: torch.Tensor, every: int, tol: float) -> None:
        if not self.lazy:
            return
        if self._linearization is None:
            self.refresh(K)
            return
        if step % every == 0:
            K = self.admissible_coefficient(K)
            anchor = self._linearization[2]
            if float((K.detach().reshape(-1) - anchor).abs().max()) > tol:
                self.refresh(K)

    def _adam_step(
        self,
        step: int,
        tau2: float,
        adam: torch.optim.Adam,
        balancer: LossBalancer,
        balancing: bool,
        lr0: float,
        decay_rate: float,
        decay_steps: int,
        parameters: list[torch.nn.Parameter],
        lazy_every: int,
        lazy_tol: float,
    ) -> dict[str, Any]:
        self._lazy_refresh(step, lazy_every, lazy_tol)
        terms, K, R = self.losses(tau2)
        values = {name: float(value.detach()) for name, value in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = [name for name, v in values.items() if not math.isfinite(v)]
            raise RuntimeError(
                f"the loss term(s) {bad} became non-finite at step {step + 1} ({values}); the "
                f"last good checkpoint is {self.last_checkpoint}"
            )
        active = {name: value for name, value in terms.items() if name != "coupling" or tau2 > 0}
        if balancing and step % balancer.every == 0 and len(active) > 1:
            balancer.update_from_norms(self._gradient_norms(active, parameters))
        weights = dict(balancer.weights) if balancing else dict.fromkeys(terms, 1.0)
        total = sum(weights[name] * value for name, value in active.items())
        adam.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[union-attr]
        allreduce_gradients(parameters, self.comm)
        lr = lr0 * decay_rate ** (step // decay_steps)
        for group in adam.param_groups:
            group["lr"] = lr
        adam.step()
        record = {
            "loss": sum(values.values()),
            **values,
            "R": float(R.detach()),
            **self._K_record(K),
            "tau2": tau2,
            "lr": lr,
        }
        record.update({f"weight_{name}": w for name, w in weights.items()})
        return record

    def _K_record(self, K: torch.Tensor) -> dict[str, Any]:
        """The history entries of K̃: ``K_tilde`` (K̃_ii) and, for a tensor, all of it."""
        if not self.full_tensor:
            return {"K_tilde": float(K.detach().reshape(-1)[0])}
        i = self.problem.lifting_direction
        tensor = K.detach().cpu()
        return {"K_tilde": float(tensor[i, i]), "K_tilde_tensor": tensor.tolist()}

    def _gradient_norms(
        self, terms: dict[str, torch.Tensor], parameters: list[torch.nn.Parameter]
    ) -> dict[str, float]:
        norms = {}
        for name, value in terms.items():
            grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
            local = torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    if g is None
                    else g.reshape(-1)
                    for p, g in zip(parameters, grads, strict=True)
                ]
            )
            full = self._allreduce(local)
            norms[name] = float(torch.linalg.vector_norm(full))
        return norms

    def _gauss_newton_step(
        self,
        step: int,
        tau2: float,
        gn: GaussNewton,
        block: _CouplingBlock,
        lazy_every: int,
        lazy_tol: float,
    ) -> dict[str, Any]:
        block.tau2 = tau2
        self._lazy_refresh(step, lazy_every, lazy_tol)
        try:
            info = gn.step()
        except FloatingPointError as error:
            raise RuntimeError(
                f"the loss became non-finite at step {step + 1} ({error}); the last good "
                f"checkpoint is {self.last_checkpoint}"
            ) from error
        terms, K, R = self.losses(tau2)
        values = {name: float(value.detach()) for name, value in terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise RuntimeError(
                f"the loss terms became non-finite at step {step + 1} ({values}); the last "
                f"good checkpoint is {self.last_checkpoint}"
            )
        record = {
            "loss": sum(values.values()),
            **values,
            "R": float(R.detach()),
            "K_tilde": float(K.detach().reshape(-1)[0]),
            "tau2": tau2,
            "lr": float(info["damping"]),
            "stalled": bool(info.get("stalled", False)) and tau2 == 0.0,
        }
        record.update({f"weight_{name}": 1.0 for name in terms})
        return record

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint_file(self, folder: Path) -> Path:
        return folder / f"checkpoint.rank{self.comm.rank}.pt"

    def _save_checkpoint(
        self,
        folder: Path,
        step: int,
        adam: torch.optim.Adam | None,
        gn: GaussNewton | None,
        balancer: LossBalancer,
    ) -> Path:
        state = {
            "step": step,
            "n_ranks": self.comm.size,
            "network": self.network.state_dict(),
            "adam": None if adam is None else adam.state_dict(),
            "gauss_newton": None
            if gn is None
            else {
                "relative_damping": gn.relative_damping,
                "growth": gn._growth,
                "iteration": gn.iteration,
            },
            "balancer": dict(balancer.weights),
            "linearization": self._linearization,
            "refreshes": self.refreshes,
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),  # noqa: NPY002  (the global state is saved)
            "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = self._checkpoint_file(folder)
        temporary = path.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)
        self.comm.barrier()
        self.last_checkpoint = path
        return path

    def _load_checkpoint(
        self,
        folder: Path,
        adam: torch.optim.Adam | None,
        gn: GaussNewton | None,
        balancer: LossBalancer,
    ) -> int:
        path = self._checkpoint_file(folder)
        if not path.is_file():
            raise ValueError(f"resume: no checkpoint {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["n_ranks"] != self.comm.size:
            raise ValueError(
                f"resume: the checkpoint was written on {state['n_ranks']} rank(s), this run "
                f"has {self.comm.size}"
            )
        self.network.load_state_dict(state["network"])
        if (adam is None) != (state["adam"] is None):
            raise ValueError("resume: the checkpoint was written with another optimizer")
        if adam is not None:
            adam.load_state_dict(state["adam"])
        if gn is not None:
            gn.relative_damping = state["gauss_newton"]["relative_damping"]
            gn._growth = state["gauss_newton"]["growth"]
            gn.iteration = state["gauss_newton"]["iteration"]
        balancer.weights = dict(state["balancer"])
        linearization = state["linearization"]
        self._linearization = (
            None if linearization is None else tuple(t.to(self.device) for t in linearization)  # type: ignore[assignment]
        )
        self.refreshes = state["refreshes"]
        self.history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])  # noqa: NPY002
        random.setstate(state["python_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.last_checkpoint = path
        return int(state["step"])

    # -- results -----------------------------------------------------------------------------
    def predict(self, points: np.ndarray) -> np.ndarray:
        """The network's values at numpy points ``(N, d)`` (local, no communication)."""
        x = torch.as_tensor(np.asarray(points)[:, : self.problem.dim], dtype=self.dtype)
        with torch.no_grad():
            return self.solution(x.to(self.device)).reshape(-1).cpu().numpy()

    def coarse_state(self) -> dolfinx.fem.Function:
        """The exact coarse solution y_h for the current K̃[v_θ] as a P1 Function (collective).

        Keep the Function in a variable while using its PETSc vector: in
        ``solver.coarse_state().x.petsc_vec`` the Function is a temporary, and the vector would
        outlive the memory it wraps (a segmentation fault).
        """
        K = self.admissible_coefficient(self.upscaled_coefficient().detach())
        state = self.coarse.solve_state(K.cpu().numpy().reshape(self.coarse.parameter_shape))
        function = self.coarse.function(state)
        function.name = "y_h"
        return function

    def compression_function(self) -> dolfinx.fem.Function:
        """Q̄v at the coarse nodes as a P1 Function (collective)."""
        with torch.no_grad():
            values = self.compressed_values()
        function = self.coarse.function(values)
        function.name = "Qv"
        return function

    @property
    def coarse_time(self) -> float:
        """Wall time spent in the coarse PETSc solves so far (this rank)."""
        return self._timer.total

    def destroy(self) -> None:
        """Destroy the PETSc objects (collective); the solver is unusable afterwards."""
        if self._destroyed:
            return
        self._destroyed = True
        self.sensitivity.destroy()
        self.compression.destroy()
        self.coarse.destroy()

    def __enter__(self) -> HybridSolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _empty_history(names: list[str], full_tensor: bool = False) -> dict[str, Any]:
    keys = [
        "step",
        "loss",
        *names,
        "R",
        "K_tilde",
        "tau2",
        "lr",
        *(f"weight_{name}" for name in names),
        "time",
        "time_network",
        "time_coarse",
        "time_other",
        "refreshes",
    ]
    if full_tensor:
        keys.insert(keys.index("K_tilde") + 1, "K_tilde_tensor")
    history: dict[str, Any] = {key: [] for key in keys}
    history.update(eval_step=[], l2=[], h1=[])
    return history


def _append(history: dict[str, Any], record: dict[str, Any]) -> None:
    for key, value in record.items():
        if key in history and isinstance(history[key], list):
            history[key].append(value)


class _StopFlag:
    """SIGINT/SIGTERM turn into a flag checked (and agreed over the ranks) after each step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.raised = True

    def install(self) -> None:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self._previous.clear()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, comm: MPI.Comm) -> bool:
        if comm.size == 1:
            return self.raised
        return bool(comm.allreduce(int(self.raised), MPI.MAX))
