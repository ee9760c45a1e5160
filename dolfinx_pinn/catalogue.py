"""A held-out catalogue of coefficients: what a user might bring, beyond the paper's two.

The solver was tuned on :func:`~dolfinx_pinn.problems.paper_1d` and
:func:`~dolfinx_pinn.problems.paper_2d`; these problems are the ones it is checked on without
tuning (``benchmarks/bench_coefficients.py``, ``tests/test_catalogue.py``): several harmonics,
high contrast, a coefficient that is not a sum of 1D functions, a smoothed inclusion and an
anisotropic tensor. Every coefficient is periodic in the fast variable ``y = x/ε`` with the
declared period vector, and bounded by the declared ``alpha`` and ``beta``.

All take the scale ε first and return a :class:`~dolfinx_pinn.problems.MultiscaleProblem`;
:data:`CATALOGUE` maps their names to the factories.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "CATALOGUE",
    "anisotropic_2d",
    "contrast_1d",
    "gridlod_1d",
    "inclusion_2d",
    "product_2d",
    "two_harmonics_1d",
]


def _source_1d(x: Sequence[Any], m: SimpleNamespace) -> Any:
    return -3.0 * (2.0 * x[0] - 1.0)


def two_harmonics_1d(eps: float) -> MultiscaleProblem:
    """``K = 3 + sin(2πy) + 0.8 cos(4πy)`` (two harmonics, contrast 4), q = -3(2x - 1)."""

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        y = x[0] / eps
        return 3.0 + m.sin(2.0 * m.pi * y) + 0.8 * m.cos(4.0 * m.pi * y)

    return MultiscaleProblem(
        coefficient, _source_1d, eps, dim=1, period=(1.0,), name="two_harmonics_1d"
    )


def contrast_1d(eps: float, contrast: float = 41.0) -> MultiscaleProblem:
    """``K = exp(log(c)(1 + sin 2πy)/2)``: smooth, from 1 to the contrast c, q = -3(2x - 1).

    With c = 41 this has the contrast of ``1.05 + sin(2πy)``; up to c = 1000 the issue's range.

    Args:
        eps: The scale ε.
        contrast: max K / min K, in [1, 1e4].
    """
    if not (isinstance(contrast, (int, float)) and 1 <= contrast <= 1e4):
        raise ValueError(f"contrast must be a number in [1, 1e4], got {contrast!r}")
    half_log = 0.5 * math.log(contrast)

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return m.exp(half_log * (1.0 + m.sin(2.0 * m.pi * x[0] / eps)))

    return MultiscaleProblem(
        coefficient,
        _source_1d,
        eps,
        dim=1,
        period=(1.0,),
        alpha=1.0,
        beta=float(contrast),
        name=f"contrast_1d_{contrast:g}",
    )


def gridlod_1d(eps: float) -> MultiscaleProblem:
    """``K = 1/(2 - cos 2πy)``: the exact-solution test of the gridlod LOD package, q = 1."""

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 1.0 / (2.0 - m.cos(2.0 * m.pi * x[0] / eps))

    def source(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 1.0 + 0.0 * x[0]

    return MultiscaleProblem(
        coefficient,
        source,
        eps,
        dim=1,
        period=(1.0,),
        alpha=1.0 / 3.0,
        beta=1.0,
        effective_tensor=[[1.0 / 2.0]],
        name="gridlod_1d",
    )


def product_2d(eps: float) -> MultiscaleProblem:
    """``K = 2 + sin(2πy1) sin(2πy2)`` (not a sum of 1D functions), q = 1 + x1 x2."""

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 2.0 + m.sin(2.0 * m.pi * x[0] / eps) * m.sin(2.0 * m.pi * x[1] / eps)

    def source(x: Sequence[Any], m: SimpleNamespace) -> Any:
        return 1.0 + x[0] * x[1]

    return MultiscaleProblem(
        coefficient,
        source,
        eps,
        dim=2,
        period=(1.0, 1.0),
        alpha=1.0,
        beta=3.0,
        name="product_2d",
    )


def _gaussian_source(x: Sequence[Any], m: SimpleNamespace) -> Any:
    return 10.0 * m.exp(-100.0 * ((x[0] - 0.5) ** 2 + (x[1] - 0.5) ** 2))


def inclusion_2d(eps: float, inside: float = 10.0, radius: float = 0.25) -> MultiscaleProblem:
    """A smoothed disk of conductivity ``inside`` in a matrix of 1, in every cell; q Gaussian.

    ``K = 1 + (inside - 1) σ(r)``, ``σ = (1 + tanh((R - r)/w))/2`` with r the distance of the
    fast variable to the cell centre (a smooth periodic function: the distance to the nearest
    centre, by ``cos`` so that it is smooth across the cell faces) and w = R/4.

    Args:
        eps: The scale ε.
        inside: The inclusion's conductivity (> 0; the contrast).
        radius: The inclusion's radius R in the unit cell, in (0, 0.5).
    """
    if not (isinstance(inside, (int, float)) and inside > 0):
        raise ValueError(f"inside must be a number > 0, got {inside!r}")
    if not (isinstance(radius, (int, float)) and 0 < radius < 0.5):
        raise ValueError(f"radius must lie in (0, 0.5), got {radius!r}")
    width = radius / 4.0

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        # A smooth periodic "squared distance" to the cell centre: sum of (1 - cos 2πy)/(2π²).
        s = sum((1.0 + m.cos(2.0 * m.pi * x[j] / eps)) / (2.0 * m.pi**2) for j in range(2))
        r = m.sqrt(s + 1e-12)
        return 1.0 + (inside - 1.0) * 0.5 * (1.0 + m.tanh((radius - r) / width))

    low, high = min(1.0, inside), max(1.0, inside)
    return MultiscaleProblem(
        coefficient,
        _gaussian_source,
        eps,
        dim=2,
        period=(1.0, 1.0),
        alpha=low,
        beta=high,
        name="inclusion_2d",
    )


def anisotropic_2d(eps: float) -> MultiscaleProblem:
    """A smooth SPD tensor: ``[[3 + sin 2πy1, 0.5 sin 2π(y1 + y2)], [·, 2 + cos 2πy2]]``.

    The off-diagonal entry couples the directions; the eigenvalues stay in [0.79, 4.21].
    """

    def coefficient(x: Sequence[Any], m: SimpleNamespace) -> Any:
        y1, y2 = x[0] / eps, x[1] / eps
        off = 0.5 * m.sin(2.0 * m.pi * (y1 + y2))
        return [
            [3.0 + m.sin(2.0 * m.pi * y1), off],
            [off, 2.0 + m.cos(2.0 * m.pi * y2)],
        ]

    return MultiscaleProblem(
        coefficient, _gaussian_source, eps, dim=2, period=(1.0, 1.0), name="anisotropic_2d"
    )


#: The catalogue by name.
CATALOGUE: dict[str, Callable[..., MultiscaleProblem]] = {
    "two_harmonics_1d": two_harmonics_1d,
    "contrast_1d": contrast_1d,
    "gridlod_1d": gridlod_1d,
    "product_2d": product_2d,
    "inclusion_2d": inclusion_2d,
    "anisotropic_2d": anisotropic_2d,
}
