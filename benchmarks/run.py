"""One benchmark command: accuracy against time, throughput, coarse solves, parallel scaling.

    python benchmarks/run.py [--quick] [--cases a,b,...] [--repeats N] [--device cpu|cuda|auto]
    make bench [BENCH_ARGS="--quick"]        # the same
    dolfinx-pinn bench [--quick] ...         # the same, from the console script

Writes ``benchmarks/results/<host>-<device>.json``, a markdown table ``<host>-<device>.md`` and
the accuracy-against-wall-time plots ``<host>-<device>-accuracy_1d.png`` / ``-accuracy_2d.png``
next to them. Every case reports what it measures against a target; a missed target is reported
with the measured figure, never hidden.

Cases (``--cases``, default all):

- ``hybrid_1d``: paper_1d, ε = 1/15 and 0.01: Ms-PINN + Adam (paper settings), the paper's hybrid
  (Ms-PINN + Adam, constant τ2) and the best hybrid (TwoScaleNet + Gauss-Newton, τ2 continuation).
- ``hybrid_2d``: paper_2d, ε = 0.1: MLP 8×64 and Ms-PINN 2×128, plain and hybrid, against a P3
  fine reference; ``--quick`` trains each for a short budget, full mode for the paper's 25000 +
  2500 points.
- ``throughput``: residual + gradient time per 10^4 collocation points for each derivative method
  and network, on the CPU and (when present) the GPU.
- ``coarse``: the coarse state + adjoint solve time against the coarse mesh size, and its share of
  a hybrid training step in the paper's 2D setting.
- ``parallel``: one hybrid 2D training step on 1 against 2 ranks (one thread per rank), with the
  equality of the loss histories.
- ``solve``: ``dolfinx_pinn.solve`` on ``paper_1d``/``paper_2d`` at every ε of the targets, each
  in its own process (time, errors, unknowns, GFLOP/s against a dense matmul, peak memory; see
  ``bench_solve.py``).
- ``coefficients``: held-out coefficients (several harmonics, contrast to 10^4, a product, an
  inclusion, an anisotropic tensor) through ``dolfinx_pinn.solve``, with the verdict's agreement
  (see ``bench_coefficients.py``).
- ``crossover``: plain DOLFINx FEM (P1/P2, MUMPS/GAMG, a ladder of meshes) against
  ``dolfinx_pinn.solve``, time to the same accuracy for each ε (see ``bench_crossover.py``);
  writes ``<host>-<device>-crossover.png``.
- ``geometry``: the gmsh plate demo (2D, ε = 0.05) and ``paper_3d(0.1)`` on the unit cube
  through ``dolfinx_pinn.solve`` against fine FEM, with plain FEM beside (``bench_geometry.py``).
- ``band``: the boundary band on a 2D mesh domain (the unit square as a dolfinx mesh), with and
  without it, against a fine reference, with plain P2 FEM beside (``bench_band.py``).

Medians over ``--repeats`` runs; timings are side by side in one run on one machine.
"""

from __future__ import annotations

from mpi4py import MPI  # isort: skip  (before dolfinx)

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ALL_CASES = (
    "throughput",
    "coarse",
    "hybrid_1d",
    "hybrid_2d",
    "parallel",
    "solve",
    "coefficients",
    "crossover",
    "geometry",
    "band",
)


def median_time(function: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (after one warm-up call)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """A short, file-name friendly name of the device (``cpu`` or the GPU's name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


# -- throughput -------------------------------------------------------------------------------
def case_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Residual + parameter gradient per 10^4 points, per derivative method and network."""
    from dolfinx_pinn.networks import MLP, HardBoundaryNet, MultiscaleFourierNet, TwoScaleNet
    from dolfinx_pinn.problems import paper_1d, paper_2d
    from dolfinx_pinn.residual import PDEBlock

    points = 2_000 if args.quick else 10_000
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    rows = []
    for problem in (paper_1d(0.01), paper_2d(0.1)):
        networks = {
            "MLP 8x64": lambda p=problem: HardBoundaryNet(MLP(p.dim, 64, 8, seed=0), p),
            "Ms-PINN 2x128": lambda p=problem: HardBoundaryNet(
                MultiscaleFourierNet.for_problem(p, seed=0), p
            ),
            "TwoScaleNet": lambda p=problem: TwoScaleNet.for_problem(p, seed=0),
        }
        for target in devices:
            count = points * (10 if target.type == "cuda" else 1)
            x = torch.tensor(
                problem.domain.sample_interior(count, np.random.default_rng(0)), device=target
            )
            for label, make in networks.items():
                network = make().to(target)
                block = PDEBlock(problem, x)
                seconds = {}
                compile_seconds = None
                for method in ("jet", "jet_compiled", "func", "autograd"):
                    block.method = method

                    def step(network: torch.nn.Module = network, block: PDEBlock = block) -> None:
                        network.zero_grad()
                        block.loss(network).backward()
                        if target.type == "cuda":
                            torch.cuda.synchronize(target)

                    if method == "jet_compiled":
                        # torch.compile's warm-up (tracing and code generation) is not timed.
                        started = time.perf_counter()
                        step()
                        compile_seconds = time.perf_counter() - started
                    seconds[method] = median_time(step, args.repeats) * 1e4 / count
                fastest = min(seconds, key=seconds.get)
                rows.append(
                    {
                        "problem": problem.name,
                        "dim": problem.dim,
                        "network": label,
                        "device": device_name(target),
                        "points": count,
                        "seconds_per_1e4_points": seconds,
                        "compile_seconds": compile_seconds,
                        "fastest": fastest,
                        "speedup_vs_autograd": seconds["autograd"] / seconds[fastest],
                    }
                )
                print(
                    f"  throughput {problem.name} {label} on {device_name(target)}: "
                    + ", ".join(f"{m} {s:.3f}" for m, s in seconds.items())
                    + f" s/1e4 (compile {compile_seconds:.1f} s)",
                    flush=True,
                )
    two_d = [r for r in rows if r["dim"] == 2 and r["device"] == "cpu"]
    worst = min(r["speedup_vs_autograd"] for r in two_d)
    return {
        "rows": rows,
        "targets": [
            {
                "target": "fastest derivative method >= 2x nested autograd, 2D residual (CPU)",
                "measured": f"{worst:.2f}x (slowest network)",
                "met": worst >= 2.0,
            }
        ],
    }


# -- coarse -------------------------------------------------------------------------------------
def case_coarse(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Coarse state + adjoint + dL/dK̃ time against the coarse mesh size (paper_2d)."""
    from dolfinx_pinn.coarse import CoarseProblem
    from dolfinx_pinn.problems import paper_2d

    comm = MPI.COMM_SELF
    problem = paper_2d(0.1)
    sizes = (8, 16, 25, 50) if args.quick else (8, 16, 25, 50, 100, 200)
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        coarse = CoarseProblem(problem, problem.create_mesh(comm, n), parametrization="entry")

        def solve(coarse: CoarseProblem = coarse) -> None:
            # A new K̃ each time: reassembly, refactorisation, state and adjoint solves.
            K = 3.0 + 0.1 * rng.random()
            y = coarse.solve_state(K)
            coarse.solve_adjoint(K, y - y.mean())
            coarse.parameter_gradient(y)

        seconds = median_time(solve, 3 * args.repeats)
        rows.append({"cells_per_side": n, "dofs": coarse.num_global_dofs, "seconds": seconds})
        print(
            f"  coarse n = {n}: {coarse.num_global_dofs} dofs, {seconds * 1e3:.2f} ms", flush=True
        )
        coarse.destroy()
    return {"rows": rows, "targets": []}


# -- training cases (hybrid_1d, hybrid_2d, parallel) live in bench_hybrid ---------------------
def case_hybrid_1d(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_hybrid.benchmark_1d`."""
    sys.path.insert(0, str(HERE))
    import bench_hybrid

    return bench_hybrid.benchmark_1d(quick=args.quick, device=device)


def case_hybrid_2d(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_hybrid.benchmark_2d`."""
    sys.path.insert(0, str(HERE))
    import bench_hybrid

    return bench_hybrid.benchmark_2d(quick=args.quick, device=device)


def case_parallel(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One 2D hybrid training step on 1 and on 2 ranks, one thread per rank, same results."""
    runs = {}
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for ranks in (1, 2):
        output = Path(args.out) / f".parallel_{ranks}.json"
        mpirun = Path(sys.executable).with_name("mpirun")
        command = [
            str(mpirun if mpirun.exists() else "mpirun"),
            "-n",
            str(ranks),
            sys.executable,
            str(HERE / "bench_hybrid.py"),
            "--step-time",
            "--json",
            str(output),
        ] + (["--quick"] if args.quick else [])
        subprocess.run(command, check=True, env=environment)
        runs[ranks] = json.loads(output.read_text())
        output.unlink()
    speedup = runs[1]["seconds_per_step"] / runs[2]["seconds_per_step"]
    losses_1, losses_2 = np.asarray(runs[1]["loss"]), np.asarray(runs[2]["loss"])
    difference = float(np.max(np.abs(losses_1 - losses_2) / np.abs(losses_1)))
    return {
        "rows": [{"ranks": r, **{k: v for k, v in runs[r].items() if k != "loss"}} for r in runs],
        "max_relative_loss_difference": difference,
        "targets": [
            {
                "target": "2 ranks >= 1.6x faster per 2D step than 1 rank (1 thread per rank)",
                "measured": f"{speedup:.2f}x",
                "met": speedup >= 1.6,
            },
            {
                "target": "1 and 2 ranks give equal loss histories to 1e-10",
                "measured": f"{difference:.1e}",
                "met": difference <= 1e-10,
            },
        ],
    }


def case_solve(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_solve.benchmark`: the ε-robustness targets of ``dolfinx_pinn.solve``."""
    sys.path.insert(0, str(HERE))
    import bench_solve

    return bench_solve.benchmark(quick=args.quick, repeats=args.repeats)


def case_coefficients(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_coefficients.benchmark`: held-out coefficients through ``solve``."""
    sys.path.insert(0, str(HERE))
    import bench_coefficients

    return bench_coefficients.benchmark(quick=args.quick)


def case_crossover(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_crossover.benchmark` (``--quick``: fewer ε and rungs)."""
    sys.path.insert(0, str(HERE))
    import bench_crossover

    mode = "quick" if args.quick else "full"
    return bench_crossover.benchmark(mode, repeats=args.repeats, device=device.type)


def case_geometry(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_geometry.benchmark`: the gmsh plate (2D) and the unit cube (3D)."""
    sys.path.insert(0, str(HERE))
    import bench_geometry

    return bench_geometry.benchmark(quick=args.quick)


def case_band(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """See :func:`bench_band.benchmark`: the boundary band on a mesh domain."""
    sys.path.insert(0, str(HERE))
    import bench_band

    return bench_band.benchmark(quick=args.quick)


CASES: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
    "throughput": case_throughput,
    "coarse": case_coarse,
    "hybrid_1d": case_hybrid_1d,
    "hybrid_2d": case_hybrid_2d,
    "parallel": case_parallel,
    "solve": case_solve,
    "coefficients": case_coefficients,
    "crossover": case_crossover,
    "geometry": case_geometry,
    "band": case_band,
}


# -- report -------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """The results as one markdown document: targets first, then one table per case."""
    lines = [
        f"# Benchmarks on {results['host']} ({results['device']})",
        "",
        f"{results['machine']}, torch {results['torch']}, {results['cpu_count']} CPU cores, "
        f"{'quick' if results['quick'] else 'full'} mode, medians over {results['repeats']} "
        f"repeats, {results['date']}.",
        "",
        "## Targets",
        "",
        "| case | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name, case in results["cases"].items():
        for target in case.get("targets", []):
            met = "yes" if target["met"] else "**no**"
            lines.append(f"| {name} | {target['target']} | {target['measured']} | {met} |")
    for name, case in results["cases"].items():
        rows = case.get("rows", [])
        if not rows:
            continue
        lines += ["", f"## {name}", ""]
        keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
        # Curves go to the plots, not the table.
        nested = [k for k in rows[0] if isinstance(rows[0][k], dict) and k != "curve"]
        header = keys + [f"{k}.{sub}" for k in nested for sub in rows[0][k]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            cells = [row.get(k) for k in keys]
            cells += [row[k].get(sub) for k in nested for sub in rows[0][k]]
            lines.append("| " + " | ".join(_format(c) for c in cells) + " |")
        if case.get("markdown"):  # a case's own further tables
            lines += ["", case["markdown"]]
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return "-" if value is None else str(value)


def accuracy_plots(results: dict[str, Any], stem: Path) -> list[str]:
    """Relative L² error against wall time, all methods on one axis, per dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for case in ("hybrid_1d", "hybrid_2d"):
        curves = [r for r in results["cases"].get(case, {}).get("rows", []) if r.get("curve")]
        if not curves:
            continue
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for row in curves:
            time_s, l2 = row["curve"]["time"], row["curve"]["l2"]
            if time_s:
                label = f"{row['label']}, ε = {row['eps']:.3g}"
                axis.loglog(np.maximum(time_s, 1e-2), l2, marker=".", label=label)
        axis.set_xlabel("wall time [s]")
        axis.set_ylabel("relative $L^2$ error")
        axis.set_title(f"{case}: {results['host']} ({results['device']})")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = Path(f"{stem}-accuracy_{case.split('_')[1]}.png")
        figure.savefig(path, dpi=130)
        plt.close(figure)
        written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases and write the results (rank 0 of COMM_WORLD only)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs (< 10 min on 2 cores)")
    parser.add_argument(
        "--cases", default=",".join(ALL_CASES), help=f"comma-separated subset of {ALL_CASES}"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (median)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if present)")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(ALL_CASES)}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or auto, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "host": socket.gethostname().split(".")[0],
        "device": device_name(device),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "quick": args.quick,
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cases": {},
    }
    for name in cases:
        print(f"[{name}]", flush=True)
        started = time.perf_counter()
        results["cases"][name] = CASES[name](args, device)
        results["cases"][name]["seconds"] = time.perf_counter() - started
    stem = out / f"{results['host']}-{results['device']}"
    results["plots"] = accuracy_plots(results, stem)
    if "crossover" in results["cases"]:
        import bench_crossover

        results["plots"] += bench_crossover.plot(results["cases"]["crossover"], stem)
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1, default=float))
    Path(f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {stem}.json, {stem}.md", *results["plots"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
