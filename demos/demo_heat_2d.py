# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # The hybrid solver in 2D: plain and hybrid PINNs for a multiscale heat problem
#
# The two-dimensional experiment (4.11) of Hintermüller & Korolev on $\Omega = (0, 1)^2$:
#
# $$
# -\nabla\cdot\left(K^\varepsilon \nabla u\right) = q + \partial_1 K^\varepsilon, \quad
# u = 0 \text{ on } \partial\Omega, \qquad
# K^\varepsilon = 3 + \sin(\pi x_1/\varepsilon) + \sin(2\pi x_2/\varepsilon),\quad
# q = 10\, e^{-100|x - 0.5|^2},
# $$
#
# with $\varepsilon = 0.1$. Two networks, each trained plain (PINN loss only) and hybrid
# (reduced objective $\hat J = J^M + \tau_2 R$ with a DOLFINx coarse problem on a mesh of size
# $h = 0.04$): the MLP baseline (8 hidden layers of 64, Adam $lr = 10^{-3}$) and the Ms-PINN
# (Fourier features with scales $1$ and $1/\varepsilon$). The reference is a fine P3 solution.
# The paper's finding (its Figure 3 and Table 1): the hybrid MLP trains robustly where the plain
# MLP PINN fails in most seeds. Then our configuration: the two-scale network of Hoang & Schwab
# with exact fast harmonics, whose output layer the hybrid solver finds by least squares
# (relative $L^2$ about $3\cdot 10^{-4}$ in a few minutes on two cores).
#
# Everything goes to ``out_heat_2d/`` (``metrics.json``, PNG figures, and the run folder of the
# last hybrid run with VTX/XDMF fields). Default: one seed, CPU sizes, a few minutes on two
# cores; ``--quick`` a smoke run; ``--paper`` the paper's sizes ($M_\Omega = 25000$,
# $M_{\partial\Omega} = 2500$) with five seeds and median/spread (a GPU job). In parallel:
# ``mpirun -n 2 python demos/demo_heat_2d.py``.

# +
import argparse
import json
import os
import time
from pathlib import Path

from mpi4py import MPI

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dolfinx_pinn import paper_2d
from dolfinx_pinn.io import write_outputs
from dolfinx_pinn.networks import MLP, MultiscaleFourierNet, TransfiniteBoundaryNet, TwoScaleNet
from dolfinx_pinn.pinn import PINNSolver
from dolfinx_pinn.reference import relative_errors, solve_fine
from dolfinx_pinn.solver import HybridSolver

parser = argparse.ArgumentParser(description="2D heat demo")
parser.add_argument("--quick", action="store_true", help="a smoke run")
parser.add_argument("--paper", action="store_true", help="the paper's sizes, five seeds (GPU)")
parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
parser.add_argument("--out", default="out_heat_2d", help="output folder")
args, _ = parser.parse_known_args()
quick = args.quick or os.environ.get("DOLFINX_PINN_DEMO_QUICK", "0") not in ("", "0")
comm = MPI.COMM_WORLD
torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.size))
out = Path(args.out)
if comm.rank == 0:
    out.mkdir(parents=True, exist_ok=True)
comm.barrier()
started = time.perf_counter()


def log(message: str) -> None:
    if comm.rank == 0:
        print(message, flush=True)


# -

# ## Sizes and the reference

# +
if args.paper:
    steps, n_interior, n_boundary, seeds = 20_000, 25_000, 2_500, [0, 1, 2, 3, 4]
elif quick:
    steps, n_interior, n_boundary, seeds = 20, 2_500, 250, [0]
else:
    steps, n_interior, n_boundary, seeds = 300, 4_000, 400, [0]
problem = paper_2d(0.1)
# P3 with 12 cells per period: about 1e-5 relative L², far below the errors measured here.
reference = solve_fine(
    problem, degree=2 if quick else 3, comm=comm, elements_per_period=6 if quick else 12
)
log(f"reference: {reference.function_space.dofmap.index_map.size_global} fine dofs")
# -

# ## Plain and hybrid training
#
# The plain PINN uses the boundary penalty rows with $\tau_1 = 10$; the hybrid solver adds the
# coupling with a constant $\tau_2 = 1$, the lazy coarse update and loss balancing every 100
# steps (between the PDE, boundary and coupling terms).


# +
def network(kind: str, seed: int) -> torch.nn.Module:
    if kind == "mlp":
        return MLP(2, 64, 8, seed=seed)
    return MultiscaleFourierNet.for_problem(problem, seed=seed)


def summary(errors: list[tuple[float, float, float]]) -> dict:
    """Median and spread over the seeds of (rel. L², rel. H¹, wall time) triples."""
    values = np.array(errors)
    return {
        "rel_l2_median": float(np.median(values[:, 0])),
        "rel_l2_min": float(values[:, 0].min()),
        "rel_l2_max": float(values[:, 0].max()),
        "rel_h1_median": float(np.median(values[:, 1])),
        "wall_time_s_median": float(np.median(values[:, 2])),
        "seeds": seeds,
    }


results: dict = {}
last_hybrid = None
for kind in ("mlp", "ms_pinn"):
    for mode in ("plain", "hybrid"):
        errors = []
        for seed in seeds:
            t0 = time.perf_counter()
            if mode == "plain":
                solver = PINNSolver(
                    problem, network(kind, seed), n_interior=n_interior, n_boundary=n_boundary,
                    tau1=10.0, seed=seed, device=args.device,
                )  # fmt: skip
                solver.train("adam", steps, lr=1e-3, balancing=True)
                l2, h1 = relative_errors(solver.network, reference)
            else:
                solver = HybridSolver(
                    problem, network(kind, seed), n_interior=n_interior, n_boundary=n_boundary,
                    tau1=10.0, tau2=1.0, seed=seed, reference=reference, device=args.device,
                )  # fmt: skip
                solver.train("adam", steps, lr=1e-3, progress=not quick, eval_every=steps)
                l2, h1 = solver.relative_errors()
                if last_hybrid is not None:
                    last_hybrid.destroy()
                last_hybrid = solver
            errors.append((l2, h1, time.perf_counter() - t0))
            log(f"{kind:>8} {mode:>6} seed {seed}: rel L2 {l2:.3e}, H1 {h1:.3e}")
        results[f"{kind}_{mode}"] = summary(errors)
# -

# ## Our configuration: exact fast harmonics and a least-squares output layer
#
# The two-scale network $v = v_0(x) + \varepsilon \sum_k a_k(x)\cos(2\pi k\cdot x/\varepsilon)
# + b_k(x)\sin(\cdots)$ (Hoang & Schwab, Theorem 4.3) with the slow functions from one hidden
# layer of 64 tanh neurons and the wave vectors $|k|_1 \le 7$ (the corrector of this
# coefficient, a sum of functions of $x_1$ and of $x_2$, lives on the axes), zero on
# $\partial\Omega$ by a transfinite projection. The network is linear in its output layer, so
# the hybrid solver's ``"projection"`` optimizer solves for it exactly at each step: first with
# the coupling ($\tau_2 = 1$, which fixes the slow part through the coarse problem), then with
# $\tau_2 \to 0$ (no upscaling-consistency bias at the end). 20 000 Sobol' points.

# +
width, k_max, points = (16, 3, 2_500) if quick else (64, 7, 20_000)
errors = []
for seed in seeds:
    t0 = time.perf_counter()
    two_scale = TwoScaleNet.for_problem(
        problem, k_max=k_max, width=width, wavevector_norm="l1", seed=seed
    )
    solver = HybridSolver(
        problem, TransfiniteBoundaryNet(two_scale, problem), n_interior=points,
        sampling="sobol", tau2=1.0, seed=seed, reference=reference, device=args.device,
    )  # fmt: skip
    solver.train(
        "projection", 3, form="normal", tau2_schedule="continuation", tau2_decay=1e-5,
        progress=not quick, eval_every=3,
    )  # fmt: skip
    l2, h1 = solver.relative_errors()
    errors.append((l2, h1, time.perf_counter() - t0))
    log(f"two-scale projection seed {seed}: rel L2 {l2:.3e}, H1 {h1:.3e}")
    if last_hybrid is not None:
        last_hybrid.destroy()
    last_hybrid = solver
results["two_scale_projection"] = summary(errors)
# -

# ## Fields, figures and the table
#
# The last hybrid run (our configuration) is written as a run folder (fields as VTX or XDMF,
# figures, metrics, history). The table is the analogue of the paper's Table 1 (median and
# spread over seeds).

# +
assert last_hybrid is not None
run_metrics = write_outputs(last_hybrid, out / "hybrid_run")
last_hybrid.destroy()
if comm.rank == 0:
    names = list(results)
    figure, axis = plt.subplots(figsize=(6, 4))
    medians = [results[n]["rel_l2_median"] for n in names]
    low = [results[n]["rel_l2_median"] - results[n]["rel_l2_min"] for n in names]
    high = [results[n]["rel_l2_max"] - results[n]["rel_l2_median"] for n in names]
    axis.bar(names, medians, yerr=[low, high], capsize=4)
    axis.tick_params(axis="x", rotation=30)
    axis.set_yscale("log")
    axis.set_ylabel("relative $L^2$ error (median, min-max)")
    figure.tight_layout()
    figure.savefig(out / "table1.png", dpi=120)
    plt.close(figure)
    for name, values in results.items():
        print(f"{name:>16}: rel L2 {values['rel_l2_median']:.3e}  H1 {values['rel_h1_median']:.3e}")
    metrics = {
        "quick": quick,
        "paper": args.paper,
        "n_ranks": comm.size,
        "steps": steps,
        "n_interior": n_interior,
        "results": results,
        "hybrid_run": {k: run_metrics[k] for k in ("rel_l2", "rel_h1", "K_tilde", "coarse_share")},
        "wall_time_s": time.perf_counter() - started,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out / 'metrics.json'} in {metrics['wall_time_s']:.1f} s")
# -
