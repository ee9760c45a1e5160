# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Your own geometry: a composite plate with two holes and a notch
#
# A FEniCS user's problem: a part meshed with gmsh, a heat source and boundary conditions of
# their own. The plate $\Omega = (0, 1)\times(0, 0.6)$ without two holes of radius $0.1$ and a
# rectangular notch cut into its upper edge is made of the composite of Hintermüller & Korolev's
# 2D experiment (4.11), $K^\varepsilon = 3 + \sin(\pi x_1/\varepsilon) + \sin(2\pi x_2/\varepsilon)$
# at $\varepsilon = 0.05$:
#
# $$
# -\nabla\cdot(K^\varepsilon\nabla u) = q \text{ in } \Omega, \quad
# u = 0 \text{ on the left edge}, \quad u = x_2/2 \text{ on the right edge}, \quad
# K^\varepsilon\nabla u\cdot n = 1 \text{ on the holes}, \quad
# K^\varepsilon\nabla u\cdot n = 0 \text{ elsewhere},
# $$
#
# with $q = 10\,e^{-50|x - (0.5, 0.2)|^2}$. The facets carry gmsh physical tags (1: left, 2:
# right, 3: holes, 4: the other edges and the notch), read by
# ``dolfinx.io.gmsh.model_to_mesh``; :class:`dolfinx_pinn.MeshDomain` and the ``dirichlet=`` /
# ``neumann=`` arguments of :class:`dolfinx_pinn.MultiscaleProblem` take them as they are, and
# ``dolfinx_pinn.solve`` chooses the configuration: in 2D the two-scale basis (Legendre slow
# functions times the cell correctors, with the log and multipole functions of each hole found
# from the mesh's boundary loops) in the interior, and a band of fine finite elements within
# 1.5 longest periods of the boundary, where the boundary layers of the holes, the notch and the
# corners are (:class:`dolfinx_pinn.bands.BoundaryBand`), the two coupled by overlapping
# Schwarz. The plate is only 10 x 12 periods across at ε = 0.05, so there the band is the whole
# plate and the solve is a fine finite-element solve (``metrics["boundary_band"]`` says so);
# the interior is the basis's from about ε = 0.02 on.
#
# The reference is a fine finite-element solve on the gmsh mesh refined by
# ``dolfinx.mesh.refine`` until it resolves $\varepsilon$ (P3, 8 cells per finest period), and
# beside it plain FEM (P1 and P2, CG + GAMG) on coarser refinements: its time to accuracy.
#
# Everything goes to ``out_composite_part/``: ``metrics.json``, ``composite_part.png`` and the
# fields (VTX when DOLFINx has ADIOS2, XDMF otherwise). ``--quick`` (or
# ``DOLFINX_PINN_DEMO_QUICK=1``): $\varepsilon = 0.2$, a coarser mesh, a smaller basis. In
# parallel: ``mpirun -n 2 python demos/demo_composite_part.py``.

# +
import argparse
import json
import os
import time
from pathlib import Path

from mpi4py import MPI

import dolfinx
import dolfinx.fem
import dolfinx.io
import dolfinx.io.gmsh
import gmsh
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.tri as mtri

import dolfinx_pinn as dp

parser = argparse.ArgumentParser(description="a gmsh plate with holes and a notch")
parser.add_argument("--quick", action="store_true", help="a smoke run")
parser.add_argument("--eps", type=float, default=None, help="override ε")
parser.add_argument("--out", default="out_composite_part", help="output folder")
args, _ = parser.parse_known_args()
quick = args.quick or os.environ.get("DOLFINX_PINN_DEMO_QUICK", "0") not in ("", "0")
comm = MPI.COMM_WORLD
torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.size))
out = Path(args.out)
if comm.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
comm.barrier()
started = time.perf_counter()
eps = args.eps or (0.2 if quick else 0.05)


def log(message: str) -> None:
    if comm.rank == 0:
        print(message, flush=True)


# -

# ## The geometry in gmsh
#
# OpenCASCADE cuts the holes and the notch out of the rectangle; the boundary curves are
# classified by where they lie and become physical groups. gmsh runs on rank 0 only and
# ``model_to_mesh`` distributes the mesh.

# +
LEFT, RIGHT, HOLES, INSULATED = 1, 2, 3, 4


def plate_mesh(h: float) -> tuple[dolfinx.mesh.Mesh, dolfinx.mesh.MeshTags]:
    """The plate (1 x 0.6) with two holes and a notch, cells of size about ``h``."""
    if not gmsh.isInitialized():
        gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.model.add("plate")
    if comm.rank == 0:
        occ = gmsh.model.occ
        body = occ.addRectangle(0.0, 0.0, 0.0, 1.0, 0.6)
        holes = [occ.addDisk(0.3, 0.3, 0.0, 0.1, 0.1), occ.addDisk(0.7, 0.3, 0.0, 0.1, 0.1)]
        notch = occ.addRectangle(0.45, 0.45, 0.0, 0.1, 0.2)
        part, _ = occ.cut([(2, body)], [(2, tag) for tag in [*holes, notch]])
        occ.synchronize()
        gmsh.model.addPhysicalGroup(2, [tag for _, tag in part], 1)
        groups: dict[int, list[int]] = {LEFT: [], RIGHT: [], HOLES: [], INSULATED: []}
        for _, curve in gmsh.model.getBoundary(part, oriented=False):
            centre = occ.getCenterOfMass(1, abs(curve))
            if abs(centre[0]) < 1e-9:
                groups[LEFT].append(abs(curve))
            elif abs(centre[0] - 1.0) < 1e-9:
                groups[RIGHT].append(abs(curve))
            elif gmsh.model.getType(1, abs(curve)) in ("Circle", "Ellipse"):
                groups[HOLES].append(abs(curve))
            else:
                groups[INSULATED].append(abs(curve))
        for tag, curves in groups.items():
            gmsh.model.addPhysicalGroup(1, curves, tag)
        gmsh.option.setNumber("Mesh.MeshSizeMax", h)
        gmsh.model.mesh.generate(2)
    data = dolfinx.io.gmsh.model_to_mesh(gmsh.model, comm, 0, gdim=2)
    gmsh.model.remove()
    return data.mesh, data.facet_tags


mesh, facet_tags = plate_mesh(0.15 if quick else 0.05)
domain = dp.MeshDomain(mesh, facet_tags, name="composite_plate")
log(repr(domain))
# -

# ## The problem: the paper's coefficient, a source and mixed boundary data

# +
coefficient = dp.paper_2d(eps).coefficient_definition  # 3 + sin(πx1/ε) + sin(2πx2/ε)


def source(x, m):
    return 10.0 * m.exp(-50.0 * ((x[0] - 0.5) ** 2 + (x[1] - 0.2) ** 2))


problem = dp.MultiscaleProblem(
    coefficient, source, eps, domain=domain, period=(2.0, 1.0), alpha=1.0, beta=5.0,
    dirichlet={LEFT: 0.0, RIGHT: lambda x, m: 0.5 * x[1]},
    neumann={HOLES: 1.0, INSULATED: 0.0},
    name="composite_plate",
)  # fmt: skip
log(repr(problem.boundary))
# -

# ## The fine FEM reference on the refined gmsh mesh
#
# ``dolfinx.mesh.refine`` bisects edges, so every refinement has exactly the gmsh mesh's
# (polygonal) boundary; the tags of the refined facets are those of the nearest facet of the
# original mesh.

# +
cells_per_period = 4 if quick else 8
degree = 2 if quick else 3
t0 = time.perf_counter()
fine_mesh = domain.refined_mesh(problem.finest_scale / cells_per_period)
reference = dp.solve_fine(problem, degree=degree, mesh=fine_mesh, solver="gamg")
reference_time = time.perf_counter() - t0
reference_dofs = reference.function_space.dofmap.index_map.size_global
log(f"reference: P{degree}, {reference_dofs} dofs, {reference_time:.1f} s")
# -

# ## ``dolfinx_pinn.solve``
#
# The default configuration; the quick run takes lower slow degrees. (The hybrid method is
# ``method="hybrid"``: on this plate it measured rel. L² 0.54 in 122 s; the basis without the
# band, ``boundary_band=0``, 7.4e-2.)

# +
overrides: dict = {}
if quick:
    overrides = {"basis": {"degrees": (12, 11, 10), "free_degrees": (6, 4), "hole_degree": 8}}
t0 = time.perf_counter()
solution = dp.solve(problem, reference=reference, device="cpu", **overrides)
solve_time = time.perf_counter() - t0
rel_l2, rel_h1 = solution.metrics["rel_l2"], solution.metrics["rel_h1"]
log(f"dolfinx_pinn.solve: rel L2 {rel_l2:.3e}, rel H1 {rel_h1:.3e}, {solve_time:.1f} s")
band = solution.metrics["boundary_band"]
if band is not None:
    share = f"{band['fraction_of_area']:.0%} of the plate"
    where = "the whole plate" if band["whole_domain"] else share
    log(f"boundary band: P{band['degree']}, {band['dofs']} dofs over {where}")
# -

# ## Plain FEM: time to accuracy
#
# P1 and P2 (CG + GAMG) on refinements of the gmsh mesh with 1, 2, 4 (quick: 1, 2) cells per
# finest period, each timed (mesh refinement, assembly and solve; the form compilation is
# cached by a first solve) and measured against the reference.

# +
dp.solve_fine(problem, degree=1, mesh=mesh, solver="gamg")  # JIT warm-up, not timed
fem_rows = []
for fem_degree in (1, 2):
    dp.solve_fine(problem, degree=fem_degree, mesh=mesh, solver="gamg")
    for per_period in (1, 2) if quick else (1, 2, 4):
        t0 = time.perf_counter()
        rung_mesh = domain.refined_mesh(problem.finest_scale / per_period)
        uh = dp.solve_fine(problem, degree=fem_degree, mesh=rung_mesh, solver="gamg")
        seconds = time.perf_counter() - t0
        l2, h1 = dp.relative_errors(uh, reference)
        row = {
            "degree": fem_degree,
            "cells_per_period": per_period,
            "dofs": uh.function_space.dofmap.index_map.size_global,
            "seconds": seconds,
            "rel_l2": l2,
            "rel_h1": h1,
        }
        fem_rows.append(row)
        log(f"FEM P{fem_degree}, {per_period} cells/period: rel L2 {l2:.3e}, H1 {h1:.3e}, "
            f"{seconds:.2f} s")  # fmt: skip
# -

# ## Fields and figures
#
# On a plot mesh (the gmsh mesh refined to 4 cells per finest period): the network solution,
# the reference interpolated onto it, and their difference.

# +
plot_mesh = domain.refined_mesh(problem.finest_scale / 4)
P1 = dolfinx.fem.functionspace(plot_mesh, ("Lagrange", 1))
network_field = dolfinx.fem.Function(P1, name="u_network")
coordinates = P1.tabulate_dof_coordinates()[:, :2]
network_field.x.array[:] = solution.value(coordinates)
reference_field = dolfinx.fem.Function(P1, name="u_reference")
index_map = plot_mesh.topology.index_map(2)
cells = np.arange(index_map.size_local + index_map.num_ghosts, dtype=np.int32)
data = dolfinx.fem.create_interpolation_data(P1, reference.function_space, cells, padding=1e-10)
reference_field.interpolate_nonmatching(reference, cells, data)
reference_field.x.scatter_forward()
error_field = dolfinx.fem.Function(P1, name="error")
error_field.x.array[:] = network_field.x.array - reference_field.x.array
fields = [network_field, reference_field, error_field]
if dolfinx.has_adios2:
    with dolfinx.io.VTXWriter(comm, out / "composite_part.bp", fields, engine="BP4") as writer:
        writer.write(0.0)
else:
    with dolfinx.io.XDMFFile(comm, out / "composite_part.xdmf", "w") as writer:
        writer.write_mesh(plot_mesh)
        for field in fields:
            writer.write_function(field)

# Gather the owned cells (as vertex coordinates) and the values on rank 0.
dofmap = P1.dofmap.list[: index_map.size_local]
gathered = comm.gather(
    (coordinates[dofmap].reshape(-1, 2), np.column_stack([f.x.array[dofmap].reshape(-1)
                                                          for f in fields])), root=0
)  # fmt: skip
if comm.rank == 0:
    xy = np.concatenate([g[0] for g in gathered])
    values = np.concatenate([g[1] for g in gathered])
    triangulation = mtri.Triangulation(xy[:, 0], xy[:, 1], np.arange(len(xy)).reshape(-1, 3))
    figure, axes = plt.subplots(3, 1, figsize=(7, 10))
    titles = ("dolfinx_pinn.solve", f"P{degree} reference", "network - reference")
    for k, (axis, title) in enumerate(zip(axes, titles, strict=True)):
        image = axis.tripcolor(triangulation, values[:, k], shading="gouraud", cmap="viridis")
        figure.colorbar(image, ax=axis)
        axis.set_title(title)
        axis.set_aspect("equal")
    figure.suptitle(f"composite plate, ε = {eps}: rel L² {rel_l2:.2e}, rel H¹ {rel_h1:.2e}")
    figure.tight_layout()
    figure.savefig(out / "composite_part.png", dpi=110)
    plt.close(figure)
# -

# ## Metrics

# +
metrics = {
    "quick": quick,
    "n_ranks": comm.size,
    "eps": eps,
    "domain": {"measure": domain.measure, "boundary_measure": domain.boundary_measure,
               "boundary_facets": len(domain.facets)},
    "reference": {"degree": degree, "cells_per_period": cells_per_period,
                  "dofs": reference_dofs, "seconds": reference_time},
    "pinn": {"rel_l2": rel_l2, "rel_h1": rel_h1, "seconds": solve_time,
             "wall_time_s": solution.metrics["wall_time_s"],
             "converged": solution.metrics["converged"], "K_tilde": solution.metrics["K_tilde"],
             "configuration": solution.metrics["configuration"],
             "boundary_band": solution.metrics["boundary_band"]},
    "fem": fem_rows,
    "wall_time_s": time.perf_counter() - started,
}  # fmt: skip
if comm.rank == 0:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(f"wrote {out / 'metrics.json'} in {metrics['wall_time_s']:.1f} s")
# -
