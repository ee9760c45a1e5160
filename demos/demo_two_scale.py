# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # Two-scale structure: cell problems, the first-order corrector and ReLU emulation
#
# This demo shows the classical homogenisation pieces behind Hoang & Schwab's expression-rate
# results and checks the paper's claims numerically:
#
# 1. the periodic cell problems [HS 2.5] and the homogenised tensor ``a^0`` for the paper's 2D
#    coefficient ``K = 3 + sin(pi x1/eps) + sin(2 pi x2/eps)`` (cell ``[0, 2] x [0, 1]``);
# 2. the two-scale reconstruction ``u_0 + eps u_1(x, x/eps)`` [HS 2.4-2.6] against fine
#    finite-element solutions for ``eps = 1/4 ... 1/64`` and the fitted rate of
#    ``||grad(u^eps - u_0 - eps u_1)|| / ||grad u^eps||`` (the paper proves ``eps^{1/2}``);
# 3. ReLU emulation: the exact conversion of a P1 function [HS Lemma 4.1], the error of
#    Yarotsky's square and of the sin/cos networks against depth [HS Lemmas 3.1, 3.2], and
#    the size of the oscillation networks against ``eps`` (``|log eps|`` growth).
#
# Everything is written to ``out_two_scale/`` (PNG plots, ``metrics.json`` and, with ADIOS2,
# the correctors as VTX). Run ``python demos/demo_two_scale.py`` (a few minutes on two cores),
# ``--quick`` (or ``DOLFINX_PINN_DEMO_QUICK=1``) for a smoke run, in parallel with
# ``mpirun -n 2``.

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
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dolfinx_pinn.homogenization import (
    TwoScaleApproximation,
    cell_problem_from,
    solve_homogenized,
    two_scale_error_study,
)
from dolfinx_pinn.problems import paper_2d
from dolfinx_pinn.relu import (
    cos_network,
    network_size,
    p1_to_relu,
    square_error_bound,
    square_network,
)

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true", help="a fast smoke run")
parser.add_argument("--out", default="out_two_scale", help="output folder")
args, _ = parser.parse_known_args()
quick = args.quick or os.environ.get("DOLFINX_PINN_DEMO_QUICK", "0") not in ("", "0")
comm = MPI.COMM_WORLD
out = Path(args.out)
if comm.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
comm.barrier()
metrics: dict = {"quick": quick, "ranks": comm.size}
started = time.perf_counter()
# -

# ## 1. The cell problems and the homogenised tensor
#
# For a periodic problem the cell coefficient is the problem's own definition,
# ``a(y) = K(eps y)`` on the box of the period vector ``p = (2, 1)``. The cell problems
# ``-div_y(a (e_i + grad_y N^i)) = 0`` are solved with P1 elements; periodicity is exact (a
# restriction matrix ``P`` and the reduced operator ``P^T A P`` factorised by MUMPS).

# +
problem = paper_2d(0.1)
cell_resolution = 8 if quick else 16
cell = cell_problem_from(problem, cell_resolution, comm=comm)
metrics["cell"] = {
    "cells_per_unit_length": cell_resolution,
    "cell_lengths": cell.cell_lengths.tolist(),
    "a0": cell.tensor.tolist(),
}
if comm.rank == 0:
    print(f"a0 =\n{cell.tensor}")

if dolfinx.has_adios2:
    from dolfinx.io import VTXWriter

    with VTXWriter(comm, out / "correctors.bp", cell.correctors, engine="BP4") as writer:
        writer.write(0.0)

if comm.rank == 0:
    lattice = cell.lattice.values
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for j, ax in enumerate(axes):
        image = ax.imshow(lattice[..., j].T, origin="lower", extent=[0, 2, 0, 1], cmap="coolwarm")
        ax.set_title(f"corrector $N^{j + 1}(y)$")
        ax.set_xlabel("$y_1$")
        ax.set_ylabel("$y_2$")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "correctors.png", dpi=120)
    plt.close(fig)
# -

# ## 2. The two-scale reconstruction against fine solutions
#
# The package's fine problem (4.8) is lifted: ``w = u + x_1`` solves ``-div(K grad w) = q``
# with ``w = x_1`` on the boundary. Its homogenised limit ``w_0`` solves
# ``-div(a^0 grad w_0) = q`` with the same boundary data, and
# ``w ~ w_0 + eps sum_j d_j w_0(x) N^j(x/eps)``. The fine meshes have ``cell_resolution / eps``
# cells per unit length, aligned with the cell mesh, so the pulled-back correctors are exact
# fine-mesh P1 functions. The boundary layer of the corrector limits the rate to about 1/2.

# +
eps_values = [1 / 4, 1 / 8, 1 / 16] if quick else [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
study_resolution = 6 if quick else 8
study = two_scale_error_study(
    paper_2d,
    eps_values,
    cell_resolution=study_resolution,
    coarse_n=48 if quick else 128,
    comm=comm,
)
metrics["two_scale"] = study.as_dict()
if comm.rank == 0:
    print("eps        energy error   L2 error   L2 error of u0 alone")
    for e, energy, l2, l2h in zip(
        study.eps, study.energy_errors, study.l2_errors, study.homogenized_l2_errors, strict=True
    ):
        print(f"{e:8.5f}   {energy:10.4f}   {l2:10.4f}   {l2h:10.4f}")
    print(f"fitted rate {study.rate:.3f} (theory: >= 0.5)")
    eps_array = np.array(study.eps)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(eps_array, study.energy_errors, "o-", label="energy error of $u_0+\\epsilon u_1$")
    ax.loglog(
        eps_array,
        study.constant * eps_array**study.rate,
        "--",
        label=f"fit $\\epsilon^{{{study.rate:.2f}}}$",
    )
    ax.loglog(
        eps_array,
        study.energy_errors[0] * (eps_array / eps_array[0]) ** 0.5,
        ":",
        label="$\\epsilon^{1/2}$",
    )
    ax.set_xticks(eps_array, [f"1/{round(1 / e)}" for e in eps_array])
    ax.minorticks_off()
    ax.set_xlabel("$\\epsilon$")
    ax.set_ylabel("relative error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "two_scale_rate.png", dpi=120)
    plt.close(fig)
# -

# ## 3. ReLU emulation
#
# A continuous P1 function on a locally convex triangulation *is* a ReLU network [HS Lemma
# 4.1]: here the coarse homogenised solution ``w_0``.

# +
coarse_n = 6 if quick else 12
w0 = solve_homogenized(problem, cell.tensor, coarse_n, comm=comm)
relu_w0 = p1_to_relu(w0)
approximation = TwoScaleApproximation(problem, cell, w0)
rng = np.random.default_rng(0)
points = rng.random((2000, 2))
with torch.no_grad():
    relu_values = relu_w0(torch.as_tensor(points))[:, 0].numpy()
fe_values = approximation.coarse(points)[:, 0]
size = network_size(relu_w0)
metrics["p1_to_relu"] = {
    "coarse_cells_per_direction": coarse_n,
    "max_error": float(np.abs(relu_values - fe_values).max()),
    "depth": size.depth,
    "width": size.width,
    "nonzero_weights": size.nonzero_weights,
}
if comm.rank == 0:
    print(f"P1 -> ReLU: max error {metrics['p1_to_relu']['max_error']:.2e}, {size}")
# -

# Yarotsky's square network has error ``2^{-2m-2}`` with depth ``m + 2``; the sin/cos
# networks reduce any frequency exactly by a sawtooth and reach accuracy ``delta`` with depth
# ``O((log 1/delta)^2)`` [HS Lemma 3.2]: the error falls geometrically in the level ``k`` while
# the depth grows like ``k^2``, i.e. like ``exp(-c sqrt(depth))``.

# +
grid = np.linspace(0.0, 1.0, 4097)[:, None]
square_rows = []
for m in range(1, 11):
    net = square_network(m)
    with torch.no_grad():
        error = np.abs(net(torch.as_tensor(grid))[:, 0].numpy() - grid[:, 0] ** 2).max()
    square_rows.append(
        {
            "m": m,
            "depth": network_size(net).depth,
            "error": float(error),
            "bound": square_error_bound(m),
        }
    )
t = np.linspace(-1.0, 1.0, 8001)[:, None]
frequency = 2 * np.pi * 10
trig_rows = []
for level in range(1, 6 if quick else 9):
    net = cos_network(frequency, 1.0, level=level)
    with torch.no_grad():
        error = np.abs(net(torch.as_tensor(t))[:, 0].numpy() - np.cos(frequency * t[:, 0])).max()
    s = network_size(net)
    trig_rows.append(
        {
            "level": level,
            "depth": s.depth,
            "nonzero_weights": s.nonzero_weights,
            "error": float(error),
        }
    )
depths = np.array([r["depth"] for r in trig_rows])
trig_errors = np.array([r["error"] for r in trig_rows])
sqrt_slope = float(np.polyfit(np.sqrt(depths), np.log(trig_errors), 1)[0])
metrics["square_network"] = square_rows
metrics["cos_network"] = {
    "frequency": frequency,
    "rows": trig_rows,
    "log_error_vs_sqrt_depth_slope": sqrt_slope,
}
# -

# The oscillation ``cos(2 pi x1 / eps)`` on ``[0, 1]`` at a fixed accuracy: only the sawtooth
# depth depends on ``eps`` (``log2(1/eps)`` layers), so the network size grows like
# ``|log eps|``, the heart of [HS Thm 4.3].

# +
size_rows = []
for k in range(2, 13):
    eps = 2.0**-k
    net = cos_network(2 * np.pi / eps, 1.0, delta=1e-3)
    s = network_size(net)
    size_rows.append({"eps": eps, "depth": s.depth, "nonzero_weights": s.nonzero_weights})
log_eps = np.array([abs(np.log(r["eps"])) for r in size_rows])
weights = np.array([r["nonzero_weights"] for r in size_rows])
size_slope, size_intercept = np.polyfit(log_eps, weights, 1)
residual = float(np.abs(weights - (size_slope * log_eps + size_intercept)).max())
metrics["size_vs_eps"] = {
    "delta": 1e-3,
    "rows": size_rows,
    "nonzero_weights_per_unit_log_eps": float(size_slope),
    "max_deviation_from_linear_fit": residual,
}

if comm.rank == 0:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.semilogy(
        [r["depth"] for r in square_rows],
        [r["error"] for r in square_rows],
        "o-",
        label="square network",
    )
    ax.semilogy(
        [r["depth"] for r in square_rows],
        [r["bound"] for r in square_rows],
        "k:",
        label="$2^{-2m-2}$",
    )
    ax.set_xlabel("depth L")
    ax.set_ylabel("max error on [0, 1]")
    ax.legend()
    ax = axes[1]
    ax.semilogy(depths, trig_errors, "o-", label="cos network, $a = 20\\pi$")
    ax.set_xlabel("depth L")
    ax.set_ylabel("max error on [-1, 1]")
    ax.legend()
    ax = axes[2]
    ax.plot(log_eps, weights, "o-", label="nonzero weights, $\\delta = 10^{-3}$")
    ax.set_xlabel("$|\\log \\epsilon|$")
    ax.set_ylabel("network size M")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "relu_emulation.png", dpi=120)
    plt.close(fig)
    print(f"square: {square_rows[-1]}")
    print(f"cos: slope of log(error) against sqrt(depth) {sqrt_slope:.3f}")
    print(f"size vs eps: {size_slope:.1f} nonzero weights per unit |log eps|")
# -

# Write the metrics.

# +
metrics["seconds"] = time.perf_counter() - started
if comm.rank == 0:
    with open(out / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    print(f"wrote {out}/metrics.json in {metrics['seconds']:.1f} s")
# -
