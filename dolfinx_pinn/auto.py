"""One call: ``dolfinx_pinn.solve(problem)`` picks the whole configuration and returns a Solution.

:func:`configure` reads the problem (dimension, domain, ε, period, coefficient) and chooses the
method and its settings:

* ``method="basis"`` (periodic coefficient on a box, the lifted problem (4.8)): the structured
  two-scale ansatz of :class:`~dolfinx_pinn.basis.TwoScaleBasis` (slow Legendre coefficients
  times the Fourier-Galerkin cell correctors, with boundary-layer correctors at the faces),
  whose output layer is the exact least-squares minimiser of the collocation loss (3.24)
  (:func:`~dolfinx_pinn.least_squares.solve_output_layer`: analytic rows in chunks, QR in 1D,
  normal equations in 2D/3D). This is the τ2 → 0 limit of the hybrid continuation, reached in
  one linear solve; K̃ is then (4.10) of that network and the coarse problem is solved with it.
  On a 2D box the solution near each corner, where the face layers meet, is then a local fine
  finite-element solve of a few periods (:mod:`~dolfinx_pinn.corners`, ``corner_patches``).
  Also on a 2D mesh domain (periodic coefficient, any boundary data): no face layers, the
  holes' functions (:class:`~dolfinx_pinn.basis.HoleFunctions`) beside the Legendre ones, soft
  Dirichlet rows ``v = g`` and Neumann rows ``(K ∇v)·n = h``.
* ``method="hybrid"`` (any other problem: no period vector, a 2D box with boundary data, a 3D
  mesh domain; or ``network=``): a
  :class:`~dolfinx_pinn.solver.HybridSolver` with a two-scale network trained by output-layer
  projection and τ2 continuation.

Every choice can be overridden by name (``solve(problem, point_factor=...)``) and is recorded in
``Solution.metrics["configuration"]``.

Nothing in the configuration grows with 1/ε: the basis size follows the coefficient's corrector
spectrum and the source's length scale, the points are a fixed multiple of the unknowns (the
residual of a two-scale ansatz is smooth in x and periodic in y = x/ε, and the points
``(x, x/ε mod p)`` equidistribute at any ε), δ is a whole number of periods of at least the
coarse mesh size (:func:`dolfinx_pinn.coupling.default_delta`), and the optimizer takes a fixed
number of steps.

MPI: collective on ``comm``; the points are split over the ranks, the least-squares products are
summed (normal equations) or their triangular factors gathered (QR), so the network is the same
on every rank and :meth:`Solution.value` and :meth:`Solution.gradient` are local.
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
        method: ``"basis"`` (the two-scale basis solved by least squares) or ``"hybrid"`` (a
            network trained by the hybrid solver); see the module doc.
        network: ``network(problem) -> nn.Module`` (float64).
        network_name: A label of the network for the metrics.
        n_interior: Interior collocation points (global); ``None`` with ``"basis"``:
            ``point_factor`` times the unknowns.
        n_boundary: Boundary points (global, 2D/3D); ``None`` with ``"basis"``:
            ``boundary_factor`` times the unknowns, else the hybrid solver's default.
        point_factor: Interior points per unknown of the basis.
        boundary_factor: Boundary points per unknown of the basis.
        layer_point_factor: Extra interior points per boundary-layer unknown of the basis,
            drawn in slabs along the faces as wide as the layers' decay
            (:class:`~dolfinx_pinn.stratified.StratifiedPoints`, weighted so that the loss
            is the same); 0 for uniform points only.
        corner_point_factor: Extra points in the corner boxes, per boundary-layer unknown.
        corner_patches: The side of the corner patches of a 2D box (``"basis"``), in longest
            periods ``ε max p_j`` (:class:`~dolfinx_pinn.corners.CornerPatches`: local fine
            solves where the face layers meet); 0 for none.
        boundary_band: The width of the boundary band of a 2D mesh domain (``"basis"``), in
            longest periods (:class:`~dolfinx_pinn.bands.BoundaryBand`: fine elements along
            ∂Ω coupled to the basis in the interior); 0 for none.
        basis: Settings of :class:`~dolfinx_pinn.basis.BasisConfig` (``degrees``, ``order``,
            ``boundary_layers``, ...) over those :func:`~dolfinx_pinn.basis.choose_config`
            takes from the problem.
        sampling: ``"sobol"`` or ``"stratified"``.
        coarse_h: The coarse mesh size.
        delta: The compression diameter (None: whole periods of at least ``coarse_h``).
        optimizer: The optimizer of :meth:`~dolfinx_pinn.solver.HybridSolver.train` (hybrid).
        steps: Its number of steps (hybrid).
        tau2: The initial coupling weight (hybrid).
        tau2_schedule: ``"continuation"`` (τ2 → 0) or ``"constant"`` (hybrid).
        tau2_decay: The continuation factor per step (hybrid).
        form: The least-squares form (``"auto"``: QR in 1D, ``"normal"`` in 2D/3D).
        rows: The basis's PDE rows (``"auto"``: the flux form in 1D, which keeps its digits at
            any ε, the strong form in 2D/3D; see :mod:`~dolfinx_pinn.least_squares`).
        ridge: The relative ridge of the basis's least squares (``None``: the default of
            :func:`~dolfinx_pinn.least_squares.solve_output_layer` for the form).
        seed: The seed of the points and the network.
        thresholds: Overrides of the verdict's thresholds.
    """

    network: Callable[[MultiscaleProblem], nn.Module] | None
    network_name: str
    method: str = "hybrid"
    n_interior: int | None = None
    n_boundary: int | None = None
    point_factor: float = 3.0
    boundary_factor: float = 1.0
    layer_point_factor: float = 3.0
    corner_point_factor: float = 1.0
    corner_patches: float = 4.0
    boundary_band: float = 1.5
    basis: dict[str, Any] = field(default_factory=dict)
    sampling: str = "sobol"
    coarse_h: float | None = None
    delta: float | None = None
    optimizer: str = "projection"
    steps: int = 3
    tau2: float = 1.0
    tau2_schedule: str = "continuation"
    tau2_decay: float = 1e-5
    form: str = "auto"
    rows: str = "auto"
    ridge: float | None = None
    seed: int = 0
    thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.form not in ("auto", "normal", "qr"):
            raise ValueError(f"form must be 'auto', 'normal' or 'qr', got {self.form!r}")
        if self.rows not in ("auto", "strong", "flux"):
            raise ValueError(f"rows must be 'auto', 'strong' or 'flux', got {self.rows!r}")
        for name in ("point_factor", "boundary_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in (
            "layer_point_factor",
            "corner_point_factor",
            "corner_patches",
            "boundary_band",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (self.point_factor >= 1.0):
            raise ValueError(
                f"point_factor must be >= 1 (fewer points than unknowns leave the least "
                f"squares underdetermined), got {self.point_factor}"
            )
        for name in ("n_interior", "n_boundary"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.basis, dict):
            raise ValueError(f"basis must be a dict of BasisConfig settings, got {self.basis!r}")
        if self.method == "hybrid" and self.network is None:
            raise ValueError("network: the hybrid method needs a network")

    def as_dict(self) -> dict[str, Any]:
        """The settings, the network by its label."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values["network"] = values.pop("network_name")
        values["basis"] = dict(self.basis)
        return values


METHODS = ("basis", "hybrid")


def _two_scale_network(problem: MultiscaleProblem, **settings: Any) -> nn.Module:
    """A TwoScaleNet with the hard boundary condition that suits the domain and the data."""
    from dolfinx_pinn.boundary_value import hard_boundary_network
    from dolfinx_pinn.networks import TwoScaleNet

    return hard_boundary_network(TwoScaleNet.for_problem(problem, **settings), problem)


def _basis_applies(problem: MultiscaleProblem) -> str | None:
    """Why the basis method cannot serve ``problem``, or None when it can."""
    from dolfinx_pinn.geometry import MeshDomain
    from dolfinx_pinn.problems import Box

    if problem.period is None:
        return "the coefficient has no period vector"
    if isinstance(problem.domain, MeshDomain):
        # 2D: Legendre slow functions on the bounding box, the holes' log and multipole
        # functions (a polynomial basis cannot hold them on a multiply connected domain), soft
        # Dirichlet and Neumann rows. 1D needs no mesh; in 3D a cavity would need the 3D
        # multipoles (1/r, ...), so 3D mesh domains stay with the hybrid method.
        if problem.dim != 2:
            return f"the mesh domain is {problem.dim}D (the basis serves 2D mesh domains)"
        return None
    if not isinstance(problem.domain, Box):
        return "the domain is neither a box nor a mesh domain"
    if getattr(problem, "boundary", None) is not None:
        return "the box has boundary data (the box's basis solves the lifted (4.8))"
    return None


def configure(problem: MultiscaleProblem, **overrides: Any) -> SolveConfiguration:
    """The configuration :func:`solve` picks for a problem (see the module doc).

    Args:
        problem: The problem.
        **overrides: Fields of :class:`SolveConfiguration` to set.

    Raises:
        ValueError: naming an unknown override or a value out of range, or a problem the
            automatic choice cannot serve (no period vector and no ``network``).
    """
    known = {item.name for item in fields(SolveConfiguration)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"solve: unknown settings {unknown}; allowed: {sorted(known)}")
    seed = int(overrides.get("seed", 0))
    why_not = _basis_applies(problem)
    method = overrides.get("method", "hybrid" if why_not or "network" in overrides else "basis")
    if method == "basis":
        if why_not is not None:
            raise ValueError(f"method: 'basis' cannot serve this problem: {why_not}")
        if "network" in overrides:
            raise ValueError("network: give it with method='hybrid' (the basis is built)")
        base = SolveConfiguration(
            network=None,
            network_name="TwoScaleBasis",
            method="basis",
            form="qr" if problem.dim == 1 else "normal",
        )
        return replace(base, **overrides)
    if problem.period is None and "network" not in overrides:
        raise ValueError(
            "solve: the automatic network needs a periodic coefficient (problem.period); give "
            "network=... for a non-periodic one"
        )
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
    if "network" in overrides and "network_name" not in overrides:
        overrides = {**overrides, "network_name": "user network"}
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
        """The solution u at points ``(N, d)``, shape ``(N,)`` (local; the same on every rank).

        Evaluated in chunks of :attr:`chunk_size` points, so memory stays bounded for any N.
        """
        return self._evaluate(points, gradient=False)[0]

    def gradient(self, points: Any) -> np.ndarray:
        """∇u at points ``(N, d)``, shape ``(N, d)`` (local, in chunks)."""
        return self._evaluate(points, value=False)[1]

    def value_and_gradient(self, points: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(u (N,), ∇u (N, d))`` at points ``(N, d)`` in one pass (local, in chunks).

        Both come from the same jet, so this costs about what :meth:`value` or
        :meth:`gradient` alone does: the call for error norms and post-processing.
        """
        value, gradient = self._evaluate(points)
        return value, gradient

    chunk_size = 4096

    def _evaluate(
        self, points: Any, value: bool = True, gradient: bool = True
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        x = self._tensor(points)
        analytic = getattr(self.network, "value_and_gradient", None)
        values: list[np.ndarray] = []
        gradients: list[np.ndarray] = []
        for start in range(0, len(x), self.chunk_size):
            chunk = x[start : start + self.chunk_size]
            if analytic is not None:
                with torch.no_grad():
                    v, g = analytic(chunk)
            elif gradient:
                chunk = chunk.clone().requires_grad_(True)
                with torch.enable_grad():
                    v = self.network(chunk).reshape(-1)
                    (g,) = torch.autograd.grad(v.sum(), chunk)
            else:
                with torch.no_grad():
                    v, g = self.network(chunk).reshape(-1), None
            if value:
                values.append(v.detach().cpu().numpy())
            if gradient:
                gradients.append(g.detach().cpu().numpy())
        empty_value, empty_gradient = np.zeros((0,)), np.zeros((0, self.problem.dim))
        return (
            (np.concatenate(values) if values else empty_value) if value else None,
            (np.concatenate(gradients) if gradients else empty_gradient) if gradient else None,
        )

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
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a torch device (the
            hybrid method's training; the basis method's one dense solve runs on the CPU).
        tol: The relative L² error against ``reference`` to reach: the hybrid method stops
            its training there; either method records ``metrics["tol_met"]`` and warns
            (:class:`ConvergenceWarning`) when it is missed.
        time_limit: Stop the hybrid method's training after this many seconds.
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
    if tol is not None and reference is None:
        raise ValueError("tol: needs a reference to measure the error against")
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol}")
    started = time.perf_counter()
    configuration = configure(problem, **overrides)
    torch.manual_seed(configuration.seed)
    if configuration.method == "basis":
        solution = _solve_basis(problem, configuration, comm, reference, started)
    else:
        solution = _solve_hybrid(
            problem, configuration, comm, device, tol, time_limit, reference, progress, started
        )
    result = solution.verdict
    if tol is not None and solution.metrics.get("rel_l2", math.inf) > tol:
        solution.metrics["tol_met"] = False
        if comm.rank == 0:
            warnings.warn(
                f"dolfinx_pinn.solve: rel L2 {solution.metrics['rel_l2']:.3g} > tol {tol:.3g}",
                ConvergenceWarning,
                stacklevel=2,
            )
    elif tol is not None:
        solution.metrics["tol_met"] = True
    if not result.converged and comm.rank == 0:
        warnings.warn(f"dolfinx_pinn.solve: {result.message()}", ConvergenceWarning, stacklevel=2)
    return solution


def _solve_hybrid(
    problem: MultiscaleProblem,
    configuration: SolveConfiguration,
    comm: MPI.Comm,
    device: str | torch.device,
    tol: float | None,
    time_limit: float | None,
    reference: Any,
    progress: bool,
    started: float,
) -> Solution:
    """The hybrid method: a network trained by the hybrid solver (collective)."""
    from dolfinx_pinn.solver import HybridSolver

    assert configuration.network is not None
    network = configuration.network(problem)
    with HybridSolver(
        problem,
        network,
        comm=comm,
        coarse_h=configuration.coarse_h,
        n_interior=configuration.n_interior or 2000,
        n_boundary=configuration.n_boundary,
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
        return Solution(solver, metrics, result)


def _solve_basis(
    problem: MultiscaleProblem,
    configuration: SolveConfiguration,
    comm: MPI.Comm,
    reference: Any,
    started: float,
) -> Solution:
    """The basis method: one least-squares solve of the two-scale basis (collective).

    The hybrid solver provides the distributed collocation points, the coarse problem and the
    compression; no training step is taken (the least-squares minimiser is the τ2 → 0 limit).
    The dense products run on the CPU in float64 whatever ``device`` is: they are one
    ``n × n`` factorisation, not a training loop.
    """
    from dolfinx_pinn.basis import TwoScaleBasis
    from dolfinx_pinn.corners import PatchedNetwork
    from dolfinx_pinn.least_squares import solve_output_layer
    from dolfinx_pinn.problems import Box
    from dolfinx_pinn.solver import HybridSolver

    network = TwoScaleBasis.for_problem(problem, **configuration.basis)
    unknowns = network.num_features
    n_interior = configuration.n_interior or math.ceil(configuration.point_factor * unknowns)
    n_boundary = configuration.n_boundary or math.ceil(configuration.boundary_factor * unknowns)
    if n_interior < unknowns:
        raise ValueError(
            f"n_interior: {n_interior} points for {unknowns} unknowns; give at least {unknowns}"
        )
    coarse_h = configuration.coarse_h
    if coarse_h is None:
        # The compression averages the points in a ball of diameter δ >= h around each coarse
        # node: h from the point density, so that every ball holds about 8 of them (a box's
        # Sobol' points), or 20 on a mesh domain, whose points are drawn at random per cell
        # (with 8 some of the balls of a 10 x 10 square at ε = 0.02 held only 3).
        per_ball = 8.0 if isinstance(problem.domain, Box) else 20.0
        coarse_h = float(max(problem.domain.lengths)) * (per_ball / n_interior) ** (
            1.0 / problem.dim
        )
    delta = configuration.delta
    if delta is None and not isinstance(problem.domain, Box):
        # A mesh domain's coarse mesh is its mesh refined by halving, whose size can fall
        # below coarse_h: δ from coarse_h keeps the balls' point count.
        from dolfinx_pinn.coupling import default_delta

        delta = default_delta(problem, coarse_h)
    built = time.perf_counter()
    with HybridSolver(
        problem,
        network,
        comm=comm,
        coarse_h=coarse_h,
        n_interior=n_interior,
        n_boundary=max(n_boundary, 2 * problem.dim),
        tau2=configuration.tau2,
        delta=delta,
        device="cpu",
        seed=configuration.seed,
        sampling=configuration.sampling,
        reference=reference,
    ) as solver:
        points = solver.points
        cpu = torch.device("cpu")
        interior = points.torch_interior(cpu, torch.float64)
        boundary = (
            points.torch_boundary(cpu, torch.float64) if points.global_boundary_count else None
        )
        interior, weights, extra = _layer_points(
            problem, network, configuration, interior, points.global_interior_count, comm
        )
        boundary, target, neumann, n_boundary = _boundary_rows(problem, boundary, comm)
        prepared = time.perf_counter()
        form = configuration.form
        if form == "auto":
            form = "qr" if problem.dim == 1 else "normal"
        rows = configuration.rows
        if rows == "auto":
            rows = "flux" if problem.dim == 1 else "strong"
        result = solve_output_layer(
            problem,
            network,
            interior,
            boundary,
            boundary_target=target,
            neumann=neumann,
            form=form,
            rows=rows,
            allreduce=lambda tensor: _allreduce(tensor, comm),
            allgather=lambda tensor: _allgather(tensor, comm),
            total_interior=points.global_interior_count + extra,
            total_boundary=n_boundary,
            interior_weights=weights,
            ridge=configuration.ridge,
        )
        solved = time.perf_counter()
        patches = _corner_patches(problem, network, configuration, comm)
        patched = time.perf_counter()
        if patches is not None:
            solver.objective.solution = PatchedNetwork(network, patches)
        band, coupling = _boundary_band(problem, network, configuration)
        banded = time.perf_counter()
        if band is not None:
            solver.objective.solution = PatchedNetwork(network, band)
        # The consistency gap Q̄v - y_h(K̃) is the coarse model's own bias (Theorem 3.2 of
        # Hintermüller & Korolev) for a fine solution that no coupling pulled towards y_h: it
        # is reported, not judged (it measured 0.25-0.4 for basis solutions exact to 1e-7).
        i = problem.lifting_direction
        metrics, verdict_ = _metrics(
            solver,
            configuration,
            started,
            {"consistency_gap": math.inf},
            # A known effective tensor stays the reference (the indicators read it).
            homogenized=None
            if problem.effective_tensor is not None
            else float(network.cell_tensor[i, i]),
            residual_network=network,
            residual_region=None if band is None else band.basis_region,
        )
        metrics["basis"] = network.describe()
        metrics["corner_patches"] = None if patches is None else patches.describe()
        metrics["boundary_band"] = None if band is None else {**band.describe(), **coupling}
        metrics["least_squares"] = result.as_dict()
        metrics["timings"] = {
            "basis": built - started,
            "points_and_coarse": prepared - built,
            "least_squares": result.timings["total"],
            "corner_patches": patched - solved,
            "boundary_band": banded - patched,
            "total": time.perf_counter() - started,
        }
        metrics["n_interior"], metrics["n_boundary"] = result.rows
        metrics["n_layer_points"] = extra
        metrics["unknowns"] = unknowns
        metrics["device"] = "cpu"
        return Solution(solver, metrics, verdict_)


def _corner_patches(
    problem: MultiscaleProblem, network: nn.Module, configuration: SolveConfiguration, comm: Any
) -> Any:
    """The corner patches of a 2D box's basis solve, or None (collective)."""
    from dolfinx_pinn.corners import CornerPatches
    from dolfinx_pinn.problems import Box

    if not (configuration.corner_patches > 0 and problem.dim == 2):
        return None
    if not isinstance(problem.domain, Box) or problem.boundary is not None:
        return None

    def values(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(points)).reshape(-1).numpy()

    return CornerPatches(problem, values, periods=configuration.corner_patches, comm=comm)


def _boundary_band(
    problem: MultiscaleProblem,
    network: nn.Module,
    configuration: SolveConfiguration,
) -> tuple[Any, dict[str, Any]]:
    """The boundary band of a 2D mesh domain coupled to the basis, or None (collective)."""
    from dolfinx_pinn.bands import BoundaryBand
    from dolfinx_pinn.geometry import MeshDomain

    if not (configuration.boundary_band > 0 and problem.dim == 2):
        return None, {}
    if not isinstance(problem.domain, MeshDomain):
        return None, {}
    band = BoundaryBand(problem, periods=configuration.boundary_band)
    if not band.full:
        try:
            report = band.couple(network, seed=configuration.seed)
            band.destroy()
            return band, report
        except ValueError:
            # Too little interior for the basis's rows: the band takes the whole domain.
            band.destroy()
            longest = problem.eps * float(max(problem.period))
            whole = 2.0 * problem.domain.diameter / longest
            band = BoundaryBand(problem, periods=whole)
    band.solve_alone()
    band.destroy()
    return band, {"band_solves": 1}


def _boundary_rows(
    problem: MultiscaleProblem, boundary: torch.Tensor | None, comm: MPI.Comm
) -> tuple[torch.Tensor | None, torch.Tensor | None, Any, int]:
    """The Dirichlet points and data g, the Neumann rows and the Dirichlet count (collective).

    Without boundary data every point is a Dirichlet point of the lifted problem (g = 0).
    """
    from dolfinx_pinn.boundary_value import NeumannBlock

    data = problem.boundary
    if data is None or boundary is None:
        count = 0 if boundary is None else len(boundary)
        return boundary, None, None, int(comm.allreduce(count, op=MPI.SUM))
    points = boundary.numpy()
    tags = data.point_tags(points)
    dirichlet = data.is_dirichlet(tags)
    target = torch.from_numpy(data.dirichlet_values(points[dirichlet], tags[dirichlet]))
    count = int(comm.allreduce(int(dirichlet.sum()), op=MPI.SUM))
    neumann = None
    if int(comm.allreduce(int((~dirichlet).sum()), op=MPI.SUM)):
        at = np.ascontiguousarray(points[~dirichlet]).reshape(-1, problem.dim)
        at_t = torch.from_numpy(at)
        neumann = (at_t, torch.zeros_like(at_t), torch.zeros(len(at), dtype=torch.float64))
        if len(at):  # the hybrid's Neumann rows ∇v · (K n) = h, whose conormal K n they reuse
            block = NeumannBlock(
                problem,
                at_t,
                torch.from_numpy(problem.domain.boundary_normals(at).reshape(-1, problem.dim)),
                torch.from_numpy(data.neumann_values(at, tags[~dirichlet]).reshape(-1)),
                weight=1.0,
            )
            neumann = (at_t, block.conormal, block.target)
    return torch.from_numpy(np.ascontiguousarray(points[dirichlet])), target, neumann, count


def _layer_points(
    problem: MultiscaleProblem,
    network: Any,
    configuration: SolveConfiguration,
    interior: torch.Tensor,
    uniform_count: int,
    comm: MPI.Comm,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The least-squares points: the uniform ones plus extra points in the layers (collective).

    Returns ``(points, weights or None, extra points over all ranks)``; without layers (or
    with both factors 0) the uniform points and their uniform weight.
    """
    from dolfinx_pinn.stratified import StratifiedPoints, layer_groups

    layer_unknowns = network.layer_unknowns
    faces = math.ceil(configuration.layer_point_factor * layer_unknowns)
    corners = math.ceil(configuration.corner_point_factor * layer_unknowns)
    if layer_unknowns == 0 or faces + corners == 0:
        return interior, None, 0
    domain = problem.domain
    widths = network.layer_widths()
    groups = layer_groups(domain.lower, domain.upper, widths, faces, corners)
    sampler = StratifiedPoints(domain.measure, uniform_count, groups)
    extra = sampler.draw(comm.rank, comm.size, configuration.seed)
    points = np.concatenate([interior.numpy(), extra.reshape(-1, problem.dim)])
    weights = torch.from_numpy(sampler.weights(points))
    return torch.from_numpy(points), weights, sampler.extra_count


def _allreduce(tensor: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    if comm.size == 1:
        return tensor
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    total = np.empty_like(array)
    comm.Allreduce(array, total, op=MPI.SUM)
    return torch.from_numpy(total)


def _allgather(tensor: torch.Tensor, comm: MPI.Comm) -> list[torch.Tensor]:
    if comm.size == 1:
        return [tensor]
    return [torch.from_numpy(part) for part in comm.allgather(tensor.detach().cpu().numpy())]


def _metrics(
    solver: Any,
    configuration: SolveConfiguration,
    started: float,
    thresholds: dict[str, float] | None = None,
    homogenized: float | None = None,
    residual_network: nn.Module | None = None,
    residual_region: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, Any], Verdict]:
    """The metrics and the verdict of a trained solver (collective).

    ``homogenized`` is a⁰_ii when the caller has it (the basis's Fourier-Galerkin tensor);
    otherwise the indicators solve a P1 cell problem for it (seconds in 3D).
    """
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
        homogenized=homogenized,
        residual_network=residual_network,
        residual_region=residual_region,
    )
    result = verdict(values, {**(thresholds or {}), **configuration.thresholds})
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
