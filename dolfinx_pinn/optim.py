"""Optimizers behind one interface: Adam (the paper's schedule), L-BFGS, and Gauss-Newton.

All of them act on a :class:`LeastSquaresObjective`, a network plus a list of residual blocks
(:mod:`dolfinx_pinn.residual`) with loss ``Σ_i ‖r_i‖²``, and expose ``step() -> dict`` (one
iteration; the dict holds at least ``"loss"``). Build them by name with :func:`make_optimizer`.

- :class:`Adam`: ``torch.optim.Adam`` with β = (0.9, 0.999) and the paper's exponential decay,
  ``lr(0) = 5e-4`` times 0.75 every 1000 steps, and optional gradient-norm loss balancing
  (:class:`LossBalancer`, Algorithm 1 of Wang et al., "An expert's guide to training PINNs").
- :class:`LBFGS`: ``torch.optim.LBFGS`` with a strong Wolfe line search, for finishing.
- :class:`GaussNewton`: Levenberg-Marquardt on the stacked residual vector with a trust-region
  update of the damping (Nielsen's rule), in the normal-equations form ``(JᵀJ + λI) δ = -Jᵀr``
  or, with fewer rows than parameters, the Gram/Woodbury form ``δ = -Jᵀ(JJᵀ + λI)⁻¹ r``.
  Optional variable projection re-solves the output layer (in which the rows are affine) by
  linear least squares before every step.

MPI: every rank may hold its own rows. The only cross-rank quantities of the normal-equations
form are the sums ``JᵀJ``, ``Jᵀr`` and ``‖r‖²``; they all pass through
``LeastSquaresObjective.allreduce`` (identity by default; e.g. an ``MPI.SUM`` allreduce of the
tensor), so that the step is identical on all ranks. The Gram and QR forms need all rows on one
rank (serial only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dolfinx_pinn.residual import ResidualBlock, parameter_names

__all__ = [
    "LBFGS",
    "OPTIMIZERS",
    "Adam",
    "GaussNewton",
    "LeastSquaresObjective",
    "LossBalancer",
    "OutputLayerProjection",
    "make_optimizer",
    "output_layer_change",
]


class LeastSquaresObjective:
    """A network and residual blocks: ``L(θ) = Σ_i ‖r_i(θ)‖²``.

    Args:
        model: The network (its trainable parameters are θ).
        blocks: The residual blocks (PDE rows, boundary rows, later coupling rows).
        allreduce: Sums a tensor over all ranks holding rows (identity by default). It is the
            one place where an MPI reduction enters: collective on that communicator.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[ResidualBlock],
        allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not blocks:
            raise ValueError("blocks: at least one residual block is needed")
        names = [block.name for block in blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"blocks must have distinct names, got {names}")
        self.model = model
        self.blocks = list(blocks)
        self.distributed = allreduce is not None
        self.allreduce = allreduce or (lambda tensor: tensor)
        self.names = parameter_names(model)
        parameters = dict(model.named_parameters())
        self.parameters = [parameters[name] for name in self.names]
        if not self.parameters:
            raise ValueError("model: it has no trainable parameters")

    @property
    def num_parameters(self) -> int:
        """The number P of trainable scalars."""
        return sum(p.numel() for p in self.parameters)

    def losses(self) -> dict[str, torch.Tensor]:
        """Each block's loss ``‖r_i‖²`` (differentiable; local rows only, not reduced)."""
        return {block.name: block.loss(self.model) for block in self.blocks}

    def loss_value(self) -> float:
        """The total loss ``Σ_i ‖r_i‖²`` over all ranks, without a graph. Collective."""
        with torch.no_grad():
            local = sum(self._values_no_graph(block) for block in self.blocks)
        return float(self.allreduce(torch.as_tensor(local)))

    def _values_no_graph(self, block: ResidualBlock) -> torch.Tensor:
        # Residuals need input derivatives, so autograd stays on for x but no parameter graph
        # is kept beyond this call.
        with torch.enable_grad():
            rows = block.values(self.model).detach()
        return (rows * rows).sum()

    def residual_and_jacobian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The local stacked rows ``r (R,)`` and Jacobian ``J (R, P)``, detached."""
        parts = [self.block_jacobian(block) for block in self.blocks]
        return torch.cat([r for r, _ in parts]), torch.cat([J for _, J in parts])

    def block_jacobian(self, block: ResidualBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's rows and Jacobian (the rows this objective holds), detached."""
        return block.jacobian(self.model)

    def block_values(self, block: ResidualBlock) -> torch.Tensor:
        """One block's rows (the rows this objective holds), detached."""
        with torch.enable_grad():  # input derivatives; no parameter graph is kept
            return block.values(self.model).detach()

    def flat_parameters(self) -> torch.Tensor:
        """θ as one vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters]).clone()

    def set_flat_parameters(self, vector: torch.Tensor) -> None:
        """Overwrite θ from one vector."""
        offset = 0
        with torch.no_grad():
            for p in self.parameters:
                p.copy_(vector[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()

    def output_columns(self) -> torch.Tensor:
        """Indices of the flat parameters of the output layer (the last ``nn.Linear``)."""
        last = None
        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                last = module
        if last is None:
            raise ValueError("model: variable projection needs an nn.Linear output layer")
        targets = {id(last.weight), id(last.bias) if last.bias is not None else None}
        columns, offset = [], 0
        for p in self.parameters:
            if id(p) in targets:
                columns.append(torch.arange(offset, offset + p.numel()))
            offset += p.numel()
        return torch.cat(columns)


class LossBalancer:
    """Gradient-norm loss balancing, Algorithm 1 of Wang et al. (2023), "An expert's guide".

    Every ``every`` steps: ``λ̂_i = Σ_j ‖∇_θ L_j‖ / ‖∇_θ L_i‖`` and ``λ_i ← α λ_i + (1 - α) λ̂_i``;
    the weights are plain numbers (detached) used in ``Σ_i λ_i L_i``. Initial weights are 1.

    Args:
        names: The loss terms.
        alpha: The moving-average factor α (0.9 in the paper).
        every: The update frequency f in steps (100 in the paper).
    """

    def __init__(self, names: Sequence[str], alpha: float = 0.9, every: int = 100) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.names = list(names)
        self.alpha, self.every = float(alpha), every
        self.weights = dict.fromkeys(self.names, 1.0)

    @staticmethod
    def gradient_norms(
        losses: dict[str, torch.Tensor], parameters: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """``‖∇_θ L_i‖`` for each term (the graphs are kept)."""
        norms = {}
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            squared = sum(float((g * g).sum()) for g in grads if g is not None)
            norms[name] = math.sqrt(squared)
        return norms

    def update_from_norms(self, norms: dict[str, float]) -> dict[str, float]:
        """One update of the weights from gradient norms; returns the new weights."""
        total = sum(norms.values())
        for name in self.names:
            norm = norms[name]
            # A term with zero gradient keeps its weight (the formula would divide by zero).
            if norm > 0.0 and math.isfinite(total / norm):
                target = total / norm
                self.weights[name] = self.alpha * self.weights[name] + (1 - self.alpha) * target
        return dict(self.weights)

    def update(
        self, step: int, losses: dict[str, torch.Tensor], parameters: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """Update the weights if ``step`` is a multiple of ``every``; return them."""
        if step % self.every == 0 and len(self.names) > 1:
            self.update_from_norms(self.gradient_norms(losses, parameters))
        return dict(self.weights)


class Adam:
    """Adam with the paper's step decay ``lr(step) = lr0 · rate^⌊step/decay_steps⌋``.

    Args:
        objective: The objective.
        lr: The initial learning rate (the paper: 5e-4; 1e-3 for the 2D MLP).
        decay_rate: The factor per ``decay_steps`` (0.75).
        decay_steps: Steps per decay (1000).
        betas: Adam's β (0.9, 0.999).
        balancing: A :class:`LossBalancer`, ``True`` for the paper's (α = 0.9 every 100
            steps), or ``None``/``False`` for unit weights.
    """

    def __init__(
        self,
        objective: LeastSquaresObjective,
        lr: float = 5e-4,
        decay_rate: float = 0.75,
        decay_steps: int = 1000,
        betas: tuple[float, float] = (0.9, 0.999),
        balancing: LossBalancer | bool | None = None,
    ) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not 0 < decay_rate <= 1:
            raise ValueError(f"decay_rate must lie in (0, 1], got {decay_rate}")
        if not (isinstance(decay_steps, int) and decay_steps >= 1):
            raise ValueError(f"decay_steps must be an integer >= 1, got {decay_steps!r}")
        self.objective = objective
        self.optimizer = torch.optim.Adam(objective.parameters, lr=lr, betas=betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: decay_rate ** (step // decay_steps)
        )
        if balancing is True:
            balancing = LossBalancer([block.name for block in objective.blocks])
        self.balancer = balancing or None
        self.iteration = 0

    def step(self) -> dict[str, Any]:
        """One Adam step on ``Σ λ_i L_i``; returns the loss (unweighted), terms, lr, weights."""
        losses = self.objective.losses()
        if self.balancer is not None:
            weights = self.balancer.update(self.iteration, losses, self.objective.parameters)
        else:
            weights = dict.fromkeys(losses, 1.0)
        total = sum(weights[name] * loss for name, loss in losses.items())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        # The sum over ranks of the local gradients (identity in serial).
        for p in self.objective.parameters:
            if p.grad is not None:
                p.grad.copy_(self.objective.allreduce(p.grad))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        terms = {
            name: float(self.objective.allreduce(loss.detach())) for name, loss in losses.items()
        }
        return {"loss": sum(terms.values()), "terms": terms, "lr": lr, "weights": weights}


class LBFGS:
    """L-BFGS with a strong Wolfe line search (``torch.optim.LBFGS``), for finishing.

    Args:
        objective: The objective.
        lr: Initial step length (1 with a line search).
        max_iter: Inner iterations per :meth:`step`.
        history_size: Number of stored curvature pairs.
    """

    def __init__(
        self,
        objective: LeastSquaresObjective,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 50,
    ) -> None:
        self.objective = objective
        self.optimizer = torch.optim.LBFGS(
            objective.parameters,
            lr=lr,
            max_iter=max_iter,
            history_size=history_size,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

    def step(self) -> dict[str, Any]:
        """``max_iter`` L-BFGS iterations; returns the loss afterwards and its terms."""

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = sum(self.objective.losses().values())
            loss.backward()
            for p in self.objective.parameters:
                if p.grad is not None:
                    p.grad.copy_(self.objective.allreduce(p.grad))
            return self.objective.allreduce(loss.detach())

        self.optimizer.step(closure)
        terms = {
            name: float(self.objective.allreduce(loss.detach()))
            for name, loss in self.objective.losses().items()
        }
        return {"loss": sum(terms.values()), "terms": terms}


class GaussNewton:
    """Levenberg-Marquardt / Gauss-Newton on the stacked residual vector.

    Each step solves ``min_δ ‖r + Jδ‖² + λ‖Dδ‖²`` (``D² = diag(JᵀJ)``, Marquardt's scaling, so
    the O(1/ε) fast columns and the O(1) slow columns are damped alike) and accepts ``θ + δ``
    when the gain ratio ``ρ = (L(θ) - L(θ + δ)) / (L(θ) - ‖r + Jδ‖²)`` is positive; λ follows
    Nielsen's rule (times ``max(1/3, 1 - (2ρ - 1)³)`` on success, a doubling factor on failure).
    For the PDE rows of a linear equation this is the energy natural gradient (Müller &
    Zeinhofer 2023) with damping.

    Args:
        objective: The objective.
        damping: Initial λ of the Marquardt-scaled damping ``λ diag(JᵀJ)``.
        form: ``"normal"`` (``JᵀJ``; sums over ranks, MPI-ready), ``"gram"`` (``JJᵀ``, the
            Woodbury form for fewer rows than parameters; serial), ``"qr"`` (least squares on
            ``[J; √λ D]`` by QR, which does not square the condition number; serial) or
            ``"auto"`` (``"qr"`` in serial, ``"normal"`` with a distributed objective).
            Measured: only ``"qr"`` (with variable projection) reaches relative L² 1e-6 on
            ``paper_1d``; the normal equations stall near 1e-3.
        variable_projection: Re-solve the output layer by linear least squares before each step
            (valid when every block is affine in the output layer).
        max_rejections: Trial steps per :meth:`step` before giving up.
        min_damping: Lower bound of the relative damping.
        rcond: Relative singular-value cut-off of the variable-projection least squares.
    """

    FORMS = ("auto", "normal", "gram", "qr")

    def __init__(
        self,
        objective: LeastSquaresObjective,
        damping: float = 1e-3,
        form: str = "auto",
        variable_projection: bool = False,
        max_rejections: int = 12,
        min_damping: float = 1e-15,
        rcond: float = 1e-14,
    ) -> None:
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a finite number > 0, got {damping}")
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        if variable_projection and not all(b.affine_in_output for b in objective.blocks):
            raise ValueError("variable_projection: every block must be affine in the output layer")
        self.objective = objective
        self.relative_damping = self.initial_damping = float(damping)
        self.max_damping = 1e12
        self.form = form
        self.variable_projection = variable_projection
        self.max_rejections = max_rejections
        self.min_damping = min_damping
        self.rcond = rcond
        self._growth = 2.0
        self.iteration = 0

    def _project_output_layer(self, r: torch.Tensor, J: torch.Tensor) -> None:
        """Replace the output layer by the least-squares optimum (rows are affine in it)."""
        objective = self.objective
        columns = objective.output_columns()
        form = "normal" if objective.distributed else "qr"
        change = output_layer_change(objective, r, J[:, columns], form, self.rcond, ridge=1e-13)
        _apply_output_change(objective, columns, change, float(objective.allreduce(r @ r)))

    def _solve(
        self,
        form: str,
        r: torch.Tensor,
        J: torch.Tensor,
        gram: torch.Tensor | None,
        gradient: torch.Tensor,
        scale: torch.Tensor,
        damping: float,
    ) -> torch.Tensor | None:
        """The step δ for the (Jacobi-scaled) damping λ, or None if the factorisation failed.

        With ``D = diag(JᵀJ)^{1/2}`` (Marquardt's scaling) the step solves
        ``min ‖r + Jδ‖² + λ‖Dδ‖²``: ``y = Dδ`` solves the problem for ``J D⁻¹``.
        """
        if form == "qr":
            scaled_J = J / scale
            eye = math.sqrt(damping) * torch.eye(J.shape[1], dtype=J.dtype, device=J.device)
            augmented = torch.cat([scaled_J, eye])
            rhs = torch.cat([-r, torch.zeros(J.shape[1], dtype=J.dtype, device=J.device)])
            driver = "gels" if J.device.type == "cpu" else None
            solution = torch.linalg.lstsq(augmented, rhs.unsqueeze(1), driver=driver).solution
            return solution[:, 0] / scale
        assert gram is not None
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor, info = torch.linalg.cholesky_ex(gram + damping * eye)
        if int(info) != 0:
            return None
        if form == "gram":
            return -(J / scale).T @ torch.cholesky_solve(r.unsqueeze(1), factor)[:, 0] / scale
        return -torch.cholesky_solve((gradient / scale).unsqueeze(1), factor)[:, 0] / scale

    def step(self) -> dict[str, Any]:
        """One accepted Levenberg-Marquardt step (or up to ``max_rejections`` trials)."""
        objective = self.objective
        r, J = objective.residual_and_jacobian()
        if not bool(torch.isfinite(J).all() and torch.isfinite(r).all()):
            raise FloatingPointError("Gauss-Newton: the residual or its Jacobian is not finite")
        if self.variable_projection:
            self._project_output_layer(r, J)
            r, J = objective.residual_and_jacobian()
        rows_total = int(objective.allreduce(torch.tensor(float(r.shape[0]))))
        form = self.form
        if form == "auto":
            form = "normal" if objective.distributed else "qr"
        if form in ("gram", "qr") and objective.distributed:
            raise ValueError(f"form={form!r} needs all rows on one rank; use 'normal' under MPI")
        if form == "gram" and rows_total >= J.shape[1]:
            form = "normal"
        loss = float(objective.allreduce(r @ r))
        gradient = objective.allreduce(J.T @ r)
        column_norms = objective.allreduce((J * J).sum(dim=0))
        scale = _column_scale_from_norms(column_norms)
        if form == "normal":
            gram = objective.allreduce(J.T @ J) / scale[:, None] / scale[None, :]
        elif form == "gram":
            scaled_J = J / scale
            gram = scaled_J @ scaled_J.T
        else:
            gram = None
        theta = objective.flat_parameters()
        accepted, new_loss, rho = False, loss, 0.0
        for _ in range(self.max_rejections):
            damping = self.relative_damping
            delta = self._solve(form, r, J, gram, gradient, scale, damping)
            if delta is None or not bool(torch.isfinite(delta).all()):
                self.relative_damping = min(self.max_damping, 10.0 * self.relative_damping)
                continue
            linear = r + J @ delta
            predicted = loss - float(objective.allreduce(linear @ linear))
            objective.set_flat_parameters(theta + delta)
            new_loss = objective.loss_value()
            rho = (loss - new_loss) / predicted if predicted > 0 else -1.0
            if rho > 0 and math.isfinite(new_loss):
                accepted = True
                self.relative_damping = max(
                    self.min_damping,
                    self.relative_damping * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3),
                )
                self._growth = 2.0
                break
            objective.set_flat_parameters(theta)
            new_loss = loss
            self.relative_damping = min(self.max_damping, self.relative_damping * self._growth)
            self._growth *= 2.0
        if not accepted:
            # At the round-off floor no trial step is accepted: restart the damping from the
            # initial value (it would otherwise run away to inf) and report a stall.
            self.relative_damping = self.initial_damping
            self._growth = 2.0
        self.iteration += 1
        return {
            "loss": new_loss,
            "previous_loss": loss,
            "damping": self.relative_damping,
            "accepted": accepted,
            "gain_ratio": rho,
            "form": form,
            "stalled": not accepted,
        }


def output_layer_change(
    objective: LeastSquaresObjective,
    r: torch.Tensor,
    phi: torch.Tensor,
    form: str,
    rcond: float = 1e-14,
    ridge: float = 1e-13,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """The change of the output layer that minimises ``‖r + Φ c‖²`` (rows affine in it).

    Args:
        objective: The objective (its ``allreduce`` sums over the ranks holding rows).
        r: The local rows at the current parameters ``(R,)``.
        phi: The local Jacobian columns of the output layer ``(R, n)``.
        form: ``"normal"``: Jacobi-scaled normal equations with the relative ridge ``ridge``,
            summed over ranks (they square the condition number: on ``paper_1d``'s two-scale
            basis they stall near 1e-3 relative L² where QR reaches 1e-6; on ``paper_2d``, with
            2401 columns, both gave 4.0e-2, the normal equations in a third of the time);
            ``"qr"``: rank-revealing least squares (``gelsy`` on the CPU) on the local rows,
            which keeps the last digits (serial only).
        rcond: The singular-value cut-off of ``"qr"``.
        ridge: The ridge of ``"normal"``, relative to the unit diagonal of the scaled Gram.
        gram: ``Φᵀ Φ`` summed over ranks, if already known (``"normal"`` only).

    Returns:
        The change ``c`` of the output-layer parameters ``(n,)``. Collective for ``"normal"``.
    """
    if gram is None and form == "normal":
        gram = objective.allreduce(phi.T @ phi)
    squared_norms = torch.diagonal(gram) if gram is not None else (phi * phi).sum(dim=0)
    scale = _column_scale_from_norms(
        squared_norms.clamp_min(0.0) if gram is not None else objective.allreduce(squared_norms)
    )
    if form == "normal":
        assert gram is not None
        scaled = gram / scale[:, None] / scale[None, :]
        rhs = objective.allreduce(phi.T @ r) / scale
        eye = torch.eye(scaled.shape[0], dtype=scaled.dtype, device=scaled.device)
        factor, info = torch.linalg.cholesky_ex(scaled + ridge * eye)
        if int(info) != 0:  # numerically indefinite: fall back to the LU solve
            return -torch.linalg.solve(scaled + ridge * eye, rhs) / scale
        return -torch.cholesky_solve(rhs.unsqueeze(1), factor)[:, 0] / scale
    if form != "qr":
        raise ValueError(f"form must be 'normal' or 'qr', got {form!r}")
    if objective.distributed:
        raise ValueError("form='qr' needs all rows on one rank; use 'normal' under MPI")
    driver = "gelsy" if phi.device.type == "cpu" else None
    solution = torch.linalg.lstsq(phi / scale, -r.unsqueeze(1), rcond=rcond, driver=driver).solution
    return solution[:, 0] / scale


def _apply_output_change(
    objective: LeastSquaresObjective, columns: torch.Tensor, change: torch.Tensor, before: float
) -> float:
    """Add ``change`` to the output layer unless the loss grows (rows not affine after all)."""
    theta = objective.flat_parameters()
    theta[columns] += change
    objective.set_flat_parameters(theta)
    after = objective.loss_value()
    if not after <= before:
        theta[columns] -= change
        objective.set_flat_parameters(theta)
        return before
    return after


class OutputLayerProjection:
    """Variable projection alone: each step solves the output layer by linear least squares.

    The network's hidden layers stay as they are (a random-feature / extreme-learning basis:
    with :class:`~dolfinx_pinn.networks.TwoScaleNet`, the products of the slow hidden features
    and the exact fast harmonics) and each :meth:`step` replaces the output layer by the
    minimiser of ``Σ_i ‖r_i‖²``, exact because every block is affine in it. Repeated steps
    matter only when a block changes between steps (the hybrid solver's coupling rows, with a
    new coarse state or τ2); the Jacobian columns of blocks with ``fixed_output_jacobian`` (the
    PDE and boundary rows) are computed once and reused while the hidden layers do not change,
    so such a step costs a forward pass and one ``n × n`` solve.

    On ``paper_2d(0.1)`` this is the configuration that meets relative L² 1e-3: see
    ``benchmarks/bench_hybrid.py``.

    Args:
        objective: The objective; every block must be affine in the output layer.
        form: ``"auto"`` (``"qr"`` on a serial objective, ``"normal"`` on a distributed one),
            ``"normal"`` (normal equations summed over ranks: fast and MPI-ready, good to
            relative errors of ~1e-3-1e-4; used on ``paper_2d``) or ``"qr"`` (rank-revealing
            least squares on all rows, which keeps the digits below that: on ``paper_1d`` it
            reaches 1e-6 where the normal equations stall at 1e-3). See
            :func:`output_layer_change`.
        ridge: The relative ridge of the normal equations, >= 0.
        rcond: The singular-value cut-off of ``"qr"``, >= 0.

    MPI:
        Collective on the objective's ranks with ``"normal"``: Gram matrices and right-hand
        sides are summed, every rank solves the same small system.
    """

    FORMS = ("auto", "normal", "qr")

    def __init__(
        self,
        objective: LeastSquaresObjective,
        form: str = "auto",
        ridge: float = 1e-12,
        rcond: float = 1e-14,
    ) -> None:
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        if form == "auto":
            form = "normal" if objective.distributed else "qr"
        if form == "qr" and objective.distributed:
            raise ValueError("form='qr' needs all rows on one rank; use 'normal' under MPI")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        if not (math.isfinite(rcond) and rcond >= 0):
            raise ValueError(f"rcond must be a finite number >= 0, got {rcond}")
        if not all(block.affine_in_output for block in objective.blocks):
            raise ValueError("objective: every block must be affine in the output layer")
        self.objective = objective
        self.form = form
        self.ridge = float(ridge)
        self.rcond = float(rcond)
        self.iteration = 0
        self.relative_damping = 0.0  # no damping: the step is the exact minimiser
        self._growth = 0.0
        self._columns = objective.output_columns()
        mask = torch.ones(objective.num_parameters, dtype=torch.bool)
        mask[self._columns] = False
        self._hidden = mask
        self._cache: dict[str, Any] | None = None

    def _fixed_part(self) -> dict[str, Any]:
        """The cached output-layer Jacobian of the fixed blocks (recomputed if θ_hidden moved)."""
        objective = self.objective
        theta = objective.flat_parameters()
        hidden = theta[self._hidden.to(theta.device)]
        cache = self._cache
        if cache is not None and torch.equal(cache["hidden"], hidden):
            return cache
        fixed = [block for block in objective.blocks if block.fixed_output_jacobian]
        columns = self._columns
        phis = [objective.block_jacobian(block)[1][:, columns] for block in fixed]
        phi = torch.cat(phis) if phis else None
        gram = None
        if phi is not None and self.form == "normal":
            gram = objective.allreduce(phi.T @ phi)
        self._cache = {"hidden": hidden, "phi": phi, "gram": gram, "blocks": fixed}
        return self._cache

    def step(self) -> dict[str, Any]:
        """Solve the output layer once; returns the loss before and after."""
        objective = self.objective
        cache = self._fixed_part()
        rows, phis = [], []
        for block in cache["blocks"]:
            rows.append(objective.block_values(block))
        if cache["phi"] is not None:
            phis.append(cache["phi"])
        gram = cache["gram"]
        for block in objective.blocks:
            if not block.fixed_output_jacobian:
                r_block, J_block = objective.block_jacobian(block)
                phi_block = J_block[:, self._columns]
                rows.append(r_block)
                phis.append(phi_block)
                if gram is not None:
                    gram = gram + objective.allreduce(phi_block.T @ phi_block)
        r, phi = torch.cat(rows), torch.cat(phis)
        if not bool(torch.isfinite(r).all() and torch.isfinite(phi).all()):
            raise FloatingPointError("projection: the residual or its Jacobian is not finite")
        before = float(objective.allreduce(r @ r))
        change = output_layer_change(
            objective, r, phi, self.form, self.rcond, self.ridge, gram=gram
        )
        if not bool(torch.isfinite(change).all()):
            raise FloatingPointError("projection: the least-squares solution is not finite")
        loss = _apply_output_change(objective, self._columns, change, before)
        self.iteration += 1
        return {
            "loss": loss,
            "previous_loss": before,
            "damping": 0.0,
            "accepted": True,
            "form": self.form,
            "stalled": False,
        }


def _column_scale_from_norms(squared_norms: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of the squared column norms, 1 for zero columns (parameters without effect)."""
    norms = torch.sqrt(squared_norms)
    largest = float(norms.max()) if norms.numel() else 1.0
    # Round-off columns (a transfinite output bias, ~1e-16) keep scale 1: unit-scaling them would
    # hand them coefficients of 1e14 in the least-squares step.
    return torch.where(norms > 1e-300 + 1e-12 * largest, norms, torch.ones_like(norms))


def _column_scale(gram: torch.Tensor) -> torch.Tensor:
    return _column_scale_from_norms(torch.diagonal(gram).clamp_min(0.0))


OPTIMIZERS: dict[str, type] = {
    "adam": Adam,
    "lbfgs": LBFGS,
    "gauss_newton": GaussNewton,
    "projection": OutputLayerProjection,
}


def make_optimizer(name: str, objective: LeastSquaresObjective, **options: Any) -> Any:
    """An optimizer by name: adam, lbfgs, gauss_newton (alias gn) or projection."""
    key = {"gn": "gauss_newton", "lm": "gauss_newton"}.get(name, name)
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or 'gn', got {name!r}")
    return OPTIMIZERS[key](objective, **options)
