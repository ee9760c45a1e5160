"""One 1D experiment of Hintermüller & Korolev (4.29) with the paper's own settings.

    python benchmarks/paper/reproduce_1d.py --eps 1/15 --method hybrid --steps 20000 \
        --out benchmarks/results/paper/runs [--resume]

``--method ms_pinn`` is the plain Ms-PINN (:class:`~dolfinx_pinn.pinn.PINNSolver`), ``hybrid``
the paper-faithful hybrid (:class:`~dolfinx_pinn.solver.HybridSolver`). The settings are those
of Section 4.4 and (4.29):

- Ms-PINN (:meth:`MultiscaleFourierNet.for_problem`): scales ϱ = (1, 1/ε), 2 hidden layers of
  128, tanh, Glorot initialisation (seed 0); hard boundary condition ``v = 4x(1 - x) N(x)``
  (:class:`~dolfinx_pinn.networks.HardBoundaryNet`);
- full-batch Adam, β = (0.9, 0.999), lr(0) = 5e-4 decayed by 0.75 every 1000 steps, gradient-norm
  loss balancing every 100 steps (a no-op for the Ms-PINN with a hard boundary: one loss term);
- M_Ω = 2000 (ε = 1/15) or 5000 (ε = 0.01) random collocation points;
- hybrid: coarse P1 mesh h = 0.004, coupling (2.10) with uniform weights, δ = ε, constant τ2 = 1,
  lazy coarse update (T_K = 100, tolerance 1e-2);
- relative L² and H¹-seminorm errors against the exact solution
  (:func:`~dolfinx_pinn.reference.exact_1d`) every 100 steps.

The run folder ``<out>/<method>_<eps tag>/`` gets, every ``--save-every`` seconds and at the end:
``history.json`` (the solver's whole history plus ``meta``), ``errors.csv`` (step, time, rel L²,
rel H¹), ``steps.csv`` (per-step loss, learning rate and, for the hybrid, K̃, R and the balancing
weights), ``network.pt`` (the network's ``state_dict``) and ``meta.json``. The hybrid also writes
the solver's own checkpoints (``checkpoint/``, every ``--checkpoint-every`` steps and on
SIGTERM); so does the Ms-PINN. ``--resume`` continues from them (for the Ms-PINN also from
``pinn_checkpoint.pt``, the checkpoint of this script's earlier version).
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  # isort: skip  (before dolfinx)

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from dolfinx_pinn import HybridSolver, PINNSolver, exact_1d, paper_1d
from dolfinx_pinn.networks import HardBoundaryNet, MultiscaleFourierNet

METHODS = ("ms_pinn", "hybrid")
#: The paper's collocation point counts per ε (4.29).
PAPER_POINTS = {"1/15": 2000, "0.01": 5000}
LR0, DECAY_RATE, DECAY_STEPS = 5e-4, 0.75, 1000
COARSE_H = 0.004
LAZY_EVERY, LAZY_TOL = 100, 1e-2
BALANCE_EVERY = 100


def parse_eps(text: str) -> float:
    """ε from ``"1/15"``, ``"0.01"`` or any fraction or decimal string."""
    value = float(Fraction(text))
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--eps must be > 0, got {text!r}")
    return value


def eps_tag(eps: float) -> str:
    """A file-name tag of ε: ``eps1_15`` for 1/15, ``eps0.01`` for 0.01."""
    inverse = round(1.0 / eps)
    if abs(1.0 / eps - inverse) < 1e-9 and inverse % 10 != 0:
        return f"eps1_{inverse}"
    return f"eps{eps:g}"


def default_points(eps: float) -> int:
    """The paper's M_Ω: 2000 for ε = 1/15, 5000 for ε = 0.01 (5000 for anything <= 0.01)."""
    return 2000 if eps > 0.02 else 5000


def build_network(problem: Any, seed: int = 0) -> HardBoundaryNet:
    """The paper's network: Ms-PINN 2 x 128 tanh, scales (1, 1/ε), times l = 4x(1-x)."""
    return HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=seed), problem)


def run_folder(out: Path, method: str, eps: float) -> Path:
    """``<out>/<method>_<eps tag>``."""
    return Path(out) / f"{method}_{eps_tag(eps)}"


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def error_rows(history: dict[str, Any]) -> list[list[Any]]:
    """``[step, train time, rel L², rel H¹]`` per evaluation (time 0 at step 0)."""
    step_time = dict(zip(history.get("step", []), history.get("time", []), strict=False))
    return [
        [s, step_time.get(s, 0.0), l2, h1]
        for s, l2, h1 in zip(history["eval_step"], history["l2"], history["h1"], strict=False)
    ]


def step_rows(method: str, history: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The per-step table of a history: header and rows."""
    if method == "ms_pinn":
        header = ["step", "time", "loss", "lr"]
        columns = [history["step"], history["time"], history["loss"], history["lr"]]
    else:
        weights = [k for k in history if k.startswith("weight_")]
        header = ["step", "time", "loss", "pde", "coupling", "R", "K_tilde", "lr", "refreshes"]
        header += weights
        columns = [history[k] for k in header]
    count = min(len(c) for c in columns) if columns else 0
    return header, [[c[i] for c in columns] for i in range(count)]


class RunRecorder:
    """Saves the history, the tables and the network of a run (atomically, on a timer).

    Args:
        folder: The run folder.
        method: ``"ms_pinn"`` or ``"hybrid"``.
        meta: Settings and measured figures stored with the history.
        save_every: Seconds between saves from :meth:`maybe_save`.
    """

    def __init__(self, folder: Path, method: str, meta: dict[str, Any], save_every: float):
        self.folder = folder
        self.method = method
        self.meta = meta
        self.save_every = save_every
        self._last = time.monotonic()
        folder.mkdir(parents=True, exist_ok=True)

    def maybe_save(self, history: dict[str, Any], network: torch.nn.Module, **extra: Any) -> bool:
        """Save if ``save_every`` seconds have passed; returns whether it saved."""
        if time.monotonic() - self._last < self.save_every:
            return False
        self.save(history, network, **extra)
        return True

    def save(self, history: dict[str, Any], network: torch.nn.Module, **extra: Any) -> None:
        """Write history.json, errors.csv, steps.csv, network.pt and meta.json now."""
        self._last = time.monotonic()
        steps = history.get("step", [])
        times = history.get("time", [])
        meta = dict(self.meta)
        meta.update(extra)
        meta["steps_done"] = int(steps[-1]) if steps else 0
        meta["train_time_s"] = float(times[-1]) if times else 0.0
        meta["seconds_per_step"] = meta["train_time_s"] / max(len(steps), 1)
        if history.get("l2"):
            meta["final_l2"], meta["final_h1"] = history["l2"][-1], history["h1"][-1]
            best = min(range(len(history["l2"])), key=history["l2"].__getitem__)
            meta["best_l2"], meta["best_l2_step"] = history["l2"][best], history["eval_step"][best]
            meta["best_h1"] = min(history["h1"])
        if self.method == "hybrid" and history.get("K_tilde"):
            meta["final_K_tilde"] = history["K_tilde"][-1]
        meta["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _write_json(self.folder / "history.json", _jsonable({"meta": meta, "history": history}))
        _write_json(self.folder / "meta.json", _jsonable(meta))
        _write_csv(self.folder / "errors.csv", ["step", "time", "l2", "h1"], error_rows(history))
        header, rows = step_rows(self.method, history)
        _write_csv(self.folder / "steps.csv", header, rows)
        temporary = self.folder / "network.pt.tmp"
        torch.save(network.state_dict(), temporary)
        os.replace(temporary, self.folder / "network.pt")


def _load_legacy_checkpoint(loop: Any, network: torch.nn.Module, path: Path) -> int:
    """Continue a run from ``pinn_checkpoint.pt`` of this script's earlier version.

    That file (written before the package had one training loop for both solvers) holds the
    network, ``torch.optim.Adam``'s state, the lr schedule, the iteration and the history in
    the :class:`~dolfinx_pinn.history.History` layout; it is loaded into a fresh loop, which
    then writes the package's own checkpoints. The balancing weights are not carried over
    (with the hard boundary condition the Ms-PINN has one loss term: they are 1). Returns the
    step it continues from.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    network.load_state_dict(state["network"])
    adam = loop.optimizer
    adam.optimizer.load_state_dict(state["adam"])
    adam.scheduler.load_state_dict(state["scheduler"])
    adam.iteration = int(state["iteration"])
    history = state["history"]
    for key, value in history.items():
        if key != "terms":
            loop.history[key] = list(value) if isinstance(value, list) else value
    loop.history["terms"] = {name: loop.history[name] for name in loop.history.term_names}
    loop.step = int(state["step"])
    loop.elapsed = float(history["time"][-1]) if history.get("time") else 0.0
    return loop.step


def adam_options(
    args: argparse.Namespace, checkpoint_dir: Path, resume: bool, callback: Any
) -> dict[str, Any]:
    """The paper's Adam settings and this script's checkpointing, shared by both methods."""
    return {
        "lr": LR0,
        "decay_rate": DECAY_RATE,
        "decay_steps": DECAY_STEPS,
        "balancing": True,
        "balance_every": BALANCE_EVERY,
        "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every,
        "checkpoint_dir": checkpoint_dir,
        "resume": checkpoint_dir if resume else None,
        "progress": False,
        "callback": callback,
    }


def run_ms_pinn(args: argparse.Namespace, problem: Any, folder: Path, meta: dict) -> dict:
    """The plain Ms-PINN with the paper's Adam (returns the history)."""
    from dolfinx_pinn.trainers import build_training_loop

    exact = exact_1d(problem)
    network = build_network(problem, args.seed)
    solver = PINNSolver(
        problem,
        network,
        n_interior=args.points,
        reference=exact,
        seed=args.seed,
        method=args.derivatives,
    )
    recorder = RunRecorder(folder, "ms_pinn", meta, args.save_every)
    checkpoint_dir = folder / "checkpoint"
    resume = bool(args.resume and any(checkpoint_dir.glob("checkpoint.rank*.pt")))
    legacy = folder / "pinn_checkpoint.pt"

    def callback(step: int, record: dict[str, Any]) -> None:
        recorder.maybe_save(solver.history, solver.network)
        if step % 1000 == 0:
            last = solver.history["l2"][-1] if solver.history["l2"] else float("nan")
            print(f"step {step}: loss {record['loss']:.3e}, rel L2 {last:.3e}", flush=True)

    options = adam_options(args, checkpoint_dir, resume, callback)
    try:
        if args.resume and not resume and legacy.is_file():
            # What PINNSolver.train does, with the earlier checkpoint loaded in between.
            loop = build_training_loop(
                solver.objective, "adam", args.steps, options, description="pinn adam"
            )
            solver.history = loop.history
            done = _load_legacy_checkpoint(loop, solver.network, legacy)
            print(f"resumed the Ms-PINN from {legacy.name} at step {done}", flush=True)
            loop.run(args.steps)
        else:
            solver.train("adam", args.steps, **options)
    finally:
        if solver.history:
            recorder.save(solver.history, solver.network)
    return solver.history


def run_hybrid(args: argparse.Namespace, problem: Any, folder: Path, meta: dict) -> dict:
    """The paper-faithful hybrid with the solver's own checkpoints (returns the history)."""
    exact = exact_1d(problem)
    network = build_network(problem, args.seed)
    recorder = RunRecorder(folder, "hybrid", meta, args.save_every)
    checkpoint_dir = folder / "checkpoint"
    resume = bool(args.resume and any(checkpoint_dir.glob("checkpoint.rank*.pt")))
    with HybridSolver(
        problem,
        network,
        coarse_h=args.coarse_h,
        n_interior=args.points,
        tau2=args.tau2,
        delta=problem.eps,
        lazy=True,
        seed=args.seed,
        reference=exact,
        method=args.derivatives,
    ) as solver:

        def callback(step: int, record: dict[str, Any]) -> None:
            recorder.maybe_save(solver.history, solver.network)
            if step % 1000 == 0:
                last = solver.history["l2"][-1] if solver.history["l2"] else float("nan")
                print(
                    f"step {step}: loss {record['loss']:.3e}, K {record['K_tilde']:.4f}, "
                    f"rel L2 {last:.3e}",
                    flush=True,
                )

        try:
            solver.train(
                "adam",
                args.steps,
                tau2_schedule="constant",
                lazy_every=LAZY_EVERY,
                lazy_tol=LAZY_TOL,
                **adam_options(args, checkpoint_dir, resume, callback),
            )
        finally:
            history = solver.history
            if history:
                recorder.save(
                    history,
                    solver.network,
                    refreshes=solver.refreshes,
                    coarse_time_s=solver.coarse_time,
                )
    return history


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eps", type=parse_eps, required=True, help="ε: 1/15 or 0.01")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--steps", type=int, default=20_000, help="total Adam steps")
    parser.add_argument("--points", type=int, default=None, help="M_Ω (default: the paper's)")
    parser.add_argument("--tau2", type=float, default=1.0, help="the constant τ2 (hybrid)")
    parser.add_argument(
        "--coarse-h", type=float, default=COARSE_H, help="coarse mesh size (hybrid; the paper's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--save-every", type=float, default=180.0, help="seconds between saves")
    parser.add_argument(
        "--derivatives",
        default="jet",
        help="derivative method of the residual (the forward jet is about 2x faster than "
        "nested autograd on the CPU; both give the same residual to round-off)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/paper/runs"))
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    problem = paper_1d(args.eps)
    args.points = args.points or default_points(args.eps)
    folder = run_folder(args.out, args.method, args.eps)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "method": args.method,
        "eps": args.eps,
        "steps_planned": args.steps,
        "n_interior": args.points,
        "network": "HardBoundaryNet(MultiscaleFourierNet.for_problem): 2 x 128 tanh, (1, 1/eps)",
        "adam": {"lr0": LR0, "decay_rate": DECAY_RATE, "decay_steps": DECAY_STEPS,
                 "betas": [0.9, 0.999], "balancing_every": BALANCE_EVERY},
        "seed": args.seed,
        "derivatives": args.derivatives,
        "threads": args.threads,
        "exact_K_tilde": exact_1d(problem).K_tilde,
        "host_started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    if args.method == "hybrid":
        meta.update(coarse_h=args.coarse_h, delta=args.eps, tau2=args.tau2,
                    tau2_schedule="constant", lazy_every=LAZY_EVERY, lazy_tol=LAZY_TOL)  # fmt: skip
    # SIGTERM: during training the loop turns it into a checkpoint and a KeyboardInterrupt
    # (TrainingInterrupted); before and after, this handler does (the `finally` blocks save).
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    try:
        history = (run_ms_pinn if args.method == "ms_pinn" else run_hybrid)(
            args, problem, folder, meta
        )
    except KeyboardInterrupt as error:
        print(f"interrupted: {error}; saved to {folder}", flush=True)
        return 130
    wall = time.perf_counter() - started
    steps = len(history.get("step", []))
    train = history["time"][-1] if history.get("time") else 0.0
    print(
        json.dumps(
            {
                "folder": str(folder),
                "steps": steps,
                "wall_s": wall,
                "seconds_per_step": train / max(steps, 1),
                "final_l2": history["l2"][-1] if history.get("l2") else None,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
