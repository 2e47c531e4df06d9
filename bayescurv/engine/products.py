r"""Matrix-free curvature-matrix products on one batch: GGN, Hessian, empirical Fisher.

With :math:`f = f(\theta)` the model output ``[N, *out]`` on the batch, :math:`J`
its Jacobian w.r.t. the trainable parameters :math:`\theta` and :math:`\ell` the loss
(with its ``reduction``), the products with a vector :math:`v` are

.. math::
    G v = J^\top \big(\nabla_f^2 \ell\big) J v, \qquad
    H v = \nabla_\theta^2 \ell\; v, \qquad
    F v = \sum_n g_n\, g_n^\top v = J^\top \big(\textstyle\sum_n r_n r_n^\top\big) J v,

where :math:`g_n = J_n^\top r_n` are the individual gradients scaled as in the reduced
loss (``grad_batch`` of :class:`~bayescurv.engine.BatchGrad`) and
:math:`r_n = \partial \ell / \partial f_n`. No Jacobian is ever formed: :math:`Jv`
comes from the double-vjp trick (differentiate the linear map :math:`u \mapsto
J^\top u` w.r.t. :math:`u`), :math:`J^\top w` from one more vjp, and the Hessian
product from differentiating the gradient again (Pearlmutter's trick). A block of
``K`` vectors is handled in one batched pass (``torch.func.vmap`` over the vjps).

The Monte Carlo GGN replaces :math:`\nabla_{f_n}^2 \ell` per sample by
:math:`\frac{1}{M}\sum_m \tilde s_{mn} \tilde s_{mn}^\top` with the same sampled
columns as :class:`~bayescurv.engine.DiagGGNMC` (unbiased; all ``K`` vectors of a
block share the draws, so a block is multiplied by one fixed random matrix).

Vectors may be a dict ``name -> [*p]``, a list in ``named_parameters()`` order or a
flat ``[P]`` tensor, each optionally with a leading block axis ``K``; the product has
the same layout (see :mod:`bayescurv.engine.vectors`). For sums over a data loader
see :mod:`bayescurv.engine.operators`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import torch
from torch import Tensor, nn

from bayescurv.engine.autodiff import batched_grad, twice_differentiable
from bayescurv.engine.boundary import (
    check_generator,
    check_parameters,
    check_targets,
    model_args,
    model_output,
)
from bayescurv.engine.losses import LossRule, loss_rule
from bayescurv.engine.selection import ParamSelection, select_parameters
from bayescurv.engine.vectors import Vector, as_block


class Curvature(str, Enum):
    """Which curvature matrix a product multiplies with."""

    GGN = "ggn"
    """The generalized Gauss-Newton matrix :math:`J^\\top (\\nabla_f^2 \\ell) J`."""
    HESSIAN = "hessian"
    """The Hessian of the loss w.r.t. the parameters."""
    EF = "ef"
    """The empirical Fisher :math:`\\sum_n g_n g_n^\\top` of individual gradients."""


def ggn_vector_product(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    vector: Vector,
    *,
    params: ParamSelection = None,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Vector:
    r"""Multiply the GGN (exact, or Monte Carlo with ``mc_samples``) with vectors.

    ``.grad`` is never touched.

    Args:
        model: Any module; the product is over the selected parameters.
        loss_func: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
            (reduction ``"mean"`` or ``"sum"``; the GGN is that of the loss as reduced).
        inputs: Model input ``[N, ...]`` (a tuple is unpacked into ``model(*inputs)``).
        targets: Targets matching the loss.
        vector: ``name -> [*p]`` dict, list or flat ``[P]`` tensor over the selected
            parameters (in ``named_parameters()`` order); with a leading axis
            ``[K, ...]`` for a block of ``K`` vectors.
        params: Which parameters the curvature is over: names and/or parameter
            tensors of ``model`` (default: every trainable one), as for
            :func:`~bayescurv.engine.backprop`. The other parameters are held fixed.
        mc_samples: If given, use ``mc_samples`` sampled loss-Hessian columns per
            sample (the Monte Carlo GGN, fresh draws on every call).
        generator: Random generator for the Monte Carlo draws (default: global).

    Returns:
        :math:`G v` in the layout of ``vector``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(6, 3), torch.randn(6, 1)
        >>> v = torch.randn(3)
        >>> # linear model + MSE (sum): the GGN is 2 X^T X
        >>> Gv = engine.ggn_vector_product(model, nn.MSELoss(reduction="sum"), x, y, v)
        >>> torch.allclose(Gv, 2 * x.T @ (x @ v), atol=1e-6)
        True
    """
    _check_mc(mc_samples, generator)
    return _product(
        Curvature.GGN,
        model,
        loss_func,
        inputs,
        targets,
        vector,
        params,
        mc_samples,
        generator,
    )


def hessian_vector_product(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    vector: Vector,
    *,
    params: ParamSelection = None,
) -> Vector:
    r"""Multiply the Hessian of the loss w.r.t. the parameters with vectors.

    .. math:: H v = \nabla_\theta \big( \nabla_\theta \ell(\theta)^\top v \big)

    Arguments as in :func:`ggn_vector_product`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> loss = nn.MSELoss(reduction="sum")
        >>> v = {"0.weight": torch.ones(1, 2), "0.bias": torch.zeros(1)}
        >>> Hv = engine.hessian_vector_product(model, loss, x, y, v)
        >>> # a linear model's Hessian is its GGN: 2 [X 1]^T [X 1]
        >>> torch.allclose(Hv["0.bias"], 2 * x.sum(0, keepdim=True) @ torch.ones(2))
        True
    """
    return _product(
        Curvature.HESSIAN, model, loss_func, inputs, targets, vector, params
    )


def empirical_fisher_vector_product(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    vector: Vector,
    *,
    params: ParamSelection = None,
) -> Vector:
    r"""Multiply the empirical Fisher of the individual gradients with vectors.

    .. math:: F v = \sum_n g_n \langle g_n, v \rangle

    with :math:`g_n` the gradient of sample ``n``'s term of the reduced loss (for
    ``reduction="mean"`` it includes the ``1/N``, as ``grad_batch``). Samples must not
    interact (e.g. BatchNorm in eval mode). Arguments as in :func:`ggn_vector_product`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.randn(5, 2), torch.randn(5, 1)
        >>> v = torch.randn(2)
        >>> Fv = engine.empirical_fisher_vector_product(
        ...     model, nn.MSELoss(reduction="sum"), x, y, v)
        >>> g = 2 * (model(x) - y) * x  # individual gradients [N, 2]
        >>> torch.allclose(Fv, g.T @ (g @ v), atol=1e-6)
        True
    """
    return _product(Curvature.EF, model, loss_func, inputs, targets, vector, params)


def _product(
    curvature: Curvature,
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    vector: Vector,
    params: ParamSelection,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Vector:
    selected = select_parameters(model, params)
    check_parameters(selected)
    block = as_block(selected, vector)
    columns, _ = batch_product(
        curvature,
        model,
        loss_func,
        inputs,
        targets,
        block.columns,
        list(selected.values()),
        mc_samples,
        generator,
    )
    return block.wrap(columns)


def _check_mc(mc_samples: int | None, generator: torch.Generator | None) -> None:
    check_generator(generator)
    if mc_samples is None:
        if generator is not None:
            raise ValueError("generator is only used with mc_samples (Monte Carlo).")
        return
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")


def batch_product(
    curvature: Curvature,
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    columns: list[Tensor],
    params: list[nn.Parameter],
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Products with a block ``[K, *p]`` per selected parameter on one batch.

    Only :func:`torch.autograd.grad` is used, so no ``.grad`` is written.

    Returns:
        The products (``[K, *p]`` per parameter of ``params``) and the detached
        model output.
    """
    args = model_args(inputs)
    check_targets(targets)
    rule = loss_rule(loss_func)
    if curvature == Curvature.EF:
        _check_independent(model)
    with twice_differentiable():
        output = model_output(model(*args))
    rule.check(loss_func, output, targets)
    if curvature == Curvature.HESSIAN:
        products = _hessian(loss_func(output, targets), params, columns)
        return products, output.detach()
    if curvature == Curvature.GGN and mc_samples is not None:
        middle = _mc_output_product(
            rule, loss_func, output, targets, mc_samples, generator
        )
    else:
        middle = _output_product(curvature, loss_func, output, targets)
    return _sandwich(output, params, columns, middle), output.detach()


def _check_independent(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"{type(m).__name__} at '{name}' is in train mode: batch statistics "
                "couple the samples, so individual gradients (and the empirical "
                "Fisher) are undefined. Call model.eval() first."
            )


def _hessian(loss: Tensor, params: list[Tensor], columns: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    dependent = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not dependent:
        return [torch.zeros_like(c) for c in columns]
    return batched_grad(
        [grads[i] for i in dependent], params, [columns[i] for i in dependent]
    )


def _sandwich(
    output: Tensor,
    params: list[Tensor],
    columns: list[Tensor],
    middle: Callable[[Tensor], Tensor],
) -> list[Tensor]:
    r""":math:`J^\top M J v` for a block of vectors, never forming :math:`J`.

    :math:`J v` is the derivative of the linear map :math:`u \mapsto J^\top u` in
    direction :math:`v` (the double-vjp trick; ``u`` is a dummy at zero).
    """
    dummy = torch.zeros_like(output, requires_grad=True)
    jt_dummy = torch.autograd.grad(
        output, params, dummy, create_graph=True, allow_unused=True
    )
    used = [i for i, t in enumerate(jt_dummy) if t is not None and t.requires_grad]
    if not used:
        return [torch.zeros_like(c) for c in columns]
    (jv,) = batched_grad(
        [jt_dummy[i] for i in used], [dummy], [columns[i] for i in used]
    )
    return batched_grad([output], params, [middle(jv.detach())])


def _output_product(
    curvature: Curvature,
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
) -> Callable[[Tensor], Tensor]:
    """The output-side matrix of the GGN (loss Hessian) or the EF (``r r^T``)."""
    f = output.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad_f,) = torch.autograd.grad(
            loss_func(f, targets), f, create_graph=curvature == Curvature.GGN
        )
    if curvature == Curvature.EF:
        r = grad_f.detach()

        def outer(u: Tensor) -> Tensor:  # sum_n r_n <r_n, u_n> per sample
            coeff = (u * r).flatten(start_dim=2).sum(-1)
            return coeff.reshape(*coeff.shape, *([1] * (r.dim() - 1))) * r

        return outer

    def hessian(u: Tensor) -> Tensor:
        if not grad_f.requires_grad:  # loss linear in the output
            return torch.zeros_like(u)
        return batched_grad([grad_f], [f], [u])[0]

    return hessian


def _mc_output_product(
    rule: LossRule,
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
    mc_samples: int,
    generator: torch.Generator | None,
) -> Callable[[Tensor], Tensor]:
    r"""Per sample :math:`\sum_m \tilde s_{mn} \tilde s_{mn}^\top u_n`, drawn once."""
    sampled = rule.mc_columns(
        loss_func, output.detach(), targets, mc_samples, generator
    )
    s = sampled.flatten(start_dim=2)  # [M, N, O]

    def product(u: Tensor) -> Tensor:
        coeff = torch.einsum("kno,mno->kmn", u.flatten(start_dim=2), s)
        return torch.einsum("kmn,mno->kno", coeff, s).reshape(u.shape)

    return product
