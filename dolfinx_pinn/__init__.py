"""dolfinx_pinn: hybrid PINN / finite-element solvers for elliptic multiscale problems.

The fine scale is a PyTorch network, the coarse scale a DOLFINx finite-element problem with
MPI-parallel PETSc solves (Hintermüller & Korolev); the two-scale theory of Hoang & Schwab sits
beside it.
"""

# mpi4py must be imported before dolfinx/petsc4py: the wheel's libmpi is found through it.
from mpi4py import MPI  # noqa: F401  (isort: skip)

from dolfinx_pinn.problems import (
    Box,
    MultiscaleProblem,
    laminate_2d,
    math_namespace,
    paper_1d,
    paper_2d,
    quasi_periodic_1d,
    weierstrass_1d,
)

__version__ = "0.1.0"

__all__ = [
    "Box",
    "MultiscaleProblem",
    "__version__",
    "laminate_2d",
    "math_namespace",
    "paper_1d",
    "paper_2d",
    "quasi_periodic_1d",
    "weierstrass_1d",
]
