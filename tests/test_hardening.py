"""The command line under bad input, signals, closed pipes and small memory (issue: hardening).

Each test runs ``dolfinx-pinn`` in a subprocess (serial-only: the subprocesses are the point),
with a timeout so that a hang fails instead of blocking the suite, and asserts the one-line
message, the exit code and, for the memory case, the peak resident memory.
"""

from mpi4py import MPI  # noqa: F401  (isort: skip)

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skip_in_parallel

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = [
    "--set", "problem.eps=0.1", "--set", "network.k_max=4", "--set", "network.width=8",
    "--set", "coarse.h=0.05", "--set", "points.n_interior=400", "--set", "run.figures=false",
    "--set", "run.progress=false",
]  # fmt: skip


def _cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dolfinx_pinn", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        **kwargs,
    )


def _one_error_line(completed: subprocess.CompletedProcess, pattern: str) -> None:
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert len(lines) == 1, completed.stderr[-2000:]
    assert lines[0].startswith("dolfinx-pinn: error: "), lines[0]
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--set", "run.reference=exact", "--set", "problem.name=paper_2d"], r"run\.reference"),
        (["--set", "run.output=/proc/nope/out"], r"run\.output: cannot write"),
        (["--set", "run.resume=true"], r"run\.resume: there is no checkpoint"),
        (["--set", "optimizer.lr=-1"], r"optimizer\.lr must be > 0"),
    ]
    + (
        [(["--set", "run.device=cuda"], r"run\.device.*no CUDA")]
        if not torch.cuda.is_available()
        else []
    ),
)
def test_bad_input_is_one_line_before_any_work(tmp_path, extra, pattern):
    started = time.perf_counter()
    output = ["--set", f"run.output='{tmp_path / 'out'}'"] if "run.output" not in str(extra) else []
    completed = _cli("run", "paper_1d_two_scale", *TINY, *output, *extra)
    assert completed.returncode == 2
    _one_error_line(completed, pattern)
    assert time.perf_counter() - started < 120  # no training happened


def test_bad_config_files(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[problem]\n")
    for path, pattern in (
        (binary, r"is not UTF-8"),
        (tmp_path, r"is a directory"),
        (tmp_path / "missing.toml", r"no file .*shipped configurations"),
    ):
        completed = _cli("run", str(path))
        assert completed.returncode == 2
        _one_error_line(completed, pattern)


def test_configs_version_and_closed_pipe():
    listed = _cli("configs")
    assert listed.returncode == 0 and "paper_1d_two_scale" in listed.stdout.split()
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("dolfinx-pinn ")
    # `dolfinx-pinn keys | head -1`: a closed pipe ends the process quietly.
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-m", "dolfinx_pinn", "keys"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        assert process.stdout is not None
        process.stdout.readline()
        process.stdout.close()
        _, stderr = process.communicate(timeout=120)
        assert b"PETSC ERROR" not in stderr and b"Traceback" not in stderr, stderr[-2000:]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_exits_with_one_line(tmp_path, signum, code):
    output = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "dolfinx_pinn", "run", "paper_1d_ms_pinn", *TINY,
            "--set", "optimizer.steps=100000", "--set", f"run.output='{output}'",
            "--set", "run.progress=true", "--set", "run.reference='none'",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        deadline = time.time() + 240
        while time.time() < deadline:  # the progress lines say that training has started
            line = process.stderr.readline()
            if "step" in line or process.poll() is not None:
                break
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert list((output / "checkpoint").glob("checkpoint.rank0.pt"))


def test_mlp_gauss_newton_fits_in_two_gib(tmp_path):
    """The 8×64 MLP with Gauss-Newton was killed at 20 GB: now the Gram form, within 2 GiB."""
    script = tmp_path / "peak.py"
    script.write_text(
        "import resource, sys\n"
        "from dolfinx_pinn.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    completed = subprocess.run(
        [
            sys.executable, str(script), "run", "paper_1d_two_scale",
            "--set", "network.kind=mlp", "--set", "network.boundary=transfinite",
            "--set", "optimizer.steps=1", "--set", "points.n_interior=250",
            "--set", "coarse.delta=0.1", "--set", "run.figures=false",
            "--set", "run.progress=false", "--set", f"run.output='{tmp_path / 'out'}'",
        ],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    peak_kb = int(completed.stdout.split("PEAK_KB")[-1].split()[0])
    assert peak_kb < 2 * 2**20, peak_kb  # ru_maxrss is in KiB on Linux


def test_packaged_configs_are_in_the_wheel_data():
    import dolfinx_pinn

    folder = Path(dolfinx_pinn.__file__).parent / "configs"
    assert sorted(p.stem for p in folder.glob("*.toml"))
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "configs/*.toml" in text
