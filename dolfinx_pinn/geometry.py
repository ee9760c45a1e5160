"""A problem's domain given by a DOLFINx mesh of any shape: :class:`MeshDomain`.

:class:`~dolfinx_pinn.problems.Box` describes an axis-aligned box in closed form. A FEniCS user's
domain is a mesh (from ``dolfinx.io.gmsh``, ``dolfinx.io.XDMFFile`` or any other source:
intervals, triangles or tetrahedra, distributed over the ranks). :class:`MeshDomain` offers
what the rest of the package asks of a domain, computed from the mesh itself:

* ``dim``, the bounding box ``lower``/``upper``/``lengths``, and the measures ``measure`` = |Ω|
  and ``boundary_measure`` = |∂Ω|, assembled as the mesh's own integrals ``∫ 1 dx``, ``∫ 1 ds``;
* the exterior facets, gathered once onto every rank (:class:`BoundaryFacets`: vertices
  oriented so that the domain lies on their inner side, outward unit normals, measures and
  facet tags), so that every rank can answer geometric questions about any point without
  communication, as the replicated network needs;
* :meth:`MeshDomain.contains` (a generalised winding number over the boundary facets),
  :meth:`MeshDomain.boundary_distance` (the exact Euclidean distance to the boundary, used by
  the boundary-layer rule of the compression operator) and uniform random sampling of
  interior and boundary points;
* :meth:`MeshDomain.potential_distance`: a smooth distance-like function that vanishes on a
  chosen part of the boundary (the Dirichlet facets) and is positive in Ω, for hard boundary
  conditions; see :func:`potential_sums`.

The potential distance. For a facet F and a point x at distance δ from F's line (2D) or plane
(3D), ``I_F(x) = ∫_F |x - y|^{-d} dy`` has the closed form ``θ_F(x) / δ`` (θ_F the angle, in 3D
the solid angle, under which F is seen from x: Van Oosterom & Strackee for triangles), which is
analytic in x away from F and tends to infinity on F. Summed over the Dirichlet facets,
``S(x) = Σ_F I_F(x)`` is the potential ``∫_Γ |x - y|^{-d} dy``; near a flat part of Γ it is
``c_d / δ + O(1)`` with ``c_d`` the angle of a half-space (π in 2D, 2π in 3D, 1 in 1D), so

    φ(x) = c_d / S(x)

is smooth in Ω, vanishes exactly on Γ_D, is positive elsewhere and is normalised to first order
(``∂φ/∂n = -1`` on flat parts of Γ_D), whatever the number of facets. The R-function
equivalence ``(Σ_F φ_F^{-m})^{-1/m}`` of approximate distance functions (Sukumar & Srivastava,
2022) behaves like that only for a few long segments: over a fine boundary mesh (gmsh arcs of
N segments) it degenerates (``φ ~ h^{1/m} δ^{(m-1)/m}`` at distances δ beyond the facet size
h), and the network would have to carry that error near the whole boundary. The same sums give
the transfinite blend ``w_k = S_k / Σ_l S_l`` of Dirichlet data g_k on several tagged parts
(``w_k = 1`` on Γ_k): :meth:`MeshDomain.potential_blend`.

MPI: construction is collective on the mesh's communicator; every method afterwards is local
and gives the same result on every rank (the boundary is replicated, sorted canonically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI

import dolfinx
import dolfinx.fem
import dolfinx.mesh
import numpy as np
import numpy.typing as npt
import scipy.sparse
import scipy.sparse.csgraph
import torch
import ufl

__all__ = [
    "BoundaryFacets",
    "MeshDomain",
    "boundary_distance",
    "facet_normals",
    "nearest_facets",
    "potential_sums",
    "winding_number",
]

#: The angle of a half-space seen from a point of its boundary plane: π (2D), 2π (3D), 1 (1D).
HALF_SPACE_ANGLE = {1: 1.0, 2: math.pi, 3: 2.0 * math.pi}
#: The smallest distance to a facet's line/plane in the potential, relative to the diameter:
#: on Γ_D the potential distance is this small instead of 0, and its derivatives stay finite.
_DISTANCE_FLOOR = 1e-13
_CHUNK = 2048  # points per chunk of the O(points x facets) kernels


@dataclass(frozen=True)
class BoundaryFacets:
    """The exterior facets of a mesh, the same on every rank.

    Attributes:
        vertices: ``(F, d, d)`` facet vertices (``(F, 1, 1)`` in 1D), oriented outward: in 2D
            the domain lies to the left of ``v0 → v1``; in 3D ``(v1 - v0) × (v2 - v0)`` points
            out of the domain.
        normals: ``(F, d)`` outward unit normals.
        measures: ``(F,)`` facet measures (1 for the points of a 1D boundary).
        tags: ``(F,)`` facet tag values (``-1`` for untagged facets).
    """

    vertices: np.ndarray
    normals: np.ndarray
    measures: np.ndarray
    tags: np.ndarray

    def select(self, tags: Sequence[int] | None) -> BoundaryFacets:
        """The facets with one of ``tags`` (``None``: all facets)."""
        if tags is None:
            return self
        keep = np.isin(self.tags, np.asarray(list(tags), dtype=np.int64))
        return BoundaryFacets(
            self.vertices[keep], self.normals[keep], self.measures[keep], self.tags[keep]
        )

    def __len__(self) -> int:
        return len(self.measures)


def facet_normals(facet_vertices: np.ndarray, opposite: np.ndarray) -> np.ndarray:
    """Outward unit normals ``(F, d)`` of simplex facets, away from their cell's other vertex.

    Args:
        facet_vertices: ``(F, d, d)`` the facets' vertices (``(F, 1, 1)`` in 1D).
        opposite: ``(F, d)`` the vertex of each facet's cell that is not on the facet.
    """
    d = facet_vertices.shape[-1]
    if d == 1:
        return np.sign(facet_vertices[:, 0, :] - opposite)
    if d == 2:
        tangent = facet_vertices[:, 1] - facet_vertices[:, 0]
        normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    else:
        normal = np.cross(
            facet_vertices[:, 1] - facet_vertices[:, 0], facet_vertices[:, 2] - facet_vertices[:, 0]
        )
    inward = np.einsum("fj,fj->f", normal, opposite - facet_vertices[:, 0]) > 0
    normal[inward] *= -1.0
    return normal / np.linalg.norm(normal, axis=1, keepdims=True)


def _orient(vertices: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Reorder each facet's vertices so that their orientation gives the outward normal."""
    d = vertices.shape[-1]
    if d == 1:
        return vertices
    if d == 2:
        tangent = vertices[:, 1] - vertices[:, 0]
        own = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    else:
        own = np.cross(vertices[:, 1] - vertices[:, 0], vertices[:, 2] - vertices[:, 0])
    flip = np.einsum("fj,fj->f", own, normals) < 0
    oriented = vertices.copy()
    oriented[flip, 0], oriented[flip, 1] = vertices[flip, 1], vertices[flip, 0]
    return oriented


def _simplex_measures(vertices: np.ndarray) -> np.ndarray:
    """Measures ``(F,)`` of k-simplices ``(F, k + 1, d)`` (1 for points)."""
    k = vertices.shape[1] - 1
    if k == 0:
        return np.ones(len(vertices))
    edges = vertices[:, 1:] - vertices[:, :1]
    gram = np.einsum("fkd,fld->fkl", edges, edges)
    return np.sqrt(np.maximum(np.linalg.det(gram), 0.0)) / math.factorial(k)


# -- kernels over the facets ---------------------------------------------------------------------
def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances ``(N, F)`` from points ``(N, 2)`` to segments ``a → b`` ``(F, 2)``."""
    ab = b - a
    ap = points[:, None, :] - a[None]
    t = np.clip(np.einsum("nfj,fj->nf", ap, ab) / np.einsum("fj,fj->f", ab, ab), 0.0, 1.0)
    return np.linalg.norm(ap - t[..., None] * ab[None], axis=-1)


def _triangle_distance(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Distances ``(N, F)`` from points ``(N, 3)`` to triangles ``(F, 3, 3)``.

    The distance to the plane where the projection falls inside the triangle, else the
    distance to the nearest edge.
    """
    v0, v1, v2 = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    normal = np.cross(v1 - v0, v2 - v0)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    offset = points[:, None, :] - v0[None]
    height = np.einsum("nfj,fj->nf", offset, normal)
    projected = points[:, None, :] - height[..., None] * normal[None]
    inside = np.ones(height.shape, dtype=bool)
    for a, b in ((v0, v1), (v1, v2), (v2, v0)):
        side = np.cross(b - a, projected - a[None])
        inside &= np.einsum("nfj,fj->nf", side, normal) >= 0.0
    edges = np.minimum.reduce(
        [_segment_distance_3d(points, a, b) for a, b in ((v0, v1), (v1, v2), (v2, v0))]
    )
    return np.where(inside, np.abs(height), edges)


def _segment_distance_3d(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    ap = points[:, None, :] - a[None]
    t = np.clip(np.einsum("nfj,fj->nf", ap, ab) / np.einsum("fj,fj->f", ab, ab), 0.0, 1.0)
    return np.linalg.norm(ap - t[..., None] * ab[None], axis=-1)


def _distance_matrix(points: np.ndarray, facets: BoundaryFacets) -> np.ndarray:
    """Distances ``(N, F)`` from points ``(N, d)`` to each facet."""
    d = facets.vertices.shape[-1]
    if d == 1:
        return np.abs(points[:, None, 0] - facets.vertices[None, :, 0, 0])
    if d == 2:
        return _segment_distance(points, facets.vertices[:, 0], facets.vertices[:, 1])
    return _triangle_distance(points, facets.vertices)


def boundary_distance(points: npt.ArrayLike, facets: BoundaryFacets) -> np.ndarray:
    """The Euclidean distance ``(N,)`` from points ``(N, d)`` to the union of the facets.

    Brute force over the facets in chunks of points (O(N F) work, bounded memory).
    """
    return _nearest(points, facets)[1]


def nearest_facets(points: npt.ArrayLike, facets: BoundaryFacets) -> np.ndarray:
    """The index ``(N,)`` of the facet nearest to each point (ties: the first)."""
    return _nearest(points, facets)[0]


def _nearest(points: npt.ArrayLike, facets: BoundaryFacets) -> tuple[np.ndarray, np.ndarray]:
    d = facets.vertices.shape[-1]
    points = np.asarray(points, dtype=np.float64).reshape(-1, d)
    if len(facets) == 0:
        return np.full(len(points), -1, dtype=np.int64), np.full(len(points), np.inf)
    index = np.empty(len(points), dtype=np.int64)
    distance = np.empty(len(points))
    step = max(1, (_CHUNK * 256) // max(len(facets), 1))
    for start in range(0, len(points), step):
        matrix = _distance_matrix(points[start : start + step], facets)
        index[start : start + step] = matrix.argmin(axis=1)
        distance[start : start + step] = matrix.min(axis=1)
    return index, distance


def winding_number(points: npt.ArrayLike, facets: BoundaryFacets) -> np.ndarray:
    """The generalised winding number ``(N,)`` of the oriented boundary around each point.

    1 inside, 0 outside, between 0 and 1 on the boundary itself (½ on a flat part). 2D: the sum
    of the signed angles of the segments, over 2π; 3D: of the signed solid angles (Van
    Oosterom & Strackee), over 4π; 1D: ``Σ_b ½ sign(x_b - x) n_b``.
    """
    points = np.asarray(points, dtype=np.float64)
    d = facets.vertices.shape[-1]
    points = points.reshape(-1, d)
    out = np.empty(len(points))
    step = max(1, (_CHUNK * 256) // max(len(facets), 1))
    for start in range(0, len(points), step):
        chunk = points[start : start + step]
        if d == 1:
            side = np.sign(facets.vertices[None, :, 0, 0] - chunk[:, None, 0])
            total = 0.5 * (side * facets.normals[None, :, 0]).sum(axis=1)
        elif d == 2:
            a = facets.vertices[None, :, 0] - chunk[:, None]
            b = facets.vertices[None, :, 1] - chunk[:, None]
            cross = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
            total = np.arctan2(cross, (a * b).sum(-1)).sum(axis=1) / (2.0 * math.pi)
        else:
            a, b, c = (facets.vertices[None, :, k] - chunk[:, None] for k in range(3))
            numerator, denominator = _solid_angle_terms(a, b, c, np)
            total = (2.0 * np.arctan2(numerator, denominator)).sum(axis=1) / (4.0 * math.pi)
        out[start : start + step] = total
    return out


def _solid_angle_terms(a: Any, b: Any, c: Any, xp: Any) -> tuple[Any, Any]:
    """``a·(b×c)`` and the denominator of Van Oosterom & Strackee's ``tan(Ω/2)``."""
    if xp is np:
        triple = np.einsum("...j,...j->...", a, np.cross(b, c))
        la, lb, lc = (np.linalg.norm(v, axis=-1) for v in (a, b, c))
    else:
        triple = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)
        la, lb, lc = (torch.linalg.vector_norm(v, dim=-1) for v in (a, b, c))
    denominator = la * lb * lc + (a * b).sum(-1) * lc + (a * c).sum(-1) * lb + (b * c).sum(-1) * la
    return triple, denominator


def potential_sums(
    x: torch.Tensor, facets: BoundaryFacets, groups: Sequence[Sequence[int] | None], scale: float
) -> list[torch.Tensor]:
    """``S_k(x) = Σ_{F in group k} ∫_F |x - y|^{-d} dy`` for each group of facet tags.

    In closed form (see the module doc): 1D ``1/|x - x_b|``; 2D ``L θ/|c|`` with ``c = a × b``
    (``a, b`` the segment's end points relative to x, ``θ = atan2(|c|, a·b)``); 3D
    ``2A Ω/|a·(b×c)|`` (``Ω = 2 atan2(|a·(b×c)|, D)``). The distance to a facet's line or
    plane is floored at ``1e-13 * scale``, so that the sums are finite everywhere (huge on the
    facets) and differentiable by autograd to second order. Differentiable in x.

    Args:
        x: Points ``(N, d)`` (torch, float64).
        facets: The boundary facets.
        groups: One tag list per sum (``None``: every facet).
        scale: The length scale of the floor (the domain's diameter).

    Returns:
        One ``(N,)`` tensor per group.
    """
    d = x.shape[1]
    floor = _DISTANCE_FLOOR * scale
    sums = []
    for tags in groups:
        chosen = facets.select(tags)
        vertices = torch.as_tensor(chosen.vertices, dtype=x.dtype, device=x.device)
        measures = torch.as_tensor(chosen.measures, dtype=x.dtype, device=x.device)
        if d == 1:
            distance = (x[:, None, 0] - vertices[None, :, 0, 0]).abs().clamp_min(floor)
            sums.append((1.0 / distance).sum(dim=1))
            continue
        rel = [vertices[None, :, k] - x[:, None] for k in range(d)]
        if d == 2:
            a, b = rel
            cross = (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).abs()
            height = torch.maximum(cross / measures, torch.full_like(cross, floor))
            angle = torch.atan2(height * measures, (a * b).sum(-1))
        else:
            triple, denominator = _solid_angle_terms(*rel, torch)
            height = torch.maximum(triple.abs() / (2.0 * measures), torch.full_like(triple, floor))
            angle = 2.0 * torch.atan2(2.0 * measures * height, denominator)
        sums.append((angle / height).sum(dim=1))
    return sums


# -- the domain ----------------------------------------------------------------------------------
def _check_simplex_mesh(mesh: dolfinx.mesh.Mesh) -> None:
    allowed = (
        dolfinx.mesh.CellType.interval,
        dolfinx.mesh.CellType.triangle,
        dolfinx.mesh.CellType.tetrahedron,
    )
    if mesh.topology.cell_type not in allowed:
        raise ValueError(
            f"mesh: cells must be intervals, triangles or tetrahedra, got "
            f"{mesh.topology.cell_type.name}"
        )
    if mesh.geometry.cmaps[0].degree != 1:
        raise ValueError("mesh: an affine (degree 1) geometry is needed")
    tdim = mesh.topology.dim
    extra = mesh.geometry.x[:, tdim:]
    if extra.size and float(np.abs(extra).max(initial=0.0)) > 0.0:
        raise ValueError(
            f"mesh: a {tdim}D mesh must lie in the coordinate plane (geometry beyond "
            f"dimension {tdim} is not zero); create it with gdim={tdim}"
        )


def _local_boundary(
    mesh: dolfinx.mesh.Mesh, facet_tags: dolfinx.mesh.MeshTags | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This rank's exterior facets (of owned cells): indices, vertices, opposite vertices, tags."""
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
    facet_to_cell = mesh.topology.connectivity(tdim - 1, tdim)
    cells = np.array([facet_to_cell.links(f)[0] for f in facets], dtype=np.int32)
    owned = cells < mesh.topology.index_map(tdim).size_local
    facets, cells = facets[owned], cells[owned]
    geometry = mesh.geometry.x[:, :tdim]
    facet_nodes = dolfinx.mesh.entities_to_geometry(mesh, tdim - 1, facets)
    cell_nodes = mesh.geometry.dofmaps[0][cells]
    opposite_nodes = np.array(
        [np.setdiff1d(c, f)[0] for c, f in zip(cell_nodes, facet_nodes, strict=True)],
        dtype=np.int64,
    ).reshape(-1)
    tags = np.full(len(facets), -1, dtype=np.int64)
    if facet_tags is not None:
        num_facets = mesh.topology.index_map(tdim - 1)
        dense = np.full(num_facets.size_local + num_facets.num_ghosts, -1, dtype=np.int64)
        dense[facet_tags.indices] = facet_tags.values
        tags = dense[facets]
    return (
        facets,
        geometry[facet_nodes].reshape(len(facets), tdim, tdim),
        geometry[opposite_nodes].reshape(len(facets), tdim),
        tags,
    )


def _gather_boundary(mesh: dolfinx.mesh.Mesh, facet_tags: Any) -> BoundaryFacets:
    """The exterior facets of every rank on every rank, oriented and sorted (collective)."""
    _, vertices, opposite, tags = _local_boundary(mesh, facet_tags)
    normals = (
        facet_normals(vertices, opposite) if len(vertices) else np.zeros((0, mesh.topology.dim))
    )
    parts = mesh.comm.allgather((_orient(vertices, normals), normals, tags))
    vertices = np.concatenate([p[0] for p in parts])
    normals = np.concatenate([p[1] for p in parts])
    tags = np.concatenate([p[2] for p in parts])
    # A canonical order (by centroid): the same arrays whatever the partition.
    centroids = vertices.mean(axis=1)
    order = np.lexsort(centroids.T[::-1])
    vertices, normals, tags = vertices[order], normals[order], tags[order]
    return BoundaryFacets(vertices, normals, _simplex_measures(vertices), tags)


class MeshDomain:
    """A domain given by a DOLFINx simplex mesh (collective on ``mesh.comm`` to build).

    Args:
        mesh: An affine mesh of intervals, triangles or tetrahedra with ``gdim`` equal to its
            topological dimension (e.g. ``dolfinx.io.gmsh.model_to_mesh(..., gdim=2)``),
            distributed or not.
        facet_tags: ``MeshTags`` of the facets (from gmsh physical groups, ``meshtags``, ...)
            that boundary data refer to by value; exterior facets without a tag get ``-1``.
        name: A short name for reports.

    Raises:
        ValueError: naming the parameter, when the mesh is not such a mesh or the tags are not
            facet tags of it.
    """

    def __init__(
        self,
        mesh: dolfinx.mesh.Mesh,
        facet_tags: dolfinx.mesh.MeshTags | None = None,
        *,
        name: str = "mesh",
    ) -> None:
        if not isinstance(mesh, dolfinx.mesh.Mesh):
            raise ValueError(f"mesh must be a dolfinx.mesh.Mesh, got {type(mesh).__name__}")
        _check_simplex_mesh(mesh)
        tdim = mesh.topology.dim
        if facet_tags is not None and (
            not isinstance(facet_tags, dolfinx.mesh.MeshTags) or facet_tags.dim != tdim - 1
        ):
            raise ValueError(f"facet_tags must be MeshTags of the facets (dim {tdim - 1})")
        self.mesh = mesh
        self.facet_tags = facet_tags
        self.comm: MPI.Comm = mesh.comm
        self.name = name
        self._dim = tdim
        local = mesh.geometry.x[:, :tdim]
        lower = local.min(axis=0) if len(local) else np.full(tdim, np.inf)
        upper = local.max(axis=0) if len(local) else np.full(tdim, -np.inf)
        lower, upper = np.ascontiguousarray(lower), np.ascontiguousarray(upper)
        self.comm.Allreduce(MPI.IN_PLACE, lower, MPI.MIN)
        self.comm.Allreduce(MPI.IN_PLACE, upper, MPI.MAX)
        self.lower: tuple[float, ...] = tuple(float(v) for v in lower)
        self.upper: tuple[float, ...] = tuple(float(v) for v in upper)
        one = dolfinx.fem.Constant(mesh, 1.0)
        self.measure = self._integral(one * ufl.dx(domain=mesh))
        self.boundary_measure = self._integral(one * ufl.ds(domain=mesh))
        self.facets = _gather_boundary(mesh, facet_tags)
        self.tag_values: tuple[int, ...] = tuple(int(t) for t in np.unique(self.facets.tags))

    def _integral(self, form: ufl.Form) -> float:
        value = dolfinx.fem.assemble_scalar(dolfinx.fem.form(form))
        return float(self.comm.allreduce(value, op=MPI.SUM))

    # -- what a Box offers -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Spatial dimension."""
        return self._dim

    @property
    def lengths(self) -> np.ndarray:
        """Edge lengths of the bounding box."""
        return np.asarray(self.upper) - np.asarray(self.lower)

    @property
    def diameter(self) -> float:
        """The diagonal of the bounding box."""
        return float(np.linalg.norm(self.lengths))

    def tag_measure(self, tags: Sequence[int] | None) -> float:
        """The measure of the boundary facets with one of ``tags`` (``None``: all of ∂Ω)."""
        return float(self.facets.select(tags).measures.sum())

    def contains(self, points: npt.ArrayLike, tol: float = 1e-12) -> np.ndarray:
        """Whether each point ``(N, d)`` lies in the closed domain (within ``tol`` of it)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, self.dim)
        winding = winding_number(points, self.facets)
        inside = winding > 0.5
        # On a facet the winding number is ½ or, by the rounding of an angle of ±π, about 0 or
        # 1: every point not clearly inside is decided by its distance.
        unsure = ~inside
        if np.any(unsure):
            distance = boundary_distance(points[unsure], self.facets)
            inside[unsure] = distance <= max(tol, 1e-12 * self.diameter)
        return inside

    def boundary_distance(
        self, points: npt.ArrayLike, tags: Sequence[int] | None = None
    ) -> np.ndarray:
        """The exact distance ``(N,)`` from points to ∂Ω (or to the facets with ``tags``)."""
        return boundary_distance(points, self.facets.select(tags))

    def sample_interior(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Uniform random points in Ω, ``(count, d)``: bounding-box points kept by :meth:`contains`.

        The same points on every rank for the same generator state.
        """
        lower, lengths = np.asarray(self.lower), self.lengths
        fraction = min(1.0, self.measure / float(np.prod(lengths)))
        chunks, found = [], 0
        while found < count:
            wanted = int(1.2 * (count - found) / max(fraction, 1e-3)) + 16
            candidates = lower + rng.random((wanted, self.dim)) * lengths
            inside = candidates[winding_number(candidates, self.facets) > 0.5]
            chunks.append(inside)
            found += len(inside)
        return np.concatenate(chunks)[:count]

    def sample_boundary(
        self, count: int, rng: np.random.Generator, tags: Sequence[int] | None = None
    ) -> np.ndarray:
        """Uniform random points on ∂Ω (or the facets with ``tags``) by measure, ``(count, d)``.

        In 1D the boundary points are returned in turn.
        """
        facets = self.facets.select(tags)
        if len(facets) == 0:
            return np.zeros((0, self.dim))
        if self.dim == 1:
            return facets.vertices[np.arange(count) % len(facets), 0]
        which = rng.choice(len(facets), size=count, p=facets.measures / facets.measures.sum())
        exponential = -np.log1p(-rng.random((count, self.dim)))
        barycentric = exponential / exponential.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkd->nd", barycentric, facets.vertices[which])

    def distance_function(self) -> None:
        """None: a mesh domain's hard-boundary factor is :meth:`potential_distance`."""
        return None

    def holes(self) -> list[tuple[np.ndarray, float]]:
        """The holes of a 2D domain: ``(centre (2,), radius)`` per inner boundary loop.

        The boundary facets are joined at shared vertices into closed loops; the domain lies
        to the left of every facet, so the outer loop runs counterclockwise (positive signed
        area) and every hole clockwise. The centre is the centroid of the region the loop
        encloses, the radius the largest distance from it to the loop. A hole whose centroid
        lies in the domain (a strongly non-convex hole) is left out: the functions centred
        on it would be singular in Ω. The same on every rank (the facets are gathered).

        Raises:
            ValueError: for a domain that is not 2D.
        """
        if self.dim != 2:
            raise ValueError(f"holes: a 2D domain is needed, got dim={self.dim}")
        vertices = self.facets.vertices  # (F, 2, 2)
        if not len(vertices):
            return []
        scale = max(float(self.lengths.max()), 1e-300)
        keys = np.round(vertices.reshape(-1, 2) / scale * 1e9).astype(np.int64)
        _, ids = np.unique(keys, axis=0, return_inverse=True)
        ids = ids.reshape(-1, 2)
        size = int(ids.max()) + 1
        edges = scipy.sparse.coo_matrix((np.ones(len(ids)), (ids[:, 0], ids[:, 1])), (size, size))
        _, component = scipy.sparse.csgraph.connected_components(edges, directed=False)
        loop = component[ids[:, 0]]
        holes = []
        for value in np.unique(loop):
            segments = vertices[loop == value]
            x0, y0 = segments[:, 0, 0], segments[:, 0, 1]
            x1, y1 = segments[:, 1, 0], segments[:, 1, 1]
            cross = x0 * y1 - x1 * y0
            area = 0.5 * float(cross.sum())
            if area >= 0.0:  # the outer loop (counterclockwise)
                continue
            centre = np.array(
                [
                    float(((x0 + x1) * cross).sum()) / (6.0 * area),
                    float(((y0 + y1) * cross).sum()) / (6.0 * area),
                ]
            )
            if bool(self.contains(centre[None, :])[0]):
                continue
            radius = float(np.linalg.norm(segments.reshape(-1, 2) - centre, axis=1).max())
            holes.append((centre, radius))
        return holes

    # -- hard boundary conditions ------------------------------------------------------------------
    def potential_distance(self, x: Any, tags: Sequence[int] | None = None) -> Any:
        """φ = c_d / S(x): smooth, vanishing on the facets with ``tags`` (all: ``None``).

        Args:
            x: Points ``(N, d)``, numpy (numpy out) or torch (torch out, differentiable).
            tags: The facet tags of Γ_D.

        Returns:
            ``(N,)`` values, about ``1e-13 * diameter`` on Γ_D itself, positive elsewhere.
        """
        return self._apply(x, lambda t: HALF_SPACE_ANGLE[self.dim] / self._sums(t, [tags])[0])

    def potential_blend(self, x: Any, groups: Sequence[Sequence[int]]) -> Any:
        """Weights ``w_k = S_k / Σ_l S_l`` ``(N, K)``, one per tag group: 1 on Γ_k, sum 1."""

        def blend(t: torch.Tensor) -> torch.Tensor:
            sums = torch.stack(self._sums(t, list(groups)), dim=1)
            return sums / sums.sum(dim=1, keepdim=True)

        return self._apply(x, blend)

    def _sums(self, x: torch.Tensor, groups: list[Sequence[int] | None]) -> list[torch.Tensor]:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: points must have shape (N, {self.dim}), got {tuple(x.shape)}")
        return potential_sums(x, self.facets, groups, self.diameter)

    @staticmethod
    def _apply(x: Any, function: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return function(x)
        points = torch.as_tensor(np.asarray(x, dtype=np.float64))
        with torch.no_grad():
            return function(points).numpy()

    # -- meshes of the domain ----------------------------------------------------------------------
    def mesh_size(self, mesh: dolfinx.mesh.Mesh | None = None) -> float:
        """The largest cell diameter of ``mesh`` (default: the domain's own), collective."""
        mesh = self.mesh if mesh is None else mesh
        tdim = mesh.topology.dim
        cells = np.arange(mesh.topology.index_map(tdim).size_local, dtype=np.int32)
        local = float(mesh.h(tdim, cells).max()) if len(cells) else 0.0
        return float(mesh.comm.allreduce(local, op=MPI.MAX))

    def refined_mesh(self, h: float, max_levels: int = 8) -> dolfinx.mesh.Mesh:
        """The domain's mesh uniformly refined until its cells are at most ``h`` (collective).

        Refinement bisects edges (planar), so every refined mesh has exactly the domain's
        boundary; at most ``max_levels`` refinements (each multiplies the cell count by 2^d).
        """
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"h must be a finite number > 0, got {h}")
        mesh = self.mesh
        for _ in range(max_levels):
            if self.mesh_size(mesh) <= h * (1 + 1e-12):
                break
            mesh.topology.create_entities(1)
            mesh, _, _ = dolfinx.mesh.refine(mesh)
        return mesh

    def exterior_facet_tags(self, mesh: dolfinx.mesh.Mesh) -> tuple[np.ndarray, np.ndarray]:
        """This rank's exterior facets of ``mesh`` (a mesh of this domain) and their tags.

        On the domain's own mesh the facet tags themselves; on another mesh of the same domain
        (a refinement, a finer mesh of the same geometry) each facet takes the tag of the
        domain's boundary facet nearest to its midpoint. Local (no communication).
        """
        tdim = mesh.topology.dim
        mesh.topology.create_connectivity(tdim - 1, tdim)
        facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
        if mesh is self.mesh:
            tags = np.full(len(facets), -1, dtype=np.int64)
            if self.facet_tags is not None:
                index_map = mesh.topology.index_map(tdim - 1)
                dense = np.full(index_map.size_local + index_map.num_ghosts, -1, dtype=np.int64)
                dense[self.facet_tags.indices] = self.facet_tags.values
                tags = dense[facets]
            return facets, tags
        midpoints = dolfinx.mesh.compute_midpoints(mesh, tdim - 1, facets)[:, :tdim]
        return facets, self._nearest_tags(midpoints)

    def _nearest_tags(self, points: np.ndarray) -> np.ndarray:
        return self.facets.tags[nearest_facets(points, self.facets)]

    def boundary_normals(self, points: npt.ArrayLike) -> np.ndarray:
        """The outward normal ``(N, d)`` of the boundary facet nearest to each point."""
        return self.facets.normals[nearest_facets(points, self.facets)]

    def facet_meshtags(self, mesh: dolfinx.mesh.Mesh) -> dolfinx.mesh.MeshTags:
        """:meth:`exterior_facet_tags` of ``mesh`` as ``MeshTags`` (for ``ufl.ds``)."""
        facets, tags = self.exterior_facet_tags(mesh)
        order = np.argsort(facets)
        return dolfinx.mesh.meshtags(
            mesh, mesh.topology.dim - 1, facets[order], tags[order].astype(np.int32)
        )

    def __repr__(self) -> str:
        return (
            f"MeshDomain({self.name!r}, dim={self.dim}, |Ω|={self.measure:.6g}, "
            f"|∂Ω|={self.boundary_measure:.6g}, {len(self.facets)} boundary facets, "
            f"tags {list(self.tag_values)})"
        )
