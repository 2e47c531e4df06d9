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
here: a Hessian-vector product and one Jacobian sandwich per activation call.

# NOTE [BackPACK 1.7's PCHMP squares the gradient]
# BackPACK 1.7.1's PCHMP multiplies the activation residual, which already contains
# delta (``hessian_diagonal = phi'' * g_out``), by ``g_out`` once more, i.e. it uses
# delta^2 phi''. For ReLU networks (phi'' = 0) both agree; with sigmoid or tanh
# BackPACK's products differ from the PCH defined above (which bayescurv returns, as
# the paper defines it). docs/migrating_backpack.md gives the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bayescurv.engine.activations import ACTIVATIONS
from bayescurv.engine.autodiff import batched_grad, twice_differentiable
from bayescurv.engine.hessian.chain import CHAIN_MODULES, Kind

_AFFINE_EXTRA = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FACTOR = {"clip": 1.0, "abs": 2.0}


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


def pch_block_product(
    model: nn.Module,
    loss_func: nn.Module,
    args: Sequence[Tensor],
    targets: Tensor,
    param: nn.Parameter,
    mat: Tensor,
    modify: str,
) -> Tensor:
    """Multiply ``K`` vectors ``mat: [K, *p]`` with ``param``'s block of the PCH.

    Args:
        model: The model (affine layers and element-wise activations).
        loss_func: The loss (its Hessian w.r.t. the output is positive semi-definite).
        args: The model inputs.
        targets: The targets.
        param: The parameter whose diagonal block multiplies.
        mat: The vectors, ``[K, *param.shape]``.
        modify: ``"clip"`` or ``"abs"``.

    Returns:
        ``[K, *param.shape]``.
    """
    activations = smooth_activations(model)
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.append((m, i[0], o)))
        for m in activations
    ]
    try:
        with twice_differentiable():
            output = model(*args)
    finally:
        for handle in handles:
            handle.remove()
    loss = loss_func(output, targets)
    (grad,) = torch.autograd.grad(loss, param, create_graph=True, allow_unused=True)
    if grad is None or not grad.requires_grad:
        return torch.zeros_like(mat)
    hessian = batched_grad([grad], [param], [mat])[0]
    calls = [c for c in calls if c[1].requires_grad]
    if not calls:
        return hessian
    deltas = torch.autograd.grad(
        loss, [c[2] for c in calls], retain_graph=True, materialize_grads=True
    )
    weights = [
        _FACTOR[modify]
        * (-delta * ACTIVATIONS[type(m)].d2f(m, x.detach())).clamp(min=0)
        for (m, x, _), delta in zip(calls, deltas, strict=True)
    ]
    return hessian + _sandwich([c[1] for c in calls], param, weights, mat)


def _sandwich(
    xs: list[Tensor], param: nn.Parameter, weights: list[Tensor], mat: Tensor
) -> Tensor:
    r""":math:`\sum_k J_k^\top \operatorname{diag}(w_k) J_k v` for ``K`` vectors.

    :math:`J_k v` is the derivative of :math:`u \mapsto \sum_k J_k^\top u_k` in
    direction :math:`v` (the double-vjp trick; the ``u_k`` are dummies at zero).
    """
    dummies = [torch.zeros_like(x, requires_grad=True) for x in xs]
    (jt,) = torch.autograd.grad(
        xs, param, dummies, create_graph=True, allow_unused=True
    )
    if jt is None:  # no activation downstream of the parameter
        return torch.zeros_like(mat)
    jv = batched_grad([jt], dummies, [mat])
    columns = [w * j for w, j in zip(weights, jv, strict=True)]
    return batched_grad(xs, [param], columns)[0]
