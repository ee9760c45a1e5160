"""Structured two-scale bases whose output layer is solved by linear least squares.

The fine solution of a periodic problem (4.8) has, away from the boundary, the two-scale
(Bakhvalov) expansion [HS 2.4-2.7]

    w(x) ~ Σ_β ε^|β| N_β(x/ε) D^β v(x),       N_∅ = 1,  β = (β_1, ..., β_m) ∈ {1..d}^m,

with the cell correctors of every order

    A_0 N_β = ∂_k(a_{k β_m} N_β') + a_{β_m k} ∂_k N_β' + a_{β_{m-1} β_m} N_β'' - h_β

(``A_0 = -div_y(a ∇_y)``, ``β'``/``β''`` without the last one/two indices, ``h_β`` the cell mean
that makes the right-hand side solvable; Bakhvalov & Panasenko, *Homogenisation: Averaging
Processes in Periodic Media*, 1989, Ch. 4; Bensoussan, Lions & Papanicolaou 1978, Ch. 1 §2), and
near each face ``x_a = c`` a boundary layer decaying exponentially on the scale ε in the normal
direction and periodic along the face (Allaire & Amar 1999, "Boundary layer tails in periodic
homogenization", ESAIM: COCV 4; Gérard-Varet & Masmoudi 2012, Acta Math. 209). The layer is a
superposition of decaying Floquet-Bloch modes ``e^{-λ y_a} P(y)`` (P periodic) of the cell
operator, ``-div(a ∇(e^{-λ y_a} P)) = 0``.

:class:`TwoScaleBasis` keeps exactly that structure with free slow coefficients:

    v(x) = Σ_m Σ_{j ∈ J_m} c_{mj} S_j(x) F_m(x),

where the fast functions ``F_m`` are

* ``1`` and the correctors ``ε^|β| N_β(x/ε)`` for ``|β| <= order`` (symmetrised over the order
  of β: they multiply symmetric derivative tensors), each a truncated Fourier series computed by
  Fourier-Galerkin (:class:`FourierCellProblem`), so derivatives are exact and cheap;
* per face, the first-order boundary-layer correctors ``ε θ_β(x/ε)`` (the decaying
  combination of Bloch modes whose trace on the face is the trace of ``N_β``),

and the slow functions ``S_j`` are tensor Legendre polynomials on the box (total degree per fast
function; tangential only, up to a low normal degree, for a boundary-layer function). A
harmonic's coefficient is never a separate unknown: one slow function per corrector carries all
its harmonics, so the number of unknowns does not grow with the number of harmonics (the
corrector's spectrum, kept to a tolerance, is the wave-vector set: nothing is tuned by hand).

Why not random slow features times plain harmonics (:class:`~dolfinx_pinn.networks.TwoScaleNet`):
the coefficient of each harmonic k is a separate slow function there, so the unknowns are
(number of harmonics) × (slow basis size); at ε = 0.1 the low harmonics, with frequencies
comparable to the slow bandwidth, double as a Fourier basis for the slow part, at smaller ε they
no longer can, and a 64-feature random basis cannot resolve a source of width 0.07.

Where the error was, and what removed it (``paper_2d``, P3 references with 12-24 cells per
period, quasi-Monte Carlo errors on 2^17 points): with the source-scale degree ``1.6/ℓ = 23``
and uniform points the relative L² error was 1.2e-3 at ε = 0.1 and 3.8e-3 at ε = 0.05, 60 % of
it within 2ε of the boundary and 85-93 % of the squared H¹ error in the four corner squares of
side 2ε. Two causes, each measured by removing it: the slow degree (30 instead of 23: L² 7.6x
lower at ε = 0.1), and the sampling of the layer unknowns, whose columns live in slabs of width
O(ε) that uniform points visit with a fraction O(ε) of themselves (at ε = 0.05 a layer degree
of 20 then gave L² 1.4e-2; with points of their own, 1.0e-3). So :func:`choose_config` puts a
floor of 24 on the degree, and :func:`dolfinx_pinn.solve` adds points in the face slabs and
corner boxes (:mod:`dolfinx_pinn.stratified`, weighted so the loss is unchanged); the layers'
width comes from their slowest decay rate (:meth:`TwoScaleBasis.layer_widths`). What remains is
mostly the corners (corner layers, where two faces' layers meet, are not in the ansatz: products
of the two faces' Bloch modes were tried and gained nothing) and, at ε <= 0.05, a sampling
variance of about 2x between point sets.

A third cause grew as ε fell: with free blocks of degrees (30, 24, 18) the rel. L² error was
7e-5, 2.4e-4, 7e-4 and 8.4e-4 at ε = 0.1, 0.05, 0.02, 0.01 (with 3x the points, i.e. without
the sampling variance), 70-80 % of it a smooth interior bump. The strong residual of a free
order-0 function S carries ``ε^{|β|-2}`` times the mismatch between ``D^β S`` and the order-|β|
coefficient, so as ε falls the least squares forces S into the part whose derivatives the
lower blocks hold: an effective degree of ``min(p_0, p_1 + 1, p_2 + 2) = 20``, whose
approximation error that bump is (degrees (30, 29, 28): 3.1e-4 at ε = 0.01, (24, 23, 22):
9.4e-4, (20, 19, 18): 3.0e-3). With ``tied`` the order-0 functions carry their correctors,
``φ + Σ_β m_β ε^|β| N_β D^β φ`` (residual O(ε) for every φ: tested), so all of degree ``p_0``
stays usable, and free blocks of lower degree beside them keep what is not of that form (the
boundary-layer tails, the higher-order terms; tied features alone gave O(1) errors: for
degree-30 functions with wavelengths near ε the expansion is not asymptotic).

A fourth cause was the point set: tied to order 2, the residual of a tied feature is
``O(ε D³φ)``, and for the Gaussian source of ``paper_2d`` (width 0.07) that part is as large
near the source as what the free blocks of degree 24 and 18 can fit. The unfitted rest is
sampled by the points, so the least squares moved a smooth bump onto the source that depended
on the point set: at ε = 0.05 seeds 0 / 1 / 2 gave rel. L² 1.0e-3 / 1.7e-4 / 3.3e-4 (98 % of
seed 0's error in the block averages over a period, i.e. smooth; 2 % within 2ε of the faces).
Neither the conditioning (QR, ridge 1e-15 or 1e-11: the same figures) nor the sampling density
(4x or 5x the points, or extra Chebyshev-distributed points: 4.8e-4 .. 9.7e-4 for seed 0)
removed it; higher free degrees did in part ((28, 22): 5.2e-4). Tied to order 3
(``φ + Σ_{|β|<=3} m_β ε^|β| N_β D^β φ``, residual ``O(ε² D⁴φ)``: tested), with no free
order-3 features, the same 2 076 unknowns give 1.2e-4 / 1.2e-4 / 1.5e-4 for the three seeds;
boundary layers for the order-2 traces too (``layer_order = 2``: 2 616 unknowns) 8.8e-5 /
9.0e-5 (H¹ 5.0e-4, P3 references with 24 cells per period). What then remains is at the
corners: at ε = 0.02, 79 % of the squared L² error lies within ε of the faces and 59 % in the
four corner squares of side 3ε. Tangential functions ``exp(-μ|x_b - e|/ε)`` at the faces' ends
as extra slow coefficients of the layers (192 more unknowns) took it from 2.8e-4 to 1.9e-4 at
ε = 0.02 but did nothing at ε = 0.05 (H¹ slightly worse), so they are not in the ansatz.

A fifth cause showed on the held-out coefficients (:mod:`dolfinx_pinn.catalogue`): the layers'
Bloch modes were truncated at 6 modes per direction, and a truncated mode solves the cell
equation only in the Galerkin sense; its strong residual is what its outer-shell coefficients
leave, and for a contrast-10 inclusion those were 3.4e-3 of the largest. At ε = 0.05 the
inclusion's rel. L² error was 4.2e-4 with a boundary residual of 1.9e-3, with 8 modes 1.9e-4
and 4.1e-4 (10 and 12 modes: the same). The truncation now grows until the layers' shell
falls below :data:`LAYER_TAIL_TOLERANCE` (:meth:`FourierCellProblem.boundary_layer`).

Every module follows the package's conventions: float64 by default, input ``(N, d)``, output
``(N,)``, ``jet(x, full_hessian, directions)`` returning ``(value, gradient, Laplacian or
Hessian)``, the last ``nn.Linear`` (``output``) being the linear output layer. The boundary
condition is soft (``satisfies_boundary_condition = False``): boundary rows enter the least
squares (:mod:`dolfinx_pinn.least_squares`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn

from dolfinx_pinn.problems import Box, MultiscaleProblem

__all__ = [
    "BasisConfig",
    "FourierCellProblem",
    "HoleFunctions",
    "LegendreSlowBasis",
    "TwoScaleBasis",
    "choose_config",
    "total_degree_indices",
]

Jet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# -- Fourier-Galerkin cell problems ---------------------------------------------------------------
def _mode_grid(dim: int, k_max: int) -> np.ndarray:
    return np.array(list(itertools.product(range(-k_max, k_max + 1), repeat=dim)), dtype=np.int64)


class FourierCellProblem:
    """Cell correctors of every order and boundary-layer modes by Fourier-Galerkin.

    The cell coefficient is ``a(y) = K(ε y)`` on ``Y = [0, p_1] x ... x [0, p_d]`` (scalar or
    SPD tensor). With the modes ``|k|_∞ <= k_max`` the operator ``A_0 = -div_y(a ∇_y)`` is the
    dense Hermitian matrix ``-Σ_jl D_j C(a_jl) D_l`` (``D_j = diag(2πi k_j / p_j)``, ``C(a)`` the
    convolution matrix of the FFT coefficients of a), factorised once; every corrector is one
    solve. For a smooth coefficient the coefficients converge geometrically in ``k_max``
    (spectral accuracy, against second order for the P1 cell problems of
    :class:`~dolfinx_pinn.homogenization.CellProblem`, which give the same tensor).

    Args:
        problem: A periodic problem (its period vector defines the cell).
        k_max: Fourier modes per direction (``|k_j| <= k_max``); ``None`` chooses it: raised
            from 32 (1D, doubled), 8 (2D, by 4) or 4 (3D, by 2) until the first-order
            correctors' coefficients on the outer shell fall below ``tol`` relative to the
            largest (capped at 512, 20 and 6: the dense cell operator has (2 k_max + 1)^d rows).
        order: Highest corrector order computed (>= 1).
        tol: Relative tolerance of the spectrum (the choice of ``k_max`` and
            :meth:`wavevectors`).

    Attributes:
        modes: The integer wave vectors ``(M, d)``.
        kappa: The angular wave vectors ``2π k / p`` ``(M, d)``.
        tensor: The homogenised tensor ``a^0`` ``(d, d)``.
        correctors: ``{β: coefficients (M,) complex}`` for sorted tuples β (symmetrised), with
            ``()`` the constant 1.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        k_max: int | None = None,
        order: int = 2,
        tol: float = 1e-10,
    ) -> None:
        if problem.period is None:
            raise ValueError(f"problem {problem.name!r}: a period vector is needed")
        if not (isinstance(order, int) and order >= 1):
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if not (math.isfinite(tol) and 0 < tol < 1):
            raise ValueError(f"tol must lie in (0, 1), got {tol}")
        self.problem = problem
        self.dim = problem.dim
        self.period = np.asarray(problem.period, dtype=np.float64)
        self.tol = tol
        if k_max is None:
            start, cap = {1: (32, 512), 2: (8, 20), 3: (4, 6)}[self.dim]
            k_max = start
            while True:
                self._setup(k_max)
                if self._tail() < tol or k_max >= cap:
                    break
                k_max = min(
                    cap, 2 * k_max if self.dim == 1 else k_max + (4 if self.dim == 2 else 2)
                )
        else:
            if not (isinstance(k_max, int) and k_max >= 1):
                raise ValueError(f"k_max must be a positive integer, got {k_max!r}")
            self._setup(k_max)
        self.k_max = k_max
        self._higher_orders(order)
        self.order = order

    # -- setup --------------------------------------------------------------------------------
    def _coefficient_fft(self, k_max: int) -> tuple[np.ndarray, list[int]]:
        d = self.dim
        size = int(2 ** math.ceil(math.log2(max(4 * k_max + 8, 32))))
        counts = [size] * d
        axes = [np.arange(n) / n * p for n, p in zip(counts, self.period, strict=True)]
        y = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
        values = np.asarray(self.problem.K_matrix(self.problem.eps * y)).reshape(*counts, d, d)
        return np.fft.fftn(values, axes=tuple(range(d))) / np.prod(counts), counts

    def _setup(self, k_max: int) -> None:
        d = self.dim
        fft, counts = self._coefficient_fft(k_max)
        self.modes = _mode_grid(d, k_max)
        self.kappa = 2.0 * np.pi * self.modes / self.period
        difference = self.modes[:, None, :] - self.modes[None, :, :]
        index = tuple(difference[..., j] % counts[j] for j in range(d))
        self._conv = fft[index]  # (M, M, d, d): a_{l - k}
        self._zero = int(np.flatnonzero(np.all(self.modes == 0, axis=1))[0])
        self._D = 1j * self.kappa
        operator = -np.einsum("lj,lkjm,km->lk", self._D, self._conv, self._D)
        keep = np.ones(len(self.modes), dtype=bool)
        keep[self._zero] = False
        self._keep = keep
        self._lu = scipy.linalg.lu_factor(operator[np.ix_(keep, keep)])
        rhs = np.einsum("lj,lji->li", self._D, self._conv[:, self._zero])
        self.correctors: dict[tuple[int, ...], np.ndarray] = {}
        one = np.zeros(len(self.modes), dtype=complex)
        one[self._zero] = 1.0
        self.correctors[()] = one
        self._raw: dict[tuple[int, ...], np.ndarray] = {(): one}
        for i in range(d):
            self._raw[(i,)] = self.correctors[(i,)] = self._solve(rhs[:, i])
        mean_a = self._conv[self._zero, self._zero].real
        tensor = np.zeros((d, d))
        for i in range(d):
            for j in range(d):
                flux = np.sum(
                    self._conv[self._zero, :, i, :] * (self._D * self.correctors[(j,)][:, None])
                )
                tensor[i, j] = mean_a[i, j] + flux.real
        self.tensor = 0.5 * (tensor + tensor.T)

    def _tail(self) -> float:
        shell = np.abs(self.modes).max(axis=1) == np.abs(self.modes).max()
        size = max(np.abs(self.correctors[(i,)]).max() for i in range(self.dim))
        tail = max(np.abs(self.correctors[(i,)][shell]).max() for i in range(self.dim))
        return float(tail / size)

    def _solve(self, rhs: np.ndarray) -> np.ndarray:
        out = np.zeros(len(self.modes), dtype=complex)
        out[self._keep] = scipy.linalg.lu_solve(self._lu, rhs[self._keep])
        return out

    def _times(self, field_: np.ndarray, j: int, m: int) -> np.ndarray:
        return self._conv[:, :, j, m] @ field_

    def _higher_orders(self, order: int) -> None:
        d, D = self.dim, self._D
        for m in range(2, order + 1):
            for beta in itertools.product(range(d), repeat=m):
                previous, last = beta[:-1], beta[-1]
                rhs = np.zeros(len(self.modes), dtype=complex)
                for k in range(d):
                    rhs += D[:, k] * self._times(self._raw[previous], k, last)
                    rhs += self._times(D[:, k] * self._raw[previous], last, k)
                rhs += self._times(self._raw[previous[:-1]], previous[-1], last)
                self._raw[beta] = self._solve(rhs)  # the mean h_β is dropped by the solve
            for combo in itertools.combinations_with_replacement(range(d), m):
                perms = set(itertools.permutations(combo))
                self.correctors[combo] = sum(self._raw[p] for p in perms) / len(perms)

    # -- queries ----------------------------------------------------------------------------------
    def keys(self, max_order: int) -> list[tuple[int, ...]]:
        """The corrector keys β (sorted tuples) of orders 1..max_order."""
        return [k for k in self.correctors if 1 <= len(k) <= max_order]

    def wavevectors(self, max_order: int, tol: float | None = None) -> np.ndarray:
        """Indices of the modes kept: some corrector of order <= max_order exceeds ``tol``.

        The tolerance is relative to each corrector's largest coefficient; this is the harmonic
        set of the fast part, taken from the coefficient (through its correctors).
        """
        tol = self.tol if tol is None else tol
        keep = np.zeros(len(self.modes), dtype=bool)
        for key in self.keys(max_order):
            coefficients = np.abs(self.correctors[key])
            keep |= coefficients > tol * max(coefficients.max(), 1e-300)
        return np.flatnonzero(keep)

    def evaluate(self, key: tuple[int, ...], y: np.ndarray) -> np.ndarray:
        """``N_β(y)`` at points ``(N, d)`` of the fast variable (numpy, for checks)."""
        phase = np.asarray(y) @ self.kappa.T
        return (np.exp(1j * phase) @ self.correctors[key]).real

    # -- boundary-layer modes -----------------------------------------------------------------
    def bloch_modes(self, axis: int, sign: int, k_max: int | None = None) -> tuple[Any, Any, Any]:
        """Decaying Floquet-Bloch modes ``θ = e^{-λ y_a} P(y)``, ``-div(a ∇θ) = 0``.

        Substituting into the cell operator gives the quadratic eigenproblem
        ``(M0 + λ M1 + λ² M2) P = 0`` (``M2 = -C(a_aa)`` invertible), solved by linearisation on
        the modes ``|k|_∞ <= k_max`` (default ``min(self.k_max, 6)``, 3 in 3D; see
        :meth:`boundary_layer` for the truncation it chooses). Of the Floquet copies
        ``λ + 2πi n / p_a`` the one with ``Im λ`` in ``(-π/p_a, π/p_a]`` is kept; ``sign`` +1
        keeps ``Re λ > 0`` (a layer at a lower face, decaying into ``y_a > 0``), -1 ``Re λ < 0``
        (an upper face).

        Returns:
            ``(lam (n,), P (M_b, n) complex, kappa (M_b, d))``, ordered by ``|Re λ|``.
        """
        k_max = min(self.k_max, 6 if self.dim < 3 else 3) if k_max is None else k_max
        # Both faces normal to an axis share one eigenproblem (the two signs of Re λ).
        cache = self.__dict__.setdefault("_bloch_cache", {})
        if (axis, k_max) not in cache:
            cache[axis, k_max] = self._bloch_eigenpairs(axis, k_max)
        lam, vectors, kappa = cache[axis, k_max]
        half = np.pi / self.period[axis]
        keep = (
            np.isfinite(lam)
            & (lam.imag > -half + 1e-9)
            & (lam.imag <= half + 1e-9)
            & (sign * lam.real > 1e-6)
        )
        lam, vectors = lam[keep], vectors[:, keep]
        order = np.argsort(np.abs(lam.real))
        lam, vectors = lam[order], vectors[:, order]
        return lam, vectors / np.abs(vectors).max(axis=0), kappa

    def _bloch_eigenpairs(self, axis: int, k_max: int) -> tuple[Any, Any, Any]:
        """All eigenpairs of the linearised quadratic eigenproblem of :meth:`bloch_modes`."""
        cell = FourierCellProblem.__new__(FourierCellProblem)
        cell.problem, cell.dim, cell.period = self.problem, self.dim, self.period
        fft, counts = cell._coefficient_fft(k_max)
        modes = _mode_grid(self.dim, k_max)
        kappa = 2.0 * np.pi * modes / self.period
        difference = modes[:, None, :] - modes[None, :, :]
        conv = fft[tuple(difference[..., j] % counts[j] for j in range(self.dim))]
        D = 1j * kappa
        m0 = -np.einsum("lj,lkjm,km->lk", D, conv, D)
        m1 = np.einsum("lkm,km->lk", conv[:, :, axis, :], D) + np.einsum(
            "lj,lkj->lk", D, conv[:, :, :, axis]
        )
        m2_inverse = np.linalg.inv(-conv[:, :, axis, axis])
        n = len(modes)
        companion = np.block([[np.zeros((n, n)), np.eye(n)], [-m2_inverse @ m0, -m2_inverse @ m1]])
        lam, vectors = np.linalg.eig(companion)
        return lam, vectors[:n], kappa

    def boundary_layer(
        self,
        axis: int,
        side: int,
        face: float,
        keys: Sequence[tuple[int, ...]],
        k_max: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
        """The boundary-layer correctors of the correctors ``keys`` at the face ``x_a = face``.

        For each β the combination ``θ_β = Σ_n α_n e^{-λ_n (y_a - y_face)} P_n(y)`` whose trace
        on the face equals the trace of ``N_β`` up to a constant (the boundary-layer tail of
        Allaire & Amar, absorbed by the slow part), by least squares on the tangential Fourier
        coefficients of the traces.

        The columns of α are then independent combinations of the keys' layers
        (:func:`_independent_traces`): a trace that is a constant (or a combination of the
        others) adds no column.

        The Bloch modes are truncated to ``|k|_∞ <= k_max``; by default the smallest of 6, 8,
        10, 12 (3 in 3D: there the eigenproblem of 4 already has 1 458 unknowns) whose layers'
        outer-shell coefficients fall below :data:`LAYER_TAIL_TOLERANCE` of their largest: the
        residual of a truncated layer is not zero in the strong form the least squares sees.

        Returns:
            ``(lam, P, kappa, alpha (n, k) with k <= len(keys), worst relative misfit of the
            traces (the tangential modes beyond the truncation counted), layer tail)``.
        """
        if k_max is not None:
            if not (isinstance(k_max, int) and k_max >= 1):
                raise ValueError(f"layer_k_max must be a positive integer, got {k_max!r}")
            return self._boundary_layer(axis, side, face, keys, k_max)
        cap = min(self.k_max, 12 if self.dim < 3 else 3)
        start = min(cap, 6 if self.dim < 3 else 3)
        for candidate in range(start, cap + 1, 2):
            layer = self._boundary_layer(axis, side, face, keys, candidate)
            if layer[-1] < LAYER_TAIL_TOLERANCE:
                break
        return layer

    def _boundary_layer(
        self,
        axis: int,
        side: int,
        face: float,
        keys: Sequence[tuple[int, ...]],
        k_max: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
        sign = 1 if side == 0 else -1
        lam, P, kappa_b = self.bloch_modes(axis, sign, k_max)
        modes_b = np.rint(kappa_b * self.period / (2 * np.pi)).astype(np.int64)
        y_face = face / self.problem.eps
        tangential = [j for j in range(self.dim) if j != axis]

        def trace(modes: np.ndarray, kappa: np.ndarray, coefficients: np.ndarray) -> dict:
            phase = np.exp(1j * kappa[:, axis] * y_face)
            out: dict[tuple[int, ...], np.ndarray] = {}
            for row, k in enumerate(modes):
                key = tuple(int(v) for v in k[tangential])
                out[key] = out.get(key, 0.0) + phase[row] * coefficients[row]
            return out

        basis_trace = trace(modes_b, kappa_b, P)
        labels = sorted(basis_trace)
        matrix = np.array([basis_trace[k] for k in labels])
        constant = np.array([[1.0 if all(v == 0 for v in k) else 0.0] for k in labels])
        matrix = np.hstack([matrix, constant])
        alphas, misfits, datas = [], [], []
        for key in keys:
            data_trace = trace(self.modes, self.kappa, self.correctors[key])
            data = np.array([data_trace.get(k, 0.0) for k in labels])
            beyond = [v for k, v in data_trace.items() if k not in basis_trace]
            solution, *_ = np.linalg.lstsq(matrix, data, rcond=1e-12)
            norm = max(float(np.linalg.norm(np.concatenate([data, beyond]))), 1e-300)
            misfit = np.linalg.norm(np.concatenate([matrix @ solution - data, beyond]))
            misfits.append(float(misfit) / norm)
            alphas.append(solution[:-1])
            datas.append(data[constant[:, 0] == 0.0])
        alpha = np.stack(alphas, axis=1)
        if len(keys):
            alpha = alpha @ _independent_traces(np.stack(datas, axis=1))
        layers = P @ alpha
        shell = np.abs(modes_b).max(axis=1) == k_max
        tail = (
            float((np.abs(layers[shell]).max(axis=0) / np.abs(layers).max(axis=0)).max())
            if layers.size and shell.any()
            else 0.0
        )
        return lam, P, kappa_b, alpha, max(misfits, default=0.0), tail


# A layer is fixed by its trace, so layers whose traces (less their constant, which the slow
# part takes) are nearly dependent are nearly dependent functions: their slow coefficients then
# span directions the least squares cannot pin down, and the rounding of the products (which
# depends on the split over the ranks) moves the solution along them. For paper_2d the traces
# of N_1 and N_11 on a face x_1 = c are constants (K is a sum of functions of one variable):
# with layers for the order-2 traces the 1- and 2-rank solutions of a small basis differed by
# 5e-6 (values) before, 4e-11 after; the default basis keeps 2 436 of 2 616 unknowns, at the
# same errors (paper_2d, ε = 0.05 and 0.02).
LAYER_TRACE_TOLERANCE = 1e-3

# The truncated Bloch modes solve the cell equation only in the Galerkin sense; the strong-form
# residual of a layer is what its outer-shell coefficients leave. On inclusion_2d(0.05) the
# layers of 6 modes per direction (tail 3.4e-3) gave rel. L² 4.2e-4 and a boundary residual of
# 1.9e-3; 8 modes (tail 1.9e-4) 1.9e-4 and 4.1e-4, 10 and 12 the same. anisotropic_2d(0.05):
# 1.4e-4 at 6 (tail 6.6e-3), 1.1e-4 at 8 and beyond; paper_2d (tail 1.4e-3 at 6): the same
# errors at 6 and 10. 3D stays at 3 modes: on paper_3d(0.1) 4 modes (tail 1.9e-3 instead of
# 1.4e-2) gave rel. L² 1.51e-2 against 1.53e-2 in twice the time (its error is at the edges).
LAYER_TAIL_TOLERANCE = 1e-3


def _independent_traces(traces: np.ndarray, tolerance: float | None = None) -> np.ndarray:
    """A real ``(K, k)`` map onto independent combinations of ``K`` traces (columns).

    The columns (tangential Fourier coefficients, complex) are scaled to unit norm and the
    right singular vectors of ``[Re; Im]`` whose singular values exceed ``tolerance`` times the
    largest are kept, so the layers ``θ M`` span what the ``K`` layers span to that tolerance.
    """
    tolerance = LAYER_TRACE_TOLERANCE if tolerance is None else tolerance
    norms = np.linalg.norm(traces, axis=0)
    present = norms > 1e-12 * max(float(norms.max()), 1e-300)
    scaled = np.zeros(traces.shape, dtype=traces.dtype)
    scaled[:, present] = traces[:, present] / norms[present]
    real = np.vstack([scaled.real, scaled.imag])
    _, values, vh = np.linalg.svd(real, full_matrices=False)
    keep = values > tolerance * max(float(values[0]) if len(values) else 0.0, 1e-300)
    inverse = np.where(present, 1.0 / np.where(present, norms, 1.0), 0.0)
    return inverse[:, None] * vh[keep].T


# -- slow basis -------------------------------------------------------------------------------
def total_degree_indices(dim: int, degree: int) -> np.ndarray:
    """Multi-indices ``n ∈ N^d`` with ``|n|_1 <= degree``, shape ``(S, d)``."""
    return np.array(
        [k for k in itertools.product(range(degree + 1), repeat=dim) if sum(k) <= degree],
        dtype=np.int64,
    ).reshape(-1, dim)


def _tangential_indices(dim: int, axis: int, degree: int, normal_degree: int) -> np.ndarray:
    top = max(degree, normal_degree)
    return np.array(
        [
            k
            for k in itertools.product(range(top + 1), repeat=dim)
            if k[axis] <= normal_degree and sum(k) - k[axis] <= degree
        ],
        dtype=np.int64,
    ).reshape(-1, dim)


def _legendre_table(t: torch.Tensor, degree: int, derivatives: int = 2) -> list[torch.Tensor]:
    """Normalised Legendre ``√(2n+1) P_n(t)`` and derivatives ``0..derivatives``, ``(N, deg+1)``.

    ``P_{n+1}^{(q)} = P_{n-1}^{(q)} + (2n + 1) P_n^{(q-1)}`` for ``q >= 1`` (Bonnet's recurrence
    differentiated), exact in floating point up to round-off.
    """
    tables = [[torch.ones_like(t)] + ([t] if degree >= 1 else [])]
    for n in range(1, degree):
        row = tables[0]
        row.append(((2 * n + 1) * t * row[n] - n * row[n - 1]) / (n + 1))
    for q in range(1, derivatives + 1):
        below = tables[q - 1]
        row = [torch.zeros_like(t)]
        if degree >= 1:
            row.append(torch.ones_like(t) if q == 1 else torch.zeros_like(t))
        for n in range(1, degree):
            row.append(row[n - 1] + (2 * n + 1) * below[n])
        tables.append(row)
    scale = torch.sqrt(2.0 * torch.arange(degree + 1, dtype=t.dtype, device=t.device) + 1.0)
    return [torch.stack(row, dim=1) * scale for row in tables]


class LegendreSlowBasis(nn.Module):
    """Tensor Legendre polynomials ``Π_j √(2n_j+1) P_{n_j}(t_j)``, ``t = 2(x - a)/L - 1``.

    Orthogonal on the box, so the columns of a least-squares problem in them are well
    conditioned (unlike monomials), and all derivatives follow from the three-term recurrence.

    Args:
        lower: The lower corner of the box.
        lengths: The edge lengths.
        indices: The multi-indices ``(S, d)``.
    """

    def __init__(
        self, lower: Sequence[float], lengths: Sequence[float], indices: np.ndarray
    ) -> None:
        super().__init__()
        self.dim = len(lower)
        self.register_buffer("lower", torch.tensor(lower, dtype=torch.float64))
        self.register_buffer("lengths", torch.tensor(lengths, dtype=torch.float64))
        self.register_buffer("indices", torch.as_tensor(np.asarray(indices), dtype=torch.long))
        self.degree = int(self.indices.max()) if self.indices.numel() else 0

    @property
    def size(self) -> int:
        """The number of functions S."""
        return int(self.indices.shape[0])

    def jet(
        self, x: torch.Tensor, derivative: Sequence[int] | None = None, second: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Values ``(N, S)``, gradients ``(N, d, S)`` and Hessians ``(N, d, d, S)``.

        Args:
            x: Points ``(N, d)``.
            derivative: A multi-index ``(m_1, ..., m_d)``: the jet of ``D^m S`` instead of S.
            second: Compute the Hessians (``None`` in their place otherwise).
        """
        d = self.dim
        orders = 3 if second else 2
        shift = [0] * d if derivative is None else [int(v) for v in derivative]
        t = 2.0 * (x - self.lower) / self.lengths - 1.0
        factor = 2.0 / self.lengths
        tables = [_legendre_table(t[:, j], self.degree, shift[j] + orders - 1) for j in range(d)]
        parts = [
            [
                tables[j][q + shift[j]][:, self.indices[:, j]] * factor[j] ** (q + shift[j])
                for q in range(orders)
            ]
            for j in range(d)
        ]

        def product(orders: dict[int, int]) -> torch.Tensor:
            out = parts[0][orders.get(0, 0)]
            for j in range(1, d):
                out = out * parts[j][orders.get(j, 0)]
            return out

        value = product({})
        gradient = torch.stack([product({j: 1}) for j in range(d)], dim=1)
        if not second:
            return value, gradient, None
        rows = []
        for j in range(d):
            rows.append(
                torch.stack(
                    [product({j: 2}) if j == k else product({j: 1, k: 1}) for k in range(d)],
                    dim=1,
                )
            )
        return value, gradient, torch.stack(rows, dim=1)

    def combination_jet(
        self, x: torch.Tensor, weights: torch.Tensor, hessian: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``c_b = Σ_s W_sb S_s`` and its derivatives, without forming the ``(N, S)`` table.

        The weights are scattered into a dense tensor over the per-axis degrees and contracted
        one axis at a time with that axis's Legendre table (a matmul, then batched products),
        so the cost is ``N (degree+1)^d B`` multiply-adds instead of ``N S`` tables and gathers.

        Args:
            x: Points ``(N, d)``.
            weights: ``(S, B)`` (differentiable).
            hessian: Also the second derivatives.

        Returns:
            ``(c (N, B), ∇c (N, d, B), ∇²c (N, d, d, B) or None)``.
        """
        d, n = self.dim, x.shape[0]
        size = self.degree + 1
        blocks = weights.shape[1]
        t = 2.0 * (x - self.lower) / self.lengths - 1.0
        factor = 2.0 / self.lengths
        tables = [
            [
                table * factor[j] ** q
                for q, table in enumerate(
                    _legendre_table(t[:, j], self.degree, 2 if hessian else 1)
                )
            ]
            for j in range(d)
        ]
        dense = torch.zeros((size,) * d + (blocks,), dtype=weights.dtype, device=weights.device)
        dense = dense.index_put(tuple(self.indices.T.to(weights.device)), weights)
        flat = dense.reshape(size, -1)
        first: dict[int, torch.Tensor] = {}  # the first axis's product, shared by the orders

        def contract(order: Sequence[int]) -> torch.Tensor:
            if order[0] not in first:
                first[order[0]] = tables[0][order[0]] @ flat  # (N, size^(d-1) B)
            out = first[order[0]]
            for j in range(1, d):
                out = torch.einsum("na,nar->nr", tables[j][order[j]], out.unflatten(1, (size, -1)))
            return out  # (N, B)

        unit = [[1 if k == j else 0 for k in range(d)] for j in range(d)]
        value = contract([0] * d)
        gradient = torch.stack([contract(unit[j]) for j in range(d)], dim=1)
        if not hessian:
            return value, gradient, None
        second = torch.empty(n, d, d, blocks, dtype=weights.dtype, device=weights.device)
        for j in range(d):
            for k in range(j, d):
                entry = contract([a + b for a, b in zip(unit[j], unit[k], strict=True)])
                second[:, j, k] = entry
                second[:, k, j] = entry
        return value, gradient, second


class HoleFunctions(nn.Module):
    """Harmonic functions singular inside the holes of a 2D domain, with their derivatives.

    Per hole (centre c, radius r), with ``w = (z - c) / r`` and ``z = x_1 + i x_2``:
    ``log|w|`` (degree 0) and ``Re w^-n``, ``Im w^-n`` (degree n = 1..degree). Polynomials
    cannot approximate what these hold on a multiply connected domain (Walsh's theorem: the
    net flux through a hole is the coefficient of ``log|w|``, the hole's multipoles those of
    ``w^-n``; the same terms as the Laurent part of the lightning Laplace solver of Gopal &
    Trefethen, PNAS 116, 2019); each is smooth in Ω and its derivatives are again such terms
    (``d/dz w^-n = -n w^-n-1 / r``), so the order-m corrector blocks take degree + m.

    Args:
        holes: ``(centre, radius)`` per hole.
        degree: The largest n.
    """

    def __init__(self, holes: Sequence[tuple[Sequence[float], float]], degree: int) -> None:
        super().__init__()
        if degree < 0:
            raise ValueError(f"hole_degree must be >= 0, got {degree}")
        self.register_buffer(
            "centres", torch.tensor([list(c) for c, _ in holes], dtype=torch.float64)
        )
        self.register_buffer(
            "radii", torch.tensor([float(r) for _, r in holes], dtype=torch.float64)
        )
        self.max_degree = int(degree)
        per_hole = [0] + [n for n in range(1, degree + 1) for _ in range(2)]
        self.register_buffer(
            "degrees", torch.tensor(per_hole * len(holes), dtype=torch.long).reshape(-1)
        )

    @property
    def size(self) -> int:
        """The number of functions."""
        return int(self.degrees.numel())

    def jet(self, x: torch.Tensor, second: bool = True) -> tuple[Any, Any, Any]:
        """Values ``(N, S)``, gradients ``(N, 2, S)`` and Hessians ``(N, 2, 2, S)`` (or None)."""
        values, firsts, seconds = [], [], []
        n = torch.arange(1, self.max_degree + 1, dtype=torch.float64, device=x.device)
        keep_mask = torch.ones(2 * self.max_degree + 2, dtype=torch.bool, device=x.device)
        keep_mask[1] = False  # Im log w
        for centre, radius in zip(self.centres, self.radii, strict=True):
            w = torch.complex(x[:, 0] - centre[0], x[:, 1] - centre[1]) / radius
            inverse = 1.0 / w
            # inverse^k for k = 1..degree + 2
            powers = torch.cumprod(inverse[:, None].expand(-1, self.max_degree + 2), dim=1)
            g = [torch.log(torch.abs(w)).to(w.dtype)[:, None], powers[:, : self.max_degree]]
            d1 = [inverse[:, None] / radius, -n * powers[:, 1 : self.max_degree + 1] / radius]
            d2 = [-(inverse**2)[:, None] / radius**2]
            d2.append(n * (n + 1) * powers[:, 2 : self.max_degree + 2] / radius**2)
            g, d1, d2 = (torch.cat(part, 1) for part in (g, d1, d2))
            # Re and Im of each holomorphic g (Im of log w is multivalued: left out)
            keep = torch.arange(2 * self.max_degree + 2, device=x.device)[keep_mask]
            values.append(torch.stack([g.real, g.imag], 2).flatten(1)[:, keep])
            gradient = torch.stack(
                [
                    torch.stack([d1.real, d1.imag], 2),  # ∂_1 (Re, Im) = (Re g', Im g')
                    torch.stack([-d1.imag, d1.real], 2),  # ∂_2 = (-Im g', Re g')
                ],
                1,
            )
            firsts.append(gradient.flatten(2)[:, :, keep])
            if second:
                xx = torch.stack([d2.real, d2.imag], 2)
                xy = torch.stack([-d2.imag, d2.real], 2)
                hessian = torch.stack([torch.stack([xx, xy], 1), torch.stack([xy, -xx], 1)], 1)
                seconds.append(hessian.flatten(3)[..., keep])
        return (
            torch.cat(values, 1),
            torch.cat(firsts, 2),
            torch.cat(seconds, 3) if second else None,
        )


# -- fast families ------------------------------------------------------------------------------
def _integer_lattice(kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(base (d,), h (H, d) integers)`` with ``kappa = h * base``, or None if there is none.

    The base of an axis is its smallest non-zero ``|κ_j|``; the wave vectors of a periodic
    cell problem are ``2π h / p``, so their ratios are whole numbers.
    """
    if kappa.ndim != 2 or len(kappa) == 0:
        return None
    base = np.ones(kappa.shape[1])
    for j in range(kappa.shape[1]):
        nonzero = np.abs(kappa[:, j])[np.abs(kappa[:, j]) > 0]
        if len(nonzero):
            base[j] = nonzero.min()
    ratio = kappa / base
    h = np.rint(ratio).astype(np.int64)
    if np.abs(ratio - h).max() > 1e-9 or np.abs(h).max() > 4096:
        return None
    return base, h


class _FourierFamily(nn.Module):
    """``r`` real functions ``F_m(x) = s_m Re Σ_h c_hm exp(i κ_h·x/ε)`` (correctors)."""

    def __init__(self, eps: float, kappa: np.ndarray, coefficients: np.ndarray, scales: Any):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("kappa", torch.as_tensor(kappa, dtype=torch.float64))
        c = torch.as_tensor(np.asarray(coefficients) * np.asarray(scales)[None, :])
        self.register_buffer("coefficients_real", c.real.to(torch.float64).contiguous())
        self.register_buffer("coefficients_imag", c.imag.to(torch.float64).contiguous())
        self.lattice = _integer_lattice(np.asarray(kappa, dtype=np.float64))

    @property
    def size(self) -> int:
        return int(self.coefficients_real.shape[1])

    def _weights(self, hessian: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``[F, ∂_j F, ∂_j ∂_m F] = cos(phase) @ A + sin(phase) @ B``.

        The derivative weights (κ_j/ε, κ_j κ_m/ε²) are folded into the coefficients once, so an
        evaluation is two ``(N, H) @ (H, r (1 + d (+ d²)))`` products after the cos/sin table.
        """
        key = "_weights_hessian" if hessian else "_weights_gradient"
        cached = self.__dict__.get(key)
        if cached is not None and cached[0].device == self.kappa.device:
            return cached
        cr, ci = self.coefficients_real, self.coefficients_imag
        k = self.kappa / self.eps
        d = k.shape[1]
        # Re[(cos + i sin)(cr + i ci)] = cos cr - sin ci; each ∂_j multiplies by i k_j.
        A, B = [cr], [-ci]
        for j in range(d):
            A.append(-k[:, j : j + 1] * ci)
            B.append(-k[:, j : j + 1] * cr)
        if hessian:
            for j in range(d):
                for m in range(d):
                    w = (k[:, j] * k[:, m])[:, None]
                    A.append(-w * cr)
                    B.append(w * ci)
        cached = (torch.cat(A, 1).contiguous(), torch.cat(B, 1).contiguous())
        self.__dict__[key] = cached
        return cached

    def _separable_weights(self, hessian: bool) -> tuple[torch.Tensor, int]:
        """The weights of :meth:`_separable` and the number of first-axis harmonics ``L1``.

        With ``W = A - iB`` (so that a column is ``Re Σ_h W_h e^{i h·a}``), the harmonics with
        ``h_1 < 0`` are folded onto ``-h`` by conjugation and those with ``h_1 = 0`` split half
        and half between ``h`` and ``-h``: the real part is unchanged and only ``h_1 >= 0``
        remains. The weights are then the real form ``[[G_r, G_i], [-G_i, G_r]]`` of the
        complex grid ``G (trailing harmonics, h_1, column)``.
        """
        key = "_separable_hessian" if hessian else "_separable_gradient"
        cached = self.__dict__.get(key)
        if cached is not None and cached[0].device == self.kappa.device:
            return cached
        A, B = self._weights(hessian)
        W = A.cpu().numpy() - 1j * B.cpu().numpy()  # (H, Q)
        _, h = self.lattice
        reach = np.abs(h).max(axis=0)
        first = int(reach[0]) + 1
        trailing = [2 * int(m) + 1 for m in reach[1:]]
        grid = np.zeros((first, *trailing, W.shape[1]), dtype=np.complex128)

        def add(modes: np.ndarray, values: np.ndarray) -> None:
            index = (modes[:, 0], *(modes[:, j] + reach[j] for j in range(1, h.shape[1])))
            np.add.at(grid, index, values)

        positive, negative, zero = h[:, 0] > 0, h[:, 0] < 0, h[:, 0] == 0
        add(h[positive], W[positive])
        add(-h[negative], W[negative].conj())
        add(h[zero], 0.5 * W[zero])
        add(-h[zero], 0.5 * W[zero].conj())
        # (h_1, t, q) -> rows t, columns (h_1, q)
        G = np.moveaxis(grid.reshape(first, -1, W.shape[1]), 1, 0).reshape(-1, first * W.shape[1])
        matrix = np.block([[G.real, G.imag], [-G.imag, G.real]])
        cached = (torch.as_tensor(matrix, device=self.kappa.device).contiguous(), first)
        self.__dict__[key] = cached
        return cached

    def _separable(self, x: torch.Tensor, hessian: bool) -> torch.Tensor:
        """``cos(phase) @ A + sin(phase) @ B`` from per-axis tables (wave vectors on a lattice).

        ``e^{i h·a} = Π_j e^{i h_j a_j}``: the trailing axes' harmonics are contracted by one
        real product with the per-axis cos/sin tables, the first axis's by a batched dot, so
        the cost is a few transcendental functions per axis instead of two per harmonic.
        """
        matrix, first = self._separable_weights(hessian)
        base, h = self.lattice
        reach = np.abs(h).max(axis=0)
        angles = x * torch.as_tensor(base / self.eps, dtype=x.dtype, device=x.device)
        tables = []
        for j in range(1, x.shape[1]):
            m = int(reach[j])
            harmonics = torch.arange(-m, m + 1, dtype=x.dtype, device=x.device)
            tables.append(angles[:, j : j + 1] * harmonics)
        phase = tables[0]
        for table in tables[1:]:  # the trailing grid's phases, last axis fastest
            phase = (phase[:, :, None] + table[:, None, :]).flatten(1)
        trailing = torch.cat([torch.cos(phase), torch.sin(phase)], 1) @ matrix
        harmonics = torch.arange(first, dtype=x.dtype, device=x.device)
        leading = angles[:, :1] * harmonics
        left = torch.cat([torch.cos(leading), -torch.sin(leading)], 1)  # (N, 2 L1)
        columns = matrix.shape[1] // (2 * first)
        return torch.bmm(left[:, None, :], trailing.reshape(len(x), 2 * first, columns))[:, 0]

    def jet(self, x: torch.Tensor, hessian: bool = True) -> tuple[Any, Any, Any]:
        if self.lattice is not None and x.shape[1] >= 2:
            out = self._separable(x, hessian)
        else:
            phase = (x / self.eps) @ self.kappa.T  # (N, H)
            A, B = self._weights(hessian)
            out = torch.cos(phase) @ A + torch.sin(phase) @ B
        r, d, n = self.size, x.shape[1], x.shape[0]
        value = out[:, :r]
        gradient = out[:, r : r * (1 + d)].reshape(n, d, r)
        if not hessian:
            return value, gradient, None
        return value, gradient, out[:, r * (1 + d) :].reshape(n, d, d, r)


class _LayerFamily(nn.Module):
    """Boundary-layer functions ``Re Σ_n α_nm e^{-λ_n (x_a - c)/ε} P_n(x/ε)`` at one face."""

    def __init__(
        self,
        eps: float,
        axis: int,
        face: float,
        lam: np.ndarray,
        modes: np.ndarray,
        kappa: np.ndarray,
        alpha: np.ndarray,
        scale: float,
    ) -> None:
        super().__init__()
        self.eps, self.axis, self.face, self.scale = float(eps), int(axis), float(face), scale
        self.register_buffer("kappa", torch.as_tensor(kappa, dtype=torch.float64))
        self.register_buffer("lam", torch.as_tensor(lam, dtype=torch.complex128))
        self.register_buffer("modes", torch.as_tensor(modes, dtype=torch.complex128))
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.complex128))
        lattice = _integer_lattice(np.asarray(kappa, dtype=np.float64))
        # The Bloch modes' wave vectors are a full grid -k..k per axis, last axis fastest.
        if lattice is not None:
            reach = np.abs(lattice[1]).max(axis=0)
            grid = np.array(list(itertools.product(*(range(-int(m), int(m) + 1) for m in reach))))
            if grid.shape != lattice[1].shape or not np.array_equal(grid, lattice[1]):
                lattice = None
        self.lattice = lattice

    @property
    def size(self) -> int:
        return int(self.alpha.shape[1])

    def exponentials(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(i κ·x/ε)`` ``(N, H)``: shared by the families on the same mode grid.

        On a full grid of wave vectors, as the outer product of per-axis exponentials.
        """
        if self.lattice is None:
            phase = (x / self.eps) @ self.kappa.T
            return torch.polar(torch.ones_like(phase), phase)
        base, h = self.lattice
        angles = x * torch.as_tensor(base / self.eps, dtype=x.dtype, device=x.device)
        E = None
        for j, m in enumerate(np.abs(h).max(axis=0)):
            harmonics = torch.arange(-int(m), int(m) + 1, dtype=x.dtype, device=x.device)
            phase = angles[:, j : j + 1] * harmonics
            axis = torch.polar(torch.ones_like(phase), phase)
            E = axis if E is None else (E[:, :, None] * axis[:, None, :]).flatten(1)
        return E

    def _mode_matrix(self, hessian: bool) -> torch.Tensor:
        """``[P, (iκ_j/ε) P, ((iκ_j/ε)(iκ_m/ε)) P]`` stacked ``(H, n (1 + d (+ d²)))``."""
        key = "_modes_hessian" if hessian else "_modes_gradient"
        cached = self.__dict__.get(key)
        if cached is not None and cached.device == self.modes.device:
            return cached
        k = 1j * self.kappa.to(torch.complex128) / self.eps
        d = k.shape[1]
        parts = [self.modes] + [k[:, j : j + 1] * self.modes for j in range(d)]
        if hessian:
            parts += [(k[:, j] * k[:, m])[:, None] * self.modes for j in range(d) for m in range(d)]
        matrix = torch.cat(parts, 1).contiguous()
        self.__dict__[key] = matrix
        return matrix

    def jet(
        self, x: torch.Tensor, hessian: bool = True, exponentials: torch.Tensor | None = None
    ) -> tuple[Any, Any, Any]:
        d, a = x.shape[1], self.axis
        E = self.exponentials(x) if exponentials is None else exponentials
        r = self.modes.shape[1]
        g = E @ self._mode_matrix(hessian)  # one product for the value and every derivative
        g0 = g[:, :r]
        g1 = [g[:, r * (1 + j) : r * (2 + j)] for j in range(d)]
        lam = self.lam / self.eps
        weights = torch.exp(-lam * (x[:, a : a + 1] - self.face))  # (N, n)

        def combine(z: torch.Tensor) -> torch.Tensor:
            return self.scale * ((weights * z) @ self.alpha).real

        delta = [1.0 if j == a else 0.0 for j in range(d)]
        value = combine(g0)
        gradient = torch.stack([combine(g1[j] - lam * delta[j] * g0) for j in range(d)], dim=1)
        if not hessian:
            return value, gradient, None
        rows = []
        for j in range(d):
            row = []
            for m in range(d):
                start = r * (1 + d + j * d + m)
                g2 = g[:, start : start + r]
                z = (
                    g2
                    - lam * (delta[m] * g1[j] + delta[j] * g1[m])
                    + lam**2 * delta[j] * delta[m] * g0
                )
                row.append(combine(z))
            rows.append(torch.stack(row, dim=1))
        return value, gradient, torch.stack(rows, dim=1)


# -- configuration ------------------------------------------------------------------------------
@dataclass
class BasisConfig:
    """The choices of :meth:`TwoScaleBasis.for_problem` (every field can be overridden).

    Attributes:
        order: Highest corrector order of the fast functions.
        degrees: Total Legendre degree of the slow coefficient of each order ``0..order``.
        boundary_layers: Add the boundary-layer correctors (2D and 3D boxes; on by default:
            without them the correctors' fast traces stay on the faces).
        layer_order: Corrector order whose traces the boundary layers cancel.
        layer_degree: Tangential Legendre degree of a boundary-layer coefficient.
        layer_normal_degree: Normal Legendre degree of a boundary-layer coefficient.
        layer_k_max: Fourier modes per direction of the Bloch modes of the layers (``None``:
            from :data:`LAYER_TAIL_TOLERANCE`, see :meth:`FourierCellProblem.boundary_layer`).
        tol: Relative tolerance of the corrector spectrum (wave-vector set).
        k_max: Fourier modes per direction of the cell problems (``None``: from ``tol``).
        tied: Tie the correctors to the order-0 slow functions: one feature
            ``φ + Σ_β m_β ε^|β| N_β D^β φ`` per slow function φ of degree <= ``degrees[0]``
            (the truncated expansion of :mod:`the module docstring <dolfinx_pinn.basis>`, whose
            residual is O(ε) whatever φ), instead of a free φ; the order-m blocks then need
            ``degrees[m] >= degrees[0] - m`` (they hold ``D^β φ``) and keep free features of
            degree <= ``free_degrees[m - 1]`` only.
        free_degrees: With ``tied``, the degree of the free features of each order
            ``1..order`` (-1: none).
        holes: ``(centre, radius)`` of each hole of a 2D mesh domain
            (:meth:`~dolfinx_pinn.geometry.MeshDomain.holes`): their :class:`HoleFunctions`
            times the constant and the correctors join the slow functions (free features).
        hole_degree: The largest multipole degree n of the hole functions (order m: + m).
        reasons: Why each choice was made (for reports).
    """

    order: int = 2
    degrees: tuple[int, ...] = (24, 18, 12)
    tied: bool = False
    free_degrees: tuple[int, ...] = ()
    holes: tuple[tuple[tuple[float, ...], float], ...] = ()
    hole_degree: int = 16
    boundary_layers: bool = True
    layer_order: int = 1
    layer_degree: int = 14
    layer_normal_degree: int = 2
    layer_k_max: int | None = None
    tol: float = 1e-10
    k_max: int | None = None
    reasons: dict[str, str] = field(default_factory=dict)


def _source_scale(problem: MultiscaleProblem, samples: int = 4096) -> float:
    """The shortest length scale of the source q: ``min ‖q‖ / ‖∇q‖`` in the mean-square sense."""
    generator = torch.Generator().manual_seed(5)
    lower = torch.tensor(problem.domain.lower, dtype=torch.float64)
    lengths = torch.tensor(problem.domain.lengths, dtype=torch.float64)
    x = lower + lengths * torch.rand(samples, problem.dim, generator=generator, dtype=torch.float64)
    x.requires_grad_(True)
    q = problem.q(x)
    if not isinstance(q, torch.Tensor) or not q.requires_grad:
        return float(lengths.min())
    (gradient,) = torch.autograd.grad(q.sum(), x)
    ratio = torch.sqrt((q.detach() ** 2).mean() / max(float((gradient**2).sum(1).mean()), 1e-300))
    return float(min(ratio, lengths.min()))


def choose_config(problem: MultiscaleProblem, **overrides: Any) -> BasisConfig:
    """The configuration of :meth:`TwoScaleBasis.for_problem` for a problem.

    Rules (measured on ``paper_2d`` and ``paper_1d``, see the module docstring):

    * 1D: the expansion terminates when q is a polynomial of degree p (``D^β w_0 = 0`` for
      ``|β| > p + 2``), so order ``p + 3`` (at least 4) with degree 8 is exact up to the
      corrector truncation; no boundary layers exist (the boundary is two points).
    * 2D/3D: order 2, degrees from the source's length scale ``ℓ = ‖q‖/‖∇q‖`` (about
      ``2.3 / ℓ`` for the mean part, within [24, 32] in 2D, 16 in 3D), boundary layers on;
      in 2D the correctors are tied to the order-0 part (``tied``) with free blocks of degrees
      ``top - 2`` and ``top - 6`` beside them, and on a box the tie goes to order 3 (no free
      order-3 features) with layers for the order-1 and order-2 traces. Overriding
      ``degrees`` or ``order`` without ``tied`` gives free blocks of those degrees (the untied
      ansatz); the number of ``degrees`` given sets the order, and ``layer_order`` follows
      the order down.
    """
    d = problem.dim
    config = BasisConfig()
    if d == 1:
        config.order, config.degrees, config.boundary_layers = 4, (10, 10, 10, 10, 10), False
        config.tol = 1e-15
        config.reasons["order"] = "1D: the expansion terminates for a polynomial source"
    else:
        scale = _source_scale(problem)
        # 3D: the unknowns grow like degree³ and the least squares like their cube, so the
        # degree is held at 16 (about 4 800 unknowns with the layers: on paper_3d(0.1) about a
        # minute on 2 cores; degree 12 measured a 3x larger error, 20 twice the time again).
        # The slow coefficients carry more than the homogenised solution (the lifting, the
        # layers' tails, the higher-order terms): a floor on the degree whatever the source.
        # 2D: 2.1 / ℓ within [24, 30] before; at ε <= 0.05 the error left after the corner
        # patches was the slow part's resolution (paper_2d, ℓ ≈ 0.07: mean degree 30 / 32 / 34
        # measured rel. L² 1.06e-4 / 6.4e-5 / 3.6e-5 at ε = 0.02 and 1.5e-4 / - / 6.6e-5 at
        # 0.01); 32 keeps the solve within 10 s on two cores (34: 3 777 unknowns, about 11 s).
        floor, cap = (24, 32) if d == 2 else (16, 16)
        top = int(min(cap, max(floor, math.ceil(2.3 / max(scale, 1e-12)))))
        if d == 2:
            # Tied: free blocks of degrees (top, top - 6, top - 12) leave the order-0 part
            # consistent with its correctors only up to degree top - 10 (the order-m block must
            # hold D^β of it), and the strong residual of the rest grows like 1/ε; tied
            # correctors keep all of degree top (on paper_2d at ε = 0.01: rel. L² 1.1e-3 ->
            # 3.2e-4 with the same 2 076 unknowns and points).
            # Free blocks of degrees top - 2 and top - 6 beside the tied features (top - 6 and
            # top - 12 before): rel. L² on paper_2d at ε = 0.05 / 0.02 1.0e-4 / 2.7e-4 ->
            # 7.2e-5 / 2.0e-4, on inclusion_2d(0.02) 2.6e-4 -> 1.8e-4, at 1.3x the unknowns;
            # (top - 1, top - 4) gained 5-10 % more for 0.4x more unknowns again.
            config.degrees = (top, top - 1, top - 2)
            config.tied, config.free_degrees = True, (max(6, top - 2), max(4, top - 6))
            # Tied to order 3 (no free order-3 features: the unknowns of order 2), on a box with
            # layers for the order-2 traces too: the tied residual is O(ε² D⁴φ) instead of
            # O(ε D³φ), and the point-dependent interior bump of order 2 is gone (measured in
            # the module doc). On a mesh domain the boundary band (bands.py) holds the
            # boundary and the basis serves the interior: fitted to a fine reference's values
            # in the overlap, order 3 measured rel. L² 3.3e-4 against 1.2e-3 with order 2 on
            # a gmsh rectangle at ε = 0.02, and 1.1e-2 against 2.0e-2 on the demo's plate with
            # holes (without the band the plate measured 0.10 against 8.5e-2 at ε = 0.05: its
            # error was then at the oblique Neumann boundary).
            config.order = 3
            config.degrees = (top, top - 1, top - 2, top - 3)
            config.free_degrees = (*config.free_degrees, -1)
            config.reasons["order"] = "2D: tied to order 3"
            if isinstance(problem.domain, Box):
                config.layer_order = 2
                config.reasons["order"] += ", layers for the order-2 traces"
        else:
            # Tied correctors in 3D (degrees (16, 15, 14), free 10 and 6) measured 1.25e-2 /
            # 5.7e-2 on paper_3d(0.1) in 95 s against 1.53e-2 / 5.8e-2 in 73 s free: there the
            # error sits at the faces and edges, so the blocks stay free.
            config.degrees = (top, max(6, top - 6), max(4, top - 10))
        config.reasons["degrees"] = f"source length scale {scale:.3g} -> mean degree {top}"
        config.boundary_layers = True
        # 2D: 14 at the mean degree 32 of a Gaussian source like paper_2d's (measured with it;
        # 20 measured worse on paper_2d(0.02)).
        config.layer_degree = max(8, top - (18 if d == 2 else 16))
        if not isinstance(problem.domain, Box):
            # The face layers belong to the faces of a box; a mesh domain's boundary is not.
            config.boundary_layers = False
            config.reasons["boundary_layers"] = "off: the domain is not a box"
            if d == 2:
                config.holes = tuple(
                    (tuple(float(v) for v in centre), radius)
                    for centre, radius in problem.domain.holes()
                )
                config.reasons["holes"] = f"{len(config.holes)} inner boundary loop(s)"
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown setting {key!r}; one of {sorted(vars(config))}")
        setattr(config, key, value)
    if ("degrees" in overrides or "order" in overrides) and "tied" not in overrides:
        # Degrees of the user's own are the free blocks they name.
        config.tied, config.free_degrees = False, ()
    if "degrees" in overrides and "order" not in overrides:
        config.order = len(config.degrees) - 1
    if "layer_order" not in overrides:
        config.layer_order = min(config.layer_order, max(config.order, 1))
    if len(config.degrees) < config.order + 1:
        raise ValueError(
            f"degrees must give one degree per order 0..{config.order}, got {config.degrees}"
        )
    if config.tied:
        degrees = tuple(config.degrees)
        short = [m for m in range(1, config.order + 1) if degrees[m] < degrees[0] - m]
        if short:
            raise ValueError(
                f"degrees: with tied correctors order m needs degree >= degrees[0] - m "
                f"(it holds D^β φ), got {degrees} (orders {short})"
            )
        free = tuple(config.free_degrees)
        if len(free) != config.order or any(
            not (-1 <= f <= degrees[m + 1]) for m, f in enumerate(free)
        ):
            raise ValueError(
                f"free_degrees: one degree in [-1, degrees[m]] per order 1..{config.order}, "
                f"got {config.free_degrees}"
            )
    return config


# -- the basis ----------------------------------------------------------------------------------
class TwoScaleBasis(nn.Module):
    """The two-scale ansatz ``v = Σ_m Σ_j c_mj S_j(x) F_m(x)`` with a linear output layer.

    Build it with :meth:`for_problem`. The features ``S_j F_m`` are fixed; ``output`` (an
    ``nn.Linear(n, 1)``, the last ``nn.Linear`` of the module) holds the coefficients, so
    :class:`~dolfinx_pinn.optim.LeastSquaresObjective` finds it and
    :func:`dolfinx_pinn.least_squares.solve_output_layer` solves it directly.

    Args:
        problem: The periodic problem.
        config: The configuration (default :func:`choose_config`).
        dtype: Parameter dtype (float64).
    """

    satisfies_boundary_condition = False
    # Its analytic jet is far cheaper than nested autograd through the Fourier families.
    prefers_jet = True

    def __init__(
        self,
        problem: MultiscaleProblem,
        config: BasisConfig | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if problem.period is None:
            raise ValueError(f"problem {problem.name!r}: TwoScaleBasis needs a period vector")
        config = choose_config(problem) if config is None else config
        self.config = config
        self.dim = problem.dim
        self.eps = problem.eps
        domain = problem.domain
        cell = FourierCellProblem(problem, config.k_max, max(config.order, 1), config.tol)
        self.cell_tensor = cell.tensor
        self.k_max = cell.k_max
        keys = cell.keys(config.order)
        kept = cell.wavevectors(config.order)
        self.num_harmonics = len(kept)
        coefficients = np.stack([cell.correctors[k][kept] for k in keys], axis=1)
        scales = [problem.eps ** len(k) for k in keys]
        self.fast = nn.ModuleList(
            [_FourierFamily(problem.eps, cell.kappa[kept], coefficients, scales)]
        )
        # blocks: (family, column or -1 for the constant, slow index set)
        blocks: list[tuple[int, int, np.ndarray]] = [
            (-1, 0, total_degree_indices(self.dim, config.degrees[0]))
        ]
        for column, key in enumerate(keys):
            blocks.append((0, column, total_degree_indices(self.dim, config.degrees[len(key)])))
        self._corrector_keys = list(keys)
        self.trace_misfit = 0.0
        self.layer_tail, self.layer_k_max = 0.0, 0
        # The slowest decay rate |Re λ| of the layers at the faces normal to each axis.
        self.layer_decay: dict[int, float] = {}
        if config.boundary_layers and self.dim in (2, 3):
            layer_keys = cell.keys(config.layer_order)
            for axis in range(self.dim):
                for side, face in ((0, domain.lower[axis]), (1, domain.upper[axis])):
                    lam, P, kappa_b, alpha, misfit, tail = cell.boundary_layer(
                        axis, side, face, layer_keys, config.layer_k_max
                    )
                    self.trace_misfit = max(self.trace_misfit, misfit)
                    self.layer_tail = max(self.layer_tail, tail)
                    modes = int(np.abs(np.rint(kappa_b * cell.period / (2 * np.pi))).max())
                    self.layer_k_max = max(self.layer_k_max, modes)
                    slowest = float(np.abs(lam.real).min()) if len(lam) else math.inf
                    self.layer_decay[axis] = min(self.layer_decay.get(axis, math.inf), slowest)
                    family = _LayerFamily(
                        problem.eps, axis, face, lam, P, kappa_b, alpha, problem.eps
                    )
                    self.fast.append(family)
                    indices = _tangential_indices(
                        self.dim, axis, config.layer_degree, config.layer_normal_degree
                    )
                    for column in range(family.size):
                        blocks.append((len(self.fast) - 1, column, indices))
        union, inverse = np.unique(np.vstack([b[2] for b in blocks]), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        self.slow = LegendreSlowBasis(domain.lower, domain.lengths.tolist(), union)
        self._blocks = []
        offset = 0
        for family, column, indices in blocks:
            columns = torch.as_tensor(inverse[offset : offset + len(indices)], dtype=torch.long)
            offset += len(indices)
            self._blocks.append((family, column, columns))
        # The hole functions: blocks after the Legendre ones, columns after the Legendre table.
        self._hole_start = len(self._blocks)
        self.holes = None
        if config.holes:
            if self.dim != 2:
                raise ValueError(f"holes: hole functions are 2D, got dim={self.dim}")
            self.holes = HoleFunctions(config.holes, config.hole_degree + config.order)
            degrees = self.holes.degrees
            for family, column, limit in [(-1, 0, 0)] + [
                (0, c, len(key)) for c, key in enumerate(keys)
            ]:
                chosen = torch.nonzero(degrees <= config.hole_degree + limit)[:, 0]
                self._blocks.append((family, column, self.slow.size + chosen))
        self.num_expanded = sum(len(c) for _, _, c in self._blocks)
        self._tied_blocks: list[tuple[int, torch.Tensor]] = []
        self._free_columns: torch.Tensor | None = None
        if config.tied:
            self._tie(domain.lengths, config)
        tied = len(self._blocks[0][2]) if config.tied else 0
        free = self.num_expanded if self._free_columns is None else len(self._free_columns)
        self.num_features = tied + free
        self.output = nn.Linear(self.num_features, 1, dtype=dtype)
        with torch.no_grad():
            self.output.weight.zero_()
            self.output.bias.zero_()
        self.output.bias.requires_grad_(False)

    # -- tied correctors ----------------------------------------------------------------------
    def _tie(self, lengths: Sequence[float], config: BasisConfig) -> None:
        """The map from the output unknowns (tied, then free) to the block features.

        A tied feature is ``φ_n + Σ_β m_β F_β D^β φ_n`` (``F_β`` already holds ``ε^|β|``, ``m_β``
        the number of orderings of β: the symmetrised corrector stands for all of them); the
        Legendre expansion of ``D^β φ_n`` in the order-|β| block is exact (coefficients by
        Gauss-Legendre quadrature of the differentiated recurrence).
        """
        top = int(config.degrees[0])
        nodes, weights = np.polynomial.legendre.leggauss(top + 2)
        t = torch.as_tensor(nodes, dtype=torch.float64)
        tables = [table.numpy() for table in _legendre_table(t, top, config.order)]
        # projections[q][i, n]: coefficient of L_i in d^q/dt^q L_n (orthonormal for dt/2)
        projections = [(tables[0] * weights[:, None] / 2.0).T @ table for table in tables]
        indices = self.slow.indices.numpy()
        tied = indices[self._blocks[0][2].numpy()]
        for b, (family, column, columns) in enumerate(self._blocks):
            if family != 0 or b >= self._hole_start:
                continue
            key = self._corrector_keys[column]
            counts = [key.count(a) for a in range(self.dim)]
            multiplicity = math.factorial(len(key)) / math.prod(math.factorial(c) for c in counts)
            position = {tuple(indices[c]): row for row, c in enumerate(columns.tolist())}
            matrix = np.zeros((len(columns), len(tied)))
            for j, n in enumerate(tied):
                factors = []
                for a in range(self.dim):
                    q = counts[a]
                    column_ = projections[q][:, n[a]] * (2.0 / lengths[a]) ** q
                    # d^q/dt^q L_n holds L_i for i <= n - q of the same parity only (the rest
                    # is quadrature round-off)
                    support = range(n[a] - q, -1, -2)
                    factors.append([(i, column_[i]) for i in support])
                for combination in itertools.product(*factors):
                    target = tuple(i for i, _ in combination)
                    if target not in position:
                        raise ValueError(
                            f"degrees: D^{key} of a degree-{sum(n)} slow function is not in the "
                            f"order-{len(key)} block of degree {config.degrees[len(key)]}"
                        )
                    matrix[position[target], j] += multiplicity * math.prod(
                        v for _, v in combination
                    )
            self._tied_blocks.append((b, torch.as_tensor(matrix)))
        free = []
        offset = 0
        for b, (family, column, columns) in enumerate(self._blocks):
            if b >= self._hole_start:
                free.extend(range(offset, offset + len(columns)))
            elif family == 0:
                limit = config.free_degrees[len(self._corrector_keys[column]) - 1]
                degree = indices[columns.numpy()].sum(1)
                free.extend((offset + np.flatnonzero(degree <= limit)).tolist())
            elif family >= 1:
                free.extend(range(offset, offset + len(columns)))
            offset += len(columns)
        self._free_columns = torch.as_tensor(free, dtype=torch.long)

    def _block_slices(self) -> list[slice]:
        slices, offset = [], 0
        for _, _, columns in self._blocks:
            slices.append(slice(offset, offset + len(columns)))
            offset += len(columns)
        return slices

    def _reduce(self, expanded: torch.Tensor) -> torch.Tensor:
        """Block-feature columns ``(..., num_expanded)`` -> output-unknown columns."""
        if self._free_columns is None:
            return expanded
        slices = self._block_slices()
        tied = expanded[..., slices[0]].clone()
        for b, matrix in self._tied_blocks:
            tied += expanded[..., slices[b]] @ matrix.to(expanded.device)
        return torch.cat([tied, expanded[..., self._free_columns.to(expanded.device)]], -1)

    def _expanded_weights(self) -> torch.Tensor:
        """The output weights on the block features ``(num_expanded,)`` (differentiable)."""
        weight = self.output.weight[0]
        if self._free_columns is None:
            return weight
        slices = self._block_slices()
        tied = weight[: slices[0].stop]
        pieces = {0: tied}
        for b, matrix in self._tied_blocks:
            pieces[b] = matrix.to(weight.device) @ tied
        dense = torch.cat(
            [
                pieces[b]
                if b in pieces
                else torch.zeros(sl.stop - sl.start, dtype=weight.dtype, device=weight.device)
                for b, sl in enumerate(slices)
            ]
        )
        free = self._free_columns.to(weight.device)
        return dense.index_add(0, free, weight[slices[0].stop :])

    @property
    def layer_unknowns(self) -> int:
        """The output-layer unknowns of the boundary-layer features."""
        return sum(len(columns) for family, _, columns in self._blocks if family >= 1)

    def layer_widths(self, tolerance: float = 1e-6) -> list[float]:
        """Per axis, the distance from a face over which its layers decay to ``tolerance``.

        ``ε log(1/tolerance) / min |Re λ|`` (0 for an axis without layers): the slowest Bloch
        mode sets the width of the region whose unknowns need points of their own.
        """
        return [
            self.eps * math.log(1.0 / tolerance) / self.layer_decay[axis]
            if axis in self.layer_decay
            else 0.0
            for axis in range(self.dim)
        ]

    @classmethod
    def for_problem(cls, problem: MultiscaleProblem, **overrides: Any) -> TwoScaleBasis:
        """A basis with every choice taken from the problem (see :func:`choose_config`).

        Keyword overrides are fields of :class:`BasisConfig` (``order``, ``degrees``,
        ``boundary_layers``, ``layer_degree``, ``tol``, ...).
        """
        dtype = overrides.pop("dtype", torch.float64)
        return cls(problem, choose_config(problem, **overrides), dtype=dtype)

    # -- jets -----------------------------------------------------------------------------------
    def _fast_jets(self, x: torch.Tensor, hessian: bool) -> list[tuple[Any, Any, Any]]:
        # The layer families of all faces share one mode grid: its exponentials once.
        computed: list[tuple[torch.Tensor, torch.Tensor]] = []
        jets = []
        for family in self.fast:
            if not isinstance(family, _LayerFamily):
                jets.append(family.jet(x, hessian))
                continue
            E = next((E for kappa, E in computed if torch.equal(kappa, family.kappa)), None)
            if E is None:
                E = family.exponentials(x)
                computed.append((family.kappa, E))
            jets.append(family.jet(x, hessian, E))
        return jets

    def _pieces(self, x: torch.Tensor, hessian: bool) -> Any:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: points must have shape (N, {self.dim}), got {tuple(x.shape)}")
        x = x.to(torch.float64)
        slow = self.slow.jet(x, second=hessian)
        if self.holes is not None:
            extra = self.holes.jet(x, second=hessian)
            slow = (
                torch.cat([slow[0], extra[0]], 1),
                torch.cat([slow[1], extra[1]], 2),
                torch.cat([slow[2], extra[2]], 3) if hessian else None,
            )
        fast = self._fast_jets(x, hessian)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        zeros = torch.zeros(x.shape[0], self.dim, 1, dtype=x.dtype, device=x.device)
        constant = (ones, zeros, torch.zeros(x.shape[0], self.dim, self.dim, 1, dtype=x.dtype))
        return slow, fast, constant

    def _fast_of(self, fast: list, constant: tuple, family: int, column: int) -> tuple:
        if family < 0:
            return constant[0][:, 0], constant[1][..., 0], constant[2][..., 0]
        value, gradient, hessian = fast[family]
        return (
            value[:, column],
            gradient[:, :, column],
            None if hessian is None else hessian[:, :, :, column],
        )

    def feature_jet(self, x: torch.Tensor, full_hessian: bool = False) -> Jet:
        """Jets of the output-layer features at points ``(N, d)``.

        Returns:
            ``(Φ (N, n), ∇Φ (N, d, n), ΔΦ (N, n))`` or with ``full_hessian`` the Hessians
            ``(N, d, d, n)``, by the product rule from the slow and fast jets.
        """
        (S, gS, hS), fast, constant = self._pieces(x, True)
        values, grads, seconds = [], [], []
        for family, column, columns in self._blocks:
            F, gF, hF = self._fast_of(fast, constant, family, column)
            s, gs, hs = S[:, columns], gS[:, :, columns], hS[:, :, :, columns]
            values.append(F[:, None] * s)
            grads.append(gF[:, :, None] * s[:, None, :] + F[:, None, None] * gs)
            cross = gF[:, :, None, None] * gs[:, None, :, :]
            hessian = (
                hF[:, :, :, None] * s[:, None, None, :]
                + cross
                + cross.transpose(1, 2)
                + F[:, None, None, None] * hs
            )
            seconds.append(hessian if full_hessian else torch.diagonal(hessian, 0, 1, 2).sum(-1))
        return (
            self._reduce(torch.cat(values, 1)),
            self._reduce(torch.cat(grads, 2)),
            self._reduce(torch.cat(seconds, -1)),
        )

    def operator_rows(self, x: torch.Tensor, K: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
        """Rows ``-(K : ∇²Φ + drift · ∇Φ)`` ``(N, n)`` of the features, without their Hessians.

        With ``L g = K : ∇²g + drift · ∇g`` the product rule gives
        ``L(S F) = F L S + S L F + 2 (K ∇S) · ∇F``, computed from the slow and fast jets at the
        cost of a few multiply-adds per entry.

        Args:
            x: Points ``(N, d)``.
            K: The coefficient as a tensor ``(N, d, d)``.
            drift: ``∇·K`` ``(N, d)`` (``∇K`` for a scalar K).
        """
        (S, gS, hS), fast, constant = self._pieces(x, True)
        LS = torch.einsum("njk,njks->ns", K, hS) + torch.einsum("nj,njs->ns", drift, gS)
        KS = torch.einsum("njk,nks->njs", K, gS)
        # Written block by block into one array, in place: the rows are memory-bound.
        rows = torch.empty(x.shape[0], self.num_expanded, dtype=x.dtype, device=x.device)
        offset = 0
        for family, column, columns in self._blocks:
            block = rows[:, offset : offset + len(columns)]
            offset += len(columns)
            if family < 0:  # the constant 1: L(S) alone
                block.copy_(LS[:, columns]).neg_()
                continue
            F, gF, hF = self._fast_of(fast, constant, family, column)
            LF = torch.einsum("njk,njk->n", K, hF) + (drift * gF).sum(1)
            block.copy_(LS[:, columns]).mul_(F[:, None])
            block.addcmul_(S[:, columns], LF[:, None])
            for j in range(self.dim):
                block.addcmul_(KS[:, j, columns], gF[:, j : j + 1], value=2.0)
            block.neg_()
        return self._reduce(rows)

    def value_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Feature values ``(N, n)`` (the rows of Dirichlet conditions)."""
        (S, _, _), fast, constant = self._pieces(x, False)
        rows = []
        for family, column, columns in self._blocks:
            F = self._fast_of(fast, constant, family, column)[0]
            rows.append(F[:, None] * S[:, columns])
        return self._reduce(torch.cat(rows, 1))

    def _scattered_weights(self, size: int, device: torch.device) -> torch.Tensor:
        """The output weights as a ``(slow functions, blocks)`` matrix (differentiable)."""
        weight = self._expanded_weights()
        scattered = torch.zeros(size, len(self._blocks), dtype=weight.dtype, device=device)
        offset = 0
        for b, (_, _, columns) in enumerate(self._blocks):
            scattered[columns.to(device), b] = weight[offset : offset + len(columns)]
            offset += len(columns)
        return scattered

    def _solution_jet(self, x: torch.Tensor, hessian: bool) -> tuple[Any, Any, Any]:
        """``v``, ``∇v`` and (with ``hessian``) ``∇²v`` ``(N, d, d)`` of the solution.

        The slow coefficient of every fast function is one product ``S @ W`` with the output
        weights scattered into a ``(slow functions, blocks)`` matrix, so the cost is that of
        the slow and fast jets, not of the ``n`` features.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: points must have shape (N, {self.dim}), got {tuple(x.shape)}")
        x = x.to(torch.float64)
        fast = self._fast_jets(x, hessian)
        legendre = self.slow.size
        holes = 0 if self.holes is None else self.holes.size
        scattered = self._scattered_weights(legendre + holes, x.device)
        Sc, gSc, hSc = self.slow.combination_jet(x, scattered[:legendre], hessian)
        if holes:
            H, gH, hH = self.holes.jet(x, second=hessian)
            tail = scattered[legendre:]
            Sc = Sc + H @ tail
            gSc = gSc + gH @ tail
            if hessian:
                hSc = hSc + hH @ tail
        n, d = x.shape[0], self.dim
        value = torch.zeros(n, dtype=torch.float64, device=x.device) + self.output.bias
        gradient = torch.zeros(n, d, dtype=torch.float64, device=x.device)
        second = torch.zeros(n, d, d, dtype=torch.float64, device=x.device) if hessian else None
        for b, (family, column, _) in enumerate(self._blocks):
            c, gc = Sc[:, b], gSc[:, :, b]
            if family < 0:  # the constant fast function 1
                value = value + c
                gradient = gradient + gc
                if hessian:
                    second = second + hSc[:, :, :, b]
                continue
            F, gF, hF = self._fast_of(fast, None, family, column)
            value = value + F * c
            gradient = gradient + gF * c[:, None] + F[:, None] * gc
            if hessian:
                cross = gF[:, :, None] * gc[:, None, :]
                second = (
                    second
                    + hF * c[:, None, None]
                    + cross
                    + cross.transpose(1, 2)
                    + F[:, None, None] * hSc[:, :, :, b]
                )
        return value, gradient, second

    def value_and_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v (N,)`` and ``∇v (N, d)`` without second derivatives (evaluation, errors, K̃)."""
        value, gradient, _ = self._solution_jet(x, hessian=False)
        return value, gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, d)``."""
        return self._solution_jet(x, hessian=False)[0]

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """Value, gradient and Laplacian (or Hessian) at points ``(N, d)``.

        Args:
            x: Points ``(N, d)``.
            full_hessian: Return the Hessian ``(N, r, r)`` instead of the Laplacian ``(N,)``.
            directions: ``(r, d)`` or ``(N, r, d)`` directions (default the coordinate axes).

        Returns:
            ``(value (N,), gradient (N, r), Laplacian (N,) or Hessian (N, r, r))``.
        """
        value, gradient, hessian = self._solution_jet(x, hessian=True)
        if directions is None:
            if full_hessian:
                return value, gradient, hessian
            return value, gradient, torch.diagonal(hessian, 0, 1, 2).sum(-1)
        tangents = directions.to(x.dtype)
        if tangents.ndim == 2:
            tangents = tangents.expand(x.shape[0], *tangents.shape)
        projected = tangents @ hessian @ tangents.transpose(1, 2)
        gradient = (tangents @ gradient.unsqueeze(-1))[..., 0]
        if full_hessian:
            return value, gradient, projected
        return value, gradient, torch.diagonal(projected, 0, 1, 2).sum(-1)

    def describe(self) -> dict[str, Any]:
        """The configuration and sizes (JSON-friendly)."""
        return {
            "features": self.num_features,
            "harmonics": self.num_harmonics,
            "k_max": self.k_max,
            "order": self.config.order,
            "degrees": list(self.config.degrees),
            "tied": self.config.tied,
            "free_degrees": list(self.config.free_degrees),
            "block_features": self.num_expanded,
            "holes": len(self.config.holes),
            "hole_degree": self.config.hole_degree if self.config.holes else None,
            "boundary_layers": self.config.boundary_layers and self.dim >= 2,
            "layer_degree": self.config.layer_degree,
            "layer_order": self.config.layer_order,
            "trace_misfit": self.trace_misfit,
            "layer_k_max": self.layer_k_max,
            "layer_tail": self.layer_tail,
            "reasons": dict(self.config.reasons),
        }
