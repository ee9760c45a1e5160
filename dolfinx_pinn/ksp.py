"""PETSc linear solvers: one set of defaults and one rule for who wins.

Every KSP of the package (the coarse state and adjoint solves, the periodic cell problems, the
homogenised and the fine reference solves) gets its own options prefix from
:func:`unique_prefix` and its options from :func:`solver_options`, with one documented
precedence, highest first:

1. options already in the PETSc database under the KSP's prefix (the command line, or
   ``PETSc.Options()["<prefix>ksp_type"] = ...`` before the object is built): the user wins;
2. a non-empty ``petsc_options`` dict given to the package's constructor, which replaces the
   defaults as a whole (a partial merge could leave a MUMPS option dangling under a Jacobi
   preconditioner);
3. the defaults: MUMPS LU (:data:`DIRECT`) up to :data:`DIRECT_SOLVER_MAX_DOFS` global dofs,
   CG + smoothed-aggregation AMG (:data:`ITERATIVE`) above (there is no hypre in the wheel).

Options the package inserts are removed from the database after ``setFromOptions`` so that two
objects never see each other's settings.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from mpi4py import MPI
from petsc4py import PETSc

__all__ = [
    "DIRECT",
    "DIRECT_SOLVER_MAX_DOFS",
    "ITERATIVE",
    "create_ksp",
    "default_options",
    "solver_options",
    "unique_prefix",
]

#: MUMPS LU: exact, the default for the small coarse and cell problems.
DIRECT: dict[str, Any] = {
    "ksp_type": "preonly",
    "pc_type": "lu",
    "pc_factor_mat_solver_type": "mumps",
}
#: CG + GAMG with a tight tolerance: the sensitivities and adjoints need more than plotting digits.
ITERATIVE: dict[str, Any] = {
    "ksp_type": "cg",
    "pc_type": "gamg",
    "ksp_rtol": 1.0e-12,
    "ksp_atol": 1.0e-50,
    "ksp_max_it": 5000,
}
#: Global dof counts up to which the automatic choice is the direct solver.
DIRECT_SOLVER_MAX_DOFS = 200_000

_counter = itertools.count()


def unique_prefix(name: str) -> str:
    """A fresh options prefix ``dolfinx_pinn_<name>_<n>_`` (the same on every rank).

    Every rank creates the package's objects in the same order, so the counter agrees.
    """
    return f"dolfinx_pinn_{name}_{next(_counter)}_"


def default_options(solver: str = "auto", num_global_dofs: int = 0) -> dict[str, Any]:
    """The default options of ``solver``: ``"direct"``, ``"iterative"`` or ``"auto"`` (by size).

    Raises:
        ValueError: naming ``solver`` when it is none of these.
    """
    if solver == "auto":
        solver = "direct" if num_global_dofs <= DIRECT_SOLVER_MAX_DOFS else "iterative"
    if solver in ("direct", "mumps"):
        return dict(DIRECT)
    if solver in ("iterative", "gamg"):
        return dict(ITERATIVE)
    raise ValueError(
        f"solver must be 'auto', 'direct' ('mumps') or 'iterative' ('gamg'), got {solver!r}"
    )


def solver_options(
    prefix: str, petsc_options: Mapping[str, Any] | None, defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The options the package should set under ``prefix`` (see the module doc for the order).

    A non-empty ``petsc_options`` replaces ``defaults`` (``None`` or ``{}``: the defaults); keys
    the user already set under ``prefix`` in the PETSc database are left out, so theirs win.
    """
    chosen = dict(petsc_options) if petsc_options else dict(defaults)
    database = PETSc.Options()
    return {key: value for key, value in chosen.items() if not database.hasName(f"{prefix}{key}")}


def create_ksp(
    comm: MPI.Comm,
    operator: PETSc.Mat,
    prefix: str,
    petsc_options: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] = DIRECT,
) -> PETSc.KSP:
    """A KSP on ``operator`` with its own prefix and the package's precedence (collective).

    Args:
        comm: The communicator of the operator.
        operator: The matrix.
        prefix: The options prefix (from :func:`unique_prefix`).
        petsc_options: Options replacing ``defaults``.
        defaults: The package's defaults.

    Returns:
        The KSP; the caller destroys it.
    """
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(operator)
    ksp.setOptionsPrefix(prefix)
    inserted = solver_options(prefix, petsc_options, defaults)
    database = PETSc.Options()
    for key, value in inserted.items():
        database[f"{prefix}{key}"] = value
    ksp.setFromOptions()
    for key in inserted:
        database.delValue(f"{prefix}{key}")
    return ksp


def solve_linear(
    a: Any,
    L: Any,
    bcs: list[Any],
    name: str,
    petsc_options: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] = DIRECT,
    *,
    solution: Any = None,
) -> Any:
    """One linear solve through ``dolfinx.fem.petsc.LinearProblem`` (collective).

    As in DOLFINx's ``demo_poisson.py``, with a fresh prefix from :func:`unique_prefix` and the
    precedence of this module. The PETSc objects are destroyed before returning (on every rank
    at the same point, rather than whenever the garbage collector runs on each rank).

    Args:
        a: The bilinear UFL form.
        L: The linear UFL form.
        bcs: The Dirichlet conditions.
        name: A short name for the prefix (``dolfinx_pinn_<name>_<n>_``).
        petsc_options: Options replacing ``defaults``.
        defaults: The package's defaults.
        solution: The Function to solve into (default: a new one).

    Returns:
        The solution Function.

    Raises:
        RuntimeError: when the KSP did not converge (its reason and prefix named).
    """
    from dolfinx.fem.petsc import LinearProblem

    prefix = unique_prefix(name)
    problem = LinearProblem(
        a,
        L,
        bcs=bcs,
        u=solution,
        petsc_options_prefix=prefix,
        petsc_options=solver_options(prefix, petsc_options, defaults),
    )
    try:
        result = problem.solve()
        reason = problem.solver.getConvergedReason()
        if reason < 0:
            raise RuntimeError(
                f"the {name} solve did not converge (KSPConvergedReason {reason}); adjust the "
                f"options under the prefix {prefix!r}"
            )
    finally:
        for obj in (problem.solver, problem.A, problem.b, problem.x):
            obj.destroy()
    return result
