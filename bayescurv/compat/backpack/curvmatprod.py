"""The functions ``GGNMP``, ``HMP`` and ``PCHMP`` store on every parameter.

``p.ggnmp(V)`` multiplies ``K`` vectors ``V: [K, *p]`` with ``p``'s diagonal block of
the GGN and returns ``[K, *p]`` (``hmp``: the Hessian's block, ``pchmp``: the
positive-curvature Hessian's). Each call replays the recorded forward pass (same
inputs, targets and dropout masks) with the parameters' current values, so call the
functions before updating the parameters, as with BackPACK's stored inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.compat.backpack.extensions import HMP, PCHMP, CurvatureMatrixProduct
from bayescurv.compat.backpack.positive_curvature import pch_block_product
from bayescurv.compat.backpack.replay import Call, LossCall, model_of, replayed

Product = Callable[[Tensor], Tensor]


def block_products(
    ext: CurvatureMatrixProduct, call: Call, loss: LossCall
) -> dict[nn.Parameter, Product]:
    """One product function per trainable parameter of the call's module."""
    names = {
        p: name for name, p in model_of(call).named_parameters() if p.requires_grad
    }
    return {p: partial(_product, ext, call, loss, name) for p, name in names.items()}


def _product(
    ext: CurvatureMatrixProduct, call: Call, loss: LossCall, name: str, mat: Tensor
) -> Tensor:
    model = model_of(call)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    param = params[name]
    _check_matrix(ext, name, param, mat)
    mat = mat.to(dtype=param.dtype, device=param.device)
    args, targets = call.args, loss.targets
    with replayed(call):
        if isinstance(ext, PCHMP):
            return pch_block_product(
                model, loss.module, args, targets, param, mat, ext.modify
            )
        vector = {
            n: mat if n == name else p.new_zeros(mat.shape[0], *p.shape)
            for n, p in params.items()
        }
        multiply = (
            engine.hessian_vector_product
            if isinstance(ext, HMP)
            else engine.ggn_vector_product
        )
        result = multiply(model, loss.module, args, targets, vector)
    return result[name]


def _check_matrix(
    ext: CurvatureMatrixProduct, name: str, param: nn.Parameter, mat: object
) -> None:
    if not isinstance(mat, Tensor) or not torch.is_floating_point(mat):
        raise TypeError(
            f"{ext.savefield} of '{name}' multiplies a floating-point tensor "
            f"[K, *{tuple(param.shape)}], got {type(mat).__name__}."
        )
    if mat.dim() != param.dim() + 1 or mat.shape[1:] != param.shape:
        raise ValueError(
            f"{ext.savefield} of '{name}' multiplies K vectors of shape "
            f"[K, *{tuple(param.shape)}] (a leading axis even for one vector), got "
            f"{tuple(mat.shape)}."
        )
