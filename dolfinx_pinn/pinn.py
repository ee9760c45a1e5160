"""Plain (non-hybrid) PINN training: the paper's Ms-PINN / MLP baseline and the fine-scale half.

:class:`PINNSolver` samples collocation points on the problem's box, builds the
:class:`~dolfinx_pinn.objectives.PINNObjective` (3.24)

    J^M(v) = |Ω|/M Σ_i (A^ε v - f^ε)(x^r_i)² + τ1 |∂Ω|/M_b Σ_i v(x^b_i)²

(the boundary term only for networks without a built-in boundary condition) and trains it with
the same optimizers, training loop and callbacks as the hybrid solver (see
:meth:`dolfinx_pinn.solver.HybridSolver.train` for the options).

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
from typing import Any

import numpy as np
import torch
from torch import nn

from dolfinx_pinn.devices import select_device
from dolfinx_pinn.errors import ReferenceErrors
from dolfinx_pinn.history import History
from dolfinx_pinn.objectives import PINNObjective
from dolfinx_pinn.problems import MultiscaleProblem
from dolfinx_pinn.trainers import build_training_loop

__all__ = ["PINNSolver", "ReferenceErrors", "select_device"]

SAMPLINGS = ("uniform", "sobol")


class PINNSolver:
    """Plain PINN training of a network on a problem (no coarse scale).

    Args:
        problem: The problem (4.8).
        network: The network; with ``satisfies_boundary_condition`` (hard or transfinite
            boundary conditions) no boundary term is added.
        n_interior: Number M of interior collocation points, >= 1.
        n_boundary: Number of boundary points of the τ1 penalty (default: the 2 end points in
            1D, ``max(4, n_interior // 10)`` otherwise).
        tau1: The boundary penalty weight τ1 > 0.
        method: Derivative method of the residual (``"auto"``, ``"jet"``, ``"jet_compiled"``,
            ``"func"``, ``"autograd"``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        seed: Seed of the collocation points and of torch's global generator.
        reference: A reference for the errors (see :func:`dolfinx_pinn.errors.reference_errors`).
        sampling: ``"uniform"`` random points on the box, or ``"sobol"`` (a scrambled Sobol'
            sequence, as :class:`~dolfinx_pinn.coarse.CollocationPoints` has).

    Attributes:
        objective: The :class:`~dolfinx_pinn.objectives.PINNObjective`.
        history: Filled by :meth:`train`.

    MPI: the plain PINN is serial (every rank trains its own copy).
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
        sampling: str = "uniform",
    ) -> None:
        if (
            isinstance(n_interior, bool)
            or not isinstance(n_interior, (int, np.integer))
            or n_interior < 1
        ):
            raise ValueError(f"n_interior must be an integer >= 1, got {n_interior!r}")
        if not (isinstance(tau1, (int, float)) and math.isfinite(tau1) and tau1 > 0):
            raise ValueError(f"tau1 must be a finite number > 0, got {tau1}")
        if getattr(network, "dim", problem.dim) != problem.dim:
            raise ValueError(f"network: dimension {network.dim} != problem dimension {problem.dim}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.problem = problem
        self.device = select_device(device)
        self.seed = int(seed)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.network = network.to(self.device)
        dtype = next(network.parameters()).dtype
        domain = problem.domain
        n_interior = int(n_interior)
        if sampling == "sobol":
            from dolfinx_pinn.coarse import sobol_points

            interior = sobol_points(domain.lower, domain.upper, n_interior, self.seed)
        else:
            interior = domain.sample_interior(n_interior, rng)
        self.interior_points = torch.tensor(interior, dtype=dtype, device=self.device)
        self.boundary_points = None
        boundary_weight = None
        if not getattr(network, "satisfies_boundary_condition", False):
            if n_boundary is None:
                n_boundary = 2 if problem.dim == 1 else max(4, n_interior // 10)
            if (
                isinstance(n_boundary, bool)
                or not isinstance(n_boundary, (int, np.integer))
                or n_boundary < 1
            ):
                raise ValueError(f"n_boundary must be an integer >= 1, got {n_boundary!r}")
            self.boundary_points = torch.tensor(
                domain.sample_boundary(int(n_boundary), rng), dtype=dtype, device=self.device
            )
            boundary_weight = tau1 * domain.boundary_measure / int(n_boundary)
        self.objective = PINNObjective(
            problem,
            self.network,
            self.interior_points,
            weight=domain.measure / n_interior,
            boundary=self.boundary_points,
            boundary_weight=boundary_weight,
            method=method,
            reference=reference,
        )
        self.reference = reference
        self.history: History = History(self.objective.term_names)

    @property
    def errors(self) -> Any:
        """``errors(model) -> (l2, h1)`` against the reference, or None without one."""
        return self.objective._errors

    def relative_errors(self) -> tuple[float, float]:
        """Relative L² and H¹-seminorm errors against the reference."""
        return self.objective.errors()

    def predict(self, points: np.ndarray) -> np.ndarray:
        """The network's values at numpy points ``(N, d)``."""
        return self.objective.predict(points)

    def train(self, optimizer: str | Any = "adam", steps: int = 1000, **options: Any) -> History:
        """Run ``steps`` optimizer iterations and return the history.

        Args:
            optimizer: ``"adam"``, ``"lbfgs"``, ``"gauss_newton"``, ``"projection"`` or an
                optimizer object of :mod:`dolfinx_pinn.optim`.
            steps: Number of iterations, >= 0.
            **options: As for :meth:`dolfinx_pinn.solver.HybridSolver.train`, without the
                coupling and lazy-update settings.

        Returns:
            The :class:`~dolfinx_pinn.history.History` (``history["terms"]`` holds the loss
            terms by name).
        """
        options.setdefault("progress", False)
        loop = build_training_loop(
            self.objective,
            optimizer,
            steps,
            options,
            description=f"pinn {optimizer if isinstance(optimizer, str) else 'optimizer'}",
        )
        self.history = loop.history
        return loop.run(steps)
