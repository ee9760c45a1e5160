"""Chunked analytic least squares for the output layer of a linear-in-output basis.

For a network ``v = Φ(x) c + b`` whose features Φ are fixed (e.g.
:class:`~dolfinx_pinn.basis.TwoScaleBasis`) the collocation least squares of (3.24),

    min_c  Σ_i w_Ω (A^ε v(x_i) - f^ε(x_i))² + Σ_k w_∂ (v(x_k) - g(x_k))²,

is linear in c. Its rows are built analytically, chunk by chunk of points: for each feature the
PDE row ``-(K : ∇²Φ + (∇·K)·∇Φ)`` (from the network's ``operator_rows`` when it has one, which
never forms the feature Hessians, else from ``feature_jet``) and the boundary row Φ. Only the
columns of the output layer are ever formed, never the Jacobian of the hidden parameters.

Two solves:

* ``"normal"``: the chunks are accumulated into ``JᵀJ`` and ``Jᵀr`` (symmetric rank-k updates),
  summed over ranks by an ``allreduce`` callable, Jacobi-scaled to a unit diagonal and solved by
  Cholesky with a tiny relative ridge. It squares the condition number: good to a relative
  error of about 1e-6-1e-7 of the solution.
* ``"qr"``: an incremental (tall-skinny) QR: ``R ← qr([R; J_chunk | r_chunk])``, then across ranks
  the stacked ``R`` of every rank (through an ``allgather`` callable) once more. It keeps the
  digits the normal equations lose (the 1D target 1e-8 needs it) at about twice the flops.

MPI: every rank passes its own points; the callables sum (``allreduce``) or gather
(``allgather``) tensors over the ranks, so the coefficients are the same on all ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import _coefficient_data

__all__ = [
    "LeastSquaresResult",
    "boundary_rows",
    "coefficient_data",
    "default_points",
    "matmul_gflops",
    "pde_rows",
    "solve_output_layer",
]


def coefficient_data(
    problem: MultiscaleProblem, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``K`` as a tensor ``(N, d, d)``, the drift ``∇·K`` ``(N, d)`` and ``f^ε`` ``(N,)``.

    All from the problem's single definition (``∇K`` by autograd), detached, float64: the
    residual module's data with a scalar K as ``K I``.
    """
    x = x.detach().to(torch.float64)
    K, drift, f = _coefficient_data(problem, x)
    if not problem.is_tensor:
        K = K[:, None, None] * torch.eye(problem.dim, dtype=K.dtype, device=K.device)
    return K, drift, f


def pde_rows(
    network: nn.Module, problem: MultiscaleProblem, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PDE rows ``A^ε Φ (N, n)`` of the output-layer features and the target ``f^ε - A^ε b``.

    The output bias b is a constant, so ``A^ε b = 0`` and the target is ``f^ε``.
    """
    K, drift, f = coefficient_data(problem, x)
    if hasattr(network, "operator_rows"):
        return network.operator_rows(x, K, drift), f
    _, gradient, hessian = network.feature_jet(x, full_hessian=True)  # type: ignore[operator]
    rows = -(torch.einsum("njk,njkm->nm", K, hessian) + torch.einsum("nj,njm->nm", drift, gradient))
    return rows, f


def boundary_rows(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dirichlet rows Φ ``(N, n)`` of the output-layer features."""
    if hasattr(network, "value_rows"):
        return network.value_rows(x)
    return network.feature_jet(x)[0]  # type: ignore[operator]


def _output_layer(network: nn.Module) -> nn.Linear:
    last = None
    for module in network.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None or last.out_features != 1:
        raise ValueError("network: a final nn.Linear output layer with one output is needed")
    return last


@dataclass
class LeastSquaresResult:
    """Result of :func:`solve_output_layer`.

    Attributes:
        coefficients: The output-layer weights ``(n,)`` (also written into the network).
        relative_residual: ``‖J c - r‖ / ‖r‖`` over all rows and ranks.
        pde_residual: ``‖A v - f‖ / ‖f‖`` (weighted rows) over all ranks.
        boundary_residual: ``‖v‖_∂ / ‖f‖`` (weighted rows) over all ranks.
        rows: Rows over all ranks (interior, boundary).
        unknowns: n.
        timings: Seconds of ``assemble`` (rows and their products), ``solve``, ``total``.
        gflops: Achieved GFLOP/s of the dominant product (``JᵀJ`` or the QR updates).
        form: ``"normal"`` or ``"qr"``.
    """

    coefficients: torch.Tensor
    relative_residual: float
    pde_residual: float
    boundary_residual: float
    rows: tuple[int, int]
    unknowns: int
    timings: dict[str, float] = field(default_factory=dict)
    gflops: float = 0.0
    form: str = "normal"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (without the coefficients)."""
        return {
            "relative_residual": self.relative_residual,
            "pde_residual": self.pde_residual,
            "boundary_residual": self.boundary_residual,
            "rows": list(self.rows),
            "unknowns": self.unknowns,
            "timings": dict(self.timings),
            "gflops": self.gflops,
            "form": self.form,
        }


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _single(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


def _scale_from(squared: torch.Tensor) -> torch.Tensor:
    norms = torch.sqrt(squared.clamp_min(0.0))
    largest = float(norms.max()) if norms.numel() else 1.0
    return torch.where(norms > 1e-300 + 1e-14 * largest, norms, torch.ones_like(norms))


def solve_output_layer(
    problem: MultiscaleProblem,
    network: nn.Module,
    interior: torch.Tensor,
    boundary: torch.Tensor | None,
    *,
    interior_weight: float | None = None,
    boundary_weight: float | None = None,
    boundary_target: torch.Tensor | None = None,
    interior_weights: torch.Tensor | None = None,
    form: str = "normal",
    ridge: float | None = None,
    chunk_size: int = 4096,
    allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    allgather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    total_interior: int | None = None,
    total_boundary: int | None = None,
    set_output: bool = True,
) -> LeastSquaresResult:
    """Solve the output layer of ``network`` by collocation least squares.

    Args:
        problem: The problem (K, ∇·K and f^ε from its definition).
        network: A network with a final ``nn.Linear`` output layer over fixed features that has
            ``feature_jet`` (and optionally ``operator_rows``/``value_rows``), e.g.
            :class:`~dolfinx_pinn.basis.TwoScaleBasis`.
        interior: This rank's interior points ``(M, d)``.
        boundary: This rank's boundary points ``(M_b, d)`` (``None`` or empty for a network
            that satisfies the boundary condition).
        interior_weight: Weight of a squared PDE row (default ``|Ω| / M_total``, (3.24)).
        boundary_weight: Weight of a squared boundary row (default
            ``1e4 · |∂Ω| / M_b,total``: the Dirichlet condition is enforced to a relative level
            of about 1e-6 of the PDE residual; measured to be insensitive between 1e3 and 1e6).
        boundary_target: Dirichlet data g at the boundary points (default 0, as in (4.8)).
        interior_weights: Per-point weights of the squared PDE rows ``(M,)`` of this rank
            (quadrature weights of a non-uniform point set, e.g.
            :class:`~dolfinx_pinn.stratified.StratifiedPoints`); replaces ``interior_weight``.
        form: ``"normal"`` or ``"qr"`` (see the module docstring).
        ridge: Relative ridge on the unit-diagonal (Jacobi-scaled) system (default 1e-13 for
            ``"normal"``; 1e-20 for ``"qr"``, whose regularising rows ``√ridge · I`` would
            otherwise bias the last digits: measured on ``paper_1d(1e-3)``, ridge 1e-13 limits
            the relative L² error to 4.5e-8, 1e-16 gives 3.8e-10).
        chunk_size: Points per chunk of rows (memory: ``chunk_size × n`` floats, a few times).
        allreduce: Sum of a tensor over the ranks (``"normal"``; identity by default).
        allgather: List of a tensor from every rank (``"qr"``; ``[tensor]`` by default).
        total_interior: Interior points over all ranks (default ``allreduce`` of the count).
        total_boundary: Boundary points over all ranks (default likewise).
        set_output: Write the solution into the output layer (weights; bias set to 0).

    Returns:
        A :class:`LeastSquaresResult` (identical on every rank). Collective.
    """
    if form not in ("normal", "qr"):
        raise ValueError(f"form must be 'normal' or 'qr', got {form!r}")
    if ridge is None:
        ridge = 1e-13 if form == "normal" else 1e-20
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if interior.ndim != 2 or interior.shape[1] != problem.dim:
        raise ValueError(
            f"interior must have shape (M, {problem.dim}), got {tuple(interior.shape)}"
        )
    allreduce = allreduce or _identity
    allgather = allgather or _single
    started = time.perf_counter()
    layer = _output_layer(network)
    n = layer.in_features
    boundary = torch.zeros(0, problem.dim, dtype=torch.float64) if boundary is None else boundary
    counts = allreduce(
        torch.tensor([float(interior.shape[0]), float(boundary.shape[0])], dtype=torch.float64)
    )
    m_total = int(total_interior if total_interior is not None else round(float(counts[0])))
    b_total = int(total_boundary if total_boundary is not None else round(float(counts[1])))
    if m_total < 1:
        raise ValueError("interior: at least one interior point is needed over all ranks")
    w_pde = math.sqrt(
        problem.domain.measure / m_total if interior_weight is None else interior_weight
    )
    row_scale = None
    if interior_weights is not None:
        weights = torch.as_tensor(interior_weights, dtype=torch.float64).reshape(-1)
        if weights.shape[0] != interior.shape[0]:
            raise ValueError(
                f"interior_weights: {weights.shape[0]} weights for {interior.shape[0]} points"
            )
        if not bool(torch.all(torch.isfinite(weights) & (weights > 0))):
            raise ValueError("interior_weights must be finite and > 0")
        row_scale, w_pde = torch.sqrt(weights), 1.0
    if boundary_weight is None:
        boundary_weight = 1e4 * problem.domain.boundary_measure / max(b_total, 1)
    w_bc = math.sqrt(boundary_weight)
    target = (
        torch.zeros(boundary.shape[0], dtype=torch.float64)
        if boundary_target is None
        else boundary_target.to(torch.float64).reshape(-1)
    )

    def chunks():
        with torch.no_grad():
            for start in range(0, interior.shape[0], chunk_size):
                rows, f = pde_rows(network, problem, interior[start : start + chunk_size])
                if row_scale is not None:
                    scale_rows = row_scale[start : start + chunk_size]
                    yield "pde", scale_rows[:, None] * rows, scale_rows * f
                    continue
                yield "pde", w_pde * rows, w_pde * f
            for start in range(0, boundary.shape[0], chunk_size):
                rows = boundary_rows(network, boundary[start : start + chunk_size])
                yield "bc", w_bc * rows, w_bc * target[start : start + chunk_size]

    flop_time, flops = 0.0, 0.0
    rhs_norms = torch.zeros(2, dtype=torch.float64)
    if form == "normal":
        # The boundary rows get their own products, so that the residual of each kind follows
        # from the products without a second pass over the rows.
        grams = {kind: torch.zeros(n, n, dtype=torch.float64) for kind in ("pde", "bc")}
        moments = {kind: torch.zeros(n, dtype=torch.float64) for kind in ("pde", "bc")}
        for kind, J, r in chunks():
            tick = time.perf_counter()
            grams[kind].addmm_(J.T, J)
            flop_time += time.perf_counter() - tick
            flops += 2.0 * J.shape[0] * n * n
            moments[kind] += J.T @ r
            rhs_norms[0 if kind == "pde" else 1] += r @ r
        assembled = time.perf_counter()
        grams = {kind: allreduce(value) for kind, value in grams.items()}
        moments = {kind: allreduce(value) for kind, value in moments.items()}
        gram, moment = grams["pde"] + grams["bc"], moments["pde"] + moments["bc"]
        scale = _scale_from(torch.diagonal(gram))
        scaled = gram / scale[:, None] / scale[None, :]
        scaled.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(scaled)
        if int(info) != 0:
            solution = torch.linalg.solve(scaled, moment / scale) / scale
        else:
            solution = torch.cholesky_solve((moment / scale)[:, None], factor)[:, 0] / scale
    else:
        R = torch.zeros(0, n + 1, dtype=torch.float64)
        for kind, J, r in chunks():
            tick = time.perf_counter()
            stacked = torch.cat([R, torch.cat([J, r[:, None]], 1)])
            R = torch.linalg.qr(stacked, mode="r")[1]
            flop_time += time.perf_counter() - tick
            flops += 2.0 * stacked.shape[0] * (n + 1) ** 2
            rhs_norms[0 if kind == "pde" else 1] += r @ r
        assembled = time.perf_counter()
        parts = [p for p in allgather(R) if p.numel()]
        R = torch.linalg.qr(torch.cat(parts), mode="r")[1] if len(parts) > 1 else parts[0]
        R = R[: n + 1]
        scale = _scale_from((R[:, :n] ** 2).sum(0))
        top = torch.cat([R[:, :n] / scale, R[:, n : n + 1]], 1)
        regulariser = torch.cat(
            [math.sqrt(ridge) * torch.eye(n, dtype=torch.float64), torch.zeros(n, 1)], 1
        )
        Rr = torch.linalg.qr(torch.cat([top, regulariser]), mode="r")[1][: n + 1]
        solution = (
            torch.linalg.solve_triangular(Rr[:n, :n], Rr[:n, n : n + 1], upper=True)[:, 0] / scale
        )
    solved = time.perf_counter()
    rhs_norms = allreduce(rhs_norms)
    sums = None
    if form == "normal":
        # ‖J c - r‖² = cᵀ(JᵀJ)c - 2 cᵀJᵀr + ‖r‖² per kind: exact to about 1e-16 ‖r‖², so it
        # is kept only while the residual is well above that cancellation level.
        sums = torch.stack(
            [
                solution @ grams[kind] @ solution - 2.0 * solution @ moments[kind] + rhs_norms[i]
                for i, kind in enumerate(("pde", "bc"))
            ]
        )
        if float(sums.sum()) < 1e-8 * float(rhs_norms.sum()) or bool(torch.any(sums < 0)):
            sums = None
    if sums is None:
        # A second pass over the rows: exact for either form (the QR form needs its digits).
        sums = torch.zeros(2, dtype=torch.float64)
        for kind, J, r in chunks():
            residual = J @ solution - r
            sums[0 if kind == "pde" else 1] += residual @ residual
        sums = allreduce(sums)
    total_rhs = float(rhs_norms.sum())
    scale_f = math.sqrt(max(float(rhs_norms[0]), 1e-300))
    if set_output:
        with torch.no_grad():
            layer.weight.copy_(solution.reshape(1, -1).to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.zero_()
    finished = time.perf_counter()
    return LeastSquaresResult(
        coefficients=solution,
        relative_residual=math.sqrt(float(sums[0] + sums[1]) / max(total_rhs, 1e-300)),
        pde_residual=math.sqrt(float(sums[0])) / scale_f,
        boundary_residual=math.sqrt(float(sums[1])) / scale_f,
        rows=(m_total, b_total),
        unknowns=n,
        timings={
            "assemble": assembled - started,
            "solve": solved - assembled,
            "total": finished - started,
            "products": flop_time,
        },
        gflops=flops / max(flop_time, 1e-12) / 1e9,
        form=form,
    )


def default_points(
    problem: MultiscaleProblem,
    unknowns: int,
    *,
    factor: float = 3.0,
    boundary_factor: float = 1.0,
    seed: int = 0,
    rank: int = 0,
    size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scrambled Sobol' interior points and boundary points, this rank's share.

    ``factor × unknowns`` interior points (the residual of a two-scale ansatz is ``R(x, x/ε)``,
    smooth in x and periodic in y, and the points ``(x, x/ε mod p)`` equidistribute at any ε, so
    nothing grows with 1/ε) and ``boundary_factor × unknowns`` boundary points spread over the
    faces by measure (Sobol' on each face; in 1D the two end points). Rank ``rank`` of ``size``
    takes every ``size``-th point.
    """
    if unknowns < 1:
        raise ValueError(f"unknowns must be >= 1, got {unknowns}")
    d = problem.dim
    lower = torch.tensor(problem.domain.lower, dtype=torch.float64)
    lengths = torch.tensor(problem.domain.lengths, dtype=torch.float64)
    count = max(math.ceil(factor * unknowns), 1)
    engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
    interior = lower + lengths * engine.draw(count, dtype=torch.float64)
    if d == 1:
        boundary = torch.stack([lower, lower + lengths])
    else:
        total = max(math.ceil(boundary_factor * unknowns), 2 * d)
        areas = [problem.domain.measure / float(lengths[a]) for a in range(d)]
        faces = []
        for a in range(d):
            per_face = max(math.ceil(total * areas[a] / (2 * sum(areas))), 1)
            for side in (0, 1):
                engine = torch.quasirandom.SobolEngine(
                    d - 1, scramble=True, seed=seed + 1 + 2 * a + side
                )
                t = engine.draw(per_face, dtype=torch.float64)
                points = torch.empty(per_face, d, dtype=torch.float64)
                others = [j for j in range(d) if j != a]
                for i, j in enumerate(others):
                    points[:, j] = lower[j] + lengths[j] * t[:, i]
                points[:, a] = lower[a] + side * lengths[a]
                faces.append(points)
        boundary = torch.cat(faces)
    return interior[rank::size].contiguous(), boundary[rank::size].contiguous()


def matmul_gflops(rows: int, columns: int, repeats: int = 3) -> float:
    """GFLOP/s of a plain dense ``AᵀA`` (``rows × columns``) in this process, best of repeats.

    The yardstick of :attr:`LeastSquaresResult.gflops` (issue 12, item 4).
    """
    A = torch.randn(rows, columns, dtype=torch.float64)
    best = math.inf
    for _ in range(repeats):
        tick = time.perf_counter()
        A.T @ A
        best = min(best, time.perf_counter() - tick)
    return 2.0 * rows * columns * columns / best / 1e9
