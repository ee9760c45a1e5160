"""Table 1 of Hintermüller & Korolev in paper mode: the 2D problem (4.11), 4 methods × 5 seeds.

    python benchmarks/paper/table1_2d.py --paper [--device cuda] [--out DIR]   # the full table
    python benchmarks/paper/table1_2d.py --smoke                              # seconds, CPU
    python benchmarks/paper/table1_2d.py --estimate [--gpu-json gpu_run.json] # the cost

Paper mode (Section 4.4 and the 2D paragraph of Section 4):

- problem ``paper_2d(0.1)``: K^ε = 3 + sin(πx₁/ε) + sin(2πx₂/ε), q = 10 exp(-100|x - 0.5|²);
- networks: MLP 8 × 64 tanh (lr(0) = 1e-3) and Ms-PINN 2 × 128 tanh with scales (1, 1/ε)
  (lr(0) = 5e-4), Glorot initialisation;
- each plain (:class:`dolfinx_pinn.PINNSolver`) and hybrid (:class:`dolfinx_pinn.HybridSolver`:
  coarse P1 mesh h = 0.04, coupling (2.10), δ = ε, constant τ2 = 1, lazy update T_K = 100,
  tol 1e-2);
- M_Ω = 25 000 interior and M_∂Ω = 2 500 boundary points (soft boundary condition, τ1 = 1 with
  the loss balancing), uniformly random (the hybrid: uniform per coarse cell), full batch;
- Adam β = (0.9, 0.999), decay 0.75 every 1000 steps, gradient-norm loss balancing every 100
  steps, it_max = 2·10^5 (``--steps``); the residual's derivatives by the forward jet
  (``--derivatives``; nested autograd gives the same values);
- 5 seeds (network initialisation and collocation points);
- reported per run, as in Table 1: the relative L² and H¹-seminorm errors **at the smallest
  PDE residual of the history** (the network of the step whose residual loss is the smallest is
  kept and evaluated at the end), the iteration of it, and the compute time (to it and in
  all); per method the mean and standard deviation over the seeds. The reference is a P3 fine
  solution with 12 cells per period (about 1e-5 relative L², as in ``bench_hybrid.py``).

The runs need DOLFINx (the coarse solves of the hybrid, the fine reference): on a GPU machine,
run it in an environment that has both (``docker/Dockerfile`` with a CUDA build of PyTorch);
``--device cuda`` puts the networks there. Each finished run is written to
``<out>/runs/<case>_seed<k>.json`` at once, so the table can be built up over several sessions
(``--skip-done``); ``<out>/table1.json`` and ``table1.md`` hold the table.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  # isort: skip  (before dolfinx)

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dolfinx_pinn import HybridSolver, PINNSolver, paper_2d
from dolfinx_pinn.networks import MLP, MultiscaleFourierNet
from dolfinx_pinn.reference import relative_errors, solve_fine

CASES = ("mlp_plain", "mlp_hybrid", "ms_pinn_plain", "ms_pinn_hybrid")
LR = {"mlp": 1e-3, "ms_pinn": 5e-4}
PAPER = {"n_interior": 25_000, "n_boundary": 2_500, "steps": 200_000, "seeds": 5}
COARSE_H = 0.04


def make_network(kind: str, problem: Any, seed: int) -> torch.nn.Module:
    """MLP 8 × 64 or Ms-PINN 2 × 128 (scales 1, 1/ε), seed ``seed``."""
    if kind == "mlp":
        return MLP(2, 64, 8, seed=seed)
    return MultiscaleFourierNet.for_problem(problem, seed=seed)


def _pde_of(record: dict[str, Any]) -> float | None:
    """The PDE residual term of a step record (either solver's record layout)."""
    if "pde" in record:
        return float(record["pde"])
    terms = record.get("terms") or {}
    return float(terms["pde"]) if "pde" in terms else None


class SmallestResidual:
    """A callback keeping the network at the smallest PDE residual of the history.

    The record of step s holds the loss at the parameters before that step's update, i.e. after
    step s - 1; so the parameters are copied after each step and the copy of step s - 1 is kept
    when step s reports a new smallest residual.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        self.previous = copy.deepcopy(network.state_dict())
        self.best_state = self.previous
        self.best_residual = math.inf
        self.best_step = 0

    def __call__(self, step: int, record: dict[str, Any]) -> None:
        residual = _pde_of(record)
        if residual is not None and residual < self.best_residual:
            self.best_residual = residual
            self.best_state = self.previous
            self.best_step = step - 1
        self.previous = {k: v.detach().clone() for k, v in self.network.state_dict().items()}


def run_case(
    case: str,
    seed: int,
    *,
    reference: Any,
    steps: int,
    n_interior: int,
    n_boundary: int,
    device: str,
    eval_every: int,
    method: str = "jet",
) -> dict[str, Any]:
    """One run of Table 1: train, then the errors at the smallest residual and at the end."""
    problem = paper_2d(0.1)
    kind, mode = case.rsplit("_", 1)
    network = make_network(kind, problem, seed)
    options = {
        "n_interior": n_interior,
        "n_boundary": n_boundary,
        "tau1": 1.0,
        "seed": seed,
        "method": method,
    }
    train = {
        "lr": LR[kind],
        "decay_rate": 0.75,
        "decay_steps": 1000,
        "balancing": True,
        "balance_every": 100,
        "eval_every": eval_every,
    }
    started = time.perf_counter()
    if mode == "plain":
        solver: Any = PINNSolver(problem, network, device=device, **options)
    else:
        solver = HybridSolver(
            problem, network, device=device, coarse_h=COARSE_H, tau2=1.0, lazy=True, **options
        )
        train.update(tau2_schedule="constant", lazy_every=100, lazy_tol=1e-2, progress=False)
    tracker = SmallestResidual(solver.network)
    try:
        history = solver.train("adam", steps, callback=tracker, **train)
        wall = time.perf_counter() - started
        final = relative_errors(solver.network, reference)
        solver.network.load_state_dict(tracker.best_state)
        best = relative_errors(solver.network, reference)
    finally:
        if mode == "hybrid":
            solver.destroy()
    times = history["time"]
    best_time = times[tracker.best_step - 1] if tracker.best_step > 0 else 0.0
    return {
        "case": case,
        "seed": seed,
        "steps": len(history["step"]),
        "n_interior": n_interior,
        "n_boundary": n_boundary,
        "device": str(device),
        "derivatives": method,
        "l2_at_smallest_residual": best[0],
        "h1_at_smallest_residual": best[1],
        "iteration_of_smallest_residual": tracker.best_step,
        "smallest_residual": tracker.best_residual,
        "seconds_to_smallest_residual": best_time,
        "train_seconds": times[-1] if times else 0.0,
        "wall_seconds": wall,
        "seconds_per_step": (times[-1] / len(times)) if times else None,
        "final_l2": final[0],
        "final_h1": final[1],
        "loss_every_100": history["loss"][::100],
    }


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over the seeds, per case."""
    keys = (
        "l2_at_smallest_residual",
        "h1_at_smallest_residual",
        "iteration_of_smallest_residual",
        "seconds_to_smallest_residual",
        "train_seconds",
    )
    result = {}
    for case in CASES:
        mine = [r for r in rows if r["case"] == case]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in mine)}
        for key in keys:
            values = [float(r[key]) for r in mine]
            entry[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
        result[case] = entry
    return result


def markdown(summary: dict[str, Any]) -> str:
    """The table as markdown."""
    lines = [
        "| case | seeds | rel. L² at smallest residual | rel. H¹ | iterations | time to it (s) |"
        " time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, entry in summary.items():

        def cell(key: str, fmt: str, entry: dict[str, Any] = entry) -> str:
            return f"{entry[key]['mean']:{fmt}} ± {entry[key]['std']:{fmt}}"

        lines.append(
            f"| {case} | {len(entry['seeds'])} | {cell('l2_at_smallest_residual', '.2e')} | "
            f"{cell('h1_at_smallest_residual', '.2e')} | "
            f"{cell('iteration_of_smallest_residual', '.0f')} | "
            f"{cell('seconds_to_smallest_residual', '.0f')} | {cell('train_seconds', '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def step_time(
    case: str, device: str, n_interior: int, n_boundary: int, steps: int, method: str = "jet"
) -> float:
    """Median seconds per Adam step of a case (after one warm-up step), no reference."""
    problem = paper_2d(0.1)
    kind, mode = case.rsplit("_", 1)
    network = make_network(kind, problem, 0)
    options = {
        "n_interior": n_interior,
        "n_boundary": n_boundary,
        "tau1": 1.0,
        "device": device,
        "method": method,
    }
    if mode == "plain":
        solver: Any = PINNSolver(problem, network, **options)
        history = solver.train("adam", steps + 1, lr=LR[kind], balancing=True)
    else:
        with HybridSolver(problem, network, coarse_h=COARSE_H, **options) as solver:
            history = solver.train("adam", steps + 1, lr=LR[kind], progress=False)
    times = history["time"]
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """The cost of the paper-mode table from step times measured here (and on a GPU)."""
    runs = PAPER["seeds"] * PAPER["steps"]
    points = args.est_points or (PAPER["n_interior"], PAPER["n_boundary"])
    result: dict[str, Any] = {
        "runs_per_case": PAPER["seeds"],
        "steps_per_run": PAPER["steps"],
        "points": list(points),
        "derivatives": args.derivatives,
        "threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    cpu = {}
    for case in args.cases:
        seconds = step_time(case, "cpu", points[0], points[1], args.est_steps, args.derivatives)
        cpu[case] = {"seconds_per_step": seconds, "hours_for_5_seeds": seconds * runs / 3600}
        print(case, cpu[case], flush=True)
    result["cpu_one_thread"] = cpu
    result["cpu_total_hours"] = sum(v["hours_for_5_seeds"] for v in cpu.values())
    result["load_average_end"] = list(os.getloadavg())
    if args.gpu_json and Path(args.gpu_json).is_file():
        gpu = json.loads(Path(args.gpu_json).read_text())
        rows = {
            (r["config"], r["dtype"], r["mode"]): r["seconds_per_step"]
            for r in gpu.get("timing", [])
            if "seconds_per_step" in r
        }
        per_case = {}
        for case in args.cases:
            config = "2d_mlp_25000+2500" if case.startswith("mlp") else "2d_ms_pinn_25000+2500"
            options = {m: rows.get((config, "float64", m)) for m in ("eager", "graph", "compile")}
            per_case[case] = {
                mode: {"seconds_per_step": s, "hours_for_5_seeds": s * runs / 3600}
                for mode, s in options.items()
                if s is not None
            }
        result["gpu"] = {
            "name": gpu.get("environment", {}).get("gpu_name"),
            "note": "plain PINN step of gpu_run.py; the hybrid adds the coupling (small)",
            "cases": per_case,
        }
    return result


def _points(text: str) -> tuple[int, int]:
    """``"25000,2500"`` -> (25000, 2500)."""
    try:
        interior, boundary = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INTERIOR,BOUNDARY, got {text!r}") from None
    if interior < 1 or boundary < 1:
        raise argparse.ArgumentTypeError(f"point counts must be >= 1, got {text!r}")
    return interior, boundary


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--paper", action="store_true", help="the full Table 1 (paper settings)")
    mode.add_argument("--smoke", action="store_true", help="a few steps at tiny sizes")
    mode.add_argument("--estimate", action="store_true", help="measure step times, give costs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/paper/table1; --smoke: a temporary "
        "folder's table1_smoke)",
    )
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (paper: 5)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (paper: 2e5)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--skip-done", action="store_true", help="keep finished runs")
    parser.add_argument("--gpu-json", default=None, help="gpu_run.json for --estimate")
    parser.add_argument("--est-steps", type=int, default=3, help="timed steps per case")
    parser.add_argument(
        "--est-points",
        type=_points,
        default=None,
        help="INTERIOR,BOUNDARY points of --estimate (default: the paper's 25000,2500)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--derivatives", default="jet", help="derivative method (jet, autograd, ...)"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "table1_smoke"
            if args.smoke
            else Path("benchmarks/results/paper/table1")
        )
    torch.set_num_threads(args.threads)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {CASES}")
    args.cases = cases
    if args.estimate:
        result = estimate(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "estimate.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    if args.paper:
        seeds = args.seeds or PAPER["seeds"]
        steps = args.steps or PAPER["steps"]
        points = (PAPER["n_interior"], PAPER["n_boundary"])
        reference = solve_fine(paper_2d(0.1), degree=3, elements_per_period=12)
        eval_every = args.eval_every or 10_000
    else:
        seeds, steps, points = args.seeds or 1, args.steps or 3, (400, 40)
        reference = solve_fine(paper_2d(0.1), degree=1, elements_per_period=4)
        eval_every = args.eval_every or 10**9
    folder = args.out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        for seed in range(seeds):
            path = folder / f"{case}_seed{seed}.json"
            if args.skip_done and path.is_file():
                rows.append(json.loads(path.read_text()))
                continue
            row = run_case(
                case,
                seed,
                reference=reference,
                steps=steps,
                n_interior=points[0],
                n_boundary=points[1],
                device=args.device,
                eval_every=eval_every,
                method=args.derivatives,
            )
            row["paper_mode"] = bool(args.paper)
            path.write_text(json.dumps(row, indent=1) + "\n")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loss_every_100"}), flush=True)
    summary = table(rows)
    (args.out / "table1.json").write_text(json.dumps({"cases": summary, "rows": rows}, indent=1))
    (args.out / "table1.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
