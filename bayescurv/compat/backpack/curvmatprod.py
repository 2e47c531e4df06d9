r"""The functions ``GGNMP``, ``HMP`` and ``PCHMP`` store on every parameter.

``p.ggnmp(V)`` multiplies ``K`` vectors ``V: [K, *p]`` with ``p``'s diagonal block of
the GGN and returns ``[K, *p]`` (``hmp``: the Hessian's block, ``pchmp``: the
positive-curvature Hessian's). The first call of any parameter's function replays the
recorded forward pass once (same inputs, targets and dropout masks) and keeps its
autograd graph; every call then runs backward passes through that graph only. Like
BackPACK's stored inputs, the graph belongs to the backward pass that created the
functions: parameters updated in place afterwards are seen through the graph's saved
tensors, as in BackPACK's products.

# NOTE [Block products from one retained graph]
# Only the parameter's own block is multiplied, so each product differentiates w.r.t.
# that parameter alone. GGN: J^T (H_f (J v)) with J v from the double-vjp trick (the
# map u -> J^T u, built once at a dummy u, differentiated in direction v) and H_f the
# loss Hessian w.r.t. the output (the loss gradient, built once, differentiated in
# direction J v). Hessian: the parameter gradient, built once with its graph,
# differentiated in direction v. PCH: the Hessian product plus the activation
# correction of positive_curvature.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from bayescurv.compat.backpack.extensions import (
    GGNMP,
    PCHMP,
    CurvatureMatrixProduct,
)
from bayescurv.compat.backpack.positive_curvature import (
    Correction,
    activation_calls,
    correction,
    correction_product,
)
from bayescurv.compat.backpack.replay import Call, LossCall, model_of, replayed
from bayescurv.engine.autodiff import batched_grad, twice_differentiable

Product = Callable[[Tensor], Tensor]


def block_products(
    ext: CurvatureMatrixProduct, call: Call, loss: LossCall
) -> dict[nn.Parameter, Product]:
    """One product function per trainable parameter of the call's module."""
    graph = _Graph(ext, call, loss)
    return {p: partial(graph.product, i) for i, p in enumerate(graph.params)}


@dataclass
class _Built:
    """The retained graph of the replayed forward pass (see the NOTE)."""

    output: Tensor
    grads: list[Tensor | None]  # GGN: J^T u at ``dummy``; else parameter gradients
    dummy: Tensor | None = None
    output_leaf: Tensor | None = None  # GGN: the output as a leaf, and
    output_grad: Tensor | None = None  # the loss gradient w.r.t. it (with its graph)
    correction: Correction | None = None  # PCH only


class _Graph:
    """One replayed forward pass, built on the first product, shared by all."""

    def __init__(self, ext: CurvatureMatrixProduct, call: Call, loss: LossCall):
        self.ext, self.call, self.loss = ext, call, loss
        self.model = model_of(call)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._built: _Built | None = None

    def product(self, index: int, mat: Tensor) -> Tensor:
        """Multiply ``mat: [K, *p]`` with parameter ``index``'s block."""
        param = self.params[index]
        _check_matrix(self.ext, self.names[index], param, mat)
        mat = mat.to(dtype=param.dtype, device=param.device)
        built = self._built if self._built is not None else self._build()
        grad = built.grads[index]
        if grad is None or not grad.requires_grad:
            return torch.zeros_like(mat)
        if isinstance(self.ext, GGNMP):
            jv = batched_grad([grad], [built.dummy], [mat])[0]
            if not built.output_grad.requires_grad:  # loss linear in the output
                return torch.zeros_like(mat)
            hjv = batched_grad([built.output_grad], [built.output_leaf], [jv])[0]
            return batched_grad([built.output], [param], [hjv])[0]
        result = batched_grad([grad], [param], [mat])[0]
        if built.correction is not None:
            result = result + correction_product(built.correction, index, param, mat)
        return result

    def _build(self) -> _Built:
        call, loss = self.call, self.loss
        pch = isinstance(self.ext, PCHMP)
        with replayed(call), twice_differentiable():
            if pch:
                with activation_calls(self.model) as calls:
                    output = self.model(*call.args)
            else:
                output = self.model(*call.args)
            if isinstance(self.ext, GGNMP):
                self._built = _ggn_parts(output, loss, self.params)
                return self._built
            value = loss.module(output, loss.targets)
            grads = torch.autograd.grad(
                value, self.params, create_graph=True, allow_unused=True
            )
            fix = (
                correction(value, calls, self.params, self.ext.modify) if pch else None
            )
        self._built = _Built(output, list(grads), correction=fix)
        return self._built


def _ggn_parts(output: Tensor, loss: LossCall, params: list[Tensor]) -> _Built:
    leaf = output.detach().requires_grad_(True)
    (output_grad,) = torch.autograd.grad(
        loss.module(leaf, loss.targets), leaf, create_graph=True
    )
    dummy = torch.zeros_like(output, requires_grad=True)
    transposed = torch.autograd.grad(
        output, params, dummy, create_graph=True, allow_unused=True
    )
    return _Built(output, list(transposed), dummy, leaf, output_grad)


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
