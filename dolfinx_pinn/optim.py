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

Every optimizer has ``settings()`` (what a checkpoint compares), ``state_dict()`` and
``load_state_dict()`` (what it restores), like ``torch.optim``; the training loop
(:mod:`dolfinx_pinn.training`) calls ``step()`` and keeps the records.

MPI: every rank may hold its own rows. ``LeastSquaresObjective.losses()`` are global sums (an
allreduce with the identity as backward, so ``backward()`` gives this rank's share and
``reduce_gradients()`` the full gradient); the only other cross-rank quantities are the sums
``JᵀJ``, ``Jᵀr`` and ``‖r‖²`` of the normal-equations form and the gradient norms of the loss
balancing. They all pass through ``LeastSquaresObjective.allreduce`` (identity by default; e.g.
an ``MPI.SUM`` allreduce of the tensor), so that the step is identical on all ranks. The Gram
and QR forms need all rows on one rank (serial, or an objective that gathers the rows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dolfinx_pinn.exceptions import NonFiniteLoss
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

    @property
    def term_names(self) -> list[str]:
        """The names of the loss terms, in order."""
        return [block.name for block in self.blocks]

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the ranks, differentiable with the identity as backward."""
        return _GlobalSum.apply(value, self.allreduce) if self.distributed else value

    def losses(self) -> dict[str, torch.Tensor]:
        """Each block's loss ``‖r_i‖²`` over all ranks (differentiable; see the module doc)."""
        return {block.name: self.global_sum(block.loss(self.model)) for block in self.blocks}

    def reduce_gradients(self) -> None:
        """Sum the parameters' ``.grad`` over the ranks after ``backward()`` (collective)."""
        if not self.distributed:
            return
        for p in self.parameters:
            grad = torch.zeros_like(p) if p.grad is None else p.grad
            p.grad = self.allreduce(grad.detach()).to(p.dtype).reshape(p.shape).clone()

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


class _GlobalSum(torch.autograd.Function):
    """``allreduce(value)`` forward, identity backward: each rank's backward is its share."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, allreduce: Callable) -> torch.Tensor:
        return allreduce(value.detach()).to(value.dtype).reshape(value.shape).clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


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
        losses: dict[str, torch.Tensor],
        parameters: Sequence[torch.Tensor],
        allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """``‖∇_θ L_i‖`` for each term (the graphs are kept).

        Args:
            losses: The terms (global sums whose backward gives this rank's share).
            parameters: θ.
            allreduce: Sums this rank's share of each gradient over the ranks before the norm
                is taken (collective; identity by default).
        """
        norms = {}
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
            flat = torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    if g is None
                    else g.reshape(-1)
                    for p, g in zip(parameters, grads, strict=True)
                ]
            )
            if allreduce is not None:
                flat = allreduce(flat.detach())
            norms[name] = float(torch.linalg.vector_norm(flat))
        return norms

    def update_from_norms(self, norms: dict[str, float]) -> dict[str, float]:
        """One update of the weights from gradient norms; returns the new weights.

        Only terms with a nonzero gradient take part (a term switched off, such as the coupling
        at τ2 = 0, keeps its weight); with fewer than two such terms nothing changes.
        """
        active = {name: norm for name, norm in norms.items() if norm > 0.0 and math.isfinite(norm)}
        if len(active) < 2:
            return dict(self.weights)
        total = sum(active.values())
        for name, norm in active.items():
            target = total / norm
            self.weights[name] = self.alpha * self.weights[name] + (1 - self.alpha) * target
        return dict(self.weights)

    def update(
        self,
        step: int,
        losses: dict[str, torch.Tensor],
        parameters: Sequence[torch.Tensor],
        allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Update the weights if ``step`` is a multiple of ``every``; return them."""
        if step % self.every == 0 and len(self.names) > 1:
            self.update_from_norms(self.gradient_norms(losses, parameters, allreduce))
        return dict(self.weights)

    def state_dict(self) -> dict[str, Any]:
        """The weights."""
        return {"weights": dict(self.weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the weights."""
        self.weights = dict(state["weights"])


class Adam:
    """Adam with the paper's step decay ``lr(step) = lr0 · rate^⌊step/decay_steps⌋``.

    One step: the objective's (global) loss terms, the loss-balancing weights every
    ``balance_every`` steps from gradient norms reduced over the ranks, ``backward()`` of the
    weighted sum, the gradient summed over the ranks, and ``torch.optim.Adam``'s update.

    Args:
        objective: The objective.
        lr: The initial learning rate (the paper: 5e-4; 1e-3 for the 2D MLP), > 0.
        decay_rate: The factor per ``decay_steps`` (0.75), in (0, 1].
        decay_steps: Steps per decay (1000), >= 1.
        betas: Adam's β (0.9, 0.999).
        balancing: A :class:`LossBalancer`, ``True`` for the paper's (α = ``balance_alpha``
            every ``balance_every`` steps), or ``None``/``False`` for unit weights.
        balance_every: Steps between balancing updates (100), >= 1.
        balance_alpha: The balancing moving-average factor α in [0, 1) (0.9).
    """

    def __init__(
        self,
        objective: LeastSquaresObjective,
        lr: float = 5e-4,
        decay_rate: float = 0.75,
        decay_steps: int = 1000,
        betas: tuple[float, float] = (0.9, 0.999),
        balancing: LossBalancer | bool | None = None,
        balance_every: int = 100,
        balance_alpha: float = 0.9,
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not (isinstance(decay_rate, (int, float)) and 0 < decay_rate <= 1):
            raise ValueError(f"decay_rate must lie in (0, 1], got {decay_rate}")
        _check_int("decay_steps", decay_steps, 1)
        self.objective = objective
        self.lr, self.decay_rate, self.decay_steps = float(lr), float(decay_rate), int(decay_steps)
        self.betas = (float(betas[0]), float(betas[1]))
        self.optimizer = torch.optim.Adam(objective.parameters, lr=lr, betas=self.betas)
        rate, every = self.decay_rate, self.decay_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: rate ** (step // every)
        )
        if balancing is True:
            balancing = LossBalancer(objective.term_names, alpha=balance_alpha, every=balance_every)
        self.balancer = balancing or None
        self.iteration = 0

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share."""
        balancer = self.balancer
        return {
            "lr": self.lr,
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
            "betas": list(self.betas),
            "balancing": None if balancer is None else [balancer.alpha, balancer.every],
        }

    def step(self) -> dict[str, Any]:
        """One Adam step on ``Σ λ_i L_i``; returns the loss (unweighted), terms, lr, weights."""
        objective = self.objective
        losses = objective.losses()
        if self.balancer is not None:
            weights = self.balancer.update(
                self.iteration,
                losses,
                objective.parameters,
                objective.allreduce if objective.distributed else None,
            )
        else:
            weights = dict.fromkeys(losses, 1.0)
        terms = {name: float(loss.detach()) for name, loss in losses.items()}
        for name, value in terms.items():
            if not math.isfinite(value):
                raise NonFiniteLoss(name, value)
        total = sum(weights[name] * loss for name, loss in losses.items())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        objective.reduce_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return {"loss": sum(terms.values()), "terms": terms, "lr": lr, "weights": weights}

    def state_dict(self) -> dict[str, Any]:
        """Adam's moments, the schedule's position, the balancing weights, the iteration."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": None if self.balancer is None else self.balancer.state_dict(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.balancer is not None and state["balancer"] is not None:
            self.balancer.load_state_dict(state["balancer"])
        self.iteration = int(state["iteration"])


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
        _check_int("max_iter", max_iter, 1)
        _check_int("history_size", history_size, 1)
        self.objective = objective
        self._settings = {"lr": float(lr), "max_iter": max_iter, "history_size": history_size}
        self.optimizer = torch.optim.LBFGS(
            objective.parameters,
            lr=lr,
            max_iter=max_iter,
            history_size=history_size,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share."""
        return dict(self._settings)

    def step(self) -> dict[str, Any]:
        """``max_iter`` L-BFGS iterations; returns the loss afterwards."""
        objective = self.objective

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = sum(objective.losses().values())
            loss.backward()
            objective.reduce_gradients()
            return loss.detach()

        self.optimizer.step(closure)
        return {"loss": objective.loss_value()}

    def state_dict(self) -> dict[str, Any]:
        """The curvature pairs and counters of ``torch.optim.LBFGS``."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])


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
        memory_limit: Bytes the dense linear algebra of a step may take (default: half the
            memory available when the optimizer is built). ``"auto"`` takes QR when it fits, else
            the Gram/Woodbury form with fewer rows than parameters, else the normal equations;
            a form that does not fit raises a ``MemoryError`` that names the sizes before any
            allocation (the 8×64 MLP has 29 000 parameters: QR of ``[J; √λ D]`` would need
            14 GB, the Gram form with 500 rows a few MB).
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
        memory_limit: float | None = None,
    ) -> None:
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a finite number > 0, got {damping}")
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {self.FORMS}, got {form!r}")
        if variable_projection and not all(b.affine_in_output for b in objective.blocks):
            raise ValueError("variable_projection: every block must be affine in the output layer")
        _check_int("max_rejections", max_rejections, 1)
        self.memory_limit = _memory_limit(memory_limit)
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

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share."""
        return {
            "damping": self.initial_damping,
            "form": self.form,
            "variable_projection": self.variable_projection,
            "max_rejections": self.max_rejections,
            "min_damping": self.min_damping,
            "rcond": self.rcond,
        }

    def state_dict(self) -> dict[str, Any]:
        """The damping and its growth factor (Nielsen's rule), the iteration."""
        return {
            "relative_damping": self.relative_damping,
            "growth": self._growth,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.relative_damping = float(state["relative_damping"])
        self._growth = float(state["growth"])
        self.iteration = int(state["iteration"])

    def choose_form(self, rows: int, columns: int) -> str:
        """The linear-algebra form of a step with ``rows`` × ``columns`` (see ``memory_limit``).

        Raises:
            MemoryError: when the form asked for (or every form, for ``"auto"``) exceeds the
                limit; the message names the sizes and what to change.
        """
        serial = not self.objective.distributed or getattr(self.objective, "gathered", False)
        # float64 bytes: the Jacobian, its scaled copy and the form's own matrices.
        jacobian = 2 * rows * columns * 8
        need = {
            "qr": jacobian + 3 * (rows + columns) * columns * 8,
            "gram": jacobian + 3 * rows * rows * 8,
            "normal": jacobian + 3 * columns * columns * 8,
        }
        if self.form != "auto":
            order = [self.form]
        elif serial:
            order = ["qr", "gram", "normal"] if rows < columns else ["qr", "normal"]
        else:
            order = ["normal"]
        for form in order:
            if form == "gram" and rows >= columns:
                form = "normal"
            if need[form] <= self.memory_limit:
                return form
        best = min(order, key=lambda f: need[f])
        raise MemoryError(
            f"Gauss-Newton: a step with {rows} rows and {columns} parameters needs "
            f"{need[best] / 2**30:.1f} GiB in the {best!r} form, above the limit of "
            f"{self.memory_limit / 2**30:.1f} GiB; use fewer points (points.n_interior) or a "
            "smaller network, the 'projection' optimizer, or raise memory_limit"
        )

    def _project_output_layer(self, r: torch.Tensor, J: torch.Tensor) -> None:
        """Replace the output layer by the least-squares optimum (rows are affine in it)."""
        objective = self.objective
        columns = objective.output_columns()
        serial = not objective.distributed or getattr(objective, "gathered", False)
        form = "qr" if serial else "normal"
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
            raise NonFiniteLoss("Gauss-Newton residual or Jacobian", "NaN or inf")
        if self.variable_projection:
            self._project_output_layer(r, J)
            r, J = objective.residual_and_jacobian()
        rows_total = int(objective.allreduce(torch.tensor(float(r.shape[0]))))
        gathered = getattr(objective, "gathered", False)
        if self.form in ("gram", "qr") and objective.distributed and not gathered:
            raise ValueError(
                f"form={self.form!r} needs all rows on one rank; use 'normal' under MPI"
            )
        form = self.choose_form(rows_total, J.shape[1])
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
    if objective.distributed and not getattr(objective, "gathered", False):
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
        serial = not objective.distributed or getattr(objective, "gathered", False)
        if form == "auto":
            form = "qr" if serial else "normal"
        if form == "qr" and not serial:
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

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share."""
        return {"form": self.form, "ridge": self.ridge, "rcond": self.rcond}

    def state_dict(self) -> dict[str, Any]:
        """The iteration (the cached Jacobian is recomputed after a resume)."""
        return {"iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.iteration = int(state["iteration"])
        self._cache = None

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
            raise NonFiniteLoss("projection residual or Jacobian", "NaN or inf")
        before = float(objective.allreduce(r @ r))
        change = output_layer_change(
            objective, r, phi, self.form, self.rcond, self.ridge, gram=gram
        )
        if not bool(torch.isfinite(change).all()):
            raise NonFiniteLoss("projection least-squares solution", "NaN or inf")
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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def available_memory() -> int:
    """The memory available to this process in bytes (Linux ``MemAvailable``; else 8 GiB)."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _memory_limit(limit: float | None) -> float:
    if limit is None:
        override = os.environ.get("DOLFINX_PINN_MEMORY_LIMIT")
        return float(override) if override else 0.5 * available_memory()
    if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit > 0):
        raise ValueError(f"memory_limit must be a number of bytes > 0, got {limit!r}")
    return float(limit)


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
