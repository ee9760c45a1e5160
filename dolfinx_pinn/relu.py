"""Exact and approximate ReLU network emulation (Hoang & Schwab, Lemmas 3.1, 3.2 and 4.1).

Every constructor returns a plain ``torch.nn.Sequential`` of ``Linear`` and ``ReLU`` layers
(float64) whose weights are written down, not trained:

* :func:`p1_to_relu` converts a continuous P1 DOLFINx function exactly [HS Lemma 4.1]: in 1D a
  one-hidden-layer network ``v_0 + sum_k c_k ReLU(x - x_k)`` on any interval mesh; in 2D (and
  3D) the hat function of every vertex is ``max(0, min_T l_T)`` over the simplices T of its
  patch (``l_T`` the linear function that is 1 at the vertex and 0 on the opposite face; exact
  when every vertex patch is convex, He, Li, Xu & Zheng 2018), and the minimum of two numbers is
  ``min(a, b) = (ReLU(a+b) - ReLU(-a-b) - ReLU(a-b) - ReLU(b-a)) / 2``, applied in a binary tree;
* :func:`square_network` is Yarotsky's ``f_m(x) = x - sum_{s<=m} g_s(x) / 4^s`` (``g_s`` the
  s-fold composition of the hat ``g``) with ``0 <= f_m - x^2 <= 2^{-2m-2}`` on [0, 1];
  :func:`product_network` is ``xy = ((x+y)^2 - (x-y)^2)/4`` from two of them [HS Lemma 3.1];
* :func:`cos_network` / :func:`sin_network` emulate ``cos(a t)``/``sin(a t)`` on [-b, b]
  [HS Lemma 3.2]: the sawtooth ``g_r`` reduces any frequency exactly
  (``cos(2 pi 2^{r-1} x) = cos(pi g_r(x))`` on [0, 1]), ``cos(pi v)`` for ``v in [0, 1]`` starts
  from ``1 - theta^2 / 2`` at ``theta = pi v / 2^k`` and is doubled k times by
  ``cos 2 theta = 2 cos^2 theta - 1`` with square networks. The error falls like ``4^{-k}``
  while the depth grows like ``k^2`` (Lemma 3.2's ``depth ~ (log 1/delta)^2``).

:func:`network_size` reports the depth L (number of affine layers), the width W and the number
M of nonzero weights and biases, as in Section 3 of the paper.

Networks are assembled as lists of affine maps ``(A_l, b_l)`` (numpy, float64) with a ReLU
between consecutive maps; :func:`_compose` merges the last map of the inner and the first of
the outer network, and :func:`_parallel` runs networks side by side, padding the shallower ones
with exact identities ``x = ReLU(x) - ReLU(-x)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "NetworkSize",
    "cos_network",
    "network_size",
    "p1_to_relu",
    "product_error_bound",
    "product_network",
    "sin_network",
    "square_error_bound",
    "square_network",
]

Layers = list[tuple[np.ndarray, np.ndarray]]
"""Affine maps ``(A (out x in), b (out,))``; a ReLU acts between consecutive maps."""


# -- network algebra ---------------------------------------------------------------------------
def _affine(matrix: Any, bias: Any | None = None) -> Layers:
    matrix = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    bias = np.zeros(matrix.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return [(matrix, bias.reshape(-1))]


def _compose(outer: Layers, inner: Layers) -> Layers:
    """``outer o inner``: inner's last affine map and outer's first are merged into one."""
    last_matrix, last_bias = inner[-1]
    first_matrix, first_bias = outer[0]
    merged = (first_matrix @ last_matrix, first_matrix @ last_bias + first_bias)
    return [*inner[:-1], merged, *outer[1:]]


def _pad(layers: Layers, depth: int) -> Layers:
    """Deepen a network to ``depth`` affine maps with exact identities ReLU(z) - ReLU(-z)."""
    layers = list(layers)
    while len(layers) < depth:
        matrix, bias = layers[-1]
        size = matrix.shape[0]
        layers[-1] = (np.vstack([matrix, -matrix]), np.concatenate([bias, -bias]))
        layers.append((np.hstack([np.eye(size), -np.eye(size)]), np.zeros(size)))
    return layers


def _parallel(networks: Sequence[Layers]) -> Layers:
    """Networks on the same input side by side; the outputs are concatenated."""
    depth = max(len(n) for n in networks)
    padded = [_pad(n, depth) for n in networks]
    result: Layers = []
    for level in range(depth):
        matrices = [n[level][0] for n in padded]
        biases = [n[level][1] for n in padded]
        if level == 0:
            matrix = np.vstack(matrices)
        else:
            rows = sum(m.shape[0] for m in matrices)
            cols = sum(m.shape[1] for m in matrices)
            matrix = np.zeros((rows, cols))
            r = c = 0
            for m in matrices:
                matrix[r : r + m.shape[0], c : c + m.shape[1]] = m
                r, c = r + m.shape[0], c + m.shape[1]
        result.append((matrix, np.concatenate(biases)))
    return result


def _to_sequential(layers: Layers) -> torch.nn.Sequential:
    modules: list[torch.nn.Module] = []
    for index, (matrix, bias) in enumerate(layers):
        linear = torch.nn.Linear(matrix.shape[1], matrix.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(matrix))
            linear.bias.copy_(torch.as_tensor(bias))
        modules.append(linear)
        if index < len(layers) - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


@dataclass(frozen=True)
class NetworkSize:
    """Size of a ReLU network in the notation of Hoang & Schwab, Section 3.

    Attributes:
        depth: L, the number of affine layers (L - 1 hidden layers).
        width: W, the largest layer width (inputs and outputs included).
        nonzero_weights: M, the nonzero entries of all weight matrices and biases.
        parameters: All stored parameters (dense storage).
    """

    depth: int
    width: int
    nonzero_weights: int
    parameters: int


def network_size(network: torch.nn.Sequential) -> NetworkSize:
    """Depth, width and nonzero weights of a Sequential of Linear/ReLU layers."""
    linears = [m for m in network if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("network: no Linear layers found")
    widths = [linears[0].in_features] + [m.out_features for m in linears]
    nonzero = sum(
        int(torch.count_nonzero(m.weight))
        + (int(torch.count_nonzero(m.bias)) if m.bias is not None else 0)
        for m in linears
    )
    parameters = sum(p.numel() for p in network.parameters())
    return NetworkSize(len(linears), max(widths), nonzero, parameters)


# -- Yarotsky's square and product (Lemma 3.1) ---------------------------------------------------
def _check_level(name: str, value: Any, maximum: int = 40) -> int:
    if not (isinstance(value, (int, np.integer)) and 1 <= value <= maximum):
        raise ValueError(f"{name} must be an integer in [1, {maximum}], got {value!r}")
    return int(value)


def _check_bound(value: Any) -> float:
    try:
        bound = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bound must be a positive number, got {value!r}") from None
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a finite number > 0, got {value!r}")
    return bound


def _hat_rows(scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activations ``[x, x - 1/2, x - 1]`` (for input ``scale * x``) of the hat g."""
    return np.full((3, 1), scale), np.array([0.0, -0.5, -1.0])


_HAT_OUT = np.array([2.0, -4.0, 2.0])  # g(x) = 2 ReLU(x) - 4 ReLU(x - 1/2) + 2 ReLU(x - 1)


def _unit_square_layers(m: int) -> Layers:
    """Yarotsky's f_m on [0, 1] (input >= 0): width 4, m + 1 affine maps."""
    # Hidden state after each ReLU: [ReLU(g), ReLU(g - 1/2), ReLU(g - 1), f] with f >= x^2 >= 0,
    # so the running approximation f passes the ReLU unchanged.
    first = (np.ones((4, 1)), np.array([0.0, -0.5, -1.0, 0.0]))
    layers: Layers = [first]
    for s in range(1, m + 1):
        g_next = np.concatenate([_HAT_OUT, [0.0]])  # g_s from the hidden state
        f_next = np.array([0.0, 0.0, 0.0, 1.0]) - g_next / 4.0**s  # f_s = f_{s-1} - g_s / 4^s
        if s < m:
            matrix = np.vstack([g_next, g_next, g_next, f_next])
            layers.append((matrix, np.array([0.0, -0.5, -1.0, 0.0])))
        else:
            layers.append((f_next[None, :], np.zeros(1)))
    return layers


def _abs_layers(scale: float = 1.0) -> Layers:
    """``scale * |x|`` as ReLU(x) + ReLU(-x)."""
    return [(np.array([[1.0], [-1.0]]), np.zeros(2)), (np.array([[scale, scale]]), np.zeros(1))]


def _square_layers(m: int, bound: float) -> Layers:
    """``x^2`` on [-bound, bound] as ``bound^2 f_m(|x| / bound)``."""
    layers = _compose(_unit_square_layers(m), _abs_layers(1.0 / bound))
    matrix, bias = layers[-1]
    layers[-1] = (bound**2 * matrix, bound**2 * bias)
    return layers


def square_error_bound(m: int, bound: float = 1.0) -> float:
    """The error bound ``bound^2 2^{-2m-2}`` of :func:`square_network` on [-bound, bound]."""
    return _check_bound(bound) ** 2 * 2.0 ** (-2 * _check_level("m", m) - 2)


def square_network(m: int, bound: float = 1.0) -> torch.nn.Sequential:
    """Yarotsky's ReLU network for ``x^2`` on ``[-bound, bound]``.

    ``bound^2 f_m(|x| / bound)`` with ``f_m`` the piecewise-linear interpolant of ``t^2`` on the
    ``2^m + 1`` dyadic points of [0, 1]; ``0 <= net(x) - x^2 <= bound^2 2^{-2m-2}``. Depth
    ``m + 2``, width 4.

    Args:
        m: The number of sawtooth compositions, 1 <= m <= 40.
        bound: The half-width of the input interval.

    Returns:
        A ``torch.nn.Sequential`` mapping ``(N, 1)`` to ``(N, 1)``.
    """
    return _to_sequential(_square_layers(_check_level("m", m), _check_bound(bound)))


def _product_layers(m: int, bound: float) -> Layers:
    plus = _compose(_square_layers(m, 2.0 * bound), _affine([[1.0, 1.0]]))
    minus = _compose(_square_layers(m, 2.0 * bound), _affine([[1.0, -1.0]]))
    return _compose(_affine([[0.25, -0.25]]), _parallel([plus, minus]))


def product_error_bound(m: int, bound: float = 1.0) -> float:
    """The bound ``bound^2 2^{-2m-2}`` of the product network's error on ``[-bound, bound]^2``.

    Both squares err by ``[0, (2 bound)^2 2^{-2m-2}]`` (the interpolant lies above ``t^2``), so
    their difference divided by 4 errs by at most ``bound^2 2^{-2m-2}``.
    """
    return square_error_bound(m, bound)


def product_network(m: int, bound: float = 1.0) -> torch.nn.Sequential:
    """ReLU network for ``x y`` on ``[-bound, bound]^2`` [HS Lemma 3.1].

    ``((x + y)^2 - (x - y)^2) / 4`` with two :func:`square_network` on ``[-2 bound, 2 bound]``;
    error at most :func:`product_error_bound`. Depth ``m + 2``, width 8.

    Args:
        m: Sawtooth compositions of each square, 1 <= m <= 40.
        bound: Half-width of the input box.

    Returns:
        A ``torch.nn.Sequential`` mapping ``(N, 2)`` to ``(N, 1)``.
    """
    return _to_sequential(_product_layers(_check_level("m", m), _check_bound(bound)))


# -- sin and cos (Lemma 3.2) --------------------------------------------------------------------
def _sawtooth_layers(r: int, scale: float) -> Layers:
    """``g_r(scale * z)`` for ``scale * z`` in [0, 1]: r hat layers of width 3."""
    matrix, bias = _hat_rows(scale)
    layers: Layers = [(matrix, bias)]
    for _ in range(1, r):
        layers.append((np.outer(np.ones(3), _HAT_OUT), np.array([0.0, -0.5, -1.0])))
    layers.append((_HAT_OUT[None, :], np.zeros(1)))
    return layers


def _clamp_abs_layers() -> Layers:
    """``|clamp(c, -1, 1)|``: clamp = ReLU(c+1) - ReLU(c-1) - 1, then |.| by two ReLUs."""
    clamp = [
        (np.array([[1.0], [1.0]]), np.array([1.0, -1.0])),
        (np.array([[1.0, -1.0]]), np.array([-1.0])),
    ]
    return _compose(_abs_layers(1.0), clamp)


def _clamp_layers() -> Layers:
    return [
        (np.array([[1.0], [1.0]]), np.array([1.0, -1.0])),
        (np.array([[1.0, -1.0]]), np.array([-1.0])),
    ]


def _cosine_layers(scale: float, shift: float, bound: float, level: int, m: int) -> Layers:
    """``cos(scale t + shift)`` for t in [-bound, bound]."""
    # z = |scale t + shift| / (2 pi) in [0, S]; cos is even and 2 pi periodic.
    reach = max(abs(shift - scale * bound), abs(shift + scale * bound)) / (2.0 * math.pi)
    r = max(1, math.ceil(math.log2(max(reach, 1.0))) + 1)  # R = 2^(r-1) >= reach
    R = 2.0 ** (r - 1)
    argument = _compose(_abs_layers(1.0 / (2.0 * math.pi * R)), _affine([[scale]], [shift]))
    # v = g_r(z / R) in [0, 1] and cos(2 pi z) = cos(2 pi R (z / R)) = cos(pi v).
    v = _compose(_sawtooth_layers(r, 1.0), argument)
    # c_0 = cos(theta) ~ 1 - theta^2 / 2 with theta = pi v / 2^k in [0, pi / 2^k].
    theta_max = math.pi / 2.0**level
    square_v = _unit_square_layers(m)  # f_m(v) ~ v^2, v >= 0
    c = _compose(_affine([[-0.5 * theta_max**2]], [1.0]), _compose(square_v, v))
    for _ in range(level):
        # c <- 2 c^2 - 1, the square taken of |clamp(c)| (the exact value lies in [-1, 1]).
        squared = _compose(_unit_square_layers(m), _clamp_abs_layers())
        c = _compose(_affine([[2.0]], [-1.0]), _compose(squared, c))
    return _compose(_clamp_layers(), c)


def _trig_arguments(
    frequency: Any, bound: Any, level: Any, delta: Any, square_depth: Any
) -> tuple[float, float, int, int]:
    try:
        frequency = float(frequency)
    except (TypeError, ValueError):
        raise ValueError(f"frequency must be a number, got {frequency!r}") from None
    if not (math.isfinite(frequency) and frequency != 0):
        raise ValueError(f"frequency must be finite and nonzero, got {frequency}")
    bound = _check_bound(bound)
    if (level is None) == (delta is None):
        raise ValueError("give exactly one of level and delta")
    if delta is not None:
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
        # Measured error ~ 0.43 * 4^-k (the Taylor remainder amplified by the doublings).
        level = max(1, math.ceil(math.log(0.5 / delta, 4)))
    level = _check_level("level", level, maximum=25)
    m = 2 * level + 2 if square_depth is None else _check_level("square_depth", square_depth)
    return frequency, bound, level, m


def cos_network(
    frequency: float,
    bound: float = 1.0,
    *,
    level: int | None = None,
    delta: float | None = None,
    square_depth: int | None = None,
) -> torch.nn.Sequential:
    """ReLU network for ``cos(frequency * t)`` on ``[-bound, bound]`` [HS Lemma 3.2].

    Args:
        frequency: The frequency a (any nonzero real).
        bound: The half-width of the input interval.
        level: The number k of angle doublings (error about ``0.43 * 4^-k``).
        delta: Instead of ``level``: the target accuracy; ``k = ceil(log_4(0.5 / delta))``.
        square_depth: Sawtooth depth m of each square network (default ``2k + 2``, which
            keeps the squares' errors below the Taylor remainder after amplification).

    Returns:
        A ``torch.nn.Sequential`` mapping ``(N, 1)`` to ``(N, 1)``. The depth is
        ``O(k^2 + log(a bound))``, the width at most 4.
    """
    frequency, bound, level, m = _trig_arguments(frequency, bound, level, delta, square_depth)
    return _to_sequential(_cosine_layers(frequency, 0.0, bound, level, m))


def sin_network(
    frequency: float,
    bound: float = 1.0,
    *,
    level: int | None = None,
    delta: float | None = None,
    square_depth: int | None = None,
) -> torch.nn.Sequential:
    """ReLU network for ``sin(frequency * t) = cos(frequency * t - pi/2)`` on ``[-bound, bound]``.

    Arguments as in :func:`cos_network`.
    """
    frequency, bound, level, m = _trig_arguments(frequency, bound, level, delta, square_depth)
    return _to_sequential(_cosine_layers(frequency, -0.5 * math.pi, bound, level, m))


# -- P1 finite element functions (Lemma 4.1) -----------------------------------------------------
def _gather_p1(function: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertex coordinates, values and simplices (global dof numbers) on every rank (collective)."""
    space = function.function_space
    mesh = space.mesh
    element = space.element.basix_element
    if (
        element.degree != 1
        or element.discontinuous
        or space.dofmap.index_map_bs != 1
        or element.family.name != "P"
        or mesh.topology.cell_name() not in ("interval", "triangle", "tetrahedron")
    ):
        raise ValueError("function: a continuous scalar P1 function on a simplex mesh is required")
    comm = mesh.comm
    tdim = mesh.topology.dim
    index_map = space.dofmap.index_map
    owned = index_map.size_local
    start = index_map.local_range[0]
    coordinates = space.tabulate_dof_coordinates()[:owned, :tdim]
    values = function.x.array[:owned].real.astype(np.float64)
    owned_cells = mesh.topology.index_map(tdim).size_local
    cells = index_map.local_to_global(space.dofmap.list[:owned_cells].reshape(-1)).reshape(
        owned_cells, -1
    )
    total = index_map.size_global
    all_coordinates = np.empty((total, tdim))
    all_values = np.empty(total)
    for first, coords, vals in comm.allgather((start, coordinates, values)):
        all_coordinates[first : first + len(vals)] = coords
        all_values[first : first + len(vals)] = vals
    all_cells = np.concatenate(comm.allgather(cells)).astype(np.int64)
    return all_coordinates, all_values, all_cells


def _p1_1d_layers(coordinates: np.ndarray, values: np.ndarray) -> Layers:
    order = np.argsort(coordinates[:, 0])
    nodes, nodal = coordinates[order, 0], values[order]
    slopes = np.diff(nodal) / np.diff(nodes)
    jumps = np.concatenate([slopes[:1], np.diff(slopes)])
    keep = jumps != 0.0
    if not keep.any():  # a constant function
        return _compose(_affine([[0.0]], [nodal[0]]), _affine([[0.0]]))
    knots = nodes[:-1][keep]
    hidden = (np.ones((int(keep.sum()), 1)), -knots)
    return [hidden, (jumps[keep][None, :], np.array([nodal[0]]))]


def _hat_layers(coordinates: np.ndarray, values: np.ndarray, cells: np.ndarray) -> Layers:
    """Sum of ``v_i max(0, min_T l_T)`` over the vertices with ``v_i != 0``."""
    dim = coordinates.shape[1]
    patches: dict[int, list[tuple[np.ndarray, float]]] = {}
    for cell in cells:
        vertices = coordinates[cell]  # (d + 1, d)
        system = np.vstack([vertices.T, np.ones(dim + 1)])  # barycentric: system @ lambda = [x; 1]
        inverse = np.linalg.inv(system)  # row k: lambda_k(x) = inverse[k, :d] x + inverse[k, d]
        for local, vertex in enumerate(cell):
            if values[vertex] != 0.0:
                patches.setdefault(int(vertex), []).append(
                    (inverse[local, :dim], inverse[local, dim])
                )
    vertices_used = sorted(patches)
    if not vertices_used:  # the zero function
        return _compose(_affine(np.zeros((1, 1))), _affine(np.zeros((1, dim))))
    valence = max(len(patches[v]) for v in vertices_used)
    levels = max(1, math.ceil(math.log2(valence)))
    size = 2**levels
    # Level-0 "values": the affine functions l_T, each list padded by repeating its last entry
    # (min(a, a) = a).
    gradients = np.zeros((len(vertices_used), size, dim))
    offsets = np.zeros((len(vertices_used), size))
    for row, vertex in enumerate(vertices_used):
        patch = patches[vertex]
        for k in range(size):
            gradients[row, k], offsets[row, k] = patch[min(k, len(patch) - 1)]
    # The min of a pair (a, b) from 4 ReLU neurons: [a+b, -(a+b), a-b, b-a] -> (n0-n1-n2-n3)/2.
    pair_rows = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    read_min = 0.5 * np.array([1.0, -1.0, -1.0, -1.0])
    count = len(vertices_used)
    # First affine map: x -> pre-activations of the first min level.
    items = size
    pre_w = np.einsum(
        "pq,hkqd->hkpd", pair_rows, np.stack([gradients[:, 0::2], gradients[:, 1::2]], axis=2)
    )
    pre_b = np.einsum(
        "pq,hkq->hkp", pair_rows, np.stack([offsets[:, 0::2], offsets[:, 1::2]], axis=2)
    )
    layers: Layers = [(pre_w.reshape(-1, dim), pre_b.reshape(-1))]
    items //= 2  # mins available after this ReLU layer (each from 4 neurons)
    while items > 1:
        # Next level: pairs of mins (each a combination of 4 neurons) -> 4 neurons per pair.
        block = np.zeros((items // 2, 4, items, 4))
        for k in range(items // 2):
            for p in range(4):
                block[k, p, 2 * k] = pair_rows[p, 0] * read_min
                block[k, p, 2 * k + 1] = pair_rows[p, 1] * read_min
        block = block.reshape(2 * items, 4 * items)
        layers.append((np.kron(np.eye(count), block), np.zeros(count * 2 * items)))
        items //= 2
    # One min per vertex left: hat = ReLU(min), then the output sum_i v_i hat_i.
    layers.append((np.kron(np.eye(count), read_min[None, :]), np.zeros(count)))
    layers.append((values[vertices_used][None, :], np.zeros(1)))
    return layers


def _evaluate_layers(layers: Layers, points: np.ndarray) -> np.ndarray:
    state = points.T
    for index, (matrix, bias) in enumerate(layers):
        state = matrix @ state + bias[:, None]
        if index < len(layers) - 1:
            state = np.maximum(state, 0.0)
    return state[0]


def p1_to_relu(function: Any, max_parameters: int = 20_000_000) -> torch.nn.Sequential:
    """Exact ReLU network of a continuous P1 DOLFINx function [HS Lemma 4.1] (collective).

    1D (any interval mesh, any vertex order): ``v_0 + sum_k c_k ReLU(x - x_k)``, one hidden
    layer with one neuron per interior kink, exact on the mesh's interval. 2D and 3D simplex
    meshes: the hat of each vertex with a nonzero value is ``max(0, min_{T in patch} l_T)``
    (min by a binary ReLU tree); exact on the domain when the vertex patches are convex (true
    for the box meshes of DOLFINx and any locally convex triangulation). The conversion is
    checked at all vertices and cell midpoints; a non-convex patch raises ValueError.

    The mesh is gathered to every rank, so every rank gets the same network. Dense weight
    matrices grow like (vertices x valence)^2: ``max_parameters`` guards the memory.

    Args:
        function: A ``dolfinx.fem.Function`` in a scalar continuous P1 space.
        max_parameters: The largest dense parameter count allowed.

    Returns:
        A ``torch.nn.Sequential`` mapping ``(N, d)`` to ``(N, 1)``.
    """
    coordinates, values, cells = _gather_p1(function)
    dim = coordinates.shape[1]
    if dim == 1:
        layers = _p1_1d_layers(coordinates, values)
    else:
        count = int(np.count_nonzero(values))
        valence = int(np.bincount(cells.reshape(-1), minlength=len(values)).max())
        size = 2 ** max(1, math.ceil(math.log2(max(valence, 2))))
        estimate = (2 * count * size) ** 2 // 2 + 2 * count * size * dim
        if estimate > max_parameters:
            raise ValueError(
                f"function: the dense network would hold about {estimate:.3g} parameters "
                f"(> max_parameters = {max_parameters}); use a coarser mesh or raise the limit"
            )
        layers = _hat_layers(coordinates, values, cells)
        midpoints = coordinates[cells].mean(axis=1)
        check_points = np.vstack([coordinates, midpoints])
        expected = np.concatenate([values, values[cells].mean(axis=1)])
        mismatch = np.abs(_evaluate_layers(layers, check_points) - expected).max()
        if mismatch > 1e-9 * max(1.0, float(np.abs(values).max())):
            raise ValueError(
                f"function: the ReLU conversion misses the FE function by {mismatch:.3g} at the "
                "vertices/midpoints: the mesh has a non-convex vertex patch"
            )
    return _to_sequential(layers)
