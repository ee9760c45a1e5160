"""Benchmark of the fine-scale PINN core (issue 4).

1. Residual evaluation time per 10^4 points for each derivative method (jet = forward-mode
   Taylor, func = torch.func vmap(jacfwd(jacrev)), autograd = nested autograd.grad), forward
   and forward + backward, for the paper's Ms-PINN and for TwoScaleNet; and the Gauss-Newton
   Jacobian by outer products against vmap(jacrev).
2. paper_1d with ε in {1/15, 0.01}: relative L² and H¹ (seminorm) against the exact solution
   versus wall time for Ms-PINN + Adam (the paper's setting), TwoScaleNet + Adam, and
   TwoScaleNet + Gauss-Newton with and without variable projection.

Usage: python benchmarks/bench_pinn.py [--quick] [--threads N]
Writes benchmarks/results/pinn.json and prints markdown tables.
"""

from mpi4py import MPI  # noqa: F401  (isort: skip)

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dolfinx_pinn.networks import (
    HardBoundaryNet,
    MultiscaleFourierNet,
    TransfiniteBoundaryNet,
    TwoScaleNet,
    count_parameters,
)
from dolfinx_pinn.pinn import PINNSolver
from dolfinx_pinn.problems import paper_1d
from dolfinx_pinn.reference import exact_1d
from dolfinx_pinn.residual import PDEBlock

RESULTS = Path(__file__).parent / "results" / "pinn.json"


def _median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_derivatives(quick):
    problem = paper_1d(0.01)
    points = 2_000 if quick else 10_000
    repeats = 3 if quick else 7
    x = torch.tensor(problem.domain.sample_interior(points, np.random.default_rng(0)))
    networks = {
        "Ms-PINN 2x128 (hard BC)": HardBoundaryNet(
            MultiscaleFourierNet.for_problem(problem, seed=0), problem
        ),
        "TwoScaleNet (transfinite)": TransfiniteBoundaryNet(
            TwoScaleNet.for_problem(problem, seed=0), problem
        ),
    }
    rows = []
    for label, net in networks.items():
        block = PDEBlock(problem, x)
        per = {}
        for method in ("jet", "func", "autograd"):
            block.method = method

            def forward():
                block.values(net)

            def forward_backward():
                net.zero_grad()
                block.loss(net).backward()

            forward()
            scale = 1e4 / points
            per[method] = (
                scale * _median_time(forward, repeats),
                scale * _median_time(forward_backward, repeats),
            )
        block.method = "auto"
        jac = {}
        for strategy in ("outer", "vmap"):
            block.jacobian_strategy = strategy
            jac_points = min(points, 500)
            sub = PDEBlock(problem, x[:jac_points], jacobian_strategy=strategy)
            jac[strategy] = (1e4 / jac_points) * _median_time(
                lambda sub=sub: sub.jacobian(net), max(1, repeats // 2)
            )
        rows.append(
            {
                "network": label,
                "parameters": count_parameters(net),
                "seconds_per_1e4_points": {
                    m: {"forward": f, "forward_backward": fb} for m, (f, fb) in per.items()
                },
                "jacobian_seconds_per_1e4_rows": jac,
            }
        )
    return rows


def _run(problem, label, network, optimizer, n_interior, time_limit, steps, eval_every, **options):
    solver = PINNSolver(
        problem, network, n_interior=n_interior, seed=0, reference=exact_1d(problem)
    )
    history = solver.train(
        optimizer,
        steps=steps,
        eval_every=eval_every,
        time_limit=time_limit,
        target_l2=1e-7 if optimizer == "gauss_newton" else None,
        **options,
    )
    l2, h1, times = history["l2"], history["h1"], history["eval_time"]
    reached = [t for t, e in zip(times, l2, strict=True) if e <= 1e-6]
    return {
        "method": label,
        "eps": problem.eps,
        "n_interior": n_interior,
        "parameters": count_parameters(network),
        "steps": len(history["step"]),
        "wall_s": history["time"][-1] if history["time"] else 0.0,
        "rel_l2": l2[-1],
        "rel_h1": h1[-1],
        "best_rel_l2": min(l2),
        "time_to_1e-6_s": reached[0] if reached else None,
        "curve": {"time": times, "l2": l2, "h1": h1},
    }


def bench_training(quick):
    adam_limit = 20.0 if quick else 120.0
    gn_limit = 30.0
    runs = []
    for eps, n_interior in ((1 / 15, 2000), (0.01, 5000)):
        problem = paper_1d(eps)
        gn_points = 2000 if eps > 0.05 else 3000
        runs.append(
            _run(
                problem,
                "Ms-PINN + Adam (paper)",
                HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=0), problem),
                "adam",
                n_interior,
                adam_limit,
                200_000,
                200,
            )
        )
        runs.append(
            _run(
                problem,
                "TwoScaleNet + Adam",
                TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem),
                "adam",
                gn_points,
                adam_limit,
                200_000,
                200,
                lr=1e-3,
            )
        )
        runs.append(
            _run(
                problem,
                "TwoScaleNet + Gauss-Newton (VarPro)",
                TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem),
                "gauss_newton",
                gn_points,
                gn_limit,
                50,
                1,
                variable_projection=True,
            )
        )
        runs.append(
            _run(
                problem,
                "TwoScaleNet + Gauss-Newton (no VarPro)",
                TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem),
                "gauss_newton",
                gn_points,
                gn_limit,
                200,
                1,
            )
        )
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    derivative_rows = bench_derivatives(args.quick)
    print("\n## Residual evaluation, seconds per 10^4 points (median)\n")
    print("| network | P | method | forward | fwd+bwd | fwd ratio vs autograd | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in derivative_rows:
        per = row["seconds_per_1e4_points"]
        base = per["autograd"]
        for method, values in per.items():
            print(
                f"| {row['network']} | {row['parameters']} | {method} | {values['forward']:.4f} | "
                f"{values['forward_backward']:.4f} | "
                f"{base['forward'] / values['forward']:.2f}x | "
                f"{base['forward_backward'] / values['forward_backward']:.2f}x |"
            )
    print("\n## Gauss-Newton Jacobian, seconds per 10^4 rows (median)\n")
    print("| network | outer products | vmap(jacrev) | ratio |")
    print("|---|---|---|---|")
    for row in derivative_rows:
        jac = row["jacobian_seconds_per_1e4_rows"]
        print(
            f"| {row['network']} | {jac['outer']:.3f} | {jac['vmap']:.3f} | "
            f"{jac['vmap'] / jac['outer']:.1f}x |"
        )
    runs = bench_training(args.quick)
    print("\n## paper_1d: accuracy against wall time (one seeded run each)\n")
    print("| ε | method | M | P | steps | wall [s] | rel. L² | rel. H¹ | time to L² ≤ 1e-6 [s] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        reached = run["time_to_1e-6_s"]
        print(
            f"| {run['eps']:.4g} | {run['method']} | {run['n_interior']} | {run['parameters']} | "
            f"{run['steps']} | {run['wall_s']:.1f} | {run['rel_l2']:.2e} | {run['rel_h1']:.2e} | "
            f"{'-' if reached is None else f'{reached:.1f}'} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "quick": args.quick,
                "threads": args.threads,
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "derivatives": derivative_rows,
                "training": runs,
            },
            indent=1,
        )
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
