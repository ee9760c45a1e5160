"""Fine-scale reference solutions, error norms and upscaled coefficients.

Everything a later number is measured against lives here:

- :func:`solve_fine` solves the fine problem (4.8) with DOLFINx + PETSc on a mesh resolving ε;
- :func:`exact_1d` is the closed form [HS (5.3)] of any 1D problem, by composite Gauss-Legendre
  quadrature that resolves every oscillation;
- :func:`relative_errors` integrates relative L² and H¹-seminorm errors of a candidate (a dolfinx
  Function, a torch network or callables) on a reference mesh, in parallel;
- :func:`upscaled_coefficient` is (4.10) and :func:`upscaled_tensor` is Algorithm 4.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mpi4py import MPI

import basix
import basix.ufl
import numpy as np
import numpy.typing as npt
import torch
import ufl
from dolfinx import default_scalar_type, fem
from dolfinx import mesh as dmesh

from dolfinx_pinn.errors import network_values_and_gradients
from dolfinx_pinn.ksp import default_options, solve_linear
from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "ExactSolution1D",
    "GradientCallable",
    "box_partition",
    "default_fine_resolution",
    "exact_1d",
    "fine_solver_options",
    "relative_errors",
    "solve_fine",
    "solve_fine_directions",
    "upscaled_coefficient",
    "upscaled_tensor",
]


def fine_solver_options(solver: str) -> dict[str, Any]:
    """PETSc options of the fine solve.

    Args:
        solver: ``"mumps"`` (LU, the default) or ``"gamg"`` (CG + smoothed aggregation AMG).

    Returns:
        A dict of PETSc options for the KSP.
    """
    if solver not in ("mumps", "gamg"):
        raise ValueError(f"solver must be 'mumps' or 'gamg', got {solver!r}")
    return default_options(solver)


def default_fine_resolution(
    problem: MultiscaleProblem, degree: int = 1, elements_per_period: int | None = None
) -> list[int]:
    """Cells per direction of the default fine mesh of :func:`solve_fine`.

    Along axis j the finest oscillation has length ``eps * period[j]`` (``finest_scale`` for a
    non-periodic coefficient); it gets ``elements_per_period`` cells (default 100 for P1, 24 for
    P2, 12 for P3 and higher; never fewer than 20).

    Args:
        problem: The problem.
        degree: Lagrange degree.
        elements_per_period: Override of the cells per oscillation.

    Returns:
        One cell count per direction.
    """
    if elements_per_period is None:
        elements_per_period = {1: 100, 2: 24}.get(degree, 12)
    if elements_per_period < 1:
        raise ValueError(f"elements_per_period must be >= 1, got {elements_per_period}")
    scales = (
        [problem.eps * p for p in problem.period]
        if problem.period is not None
        else [problem.finest_scale] * problem.dim
    )
    return [
        max(2, int(np.ceil(elements_per_period * length / scale - 1e-9)))
        for length, scale in zip(problem.domain.lengths, scales, strict=True)
    ]


# Above this many quadrature points relative_errors estimates by ERROR_SAMPLES QMC points.
MAX_QUADRATURE_POINTS = 2_000_000
ERROR_SAMPLES = 2**16


def _default_quadrature_degree(degree: int) -> int:
    # The oscillating coefficient is not a polynomial: a few degrees above the exact degree of
    # the polynomial part (2*degree - 2 for the stiffness) keep the quadrature error far below
    # the discretisation error on meshes that resolve ε.
    return 2 * degree + 4


def solve_fine(
    problem: MultiscaleProblem,
    n: int | Sequence[int] | None = None,
    degree: int = 1,
    comm: MPI.Comm = MPI.COMM_WORLD,
    *,
    mesh: dmesh.Mesh | None = None,
    solver: str = "mumps",
    petsc_options: dict[str, Any] | None = None,
    elements_per_period: int | None = None,
    quadrature_degree: int | None = None,
) -> fem.Function:
    """Solve the fine-scale problem (4.8) with Lagrange finite elements.

    Finds u in V_h ⊂ H¹_0 with ∫ K∇u·∇v = ∫ q v - ∫ (K e_i)·∇v for all v, the weak form of
    -∇·(K∇u) = q + ∇·(K e_i); the lifted solution is w = u + x_i. For a problem with boundary
    data (:mod:`dolfinx_pinn.boundary`): u = g on Γ_D and ∫ K∇u·∇v = ∫ q v + ∫_{Γ_N} h v ds.

    On a mesh domain (:class:`~dolfinx_pinn.geometry.MeshDomain`) the default mesh is the
    domain's mesh refined (``dolfinx.mesh.refine``, which keeps the boundary) until its cells
    are no larger than the finest scale over ``elements_per_period``; a ``mesh`` given instead
    may be any mesh of the same geometry, its boundary facets classified by the nearest facet of
    the domain's boundary.

    Args:
        problem: The multiscale problem.
        n: Cells per direction (default: ``elements_per_period`` cells per finest oscillation).
        degree: Lagrange degree.
        comm: MPI communicator of the mesh (collective on it).
        mesh: A mesh to use instead of a uniform box mesh (must match the problem's domain).
        solver: ``"mumps"`` (LU) or ``"gamg"`` (CG + GAMG); see :func:`fine_solver_options`.
        petsc_options: Options overriding those of ``solver``.
        elements_per_period: Cells per finest oscillation of the default mesh, along each axis
            (default 100 for P1, 24 for P2, 12 for P3 and higher: a relative L² error below 1e-4
            on the paper's 1D problem).
        quadrature_degree: Quadrature degree of the forms (default ``2*degree + 4``).

    Returns:
        The solution u_h (a ``dolfinx.fem.Function``).
    """
    if not (isinstance(degree, int) and degree >= 1):
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    if mesh is None:
        if n is None:
            n = default_fine_resolution(problem, degree, elements_per_period)
        mesh = problem.create_mesh(comm, n)
    else:
        problem.check_mesh(mesh)
    options = {**fine_solver_options(solver), **(petsc_options or {})}

    V = fem.functionspace(mesh, ("Lagrange", degree))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(mesh)
    dx = ufl.Measure(
        "dx",
        domain=mesh,
        metadata={"quadrature_degree": quadrature_degree or _default_quadrature_degree(degree)},
    )
    K = problem.K_matrix(x)
    a = ufl.inner(K * ufl.grad(u), ufl.grad(v)) * dx
    if problem.boundary is None:
        L = problem.q(x) * v * dx - ufl.inner(problem.flux_lifting(x), ufl.grad(v)) * dx
        bcs = [_homogeneous_dirichlet(V)]
    else:
        L = problem.q(x) * v * dx
        neumann = problem.boundary.neumann_form(v, dx.metadata())
        L = L if neumann is None else L + neumann
        bcs = problem.boundary.dirichlet_bcs(V)
    uh = solve_linear(a, L, bcs, "fine", options, options)
    uh.name = f"u_{problem.name}"
    return uh


def solve_fine_directions(
    problem: MultiscaleProblem,
    n: int | Sequence[int] | None = None,
    degree: int = 1,
    comm: MPI.Comm = MPI.COMM_WORLD,
    **kwargs: Any,
) -> list[fem.Function]:
    """The d fine solutions u_0, ..., u_{d-1} of (4.8), one per lifting direction, on one mesh.

    This is the input of Algorithm 4.1 (:func:`upscaled_tensor`). Collective on ``comm``.

    Args:
        problem: The problem (its own lifting direction is ignored).
        n: Cells per direction (default as :func:`solve_fine`).
        degree: Lagrange degree.
        comm: MPI communicator.
        **kwargs: Further arguments of :func:`solve_fine` (``mesh``, ``solver``, ...).

    Returns:
        ``[u_0, ..., u_{d-1}]``.
    """
    mesh = kwargs.pop("mesh", None)
    if mesh is None:
        if n is None:
            n = default_fine_resolution(problem, degree, kwargs.get("elements_per_period"))
        mesh = problem.create_mesh(comm, n)
    return [
        solve_fine(problem.with_lifting_direction(i), degree=degree, mesh=mesh, **kwargs)
        for i in range(problem.dim)
    ]


def _homogeneous_dirichlet(V: fem.FunctionSpace) -> fem.DirichletBC:
    mesh = V.mesh
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dmesh.exterior_facet_indices(mesh.topology)
    dofs = fem.locate_dofs_topological(V, tdim - 1, facets)
    return fem.dirichletbc(default_scalar_type(0), dofs, V)


# -- the exact 1D solution ---------------------------------------------------------------------
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)
# The Lagrange basis of the Gauss nodes in Legendre form, ℓ_k = Σ_j _GL_LAGRANGE[j, k] P_j (the
# rule's discrete orthogonality is exact up to degree 47 > 2·23), its primitives from -1, and the
# integration matrix S[i, k] = ∫_{-1}^{ξ_i} ℓ_k: Q = ∫ q at the nodes of a Gauss rule from q at
# the same nodes, exactly for q of degree < 24, at 24 evaluations of q instead of 24 × 24.
_GL_LAGRANGE = (
    np.polynomial.legendre.legvander(_GL_NODES, 23).T * _GL_WEIGHTS * (np.arange(24) + 0.5)[:, None]
)
_GL_PRIMITIVE = np.polynomial.legendre.legint(_GL_LAGRANGE, lbnd=-1, axis=0)
_GL_INTEGRATION = np.polynomial.legendre.legvander(_GL_NODES, 24) @ _GL_PRIMITIVE
# Q = ∫ q on the slow scale: one Chebyshev interpolant of this degree per slow block, from its
# values at the first-kind points, checked at the interleaved second-kind points.
_SLOW_DEGREE = 24
_CHEB_POINTS = np.cos(np.pi * (np.arange(_SLOW_DEGREE + 1) + 0.5) / (_SLOW_DEGREE + 1))
_CHEB_FROM_VALUES = np.linalg.inv(np.polynomial.chebyshev.chebvander(_CHEB_POINTS, _SLOW_DEGREE))
_CHEB_CHECK_POINTS = np.cos(np.pi * np.arange(1, _SLOW_DEGREE + 1) / (_SLOW_DEGREE + 1))
_SLOW_BLOCKS = 32  # first number of slow blocks, doubled while q is not resolved
_MAX_SLOW_BLOCKS = 4096
_SLOW_TOLERANCE = 1e-13  # interpolation error of Q accepted, relative to its scale
_MIN_PERIODS = 64  # fewer whole periods: the composite rule is as cheap and needs no slow q
_TABULATED_PERIODS = 4096  # blocks of at most this many periods store J2 at every period start
_DISCRETE_GAUSS_SIZE = 14  # exact for sums of polynomials of degree <= 27 >= _SLOW_DEGREE
_MAX_CHECKPOINTS = 2**20  # stored prefix integrals of the composite rule (3 × 8 MB)
_SWEEP_SUBINTERVALS = 2**13  # subintervals per chunk of the composite rule's sweep
_CHUNK_NODES = 2**18  # quadrature nodes per chunk of a point evaluation


def _chebyshev_values(coefficients: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Σ_n coefficients[..., n] T_n(z) by Clenshaw, one coefficient row per entry of ``z``."""
    b1 = np.zeros_like(z)
    b2 = np.zeros_like(z)
    for n in range(coefficients.shape[-1] - 1, 0, -1):
        b1, b2 = coefficients[..., n] + 2.0 * z * b1 - b2, b1
    return coefficients[..., 0] + z * b1 - b2


def _exclusive_cumsum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Prefix sums that start at 0 (the integral up to the left end of each subinterval)."""
    total = np.cumsum(values, axis=axis)
    return total - values


def _discrete_gauss(count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size``-point Gauss rule of the counting measure on {0, 1, ..., count - 1}.

    Σ_{i<count} g(i) = Σ_r weights[r] g(nodes[r]) for every polynomial g of degree < 2·size, in
    O(size³) work whatever ``count``: the three-term recurrence of the discrete Chebyshev (Gram)
    polynomials is known in closed form, β_k = k²(count² - k²)/(4(4k² - 1)) (Gautschi,
    *Orthogonal Polynomials*, 2004, Table 1.2), so Golub-Welsch applies. It is written in the
    variable z = (2i - count + 1)/count in [-1, 1], where the Jacobi matrix tends to Legendre's and
    the eigenproblem is well conditioned for any count.

    Args:
        count: The number of summands, >= ``size``.
        size: The number of nodes.

    Returns:
        ``(nodes, weights)``, nodes in [0, count - 1] and positive weights summing to ``count``.
    """
    k = np.arange(1, size, dtype=np.float64)
    off_diagonal = np.sqrt(k**2 * (1.0 - (k / count) ** 2) / (4.0 * k**2 - 1.0))
    z, vectors = np.linalg.eigh(np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1))
    return 0.5 * (count - 1) + 0.5 * count * z, count * vectors[0] ** 2


class _PeriodicNotApplicable(Exception):
    """The periodic algorithm does not apply to a problem (the message says why)."""


class _PeriodicIntegrals:
    """Q(x), J1(x) = ∫_a^x 1/K and J2(x) = ∫_a^x Q/K for K periodic in x, q slow.

    K has the period P = ε·p₀ in x, so [a, b] is J whole periods [a + jP, a + (j+1)P] and a
    remainder of length R < P. The work is split so that nothing scales with J:

    - J1 over whole periods is j times one cell integral of 1/K, a composite Gauss rule on one
      period (1/8 of the finest scale per subinterval, 24 nodes), the only place K is sampled:
      on the translate of the cell nearest 0, where x/ε is small and the rounding of the nodes
      (which would repeat in every period) is ulp(P), not ulp(a); this makes the algorithm
      more accurate than the composite rule, which samples K at x/ε up to 1/ε;
    - Q = ∫ q is slow: on each of a few slow blocks (unions of whole periods) it is a Chebyshev
      interpolant p_s of degree 24, checked against quadrature at interleaved points; blocks
      are doubled while the check fails (up to 4096 or one period each), else the caller falls
      back to the composite rule. For polynomial q of degree < 24 it is exact;
    - J2 over period i is G(i) = Σ_n ω_n (1/K)(σ_n) p_s(a + iP + σ_n), the cell rule with the
      slow factor shifted: a polynomial of degree 24 in i on a block, interpolated exactly from
      25 values. J2 at the period starts, F(j) = Σ_{i<j} G(i), is then a polynomial of degree 25
      in j on a block: tabulated at every period start for blocks of at most 4096 periods,
      otherwise interpolated at 26 near-Chebyshev integers j where the partial sums are exact
      through a Gauss rule of the counting measure (:func:`_discrete_gauss`). Sums over 10^6
      periods thus cost the same as over 10^3 and carry no accumulated rounding;
    - inside one period, J2 from the period start is a product rule: Q is interpolated from q at
      24 Gauss nodes of the period, and the integrals of these basis functions against 1/K are
      tabulated once at the cell's breakpoints; then a 24-point Gauss rule from the last cell
      breakpoint to x.

    The result is exact to round-off for polynomial q (the paper's) and accurate to about
    1e-14 for smooth q. Construction costs O(blocks) work and memory, independent of J: 0.1 to
    0.4 s and under 1 MB of tables for ε from 1e-2 to 1e-8 (paper_1d, two loaded cores); a point
    costs 48 evaluations of q and 24 of K.
    """

    name = "periodic"

    def __init__(self, problem: MultiscaleProblem, subintervals_per_scale: int) -> None:
        (a,), (b,) = problem.domain.lower, problem.domain.upper
        assert problem.period is not None
        P = problem.eps * problem.period[0]
        length = b - a
        J = int(np.floor(length / P))
        R = length - J * P
        if R < 0.0:  # rounding of the floor
            J, R = J - 1, R + P
        if R >= (1.0 - 1e-12) * P:  # a whole number of periods up to rounding
            J, R = J + 1, 0.0
        if R <= 1e-12 * P:
            R = 0.0
        if J < _MIN_PERIODS:
            raise _PeriodicNotApplicable(f"{J} whole periods (< {_MIN_PERIODS})")
        self._problem, self._a, self._b, self._P, self._J, self._R = problem, a, b, P, J, R
        self._last_period = J if R > 0.0 else J - 1
        self._q = lambda t: _evaluate_1d(problem.q, t)

        # The cell rule: 1/K sampled once, on the composite Gauss rule of one period.
        m = max(1, int(np.ceil(subintervals_per_scale * P / problem.finest_scale - 1e-9)))
        h = P / m
        sigma = (np.arange(m)[:, None] + 0.5 * (_GL_NODES + 1.0)) * h
        # K(a + σ) = K(origin + σ) for the translate of a by whole periods nearest 0, where the
        # nodes carry relative rounding ulp(P)/P instead of ulp(a)/P: the rounding of the nodes
        # would repeat in every period, and K on the cell needs no domain, only its period.
        self._origin = origin = a - P * np.round(a / P)
        inverse_K = 1.0 / _evaluate_1d(problem.K, origin + sigma)
        self._check_periodicity(problem, a + sigma, inverse_K, P, J)
        weighted = inverse_K * (0.5 * h * _GL_WEIGHTS)
        self._m, self._h = m, h
        self._C1 = np.concatenate([[0.0], np.cumsum(weighted.sum(axis=1))])
        self._I1 = float(self._C1[-1])

        # Product-rule tables of the whole period [0, P] and of the remainder [0, R]: with the
        # q values at the 24 Gauss nodes of the segment, Q(start + σ_i) - Q(start) =
        # Lq[i] · q and ∫_0^{σ_i} (Q - Q(start))/K = V[i] · q at the cell breakpoints σ_i.
        V_rows, Lq_rows = [], []
        for segment in (P, R) if R > 0.0 else (P,):
            rows = m + 1 if segment == P else min(int(np.floor(R / h)), m - 1) + 1
            primitive = (
                0.5
                * segment
                * (
                    np.polynomial.legendre.legvander(2.0 * sigma[: rows - 1] / segment - 1.0, 24)
                    @ _GL_PRIMITIVE
                )
            )
            per_subinterval = np.einsum("sn,snk->sk", weighted[: rows - 1], primitive)
            V_rows.append(np.vstack([np.zeros(24), np.cumsum(per_subinterval, axis=0)]))
            breakpoints = 2.0 * np.arange(rows) * h / segment - 1.0
            Lq_rows.append(
                0.5 * segment * (np.polynomial.legendre.legvander(breakpoints, 24) @ _GL_PRIMITIVE)
            )
        self._V, self._Lq = np.vstack(V_rows), np.vstack(Lq_rows)
        self._remainder_rows = Lq_rows[-1].shape[0] if R > 0.0 else 0

        self._build_slow_primitive()
        self._build_period_sums(weighted.ravel(), sigma.ravel())

    @staticmethod
    def _check_periodicity(
        problem: MultiscaleProblem, cell: np.ndarray, inverse_K: np.ndarray, P: float, J: int
    ) -> None:
        """Refuse a declared period that K does not have (the composite rule then applies)."""
        for shift in (0, J // 2, J - 1):
            shifted = 1.0 / _evaluate_1d(problem.K, cell + shift * P)
            # The tolerance is far above the rounding of x/ε at 1e6 periods (about 1e-10) and
            # far below the mismatch of a wrong period.
            if np.max(np.abs(shifted - inverse_K)) > 1e-6 * np.max(np.abs(inverse_K)):
                import warnings

                warnings.warn(
                    f"problem.period = {problem.period}: K(x + ε·p₀) differs from K(x), so "
                    "exact_1d ignores the period and uses the composite rule (time ∝ 1/ε)",
                    RuntimeWarning,
                    stacklevel=5,
                )
                raise _PeriodicNotApplicable("K does not have the declared period")

    def _build_slow_primitive(self) -> None:
        """Chebyshev interpolants of Q on blocks of whole periods, refined until q is resolved."""
        a, b, P, J = self._a, self._b, self._P, self._J
        blocks = min(_SLOW_BLOCKS, J)
        while True:
            starts = np.unique(np.round(np.arange(blocks + 1) * (J / blocks)).astype(np.int64))
            edges = a + starts * P
            edges[-1] = b  # the last block holds the remainder
            left, right = edges[:-1, None], edges[1:, None]

            def primitive_from_left(t: np.ndarray, left: np.ndarray = left) -> np.ndarray:
                half = 0.5 * (t - left)
                nodes = left[..., None] + half[..., None] * (_GL_NODES + 1.0)
                return half * (self._q(nodes) @ _GL_WEIGHTS)

            block_integrals = primitive_from_left(right)[:, 0]
            Q_left = _exclusive_cumsum(block_integrals)[:, None]
            points = left + 0.5 * (right - left) * (_CHEB_POINTS + 1.0)
            values = Q_left + primitive_from_left(points)
            coefficients = values @ _CHEB_FROM_VALUES.T
            check = left + 0.5 * (right - left) * (_CHEB_CHECK_POINTS + 1.0)
            expected = Q_left + primitive_from_left(check)
            interpolated = (
                coefficients
                @ np.polynomial.chebyshev.chebvander(_CHEB_CHECK_POINTS, _SLOW_DEGREE).T
            )
            scale = max(
                float(np.abs(values).max()),
                (b - a) * float(np.abs(self._q(points)).max()),
                np.finfo(float).tiny,
            )
            if np.max(np.abs(interpolated - expected)) <= _SLOW_TOLERANCE * scale:
                break
            if blocks >= min(J, _MAX_SLOW_BLOCKS):
                raise _PeriodicNotApplicable(
                    f"q is not resolved by {blocks} Chebyshev blocks of degree {_SLOW_DEGREE}"
                )
            blocks = min(2 * blocks, J, _MAX_SLOW_BLOCKS)
        self._block_starts, self._block_edges = starts, edges
        self._block_coefficients = coefficients
        # ∫_a^b Q exactly from the interpolants: ∫_{-1}^{1} T_n = 2/(1 - n²) for even n.
        moments = np.zeros(_SLOW_DEGREE + 1)
        moments[::2] = 2.0 / (1.0 - np.arange(0, _SLOW_DEGREE + 1, 2) ** 2)
        self.integral_of_Q = float(0.5 * (np.diff(edges) * (coefficients @ moments)).sum())

    def _slow(self, x: np.ndarray, block: np.ndarray | None = None) -> np.ndarray:
        """Q at points x (any shape), in the given blocks or in the blocks that contain them."""
        edges = self._block_edges
        if block is None:
            block = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        block = np.broadcast_to(block, x.shape)
        flat_x, flat_block = x.reshape(-1), block.reshape(-1)
        out = np.empty_like(flat_x)
        step = _CHUNK_NODES // (_SLOW_DEGREE + 1)
        for start in range(0, len(flat_x), step):
            t, s = flat_x[start : start + step], flat_block[start : start + step]
            z = (2.0 * t - edges[s] - edges[s + 1]) / (edges[s + 1] - edges[s])
            out[start : start + step] = _chebyshev_values(self._block_coefficients[s], z)
        return out.reshape(x.shape)

    def _build_period_sums(self, cell_weights: np.ndarray, sigma: np.ndarray) -> None:
        """F(j) = J2(a + jP) for every whole period j, as tables or exact interpolants per block."""
        a, P, D = self._a, self._P, _SLOW_DEGREE
        starts = self._block_starts
        counts = np.diff(starts)

        def G(tau: np.ndarray, block: np.ndarray) -> np.ndarray:
            """∫ of Q/K over the periods starting at a + τP (real τ), in the given blocks."""
            out = np.empty(len(tau))
            step = max(1, _CHUNK_NODES // len(sigma))
            for start in range(0, len(tau), step):
                t = a + tau[start : start + step, None] * P + sigma
                Q = self._slow(t, block[start : start + step, None])
                out[start : start + step] = Q @ cell_weights
            return out

        # The slow factor of the period sums: G at integers (short blocks) or at Chebyshev points.
        short = counts <= D + 1
        tau = [
            starts[s] + (np.arange(M) if short[s] else 0.5 * (M - 1) * (_CHEB_POINTS + 1.0))
            for s, M in enumerate(counts)
        ]
        block_of = np.concatenate([np.full(len(t), s) for s, t in enumerate(tau)])
        values = np.split(G(np.concatenate(tau), block_of), np.cumsum([len(t) for t in tau])[:-1])

        coefficients = [None if short[s] else v @ _CHEB_FROM_VALUES.T for s, v in enumerate(values)]

        def g(s: int, i: np.ndarray) -> np.ndarray:
            """G(starts[s] + i) at integers or reals i in [0, counts[s] - 1]."""
            if short[s]:
                return values[s][np.asarray(i, dtype=np.int64)]
            z = 2.0 * i / (counts[s] - 1) - 1.0
            return np.polynomial.chebyshev.chebval(z, coefficients[s])

        tables: list[np.ndarray] = []
        nodes = np.zeros((len(counts), D + 2))
        node_values = np.zeros_like(nodes)
        rules: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        totals = np.empty(len(counts))
        tabulated = counts <= _TABULATED_PERIODS
        for s, M in enumerate(counts):
            if tabulated[s]:
                table = np.concatenate([[0.0], np.cumsum(g(s, np.arange(M)))])
                tables.append(table)
                totals[s] = table[-1]
                continue
            # Σ_{i<r} G(starts[s] + i) is a polynomial of degree D + 1 in r: its values at D + 2
            # distinct near-Chebyshev integers r (M > 4096 keeps them apart) determine it.
            r = np.round(0.5 * M * (1.0 - np.cos(np.pi * np.arange(D + 2) / (D + 1))))
            nodes[s] = r
            summands, sum_weights = [], []
            for count in r.astype(np.int64):
                if count <= 2 * _DISCRETE_GAUSS_SIZE:  # too few summands for the rule
                    summands.append(np.arange(count, dtype=np.float64))
                    sum_weights.append(np.ones(count))
                    continue
                if count not in rules:
                    rules[count] = _discrete_gauss(count, _DISCRETE_GAUSS_SIZE)
                summands.append(rules[count][0])
                sum_weights.append(rules[count][1])
            which = np.repeat(np.arange(D + 2), [len(w) for w in sum_weights])
            node_values[s] = np.bincount(
                which,
                np.concatenate(sum_weights) * g(s, np.concatenate(summands)),
                minlength=D + 2,
            )
            totals[s] = node_values[s, -1]
            tables.append(np.zeros(0))
        self._tabulated = tabulated
        self._table = np.concatenate(tables)
        self._table_offsets = np.concatenate([[0], np.cumsum([len(t) for t in tables])[:-1]])
        self._F_starts = _exclusive_cumsum(totals)
        self._sum_nodes, self._sum_values = nodes, node_values
        # Barycentric weights of the nodes, in y = 2r/M - 1 (well scaled, near Chebyshev).
        self._sum_weights = np.zeros_like(nodes)
        big = ~tabulated
        y = 2.0 * nodes[big] / counts[big, None] - 1.0
        differences = y[:, :, None] - y[:, None, :] + np.eye(D + 2)
        barycentric = 1.0 / differences.prod(axis=2)
        self._sum_weights[big] = barycentric / np.abs(barycentric).max(axis=1, keepdims=True)

    def _period_sums(self, j: np.ndarray) -> np.ndarray:
        """F(j) = J2(a + jP) for integer period indices j in [0, J]."""
        starts = self._block_starts
        s = np.clip(np.searchsorted(starts, j, side="right") - 1, 0, len(starts) - 2)
        r = j - starts[s]
        out = self._F_starts[s].copy()
        tabulated = self._tabulated[s]
        out[tabulated] += self._table[self._table_offsets[s[tabulated]] + r[tabulated]]
        big = np.flatnonzero(~tabulated)
        if len(big):
            # Barycentric interpolation (second form; the scale of r cancels).
            sb = s[big]
            difference = r[big, None] - self._sum_nodes[sb]
            hit = difference == 0.0
            difference[hit] = 1.0
            ratio = self._sum_weights[sb] / difference
            values = self._sum_values[sb]
            interpolated = np.einsum("ij,ij->i", ratio, values) / ratio.sum(axis=1)
            interpolated[hit.any(axis=1)] = values[hit]  # r on a node: its value
            out[big] += interpolated
        return out

    def primitive(self, x: np.ndarray) -> np.ndarray:
        """Q(x) = ∫_a^x q."""
        return self._slow(x)

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q, J1, J2) at points x in [a, b], in chunks of bounded memory."""
        out = np.empty((3, len(x)))
        step = max(1, _CHUNK_NODES // 48)
        for start in range(0, len(x), step):
            out[:, start : start + step] = self._evaluate_chunk(x[start : start + step])
        return out[0], out[1], out[2]

    def _evaluate_chunk(self, x: np.ndarray) -> np.ndarray:
        a, P, h = self._a, self._P, self._h
        j = np.clip(np.floor((x - a) / P), 0, self._last_period).astype(np.int64)
        remainder = j == self._J
        segment = np.where(remainder, self._R, P)
        s = np.clip(x - a - j * P, 0.0, segment)
        last_row = np.where(remainder, min(self._remainder_rows, self._m) - 1, self._m - 1)
        i = np.clip(np.floor(s / h).astype(np.int64), 0, last_row)
        row = i + np.where(remainder, self._m + 1, 0)
        start = a + j * P
        # q at the 24 Gauss nodes of the segment: Q and Q/K up to the cell breakpoint i.
        q_segment = self._q(start[:, None] + 0.5 * segment[:, None] * (_GL_NODES + 1.0))
        Q_start = self._slow(start)
        Q_left = Q_start + np.einsum("ij,ij->i", self._Lq[row], q_segment)
        J1 = j * self._I1 + self._C1[i]
        J2 = (
            self._period_sums(j)
            + Q_start * self._C1[i]
            + np.einsum("ij,ij->i", self._V[row], q_segment)
        )
        # A Gauss rule from the cell breakpoint to x (1/K at the same point of the cell).
        left = i * h
        half = 0.5 * np.maximum(s - left, 0.0)
        local = left[:, None] + half[:, None] * (_GL_NODES + 1.0)
        q_partial = self._q(start[:, None] + local)
        inverse_K = 1.0 / _evaluate_1d(self._problem.K, self._origin + local)
        Q_partial = Q_left[:, None] + half[:, None] * (q_partial @ _GL_INTEGRATION.T)
        Q = Q_left + half * (q_partial @ _GL_WEIGHTS)
        J1 = J1 + half * (inverse_K @ _GL_WEIGHTS)
        J2 = J2 + half * ((inverse_K * Q_partial) @ _GL_WEIGHTS)
        return np.stack([Q, J1, J2])


class _CompositeIntegrals:
    """Q, J1 = ∫ 1/K and J2 = ∫ Q/K by a composite Gauss rule over the whole domain, in chunks.

    For any coefficient: 24-node Gauss-Legendre on ``count`` equal subintervals of at most
    1/``subintervals_per_scale`` of the finest oscillation, Q at the nodes by the integration
    matrix. One sweep over the subintervals (chunks of 8192) stores the prefix integrals at no
    more than 2^20 checkpoints (every B-th breakpoint, B = 1 up to 2^20 subintervals); a point
    adds the B - 1 or fewer whole subintervals from its checkpoint and a Gauss rule up to x.
    Memory is bounded (tens of MB) whatever ε. Time grows like 1/ε: the sweep's with the number
    of subintervals (quasi_periodic_1d: 1.4·10^4 of them and 0.2 s at ε = 1e-3, 1.4·10^6 and
    16 s at ε = 1e-5, measured on two loaded cores), a point's with B (24 B evaluations of q
    and of K).
    """

    name = "composite"

    def __init__(self, problem: MultiscaleProblem, subintervals_per_scale: int) -> None:
        (a,), (b,) = problem.domain.lower, problem.domain.upper
        self._problem, self._a, self._b = problem, a, b
        count = max(64, int(np.ceil(subintervals_per_scale * (b - a) / problem.finest_scale)))
        self._count, self._h = count, (b - a) / count
        self._B = B = -(-count // _MAX_CHECKPOINTS)
        self._checkpoints = np.zeros((3, -(-count // B)))  # Q, J1, J2 at breakpoints kB
        running = np.zeros(4)  # Q, J1, J2 and ∫ Q up to the current breakpoint
        chunk = B * max(1, _SWEEP_SUBINTERVALS // B)
        for first in range(0, count, chunk):
            index = np.arange(first, min(first + chunk, count))
            integrals = np.stack(self._rule(index, np.asarray(running[0])))
            prefix = running[:3, None] + _exclusive_cumsum(integrals[:3], axis=1)
            stored = index % B == 0
            self._checkpoints[:, index[stored] // B] = prefix[:, stored]
            running += integrals.sum(axis=1)
        self.integral_of_Q = float(running[3])

    def _rule(
        self, index: np.ndarray, Q_start: np.ndarray, used: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """∫ q, ∫ 1/K, ∫ Q/K and ∫ Q over the consecutive subintervals ``index[..., k]``.

        Q starts from ``Q_start`` (shape ``index.shape[:-1]``) at the left end of the first; the
        subintervals where ``used`` is False contribute nothing.
        """
        half = 0.5 * self._h
        nodes = self._a + (index[..., None] + 0.5 * (_GL_NODES + 1.0)) * self._h
        nodes = np.minimum(nodes, self._b)
        q = _evaluate_1d(self._problem.q, nodes)
        inverse_K = 1.0 / _evaluate_1d(self._problem.K, nodes)
        dq = half * (q @ _GL_WEIGHTS)
        if used is not None:
            dq = np.where(used, dq, 0.0)
        Q = (Q_start[..., None] + _exclusive_cumsum(dq))[..., None] + half * (q @ _GL_INTEGRATION.T)
        integrals = [
            half * (inverse_K @ _GL_WEIGHTS),
            half * ((inverse_K * Q) @ _GL_WEIGHTS),
            half * (Q @ _GL_WEIGHTS),
        ]
        if used is not None:
            integrals = [np.where(used, value, 0.0) for value in integrals]
        return dq, integrals[0], integrals[1], integrals[2]

    def primitive(self, x: np.ndarray) -> np.ndarray:
        """Q(x) = ∫_a^x q (without the integrals of 1/K where no checkpoint is crossed)."""
        out = np.empty(len(x))
        step = max(1, _CHUNK_NODES // (48 * self._B))
        for start in range(0, len(x), step):
            out[start : start + step] = self._evaluate_chunk(x[start : start + step], False)[0]
        return out

    def evaluate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q, J1, J2) at points x in [a, b], in chunks of bounded memory."""
        out = np.empty((3, len(x)))
        step = max(1, _CHUNK_NODES // (48 * self._B))
        for start in range(0, len(x), step):
            out[:, start : start + step] = self._evaluate_chunk(x[start : start + step], True)
        return out[0], out[1], out[2]

    def _evaluate_chunk(self, x: np.ndarray, with_K: bool) -> np.ndarray:
        a, h, B = self._a, self._h, self._B
        i = np.clip(np.floor((x - a) / h).astype(np.int64), 0, self._count - 1)
        checkpoint = i // B
        Q, J1, J2 = self._checkpoints[:, checkpoint]
        whole = i - checkpoint * B  # whole subintervals between the checkpoint and x's
        if whole.max(initial=0) > 0:
            offsets = np.arange(whole.max())
            index = checkpoint[:, None] * B + offsets
            dq, d1, d2, _ = self._rule(index, Q, used=offsets < whole[:, None])
            Q, J1, J2 = Q + dq.sum(axis=1), J1 + d1.sum(axis=1), J2 + d2.sum(axis=1)
        left = a + i * h
        half = 0.5 * (x - left)
        nodes = left[:, None] + half[:, None] * (_GL_NODES + 1.0)
        q = _evaluate_1d(self._problem.q, nodes)
        if not with_K:
            return (Q + half * (q @ _GL_WEIGHTS))[None]
        inverse_K = 1.0 / _evaluate_1d(self._problem.K, nodes)
        Q_nodes = Q[:, None] + half[:, None] * (q @ _GL_INTEGRATION.T)
        return np.stack(
            [
                Q + half * (q @ _GL_WEIGHTS),
                J1 + half * (inverse_K @ _GL_WEIGHTS),
                J2 + half * ((inverse_K * Q_nodes) @ _GL_WEIGHTS),
            ]
        )


def _evaluate_1d(function: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """A problem's numpy function (K or q) at 1D points of any shape, in that shape."""
    return np.asarray(function(x.reshape(-1, 1)), dtype=np.float64).reshape(x.shape)


class ExactSolution1D:
    """The exact solution of a 1D problem (4.8) by the closed form [HS (5.3)], at any ε.

    For the lifted problem -(K w')' = q, w(a) = a, w(b) = b and u = w - x: K w' = c - Q with
    Q(x) = ∫_a^x q, so u' = (c - Q)/K - 1, u(x) = c J1(x) - J2(x) - (x - a) with J1 = ∫_a^x 1/K and
    J2 = ∫_a^x Q/K, and c = (L + J2(b))/J1(b) from u(b) = 0. The integrals need every oscillation
    of K resolved, so a composite rule over the whole domain costs O(1/ε) (the previous one held
    it all in memory: 34 GiB at ε = 1e-3). Two algorithms keep the cost bounded:

    - ``"periodic"`` (``problem.period`` set, at least 64 whole periods and a slow q, as in
      :func:`~dolfinx_pinn.problems.paper_1d`): time and memory independent of ε, because 1/K
      is integrated on one cell only and the sums over the periods of the slow factor Q are done
      exactly on slow blocks (see :class:`_PeriodicIntegrals`); 0.1 to 0.4 s and a few MB to
      build at any ε (1e-6 and below), exact to round-off for polynomial q (the paper's
      q = -3(2x - 1), against the closed form) and to about 1e-14 for smooth q;
    - ``"composite"`` (any other coefficient: quasi-periodic, Weierstrass-type, or few periods):
      a composite Gauss rule on subintervals of 1/8 of the finest oscillation, swept in chunks
      with the prefix integrals kept at no more than 2^20 checkpoints, so that memory stays
      bounded (tens of MB) whatever ε while time grows like 1/ε (see
      :class:`_CompositeIntegrals`: 0.2 s at ε = 1e-3 for quasi_periodic_1d, 16 s at 1e-5).

    A declared period that K does not have (checked on three cells) warns and falls back to the
    composite rule; so does, silently, a q that the slow blocks do not resolve (correct, only
    slower). Points are evaluated in chunks of bounded memory, each by a 24-point Gauss rule
    from the last cell (or subinterval) breakpoint to x: 10^5 points take about 0.3-0.8 s.

    Args:
        problem: A 1D problem with scalar K.
        subintervals_per_scale: Subintervals per ``problem.finest_scale`` (24 Gauss nodes each).

    Attributes:
        c: The flux constant.
        K_tilde: The exact upscaled coefficient (4.10), ⟨K (u' + 1)⟩_Ω.
        algorithm: ``"periodic"`` or ``"composite"``, the algorithm used.
    """

    def __init__(self, problem: MultiscaleProblem, subintervals_per_scale: int = 8) -> None:
        if problem.dim != 1 or problem.is_tensor:
            raise ValueError(f"problem: exact_1d needs a 1D problem with scalar K, got {problem}")
        if not (isinstance(subintervals_per_scale, int) and subintervals_per_scale >= 1):
            raise ValueError(
                f"subintervals_per_scale must be an integer >= 1, got {subintervals_per_scale!r}"
            )
        self.problem = problem
        (self._a,), (self._b,) = problem.domain.lower, problem.domain.upper
        length = self._b - self._a
        integrals: _PeriodicIntegrals | _CompositeIntegrals | None = None
        if problem.period is not None:
            try:
                integrals = _PeriodicIntegrals(problem, subintervals_per_scale)
            except _PeriodicNotApplicable:
                integrals = None
        if integrals is None:
            integrals = _CompositeIntegrals(problem, subintervals_per_scale)
        self._integrals = integrals
        self.algorithm: str = integrals.name
        _, J1, J2 = integrals.evaluate(np.array([self._b]))
        self.c = float((length + J2[0]) / J1[0])
        self.K_tilde = float((self.c * length - integrals.integral_of_Q) / length)

    @staticmethod
    def _eval(function: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        return _evaluate_1d(function, x)

    @staticmethod
    def _as_points(x: npt.ArrayLike) -> np.ndarray:
        return np.asarray(x, dtype=np.float64).reshape(-1)

    def u(self, x: npt.ArrayLike) -> np.ndarray:
        """The exact solution at points of shape ``(N,)`` or ``(N, 1)``; returns ``(N,)``."""
        x = self._as_points(x)
        _, J1, J2 = self._integrals.evaluate(x)
        return self.c * J1 - J2 - (x - self._a)

    def du(self, x: npt.ArrayLike) -> np.ndarray:
        """u'(x) = (c - Q)/K - 1 at points of shape ``(N,)`` or ``(N, 1)``; returns ``(N,)``."""
        x = self._as_points(x)
        return (self.c - self._integrals.primitive(x)) / _evaluate_1d(self.problem.K, x) - 1.0

    def value(self, points: npt.ArrayLike) -> np.ndarray:
        """U at points ``(N, 1)`` (the :class:`GradientCallable` protocol)."""
        return self.u(points)

    def gradient(self, points: npt.ArrayLike) -> np.ndarray:
        """∇u at points ``(N, 1)``, shape ``(N, 1)``."""
        return self.du(points)[:, None]

    def torch_u(self, x: torch.Tensor) -> torch.Tensor:
        """U on a torch tensor ``(N,)`` or ``(N, 1)`` (no autograd), same device and dtype."""
        return torch.as_tensor(self.u(x.detach().cpu().numpy()), dtype=x.dtype, device=x.device)

    def torch_du(self, x: torch.Tensor) -> torch.Tensor:
        """U' on a torch tensor ``(N,)`` or ``(N, 1)`` (no autograd), same device and dtype."""
        return torch.as_tensor(self.du(x.detach().cpu().numpy()), dtype=x.dtype, device=x.device)


def exact_1d(problem: MultiscaleProblem) -> ExactSolution1D:
    """The exact solution of a 1D problem (4.8) for any coefficient and any ε, [HS (5.3)].

    Periodic coefficients cost the same at every ε; others bounded memory and time ∝ 1/ε (see
    :class:`ExactSolution1D`).

    Args:
        problem: A 1D problem with a scalar coefficient.

    Returns:
        An :class:`ExactSolution1D` with ``u``, ``du`` (numpy), ``torch_u``, ``torch_du``,
        ``c`` and ``K_tilde``.
    """
    return ExactSolution1D(problem)


# -- errors ------------------------------------------------------------------------------------
@runtime_checkable
class GradientCallable(Protocol):
    """Anything with ``value(points) -> (N,)`` and ``gradient(points) -> (N, d)`` on numpy."""

    def value(self, points: np.ndarray) -> np.ndarray:
        """Values at points ``(N, d)``."""
        ...

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """Gradients at points ``(N, d)``."""
        ...


@dataclass
class _QuadratureData:
    points: np.ndarray  # (cells, nq, d) physical points
    weights: np.ndarray  # (cells, nq) weights times |det J|
    reference_points: np.ndarray
    cells: np.ndarray


def _quadrature(mesh: dmesh.Mesh, degree: int) -> _QuadratureData:
    tdim = mesh.topology.dim
    cell_type = basix.CellType[mesh.topology.cell_name()]
    reference_points, reference_weights = basix.make_quadrature(cell_type, degree)
    cells = np.arange(mesh.topology.index_map(tdim).size_local, dtype=np.int32)
    x = ufl.SpatialCoordinate(mesh)
    coordinates = fem.Expression(x, reference_points).eval(mesh, cells)
    detJ = fem.Expression(abs(ufl.JacobianDeterminant(mesh)), reference_points).eval(mesh, cells)
    return _QuadratureData(
        points=coordinates.reshape(len(cells), len(reference_weights), -1)[:, :, :tdim],
        weights=detJ.reshape(len(cells), -1) * reference_weights,
        reference_points=reference_points,
        cells=cells,
    )


def _function_on_quadrature(
    u: fem.Function, mesh: dmesh.Mesh, data: _QuadratureData
) -> tuple[np.ndarray, np.ndarray]:
    """Values ``(cells, nq)`` and gradients ``(cells, nq, d)`` of u at the quadrature points."""
    tdim = mesh.topology.dim
    shape = data.weights.shape
    if u.function_space.mesh is mesh:
        values = fem.Expression(u, data.reference_points).eval(mesh, data.cells)
        grads = fem.Expression(ufl.grad(u), data.reference_points).eval(mesh, data.cells)
        return values.reshape(shape), grads.reshape(*shape, -1)[:, :, :tdim]
    # Another mesh: interpolate u and its (piecewise-polynomial, hence exactly representable)
    # gradient into quadrature spaces of the reference mesh, i.e. evaluate them exactly at the
    # reference quadrature points, wherever in the partition they live.
    source_mesh = u.function_space.mesh
    degree = u.function_space.ufl_element().embedded_superdegree
    gradient_space = fem.functionspace(
        source_mesh, ("Discontinuous Lagrange", max(degree - 1, 0), (source_mesh.geometry.dim,))
    )
    gradient = fem.Function(gradient_space)
    gradient.interpolate(fem.Expression(ufl.grad(u), gradient_space.element.interpolation_points))
    cell_type = mesh.basix_cell()
    rule_degree = _degree_of_rule(cell_type, len(data.reference_points))
    results = []
    for function, value_shape in ((u, ()), (gradient, (source_mesh.geometry.dim,))):
        element = basix.ufl.quadrature_element(
            cell_type, value_shape=value_shape, degree=rule_degree
        )
        target = fem.Function(fem.functionspace(mesh, element))
        num_cells = (
            mesh.topology.index_map(tdim).size_local + mesh.topology.index_map(tdim).num_ghosts
        )
        all_cells = np.arange(num_cells, dtype=np.int32)
        interpolation_data = fem.create_interpolation_data(
            target.function_space, function.function_space, all_cells, padding=1e-10
        )
        target.interpolate_nonmatching(function, all_cells, interpolation_data)
        block = target.function_space.dofmap.bs
        dofs = target.function_space.dofmap.list[data.cells]
        array = target.x.array.reshape(-1, block)[dofs]
        results.append(array)
    return results[0].reshape(shape), results[1].reshape(*shape, -1)[:, :, :tdim]


def _degree_of_rule(cell_type: basix.CellType, num_points: int) -> int:
    for degree in range(0, 40):
        if len(basix.make_quadrature(cell_type, degree)[1]) == num_points:
            return degree
    raise RuntimeError("could not recover the quadrature degree")  # pragma: no cover


def _function_at_points(
    u: fem.Function, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The values and gradients at global points from this rank's owned cells, and ``found``.

    Zeros where this rank's owned cells do not hold a point (``found`` 0 there), so a sum over
    the ranks assembles the whole arrays. The gradient is interpolated into the discontinuous
    vector space of the same degree first (exact for Lagrange elements).
    """
    import dolfinx.geometry

    mesh = u.function_space.mesh
    tdim, gdim = mesh.topology.dim, mesh.geometry.dim
    degree = u.function_space.ufl_element().embedded_superdegree
    space = fem.functionspace(mesh, ("Discontinuous Lagrange", degree, (gdim,)))
    gradient = fem.Function(space)
    gradient.interpolate(fem.Expression(ufl.grad(u), space.element.interpolation_points))
    owned = np.arange(mesh.topology.index_map(tdim).size_local, dtype=np.int32)
    tree = dolfinx.geometry.bb_tree(mesh, tdim, entities=owned)
    padded = np.zeros((len(points), 3))
    padded[:, : points.shape[1]] = points
    candidates = dolfinx.geometry.compute_collisions_points(tree, padded)
    colliding = dolfinx.geometry.compute_colliding_cells(mesh, candidates, padded)
    counts = np.diff(colliding.offsets)
    hit = np.flatnonzero(counts > 0)
    cells = colliding.array[colliding.offsets[:-1][hit]]
    values = np.zeros(len(points))
    grads = np.zeros((len(points), points.shape[1]))
    found = np.zeros(len(points))
    if len(hit):
        values[hit] = u.eval(padded[hit], cells).reshape(-1)
        grads[hit] = gradient.eval(padded[hit], cells).reshape(len(hit), -1)[:, : points.shape[1]]
        found[hit] = 1.0
    return values, grads, found


def _relative(
    weights: np.ndarray,
    c_values: np.ndarray,
    c_grads: np.ndarray,
    r_values: np.ndarray,
    r_grads: np.ndarray,
    comm: MPI.Comm,
) -> tuple[float, float]:
    """Relative L² and H¹-seminorm errors from this rank's weighted values (collective)."""
    local = np.array(
        [
            (weights * (c_values - r_values) ** 2).sum(),
            (weights * r_values**2).sum(),
            (weights * ((c_grads - r_grads) ** 2).sum(axis=-1)).sum(),
            (weights * (r_grads**2).sum(axis=-1)).sum(),
        ]
    )
    total = comm.allreduce(local, op=MPI.SUM)
    if total[1] <= 0 or total[3] <= 0:
        raise ValueError("reference: its L² norm or H¹ seminorm is zero, relative errors undefined")
    return float(np.sqrt(total[0] / total[1])), float(np.sqrt(total[2] / total[3]))


def _sampled_errors(candidate: Any, reference: fem.Function, samples: int) -> tuple[float, float]:
    """Relative errors by equal-weight scrambled Sobol' points in the reference's mesh.

    The same global points on every rank; each point is evaluated by the ranks whose owned
    cells hold it (a point on a partition boundary by each, then averaged), and the sums are
    reduced, so the estimate does not depend on the partition.
    """
    from dolfinx_pinn.coarse import sobol_points

    mesh = reference.function_space.mesh
    comm = mesh.comm
    dim = mesh.topology.dim
    x = mesh.geometry.x[:, :dim]
    local_lower = x.min(axis=0) if len(x) else np.full(dim, np.inf)
    local_upper = x.max(axis=0) if len(x) else np.full(dim, -np.inf)
    lower, upper = np.empty(dim), np.empty(dim)
    comm.Allreduce(np.ascontiguousarray(local_lower), lower, op=MPI.MIN)
    comm.Allreduce(np.ascontiguousarray(local_upper), upper, op=MPI.MAX)
    points = sobol_points(lower, upper, samples, seed=7)
    r_values, r_grads, found = _function_at_points(reference, points)
    if isinstance(candidate, fem.Function):
        c_values, c_grads, c_found = _function_at_points(candidate, points)
        c_values = comm.allreduce(c_values, op=MPI.SUM)
        c_grads = comm.allreduce(c_grads, op=MPI.SUM)
        c_found = comm.allreduce(c_found, op=MPI.SUM)
        mine = found > 0
        # A candidate on another mesh may miss points the reference holds (curved boundaries
        # approximated differently): those points are left out of both sums.
        mine &= c_found > 0
        c_values = c_values[mine] / c_found[mine]
        c_grads = c_grads[mine] / c_found[mine, None]
    else:
        mine = found > 0
        c_values, c_grads = _candidate_on_points(candidate, points[mine])
    total_found = comm.allreduce(found, op=MPI.SUM)
    share = 1.0 / np.maximum(total_found[mine], 1.0)
    r_values, r_grads = r_values[mine], r_grads[mine]
    return _relative(share, c_values, c_grads, r_values, r_grads, comm)


def _candidate_on_points(candidate: Any, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and gradients of a network or a pair of callables at points ``(N, d)``."""
    if isinstance(candidate, torch.nn.Module):
        return network_values_and_gradients(candidate, points)
    if isinstance(candidate, GradientCallable):
        value, gradient = candidate.value, candidate.gradient
    elif (
        isinstance(candidate, (tuple, list))
        and len(candidate) == 2
        and all(map(callable, candidate))
    ):
        value, gradient = candidate
    else:
        raise TypeError(
            "candidate/reference must be a dolfinx Function, a torch.nn.Module, an object with "
            "value/gradient methods, or a pair of callables (u, grad_u) on points (N, d); "
            f"got {type(candidate)}"
        )
    dim = points.shape[1]
    return (
        np.asarray(value(points), dtype=np.float64).reshape(-1),
        np.asarray(gradient(points), dtype=np.float64).reshape(-1, dim),
    )


def _candidate_on_quadrature(
    candidate: Any, mesh: dmesh.Mesh, data: _QuadratureData
) -> tuple[np.ndarray, np.ndarray]:
    shape = data.weights.shape
    flat_points = data.points.reshape(-1, data.points.shape[-1])
    if isinstance(candidate, fem.Function):
        return _function_on_quadrature(candidate, mesh, data)
    values, grads = _candidate_on_points(candidate, flat_points)
    return values.reshape(shape), grads.reshape(*shape, -1)


def relative_errors(
    candidate: Any,
    reference: Any,
    *,
    mesh: dmesh.Mesh | None = None,
    quadrature_degree: int | None = None,
    max_points: int = MAX_QUADRATURE_POINTS,
    samples: int = ERROR_SAMPLES,
) -> tuple[float, float]:
    """Relative L² and H¹-seminorm errors ‖c - r‖/‖r‖ and |c - r|₁/|r|₁.

    The integrals are computed on the reference mesh (or, for a reference given as callables,
    on the candidate's mesh or ``mesh``) with a Gauss rule of degree ``quadrature_degree``
    (default ``2*degree + 4`` >= 2·degree + 2, with ``degree`` that of the Function on the mesh),
    each rank summing over its owned cells. A Function reference whose rule would take more
    than ``max_points`` points (a 3D reference resolving ε: 10⁶ cells times 45 points, hours
    for a two-scale network) is integrated instead by ``samples`` equal-weight scrambled
    Sobol' points in its mesh (a quasi-Monte Carlo estimate whose points' phases ``x/ε`` are
    equidistributed; its relative error is a few per cent of the error it measures).

    Collective on the mesh's communicator.

    Args:
        candidate: A dolfinx Function (on any mesh), a torch network mapping points ``(N, d)``
            to values ``(N,)``, an object with ``value``/``gradient`` methods (such as
            :class:`ExactSolution1D`), or a pair of numpy callables ``(u, grad_u)``.
        reference: The same kinds as ``candidate``.
        mesh: The integration mesh when neither argument is a dolfinx Function.
        quadrature_degree: Degree of the Gauss rule.
        max_points: The most quadrature points before a Function reference is sampled.
        samples: The number of QMC points of the sampled estimate.

    Returns:
        ``(relative_l2, relative_h1_seminorm)``.
    """
    degree = 1
    if isinstance(reference, fem.Function):
        mesh = reference.function_space.mesh
        degree = reference.function_space.ufl_element().embedded_superdegree
    elif isinstance(candidate, fem.Function) and mesh is None:
        mesh = candidate.function_space.mesh
        degree = candidate.function_space.ufl_element().embedded_superdegree
    if mesh is None:
        raise ValueError("mesh: give an integration mesh when neither argument is a Function")
    quadrature_degree = quadrature_degree or _default_quadrature_degree(degree)
    if quadrature_degree < 2 * degree + 2:
        raise ValueError(
            f"quadrature_degree must be >= 2*degree + 2 = {2 * degree + 2}, got {quadrature_degree}"
        )
    for name, value in (("max_points", max_points), ("samples", samples)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(reference, fem.Function):
        tdim = mesh.topology.dim
        rule = len(
            basix.make_quadrature(basix.CellType[mesh.topology.cell_name()], quadrature_degree)[1]
        )
        if mesh.topology.index_map(tdim).size_global * rule > max_points:
            return _sampled_errors(candidate, reference, samples)
    data = _quadrature(mesh, quadrature_degree)
    c_values, c_grads = _candidate_on_quadrature(candidate, mesh, data)
    r_values, r_grads = _candidate_on_quadrature(reference, mesh, data)
    return _relative(data.weights, c_values, c_grads, r_values, r_grads, mesh.comm)


# -- upscaling ---------------------------------------------------------------------------------
def _dx(mesh: dmesh.Mesh, u: fem.Function, quadrature_degree: int | None) -> ufl.Measure:
    degree = u.function_space.ufl_element().embedded_superdegree
    return ufl.Measure(
        "dx",
        domain=mesh,
        metadata={"quadrature_degree": quadrature_degree or _default_quadrature_degree(degree)},
    )


def upscaled_coefficient(
    problem: MultiscaleProblem, u: fem.Function, quadrature_degree: int | None = None
) -> float:
    """The upscaled coefficient (4.10): K̃_ii = ⟨(K (∇u + e_i))·e_i⟩_Ω, i the lifting direction.

    For |Ω| = 1 this is the paper's ∫_Ω K (∂_i u + 1) dx; in general it is the Ω-average, which
    is what (4.7) gives with ⟨∇w_i⟩_Ω = e_i (4.9).

    Collective on the mesh's communicator.

    Args:
        problem: The problem u solves (its lifting direction i).
        u: The fine solution of (4.8) (a dolfinx Function).
        quadrature_degree: Quadrature degree (default ``2*degree + 4``).

    Returns:
        K̃_ii, the same on every rank.
    """
    mesh = u.function_space.mesh
    problem.check_mesh(mesh)
    i = problem.lifting_direction
    x = ufl.SpatialCoordinate(mesh)
    e_i = ufl.unit_vector(i, problem.dim)
    flux = problem.K_matrix(x) * (ufl.grad(u) + e_i)
    value = fem.assemble_scalar(fem.form(flux[i] * _dx(mesh, u, quadrature_degree)))
    return float(mesh.comm.allreduce(value, op=MPI.SUM) / problem.domain.measure)


def box_partition(
    problem: MultiscaleProblem, mesh: dmesh.Mesh, blocks: int | Sequence[int]
) -> dmesh.MeshTags:
    """Cell tags of a partition of the box domain into ``blocks`` equal boxes per direction.

    Each cell goes to the box that contains its midpoint; tags are 0, 1, ... in C order.

    Args:
        problem: The problem (its domain).
        mesh: The mesh to tag.
        blocks: Boxes per direction (an int for all directions, or one per direction).

    Returns:
        Cell ``MeshTags`` (owned and ghost cells).
    """
    tdim = mesh.topology.dim
    counts = np.full(tdim, blocks) if np.isscalar(blocks) else np.asarray(blocks)
    if counts.shape != (tdim,) or np.any(counts < 1):
        raise ValueError(f"blocks must be a positive count per dimension, got {blocks}")
    index_map = mesh.topology.index_map(tdim)
    cells = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
    midpoints = dmesh.compute_midpoints(mesh, tdim, cells)[:, :tdim]
    relative = (midpoints - np.asarray(problem.domain.lower)) / problem.domain.lengths
    index = np.clip(np.floor(relative * counts).astype(np.int64), 0, counts - 1)
    tags = np.ravel_multi_index(tuple(index.T), tuple(counts)).astype(np.int32)
    return dmesh.meshtags(mesh, tdim, cells, tags)


def upscaled_tensor(
    problem: MultiscaleProblem,
    solutions: Sequence[fem.Function],
    cell_tags: dmesh.MeshTags | None = None,
    quadrature_degree: int | None = None,
) -> np.ndarray:
    """Algorithm 4.1: one d×d upscaled tensor per subdomain V_j from the d fine solutions.

    With w_i = u_i + x_i the solution of the fine problem lifted in direction i, T^j_i = ⟨∇w_i⟩_Vj
    and F^j_i = ⟨K∇w_i⟩_Vj, the tensor solves the matrix equation (4.7) K̃^j T^j = F^j.

    Collective on the mesh's communicator.

    Args:
        problem: The problem (any lifting direction: solution i must solve the problem lifted in
            direction i, see :meth:`MultiscaleProblem.with_lifting_direction`).
        solutions: ``d`` fine solutions u_0, ..., u_{d-1} on one mesh.
        cell_tags: A partition of the cells into tags 0..N-1 (default: one subdomain, Ω).
        quadrature_degree: Quadrature degree (default ``2*degree + 4``).

    Returns:
        An array of shape ``(N, d, d)`` (``(1, d, d)`` without tags), the same on every rank.
    """
    d = problem.dim
    if len(solutions) != d:
        raise ValueError(
            f"solutions: need one fine solution per direction ({d}), got {len(solutions)}"
        )
    mesh = solutions[0].function_space.mesh
    if any(u.function_space.mesh is not mesh for u in solutions):
        raise ValueError(
            "solutions: all fine solutions must live on one mesh (see solve_fine_directions)"
        )
    problem.check_mesh(mesh)
    tdim = mesh.topology.dim
    num_owned = mesh.topology.index_map(tdim).size_local
    if cell_tags is None:
        tag_of_cell = np.zeros(num_owned, dtype=np.int64)
    else:
        tag_of_cell = np.full(num_owned, -1, dtype=np.int64)
        owned = cell_tags.indices < num_owned
        tag_of_cell[cell_tags.indices[owned]] = cell_tags.values[owned]
        if np.any(tag_of_cell < 0):
            raise ValueError("cell_tags: every cell must carry a tag")
    num_tags = int(mesh.comm.allreduce(int(tag_of_cell.max(initial=-1)) + 1, op=MPI.MAX))

    # Cellwise integrals by assembling against the DG0 test function, summed per tag.
    DG0 = fem.functionspace(mesh, ("Discontinuous Lagrange", 0))
    v = ufl.TestFunction(DG0)
    x = ufl.SpatialCoordinate(mesh)
    K = problem.K_matrix(x)
    dx = _dx(mesh, solutions[0], quadrature_degree)

    def per_tag(integrand: ufl.core.expr.Expr) -> np.ndarray:
        vector = fem.assemble_vector(fem.form(integrand * v * dx))
        local = np.bincount(tag_of_cell, weights=vector.array[:num_owned], minlength=num_tags)
        return mesh.comm.allreduce(local, op=MPI.SUM)

    volumes = per_tag(ufl.as_ufl(1.0))
    if np.any(volumes <= 0):
        raise ValueError("cell_tags: every tag 0..N-1 must mark at least one cell")
    T = np.zeros((num_tags, d, d))
    F = np.zeros((num_tags, d, d))
    for i, u in enumerate(solutions):
        grad_w = ufl.grad(u) + ufl.unit_vector(i, d)
        flux = K * grad_w
        for j in range(d):
            T[:, j, i] = per_tag(grad_w[j]) / volumes
            F[:, j, i] = per_tag(flux[j]) / volumes
    condition = np.linalg.cond(T)
    if np.any(condition > 1e12):
        raise ValueError(
            "cell_tags: the averaged gradients T^j are (nearly) linearly dependent on some "
            "subdomain; use larger subdomains"
        )
    return F @ np.linalg.inv(T)
