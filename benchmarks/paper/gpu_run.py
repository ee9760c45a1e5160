"""The paper's networks on a GPU without DOLFINx: checks, Adam step timings and the 1D runs.

    python benchmarks/paper/gpu_run.py [--device cuda] [--budget 420] [--out DIR]
    python benchmarks/paper/gpu_run.py --device cpu --tiny --out /tmp/gpu_tiny   # CPU smoke test
    bash benchmarks/paper/gpu_run.sh                                             # on the GPU

DOLFINx is not installed on the GPU machine (PyTorch, NumPy and mpi4py are), so this script
imports nothing of DOLFINx and nothing of the ``dolfinx_pinn`` package at start (the package's
``__init__`` imports DOLFINx). The network side is written here against torch alone: minimal
copies of the package's networks (:class:`MsPINN` = ``MultiscaleFourierNet``, :class:`MLP`,
:class:`HardBoundary` = ``HardBoundaryNet``, with the same parameter names so that the package's
``state_dict`` loads), their forward jets (value, gradient, Laplacian), the residual
``-(K Δv + ∇K·∇v) - f`` and the paper's Adam with the step decay, loss balancing and the lazy
coarse update. The coarse side of the 1D hybrid comes from ``benchmarks/paper/data/*.npz``
(written on the CPU by ``precompute_gpu_data.py``): in 1D the coarse state is exactly
``y_h(K̃) = y_1 / K̃``, so the lazy update needs no PETSc solve; the compression Q̄ is a fixed
matrix. The data files also hold a 6-step history of the package's own solvers, which stage
(a) replays as the consistency check of this code against the package.

Stages, each checked against ``--budget`` (seconds, wall time of the whole script) as it goes:

(a) **tests**: the package's CUDA tests (``pytest -k "cuda or device"`` on the test files that
    use CUDA) when DOLFINx can be found (``importlib.util.find_spec``, no import), else a note;
    then this script's own checks on the device: jet against nested autograd, the device
    against the CPU, the package's ``networks`` module loaded without the package's
    ``__init__`` (``ufl`` stubbed when missing) against the copies here, the replay of the
    package's history, the graph-captured step against the eager step and the capturable Adam
    against ``torch.optim.Adam``.
(b) **timing** of one Adam step (loss with the jet, backward, Adam update) of the paper's networks
    at the paper's point counts: Ms-PINN 2×128 in 1D with M = 2000 and 5000 points (plain, and
    the hybrid at 5000), Ms-PINN 2×128 and MLP 8×64 in 2D with 25 000 interior and 2 500
    boundary points; float64 and float32; eager, ``torch.compile`` (of the loss; as the budget
    allows) and a CUDA graph of the whole step (``torch.cuda.CUDAGraph``, CUDA only). Matmul
    FLOPs are counted as 3× the forward jet's (forward + backward), see :func:`matmul_flops`.
(c) **runs**: the four 1D paper experiments (ε = 1/15, 0.01; Ms-PINN and hybrid) from the
    package's initial network, float64 (and float32 copies with ``--runs-f32``), all at once
    (one CUDA graph per run, each on its own stream, so that the small kernels overlap), for
    2·10^5 steps or as many as the budget leaves (a multiple of 100), errors every 100 steps.

Output: ``<out>/gpu_run.json`` (rewritten after each stage: environment with the GPU's name,
stage results, the error curves of the runs, the budget log), ``gpu_run_networks.pt`` (the
final networks of the runs, ``state_dict`` per run, loadable into ``HardBoundaryNet``) and the
pytest log.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = HERE / "data"
PAPER_STEPS = 200_000
LR0, DECAY_RATE, DECAY_STEPS = 5e-4, 0.75, 1000
BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
PAPER_EVERY = 100  # balancing, lazy check and error evaluation
LAZY_TOL = 1e-2
RUNS_1D = (("1_15", "ms_pinn"), ("1_15", "hybrid"), ("0.01", "ms_pinn"), ("0.01", "hybrid"))
CUDA_TEST_FILES = ("tests/test_coupling.py", "tests/test_pinn.py", "tests/test_solver.py")

Jet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# -- time budget ------------------------------------------------------------------------------
class Budget:
    """The script's wall-time budget, checked as it goes.

    Args:
        seconds: The whole budget (from the start of the script).
    """

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = float(seconds)
        self.log: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left."""
        return self.seconds - self.elapsed()

    def note(self, what: str) -> None:
        """Record an event with the time it happened."""
        entry = {"t": round(self.elapsed(), 2), "what": what}
        self.log.append(entry)
        print(f"[{entry['t']:7.1f} s] {what}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- networks (copies of dolfinx_pinn.networks, same parameter names) ---------------------------
def _linear_jet(layer: nn.Linear, jet: Jet) -> Jet:
    value, grad, lap = jet
    weight = layer.weight.t()
    return layer(value), grad @ weight, lap @ weight


def _tanh_jet(jet: Jet) -> Jet:
    value, grad, lap = jet
    a = torch.tanh(value)
    s = 1.0 - a * a
    return a, s.unsqueeze(1) * grad, s * lap - 2.0 * a * s * (grad * grad).sum(dim=1)


def _glorot(fan_in: int, fan_out: int, generator: torch.Generator, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, dtype=dtype)
    with torch.no_grad():
        weight = torch.empty(fan_out, fan_in, dtype=dtype)
        nn.init.xavier_normal_(weight, generator=generator)
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


class MsPINN(nn.Module):
    """The multiscale Fourier feature network (``MultiscaleFourierNet``): shared tanh layers.

    Args:
        dim: Input dimension.
        scales: The standard deviations ϱ_k of the Gaussian frequencies (the paper: 1, 1/ε).
        width: Neurons per hidden layer (128).
        depth: Hidden layers (2).
        seed: Seed of the frequencies and the Glorot initialisation.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        dim: int,
        scales: tuple[float, ...],
        width: int = 128,
        depth: int = 2,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.dim = dim
        features = width // 2
        generator = torch.Generator().manual_seed(seed)
        frequencies = torch.stack(
            [s * torch.randn(features, dim, generator=generator, dtype=dtype) for s in scales]
        )
        self.register_buffer("frequencies", frequencies)
        sizes = [2 * features] + [width] * depth
        self.hidden = nn.ModuleList(
            _glorot(a, b, generator, dtype) for a, b in itertools.pairwise(sizes)
        )
        self.output = _glorot(len(scales) * width, 1, generator, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)``."""
        states = []
        for k in range(self.frequencies.shape[0]):
            phase = 2.0 * math.pi * x @ self.frequencies[k].t()
            h = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)
            for layer in self.hidden:
                h = torch.tanh(layer(h))
            states.append(h)
        return self.output(torch.cat(states, dim=1))[:, 0]

    def jet(self, x: torch.Tensor) -> Jet:
        """``(v (N,), ∇v (N, d), Δv (N,))`` by forward propagation of the derivatives."""
        values, grads, laps = [], [], []
        for k in range(self.frequencies.shape[0]):
            omega = 2.0 * math.pi * self.frequencies[k].t()  # (d, m)
            phase = x @ omega
            c, s = torch.cos(phase), torch.sin(phase)
            squared = (omega * omega).sum(dim=0)
            jet: Jet = (
                torch.cat([c, s], dim=1),
                torch.cat([-s.unsqueeze(1) * omega, c.unsqueeze(1) * omega], dim=2),
                torch.cat([-c * squared, -s * squared], dim=1),
            )
            for layer in self.hidden:
                jet = _tanh_jet(_linear_jet(layer, jet))
            values.append(jet[0])
            grads.append(jet[1])
            laps.append(jet[2])
        value, grad, lap = _linear_jet(
            self.output,
            (torch.cat(values, dim=1), torch.cat(grads, dim=2), torch.cat(laps, dim=1)),
        )
        return value[:, 0], grad[:, :, 0], lap[:, 0]

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """``(repeats, fan_in, fan_out)`` of the matmuls of one forward pass per point."""
        scales = self.frequencies.shape[0]
        shapes = [(scales, layer.in_features, layer.out_features) for layer in self.hidden]
        return [*shapes, (1, self.output.in_features, 1)]


class MLP(nn.Module):
    """The plain tanh MLP (``MLP``): 8 hidden layers of 64 in the paper's 2D baseline.

    Args:
        dim: Input dimension.
        width: Neurons per hidden layer.
        depth: Hidden layers.
        seed: Seed of the Glorot initialisation.
        dtype: Parameter dtype.
    """

    def __init__(
        self, dim: int, width: int = 64, depth: int = 8, seed: int = 0, dtype=torch.float64
    ) -> None:
        super().__init__()
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        sizes = [dim] + [width] * depth
        self.hidden = nn.ModuleList(
            _glorot(a, b, generator, dtype) for a, b in itertools.pairwise(sizes)
        )
        self.output = _glorot(width, 1, generator, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)``."""
        h = x
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.output(h)[:, 0]

    def jet(self, x: torch.Tensor) -> Jet:
        """``(v, ∇v, Δv)``."""
        n, d = x.shape
        eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(n, d, d)
        jet: Jet = (x, eye, torch.zeros_like(x))
        for layer in self.hidden:
            jet = _tanh_jet(_linear_jet(layer, jet))
        value, grad, lap = _linear_jet(self.output, jet)
        return value[:, 0], grad[:, :, 0], lap[:, 0]

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """``(repeats, fan_in, fan_out)`` of the matmuls of one forward pass per point."""
        shapes = [(1, layer.in_features, layer.out_features) for layer in self.hidden]
        return [*shapes, (1, self.output.in_features, 1)]


class HardBoundary(nn.Module):
    """``v = l(x) N(x)``, ``l = Π_j 4 x_j (1 - x_j)`` on the unit box (``HardBoundaryNet``).

    Args:
        network: The network N.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.dim = network.dim

    @staticmethod
    def distance_jet(x: torch.Tensor) -> Jet:
        """``(l, ∇l, Δl)`` of the product of 4 x_j (1 - x_j)."""
        phi = 4.0 * x * (1.0 - x)
        dphi = 4.0 - 8.0 * x
        value = phi.prod(dim=1)
        grads, laps = [], []
        for j in range(x.shape[1]):
            others = torch.cat([phi[:, :j], phi[:, j + 1 :]], dim=1).prod(dim=1)
            grads.append(dphi[:, j] * others)
            laps.append(-8.0 * others)
        return value, torch.stack(grads, dim=1), torch.stack(laps, dim=1).sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)``."""
        return (4.0 * x * (1.0 - x)).prod(dim=1) * self.network(x)

    def jet(self, x: torch.Tensor) -> Jet:
        """``(v, ∇v, Δv)`` of the product."""
        lv, lg, ll = self.distance_jet(x)
        nv, ng, nl = self.network.jet(x)
        value = lv * nv
        grad = lg * nv.unsqueeze(1) + lv.unsqueeze(1) * ng
        lap = ll * nv + 2.0 * (lg * ng).sum(dim=1) + lv * nl
        return value, grad, lap

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """The inner network's matmul shapes."""
        return self.network.layer_shapes()


def autograd_jet(model: nn.Module, x: torch.Tensor) -> Jet:
    """``(v, ∇v, Δv)`` by nested autograd (the reference of the jet check)."""
    points = x.detach().requires_grad_(True)
    value = model(points)
    (grad,) = torch.autograd.grad(value.sum(), points, create_graph=True)
    lap = sum(
        torch.autograd.grad(grad[:, j].sum(), points, create_graph=True)[0][:, j]
        for j in range(x.shape[1])
    )
    return value, grad, lap  # type: ignore[return-value]


def matmul_flops(network: nn.Module, n_jet: int, n_value: int = 0) -> float:
    """Matmul FLOPs of one Adam step with the jet: forward, and backward at twice the forward.

    The jet carries ``d + 2`` streams (value, d gradient directions, Laplacian) through each
    linear layer, so a layer ``a → b`` costs ``2 · n · a · b · (d + 2)`` FLOPs per jet pass and
    ``2 · n · a · b`` per value-only pass (boundary or extra compression points). The backward
    pass costs two such products per forward product (input and weight gradients), except for
    the first layer, whose input (the Fourier features or the coordinates) needs no gradient:
    ``3 F - F_1``. This equals what ``torch.utils.flop_counter.FlopCounterMode`` counts for the
    package's jet step (1.976 GFLOP for the 1D Ms-PINN at 2000 points, see adam_flops.py). The
    Fourier feature product ``x Ω`` (inner dimension d), the elementwise work and the Adam
    update are not counted.

    Args:
        network: The network (with ``layer_shapes``).
        n_jet: Points with the jet (interior).
        n_value: Points with values only.
    """
    streams = network.dim + 2
    per_layer = [
        2.0 * repeats * a * b * (n_jet * streams + n_value)
        for repeats, a, b in network.layer_shapes()
    ]
    return 3.0 * sum(per_layer) - per_layer[0]


# -- problems (formulas of dolfinx_pinn.problems, for synthetic timing data) ---------------
def paper_1d_data(eps: float, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """K, ∇·K ``(N, 1)`` and f = q + K' of (4.29) at points ``(N, 1)``."""
    t = x[:, 0]
    K = 2.0 + torch.sin(2.0 * math.pi * t / eps)
    dK = (2.0 * math.pi / eps) * torch.cos(2.0 * math.pi * t / eps)
    f = -3.0 * (2.0 * t - 1.0) + dK
    return K, dK[:, None], f


def paper_2d_data(eps: float, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """K, ∇K ``(N, 2)`` and f = q + ∂_1 K of (4.11) at points ``(N, 2)``."""
    a, b = x[:, 0], x[:, 1]
    K = 3.0 + torch.sin(math.pi * a / eps) + torch.sin(2.0 * math.pi * b / eps)
    dK = torch.stack(
        [
            (math.pi / eps) * torch.cos(math.pi * a / eps),
            (2.0 * math.pi / eps) * torch.cos(2.0 * math.pi * b / eps),
        ],
        dim=1,
    )
    q = 10.0 * torch.exp(-100.0 * ((a - 0.5) ** 2 + (b - 0.5) ** 2))
    return K, dK, q + dK[:, 0]


def unit_square_boundary(count: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform random points on the boundary of the unit square."""
    side = torch.randint(0, 4, (count,), generator=generator)
    t = torch.rand(count, generator=generator, dtype=torch.float64)
    x = torch.stack([t, t], dim=1)
    x[side == 0, 1], x[side == 1, 1] = 0.0, 1.0
    x[side == 2, 0], x[side == 3, 0] = 0.0, 1.0
    return x


# -- the objective, the optimizer, the trainer ------------------------------------------------
class Experiment:
    """The terms of the paper's objective for one network (PINN, and the hybrid's coupling).

    ``pde = Σ (√w r_i)²`` with ``r = -(K Δv + ∇K·∇v) - f``; ``boundary = w_b Σ v(x_b)²``;
    ``coupling = τ2 R``, ``R = c_w Σ_nodes (Q̄v - y)²`` with the lazy state
    ``y = y_0 + S (clip(K̃) - K̃_0)`` and ``K̃ = w Σ K (∂_1 v + 1)`` (4.10).

    Args:
        network: The network (with ``jet``).
        x: Interior points ``(N, d)``.
        K: K at them ``(N,)``.
        drift: ∇·K at them ``(N, d)``.
        f: f^ε at them ``(N,)``.
        row_weight: √w of the PDE rows.
        boundary: ``(points, weight)`` of a soft boundary term, or None.
        hybrid: The coarse data (see :func:`experiment_from_data`), or None.
        tau2: The constant τ2.
    """

    def __init__(
        self,
        network: nn.Module,
        x: torch.Tensor,
        K: torch.Tensor,
        drift: torch.Tensor,
        f: torch.Tensor,
        row_weight: float,
        boundary: tuple[torch.Tensor, float] | None = None,
        hybrid: dict[str, Any] | None = None,
        tau2: float = 1.0,
    ) -> None:
        self.network, self.x, self.K, self.drift, self.f = network, x, K, drift, f
        self.row_weight = float(row_weight)
        self.boundary = boundary
        self.hybrid = hybrid
        self.tau2 = float(tau2)
        self.names = ["pde"] + (["boundary"] if boundary else []) + (["coupling"] if hybrid else [])
        self.refreshes = 0
        self.linearized = False

    @property
    def device(self) -> torch.device:
        """The device of the points."""
        return self.x.device

    def terms(self) -> dict[str, torch.Tensor]:
        """The loss terms (differentiable), plus ``K_tilde`` for the hybrid (not a loss)."""
        v, g, lap = self.network.jet(self.x)
        rows = self.row_weight * (-(self.K * lap + (self.drift * g).sum(dim=1)) - self.f)
        terms = {"pde": (rows * rows).sum()}
        if self.boundary is not None:
            xb, weight = self.boundary
            vb = self.network(xb)
            terms["boundary"] = weight * (vb * vb).sum()
        if self.hybrid is not None:
            h = self.hybrid
            K_tilde = h["point_weight"] * (self.K * (g[:, 0] + 1.0)).sum()
            clipped = K_tilde.clamp(min=h["alpha"], max=h["beta"])
            state = h["y0"] + h["S"] * (clipped - h["anchor"])
            values = torch.cat([v, self.network(h["extra"])])
            difference = h["Q"] @ values - state
            terms["coupling"] = self.tau2 * (h["coupling_weight"] * (difference * difference).sum())
            terms["K_tilde"] = K_tilde
        return terms

    def upscaled(self) -> float:
        """K̃[v] now (no graph)."""
        with torch.no_grad():
            _, g, _ = self.network.jet(self.x)
            h = self.hybrid
            assert h is not None
            return float(h["point_weight"] * (self.K * (g[:, 0] + 1.0)).sum())

    def refresh(self, K_tilde: float) -> None:
        """The lazy update's anchor at K̃: ``y_0 = y_1/K̃``, ``S = -y_1/K̃²`` (1D, exact)."""
        h = self.hybrid
        assert h is not None
        clipped = min(max(K_tilde, h["alpha"]), h["beta"])
        with torch.no_grad():
            h["y0"].copy_(h["y1"] / clipped)
            h["S"].copy_(-h["y1"] / clipped**2)
            h["anchor"].fill_(clipped)
        self.refreshes += 1
        self.linearized = True

    def lazy_check(self, step: int, every: int, tol: float) -> None:
        """The package's lazy coarse update before step ``step``."""
        if self.hybrid is None:
            return
        if not self.linearized:
            self.refresh(self.upscaled())
            return
        if step % every == 0:
            h = self.hybrid
            K = min(max(self.upscaled(), h["alpha"]), h["beta"])
            if abs(K - float(h["anchor"])) > tol:
                self.refresh(K)


class GraphAdam:
    """Adam (β = (0.9, 0.999), ε = 1e-8) with its step count and lr on the device: capturable.

    The same update as ``torch.optim.Adam`` (``p -= lr/(1-β1^t) · m / (√v/√(1-β2^t) + ε)``),
    written with tensors only so that a CUDA graph can hold it; the lr is a device tensor set
    with :meth:`set_lr` between replays.

    Args:
        parameters: The parameters.
        lr: The initial learning rate.
    """

    def __init__(self, parameters: list[nn.Parameter], lr: float) -> None:
        self.parameters = parameters
        p0 = parameters[0]
        self.m = [torch.zeros_like(p) for p in parameters]
        self.v = [torch.zeros_like(p) for p in parameters]
        self.t = torch.zeros((), dtype=p0.dtype, device=p0.device)
        self.lr = torch.full((), lr, dtype=p0.dtype, device=p0.device)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (in place)."""
        self.lr.fill_(lr)

    def zero_grad(self) -> None:
        """Drop the gradients."""
        for p in self.parameters:
            p.grad = None

    def reset(self) -> None:
        """Zero the moments and the step count (in place)."""
        for m, v in zip(self.m, self.v, strict=True):
            m.zero_()
            v.zero_()
        self.t.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``p.grad``."""
        b1, b2 = BETAS
        grads = [p.grad for p in self.parameters]
        self.t.add_(1.0)
        torch._foreach_lerp_(self.m, grads, 1.0 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - b2)
        step_size = self.lr / (1.0 - torch.pow(b1, self.t))
        correction = torch.sqrt(1.0 - torch.pow(b2, self.t))
        for p, m, v in zip(self.parameters, self.m, self.v, strict=True):
            p.sub_(step_size * m / (v.sqrt() / correction + ADAM_EPS))


class Trainer:
    """The paper's Adam loop for an :class:`Experiment`, eager, compiled or as a CUDA graph.

    Per step, in the package's order: the lazy coarse check (every ``lazy_every`` steps), the
    gradient-norm balancing (every ``balance_every`` steps, ``λ_i ← α λ_i + (1-α) Σ_j‖∇L_j‖ /
    ‖∇L_i‖``), the lr ``lr0 · rate^⌊step/decay_steps⌋``, then the step on ``Σ λ_i L_i``.

    Args:
        experiment: The objective.
        mode: ``"eager"``, ``"compile"`` (the loss through ``torch.compile``) or ``"graph"``
            (loss, backward and :class:`GraphAdam` captured in one CUDA graph).
        balance_every: Steps between balancing updates.
        lazy_every: T_K.
        lr0: Initial learning rate.
    """

    def __init__(
        self,
        experiment: Experiment,
        mode: str = "eager",
        balance_every: int = PAPER_EVERY,
        lazy_every: int = PAPER_EVERY,
        lr0: float = LR0,
    ) -> None:
        if mode not in ("eager", "compile", "graph"):
            raise ValueError(f"mode must be eager, compile or graph, got {mode!r}")
        if mode == "graph" and experiment.device.type != "cuda":
            raise ValueError("mode 'graph' needs CUDA")
        self.experiment = experiment
        self.mode = mode
        self.balance_every, self.lazy_every, self.lr0 = balance_every, lazy_every, lr0
        self.parameters = [p for p in experiment.network.parameters() if p.requires_grad]
        p0 = self.parameters[0]
        self.weight_values = dict.fromkeys(experiment.names, 1.0)
        self.weights = {
            name: torch.ones((), dtype=p0.dtype, device=p0.device) for name in experiment.names
        }
        self.lr = lr0
        if mode == "graph":
            self.adam: Any = GraphAdam(self.parameters, lr0)
        else:
            self.adam = torch.optim.Adam(self.parameters, lr=lr0, betas=BETAS, eps=ADAM_EPS)
        self._loss = torch.compile(self._total, dynamic=False) if mode == "compile" else self._total
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_terms: dict[str, torch.Tensor] = {}
        self.last_terms: dict[str, torch.Tensor] = {}

    def _total(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.experiment.terms()
        total = sum(self.weights[name] * terms[name] for name in self.experiment.names)
        return total, terms  # type: ignore[return-value]

    def set_lr(self, lr: float) -> None:
        """Set Adam's learning rate."""
        if lr == self.lr:
            return
        self.lr = lr
        if isinstance(self.adam, GraphAdam):
            self.adam.set_lr(lr)
        else:
            for group in self.adam.param_groups:
                group["lr"] = lr

    def host_logic(self, step: int) -> None:
        """What the package does before step ``step`` besides the step itself (syncs)."""
        experiment = self.experiment
        experiment.lazy_check(step, self.lazy_every, LAZY_TOL)
        names = [n for n in experiment.names if n != "coupling" or experiment.tau2 > 0]
        if step % self.balance_every == 0 and len(names) > 1:
            terms = experiment.terms()
            norms = {}
            for name in names:
                grads = torch.autograd.grad(
                    terms[name], self.parameters, retain_graph=True, allow_unused=True
                )
                squares = [(g * g).sum() for g in grads if g is not None]
                norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
            active = {n: v for n, v in norms.items() if v > 0.0 and math.isfinite(v)}
            if len(active) >= 2:
                total = sum(active.values())
                for name, norm in active.items():
                    value = 0.9 * self.weight_values[name] + 0.1 * total / norm
                    self.weight_values[name] = value
                    self.weights[name].fill_(value)
        self.set_lr(self.lr0 * DECAY_RATE ** (step // DECAY_STEPS))

    def step(self) -> None:
        """One optimizer step (after :meth:`host_logic`)."""
        if self.graph is not None:
            self.graph.replay()
            self.last_terms = self.static_terms
            return
        if self.mode == "graph":
            raise RuntimeError("capture() the graph first")
        self.adam.zero_grad(set_to_none=True)
        total, terms = self._loss()
        total.backward()
        self.adam.step()
        self.last_terms = {k: v.detach() for k, v in terms.items()}

    def _eager_graph_step(self) -> dict[str, torch.Tensor]:
        self.adam.zero_grad()
        total, terms = self._total()
        total.backward()
        self.adam.step()
        return terms

    def capture(self) -> float:
        """Capture the whole step as a CUDA graph (state restored after the warm-up); seconds."""
        start = time.perf_counter()
        saved = [p.detach().clone() for p in self.parameters]
        if self.experiment.hybrid is not None and not self.experiment.linearized:
            self.experiment.refresh(self.experiment.upscaled())
            self.experiment.refreshes -= 1
            self.experiment.linearized = False
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager_graph_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.adam.zero_grad()
        with torch.cuda.graph(graph):
            terms = self._eager_graph_step()
        self.static_terms = {k: v.detach() for k, v in terms.items()}
        self.graph = graph
        with torch.no_grad():
            for p, value in zip(self.parameters, saved, strict=True):
                p.copy_(value)
        self.adam.reset()
        torch.cuda.synchronize()
        return time.perf_counter() - start


# -- data of the 1D runs --------------------------------------------------------------------
def data_file(tag: str) -> Path:
    """``benchmarks/paper/data/paper_1d_eps<tag>.npz``."""
    return DATA / f"paper_1d_eps{tag}.npz"


def load_data(tag: str) -> dict[str, np.ndarray]:
    """The precomputed arrays of one ε (see ``precompute_gpu_data.py``)."""
    with np.load(data_file(tag)) as data:
        return {key: data[key] for key in data.files}


def network_from_data(data: dict[str, np.ndarray], dtype: torch.dtype, device) -> HardBoundary:
    """The package's initial Ms-PINN (seed 0) of the data file, as the copy here."""
    eps = float(data["eps"])
    network = HardBoundary(MsPINN(1, (1.0, 1.0 / eps), dtype=torch.float64))
    state = {
        key.split("::", 1)[1]: torch.as_tensor(value)
        for key, value in data.items()
        if key.startswith("init::")
    }
    network.load_state_dict(state)
    return network.to(device=device, dtype=dtype)


def experiment_from_data(
    data: dict[str, np.ndarray], method: str, dtype: torch.dtype, device: torch.device
) -> Experiment:
    """The Ms-PINN (``method="ms_pinn"``) or hybrid experiment of a data file."""

    def tensor(key: str) -> torch.Tensor:
        return torch.as_tensor(data[key], dtype=dtype, device=device)

    network = network_from_data(data, dtype, device)
    prefix = "pinn" if method == "ms_pinn" else "hyb"
    hybrid = None
    if method == "hybrid":
        n, columns = (int(v) for v in data["Q_shape"])
        Q = torch.zeros(n, columns, dtype=torch.float64)
        Q.index_put_(
            (torch.as_tensor(data["Q_row"]), torch.as_tensor(data["Q_col"])),
            torch.as_tensor(data["Q_val"]),
            accumulate=True,
        )
        alpha, beta = (float(v) for v in data["K_bounds"])
        hybrid = {
            "Q": Q.to(device=device, dtype=dtype),
            "extra": tensor("comp_extra"),
            "y1": tensor("y1"),
            "y0": torch.zeros(n, dtype=dtype, device=device),
            "S": torch.zeros(n, dtype=dtype, device=device),
            "anchor": torch.zeros((), dtype=dtype, device=device),
            "point_weight": float(data["hyb_point_weight"]),
            "coupling_weight": float(data["coupling_weight"]),
            "alpha": alpha,
            "beta": beta,
        }
    return Experiment(
        network,
        tensor(f"{prefix}_x"),
        tensor(f"{prefix}_K"),
        tensor(f"{prefix}_drift"),
        tensor(f"{prefix}_f"),
        float(data[f"{prefix}_row_weight"]),
        hybrid=hybrid,
    )


class ErrorEvaluator:
    """Relative L² and H¹-seminorm errors on the package's quadrature (from a data file)."""

    def __init__(self, data: dict[str, np.ndarray], dtype: torch.dtype, device) -> None:
        def tensor(key: str) -> torch.Tensor:
            return torch.as_tensor(data[key], dtype=dtype, device=device)

        self.x, self.w = tensor("eval_x"), tensor("eval_w")
        self.u, self.du = tensor("eval_u"), tensor("eval_du")
        self.norms = (
            float((self.w * self.u**2).sum()),
            float((self.w * (self.du**2).sum(dim=1)).sum()),
        )

    def __call__(self, network: nn.Module) -> tuple[float, float]:
        """``(rel L², rel H¹)``."""
        with torch.no_grad():
            v, g, _ = network.jet(self.x)
            l2 = float((self.w * (v - self.u) ** 2).sum())
            h1 = float((self.w * ((g - self.du) ** 2).sum(dim=1)).sum())
        return math.sqrt(l2 / self.norms[0]), math.sqrt(h1 / self.norms[1])


class Run:
    """One 1D paper experiment being trained, with its history.

    Args:
        name: ``<method>_eps<tag>_<dtype>``.
        trainer: The trainer.
        evaluate: The error evaluator.
    """

    def __init__(self, name: str, trainer: Trainer, evaluate: ErrorEvaluator) -> None:
        self.name, self.trainer, self.evaluate = name, trainer, evaluate
        self.history: dict[str, list[Any]] = {
            k: [] for k in ("step", "time", "loss", "pde", "coupling", "K_tilde", "weight_coupling")
        }
        self.history.update(eval_step=[], l2=[], h1=[])
        self.error: str | None = None

    def record_terms(self, step: int, elapsed: float) -> None:
        """Record the terms of the last step (those at the parameters before it)."""
        terms = self.trainer.last_terms
        names = self.trainer.experiment.names
        values = {k: float(v) for k, v in terms.items()}
        self.history["step"].append(step)
        self.history["time"].append(elapsed)
        self.history["loss"].append(sum(values[n] for n in names))
        self.history["pde"].append(values["pde"])
        self.history["coupling"].append(values.get("coupling"))
        self.history["K_tilde"].append(values.get("K_tilde"))
        self.history["weight_coupling"].append(self.trainer.weight_values.get("coupling"))

    def record_errors(self, step: int) -> None:
        """Evaluate and record the errors after ``step`` steps."""
        l2, h1 = self.evaluate(self.trainer.experiment.network)
        self.history["eval_step"].append(step)
        self.history["l2"].append(l2)
        self.history["h1"].append(h1)


def train_together(
    runs: list[Run],
    steps: int,
    *,
    eval_every: int,
    block: int,
    budget: Budget | None = None,
    reserve: float = 0.0,
) -> dict[str, Any]:
    """Train runs side by side (each CUDA graph on its own stream) for up to ``steps`` steps.

    Host-side logic (lazy check, balancing, lr) runs for every run at the start of each block
    of ``block`` steps (``block`` divides the balancing, lazy, evaluation and decay periods);
    terms are recorded after each block, errors every ``eval_every`` steps. Stops early, at a
    block boundary, when the budget would leave less than ``reserve`` seconds.

    Returns:
        ``{"steps", "seconds", "seconds_per_block"}``.
    """
    device = runs[0].trainer.experiment.device
    cuda = device.type == "cuda"
    streams = [torch.cuda.Stream() for _ in runs] if cuda else [None] * len(runs)
    for run in runs:
        run.record_errors(0)
    step, start, block_times = 0, time.perf_counter(), []
    while step < steps:
        t0 = time.perf_counter()
        for run in runs:
            run.trainer.host_logic(step)
        if cuda:
            for stream in streams:
                stream.wait_stream(torch.cuda.current_stream())
        for _ in range(block):
            for run, stream in zip(runs, streams, strict=True):
                if cuda:
                    with torch.cuda.stream(stream):
                        run.trainer.step()
                else:
                    run.trainer.step()
        if cuda:
            for stream in streams:
                torch.cuda.current_stream().wait_stream(stream)
        synchronize(device)
        step += block
        elapsed = time.perf_counter() - start
        for run in runs:
            run.record_terms(step, elapsed)
            if step % eval_every == 0:
                run.record_errors(step)
        block_times.append(time.perf_counter() - t0)
        if budget is not None:
            typical = float(np.median(block_times[-20:]))
            if budget.left() < reserve + 1.5 * typical:
                break
    return {
        "steps": step,
        "seconds": time.perf_counter() - start,
        "seconds_per_block": float(np.median(block_times)) if block_times else None,
    }


# -- stage (a): tests and checks ----------------------------------------------------------------
def run_package_tests(budget: Budget, out: Path, timeout: float) -> dict[str, Any]:
    """The package's CUDA tests when DOLFINx is installed (found without importing it)."""
    if importlib.util.find_spec("dolfinx") is None:
        return {
            "ran": False,
            "reason": "DOLFINx is not installed here: the package's CUDA tests "
            f"({', '.join(CUDA_TEST_FILES)}, -k 'cuda or device') import it; this script's "
            "own checks below run the network side on the device instead",
        }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
    command += [*CUDA_TEST_FILES, "-k", "cuda or device"]
    try:
        completed = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        return {
            "ran": True,
            "command": " ".join(command),
            "timeout_s": timeout,
            "error": str(error),
        }
    log = completed.stdout + completed.stderr
    (out / "pytest.log").write_text(log)
    return {
        "ran": True,
        "command": " ".join(command),
        "returncode": completed.returncode,
        "summary": log.strip().splitlines()[-1] if log.strip() else "",
    }


#: The FEniCSx modules (and what they pull in) that the package's modules import at their top.
STUBBED = ("dolfinx", "ufl", "basix", "ffcx", "petsc4py", "slepc4py", "adios4dolfinx", "pyvista")


class _StubType(type):
    """A stand-in class: any attribute is another stand-in class, calling one raises.

    So that ``dolfinx.mesh.CellType.triangle`` in a default argument, ``ufl.core.expr.Expr`` in
    an ``isinstance`` and ``class F(dolfinx.fem.Function)`` all import, and nothing of FEniCSx
    runs unnoticed.
    """

    def __getattr__(cls, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return _StubType(key, (), {"__module__": cls.__module__})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{cls.__module__}.{cls.__name__} is a stub in gpu_run.py (FEniCSx is not "
            "installed on the GPU machine)"
        )


class _StubModule(types.ModuleType):
    """A stand-in module: any attribute is a :class:`_StubType` (marked ``__stub__``)."""

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        value = _StubType(key, (), {"__module__": self.__name__})
        setattr(self, key, value)
        return value


class _StubFinder:
    """A ``sys.meta_path`` finder that answers the :data:`STUBBED` modules with stubs."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] not in STUBBED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__stub__ = True  # type: ignore[attr-defined]
        module.__path__ = []  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)


def load_package_networks() -> types.ModuleType:
    """``dolfinx_pinn.networks`` without the package's ``__init__`` (which imports DOLFINx).

    A stand-in package module with the package folder as its path is registered first, and
    the FEniCSx modules (:data:`STUBBED`: ``dolfinx_pinn.problems`` and the modules it imports
    use them for the UFL namespace and the mesh domains, which the networks do not use) are
    answered by stubs unless DOLFINx is imported already, so that the check runs the same here
    as on the GPU machine, where none of them is installed.
    """
    if "dolfinx" not in sys.modules and not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())
    if "dolfinx_pinn" not in sys.modules:
        package = types.ModuleType("dolfinx_pinn")
        package.__path__ = [str(ROOT / "dolfinx_pinn")]  # type: ignore[attr-defined]
        sys.modules["dolfinx_pinn"] = package
    return importlib.import_module("dolfinx_pinn.networks")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


def _history_difference(history: dict[str, list], data: dict[str, np.ndarray], key: str) -> float:
    """Max relative difference of a replayed per-step series against the package's."""
    reference = np.asarray(data[key], dtype=np.float64)
    name = key.split("_", 2)[2]
    values = np.asarray(history[name][: len(reference)], dtype=np.float64)
    return float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), 1e-300)))


def replay_package_history(tag: str, method: str, device, mode: str = "eager") -> dict[str, Any]:
    """Replay the package's 6-step history of a data file; max relative differences."""
    data = load_data(tag)
    steps, every, eval_every = (int(v) for v in data["check_steps"])
    experiment = experiment_from_data(data, method, torch.float64, device)
    trainer = Trainer(experiment, mode, balance_every=every, lazy_every=every)
    if mode == "graph":
        trainer.capture()
    run = Run(f"check_{method}", trainer, ErrorEvaluator(data, torch.float64, device))
    train_together([run], steps, eval_every=eval_every, block=1)
    prefix = "ref_pinn" if method == "ms_pinn" else "ref_hyb"
    result = {
        "loss": _history_difference(run.history, data, f"{prefix}_loss"),
        "l2": float(
            np.max(
                np.abs(np.array(run.history["l2"]) - data[f"{prefix}_l2"]) / data[f"{prefix}_l2"]
            )
        ),
    }
    if method == "hybrid":
        result["K_tilde"] = _history_difference(run.history, data, "ref_hyb_K_tilde")
        result["coupling"] = _history_difference(run.history, data, "ref_hyb_coupling")
        result["refreshes"] = [experiment.refreshes, int(data["ref_hyb_refreshes"])]
    return result


def own_checks(device: torch.device, tiny: bool) -> dict[str, Any]:
    """The checks of the network side on the device (see the module docstring)."""
    checks: dict[str, Any] = {}
    n = 64 if tiny else 2000
    generator = torch.Generator().manual_seed(1)

    def attempt(name: str, function: Callable[[], Any]) -> None:
        try:
            checks[name] = function()
        except Exception as error:  # recorded, the script goes on
            checks[name] = {"error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()

    def jet_against_autograd() -> dict[str, float]:
        result = {}
        models = {
            "ms_pinn_1d_hard": HardBoundary(MsPINN(1, (1.0, 15.0))),
            "ms_pinn_2d": MsPINN(2, (1.0, 10.0)),
            "mlp_2d": MLP(2),
        }
        for name, model in models.items():
            model = model.to(device)
            x = torch.rand(n, model.dim, generator=generator, dtype=torch.float64).to(device)
            jet, reference = model.jet(x), autograd_jet(model, x)
            result[name] = max(_relative(a, b) for a, b in zip(jet, reference, strict=True))
        return result

    attempt("jet_vs_autograd_rel", jet_against_autograd)

    def device_against_cpu() -> dict[str, float]:
        data = load_data("1_15")
        result = {}
        for method in ("ms_pinn", "hybrid"):
            grads = []
            for where in (torch.device("cpu"), device):
                experiment = experiment_from_data(data, method, torch.float64, where)
                experiment.lazy_check(0, PAPER_EVERY, LAZY_TOL)
                terms = experiment.terms()
                total = sum(terms[k] for k in experiment.names)
                params = list(experiment.network.parameters())
                grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)]))
            result[method] = _relative(grads[1].cpu(), grads[0])
        return result

    attempt("gradient_device_vs_cpu_rel", device_against_cpu)

    def package_networks() -> dict[str, Any]:
        networks = load_package_networks()
        data = load_data("1_15")
        own = network_from_data(data, torch.float64, device)
        package = networks.HardBoundaryNet(
            networks.MultiscaleFourierNet(1, scales=(1.0, 15.0), seed=0),
            lambda x: 4.0 * x[:, 0] * (1.0 - x[:, 0]),
        ).to(device)
        package.load_state_dict(own.state_dict())
        x = torch.as_tensor(data["hyb_x"], device=device)
        own_jet, package_jet = own.jet(x), package.jet(x)
        return {
            "module": networks.__file__,
            "jet_vs_copy_rel": max(
                _relative(a, b) for a, b in zip(own_jet, package_jet, strict=True)
            ),
            "package_jet_vs_autograd_rel": max(
                _relative(a, b) for a, b in zip(package_jet, autograd_jet(package, x), strict=True)
            ),
        }

    attempt("package_networks_on_device", package_networks)

    def replay() -> dict[str, Any]:
        return {m: replay_package_history("1_15", m, device) for m in ("ms_pinn", "hybrid")}

    attempt("replay_package_history_rel", replay)

    def adam_against_torch() -> float:
        data = load_data("1_15")
        results = []
        for kind in ("graph_adam", "torch"):
            experiment = experiment_from_data(data, "ms_pinn", torch.float64, device)
            params = list(experiment.network.parameters())
            optimizer: Any = (
                GraphAdam(params, LR0)
                if kind == "graph_adam"
                else torch.optim.Adam(params, lr=LR0, betas=BETAS, eps=ADAM_EPS)
            )
            for _ in range(3):
                for p in params:
                    p.grad = None
                experiment.terms()["pde"].backward()
                optimizer.step()
            results.append(torch.cat([p.detach().reshape(-1) for p in params]))
        return _relative(results[0], results[1])

    attempt("graph_adam_vs_torch_adam_rel", adam_against_torch)
    if device.type == "cuda":

        def graph_against_eager() -> dict[str, Any]:
            return {
                m: replay_package_history("1_15", m, device, mode="graph")
                for m in ("ms_pinn", "hybrid")
            }

        attempt("replay_package_history_graph_rel", graph_against_eager)
    return checks


# -- stage (b): timing --------------------------------------------------------------------------
def timing_configs(tiny: bool) -> list[dict[str, Any]]:
    """The paper's networks at the paper's point counts (tiny: a few points)."""
    scale = (lambda n: max(16, n // 100)) if tiny else (lambda n: n)
    return [
        {"name": "1d_ms_pinn_M2000", "dim": 1, "eps": 1 / 15, "net": "ms_pinn", "n": scale(2000)},
        {"name": "1d_ms_pinn_M5000", "dim": 1, "eps": 0.01, "net": "ms_pinn", "n": scale(5000)},
        # The hybrid's points and compression come from the data file (tiny: the 2000 of 1/15).
        {"name": "1d_hybrid_M5000", "dim": 1, "eps": 0.01, "net": "hybrid",
         "tag": "1_15" if tiny else "0.01"},
        {"name": "2d_ms_pinn_25000+2500", "dim": 2, "eps": 0.1, "net": "ms_pinn",
         "n": scale(25_000), "nb": scale(2_500)},
        {"name": "2d_mlp_25000+2500", "dim": 2, "eps": 0.1, "net": "mlp",
         "n": scale(25_000), "nb": scale(2_500)},
    ]  # fmt: skip


def build_timing_experiment(config: dict[str, Any], dtype, device) -> Experiment:
    """A synthetic experiment of a timing configuration (random points, seed 0)."""
    generator = torch.Generator().manual_seed(0)
    if config["net"] == "hybrid":
        return experiment_from_data(load_data(config["tag"]), "hybrid", dtype, device)
    n, dim, eps = config["n"], config["dim"], config["eps"]
    x = torch.rand(n, dim, generator=generator, dtype=torch.float64)
    if dim == 1:
        network: nn.Module = HardBoundary(MsPINN(1, (1.0, 1.0 / eps)))
        K, drift, f = paper_1d_data(eps, x)
        boundary = None
    else:
        network = MsPINN(2, (1.0, 1.0 / eps)) if config["net"] == "ms_pinn" else MLP(2)
        K, drift, f = paper_2d_data(eps, x)
        xb = unit_square_boundary(config["nb"], generator)
        boundary = (xb.to(device=device, dtype=dtype), 4.0 / config["nb"])
    network = network.to(device=device, dtype=dtype)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return Experiment(
        network, cast(x), cast(K), cast(drift), cast(f), math.sqrt(1.0 / n), boundary=boundary
    )


def time_steps(trainer: Trainer, device, min_steps: int, min_seconds: float) -> dict[str, Any]:
    """Median seconds per step over windows (the host logic of step 0 done once, untimed)."""
    trainer.host_logic(0)
    for _ in range(2):
        trainer.step()
    synchronize(device)
    windows, total, count = [], 0.0, 0
    window = max(1, min_steps // 4)
    while count < min_steps or total < min_seconds:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(window):
            trainer.step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        windows.append(elapsed / window)
        total += elapsed
        count += window
        if total > 4 * min_seconds and count >= 2:
            break
    return {"seconds_per_step": float(np.median(windows)), "steps_timed": count}


def run_timing(
    device: torch.device, tiny: bool, budget: Budget, reserve: float, compile_variants: bool
) -> list[dict[str, Any]]:
    """Stage (b): one row per (config, dtype, mode)."""
    rows = []
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    modes = ["eager"] + (["graph"] if device.type == "cuda" else [])
    min_steps, min_seconds = (4, 0.0) if tiny else (40, 0.5)
    plan = [(c, d, m) for c in timing_configs(tiny) for d in dtypes for m in modes]
    if compile_variants:
        # torch.compile takes tens of seconds per variant: the ones that matter most first.
        order = [
            "1d_ms_pinn_M5000",
            "2d_mlp_25000+2500",
            "1d_hybrid_M5000",
            "2d_ms_pinn_25000+2500",
        ]
        configs = {c["name"]: c for c in timing_configs(tiny)}
        plan += [(configs[name], d, "compile") for name in order for d in dtypes]
    for config, dtype_name, mode in plan:
        if mode == "compile" and budget.left() < reserve + 90:
            rows.append({"config": config["name"], "dtype": dtype_name, "mode": mode,
                         "skipped": "budget"})  # fmt: skip
            continue
        if budget.left() < reserve + 10:
            rows.append({"config": config["name"], "dtype": dtype_name, "mode": mode,
                         "skipped": "budget"})  # fmt: skip
            continue
        row: dict[str, Any] = {"config": config["name"], "dtype": dtype_name, "mode": mode}
        try:
            if config["net"] == "hybrid" and not data_file(config["tag"]).is_file():
                raise FileNotFoundError(data_file(config["tag"]))
            experiment = build_timing_experiment(config, dtypes[dtype_name], device)
            trainer = Trainer(experiment, mode)
            if mode == "graph":
                row["capture_s"] = trainer.capture()
            if mode == "compile":
                start = time.perf_counter()
                trainer.host_logic(0)
                trainer.step()
                synchronize(device)
                row["first_step_s"] = time.perf_counter() - start
            row.update(time_steps(trainer, device, min_steps, min_seconds))
            n_value = 0
            if experiment.boundary is not None:
                n_value += len(experiment.boundary[0])
            if experiment.hybrid is not None:
                n_value += len(experiment.hybrid["extra"])
            flops = matmul_flops(experiment.network, len(experiment.x), n_value)
            row["matmul_gflop_per_step"] = flops / 1e9
            row["achieved_matmul_tflops"] = flops / row["seconds_per_step"] / 1e12
            row["n_interior"], row["n_value_only"] = len(experiment.x), n_value
        except Exception as error:  # recorded, the script goes on
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        rows.append(row)
        budget.note(
            f"timing {row['config']} {dtype_name} {mode}: "
            + (f"{1e3 * row['seconds_per_step']:.3f} ms/step" if "seconds_per_step" in row
               else row.get("error", "?"))
        )  # fmt: skip
    return rows


def matmul_peak(device: torch.device, tiny: bool) -> dict[str, float]:
    """Dense square matmul FLOP/s in float64 and float32 (the ceiling of the timings)."""
    n = 256 if tiny else 8192
    result = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        synchronize(device)
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            a @ b
        synchronize(device)
        result[f"{name}_tflops_n{n}"] = 2.0 * n**3 * repeats / (time.perf_counter() - start) / 1e12
    return result


# -- stage (c): the 1D runs -------------------------------------------------------------------
def run_paper_1d(
    device: torch.device,
    budget: Budget,
    reserve: float,
    steps: int,
    with_f32: bool,
    tiny: bool,
) -> dict[str, Any]:
    """Stage (c): the four 1D experiments side by side, as many steps as fit (<= ``steps``)."""
    mode = "graph" if device.type == "cuda" else "eager"
    every = 2 if tiny else PAPER_EVERY
    dtypes = [("f64", torch.float64)] + ([("f32", torch.float32)] if with_f32 else [])
    runs = []
    for tag, method in RUNS_1D[:2] if tiny else RUNS_1D:  # tiny: ε = 1/15 only
        data = load_data(tag)
        for dtype_name, dtype in dtypes:
            experiment = experiment_from_data(data, method, dtype, device)
            trainer = Trainer(experiment, mode, balance_every=every, lazy_every=every)
            if mode == "graph":
                trainer.capture()
            runs.append(Run(f"{method}_eps{tag}_{dtype_name}", trainer,
                            ErrorEvaluator(data, dtype, device)))  # fmt: skip
    budget.note(f"runs: {len(runs)} built ({mode}), {budget.left():.0f} s left")
    summary = train_together(
        runs, steps, eval_every=every, block=every, budget=budget, reserve=reserve
    )
    summary.update(
        mode=mode,
        planned_steps=steps,
        seconds_per_step_all_runs=summary["seconds"] / max(summary["steps"], 1),
        runs={},
    )
    summary["networks"] = {
        run.name: {
            k: v.detach().cpu() for k, v in run.trainer.experiment.network.state_dict().items()
        }
        for run in runs
    }
    for run in runs:
        history = run.history
        summary["runs"][run.name] = {
            "final_l2": history["l2"][-1],
            "final_h1": history["h1"][-1],
            "best_l2": min(history["l2"]),
            "refreshes": run.trainer.experiment.refreshes,
            "history": history,
        }
    return summary


# -- main ---------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device's name."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "host": platform.node(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "dolfinx_found": importlib.util.find_spec("dolfinx") is not None,
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_memory_gib=props.total_memory / 2**30,
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
            cuda_version=torch.version.cuda,
        )
    return env


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole script (default 420; tiny: 300)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default $OUT, else benchmarks/results/paper/gpu)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke test)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"step cap of the runs (default {PAPER_STEPS}; tiny: 4)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile timings")
    parser.add_argument("--no-runs", action="store_true", help="skip stage (c)")
    parser.add_argument("--runs-f32", action="store_true", help="float32 copies of the runs")
    parser.add_argument(
        "--pytest",
        choices=("auto", "no"),
        default="auto",
        help="run the package's CUDA tests when DOLFINx is found",
    )
    args = parser.parse_args(argv)  # fmt: skip
    budget = Budget(args.budget if args.budget is not None else (300.0 if args.tiny else 420.0))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks/results/paper/gpu")
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps if args.steps is not None else (4 if args.tiny else PAPER_STEPS)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result: dict[str, Any] = {
        "script": "benchmarks/paper/gpu_run.py",
        "arguments": vars(args) | {"out": str(out)},
        "budget_s": budget.seconds,
        "environment": environment(device),
    }

    def write() -> None:
        result["budget_log"] = budget.log
        result["elapsed_s"] = budget.elapsed()
        (out / "gpu_run.json").write_text(json.dumps(result, indent=1, default=str))

    budget.note(f"start on {result['environment'].get('gpu_name', device)}")
    write()
    # Shares of the budget: the runs keep about half of it; timing and checks go first.
    run_reserve = 0.0 if args.no_runs else 0.5 * budget.seconds
    if args.pytest == "auto" and not args.tiny:
        result["package_tests"] = run_package_tests(
            budget, out, timeout=min(120.0, budget.left() / 4)
        )
    else:
        result["package_tests"] = {"ran": False, "reason": "--tiny or --pytest no"}
    tests = result["package_tests"]
    budget.note(f"package tests: {tests.get('summary', tests.get('reason'))}")
    result["checks"] = own_checks(device, args.tiny)
    budget.note("checks done")
    write()
    result["matmul_peak"] = matmul_peak(device, args.tiny)
    result["timing"] = run_timing(
        device, args.tiny, budget, run_reserve, compile_variants=not (args.no_compile or args.tiny)
    )
    budget.note("timing done")
    write()
    if not args.no_runs:
        result["runs_1d"] = run_paper_1d(
            device, budget, reserve=15.0, steps=steps, with_f32=args.runs_f32, tiny=args.tiny
        )
        networks = result["runs_1d"].pop("networks")
        torch.save(networks, out / "gpu_run_networks.pt")
        budget.note(f"runs done: {result['runs_1d']['steps']} steps")
    write()
    # What this process imported of the FEniCS stack (nothing, by design).
    fenics = [n for n in sys.modules if n.split(".")[0] in STUBBED]
    result["fenics_modules_imported"] = sorted(
        n for n in fenics if sys.modules[n].__dict__.get("__stub__") is not True
    )
    result["modules_stubbed"] = sorted(
        n for n, m in list(sys.modules.items()) if m.__dict__.get("__stub__") is True
    )
    budget.note(f"wrote {out / 'gpu_run.json'}")
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
