"""Hessian-vector products of the batch loss with plain double-backward autograd.

# NOTE [Temporary Hessian-vector products]
# The engine's curvature-matrix products (``bayescurv.engine.products``) are being
# built on another branch. Until they land, the Hessian instruments use this one small
# helper; it is meant to be replaced by the engine function, nothing else uses it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

HessianOperator = Callable[[list[Tensor]], list[Tensor]]
"""Maps vectors ``[V, *p]`` per parameter to their Hessian products ``[V, *p]``."""


def hessian_operator(
    model: nn.Module,
    loss_func: nn.Module,
    args: tuple[Tensor, ...],
    targets: Tensor,
    params: list[nn.Parameter],
) -> HessianOperator:
    r"""Products with :math:`\nabla^2_\theta L` of the batch loss, ``V`` at a time.

    One forward pass and one differentiable backward pass build the gradient graph;
    every call then costs one (batched) backward pass through it. ``.grad`` is not
    touched.
    """
    with torch.enable_grad():
        loss = loss_func(model(*args), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)

    def apply(vectors: list[Tensor]) -> list[Tensor]:
        # a gradient entry without a graph is constant: it contributes nothing
        pairs = [(g, v) for g, v in zip(grads, vectors, strict=True) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(v) for v in vectors]
        with warnings.catch_warnings():
            # vmap's per-column fallback for ops without a batching rule is a speed hint
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            products = torch.autograd.grad(
                [g for g, _ in pairs],
                params,
                grad_outputs=[v for _, v in pairs],
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
        return [
            torch.zeros_like(v) if h is None else h.detach()
            for v, h in zip(vectors, products, strict=True)
        ]

    return apply
