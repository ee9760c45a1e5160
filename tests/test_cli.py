"""Tests of the ``dolfinx-pinn`` command line: validation by name, help, a tiny complete run."""

from mpi4py import MPI  # isort: skip

import csv
import json

import numpy as np
import pytest
import torch

from dolfinx_pinn import io as run_io
from dolfinx_pinn.cli import SCHEMA, ConfigError, build_parser, load_config, main

COMM = MPI.COMM_WORLD
torch.set_num_threads(1)

TINY = """
[problem]
name = "paper_1d"
eps = 0.1
[network]
kind = "two_scale"
k_max = 4
width = 8
[coarse]
h = 0.05
[points]
n_interior = 400
[loss]
tau2_schedule = "continuation"
[optimizer]
name = "gauss_newton"
steps = 2
[run]
progress = false
eval_every = 1
"""


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("network.widht=3", r"unknown key network\.widht"),
        ("solver.steps=3", r"unknown section \[solver\]"),
        ("optimizer.steps=1.5", r"optimizer\.steps must be of type integer"),
        ("optimizer.lr=-1", r"optimizer\.lr must be > 0"),
        ("loss.tau2_schedule=linear", r"loss\.tau2_schedule must be one of"),
        ("coarse.lazy=3", r"coarse\.lazy must be of type boolean"),
        ("run.device=tpu", r"run\.device must be"),
        ("points", r"--set expects section\.key=value"),
    ],
)
def test_bad_key_type_or_range_is_named(tmp_path, override, message):
    path = tmp_path / "config.toml"
    path.write_text(TINY)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_main_reports_bad_config_before_work(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text(TINY + "\n[extra]\nkey = 1\n")
    assert main(["run", str(path)]) == 2
    if COMM.rank == 0:
        assert "unknown section [extra]" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no file"):
        load_config(tmp_path / "missing.toml")


def test_help_documents_every_key():
    text = build_parser().format_help()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for name in keys:
            assert f"    {name} (" in text, name


def test_overrides_and_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(TINY)
    config = load_config(path, ["optimizer.lr=1e-3", "problem.name=paper_2d", "coarse.h=0.1"])
    assert config["optimizer"]["lr"] == 1e-3
    assert config["problem"]["name"] == "paper_2d"
    assert config["coarse"]["h"] == 0.1
    assert config["loss"]["tau1"] == SCHEMA["loss"]["tau1"].default


def test_tiny_run_writes_every_file(mpi_tmp_path):
    path = mpi_tmp_path / "tiny.toml"
    if COMM.rank == 0:
        path.write_text(TINY)
    COMM.barrier()
    output = mpi_tmp_path / "run"
    assert main(["run", str(path), "--set", f"run.output='{output}'"]) == 0
    COMM.barrier()
    suffix = ".bp" if run_io.dolfinx.has_adios2 else ".xdmf"
    for name in (f"coarse{suffix}", f"fine{suffix}", "metrics.json", "history.csv"):
        assert (output / name).exists(), name
    for name in ("solution.png", "error.png", "history.png"):
        assert (output / name).stat().st_size > 1000, name
    metrics = json.loads((output / "metrics.json").read_text())
    for key in run_io.METRIC_KEYS:
        assert key in metrics, key
    assert metrics["iterations"] == 2 and metrics["n_ranks"] == COMM.size
    assert 0 < metrics["rel_l2"] < 0.5 and 0 <= metrics["coarse_share"] <= 1
    assert metrics["K_tilde"] == pytest.approx(3**0.5, abs=0.05)
    with open(output / "history.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert {"loss", "pde", "coupling", "K_tilde", "tau2", "time_coarse", "l2", "h1"} <= set(rows[0])


def test_shipped_configs_are_valid():
    """Every configuration shipped with the package (dolfinx_pinn/configs) passes validation."""
    from dolfinx_pinn.cli import config_names

    names = config_names()
    assert "paper_1d_two_scale" in names and "heat_2d" in names
    for name in names:
        config = load_config(name)
        assert config["optimizer"]["steps"] >= 1, name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.name='projection'", "optimizer.form='gram'"], r"optimizer\.form must be"),
        (["optimizer.name='projection'", "coarse.lazy=false"], r"coarse\.lazy must be true"),
        (["points.sampling='halton'"], r"points\.sampling must be one of"),
        (["network.wavevector_norm='l2'"], r"network\.wavevector_norm must be one of"),
        (["run.fine_degree=0"], r"run\.fine_degree must be in \[1, 4\]"),
    ],
)
def test_projection_keys_are_checked(tmp_path, overrides, message):
    path = tmp_path / "config.toml"
    path.write_text(TINY)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def _run_tiny(folder, overrides: list[str]) -> dict:
    """``dolfinx-pinn run`` on TINY with ``--set`` overrides (no figures); its metrics."""
    path = folder / "tiny.toml"
    if COMM.rank == 0:
        path.write_text(TINY)
    COMM.barrier()
    output = folder / "run"
    overrides = [f"run.output='{output}'", "run.figures=false", *overrides]
    assert main(["run", str(path), *[item for o in overrides for item in ("--set", o)]]) == 0
    COMM.barrier()
    return json.loads((output / "metrics.json").read_text())


def test_tiny_projection_run(mpi_tmp_path):
    """The output-layer projection with Sobol' points and l1 harmonics from the command line."""
    overrides = [
        "optimizer.name='projection'",
        "network.wavevector_norm='l1'",
        "points.sampling='sobol'",
        "loss.tau2_decay=1e-9",
    ]
    metrics = _run_tiny(mpi_tmp_path, overrides)
    assert metrics["iterations"] == 2 and metrics["n_ranks"] == COMM.size
    assert metrics["rel_l2"] < 0.05  # the tiny basis of TINY (k_max 4, width 8): 0.023
    assert metrics["config"]["optimizer"]["name"] == "projection"


def test_tiny_full_tensor_run(mpi_tmp_path):
    """coarse.full_tensor: a two-output MLP and the whole K̃ (Algorithm 4.1) in metrics.json."""
    overrides = [
        "run.reference='none'",
        "problem.name='paper_2d'",
        "problem.eps=0.25",
        "network.kind='mlp'",
        "network.boundary='soft'",
        "network.depth=2",
        "coarse.h=0.125",
        "coarse.full_tensor=true",
        "points.n_interior=1000",
        "points.n_boundary=100",
        "optimizer.name='adam'",
        "loss.tau2_schedule='constant'",
    ]
    metrics = _run_tiny(mpi_tmp_path, overrides)
    tensor = np.array(metrics["K_tilde_tensor"])
    assert tensor.shape == (2, 2) and np.isfinite(tensor).all()
    assert metrics["K_tilde"] == pytest.approx(tensor[0, 0])
    with pytest.raises(ConfigError, match=r"coarse\.full_tensor"):
        load_config(mpi_tmp_path / "tiny.toml", ["coarse.full_tensor=true"])  # two_scale + GN
