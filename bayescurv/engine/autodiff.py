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

from bayescurv.engine.pool import pooled_empty


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

    with _hide_fallbacks():
        return list(torch.func.vmap(vjp)(*columns))


def vjp_columns(
    output: Tensor,
    recorded: list[Tensor],
    columns: Tensor,
    create_graph: bool,
    per_column: bool = False,
    fallbacks: list[str] | None = None,
) -> list[Tensor | None]:
    """Pull ``columns: [V, *output.shape]`` back to every tensor at once.

    One column uses plain autograd; several use ``is_grads_batched`` (or, with
    ``create_graph``, :func:`batched_grad`), or with ``per_column`` one plain
    autograd call per column, stacked (see NOTE [Per-column pull-backs]). The graph is
    retained.

    Args:
        output: The tensor the columns belong to.
        recorded: Tensors to pull the columns back to.
        columns: ``[V, *output.shape]``.
        create_graph: Keep the products differentiable.
        per_column: Loop over the columns instead of batching them.
        fallbacks: If given, receives one message per op that the batched pull-back
            (``is_grads_batched``) had to run column by column for lack of a
            batching rule.

    Returns:
        ``[V, *x.shape]`` per tensor ``x`` of ``recorded``, ``None`` where
        ``output`` does not depend on it.
    """
    if columns.shape[0] == 1 or per_column:
        return _per_column(output, recorded, columns, create_graph)
    if create_graph:  # see NOTE [Batched vector-Jacobian products with torch.func.vmap]
        return batched_grad([output], recorded, [columns], create_graph=True)
    context = _hide_fallbacks() if fallbacks is None else _vmap_fallbacks(fallbacks)
    with context:
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


def _per_column(
    output: Tensor, recorded: list[Tensor], columns: Tensor, create_graph: bool
) -> list[Tensor | None]:
    """:func:`vjp_columns` with one plain autograd call per column.

    Without ``create_graph`` each product is copied into a preallocated
    ``[V, *x.shape]`` tensor as soon as it is computed (peak: the result and one
    column, not twice the result as with ``torch.stack``).
    """
    num = columns.shape[0]
    parts: list[list[Tensor] | None] = [None] * len(recorded)
    stacked: list[Tensor | None] = [None] * len(recorded)
    for k, column in enumerate(columns):
        pulled = torch.autograd.grad(
            output,
            recorded,
            grad_outputs=column,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        for i, g in enumerate(pulled):
            if g is None:
                continue
            if num == 1:
                stacked[i] = g.unsqueeze(0)
            elif create_graph:
                parts[i] = [*(parts[i] or []), g]
            else:
                if stacked[i] is None:
                    # see NOTE [Reusing result memory]
                    stacked[i] = pooled_empty((num, *g.shape), like=g)
                stacked[i][k] = g
    if create_graph and num > 1:
        return [None if p is None else torch.stack(p) for p in parts]
    return stacked


@contextmanager
def _hide_fallbacks() -> Iterator[None]:
    """Hide vmap's fallback warnings (speed hints) if the user switched them on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        yield


@contextmanager
def _vmap_fallbacks(found: list[str]) -> Iterator[None]:
    """Collect into ``found`` the ops legacy vmap (``is_grads_batched``) looped over.

    Inside the block torch's fallback warnings are switched on and caught (never
    shown: they are speed hints); other warnings are re-issued. If the switch is
    missing from this torch version, ``found`` stays empty. See NOTE [Per-column
    pull-backs].
    """
    toggle = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
    query = getattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled", None)
    enabled = query() if query is not None else None
    if toggle is not None and enabled is not None:
        toggle(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        if toggle is not None and enabled is not None:
            toggle(enabled)
    for w in caught:
        if "performance drop" in str(w.message):
            found.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run attention with its composite implementation (see the module's NOTE)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
