"""Mesh domains, boundary data and 3D (issue 16): serially and under ``mpirun -n 2``.

The domains: an L-shape (``[-1, 1]² \\ (0, 1]²``, a dolfinx submesh, so no ``gmsh`` needed), a
disk from gmsh (skipped without it) and the unit cube as a tetrahedral mesh. Each is checked
against its own mesh: collocation points inside, boundary points on the exterior facets, |Ω|
and |∂Ω| against ``assemble_scalar`` of ``1 dx``/``1 ds``, the potential distance zero on the
Dirichlet facets and positive inside. A manufactured solution with non-zero Dirichlet data and
a Neumann face, the HybridSolver on the same problem, and ``paper_3d`` end to end.
"""

from mpi4py import MPI  # isort: skip

import dolfinx
import dolfinx.fem
import dolfinx.geometry
import dolfinx.mesh
import numpy as np
import pytest
import torch
import ufl

import dolfinx_pinn as dp
from dolfinx_pinn.boundary import _evaluate
from dolfinx_pinn.boundary_value import DirichletNet, hard_boundary_network
from dolfinx_pinn.coarse import CollocationPoints
from dolfinx_pinn.networks import HardBoundaryNet
from dolfinx_pinn.reference import solve_fine

COMM = MPI.COMM_WORLD
DIRICHLET, NEUMANN = 1, 2


# -- meshes ----------------------------------------------------------------------------------------
def lshape_mesh(comm: MPI.Comm, n: int = 8) -> tuple[dolfinx.mesh.Mesh, dolfinx.mesh.MeshTags]:
    """``[-1, 1]²`` without the quadrant ``(0, 1]²`` (a submesh); the face x = -1 tagged 2."""
    square = dolfinx.mesh.create_rectangle(comm, [[-1.0, -1.0], [1.0, 1.0]], [n, n])
    keep = dolfinx.mesh.locate_entities(square, 2, lambda x: ~((x[0] > 0.0) & (x[1] > 0.0)))
    mesh = dolfinx.mesh.create_submesh(square, 2, keep)[0]
    return mesh, _tag_faces(mesh, lambda x: np.isclose(x[0], -1.0))


def cube_mesh(comm: MPI.Comm, n: int = 3) -> tuple[dolfinx.mesh.Mesh, dolfinx.mesh.MeshTags]:
    """The unit cube of tetrahedra; the face x = 0 tagged 2, the others 1."""
    mesh = dolfinx.mesh.create_unit_cube(comm, n, n, n)
    return mesh, _tag_faces(mesh, lambda x: np.isclose(x[0], 0.0))


def _tag_faces(mesh: dolfinx.mesh.Mesh, neumann) -> dolfinx.mesh.MeshTags:
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
    midpoints = dolfinx.mesh.compute_midpoints(mesh, tdim - 1, facets).T
    values = np.where(neumann(midpoints), NEUMANN, DIRICHLET).astype(np.int32)
    return dolfinx.mesh.meshtags(mesh, tdim - 1, facets, values)


def disk_mesh(comm: MPI.Comm, h: float = 0.2) -> tuple[dolfinx.mesh.Mesh, dolfinx.mesh.MeshTags]:
    """The unit disk from gmsh: the upper arc tagged 1, the lower arc 2."""
    gmsh = pytest.importorskip("gmsh")
    import dolfinx.io.gmsh

    if not gmsh.isInitialized():
        gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.model.add("disk")
    if comm.rank == 0:
        geo = gmsh.model.geo
        centre = geo.addPoint(0.0, 0.0, 0.0, h)
        ends = [geo.addPoint(np.cos(a), np.sin(a), 0.0, h) for a in np.arange(4) * np.pi / 2]
        arcs = [geo.addCircleArc(ends[k], centre, ends[(k + 1) % 4]) for k in range(4)]
        surface = geo.addPlaneSurface([geo.addCurveLoop(arcs)])
        geo.synchronize()
        gmsh.model.addPhysicalGroup(2, [surface], 1)
        gmsh.model.addPhysicalGroup(1, arcs[:2], DIRICHLET)  # y >= 0
        gmsh.model.addPhysicalGroup(1, arcs[2:], NEUMANN)  # y <= 0
        gmsh.model.mesh.generate(2)
    data = dolfinx.io.gmsh.model_to_mesh(gmsh.model, comm, 0, gdim=2)
    gmsh.model.remove()
    return data.mesh, data.facet_tags


@pytest.fixture(scope="module")
def lshape() -> dp.MeshDomain:
    return dp.MeshDomain(*lshape_mesh(COMM), name="lshape")


@pytest.fixture(scope="module")
def disk() -> dp.MeshDomain:
    return dp.MeshDomain(*disk_mesh(COMM), name="disk")


@pytest.fixture(params=["lshape", "disk"])
def domain(request: pytest.FixtureRequest) -> dp.MeshDomain:
    return request.getfixturevalue(request.param)


def _integral(mesh: dolfinx.mesh.Mesh, form) -> float:
    value = dolfinx.fem.assemble_scalar(dolfinx.fem.form(form))
    return float(mesh.comm.allreduce(value, op=MPI.SUM))


def _gather(points: np.ndarray) -> np.ndarray:
    parts = COMM.allgather(np.asarray(points))
    return np.concatenate(parts)


# -- geometry --------------------------------------------------------------------------------------
def test_measures_match_the_mesh_integrals(domain: dp.MeshDomain) -> None:
    mesh = domain.mesh
    one = dolfinx.fem.Constant(mesh, 1.0)
    volume = _integral(mesh, one * ufl.dx(domain=mesh))
    area = _integral(mesh, one * ufl.ds(domain=mesh))
    assert abs(domain.measure - volume) <= 1e-12 * volume
    assert abs(domain.boundary_measure - area) <= 1e-12 * area
    # The replicated facets (every rank holds all of them) add up to the same |∂Ω|.
    assert abs(domain.facets.measures.sum() - area) <= 1e-12 * area
    tags = domain.facet_meshtags(mesh)
    ds = ufl.Measure("ds", domain=mesh, subdomain_data=tags)
    neumann = _integral(mesh, one * ds(NEUMANN))
    assert abs(domain.tag_measure([NEUMANN]) - neumann) <= 1e-12 * area
    if domain.name == "lshape":
        assert domain.measure == pytest.approx(3.0, abs=1e-12)
        assert domain.boundary_measure == pytest.approx(8.0, abs=1e-12)
        assert neumann == pytest.approx(2.0, abs=1e-12)


def test_collocation_points_inside_and_on_the_facets(domain: dp.MeshDomain) -> None:
    mesh = domain.mesh
    points = CollocationPoints(mesh, count=1000, boundary_count=300, seed=3, cell_keys="geometry")
    assert points.measure == pytest.approx(domain.measure, rel=1e-12)
    assert points.boundary_measure == pytest.approx(domain.boundary_measure, rel=1e-12)
    interior, boundary = points.interior, points.boundary
    # Each interior point lies in the (owned) cell it was drawn in.
    tdim = mesh.topology.dim
    padded = np.zeros((len(interior), 3))
    padded[:, :tdim] = interior
    tree = dolfinx.geometry.bb_tree(mesh, tdim)
    colliding = dolfinx.geometry.compute_colliding_cells(
        mesh, dolfinx.geometry.compute_collisions_points(tree, padded), padded
    )
    assert np.all(np.diff(colliding.offsets) > 0)
    assert np.all(domain.contains(interior))
    assert np.all(domain.boundary_distance(interior) > 0.0)
    # Boundary points on the exterior facets (the union of all ranks' facets).
    assert len(boundary) == 0 or domain.boundary_distance(boundary).max() < 1e-12
    # The same for the domain's own samplers (the same points on every rank).
    rng = np.random.default_rng(0)
    inside = domain.sample_interior(500, rng)
    on = domain.sample_boundary(200, rng)
    assert np.all(domain.contains(inside)) and domain.boundary_distance(on).max() < 1e-12
    if domain.name == "lshape":
        assert not np.any((interior[:, 0] > 0) & (interior[:, 1] > 0))
        assert not np.any((inside[:, 0] > 0) & (inside[:, 1] > 0))
        assert not np.any(domain.contains([[0.5, 0.5], [1.5, 0.0], [-0.5, 1.01]]))
    else:
        assert np.all(np.linalg.norm(inside, axis=1) < 1.0)
        assert not np.any(domain.contains([[0.8, 0.8], [0.0, 1.01]]))
    assert points.global_interior_count == pytest.approx(1000, rel=0.1)


def test_collocation_points_do_not_depend_on_the_partition() -> None:
    """A submesh has no input cell indices: the cells are seeded by their coordinates."""
    distributed = CollocationPoints(
        lshape_mesh(COMM)[0], count=600, boundary_count=100, seed=1, cell_keys="geometry"
    )
    serial = CollocationPoints(
        lshape_mesh(MPI.COMM_SELF)[0], count=600, boundary_count=100, seed=1, cell_keys="geometry"
    )
    for ours, theirs in (
        (distributed.interior, serial.interior),
        (distributed.boundary, serial.boundary),
    ):
        gathered = _gather(ours)
        gathered = gathered[np.lexsort(gathered.T[::-1])]
        reference = theirs[np.lexsort(theirs.T[::-1])]
        assert gathered.shape == reference.shape
        np.testing.assert_allclose(gathered, reference, rtol=0, atol=1e-14)


def test_distance_vanishes_on_the_dirichlet_facets(domain: dp.MeshDomain) -> None:
    rng = np.random.default_rng(1)
    dirichlet = domain.sample_boundary(300, rng, tags=[DIRICHLET])
    neumann = domain.sample_boundary(100, rng, tags=[NEUMANN])
    inside = domain.sample_interior(500, rng)
    phi = domain.potential_distance
    assert np.abs(phi(dirichlet, [DIRICHLET])).max() < 1e-11
    assert phi(inside, [DIRICHLET]).min() > 0.0
    assert phi(neumann, [DIRICHLET]).min() > 1e-3  # Neumann facets stay free
    assert np.abs(phi(np.concatenate([dirichlet, neumann]))).max() < 1e-11  # all of ∂Ω
    # First-order normalised: about the distance near a flat part of Γ_D, far from corners.
    if domain.name == "lshape":
        x = np.array([[-0.5, -1.0 + 1e-4], [0.5, -1.0 + 1e-3]])
        np.testing.assert_allclose(phi(x, [DIRICHLET]), [1e-4, 1e-3], rtol=0.05)
    # The problem's distance is this φ of Γ_D, with torch derivatives.
    problem = _manufactured_problem(domain)
    x = torch.tensor(inside[:50], requires_grad=True)
    value = problem.distance(x)
    (gradient,) = torch.autograd.grad(value.sum(), x)
    assert torch.all(value > 0) and torch.all(torch.isfinite(gradient))
    np.testing.assert_allclose(value.detach().numpy(), phi(inside[:50], [DIRICHLET]), rtol=1e-12)


# -- boundary data: a manufactured solution ------------------------------------------------------
def exact(x, m):
    return m.sin(x[0]) * m.exp(0.5 * x[1]) + x[0] * x[1]


def _exact_gradient(x, m):
    e = m.exp(0.5 * x[1])
    return m.cos(x[0]) * e + x[1], 0.5 * m.sin(x[0]) * e + x[0]


def coefficient(x, m):
    return 1.0 + 0.25 * x[0] ** 2 + 0.1 * x[1]


def source(x, m):
    """q = -div(K ∇u) for the exact solution."""
    e = m.exp(0.5 * x[1])
    ux, uy = _exact_gradient(x, m)
    laplacian = -0.75 * m.sin(x[0]) * e
    return -(coefficient(x, m) * laplacian + 0.5 * x[0] * ux + 0.1 * uy)


def _flux(normal):
    def flux(x, m):
        ux, uy = _exact_gradient(x, m)
        return coefficient(x, m) * (normal[0] * ux + normal[1] * uy)

    return flux


def dirichlet_data(x, m):
    """g = u on the L-shape's boundary lines x, y in {-1, 0, 1}, but not u inside.

    The hard condition's extension G = g then differs from u, so the network has work to do.
    """
    return exact(x, m) + 3.0 * (1.0 - x[0] ** 2) * (1.0 - x[1] ** 2) * x[0] * x[1]


def _manufactured_problem(domain: dp.MeshDomain) -> dp.MultiscaleProblem:
    if domain.name == "lshape":
        dirichlet, neumann = dirichlet_data, _flux((-1.0, 0.0))  # the face x = -1
    else:
        # On the unit circle n = x: the flux (K ∇u)·x, as a definition of the point.
        def neumann(x, m):
            ux, uy = _exact_gradient(x, m)
            return coefficient(x, m) * (x[0] * ux + x[1] * uy)

        dirichlet = exact
    return dp.MultiscaleProblem(
        coefficient,
        source,
        0.5,
        domain=domain,
        dirichlet={DIRICHLET: dirichlet},
        neumann={NEUMANN: neumann},
        alpha=0.5,
        beta=1.5,
        effective_tensor=np.eye(2),  # the coarse tensor of the hybrid (see the hybrid test)
        name=f"manufactured_{domain.name}",
    )


def _relative_l2(uh: dolfinx.fem.Function) -> float:
    mesh = uh.function_space.mesh
    u = _evaluate(exact, ufl.SpatialCoordinate(mesh), "ufl")
    dx = ufl.dx(domain=mesh, metadata={"quadrature_degree": 8})
    error = _integral(mesh, (uh - u) ** 2 * dx)
    return float(np.sqrt(error / _integral(mesh, u**2 * dx)))


def test_manufactured_solution_fine_fem(domain: dp.MeshDomain) -> None:
    """Non-zero Dirichlet data and a Neumann face: the fine FE solve to rel L² ≤ 1e-5."""
    problem = _manufactured_problem(domain)
    assert not problem.is_lifted
    h = 0.125 if domain.name == "lshape" else 0.1
    fine = domain.refined_mesh(h)  # dolfinx.mesh.refine keeps the (polygonal) boundary
    uh = solve_fine(problem, degree=2, mesh=fine)
    error = _relative_l2(uh)
    # Measured: 2.0e-6 on the L-shape (1536 cells, P2). On the gmsh disk the Neumann data are
    # those of the circle on its polygon: the geometry error bounds what the mesh can give.
    assert error <= (1e-5 if domain.name == "lshape" else 1e-3), error


def test_boundary_data_are_checked(lshape: dp.MeshDomain) -> None:
    with pytest.raises(ValueError, match="tag 7"):
        dp.MultiscaleProblem(coefficient, source, 0.5, domain=lshape, dirichlet={7: 0.0})
    with pytest.raises(ValueError, match="also carry Dirichlet"):
        dp.MultiscaleProblem(
            coefficient, source, 0.5, domain=lshape, dirichlet={1: 0.0}, neumann={1: 0.0}
        )
    with pytest.raises(ValueError, match=r"measure 0|Dirichlet data"):
        dp.MultiscaleProblem(coefficient, source, 0.5, domain=lshape, neumann={2: 0.0})
    space = dolfinx.fem.functionspace(lshape.mesh, ("Lagrange", 1))
    g = dolfinx.fem.Function(space)
    problem = dp.MultiscaleProblem(coefficient, source, 0.5, domain=lshape, dirichlet={1: g})
    with pytest.raises(ValueError, match="Function"):
        DirichletNet(dp.MLP(2, 4, 1, seed=0), problem)


@pytest.mark.skip_in_parallel
def test_manufactured_solution_hybrid_soft(lshape: dp.MeshDomain) -> None:
    """The same problem by the HybridSolver: soft Dirichlet rows and the Neumann rows.

    Honest figure: the network side does not reach the FE side's 1e-5 in a test's time. The
    coarse tensor is fixed (``effective_tensor``, the identity; the coefficient is smooth, so
    nothing is to be upscaled) and the τ2 continuation removes the coupling's bias; the
    output-layer least squares over 128 slow features then leaves the rel L² at about 1e-3
    (measured 1.1e-3 after 3 steps, 2000 points; Gauss-Newton on an MLP 2x24 gives the same
    after 30 steps).
    """
    problem = _manufactured_problem(lshape)
    reference = solve_fine(problem, degree=2, mesh=lshape.refined_mesh(0.125))
    network = dp.TwoScaleNet(2, 0.5, k_max=0, width=128, domain=lshape, seed=0)
    with dp.HybridSolver(problem, network, n_interior=2000, reference=reference) as solver:
        solver.train("projection", 4, tau2_schedule="continuation")
        l2, h1 = solver.relative_errors()
        assert float(solver.upscaled_coefficient()) == pytest.approx(1.0)
    assert l2 <= 3e-3 and h1 <= 2e-2, (l2, h1)


def test_hard_dirichlet_condition_on_a_mesh(lshape: dp.MeshDomain) -> None:
    """``v = G + φ N`` is g on Γ_D exactly, free on the Neumann face; the solver runs with it."""
    problem = _manufactured_problem(lshape)
    network = hard_boundary_network(dp.MLP(2, 8, 1, seed=0), problem)
    assert isinstance(network, DirichletNet)
    rng = np.random.default_rng(2)
    on = lshape.sample_boundary(200, rng, tags=[DIRICHLET])
    g = _evaluate(dirichlet_data, on, "numpy")
    with torch.no_grad():
        values = network(torch.tensor(on)).numpy()
    np.testing.assert_allclose(values, g, rtol=0, atol=1e-10)
    # Its jet agrees with autograd (the residual's "auto" method takes the jet).
    x = torch.tensor(lshape.sample_interior(20, rng), requires_grad=True)
    value, gradient, laplacian = network.jet(x.detach())
    auto = network(x)
    (grad,) = torch.autograd.grad(auto.sum(), x, create_graph=True)
    lap = sum(
        torch.autograd.grad(grad[:, j].sum(), x, retain_graph=True)[0][:, j] for j in range(2)
    )
    torch.testing.assert_close(value, auto.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, grad.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(laplacian, lap.detach(), rtol=1e-7, atol=1e-7)
    with dp.HybridSolver(problem, network, n_interior=300) as solver:
        assert solver.points.global_boundary_count > 0  # Neumann rows
        history = solver.train("gauss_newton", 2)
    assert np.isfinite(history["loss"][-1]) and "neumann" in history


# -- 3D --------------------------------------------------------------------------------------------
def test_paper_3d_end_to_end() -> None:
    """paper_3d at a coarse size through the HybridSolver, against a coarse fine FE solve."""
    problem = dp.paper_3d(0.5)
    assert problem.dim == 3 and problem.alpha >= 1.0 - 1e-12 and problem.beta <= 7.0 + 1e-12
    reference = solve_fine(problem, n=8, degree=1)
    network = HardBoundaryNet(
        dp.TwoScaleNet.for_problem(problem, k_max=0, width=24, seed=0), problem
    )
    with dp.HybridSolver(
        problem, network, coarse_h=0.5, n_interior=600, reference=reference
    ) as solver:
        history = solver.train("projection", 2, tau2_schedule="continuation")
        K = float(solver.upscaled_coefficient().detach())
        l2, _ = solver.relative_errors()
    assert 1.0 <= K <= 7.0 and np.isfinite(history["loss"][-1])
    assert l2 < 0.5, l2  # a coarse check: 8³ P1 reference, 600 points, 2 steps


def test_3d_mesh_domain_with_boundary_data() -> None:
    """A tetrahedral cube as a mesh domain: measures, φ on the faces, a linear solution exact."""
    domain = dp.MeshDomain(*cube_mesh(COMM), name="cube")
    assert domain.measure == pytest.approx(1.0, abs=1e-12)
    assert domain.boundary_measure == pytest.approx(6.0, abs=1e-12)
    rng = np.random.default_rng(4)
    on = domain.sample_boundary(200, rng, tags=[DIRICHLET])
    assert np.abs(domain.potential_distance(on, [DIRICHLET])).max() < 1e-11
    assert domain.potential_distance(domain.sample_interior(200, rng), [DIRICHLET]).min() > 0
    # u = 1 + x + 2y - z with K = 2: q = 0, the flux on x = 0 (n = -e_x) is -2.
    problem = dp.MultiscaleProblem(
        lambda x, m: 2.0 + 0.0 * x[0],
        lambda x, m: 0.0 * x[0],
        0.5,
        domain=domain,
        dirichlet={DIRICHLET: lambda x, m: 1.0 + x[0] + 2.0 * x[1] - x[2]},
        neumann={NEUMANN: -2.0},
        alpha=2.0,
        beta=2.0,
    )
    uh = solve_fine(problem, degree=1, mesh=domain.mesh)
    x = uh.function_space.tabulate_dof_coordinates()
    np.testing.assert_allclose(uh.x.array, 1.0 + x[:, 0] + 2.0 * x[:, 1] - x[:, 2], atol=1e-10)


@pytest.mark.parametrize("g", [2.0, lambda x, m: 1.0 + x[0] - 2.0 * x[1]])
def test_hard_condition_with_constant_or_linear_data(lshape: dp.MeshDomain, g) -> None:
    """A constant or linear G has no second derivatives to differentiate: its jet is zero there."""
    problem = dp.MultiscaleProblem(coefficient, source, 0.5, domain=lshape, dirichlet={1: g})
    network = DirichletNet(dp.MLP(2, 4, 1, seed=0), problem)
    x = torch.tensor(lshape.sample_interior(10, np.random.default_rng(5)))
    value, _, laplacian = network.jet(x)
    assert torch.all(torch.isfinite(value)) and torch.all(torch.isfinite(laplacian))
    with torch.no_grad():
        torch.testing.assert_close(value, network(x), rtol=1e-12, atol=1e-12)


def test_constant_dirichlet_data_in_the_fine_solve(lshape: dp.MeshDomain) -> None:
    """A number as Dirichlet data (no x in it): the FE function is that constant.

    Regression: ``dolfinx.fem.Expression`` of a UFL constant has no domain to take the
    communicator from and raised "Could not extract MPI communicator for Expression".
    """
    problem = dp.MultiscaleProblem(
        lambda x, m: 1.0 + 0.0 * x[0], lambda x, m: 1.0 + 0.0 * x[0], 0.5, domain=lshape,
        dirichlet={DIRICHLET: 2.0}, neumann={NEUMANN: 0.0}, alpha=1.0, beta=1.0,
    )  # fmt: skip
    uh = solve_fine(problem, degree=1, mesh=lshape.mesh)
    space = uh.function_space
    facets = problem.boundary.dirichlet_facets(lshape.mesh)
    dofs = dolfinx.fem.locate_dofs_topological(space, 1, facets)
    np.testing.assert_allclose(uh.x.array[dofs], 2.0, atol=1e-12)
    # A positive source: u >= g inside (maximum principle).
    assert COMM.allreduce(float(uh.x.array.min()), op=MPI.MIN) >= 2.0 - 1e-12


# -- the boundary indicator with boundary data ----------------------------------------------------
class _Shifted(torch.nn.Module):
    """``u + shift`` for a definition u (a network that is exact up to a constant)."""

    def __init__(self, u, shift: float) -> None:
        super().__init__()
        self.u = u
        self.shift = torch.nn.Parameter(torch.tensor(shift, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _evaluate(self.u, x, "torch") + self.shift


def test_boundary_indicator_measures_the_dirichlet_misfit(domain: dp.MeshDomain) -> None:
    """``boundary_residual`` is ‖v - g‖ on Γ_D, not ‖v‖ on ∂Ω (which flags exact solutions)."""
    from dolfinx_pinn.diagnostics import indicators

    problem = _manufactured_problem(domain)
    assert indicators(_Shifted(exact, 0.0), problem, comm=COMM)["boundary_residual"] < 1e-13
    shift = 1e-2
    measured = indicators(_Shifted(exact, shift), problem, comm=COMM)["boundary_residual"]
    inside = torch.as_tensor(domain.sample_interior(20_000, np.random.default_rng(9)))
    scale = float(torch.sqrt(((_evaluate(exact, inside, "torch") + shift) ** 2).mean()))
    assert measured == pytest.approx(shift / scale, rel=0.05)


def test_boundary_indicator_with_a_function_as_data(lshape: dp.MeshDomain) -> None:
    """Dirichlet data as a (distributed) Function: each rank evaluates the points it holds."""
    from dolfinx_pinn.diagnostics import indicators

    def polynomial(x, m):
        return 1.0 + x[0] * x[1] + 0.0 * x[0]

    space = dolfinx.fem.functionspace(lshape.mesh, ("Lagrange", 2))
    g = dolfinx.fem.Function(space)
    g.interpolate(lambda x: 1.0 + x[0] * x[1])  # exact in P2
    problem = dp.MultiscaleProblem(
        coefficient, source, 0.5, domain=lshape, dirichlet={DIRICHLET: g}, neumann={NEUMANN: 0.0}
    )
    values = indicators(_Shifted(polynomial, 0.0), problem, comm=COMM)
    assert values["boundary_residual"] < 1e-12
    assert COMM.allgather(values["boundary_residual"]) == [values["boundary_residual"]] * COMM.size
