"""The PDE residual ``A^ε v - f^ε`` at collocation points, and stacked residual blocks.

Derivatives of the network with respect to x come from one of four exact methods:

- ``"jet"``: the networks' own forward-mode Taylor propagation (value, gradient and Laplacian
  or Hessian in one pass; see :mod:`dolfinx_pinn.networks`). It gives the per-point Jacobian
  of the Gauss-Newton optimizer by one backward pass (2-2.4x faster than ``vmap(jacrev)``).
- ``"jet_compiled"``: the same jet through ``torch.compile`` (Inductor): one fused forward and
  one fused backward graph per network class (:func:`dolfinx_pinn.networks.compiled_jet`).
  Same values and parameter gradients to round-off (1e-15 relative). The first call compiles
  (0.3-3 s per network on the CPU with torch's on-disk cache warm, 10-40 s cold), a second
  number of points once more; falls back to ``"jet"`` with a warning where compilation fails.
  Opt-in (``"auto"`` never picks it) and fastest for training on fixed points.
- ``"func"``: ``torch.func`` (``vmap`` of ``jacrev``/``jacfwd(jacrev)``) on any module.
- ``"autograd"``: nested ``torch.autograd.grad`` with ``create_graph`` (the paper's way); as
  fast as the eager jet or faster for residual values in 1D, so ``"auto"`` picks it.

Residual + parameter gradient (``block.loss(net).backward()``) on ``paper_2d(0.1)``, seconds
per 10^4 points, CPU, float64, 1 thread, 2000 points, medians of 7 side by side in one process
(``benchmarks/run.py --quick --cases throughput --repeats 7``, a 2-core VM shared with other
jobs; compilation excluded)::

    network                 autograd  jet    jet_compiled  func   jet / compiled vs autograd
    MLP 8x64 (hard BC)      0.772     0.453  0.341         1.14   1.70x / 2.26x
    Ms-PINN 2x128 (hard BC) 1.50      0.708  0.535         1.96   2.11x / 2.80x
    TwoScaleNet             1.65      0.908  0.530         1.68   1.81x / 3.11x

Other runs on that machine gave 2.2-2.8x (MLP), 2.3-3.4x (Ms-PINN) and 3.0-3.5x (TwoScaleNet)
for ``"jet_compiled"``. The compiled jet removes the cost of the many elementwise Taylor-rule
kernels of the eager jet; what is left is mostly the matrix products (four streams of the
width per layer, forward and backward). In 1D nested autograd stays competitive with the eager
jet. ``benchmarks/bench_pinn.py`` measures the eager methods side by side, forward alone and
with the backward pass.

The residual is ``-(K : ∇²v + (∇·K)·∇v) - f`` with ``∇·K = ∇K`` for a scalar K and
``(∇·K)_b = Σ_a ∂_a K_ab`` for a tensor; K, ∇·K and f come from the problem's single definition and
are evaluated once per point set (they do not depend on the network).

A least-squares objective is a list of :class:`ResidualBlock`: each gives weighted rows
``r_i(θ)`` (so that the loss is ``Σ_i ‖r_i‖²``) and their Jacobian ``∂r_i/∂θ`` (rows, parameters).
Blocks only see their own points: under MPI each rank would hold its own rows, and the
Gauss-Newton pieces ``JᵀJ``, ``Jᵀr`` are sums over ranks (see :mod:`dolfinx_pinn.optim`). The
hybrid solver can append a coupling block ``√τ2 · (Q v - y_h)`` to the same list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dolfinx_pinn.networks import load_forward_mode, record_linear_maps
from dolfinx_pinn.problems import MultiscaleProblem

__all__ = [
    "DERIVATIVE_METHODS",
    "BoundaryBlock",
    "EmptyBlock",
    "PDEBlock",
    "ResidualBlock",
    "derivatives",
    "outer_product_jacobian",
    "parameter_names",
    "pde_residual",
    "residual_from_jet",
    "resolve_method",
    "stack_blocks",
]

DERIVATIVE_METHODS = ("jet", "jet_compiled", "func", "autograd")
Jet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def resolve_method(model: nn.Module, method: str) -> str:
    """The derivative method to use; ``"auto"`` means ``"autograd"``.

    A network with ``prefers_jet`` (:class:`~dolfinx_pinn.boundary_value.DirichletNet`) gets
    ``"jet"`` for ``"auto"``: its fixed factors are cached as jets.

    Measured in ``benchmarks/bench_pinn.py`` (1D, 2 cores): nested autograd evaluates the
    residual (forward, and forward + backward) as fast as or faster than the jet, and torch.func
    is 2-5x slower. The jet is what makes the Gauss-Newton Jacobian cheap (one backward pass and
    outer products, :func:`outer_product_jacobian`), and the blocks use it there regardless.
    ``"jet_compiled"`` (2.2-3.5x faster than autograd for the 2D residual + gradient, see the
    module docstring) is never picked by ``"auto"``: its first call compiles for seconds.
    """
    if method == "auto":
        # A network whose fixed factors are cheap only as cached jets (the potential distance of
        # a mesh domain, a sum over its boundary facets) asks for the jet.
        return "jet" if getattr(model, "prefers_jet", False) else "autograd"
    if method not in DERIVATIVE_METHODS:
        raise ValueError(f"method must be 'auto' or one of {DERIVATIVE_METHODS}, got {method!r}")
    needed = {"jet": "jet", "jet_compiled": "compiled_jet"}.get(method)
    if needed is not None and not hasattr(model, needed):
        raise ValueError(
            f"method={method!r} needs a network with a {needed} method, got {type(model)}"
        )
    return method


def _scalar_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.reshape(x.shape[0])


def derivatives(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "auto",
    full_hessian: bool = False,
) -> Jet:
    """Value, gradient and Laplacian (or Hessian) of a scalar network at points ``(N, d)``.

    The results stay differentiable with respect to the network's parameters.

    Args:
        model: A network mapping ``(N, d)`` to ``(N,)`` (or ``(N, 1)``).
        x: Points ``(N, d)``.
        method: ``"auto"``, ``"jet"``, ``"jet_compiled"``, ``"func"`` or ``"autograd"``.
        full_hessian: Return the Hessian ``(N, d, d)`` instead of the Laplacian ``(N,)``.

    Returns:
        ``(value (N,), gradient (N, d), Laplacian (N,) or Hessian (N, d, d))``.
    """
    method = resolve_method(model, method)
    if method == "jet":
        return model.jet(x, full_hessian=full_hessian)  # type: ignore[operator]
    if method == "jet_compiled":
        return model.compiled_jet(x, full_hessian=full_hessian)  # type: ignore[operator]
    if method == "func":
        load_forward_mode()

        def single(point: torch.Tensor) -> torch.Tensor:
            return _scalar_output(model, point.unsqueeze(0)).reshape(())

        def first(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gradient = torch.func.jacrev(single)(point)
            return gradient, gradient

        def all_derivatives(point: torch.Tensor) -> Jet:
            hessian, gradient = torch.func.jacfwd(first, has_aux=True)(point)
            return single(point), gradient, hessian

        value, gradient, hessian = torch.func.vmap(all_derivatives)(x)
        if full_hessian:
            return value, gradient, hessian
        return value, gradient, torch.diagonal(hessian, dim1=1, dim2=2).sum(-1)
    # Nested autograd: one extra backward per coordinate for the second derivatives.
    points = x.detach().requires_grad_(True)
    value = _scalar_output(model, points)
    (gradient,) = torch.autograd.grad(value.sum(), points, create_graph=True)
    rows = [
        torch.autograd.grad(gradient[:, j].sum(), points, create_graph=True)[0]
        for j in range(x.shape[1])
    ]
    hessian = torch.stack(rows, dim=1)
    if full_hessian:
        return value, gradient, hessian
    return value, gradient, torch.diagonal(hessian, dim1=1, dim2=2).sum(-1)


def _coefficient_data(
    problem: MultiscaleProblem, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K (``(M,)`` or ``(M, d, d)``), the drift ∇·K ``(M, d)`` and f ``(M,)``, all detached."""
    with torch.enable_grad():
        K = problem.K(points).detach()
        gradient = problem.grad_K(points).detach()
        f = problem.f(points).detach()
    if problem.is_tensor:
        # grad_K[:, a, b, k] = ∂_k K_ab; (∇·K)_b = Σ_a ∂_a K_ab.
        drift = torch.stack(
            [sum(gradient[:, a, b, a] for a in range(problem.dim)) for b in range(problem.dim)],
            dim=1,
        )
    else:
        drift = gradient
    return K, drift, f


def residual_from_jet(
    jet: Jet, K: torch.Tensor, drift: torch.Tensor, f: torch.Tensor, is_tensor: bool
) -> torch.Tensor:
    """``-(K : ∇²v + (∇·K)·∇v) - f`` from a jet ``(v, ∇v, Δv or ∇²v)`` and the point data."""
    _, gradient, second = jet
    flux_divergence = (drift * gradient).sum(dim=1)
    if is_tensor:
        flux_divergence = flux_divergence + (K * second).sum(dim=(1, 2))
    else:
        flux_divergence = flux_divergence + K * second
    return -flux_divergence - f


_residual_from_jet = residual_from_jet  # the former private name


def pde_residual(
    model: nn.Module,
    problem: MultiscaleProblem,
    x: torch.Tensor,
    method: str = "auto",
) -> torch.Tensor:
    """The residual ``A^ε v - f^ε = -∇·(K^ε ∇v) - f^ε`` at points ``(N, d)``, shape ``(N,)``.

    Differentiable with respect to the network's parameters. For repeated evaluation on the same
    points use :class:`PDEBlock`, which caches K, ∇·K and f.
    """
    K, drift, f = _coefficient_data(problem, x)
    jet = derivatives(model, x, method, full_hessian=problem.is_tensor)
    return residual_from_jet(jet, K, drift, f, problem.is_tensor)


def _check_strategy(strategy: str) -> str:
    if strategy not in ("auto", "outer", "vmap"):
        raise ValueError(f"jacobian_strategy must be 'auto', 'outer' or 'vmap', got {strategy!r}")
    return strategy


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the order of every flat parameter vector."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class _Bound(nn.Module):
    """Calls ``function(model, *args)`` so that ``torch.func.functional_call`` can swap params."""

    def __init__(self, model: nn.Module, function: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *args: Any) -> torch.Tensor:
        return self.function(self.model, *args)


class ResidualBlock:
    """Weighted residual rows ``r(θ)`` of a least-squares objective; loss ``‖r‖²``.

    Subclasses implement :meth:`values`; the default :meth:`jacobian` differentiates it with
    ``torch.func.jacrev`` (fine for few rows, e.g. a coupling term). Pointwise blocks override it
    with per-point Jacobians (one row per point, batched by ``vmap``).

    Attributes:
        name: The name of the loss term.
        affine_in_output: Whether the rows are affine in the network's output layer (needed by
            variable projection).
        fixed_output_jacobian: Whether the Jacobian columns of the output layer depend on the
            other parameters of the network only (true for rows that are a fixed linear map of
            the network, such as the PDE and boundary rows; false for the coupling rows, whose
            coarse state changes between steps). The output-layer projection caches them.
    """

    name: str = "block"
    affine_in_output: bool = True
    fixed_output_jacobian: bool = False

    def values(self, model: nn.Module) -> torch.Tensor:
        """Weighted rows ``(R,)``, differentiable with respect to the parameters."""
        raise NotImplementedError

    def loss(self, model: nn.Module) -> torch.Tensor:
        """The loss term ``‖r‖²`` (a differentiable scalar)."""
        rows = self.values(model)
        return (rows * rows).sum()

    def jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``r (R,)`` and Jacobian ``J (R, P)`` (columns in :func:`parameter_names` order)."""
        names = parameter_names(model)
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        bound = _Bound(model, lambda m: self.values(m))

        def rows(trainable: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            state = {f"model.{k}": v for k, v in {**parameters, **trainable}.items()}
            state.update({f"model.{k}": v for k, v in buffers.items()})
            out = torch.func.functional_call(bound, state, ())
            return out, out

        jac, r = torch.func.jacrev(rows, has_aux=True)({n: parameters[n] for n in names})
        return r.detach(), torch.cat([jac[n].reshape(r.shape[0], -1) for n in names], dim=1)


class _PointwiseBlock(ResidualBlock):
    """A block with one row per point: ``r_i = weight · g(v, x_i, data_i)``."""

    fixed_output_jacobian = True

    points: torch.Tensor
    weight: float
    chunk_size: int | None = None
    jacobian_strategy: str = "auto"

    def _data(self) -> tuple[torch.Tensor, ...]:
        return ()

    def _rows(self, model: nn.Module, x: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def values(self, model: nn.Module) -> torch.Tensor:
        return self.weight * self._rows(model, self.points, *self._data())

    def _rows_for_jacobian(
        self, model: nn.Module, x: torch.Tensor, *data: torch.Tensor
    ) -> torch.Tensor:
        """The rows computed through ``jet`` only (for the outer-product Jacobian)."""
        return self._rows(model, x, *data)

    def jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and per-point Jacobian (one row per point).

        With ``jacobian_strategy`` ``"auto"`` or ``"outer"`` and a network whose parameters all
        sit in ``nn.Linear`` layers used through ``jet``, one forward and one backward pass plus
        outer products give every row's gradient (:func:`outer_product_jacobian`); otherwise
        ``vmap(jacrev)`` over the points.
        """
        if self.jacobian_strategy in ("auto", "outer") and hasattr(model, "jet"):
            result = outer_product_jacobian(
                model, lambda: self._rows_for_jacobian(model, self.points, *self._data())
            )
            if result is not None:
                r, J = result
                return self.weight * r, self.weight * J
            if self.jacobian_strategy == "outer":
                raise ValueError(
                    "jacobian_strategy='outer' needs all parameters in nn.Linear layers used "
                    "through jet"
                )
        return self._vmap_jacobian(model)

    def _vmap_jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        names = parameter_names(model)
        parameters = {name: p.detach() for name, p in model.named_parameters()}
        buffers = {f"model.{k}": v for k, v in model.named_buffers()}
        bound = _Bound(model, self._rows)

        def single(
            trainable: dict[str, torch.Tensor], x: torch.Tensor, *data: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            state = {f"model.{k}": v for k, v in {**parameters, **trainable}.items()}
            state.update(buffers)
            args = (x.unsqueeze(0), *(d.unsqueeze(0) for d in data))
            out = torch.func.functional_call(bound, state, args).reshape(())
            return out, out

        data = self._data()
        per_point = torch.func.vmap(
            torch.func.jacrev(single, has_aux=True),
            in_dims=(None, 0, *([0] * len(data))),
            chunk_size=self.chunk_size,
        )
        jac, r = per_point({n: parameters[n] for n in names}, self.points, *data)
        count = self.points.shape[0]
        J = torch.cat([jac[n].reshape(count, -1) for n in names], dim=1)
        return self.weight * r.detach(), self.weight * J.detach()


def outer_product_jacobian(
    model: nn.Module, rows: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row Jacobian of pointwise rows by one backward pass and outer products.

    ``rows()`` must compute one row per point, each depending on its own point only, with the
    network evaluated through ``jet``. Every ``nn.Linear`` use is recorded
    (:func:`dolfinx_pinn.networks.record_linear_maps`); the backward pass of ``Σ_i r_i`` gives
    ``δ_i = ∂r_i/∂z`` for each output stream z of each use, and
    ``∂r_i/∂W = Σ_streams δ_i ⊗ h_i``, ``∂r_i/∂b = δ_i(value)``.

    Returns:
        ``(r (R,), J (R, P))`` detached, or ``None`` when a trainable parameter is not the
        weight or bias of a recorded ``nn.Linear`` (then use ``vmap(jacrev)``).
    """
    names = parameter_names(model)
    parameters = dict(model.named_parameters())
    with torch.enable_grad(), record_linear_maps() as records:
        values = rows()
    owners: dict[int, tuple[nn.Linear, str]] = {}
    for record in records:
        owners[id(record.layer.weight)] = (record.layer, "weight")
        if record.layer.bias is not None:
            owners[id(record.layer.bias)] = (record.layer, "bias")
    if not records or any(id(parameters[n]) not in owners for n in names):
        return None
    outputs, slots = [], []
    for index, record in enumerate(records):
        for stream, tensor in enumerate(record.outputs):
            if tensor is not None and tensor.requires_grad:
                outputs.append(tensor)
                slots.append((index, stream))
    grads = torch.autograd.grad(values.sum(), outputs, allow_unused=True)
    count = values.shape[0]
    deltas: dict[tuple[int, int], torch.Tensor] = {
        slot: g for slot, g in zip(slots, grads, strict=True) if g is not None
    }
    per_parameter: dict[int, torch.Tensor] = {}

    def accumulate(parameter: torch.Tensor, value: torch.Tensor) -> None:
        key = id(parameter)
        per_parameter[key] = per_parameter[key] + value if key in per_parameter else value

    for index, record in enumerate(records):
        layer = record.layer
        for stream, inputs in enumerate(record.inputs):
            delta = deltas.get((index, stream))
            if delta is None or inputs is None:
                continue
            # Flatten the stream's direction axes: (N, k, out) and (N, k, in).
            delta_flat = delta.reshape(count, -1, delta.shape[-1])
            inputs_flat = inputs.reshape(count, -1, inputs.shape[-1])
            accumulate(layer.weight, torch.einsum("nko,nki->noi", delta_flat, inputs_flat))
            if stream == 0 and layer.bias is not None:
                accumulate(layer.bias, delta)
    columns = []
    for name in names:
        parameter = parameters[name]
        block = per_parameter.get(id(parameter))
        if block is None:  # the rows do not depend on it (e.g. an output bias under ∇)
            block = torch.zeros(count, parameter.numel(), dtype=values.dtype, device=values.device)
        columns.append(block.reshape(count, -1))
    return values.detach(), torch.cat(columns, dim=1).detach()


class PDEBlock(_PointwiseBlock):
    """The PDE rows ``√w · (A^ε v - f^ε)(x_i)`` at interior points.

    Args:
        problem: The problem (K, ∇K and f from its single definition).
        points: Interior points ``(M, d)`` (a tensor; its dtype/device are used).
        weight: The loss weight ``w`` of each squared row (default ``|Ω|/M``, the Monte-Carlo
            weight of (3.24)); the rows are scaled by ``√w``.
        method: Derivative method (``"auto"``, ``"jet"``, ``"jet_compiled"``, ``"func"``,
            ``"autograd"``) of the rows and the loss; the ``vmap`` Jacobian uses ``"jet"`` for
            ``"jet_compiled"`` and ``"func"`` for ``"autograd"``.
        chunk_size: Points per ``vmap`` chunk of the ``vmap`` Jacobian (memory bound).
        jacobian_strategy: ``"auto"`` (outer products when possible, else ``vmap``),
            ``"outer"`` or ``"vmap"``.
        name: Name of the loss term.
    """

    def __init__(
        self,
        problem: MultiscaleProblem,
        points: torch.Tensor,
        weight: float | None = None,
        method: str = "auto",
        chunk_size: int | None = None,
        jacobian_strategy: str = "auto",
        name: str = "pde",
    ) -> None:
        if points.ndim != 2 or points.shape[1] != problem.dim or points.shape[0] < 1:
            raise ValueError(
                f"points must have shape (M, {problem.dim}) with M >= 1, got {tuple(points.shape)}"
            )
        self.problem = problem
        self.points = points.detach()
        weight = problem.domain.measure / points.shape[0] if weight is None else float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight}")
        self.weight = math.sqrt(weight)
        self.method = method
        self.chunk_size = chunk_size
        self.jacobian_strategy = _check_strategy(jacobian_strategy)
        self.name = name
        self.K, self.drift, self.f = _coefficient_data(problem, self.points)

    def _data(self) -> tuple[torch.Tensor, ...]:
        return (self.K, self.drift, self.f)

    def rows_and_jet(
        self, model: nn.Module, x: torch.Tensor | None = None, f: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Jet]:
        """The weighted rows and the network's jet at the points (one derivative pass).

        The hybrid objective reuses the jet for K̃ (4.10) and the compression Q̄v.

        Args:
            model: The network.
            x: The points (default the block's; must be the block's points or a view of them).
            f: Another right-hand side at the points (e.g. of another lifting direction).
        """
        x = self.points if x is None else x
        f = self.f if f is None else f
        rows, jet = self._residual(model, x, self.method, self.K, self.drift, f)
        return self.weight * rows, jet

    def _residual(
        self,
        model: nn.Module,
        x: torch.Tensor,
        method: str,
        K: torch.Tensor,
        drift: torch.Tensor,
        f: torch.Tensor,
    ) -> tuple[torch.Tensor, Jet]:
        jet = derivatives(model, x, method, full_hessian=self.problem.is_tensor)
        return residual_from_jet(jet, K, drift, f, self.problem.is_tensor), jet

    def _rows(self, model: nn.Module, x: torch.Tensor, *data: torch.Tensor) -> torch.Tensor:
        return self._residual(model, x, self.method, *data)[0]

    def _rows_for_jacobian(
        self, model: nn.Module, x: torch.Tensor, *data: torch.Tensor
    ) -> torch.Tensor:
        return self._residual(model, x, "jet", *data)[0]

    def _vmap_jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # Nested autograd cannot run under vmap; torch.func computes the same derivatives. The
        # compiled jet is not traced under vmap: the eager jet is the same function.
        method = self.method
        resolved = resolve_method(model, method)
        if resolved == "autograd":
            self.method = "func"
        elif resolved == "jet_compiled":
            self.method = "jet"
        try:
            return super()._vmap_jacobian(model)
        finally:
            self.method = method


class BoundaryBlock(_PointwiseBlock):
    """The soft boundary rows ``√w · (v - g)(x_i)`` at boundary points.

    Args:
        points: Boundary points ``(M_b, d)``.
        weight: The loss weight of each squared row, e.g. ``τ1 |∂Ω| / M_b`` of (3.24).
        target: Boundary values g ``(M_b,)`` (default 0).
        chunk_size: Points per ``vmap`` chunk of the ``vmap`` Jacobian.
        jacobian_strategy: ``"auto"``, ``"outer"`` or ``"vmap"`` (see :class:`PDEBlock`).
        name: Name of the loss term.
    """

    def __init__(
        self,
        points: torch.Tensor,
        weight: float,
        target: torch.Tensor | None = None,
        chunk_size: int | None = None,
        jacobian_strategy: str = "auto",
        name: str = "boundary",
    ) -> None:
        if points.ndim != 2 or points.shape[0] < 1:
            raise ValueError(f"points must have shape (M_b, d), got {tuple(points.shape)}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {weight}")
        self.points = points.detach()
        self.weight = math.sqrt(float(weight))
        self.target = torch.zeros_like(self.points[:, 0]) if target is None else target.detach()
        self.chunk_size = chunk_size
        self.jacobian_strategy = _check_strategy(jacobian_strategy)
        self.name = name

    def _data(self) -> tuple[torch.Tensor, ...]:
        return (self.target,)

    def _rows(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _scalar_output(model, x) - target

    def _rows_for_jacobian(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        return model.jet(x)[0] - target  # type: ignore[operator]


class EmptyBlock(ResidualBlock):
    """A block without rows on this rank (e.g. no boundary points here, but on other ranks).

    Every rank must hold the same blocks, in the same order, for the collective sums.

    Args:
        name: The name of the loss term.
        dtype: The rows' dtype.
        device: The rows' device.
    """

    fixed_output_jacobian = True

    def __init__(
        self, name: str, dtype: torch.dtype = torch.float64, device: torch.device | None = None
    ) -> None:
        self.name = name
        self.dtype, self.device = dtype, device

    def values(self, model: nn.Module) -> torch.Tensor:  # noqa: D102
        parameter = next(model.parameters())
        return parameter.reshape(-1)[:0] * 0.0

    def jacobian(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kw = {"dtype": self.dtype, "device": self.device}
        return torch.zeros(0, **kw), torch.zeros(0, count, **kw)


def stack_blocks(
    model: nn.Module, blocks: Sequence[ResidualBlock]
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
    """Stacked rows and Jacobian of several blocks, and ``(name, rows)`` of each."""
    parts = [block.jacobian(model) for block in blocks]
    sizes = [(block.name, r.shape[0]) for block, (r, _) in zip(blocks, parts, strict=True)]
    return (
        torch.cat([r for r, _ in parts]),
        torch.cat([J for _, J in parts]),
        sizes,
    )
