"""Chunked analytic least squares for the output layer of a linear-in-output basis.

For a network ``v = Φ(x) c + b`` whose features Φ are fixed (e.g.
:class:`~dolfinx_pinn.basis.TwoScaleBasis`) the collocation least squares of (3.24),

    min_c  Σ_i w_Ω (A^ε v(x_i) - f^ε(x_i))² + Σ_k w_∂ (v(x_k) - g(x_k))²,

is linear in c. Its rows are built analytically, chunk by chunk of points: for each feature the
PDE row ``-(K : ∇²Φ + (∇·K)·∇Φ)`` (from the network's ``operator_rows`` when it has one, which
never forms the feature Hessians, else from ``feature_jet``) and the boundary row Φ. Only the
columns of the output layer are ever formed, never the Jacobian of the hidden parameters.

In 1D the PDE rows can instead be those of the flux form (``rows="flux"``): ``-(K v')' = f`` is
``K v' = c - F`` with ``F(x) = ∫_a^x f`` and one more unknown, the flux constant c, so the rows
are ``K Φ'`` and the column ``-1``, the target ``-F``. The strong rows of the corrector features
``ε^m N_m(x/ε) S(x)`` hold terms of size ``1/ε`` that cancel in ``K Φ'' + K' Φ'``, so they lose
digits like ``ε⁻²``; the flux rows hold no derivative of K and only first derivatives of Φ,
which stay O(1) at every ε. ``F`` is the source's antiderivative (adaptive Gauss-Legendre) plus,
for the lifted problem (4.8), ``K(x) - K(a)`` in closed form.

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

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import _coefficient_data

__all__ = [
    "LeastSquaresResult",
    "antiderivative",
    "boundary_rows",
    "coefficient_data",
    "default_points",
    "flux_rows",
    "matmul_gflops",
    "pde_rows",
    "solve_output_layer",
]


# The normal form reads the residual ‖Jc - r‖² off the products, cᵀ(JᵀJ)c - 2cᵀJᵀr + ‖r‖²,
# whose cancellation error is about 1e-16 ‖r‖² times a few: above this fraction of ‖r‖² it still
# has several correct digits (the verdict's thresholds are near 1e-6 ‖r‖²); below it a second
# pass over the rows (seconds in 2D) computes it directly.
SECOND_PASS_BELOW = 1e-11

# The ridge of the normal equations (relative to the unit diagonal). The rounding of JᵀJ, which
# depends on how the rows are split over the ranks, moves the solution along the directions
# the ridge leaves nearly free: with 1e-13 the 2D basis (layers for the order-2 traces) gave
# values on 1 and 2 ranks 4e-6 apart, with 1e-10 4e-9 (gradients 8e-5 and 2e-7), at the same
# errors (paper_2d at ε = 0.1, 0.05, 0.02 within 5 %; 1e-9 began to cost accuracy).
NORMAL_RIDGE = 1e-10


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


def antiderivative(
    function: Callable[[torch.Tensor], torch.Tensor],
    lower: float,
    x: torch.Tensor,
    tol: float = 1e-12,
    max_depth: int = 40,
) -> torch.Tensor:
    """``∫_lower^x function`` ``(N,)`` at 1D points ``(N, 1)`` (float64, local).

    Composite Gauss-Legendre (10 nodes) between the sorted points, each panel halved until the
    rule and its two halves agree to ``tol`` times the panel's share of ``∫|function|``, or,
    once they agree to 1e-8 of it, until halving no longer halves their difference (the
    function's own rounding is then the floor: ``|k x|`` ulps for ``sin(k x)``): exact to
    round-off for a slow function, and correct (at a cost growing with the number of
    oscillations) for an oscillating one.

    Raises:
        ValueError: when a panel still disagrees after ``max_depth`` halvings, or the function
            is not finite.
    """
    nodes, weights = (torch.as_tensor(a) for a in np.polynomial.legendre.leggauss(10))
    points = x.detach().to(torch.float64).reshape(-1)
    order = torch.argsort(points)
    edges = torch.cat([torch.tensor([float(lower)], dtype=torch.float64), points[order]])

    def values_at(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = 0.5 * (hi - lo)
        t = (0.5 * (lo + hi))[:, None] + half[:, None] * nodes[None, :]
        values = function(t.reshape(-1, 1)).detach().to(torch.float64).reshape(t.shape)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("source: non-finite values between the collocation points")
        return half, values

    def rule(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        half, values = values_at(lo, hi)
        return half * (values @ weights)

    lo, hi = edges[:-1], edges[1:]
    half, values = values_at(lo, hi)
    width = max(float(hi[-1] - lo[0]), 1e-300)
    scale = float((half * (values.abs() @ weights)).sum()) / width + 1e-300  # mean |function|

    def refine(
        lo: torch.Tensor, hi: torch.Tensor, whole: torch.Tensor, parent: torch.Tensor, depth: int
    ) -> torch.Tensor:
        count, mid = len(lo), 0.5 * (lo + hi)
        both = rule(torch.cat([lo, mid]), torch.cat([mid, hi]))  # the two halves in one call
        halves = both[:count] + both[count:]
        difference = (whole - halves).abs() / (hi - lo).clamp_min(1e-300)
        stalled = (difference <= 1e-8 * scale) & (difference > 0.5 * parent)
        bad = (difference > tol * scale) & ~stalled
        if bool(bad.any()):
            if depth >= max_depth:
                raise ValueError(
                    f"source: its antiderivative did not converge after {max_depth} halvings "
                    "of a panel (a singular or non-finite source?)"
                )
            pick = torch.cat([bad, bad])
            children = refine(
                torch.cat([lo, mid])[pick],
                torch.cat([mid, hi])[pick],
                both[pick],
                difference[bad].repeat(2),
                depth + 1,
            )
            split = int(bad.sum())
            halves[bad] = children[:split] + children[split:]
        return halves

    panels = refine(lo, hi, half * (values @ weights), torch.full_like(lo, math.inf), 0)
    out = torch.empty_like(points)
    out[order] = torch.cumsum(panels, 0)
    return out


def flux_rows(
    network: nn.Module, problem: MultiscaleProblem, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """1D flux-form rows ``[K Φ', -1]`` ``(N, n + 1)`` and their target ``-F`` (see the doc).

    The last column belongs to the flux constant c of ``K v' = c - F``.
    """
    x = x.detach().to(torch.float64)
    K, _, _ = coefficient_data(problem, x)
    gradient = network.feature_jet(x)[1][:, 0, :]  # type: ignore[operator]
    rows = torch.cat([K[:, 0, :1] * gradient, -torch.ones(len(x), 1, dtype=x.dtype)], 1)
    lower = float(problem.domain.lower[0])
    F = antiderivative(problem.q, lower, x)
    if problem.is_lifted:  # f = q + K': its K part in closed form
        a = torch.full((1, 1), lower, dtype=torch.float64)
        F = F + (K[:, 0, 0] - coefficient_data(problem, a)[0][0, 0, 0])
    return rows, -F


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
        pde_residual: ``‖A v - f‖ / ‖f‖`` (weighted rows) over all ranks; for the flux rows
            ``‖K v' + F - c‖ / ‖F‖``.
        boundary_residual: ``‖v‖_∂ / ‖f‖`` (weighted rows) over all ranks.
        rows: Rows over all ranks (interior, boundary).
        unknowns: n.
        timings: Seconds of ``assemble`` (rows and their products), ``solve``, ``total``.
        gflops: Achieved GFLOP/s of the dominant product (``JᵀJ`` or the QR updates).
        form: ``"normal"`` or ``"qr"``.
        rows_form: ``"strong"`` or ``"flux"``.
        flux_constant: c of the flux rows (``None`` for the strong rows).
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
    rows_form: str = "strong"
    flux_constant: float | None = None

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
            "rows_form": self.rows_form,
            "flux_constant": self.flux_constant,
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
    neumann: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    neumann_weight: float | None = None,
    interior_weights: torch.Tensor | None = None,
    form: str = "normal",
    rows: str = "strong",
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
            ``1e4 · |Γ_D| / M_b,total``: the Dirichlet condition is enforced to a relative level
            of about 1e-6 of the PDE residual; measured to be insensitive between 1e3 and 1e6).
            ``Γ_D`` is ``∂Ω`` for a problem without boundary data.
        boundary_target: Dirichlet data g at the boundary points (default 0, as in (4.8)).
        neumann: This rank's Neumann rows ``(points (M_N, d), conormals K n (M_N, d), h
            (M_N,))``: the rows ``∇Φ · (K n)`` with target h (counted with the boundary rows in
            the residuals). Collective: every rank passes it (empty where it has no such
            points) or none does.
        neumann_weight: Weight of a squared Neumann row (default ``|Γ_N| / M_N,total``, without
            the Dirichlet rows' factor 1e4: on a polygon the pointwise flux rows of a smooth
            ansatz conflict at the vertices, and a heavy weight makes the least squares give up
            the PDE for them; on the composite-plate demo with the basis, factor 1e4 gave rel.
            L² 0.47, 10 gave 0.12, 1 gave 8.5e-2, 0.1 gave 0.13).
        interior_weights: Per-point weights of the squared PDE rows ``(M,)`` of this rank
            (quadrature weights of a non-uniform point set, e.g.
            :class:`~dolfinx_pinn.stratified.StratifiedPoints`); replaces ``interior_weight``.
        form: ``"normal"`` or ``"qr"`` (see the module docstring).
        rows: ``"strong"`` (``A^ε Φ``) or ``"flux"`` (1D without Neumann data: ``K Φ'`` and the
            flux constant; see the module docstring).
        ridge: Relative ridge on the unit-diagonal (Jacobi-scaled) system (default
            :data:`NORMAL_RIDGE` for ``"normal"``; 1e-20 for ``"qr"``, whose regularising rows
            ``√ridge · I`` would otherwise bias the last digits: measured on
            ``paper_1d(1e-3)``, ridge 1e-13 limits the relative L² error to 4.5e-8, 1e-16
            gives 3.8e-10).
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
    if rows not in ("strong", "flux"):
        raise ValueError(f"rows must be 'strong' or 'flux', got {rows!r}")
    if rows == "flux" and (
        problem.dim != 1 or (problem.boundary is not None and problem.boundary.neumann)
    ):
        raise ValueError(
            "rows: 'flux' needs a 1D problem without Neumann data, got "
            f"dim={problem.dim}{' with Neumann data' if problem.dim == 1 else ''}"
        )
    if ridge is None:
        ridge = NORMAL_RIDGE if form == "normal" else 1e-20
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
    features = layer.in_features
    flux = rows == "flux"
    n = features + 1 if flux else features  # the flux constant is one more unknown
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
    data = problem.boundary
    if boundary_weight is None:
        measure = problem.domain.boundary_measure if data is None else data.dirichlet_measure
        boundary_weight = 1e4 * measure / max(b_total, 1)
    w_bc = math.sqrt(boundary_weight)
    if neumann is not None:
        neumann_points, conormals, neumann_target = (t.to(torch.float64) for t in neumann)
        if neumann_points.ndim != 2 or neumann_points.shape[1] != problem.dim:
            raise ValueError(
                f"neumann: points must have shape (M, {problem.dim}), "
                f"got {tuple(neumann_points.shape)}"
            )
        neumann_target = neumann_target.reshape(-1)
        if conormals.shape != neumann_points.shape or len(neumann_target) != len(neumann_points):
            raise ValueError("neumann: conormals (M, d) and targets (M,) for the M points")
        count = torch.tensor([float(len(neumann_points))], dtype=torch.float64)
        n_total = round(float(allreduce(count)[0]))
        if neumann_weight is None:
            measure = problem.domain.boundary_measure - (
                0.0 if data is None else data.dirichlet_measure
            )
            neumann_weight = measure / max(n_total, 1)
        w_n = math.sqrt(neumann_weight)
    target = (
        torch.zeros(boundary.shape[0], dtype=torch.float64)
        if boundary_target is None
        else boundary_target.to(torch.float64).reshape(-1)
    )

    interior_rows = flux_rows if flux else pde_rows

    def chunks():
        with torch.no_grad():
            for start in range(0, interior.shape[0], chunk_size):
                J, f = interior_rows(network, problem, interior[start : start + chunk_size])
                if row_scale is not None:
                    scale_rows = row_scale[start : start + chunk_size]
                    yield "pde", scale_rows[:, None] * J, scale_rows * f
                    continue
                yield "pde", w_pde * J, w_pde * f
            for start in range(0, boundary.shape[0], chunk_size):
                J = boundary_rows(network, boundary[start : start + chunk_size])
                if flux:
                    J = torch.cat([J, torch.zeros(len(J), 1, dtype=J.dtype)], 1)
                yield "bc", w_bc * J, w_bc * target[start : start + chunk_size]
            if neumann is None:
                return
            for start in range(0, neumann_points.shape[0], chunk_size):
                part = slice(start, start + chunk_size)
                gradient = network.feature_jet(neumann_points[part])[1]  # type: ignore[operator]
                J = torch.einsum("ndk,nd->nk", gradient, conormals[part])
                yield "bc", w_n * J, w_n * neumann_target[part]

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
        below = SECOND_PASS_BELOW * float(rhs_norms.sum())
        if float(sums.sum()) < below or bool(torch.any(sums < 0)):
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
    weights = solution[:features]
    if set_output:
        with torch.no_grad():
            layer.weight.copy_(weights.reshape(1, -1).to(layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.zero_()
    finished = time.perf_counter()
    return LeastSquaresResult(
        coefficients=weights,
        relative_residual=math.sqrt(float(sums[0] + sums[1]) / max(total_rhs, 1e-300)),
        pde_residual=math.sqrt(float(sums[0])) / scale_f,
        boundary_residual=math.sqrt(float(sums[1])) / scale_f,
        rows=(m_total, b_total),
        unknowns=features,
        timings={
            "assemble": assembled - started,
            "solve": solved - assembled,
            "total": finished - started,
            "products": flop_time,
        },
        gflops=flops / max(flop_time, 1e-12) / 1e9,
        form=form,
        rows_form=rows,
        flux_constant=float(solution[features]) if flux else None,
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
