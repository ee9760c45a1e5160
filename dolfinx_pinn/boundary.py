"""Boundary data of a general problem: Dirichlet data on tagged facets, Neumann data on others.

The fine problem of Hintermüller & Korolev (4.8) is the lifted one: ``u = 0`` on the whole
boundary and the right-hand side ``q + div(K^ε e_i)``. A user's problem is

    -div(K^ε ∇u) = q  in Ω,    u = g  on Γ_D,    (K^ε ∇u)·n = h  on Γ_N,

with Γ_D and Γ_N unions of tagged facets of a :class:`~dolfinx_pinn.geometry.MeshDomain` (or the
whole boundary of a :class:`~dolfinx_pinn.problems.Box` for Dirichlet data). :class:`BoundaryData`
holds g and h and gives them to every part of the package in the form it needs:

* numpy/torch values at boundary points (:meth:`BoundaryData.dirichlet_values`,
  :meth:`BoundaryData.neumann_values`) for the soft boundary rows of the network;
* a smooth extension G of g into Ω (:meth:`BoundaryData.lift`) for the hard condition
  ``v = G + φ N`` (:class:`~dolfinx_pinn.boundary_value.DirichletNet`): g itself where one
  function is given for all of Γ_D, else the transfinite blend ``Σ_k w_k g_k`` of
  :meth:`MeshDomain.potential_blend <dolfinx_pinn.geometry.MeshDomain.potential_blend>`;
* Dirichlet conditions and the Neumann form on any mesh of the domain
  (:meth:`BoundaryData.dirichlet_bcs`, :meth:`BoundaryData.neumann_form`) for the coarse
  problem and the fine reference.

A value is a number, a definition ``g(x, m)`` in the math namespace of
:mod:`~dolfinx_pinn.problems` (evaluated by numpy, torch and UFL alike), or, for Dirichlet data, a
scalar ``dolfinx.fem.Function`` on the domain's mesh (soft boundary rows only: it has no smooth
extension for a hard condition). Exterior facets with neither kind of data are insulated
(``h = 0``, the natural condition of the weak form, as in DOLFINx).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dolfinx
import dolfinx.fem
import dolfinx.geometry
import dolfinx.mesh
import numpy as np
import torch
import ufl

from dolfinx_pinn.geometry import MeshDomain

if TYPE_CHECKING:
    from dolfinx_pinn.problems import Box

__all__ = ["BoundaryData", "exterior_facets"]

Value = float | Callable[..., Any] | dolfinx.fem.Function
Group = tuple[tuple[int, ...] | None, Any]
"""A tag group (``None``: the whole boundary) and its value."""


def exterior_facets(domain: Any, mesh: dolfinx.mesh.Mesh) -> tuple[np.ndarray, np.ndarray]:
    """This rank's exterior facets of a mesh of ``domain`` and their tags (``-1``: untagged)."""
    if isinstance(domain, MeshDomain):
        return domain.exterior_facet_tags(mesh)
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
    return facets, np.full(len(facets), -1, dtype=np.int64)


def _evaluate(value: Any, x: Any, backend: str) -> Any:
    """A number or a definition ``g(x, m)`` at numpy/torch points ``(N, d)`` or a UFL coordinate."""
    from dolfinx_pinn.problems import math_namespace

    if backend == "ufl":
        components = tuple(x[j] for j in range(x.ufl_shape[0]))
    else:
        components = tuple(x[:, j] for j in range(x.shape[1]))
    result = value if not callable(value) else value(components, math_namespace(backend))
    if backend == "ufl":
        return ufl.as_ufl(result)
    if backend == "torch":
        if isinstance(result, torch.Tensor) and result.shape == x.shape[:1]:
            return result
        return torch.zeros_like(x[:, 0]) + result
    return np.broadcast_to(np.asarray(result, dtype=np.float64), x.shape[:1]).astype(np.float64)


def _check_value(value: Any, name: str, dim: int, allow_function: bool) -> Any:
    """A number, a definition probed once through numpy and torch, or a dolfinx Function."""
    if isinstance(value, dolfinx.fem.Function):
        if not allow_function:
            raise ValueError(f"{name}: a dolfinx Function is allowed for Dirichlet data only")
        if value.function_space.value_size != 1:
            raise ValueError(f"{name}: a scalar Function is needed")
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, a function g(x, m) or a Function, got {value}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
        return float(value)
    if not callable(value):
        raise ValueError(
            f"{name} must be a number, a function g(x, m) of the math namespace or a dolfinx "
            f"Function, got {type(value).__name__}"
        )
    probe = np.linspace(0.1, 0.9, 3 * dim).reshape(3, dim)
    try:
        values = _evaluate(value, probe, "numpy")
        _evaluate(value, torch.tensor(probe, requires_grad=True), "torch")
    except Exception as error:  # the user's definition: any failure is reported by name
        raise ValueError(
            f"{name}: the definition g(x, m) fails for numpy or torch points ({error}); write "
            "it with the math namespace m (m.sin, m.exp, ...)"
        ) from None
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: the definition is not finite at {probe.tolist()}")
    return value


class BoundaryData:
    """Dirichlet data g on Γ_D and Neumann data h on Γ_N (see the module doc).

    Args:
        domain: The problem's domain (a Box: Dirichlet data on the whole boundary only).
        dirichlet: A value for the whole boundary, or ``{tag: value}`` for tagged facets.
        neumann: ``{tag: value}`` (the outward flux ``(K ∇u)·n``) for other tagged facets.

    Raises:
        ValueError: naming the parameter: an unknown tag, a tag with both kinds of data, no
            Dirichlet facet at all (the problem would be singular), or a value that is not a
            number, a definition or a Function.
    """

    def __init__(
        self,
        domain: MeshDomain | Box,
        dirichlet: Value | Mapping[int, Value] | None,
        neumann: Mapping[int, Value] | None = None,
    ) -> None:
        self.domain = domain
        dim = domain.dim
        if dirichlet is None:
            raise ValueError("dirichlet: boundary data need Dirichlet data on some facets")
        if isinstance(dirichlet, Mapping):
            self.dirichlet = self._groups(dirichlet, "dirichlet", dim, allow_function=True)
        else:
            if neumann:
                raise ValueError(
                    "neumann: Dirichlet data on the whole boundary leave no facet for it; give "
                    "dirichlet as {tag: value}"
                )
            self.dirichlet = [(None, _check_value(dirichlet, "dirichlet", dim, True))]
        if neumann is not None and not isinstance(neumann, Mapping):
            raise ValueError("neumann must be a mapping {tag: value} of tagged facets")
        self.neumann = self._groups(neumann or {}, "neumann", dim, allow_function=False)
        shared = set(self.tags_of(self.dirichlet) or ()) & set(self.tags_of(self.neumann) or ())
        if shared:
            raise ValueError(f"neumann: tags {sorted(shared)} also carry Dirichlet data")
        measure = (
            domain.tag_measure(self.dirichlet_tags)
            if isinstance(domain, MeshDomain)
            else domain.boundary_measure
        )
        if not measure > 0:
            raise ValueError(
                "dirichlet: the tagged Dirichlet facets have measure 0; a problem without "
                "Dirichlet data is singular"
            )
        self.dirichlet_measure = float(measure)
        self.neumann_measure = (
            domain.tag_measure(self.neumann_tags) if self.neumann else 0.0  # type: ignore[union-attr]
        )

    def _groups(
        self, data: Mapping[int, Value], name: str, dim: int, allow_function: bool
    ) -> list[Group]:
        if data and not isinstance(self.domain, MeshDomain):
            raise ValueError(f"{name}: tagged boundary data need a MeshDomain with facet tags")
        known = set(getattr(self.domain, "tag_values", ()))
        groups: dict[int, list[int]] = {}
        values: list[Any] = []
        for tag, value in data.items():
            if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)):
                raise ValueError(f"{name}: keys must be integer facet tags, got {tag!r}")
            if int(tag) not in known:
                raise ValueError(f"{name}: tag {tag} is not a boundary facet tag {sorted(known)}")
            checked = _check_value(value, f"{name}[{tag}]", dim, allow_function)
            # Facets sharing one value object form one group (one function, one lift).
            for index, existing in enumerate(values):
                if existing is checked or (
                    isinstance(checked, float)
                    and isinstance(existing, float)
                    and existing == checked
                ):
                    groups[index].append(int(tag))
                    break
            else:
                values.append(checked)
                groups[len(values) - 1] = [int(tag)]
        return [(tuple(groups[i]), value) for i, value in enumerate(values)]

    @staticmethod
    def tags_of(groups: Sequence[Group]) -> tuple[int, ...] | None:
        """The tags of the groups (``None`` if one group is the whole boundary)."""
        tags: list[int] = []
        for group, _ in groups:
            if group is None:
                return None
            tags.extend(group)
        return tuple(sorted(tags))

    @property
    def dirichlet_tags(self) -> tuple[int, ...] | None:
        """The facet tags of Γ_D (``None``: the whole boundary)."""
        return self.tags_of(self.dirichlet)

    @property
    def neumann_tags(self) -> tuple[int, ...]:
        """The facet tags with Neumann data."""
        return self.tags_of(self.neumann) or ()

    @property
    def has_function(self) -> bool:
        """Whether some Dirichlet data is a dolfinx Function (no hard condition then)."""
        return any(isinstance(v, dolfinx.fem.Function) for _, v in self.dirichlet)

    @property
    def homogeneous_dirichlet(self) -> bool:
        """Whether g = 0 on all of Γ_D."""
        return all(isinstance(v, float) and v == 0.0 for _, v in self.dirichlet)

    # -- points ------------------------------------------------------------------------------------
    def point_tags(self, points: np.ndarray) -> np.ndarray:
        """The facet tag ``(N,)`` of boundary points (the nearest boundary facet's)."""
        if not isinstance(self.domain, MeshDomain):
            return np.full(len(points), -1, dtype=np.int64)
        return self.domain._nearest_tags(np.asarray(points, dtype=np.float64))

    def is_dirichlet(self, tags: np.ndarray) -> np.ndarray:
        """Whether boundary points with these tags lie on Γ_D."""
        chosen = self.dirichlet_tags
        return np.ones(len(tags), dtype=bool) if chosen is None else np.isin(tags, chosen)

    def is_neumann(self, tags: np.ndarray) -> np.ndarray:
        """Whether boundary points with these tags carry Neumann data (non-zero or not)."""
        return ~self.is_dirichlet(tags)

    def dirichlet_values(
        self, points: np.ndarray, tags: np.ndarray, missing: str = "raise"
    ) -> np.ndarray:
        """The values of g ``(N,)`` at Dirichlet points ``(N, d)`` with their facet tags (local).

        Args:
            points: Boundary points.
            tags: Their facet tags (:meth:`point_tags`).
            missing: For data given as a Function, what a point outside this rank's cells
                gets: ``"raise"`` a ValueError, ``"nan"`` NaN (to be filled from other ranks).
        """
        out = np.zeros(len(points))
        for group, value in self.dirichlet:
            chosen = np.ones(len(points), bool) if group is None else np.isin(tags, group)
            if np.any(chosen):
                out[chosen] = self._point_values(value, points[chosen], missing)
        return out

    def neumann_values(self, points: np.ndarray, tags: np.ndarray) -> np.ndarray:
        """The values of h ``(N,)`` at Neumann points (0 on insulated facets)."""
        out = np.zeros(len(points))
        for group, value in self.neumann:
            chosen = np.isin(tags, group)
            if np.any(chosen):
                out[chosen] = _evaluate(value, points[chosen], "numpy")
        return out

    @staticmethod
    def _point_values(value: Any, points: np.ndarray, missing: str = "raise") -> np.ndarray:
        if not isinstance(value, dolfinx.fem.Function):
            return _evaluate(value, points, "numpy")
        mesh = value.function_space.mesh
        tdim = mesh.topology.dim
        padded = np.zeros((len(points), 3))
        padded[:, :tdim] = points
        tree = dolfinx.geometry.bb_tree(mesh, tdim)
        candidates = dolfinx.geometry.compute_collisions_points(tree, padded)
        colliding = dolfinx.geometry.compute_colliding_cells(mesh, candidates, padded)
        found = np.diff(colliding.offsets) > 0
        if not np.all(found) and missing == "raise":
            raise ValueError(
                "dirichlet: a Function's values are needed at boundary points of this rank that "
                "its mesh does not hold here; give the Function on the domain's mesh"
            )
        out = np.full(len(points), np.nan)
        if np.any(found):
            cells = colliding.array[colliding.offsets[:-1][found]]
            out[found] = value.eval(padded[found], cells).reshape(-1)
        return out

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        """A smooth G ``(N,)`` with G = g on Γ_D (torch, differentiable in x).

        Raises:
            ValueError: for Dirichlet data given as a Function.
        """
        if self.has_function:
            raise ValueError(
                "dirichlet: a Function has no smooth extension for a hard boundary condition; "
                "use a network with the soft τ1 penalty"
            )
        if len(self.dirichlet) == 1:
            return _evaluate(self.dirichlet[0][1], x, "torch")
        weights = self.domain.potential_blend(x, [group for group, _ in self.dirichlet])  # type: ignore[union-attr]
        values = torch.stack([_evaluate(v, x, "torch") for _, v in self.dirichlet], dim=1)
        return (weights * values).sum(dim=1)

    # -- finite elements ---------------------------------------------------------------------------
    def dirichlet_facets(self, mesh: dolfinx.mesh.Mesh) -> np.ndarray:
        """This rank's exterior facets of a mesh of the domain that lie on Γ_D."""
        facets, tags = exterior_facets(self.domain, mesh)
        return facets if self.dirichlet_tags is None else facets[self.is_dirichlet(tags)]

    def dirichlet_bcs(self, space: dolfinx.fem.FunctionSpace) -> list[dolfinx.fem.DirichletBC]:
        """One DirichletBC per group on Γ_D of the space's mesh (collective on its mesh)."""
        mesh = space.mesh
        facets, tags = exterior_facets(self.domain, mesh)
        tdim = mesh.topology.dim
        bcs = []
        for group, value in self.dirichlet:
            chosen = facets if group is None else facets[np.isin(tags, group)]
            dofs = dolfinx.fem.locate_dofs_topological(space, tdim - 1, chosen)
            bcs.append(dolfinx.fem.dirichletbc(self._fe_function(value, space), dofs))
        return bcs

    @staticmethod
    def _fe_function(value: Any, space: dolfinx.fem.FunctionSpace) -> dolfinx.fem.Function:
        function = dolfinx.fem.Function(space, name="g")
        if isinstance(value, dolfinx.fem.Function):
            if value.function_space.mesh is space.mesh:
                function.interpolate(value)
            else:
                mesh = space.mesh
                index_map = mesh.topology.index_map(mesh.topology.dim)
                cells = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
                data = dolfinx.fem.create_interpolation_data(
                    space, value.function_space, cells, padding=1e-10
                )
                function.interpolate_nonmatching(value, cells, data)
            return function
        if isinstance(value, float):
            function.x.array[:] = value
            return function
        x = ufl.SpatialCoordinate(space.mesh)
        expression = _evaluate(value, x, "ufl")
        points = space.element.interpolation_points
        # A definition that does not use x (a constant) has no domain to take the
        # communicator from.
        function.interpolate(dolfinx.fem.Expression(expression, points, comm=space.mesh.comm))
        return function

    def neumann_form(self, v: Any, metadata: dict[str, Any] | None = None) -> ufl.Form | None:
        """``Σ_N ∫_{Γ_N} h v ds`` on the test function's mesh, or None without Neumann data."""
        if not self.neumann:
            return None
        mesh = v.ufl_function_space().mesh
        tags = self.domain.facet_meshtags(mesh)  # type: ignore[union-attr]
        ds = ufl.Measure("ds", domain=mesh, subdomain_data=tags, metadata=metadata or {})
        x = ufl.SpatialCoordinate(mesh)
        form = None
        for group, value in self.neumann:
            term = sum(_evaluate(value, x, "ufl") * v * ds(int(tag)) for tag in group)
            form = term if form is None else form + term
        return form

    def __repr__(self) -> str:
        return (
            f"BoundaryData(dirichlet on {self.dirichlet_tags or 'the whole boundary'}, "
            f"neumann on {list(self.neumann_tags)})"
        )
