"""The ``dolfinx-pinn`` console script: ``dolfinx-pinn run CONFIG [--set key=value ...]``.

A run configuration is a TOML file (or the name of a configuration shipped with the package,
``dolfinx-pinn configs`` lists them) with the sections and keys of :data:`SCHEMA`, which is
generated from the dataclasses of :mod:`dolfinx_pinn.options` (so every default lives there).
Every key is optional; ``dolfinx-pinn --help`` lists them with their defaults.
``--set section.key=value`` overrides one key (the value is parsed as TOML, e.g.
``--set optimizer.lr=1e-3`` or ``--set problem.name=paper_2d``). The whole configuration, the
device, the kind of reference and the output folder are checked before any mesh, network or
reference is built.

Exit codes: 0 success; 1 the run failed (it diverged, a loss became NaN, ...); 2 bad input
(every error is one line ``dolfinx-pinn: error: ...``); 130 / 143 interrupted by SIGINT /
SIGTERM (after a checkpoint, with ``run.checkpoint_every``).

Example:
    .. code-block:: sh

        dolfinx-pinn run paper_1d_two_scale --set run.output=out_1d
        mpirun -n 2 dolfinx-pinn run heat_2d

MPI: run the script under ``mpirun``; everything is collective on ``MPI.COMM_WORLD``.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mpi4py import MPI

from dolfinx_pinn.exceptions import TrainingInterrupted
from dolfinx_pinn.options import SECTIONS, OptionError, type_name

__all__ = [
    "SCHEMA",
    "ConfigError",
    "build_parser",
    "config_names",
    "load_config",
    "main",
    "run",
    "validate",
]


class ConfigError(ValueError):
    """A configuration error, naming the offending key."""


@dataclass(frozen=True)
class Key:
    """One configuration key: its type(s), default, check and documentation."""

    types: tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], bool] | None = None
    allowed: str = ""


def _schema() -> dict[str, dict[str, Key]]:
    schema = {}
    for section, cls in SECTIONS.items():
        types = cls.field_types()
        schema[section] = {
            name: Key(
                types[name],
                item.default,
                item.metadata["doc"],
                item.metadata["check"],
                item.metadata["allowed"],
            )
            for name, item in cls.keys().items()
        }
    return schema


#: section -> key -> :class:`Key`, generated from :mod:`dolfinx_pinn.options`.
SCHEMA: dict[str, dict[str, Key]] = _schema()

_DIM = {"paper_1d": 1, "paper_2d": 2, "laminate_2d": 2}


def defaults() -> dict[str, dict[str, Any]]:
    """The default configuration."""
    return {section: cls.defaults() for section, cls in SECTIONS.items()}


def validate(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge ``config`` into the defaults and check every key, type and range.

    Raises:
        ConfigError: naming the first bad section/key (``section.key``).
    """
    merged = defaults()
    if not isinstance(config, dict):
        raise ConfigError("the configuration must be a TOML table")
    for section, values in config.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section [{section}]; allowed: {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        keys = SECTIONS[section].keys()
        for name, value in values.items():
            if name not in keys:
                raise ConfigError(
                    f"unknown key {section}.{name}; allowed in [{section}]: "
                    f"{', '.join(sorted(keys))}"
                )
            merged[section][name] = value
    try:
        merged = {
            section: SECTIONS[section](**values).as_dict() for section, values in merged.items()
        }
    except OptionError as error:
        raise ConfigError(str(error)) from None
    optimizer, coarse, network = merged["optimizer"], merged["coarse"], merged["network"]
    if optimizer["name"] == "projection" and optimizer["form"] == "gram":
        raise ConfigError("optimizer.form must be 'auto', 'normal' or 'qr' for 'projection'")
    if coarse["full_tensor"]:
        if network["kind"] != "mlp" or network["boundary"] != "soft" or optimizer["name"] != "adam":
            raise ConfigError(
                "coarse.full_tensor = true needs network.kind = 'mlp', network.boundary = "
                f"'soft' and optimizer.name = 'adam', got {network['kind']!r}, "
                f"{network['boundary']!r}, {optimizer['name']!r}"
            )
    if optimizer["name"] == "projection" and not coarse["lazy"]:
        raise ConfigError("coarse.lazy must be true for optimizer.name = 'projection'")
    if merged["run"]["reference"] == "exact" and _DIM[merged["problem"]["name"]] != 1:
        raise ConfigError(
            f"run.reference = 'exact' needs a 1D problem, but problem.name = "
            f"{merged['problem']['name']!r} is 2D; use 'fine' (a fine FE solve) or 'none'"
        )
    if merged["run"]["target_l2"] is not None and merged["run"]["reference"] == "none":
        raise ConfigError("run.target_l2 needs a reference; set run.reference to 'auto'")
    return merged


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def config_names() -> list[str]:
    """The names of the configurations shipped with the package."""
    folder = resources.files("dolfinx_pinn") / "configs"
    return sorted(item.name[:-5] for item in folder.iterdir() if item.name.endswith(".toml"))


def _config_text(path: str | Path) -> tuple[str, str]:
    """The text of a configuration file, or of a shipped one by name; and its label."""
    candidate = Path(path)
    if not candidate.exists() and str(path) in config_names():
        shipped = resources.files("dolfinx_pinn") / "configs" / f"{path}.toml"
        return shipped.read_text(encoding="utf-8"), f"{path} (shipped)"
    if candidate.is_dir():
        raise ConfigError(f"config: {path} is a directory, not a TOML file")
    try:
        return candidate.read_bytes().decode("utf-8"), str(path)
    except FileNotFoundError:
        names = ", ".join(config_names())
        raise ConfigError(f"config: no file {path} (shipped configurations: {names})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config: {path} is not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise ConfigError(f"config: cannot read {path} ({error.strerror})") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML file, a shipped configuration by name, or the defaults for ``None``.

    Raises:
        ConfigError: for a missing/unreadable file, a malformed override or a bad key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        text, label = _config_text(path)
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config: {label} is not valid TOML: {error}") from None
    raw = copy.deepcopy(raw)
    for item in overrides:
        target, sep, text = item.partition("=")
        section, dot, name = target.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table")
        raw[section][name] = _parse_value(text.strip())
    return validate(raw)


def _help_epilog() -> str:
    lines = ["configuration keys (TOML sections; all optional):"]
    for section, keys in SCHEMA.items():
        lines.append(f"  [{section}]")
        for name, key in keys.items():
            allowed = f"; {key.allowed}" if key.allowed else ""
            lines.append(
                f"    {name} ({type_name(key.types)}, default {key.default!r}{allowed}): {key.doc}"
            )
    lines.append(
        "exit codes: 0 success, 1 the run failed (diverged, NaN), 2 bad input, "
        "130/143 interrupted by SIGINT/SIGTERM"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``run``, ``keys``, ``configs`` and ``bench`` sub-commands)."""
    from dolfinx_pinn import __version__

    parser = argparse.ArgumentParser(
        prog="dolfinx-pinn",
        description="Hybrid PINN / DOLFINx multiscale solver (Hintermüller & Korolev, Alg. 3.1).",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dolfinx-pinn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="train the hybrid solver from a TOML configuration and write the run folder",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_parser.add_argument("config", help="a TOML file, or the name of a shipped configuration")
    run_parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (value parsed as TOML); repeatable",
    )
    commands.add_parser("keys", help="print every configuration key with its default")
    commands.add_parser("configs", help="list the configurations shipped with the package")
    # ``bench`` hands all its arguments to benchmarks/run.py (see main); listed here for --help.
    commands.add_parser(
        "bench", help="run the repository's benchmarks (benchmarks/run.py; bench --help)"
    )
    return parser


def _run_benchmarks(arguments: Sequence[str]) -> int:
    """``dolfinx-pinn bench ...``: ``benchmarks/run.py`` of the source checkout."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not script.is_file():
        _error(
            f"bench needs a source checkout ({script} not found); clone the repository and "
            "install it with `make install`"
        )
        return 2
    saved = sys.argv
    sys.argv = [str(script), *arguments]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    finally:
        sys.argv = saved
    return 0


def _make_problem(config: dict[str, Any]) -> Any:
    from dolfinx_pinn import laminate_2d, paper_1d, paper_2d

    factory = {"paper_1d": paper_1d, "paper_2d": paper_2d, "laminate_2d": laminate_2d}
    return factory[config["problem"]["name"]](config["problem"]["eps"])


def _make_network(config: dict[str, Any], problem: Any) -> Any:
    from dolfinx_pinn.networks import (
        MLP,
        HardBoundaryNet,
        MultiscaleFourierNet,
        TransfiniteBoundaryNet,
        TwoScaleNet,
    )

    options = config["network"]
    sizes = {key: options[key] for key in ("width", "depth") if options[key] is not None}
    seed = options["seed"]
    if options["kind"] == "two_scale":
        network = TwoScaleNet.for_problem(
            problem,
            k_max=options["k_max"],
            wavevector_norm=options["wavevector_norm"],
            seed=seed,
            **sizes,
        )
    elif options["kind"] == "ms_pinn":
        network = MultiscaleFourierNet.for_problem(problem, seed=seed, **sizes)
    else:
        sizes = {"width": 64, "depth": 8, **sizes}
        outputs = problem.dim if config["coarse"]["full_tensor"] else 1
        network = MLP(problem.dim, sizes["width"], sizes["depth"], seed=seed, out_features=outputs)
    if options["boundary"] == "transfinite":
        return TransfiniteBoundaryNet(network, problem)
    if options["boundary"] == "hard":
        return HardBoundaryNet(network, problem)
    return network


def _make_reference(config: dict[str, Any], problem: Any, comm: MPI.Comm) -> Any:
    kind = config["run"]["reference"]
    if kind == "auto":
        kind = "exact" if problem.dim == 1 else "fine"
    if kind == "none":
        return None
    from dolfinx_pinn.reference import exact_1d, solve_fine

    if kind == "exact":
        return exact_1d(problem)
    return solve_fine(
        problem,
        comm=comm,
        degree=config["run"]["fine_degree"],
        elements_per_period=config["run"]["fine_elements_per_period"],
    )


def _collective_check(comm: MPI.Comm, check: Callable[[], str | None]) -> None:
    """Run ``check`` on rank 0 and raise its message (a ConfigError) on every rank."""
    message = check() if comm.rank == 0 else None
    message = comm.bcast(message, root=0)
    if message:
        raise ConfigError(message)


def preflight(config: dict[str, Any], comm: MPI.Comm) -> None:
    """The checks that need the machine, before any heavy work (collective).

    The device exists, the output folder is writable and a resume has a checkpoint to resume.

    Raises:
        ConfigError: naming the key.
    """
    from dolfinx_pinn.devices import select_device

    try:
        select_device(config["run"]["device"], comm)
    except ValueError as error:
        raise ConfigError(f"run.{error}") from None
    output = Path(config["run"]["output"])

    def writable() -> str | None:
        try:
            output.mkdir(parents=True, exist_ok=True)
            probe = output / ".dolfinx_pinn_write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            return f"run.output: cannot write to {output} ({error.strerror or error})"
        return None

    _collective_check(comm, writable)
    if config["run"]["resume"]:
        folder = output / "checkpoint"
        ranks = sorted(folder.glob("checkpoint.rank*.pt")) if folder.is_dir() else []
        if not ranks:
            raise ConfigError(
                f"run.resume: there is no checkpoint in {folder} to resume (run once with "
                "run.checkpoint_every set)"
            )


def training_options(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``HybridSolver.train`` in a configuration."""
    return {
        name: config[section][name]
        for section, cls in SECTIONS.items()
        for name in cls.training_keys()
    }


def run(config: dict[str, Any], comm: MPI.Comm | None = None) -> dict[str, Any]:
    """Train the hybrid solver for a validated configuration; write the run folder (collective).

    Returns:
        The metrics written to ``metrics.json``.
    """
    import torch

    from dolfinx_pinn.io import write_outputs
    from dolfinx_pinn.solver import HybridSolver

    comm = MPI.COMM_WORLD if comm is None else comm
    started = time.perf_counter()
    preflight(config, comm)
    problem = _make_problem(config)
    network = _make_network(config, problem)
    reference = _make_reference(config, problem, comm)
    coarse, points, loss, settings = (
        config["coarse"],
        config["points"],
        config["loss"],
        config["run"],
    )
    output = Path(settings["output"])
    if config["network"]["kind"] == "auto":
        return _run_automatic(config, problem, reference, comm, started)
    solver = HybridSolver(
        problem,
        network,
        comm=comm,
        coarse_h=coarse["h"],
        n_interior=points["n_interior"],
        n_boundary=points["n_boundary"],
        tau1=loss["tau1"],
        tau2=loss["tau2"],
        delta=coarse["delta"],
        compress_state=coarse["compress_state"],
        estimator=coarse["estimator"],
        lazy=coarse["lazy"],
        full_tensor=coarse["full_tensor"],
        device=settings["device"],
        seed=settings["seed"],
        sampling=points["sampling"],
        reference=reference,
    )
    try:
        torch.manual_seed(settings["seed"])
        optimizer = config["optimizer"]
        solver.train(
            optimizer["name"],
            optimizer["steps"],
            checkpoint_dir=output / "checkpoint",
            **training_options(config),
        )
        metrics = write_outputs(
            solver,
            output,
            extra_metrics={"config": config, "total_time_s": time.perf_counter() - started},
            figures=settings["figures"],
        )
    finally:
        solver.destroy()
    return metrics


def _run_automatic(
    config: dict[str, Any], problem: Any, reference: Any, comm: MPI.Comm, started: float
) -> dict[str, Any]:
    """``network.kind = "auto"``: :func:`dolfinx_pinn.solve` with the keys the config sets."""
    from dolfinx_pinn.auto import solve

    coarse, settings = config["coarse"], config["run"]
    overrides = {
        name: value
        for name, value in (("coarse_h", coarse["h"]), ("delta", coarse["delta"]))
        if value is not None
    }
    solution = solve(
        problem,
        comm=comm,
        device=settings["device"],
        reference=reference,
        seed=settings["seed"],
        time_limit=config["optimizer"]["time_limit"],
        **overrides,
    )
    from dolfinx_pinn.io import write_outputs

    extra = {**solution.metrics, "config": config, "total_time_s": time.perf_counter() - started}
    return write_outputs(
        solution, settings["output"], extra_metrics=extra, figures=settings["figures"]
    )


def _error(message: str) -> None:
    if MPI.COMM_WORLD.rank == 0:
        print(f"dolfinx-pinn: error: {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise TrainingInterrupted(f"interrupted by {signal.Signals(signum).name}", signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dolfinx-pinn`` and ``python -m dolfinx_pinn``; returns the exit code."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _run_benchmarks(arguments[1:])
    args = parser.parse_args(arguments)
    comm = MPI.COMM_WORLD
    if args.command in ("keys", "configs"):
        # A closed pipe (``dolfinx-pinn keys | head -1``) ends the process quietly, not PETSc.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        if comm.rank == 0:
            print(_help_epilog() if args.command == "keys" else "\n".join(config_names()))
        return 0
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = load_config(args.config, args.overrides)
        metrics = run(config, comm)
    except ConfigError as error:
        _error(str(error))
        return 2
    except TrainingInterrupted as interrupt:
        if comm.rank == 0:
            print(f"dolfinx-pinn: {interrupt}", file=sys.stderr, flush=True)
        return 128 + interrupt.signum
    except (ValueError, NotImplementedError) as error:
        _error(str(error))
        return 2
    except (RuntimeError, FloatingPointError, MemoryError) as error:
        _error(str(error))
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if comm.rank == 0:
        summary = {k: metrics[k] for k in ("rel_l2", "rel_h1", "K_tilde", "iterations")}
        print(f"dolfinx-pinn: wrote {config['run']['output']}: {summary}", flush=True)
    return 0
