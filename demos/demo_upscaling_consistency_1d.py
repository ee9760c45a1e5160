# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: light
#       format_version: '1.5'
#       jupytext_version: 1.16.0
# ---

# # The hybrid solver in 1D: the upscaling-consistency gap and how to close it
#
# This demo reproduces the one-dimensional experiment (4.29) of Hintermüller & Korolev,
#
# $$
# -\left(K^\varepsilon u'\right)' = q + \left(K^\varepsilon\right)', \quad u(0) = u(1) = 0,
# \qquad K^\varepsilon = 2 + \sin(2\pi x/\varepsilon), \quad q = -3(2x - 1),
# $$
#
# for $\varepsilon = 1/15$ and $\varepsilon = 0.01$, with the hybrid solver of Algorithm 3.1:
# a network $v_\theta$ on the fine scale, a DOLFINx P1 coarse problem with the upscaled
# coefficient $\tilde K[v_\theta]$ of (4.10) on a mesh of size $h = 0.004$, and the coupling
# $\tau_2 R(y_h, v_\theta)$ between the compression $\bar Q v_\theta$ and the coarse state $y_h$.
#
# Three solvers are compared against the exact solution (:func:`dolfinx_pinn.reference.exact_1d`):
#
# 1. **Ms-PINN** (plain PINN, the paper's baseline): multiscale Fourier features with scales
#    $1$ and $1/\varepsilon$, two hidden layers of 128, hard boundary $l = 4x(1-x)$, Adam with
#    $lr = 5\cdot 10^{-4}$ decayed by 0.75 every 1000 steps and loss balancing;
# 2. **Ms-PINN hybrid** (paper-faithful): the same network and optimizer on the reduced objective
#    $\hat J = J^M + \tau_2 R$ with a constant $\tau_2$ and the lazy coarse update;
# 3. **two-scale hybrid**: the ε-robust ansatz of Hoang & Schwab (``TwoScaleNet``, exact fast
#    harmonics times slow networks), Gauss-Newton with variable projection on the stacked
#    residual $[\text{PINN rows}; \sqrt{\tau_2}\,\text{coupling rows}]$, and a continuation
#    $\tau_2 \to 0$. The same with a constant $\tau_2$ shows the *upscaling-consistency gap*:
#    $\bar Q u \ne y_h$ for the exact $u$ (Theorem 3.2), so a fixed coupling biases the minimiser.
#
# Everything goes to ``out_upscaling_consistency_1d/`` (``metrics.json``, PNG figures). The
# default runs in a few minutes on two CPU cores; ``--quick`` (or
# ``DOLFINX_PINN_DEMO_QUICK=1``) is a smoke run of a few seconds and ``--paper`` uses the
# paper's sizes (M = 2000 / 5000 points, 2·10^5 Adam iterations: a GPU job). Run it in
# parallel with ``mpirun -n 2 python demos/demo_upscaling_consistency_1d.py``.

# +
import argparse
import json
import math
import os
import time
from pathlib import Path

from mpi4py import MPI

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dolfinx_pinn import paper_1d
from dolfinx_pinn.networks import (
    HardBoundaryNet,
    MultiscaleFourierNet,
    TransfiniteBoundaryNet,
    TwoScaleNet,
)
from dolfinx_pinn.pinn import PINNSolver
from dolfinx_pinn.reference import exact_1d
from dolfinx_pinn.solver import HybridSolver

parser = argparse.ArgumentParser(description="1D upscaling consistency demo")
parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
parser.add_argument("--paper", action="store_true", help="the paper's sizes (GPU)")
parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
parser.add_argument("--out", default="out_upscaling_consistency_1d", help="output folder")
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

# ## Sizes
#
# The paper uses $M_\Omega = 2000$ points for $\varepsilon = 1/15$, $5000$ for $\varepsilon =
# 0.01$, and $2\cdot 10^5$ Adam iterations. An Adam step of the Ms-PINN costs about 0.2-0.5 s
# on one CPU core, so the default runs only 200 of them: the Adam runs are far from converged
# (use ``--paper`` on a GPU for the paper's numbers), while the two-scale Gauss-Newton hybrid
# converges in a few iterations.

# +
if args.paper:
    adam_steps, points = 200_000, {1 / 15: 2000, 0.01: 5000}
elif quick:
    adam_steps, points = 30, {1 / 15: 600, 0.01: 1500}
else:
    adam_steps, points = 200, {1 / 15: 2000, 0.01: 2500}
gn_steps = 3 if quick else 10
metrics: dict = {
    "quick": quick,
    "paper": args.paper,
    "n_ranks": comm.size,
    "adam_steps": adam_steps,
    "gauss_newton_steps": gn_steps,
    "cases": {},
}
# -

# ## The runs
#
# Each hybrid run builds the coarse mesh ($h = 0.004$, 250 cells), the collocation points
# cell by cell (the same set on any number of ranks) and the compression operator with
# $\delta = \varepsilon$. The plain Ms-PINN runs on every rank alike (it has no coarse part).

# +
results: dict = {}
for eps in (1 / 15, 0.01):
    problem = paper_1d(eps)
    exact = exact_1d(problem)
    label = f"eps={eps:.4g}"
    case: dict = {}
    curves: dict = {}
    M = points[eps]

    # 1. Plain Ms-PINN (the paper's baseline).
    net = HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=0), problem)
    plain = PINNSolver(problem, net, n_interior=M, seed=0, reference=exact, device=args.device)
    t0 = time.perf_counter()
    history = plain.train(
        "adam", steps=adam_steps, eval_every=max(1, adam_steps // 20), balancing=True
    )
    l2, h1 = plain.relative_errors()
    case["ms_pinn"] = {"rel_l2": l2, "rel_h1": h1, "wall_time_s": time.perf_counter() - t0}
    curves["ms_pinn"] = (plain.predict, history["eval_step"], history["l2"])
    log(f"{label} Ms-PINN: rel L2 {l2:.3e}, H1 {h1:.3e}")

    # 2. Ms-PINN hybrid, paper-faithful (Adam, constant tau2, lazy update).
    net = HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=0), problem)
    hybrid = HybridSolver(problem, net, n_interior=M, tau2=1.0, reference=exact, device=args.device)
    t0 = time.perf_counter()
    history = hybrid.train(
        "adam", adam_steps, eval_every=max(1, adam_steps // 20), progress=not quick
    )
    l2, h1 = hybrid.relative_errors()
    case["ms_pinn_hybrid"] = {
        "rel_l2": l2,
        "rel_h1": h1,
        "K_tilde": history["K_tilde"][-1],
        "wall_time_s": time.perf_counter() - t0,
        "coarse_share": float(np.sum(history["time_coarse"]) / history["time"][-1]),
        "refreshes": history["refreshes"][-1],
    }
    curves["ms_pinn_hybrid"] = (hybrid.predict, history["eval_step"], history["l2"])
    nodes = hybrid.coarse.dof_coordinates[:, 0]
    state = hybrid.coarse_state().x.array[: len(nodes)].copy()
    log(f"{label} Ms-PINN hybrid: rel L2 {l2:.3e}, H1 {h1:.3e}, K~ {history['K_tilde'][-1]:.4f}")

    # 3. Two-scale hybrid with Gauss-Newton: constant tau2 (the gap) and continuation.
    for schedule in ("constant", "continuation"):
        net = TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem)
        solver = HybridSolver(
            problem, net, n_interior=max(M, 3000), tau2=1.0, reference=exact, device=args.device
        )
        t0 = time.perf_counter()
        history = solver.train(
            "gauss_newton", gn_steps, tau2_schedule=schedule, eval_every=1, progress=False
        )
        l2, h1 = solver.relative_errors()
        name = f"two_scale_hybrid_{schedule}"
        case[name] = {
            "rel_l2": l2,
            "rel_h1": h1,
            "K_tilde": history["K_tilde"][-1],
            "R": history["R"][-1],
            "wall_time_s": time.perf_counter() - t0,
        }
        curves[name] = (solver.predict, history["eval_step"], history["l2"])
        log(f"{label} two-scale hybrid ({schedule} tau2): rel L2 {l2:.3e}, H1 {h1:.3e}")
        if schedule == "constant":
            solver.destroy()
    results[eps] = (problem, exact, curves, nodes, state)
    metrics["cases"][label] = case
    hybrid.destroy()
    solver.destroy()
# -

# ## Figures 1-2: solutions, predicted state against compression, errors
#
# Left: the exact solution, the networks and the coarse state $y_h$ of the Ms-PINN hybrid.
# Right: the relative $L^2$ error against the iterations (Adam and Gauss-Newton on their own
# axes: a Gauss-Newton iteration is a far bigger step).

# +
if comm.rank == 0:
    for eps, (problem, exact, curves, nodes, state) in results.items():
        x = np.linspace(0, 1, 4001)[:, None]
        figure, axes = plt.subplots(1, 2, figsize=(12, 4))
        axes[0].plot(x[:, 0], exact.value(x), "k-", lw=1.5, label="exact $u$")
        for name, (predict, _, _) in curves.items():
            axes[0].plot(x[:, 0], predict(x), lw=0.8, label=name)
        order = np.argsort(nodes)
        axes[0].plot(
            nodes[order][::5], state[order][::5], "o", ms=3, label="$y_h$ (Ms-PINN hybrid)"
        )
        axes[0].set_xlabel("$x$")
        axes[0].legend(fontsize=7)
        axes[0].set_title(f"solutions, $\\varepsilon = {eps:.4g}$")
        for name, (_, steps, errors) in curves.items():
            axes[1].semilogy(np.maximum(steps, 1), errors, "o-", ms=2, label=name)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("iteration")
        axes[1].set_ylabel("relative $L^2$ error")
        axes[1].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / f"solutions_eps_{eps:.4g}.png", dpi=120)
        plt.close(figure)
# -

# ## Summary
#
# The Ms-PINN hybrid pins the slow component through $y_h$, but with a constant $\tau_2$ it
# inherits the upscaling-consistency bias (the exact solution does not make $R$ vanish, the
# paper's "gap"). With the two-scale ansatz and Gauss-Newton the fine problem is solved to
# high accuracy, the coupling steers the first iterations, and the continuation
# $\tau_2 \to 0$ removes the bias: compare ``two_scale_hybrid_constant`` with
# ``two_scale_hybrid_continuation`` in ``metrics.json``.

# +
metrics["wall_time_s"] = time.perf_counter() - started
if comm.rank == 0:
    for label, case in metrics["cases"].items():
        for name, values in case.items():
            print(
                f"{label:>12} {name:>32}: rel L2 {values['rel_l2']:.3e}  H1 {values['rel_h1']:.3e}"
            )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    print(f"wrote {out / 'metrics.json'} in {metrics['wall_time_s']:.1f} s")
assert all(math.isfinite(v["rel_l2"]) for c in metrics["cases"].values() for v in c.values())
# -
