r"""The derivative table of element-wise activations, read by every second-order walker.

For each activation type :math:`y = \phi(x)` (applied entry by entry, with the
module's own options: slopes, ``alpha``, ``beta``/``threshold``, ``min_val``/
``max_val``, ``lambd``, ``approximate``) the table holds

* ``value``: :math:`\phi(x)`, never in place;
* ``df``: :math:`\phi'(x)`;
* ``d2f``: :math:`\phi''(x)`, or ``None`` where it vanishes wherever it exists
  (piecewise-linear activations: ReLU, LeakyReLU, ReLU6, Hardtanh, Hardsigmoid,
  Hardshrink, Softshrink, Threshold).

At a kink the one-sided derivative PyTorch's autograd uses is taken (``df(0) = 0`` for
ReLU). KFRA (:mod:`bayescurv.engine.kfra`) needs ``df``; the Hessian walker on chains
(:mod:`bayescurv.engine.hessian.chain`) needs ``df`` and, for the residual
:math:`g \odot \phi''(x)` of the exact Hessian, ``d2f``. Lookup is by exact type,
like the layer rules.

Example:
    >>> import torch
    >>> from torch import nn
    >>> entry = ACTIVATIONS[nn.Tanh]
    >>> x = torch.tensor([0.0, 1.0])
    >>> t = torch.tanh(x)
    >>> torch.allclose(entry.d2f(nn.Tanh(), x), -2 * t * (1 - t**2))
    True
    >>> ACTIVATIONS[nn.ReLU].d2f is None  # piecewise linear
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Function = Callable[[nn.Module, Tensor], Tensor]

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


@dataclass(frozen=True)
class Elementwise:
    """Value and derivatives of one element-wise activation type.

    Attributes:
        value: ``(module, x) -> phi(x)`` (out of place).
        df: ``(module, x) -> phi'(x)``.
        d2f: ``(module, x) -> phi''(x)``, ``None`` if it is zero almost everywhere.
    """

    value: Function
    df: Function
    d2f: Function | None = None

    @property
    def hessian_is_zero(self) -> bool:
        """Whether the activation is piecewise linear (no second-order residual)."""
        return self.d2f is None


def _mask(condition: Tensor, like: Tensor) -> Tensor:
    return condition.to(like.dtype)


def _inside(x: Tensor, low: float, high: float) -> Tensor:
    return _mask((x > low) & (x < high), x)


def _sigmoid_d2(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s) * (1 - 2 * s)


def _tanh_d2(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return -2 * t * (1 - t * t)


def _gelu_df(m: nn.GELU, x: Tensor) -> Tensor:
    if m.approximate == "tanh":
        t, du = torch.tanh(_gelu_u(x)), _gelu_du(x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
    return _normal_cdf(x) + x * _normal_pdf(x)


def _gelu_d2f(m: nn.GELU, x: Tensor) -> Tensor:
    if m.approximate == "tanh":
        t, du = torch.tanh(_gelu_u(x)), _gelu_du(x)
        d2u = _SQRT_2_OVER_PI * 6 * _GELU_CUBIC * x
        return (1 - t * t) * (du + 0.5 * x * (d2u - 2 * t * du * du))
    return _normal_pdf(x) * (2 - x * x)


def _gelu_u(x: Tensor) -> Tensor:
    return _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3)


def _gelu_du(x: Tensor) -> Tensor:
    return _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))


def _normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _silu_df(m: nn.Module, x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_d2f(m: nn.Module, x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _mish_df(m: nn.Module, x: Tensor) -> Tensor:
    t, s = torch.tanh(F.softplus(x)), torch.sigmoid(x)
    return t + x * (1 - t * t) * s


def _mish_d2f(m: nn.Module, x: Tensor) -> Tensor:
    t, s = torch.tanh(F.softplus(x)), torch.sigmoid(x)
    return (1 - t * t) * (2 * s + x * s * (1 - s) - 2 * x * t * s * s)


def _softplus_df(m: nn.Softplus, x: Tensor) -> Tensor:
    linear = m.beta * x > m.threshold
    return torch.where(linear, torch.ones_like(x), torch.sigmoid(m.beta * x))


def _softplus_d2f(m: nn.Softplus, x: Tensor) -> Tensor:
    s = torch.sigmoid(m.beta * x)
    curved = m.beta * s * (1 - s)
    return torch.where(m.beta * x > m.threshold, torch.zeros_like(x), curved)


def _exp_branch(x: Tensor, positive: float, negative: Tensor) -> Tensor:
    """``positive`` where ``x > 0``, else ``negative`` (ELU-like derivatives)."""
    return torch.where(x > 0, torch.full_like(x, positive), negative)


ACTIVATIONS: dict[type[nn.Module], Elementwise] = {
    # piecewise linear
    nn.ReLU: Elementwise(lambda m, x: F.relu(x), lambda m, x: _mask(x > 0, x)),
    nn.LeakyReLU: Elementwise(
        lambda m, x: F.leaky_relu(x, m.negative_slope),
        lambda m, x: torch.where(
            x > 0, torch.ones_like(x), torch.full_like(x, m.negative_slope)
        ),
    ),
    nn.ReLU6: Elementwise(lambda m, x: F.relu6(x), lambda m, x: _inside(x, 0, 6)),
    nn.Hardtanh: Elementwise(
        lambda m, x: F.hardtanh(x, m.min_val, m.max_val),
        lambda m, x: _inside(x, m.min_val, m.max_val),
    ),
    nn.Hardsigmoid: Elementwise(
        lambda m, x: F.hardsigmoid(x), lambda m, x: _inside(x, -3, 3) / 6
    ),
    nn.Hardshrink: Elementwise(
        lambda m, x: F.hardshrink(x, m.lambd), lambda m, x: _mask(x.abs() > m.lambd, x)
    ),
    nn.Softshrink: Elementwise(
        lambda m, x: F.softshrink(x, m.lambd), lambda m, x: _mask(x.abs() > m.lambd, x)
    ),
    nn.Threshold: Elementwise(
        lambda m, x: F.threshold(x, m.threshold, m.value),
        lambda m, x: _mask(x > m.threshold, x),
    ),
    # with a second derivative
    nn.Hardswish: Elementwise(
        lambda m, x: F.hardswish(x),
        lambda m, x: torch.where(
            x >= 3, torch.ones_like(x), _inside(x, -3, 3) * (2 * x + 3) / 6
        ),
        lambda m, x: _inside(x, -3, 3) / 3,
    ),
    nn.Tanh: Elementwise(
        lambda m, x: torch.tanh(x),
        lambda m, x: 1 - torch.tanh(x) ** 2,
        lambda m, x: _tanh_d2(x),
    ),
    nn.Sigmoid: Elementwise(
        lambda m, x: torch.sigmoid(x),
        lambda m, x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
        lambda m, x: _sigmoid_d2(x),
    ),
    nn.ELU: Elementwise(
        lambda m, x: F.elu(x, m.alpha),
        lambda m, x: _exp_branch(x, 1.0, m.alpha * torch.exp(x)),
        lambda m, x: _exp_branch(x, 0.0, m.alpha * torch.exp(x)),
    ),
    nn.CELU: Elementwise(
        lambda m, x: F.celu(x, m.alpha),
        lambda m, x: _exp_branch(x, 1.0, torch.exp(x / m.alpha)),
        lambda m, x: _exp_branch(x, 0.0, torch.exp(x / m.alpha) / m.alpha),
    ),
    nn.SELU: Elementwise(
        lambda m, x: F.selu(x),
        lambda m, x: _exp_branch(x, _SELU_SCALE, _SELU_SCALE * _SELU_ALPHA * x.exp()),
        lambda m, x: _exp_branch(x, 0.0, _SELU_SCALE * _SELU_ALPHA * x.exp()),
    ),
    nn.GELU: Elementwise(
        lambda m, x: F.gelu(x, approximate=m.approximate), _gelu_df, _gelu_d2f
    ),
    nn.SiLU: Elementwise(lambda m, x: F.silu(x), _silu_df, _silu_d2f),
    nn.Mish: Elementwise(lambda m, x: F.mish(x), _mish_df, _mish_d2f),
    nn.Softplus: Elementwise(
        lambda m, x: F.softplus(x, m.beta, m.threshold), _softplus_df, _softplus_d2f
    ),
    nn.Softsign: Elementwise(
        lambda m, x: F.softsign(x),
        lambda m, x: (1 + x.abs()) ** -2,
        lambda m, x: -2 * torch.sign(x) * (1 + x.abs()) ** -3,
    ),
    nn.LogSigmoid: Elementwise(
        lambda m, x: F.logsigmoid(x),
        lambda m, x: torch.sigmoid(-x),
        lambda m, x: -torch.sigmoid(x) * torch.sigmoid(-x),
    ),
    nn.Tanhshrink: Elementwise(
        lambda m, x: F.tanhshrink(x),
        lambda m, x: torch.tanh(x) ** 2,
        lambda m, x: -_tanh_d2(x),
    ),
}
"""Element-wise activation types (exact) and their value and derivatives."""


def elementwise(module: nn.Module) -> Elementwise | None:
    """The table entry of a module's exact type, or ``None``."""
    return ACTIVATIONS.get(type(module))
