"""One call: ``dolfinx_pinn.solve(problem)`` picks the whole configuration and returns a Solution.

:func:`configure` reads the problem (dimension, domain, ε, period, coefficient) and chooses the
network, the collocation points, the coarse mesh, the compression diameter δ, the τ2 schedule
and the optimizer; :func:`solve` builds a :class:`~dolfinx_pinn.solver.HybridSolver` with them,
trains it, computes the a posteriori indicators of :mod:`dolfinx_pinn.diagnostics` and returns
a :class:`Solution`. Every choice can be overridden by name (``solve(problem, n_interior=...)``)
and is recorded in ``Solution.metrics["configuration"]``.

Nothing in the configuration grows with 1/ε: the point count and the network size follow the
coefficient's structure and the domain, δ is a whole number of periods of at least the coarse
mesh size (:func:`dolfinx_pinn.coupling.default_delta`), and the optimizer takes a fixed number
of output-layer least-squares steps.

MPI: collective on ``comm``; the network is replicated, so :meth:`Solution.value` and
:meth:`Solution.gradient` are local and give the same values on every rank.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mpi4py import MPI

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.diagnostics import Verdict, indicators, verdict
from dolfinx_pinn.problems import MultiscaleProblem

__all__ = ["ConvergenceWarning", "Solution", "SolveConfiguration", "configure", "solve"]


class ConvergenceWarning(RuntimeWarning):
    """A solve whose a posteriori indicators are above their thresholds."""


@dataclass(frozen=True)
class SolveConfiguration:
    """What :func:`solve` uses; every field can be overridden by name.

    Attributes:
        network: ``network(problem) -> nn.Module`` (float64, the boundary condition built in).
        network_name: A label of the network for the metrics.
        n_interior: Interior collocation points (global).
        sampling: ``"sobol"`` or ``"stratified"``.
        coarse_h: The coarse mesh size.
        delta: The compression diameter (None: whole periods of at least ``coarse_h``).
        optimizer: The optimizer of :meth:`~dolfinx_pinn.solver.HybridSolver.train`.
        steps: Its number of steps.
        tau2: The initial coupling weight.
        tau2_schedule: ``"continuation"`` (τ2 → 0) or ``"constant"``.
        tau2_decay: The continuation factor per step.
        form: The least-squares form (``"auto"``: QR in 1D, ``"normal"`` in 2D/3D).
        seed: The seed of the points and the network.
        thresholds: Overrides of the verdict's thresholds.
    """

    network: Callable[[MultiscaleProblem], nn.Module]
    network_name: str
    n_interior: int
    sampling: str = "sobol"
    coarse_h: float | None = None
    delta: float | None = None
    optimizer: str = "projection"
    steps: int = 3
    tau2: float = 1.0
    tau2_schedule: str = "continuation"
    tau2_decay: float = 1e-5
    form: str = "auto"
    seed: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The settings, the network by its label."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values["network"] = values.pop("network_name")
        return values


def _two_scale_network(problem: MultiscaleProblem, **settings: Any) -> nn.Module:
    from dolfinx_pinn.networks import TransfiniteBoundaryNet, TwoScaleNet

    return TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, **settings), problem)


def configure(problem: MultiscaleProblem, **overrides: Any) -> SolveConfiguration:
    """The configuration :func:`solve` picks for a problem (see the module doc).

    Args:
        problem: The problem.
        **overrides: Fields of :class:`SolveConfiguration` to set.

    Raises:
        ValueError: naming an unknown override, or a problem the automatic choice cannot serve
            (no period vector, or a domain that is not a box).
    """
    known = {item.name for item in fields(SolveConfiguration)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"solve: unknown settings {unknown}; allowed: {sorted(known)}")
    if problem.period is None and "network" not in overrides:
        raise ValueError(
            "solve: the automatic network needs a periodic coefficient (problem.period); give "
            "network=... for a non-periodic one"
        )
    seed = int(overrides.get("seed", 0))
    if problem.dim == 1:
        settings = {"k_max": 14, "width": 16, "seed": seed}
        base = SolveConfiguration(
            network=lambda p: _two_scale_network(p, **settings),
            network_name=f"TwoScaleNet{settings}",
            n_interior=5000,
            form="qr",
        )
    else:
        settings = {"k_max": 7, "width": 64, "wavevector_norm": "l1", "seed": seed}
        base = SolveConfiguration(
            network=lambda p: _two_scale_network(p, **settings),
            network_name=f"TwoScaleNet{settings}",
            n_interior=20_000,
            form="normal",
        )
    return replace(base, **overrides)


class Solution:
    """The result of :func:`solve`: the network, its values, the metrics and the outputs.

    Attributes:
        problem: The problem.
        network: The solution network (points ``(N, d)`` → ``(N,)``, float64, replicated).
        metrics: ``rel_l2``/``rel_h1`` (with a reference), ``K_tilde``, ``wall_time_s``,
            ``indicators``, ``converged``, ``thresholds``, ``configuration``, ...
        verdict: The :class:`~dolfinx_pinn.diagnostics.Verdict`.
        history: The training history.
    """

    def __init__(self, solver: Any, metrics: dict[str, Any], result: Verdict) -> None:
        self.problem: MultiscaleProblem = solver.problem
        self.network: nn.Module = solver.solution
        self.comm: MPI.Comm = solver.comm
        self.history = solver.history
        self.reference = solver.reference
        self.device = solver.device
        self.full_tensor = False
        self.metrics = metrics
        self.verdict = result
        self._errors = solver.errors
        # The coarse fields are kept as Functions so that the PETSc solvers can be freed now.
        self._coarse_state = solver.coarse_state()
        self._compression = solver.compression_function()

    def _tensor(self, points: Any) -> torch.Tensor:
        parameter = next(self.network.parameters())
        x = np.asarray(points, dtype=np.float64).reshape(-1, self.problem.dim)
        return torch.as_tensor(x, dtype=parameter.dtype, device=parameter.device)

    def value(self, points: Any) -> np.ndarray:
        """The solution u at points ``(N, d)``, shape ``(N,)`` (local; the same on every rank)."""
        with torch.no_grad():
            return self.network(self._tensor(points)).reshape(-1).cpu().numpy()

    def gradient(self, points: Any) -> np.ndarray:
        """∇u at points ``(N, d)``, shape ``(N, d)`` (local)."""
        x = self._tensor(points).requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(self.network(x).sum(), x)
        return gradient.detach().cpu().numpy()

    # -- the interface of dolfinx_pinn.io ---------------------------------------------------------
    predict = value

    @property
    def errors(self) -> Any:
        """``errors() -> (l2, h1)`` against the reference given to :func:`solve`, or None."""
        return self._errors

    def relative_errors(self) -> tuple[float, float]:
        """Relative L² and H¹ errors against the reference (collective)."""
        if self._errors is None:
            raise ValueError("reference: solve() was called without a reference")
        return self._errors()

    def coarse_state(self) -> Any:
        """The coarse state y_h for the final K̃ (a P1 Function)."""
        return self._coarse_state

    def compression_function(self) -> Any:
        """Q̄v at the coarse nodes (a P1 Function)."""
        return self._compression

    def write(self, folder: str | Path, *, figures: bool = True) -> dict[str, Any]:
        """Write what ``dolfinx-pinn run`` writes into ``folder`` (collective); the metrics."""
        from dolfinx_pinn.io import write_outputs

        return write_outputs(self, folder, extra_metrics=self.metrics, figures=figures)


def solve(
    problem: MultiscaleProblem,
    *,
    comm: MPI.Comm = MPI.COMM_WORLD,
    device: str | torch.device = "auto",
    tol: float | None = None,
    time_limit: float | None = None,
    reference: Any = None,
    progress: bool = False,
    **overrides: Any,
) -> Solution:
    """Solve a multiscale problem with the configuration :func:`configure` picks (collective).

    Args:
        problem: The problem (4.8).
        comm: The communicator.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a torch device.
        tol: Stop once the relative L² error against ``reference`` is at most this.
        time_limit: Stop the training after this many seconds.
        reference: A reference for ``rel_l2``/``rel_h1`` (see
            :func:`dolfinx_pinn.errors.reference_errors`), e.g. :func:`~dolfinx_pinn.exact_1d`.
        progress: Progress on rank 0.
        **overrides: Fields of :class:`SolveConfiguration`.

    Returns:
        The :class:`Solution`; ``metrics["converged"]`` is the verdict of the indicators, and a
        :class:`ConvergenceWarning` is issued on rank 0 when it is False.

    Raises:
        ValueError: naming a setting out of range.
    """
    from dolfinx_pinn.solver import HybridSolver

    if tol is not None and reference is None:
        raise ValueError("tol: needs a reference to measure the error against")
    started = time.perf_counter()
    configuration = configure(problem, **overrides)
    torch.manual_seed(configuration.seed)
    network = configuration.network(problem)
    with HybridSolver(
        problem,
        network,
        comm=comm,
        coarse_h=configuration.coarse_h,
        n_interior=configuration.n_interior,
        tau2=configuration.tau2,
        delta=configuration.delta,
        device=device,
        seed=configuration.seed,
        sampling=configuration.sampling,
        reference=reference,
    ) as solver:
        options: dict[str, Any] = {
            "tau2_schedule": configuration.tau2_schedule,
            "tau2_decay": configuration.tau2_decay,
            "progress": progress,
            "time_limit": time_limit,
            "target_l2": tol,
        }
        if configuration.optimizer in ("projection", "gauss_newton"):
            options["form"] = configuration.form
        solver.train(configuration.optimizer, configuration.steps, **options)
        metrics, result = _metrics(solver, configuration, started)
        solution = Solution(solver, metrics, result)
    if not result.converged and comm.rank == 0:
        warnings.warn(f"dolfinx_pinn.solve: {result.message()}", ConvergenceWarning, stacklevel=2)
    return solution


def _metrics(
    solver: Any, configuration: SolveConfiguration, started: float
) -> tuple[dict[str, Any], Verdict]:
    """The metrics and the verdict of a trained solver (collective)."""
    objective = solver.objective
    K = float(solver.admissible_coefficient(solver.upscaled_coefficient().detach()))
    with torch.no_grad():
        compressed = objective.compressed_values().cpu().numpy()
    state = solver.coarse.solve_state(np.asarray(K))
    values = indicators(
        solver.solution,
        solver.problem,
        comm=solver.comm,
        K_tilde=float(solver.upscaled_coefficient().detach()),
        compressed=compressed,
        coarse_state=state,
    )
    result = verdict(values, configuration.thresholds)
    metrics: dict[str, Any] = {
        "K_tilde": K,
        "wall_time_s": time.perf_counter() - started,
        "iterations": solver.history.num_steps,
        **result.as_dict(),
        "configuration": configuration.as_dict(),
    }
    if solver.errors is not None:
        metrics["rel_l2"], metrics["rel_h1"] = solver.relative_errors()
    for name, value in metrics["indicators"].items():
        if not math.isfinite(value):
            metrics["indicators"][name] = None
    return metrics, result
