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


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crossover(tmp_path_factory):
    """One tiny crossover run: real FEM ladders and references, FEM stand-ins for ``solve``.

    1D: P2 with 3 cells per period plus 0.5 s of sleep (FEM must win); 2D: P2 with 8 cells per
    period, finer than every rung of the tiny ladders (N <= 4), so no rung reaches it.
    """
    module = _load_benchmark_module("bench_crossover")
    slow, fine = module.fem_stand_in(2, 3, sleep_s=0.5), module.fem_stand_in(2, 8)

    def stand_in(problem, **kw):
        return (slow if problem.dim == 1 else fine)(problem)

    folder = tmp_path_factory.mktemp("crossover")
    case = module.benchmark(
        "tiny", repeats=1, cache=folder / "cache", solve=stand_in, log=lambda text: None
    )
    stem = module.write_results(case, folder, "crossover-tiny")
    return module, case, stem


def _ladders(case, dim):
    ladders = {}
    for rung in case["ladder"]:
        if rung["dim"] == dim and "total_s" in rung:
            ladders.setdefault(rung["ladder"], []).append(rung)
    return {name: sorted(r, key=lambda r: r["n_per_period"]) for name, r in ladders.items()}


@pytest.mark.skip_in_parallel
def test_crossover_tiny_measures_ladders_references_and_writes_files(crossover):
    import math

    _, case, stem = crossover
    assert [(row["dim"], row["eps"]) for row in case["rows"]] == [(1, 1 / 15), (2, 0.25)]
    # Four ladders (P1/P2 x MUMPS/GAMG) of two rungs (N = 2, 4) per dimension, all measured.
    measured = [rung for rung in case["ladder"] if "total_s" in rung]
    assert len(measured) == 16
    for rung in measured:
        for key in ("total_s", "mesh_s", "assembly_s", "solve_s", "peak_rss_gib"):
            assert math.isfinite(rung[key]) and rung[key] >= 0, (key, rung)
        assert 0 < rung["rel_l2"] < 1 and 0 < rung["rel_h1"] < 1
    errors = {(r["dim"], r["label"]): (r["rel_l2"], r["rel_h1"]) for r in measured}
    for dim in (1, 2):
        fine, coarse = errors[dim, "P2 mumps N=4"], errors[dim, "P1 mumps N=2"]
        assert fine[0] < coarse[0] and fine[1] < coarse[1]
        # LU and CG + GAMG (rtol 1e-10) give the same discrete solution.
        mumps, gamg = errors[dim, "P2 mumps N=4"], errors[dim, "P2 gamg N=4"]
        assert abs(mumps[0] - gamg[0]) < 1e-6 * mumps[0]
    (reference,) = [r for r in case["references"] if r["dim"] == 2]
    assert reference["degree"] == 3 and reference["cells_per_period"] >= 12
    assert 0 < reference["estimated_l2"] < 1e-4 and 0 < reference["estimated_h1"] < 1e-3
    results = json.loads(Path(f"{stem}.json").read_text())
    assert results["cases"]["crossover"]["rows"][0]["verdict"] == case["rows"][0]["verdict"]
    table = Path(f"{stem}.md").read_text()
    for heading in ("#### Time to the same accuracy", "#### FEM ladders", "#### 2D references"):
        assert heading in table
    assert Path(f"{stem}-crossover.png").stat().st_size > 0


@pytest.mark.skip_in_parallel
def test_crossover_tiny_table_logic_on_real_runs(crossover):
    module, case, stem = crossover
    one, two = case["rows"]
    # 1D: the slow stand-in is reached by the ladders; FEM wins, by the measured ratio.
    best = module.best_fem_time(_ladders(case, 1), one["pinn_l2"], one["pinn_h1"])
    assert best["kind"] in ("first rung", "interpolated") and one["fem_s"] == best["time_s"]
    assert one["pinn_s"] >= 0.5 and one["ratio"] == one["fem_s"] / one["pinn_s"] < 1.0
    assert one["win"] is False
    assert one["verdict"] == f"FEM wins, {module._times(1 / one['ratio'])} faster"
    assert case["statements"][1] == "1D: dolfinx_pinn is not faster than FEM at any measured ε"
    # 2D: no rung reaches the stand-in: FEM needs more than its cheapest last rung and at most
    # the reference solve (a plain DOLFINx solve more accurate than the stand-in).
    ladders = _ladders(case, 2)
    assert all(r["rel_l2"] > two["pinn_l2"] for rungs in ladders.values() for r in rungs)
    (reference,) = [r for r in case["references"] if r["dim"] == 2]
    assert two["fem_s"] is None and two["ratio"] is None
    lowest = min(rungs[-1]["total_s"] for rungs in ladders.values())
    assert two["ratio_at_least"] == lowest / two["pinn_s"]
    assert two["ratio_at_most"] == reference["solve_s"] / two["pinn_s"]
    if two["ratio_at_least"] > 1:
        assert two["win"] is True and two["verdict"].startswith("dolfinx_pinn wins, > ")
    elif two["ratio_at_most"] < 1:
        assert two["win"] is False and two["verdict"].startswith("FEM wins, ≥ ")
    else:
        assert two["win"] is None and " and ≤ " in two["verdict"]
    assert "(the reference solve)" in two["fem_how"]
    # The targets: missed, with the measured figures.
    targets = case["targets"]
    assert [t["met"] for t in targets] == [False, False]
    assert f"{one['pinn_l2']:.1e}/{one['pinn_h1']:.1e}" in targets[0]["measured"]
    assert all("(missed)" in t["measured"] for t in targets)
    table = Path(f"{stem}.md").read_text()
    assert one["verdict"] in table and two["verdict"] in table and "| **no** |" in table


@pytest.mark.skip_in_parallel
def test_crossover_rules_on_given_numbers():
    crossover = _load_benchmark_module("bench_crossover")
    rungs = [
        {"label": "P2 mumps N=2", "total_s": 1.0, "rel_l2": 1e-2, "rel_h1": 1e-1},
        {"label": "P2 mumps N=4", "total_s": 4.0, "rel_l2": 1e-4, "rel_h1": 1e-2},
    ]
    # log t linear in log e between the rungs: L² 1e-3 is half-way, at 2 s.
    hit = crossover.time_to_accuracy(rungs, 1e-3, 1.0)
    assert hit["kind"] == "interpolated" and abs(hit["time_s"] - 2.0) < 1e-12
    assert crossover.time_to_accuracy(rungs, 1e-2, 1e-1)["kind"] == "first rung"
    missed = crossover.best_fem_time({"P2 mumps": rungs}, 1e-6, 1e-3)
    assert missed["kind"] == "unreached" and missed["lower_bound_s"] == 4.0
    rows = [
        {"dim": 2, "eps": 0.1, "win": False, "ratio": 0.1},
        {"dim": 2, "eps": 0.01, "win": True, "ratio": 10.0},
        {"dim": 2, "eps": 0.001, "win": None, "ratio": None},
    ]
    statement = crossover.crossover_statement(rows, 2)
    assert statement.startswith("2D: dolfinx_pinn is faster below ε ≈ 0.032")
    assert statement.endswith("(undecided at ε = 0.001)")
    assert "at any measured ε" in crossover.crossover_statement(rows[:1], 2)
    assert "at every measured ε" in crossover.crossover_statement(rows[1:2], 2)
    # Every ladder ended on memory before reaching the pinn's accuracy: dolfinx_pinn wins.
    pinn = {"wall_time_s": 10.0, "rel_l2": 1e-6, "rel_h1": 1e-5}
    ends = {"ladder_ends": {"P2 mumps": "skipped N=8: predicted 20 GiB > 16 GiB"}}
    row = crossover._crossover_row(1, 1e-3, pinn, {"P2 mumps": rungs}, ends)
    assert row["win"] is True and row["verdict"].endswith("(memory cap or round-off)")
    assert row["ratio_at_least"] == 0.4
    # Faster than the time cap allows FEM to show: undecided, saying why.
    ends = {"ladder_ends": {"P2 mumps": "skipped N=8: predicted 90 s > 60 s"}}
    row = crossover._crossover_row(1, 1e-3, pinn, {"P2 mumps": rungs}, ends)
    assert row["win"] is None and row["verdict"].startswith("undecided: FEM did not reach")
    row = crossover._crossover_row(1, 1e-3, {"error": "ValueError: x"}, {}, ends)
    assert row["win"] is None and "dolfinx_pinn failed (ValueError: x)" in row["verdict"]


@pytest.mark.skip_in_parallel
def test_crossover_pinn_row_uses_only_the_public_solve(monkeypatch):
    import dolfinx_pinn
    from dolfinx_pinn.problems import paper_1d
    from dolfinx_pinn.reference import exact_1d

    crossover = _load_benchmark_module("bench_crossover")
    problem = paper_1d(1 / 15)
    exact = exact_1d(problem)
    reference = crossover.Reference1D(problem, exact, sampled_periods=16)
    calls = []

    class Solution:  # what the benchmark may read: value, gradient, metrics
        def __init__(self):
            self.metrics = {"wall_time_s": 0.5, "rel_l2": 1e-9}

        def value(self, points):
            return 1.001 * exact.value(points)

        def gradient(self, points):
            return exact.gradient(points)

    def solve(problem, **kw):
        calls.append(kw)
        return Solution()

    monkeypatch.setattr(dolfinx_pinn, "solve", solve)
    row = crossover.pinn_row(problem, reference, device="cpu", repeats=3, repeat_budget_s=60.0)
    assert calls == [{"device": "cpu"}] * 4  # a warm-up, then the median of three
    assert row["calls"] == 4 and row["metrics_wall_time_s"] == 0.5
    assert abs(row["rel_l2"] - 1e-3) < 1e-9 and row["rel_h1"] < 1e-12


@pytest.mark.skip_in_parallel
def test_crossover_is_a_runner_case():
    runner = _load_benchmark_module("run")
    assert "crossover" in runner.ALL_CASES and "crossover" in runner.CASES
