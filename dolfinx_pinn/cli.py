"""The ``dolfinx-pinn`` console script: ``dolfinx-pinn run CONFIG.toml [--set key=value ...]``.

A run configuration is a TOML file with the sections and keys of :data:`SCHEMA` (every key is
optional; ``dolfinx-pinn --help`` lists them with their defaults). ``--set section.key=value``
overrides one key (the value is parsed as TOML, e.g. ``--set optimizer.lr=1e-3``,
``--set problem.name='"paper_2d"'`` or simply ``--set problem.name=paper_2d``). The whole
configuration is validated, and an unknown key, a wrong type or a value out of range reported by
name, before any mesh, network or reference is built.

Example:
    .. code-block:: sh

        dolfinx-pinn run demos/configs/paper_1d_two_scale.toml --set run.output=out_1d
        mpirun -n 2 dolfinx-pinn run demos/configs/heat_2d.toml

MPI: run the script under ``mpirun``; everything is collective on ``MPI.COMM_WORLD``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpi4py import MPI

__all__ = ["SCHEMA", "ConfigError", "build_parser", "load_config", "main", "run", "validate"]


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


def _positive(value: Any) -> bool:
    return math.isfinite(value) and value > 0


def _non_negative(value: Any) -> bool:
    return math.isfinite(value) and value >= 0


def _choice(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in options), "one of " + ", ".join(repr(o) for o in options)


_FLOAT = (float, int)
_OPTIONAL_FLOAT = (float, int, type(None))
_OPTIONAL_INT = (int, type(None))
_PROBLEMS = _choice("paper_1d", "paper_2d", "laminate_2d")
_NETWORKS = _choice("two_scale", "ms_pinn", "mlp")
_BOUNDARY = _choice("transfinite", "hard", "soft")
_OPTIMIZERS = _choice("adam", "gauss_newton", "projection")
_WAVEVECTOR_NORMS = _choice("max", "l1")
_SAMPLINGS = _choice("stratified", "sobol")
_SCHEDULES = _choice("constant", "continuation")
_REFERENCES = _choice("auto", "exact", "fine", "none")
_ESTIMATORS = _choice("mean", "linear")
_FORMS = _choice("auto", "normal", "gram", "qr")

#: section -> key -> :class:`Key`.
SCHEMA: dict[str, dict[str, Key]] = {
    "problem": {
        "name": Key((str,), "paper_1d", "the problem factory", *_PROBLEMS),
        "eps": Key(_FLOAT, 0.01, "the fine scale ε", _positive, "> 0"),
    },
    "network": {
        "kind": Key((str,), "two_scale", "TwoScaleNet, MultiscaleFourierNet or MLP", *_NETWORKS),
        "width": Key(
            _OPTIONAL_INT,
            None,
            "neurons per hidden layer (default per kind)",
            lambda v: v is None or v >= 1,
            ">= 1",
        ),
        "depth": Key(
            _OPTIONAL_INT,
            None,
            "hidden layers (default per kind)",
            lambda v: v is None or v >= 1,
            ">= 1",
        ),
        "k_max": Key((int,), 14, "largest harmonic of TwoScaleNet", lambda v: v >= 0, ">= 0"),
        "wavevector_norm": Key(
            (str,), "max", "TwoScaleNet: norm of k_max ('l1': axis harmonics)", *_WAVEVECTOR_NORMS
        ),
        "boundary": Key((str,), "transfinite", "how the boundary condition is met", *_BOUNDARY),
        "seed": Key(
            (int,), 0, "initialisation seed (the same on every rank)", lambda v: v >= 0, ">= 0"
        ),
    },
    "coarse": {
        "h": Key(
            _OPTIONAL_FLOAT,
            None,
            "coarse mesh size (default 0.004 in 1D, 0.04 in 2D)",
            lambda v: v is None or _positive(v),
            "> 0",
        ),
        "delta": Key(
            _OPTIONAL_FLOAT,
            None,
            "compression diameter δ (default ε)",
            lambda v: v is None or _positive(v),
            "> 0",
        ),
        "compress_state": Key((bool,), False, "coupling (2.16) instead of (2.10)"),
        "full_tensor": Key(
            (bool,),
            False,
            "Algorithm 4.1: a d-output MLP gives the whole K̃ (mlp, soft boundary, adam)",
        ),
        "estimator": Key((str,), "mean", "compression estimator", *_ESTIMATORS),
        "lazy": Key((bool,), True, "lazy coarse update (linearised state between refreshes)"),
        "lazy_every": Key(
            _OPTIONAL_INT,
            None,
            "T_K: steps between refresh checks (100 Adam, 1 GN)",
            lambda v: v is None or v >= 1,
            ">= 1",
        ),
        "lazy_tol": Key(_FLOAT, 1e-2, "refresh when |K̃ - K̃₀| exceeds this", _non_negative, ">= 0"),
    },
    "points": {
        "n_interior": Key(
            (int,), 2000, "interior collocation points M_Ω", lambda v: v >= 1, ">= 1"
        ),
        "n_boundary": Key(
            _OPTIONAL_INT,
            None,
            "boundary points (soft BC, d > 1)",
            lambda v: v is None or v >= 1,
            ">= 1",
        ),
        "sampling": Key(
            (str,), "stratified", "interior points: random per coarse cell, or Sobol'", *_SAMPLINGS
        ),
    },
    "loss": {
        "tau1": Key(_FLOAT, 1.0, "boundary penalty τ1", _positive, "> 0"),
        "tau2": Key(_FLOAT, 1.0, "coupling weight τ2 (initial value)", _non_negative, ">= 0"),
        "tau2_schedule": Key((str,), "constant", "τ2 schedule", *_SCHEDULES),
        "tau2_decay": Key(_FLOAT, 0.1, "continuation factor", lambda v: 0 < v < 1, "in (0, 1)"),
        "tau2_decay_steps": Key(
            _OPTIONAL_INT,
            None,
            "steps per factor (1 GN, 500 Adam)",
            lambda v: v is None or v >= 1,
            ">= 1",
        ),
        "tau2_min": Key(_FLOAT, 1e-8, "τ2 below this becomes 0", _non_negative, ">= 0"),
    },
    "optimizer": {
        "name": Key((str,), "adam", "the optimizer", *_OPTIMIZERS),
        "steps": Key((int,), 1000, "iterations", lambda v: v >= 0, ">= 0"),
        "lr": Key(_FLOAT, 5e-4, "Adam: initial learning rate", _positive, "> 0"),
        "decay_rate": Key(
            _FLOAT, 0.75, "Adam: lr factor per decay_steps", lambda v: 0 < v <= 1, "in (0, 1]"
        ),
        "decay_steps": Key((int,), 1000, "Adam: steps per lr decay", lambda v: v >= 1, ">= 1"),
        "balancing": Key((bool,), True, "Adam: gradient-norm loss balancing"),
        "balance_every": Key(
            (int,), 100, "Adam: steps per balancing update", lambda v: v >= 1, ">= 1"
        ),
        "damping": Key(_FLOAT, 1e-3, "Gauss-Newton: initial damping", _positive, "> 0"),
        "form": Key(
            (str,),
            "auto",
            "Gauss-Newton/projection: linear algebra form (auto: QR, rows gathered under MPI; "
            "normal: normal equations summed over ranks)",
            *_FORMS,
        ),
        "variable_projection": Key((bool,), True, "Gauss-Newton: re-solve the output layer"),
        "time_limit": Key(
            _OPTIONAL_FLOAT,
            None,
            "stop after this many seconds",
            lambda v: v is None or _positive(v),
            "> 0",
        ),
    },
    "run": {
        "output": Key((str,), "out_dolfinx_pinn", "the run folder"),
        "device": Key(
            (str,),
            "cpu",
            "'cpu', 'cuda' (GPU rank mod n) or 'auto'",
            lambda v: v in ("cpu", "cuda", "auto") or v.startswith("cuda:"),
            "'cpu', 'cuda', 'cuda:k' or 'auto'",
        ),
        "seed": Key((int,), 0, "seed of the collocation points", lambda v: v >= 0, ">= 0"),
        "reference": Key(
            (str,),
            "auto",
            "exact (1D), fine FEM solve, none; auto: exact in 1D, fine otherwise",
            *_REFERENCES,
        ),
        "fine_elements_per_period": Key(
            (int,), 24, "cells per ε of the fine reference", lambda v: v >= 2, ">= 2"
        ),
        "fine_degree": Key(
            (int,), 1, "Lagrange degree of the fine reference", lambda v: 1 <= v <= 4, "in [1, 4]"
        ),
        "eval_every": Key((int,), 100, "steps between error evaluations", lambda v: v >= 1, ">= 1"),
        "checkpoint_every": Key(
            _OPTIONAL_INT, None, "steps between checkpoints", lambda v: v is None or v >= 1, ">= 1"
        ),
        "resume": Key((bool,), False, "continue from the run folder's checkpoint"),
        "progress": Key((bool,), True, "tqdm progress bar on rank 0"),
        "figures": Key((bool,), True, "write PNG figures"),
    },
}


def defaults() -> dict[str, dict[str, Any]]:
    """The default configuration."""
    return {
        section: {k: key.default for k, key in keys.items()} for section, keys in SCHEMA.items()
    }


def _type_name(types: tuple[type, ...]) -> str:
    names = {float: "number", int: "integer", str: "string", bool: "boolean", type(None): "none"}
    if float in types:
        types = tuple(t for t in types if t is not int)
    return " or ".join(dict.fromkeys(names[t] for t in types))


def validate(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge ``config`` into the defaults and check every key, type and range.

    Raises:
        ConfigError: naming the first bad section/key (``section.key``).
    """
    merged = defaults()
    if not isinstance(config, dict):
        raise ConfigError("the configuration must be a TOML table")
    for section, values in config.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown section [{section}]; allowed: {', '.join(sorted(SCHEMA))}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        for name, value in values.items():
            keys = SCHEMA[section]
            if name not in keys:
                raise ConfigError(
                    f"unknown key {section}.{name}; allowed in [{section}]: "
                    f"{', '.join(sorted(keys))}"
                )
            key = keys[name]
            ok_type = isinstance(value, key.types) and not (
                isinstance(value, bool) and bool not in key.types
            )
            if not ok_type:
                raise ConfigError(
                    f"{section}.{name} must be of type {_type_name(key.types)}, got "
                    f"{type(value).__name__} {value!r}"
                )
            if key.check is not None and not key.check(value):
                raise ConfigError(f"{section}.{name} must be {key.allowed}, got {value!r}")
            merged[section][name] = value
    if merged["optimizer"]["name"] == "projection" and merged["optimizer"]["form"] == "gram":
        raise ConfigError("optimizer.form must be 'auto', 'normal' or 'qr' for 'projection'")
    if merged["coarse"]["full_tensor"]:
        network, optimizer = merged["network"], merged["optimizer"]["name"]
        if network["kind"] != "mlp" or network["boundary"] != "soft" or optimizer != "adam":
            raise ConfigError(
                "coarse.full_tensor = true needs network.kind = 'mlp', network.boundary = "
                f"'soft' and optimizer.name = 'adam', got {network['kind']!r}, "
                f"{network['boundary']!r}, {optimizer!r}"
            )
    if merged["optimizer"]["name"] == "projection" and not merged["coarse"]["lazy"]:
        raise ConfigError("coarse.lazy must be true for optimizer.name = 'projection'")
    return merged


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML file (or the defaults for ``None``), apply ``section.key=value`` overrides.

    Raises:
        ConfigError: for a missing/unreadable file, a malformed override or a bad key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as error:
            raise ConfigError(f"config: no file {path}") from error
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config: {path} is not valid TOML: {error}") from error
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
                f"    {name} ({_type_name(key.types)}, default {key.default!r}{allowed}): {key.doc}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``run`` and ``keys`` sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="dolfinx-pinn",
        description="Hybrid PINN / DOLFINx multiscale solver (Hintermüller & Korolev, Alg. 3.1).",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="train the hybrid solver from a TOML configuration and write the run folder",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_parser.add_argument("config", help="the TOML configuration file")
    run_parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (value parsed as TOML); repeatable",
    )
    commands.add_parser("keys", help="print every configuration key with its default")
    # ``bench`` hands all its arguments to benchmarks/run.py (see main); listed here for --help.
    commands.add_parser(
        "bench", help="run the repository's benchmarks (benchmarks/run.py; bench --help)"
    )
    return parser


def _run_benchmarks(arguments: Sequence[str]) -> int:
    """``dolfinx-pinn bench ...``: ``benchmarks/run.py`` of the source checkout."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not script.is_file():
        print(
            f"dolfinx-pinn: error: bench needs a source checkout ({script} not found); "
            "clone the repository and install it with `make install`",
            file=sys.stderr,
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
        if problem.dim != 1:
            raise ConfigError("run.reference = 'exact' needs a 1D problem; use 'fine'")
        return exact_1d(problem)
    return solve_fine(
        problem,
        comm=comm,
        degree=config["run"]["fine_degree"],
        elements_per_period=config["run"]["fine_elements_per_period"],
    )


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
    problem = _make_problem(config)
    network = _make_network(config, problem)
    reference = _make_reference(config, problem, comm)
    coarse, points, loss = config["coarse"], config["points"], config["loss"]
    optimizer, settings = config["optimizer"], config["run"]
    output = Path(settings["output"])
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
        options: dict[str, Any] = {
            "tau2_schedule": loss["tau2_schedule"],
            "tau2_decay": loss["tau2_decay"],
            "tau2_decay_steps": loss["tau2_decay_steps"],
            "tau2_min": loss["tau2_min"],
            "lazy_every": coarse["lazy_every"],
            "lazy_tol": coarse["lazy_tol"],
            "eval_every": settings["eval_every"],
            "checkpoint_every": settings["checkpoint_every"],
            "checkpoint_dir": output / "checkpoint",
            "resume": settings["resume"],
            "progress": settings["progress"],
            "time_limit": optimizer["time_limit"],
        }
        if optimizer["name"] == "adam":
            options.update(
                lr=optimizer["lr"],
                decay_rate=optimizer["decay_rate"],
                decay_steps=optimizer["decay_steps"],
                balancing=optimizer["balancing"],
                balance_every=optimizer["balance_every"],
            )
        elif optimizer["name"] == "projection":
            options.update(form=optimizer["form"])
        else:
            variable_projection = optimizer["variable_projection"] and coarse["lazy"]
            options.update(
                damping=optimizer["damping"],
                form=optimizer["form"],
                variable_projection=variable_projection,
            )
        torch.manual_seed(settings["seed"])
        solver.train(optimizer["name"], optimizer["steps"], **options)
        metrics = write_outputs(
            solver,
            output,
            extra_metrics={"config": config, "total_time_s": time.perf_counter() - started},
            figures=settings["figures"],
        )
    finally:
        solver.destroy()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dolfinx-pinn`` and ``python -m dolfinx_pinn``; returns the exit code."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _run_benchmarks(arguments[1:])
    args = parser.parse_args(arguments)
    comm = MPI.COMM_WORLD
    if args.command == "keys":
        if comm.rank == 0:
            print(_help_epilog())
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        if comm.rank == 0:
            print(f"dolfinx-pinn: error: {error}", file=sys.stderr)
        return 2
    metrics = run(config, comm)
    if comm.rank == 0:
        summary = {k: metrics[k] for k in ("rel_l2", "rel_h1", "K_tilde", "iterations")}
        print(f"dolfinx-pinn: wrote {config['run']['output']}: {summary}")
    return 0
