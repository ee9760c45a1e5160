"""The compression operator Q̄^D_δ (3.26), the coupling term R (3.25) and MPI autograd helpers.

MPI convention (read this once; everything in the package follows it):

* The network is replicated: every rank holds the same parameters θ.
* Every rank evaluates the network only where it needs to: at the points of its OWNED cells
  (the PINN loss and the upscaled coefficient (4.10) sum over these, so each point counts once)
  plus, for the compression operator, the *halo* points of neighbouring ranks' cells that lie
  within δ/2 of one of its owned coarse nodes, and the boundary-layer nodes it owns.
* Global sums are formed with :func:`allreduce_sum`, whose backward is the identity: every rank
  then holds the same replicated value (a loss, K̃), and backward on rank r yields rank r's
  SHARE of dL/dθ. The full gradient is the sum of the shares: call
  :func:`allreduce_gradients` after ``loss.backward()`` (as DistributedDataParallel would).
* A coarse node's row of Q̄ is owned by exactly one rank, so a halo point used by a row
  contributes to the gradient once, through the rank that owns the row, even though the point's
  own rank evaluates the network there too (for other rows or the PINN loss).
* :class:`dolfinx_pinn.coarse.CoarseSolve` receives dL/dy_h at the owned dofs and returns the
  full dL/dK̃ on every rank; the identity backward of the allreduce in (4.10) then splits it
  into shares, so nothing is counted twice.
* A term that depends on θ directly and is computed identically on every rank (weight decay)
  must be added on one rank only, or divided by the number of ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

from mpi4py import MPI
from petsc4py import PETSc

import numpy as np
import torch
from scipy.spatial import cKDTree

from dolfinx_pinn.coarse import CoarseProblem, CoarseSolve, CollocationPoints
from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "AllreduceSum",
    "CompressionOperator",
    "CouplingTerm",
    "PetscMatMul",
    "allreduce_gradients",
    "allreduce_sum",
    "default_delta",
    "mesh_size",
    "upscaled_coefficient",
    "upscaled_coefficient_from_gradient",
    "upscaled_tensor_from_gradients",
]


# -- MPI autograd helpers ----------------------------------------------------------------------
class AllreduceSum(torch.autograd.Function):
    """Sum a tensor over the ranks; backward is the identity on every rank (see module doc)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:  # noqa: D102
        if comm.size == 1:
            return value.clone()
        local = np.ascontiguousarray(value.detach().cpu().numpy(), dtype=np.float64)
        total = np.empty_like(local)
        comm.Allreduce(local, total, op=MPI.SUM)
        return torch.as_tensor(total, dtype=value.dtype, device=value.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def allreduce_sum(value: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """Differentiable global sum, the same on every rank (collective on ``comm``)."""
    return AllreduceSum.apply(value, comm)


def allreduce_gradients(parameters: Iterable[torch.nn.Parameter], comm: MPI.Comm) -> None:
    """Sum the ``.grad`` of replicated parameters over the ranks, in place (collective).

    Call after ``loss.backward()`` so that every rank holds the full gradient dL/dθ.
    """
    if comm.size == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            # Keep the collective calls matched on every rank.
            local = np.zeros(parameter.shape, dtype=np.float64)
        else:
            local = np.ascontiguousarray(parameter.grad.detach().cpu().numpy(), dtype=np.float64)
        total = np.empty_like(local)
        comm.Allreduce(local, total, op=MPI.SUM)
        grad = torch.as_tensor(total, dtype=parameter.dtype, device=parameter.device)
        if parameter.grad is None:
            parameter.grad = grad
        else:
            parameter.grad.copy_(grad)


def upscaled_coefficient(
    problem: MultiscaleProblem,
    network: Callable[[torch.Tensor], torch.Tensor],
    points: CollocationPoints | torch.Tensor,
    *,
    comm: MPI.Comm | None = None,
    measure: float | None = None,
    global_count: int | None = None,
    direction: int | None = None,
) -> torch.Tensor:
    """The Monte-Carlo upscaled coefficient (4.10), differentiable in the network parameters.

    ``K̃_ii ≈ |Ω| / M Σ_r (K^ε(x_r)(∇v(x_r) + e_i))_i`` over the owned points of every rank,
    summed with :func:`allreduce_sum` (collective on ``comm``), so every rank holds the same
    value. For a tensor K^ε the i-th component of the flux ``K^ε(∇v + e_i)`` is used.

    Args:
        problem: The multiscale problem (K^ε, lifting direction i).
        network: ``v(x)``: points ``(N, d)`` → values ``(N,)`` or ``(N, 1)``.
        points: A :class:`CollocationPoints` (its owned interior points, |Ω|, global count and
            communicator are used) or a tensor of this rank's points (then give ``comm``,
            ``measure`` and ``global_count``).
        comm: The communicator (default: the points' one, or COMM_SELF for a tensor).
        measure: |Ω| (default: the problem's domain measure).
        global_count: M, the number of points over all ranks.
        direction: i (default ``problem.lifting_direction``).

    Returns:
        A 0-d tensor K̃_ii.
    """
    if isinstance(points, CollocationPoints):
        comm = points.comm if comm is None else comm
        measure = points.measure if measure is None else measure
        global_count = points.global_interior_count if global_count is None else global_count
        x = points.torch_interior()
    else:
        x = points
        comm = MPI.COMM_SELF if comm is None else comm
        measure = problem.domain.measure if measure is None else measure
        if global_count is None:
            global_count = int(comm.allreduce(int(x.shape[0]), MPI.SUM))
    if global_count < 1:
        raise ValueError(f"global_count must be >= 1, got {global_count}")
    i = problem.lifting_direction if direction is None else direction
    if not 0 <= i < problem.dim:
        raise ValueError(f"direction must be in [0, {problem.dim - 1}], got {i}")
    analytic = getattr(network, "value_and_gradient", None)
    if analytic is not None:
        # Differentiable in the parameters without a graph through x (the two-scale basis).
        gradient = analytic(x.detach())[1]
    else:
        x = x.detach().requires_grad_(True)
        values = network(x).reshape(-1)
        (gradient,) = torch.autograd.grad(values.sum(), x, create_graph=True)
    with torch.no_grad():
        K_rows = problem.K_matrix(x.detach())[:, i, :]
    return upscaled_coefficient_from_gradient(gradient, K_rows, measure / global_count, comm, i)


def upscaled_coefficient_from_gradient(
    gradient: torch.Tensor, K_rows: torch.Tensor, weight: float, comm: MPI.Comm, direction: int
) -> torch.Tensor:
    """(4.10) from the network's gradient at this rank's points (collective, differentiable).

    ``K̃_ii = weight · Σ_r (K^ε(x_r)(∇v(x_r) + e_i))_i`` summed over the ranks, with
    ``K_rows[r] = (K^ε(x_r))_{i,:}``; the hybrid objective passes the gradient of the jet it
    already computed for the PDE rows, so K̃ costs no extra pass of the network.

    Args:
        gradient: ∇v at the points ``(N, d)``.
        K_rows: Row i of K^ε at the points ``(N, d)`` (detached).
        weight: The Monte-Carlo weight ``|Ω| / M`` (M the global point count).
        comm: The communicator of the points.
        direction: i.

    Returns:
        A 0-d tensor K̃_ii, the same on every rank.
    """
    shifted = (
        gradient
        + torch.eye(gradient.shape[1], dtype=gradient.dtype, device=gradient.device)[direction]
    )
    flux = torch.einsum("nj,nj->n", K_rows, shifted)
    return allreduce_sum(flux.sum() * weight, comm)


def upscaled_tensor_from_gradients(
    gradients: torch.Tensor, K: torch.Tensor, weight: float, comm: MPI.Comm
) -> torch.Tensor:
    """The Monte-Carlo upscaled tensor of Algorithm 4.1, ``K̃ = F T⁻¹`` (4.7), differentiable.

    With ``w_i = u_i + x_i`` the fine solution lifted in direction ``e_i``, the columns are
    ``T_{:,i} = ⟨∇u_i + e_i⟩`` and ``F_{:,i} = ⟨K^ε(∇u_i + e_i)⟩``, the means taken by Monte
    Carlo, ``weight · Σ_r`` over this rank's points and summed over the ranks with
    :func:`allreduce_sum` (collective on ``comm``; every rank holds the same K̃).

    Args:
        gradients: ``(N, d, d)`` with ``gradients[r, i] = ∇u_i(x_r)`` at this rank's points.
        K: The coefficient matrices ``(N, d, d)`` at the same points (detached).
        weight: The Monte-Carlo weight ``|Ω| / M`` (M the global point count).
        comm: The communicator of the points.

    Returns:
        The ``(d, d)`` tensor K̃ (not symmetrised: the Monte-Carlo estimate is symmetric only
        up to sampling and training error).
    """
    d = K.shape[-1]
    shifted = gradients + torch.eye(d, dtype=gradients.dtype, device=gradients.device)
    flux = torch.einsum("rjk,rik->rij", K, shifted)  # flux[r, i] = K(x_r)(∇u_i + e_i)
    # Row i of the sums is column i of T and F: one allreduce for both.
    local = torch.stack([shifted.sum(dim=0), flux.sum(dim=0)]) * weight
    sums = allreduce_sum(local, comm)
    T, F = sums[0].T, sums[1].T
    # K̃ T = F  ⇔  Tᵀ K̃ᵀ = Fᵀ.
    return torch.linalg.solve(T.T, F.T).T


# -- the compression diameter -----------------------------------------------------------------
def mesh_size(mesh: Any) -> float:
    """The largest cell diameter h of a mesh (collective)."""
    tdim = mesh.topology.dim
    cells = np.arange(mesh.topology.index_map(tdim).size_local, dtype=np.int32)
    local = float(mesh.h(tdim, cells).max()) if len(cells) else 0.0
    return float(mesh.comm.allreduce(local, MPI.MAX))


def default_delta(problem: MultiscaleProblem, h: float) -> float:
    """The compression diameter δ: a whole number of periods, at least the mesh size h.

    The paper takes δ = ε. A ball of diameter ε holds a number of collocation points that falls
    like ε^d and, for a period vector with unequal entries (``paper_2d``: (2, 1)), covers only
    part of a period along the longer axis, so Q̄v does not average the oscillation away. Here
    δ is the smallest multiple of the longest period ``ε max(p)`` that is at least h (one
    period when ε max(p) >= h): independent of ε for ε << h, ε itself for the paper's settings
    with ε >= h. Without a period vector, δ = max(finest scale, h).
    """
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"h must be a finite number > 0, got {h}")
    if problem.period is None:
        return max(problem.finest_scale, h)
    period = problem.eps * max(problem.period)
    return period * max(1, math.ceil(h / period - 1e-9))


# -- PETSc matrix as a torch operation ---------------------------------------------------------
class PetscMatMul(torch.autograd.Function):
    """``out = M @ x`` for a distributed PETSc matrix ``M``; backward uses ``M^T`` (collective).

    ``x`` and ``out`` are the owned parts of PETSc vectors compatible with ``M``'s column and
    row layouts.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, matrix: PETSc.Mat) -> torch.Tensor:  # noqa: D102
        ctx.matrix = matrix
        source, target = matrix.createVecs()
        source.array[:] = x.detach().cpu().numpy()
        matrix.mult(source, target)
        out = torch.as_tensor(target.array.copy(), dtype=x.dtype, device=x.device)
        source.destroy()
        target.destroy()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None
        matrix: PETSc.Mat = ctx.matrix
        source, target = matrix.createVecs()
        target.array[:] = grad.detach().cpu().numpy()
        matrix.multTranspose(target, source)
        out = torch.as_tensor(source.array.copy(), dtype=grad.dtype, device=grad.device)
        source.destroy()
        target.destroy()
        return out, None


class _SparseMatVec(torch.autograd.Function):
    """``Q @ v`` with a cached CSR ``Q^T`` for the backward (faster than COO autograd)."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, matrix: torch.Tensor, transpose: torch.Tensor
    ) -> torch.Tensor:
        ctx.transpose = transpose
        return matrix @ values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return ctx.transpose @ grad, None, None


# -- the compression operator ------------------------------------------------------------------
def _barycentric(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Barycentric coordinates ``(n, d + 1)`` of points ``(n, d)`` in simplices ``(n, d+1, d)``."""
    edges = vertices[:, 1:, :] - vertices[:, :1, :]  # (n, d, d): rows are edge vectors
    rhs = points - vertices[:, 0, :]
    lam = np.linalg.solve(np.swapaxes(edges, 1, 2), rhs[..., None])[..., 0]
    return np.concatenate([1.0 - lam.sum(axis=1, keepdims=True), lam], axis=1)


def _exchange_halo(
    comm: MPI.Comm,
    d: int,
    centres: np.ndarray,
    radius: float,
    points: np.ndarray,
    dofs: np.ndarray,
    lam: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points of other ranks within ``radius`` of my ``centres``, with their P1 data."""
    empty = (np.zeros((0, d)), np.zeros((0, d + 1), dtype=np.int64), np.zeros((0, d + 1)))
    if comm.size == 1:
        return empty
    if len(centres):
        box = np.stack([centres.min(axis=0) - radius, centres.max(axis=0) + radius])
    else:
        box = None
    boxes = comm.allgather(box)
    tree = cKDTree(centres) if len(centres) else None
    outgoing = []
    for rank, other in enumerate(boxes):
        if rank == comm.rank or other is None or len(points) == 0:
            outgoing.append(None)
            continue
        inside = np.all((points >= other[0]) & (points <= other[1]), axis=1)
        outgoing.append((points[inside], dofs[inside], lam[inside]))
    incoming = comm.alltoall(outgoing)
    parts = [part for part in incoming if part is not None and len(part[0])]
    if not parts:
        return empty
    halo = np.concatenate([p[0] for p in parts])
    halo_dofs = np.concatenate([p[1] for p in parts])
    halo_lam = np.concatenate([p[2] for p in parts])
    # Keep only the points that some owned interior node will actually use.
    assert tree is not None
    distance, _ = tree.query(halo, k=1)
    keep = distance <= radius * (1.0 + 1e-12)
    return halo[keep], halo_dofs[keep], halo_lam[keep]


def _state_matrix(
    coarse: CoarseProblem,
    layer_nodes: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    val: np.ndarray,
    base: int,
    cloud_dofs: np.ndarray,
    cloud_lam: np.ndarray,
) -> PETSc.Mat:
    """The distributed PETSc matrix of ``y ↦ Q̄ y`` on P1 dof vectors."""
    owned_global = coarse.owned_global_dofs.astype(np.int64)
    from_cloud = col < base
    # Cloud columns: P1 interpolation at the point, Σ_k λ_k e_{dof_k}.
    r1 = np.repeat(row[from_cloud], cloud_dofs.shape[1])
    c1 = cloud_dofs[col[from_cloud]].reshape(-1)
    v1 = (val[from_cloud][:, None] * cloud_lam[col[from_cloud]]).reshape(-1)
    # Boundary-layer columns: the nodal value of the state itself.
    layer = ~from_cloud
    r2 = row[layer]
    c2 = owned_global[layer_nodes[col[layer] - base]]
    v2 = val[layer]
    rows = np.concatenate([r1, r2])
    cols = np.concatenate([c1, c2])
    vals = np.concatenate([v1, v2])
    n = coarse.num_owned_dofs
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    # Sum duplicates (several points of a ball in one cell share dofs).
    if len(rows):
        new = np.ones(len(rows), dtype=bool)
        new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        starts = np.flatnonzero(new)
        vals = np.add.reduceat(vals, starts)
        rows, cols = rows[starts], cols[starts]
    indptr = np.zeros(n + 1, dtype=PETSc.IntType)
    np.add.at(indptr, rows + 1, 1)
    indptr = np.cumsum(indptr).astype(PETSc.IntType)
    size = (n, coarse.num_global_dofs)
    matrix = PETSc.Mat().createAIJ(
        size=(size, size),
        csr=(indptr, cols.astype(PETSc.IntType), vals.astype(PETSc.ScalarType)),
        comm=coarse.comm,
    )
    matrix.assemble()
    return matrix


class CompressionOperator:
    """Q̄^D_δ of (3.26): network values at collocation points → values at the owned coarse nodes.

    For an owned coarse node x_i with ``dist(x_i, ∂Ω) >= δ/2`` (the distance to the box faces,
    or to the boundary facets of a :class:`~dolfinx_pinn.geometry.MeshDomain`: a ball that
    reaches out of a hole or a notch is a boundary-layer node too), the row averages the network
    over the collocation points within δ/2 of x_i (a ball that may reach into cells owned by
    other ranks: those *halo* points are exchanged once, at construction); a node closer to ∂Ω
    than δ/2 takes the network's value at the node itself (the boundary-layer rule).

    The operator is a sparse matrix ``Q`` (owned nodes × :attr:`points`) with the columns

    * ``[0, num_owned_points)``: this rank's owned interior collocation points, in the order
      of ``collocation.interior`` (so network values computed for the PINN loss can be reused),
    * ``[num_owned_points, num_owned_points + num_halo_points)``: halo points,
    * the rest: the owned boundary-layer nodes.

    Torch autograd flows through ``Q @ values`` (a sparse-dense product) on CPU and CUDA.

    Args:
        coarse: The coarse problem (nodes, layout, communicator).
        collocation: The interior collocation points (the same mesh as ``coarse``).
        delta: The averaging diameter δ > 0 (default: :func:`default_delta`, a whole number of
            periods of at least the coarse mesh size).
        estimator: ``"mean"``: the plain mean of (3.26); ``"linear"``: the mean corrected with
            the coordinates as control variates (the intercept of a local least-squares linear
            fit), which estimates the same ball average, reproduces linear functions exactly
            and has a smaller Monte-Carlo error.
        min_points: The fewest points a ball may hold (default ``d + 2``).

    Raises:
        ValueError: when δ is not positive and finite, or a ball holds too few points (raise
            the point density or δ).
    """

    def __init__(
        self,
        coarse: CoarseProblem,
        collocation: CollocationPoints,
        *,
        delta: float | None = None,
        estimator: Literal["mean", "linear"] = "mean",
        min_points: int | None = None,
    ) -> None:
        problem = coarse.problem
        d = problem.dim
        if collocation.dim != d:
            raise ValueError(
                f"collocation: points of dimension {collocation.dim} for a {d}D problem"
            )
        delta = default_delta(problem, mesh_size(coarse.mesh)) if delta is None else float(delta)
        if not (math.isfinite(delta) and delta > 0):
            raise ValueError(f"delta must be a finite number > 0, got {delta}")
        if estimator not in ("mean", "linear"):
            raise ValueError(f"estimator must be 'mean' or 'linear', got {estimator!r}")
        min_points = d + 2 if min_points is None else int(min_points)
        if min_points < 1:
            raise ValueError(f"min_points must be >= 1, got {min_points}")
        self.coarse = coarse
        self.collocation = collocation
        self.comm: MPI.Comm = coarse.comm
        self.delta = delta
        self.estimator = estimator
        radius = 0.5 * delta
        scale = float(np.max(problem.domain.lengths))
        tol = 1e-12 * scale

        nodes = coarse.dof_coordinates
        self.node_coordinates = nodes
        # The distance to ∂Ω: the box faces, or the facets of a mesh domain (exact, replicated).
        distance = problem.domain.boundary_distance(nodes)
        self.boundary_layer = distance < radius - tol
        interior_nodes = np.flatnonzero(~self.boundary_layer)
        layer_nodes = np.flatnonzero(self.boundary_layer)

        # -- halo exchange: points of other ranks within δ/2 of my interior nodes -----------
        owned_points = collocation.interior
        owned_cells = collocation.interior_cells
        dofs_global, lam = self._point_dofs(owned_points, owned_cells)
        halo_points, halo_dofs, halo_lam = _exchange_halo(
            self.comm, d, nodes[interior_nodes], radius, owned_points, dofs_global, lam
        )
        self.num_owned_points = len(owned_points)
        self.num_halo_points = len(halo_points)
        self.halo_points = halo_points
        self.layer_nodes = layer_nodes
        points = np.concatenate([owned_points, halo_points, nodes[layer_nodes]])
        self.points_numpy = points
        self.num_columns = len(points)

        # -- rows ------------------------------------------------------------------------------
        cloud = np.concatenate([owned_points, halo_points])
        rows, cols, vals, counts = self._ball_rows(
            cloud, nodes, interior_nodes, radius, tol, min_points
        )
        base = len(cloud)
        rows.append(layer_nodes)
        cols.append(base + np.arange(len(layer_nodes)))
        vals.append(np.ones(len(layer_nodes)))
        self.points_per_node = counts
        row = np.concatenate(rows).astype(np.int64)
        col = np.concatenate(cols).astype(np.int64)
        val = np.concatenate(vals)
        self._coo = (row, col, val)
        self._matrices: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        # -- Q̄ applied to P1 functions, as a distributed PETSc matrix (for variant (2.16)) ----
        cloud_dofs = np.concatenate([dofs_global, halo_dofs]) if base else np.zeros((0, d + 1))
        cloud_lam = np.concatenate([lam, halo_lam]) if base else np.zeros((0, d + 1))
        self._state_matrix = _state_matrix(
            coarse, layer_nodes, row, col, val, base, cloud_dofs, cloud_lam
        )

    # -- construction helpers ----------------------------------------------------------------
    def _ball_rows(
        self,
        cloud: np.ndarray,
        nodes: np.ndarray,
        interior_nodes: np.ndarray,
        radius: float,
        tol: float,
        min_points: int,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray]:
        """The rows of the interior nodes: the points in each ball and their weights.

        Raises:
            ValueError: on every rank, when some node's ball holds fewer than ``min_points``.
        """
        tree = cKDTree(cloud) if len(cloud) else None
        rows, cols, vals = [], [], []
        counts = np.zeros(len(nodes), dtype=np.int64)
        neighbours = (
            tree.query_ball_point(nodes[interior_nodes], radius + tol)
            if tree is not None and len(interior_nodes)
            else [[] for _ in interior_nodes]
        )
        too_few = []
        for node, members in zip(interior_nodes, neighbours, strict=True):
            members = np.sort(np.asarray(members, dtype=np.int64))
            counts[node] = len(members)
            if len(members) < min_points:
                too_few.append(node)
                continue
            rows.append(np.full(len(members), node))
            cols.append(members)
            vals.append(self._weights(cloud[members], nodes[node]))
        missing = int(self.comm.allreduce(len(too_few), MPI.SUM))
        if missing:
            least = int(
                self.comm.allreduce(int(counts[too_few].min()) if too_few else 10**9, MPI.MIN)
            )
            raise ValueError(
                f"delta/density: {missing} coarse node(s) have fewer than {min_points} "
                f"collocation points within delta/2 = {radius:g} (fewest: {least}); raise the "
                "point density or delta"
            )
        return rows, cols, vals, counts

    def _weights(self, members: np.ndarray, centre: np.ndarray) -> np.ndarray:
        n = len(members)
        weights = np.full(n, 1.0 / n)
        if self.estimator == "mean":
            return weights
        mean = members.mean(axis=0)
        centred = members - mean
        covariance = centred.T @ centred / n
        shift = np.linalg.lstsq(covariance, mean - centre, rcond=None)[0]
        # w_j = (1 - (x̄ - x_i)^T C^{-1} (x_j - x̄)) / n: sums to 1, exact for linear functions.
        return weights * (1.0 - centred @ shift)

    def _point_dofs(self, points: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global P1 dofs ``(n, d+1)`` and barycentric weights of points in their cells."""
        space = self.coarse.space
        d = self.coarse.dim
        if len(points) == 0:
            return np.zeros((0, d + 1), dtype=np.int64), np.zeros((0, d + 1))
        cell_dofs = space.dofmap.list[cells]  # (n, d+1) local dofs
        coordinates = space.tabulate_dof_coordinates()[:, :d]
        lam = _barycentric(points, coordinates[cell_dofs])
        index_map = space.dofmap.index_map
        global_dofs = index_map.local_to_global(cell_dofs.reshape(-1).astype(np.int32))
        return global_dofs.reshape(cell_dofs.shape).astype(np.int64), lam

    # -- application -----------------------------------------------------------------------
    @property
    def num_owned_nodes(self) -> int:
        """The number of rows (this rank's owned coarse nodes)."""
        return self.coarse.num_owned_dofs

    def points(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """All points where this rank evaluates the network for Q̄ (columns order)."""
        return torch.as_tensor(self.points_numpy, dtype=dtype, device=device)

    def extra_points(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The halo points and boundary-layer nodes (the columns after the owned points)."""
        return torch.as_tensor(
            self.points_numpy[self.num_owned_points :], dtype=dtype, device=device
        )

    def _csr_pair(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, Q^T)`` as CSR tensors on a device (cached): fast mat-vecs both ways."""
        if device not in self._matrices:
            coo = self.matrix(torch.device("cpu"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                pair = (
                    coo.to_sparse_csr().to(device),
                    coo.t().coalesce().to_sparse_csr().to(device),
                )
            self._matrices[device] = pair
        return self._matrices[device]

    def matrix(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The sparse matrix ``(num_owned_nodes, num_columns)`` as a coalesced COO tensor."""
        row, col, val = self._coo
        indices = torch.as_tensor(np.stack([row, col]), dtype=torch.int64)
        sparse = torch.sparse_coo_tensor(
            indices,
            torch.as_tensor(val, dtype=torch.float64),
            (self.num_owned_nodes, self.num_columns),
            check_invariants=False,
        ).coalesce()
        return sparse.to(torch.device("cpu" if device is None else device))

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """``Q̄ v`` at the owned nodes from network values at :meth:`points` (differentiable).

        Args:
            values: ``(num_columns,)`` or ``(num_columns, 1)``, network values in column order
                (float64).
        """
        values = values.reshape(-1)
        if values.shape[0] != self.num_columns:
            raise ValueError(
                f"values must have {self.num_columns} entries (see CompressionOperator.points), "
                f"got {values.shape[0]}"
            )
        if values.dtype != torch.float64:
            raise ValueError(f"values must be float64, got {values.dtype}")
        matrix, transpose = self._csr_pair(values.device)
        return _SparseMatVec.apply(values, matrix, transpose)

    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        """``Q @ dense`` for a dense ``(num_columns, k)`` tensor (e.g. a Jacobian), not tracked."""
        matrix, _ = self._csr_pair(dense.device)
        return matrix @ dense

    def evaluate(self, network: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``Q̄ v`` for a network, evaluated at :meth:`points` on its parameters' device."""
        try:
            device = next(network.parameters()).device  # type: ignore[attr-defined]
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
        return self(network(self.points(device)))

    def compress_state(self, state_owned: torch.Tensor) -> torch.Tensor:
        """``Q̄ y_h`` at the owned nodes for a P1 function given by its owned dofs (collective).

        y_h is interpolated at the (owned and halo) points; the product runs as a distributed
        PETSc matrix, so dofs owned by other ranks are fetched by PETSc. Differentiable.
        """
        return PetscMatMul.apply(state_owned, self._state_matrix)

    @property
    def state_matrix(self) -> PETSc.Mat:
        """The distributed PETSc matrix of ``y ↦ Q̄ y`` on P1 dof vectors."""
        return self._state_matrix

    def destroy(self) -> None:
        """Destroy the PETSc matrix (collective)."""
        self._state_matrix.destroy()

    def __enter__(self) -> CompressionOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class CouplingTerm:
    """``τ₂ R`` of (3.25) with uniform nodal weights, as a differentiable building block.

    ``R = Σ_i w_i ((Q̄v)(x_i) - ŷ_i)²`` over all coarse nodes, ``ŷ = y_h`` (the coupling (2.10))
    or ``ŷ = Q̄ y_h`` (``compress_state=True``, variant (2.16)). Each rank sums over its owned
    nodes and the sum is allreduced (identity backward), so every rank holds the same value
    (see the module doc for the gradient convention).

    Args:
        compression: The compression operator (it carries the coarse problem).
        tau2: The weight τ₂ > 0 (:meth:`R` is the term without it).
        weights: ``"uniform"`` (``w_i = |Ω| / N_h`` with N_h the global node count, so R
            approximates an L² norm squared) or a positive float used for every node.
        compress_state: Use variant (2.16).
    """

    def __init__(
        self,
        compression: CompressionOperator,
        *,
        tau2: float = 1.0,
        weights: Literal["uniform"] | float = "uniform",
        compress_state: bool = False,
    ) -> None:
        if not (isinstance(tau2, (int, float)) and math.isfinite(tau2) and tau2 > 0):
            raise ValueError(f"tau2 must be a finite number > 0, got {tau2}")
        coarse = compression.coarse
        if weights == "uniform":
            weight = coarse.problem.domain.measure / coarse.num_global_dofs
        else:
            weight = float(weights)
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"weights must be 'uniform' or a number > 0, got {weights!r}")
        self.compression = compression
        self.coarse = coarse
        self.tau2 = float(tau2)
        self.weight = weight
        self.compress_state = bool(compress_state)

    def target(self, state_owned: torch.Tensor) -> torch.Tensor:
        """ŷ at the owned nodes: y_h (2.10) or Q̄y_h (2.16) (collective with (2.16))."""
        return self.compression.compress_state(state_owned) if self.compress_state else state_owned

    def rows(self, compressed_values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unweighted-by-τ₂ rows ``√w (Q̄v - ŷ)`` at the owned nodes (R is their ‖·‖²)."""
        return math.sqrt(self.weight) * (compressed_values - target)

    def R(self, compressed_values: torch.Tensor, state_owned: torch.Tensor) -> torch.Tensor:
        """R of (3.25) without τ₂ (collective; the same value on every rank)."""
        rows = self.rows(compressed_values, self.target(state_owned))
        return allreduce_sum(torch.sum(rows * rows), self.coarse.comm)

    def from_state(
        self, compressed_values: torch.Tensor, state_owned: torch.Tensor
    ) -> torch.Tensor:
        """``τ₂ R`` from ``Q̄v`` and y_h at the owned nodes (collective; replicated result)."""
        return self.tau2 * self.R(compressed_values, state_owned)

    def __call__(self, values: torch.Tensor, K_tilde: torch.Tensor) -> torch.Tensor:
        """``τ₂ R(y_h(K̃), Q̄v)`` with gradients through both ``values`` and ``K_tilde``.

        Args:
            values: Network values at ``compression.points()`` (column order).
            K_tilde: The coarse coefficient (replicated on every rank, e.g. from
                :func:`upscaled_coefficient`).
        """
        state = CoarseSolve.apply(K_tilde, self.coarse)
        return self.from_state(self.compression(values), state)

    def adjoint_rhs(self, compressed_values: torch.Tensor, state_owned: torch.Tensor) -> np.ndarray:
        """The paper's adjoint right-hand side ``2τ₂(P_h[θ] - P_h[y_h])`` at the owned dofs.

        ``P_h[θ]_j = Σ_i w_i (Q̄v)_i (Q̄φ_j)_i`` and ``P_h[y]_j = Σ_i w_i (Q̄y)_i (Q̄φ_j)_i`` by the
        nodal quadrature; ``Q̄`` on P1 functions is the identity for (2.10). Its negative is
        dR/dy_h (the adjoint sign convention of (3.23) is ``p_paper = -p``). Collective.
        """
        qv = compressed_values.detach().cpu().numpy()
        y = state_owned.detach().cpu().numpy()
        if not self.compress_state:
            return 2.0 * self.tau2 * self.weight * (qv - y)
        matrix = self.compression.state_matrix
        residual, result = matrix.createVecs()
        source, target = matrix.createVecs()
        source.array[:] = y
        matrix.mult(source, target)
        residual.array[:] = self.weight * (qv - target.array)
        result_vec = source.duplicate()
        matrix.multTranspose(residual, result_vec)
        out = 2.0 * self.tau2 * result_vec.array.copy()
        for vec in (residual, result, source, target, result_vec):
            vec.destroy()
        return out
