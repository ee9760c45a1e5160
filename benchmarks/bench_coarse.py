"""Coarse state + adjoint solve time against a full hybrid training step (paper's 2D setting).

paper_2d (ε = 0.1), coarse mesh h ≈ 0.04 (25 x 25 x 2 triangles), 25000 collocation points,
δ = ε. The "full training step" is built here (no dependency on networks.py/residual.py): a
2 x 128 tanh multiscale-Fourier-like network with hard boundary conditions, the strong-form
residual of (4.8) by nested autograd, K̃ by (4.10), τ₂R by (3.25), backward, Adam step.

    python benchmarks/bench_coarse.py [--quick]

Prints a markdown table of medians and writes benchmarks/results/coarse.json.
"""

import argparse
import json
import platform
import time
from pathlib import Path

from mpi4py import MPI

import numpy as np
import torch

from dolfinx_pinn import paper_2d
from dolfinx_pinn.coarse import CoarseProblem, CollocationPoints
from dolfinx_pinn.coupling import (
    CompressionOperator,
    CouplingTerm,
    allreduce_gradients,
    allreduce_sum,
    upscaled_coefficient,
)


class FourierNet(torch.nn.Module):
    """Ms-PINN-like: two Fourier feature maps, shared 2 x 128 tanh layers, hard BC."""

    def __init__(self, problem, width=128, features=64, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        d = problem.dim
        self.problem = problem
        self.register_buffer(
            "B1", torch.randn(d, features, generator=generator, dtype=torch.float64)
        )
        self.register_buffer(
            "B2", torch.randn(d, features, generator=generator, dtype=torch.float64) / problem.eps
        )
        self.hidden = torch.nn.Sequential(
            torch.nn.Linear(2 * features, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, width),
            torch.nn.Tanh(),
        ).double()
        self.out = torch.nn.Linear(2 * width, 1).double()

    def forward(self, x):
        states = []
        for B in (self.B1, self.B2):
            z = 2 * np.pi * x @ B
            states.append(self.hidden(torch.cat([torch.cos(z), torch.sin(z)], dim=1)))
        return self.problem.distance(x) * self.out(torch.cat(states, dim=1))[:, 0]


def pinn_loss(problem, model, x, weight, comm):
    x = x.detach().requires_grad_(True)
    v = model(x)
    (grad_v,) = torch.autograd.grad(v.sum(), x, create_graph=True)
    flux = problem.K(x)[:, None] * grad_v
    divergence = sum(
        torch.autograd.grad(flux[:, j].sum(), x, create_graph=True)[0][:, j] for j in range(2)
    )
    residual = -divergence - problem.f(x)
    return allreduce_sum(weight * torch.sum(residual**2), comm)


def median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else 10
    comm = MPI.COMM_WORLD
    torch.set_num_threads(1 if comm.size > 1 else torch.get_num_threads())
    problem = paper_2d(0.1)

    start = time.perf_counter()
    mesh = problem.create_mesh(comm, 25)
    coarse = CoarseProblem(problem, mesh, parametrization="entry")
    setup_coarse = time.perf_counter() - start
    start = time.perf_counter()
    points = CollocationPoints(mesh, count=25000, seed=0)
    setup_points = time.perf_counter() - start
    start = time.perf_counter()
    compression = CompressionOperator(coarse, points, delta=problem.eps)
    setup_compression = time.perf_counter() - start
    coupling = CouplingTerm(compression, tau2=1.0)

    model = FourierNet(problem)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_owned = points.torch_interior()
    extra = compression.extra_points()
    boundary_values = problem.q(extra)  # noqa: F841 (warm-up of the problem's torch path)

    def hybrid_step():
        optimizer.zero_grad()
        loss = pinn_loss(problem, model, x_owned, points.weight, comm)
        K = upscaled_coefficient(problem, model, points)
        values = torch.cat([model(x_owned), model(extra)])
        loss = loss + coupling(values, K)
        loss.backward()
        allreduce_gradients(model.parameters(), comm)
        optimizer.step()

    def plain_step():
        optimizer.zero_grad()
        loss = pinn_loss(problem, model, x_owned, points.weight, comm)
        loss.backward()
        allreduce_gradients(model.parameters(), comm)
        optimizer.step()

    rng = np.random.default_rng(0)

    def coarse_part():
        # A new K̃ each time: reassembly from the A^{ab}, refactorisation, state + adjoint.
        K = 3.0 + 0.1 * rng.random()
        y = coarse.solve_state(K)
        coarse.solve_adjoint(K, y - y.mean())
        coarse.parameter_gradient(y)

    def compression_part():
        values = torch.randn(compression.num_columns, dtype=torch.float64, requires_grad=True)
        compression(values).sum().backward()

    hybrid_step()  # warm-up (JIT, factorisation structures)
    coarse_part()
    t_hybrid, _ = median_time(hybrid_step, repeats)
    t_plain, _ = median_time(plain_step, repeats)
    t_coarse, _ = median_time(coarse_part, 3 * repeats)
    t_compress, _ = median_time(compression_part, 3 * repeats)
    ratio = t_coarse / t_hybrid
    if comm.rank == 0:
        rows = [
            ("hybrid training step (PINN + K̃ + τ₂R, backward, Adam)", t_hybrid, 1.0),
            ("plain PINN step (no coupling)", t_plain, t_plain / t_hybrid),
            ("coarse state + adjoint + dL/dK̃ (new K̃)", t_coarse, ratio),
            ("Q̄ apply + backward", t_compress, t_compress / t_hybrid),
        ]
        print(
            f"\npaper_2d, h = 0.04 ({coarse.num_global_dofs} coarse dofs), "
            f"{points.global_interior_count} points, {comm.size} rank(s), "
            f"{'quick' if args.quick else 'full'} mode\n"
        )
        print("| part | median [s] | fraction of hybrid step |")
        print("|---|---|---|")
        for name, seconds, fraction in rows:
            print(f"| {name} | {seconds:.4f} | {fraction:.3%} |")
        print(
            f"\nsetup: CoarseProblem {setup_coarse:.3f} s, CollocationPoints {setup_points:.3f} s, "
            f"CompressionOperator {setup_compression:.3f} s"
        )
        verdict = "PASS" if ratio <= 0.10 else "FAIL"
        print(f"coarse part / step = {ratio:.3%} (target <= 10%): {verdict}")
        results = {
            "problem": "paper_2d",
            "eps": 0.1,
            "coarse_cells_per_side": 25,
            "coarse_dofs": coarse.num_global_dofs,
            "points": points.global_interior_count,
            "ranks": comm.size,
            "quick": args.quick,
            "repeats": repeats,
            "median_s": {
                "hybrid_step": t_hybrid,
                "plain_step": t_plain,
                "coarse_state_adjoint": t_coarse,
                "compression": t_compress,
            },
            "coarse_fraction_of_step": ratio,
            "setup_s": {
                "coarse": setup_coarse,
                "points": setup_points,
                "compression": setup_compression,
            },
            "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        }
        path = Path(__file__).parent / "results" / "coarse.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
    compression.destroy()
    coarse.destroy()


if __name__ == "__main__":
    main()
