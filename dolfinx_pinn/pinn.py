"""Plain (non-hybrid) PINN training: the paper's Ms-PINN / MLP baseline and the fine-scale half.

:class:`PINNSolver` samples collocation points, builds the least-squares objective (3.24)

    J^M(v) = |Ω|/M Σ_i (A^ε v - f^ε)(x^r_i)² + τ1 |∂Ω|/M_b Σ_i v(x^b_i)²

(the boundary term only for networks without a built-in boundary condition), and trains it with
any optimizer of :mod:`dolfinx_pinn.optim`, recording a history (loss terms, learning rate,
relative L² and H¹-seminorm errors against a reference every ``eval_every`` steps).

Example:
    >>> from dolfinx_pinn import paper_1d
    >>> from dolfinx_pinn.networks import TransfiniteBoundaryNet, TwoScaleNet
    >>> from dolfinx_pinn.pinn import PINNSolver
    >>> from dolfinx_pinn.reference import exact_1d
    >>> problem = paper_1d(0.01)
    >>> net = TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem)
    >>> solver = PINNSolver(problem, net, n_interior=3000, reference=exact_1d(problem))
    >>> history = solver.train("gauss_newton", steps=2, variable_projection=True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.optim import LeastSquaresObjective, make_optimizer
from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.residual import BoundaryBlock, PDEBlock, ResidualBlock

__all__ = ["PINNSolver", "ReferenceErrors", "select_device"]

_GAUSS_NODES = 6


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or a torch device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or (isinstance(device, str) and device.startswith("cuda")):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but torch sees no CUDA device")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}")


class ReferenceErrors:
    """Relative L² and H¹-seminorm errors of a network against a reference, by quadrature.

    A tensor-product Gauss-Legendre rule on a uniform grid of the problem's box that resolves
    the finest scale (``cells_per_scale`` cells per ``problem.finest_scale``, capped at
    ``max_points`` points in all), so no mesh is needed. For a dolfinx Function reference use
    :func:`dolfinx_pinn.reference.relative_errors`.

    Args:
        problem: The problem (domain and finest scale).
        reference: An object with ``value(points)``/``gradient(points)`` (such as
            :func:`dolfinx_pinn.reference.exact_1d`), or a pair ``(u, grad_u)`` of numpy
            callables on points ``(N, d)`` returning ``(N,)`` and ``(N, d)``.
        cells_per_scale: Grid cells per finest oscillation.
        max_points: Cap on the number of quadrature points.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        reference: Any,
        cells_per_scale: int = 2,
        max_points: int = 400_000,
    ) -> None:
        if hasattr(reference, "value") and hasattr(reference, "gradient"):
            value, gradient = reference.value, reference.gradient
        elif isinstance(reference, tuple) and len(reference) == 2 and all(map(callable, reference)):
            value, gradient = reference
        else:
            raise ValueError(
                "reference must have value/gradient methods or be a pair (u, grad_u) of callables"
            )
        domain, dim = problem.domain, problem.dim
        per_axis_cap = int((max_points / _GAUSS_NODES**dim) ** (1.0 / dim))
        nodes, weights = np.polynomial.legendre.leggauss(_GAUSS_NODES)
        axes, axis_weights = [], []
        for j in range(dim):
            cells = max(8, math.ceil(cells_per_scale * domain.lengths[j] / problem.finest_scale))
            cells = min(cells, max(per_axis_cap, 1))
            breaks = np.linspace(domain.lower[j], domain.upper[j], cells + 1)
            h = np.diff(breaks)
            axes.append((breaks[:-1, None] + 0.5 * h[:, None] * (nodes + 1.0)).ravel())
            axis_weights.append((0.5 * h[:, None] * weights).ravel())
        grid = np.meshgrid(*axes, indexing="ij")
        self.points = np.stack([g.ravel() for g in grid], axis=1)
        weight_grid = np.meshgrid(*axis_weights, indexing="ij")
        self.weights = np.prod(np.stack([w.ravel() for w in weight_grid], axis=1), axis=1)
        self.reference_value = np.asarray(value(self.points), dtype=np.float64).reshape(-1)
        self.reference_gradient = np.asarray(gradient(self.points), dtype=np.float64).reshape(
            -1, dim
        )
        self._norms = (
            float(np.sum(self.weights * self.reference_value**2)),
            float(np.sum(self.weights * (self.reference_gradient**2).sum(axis=1))),
        )
        if min(self._norms) <= 0:
            raise ValueError("reference: its L² norm or H¹ seminorm is zero")

    def __call__(self, model: nn.Module, chunk: int = 20_000) -> tuple[float, float]:
        """``(relative L², relative H¹ seminorm)`` of ``model`` (points ``(N, d)`` -> ``(N,)``)."""
        parameter = next(model.parameters())
        values, gradients = [], []
        for start in range(0, len(self.points), chunk):
            x = torch.tensor(
                self.points[start : start + chunk], dtype=parameter.dtype, device=parameter.device
            ).requires_grad_(True)
            with torch.enable_grad():
                v = model(x).reshape(-1)
                (g,) = torch.autograd.grad(v.sum(), x)
            values.append(v.detach().cpu().numpy())
            gradients.append(g.detach().cpu().numpy())
        value = np.concatenate(values)
        gradient = np.concatenate(gradients)
        l2 = np.sum(self.weights * (value - self.reference_value) ** 2)
        h1 = np.sum(self.weights * ((gradient - self.reference_gradient) ** 2).sum(axis=1))
        return float(np.sqrt(l2 / self._norms[0])), float(np.sqrt(h1 / self._norms[1]))


class PINNSolver:
    """Plain PINN training of a network on a problem (no coarse scale).

    Args:
        problem: The problem (4.8).
        network: The network; with ``satisfies_boundary_condition`` (hard or transfinite
            boundary conditions) no boundary term is added.
        n_interior: Number M of random interior collocation points.
        n_boundary: Number of boundary points of the τ1 penalty (default: the 2 end points in
            1D, ``max(4, n_interior // 10)`` otherwise).
        tau1: The boundary penalty weight τ1.
        method: Derivative method of the residual (``"auto"``, ``"jet"``, ``"func"``,
            ``"autograd"``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        seed: Seed of the collocation points and of torch's global generator.
        reference: A reference for the errors (see :class:`ReferenceErrors`), or ``None``.
        extra_blocks: Further residual blocks (e.g. a coupling term of the hybrid solver).

    Attributes:
        objective: The :class:`LeastSquaresObjective`.
        history: Filled by :meth:`train`.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        network: nn.Module,
        *,
        n_interior: int = 2000,
        n_boundary: int | None = None,
        tau1: float = 1.0,
        method: str = "auto",
        device: str | torch.device = "cpu",
        seed: int = 0,
        reference: Any = None,
        extra_blocks: list[ResidualBlock] | None = None,
    ) -> None:
        if not (isinstance(n_interior, int) and n_interior >= 1):
            raise ValueError(f"n_interior must be an integer >= 1, got {n_interior!r}")
        if not (math.isfinite(tau1) and tau1 > 0):
            raise ValueError(f"tau1 must be a finite number > 0, got {tau1}")
        if getattr(network, "dim", problem.dim) != problem.dim:
            raise ValueError(f"network: dimension {network.dim} != problem dimension {problem.dim}")
        self.problem = problem
        self.device = select_device(device)
        self.seed = seed
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.network = network.to(self.device)
        dtype = next(network.parameters()).dtype
        domain = problem.domain
        self.interior_points = torch.tensor(
            domain.sample_interior(n_interior, rng), dtype=dtype, device=self.device
        )
        blocks: list[ResidualBlock] = [PDEBlock(problem, self.interior_points, method=method)]
        self.boundary_points = None
        if not getattr(network, "satisfies_boundary_condition", False):
            if n_boundary is None:
                n_boundary = 2 if problem.dim == 1 else max(4, n_interior // 10)
            if not (isinstance(n_boundary, int) and n_boundary >= 1):
                raise ValueError(f"n_boundary must be an integer >= 1, got {n_boundary!r}")
            self.boundary_points = torch.tensor(
                domain.sample_boundary(n_boundary, rng), dtype=dtype, device=self.device
            )
            weight = tau1 * domain.boundary_measure / n_boundary
            blocks.append(BoundaryBlock(self.boundary_points, weight))
        blocks.extend(extra_blocks or [])
        self.objective = LeastSquaresObjective(self.network, blocks)
        self.errors = None if reference is None else ReferenceErrors(problem, reference)
        self.history: dict[str, Any] = {}

    def relative_errors(self) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors against the reference."""
        if self.errors is None:
            raise ValueError("reference: the solver was created without a reference")
        return self.errors(self.network)

    def predict(self, points: np.ndarray) -> np.ndarray:
        """The network's values at numpy points ``(N, d)``."""
        parameter = next(self.network.parameters())
        x = torch.as_tensor(points, dtype=parameter.dtype, device=parameter.device)
        with torch.no_grad():
            return self.network(x).reshape(-1).cpu().numpy()

    def train(
        self,
        optimizer: str | Any = "adam",
        steps: int = 1000,
        eval_every: int | None = None,
        time_limit: float | None = None,
        target_l2: float | None = None,
        callback: Callable[[int, dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Run ``steps`` optimizer iterations and return the history.

        Args:
            optimizer: ``"adam"``, ``"lbfgs"``, ``"gauss_newton"`` or an optimizer object.
            steps: Number of iterations (each ``step()`` of the optimizer).
            eval_every: Evaluate errors every this many steps (and at the end); default
                ``max(1, steps // 20)`` when a reference is given.
            time_limit: Stop after this many seconds of wall time.
            target_l2: Stop once the relative L² error is at most this (needs a reference).
            callback: Called as ``callback(step, info)`` after each step.
            **options: Passed to the optimizer's constructor.

        Returns:
            The history: lists ``step``, ``time``, ``loss``, ``lr``, ``terms`` (name -> list)
            and, with a reference, ``eval_step``, ``eval_time``, ``l2``, ``h1``.
        """
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        opt = (
            make_optimizer(optimizer, self.objective, **options)
            if isinstance(optimizer, str)
            else optimizer
        )
        if eval_every is None:
            eval_every = max(1, steps // 20)
        history = self.history = {
            "optimizer": optimizer if isinstance(optimizer, str) else type(optimizer).__name__,
            "step": [],
            "time": [],
            "loss": [],
            "lr": [],
            "terms": {block.name: [] for block in self.objective.blocks},
            "eval_step": [],
            "eval_time": [],
            "l2": [],
            "h1": [],
        }
        elapsed = 0.0

        def evaluate(step: int) -> float | None:
            if self.errors is None:
                return None
            l2, h1 = self.errors(self.network)
            history["eval_step"].append(step)
            history["eval_time"].append(elapsed)
            history["l2"].append(l2)
            history["h1"].append(h1)
            return l2

        evaluate(0)
        for step in range(1, steps + 1):
            start = time.perf_counter()
            info = opt.step()
            elapsed += time.perf_counter() - start
            history["step"].append(step)
            history["time"].append(elapsed)
            history["loss"].append(info["loss"])
            history["lr"].append(info.get("lr", float("nan")))
            for name, value in info.get("terms", {}).items():
                history["terms"][name].append(value)
            if callback is not None:
                callback(step, info)
            done = (
                step == steps
                or (time_limit is not None and elapsed >= time_limit)
                or bool(info.get("stalled", False))  # Gauss-Newton at its round-off floor
            )
            if step % eval_every == 0 or done or target_l2 is not None:
                l2 = evaluate(step)
                if target_l2 is not None and l2 is not None and l2 <= target_l2:
                    break
            if done:
                break
        return history
