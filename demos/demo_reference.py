# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Fine-scale reference solutions and the upscaled coefficient
#
# Every number `dolfinx_pinn` publishes (the error of a network, an upscaled coefficient, a
# speed-up) is measured against a fine-scale reference. This demo computes those references for
# the test problems of Hintermüller & Korolev and checks them against closed forms:
#
# 1. the 1D problem (4.29), ``-(K u')' = q + K'`` with ``K = 2 + sin(2 pi x / eps)``, for
#    ``eps = 1/15`` and ``eps = 0.01``, solved with P1 elements on the paper's meshes
#    (``h = 5e-4`` and ``h = 2e-4``), against the exact solution (5.3) of Hoang & Schwab;
# 2. the upscaled coefficient (4.10) ``K~[u] = int K (u' + 1) dx``, which tends to the
#    homogenised ``K* = sqrt(3)`` (the paper reports 1.732);
# 3. the 2D problem (4.11), ``K = 3 + sin(pi x1/eps) + sin(2 pi x2/eps)``, ``eps = 0.1``,
#    with P2 elements, and its full upscaled tensor by Algorithm 4.1.
#
# Results go to ``out_reference/``: the fields (VTX with ADIOS2, else XDMF) for ParaView, PNG
# plots and ``metrics.json``. Run it with
#
# ```bash
# python demos/demo_reference.py            # about half a minute on two cores
# mpirun -n 2 python demos/demo_reference.py
# python demos/demo_reference.py --quick    # a smoke run on coarser meshes
# ```

# +
import argparse
import json
import os
import time
from pathlib import Path

from mpi4py import MPI

import dolfinx
import matplotlib
import numpy as np
import pyvista

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dolfinx_pinn.problems import paper_1d, paper_2d
from dolfinx_pinn.reference import (
    default_fine_resolution,
    exact_1d,
    relative_errors,
    solve_fine,
    solve_fine_directions,
    upscaled_coefficient,
    upscaled_tensor,
)

parser = argparse.ArgumentParser(description="Fine-scale references and the upscaled coefficient")
parser.add_argument("--quick", action="store_true", help="a smoke run on coarser meshes")
parser.add_argument("--out", default="out_reference", help="output folder")
args, _ = parser.parse_known_args()
quick = args.quick or os.environ.get("DOLFINX_PINN_DEMO_QUICK", "0") not in ("", "0")
comm = MPI.COMM_WORLD
out = Path(args.out)
if comm.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
comm.barrier()
pyvista.OFF_SCREEN = True
metrics: dict = {"quick": quick, "n_ranks": comm.size}
started = time.perf_counter()
# -

# A small helper writes a field for ParaView: VTX (ADIOS2) when DOLFINx has it, XDMF otherwise
# (XDMF stores the mesh's own degree, so a higher-order field is interpolated to P1 there).


def write_field(function: dolfinx.fem.Function, name: str) -> Path:
    """Write ``function`` to ``out/name.bp`` (VTX) or ``out/name.xdmf``."""
    if dolfinx.has_adios2:
        from dolfinx.io import VTXWriter

        path = out / f"{name}.bp"
        with VTXWriter(comm, path, [function], engine="BP4") as writer:
            writer.write(0.0)
        return path
    from dolfinx.io import XDMFFile

    mesh = function.function_space.mesh
    linear = dolfinx.fem.Function(dolfinx.fem.functionspace(mesh, ("Lagrange", 1)))
    linear.interpolate(function)
    linear.name = function.name
    path = out / f"{name}.xdmf"
    with XDMFFile(comm, path, "w") as xdmf:
        xdmf.write_mesh(mesh)
        xdmf.write_function(linear)
    return path


def gather_owned(function: dolfinx.fem.Function) -> tuple[np.ndarray, np.ndarray] | None:
    """Coordinates and values of the owned dofs of every rank, on rank 0 (None elsewhere)."""
    V = function.function_space
    owned = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
    coordinates = V.tabulate_dof_coordinates()[:owned]
    values = function.x.array[:owned].real
    gathered = comm.gather((coordinates, values), root=0)
    if comm.rank != 0:
        return None
    return (
        np.concatenate([c for c, _ in gathered]),
        np.concatenate([v for _, v in gathered]),
    )


# ## 1. The 1D problem against the closed form
#
# The fine problem (4.8) is lifted: ``w = u + x`` solves ``-(K w')' = q`` with ``w(0) = 0``,
# ``w(1) = 1``, and ``u`` has homogeneous Dirichlet conditions. Its exact solution is
# ``u' = (c - Q)/K - 1`` with ``Q = int_0^x q`` and ``c`` fixed by ``u(1) = 0``;
# {py:func}`dolfinx_pinn.reference.exact_1d` evaluates it by composite Gauss quadrature that
# resolves every oscillation, to round-off.

# +
figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for axis, (eps, h, key) in zip(axes, [(1 / 15, 5e-4, "1_15"), (0.01, 2e-4, "0_01")], strict=True):
    problem = paper_1d(eps)
    exact = exact_1d(problem)
    n = default_fine_resolution(problem)[0] if quick else round(1.0 / h)
    uh = solve_fine(problem, n=n)
    K_tilde = upscaled_coefficient(problem, uh)
    l2, h1 = relative_errors(uh, exact)
    metrics[f"K_tilde_1d_eps_{key}"] = K_tilde
    metrics[f"K_tilde_1d_eps_{key}_exact"] = exact.K_tilde
    metrics[f"rel_l2_1d_eps_{key}"] = l2
    metrics[f"rel_h1_1d_eps_{key}"] = h1
    metrics[f"cells_1d_eps_{key}"] = n
    if comm.rank == 0:
        print(
            f"1D eps = {eps:.4g}: {n} cells, K~[u_h] = {K_tilde:.6f} "
            f"(exact K~[u] = {exact.K_tilde:.8f}, K* = {np.sqrt(3):.6f}); "
            f"relative L2 error {l2:.2e}, H1 error {h1:.2e}"
        )
    uh.name = "u"
    write_field(uh, f"u_1d_eps_{key}")
    gathered = gather_owned(uh)
    if comm.rank == 0:
        x, values = gathered[0][:, 0], gathered[1]
        order = np.argsort(x)
        axis.plot(x[order], values[order], lw=1.2, label=r"$u_h$ (P1)")
        fine_x = np.linspace(0, 1, 4001)
        axis.plot(fine_x, exact.u(fine_x), "k--", lw=0.8, label="exact (5.3)")
        axis.set_title(rf"$\varepsilon$ = {eps:.4g}: rel. $L^2$ error {l2:.1e}")
        axis.set_xlabel("x")
        axis.legend()
if comm.rank == 0:
    figure.tight_layout()
    figure.savefig(out / "solution_1d.png", dpi=150)
plt.close(figure)
# -

# ## 2. Convergence in h
#
# P1 elements converge with order 2 in L² and 1 in the H¹ seminorm once the mesh resolves ε; the
# upscaled coefficient converges with order 2 to the exact ``K~[u]``.

# +
problem = paper_1d(1 / 15)
exact = exact_1d(problem)
cells = [150, 300, 600, 1200] if quick else [300, 600, 1200, 2400, 4800]
rows = []
for n in cells:
    uh = solve_fine(problem, n=n)
    l2, h1 = relative_errors(uh, exact)
    rows.append((1.0 / n, l2, h1, abs(upscaled_coefficient(problem, uh) - exact.K_tilde)))
rows_array = np.array(rows)
orders = np.log2(rows_array[:-1, 1:] / rows_array[1:, 1:])
metrics["convergence_1d_eps_1_15"] = {
    "h": rows_array[:, 0].tolist(),
    "rel_l2": rows_array[:, 1].tolist(),
    "rel_h1": rows_array[:, 2].tolist(),
    "K_tilde_gap": rows_array[:, 3].tolist(),
    "orders_l2": orders[:, 0].tolist(),
    "orders_h1": orders[:, 1].tolist(),
}
if comm.rank == 0:
    print("      h      rel L2     rel H1   |K~ - K~exact|")
    for row in rows:
        print("  ".join(f"{value:9.2e}" for value in row))
    print(f"orders: L2 {np.round(orders[:, 0], 2)}, H1 {np.round(orders[:, 1], 2)}")
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for column, label in enumerate(
        ["relative $L^2$", "relative $H^1$", r"$|\tilde K_h - \tilde K|$"]
    ):
        axis.loglog(rows_array[:, 0], rows_array[:, column + 1], "o-", label=label)
    axis.set_xlabel("h")
    axis.set_title(r"paper_1d, $\varepsilon$ = 1/15, P1")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "convergence_1d.png", dpi=150)
    plt.close(figure)
# -

# ## 3. The 2D problem and Algorithm 4.1
#
# With P2 elements and 24 cells per oscillation the relative L² error of ``u_h`` is about 1e-4
# (against P3 on the same mesh). The two fine problems lifted in ``e_1`` and ``e_2`` give the
# averaged gradients ``T`` and fluxes ``F`` of (4.7) and the full upscaled tensor
# ``K~ = F T^{-1}``; its (1, 1) entry is the scalar (4.10) the paper reports.

# +
problem = paper_2d(0.1)
resolution = None if not quick else default_fine_resolution(problem, 2, elements_per_period=8)
solutions = solve_fine_directions(problem, n=resolution, degree=2)
(tensor,) = upscaled_tensor(problem, solutions)
K_tilde_2d = upscaled_coefficient(problem, solutions[0])
metrics["K_tilde_2d_eps_0_1"] = K_tilde_2d
metrics["K_tilde_tensor_2d_eps_0_1"] = tensor.tolist()
metrics["dofs_2d"] = solutions[0].function_space.dofmap.index_map.size_global
if comm.rank == 0:
    print(f"2D eps = 0.1: {metrics['dofs_2d']} P2 dofs, K~[u_h] = {K_tilde_2d:.6f}")
    print(f"Algorithm 4.1 tensor:\n{np.array2string(tensor, precision=6)}")
for i, u in enumerate(solutions):
    u.name = f"u_{i}"
    write_field(u, f"u_2d_direction_{i}")
gathered = gather_owned(solutions[0])
if comm.rank == 0:
    points = np.column_stack([gathered[0][:, :2], np.zeros(len(gathered[1]))])
    cloud = pyvista.PolyData(points)
    cloud["u"] = gathered[1]
    surface = cloud.delaunay_2d()
    plotter = pyvista.Plotter(off_screen=True, window_size=(900, 800))
    plotter.add_mesh(surface, scalars="u", cmap="viridis", show_scalar_bar=True)
    plotter.view_xy()
    plotter.add_text("paper_2d, eps = 0.1: u_h (lifting e_1)", font_size=12)
    plotter.screenshot(out / "solution_2d.png")
    plotter.close()
# -

# ## Metrics

# +
metrics["wall_time_s"] = time.perf_counter() - started
if comm.rank == 0:
    with open(out / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    print(f"wrote {out}/ in {metrics['wall_time_s']:.1f} s")
# -
