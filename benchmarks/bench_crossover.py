"""The crossover benchmark: plain DOLFINx FEM against ``dolfinx_pinn.solve``, time to accuracy.

For each ε (2D ``paper_2d``, 1D ``paper_1d``):

1. the reference: ``exact_1d`` in 1D; in 2D a P3 solve with at least 12 cells per finest period
   where it fits the memory and time caps, otherwise the finest P2 that fits; its own error is
   estimated from a companion solve on a mesh twice as coarse and printed beside every figure;
2. ``dolfinx_pinn.solve(problem, device=...)`` in a worker process, timed around the call, its
   rel. L² and H¹-seminorm errors by quadrature of ``Solution.value``/``Solution.gradient``
   against the reference (``Solution.metrics["wall_time_s"]`` is recorded beside);
3. four ladders of plain DOLFINx solves: P1 and P2 Lagrange x MUMPS (LU) and CG + GAMG
   (``ksp_rtol`` 1e-10), on uniform meshes of N = 2, 4, 8, ... cells per finest period (square
   cells h = ε/N), the problem exactly as the package defines it (the lifted problem (4.8),
   quadrature degree 2k + 4). Every rung runs in a worker process (JIT compilation not timed);
   its time is mesh + assembly + solve (median of repeats when cheap) and its peak memory the
   worker's ``VmHWM``. Workers are killed above the memory cap or past a time limit. A ladder
   stops when it has reached every accuracy the tables need (dolfinx_pinn's and the fixed
   levels), when its next rung is predicted above the memory or time cap, when its rel. L²
   stagnates (round-off), or when its last rung is already slower than the best time another
   ladder needed for every accuracy it has not reached (it cannot win any more). Where no
   ladder reaches dolfinx_pinn's accuracy and every ladder ended on memory or round-off, FEM
   cannot reach it: dolfinx_pinn wins.

Then FEM's time to dolfinx_pinn's accuracy (cheapest ladder; log-time interpolated in log-error
between the bracketing rungs), the ratio t_FEM / t_pinn and who wins, and the ε below which
dolfinx_pinn is faster. FEM runs in one process on one core; dolfinx_pinn in one process with
torch's default threads. The machine's load is not controlled.

Meshes: DOLFINx 0.11 ``create_interval``/``create_rectangle`` reorder cells with GPS, which is
super-linear (a 400 000-cell interval takes 14 s, a 10^7-cell rectangle 167 s on the 2-core test
machine; upstream DOLFINx PR #4286 switched to RCM), so the benchmark builds the same uniform
meshes (the "right" diagonal of ``create_rectangle``) in the natural cell order, which also lets
the errors be evaluated by analytic point location. Serial only.

    python benchmarks/bench_crossover.py [--mode tiny|quick|full] [--out DIR] [--cache DIR]
    python benchmarks/run.py --cases crossover [--quick]      # the same, inside the runner

2D references are cached under ``--cache`` (default ``benchmarks/.cache/crossover``).
"""

from __future__ import annotations

from mpi4py import MPI  # isort: skip  (before dolfinx)

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import basix
import basix.ufl
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache" / "crossover"
GIB = float(2**30)

EPS_2D = (0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
EPS_1D = (1 / 15, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DEGREES = (1, 2)
SOLVERS = ("mumps", "gamg")

#: CG + GAMG of the ladder: 1e-10 relative reduction of the preconditioned residual norm.
GAMG_RTOL = 1e-10
#: The references' CG + GAMG: 1e-12 (the package's ``fine_solver_options("gamg")``).
REFERENCE_GAMG_RTOL = 1e-12

#: Accuracy levels of the FEM time-to-accuracy table: (name, rel. L², rel. H¹).
LEVELS = {
    1: (("L² 1e-4", 1e-4, math.inf), ("L² 1e-6", 1e-6, math.inf), ("L² 1e-8", 1e-8, math.inf)),
    2: (
        ("L² 1e-2, H¹ 1e-1", 1e-2, 1e-1),
        ("L² 1e-3, H¹ 1e-2", 1e-3, 1e-2),
        ("L² 1e-4, H¹ 1e-3", 1e-4, 1e-3),
    ),
}
#: The issue's targets for dolfinx_pinn: rel. L², rel. H¹, seconds.
TARGETS = {1: (1e-8, math.inf, 2.0), 2: (1e-4, 1e-3, 10.0)}

#: Prior cost per dof above the worker's baseline, (bytes, seconds), for the first predictions;
#: measured on the 2-core test machine under load. Replaced by measurements as rungs run.
PRIORS: dict[tuple[int, int, str], tuple[float, float]] = {
    (1, 1, "mumps"): (600.0, 1.2e-5),
    (1, 1, "gamg"): (550.0, 1.6e-5),
    (1, 2, "mumps"): (550.0, 2.0e-5),
    (1, 2, "gamg"): (500.0, 2.2e-5),
    (2, 1, "mumps"): (1800.0, 3.5e-5),
    (2, 1, "gamg"): (950.0, 2.5e-5),
    (2, 2, "mumps"): (1900.0, 4.0e-5),
    (2, 2, "gamg"): (950.0, 2.7e-5),
    (2, 3, "mumps"): (2600.0, 6.0e-5),
    (2, 3, "gamg"): (1300.0, 4.0e-5),
}


@dataclass(frozen=True)
class Mode:
    """What one run measures.

    Attributes:
        name: ``tiny``, ``quick`` or ``full``.
        eps_1d: The 1D ε.
        eps_2d: The 2D ε.
        max_n: Largest cells per finest period of a rung, per dimension.
        rung_time_cap_s: Rungs predicted to take longer are skipped.
        memory_cap_gib: Rungs and references predicted to peak above this are skipped.
        reference_time_cap_s: The same for a 2D reference solve.
        reference_p3_n: Candidate cells per period of the P3 reference (the largest that fits).
        sampled_periods: 1D error quadrature on this many evenly spaced whole periods when the
            domain has more.
        repeat_budget_s: A rung (and dolfinx_pinn) is repeated (median) while the repeats fit
            in this time.
        pinn_time_cap_s: ``dolfinx_pinn.solve`` (its worker) is stopped after this long, plus
            :data:`EVALUATION_S_PER_POINT` per reference point for its evaluation there.
    """

    name: str
    eps_1d: tuple[float, ...]
    eps_2d: tuple[float, ...]
    max_n: dict[int, int]
    rung_time_cap_s: float
    memory_cap_gib: float
    reference_time_cap_s: float
    reference_p3_n: tuple[int, ...] = (24, 16, 12)
    sampled_periods: int = 64
    repeat_budget_s: float = 5.0
    pinn_time_cap_s: float = 1200.0


# The worker's time allowance per reference point for Solution.value_and_gradient, a few
# times what it costs (the finest 2D references have ~5e7 points).
EVALUATION_S_PER_POINT = 5e-5

MODES = {
    # Seconds, for the tests: ε = 1/4 in 2D keeps the P3 reference (12 cells per period) small.
    "tiny": Mode(
        "tiny",
        eps_1d=(1 / 15,),
        eps_2d=(0.25,),
        max_n={1: 4, 2: 4},
        rung_time_cap_s=5.0,
        memory_cap_gib=2.0,
        reference_time_cap_s=30.0,
        reference_p3_n=(12,),
        sampled_periods=16,
        repeat_budget_s=0.5,
    ),
    "quick": Mode(
        "quick",
        eps_1d=(1 / 15, 1e-3),
        eps_2d=(0.1, 0.02),
        max_n={1: 512, 2: 32},
        rung_time_cap_s=5.0,
        memory_cap_gib=4.0,
        reference_time_cap_s=120.0,
        reference_p3_n=(16, 12),
        sampled_periods=32,
        repeat_budget_s=2.0,
    ),
    # 16 GiB, not the 24: the test machine has 23 GiB in all, shared.
    "full": Mode(
        "full",
        eps_1d=EPS_1D,
        eps_2d=EPS_2D,
        max_n={1: 2**16, 2: 256},
        rung_time_cap_s=60.0,
        memory_cap_gib=16.0,
        reference_time_cap_s=300.0,
    ),
}


# -- problems, meshes and the FEM solve (used in the worker processes) ------------------------
def make_problem(dim: int, eps: float) -> Any:
    """``paper_1d(eps)`` or ``paper_2d(eps)``."""
    from dolfinx_pinn.problems import paper_1d, paper_2d

    return paper_1d(eps) if dim == 1 else paper_2d(eps)


def periods_per_axis(dim: int, eps: float) -> list[int]:
    """Whole finest periods per axis of the unit interval/square (paper_2d: 2ε in x1, ε in x2)."""
    lengths = (eps,) if dim == 1 else (2.0 * eps, eps)
    return [max(1, round(1.0 / length)) for length in lengths]


def cells_for(dim: int, eps: float, n_per_period: float) -> list[int]:
    """Cells per axis of a mesh with ``n_per_period`` cells per finest period ε.

    1D: h = ε/N. 2D: square cells h = ε/N (the finest period, ε in x2; 2N cells per period in
    x1): at equal dofs square cells beat "N cells per period along each axis" (h1 = 2 h2) by
    ~2x in rel. L² (P2, ε = 0.1, 33 000 dofs: 2.9e-4 against 6.1e-4; H¹ 8.4e-3 against 1.3e-2).
    """
    n = max(1, round(n_per_period / eps))
    return [n] * dim


def num_dofs(counts: Sequence[int], degree: int) -> int:
    """Lagrange dofs of a uniform interval/triangle mesh (boundary dofs included)."""
    return int(np.prod([degree * n + 1 for n in counts]))


def build_mesh(
    comm: MPI.Comm, lower: Sequence[float], upper: Sequence[float], counts: Sequence[int]
):
    """A uniform interval or triangle mesh in the natural cell order (serial).

    Interval cell i is [x_i, x_{i+1}]; square (i, j) of a rectangle holds cells 2(j·nx + i)
    (vertices (i, j), (i+1, j), (i+1, j+1)) and 2(j·nx + i) + 1 ((i, j), (i, j+1), (i+1, j+1)):
    the triangulation of ``create_rectangle`` with its default "right" diagonal, without the GPS
    cell reordering of DOLFINx 0.11.
    """
    import ufl
    from dolfinx import cpp as _cpp
    from dolfinx.mesh import Mesh, _coordinate_element, create_geometry

    if comm.size != 1:
        raise ValueError("build_mesh is serial")
    if len(counts) == 1:
        (n,) = counts
        cells = np.stack([np.arange(n), np.arange(1, n + 1)], axis=1).astype(np.int32)
        x = np.linspace(lower[0], upper[0], n + 1).reshape(-1, 1)
        cell_type, name = _cpp.mesh.CellType.interval, "interval"
    else:
        nx, ny = counts
        j, i = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        v00, v10 = j * (nx + 1) + i, j * (nx + 1) + i + 1
        v01, v11 = v00 + nx + 1, v10 + nx + 1
        cells = np.stack([np.stack([v00, v10, v11], -1), np.stack([v00, v01, v11], -1)], axis=2)
        cells = cells.reshape(-1, 3).astype(np.int32)
        ys, xs = np.meshgrid(
            np.linspace(lower[1], upper[1], ny + 1),
            np.linspace(lower[0], upper[0], nx + 1),
            indexing="ij",
        )
        x = np.stack([xs.ravel(), ys.ravel()], axis=1)
        cell_type, name = _cpp.mesh.CellType.triangle, "triangle"
    num_vertices, num_cells = len(x), len(cells)
    topology = _cpp.mesh.Topology(
        cell_type=cell_type,
        vertex_map=_cpp.common.IndexMap(comm, num_vertices),
        cell_map=_cpp.common.IndexMap(comm, num_cells),
        cells=_cpp.graph.AdjacencyList_int32(cells),
        original_index=np.arange(num_cells, dtype=np.int64),
    )
    element = basix.ufl.element("Lagrange", name, 1, shape=(x.shape[1],))
    geometry = create_geometry(
        _cpp.common.IndexMap(comm, num_vertices),
        cells,
        _coordinate_element(element.basix_element),
        np.ascontiguousarray(x, dtype=np.float64),
        np.arange(num_vertices, dtype=np.int64),
    )
    mesh = Mesh(_cpp.mesh.Mesh_float64(comm, topology, geometry._cpp_object), ufl.Mesh(element))
    if not np.array_equal(mesh.geometry.dofmap, cells):  # pragma: no cover - a DOLFINx change
        raise RuntimeError("build_mesh: DOLFINx reordered the cells")
    return mesh


def solver_options(solver: str) -> dict[str, Any]:
    """PETSc options: ``mumps`` (LU), ``gamg`` (CG + GAMG, rtol 1e-10), ``gamg_ref`` (1e-12)."""
    if solver == "mumps":
        return {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
    if solver in ("gamg", "gamg_ref"):
        return {
            "ksp_type": "cg",
            "pc_type": "gamg",
            "ksp_rtol": GAMG_RTOL if solver == "gamg" else REFERENCE_GAMG_RTOL,
            "ksp_atol": 0.0,
            "ksp_max_it": 5000,
        }
    raise ValueError(f"solver must be mumps, gamg or gamg_ref, got {solver!r}")


_prefix_counter = iter(range(10**9))


def fem_solve(problem: Any, counts: Sequence[int], degree: int, solver: str) -> tuple[Any, dict]:
    """Solve (4.8) on a uniform mesh: the forms of ``reference.solve_fine``, timed by phase.

    ``reference.solve_fine`` takes the degree, mesh and PETSc options but cannot report the time
    of mesh creation, assembly and solve separately, hence this copy of its forms.

    Returns:
        The solution and a dict with ``mesh_s``, ``assembly_s`` (function space, forms from the
        JIT cache, boundary condition, matrix and vector), ``solve_s`` (KSP set-up, i.e. the
        factorisation or the AMG hierarchy, and the solve), ``total_s``, ``dofs`` and
        ``iterations``.
    """
    from petsc4py import PETSc

    import ufl
    from dolfinx import default_scalar_type, fem
    from dolfinx import mesh as dmesh
    from dolfinx.fem import petsc as fem_petsc

    comm = MPI.COMM_SELF
    started = time.perf_counter()
    mesh = build_mesh(comm, problem.domain.lower, problem.domain.upper, counts)
    meshed = time.perf_counter()
    V = fem.functionspace(mesh, ("Lagrange", degree))
    u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
    x = ufl.SpatialCoordinate(mesh)
    dx = ufl.Measure("dx", domain=mesh, metadata={"quadrature_degree": 2 * degree + 4})
    a = fem.form(ufl.inner(problem.K_matrix(x) * ufl.grad(u), ufl.grad(v)) * dx)
    L = fem.form(problem.q(x) * v * dx - ufl.inner(problem.flux_lifting(x), ufl.grad(v)) * dx)
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dmesh.exterior_facet_indices(mesh.topology)
    bc = fem.dirichletbc(
        default_scalar_type(0), fem.locate_dofs_topological(V, tdim - 1, facets), V
    )
    A = fem_petsc.assemble_matrix(a, bcs=[bc])
    A.assemble()
    b = fem_petsc.assemble_vector(L)
    fem_petsc.apply_lifting(b, [a], bcs=[[bc]])
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    fem_petsc.set_bc(b, [bc])
    assembled = time.perf_counter()
    ksp = PETSc.KSP().create(comm)
    prefix = f"crossover_{next(_prefix_counter)}_"
    ksp.setOptionsPrefix(prefix)
    options = PETSc.Options()
    for key, value in solver_options(solver).items():
        options[prefix + key] = value
    ksp.setOperators(A)
    ksp.setFromOptions()
    uh = fem.Function(V)
    ksp.solve(b, uh.x.petsc_vec)
    reason, iterations = ksp.getConvergedReason(), ksp.getIterationNumber()
    uh.x.scatter_forward()
    solved = time.perf_counter()
    for key in solver_options(solver):
        del options[prefix + key]
    ksp.destroy()
    A.destroy()
    b.destroy()
    if reason <= 0:
        raise RuntimeError(f"{solver} did not converge (reason {reason}, {iterations} its)")
    return uh, {
        "mesh_s": meshed - started,
        "assembly_s": assembled - meshed,
        "solve_s": solved - assembled,
        "total_s": solved - started,
        "dofs": V.dofmaps[0].index_map.size_global,
        "iterations": iterations,
    }


# -- memory of the worker process -------------------------------------------------------------
def _status_bytes(key: str) -> float | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024.0
    return None


def _reset_peak() -> bool:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> float:
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _rss_bytes() -> float:
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else 0.0


def run_worker(spec_path: str) -> None:
    """Worker process: run the solves of a JSON spec, save each solution, write the results.

    The spec has ``dim``, ``eps``, ``results`` (a JSON path, rewritten after every solve) and
    ``jobs``: dicts with ``degree``, ``counts``, ``solver``, ``repeats``, ``repeat_budget_s`` and
    ``save`` (an ``.npz`` path for the dof values and the cell-to-dof map).
    """
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("kind") == "pinn":
        run_pinn_worker(spec)
        return
    problem = make_problem(spec["dim"], spec["eps"])
    results: list[dict[str, Any]] = []
    warmed: set[int] = set()
    for job in spec["jobs"]:
        degree, solver = job["degree"], job["solver"]
        if degree not in warmed:
            # The JIT compilation of the forms (once per ε and degree) is not timed (LU: GAMG
            # fails on a few unknowns).
            fem_solve(problem, [4] * spec["dim"], degree, "mumps")
            warmed.add(degree)
        gc.collect()
        baseline = _rss_bytes()
        isolated = _reset_peak()
        runs = []
        uh = None
        for repeat in range(max(1, job["repeats"])):
            uh = None
            gc.collect()
            uh, timing = fem_solve(problem, job["counts"], degree, solver)
            runs.append(timing)
            if repeat == 0 and timing["total_s"] * job["repeats"] > job["repeat_budget_s"]:
                break
        peak = _peak_bytes()
        V = uh.function_space
        np.savez(job["save"], u=uh.x.array, dofmap=V.dofmaps[0].list)
        keys = ("mesh_s", "assembly_s", "solve_s", "total_s")
        results.append(
            {
                **{k: statistics.median(r[k] for r in runs) for k in keys},
                "repeats": len(runs),
                "dofs": runs[0]["dofs"],
                "iterations": runs[-1]["iterations"],
                "peak_rss_bytes": peak,
                "baseline_rss_bytes": baseline,
                "peak_isolated": isolated,
                "save": job["save"],
            }
        )
        del uh, V
        temporary = Path(spec["results"] + ".tmp")
        temporary.write_text(json.dumps(results))
        temporary.replace(spec["results"])


def run_pinn_worker(spec: dict[str, Any]) -> None:
    """Worker process: ``dolfinx_pinn.solve`` (see :func:`pinn_row`), values and gradients at the
    reference's points (``points``, an ``.npy``) saved to ``save`` (an ``.npz``)."""
    import dolfinx_pinn

    (job,) = spec["jobs"]
    problem = make_problem(spec["dim"], spec["eps"])
    solution, row = _timed_solve(
        dolfinx_pinn.solve, problem, job["repeats"], job["repeat_budget_s"], job["kw"]
    )
    row["peak_rss_bytes"] = _peak_bytes()
    solved = Path(spec["results"] + ".solved")  # the solve's figures, should evaluation fail
    solved.write_text(json.dumps(row, default=_json_default))
    if solution is not None:
        points = np.load(job["points"])
        values, gradients = np.empty(len(points)), np.empty_like(points)
        for start in range(0, len(points), 100_000):  # in chunks, as a user would
            part = slice(start, start + 100_000)
            values[part], gradients[part] = _candidate_values(solution, points[part])
        np.savez(job["save"], values=values, gradients=gradients)
    Path(spec["results"]).write_text(json.dumps([row], default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


def _timed_solve(
    solve: Callable[..., Any], problem: Any, repeats: int, repeat_budget_s: float, kw: dict
) -> tuple[Any, dict[str, Any]]:
    """Call ``solve(problem, **kw)``, repeated when cheap (see :func:`pinn_row`)."""
    times: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while True:
            started = time.perf_counter()
            try:
                solution = solve(problem, **kw)
            except Exception as error:
                return None, {"error": f"{type(error).__name__}: {error}"[:300]}
            times.append(time.perf_counter() - started)
            cheap = repeats > 1 and times[0] * repeats <= repeat_budget_s
            if not cheap or len(times) > repeats:
                break
    metrics = dict(getattr(solution, "metrics", None) or {})
    scalar = (bool, int, float, type(None))
    return solution, {
        "wall_time_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "calls": len(times),
        "metrics_wall_time_s": metrics.get("wall_time_s"),
        "metrics_rel_l2": metrics.get("rel_l2"),
        "metrics_rel_h1": metrics.get("rel_h1"),
        "converged": metrics.get("converged")
        if isinstance(metrics.get("converged"), scalar)
        else None,
        "warnings": sorted({str(w.message)[:200] for w in caught}),
    }


# -- evaluation of saved solutions (parent process, numpy only) ---------------------------------
class LagrangeTable:
    """The basix Lagrange element of DOLFINx's ``("Lagrange", k)`` as monomial coefficients.

    Tabulating through the monomials (one small matrix product) is ~10x faster than
    ``basix`` tabulation at millions of scattered points, and exact for a polynomial space.
    """

    def __init__(self, dim: int, degree: int) -> None:
        name = "interval" if dim == 1 else "triangle"
        element = basix.ufl.element("Lagrange", name, degree)
        self.dim, self.degree = dim, degree
        if dim == 1:
            self.exponents = [(a,) for a in range(degree + 1)]
        else:
            self.exponents = [(a, s - a) for s in range(degree + 1) for a in range(s, -1, -1)]
        cell = basix.CellType.interval if dim == 1 else basix.CellType.triangle
        points = basix.create_lattice(cell, degree + 3, basix.LatticeType.equispaced, True)
        points = np.asarray(points, dtype=np.float64).reshape(-1, dim)
        table = np.asarray(element.tabulate(0, points)).reshape(len(points), -1)
        monomials = self.monomials(points)
        self.coefficients = np.linalg.lstsq(monomials, table, rcond=None)[0]
        misfit = np.abs(monomials @ self.coefficients - table).max()
        if misfit > 1e-10:  # pragma: no cover - would mean a non-polynomial element
            raise RuntimeError(f"LagrangeTable: monomial fit failed ({misfit:.1e})")
        self.num_dofs = table.shape[1]

    def monomials(self, X: np.ndarray, direction: int | None = None) -> np.ndarray:
        """Monomials (or their derivative in ``direction``) at reference points ``(N, dim)``."""
        columns = []
        for exponent in self.exponents:
            column = np.ones(len(X))
            factor = 1.0
            for axis, power in enumerate(exponent):
                if axis == direction:
                    factor *= power
                    power -= 1
                if power > 0:
                    column = column * X[:, axis] ** power
                elif power < 0:
                    column = np.zeros(len(X))
            columns.append(factor * column)
        return np.stack(columns, axis=1)

    def tabulate(self, X: np.ndarray) -> list[np.ndarray]:
        """Basis values and reference derivatives: ``[(N, ndofs), d/dX1, (d/dX2)]``."""
        return [self.monomials(X, d) @ self.coefficients for d in (None, *range(self.dim))]


class StructuredFunction:
    """A saved Lagrange solution on a :func:`build_mesh` mesh, evaluated by analytic location.

    Args:
        lower: Lower corner of the box.
        upper: Upper corner.
        counts: Cells per axis.
        degree: Lagrange degree.
        coefficients: The dof values.
        dofmap: Cell-to-dof map ``(cells, ndofs)`` of the solve.
    """

    def __init__(
        self,
        lower: Sequence[float],
        upper: Sequence[float],
        counts: Sequence[int],
        degree: int,
        coefficients: np.ndarray,
        dofmap: np.ndarray,
    ) -> None:
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.dim = len(counts)
        self.degree = degree
        self.h = (self.upper - self.lower) / self.counts
        self.coefficients = np.asarray(coefficients, dtype=np.float64)
        self.table = LagrangeTable(self.dim, degree)
        self.dofmap = np.asarray(dofmap).reshape(-1, self.table.num_dofs)

    @classmethod
    def load(
        cls, path: str | Path, lower: Sequence[float], upper: Sequence[float], counts, degree: int
    ) -> StructuredFunction:
        """From an ``.npz`` written by :func:`run_worker`."""
        with np.load(path) as data:
            return cls(lower, upper, counts, degree, data["u"], data["dofmap"])

    def locate(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell, reference coordinates and "upper triangle" flag of points ``(N, dim)``."""
        s = (x[:, : self.dim] - self.lower) / self.h
        index = np.clip(np.floor(s).astype(np.int64), 0, self.counts - 1)
        local = s - index
        if self.dim == 1:
            return index[:, 0], local, np.zeros(len(x), dtype=bool)
        xi, eta = local[:, 0], local[:, 1]
        upper = eta > xi
        cells = 2 * (index[:, 1] * self.counts[0] + index[:, 0]) + upper
        X = np.where(upper[:, None], np.stack([eta - xi, xi], 1), np.stack([xi - eta, eta], 1))
        return cells, X, upper

    def physical_gradient(self, d: Sequence[np.ndarray], upper: np.ndarray) -> np.ndarray:
        """Map reference derivatives to ∇u for the two triangle types (or the interval)."""
        if self.dim == 1:
            return (d[0] / self.h[0])[:, None]
        hx, hy = self.h
        gx = np.where(upper, (d[1] - d[0]) / hx, d[0] / hx)
        gy = np.where(upper, d[0] / hy, (d[1] - d[0]) / hy)
        return np.stack([gx, gy], axis=1)

    def evaluate(self, x: np.ndarray, chunk: int = 400_000) -> tuple[np.ndarray, np.ndarray]:
        """Values ``(N,)`` and gradients ``(N, dim)`` at points ``(N, >= dim)``."""
        values, gradients = np.empty(len(x)), np.empty((len(x), self.dim))
        for start in range(0, len(x), chunk):
            part = slice(start, start + chunk)
            cells, X, upper = self.locate(x[part])
            tables = self.table.tabulate(X)
            c = self.coefficients[self.dofmap[cells]]
            values[part] = np.einsum("pd,pd->p", tables[0], c)
            d = [np.einsum("pd,pd->p", t, c) for t in tables[1:]]
            gradients[part] = self.physical_gradient(d, upper)
        return values, gradients

    def value(self, points: np.ndarray) -> np.ndarray:
        """Values at points ``(N, dim)``."""
        return self.evaluate(np.asarray(points, dtype=np.float64).reshape(len(points), -1))[0]

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """Gradients at points ``(N, dim)``."""
        return self.evaluate(np.asarray(points, dtype=np.float64).reshape(len(points), -1))[1]


def _candidate_values(candidate: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and gradients of a StructuredFunction, a value/gradient object or a pair."""
    if isinstance(candidate, StructuredFunction):
        return candidate.evaluate(x)
    if hasattr(candidate, "value_and_gradient"):  # one pass (dolfinx_pinn.Solution)
        values, gradients = candidate.value_and_gradient(x)
        return (
            np.asarray(values, dtype=np.float64).reshape(len(x)),
            np.asarray(gradients, dtype=np.float64).reshape(len(x), -1),
        )
    if hasattr(candidate, "value") and hasattr(candidate, "gradient"):
        value, gradient = candidate.value, candidate.gradient
    elif isinstance(candidate, (tuple, list)) and len(candidate) == 2:
        value, gradient = candidate
    else:
        raise TypeError(f"candidate: need value/gradient callables, got {type(candidate)}")
    values = np.asarray(value(x), dtype=np.float64).reshape(len(x))
    return values, np.asarray(gradient(x), dtype=np.float64).reshape(len(x), -1)


@dataclass
class _Sums:
    error_l2: float = 0.0
    norm_l2: float = 0.0
    error_h1: float = 0.0
    norm_h1: float = 0.0

    def add(self, w, c_val, c_grad, r_val, r_grad) -> None:
        self.error_l2 += float(w @ (c_val - r_val) ** 2)
        self.norm_l2 += float(w @ r_val**2)
        self.error_h1 += float(w @ ((c_grad - r_grad) ** 2).sum(axis=1))
        self.norm_h1 += float(w @ (r_grad**2).sum(axis=1))

    def relative(self) -> tuple[float, float]:
        return math.sqrt(self.error_l2 / self.norm_l2), math.sqrt(self.error_h1 / self.norm_h1)


class Reference2D:
    """A fine 2D solve as the reference: errors by quadrature on its own (structured) mesh.

    Args:
        function: The reference solution.
        description: What it is (degree, cells, solver).
        estimated_error: Its own estimated (rel. L², rel. H¹) error, or ``None``.
        quadrature_degree: Degree of the Gauss rule on the reference cells (default 2k: exact
            for the reference's own norms).
    """

    dim = 2

    def __init__(
        self,
        function: StructuredFunction,
        description: str,
        estimated_error: tuple[float, float] | None = None,
        quadrature_degree: int | None = None,
    ) -> None:
        self.function = function
        self.description = description
        self.estimated_error = estimated_error
        degree = quadrature_degree or 2 * function.degree
        points, weights = basix.make_quadrature(basix.CellType.triangle, degree)
        self._X = np.asarray(points, dtype=np.float64)
        self._weights = np.asarray(weights) * float(np.prod(function.h))
        self._tables = function.table.tabulate(self._X)

    def _chunks(self, chunk: int = 50_000) -> Iterator[tuple[np.ndarray, ...]]:
        f = self.function
        nx = int(f.counts[0])
        num_cells = len(f.dofmap)
        nq = len(self._X)
        X1, X2 = self._X[:, 0], self._X[:, 1]
        for start in range(0, num_cells, chunk):
            cells = np.arange(start, min(start + chunk, num_cells))
            square, upper = cells // 2, (cells % 2).astype(bool)
            i, j = square % nx, square // nx
            x0 = f.lower[0] + i * f.h[0]
            y0 = f.lower[1] + j * f.h[1]
            # lower: x = (x0 + hx (X1 + X2), y0 + hy X2); upper: (x0 + hx X2, y0 + hy (X1 + X2))
            sx = np.where(upper[:, None], X2[None, :], (X1 + X2)[None, :])
            sy = np.where(upper[:, None], (X1 + X2)[None, :], X2[None, :])
            x = np.stack([x0[:, None] + f.h[0] * sx, y0[:, None] + f.h[1] * sy], axis=-1)
            c = f.coefficients[f.dofmap[cells]]
            values = c @ self._tables[0].T
            d = [c @ t.T for t in self._tables[1:]]
            flags = np.repeat(upper, nq)
            gradients = f.physical_gradient([di.ravel() for di in d], flags)
            weights = np.tile(self._weights, len(cells))
            yield x.reshape(-1, 2), weights, values.ravel(), gradients

    def errors(self, candidate: Any) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors of a candidate (see :func:`_candidate_values`)."""
        sums = _Sums()
        for x, w, r_val, r_grad in self._chunks():
            c_val, c_grad = _candidate_values(candidate, x)
            sums.add(w, c_val, c_grad, r_val, r_grad)
        return sums.relative()

    def points(self) -> np.ndarray:
        """The quadrature points, in the order of :meth:`errors_at`."""
        return np.concatenate([x for x, *_ in self._chunks()])

    def errors_at(self, values: np.ndarray, gradients: np.ndarray) -> tuple[float, float]:
        """Relative errors of a candidate's values/gradients at :meth:`points`."""
        sums, start = _Sums(), 0
        for x, w, r_val, r_grad in self._chunks():
            part = slice(start, start + len(x))
            sums.add(w, values[part], gradients[part], r_val, r_grad)
            start += len(x)
        return sums.relative()


class Reference1D:
    """``exact_1d`` as the reference: errors by Gauss quadrature on cells aligned with a rung.

    On a domain of P whole periods and N cells per period, the rule is Gauss-Legendre on every
    cell; when P exceeds ``sampled_periods`` it runs on that many evenly spaced whole periods
    (the midpoint rule in the slow variable, with weight P / sampled), which keeps the cost
    independent of ε. Exact values are cached per rule (P1/P2 and MUMPS/GAMG rungs share them).
    """

    dim = 1
    estimated_error = None

    def __init__(self, problem: Any, exact: Any, sampled_periods: int) -> None:
        self.problem = problem
        self.exact = exact
        self.sampled_periods = sampled_periods
        (self.periods,) = periods_per_axis(1, problem.eps)
        self.description = "exact_1d (closed form [HS (5.3)])"
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def rule(self, cells_per_period: int) -> tuple[np.ndarray, ...]:
        """Points, weights and exact values/gradients of the rule for N cells per period."""
        if cells_per_period not in self._cache:
            (a,), (b,) = self.problem.domain.lower, self.problem.domain.upper
            P, N = self.periods, cells_per_period
            nq = 6 if N >= 16 else (8 if N >= 8 else (10 if N >= 4 else 14))
            nodes, gauss_weights = np.polynomial.legendre.leggauss(nq)
            if P <= self.sampled_periods:
                periods, factor = np.arange(P), 1.0
            else:
                periods = np.floor(
                    (np.arange(self.sampled_periods) + 0.5) * P / self.sampled_periods
                )
                periods, factor = periods.astype(np.int64), P / self.sampled_periods
            h = (b - a) / (P * N)
            left = a + h * (periods[:, None] * N + np.arange(N)[None, :]).ravel()
            x = (left[:, None] + 0.5 * h * (nodes + 1.0)[None, :]).reshape(-1, 1)
            w = np.tile(0.5 * h * gauss_weights * factor, len(left))
            values = np.asarray(self.exact.value(x), dtype=np.float64).reshape(-1)
            gradients = np.asarray(self.exact.gradient(x), dtype=np.float64).reshape(-1, 1)
            self._cache[cells_per_period] = (x, w, values, gradients)
        return self._cache[cells_per_period]

    def points(self, cells_per_period: int = 64) -> np.ndarray:
        """The quadrature points of :meth:`errors_at`."""
        return self.rule(cells_per_period)[0]

    def errors_at(
        self, values: np.ndarray, gradients: np.ndarray, cells_per_period: int = 64
    ) -> tuple[float, float]:
        """Relative errors of a candidate's values/gradients at :meth:`points`."""
        _, w, r_val, r_grad = self.rule(cells_per_period)
        sums = _Sums()
        sums.add(w, values.reshape(-1), gradients.reshape(len(w), -1), r_val, r_grad)
        return sums.relative()

    def errors(self, candidate: Any, cells_per_period: int = 64) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors of a candidate."""
        x, w, r_val, r_grad = self.rule(cells_per_period)
        sums = _Sums()
        for start in range(0, len(x), 500_000):
            part = slice(start, start + 500_000)
            c_val, c_grad = _candidate_values(candidate, x[part])
            sums.add(w[part], c_val, c_grad, r_val[part], r_grad[part])
        return sums.relative()


# -- the cost model ----------------------------------------------------------------------------
@dataclass
class CostModel:
    """Predicted peak memory and time of a solve from the largest measured one of its kind.

    Memory scales linearly with the dofs (n log n for MUMPS in 2D, taken as n^1.1), time as
    n^1.1 (n^1.25 for MUMPS in 2D); before any measurement of at least 2·10^4 dofs, the priors
    ``PRIORS`` are used. ``baseline`` is the worker's resident memory before a solve.
    """

    baseline: float = 0.85 * GIB
    observations: dict[tuple[int, int, str], list[tuple[float, float, float]]] = field(
        default_factory=dict
    )

    @staticmethod
    def _family(solver: str) -> str:
        return "gamg" if solver.startswith("gamg") else "mumps"

    def add(self, dim: int, degree: int, solver: str, result: dict[str, Any]) -> None:
        """Record a worker result."""
        key = (dim, degree, self._family(solver))
        above = max(result["peak_rss_bytes"] - result["baseline_rss_bytes"], 0.0)
        self.observations.setdefault(key, []).append((result["dofs"], above, result["total_s"]))
        self.baseline = max(self.baseline, result["baseline_rss_bytes"])

    def predict(self, dim: int, degree: int, solver: str, dofs: float) -> tuple[float, float]:
        """(peak bytes including the baseline, seconds)."""
        key = (dim, degree, self._family(solver))
        lu_2d = key[2] == "mumps" and dim == 2
        memory_power, time_power = (1.1, 1.25) if lu_2d else (1.0, 1.1)
        large = [o for o in self.observations.get(key, []) if o[0] >= 2e4]
        if large:
            dofs0, memory0, seconds0 = max(large)
            ratio = dofs / dofs0
            memory, seconds = memory0 * ratio**memory_power, seconds0 * ratio**time_power
            return self.baseline + max(memory, 0.0), max(seconds, 1e-3)
        per_dof_memory, per_dof_time = PRIORS.get(key, (2000.0, 5e-5))
        return self.baseline + per_dof_memory * dofs, 0.02 + per_dof_time * dofs


# -- workers from the parent -------------------------------------------------------------------
def _worker_environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_jobs(
    dim: int,
    eps: float,
    jobs: list[dict[str, Any]],
    folder: Path,
    timeout_s: float,
    memory_cap_gib: float = math.inf,
    kind: str = "fem",
) -> tuple[list[dict[str, Any]], str | None]:
    """Run jobs in one worker process; the results of the jobs that finished, and an error.

    The worker is killed when it runs past ``timeout_s`` or its resident memory exceeds
    ``memory_cap_gib`` (polled every 0.1 s), so that neither stops the benchmark.
    """
    spec_file = folder / f"spec_{time.time_ns()}.json"
    results_file = spec_file.with_suffix(".results.json")
    spec = {"dim": dim, "eps": eps, "jobs": jobs, "results": str(results_file), "kind": kind}
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    error = None
    log_file = spec_file.with_suffix(".log")
    with open(log_file, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=_worker_environment()
        )
        started, peak = time.perf_counter(), 0.0
        while process.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{process.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            peak = max(peak, float(line.split()[1]) * 1024.0)
            if peak > memory_cap_gib * GIB:
                error = f"killed: resident memory above the {memory_cap_gib:g} GiB cap"
            elif time.perf_counter() - started > timeout_s:
                error = f"killed: timed out after {timeout_s:.0f} s"
            if error:
                process.kill()
                process.wait()
                break
            time.sleep(0.1)
    if error is None and process.returncode != 0:
        tail = log_file.read_text().strip()[-300:].replace("\n", " | ")
        error = (
            "killed (out of memory?)"
            if process.returncode in (-9, 137)
            else f"exit {process.returncode}: {tail}"
        )
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    return results, error


# -- references --------------------------------------------------------------------------------
def _cache_stem(cache: Path, eps: float, degree: int, counts: Sequence[int], solver: str) -> Path:
    import dolfinx

    name = f"paper_2d_eps{eps:.6g}_P{degree}_{counts[0]}x{counts[1]}_{solver}_q{2 * degree + 4}"
    return cache / f"{name}_dolfinx{dolfinx.__version__}"


def _cached_plan(eps: float, mode: Mode, cache: Path) -> dict[str, Any] | None:
    """The finest cached reference of ``eps`` (with its companion) within the memory cap.

    The plan of :func:`_reference_plan` depends on the cost model, i.e. on what ran before; a
    cached reference is reused whatever the model would choose now (P3 before P2).
    """
    import re

    best = None
    for path in cache.glob(f"paper_2d_eps{eps:.6g}_P*.json"):
        match = re.match(r".*_P(\d)_(\d+)x\d+_(\w+?)_q\d+_dolfinx", path.name)
        if not match:
            continue
        degree, n, solver = int(match[1]), int(match[2]), match[3]
        companion = max(1, n // 2)
        companion_solver = "mumps" if num_dofs([companion] * 2, degree) <= 4e5 else "gamg_ref"
        pair = _cache_stem(cache, eps, degree, [companion] * 2, companion_solver)
        if not (pair.with_suffix(".npz").exists() and path.with_suffix(".npz").exists()):
            continue
        if json.loads(path.read_text())["peak_rss_bytes"] > mode.memory_cap_gib * GIB:
            continue
        key = (degree, n)
        if best is None or key > best[0]:
            plan = {"degree": degree, "counts": [n, n], "solver": solver, "n": n * eps}
            if degree == 3:
                plan["n"] = round(n * eps)
            best = (key, plan)
    return None if best is None else best[1]


def _reference_plan(eps: float, mode: Mode, model: CostModel) -> dict[str, Any]:
    """Degree, cells and solver of the 2D reference (see the module docstring)."""
    cap = mode.memory_cap_gib * GIB

    def fits(degree: int, counts: Sequence[int]) -> tuple[bool, str, float, float]:
        dofs = num_dofs(counts, degree)
        solver = "mumps" if dofs <= 4e5 else "gamg_ref"
        memory, seconds = model.predict(2, degree, solver, dofs)
        return memory <= cap and seconds <= mode.reference_time_cap_s, solver, memory, seconds

    candidates = sorted(mode.reference_p3_n, reverse=True)
    for n in candidates:
        counts = cells_for(2, eps, n)
        ok, solver, memory, _ = fits(3, counts)
        if ok:
            return {"degree": 3, "counts": counts, "solver": solver, "n": n, "memory": memory}
    # The finest P2 that fits: any n (square cells).
    best = None
    n = max(round(2 / eps), 2)
    while True:
        counts = [n, n]
        ok, solver, memory, _ = fits(2, counts)
        if not ok:
            break
        best = {"degree": 2, "counts": counts, "solver": solver, "n": n * eps, "memory": memory}
        n = math.ceil(n * 1.05)
    if best is None:
        n = max(round(2 / eps), 2)
        return {"degree": 2, "counts": [n, n], "solver": "gamg_ref", "n": n * eps}
    return best


def reference_2d(
    eps: float, mode: Mode, model: CostModel, cache: Path, work: Path, log: Callable[[str], None]
) -> tuple[Reference2D | None, dict[str, Any]]:
    """The 2D reference of ``paper_2d(eps)`` and its companion, from the cache or solved."""
    from dolfinx_pinn.problems import paper_2d

    problem = paper_2d(eps)
    plan = _cached_plan(eps, mode, cache) or _reference_plan(eps, mode, model)
    degree, counts, solver = plan["degree"], plan["counts"], plan["solver"]
    companion = [max(1, counts[0] // 2)] * 2
    companion_solver = "mumps" if num_dofs(companion, degree) <= 4e5 else "gamg_ref"
    stems = [
        _cache_stem(cache, eps, degree, companion, companion_solver),
        _cache_stem(cache, eps, degree, counts, solver),
    ]
    info: dict[str, Any] = {
        "eps": eps,
        "degree": degree,
        "counts": counts,
        "cells_per_period": plan["n"],
        "solver": solver,
        "dofs": num_dofs(counts, degree),
        "companion_counts": companion,
    }
    missing = [
        s for s in stems if not (s.with_suffix(".npz").exists() and s.with_suffix(".json").exists())
    ]
    if missing:
        cache.mkdir(parents=True, exist_ok=True)
        jobs = []
        for stem, job_counts, job_solver in zip(
            stems, (companion, counts), (companion_solver, solver), strict=True
        ):
            if stem in missing:
                jobs.append(
                    {
                        "degree": degree,
                        "counts": job_counts,
                        "solver": job_solver,
                        "repeats": 1,
                        "repeat_budget_s": 0.0,
                        "save": str(stem.with_suffix(".npz")),
                    }
                )
        predicted = model.predict(2, degree, solver, info["dofs"])
        log(
            f"  reference ε = {eps:g}: P{degree}, {counts[0]}x{counts[1]} cells "
            f"({info['dofs']} dofs, {solver}), predicted {predicted[1]:.0f} s, "
            f"{predicted[0] / GIB:.1f} GiB: solving"
        )
        results, error = run_jobs(
            2, eps, jobs, work, max(600.0, 20 * predicted[1]), mode.memory_cap_gib + 1.0
        )
        for job, result in zip(jobs, results, strict=False):
            model.add(2, degree, job["solver"], result)
            Path(job["save"]).with_suffix(".json").write_text(json.dumps(result))
        if error or len(results) < len(jobs):
            info["error"] = f"reference solve failed: {error}"
            log(f"  reference ε = {eps:g}: {info['error']}")
            return None, info
    else:
        for stem, job_solver in zip(stems, (companion_solver, solver), strict=True):
            model.add(2, degree, job_solver, json.loads(stem.with_suffix(".json").read_text()))
    solve_info = json.loads(stems[1].with_suffix(".json").read_text())
    info.update(
        solve_s=solve_info["total_s"],
        peak_rss_gib=solve_info["peak_rss_bytes"] / GIB,
        iterations=solve_info["iterations"],
    )
    lower, upper = problem.domain.lower, problem.domain.upper
    fine = StructuredFunction.load(stems[1].with_suffix(".npz"), lower, upper, counts, degree)
    coarse = StructuredFunction.load(stems[0].with_suffix(".npz"), lower, upper, companion, degree)
    description = (
        f"P{degree}, {counts[0]}x{counts[1]} cells ({plan['n']:.3g} per finest period), "
        f"{info['dofs']} dofs, {solver}"
    )
    reference = Reference2D(fine, description)
    difference = reference.errors(coarse)
    ratio = companion[0] / counts[0]
    estimate = (difference[0] * ratio ** (degree + 1), difference[1] * ratio**degree)
    reference.estimated_error = estimate
    info.update(
        description=description,
        companion_difference_l2=difference[0],
        companion_difference_h1=difference[1],
        estimated_l2=estimate[0],
        estimated_h1=estimate[1],
    )
    log(
        f"  reference ε = {eps:g}: {description}; ‖u_ref - u_coarse‖ rel. L² {difference[0]:.2e}, "
        f"H¹ {difference[1]:.2e} → own error ≈ L² {estimate[0]:.1e}, H¹ {estimate[1]:.1e}"
    )
    return reference, info


def reference_1d(eps: float, mode: Mode, log: Callable[[str], None]) -> tuple[Any, dict]:
    """``exact_1d(paper_1d(eps))``, built under a memory limit so that a failure is reported."""
    from dolfinx_pinn.problems import paper_1d
    from dolfinx_pinn.reference import exact_1d

    problem = paper_1d(eps)
    info: dict[str, Any] = {"eps": eps, "description": "exact_1d"}
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = _status_bytes("VmSize") or 0.0
    limit = int(vm + mode.memory_cap_gib * GIB)
    started = time.perf_counter()
    try:
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        exact = exact_1d(problem)
        reference = Reference1D(problem, exact, mode.sampled_periods)
        reference.rule(2)  # evaluates exact_1d once, also under the limit
    except MemoryError:
        info["error"] = f"exact_1d ran out of memory (limit {mode.memory_cap_gib:g} GiB)"
        log(f"  reference ε = {eps:g}: {info['error']}")
        return None, info
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    info["setup_s"] = time.perf_counter() - started
    return reference, info


# -- the dolfinx_pinn row ----------------------------------------------------------------------
def pinn_row(
    problem: Any,
    reference: Any,
    *,
    solve: Callable[..., Any] | None = None,
    repeats: int = 1,
    repeat_budget_s: float = 0.0,
    work: Path | None = None,
    timeout_s: float = 3600.0,
    memory_cap_gib: float = math.inf,
    **kw: Any,
) -> dict[str, Any]:
    """Time and errors of ``dolfinx_pinn.solve(problem, **kw)`` against ``reference``.

    Only the public interface is used: the call, ``Solution.value``/``gradient`` and
    ``Solution.metrics``. When the first call takes at most ``repeat_budget_s / repeats``, it is
    a warm-up and the time is the median of ``repeats`` further calls. With ``work`` (a folder)
    ``dolfinx_pinn.solve`` runs in a worker process, killed past ``timeout_s`` or
    ``memory_cap_gib``; otherwise (and always for a given ``solve``) in this process.

    Args:
        problem: The problem.
        reference: A :class:`Reference1D` or :class:`Reference2D`.
        solve: The solver (default ``dolfinx_pinn.solve``; the tests pass a stand-in).
        repeats: Timing repeats of a cheap call.
        repeat_budget_s: See above.
        work: Folder of the worker's files.
        timeout_s: The worker's time limit.
        memory_cap_gib: The worker's memory limit.
        **kw: Keyword arguments of the solver (``device``, ...).

    Returns:
        ``wall_time_s`` (the call, measured here), ``calls``, ``metrics_wall_time_s``,
        ``metrics_rel_l2``/``metrics_rel_h1`` (what ``Solution.metrics`` holds, if anything),
        ``converged`` and ``warnings``, ``rel_l2``/``rel_h1`` (by quadrature of
        ``Solution.value``/``gradient``), ``peak_rss_gib`` (of the worker; in this process,
        the increase during the calls); or ``error``.
    """
    if solve is None and work is not None:
        points_file = work / f"points_{time.time_ns()}.npy"
        points = reference.points()
        np.save(points_file, points)
        # The evaluation at the reference's points is measurement, not the call: its own time.
        timeout_s += EVALUATION_S_PER_POINT * len(points)
        del points  # the worker loads them; the parent keeps only the reference
        save = points_file.with_suffix(".npz")
        job = {"repeats": repeats, "repeat_budget_s": repeat_budget_s, "kw": kw,
               "points": str(points_file), "save": str(save)}  # fmt: skip
        results, error = run_jobs(
            problem.dim, problem.eps, [job], work, timeout_s, memory_cap_gib, kind="pinn"
        )
        points_file.unlink(missing_ok=True)
        solved = list(work.glob("spec_*.results.json.solved"))
        solved_row = json.loads(solved[0].read_text()) if len(solved) == 1 else None
        for file in solved:
            file.unlink()
        if not results:
            if solved_row:  # killed after the solve, while evaluating at the reference's points
                row = solved_row
                row["peak_rss_gib"] = row.pop("peak_rss_bytes") / GIB
                row["error"] = f"Solution.value/gradient at the reference's points: {error}"
                return row
            return {"error": f"dolfinx_pinn.solve {error}"}
        row = results[0]
        row["peak_rss_gib"] = row.pop("peak_rss_bytes") / GIB
        if "error" not in row:
            with np.load(save) as data:
                row["rel_l2"], row["rel_h1"] = reference.errors_at(
                    data["values"], data["gradients"]
                )
            save.unlink(missing_ok=True)
        return row
    if solve is None:
        import dolfinx_pinn

        solve = dolfinx_pinn.solve
    gc.collect()
    before = _rss_bytes()
    isolated = _reset_peak()
    solution, row = _timed_solve(solve, problem, repeats, repeat_budget_s, kw)
    row["peak_rss_gib"] = (_peak_bytes() - before) / GIB if isolated else float("nan")
    if solution is not None:
        row["rel_l2"], row["rel_h1"] = reference.errors(solution)
    return row


def fem_stand_in(degree: int, n_per_period: float, sleep_s: float = 0.0) -> Callable[..., Any]:
    """A plain FEM solve posing as ``dolfinx_pinn.solve`` (the tests: real numbers in seconds).

    ``solve(problem)`` returns an object with ``value``/``gradient``/``metrics`` like a
    ``Solution``; ``sleep_s`` is added to its time (to make a slow candidate on purpose).
    """

    def solve(problem: Any, **kw: Any) -> StructuredFunction:
        started = time.perf_counter()
        counts = cells_for(problem.dim, problem.eps, n_per_period)
        uh, _ = fem_solve(problem, counts, degree, "mumps")
        dofmap = uh.function_space.dofmaps[0].list
        lower, upper = problem.domain.lower, problem.domain.upper
        function = StructuredFunction(lower, upper, counts, degree, uh.x.array.copy(), dofmap)
        time.sleep(sleep_s)
        function.metrics = {"wall_time_s": time.perf_counter() - started}  # type: ignore[attr-defined]
        return function

    solve.__name__ = f"fem_stand_in(P{degree}, N={n_per_period:g}, sleep {sleep_s:g} s)"
    return solve


# -- time to accuracy --------------------------------------------------------------------------
def time_to_accuracy(rungs: Sequence[dict[str, Any]], l2: float, h1: float) -> dict[str, Any]:
    """Time a ladder needs to reach rel. L² <= ``l2`` and rel. H¹ <= ``h1``.

    Rungs sorted by size. The first rung meeting both is the measured hit; between it and the
    rung before, log-time is interpolated linearly in log-error for each norm still missed
    before and the larger of the two times is taken ("interpolated"). If no rung meets both, the
    last two rungs are extrapolated ("extrapolated", not measured); a ladder whose first rung
    already meets both reports that rung ("first rung").
    """
    rows = [r for r in rungs if r.get("rel_l2") is not None and r.get("total_s")]
    if not rows:
        return {"kind": "none", "time_s": None}

    def meets(row: dict[str, Any]) -> bool:
        return row["rel_l2"] <= l2 and row["rel_h1"] <= h1

    def log_interpolate(a: dict, b: dict, key: str, target: float) -> float:
        ea, eb = math.log(a[key]), math.log(b[key])
        ta, tb = math.log(a["total_s"]), math.log(b["total_s"])
        if not math.isfinite(target) or a[key] <= target:
            return a["total_s"]
        if eb >= ea:  # no progress between the rungs: no meaningful interpolation
            return math.inf
        return math.exp(ta + (math.log(target) - ea) * (tb - ta) / (eb - ea))

    for index, row in enumerate(rows):
        if meets(row):
            if index == 0:
                return {"kind": "first rung", "time_s": row["total_s"], "rung": row["label"]}
            previous = rows[index - 1]
            times = [
                log_interpolate(previous, row, key, target)
                for key, target in (("rel_l2", l2), ("rel_h1", h1))
            ]
            estimate = min(max(times), row["total_s"])
            return {
                "kind": "interpolated",
                "time_s": estimate,
                "rung": row["label"],
                "rung_time_s": row["total_s"],
                "between": [previous["label"], row["label"]],
            }
    last = rows[-1]
    result: dict[str, Any] = {
        "kind": "unreached",
        "time_s": None,
        "last": last["label"],
        "last_time_s": last["total_s"],
    }
    if len(rows) >= 2:
        # An extrapolation for information only, where the last two rungs are past the
        # overheads (time and both errors change by >= 1.5x) and errors decrease.
        a, b = rows[-2], rows[-1]
        progressing = (
            b["total_s"] >= 1.5 * a["total_s"]
            and a["rel_l2"] >= 1.5 * b["rel_l2"]
            and a["rel_h1"] >= 1.5 * b["rel_h1"]
        )
        if progressing:
            times = [
                log_interpolate(a, b, key, target)
                for key, target in (("rel_l2", l2), ("rel_h1", h1))
            ]
            if math.isfinite(max(times)):
                result["extrapolated_s"] = max(times)
    return result


def best_fem_time(ladders: dict[str, list[dict]], l2: float, h1: float) -> dict[str, Any]:
    """The cheapest measured or interpolated time over the ladders.

    If no ladder reaches the accuracy, ``kind`` is ``unreached`` and ``lower_bound_s`` is the
    smallest last-rung time over the ladders (each ladder needs more than its last rung, errors
    decreasing along a ladder), with the smallest extrapolated time where there is one.
    """
    results = {name: time_to_accuracy(rungs, l2, h1) for name, rungs in ladders.items()}
    reached = [{**r, "ladder": name} for name, r in results.items() if r.get("time_s") is not None]
    if reached:
        return min(reached, key=lambda r: r["time_s"])
    unreached = [{**r, "ladder": name} for name, r in results.items() if r["kind"] == "unreached"]
    if not unreached:
        return {"kind": "none", "time_s": None}
    best: dict[str, Any] = {
        "kind": "unreached",
        "time_s": None,
        "lower_bound_s": min(r["last_time_s"] for r in unreached),
    }
    extrapolated = [r for r in unreached if "extrapolated_s" in r]
    if extrapolated:
        guess = min(extrapolated, key=lambda r: r["extrapolated_s"])
        best.update(extrapolated_s=guess["extrapolated_s"], extrapolated_from=guess["last"])
    return best


# -- the benchmark -----------------------------------------------------------------------------
def _label(degree: int, solver: str, n: int) -> str:
    return f"P{degree} {solver} N={n}"


def benchmark(
    mode: str | Mode = "quick",
    *,
    repeats: int | None = None,
    device: str = "cpu",
    cache: str | Path | None = None,
    memory_cap_gib: float | None = None,
    rung_time_cap_s: float | None = None,
    pinn_time_cap_s: float | None = None,
    eps_1d: Sequence[float] | None = None,
    eps_2d: Sequence[float] | None = None,
    solve: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the crossover benchmark; the case dict of ``benchmarks/run.py`` (rows, targets, ...).

    Args:
        mode: ``tiny`` (seconds, for the tests), ``quick`` (a few minutes) or ``full``.
        repeats: Timing repeats of cheap rungs and solves (median); default 3.
        device: Passed to ``dolfinx_pinn.solve``.
        cache: Folder of the cached 2D references (default ``benchmarks/.cache/crossover``).
        memory_cap_gib: Override of the mode's memory cap.
        rung_time_cap_s: Override of the mode's time cap per rung.
        pinn_time_cap_s: Override of the mode's time cap of ``dolfinx_pinn.solve``.
        eps_1d: Override of the mode's 1D ε (empty: none).
        eps_2d: Override of the mode's 2D ε.
        solve: Replaces ``dolfinx_pinn.solve`` (the tests pass a stand-in).
        log: Progress output (default: print).
    """
    log = log or (lambda text: print(text, flush=True))
    mode = MODES[mode] if isinstance(mode, str) else mode
    overrides = {
        "memory_cap_gib": memory_cap_gib,
        "rung_time_cap_s": rung_time_cap_s,
        "pinn_time_cap_s": pinn_time_cap_s,
        "eps_1d": None if eps_1d is None else tuple(eps_1d),
        "eps_2d": None if eps_2d is None else tuple(eps_2d),
    }
    mode = replace(mode, **{k: v for k, v in overrides.items() if v is not None})
    repeats = 3 if repeats is None else repeats
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    model = CostModel()
    started = time.perf_counter()
    rows, ladder_rows, references, pinn = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="crossover_") as folder:
        for dim, eps_values in ((1, mode.eps_1d), (2, mode.eps_2d)):
            for eps in eps_values:
                result = _benchmark_eps(
                    dim, eps, mode, model, repeats, device, solve, cache, Path(folder), log
                )
                rows.append(result["row"])
                ladder_rows += result["rungs"]
                references.append(result["reference"])
                pinn.append({"dim": dim, "eps": eps, **result["pinn"]})
    import torch

    case: dict[str, Any] = {
        "rows": rows,
        "ladder": ladder_rows,
        "references": references,
        "pinn": pinn,
        "mode": mode.name,
        "settings": {
            "eps_1d": list(mode.eps_1d),
            "eps_2d": list(mode.eps_2d),
            "memory_cap_gib": mode.memory_cap_gib,
            "rung_time_cap_s": mode.rung_time_cap_s,
            "reference_time_cap_s": mode.reference_time_cap_s,
            "pinn_time_cap_s": mode.pinn_time_cap_s,
            "gamg_rtol": GAMG_RTOL,
            "reference_gamg_rtol": REFERENCE_GAMG_RTOL,
            "torch_threads": torch.get_num_threads(),
            "solve": "dolfinx_pinn.solve" if solve is None else getattr(solve, "__name__", "?"),
            "device": device,
            "repeats": repeats,
            "host": socket.gethostname().split(".")[0],
            "elapsed_s": time.perf_counter() - started,
        },
    }
    case["statements"] = {dim: crossover_statement(rows, dim) for dim in (1, 2)}
    case["targets"] = _targets(rows)
    case["markdown"] = markdown_details(case)
    return case


def _needed(dim: int, pinn: dict[str, Any], floor: tuple[float, float]) -> list[tuple]:
    """The accuracies the tables need, clamped to twice the reference's own error."""
    needed = [(l2, h1) for _, l2, h1 in LEVELS[dim]]
    if "rel_l2" in pinn:
        needed.append((pinn["rel_l2"], pinn["rel_h1"]))
    return [(max(l2, 2 * floor[0]), max(h1, 2 * floor[1])) for l2, h1 in needed]


def _benchmark_eps(
    dim: int,
    eps: float,
    mode: Mode,
    model: CostModel,
    repeats: int,
    device: str,
    solve: Callable[..., Any] | None,
    cache: Path,
    work: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One ε: the reference, the dolfinx_pinn row, the four FEM ladders and the crossover row."""
    problem = make_problem(dim, eps)
    if dim == 2:
        reference, reference_info = reference_2d(eps, mode, model, cache, work, log)
    else:
        reference, reference_info = reference_1d(eps, mode, log)
    reference_info["dim"] = dim
    kw = {"device": device} if solve is None else {}
    pinn = {"error": "no reference"}
    if reference is not None:
        pinn = pinn_row(
            problem, reference, solve=solve, repeats=repeats,
            repeat_budget_s=mode.repeat_budget_s, work=work, timeout_s=mode.pinn_time_cap_s,
            memory_cap_gib=mode.memory_cap_gib, **kw,
        )  # fmt: skip
    if "error" in pinn:
        log(f"  dolfinx_pinn {dim}D ε = {eps:g}: {pinn['error']}")
    else:
        log(
            f"  dolfinx_pinn {dim}D ε = {eps:g}: {pinn['wall_time_s']:.2f} s, "
            f"L² {pinn.get('rel_l2', math.nan):.2e}, H¹ {pinn.get('rel_h1', math.nan):.2e}"
        )
    ladders: dict[str, list[dict[str, Any]]] = {f"P{d} {s}": [] for d in DEGREES for s in SOLVERS}
    all_rungs: list[dict[str, Any]] = []
    if reference is None:
        row = _crossover_row(dim, eps, pinn, ladders, reference_info)
        return {"row": row, "rungs": [], "reference": reference_info, "pinn": pinn}
    reference_dofs = reference_info.get("dofs", math.inf)
    reference_degree = reference_info.get("degree", 0)
    state = {name: {"n": 2, "active": True, "why": ""} for name in ladders}
    floor = reference.estimated_error or (0.0, 0.0)
    needed = _needed(dim, pinn, floor)

    def next_rung(name: str) -> dict[str, Any] | None:
        """The next rung of a ladder, or None (and the ladder stops) if it is not run."""
        s = state[name]
        degree, solver = int(name[1]), name.split()[1]
        n = s["n"]
        if n > mode.max_n[dim]:
            s.update(active=False, why=f"N > {mode.max_n[dim]} ({mode.name} mode)")
            return None
        counts = cells_for(dim, eps, n)
        dofs = num_dofs(counts, degree)
        memory, seconds = model.predict(dim, degree, solver, dofs)
        rung = {
            "dim": dim, "eps": eps, "label": _label(degree, solver, n), "ladder": name,
            "n_per_period": n, "degree": degree, "solver": solver, "counts": counts,
            "dofs": dofs, "predicted_gib": memory / GIB, "predicted_s": seconds,
        }  # fmt: skip
        why = ""
        if dim == 2 and reference_degree == 2 and dofs > reference_dofs / 4:
            why = f"N={n}: {dofs} dofs > 1/4 of the P2 reference's (not measurable)"
        elif memory > mode.memory_cap_gib * GIB:
            why = f"N={n}: predicted {memory / GIB:.1f} GiB > {mode.memory_cap_gib:g} GiB"
        elif seconds > mode.rung_time_cap_s:
            why = f"N={n}: predicted {seconds:.0f} s > {mode.rung_time_cap_s:g} s"
        if why:
            s.update(active=False, why="skipped " + why)
            all_rungs.append({**rung, "skipped": why})
            return None
        return rung

    def measure(planned: list[dict[str, Any]]) -> None:
        """Run planned rungs in one worker, then their errors here, then the stop rules."""
        jobs = []
        for rung in planned:
            state[rung["ladder"]]["n"] = 2 * rung["n_per_period"]
            save = work / f"rung_{dim}_{eps:.6g}_{rung['label'].replace(' ', '_')}.npz"
            jobs.append(
                {"degree": rung["degree"], "counts": rung["counts"], "solver": rung["solver"],
                 "repeats": repeats, "repeat_budget_s": mode.repeat_budget_s, "save": str(save)}
            )  # fmt: skip
        timeout = max(300.0, 10.0 * sum(r["predicted_s"] for r in planned))
        results, error = run_jobs(dim, eps, jobs, work, timeout, mode.memory_cap_gib + 1.0)
        for index, rung in enumerate(planned):
            name, n = rung["ladder"], rung["n_per_period"]
            all_rungs.append(rung)
            if index >= len(results):
                rung["failed"] = error or "no result"
                state[name].update(active=False, why=f"N={n} failed: {rung['failed']}")
                continue
            result = results[index]
            model.add(dim, rung["degree"], rung["solver"], result)
            lower, upper = problem.domain.lower, problem.domain.upper
            function = StructuredFunction.load(
                result["save"], lower, upper, rung["counts"], rung["degree"]
            )
            if dim == 1:
                l2, h1 = reference.errors(function, cells_per_period=n)
            else:
                l2, h1 = reference.errors(function)
            del function
            Path(result["save"]).unlink(missing_ok=True)
            keys = ("mesh_s", "assembly_s", "solve_s", "total_s", "repeats", "iterations")
            rung.update(
                {k: result[k] for k in keys},
                peak_rss_gib=result["peak_rss_bytes"] / GIB,
                rel_l2=l2,
                rel_h1=h1,
            )
            ladders[name].append(rung)
            log(
                f"  {dim}D ε = {eps:g} {rung['label']}: {rung['dofs']} dofs, "
                f"{rung['total_s']:.2f} s (mesh {rung['mesh_s']:.2f}, assembly "
                f"{rung['assembly_s']:.2f}, solve {rung['solve_s']:.2f}), "
                f"{rung['peak_rss_gib']:.2f} GiB, L² {l2:.2e}, H¹ {h1:.2e}"
            )
            previous = ladders[name][-2] if len(ladders[name]) > 1 else None
            if all(l2 <= a and h1 <= b for a, b in needed):
                state[name].update(active=False, why=f"N={n}: every needed accuracy reached")
            elif previous and l2 < 1e-5 and l2 > previous["rel_l2"] / 1.5:
                state[name].update(active=False, why=f"N={n}: rel. L² stagnates (round-off)")
        for name, rungs in ladders.items():  # can a ladder still win an accuracy it lacks?
            if not state[name]["active"] or not rungs:
                continue
            last = rungs[-1]
            others = {k: v for k, v in ladders.items() if k != name}
            lacking = [
                (a, b) for a, b in needed if not (last["rel_l2"] <= a and last["rel_h1"] <= b)
            ]
            beaten = [best_fem_time(others, a, b).get("time_s") for a, b in lacking]
            if all(t is not None and t < last["total_s"] for t in beaten):
                state[name].update(
                    active=False,
                    why=f"N={last['n_per_period']}: already slower than another ladder at every "
                    "accuracy it lacks",
                )

    # Small rungs (predicted < 2 s and < 1 GiB above the baseline) of all four ladders in one
    # worker; then one rung per worker, the cheapest predicted next, so that the stop rules see
    # every measured error.
    small: list[dict[str, Any]] = []
    for name in ladders:
        while state[name]["active"]:
            rung = next_rung(name)
            if rung is None:
                break
            if rung["predicted_s"] > 2.0 or rung["predicted_gib"] * GIB > model.baseline + GIB:
                break
            small.append(rung)
            state[name]["n"] *= 2
    for rung in small:
        state[rung["ladder"]]["n"] = 2  # measure() advances the ladders again
    if small:
        measure(small)
    while True:
        candidates = [
            r for name in ladders if state[name]["active"] for r in [next_rung(name)] if r
        ]
        if not candidates:
            break
        measure([min(candidates, key=lambda r: r["predicted_s"])])
    reference_info["ladder_ends"] = {name: s["why"] for name, s in state.items()}
    return {
        "row": _crossover_row(dim, eps, pinn, ladders, reference_info),
        "rungs": all_rungs,
        "reference": reference_info,
        "pinn": pinn,
    }


def _level(ladders: dict[str, list[dict]], l2: float, h1: float, floor: tuple) -> dict[str, Any]:
    """Best FEM time to (l2, h1), flagged when the target is below the reference's accuracy."""
    best = best_fem_time(ladders, l2, h1)
    best["below_reference_accuracy"] = bool(l2 < 2 * floor[0] or h1 < 2 * floor[1])
    best["how"] = _describe(best)
    return best


def _times(ratio: float) -> str:
    return f"{ratio:.2g}x" if ratio < 100 else f"{ratio:.0f}x"


def _crossover_row(
    dim: int, eps: float, pinn: dict, ladders: dict[str, list[dict]], reference: dict
) -> dict[str, Any]:
    """One table row: FEM's time to the pinn's accuracy and who wins; the fixed levels.

    ``ratio`` is t_FEM / t_pinn (> 1: dolfinx_pinn is faster). Where no ladder reached the
    pinn's accuracy, FEM needs more than its cheapest last rung (``ratio_at_least``), and, in 2D
    where the accuracy is at or above the reference's estimated own error, at most the
    reference solve's time (``ratio_at_most``: the reference is itself a plain DOLFINx solve).
    ``win``: True (dolfinx_pinn faster), False (FEM faster) or None (undecided).
    """
    floor = (reference.get("estimated_l2") or 0.0, reference.get("estimated_h1") or 0.0)
    ok = "error" not in pinn and "rel_l2" in pinn
    row: dict[str, Any] = {
        "dim": dim,
        "eps": eps,
        "pinn_s": pinn.get("wall_time_s") if ok else None,
        "pinn_l2": pinn.get("rel_l2") if ok else None,
        "pinn_h1": pinn.get("rel_h1") if ok else None,
        "fem_s": None,
        "ratio": None,
        "ratio_at_least": None,
        "ratio_at_most": None,
        "win": None,
        "verdict": "",
        "fem_how": "-",
        "ref_err_l2": reference.get("estimated_l2"),
        "ref_err_h1": reference.get("estimated_h1"),
        "pinn": "ok" if ok else pinn.get("error", "no reference"),
    }
    if "error" in reference:
        row["verdict"] = f"undecided: no reference ({reference['error']})"
    elif not ok:
        row["verdict"] = f"undecided: dolfinx_pinn failed ({pinn.get('error')})"
    else:
        pinn_s = row["pinn_s"]
        best = _level(ladders, row["pinn_l2"], row["pinn_h1"], floor)
        row["fem_how"] = best["how"]
        if best.get("time_s") is not None:
            row["fem_s"] = best["time_s"]
            row["ratio"] = ratio = best["time_s"] / pinn_s
            row["win"] = ratio > 1.0
        else:
            low = best.get("lower_bound_s")
            row["ratio_at_least"] = low / pinn_s if low else None
            if (
                dim == 2
                and reference.get("solve_s")
                and row["pinn_l2"] >= floor[0]
                and row["pinn_h1"] >= floor[1]
            ):
                row["ratio_at_most"] = reference["solve_s"] / pinn_s
                row["fem_how"] += f"; ≤ {_g(reference['solve_s'])} s (the reference solve)"
            # FEM cannot get there when every ladder ended on memory, on the reference's size
            # or on its round-off floor (not on a time cap or the mode's largest N).
            ends = reference.get("ladder_ends", {}).values()
            walls = ("GiB", "not measurable", "stagnates")
            by_limit = bool(ends) and all(any(w in end for w in walls) for end in ends)
            if (row["ratio_at_least"] or 0.0) > 1.0:
                row["win"] = True
            elif (row["ratio_at_most"] or math.inf) < 1.0:
                row["win"] = False
            elif by_limit and row["ratio_at_most"] is None:
                row["win"] = True
            reached = [r for rungs in ladders.values() for r in rungs if "rel_l2" in r]
            if reached:
                top = min(reached, key=lambda r: (r["rel_l2"], r["total_s"]))
                row["fem_how"] += (
                    f" (most accurate: {top['label']}, L² {_g(top['rel_l2'])}, "
                    f"H¹ {_g(top['rel_h1'])} in {_g(top['total_s'])} s)"
                )
        if row["win"] is True:
            if row["ratio"] is not None:
                row["verdict"] = f"dolfinx_pinn wins, {_times(row['ratio'])} faster"
            elif (row["ratio_at_least"] or 0.0) > 1.0:
                row["verdict"] = f"dolfinx_pinn wins, > {_times(row['ratio_at_least'])} faster"
            else:
                row["verdict"] = (
                    "dolfinx_pinn wins: FEM did not reach its accuracy (memory cap or round-off)"
                )
        elif row["win"] is False:
            ratio = row["ratio"] if row["ratio"] is not None else row["ratio_at_most"]
            bound = "" if row["ratio"] is not None else "≥ "
            row["verdict"] = f"FEM wins, {bound}{_times(1.0 / ratio)} faster"
        else:
            low, high = row["ratio_at_least"], row["ratio_at_most"]
            row["verdict"] = "undecided: FEM did not reach its accuracy within the caps"
            bounds = [f"> {_g(low)}"] if low is not None else []
            bounds += [f"≤ {_g(high)}"] if high is not None else []
            if bounds:
                row["verdict"] += f" (ratio {' and '.join(bounds)})"
        if best["below_reference_accuracy"]:
            row["verdict"] += "; at or below the reference's own accuracy"
    row["levels"] = []
    for name, l2, h1 in LEVELS[dim]:
        best = _level(ladders, l2, h1, floor)
        row["levels"].append({"name": name, "l2": l2, "h1": h1, **best})
    return row


def _describe(best: dict[str, Any]) -> str:
    """A short text of how a time to accuracy was obtained."""
    kind = best.get("kind", "none")
    text = "no rungs"
    if kind == "first rung":
        text = f"{best['rung']} (its first rung)"
    elif kind == "interpolated":
        a, b = best["between"]
        text = f"{best['ladder']}, interpolated N={a.split('N=')[1]}→{b.split('N=')[1]}"
    elif kind == "unreached":
        text = f"not reached: > {_g(best.get('lower_bound_s'))} s"
        if best.get("extrapolated_s") is not None:
            text += (
                f", extrapolated ~{_g(best['extrapolated_s'])} s from {best['extrapolated_from']}"
            )
    if best.get("below_reference_accuracy"):
        text += " [below ref. accuracy]"
    return text


def _ratio_of(row: dict[str, Any]) -> float | None:
    """The measured ratio, else the bound that decided the row."""
    for key in ("ratio", "ratio_at_least", "ratio_at_most"):
        if row.get(key) is not None:
            return row[key]
    return None


def crossover_statement(rows: Sequence[dict[str, Any]], dim: int) -> str:
    """\"dolfinx_pinn is faster below ε ≈ ...\" from the decided rows (interpolated in log ε).

    The crossover is the largest ε from which on down dolfinx_pinn wins at every decided ε; it
    is interpolated in log ε where log(ratio) crosses 0 between that ε and the next larger one.
    """
    mine = sorted((r for r in rows if r["dim"] == dim), key=lambda r: -r["eps"])
    if not mine:
        return f"{dim}D: not measured"
    known = [r for r in mine if r.get("win") is not None]
    undecided = [r["eps"] for r in mine if r.get("win") is None]
    note = f" (undecided at ε = {', '.join(f'{e:g}' for e in undecided)})" if undecided else ""
    if not known:
        return f"{dim}D: no ε decided, no crossover measured" + note
    if not known[-1]["win"]:
        wins = [f"{r['eps']:g}" for r in known if r["win"]]
        where = f"; it wins only at ε = {', '.join(wins)}" if wins else " at any measured ε"
        return f"{dim}D: dolfinx_pinn is not faster than FEM{where}" + note
    index = len(known) - 1
    while index > 0 and known[index - 1]["win"]:
        index -= 1
    if index == 0:
        return f"{dim}D: dolfinx_pinn is faster at every measured ε (≤ {known[0]['eps']:g})" + note
    win, lose = known[index], known[index - 1]
    e1, e0 = math.log(win["eps"]), math.log(lose["eps"])
    r1, r0 = _ratio_of(win), _ratio_of(lose)
    if r1 and r0 and r1 > 1.0 >= r0:
        crossing = math.exp(e0 - math.log(r0) * (e1 - e0) / (math.log(r1) - math.log(r0)))
    else:
        crossing = math.exp(0.5 * (e0 + e1))
    also = [f"{r['eps']:g}" for r in known[:index] if r["win"]]
    return (
        f"{dim}D: dolfinx_pinn is faster below ε ≈ {crossing:.2g} (it wins at ε = "
        f"{win['eps']:g} and below, FEM wins at ε = {lose['eps']:g})"
        + (f"; dolfinx_pinn also wins at ε = {', '.join(also)}" if also else "")
        + note
    )


def _targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figures (``met`` False where missed)."""
    targets = []
    for dim in (1, 2):
        mine = [r for r in rows if r["dim"] == dim]
        if not mine:
            continue
        l2, h1, seconds = TARGETS[dim]
        description = (
            f"{dim}D dolfinx_pinn: rel. L² <= {l2:g}"
            + (f" and H¹ <= {h1:g}" if math.isfinite(h1) else "")
            + f" in <= {seconds:g} s at every ε"
        )
        figures, met = [], True
        for r in mine:
            if r["pinn"] != "ok":
                figures.append(f"ε={r['eps']:g}: {r['pinn']}")
                met = False
                continue
            ok = r["pinn_l2"] <= l2 and r["pinn_h1"] <= h1 and r["pinn_s"] <= seconds
            met = met and ok
            figures.append(
                f"ε={r['eps']:g}: {r['pinn_l2']:.1e}/{r['pinn_h1']:.1e} in {r['pinn_s']:.1f} s"
                + ("" if ok else " (missed)")
            )
        targets.append({"target": description, "measured": ", ".join(figures), "met": met})
    small = [r for r in rows if r["dim"] == 2 and r["eps"] <= 0.02]
    if small:
        targets.append(
            {
                "target": "2D: dolfinx_pinn faster than the best FEM to its accuracy, ε <= 0.02",
                "measured": ", ".join(f"ε={r['eps']:g}: {r['verdict']}" for r in small),
                "met": all(r.get("win") is True for r in small),
            }
        )
    return targets


# -- report ------------------------------------------------------------------------------------
def _g(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}e}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3g}"
    return str(value)


def markdown_details(case: dict[str, Any]) -> str:
    """The crossover's own tables: statements, time to accuracy, references and the ladders."""
    settings = case["settings"]
    lines = [
        f"### crossover: FEM against dolfinx_pinn ({case['mode']} mode)",
        "",
        *(f"- {case['statements'][dim]}" for dim in (1, 2)),
        "",
        "FEM: plain DOLFINx in one process (one core), P1/P2 Lagrange, MUMPS (LU) or CG + GAMG "
        f"(rtol {GAMG_RTOL:g}); time = mesh + assembly + solve (median of repeats for cheap "
        f"rungs); rungs predicted above {settings['memory_cap_gib']:g} GiB or "
        f"{settings['rung_time_cap_s']:g} s are skipped (listed below). dolfinx_pinn: "
        f"`{settings['solve']}(problem)` in one process, {settings['torch_threads']} torch "
        f"threads, the time of the call (stopped after {settings['pinn_time_cap_s']:g} s, plus "
        f"{EVALUATION_S_PER_POINT * 1e6:g} µs per reference point for the evaluation, or "
        f"{settings['memory_cap_gib']:g} GiB). Errors of both by quadrature against the same "
        "reference. Machine load is not controlled. ε measured: 1D "
        f"{', '.join(f'{e:g}' for e in settings['eps_1d']) or 'none'}; 2D "
        f"{', '.join(f'{e:g}' for e in settings['eps_2d']) or 'none'}.",
        "",
        "#### Time to the same accuracy",
        "",
        "ratio = FEM's time / dolfinx_pinn's (> 1: dolfinx_pinn is faster).",
        "",
        "| dim | ε | dolfinx_pinn s | pinn L² | pinn H¹ | best FEM s | ratio | verdict | "
        "how (FEM) | reference's est. own error L²/H¹ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in case["rows"]:
        own = f"{_g(r['ref_err_l2'])}/{_g(r['ref_err_h1'])}" if r["dim"] == 2 else "exact"
        ratio = _g(r["ratio"])
        if r["ratio"] is None and (r["ratio_at_least"] or r["ratio_at_most"]):
            ratio = " ".join(
                f"{sign} {_g(value)}"
                for sign, value in ((">", r["ratio_at_least"]), ("≤", r["ratio_at_most"]))
                if value is not None
            )
        pinn_s = _g(r["pinn_s"]) if r["pinn"] == "ok" else "failed"
        lines.append(
            f"| {r['dim']} | {r['eps']:.3g} | {pinn_s} | {_g(r['pinn_l2'])} | "
            f"{_g(r['pinn_h1'])} | {_g(r['fem_s'])} | {ratio} | {r['verdict']} | "
            f"{r['fem_how']} | {own} |"
        )
    for dim in (1, 2):
        mine = [r for r in case["rows"] if r["dim"] == dim]
        if not mine:
            continue
        names = [name for name, _, _ in LEVELS[dim]]
        lines += [
            "",
            f"#### {dim}D: best FEM time to fixed accuracy [s] (how)",
            "",
            "| ε | " + " | ".join(names) + " | reference's est. own error L²/H¹ |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for r in mine:
            cells = [f"{_g(level['time_s'])} ({level['how']})" for level in r["levels"]]
            own = f"{_g(r['ref_err_l2'])}/{_g(r['ref_err_h1'])}" if dim == 2 else "exact"
            lines.append(f"| {r['eps']:.3g} | " + " | ".join(cells) + f" | {own} |")
    lines += [
        "",
        "#### dolfinx_pinn.solve",
        "",
        "| dim | ε | s (calls) | metrics wall_time_s | metrics rel L²/H¹ | converged | "
        "peak RSS GiB | warnings or error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in case["pinn"]:
        note = run.get("error") or "; ".join(run.get("warnings", []))
        lines.append(
            f"| {run['dim']} | {run['eps']:.3g} | {_g(run.get('wall_time_s'))} "
            f"({run.get('calls', 0)}) | {_g(run.get('metrics_wall_time_s'))} | "
            f"{_g(run.get('metrics_rel_l2'))}/{_g(run.get('metrics_rel_h1'))} | "
            f"{_g(run.get('converged'))} | {_g(run.get('peak_rss_gib'))} | "
            f"{note.replace('|', '/')} |"
        )
    lines += ["", "#### 2D references", ""]
    lines += [
        "| ε | reference | solve s | peak GiB | ‖u_ref − u_coarse‖ L²/H¹ | est. own error L²/H¹ |",
        "|---|---|---|---|---|---|",
    ]
    for ref in case["references"]:
        if ref.get("dim") != 2:
            continue
        lines.append(
            f"| {ref['eps']:.3g} | {ref.get('description', ref.get('error'))} | "
            f"{_g(ref.get('solve_s'))} | {_g(ref.get('peak_rss_gib'))} | "
            f"{_g(ref.get('companion_difference_l2'))}/{_g(ref.get('companion_difference_h1'))} | "
            f"{_g(ref.get('estimated_l2'))}/{_g(ref.get('estimated_h1'))} |"
        )
    lines += [
        "",
        "#### FEM ladders",
        "",
        "| dim | ε | rung | dofs | total s | mesh s | assembly s | solve s | its | peak GiB | "
        "rel L² | rel H¹ | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {(r["dim"], r["eps"]): i for i, r in enumerate(case["rows"])}
    ladder = sorted(
        case["ladder"],
        key=lambda r: (order.get((r["dim"], r["eps"]), 0), r["ladder"], r["n_per_period"]),
    )
    for rung in ladder:
        note = rung.get("skipped") or rung.get("failed") or ""
        if rung.get("skipped"):
            note = (
                f"skipped: {note} (predicted {rung['predicted_gib']:.1f} GiB, "
                f"{rung['predicted_s']:.0f} s)"
            )
        lines.append(
            f"| {rung['dim']} | {rung['eps']:.3g} | {rung['label']} | {rung['dofs']} | "
            f"{_g(rung.get('total_s'))} | {_g(rung.get('mesh_s'))} | "
            f"{_g(rung.get('assembly_s'))} | {_g(rung.get('solve_s'))} | "
            f"{_g(rung.get('iterations'))} | {_g(rung.get('peak_rss_gib'))} | "
            f"{_g(rung.get('rel_l2'))} | {_g(rung.get('rel_h1'))} | {note} |"
        )
    ends = [
        f"- {ref['dim']}D ε = {ref['eps']:.3g}: "
        + "; ".join(f"{k}: {v}" for k, v in ref.get("ladder_ends", {}).items())
        for ref in case["references"]
        if ref.get("ladder_ends")
    ]
    if ends:
        lines += ["", "Why each ladder ended:", "", *ends]
    lines += [
        "",
        f"Run time {settings['elapsed_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot(case: dict[str, Any], stem: Path | str, title: str = "") -> list[str]:
    """Time to accuracy against ε (log-log), FEM and dolfinx_pinn, one panel per dimension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = [d for d in (1, 2) if any(r["dim"] == d for r in case["rows"])]
    if not dims:
        return []
    figure, axes = plt.subplots(1, len(dims), figsize=(6.5 * len(dims), 4.8), squeeze=False)
    for axis, dim in zip(axes[0], dims, strict=True):
        rows = sorted((r for r in case["rows"] if r["dim"] == dim), key=lambda r: r["eps"])
        eps = np.array([r["eps"] for r in rows])
        for index, ((name, _, _), marker) in enumerate(zip(LEVELS[dim], "osD", strict=True)):
            times = [r["levels"][index]["time_s"] for r in rows]
            times = [np.nan if t is None else t for t in times]
            if np.isfinite(times).any():
                axis.loglog(
                    eps, times, marker=marker, linestyle=":", linewidth=1, markersize=4,
                    alpha=0.6, label=f"best FEM to {name}",
                )  # fmt: skip
        pinn = [r["pinn_s"] if r["pinn"] == "ok" else np.nan for r in rows]
        fem_at_pinn = [r["fem_s"] if r["fem_s"] is not None else np.nan for r in rows]
        fem_bound = [
            r["ratio_at_least"] * r["pinn_s"] if r["ratio_at_least"] else np.nan for r in rows
        ]
        fem_above = [
            r["ratio_at_most"] * r["pinn_s"] if r["ratio_at_most"] else np.nan for r in rows
        ]
        if np.isfinite(pinn).any():
            axis.loglog(eps, pinn, "k-*", label="dolfinx_pinn.solve")
            axis.loglog(eps, fem_at_pinn, "r--^", label="best FEM at dolfinx_pinn's accuracy")
            if np.isfinite(fem_bound).any():
                axis.loglog(
                    eps, fem_bound, "r^", mfc="none",
                    label="best FEM at dolfinx_pinn's accuracy: not reached, > this",
                )  # fmt: skip
            if np.isfinite(fem_above).any():
                axis.loglog(
                    eps, fem_above, "rv", mfc="none",
                    label="best FEM at dolfinx_pinn's accuracy: ≤ this (the reference solve)",
                )  # fmt: skip
        else:
            axis.plot([], [], "k-*", label="dolfinx_pinn.solve: not available")
        axis.set_xlabel("ε")
        axis.set_ylabel("wall time to accuracy [s]")
        axis.set_title(f"{dim}D paper_{dim}d" + (f": {title}" if title else ""))
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(f"{stem}-crossover.png")
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return [path.name]


def write_results(case: dict[str, Any], out: str | Path, name: str) -> Path:
    """``<out>/<name>.json``, ``.md`` (the runner's layout) and ``-crossover.png``; the stem."""
    import platform

    import torch

    sys.path.insert(0, str(HERE))
    import run as runner

    results = {
        "host": case["settings"]["host"],
        "device": case["settings"]["device"],
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "quick": case["mode"] != "full",
        "repeats": case["settings"].get("repeats"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cases": {"crossover": case},
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    stem = Path(out) / name
    results["plots"] = plot(case, stem, case["mode"])
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1, default=float))
    Path(f"{stem}.md").write_text(runner.markdown(results))
    return stem


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); ``--worker SPEC`` is the internal worker."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="reference cache folder")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of cheap runs")
    parser.add_argument("--device", default="cpu", help="device of dolfinx_pinn.solve")
    parser.add_argument("--memory-cap-gib", type=float, default=None)
    parser.add_argument("--rung-time-cap-s", type=float, default=None)
    parser.add_argument("--pinn-time-cap-s", type=float, default=None)
    parser.add_argument("--eps-1d", type=float, nargs="*", default=None, help="override the ε")
    parser.add_argument("--eps-2d", type=float, nargs="*", default=None, help="override the ε")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    case = benchmark(
        args.mode,
        repeats=args.repeats,
        device=args.device,
        cache=args.cache,
        memory_cap_gib=args.memory_cap_gib,
        rung_time_cap_s=args.rung_time_cap_s,
        pinn_time_cap_s=args.pinn_time_cap_s,
        eps_1d=args.eps_1d,
        eps_2d=args.eps_2d,
    )
    stem = write_results(case, args.out, f"crossover-{args.mode}")
    print(f"wrote {stem}.json, {stem}.md, {stem}-crossover.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
