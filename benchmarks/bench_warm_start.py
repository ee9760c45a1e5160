"""Iterations saved by warm-starting a TwoScaleNet from the two-scale approximation u0 + eps u1.

For the paper's 1D problem (4.29) a :class:`~dolfinx_pinn.networks.TwoScaleNet` is trained with
Adam (lr 1e-3, full batch) on the PINN objective (3.24) (interior residual of (4.8) by autograd
plus a boundary penalty), once from its Glorot initialisation ("cold") and once after
:func:`~dolfinx_pinn.homogenization.warm_start_two_scale` ("warm", same initial weights). The
relative H1-seminorm error against the exact 1D solution is recorded every 10 iterations; the
table reports the iterations each start needs to reach a target error, medians over seeds.

Run: ``python benchmarks/bench_warm_start.py [--quick]``; writes
``benchmarks/results/warm_start.json``.
"""

import argparse
import copy
import json
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch

from dolfinx_pinn.homogenization import (
    TwoScaleApproximation,
    cell_problem_from,
    solve_homogenized,
    warm_start_two_scale,
)
from dolfinx_pinn.networks import TwoScaleNet
from dolfinx_pinn.problems import paper_1d
from dolfinx_pinn.reference import exact_1d


def h1_error(net: torch.nn.Module, grid: torch.Tensor, exact_du: torch.Tensor) -> float:
    """Relative H1-seminorm error on a uniform grid (trapezoid-free mean: uniform weights)."""
    x = grid.clone().requires_grad_(True)
    value = net(x).reshape(-1)
    (du,) = torch.autograd.grad(value.sum(), x)
    return float(torch.linalg.norm(du[:, 0] - exact_du) / torch.linalg.norm(exact_du))


def train(net, problem, points, boundary, grid, exact_du, iterations, tau=100.0):
    """Adam on the PINN objective; returns [(iteration, H1 error)] every 10 iterations."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999))
    source = problem.f(points).detach()
    coefficient = problem.K(points).detach()
    scale = float((source**2).mean())
    history = [(0, h1_error(net, grid, exact_du))]
    for iteration in range(1, iterations + 1):
        optimizer.zero_grad()
        x = points.clone().requires_grad_(True)
        value = net(x).reshape(-1)
        (du,) = torch.autograd.grad(value.sum(), x, create_graph=True)
        flux = coefficient * du[:, 0]
        (dflux,) = torch.autograd.grad(flux.sum(), x, create_graph=True)
        residual = -dflux[:, 0] - source
        loss = (residual**2).mean() / scale + tau * (net(boundary).reshape(-1) ** 2).mean()
        loss.backward()
        optimizer.step()
        if iteration % 10 == 0:
            history.append((iteration, h1_error(net, grid, exact_du)))
    return history


def iterations_to(history, target):
    """First recorded iteration with an error <= target (None if never)."""
    for iteration, error in history:
        if error <= target:
            return iteration
    return None


def main() -> None:
    """Run the benchmark and print the table."""
    # One thread: the machine is shared and tiny networks gain nothing from more.
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    eps = 1 / 8 if args.quick else 1 / 16
    seeds = [0] if args.quick else [0, 1, 2]
    iterations = 400 if args.quick else 2000
    targets = [0.3, 0.1, 0.05]
    problem = paper_1d(eps)
    started = time.perf_counter()
    cell = cell_problem_from(problem, 64, comm=MPI.COMM_SELF)
    approximation = TwoScaleApproximation(
        problem, cell, solve_homogenized(problem, cell.tensor, 256, comm=MPI.COMM_SELF)
    )
    exact = exact_1d(problem)
    grid = torch.linspace(0.0, 1.0, 4001, dtype=torch.float64)[:, None]
    exact_du = torch.as_tensor(exact.du(grid.numpy()[:, 0]), dtype=torch.float64).reshape(-1)
    rng = np.random.default_rng(5)
    points = torch.as_tensor(rng.random((1000, 1)), dtype=torch.float64)
    boundary = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    rows = []
    for seed in seeds:
        cold = TwoScaleNet.for_problem(problem, k_max=4, width=20, depth=2, seed=seed)
        warm = copy.deepcopy(cold)
        fit_started = time.perf_counter()
        fit = warm_start_two_scale(
            warm, problem, approximation, num_points=1024, iterations=300, comm=MPI.COMM_SELF
        )
        fit_seconds = time.perf_counter() - fit_started
        histories = {}
        for name, net in (("cold", cold), ("warm", warm)):
            histories[name] = train(net, problem, points, boundary, grid, exact_du, iterations)
        row = {
            "seed": seed,
            "fit_evaluations": fit.evaluations,
            "fit_seconds": fit_seconds,
            "fit_misfit": fit.final_error,
            "initial_h1": {k: h[0][1] for k, h in histories.items()},
            "final_h1": {k: h[-1][1] for k, h in histories.items()},
            "iterations_to": {
                str(t): {k: iterations_to(h, t) for k, h in histories.items()} for t in targets
            },
            "histories": histories,
        }
        rows.append(row)
    reference = {
        "two_scale_h1": float(
            np.linalg.norm(approximation.gradient(grid.numpy())[:, 0] - exact_du.numpy())
            / np.linalg.norm(exact_du.numpy())
        )
    }

    def median(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    print(f"paper_1d, eps = {eps:g}, Adam lr 1e-3, {iterations} iterations, seeds {seeds}")
    print(f"H1 error of u0 + eps u1 itself: {reference['two_scale_h1']:.4f}\n")
    print("| quantity | cold | warm | cold / warm |")
    print("|---|---|---|---|")
    for label, key in (("initial H1 error", "initial_h1"), ("final H1 error", "final_h1")):
        c, w = median([r[key]["cold"] for r in rows]), median([r[key]["warm"] for r in rows])
        print(f"| median {label} | {c:.4f} | {w:.4f} | {c / w:.1f} |")
    summary = {}
    for t in targets:
        c = median([r["iterations_to"][str(t)]["cold"] for r in rows])
        w = median([r["iterations_to"][str(t)]["warm"] for r in rows])
        summary[str(t)] = {"cold": c, "warm": w}
        ratio = f"{c / w:.1f}" if c is not None and w else "-"
        cold_text = f"{c:.0f}" if c is not None else f"> {iterations}"
        warm_text = f"{w:.0f}" if w is not None else f"> {iterations}"
        print(f"| median iterations to H1 error <= {t} | {cold_text} | {warm_text} | {ratio} |")
    fit_evals = median([r["fit_evaluations"] for r in rows])
    fit_seconds = median([r["fit_seconds"] for r in rows])
    print(f"\nwarm start cost: {fit_evals:.0f} L-BFGS evaluations ({fit_seconds:.1f} s)")
    result = {
        "eps": eps,
        "iterations": iterations,
        "seeds": seeds,
        "targets": targets,
        "summary": summary,
        "reference": reference,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    output = Path(__file__).parent / "results"
    output.mkdir(exist_ok=True)
    with open(output / "warm_start.json", "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
