"""Collocation points concentrated where the solution has its ε-wide structure, with weights.

A two-scale basis carries unknowns that live in regions of width O(ε): the boundary-layer
correctors along the faces and the corners where two layers meet. Uniform points put only a
fraction O(ε) of themselves there, so at a fixed number of points those unknowns become
under-sampled as ε falls (the least squares then fits the few points it has and the error
grows). :class:`StratifiedPoints` draws a fixed number of extra points in each such region
(boxes along the faces and at the corners) and gives every point, uniform or extra, the weight
``1 / p(x)`` of the mixture density ``p`` of all the draws, so that

    Σ_i w_i g(x_i)  ≈  ∫_Ω g dx

stays a consistent quadrature of the same collocation loss (3.24): the extra points change
how well the loss is sampled, not the loss.

MPI: every rank draws the same global set and keeps its share (every ``size``-th point), so
the points do not depend on the number of ranks; the densities use the global counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import qmc

__all__ = ["PointGroup", "StratifiedPoints", "layer_groups"]


@dataclass(frozen=True)
class PointGroup:
    """``count`` points (global) drawn uniformly over the union of ``boxes``.

    A box is picked with probability proportional to its volume, so the group's density is
    ``count / Σ|B_k|`` times the number of its boxes that contain x (overlaps count twice).

    Attributes:
        name: A label (for reports).
        boxes: ``[(lower, upper), ...]``, each a sequence of d floats.
        count: The number of points over all ranks.
    """

    name: str
    boxes: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]
    count: int

    @property
    def volume(self) -> float:
        """``Σ_k |B_k|``."""
        return float(sum(np.prod(np.subtract(upper, lower)) for lower, upper in self.boxes))

    def density(self, x: np.ndarray) -> np.ndarray:
        """The group's point density (points per unit volume) at ``x (N, d)``."""
        inside = np.zeros(len(x))
        for lower, upper in self.boxes:
            inside += np.all((x >= np.asarray(lower)) & (x <= np.asarray(upper)), axis=1)
        return self.count / max(self.volume, 1e-300) * inside

    def draw(self, count: int, seed: int) -> np.ndarray:
        """``count`` points of this group (this rank's share), scrambled Sobol' per box."""
        volumes = np.array([np.prod(np.subtract(u, lo)) for lo, u in self.boxes])
        rng = np.random.default_rng([seed, 7])
        # Whole counts per box in proportion to the volumes (largest remainders), so that the
        # draw is stratified across the boxes rather than multinomial.
        share = count * volumes / volumes.sum()
        counts = np.floor(share).astype(np.int64)
        remainder = count - int(counts.sum())
        if remainder:
            counts[np.argsort(share - counts)[::-1][:remainder]] += 1
        parts = []
        for (lower, upper), n in zip(self.boxes, counts, strict=True):
            if n == 0:
                continue
            sequence = qmc.Sobol(len(lower), scramble=True, seed=rng)
            unit = sequence.random_base2(max(0, math.ceil(math.log2(n))))[:n]
            parts.append(np.asarray(lower) + (np.subtract(upper, lower)) * unit)
        dim = len(self.boxes[0][0])
        return np.concatenate(parts) if parts else np.zeros((0, dim))


class StratifiedPoints:
    """Uniform points plus extra groups, weighted by the inverse mixture density.

    Args:
        measure: ``|Ω|``.
        uniform_count: The uniform points over all ranks (drawn elsewhere, e.g. per coarse
            cell by :class:`~dolfinx_pinn.coarse.CollocationPoints`).
        groups: The extra groups (their boxes must lie in Ω).
    """

    def __init__(self, measure: float, uniform_count: int, groups: Sequence[PointGroup]) -> None:
        if not (math.isfinite(measure) and measure > 0):
            raise ValueError(f"measure must be a finite number > 0, got {measure}")
        if uniform_count < 1:
            raise ValueError(f"uniform_count must be >= 1, got {uniform_count}")
        self.measure = measure
        self.uniform_count = int(uniform_count)
        self.groups = [g for g in groups if g.count > 0]

    @property
    def extra_count(self) -> int:
        """The extra points over all ranks."""
        return sum(g.count for g in self.groups)

    def draw(self, rank: int, size: int, seed: int) -> np.ndarray:
        """This rank's extra points ``(M_extra_local, d)``.

        Every rank draws the same global set and keeps every ``size``-th point, so the set
        (and a solve on it) does not depend on the number of ranks.
        """
        parts = [
            group.draw(group.count, seed + 7919 * index)[rank::size]
            for index, group in enumerate(self.groups)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    def weights(self, x: np.ndarray) -> np.ndarray:
        """Quadrature weights ``1 / p(x)`` of points ``(N, d)`` (uniform or extra)."""
        density = np.full(len(x), self.uniform_count / self.measure)
        for group in self.groups:
            density += group.density(x)
        return 1.0 / density


def layer_groups(
    lower: Sequence[float],
    upper: Sequence[float],
    widths: Sequence[float],
    face_count: int,
    corner_count: int,
) -> list[PointGroup]:
    """The face slabs and corner boxes of a box domain.

    Args:
        lower: The box's lower corner.
        upper: The upper corner.
        widths: The layer width normal to each axis (the slab along a face ``x_a = c`` is
            ``widths[a]`` thick; capped at half the edge).
        face_count: Points over all face slabs.
        corner_count: Points over all corner boxes (``widths`` on each side, ``2^d`` corners).

    Returns:
        ``[faces, corners]`` (groups with zero count are dropped by :class:`StratifiedPoints`).
    """
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    dim = len(lo)
    w = np.minimum(np.asarray(widths, dtype=np.float64), 0.5 * (hi - lo))
    faces = []
    for axis in range(dim):
        for side in (0, 1):
            a, b = lo.copy(), hi.copy()
            if side == 0:
                b[axis] = lo[axis] + w[axis]
            else:
                a[axis] = hi[axis] - w[axis]
            faces.append((tuple(a), tuple(b)))
    corners = []
    for signs in np.ndindex(*([2] * dim)):
        a = np.where(np.array(signs) == 0, lo, hi - w)
        b = np.where(np.array(signs) == 0, lo + w, hi)
        corners.append((tuple(a), tuple(b)))
    return [
        PointGroup("faces", tuple(faces), int(face_count)),
        PointGroup("corners", tuple(corners), int(corner_count)),
    ]
