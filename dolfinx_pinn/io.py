"""Run-folder outputs of the hybrid solver: fields (VTX or XDMF), figures, metrics and history.

:func:`write_outputs` writes, into one folder,

- ``coarse.bp`` (VTX, when dolfinx has ADIOS2; else ``coarse.xdmf``): the coarse state y_h and
  the compression Q̄v on the coarse mesh;
- ``fine.bp`` / ``fine.xdmf``: the network interpolated on a fine P1 mesh and, with a
  reference, its pointwise error;
- ``solution.png``, ``history.png`` (and ``error.png`` with a reference): off-screen figures like
  the paper's Figures 1-3 (matplotlib's Agg backend);
- ``metrics.json`` (:data:`METRIC_KEYS` at least) and ``history.csv`` (one row per step).

MPI: collective on the solver's communicator; files are written once (rank 0 for the figures,
JSON and CSV; the field writers are parallel).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from mpi4py import MPI

import dolfinx
import numpy as np

from dolfinx_pinn.history import History

__all__ = [
    "METRIC_KEYS",
    "fine_output_mesh",
    "network_function",
    "solver_metrics",
    "write_fields",
    "write_figures",
    "write_history_csv",
    "write_metrics",
    "write_outputs",
]

#: The keys every ``metrics.json`` holds.
METRIC_KEYS = (
    "rel_l2",
    "rel_h1",
    "K_tilde",
    "iterations",
    "wall_time_s",
    "time_per_iteration_s",
    "coarse_share",
    "n_ranks",
    "device",
)


def fine_output_mesh(solver: Any, elements_per_period: int = 8, max_cells: int = 250_000) -> Any:
    """A fine mesh for the network's field: the reference's mesh, or a uniform one (collective).

    Args:
        solver: The :class:`~dolfinx_pinn.solver.HybridSolver`.
        elements_per_period: Cells per finest oscillation of the coefficient.
        max_cells: Cap on the number of cells.
    """
    reference = solver.reference
    if isinstance(reference, dolfinx.fem.Function):
        return reference.function_space.mesh
    problem = solver.problem
    per_axis = max(8, problem.default_resolution(elements_per_period))
    per_axis = min(per_axis, int(max_cells ** (1.0 / problem.dim)))
    counts = [max(2, round(per_axis * length)) for length in problem.domain.lengths]
    return problem.create_mesh(solver.comm, counts)


def network_function(solver: Any, mesh: Any, name: str = "network") -> dolfinx.fem.Function:
    """The network interpolated at the P1 nodes of ``mesh`` (no communication: replicated)."""
    space = dolfinx.fem.functionspace(mesh, ("Lagrange", 1))
    function = dolfinx.fem.Function(space, name=name)
    coordinates = space.tabulate_dof_coordinates()[:, : solver.problem.dim]
    function.x.array[:] = solver.predict(coordinates)
    return function


def _error_function(solver: Any, network: dolfinx.fem.Function) -> dolfinx.fem.Function | None:
    reference = solver.reference
    space = network.function_space
    error = dolfinx.fem.Function(space, name="error")
    if isinstance(reference, dolfinx.fem.Function):
        if reference.function_space.mesh is not space.mesh:
            return None
        reference_p1 = dolfinx.fem.Function(space)
        reference_p1.interpolate(reference)
        error.x.array[:] = network.x.array - reference_p1.x.array
        return error
    value = getattr(reference, "value", None)
    if value is None and isinstance(reference, tuple) and len(reference) == 2:
        value = reference[0]
    if value is None:
        return None
    coordinates = space.tabulate_dof_coordinates()[:, : solver.problem.dim]
    error.x.array[:] = network.x.array - np.asarray(value(coordinates)).reshape(-1)
    return error


def _write(path: Path, functions: list[dolfinx.fem.Function]) -> Path:
    mesh = functions[0].function_space.mesh
    if dolfinx.has_adios2:
        target = path.with_suffix(".bp")
        with dolfinx.io.VTXWriter(mesh.comm, target, functions, engine="BP4") as writer:
            writer.write(0.0)
        return target
    target = path.with_suffix(".xdmf")
    with dolfinx.io.XDMFFile(mesh.comm, target, "w") as writer:
        writer.write_mesh(mesh)
        for function in functions:
            writer.write_function(function)
    return target


def write_fields(solver: Any, folder: Path) -> dict[str, Any]:
    """Write y_h, Q̄v (coarse) and the network and its error (fine); returns the fields.

    Collective. Returns a dict with the Functions ``y_h``, ``Qv``, ``network`` and ``error``
    (``None`` without a pointwise reference) and the written ``files``.
    """
    state = solver.coarse_state()
    compressed = solver.compression_function()
    mesh = fine_output_mesh(solver)
    network = network_function(solver, mesh)
    error = _error_function(solver, network)
    files = [
        _write(folder / "coarse", [state, compressed]),
        _write(folder / "fine", [network] + ([error] if error is not None else [])),
    ]
    return {"y_h": state, "Qv": compressed, "network": network, "error": error, "files": files}


def _gather_nodes(function: dolfinx.fem.Function) -> tuple[np.ndarray, np.ndarray] | None:
    """Owned node coordinates and values gathered on rank 0 (None elsewhere)."""
    space = function.function_space
    n = space.dofmap.index_map.size_local
    coordinates = space.tabulate_dof_coordinates()[:n]
    values = function.x.array[:n].real
    comm = space.mesh.comm
    parts = comm.gather((coordinates, values), root=0)
    if comm.rank != 0:
        return None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _positive(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """The points of ``(x, y)`` with a finite, positive y (what a log axis can show)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    keep = np.isfinite(y) & (y > 0)
    return x[keep], y[keep]


def _log_plot(axis: Any, x: Any, y: Any, *args: Any, **kwargs: Any) -> bool:
    """``semilogy`` of the positive values only (zeros and missing values left out)."""
    x, y = _positive(x, y)
    if len(y) == 0:
        return False
    axis.semilogy(x, y, *args, **kwargs)
    return True


def _field_axes(figure: Any, axis: Any, image: Any, label: str) -> None:
    axis.set_xlabel("$x_1$")
    axis.set_ylabel("$x_2$")
    axis.set_aspect("equal")
    figure.colorbar(image, ax=axis, label=label)


def write_figures(solver: Any, fields: dict[str, Any], folder: Path) -> list[Path]:
    """Solution/compression, error and history figures (off-screen; collective)."""
    gathered = {
        key: _gather_nodes(fields[key])
        for key in ("y_h", "Qv", "network", "error")
        if fields.get(key) is not None
    }
    if solver.comm.rank != 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (
        ("solution", _solution_figure),
        ("error", _error_figure),
        ("history", _history_figure),
    ):
        figure = draw(plt, solver, gathered)
        if figure is None:
            continue
        path = folder / f"{name}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def _solution_figure(plt: Any, solver: Any, gathered: dict[str, Any]) -> Any:
    """The network, the coarse state and the compression (1D), or the two fields (2D)."""
    if solver.problem.dim == 1:
        figure, axis = plt.subplots(figsize=(7, 4))
        for key, style, label in (
            ("network", "-", "network $v_\\theta$"),
            ("y_h", "o", "coarse state $y_h$"),
            ("Qv", "x", "compression $\\bar Q v_\\theta$"),
        ):
            x, v = gathered[key]
            order = np.argsort(x[:, 0])
            step = max(1, len(order) // 120) if key != "network" else 1
            axis.plot(x[order, 0][::step], v[order][::step], style, ms=3, lw=0.8, label=label)
        axis.set_xlabel("$x$")
        axis.set_ylabel("$u$")
        axis.legend()
        axis.set_title(f"{solver.problem.name}: fine network and coarse state")
        return figure
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    titles = {"network": "network $v_\\theta$", "y_h": "coarse state $y_h$"}
    for axis, key in zip(axes, ("network", "y_h"), strict=True):
        x, v = gathered[key]
        image = axis.tricontourf(x[:, 0], x[:, 1], v, levels=30)
        _field_axes(figure, axis, image, "$u$")
        axis.set_title(titles[key])
    return figure


def _error_figure(plt: Any, solver: Any, gathered: dict[str, Any]) -> Any:
    """The pointwise error against the reference (None without one)."""
    if "error" not in gathered:
        return None
    x, e = gathered["error"]
    figure, axis = plt.subplots(figsize=(7, 4))
    if solver.problem.dim == 1:
        order = np.argsort(x[:, 0])
        _log_plot(axis, x[order, 0], np.abs(e[order]), lw=0.8)
        axis.set_xlabel("$x$")
        axis.set_ylabel("$|v_\\theta - u|$")
    else:
        image = axis.tricontourf(x[:, 0], x[:, 1], e, levels=30)
        _field_axes(figure, axis, image, "$v_\\theta - u$")
    axis.set_title("pointwise error")
    return figure


def _history_figure(plt: Any, solver: Any, gathered: dict[str, Any]) -> Any:
    """The loss terms and the errors against the iterations."""
    history = solver.history
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = history.get("step", [])
    plotted = False
    for key in ("loss", "pde", "boundary", "coupling", "R"):
        if history.get(key):
            values = [None if v is None else abs(v) for v in history[key]]
            plotted |= _log_plot(axes[0], steps, values, label=key, lw=0.8)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("loss term")
    axes[0].set_title("loss terms")
    if plotted:
        axes[0].legend()
    if history.get("l2"):
        _log_plot(axes[1], history["eval_step"], history["l2"], "o-", label="rel. $L^2$")
        _log_plot(axes[1], history["eval_step"], history["h1"], "s-", label="rel. $H^1$")
        axes[1].legend()
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("relative error")
    axes[1].set_title("errors against the reference")
    return figure


def write_history_csv(history: dict[str, Any], path: Path) -> None:
    """One row per step with every per-step list, and ``l2``/``h1`` where evaluated.

    A value a step does not have (e.g. ``damping`` of an Adam step) is an empty cell.
    """
    steps = history.get("step", [])
    if isinstance(history, History):
        columns = [key for key in history.step_keys() if key != "step"]
    else:
        columns = [
            key
            for key, value in history.items()
            if isinstance(value, list) and len(value) == len(steps) and key != "step"
        ]
    evaluations = dict(
        zip(history.get("eval_step", []), zip(history.get("l2", []), history.get("h1", [])))
    )
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["step", *columns, "l2", "h1"])
        for index, step in enumerate(steps):
            l2, h1 = evaluations.get(step, (math.nan, math.nan))
            cells = ("" if history[key][index] is None else history[key][index] for key in columns)
            writer.writerow([step, *cells, l2, h1])


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def solver_metrics(solver: Any) -> dict[str, Any]:
    """The :data:`METRIC_KEYS` of a trained solver (collective: the errors)."""
    history = solver.history
    iterations = len(history.get("step", []))
    wall = float(history["time"][-1]) if iterations else 0.0
    coarse = float(np.sum(history.get("time_coarse", []))) if iterations else 0.0
    rel_l2 = rel_h1 = None
    if solver.errors is not None:
        rel_l2, rel_h1 = solver.relative_errors()
    metrics = {
        "rel_l2": rel_l2,
        "rel_h1": rel_h1,
        "K_tilde": float(history["K_tilde"][-1]) if iterations else None,
        "iterations": iterations,
        "wall_time_s": wall,
        "time_per_iteration_s": wall / iterations if iterations else None,
        "coarse_share": coarse / wall if wall > 0 else 0.0,
        "n_ranks": solver.comm.size,
        "device": str(solver.device),
    }
    if getattr(solver, "full_tensor", False) and iterations:
        metrics["K_tilde_tensor"] = history["K_tilde_tensor"][-1]  # Algorithm 4.1, d × d
    return metrics


def write_metrics(metrics: dict[str, Any], path: Path, comm: MPI.Comm) -> None:
    """Write ``metrics`` as JSON on rank 0."""
    if comm.rank == 0:
        path.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")


def write_outputs(
    solver: Any,
    folder: str | Path,
    *,
    extra_metrics: dict[str, Any] | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Write every output of a run into ``folder`` (collective); returns the metrics.

    Args:
        solver: A trained :class:`~dolfinx_pinn.solver.HybridSolver`.
        folder: The run folder (created).
        extra_metrics: More entries for ``metrics.json`` (e.g. the configuration).
        figures: Write the PNG figures.
    """
    folder = Path(folder)
    if solver.comm.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    solver.comm.barrier()
    fields = write_fields(solver, folder)
    if figures:
        write_figures(solver, fields, folder)
    metrics = solver_metrics(solver)
    metrics.update(extra_metrics or {})
    write_metrics(metrics, folder / "metrics.json", solver.comm)
    if solver.comm.rank == 0:
        write_history_csv(solver.history, folder / "history.csv")
    solver.comm.barrier()
    return metrics
