r"""Pulling columns back to the recorded layer outputs: batched or column by column.

# NOTE [Per-column pull-backs]
# Several columns are pulled back in one batched autograd call (legacy vmap,
# ``is_grads_batched=True``). For an op without a legacy batching rule, e.g. the
# backward of ``MaxPool2d`` (``max_pool2d_with_indices_backward``), vmap loops over
# the columns itself: it runs the op once per column, zero-fills and concatenates the
# results, and the batched neighbours (``threshold_backward``) run slower than
# unbatched ones. ``tanh_backward`` and others have no legacy rule either. On
# DeepOBS' 3C3D (three max-pools, 10 columns, batch 64, one CPU
# thread) pulling the columns back one at a time with plain autograd takes 0.30 s
# against 0.40 s batched, and saves the stacking too when each column is reduced as
# soon as it is pulled back. On a ReLU MLP and a ResNet-18 both take the same
# time; models whose ops all have batching rules keep the batched call, which also
# amortizes per-call overhead on GPUs.
#
# Whether vmap looped is only known after a batched call: torch reports it through
# its fallback warnings, switched on around the call with the debug switch that
# ``torch.autograd.grad``'s documentation points to, and caught (see
# ``autodiff._vmap_fallbacks``; without the switch every model stays batched).
# The verdict is remembered per graph, keyed by its first recorded layer (a weak
# reference: it goes away with the layer; see ``backprop._graph_key``), so that a
# fresh wrapper around the same model per call (the Laplace layer's adapter) is not
# probed again. A graph not seen before is probed with
# its first two columns, whose products are discarded: the chunks, and with them the
# order of the floating-point sums, depend on the model, not on the calls made
# before (the first call gives the same bits as the next ones). The probe costs the
# pull-back of two columns once per model. Calls with ``create_graph`` do not probe
# (they stay batched until a call without it has probed the model).
#
# Only columns of at least PER_COLUMN_BYTES (over all recorded outputs) go one at a
# time: for small ones the autograd call per column costs more than vmap's loop over
# the one op without a rule (a token model's 400,000 Monte Carlo columns of a few
# kB each took 9x as long one by one; 3C3D's columns are 18 MB).
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn

from bayescurv.engine.autodiff import vjp_columns

PROBE_COLUMNS = 2
"""Columns pulled back to probe a model not seen before."""

_PER_COLUMN: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Graph key (first recorded layer) -> whether its batched pull-back loops."""


def per_column(model: nn.Module) -> bool | None:
    """Whether ``model``'s columns are pulled back one at a time (``None``: not known).

    See NOTE [Per-column pull-backs].
    """
    return _PER_COLUMN.get(model)


def probe(
    model: nn.Module, output: Tensor, recorded: list[Tensor], columns: Tensor
) -> bool:
    """Find out whether ``model``'s batched pull-back loops, and remember it.

    Pulls ``columns: [K, *output.shape]`` (``K >= 2``, e.g. the first two of a
    chunk) back in one batched call and discards the result; see NOTE [Per-column
    pull-backs].

    Returns:
        Whether the columns of ``model`` are pulled back one at a time from now on.
    """
    fallbacks: list[str] = []
    vjp_columns(output, recorded, columns, False, fallbacks=fallbacks)
    _PER_COLUMN[model] = bool(fallbacks)
    return bool(fallbacks)


def pull_back(
    model: nn.Module,
    output: Tensor,
    recorded: list[Tensor],
    columns: Tensor,
    create_graph: bool,
) -> list[Tensor | None]:
    """Pull ``columns: [V, *output.shape]`` back to every tensor of ``recorded``.

    Batched, unless :func:`probe` found that the batched call loops over the columns
    for ``model`` (see NOTE [Per-column pull-backs]).

    Args:
        model: The key of the verdict (the graph's first recorded layer).
        output: Its output.
        recorded: Tensors to pull the columns back to (recorded layer outputs).
        columns: ``[V, *output.shape]``.
        create_graph: Keep the products differentiable.

    Returns:
        ``[V, *x.shape]`` per tensor ``x`` of ``recorded``, ``None`` where
        ``output`` does not depend on it.
    """
    looped = bool(per_column(model)) and _column_bytes(recorded) >= PER_COLUMN_BYTES
    return vjp_columns(output, recorded, columns, create_graph, per_column=looped)


PER_COLUMN_BYTES = 2**20
"""Smallest pulled-back column (bytes over all recorded outputs) pulled back alone."""


def _column_bytes(recorded: list[Tensor]) -> int:
    """Bytes of one column pulled back to every recorded output."""
    return sum(t.numel() * t.element_size() for t in recorded)
