"""The hybrid PINN / finite-element solver, Algorithm 3.1 of Hintermüller & Korolev.

:class:`HybridSolver` wires the pieces together and keeps the API of the examples: it builds
the coarse mesh, the :class:`~dolfinx_pinn.coarse.CoarseProblem`, the collocation points, the
compression operator and a :class:`~dolfinx_pinn.objectives.HybridObjective` (or, with
``full_tensor=True``, a :class:`~dolfinx_pinn.objectives.FullTensorHybridObjective`), and its
:meth:`~HybridSolver.train` runs a :class:`~dolfinx_pinn.training.TrainingLoop` with an
optimizer of :mod:`dolfinx_pinn.optim` and the callbacks of :mod:`dolfinx_pinn.callbacks`.

The objective is the reduced (3.3), ``Ĵ(θ) = J^M(v_θ) + τ2 R(y_h(θ), v_θ)``: J^M the PINN loss
(3.24), K̃[v_θ] the upscaled coefficient (4.10), y_h(θ) the coarse P1 solution of (4.18) for K̃
(a distributed PETSc solve) and R the coupling (3.25) between the compression Q̄v (3.26) and
y_h (or Q̄y_h, (2.16)). One ``backward()`` gives the whole gradient, the adjoint solve (3.18)
included.

Optimizers: ``"adam"`` (the paper's: β = (0.9, 0.999), lr decay, gradient-norm loss balancing),
``"lbfgs"``, ``"gauss_newton"`` (Levenberg-Marquardt on the stacked rows ``[PINN; √τ2 ·
coupling]``) and ``"projection"`` (the output layer by exact least squares, hidden layers
fixed). The τ2 schedule is ``"constant"`` (the paper) or ``"continuation"`` (τ2 → 0, which
removes the upscaling-consistency bias of Theorem 3.2 at the end). The coarse problem uses K̃
clipped to the bounds [α, β] of K^ε.

MPI (see :mod:`dolfinx_pinn.coupling`): the network is replicated with the same initial weights;
each rank evaluates the PINN rows on the collocation points of its owned coarse cells (the
point set does not depend on the number of ranks) and the compression rows of its owned coarse
nodes; every loss term is a global sum. The history on 1 and 2 ranks agrees to round-off.

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
from typing import Any

from mpi4py import MPI

import dolfinx
import numpy as np
import torch
from torch import nn

from dolfinx_pinn.boundary_value import BoundaryValueObjective, coarse_coefficient
from dolfinx_pinn.coarse import CoarseProblem, CollocationPoints
from dolfinx_pinn.coupling import CompressionOperator, allreduce_gradients
from dolfinx_pinn.devices import select_device
from dolfinx_pinn.geometry import MeshDomain
from dolfinx_pinn.history import History
from dolfinx_pinn.objectives import FullTensorHybridObjective, HybridObjective
from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import resolve_method
from dolfinx_pinn.trainers import build_training_loop

__all__ = ["DEFAULT_COARSE_H", "HybridSolver", "rank_device"]

#: Default coarse mesh sizes h per dimension (the paper: 0.004 in 1D, about 0.04 in 2D).
DEFAULT_COARSE_H = {1: 0.004, 2: 0.04, 3: 0.1}


def rank_device(device: str | torch.device, comm: MPI.Comm) -> torch.device:
    """The torch device of this rank: ``"cuda"`` means GPU ``rank mod n_gpus``."""
    return select_device(device, comm)


def _check_network(
    network: nn.Module, problem: MultiscaleProblem, device: torch.device, full_tensor: bool
) -> torch.dtype:
    """The network's dtype, after checking it is float64 with the right number of outputs."""
    dtype = next(network.parameters()).dtype
    if dtype != torch.float64:
        raise ValueError(f"network: float64 parameters are needed, got {dtype}")
    lower, upper = np.asarray(problem.domain.lower), np.asarray(problem.domain.upper)
    centre = torch.as_tensor(0.5 * (lower + upper), dtype=torch.float64, device=device)
    with torch.no_grad():
        out = network(centre[None, : problem.dim])
    outputs = 1 if out.ndim == 1 else int(out.reshape(1, -1).shape[1])
    expected = problem.dim if full_tensor else 1
    if outputs != expected:
        raise ValueError(
            f"network: {outputs} output(s), but full_tensor={full_tensor} needs "
            f"{expected} (one per lifting direction e_i with full_tensor=True)"
        )
    return dtype


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_arguments(
    problem: MultiscaleProblem,
    network: nn.Module,
    n_interior: Any,
    n_boundary: Any,
    tau1: Any,
    tau2: Any,
    seed: Any,
    method: str,
) -> None:
    _check("n_interior", n_interior, _is_int(n_interior) and n_interior >= 1, "an integer >= 1")
    if n_boundary is not None:
        ok = _is_int(n_boundary) and n_boundary >= 1
        _check("n_boundary", n_boundary, ok, "an integer >= 1")
    ok = _is_number(tau1) and math.isfinite(tau1) and tau1 > 0
    _check("tau1", tau1, ok, "a finite number > 0")
    ok = _is_number(tau2) and math.isfinite(tau2) and tau2 >= 0
    _check("tau2", tau2, ok, "a finite number >= 0")
    _check("seed", seed, _is_int(seed) and seed >= 0, "an integer >= 0")
    if getattr(network, "dim", problem.dim) != problem.dim:
        raise ValueError(f"network: dimension {network.dim} != problem dimension {problem.dim}")
    resolve_method(network, method)


def _coarse_mesh(problem: MultiscaleProblem, comm: MPI.Comm, coarse_h: Any) -> dolfinx.mesh.Mesh:
    """The uniform coarse mesh of size ``coarse_h`` (default :data:`DEFAULT_COARSE_H`).

    On a mesh domain: the domain's own mesh, refined until its cells are at most ``coarse_h``
    when that is given.
    """
    if isinstance(problem.domain, MeshDomain):
        if coarse_h is None:
            return problem.domain.mesh
        ok = _is_number(coarse_h) and math.isfinite(coarse_h) and coarse_h > 0
        _check("coarse_h", coarse_h, ok, "a finite number > 0")
        return problem.domain.refined_mesh(float(coarse_h))
    h = DEFAULT_COARSE_H.get(problem.dim, 0.1) if coarse_h is None else coarse_h
    ok = _is_number(h) and math.isfinite(h) and h > 0
    _check("coarse_h", coarse_h, ok, "a finite number > 0")
    cells = [max(2, round(length / h)) for length in problem.domain.lengths]
    return problem.create_mesh(comm, cells)


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
        delta: The compression diameter δ > 0 (default
            :func:`~dolfinx_pinn.coupling.default_delta`: whole periods, at least h; the paper
            takes ε).
        compress_state: Use the coupling (2.16) (``R = Σ w (Q̄v - Q̄y_h)²``) instead of (2.10).
        estimator: ``"mean"`` (3.26) or ``"linear"`` (see :class:`CompressionOperator`).
        lazy: The lazy coarse update (see :class:`~dolfinx_pinn.objectives.CoarseState`).
        method: Derivative method of the PDE residual (see :mod:`dolfinx_pinn.residual`).
        device: ``"cpu"``, ``"cuda"`` (GPU ``rank mod n_gpus``), ``"auto"`` or a torch device.
        seed: Seed of the collocation points and of torch's generator.
        sampling: The interior collocation points: ``"stratified"`` (uniform random per coarse
            cell) or ``"sobol"`` (see :class:`~dolfinx_pinn.coarse.CollocationPoints`).
        reference: A reference for the errors: an object with ``value``/``gradient`` (such as
            :func:`dolfinx_pinn.reference.exact_1d`), a pair of callables, or a dolfinx
            Function (see :func:`dolfinx_pinn.errors.reference_errors`).
        petsc_options: Options of the coarse KSPs (default MUMPS LU; see
            :mod:`dolfinx_pinn.ksp` for the precedence).
        full_tensor: Algorithm 4.1: the network has d outputs (output i lifted in direction
            e_i) and gives the whole K̃ (a d×d tensor). Adam only; the derivative ``method``
            must not be ``"jet"`` (the jets are scalar).

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
        _check_arguments(problem, network, n_interior, n_boundary, tau1, tau2, seed, method)
        self.full_tensor = bool(full_tensor)
        if self.full_tensor and method == "jet":
            raise ValueError(
                "method: 'jet' needs a scalar network; full_tensor=True needs "
                "'auto', 'autograd' or 'func'"
            )
        self.problem = problem
        self.comm = comm
        self.device = rank_device(device, comm)
        self.seed = int(seed)
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.lazy = bool(lazy)
        self.compress_state = bool(compress_state)
        torch.manual_seed(self.seed)
        self.network = network.to(self.device)
        self.dtype = _check_network(network, problem, self.device, self.full_tensor)

        self.mesh = (
            coarse_mesh if coarse_mesh is not None else _coarse_mesh(problem, comm, coarse_h)
        )
        general = problem.boundary is not None
        if general and self.full_tensor:
            raise ValueError("full_tensor: upscales the lifted problem (4.8), not boundary data")
        # Boundary data: the coarse tensor is fixed (see dolfinx_pinn.boundary_value).
        fixed = coarse_coefficient(problem, comm) if general else None
        self.coarse = CoarseProblem(
            problem,
            self.mesh,
            parametrization="tensor" if self.full_tensor else "entry",
            fixed_tensor=fixed,
            petsc_options=petsc_options,
        )
        hard = bool(getattr(network, "satisfies_boundary_condition", False))
        # Neumann facets (insulated ones too) need boundary points whatever the network.
        rows = not hard or (general and problem.boundary.dirichlet_tags is not None)  # type: ignore[union-attr]
        if rows and problem.dim > 1 and n_boundary is None:
            n_boundary = max(4, n_interior // 10)
        self.points = CollocationPoints(
            self.mesh,
            count=int(n_interior),
            boundary_count=None if (not rows or problem.dim == 1) else int(n_boundary),
            seed=self.seed,
            sampling=sampling,
            # A mesh domain's coarse mesh may be a refinement or a submesh: seed its cells by
            # their coordinates, so that the points do not depend on the partition.
            cell_keys="geometry" if isinstance(problem.domain, MeshDomain) else "auto",
        )
        self.compression = CompressionOperator(
            self.coarse, self.points, delta=delta, estimator=estimator
        )
        kind = FullTensorHybridObjective if self.full_tensor else HybridObjective
        kind = BoundaryValueObjective if general else kind
        self.objective = kind(
            problem,
            self.network,
            self.coarse,
            self.points,
            self.compression,
            tau1=self.tau1,
            tau2=self.tau2,
            compress_state=self.compress_state,
            lazy=self.lazy,
            method=method,
            reference=reference,
            device=self.device,
        )
        self.reference = reference
        self.history: History = History(self.objective.term_names)
        self.last_checkpoint: Any = None
        self._destroyed = False

    # -- the pieces, by their former names -------------------------------------------------------
    @property
    def solution(self) -> nn.Module:
        """The scalar network of the problem's lifting direction (errors, predictions)."""
        return self.objective.solution

    @property
    def interior_points(self) -> torch.Tensor:
        """This rank's interior collocation points."""
        return self.objective.interior_points

    @property
    def pde_block(self) -> Any:
        """The PDE rows."""
        return self.objective.pde_block

    @property
    def compression_points(self) -> torch.Tensor:
        """This rank's points of the compression operator."""
        return self.objective.compression_points

    @property
    def coupling_weight(self) -> float:
        """The uniform nodal weight w of (3.25)."""
        return self.objective.coupling.weight

    @property
    def refreshes(self) -> int:
        """The number of lazy refreshes so far."""
        return self.objective.coarse_state.refreshes

    @property
    def coarse_time(self) -> float:
        """Wall time spent in the coarse PETSc solves so far (this rank)."""
        return self.coarse.solve_time

    @property
    def errors(self) -> Any:
        """``errors() -> (l2, h1)`` against the reference, or None without one."""
        return self.objective.errors if self.objective.has_reference else None

    @property
    def _linearization(self) -> Any:
        return self.objective.coarse_state.linearization

    @_linearization.setter
    def _linearization(self, value: Any) -> None:
        self.objective.coarse_state.linearization = value

    # -- the objective -------------------------------------------------------------------------
    def relative_errors(self) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors of the network against the reference."""
        return self.objective.errors()

    def upscaled_coefficient(self) -> torch.Tensor:
        """K̃[v_θ] of (4.10) (with ``full_tensor`` the d×d ``F T⁻¹``), collective."""
        return self.objective.upscaled_coefficient()

    def admissible_coefficient(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """K̃ clipped to [α, β] (see :meth:`HybridObjective.admissible_coefficient`)."""
        return self.objective.admissible_coefficient(K_tilde)

    def state(self, K_tilde: torch.Tensor) -> torch.Tensor:
        """y_h at the owned coarse dofs, exact or linearised (lazy); K̃ is clipped first."""
        return self.objective.state(K_tilde)

    def refresh(self, K_tilde: torch.Tensor) -> None:
        """Solve the state and its sensitivity at K̃ (the lazy update's anchor; collective)."""
        self.objective.coarse_state.refresh(self.admissible_coefficient(K_tilde.detach()))

    def losses(self, tau2: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The terms of Ĵ (replicated, differentiable), K̃ and the unweighted R (collective)."""
        self.objective.tau2 = tau2
        terms = self.objective.losses()
        return terms, self.objective.last["K_tilde"], self.objective.last["R"]

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

    # -- training ------------------------------------------------------------------------------
    def train(self, optimizer: str | Any = "adam", steps: int = 1000, **options: Any) -> History:
        """Run Algorithm 3.1 for ``steps`` iterations in total (collective); returns the history.

        Args:
            optimizer: ``"adam"``, ``"lbfgs"``, ``"gauss_newton"`` (alias ``"gn"``),
                ``"projection"`` (the output layer by least squares, the hidden layers fixed;
                needs ``lazy=True``) or an optimizer object of :mod:`dolfinx_pinn.optim`.
            steps: The total number of iterations (including those of a resumed run), >= 0.
            **options: Validated by :mod:`dolfinx_pinn.options`, whose dataclasses hold the
                defaults: Adam's ``lr``, ``decay_rate``, ``decay_steps``, ``balancing``,
                ``balance_every``, ``balance_alpha``; Gauss-Newton's ``damping``, ``form``,
                ``variable_projection`` (default: with the lazy state) and the projection's
                ``form`` (:class:`~dolfinx_pinn.options.OptimizerOptions`; further arguments of
                the optimizer class such as ``ridge``, ``rcond``, ``max_rejections``,
                ``memory_limit`` pass through); the τ2 schedule ``tau2_schedule``,
                ``tau2_decay``, ``tau2_decay_steps``, ``tau2_min``
                (:class:`~dolfinx_pinn.options.LossOptions`); the lazy update ``lazy_every``,
                ``lazy_tol`` (:class:`~dolfinx_pinn.options.CoarseOptions`); ``eval_every``,
                ``target_l2``, ``checkpoint_every``, ``progress``
                (:class:`~dolfinx_pinn.options.RunOptions`) and ``time_limit``; ``checkpoint_dir``
                (the folder, one file per rank), ``resume`` (True for ``checkpoint_dir``, or a
                folder) and ``callback`` (``callback(step, record)`` after each step).

        Returns:
            The :class:`~dolfinx_pinn.history.History`: per step ``step``, ``loss``, ``pde``,
            ``boundary``, ``coupling`` (= τ2 R), ``R``, ``K_tilde`` (K̃_ii, i the lifting
            direction), ``K_tilde_tensor`` (with ``full_tensor``), ``tau2``, ``lr`` (Adam) or
            ``damping`` (Gauss-Newton), ``weight_<term>`` (Adam), ``time``, ``time_network``,
            ``time_coarse``, ``time_other``, ``refreshes``; per evaluation ``eval_step``,
            ``eval_time``, ``l2``, ``h1``.

        Raises:
            ValueError: naming an option out of range, or a checkpoint that does not fit.
            NotImplementedError: for a least-squares optimizer with ``full_tensor``.
            RuntimeError: when a loss term becomes NaN/inf or the run diverges (the message
                names the last good checkpoint).
            KeyboardInterrupt: on SIGINT/SIGTERM, after a checkpoint (with ``checkpoint_dir``).
        """
        self._check_alive()
        loop = build_training_loop(
            self.objective,
            optimizer,
            steps,
            options,
            description=f"hybrid {optimizer if isinstance(optimizer, str) else 'optimizer'}",
            tau2=self.tau2,
        )
        self.history = loop.history
        try:
            return loop.run(steps)
        finally:
            self.last_checkpoint = loop.last_checkpoint

    # -- results -------------------------------------------------------------------------------
    def predict(self, points: np.ndarray) -> np.ndarray:
        """The network's values at numpy points ``(N, d)`` (local, no communication)."""
        return self.objective.predict(points)

    def coarse_state(self) -> dolfinx.fem.Function:
        """The exact coarse solution y_h for the current K̃[v_θ] as a P1 Function (collective).

        Keep the Function in a variable while using its PETSc vector: in
        ``solver.coarse_state().x.petsc_vec`` the Function is a temporary, and the vector would
        outlive the memory it wraps (a segmentation fault).
        """
        self._check_alive()
        K = self.admissible_coefficient(self.upscaled_coefficient().detach())
        state = self.coarse.solve_state(K.cpu().numpy().reshape(self.coarse.parameter_shape))
        function = self.coarse.function(state)
        function.name = "y_h"
        return function

    def compression_function(self) -> dolfinx.fem.Function:
        """Q̄v at the coarse nodes as a P1 Function (collective)."""
        with torch.no_grad():
            values = self.objective.compressed_values()
        function = self.coarse.function(values)
        function.name = "Qv"
        return function

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this HybridSolver has been destroyed; create a new one")

    def destroy(self) -> None:
        """Destroy the PETSc objects (collective); the solver is unusable afterwards."""
        if self._destroyed:
            return
        self._destroyed = True
        self.compression.destroy()
        self.coarse.destroy()

    def __enter__(self) -> HybridSolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
