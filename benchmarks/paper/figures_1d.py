"""Figures 1-2 of Hintermüller & Korolev from the saved 1D runs, and their summary.

    python benchmarks/paper/figures_1d.py [--runs benchmarks/results/paper/runs] \
        [--out benchmarks/results/paper] [--gpu-json .../gpu_run.json]

For each ε with saved runs (``reproduce_1d.py``), ``figure_1d_<tag>.png`` has the paper's panels

- (a) the hybrid fine-scale solution v against the FEM solution u_h (P1 on the paper's
  validation mesh: h = 5e-4 for ε = 1/15, 2e-4 for ε = 0.01);
- (b) at the coarse nodes (h = 0.004): the predicted state y_h(v) (coarse solve with K̃[v]),
  the true discrete state y_h(u_h) (coarse solve with K̃[u_h] of the FEM solution), and the
  compressions Q̄v and Q̄u_h (3.26) on the hybrid's collocation points, δ = ε;
- (c) the relative L² error against the iterations of both methods (and the GPU runs of
  ``gpu_run.py`` if given);
- (d) the Ms-PINN against u_h (not in the paper's figure; its error is in (c)).

``summary.json`` has per run the final and best relative L² and H¹ errors, the steps, the
seconds per step and K̃, and per ε the coarse-scale quantities of panel (b).
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  # isort: skip  (before dolfinx)

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from dolfinx_pinn import HybridSolver, exact_1d, paper_1d
from dolfinx_pinn.reference import solve_fine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_1d import COARSE_H, build_network, default_points

EPSILONS = {"eps1_15": 1 / 15, "eps0.01": 0.01}
LABEL = {"eps1_15": "ε = 1/15", "eps0.01": "ε = 0.01"}
#: The paper's validation meshes (4.29): h = 5e-4 and 2e-4.
FEM_CELLS = {"eps1_15": 2000, "eps0.01": 5000}
PAPER = {
    "eps1_15": {"ms_pinn": "≈ 1e-2", "hybrid": "≈ 0.3 (upscaling-consistency gap)"},
    "eps0.01": {"ms_pinn": "almost two orders worse than the hybrid", "hybrid": "≈ 0.1"},
}


def load_run(folder: Path) -> dict[str, Any] | None:
    """A saved run: ``meta.json`` and the error curve of ``errors.csv`` (``None`` when missing).

    Returns ``{"meta", "history"}`` with ``history`` holding ``eval_step``, ``eval_time``,
    ``l2``, ``h1`` (the whole per-step history is in ``history.json`` and ``steps.csv``, which
    are not needed here and not committed).
    """
    meta_path, errors_path = folder / "meta.json", folder / "errors.csv"
    if not (meta_path.is_file() and errors_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    with errors_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    history = {
        "eval_step": [int(r["step"]) for r in rows],
        "eval_time": [float(r["time"]) for r in rows],
        "l2": [float(r["l2"]) for r in rows],
        "h1": [float(r["h1"]) for r in rows],
    }
    return {"meta": meta, "history": history}


def network_of(folder: Path, problem: Any) -> torch.nn.Module:
    """The saved network of a run."""
    network = build_network(problem)
    network.load_state_dict(torch.load(folder / "network.pt", map_location="cpu"))
    return network.eval()


def fem_solution(problem: Any, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """The P1 FEM solution on a uniform mesh: sorted node coordinates and values."""
    u_h = solve_fine(problem, n=cells, degree=1)
    x = u_h.function_space.tabulate_dof_coordinates()[:, 0]
    order = np.argsort(x)
    return x[order], u_h.x.array[order].copy()


def coarse_panel(
    problem: Any, network: torch.nn.Module, points: int, coarse_h: float = COARSE_H
) -> dict[str, Any]:
    """The quantities of panel (b): y_h(v), y_h(u_h), Q̄v, Q̄u_h at the coarse nodes."""
    exact = exact_1d(problem)
    with HybridSolver(
        problem,
        network,
        coarse_h=coarse_h,
        n_interior=points,
        delta=problem.eps,
        seed=0,
        lazy=True,
    ) as solver:
        coarse = solver.coarse
        n = coarse.num_owned_dofs
        x = coarse.space.tabulate_dof_coordinates()[:n, 0].copy()
        state_v = solver.coarse_state()
        y_v = state_v.x.array[:n].copy()
        Q_v = solver.compression_function().x.array[:n].copy()
        K_v = float(solver.admissible_coefficient(solver.upscaled_coefficient().detach()))
        # u_h: the exact solution (the FEM solution on the validation mesh agrees with it to
        # the FEM error); K̃[u_h] of (4.10) by the solver's own Monte-Carlo estimator (the
        # network's K̃ uses it) and by quadrature (ExactSolution1D.K_tilde).
        interior = solver.interior_points.detach().cpu().numpy()
        K_values = problem.K(torch.as_tensor(interior)).detach().numpy().reshape(-1)
        du = exact.du(interior[:, 0])
        K_u_mc = float(np.mean(K_values * (du + 1.0)))
        y_u = coarse.solve_state(np.array(exact.K_tilde))
        columns = solver.compression_points.detach().cpu().numpy()
        values = torch.as_tensor(exact.u(columns[:, 0]), dtype=torch.float64)
        Q_u = solver.compression(values).detach().cpu().numpy()
    order = np.argsort(x)

    def gap(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.max(np.abs(a - b)))

    return {
        "x": x[order],
        "y_v": y_v[order],
        "y_u": y_u[order],
        "Q_v": Q_v[order],
        "Q_u": Q_u[order],
        "K_tilde_v": K_v,
        "K_tilde_u_quadrature": exact.K_tilde,
        "K_tilde_u_monte_carlo": K_u_mc,
        "max_abs": {
            "y_h(v) - y_h(u_h)": gap(y_v, y_u),
            "Q̄v - y_h(v)": gap(Q_v, y_v),
            "Q̄u_h - y_h(u_h) (consistency gap)": gap(Q_u, y_u),
            "Q̄v - Q̄u_h": gap(Q_v, Q_u),
            "max |y_h(u_h)|": float(np.max(np.abs(y_u))),
        },
    }


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """Final and best errors, steps and step time of a saved run."""
    history, meta = run["history"], run["meta"]
    l2, h1 = history["l2"], history["h1"]
    best = int(np.argmin(l2))
    steps = int(meta["steps_done"])
    summary = {
        "steps": steps,
        "steps_planned": meta.get("steps_planned"),
        "final_l2": l2[-1],
        "final_h1": h1[-1],
        "best_l2": l2[best],
        "best_l2_step": history["eval_step"][best],
        "best_h1": min(h1),
        "train_time_s": meta.get("train_time_s"),
        "seconds_per_step": meta.get("seconds_per_step"),
        "n_interior": meta.get("n_interior"),
        "derivatives": meta.get("derivatives"),
    }
    if "final_K_tilde" in meta:
        summary["final_K_tilde"] = meta["final_K_tilde"]
    return summary


def _log_limits(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return min(finite) / 1.3, max(finite) * 1.3


def figure(
    tag: str,
    runs: dict[str, dict[str, Any]],
    folders: dict[str, Path],
    out: Path,
    gpu: dict[str, Any] | None,
) -> dict[str, Any]:
    """The four panels of one ε; returns the coarse-panel numbers."""
    eps = EPSILONS[tag]
    problem = paper_1d(eps)
    x_fem, u_fem = fem_solution(problem, FEM_CELLS[tag])
    grid = np.linspace(0.0, 1.0, 4001)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_a, ax_b), (ax_c, ax_d) = axes
    result: dict[str, Any] = {}
    for method, ax, name in (("hybrid", ax_a, "hybrid"), ("ms_pinn", ax_d, "Ms-PINN")):
        if method not in runs:
            ax.set_visible(False)
            continue
        network = network_of(folders[method], problem)
        with torch.no_grad():
            v = network(torch.as_tensor(grid[:, None])).numpy()
        steps = runs[method]["meta"]["steps_done"]
        ax.plot(x_fem, u_fem, "k-", lw=1.0, label=f"FEM u_h (P1, h = {1 / FEM_CELLS[tag]:.0e})")
        ax.plot(grid, v, "C1--" if method == "hybrid" else "C0--", lw=1.0,
                label=f"{name} v after {steps} steps")  # fmt: skip
        ax.set_xlabel("x")
        ax.set_ylabel("u")
        panel = "(a)" if method == "hybrid" else "(d)"
        ax.set_title(f"{panel} {name} fine-scale solution and FEM solution, {LABEL[tag]}")
        ax.legend(fontsize=8)
    if "hybrid" in runs:
        meta = runs["hybrid"]["meta"]
        points = meta.get("n_interior") or default_points(eps)
        coarse_h = meta.get("coarse_h") or COARSE_H
        network = network_of(folders["hybrid"], problem)
        coarse = coarse_panel(problem, network, points, coarse_h)
        ax_b.plot(
            coarse["x"],
            coarse["y_v"],
            "C1-",
            lw=1.2,
            label=f"y_h(v), K̃[v] = {coarse['K_tilde_v']:.4f}",
        )
        ax_b.plot(
            coarse["x"],
            coarse["y_u"],
            "k-",
            lw=1.2,
            label=f"y_h(u_h), K̃[u_h] = {coarse['K_tilde_u_quadrature']:.4f}",
        )
        ax_b.plot(coarse["x"], coarse["Q_v"], "C1:", lw=1.5, label="Q̄v")
        ax_b.plot(coarse["x"], coarse["Q_u"], "C2--", lw=1.2, label="Q̄u_h")  # fmt: skip
        ax_b.set_xlabel(f"x (coarse nodes, h = {coarse_h:g})")
        ax_b.set_ylabel("coarse-scale value")
        ax_b.set_title(f"(b) coarse states and compressions (δ = ε), {LABEL[tag]}")
        ax_b.legend(fontsize=8)
        result = {k: v for k, v in coarse.items() if not isinstance(v, np.ndarray)}
    else:
        ax_b.set_visible(False)
    all_errors: list[float] = []
    for method, style, name in (("ms_pinn", "C0-", "Ms-PINN"), ("hybrid", "C1-", "hybrid")):
        if method in runs:
            history = runs[method]["history"]
            ax_c.plot(history["eval_step"], history["l2"], style, lw=1.0, label=f"{name} (CPU)")
            all_errors += history["l2"]
    if gpu is not None:
        for name, run in gpu.get("runs_1d", {}).get("runs", {}).items():
            if f"_{tag}_" not in name or not name.endswith("f64"):
                continue
            history = run["history"]
            style = "C1:" if name.startswith("hybrid") else "C0:"
            ax_c.plot(history["eval_step"], history["l2"], style, lw=1.0, label=f"{name} (GPU)")
            all_errors += history["l2"]
    if all_errors:
        ax_c.set_yscale("log")
        ax_c.set_ylim(*_log_limits(all_errors))
    ax_c.set_xlabel("iteration")
    ax_c.set_ylabel("relative L² error")
    ax_c.set_title(f"(c) relative L² error against iterations, {LABEL[tag]}")
    ax_c.grid(True, which="both", alpha=0.3)
    ax_c.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"figure_1d_{tag}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    result["figure"] = str(path)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/paper/runs"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper"))
    parser.add_argument("--gpu-json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = json.loads(args.gpu_json.read_text()) if args.gpu_json else None
    summary: dict[str, Any] = {"runs": {}, "coarse": {}, "paper": PAPER}
    for tag in EPSILONS:
        folders = {m: args.runs / f"{m}_{tag}" for m in ("ms_pinn", "hybrid")}
        runs = {m: r for m, f in folders.items() if (r := load_run(f)) is not None}
        if not runs:
            continue
        for method, run in runs.items():
            summary["runs"][f"{method}_{tag}"] = run_summary(run)
        if len(runs) == 2:  # both methods at the last evaluation they share
            common = sorted(
                set.intersection(*(set(r["history"]["eval_step"]) for r in runs.values()))
            )
            if common:
                step = common[-1]
                summary.setdefault("at_common_step", {})[tag] = {
                    "step": step,
                    **{
                        f"{m}_l2": r["history"]["l2"][r["history"]["eval_step"].index(step)]
                        for m, r in runs.items()
                    },
                }
        summary["coarse"][tag] = figure(tag, runs, folders, args.out, gpu)
        summary["exact_K_tilde_" + tag] = exact_1d(paper_1d(EPSILONS[tag])).K_tilde
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
