r"""Autograd helpers shared by the second-order code paths.

# NOTE [Batched vector-Jacobian products with torch.func.vmap]
# Several vectors are pulled back through one autograd graph by mapping
# ``torch.autograd.grad`` over a leading column axis with ``torch.func.vmap``. The
# older ``torch.autograd.grad(..., is_grads_batched=True)`` uses the legacy vmap,
# whose batching rule for the double backward of ``group_norm`` fails with a shape
# mismatch in torch 2.13; ``torch.func.vmap`` handles it and is as fast.
#
# NOTE [Twice-differentiable attention]
# On CPU (and on CUDA) ``F.scaled_dot_product_attention`` dispatches to fused kernels
# whose backward has no derivative and no forward-mode rule, so Hessian-vector
# products through attention fail. Forward passes that are differentiated twice run
# under ``sdpa_kernel(SDPBackend.MATH)``, the composite implementation that autograd
# can differentiate any number of times. It computes the same function.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def batched_grad(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    columns: Sequence[Tensor],
    create_graph: bool = False,
) -> list[Tensor]:
    r"""Vector-Jacobian products for a batch of vectors, with zeros for unused inputs.

    For every column index ``k`` computes
    :math:`\sum_i (\partial o_i / \partial x_j)^\top c_{i,k}` for all inputs
    :math:`x_j`; the graph is retained.

    Args:
        outputs: Tensors ``o_i`` in an autograd graph.
        inputs: Tensors ``x_j`` to differentiate with respect to.
        columns: One tensor ``[K, *o_i.shape]`` per output (``K`` vectors).
        create_graph: Keep the products differentiable.

    Returns:
        One tensor ``[K, *x_j.shape]`` per input.
    """
    num = columns[0].shape[0]
    if num == 0:
        return [x.new_zeros(0, *x.shape) for x in inputs]

    def vjp(*cols: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            list(outputs),
            list(inputs),
            list(cols),
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )

    with warnings.catch_warnings():
        # vmap's per-column fallback for ops without a batching rule is a speed hint
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return list(torch.func.vmap(vjp)(*columns))


def vjp_columns(
    output: Tensor, recorded: list[Tensor], columns: Tensor, create_graph: bool
) -> list[Tensor | None]:
    """Pull ``columns: [V, *output.shape]`` back to every tensor at once.

    One column uses plain autograd; several use ``is_grads_batched`` (or, with
    ``create_graph``, :func:`batched_grad`). The graph is retained.

    Returns:
        ``[V, *x.shape]`` per tensor ``x`` of ``recorded``, ``None`` where
        ``output`` does not depend on it.
    """
    if columns.shape[0] == 1:  # plain autograd: no vmap overhead for one column
        pulled = torch.autograd.grad(
            output,
            recorded,
            grad_outputs=columns[0],
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        return [None if g is None else g.unsqueeze(0) for g in pulled]
    if create_graph:  # see NOTE [Batched vector-Jacobian products with torch.func.vmap]
        return batched_grad([output], recorded, [columns], create_graph=True)
    with warnings.catch_warnings():
        # vmap's per-column fallback for ops without a batching rule is a speed hint
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return list(
            torch.autograd.grad(
                output,
                recorded,
                grad_outputs=columns,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
        )


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run attention with its composite implementation (see the module's NOTE)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
