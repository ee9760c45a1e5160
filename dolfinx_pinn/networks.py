"""Networks for the fine scale: MLP, multiscale Fourier features, and the two-scale ansatz.

Every network maps points of shape ``(N, d)`` to values of shape ``(N,)``, is float64 by default
(``dtype=`` to override), uses Glorot (Xavier normal) weights with zero biases, and lives on any
``device``. Besides ``forward`` each network has a ``jet`` method: a forward-mode Taylor
propagation ("forward Laplacian") that returns the value, the gradient and the Laplacian (or the
full Hessian) in one pass, without nested autograd. :mod:`dolfinx_pinn.residual` uses it for
the PDE residual; ``torch.func`` and nested autograd remain available there for comparison.
``compiled_jet`` is the same jet run through ``torch.compile`` (Inductor): one fused forward and
one fused backward graph per network class, with the elementwise Taylor algebra in generated
kernels (see :func:`compiled_jet` and :mod:`dolfinx_pinn.residual` for measured speed-ups).

A jet is a triple ``(value, gradient, second)``: for a batch of scalars ``value`` is ``(N,)``,
``gradient`` is ``(N, r)`` (derivatives along ``r`` directions, by default the ``d`` coordinate
axes) and ``second`` is ``(N,)`` (the sum of the second derivatives along the directions: the
Laplacian) or ``(N, r, r)`` (the Hessian) when ``full_hessian`` is set.

Boundary conditions:

- :class:`HardBoundaryNet`: ``v = l(x) N(x)`` with the problem's distance function ``l``
  (the paper's hard boundary condition, 1D default ``4x(1 - x)``).
- :class:`TransfiniteBoundaryNet`: ``v = Π_j (I - P_j) N`` with ``P_j`` the linear interpolation
  between the two faces normal to ``x_j`` (a Coons/transfinite projection). It vanishes on the
  boundary of a box exactly and, unlike the factor ``l(x)``, subtracts only a function that is
  slow in ``x_j``, so it keeps the slow/fast separation of :class:`TwoScaleNet` (in 1D it
  subtracts a linear function).
- Soft conditions: any bare network plus the τ1 boundary penalty rows of
  :mod:`dolfinx_pinn.pinn`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from dolfinx_pinn.problems import Box, MultiscaleProblem

__all__ = [
    "MLP",
    "HardBoundaryNet",
    "LinearMapRecord",
    "MultiscaleFourierNet",
    "TransfiniteBoundaryNet",
    "TwoScaleNet",
    "compiled_jet",
    "count_parameters",
    "fast_wavevectors",
    "record_linear_maps",
]

Jet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# -- activations with their first two derivatives ----------------------------------------------
def _tanh(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = torch.tanh(z)
    d1 = 1.0 - t * t
    return t, d1, -2.0 * t * d1


def _sin(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = torch.sin(z)
    return s, torch.cos(z), -s


def _silu(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(z)
    d1 = s * (1.0 + z * (1.0 - s))
    d2 = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    return z * s, d1, d2


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "tanh": _tanh,
    "sin": _sin,
    "silu": _silu,
    "swish": _silu,
}


def _activation(name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    try:
        return _ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}"
        ) from None


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_points(x: torch.Tensor, dim: int) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x: points must have shape (N, {dim}), got {tuple(x.shape)}")


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def _glorot_linear(
    fan_in: int,
    fan_out: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, dtype=dtype)
    with torch.no_grad():
        # Initialise on the CPU with the (CPU) generator, then move: seeds give the same
        # network on every device.
        weight = torch.empty(fan_out, fan_in, dtype=dtype)
        nn.init.xavier_normal_(weight, generator=generator)
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer.to(device)


def count_parameters(module: nn.Module) -> int:
    """The number of trainable scalars of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _input_jet(x: torch.Tensor, directions: torch.Tensor | None) -> torch.Tensor:
    """The gradient of the input coordinates along the directions, ``(N, r, d)``."""
    n, d = x.shape
    if directions is None:
        return torch.eye(d, dtype=x.dtype, device=x.device).expand(n, d, d)
    if directions.ndim == 2:
        return directions.to(dtype=x.dtype, device=x.device).expand(n, *directions.shape)
    return directions


class LinearMapRecord(NamedTuple):
    """One use of an ``nn.Linear`` inside a jet: its input and output streams."""

    layer: nn.Linear
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


_RECORDS: list[LinearMapRecord] | None = None


@contextlib.contextmanager
def record_linear_maps() -> Iterator[list[LinearMapRecord]]:
    """Record every ``nn.Linear`` applied inside ``jet`` calls (for per-point Jacobians).

    With the streams of each use, one backward pass of ``Σ_i r_i`` gives ``∂r_i/∂z`` for every
    row i at once (rows depend on their own point only), and the per-row parameter gradients
    follow by outer products: ``∂r_i/∂W = Σ_streams δz_i ⊗ h_i``, ``∂r_i/∂b = δ(value)_i``.
    """
    global _RECORDS
    previous, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        _RECORDS = previous


def _linear_jet(
    layer: nn.Linear, value: torch.Tensor, grad: torch.Tensor, second: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An affine map acts on value, gradient and second derivatives alike (bias on value only)."""
    weight_t = layer.weight.t()
    out_second = None if second is None else second @ weight_t
    out = (layer(value), grad @ weight_t, out_second)
    if _RECORDS is not None:
        _RECORDS.append(LinearMapRecord(layer, (value, grad, second), out))
    return out


def _activation_jet(
    activation: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    value: torch.Tensor,
    grad: torch.Tensor,
    second: torch.Tensor | None,
    full_hessian: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chain rule for an elementwise σ: (σ, σ'∇z, σ'Δz + σ''|∇z|²) or the Hessian version.

    Shapes: value ``(N, m)``, grad ``(N, r, m)``, second ``(N, m)`` (Laplacian) or
    ``(N, r, r, m)`` (Hessian); ``None`` for an affine input (zero second derivatives).
    """
    s0, s1, s2 = activation(value)
    out_grad = s1.unsqueeze(1) * grad
    if full_hessian:
        curvature = s2[:, None, None, :] * grad.unsqueeze(2) * grad.unsqueeze(1)
        if second is not None:
            curvature = curvature + s1[:, None, None, :] * second
        return s0, out_grad, curvature
    curvature = s2 * (grad * grad).sum(dim=1)
    if second is not None:
        curvature = curvature + s1 * second
    return s0, out_grad, curvature


def _product_jet(a: Jet, b: Jet, full_hessian: bool) -> Jet:
    """Jet of the elementwise product of two jets of the same shape (Leibniz rule)."""
    av, ag, as_ = a
    bv, bg, bs = b
    value = av * bv
    grad = ag * bv.unsqueeze(1) + av.unsqueeze(1) * bg
    if full_hessian:
        cross = ag.unsqueeze(2) * bg.unsqueeze(1)
        second = as_ * bv[:, None, None] + av[:, None, None] * bs + cross + cross.transpose(1, 2)
    else:
        second = as_ * bv + av * bs + 2.0 * (ag * bg).sum(dim=1)
    return value, grad, second


# -- torch.compile of the jets ------------------------------------------------------------------
JET_COMPILE_BACKEND = "inductor"
"""The ``torch.compile`` backend of :func:`compiled_jet` (tests may set ``"aot_eager"``)."""

_COMPILED_JETS: dict[tuple[type, str], Callable[..., Jet]] = {}
_COMPILE_FAILURES: dict[tuple[type, str], str] = {}


def compiled_jet(network: nn.Module, x: torch.Tensor, full_hessian: bool = False) -> Jet:
    """The network's ``jet(x, full_hessian)`` through ``torch.compile``; same values, same graph.

    One compiled function per network class and backend (:data:`JET_COMPILE_BACKEND`), built on
    the first call (Inductor on the CPU: 10-40 s, 0.3-3 s from torch's on-disk cache). The
    parameters are graph inputs, so optimizer steps and new instances of the same architecture
    do not recompile; a second number of points recompiles once with a dynamic point count.
    Autograd through the result gives the exact parameter gradient (one fused backward graph,
    ``retain_graph=True`` allowed: the first call sets ``torch._functorch.config.donated_buffer``
    to False for the process); a second derivative through it (``create_graph=True`` in the
    backward) is not supported by AOTAutograd: use the eager ``jet`` for that.

    If ``torch.compile`` is unsupported here or fails (e.g. no C++ compiler), a
    ``RuntimeWarning`` says so once per class and the eager ``jet`` is used.
    """
    backend = JET_COMPILE_BACKEND
    key = (type(network), backend)
    if key not in _COMPILE_FAILURES and not torch._dynamo.is_dynamo_supported():
        _COMPILE_FAILURES[key] = "torch.compile is not supported on this platform"
        warnings.warn(
            f"compiled_jet: {_COMPILE_FAILURES[key]}; using the eager jet",
            RuntimeWarning,
            stacklevel=2,
        )
    if key in _COMPILE_FAILURES:
        return network.jet(x, full_hessian)  # type: ignore[operator]
    function = _COMPILED_JETS.get(key)
    if function is None:
        # Donated buffers (a memory saving of compiled backwards) forbid retain_graph=True, which
        # the per-term gradient norms of the optimizers need; AOTAutograd checks the global flag
        # at backward time, so it is switched off for the process.
        torch._functorch.config.donated_buffer = False
        function = torch.compile(type(network).jet, backend=backend)
        _COMPILED_JETS[key] = function
    try:
        return function(network, x, full_hessian)
    except torch._dynamo.exc.TorchDynamoException as error:
        # An error of the inputs (e.g. a wrong shape) is raised by the eager jet as well: only a
        # failure of the compilation itself switches the class to the eager jet.
        result = network.jet(x, full_hessian)  # type: ignore[operator]
        _COMPILE_FAILURES[key] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        warnings.warn(
            f"compiled_jet: torch.compile of {type(network).__name__}.jet failed "
            f"({_COMPILE_FAILURES[key]}); using the eager jet",
            RuntimeWarning,
            stacklevel=2,
        )
        return result


class _JetNetwork(nn.Module):
    """Base class: ``forward(x) -> (N,)`` and ``jet(x) -> (value, gradient, second)``."""

    dim: int
    satisfies_boundary_condition: bool = False

    def jet(
        self,
        x: torch.Tensor,
        full_hessian: bool = False,
        directions: torch.Tensor | None = None,
    ) -> Jet:
        """Value, gradient and Laplacian (or Hessian) at points ``(N, d)``.

        Args:
            x: Points ``(N, d)``.
            full_hessian: Return the Hessian ``(N, r, r)`` instead of the Laplacian ``(N,)``.
            directions: ``(r, d)`` or ``(N, r, d)`` directions to differentiate along (default
                the coordinate axes, ``r = d``).

        Returns:
            ``(value (N,), gradient (N, r), Laplacian (N,) or Hessian (N, r, r))``.
        """
        raise NotImplementedError

    def compiled_jet(self, x: torch.Tensor, full_hessian: bool = False) -> Jet:
        """:meth:`jet` along the coordinate axes, through ``torch.compile`` (module function)."""
        return compiled_jet(self, x, full_hessian)


class MLP(_JetNetwork):
    """A fully connected network ``R^d -> R^out`` with ``depth`` hidden layers of ``width``.

    Args:
        dim: Input dimension d.
        width: Neurons per hidden layer.
        depth: Number of hidden layers (>= 1).
        activation: ``"tanh"``, ``"silu"`` (``"swish"``) or ``"sin"``.
        out_features: Number of outputs; with 1 the output has shape ``(N,)``, else ``(N, out)``.
        dtype: Parameter dtype (float64 by default).
        device: Parameter device.
        seed: Seed of the Glorot initialisation (``None``: torch's global generator).
    """

    def __init__(
        self,
        dim: int,
        width: int = 64,
        depth: int = 8,
        activation: str = "tanh",
        *,
        out_features: int = 1,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        if dim > 3:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        width = _check_positive_int("width", width)
        depth = _check_positive_int("depth", depth)
        self.out_features = _check_positive_int("out_features", out_features)
        self.activation_name = activation
        self._activation = _activation(activation)
        generator = _generator(seed)
        sizes = [dim] + [width] * depth
        self.hidden = nn.ModuleList(
            _glorot_linear(a, b, generator, dtype, device) for a, b in itertools.pairwise(sizes)
        )
        self.output = _glorot_linear(width, out_features, generator, dtype, device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden state ``(N, width)``."""
        h = x
        for layer in self.hidden:
            h = self._activation(layer(h))[0]
        return h

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """All outputs, ``(N, out_features)``."""
        return self.output(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values at points ``(N, d)``: ``(N,)`` (one output) or ``(N, out_features)``."""
        _check_points(x, self.dim)
        out = self.forward_all(x)
        return out[:, 0] if self.out_features == 1 else out

    def jet_all(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """Jets of all outputs: ``(N, out)``, ``(N, r, out)``, ``(N, out)``/``(N, r, r, out)``."""
        value, grad, second = x, _input_jet(x, directions), None
        for layer in self.hidden:
            value, grad, second = _linear_jet(layer, value, grad, second)
            value, grad, second = _activation_jet(
                self._activation, value, grad, second, full_hessian
            )
        return _linear_jet(self.output, value, grad, second)  # type: ignore[return-value]

    def _laplacian_jet_feature_major(self, x: torch.Tensor) -> Jet:
        """:meth:`jet_all` along the axes with the Laplacian, all streams in one matrix.

        The hidden state is one ``(width, (d + 2) N)`` matrix, column blocks ``[value | ∂_1 |
        ... | ∂_d | Laplacian]``: each layer is one matrix product ``W @ H`` (and the backward
        two), in the feature-major layout in which MKL multiplies these shapes fastest (1.3-1.6x
        over ``(N, width)`` rows on the benchmark machine; the whole MLP 8x64 residual gains
        about 8%, eager or compiled). The first layer uses that the gradient of x is the identity
        (``∂_j z = W[:, j]``) and its Laplacian zero. :meth:`jet` uses it for one output
        (outputs of width ``out`` come back transposed, slow for the wide TwoScaleNet output).
        """
        n, d = x.shape
        first, *rest = self.hidden
        weight = first.weight  # (m, d)
        t, s1, s2 = self._activation(torch.addmm(first.bias.unsqueeze(1), weight, x.t()))
        columns = [t] + [s1 * weight[:, j : j + 1] for j in range(d)]
        state = torch.cat([*columns, s2 * (weight * weight).sum(dim=1, keepdim=True)], dim=1)
        for layer in rest:
            z = layer.weight @ state  # (m, (d + 2) N)
            m = z.shape[0]
            grad = z[:, n : (d + 1) * n].reshape(m, d, n)
            t, s1, s2 = self._activation(z[:, :n] + layer.bias.unsqueeze(1))
            out_grad = (s1.unsqueeze(1) * grad).reshape(m, d * n)
            laplacian = s1 * z[:, (d + 1) * n :] + s2 * (grad * grad).sum(dim=1)
            state = torch.cat([t, out_grad, laplacian], dim=1)
        out = self.output.weight @ state  # (out, (d + 2) N)
        k = out.shape[0]
        value = (out[:, :n] + self.output.bias.unsqueeze(1)).t()
        grad = out[:, n : (d + 1) * n].reshape(k, d, n).permute(2, 1, 0)
        return value, grad, out[:, (d + 1) * n :].t()

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """See :meth:`_JetNetwork.jet`."""
        if self.out_features != 1:
            raise ValueError("jet: a scalar network is needed (out_features = 1); use jet_all")
        if not full_hessian and directions is None and _RECORDS is None:
            # Not while recording: the outer-product Jacobian needs the per-stream layer inputs.
            value, grad, second = self._laplacian_jet_feature_major(x)
        else:
            value, grad, second = self.jet_all(x, full_hessian, directions)
        return value[:, 0], grad[..., 0], second[..., 0]


class MultiscaleFourierNet(_JetNetwork):
    """The multiscale Fourier feature network (Ms-PINN) of §4.3 (Wang, Wang & Perdikaris).

    For each scale ``ϱ_k`` a fixed Gaussian matrix ``B^(k) ∈ R^{m×d}`` with entries
    ``~ N(0, ϱ_k²)`` gives the feature map ``F^(k)(x) = [cos(2π B^(k) x), sin(2π B^(k) x)]``;
    the SAME hidden layers (shared weights) act on every ``F^(k)``, and the last hidden states
    of all scales are concatenated into one linear output. Trainable parameters:
    ``(2m + 1) w + (depth - 1)(w + 1) w + K w + 1`` with ``K = len(scales)``.

    Args:
        dim: Input dimension d.
        scales: The standard deviations ``ϱ_k``; the paper: ``(1, 1/ε)``.
        width: Neurons per hidden layer (the paper: 128).
        depth: Number of hidden layers (the paper: 2).
        features: Number m of Gaussian frequencies per scale (default ``width // 2``, so that
            a feature map has ``width`` entries).
        activation: ``"tanh"``, ``"silu"`` or ``"sin"``.
        dtype: Parameter dtype (float64 by default).
        device: Device.
        seed: Seed of the Gaussian matrices and of the Glorot initialisation.
    """

    def __init__(
        self,
        dim: int,
        scales: Sequence[float] = (1.0,),
        width: int = 128,
        depth: int = 2,
        features: int | None = None,
        activation: str = "tanh",
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        if dim > 3:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        scales = tuple(float(s) for s in scales)
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of numbers > 0, got {scales}")
        self.scales = scales
        width = _check_positive_int("width", width)
        depth = _check_positive_int("depth", depth)
        features = max(1, width // 2) if features is None else features
        self.features_per_scale = _check_positive_int("features", features)
        self._activation = _activation(activation)
        generator = _generator(seed)
        matrices = torch.stack(
            [s * torch.randn(features, dim, generator=generator, dtype=dtype) for s in scales]
        )
        self.register_buffer("frequencies", matrices.to(device))  # (K, m, d), fixed
        sizes = [2 * features] + [width] * depth
        self.hidden = nn.ModuleList(
            _glorot_linear(a, b, generator, dtype, device) for a, b in itertools.pairwise(sizes)
        )
        self.output = _glorot_linear(len(scales) * width, 1, generator, dtype, device)

    @classmethod
    def for_problem(cls, problem: MultiscaleProblem, **kwargs: Any) -> MultiscaleFourierNet:
        """The paper's setting for a problem: scales ``(1, 1/ε)``, 2 x 128, tanh."""
        kwargs.setdefault("scales", (1.0, 1.0 / problem.eps))
        return cls(problem.dim, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, d)``."""
        _check_points(x, self.dim)
        states = []
        for k in range(len(self.scales)):
            phase = 2.0 * math.pi * x @ self.frequencies[k].t()
            h = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)
            for layer in self.hidden:
                h = self._activation(layer(h))[0]
            states.append(h)
        return self.output(torch.cat(states, dim=1))[:, 0]

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """See :meth:`_JetNetwork.jet`."""
        grad_x = _input_jet(x, directions)
        values, grads, seconds = [], [], []
        for k in range(len(self.scales)):
            omega = 2.0 * math.pi * self.frequencies[k].t()  # (d, m)
            phase, phase_grad = x @ omega, grad_x @ omega  # (N, m), (N, r, m)
            c, s = torch.cos(phase), torch.sin(phase)
            value = torch.cat([c, s], dim=1)
            grad = torch.cat([-s.unsqueeze(1) * phase_grad, c.unsqueeze(1) * phase_grad], dim=2)
            if full_hessian:
                outer = phase_grad.unsqueeze(2) * phase_grad.unsqueeze(1)
                second = torch.cat(
                    [-c[:, None, None, :] * outer, -s[:, None, None, :] * outer], dim=3
                )
            else:
                squared = (phase_grad * phase_grad).sum(dim=1)
                second = torch.cat([-c * squared, -s * squared], dim=1)
            for layer in self.hidden:
                value, grad, second = _linear_jet(layer, value, grad, second)
                value, grad, second = _activation_jet(
                    self._activation, value, grad, second, full_hessian
                )
            values.append(value)
            grads.append(grad)
            seconds.append(second)
        value, grad, second = _linear_jet(
            self.output,
            torch.cat(values, dim=-1),
            torch.cat(grads, dim=-1),
            torch.cat(seconds, dim=-1),
        )
        return value[:, 0], grad[..., 0], second[..., 0]  # type: ignore[index]


WAVEVECTOR_NORMS = ("max", "l1")


def fast_wavevectors(dim: int, k_max: int, norm: str = "max") -> torch.Tensor:
    """The integer wave vectors ``k ∈ Z^d``, ``0 < |k| <= k_max``, one of each pair ``±k``.

    ``cos(2π k·y)`` and ``sin(2π k·y)`` for ``-k`` repeat those of ``k`` (up to sign), so only
    the half with the first nonzero entry positive is kept.

    Args:
        dim: The dimension d.
        k_max: The largest norm of a wave vector, >= 0.
        norm: ``"max"`` (``|k|_∞ <= k_max``, the full cube, ``((2 k_max + 1)^d - 1) / 2``
            vectors) or ``"l1"`` (``|k|_1 <= k_max``, the cross-polytope: the axis harmonics
            up to ``k_max`` and fewer mixed ones; the same set in 1D). For a coefficient that
            is a sum of functions of one coordinate each (``paper_2d``) the corrector's
            spectrum is concentrated on the axes: measured on ``paper_2d(0.1)`` (width 64,
            output-layer least squares on 16 000 Sobol points), ``"l1"`` with ``k_max = 6``
            (84 harmonics) reaches relative L² 4e-4 where ``"max"`` with ``k_max = 4`` (80
            harmonics) gives 1.3e-3 with width 96 and 28 000 random points.
    """
    _check_positive_int("k_max", k_max, minimum=0)
    if norm not in WAVEVECTOR_NORMS:
        raise ValueError(f"norm must be one of {WAVEVECTOR_NORMS}, got {norm!r}")
    vectors = []
    for k in itertools.product(range(-k_max, k_max + 1), repeat=dim):
        nonzero = [entry for entry in k if entry != 0]
        if norm == "l1" and sum(abs(entry) for entry in k) > k_max:
            continue
        if nonzero and nonzero[0] > 0:
            vectors.append(k)
    return torch.tensor(vectors, dtype=torch.float64).reshape(-1, dim)


class TwoScaleNet(_JetNetwork):
    """The two-scale ansatz of Hoang & Schwab (4.1)/Theorem 4.3 with exact fast harmonics.

    ``v(x) = v_0(x) + ε Σ_{k∈𝒦} [a_k(x) cos(2π k·(x/ε)/p) + b_k(x) sin(2π k·(x/ε)/p)]`` where
    ``p`` is the period vector of the fast variable ``y = x/ε`` (``k·y/p`` means
    ``Σ_j k_j y_j / p_j``), ``𝒦`` are the wave vectors of :func:`fast_wavevectors` and the slow
    functions ``v_0, a_k, b_k`` are the ``1 + 2|𝒦|`` outputs of one MLP. With ``k_max = 0`` the
    network is ``v_0``.

    Args:
        dim: Input dimension d.
        eps: The scale ε.
        period: The period vector p of the fast variable (default all ones).
        k_max: Largest norm |k| of the harmonics' wave vectors.
        wavevector_norm: The norm of ``k_max``: ``"max"`` (all ``|k|_∞ <= k_max``) or
            ``"l1"`` (``|k|_1 <= k_max``); see :func:`fast_wavevectors`.
        width: Neurons per hidden layer of the slow MLP.
        depth: Hidden layers of the slow MLP.
        activation: ``"tanh"``, ``"silu"`` or ``"sin"``.
        input_scale: If given, the first layer is not Glorot but "spread": weights
            ``~ N(0, (input_scale/L_j)²)`` and biases that put the centre ``-b/w`` of each
            neuron at a uniform random point of ``domain``, so the hidden features are a
            well-spread basis of slow functions from the start (Glorot weights on (0, 1) make
            them almost linear). ``None`` keeps Glorot. Measured on ``paper_1d(0.01)``: the
            output-layer least squares alone reaches relative L² 9e-7 with the spread layer
            (width 16) and about 5e-3 with Glorot.
        domain: The box of the inputs for ``input_scale`` (default the unit box).
        dtype: Parameter dtype (float64 by default).
        device: Device.
        seed: Seed of the initialisation.
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        period: Sequence[float] | None = None,
        k_max: int = 14,
        width: int = 16,
        depth: int = 1,
        activation: str = "tanh",
        *,
        wavevector_norm: str = "max",
        input_scale: float | None = 5.0,
        domain: Box | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        if dim > 3:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        period = (1.0,) * dim if period is None else tuple(float(p) for p in period)
        if len(period) != dim or not all(math.isfinite(p) and p > 0 for p in period):
            raise ValueError(f"period must have {dim} finite entries > 0, got {period}")
        self.eps, self.period, self.k_max = float(eps), period, k_max
        self.wavevector_norm = wavevector_norm
        wavevectors = fast_wavevectors(dim, k_max, wavevector_norm)
        # Angular frequencies of the harmonics in x: ω_k = 2π k / (ε p).
        omega = 2.0 * math.pi * wavevectors / (self.eps * torch.tensor(period, dtype=torch.float64))
        self.register_buffer("omega", omega.to(dtype=dtype, device=device))  # (n, d)
        self.num_harmonics = wavevectors.shape[0]
        self.slow = MLP(
            dim,
            width,
            depth,
            activation,
            out_features=1 + 2 * self.num_harmonics,
            dtype=dtype,
            device=device,
            seed=seed,
        )
        if input_scale is not None:
            if not (math.isfinite(input_scale) and input_scale > 0):
                raise ValueError(f"input_scale must be a finite number > 0, got {input_scale}")
            domain = Box.unit(dim) if domain is None else domain
            if domain.dim != dim:
                raise ValueError(f"domain must have dimension {dim}, got {domain.dim}")
            generator = _generator(None if seed is None else seed + 1)
            lengths = torch.tensor(domain.lengths, dtype=torch.float64)
            lower = torch.tensor(domain.lower, dtype=torch.float64)
            first = self.slow.hidden[0]
            weight = (
                input_scale
                * torch.randn(first.weight.shape, generator=generator, dtype=torch.float64)
                / lengths
            )
            centres = lower + lengths * torch.rand(
                first.weight.shape, generator=generator, dtype=torch.float64
            )
            with torch.no_grad():
                first.weight.copy_(weight)
                first.bias.copy_(-(weight * centres).sum(dim=1))

    @classmethod
    def for_problem(cls, problem: MultiscaleProblem, **kwargs: Any) -> TwoScaleNet:
        """A two-scale network on the problem's ε, period vector and domain."""
        if problem.period is None:
            raise ValueError("problem: TwoScaleNet needs a problem with a period vector")
        kwargs.setdefault("domain", problem.domain)
        return cls(problem.dim, problem.eps, problem.period, **kwargs)

    def _harmonics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phase = x @ self.omega.t()
        return torch.cos(phase), torch.sin(phase)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, d)``."""
        _check_points(x, self.dim)
        slow = self.slow.forward_all(x)
        if self.num_harmonics == 0:
            return slow[:, 0]
        c, s = self._harmonics(x)
        n = self.num_harmonics
        fast = (slow[:, 1 : 1 + n] * c).sum(dim=1) + (slow[:, 1 + n :] * s).sum(dim=1)
        return slow[:, 0] + self.eps * fast

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """See :meth:`_JetNetwork.jet`."""
        value, grad, second = self.slow.jet_all(x, full_hessian, directions)
        if self.num_harmonics == 0:
            return value[:, 0], grad[..., 0], second[..., 0]
        grad_x = _input_jet(x, directions)
        phase, phase_grad = x @ self.omega.t(), grad_x @ self.omega.t()  # (N, n), (N, r, n)
        c, s = torch.cos(phase), torch.sin(phase)
        harmonic_value = torch.cat([c, s], dim=1)
        harmonic_grad = torch.cat([-s.unsqueeze(1) * phase_grad, c.unsqueeze(1) * phase_grad], 2)
        if full_hessian:
            outer = phase_grad.unsqueeze(2) * phase_grad.unsqueeze(1)
            harmonic_second = torch.cat(
                [-c[:, None, None, :] * outer, -s[:, None, None, :] * outer], dim=3
            )
        else:
            squared = (phase_grad * phase_grad).sum(dim=1)
            harmonic_second = torch.cat([-c * squared, -s * squared], dim=1)
        products = _product_jet(
            (value[:, 1:], grad[..., 1:], second[..., 1:]),
            (harmonic_value, harmonic_grad, harmonic_second),
            full_hessian,
        )
        return (
            value[:, 0] + self.eps * products[0].sum(dim=-1),
            grad[..., 0] + self.eps * products[1].sum(dim=-1),
            second[..., 0] + self.eps * products[2].sum(dim=-1),
        )


_JVP_LOADED = False


def load_forward_mode() -> None:
    """Load torch's forward-mode (jvp) decompositions once, without their deprecation warning.

    ``torch.func.jacfwd`` imports ``torch._decomp.decompositions_for_jvp`` on first use, which
    calls the deprecated ``torch.jit.script`` and warns; the warning is torch's, not the
    user's, so it is silenced here.
    """
    global _JVP_LOADED
    if _JVP_LOADED:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    _JVP_LOADED = True


def _distance_jet(
    distance: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    full_hessian: bool,
    directions: torch.Tensor | None,
) -> Jet:
    """Jet of a parameter-free scalar function by torch.func (works batched and under vmap)."""

    def single(point: torch.Tensor) -> torch.Tensor:
        return distance(point.unsqueeze(0)).reshape(())

    value = torch.func.vmap(single)(x)
    gradient = torch.func.vmap(torch.func.jacrev(single))(x)  # (N, d)
    load_forward_mode()
    hessian = torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(single)))(x)  # (N, d, d)
    tangents = _input_jet(x, directions)  # (N, r, d)
    grad = (tangents @ gradient.unsqueeze(-1))[..., 0]
    projected = tangents @ hessian @ tangents.transpose(1, 2)
    second = projected if full_hessian else torch.diagonal(projected, dim1=1, dim2=2).sum(-1)
    return value, grad, second


def jet_cacheable(x: torch.Tensor, directions: torch.Tensor | None) -> bool:
    """Whether the fixed factors' jets at ``x`` may be cached (plain points, coordinate axes).

    Points with ``requires_grad``, inference tensors, points under ``torch.func`` transforms
    and tracing are never cached.
    """
    return (
        directions is None
        and not x.requires_grad
        and not x.is_inference()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and not torch.compiler.is_compiling()
    )


class HardBoundaryNet(_JetNetwork):
    """The hard boundary condition ``v(x) = l(x) N(x)`` (the paper's, ``l = 4x(1 - x)`` in 1D).

    Args:
        network: The network N (any :class:`_JetNetwork`, e.g. :class:`MultiscaleFourierNet`).
        distance: A problem (its ``distance`` function is used) or a torch callable
            ``(N, d) -> (N,)`` vanishing on the boundary.
    """

    satisfies_boundary_condition = True

    def __init__(
        self,
        network: _JetNetwork,
        distance: MultiscaleProblem | Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.network = network
        self.dim = network.dim
        if isinstance(distance, MultiscaleProblem):
            if distance.dim != network.dim:
                raise ValueError(
                    f"distance: problem dimension {distance.dim} != network dimension {network.dim}"
                )
            distance = distance.distance
        if not callable(distance):
            raise ValueError("distance must be a MultiscaleProblem or a callable (N, d) -> (N,)")
        self.distance = distance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, d)``."""
        return self.distance(x) * self.network(x)

    def _distance_jet(
        self, x: torch.Tensor, full_hessian: bool, directions: torch.Tensor | None
    ) -> Jet:
        """The jet of ``l``, cached for fixed collocation points.

        ``l`` has no parameters, so its jet at the same points never changes; by ``torch.func``
        it costs as much as a quarter of the MLP 8x64 jet. It is cached (a few point sets) for
        plain tensors without ``requires_grad`` along the coordinate axes, keyed by the tensor's
        identity and version counter (an in-place change of the points invalidates it); points
        under ``torch.func`` transforms or tracing are never cached.
        """
        cacheable = jet_cacheable(x, directions)
        if not cacheable:
            return _distance_jet(self.distance, x, full_hessian, directions)
        cache: list[tuple[torch.Tensor, int, bool, Any, Jet]] = self.__dict__.setdefault(
            "_distance_cache", []
        )
        for points, version, hessian, distance, jet in cache:
            if (
                points is x
                and version == x._version
                and hessian == full_hessian
                and distance is self.distance
            ):
                return jet
        jet = _distance_jet(self.distance, x, full_hessian, None)
        jet = (jet[0].detach(), jet[1].detach(), jet[2].detach())
        cache.insert(0, (x, x._version, full_hessian, self.distance, jet))
        del cache[4:]
        return jet

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """See :meth:`_JetNetwork.jet`."""
        return _product_jet(
            self._distance_jet(x, full_hessian, directions),
            self.network.jet(x, full_hessian, directions),
            full_hessian,
        )

    def compiled_jet(self, x: torch.Tensor, full_hessian: bool = False) -> Jet:
        """The jet with the inner network compiled (:func:`compiled_jet`); ``l`` stays eager."""
        return _product_jet(
            self._distance_jet(x, full_hessian, None),
            self.network.compiled_jet(x, full_hessian),  # type: ignore[operator]
            full_hessian,
        )


class TransfiniteBoundaryNet(_JetNetwork):
    """Zero boundary values on a box by the transfinite projection ``v = Π_j (I - P_j) N``.

    ``(P_j N)(x) = (1 - t_j) N(x|x_j=a_j) + t_j N(x|x_j=b_j)`` with
    ``t_j = (x_j - a_j)/(b_j - a_j)`` interpolates linearly between the faces normal to ``x_j``;
    the product of the ``I - P_j`` vanishes on every face. In 1D:
    ``v(x) = N(x) - (1 - t) N(a) - t N(b)``. The expansion has ``3^d`` terms (3, 9, 27 network
    evaluations). What is subtracted is slow in ``x_j``, so a :class:`TwoScaleNet` keeps its
    slow/fast separation (the factor ``l(x)`` of :class:`HardBoundaryNet` destroys it).

    Args:
        network: The network N.
        domain: The box (or a problem, whose domain is used).
    """

    satisfies_boundary_condition = True

    def __init__(self, network: _JetNetwork, domain: Box | MultiscaleProblem) -> None:
        super().__init__()
        if isinstance(domain, MultiscaleProblem):
            domain = domain.domain
        if not isinstance(domain, Box) or domain.dim != network.dim:
            raise ValueError(f"domain: a Box of dimension {network.dim} is needed, got {domain}")
        self.network = network
        self.dim = network.dim
        self.domain = domain
        # Each term fixes a subset of coordinates at the lower (1) or upper (2) face; 0 = free.
        self._terms = list(itertools.product((0, 1, 2), repeat=self.dim))

    def _term_points_and_weights(
        self, x: torch.Tensor, term: tuple[int, ...]
    ) -> tuple[torch.Tensor, Jet, torch.Tensor]:
        lower = torch.tensor(self.domain.lower, dtype=x.dtype, device=x.device)
        upper = torch.tensor(self.domain.upper, dtype=x.dtype, device=x.device)
        t = (x - lower) / (upper - lower)
        columns, mask = [], []
        factors = []
        for j, choice in enumerate(term):
            if choice == 0:
                columns.append(x[:, j])
                mask.append(1.0)
                factors.append(None)
                continue
            face = lower[j] if choice == 1 else upper[j]
            columns.append(torch.zeros_like(x[:, j]) + face)
            mask.append(0.0)
            # -(1 - t_j) for the lower face, -t_j for the upper one: a linear factor in x_j.
            factor = -(1.0 - t[:, j]) if choice == 1 else -t[:, j]
            slope = (1.0 if choice == 1 else -1.0) / (upper[j] - lower[j])
            factors.append((factor, slope))
        points = torch.stack(columns, dim=1)
        mask_tensor = torch.tensor(mask, dtype=x.dtype, device=x.device)
        return points, self._weight_jet(x, factors), mask_tensor

    @staticmethod
    def _weight_jet(x: torch.Tensor, factors: list[Any]) -> Jet:
        """Jet (gradient/Hessian in the coordinate axes) of Π_j factor_j(x_j).

        Built without in-place writes so that it works under ``torch.func.vmap``.
        """
        d = x.shape[1]
        zero = torch.zeros_like(x[:, 0])

        def product(skip: tuple[int, ...]) -> torch.Tensor:
            value = torch.ones_like(x[:, 0])
            for j, item in enumerate(factors):
                if item is not None and j not in skip:
                    value = value * item[0]
            return value

        value = product(())
        grad = torch.stack(
            [zero if factors[j] is None else factors[j][1] * product((j,)) for j in range(d)],
            dim=1,
        )
        rows = []
        for j in range(d):
            row = []
            for k in range(d):
                if j == k or factors[j] is None or factors[k] is None:
                    row.append(zero)
                else:
                    row.append(factors[j][1] * factors[k][1] * product((j, k)))
            rows.append(torch.stack(row, dim=1))
        return value, grad, torch.stack(rows, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Values ``(N,)`` at points ``(N, d)``."""
        _check_points(x, self.dim)
        total = torch.zeros_like(x[:, 0])
        for term in self._terms:
            points, (weight, _, _), _ = self._term_points_and_weights(x, term)
            total = total + weight * self.network(points)
        return total

    def jet(
        self, x: torch.Tensor, full_hessian: bool = False, directions: torch.Tensor | None = None
    ) -> Jet:
        """See :meth:`_JetNetwork.jet`."""
        _n, _d = x.shape
        tangents = _input_jet(x, directions)  # (N, r, d)
        total: Jet | None = None
        for term in self._terms:
            points, (w, w_grad, w_hess), mask = self._term_points_and_weights(x, term)
            # The fixed coordinates do not move with x: differentiate N only along the free ones.
            inner = self.network.jet(points, full_hessian, tangents * mask)
            w_projected_grad = (tangents @ w_grad.unsqueeze(-1))[..., 0]
            w_projected_hess = tangents @ w_hess @ tangents.transpose(1, 2)
            if not full_hessian:
                w_projected_hess = torch.diagonal(w_projected_hess, dim1=1, dim2=2).sum(-1)
            term_jet = _product_jet((w, w_projected_grad, w_projected_hess), inner, full_hessian)
            total = (
                term_jet
                if total is None
                else (total[0] + term_jet[0], total[1] + term_jet[1], total[2] + term_jet[2])
            )
        assert total is not None
        return total
