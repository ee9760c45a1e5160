"""The scripts of benchmarks/paper/ (issue 17) at tiny sizes: the 1D reproduction with its
checkpoints and figures, the GPU script on the CPU, the FLOP counter and Table 1's smoke run.

Each runs in seconds; the scripts themselves run the paper's sizes (hours).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"

pytestmark = pytest.mark.skip_in_parallel


def _load(name):
    """A script of benchmarks/paper/ as a module (its folder on the path, as when run)."""
    if str(PAPER) not in sys.path:
        sys.path.insert(0, str(PAPER))
    spec = importlib.util.spec_from_file_location(name, PAPER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


TINY = ["--eps", "1/15", "--points", "200", "--coarse-h", "0.05", "--eval-every", "2",
        "--checkpoint-every", "2", "--save-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Both 1D methods for 4 steps, then resumed to 6 (the hybrid from its checkpoint)."""
    reproduce = _load("reproduce_1d")
    out = tmp_path_factory.mktemp("paper_runs")
    for method in ("ms_pinn", "hybrid"):
        assert reproduce.main([*TINY, "--method", method, "--steps", "4", "--out", str(out)]) == 0
        argv = [*TINY, "--method", method, "--steps", "6", "--out", str(out), "--resume"]
        assert reproduce.main(argv) == 0
    return out


def test_reproduce_1d_writes_and_resumes(tiny_runs):
    for method in ("ms_pinn", "hybrid"):
        folder = tiny_runs / f"{method}_eps1_15"
        saved = json.loads((folder / "history.json").read_text())
        history, meta = saved["history"], saved["meta"]
        assert history["step"] == [1, 2, 3, 4, 5, 6]
        assert history["eval_step"] == [0, 2, 4, 6]
        assert all(math.isfinite(v) for v in history["l2"])
        assert meta["steps_done"] == 6 and meta["n_interior"] == 200
        assert meta["final_l2"] == history["l2"][-1]
        assert (folder / "checkpoint" / "checkpoint.rank0.pt").is_file()
        rows = (folder / "errors.csv").read_text().splitlines()
        assert rows[0] == "step,time,l2,h1" and len(rows) == 5
        assert len((folder / "steps.csv").read_text().splitlines()) == 7
        assert set(torch.load(folder / "network.pt")) >= {"network.output.weight"}
    meta = json.loads((tiny_runs / "hybrid_eps1_15" / "meta.json").read_text())
    assert meta["coarse_h"] == 0.05 and meta["tau2_schedule"] == "constant"
    # The resumed run continues the same trajectory: 6 steps at once give the same loss.
    reproduce = sys.modules["reproduce_1d"]
    again = tiny_runs / "again"
    reproduce.main([*TINY, "--method", "ms_pinn", "--steps", "6", "--out", str(again)])
    straight = json.loads((again / "ms_pinn_eps1_15" / "history.json").read_text())["history"]
    resumed = json.loads((tiny_runs / "ms_pinn_eps1_15" / "history.json").read_text())["history"]
    assert np.allclose(straight["loss"], resumed["loss"], rtol=1e-12)


def test_reproduce_1d_resumes_the_earlier_checkpoint_format(tiny_runs, tmp_path):
    """``pinn_checkpoint.pt`` of the script's earlier version continues in the package loop."""
    reproduce = sys.modules["reproduce_1d"]
    source = json.loads((tiny_runs / "ms_pinn_eps1_15" / "history.json").read_text())
    folder = tmp_path / "ms_pinn_eps1_15"
    folder.mkdir()
    # The earlier file: the network, Adam and its schedule after 6 steps, and the history.
    problem = reproduce.paper_1d(1 / 15)
    network = reproduce.build_network(problem)
    network.load_state_dict(torch.load(tiny_runs / "ms_pinn_eps1_15" / "network.pt"))
    state = torch.load(
        tiny_runs / "ms_pinn_eps1_15" / "checkpoint" / "checkpoint.rank0.pt", weights_only=False
    )
    history = {k: v for k, v in source["history"].items()}
    torch.save(
        {
            "step": 6,
            "network": network.state_dict(),
            "adam": state["optimizer"]["optimizer"],
            "scheduler": state["optimizer"]["scheduler"],
            "iteration": 6,
            "balancer": {"pde": 1.0},
            "history": history,
        },
        folder / "pinn_checkpoint.pt",
    )
    argv = [*TINY, "--method", "ms_pinn", "--steps", "8", "--out", str(tmp_path), "--resume"]
    assert reproduce.main(argv) == 0
    resumed = json.loads((folder / "history.json").read_text())["history"]
    assert resumed["step"] == list(range(1, 9)) and resumed["eval_step"] == [0, 2, 4, 6, 8]
    assert resumed["loss"][:6] == history["loss"]
    assert (folder / "checkpoint" / "checkpoint.rank0.pt").is_file()


def test_figures_1d_from_the_tiny_runs(tiny_runs, tmp_path):
    figures = _load("figures_1d")
    assert figures.main(["--runs", str(tiny_runs), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"ms_pinn_eps1_15", "hybrid_eps1_15"}
    assert summary["runs"]["hybrid_eps1_15"]["steps"] == 6
    coarse = summary["coarse"]["eps1_15"]
    assert abs(coarse["K_tilde_u_quadrature"] - math.sqrt(3)) < 1e-3
    assert all(math.isfinite(v) for v in coarse["max_abs"].values())
    assert (tmp_path / "figure_1d_eps1_15.png").stat().st_size > 10_000


def test_gpu_run_tiny_on_cpu(tmp_path):
    """The GPU script at tiny sizes on the CPU: checks, timings, runs, nothing of FEniCSx."""
    completed = subprocess.run(
        [sys.executable, str(PAPER / "gpu_run.py"), "--device", "cpu", "--tiny", "--runs-f32",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_run.json").read_text())
    assert result["fenics_modules_imported"] == []
    assert "dolfinx" in result["modules_stubbed"]
    assert result["package_tests"]["ran"] is False
    checks = result["checks"]
    assert max(checks["jet_vs_autograd_rel"].values()) < 1e-10
    assert checks["graph_adam_vs_torch_adam_rel"] < 1e-12
    # The package's own networks module, loaded without DOLFINx, agrees with the copies.
    package = checks["package_networks_on_device"]
    assert package["jet_vs_copy_rel"] < 1e-12, package
    # The copies of the network, objective and Adam loop replay the package's own history.
    for method in ("ms_pinn", "hybrid"):
        replay = checks["replay_package_history_rel"][method]
        assert replay["loss"] < 1e-9 and replay["l2"] < 1e-9, replay
    assert checks["replay_package_history_rel"]["hybrid"]["refreshes"] == [2, 2]
    timing = result["timing"]
    assert {row["config"] for row in timing} >= {"1d_ms_pinn_M2000", "2d_mlp_25000+2500"}
    assert all("error" not in row and row["seconds_per_step"] > 0 for row in timing)
    runs = result["runs_1d"]
    assert runs["steps"] == 4
    assert set(runs["runs"]) == {
        f"{m}_eps1_15_{d}" for m in ("ms_pinn", "hybrid") for d in ("f64", "f32")
    }
    for run in runs["runs"].values():
        assert run["history"]["eval_step"] == [0, 2, 4]
        assert all(math.isfinite(v) for v in run["history"]["l2"])
    assert (tmp_path / "gpu_run_networks.pt").is_file()


def test_gpu_data_match_the_package(tmp_path, monkeypatch):
    """precompute_gpu_data.py at a tiny size; gpu_run.py's copies replay the package on it.

    (The committed data files at the paper's sizes are replayed by the test above.)
    """
    precompute = _load("precompute_gpu_data")
    gpu = _load("gpu_run")
    monkeypatch.setattr(precompute, "default_points", lambda eps: 300)
    monkeypatch.setattr(precompute, "COARSE_H", 0.05)
    checks = precompute.precompute(1 / 15, tmp_path)
    assert checks["compression_columns_start_with_points"]
    assert (
        checks["state_is_y1_over_K"] < 1e-10 and checks["sensitivity_is_minus_y1_over_K2"] < 1e-10
    )
    monkeypatch.setattr(gpu, "DATA", tmp_path)
    for method in ("ms_pinn", "hybrid"):
        replay = gpu.replay_package_history("1_15", method, torch.device("cpu"))
        assert replay["loss"] < 1e-9 and replay["l2"] < 1e-9, (method, replay)


def test_adam_flops_quick(tmp_path):
    flops = _load("adam_flops")
    path = tmp_path / "flops.json"
    argv = ["--quick", "--only", "1d_ms_pinn_M2000", "--steps", "1", "--train-steps", "4",
            "--json", str(path)]  # fmt: skip
    assert flops.main(argv) == 0
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert {(r["method"], r["dtype"]) for r in rows} == {
        (m, d) for m in ("jet", "autograd") for d in ("float64", "float32")
    }
    for row in rows:
        assert row["matmul_gflop_per_step"] > 0 and row["step_gflops"] > 0
        if row["method"] == "jet":  # the recorded products: the closed form's, to 0.1 %
            assert abs(row["matmul_gflop_per_step"] / row["closed_form_gflop"] - 1) < 1e-3
    training = result["float32_training"]
    assert training["float64"]["eval_step"] == training["float32"]["eval_step"]
    assert abs(training["float32"]["l2"][-1] / training["float64"]["l2"][-1] - 1) < 1e-3


def test_table1_smoke_and_estimate(tmp_path):
    table = _load("table1_2d")
    out = tmp_path / "table1"
    argv = ["--smoke", "--cases", "mlp_plain,ms_pinn_hybrid", "--steps", "2", "--out", str(out)]
    assert table.main(argv) == 0
    result = json.loads((out / "table1.json").read_text())
    assert set(result["cases"]) == {"mlp_plain", "ms_pinn_hybrid"}
    for row in result["rows"]:
        assert row["steps"] == 2 and math.isfinite(row["l2_at_smallest_residual"])
        assert row["iteration_of_smallest_residual"] in (0, 1)
    assert "| mlp_plain | 1 |" in (out / "table1.md").read_text()
    argv = ["--estimate", "--cases", "mlp_plain,mlp_hybrid", "--est-points", "400,40",
            "--est-steps", "1", "--out", str(out)]  # fmt: skip
    assert table.main(argv) == 0
    estimate = json.loads((out / "estimate.json").read_text())
    assert estimate["points"] == [400, 40]
    assert set(estimate["cpu_one_thread"]) == {"mlp_plain", "mlp_hybrid"}
    assert all(v["seconds_per_step"] > 0 for v in estimate["cpu_one_thread"].values())


@pytest.mark.parametrize("script", ["run_all_1d.sh", "gpu_run.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(PAPER / script)]).returncode == 0
