r"""Products with a parameter block of the positive-curvature Hessian (``PCHMP``).

Chen, Chou & Chang, "BDA-PCH: Block-Diagonal Approximation of Positive-Curvature
Hessian" (2018). For a network of layers that are affine in their input and
element-wise activations :math:`a = \phi(x)`, the Hessian w.r.t. a parameter
:math:`\theta` is

.. math::
    H = J_f^\top (\nabla_f^2 \ell) J_f + \sum_k J_k^\top \operatorname{diag}(r_k) J_k,
    \qquad r_k = \delta_k \odot \phi_k''(x_k),

with :math:`J_k = \partial x_k / \partial \theta`, :math:`\delta_k = \partial \ell /
\partial a_k` and the sum over activation calls downstream of :math:`\theta`. The PCH
replaces :math:`r_k` by :math:`\max(r_k, 0)` (``"clip"``) or :math:`|r_k|` (``"abs"``),
so it is the exact Hessian plus :math:`\sum_k J_k^\top \operatorname{diag}(c\,
\max(-r_k, 0)) J_k` with :math:`c = 1` (clip) or 2 (abs); this is how it is computed
here: a Hessian-vector product and one Jacobian sandwich over the activation inputs.
:math:`\phi''` comes from the engine's activation table.

# NOTE [BackPACK 1.7's PCHMP squares the gradient]
# BackPACK 1.7.1's PCHMP multiplies the activation residual, which already contains
# delta (``hessian_diagonal = phi'' * g_out``), by ``g_out`` once more, i.e. it uses
# delta^2 phi''. For ReLU networks (phi'' = 0) both agree; with sigmoid or tanh
# BackPACK's products differ from the PCH defined above (which bayescurv returns, as
# the paper defines it). docs/migrating_backpack.md gives the numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv.engine.activations import ACTIVATIONS
from bayescurv.engine.autodiff import batched_grad
from bayescurv.engine.hessian.chain import CHAIN_MODULES, Kind

_AFFINE_EXTRA = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FACTOR = {"clip": 1.0, "abs": 2.0}

# (activation module, its input, its output) of one call
ActivationCall = tuple[nn.Module, Tensor, Tensor]


def smooth_activations(model: nn.Module) -> list[nn.Module]:
    """The element-wise activations with a second derivative in ``model``.

    Raises:
        NotImplementedError: If a leaf module is neither affine in its input nor an
            element-wise activation (the PCH is not defined), or such an activation
            works in place.
    """
    smooth = []
    for name, m in model.named_modules():
        if any(True for _ in m.children()):
            continue
        kind = CHAIN_MODULES.get(
            type(m), Kind.AFFINE if isinstance(m, _AFFINE_EXTRA) else None
        )
        batch_stats = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        if kind is None or batch_stats:
            raise NotImplementedError(
                "PCHMP: the positive-curvature Hessian is defined for networks of "
                "layers that are affine in their input (eval-mode BatchNorm) and "
                f"element-wise activations; {type(m).__name__} at '{name}' is "
                "neither. Use HMP (exact Hessian blocks) or GGNMP (positive "
                "semi-definite) instead."
            )
        if kind == Kind.SMOOTH:
            if getattr(m, "inplace", False):
                raise NotImplementedError(
                    f"PCHMP: {type(m).__name__} at '{name}' works in place, which "
                    "overwrites its input; construct it with inplace=False."
                )
            smooth.append(m)
    return smooth


@contextmanager
def activation_calls(model: nn.Module) -> Iterator[list[ActivationCall]]:
    """Record the calls of ``model``'s smooth element-wise activations."""
    calls: list[ActivationCall] = []
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.append((m, i[0], o)))
        for m in smooth_activations(model)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Correction:
    r"""What :math:`\sum_k J_k^\top \operatorname{diag}(w_k) J_k v` needs (all params).

    Attributes:
        inputs: The activation inputs :math:`x_k` (in the graph).
        weights: :math:`w_k = c \max(-\delta_k \odot \phi_k''(x_k), 0)`.
        dummies: Zeros shaped like the inputs, the points of the double-vjp trick.
        transposed: Per parameter, :math:`\sum_k J_k^\top u_k` at the dummies (with its
            graph), ``None`` if no activation input depends on the parameter.
    """

    inputs: list[Tensor]
    weights: list[Tensor]
    dummies: list[Tensor]
    transposed: list[Tensor | None]


def correction(
    loss: Tensor, calls: list[ActivationCall], params: list[Tensor], modify: str
) -> Correction:
    """The activation terms that turn Hessian blocks into PCH blocks."""
    calls = [c for c in calls if c[1].requires_grad]
    if not calls:
        return Correction([], [], [], [None] * len(params))
    deltas = torch.autograd.grad(
        loss, [c[2] for c in calls], retain_graph=True, materialize_grads=True
    )
    weights = [
        _FACTOR[modify]
        * (-delta * ACTIVATIONS[type(m)].d2f(m, x.detach())).clamp(min=0)
        for (m, x, _), delta in zip(calls, deltas, strict=True)
    ]
    inputs = [c[1] for c in calls]
    dummies = [torch.zeros_like(x, requires_grad=True) for x in inputs]
    transposed = torch.autograd.grad(
        inputs, params, dummies, create_graph=True, allow_unused=True
    )
    return Correction(inputs, weights, dummies, list(transposed))


def correction_product(
    parts: Correction, index: int, param: Tensor, mat: Tensor
) -> Tensor:
    r""":math:`\sum_k J_k^\top \operatorname{diag}(w_k) J_k v` for ``K`` vectors.

    :math:`J_k v` is the derivative of :math:`u \mapsto \sum_k J_k^\top u_k` in
    direction :math:`v` (the double-vjp trick).
    """
    transposed = parts.transposed[index]
    if transposed is None:  # no activation downstream of the parameter
        return torch.zeros_like(mat)
    jv = batched_grad([transposed], parts.dummies, [mat])
    columns = [w * j for w, j in zip(parts.weights, jv, strict=True)]
    return batched_grad(parts.inputs, [param], columns)[0]
