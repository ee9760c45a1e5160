"""Achieved FLOP/s of the paper's Adam step on the CPU, against dense matmuls of the same shapes.

    python benchmarks/paper/adam_flops.py [--quick] [--json FILE] [--train-steps 300]

For each paper network at the paper's point counts (1D Ms-PINN 2×128 with the hard boundary,
M = 2000 for ε = 1/15 and 5000 for ε = 0.01; 2D Ms-PINN 2×128 and MLP 8×64 with 25 000
interior and 2 500 boundary points), each derivative method of the package (``jet``: the
forward jet; ``autograd``: nested autograd, what ``"auto"`` picks) and float64 / float32:

- **FLOPs** of one step of :class:`dolfinx_pinn.PINNSolver` (``train("adam", 1)``: loss with
  the second derivatives, backward, Adam): every ``mm``/``addmm``/``bmm`` the step executes is
  recorded at the dispatcher (a ``TorchDispatchMode``, which also sees the products inside
  nested ``autograd.grad``, where ``torch.utils.flop_counter.FlopCounterMode`` breaks) and
  counted as ``2mnk``: the matmul FLOPs of the forward, derivative and backward passes as
  executed (for the jet this equals FlopCounterMode's count, 1.976 GFLOP at 2000 points, and
  to 0.05 % the closed form ``3 F - F_1`` of ``gpu_run.matmul_flops``: F the forward matmul
  FLOPs of the d + 2 jet streams, F_1 the first layer's, whose input needs no gradient; the
  closed form leaves out the Fourier-feature product ``x Ω`` of inner dimension d). Elementwise work
  (tanh and its derivatives, the jet products, the residual, Adam's update) is not counted:
  the FLOP/s are matmul FLOP/s;
- **time** per step: the median of the solver's own per-step times over a few steps (min too);
- **the same matmuls alone**: the recorded products replayed on random data of their shapes:
  the FLOP/s the CPU reaches on exactly this matmul mix, and the share of the step time it
  accounts for;
- **peak**: one large square matmul (1024³) per dtype, one thread.

float32: the solvers take the dtype of the network's parameters. ``PINNSolver`` accepts a
float32 network (points, K, f and the errors follow its dtype), so float32 here is a copy of the
float64 network converted with ``.to(torch.float32)`` (the same weights rounded; a float32
network built by the constructor would draw other random numbers). ``HybridSolver`` refuses it
(``float64 parameters are needed``; its compression operator also requires float64 values):
the row ``hybrid_float32`` records the message. ``--train-steps`` trains the 1D Ms-PINN
(ε = 1/15) in both dtypes from the same weights and reports the error curves.
"""

from __future__ import annotations

from mpi4py import MPI  # noqa: F401  # isort: skip  (before dolfinx)

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dolfinx_pinn import HybridSolver, PINNSolver, exact_1d, paper_1d, paper_2d
from dolfinx_pinn.networks import MLP, HardBoundaryNet, MultiscaleFourierNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_run import HardBoundary, MsPINN, matmul_flops

aten = torch.ops.aten
MATMULS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm"}


class MatmulRecorder(TorchDispatchMode):
    """Records ``(op, shapes, dtype)`` of every mm/addmm/bmm executed inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = MATMULS.get(func)
        if name is not None:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((name, shapes, args[-1].dtype))
        return func(*args, **(kwargs or {}))

    def flops(self) -> float:
        """``2mnk`` per recorded product (as ``FlopCounterMode`` counts them)."""
        total = 0.0
        for name, shapes, _ in self.calls:
            a, b = shapes[-2], shapes[-1]
            if name == "bmm":
                total += 2.0 * a[0] * a[1] * a[2] * b[2]
            else:
                total += 2.0 * a[0] * a[1] * b[1]
        return total


def replay_matmuls(calls: list, repeats: int) -> float:
    """Seconds (min over ``repeats``) of the recorded matmuls on random data of their shapes."""
    operands = []
    for name, shapes, dtype in calls:
        operands.append((name, [torch.randn(s, dtype=dtype) for s in shapes]))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for name, tensors in operands:
            if name == "mm":
                torch.mm(*tensors)
            elif name == "addmm":
                torch.addmm(*tensors)
            else:
                torch.bmm(*tensors)
        best = min(best, time.perf_counter() - start)
    return best


def square_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of an n³ matmul (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def configs(quick: bool) -> list[dict[str, Any]]:
    """The paper's networks and point counts (quick: a tenth of the points)."""
    div = 10 if quick else 1
    return [
        {"name": "1d_ms_pinn_M2000", "eps": 1 / 15, "dim": 1, "net": "ms_pinn", "n": 2000 // div},
        {"name": "1d_ms_pinn_M5000", "eps": 0.01, "dim": 1, "net": "ms_pinn", "n": 5000 // div},
        {"name": "2d_ms_pinn_25000+2500", "eps": 0.1, "dim": 2, "net": "ms_pinn",
         "n": 25_000 // div, "nb": 2_500 // div},
        {"name": "2d_mlp_25000+2500", "eps": 0.1, "dim": 2, "net": "mlp",
         "n": 25_000 // div, "nb": 2_500 // div},
    ]  # fmt: skip


def make_solver(config: dict[str, Any], method: str, dtype: torch.dtype) -> PINNSolver:
    """A PINNSolver of a configuration (seed 0; float32 = the float64 network converted)."""
    if config["dim"] == 1:
        problem = paper_1d(config["eps"])
        network: torch.nn.Module = HardBoundaryNet(
            MultiscaleFourierNet.for_problem(problem, seed=0), problem
        )
        extra: dict[str, Any] = {}
    else:
        problem = paper_2d(config["eps"])
        network = (
            MultiscaleFourierNet.for_problem(problem, seed=0)
            if config["net"] == "ms_pinn"
            else MLP(2, 64, 8, seed=0)
        )
        extra = {"n_boundary": config["nb"], "tau1": 1.0}
    if dtype != torch.float64:
        network = copy.deepcopy(network).to(dtype)
    return PINNSolver(problem, network, n_interior=config["n"], method=method, seed=0, **extra)


def measure(config: dict[str, Any], method: str, dtype: torch.dtype, steps: int) -> dict:
    """FLOPs, step time and the same-shape matmul time of one configuration."""
    solver = make_solver(config, method, dtype)
    solver.train("adam", 1)  # warm-up (caches, allocator)
    recorder = MatmulRecorder()
    with recorder:
        solver.train("adam", 1)
    flops = recorder.flops()
    history = solver.train("adam", steps)
    times = history["time"]
    per_step = [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)]
    median, best = statistics.median(per_step), min(per_step)
    matmul_seconds = replay_matmuls(recorder.calls, repeats=3)
    row = {
        "config": config["name"],
        "method": method,
        "dtype": str(dtype).replace("torch.", ""),
        "n_interior": config["n"],
        "matmul_gflop_per_step": flops / 1e9,
        "matmuls_per_step": len(recorder.calls),
        "seconds_per_step_median": median,
        "seconds_per_step_min": best,
        "step_gflops": flops / best / 1e9,
        "same_matmuls_seconds": matmul_seconds,
        "same_matmuls_gflops": flops / matmul_seconds / 1e9,
        "matmul_share_of_step": matmul_seconds / best,
    }
    if method == "jet" and config["dim"] == 1:
        eps = config["eps"]
        copy_net = HardBoundary(MsPINN(1, (1.0, 1.0 / eps)))
        row["closed_form_gflop"] = matmul_flops(copy_net, config["n"]) / 1e9
    return row


def hybrid_float32() -> dict[str, Any]:
    """What HybridSolver says to a float32 network (the package has no float32 option)."""
    problem = paper_1d(1 / 15)
    network = HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=0), problem)
    try:
        solver = HybridSolver(problem, copy.deepcopy(network).to(torch.float32), n_interior=200)
    except (ValueError, TypeError, RuntimeError) as error:
        return {"accepted": False, "error": f"{type(error).__name__}: {error}"}
    solver.destroy()
    return {"accepted": True}


def hybrid_step_time(steps: int) -> dict[str, Any]:
    """Seconds per Adam step of the paper-faithful hybrid (1D, ε = 1/15, 2000 points, jet)."""
    problem = paper_1d(1 / 15)
    network = HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=0), problem)
    with HybridSolver(problem, network, n_interior=2000, method="jet", coarse_h=0.004) as solver:
        history = solver.train("adam", steps + 1, progress=False)
    times = history["time"]
    per_step = [b - a for a, b in itertools.pairwise(times)]
    return {"seconds_per_step_median": statistics.median(per_step), "steps": steps}


def float32_training(steps: int) -> dict[str, Any]:
    """The 1D Ms-PINN (ε = 1/15, 2000 points, jet) in float64 and float32 from the same weights."""
    problem = paper_1d(1 / 15)
    exact = exact_1d(problem)
    base = HardBoundaryNet(MultiscaleFourierNet.for_problem(problem, seed=0), problem)
    result = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        network = copy.deepcopy(base).to(dtype)
        solver = PINNSolver(problem, network, n_interior=2000, method="jet", reference=exact)
        history = solver.train("adam", steps, eval_every=max(1, steps // 10), lr=5e-4)
        result[name] = {
            "eval_step": history["eval_step"],
            "l2": history["l2"],
            "h1": history["h1"],
            "seconds_per_step": history["time"][-1] / steps,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the points, 2 steps")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument(
        "--train-steps", type=int, default=0, help="float64/float32 training comparison (0: skip)"
    )
    parser.add_argument("--only", default=None, help="comma-separated config names")
    args = parser.parse_args(argv)  # fmt: skip
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    steps = args.steps or (2 if args.quick else 5)
    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
        "peak_gflops_1024": {
            "float64": square_peak(torch.float64),
            "float32": square_peak(torch.float32),
        },
        "rows": [],
    }
    chosen = configs(args.quick)
    if args.only:
        names = set(args.only.split(","))
        chosen = [c for c in chosen if c["name"] in names]
    for config in chosen:
        for method in ("jet", "autograd"):
            for dtype in (torch.float64, torch.float32):
                row = measure(config, method, dtype, steps)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
    result["hybrid_float32"] = hybrid_float32()
    result["hybrid_1d_step"] = hybrid_step_time(steps)
    if args.train_steps:
        result["float32_training"] = float32_training(args.train_steps)
    result["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
