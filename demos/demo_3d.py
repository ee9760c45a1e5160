# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Three dimensions: the unit cube and a gmsh part with a cylindrical hole
#
# ``dolfinx_pinn.paper_3d(eps)`` is the 3D analogue of the 2D experiment (4.11) of Hintermüller
# & Korolev: on $\Omega = (0, 1)^3$ the lifted problem (4.8) with
#
# $$
# K^\varepsilon = 4 + \sin(\pi x_1/\varepsilon) + \sin(2\pi x_2/\varepsilon)
# + \sin(2\pi x_3/\varepsilon), \qquad q = 10\, e^{-100|x - 0.5|^2},
# $$
#
# at $\varepsilon = 0.1$, solved by ``dolfinx_pinn.solve`` (the unit cube is a box with a
# periodic coefficient: the two-scale basis and one least-squares solve) and measured against a
# P2 reference (CG + GAMG) with 6 cells per finest period. Beside it plain FEM (P1, P2) on
# coarser meshes, timed.
#
# Then the same coefficient on a part of the user's own: a box $(0, 1)\times(0, 1)\times(0,
# 0.5)$ with a cylindrical hole of radius $0.2$ along $x_3$, meshed by gmsh, $u = 0$ on the
# outer faces and insulated on the hole (the gmsh physical tags 1 and 2), solved by
# ``dolfinx_pinn.solve`` on a :class:`~dolfinx_pinn.MeshDomain` (the hybrid method, a hard
# Dirichlet condition built from the mesh) against a P2 reference on the refined gmsh mesh.
#
# Everything goes to ``out_3d/`` (``metrics.json``, ``box_3d.png``, ``part_3d.png``, fields as
# VTX or XDMF). ``--quick`` (or ``DOLFINX_PINN_DEMO_QUICK=1``): larger ε, fewer points and a
# small network; ``--skip-box`` or ``--skip-part`` run one of the two. In parallel:
# ``mpirun -n 2 python demos/demo_3d.py``.

# +
import argparse
import json
import os
import time
from pathlib import Path

from mpi4py import MPI

import dolfinx
import dolfinx.fem
import dolfinx.geometry
import dolfinx.io
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import dolfinx_pinn as dp
from dolfinx_pinn.boundary_value import hard_boundary_network
from dolfinx_pinn.reference import default_fine_resolution

parser = argparse.ArgumentParser(description="paper_3d on the unit cube and a gmsh part")
parser.add_argument("--quick", action="store_true", help="a smoke run")
parser.add_argument("--eps", type=float, default=None, help="override ε of the cube")
parser.add_argument("--skip-box", action="store_true", help="only the gmsh part")
parser.add_argument("--skip-part", action="store_true", help="only the unit cube")
parser.add_argument("--out", default="out_3d", help="output folder")
args, _ = parser.parse_known_args()
quick = args.quick or os.environ.get("DOLFINX_PINN_DEMO_QUICK", "0") not in ("", "0")
comm = MPI.COMM_WORLD
torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.size))
out = Path(args.out)
if comm.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
comm.barrier()
started = time.perf_counter()
metrics: dict = {"quick": quick, "n_ranks": comm.size}


def log(message: str) -> None:
    if comm.rank == 0:
        print(message, flush=True)


def write_field(function: dolfinx.fem.Function, name: str) -> None:
    """VTX when DOLFINx has ADIOS2, XDMF (P1) otherwise."""
    mesh = function.function_space.mesh
    if dolfinx.has_adios2:
        with dolfinx.io.VTXWriter(comm, out / f"{name}.bp", [function], engine="BP4") as writer:
            writer.write(0.0)
        return
    linear = dolfinx.fem.Function(dolfinx.fem.functionspace(mesh, ("Lagrange", 1)))
    linear.interpolate(function)
    linear.name = function.name
    with dolfinx.io.XDMFFile(comm, out / f"{name}.xdmf", "w") as writer:
        writer.write_mesh(mesh)
        writer.write_function(linear)


def slice_figure(solution: dp.Solution, reference: dolfinx.fem.Function, title: str, name: str):
    """The network and the reference on the plane x3 = 0.25 (a grid; collective)."""
    grid = np.linspace(0.0, 1.0, 121)
    X, Y = np.meshgrid(grid, grid)
    points = np.column_stack([X.ravel(), Y.ravel(), np.full(X.size, 0.25)])
    inside = solution.problem.domain.contains(points)
    network = np.where(inside, solution.value(points), np.nan)
    # The reference where this rank's cells hold the point, summed over the ranks.
    mesh = reference.function_space.mesh
    tree = dolfinx.geometry.bb_tree(mesh, 3)
    colliding = dolfinx.geometry.compute_colliding_cells(
        mesh, dolfinx.geometry.compute_collisions_points(tree, points), points
    )
    values, found = np.zeros(len(points)), np.zeros(len(points))
    for k in range(len(points)):
        links = colliding.links(k)
        if len(links) and inside[k]:
            values[k] = reference.eval(points[k], links[:1])[0]
            found[k] = 1.0
    values, found = comm.allreduce(values), comm.allreduce(found)
    values = np.where(found > 0, values / np.maximum(found, 1.0), np.nan)
    if comm.rank == 0:
        figure, axes = plt.subplots(1, 3, figsize=(13, 4))
        for axis, data, label in zip(
            axes, (network, values, network - values), ("solve", "P2 reference", "difference"),
            strict=True,
        ):  # fmt: skip
            image = axis.pcolormesh(X, Y, data.reshape(X.shape), shading="auto")
            figure.colorbar(image, ax=axis)
            axis.set_title(label)
            axis.set_aspect("equal")
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)


def fem_ladder(problem, meshes: list, reference) -> list[dict]:
    """Plain FEM (P1, P2, CG + GAMG) on ``(label, mesh builder)`` rungs, timed and measured."""
    rows = []
    for degree in (1, 2):
        dp.solve_fine(problem, degree=degree, mesh=meshes[0][1](), solver="gamg")  # JIT warm-up
        for label, build in meshes:
            t0 = time.perf_counter()
            uh = dp.solve_fine(problem, degree=degree, mesh=build(), solver="gamg")
            seconds = time.perf_counter() - t0
            l2, h1 = dp.relative_errors(uh, reference)
            dofs = uh.function_space.dofmap.index_map.size_global
            rows.append({"degree": degree, "mesh": label, "dofs": dofs, "seconds": seconds,
                         "rel_l2": l2, "rel_h1": h1})  # fmt: skip
            log(f"  FEM P{degree} {label}: {dofs} dofs, rel L2 {l2:.3e}, H1 {h1:.3e}, "
                f"{seconds:.2f} s")  # fmt: skip
    return rows


# -

# ## The unit cube
#
# The reference: P2 with 6 cells per finest period along each axis (the fast variable has the
# period vector (2, 1, 1), so 30 x 60 x 60 hexahedra split into tetrahedra at ε = 0.1, about
# 9·10^5 dofs), CG + GAMG.

# +
if not args.skip_box:
    eps = args.eps or (0.5 if quick else 0.1)
    problem = dp.paper_3d(eps)
    per_period = 3 if quick else 6
    t0 = time.perf_counter()
    reference = dp.solve_fine(problem, degree=2, solver="gamg", elements_per_period=per_period)
    reference_time = time.perf_counter() - t0
    reference_dofs = reference.function_space.dofmap.index_map.size_global
    log(f"cube, ε = {eps}: reference P2, {reference_dofs} dofs, {reference_time:.1f} s")
    overrides = {"basis": {"degrees": (6, 4, 2)}} if quick else {}
    t0 = time.perf_counter()
    solution = dp.solve(problem, reference=reference, device="cpu", **overrides)
    solve_time = time.perf_counter() - t0
    rel_l2, rel_h1 = solution.metrics["rel_l2"], solution.metrics["rel_h1"]
    log(f"  dolfinx_pinn.solve: rel L2 {rel_l2:.3e}, rel H1 {rel_h1:.3e}, {solve_time:.1f} s")
    rungs = [
        (f"{n} cells/period",
         lambda n=n: problem.create_mesh(comm, default_fine_resolution(problem, 2, n)))
        for n in ((1, 2) if quick else (1, 2, 3))
    ]  # fmt: skip
    fem_rows = fem_ladder(problem, rungs, reference)
    reference.name = "u_reference"
    write_field(reference, "box_reference")
    slice_figure(
        solution, reference, f"paper_3d, ε = {eps}, x3 = 0.25: rel L² {rel_l2:.2e}", "box_3d.png"
    )
    metrics["box"] = {
        "eps": eps,
        "reference": {"degree": 2, "cells_per_period": per_period, "dofs": reference_dofs,
                      "seconds": reference_time},
        "pinn": {"rel_l2": rel_l2, "rel_h1": rel_h1, "seconds": solve_time,
                 "method": solution.metrics["configuration"]["method"],
                 "unknowns": solution.metrics.get("unknowns"),
                 "converged": solution.metrics["converged"]},
        "fem": fem_rows,
    }  # fmt: skip
# -

# ## A gmsh part: a box with a cylindrical hole
#
# OpenCASCADE cuts the cylinder out of the box; the hole's surface is tagged 2 (insulated),
# the outer faces 1 ($u = 0$). The same ``paper_3d`` coefficient (``domain=``) with the source
# moved off the hole.

# +
OUTER, HOLE = 1, 2


def part_mesh(h: float):
    """The box (1 x 1 x 0.5) with a cylindrical hole (radius 0.2, axis (0.5, 0.5, x3))."""
    import dolfinx.io.gmsh
    import gmsh

    if not gmsh.isInitialized():
        gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.model.add("part")
    if comm.rank == 0:
        occ = gmsh.model.occ
        box = occ.addBox(0.0, 0.0, 0.0, 1.0, 1.0, 0.5)
        cylinder = occ.addCylinder(0.5, 0.5, 0.0, 0.0, 0.0, 0.5, 0.2)
        part, _ = occ.cut([(3, box)], [(3, cylinder)])
        occ.synchronize()
        gmsh.model.addPhysicalGroup(3, [tag for _, tag in part], 1)
        outer, hole = [], []
        for _, surface in gmsh.model.getBoundary(part, oriented=False):
            kind = gmsh.model.getType(2, abs(surface))
            (hole if kind == "Cylinder" else outer).append(abs(surface))
        gmsh.model.addPhysicalGroup(2, outer, OUTER)
        gmsh.model.addPhysicalGroup(2, hole, HOLE)
        gmsh.option.setNumber("Mesh.MeshSizeMax", h)
        gmsh.model.mesh.generate(3)
    data = dolfinx.io.gmsh.model_to_mesh(gmsh.model, comm, 0, gdim=3)
    gmsh.model.remove()
    return data.mesh, data.facet_tags


if not args.skip_part:
    part_eps = 0.5 if quick else 0.2
    mesh, facet_tags = part_mesh(0.25 if quick else 0.1)
    domain = dp.MeshDomain(mesh, facet_tags, name="box_with_hole")
    log(repr(domain))
    base = dp.paper_3d(part_eps)

    def source(x, m):
        return 10.0 * m.exp(-50.0 * ((x[0] - 0.2) ** 2 + (x[1] - 0.2) ** 2 + (x[2] - 0.25) ** 2))

    part = dp.MultiscaleProblem(
        base.coefficient_definition, source, part_eps, domain=domain, period=(2.0, 1.0, 1.0),
        alpha=1.0, beta=7.0, dirichlet={OUTER: 0.0}, neumann={HOLE: 0.0}, name="box_with_hole",
    )  # fmt: skip
    cells_per_period = 3 if quick else 4
    t0 = time.perf_counter()
    part_reference = dp.solve_fine(
        part, degree=2, mesh=domain.refined_mesh(part.finest_scale / cells_per_period),
        solver="gamg",
    )  # fmt: skip
    part_reference_time = time.perf_counter() - t0
    part_dofs = part_reference.function_space.dofmap.index_map.size_global
    log(f"part, ε = {part_eps}: reference P2, {part_dofs} dofs, {part_reference_time:.1f} s")
    k_max, width, points = (1, 8, 1500) if quick else (2, 32, 8000)
    t0 = time.perf_counter()
    part_solution = dp.solve(
        part, reference=part_reference, device="cpu", n_interior=points,
        network=lambda p: hard_boundary_network(
            dp.TwoScaleNet.for_problem(p, k_max=k_max, width=width, wavevector_norm="l1"), p
        ),
    )  # fmt: skip
    part_time = time.perf_counter() - t0
    part_l2, part_h1 = part_solution.metrics["rel_l2"], part_solution.metrics["rel_h1"]
    log(f"  dolfinx_pinn.solve: rel L2 {part_l2:.3e}, rel H1 {part_h1:.3e}, {part_time:.1f} s")
    part_rungs = [
        (f"h = {h}", lambda h=h: domain.refined_mesh(h)) for h in (0.25, 0.125) if quick is False
    ] or [("gmsh mesh", lambda: mesh)]
    part_fem = fem_ladder(part, part_rungs, part_reference)
    part_reference.name = "u_reference"
    write_field(part_reference, "part_reference")
    slice_figure(
        part_solution, part_reference,
        f"box with a hole, ε = {part_eps}, x3 = 0.25: rel L² {part_l2:.2e}", "part_3d.png",
    )  # fmt: skip
    metrics["part"] = {
        "eps": part_eps,
        "domain": {"measure": domain.measure, "boundary_measure": domain.boundary_measure,
                   "boundary_facets": len(domain.facets)},
        "reference": {"degree": 2, "cells_per_period": cells_per_period, "dofs": part_dofs,
                      "seconds": part_reference_time},
        "pinn": {"rel_l2": part_l2, "rel_h1": part_h1, "seconds": part_time,
                 "method": part_solution.metrics["configuration"]["method"],
                 "converged": part_solution.metrics["converged"]},
        "fem": part_fem,
    }  # fmt: skip
# -

# ## Metrics

# +
metrics["wall_time_s"] = time.perf_counter() - started
if comm.rank == 0:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(f"wrote {out / 'metrics.json'} in {metrics['wall_time_s']:.1f} s")
# -
