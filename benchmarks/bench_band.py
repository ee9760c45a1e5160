"""The boundary band on a 2D mesh domain (issue 16): ``solve`` with and without it, and FEM.

The unit square given as a dolfinx mesh (10 x 10 cells, so ``solve`` treats it as a mesh
domain, not a box), ``paper_2d``'s coefficient, ``u = x1 x2`` on ∂Ω and ``q = 1 + x1``, at
ε = 0.05 and 0.02 (quick: 0.1, 0.05), against a P3 reference on the mesh refined to 8 cells per
finest period (CG + GAMG; ε = 0.01 would take 15 M P3 dofs):

- ``band``: ``dolfinx_pinn.solve(problem)`` (the boundary band of 1.5 periods coupled to the
  basis in the interior; ``dolfinx_pinn.bands``),
- ``basis``: the same with ``boundary_band=0`` (the basis alone, soft Dirichlet rows),
- plain P2 FEM (CG + GAMG) on the mesh refined to 2, 4 and 8 cells per finest period (the
  last on the reference's mesh), and the cheapest rung that reaches the band's rel. L² and H¹.

Every solve is timed after an untimed one of the same kind (the forms compiled); serial, one
process, the threads of ``OMP_NUM_THREADS``. No target of the issue is on this case: it shows
where the band stands where the domain has an interior many periods across.

    python benchmarks/bench_band.py [--quick] [--out DIR]
"""

from __future__ import annotations

from mpi4py import MPI  # isort: skip

import argparse
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import dolfinx

import dolfinx_pinn as dp
from dolfinx_pinn.auto import ConvergenceWarning

HERE = Path(__file__).resolve().parent
COMM = MPI.COMM_SELF


def square_problem(eps: float) -> dp.MultiscaleProblem:
    """The benchmark's problem at ``eps``."""
    mesh = dolfinx.mesh.create_unit_square(COMM, 10, 10)
    return dp.MultiscaleProblem(
        dp.paper_2d(eps).coefficient_definition,
        lambda x, m: 1.0 + x[0],
        eps,
        dim=2,
        period=(2.0, 1.0),
        domain=mesh,
        alpha=1.0,
        beta=5.0,
        dirichlet=lambda x, m: x[0] * x[1],
        name=f"square_mesh_domain_{eps:g}",
    )


def _solve(problem: dp.MultiscaleProblem, reference: Any, band: float) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        dp.solve(problem, comm=COMM, boundary_band=band)  # forms compiled, not timed
        started = time.perf_counter()
        solution = dp.solve(problem, comm=COMM, boundary_band=band, reference=reference)
        seconds = time.perf_counter() - started
    metrics = solution.metrics
    row = {
        "rel_l2": metrics["rel_l2"],
        "rel_h1": metrics["rel_h1"],
        "seconds": seconds,
        "converged": metrics["converged"],
        "unknowns": metrics["unknowns"],
    }
    if metrics.get("boundary_band"):
        report = metrics["boundary_band"]
        keys = ("fraction_of_area", "dofs", "gmres_iterations", "whole_domain", "interface_dofs")
        row["band"] = {key: report.get(key) for key in keys}
    return row


def _fem(problem: dp.MultiscaleProblem, reference: Any, per_period: int) -> dict[str, Any]:
    domain = problem.domain
    dp.solve_fine(problem, degree=2, mesh=domain.mesh, solver="gamg")  # forms compiled
    started = time.perf_counter()
    mesh = domain.refined_mesh(problem.finest_scale / per_period)
    uh = dp.solve_fine(problem, degree=2, mesh=mesh, solver="gamg")
    seconds = time.perf_counter() - started
    l2, h1 = dp.relative_errors(uh, reference)
    # Refinement halves the cells: the mesh has at least per_period cells per period.
    return {
        "cells_per_period": round(problem.finest_scale / domain.mesh_size(mesh), 1),
        "dofs": uh.function_space.dofmap.index_map.size_global,
        "seconds": seconds,
        "rel_l2": l2,
        "rel_h1": h1,
    }


def benchmark(quick: bool = False) -> dict[str, Any]:
    """Every ε: the reference, both solves and the FEM ladder."""
    rows = []
    for eps in (0.1, 0.05) if quick else (0.05, 0.02):
        problem = square_problem(eps)
        started = time.perf_counter()
        reference = dp.solve_fine(
            problem,
            degree=3,
            mesh=problem.domain.refined_mesh(problem.finest_scale / 8),
            solver="gamg",
        )
        reference_s = time.perf_counter() - started
        band = _solve(problem, reference, 1.5)
        basis = _solve(problem, reference, 0.0)
        fem = [_fem(problem, reference, n) for n in ((2, 4) if quick else (2, 4, 8))]
        reaching = [
            row
            for row in fem
            if row["rel_l2"] <= band["rel_l2"] and row["rel_h1"] <= band["rel_h1"]
        ]
        best = min(reaching, key=lambda row: row["seconds"]) if reaching else None
        rows.append(
            {
                "eps": eps,
                "reference": {
                    "degree": 3,
                    "cells_per_period": 8,
                    "dofs": reference.function_space.dofmap.index_map.size_global,
                    "seconds": reference_s,
                },
                "band": band,
                "basis": basis,
                "fem": fem,
                "fem_to_band_accuracy": best,
            }
        )
        print(f"ε = {eps}: band {band}, basis {basis}", flush=True)
    return {"quick": quick, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables."""
    mode = "quick" if results["quick"] else "full"
    lines = [
        f"# Boundary band benchmark on {results['host']} ({mode})",
        "",
        f"{results['date']}, OMP_NUM_THREADS={results['omp_threads']}, serial. Unit square as a "
        "mesh domain, paper_2d's coefficient, u = x1 x2 on ∂Ω; reference P3, 8 cells per period.",
        "",
        "| ε | band: rel L² | rel H¹ | s | share of Ω | band dofs | GMRES | basis alone: rel L² "
        "| rel H¹ | s | cheapest P2 FEM to the band's L² and H¹ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        band, basis, best = row["band"], row["basis"], row["fem_to_band_accuracy"]
        info = band.get("band", {})
        fem = (
            "none of the rungs"
            if best is None
            else f"{best['cells_per_period']} cells/period, {best['seconds']:.2f} s"
        )
        lines.append(
            f"| {row['eps']} | {band['rel_l2']:.2e} | {band['rel_h1']:.2e} | "
            f"{band['seconds']:.1f} | {info.get('fraction_of_area', 0):.2f} | {info.get('dofs')} "
            f"| {info.get('gmres_iterations')} | {basis['rel_l2']:.2e} | {basis['rel_h1']:.2e} | "
            f"{basis['seconds']:.1f} | {fem} |"
        )
    for row in results["rows"]:
        ref = row["reference"]
        lines += [
            "",
            f"## ε = {row['eps']}: plain P2 FEM (reference {ref['dofs']} dofs, "
            f"{ref['seconds']:.1f} s)",
            "",
            "| cells/period | dofs | seconds | rel L² | rel H¹ |",
            "|---|---|---|---|---|",
        ]
        for fem in row["fem"]:
            lines.append(
                f"| {fem['cells_per_period']} | {fem['dofs']} | {fem['seconds']:.2f} | "
                f"{fem['rel_l2']:.3e} | {fem['rel_h1']:.3e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run and write ``band.json``/``band.md`` (``band-quick.*``) into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    results = benchmark(args.quick)
    results.update(
        host=socket.gethostname(),
        date=time.strftime("%Y-%m-%d %H:%M"),
        omp_threads=os.environ.get("OMP_NUM_THREADS", "unset"),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("band-quick" if args.quick else "band")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
