"""Shared pytest configuration, in the style of DOLFINx's own test suite.

The same suite runs serially (``python -m pytest``) and in parallel
(``mpirun -n 2 python -m mpi4py -m pytest``): mpi4py then aborts every rank when one fails,
instead of leaving the others hanging in a collective call.
"""

from mpi4py import MPI  # isort: skip  (before dolfinx/petsc4py: loads libmpi)

import gc
import os
from pathlib import Path

import pytest

# One thread per rank: the suite runs under mpirun on small machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's markers."""
    config.addinivalue_line(
        "markers", "skip_in_parallel: the test is serial-only (skipped when run on > 1 rank)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip tests marked ``skip_in_parallel`` when more than one rank runs the suite."""
    if item.get_closest_marker("skip_in_parallel") and MPI.COMM_WORLD.size > 1:
        pytest.skip("serial-only test (skip_in_parallel)")


@pytest.fixture(autouse=True)
def _collect_garbage_and_barrier():
    """Collect garbage (PETSc objects are destroyed collectively) and barrier after each test."""
    yield
    gc.collect()
    MPI.COMM_WORLD.barrier()


@pytest.fixture
def mpi_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary folder shared by all ranks of ``MPI.COMM_WORLD`` (created by rank 0)."""
    comm = MPI.COMM_WORLD
    path = None
    if comm.rank == 0:
        name = request.node.name.replace("[", "_").replace("]", "_")[:40]
        path = tmp_path_factory.mktemp(name, numbered=True)
    path = comm.bcast(path, root=0)
    return Path(path)
