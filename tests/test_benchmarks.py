"""The benchmark runner: cases, the results file, the table and bad options."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.skip_in_parallel
def test_runner_writes_json_and_table(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--cases", "coarse", "--repeats", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (json_file,) = tmp_path.glob("*.json")
    results = json.loads(json_file.read_text())
    rows = results["cases"]["coarse"]["rows"]
    assert [row["cells_per_side"] for row in rows] == [8, 16, 25, 50]
    assert all(row["seconds"] > 0 for row in rows)
    # Finer coarse meshes have more dofs; the table lists every row.
    assert [row["dofs"] for row in rows] == sorted(row["dofs"] for row in rows)
    table = json_file.with_suffix(".md").read_text()
    assert "| cells_per_side | dofs | seconds |" in table
    assert table.count("\n| 8 |") == 1


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cases", "nope"], "--cases"),
        (["--repeats", "0"], "--repeats"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_runner_rejects_bad_options(tmp_path, options, message):
    completed = subprocess.run(
        [sys.executable, str(RUN), *options, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert message in completed.stderr
