"""dolfinx_pinn: hybrid PINN / finite-element solvers for elliptic multiscale problems.

The fine scale is a PyTorch network, the coarse scale a DOLFINx finite-element problem with
MPI-parallel PETSc solves (Hintermüller & Korolev); the two-scale theory of Hoang & Schwab sits
beside it.

Start with :func:`dolfinx_pinn.solve` (:mod:`~dolfinx_pinn.auto`): one call that picks the
whole configuration from the problem and returns a :class:`~dolfinx_pinn.auto.Solution`.

Modules, one per concept: :mod:`~dolfinx_pinn.problems` (test problems, one definition each,
checked by :mod:`~dolfinx_pinn.problem_checks`),
:mod:`~dolfinx_pinn.reference` (fine-scale FE references, the exact 1D solution, errors,
upscaling), :mod:`~dolfinx_pinn.coarse` (the coarse state/adjoint as a torch layer),
:mod:`~dolfinx_pinn.coupling` (collocation values to FE dofs), :mod:`~dolfinx_pinn.networks`,
:mod:`~dolfinx_pinn.residual`, :mod:`~dolfinx_pinn.optim`, :mod:`~dolfinx_pinn.pinn` (the
fine-scale PINN core), :mod:`~dolfinx_pinn.homogenization` and :mod:`~dolfinx_pinn.relu`
(the two-scale theory).
"""

# mpi4py must be imported before dolfinx/petsc4py: the wheel's libmpi is found through it.
from mpi4py import MPI  # noqa: F401  (isort: skip)

from dolfinx_pinn.auto import Solution, SolveConfiguration, configure, solve
from dolfinx_pinn.boundary import BoundaryData
from dolfinx_pinn.coarse import CoarseProblem, CoarseSolve, CollocationPoints, coarse_solve
from dolfinx_pinn.coupling import CompressionOperator, CouplingTerm
from dolfinx_pinn.geometry import MeshDomain
from dolfinx_pinn.homogenization import (
    TwoScaleApproximation,
    cell_problem_from,
    solve_cell_problem,
    solve_homogenized,
)
from dolfinx_pinn.networks import MLP, MultiscaleFourierNet, TransfiniteBoundaryNet, TwoScaleNet
from dolfinx_pinn.pinn import PINNSolver
from dolfinx_pinn.problems import (
    Box,
    MultiscaleProblem,
    laminate_2d,
    math_namespace,
    paper_1d,
    paper_2d,
    paper_3d,
    quasi_periodic_1d,
    weierstrass_1d,
)
from dolfinx_pinn.reference import (
    ExactSolution1D,
    box_partition,
    exact_1d,
    relative_errors,
    solve_fine,
    solve_fine_directions,
    upscaled_coefficient,
    upscaled_tensor,
)
from dolfinx_pinn.solver import HybridSolver

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "BoundaryData",
    "Box",
    "CoarseProblem",
    "CoarseSolve",
    "CollocationPoints",
    "CompressionOperator",
    "CouplingTerm",
    "ExactSolution1D",
    "HybridSolver",
    "MeshDomain",
    "MultiscaleFourierNet",
    "MultiscaleProblem",
    "PINNSolver",
    "Solution",
    "SolveConfiguration",
    "TransfiniteBoundaryNet",
    "TwoScaleApproximation",
    "TwoScaleNet",
    "__version__",
    "box_partition",
    "cell_problem_from",
    "coarse_solve",
    "configure",
    "exact_1d",
    "laminate_2d",
    "math_namespace",
    "paper_1d",
    "paper_2d",
    "paper_3d",
    "quasi_periodic_1d",
    "relative_errors",
    "solve",
    "solve_cell_problem",
    "solve_fine",
    "solve_fine_directions",
    "solve_homogenized",
    "upscaled_coefficient",
    "upscaled_tensor",
    "weierstrass_1d",
]
