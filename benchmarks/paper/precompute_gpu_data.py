"""Precompute on the CPU (with DOLFINx) what ``gpu_run.py`` needs to run the 1D paper runs anywhere.

    python benchmarks/paper/precompute_gpu_data.py [--out benchmarks/paper/data]

DOLFINx is not installed on the GPU machine. For the 1D problem (4.29) the coarse side of the
paper-faithful hybrid reduces to fixed arrays: with the ``"entry"`` parametrisation in 1D the
coarse matrix is ``B_h(K̃) = K̃ A``, so the coarse state is ``y_h(K̃) = y_1 / K̃`` with ``y_1``
the P1 solution for K̃ = 1, and its sensitivity is ``S = -y_1 / K̃²`` (checked here against the
DOLFINx solves); the compression Q̄ (3.26) is a fixed sparse matrix on the collocation points.
This writes, per ε, ``paper_1d_<tag>.npz`` with

- the collocation points of both solvers and, at them, K, ∇·K and f as the package computes them
  (``pinn_*``, ``hyb_*``), the PDE row weights √(|Ω|/M);
- the compression matrix (COO), the extra compression points (boundary-layer nodes), the coarse
  node coordinates, ``y_1``, the coupling weight, the bounds [α, β] of the K̃ clip;
- the quadrature of the error evaluation (:class:`dolfinx_pinn.pinn.ReferenceErrors`) with the
  exact solution and its derivative there;
- the initial network (seed 0) as ``init::<name>`` arrays;
- a short reference history of both solvers (6 Adam steps, balancing and lazy checks every 5
  steps, errors every 3 steps) that ``gpu_run.py`` replays as its consistency check.

The files are small (about 0.3 MB each) and travel with the working tree.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  # isort: skip  (before dolfinx)

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dolfinx_pinn import HybridSolver, PINNSolver, exact_1d, paper_1d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_1d import COARSE_H, build_network, default_points, eps_tag

CHECK_STEPS, CHECK_EVERY, CHECK_EVAL = 6, 5, 3


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float64)


def _block(solver: Any) -> Any:
    """The PDE block of a solver (the attribute names of the package as it is today)."""
    if hasattr(solver, "pde_block"):
        return solver.pde_block
    return solver.objective.blocks[0]


def precompute(eps: float, folder: Path) -> dict[str, Any]:
    """Write ``paper_1d_<tag>.npz`` for one ε; returns the checks made on the way."""
    problem = paper_1d(eps)
    exact = exact_1d(problem)
    points = default_points(eps)
    data: dict[str, np.ndarray] = {
        "eps": np.array(eps),
        "n_points": np.array(points),
        "exact_K_tilde": np.array(exact.K_tilde),
    }
    checks: dict[str, Any] = {"eps": eps, "n_points": points}

    # -- the Ms-PINN: points, coefficient data, quadrature, a reference history ----------------
    network = build_network(problem, seed=0)
    for name, value in network.state_dict().items():
        data[f"init::{name}"] = _numpy(value)
    pinn = PINNSolver(problem, network, n_interior=points, reference=exact, seed=0)
    block = _block(pinn)
    data["pinn_x"] = _numpy(pinn.interior_points)
    data["pinn_K"], data["pinn_drift"], data["pinn_f"] = (
        _numpy(block.K),
        _numpy(block.drift),
        _numpy(block.f),
    )
    data["pinn_row_weight"] = np.array(float(block.weight))
    errors = pinn.errors
    data["eval_x"], data["eval_w"] = errors.points, errors.weights
    data["eval_u"], data["eval_du"] = errors.reference_value, errors.reference_gradient
    history = pinn.train("adam", CHECK_STEPS, eval_every=CHECK_EVAL, lr=5e-4, balancing=True)
    data["ref_pinn_loss"] = np.array(history["loss"])
    data["ref_pinn_eval_step"] = np.array(history["eval_step"])
    data["ref_pinn_l2"], data["ref_pinn_h1"] = np.array(history["l2"]), np.array(history["h1"])

    # -- the hybrid: points, compression, the coarse state, a reference history --------------
    network = build_network(problem, seed=0)
    with HybridSolver(
        problem,
        network,
        coarse_h=COARSE_H,
        n_interior=points,
        tau2=1.0,
        delta=eps,
        lazy=True,
        seed=0,
        reference=exact,
    ) as solver:
        block = _block(solver)
        x = solver.interior_points
        compression_points = solver.compression_points
        count = len(x)
        checks["compression_columns_start_with_points"] = bool(
            torch.equal(compression_points[:count], x)
        )
        data["hyb_x"] = _numpy(x)
        data["hyb_K"], data["hyb_drift"], data["hyb_f"] = (
            _numpy(block.K),
            _numpy(block.drift),
            _numpy(block.f),
        )
        data["hyb_row_weight"] = np.array(float(block.weight))
        data["hyb_point_weight"] = np.array(float(solver.points.weight))
        data["comp_extra"] = _numpy(compression_points[count:])
        coo = solver.compression.matrix(torch.device("cpu")).coalesce()
        indices = coo.indices().numpy()
        data["Q_row"], data["Q_col"] = indices[0].astype(np.int64), indices[1].astype(np.int64)
        data["Q_val"] = coo.values().numpy().astype(np.float64)
        data["Q_shape"] = np.array(coo.shape)
        coarse = solver.coarse
        n = coarse.num_owned_dofs
        data["node_x"] = coarse.space.tabulate_dof_coordinates()[:n, 0].astype(np.float64)
        y1 = coarse.solve_state(np.array(1.0))
        data["y1"] = y1
        data["coupling_weight"] = np.array(float(solver.coupling_weight))
        data["K_bounds"] = np.array([problem.alpha, problem.beta])
        # y_h(K̃) = y_1 / K̃ and S = -y_1 / K̃² (the 1D "entry" coarse problem is K̃ A y = F).
        worst_state = worst_sensitivity = 0.0
        for K in (1.5, 1.7320508, 2.5):
            state, sensitivity = coarse.solve_sensitivity(np.array(K))
            scale = np.abs(state).max()
            worst_state = max(worst_state, float(np.abs(state - y1 / K).max() / scale))
            worst_sensitivity = max(
                worst_sensitivity,
                float(np.abs(sensitivity[:, 0] + y1 / K**2).max() / np.abs(y1 / K**2).max()),
            )
        checks["state_is_y1_over_K"] = worst_state
        checks["sensitivity_is_minus_y1_over_K2"] = worst_sensitivity
        history = solver.train(
            "adam",
            CHECK_STEPS,
            lr=5e-4,
            balancing=True,
            balance_every=CHECK_EVERY,
            lazy_every=CHECK_EVERY,
            lazy_tol=1e-2,
            eval_every=CHECK_EVAL,
            progress=False,
        )
        for key in ("loss", "pde", "coupling", "K_tilde", "weight_pde", "weight_coupling"):
            data[f"ref_hyb_{key}"] = np.array(history[key], dtype=np.float64)
        data["ref_hyb_eval_step"] = np.array(history["eval_step"])
        data["ref_hyb_l2"], data["ref_hyb_h1"] = np.array(history["l2"]), np.array(history["h1"])
        data["ref_hyb_refreshes"] = np.array(solver.refreshes)
    data["check_steps"] = np.array([CHECK_STEPS, CHECK_EVERY, CHECK_EVAL])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"paper_1d_{eps_tag(eps)}.npz"
    np.savez_compressed(path, **data)
    checks["file"] = path.name
    checks["bytes"] = path.stat().st_size
    return checks


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument("--eps", type=float, nargs="*", default=[1 / 15, 0.01])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [precompute(eps, args.out) for eps in args.eps]
    text = json.dumps(results, indent=1)
    (args.out / "precompute_checks.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
