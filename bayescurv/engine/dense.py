r"""The GGN of a batch as a dense ``[P, P]`` matrix, without forming Jacobians.

With the exact loss-Hessian square-root columns :math:`s_{cn}` pulled back to every
parameterized layer output (as in :func:`~bayescurv.engine.backprop`), the GGN is

.. math::
    G = \sum_{n,c} v_{cn} v_{cn}^\top, \qquad v_{cn} = J_n^\top s_{cn} \in
    \mathbb{R}^P .

Generic path: the rules' per-sample vectors ``[C, N, P]`` for chunks of samples and
:math:`G \mathrel{+}= V^\top V`, costing :math:`N C P^2`.

Kronecker path (every layer an ``nn.Linear`` on ``[N, in]``): the
per-sample vector of layer :math:`l` is :math:`g^l_{cn} \otimes \tilde x^l_n` with
the pulled-back column :math:`g^l_{cn}` and the input :math:`\tilde x^l_n`
(augmented by 1 for the bias), so block :math:`(l, m)` is

.. math::
    G^{lm} = \sum_n M^{lm}_n \otimes \tilde x^l_n \tilde x^{m\top}_n, \qquad
    M^{lm}_n = \sum_c g^l_{cn} g^{m\top}_{cn},

one matrix product ``[out_l out_m, N] @ [N, in_l in_m]``: :math:`N P^2` in total,
a factor :math:`C` below the generic path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bayescurv.engine.autodiff import batched_grad
from bayescurv.engine.boundary import (
    check_parameters,
    check_targets,
    model_args,
    model_output,
)
from bayescurv.engine.dtypes import accumulation_dtype
from bayescurv.engine.losses import loss_rule
from bayescurv.engine.memory import Estimate, check_estimates
from bayescurv.engine.recording import Record, find_layers, recorded_forward
from bayescurv.engine.samples import (
    assign_folds,
    check_separable,
    separable_by_construction,
)
from bayescurv.engine.selection import ParamSelection, select_parameters

DEFAULT_MEMORY_BUDGET = 2**28
"""Bytes of the per-chunk temporaries (per-sample vectors or Kronecker factors)."""


def ggn_matrix(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    params: ParamSelection = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    return_output: bool = False,
    out: Tensor | None = None,
    dtype: torch.dtype | None = None,
    max_memory: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The exact GGN :math:`\sum_n J_n^\top (\nabla^2_{f_n}\ell) J_n` of a batch.

    Over the selected parameters (default: all trainable ones), flattened and
    concatenated in ``named_parameters()`` order; scaled as the loss is reduced (as
    ``DiagGGNExact``, whose result is its diagonal). ``.grad`` is not touched.

    Args:
        model: Any model the engine supports (samples must not interact).
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        inputs: Model input ``[N, ...]`` (a tuple is unpacked).
        targets: Targets matching the loss.
        params: Which parameters: names and/or parameter tensors of ``model``, as
            for :func:`~bayescurv.engine.backprop`; layers holding none of them are
            not recorded.
        memory_budget: Bytes for one chunk of temporaries.
        return_output: Also return the (detached) model output.
        out: A ``[P, P]`` tensor the GGN is added to in place (and returned), e.g.
            to accumulate over batches without a new matrix per batch.
        dtype: Accumulation dtype of the matrix (default: ``out``'s, else the model
            output's). ``torch.float64`` on a float32 model forms the products of
            the float32 per-sample vectors upcast to float64: the GGN's rank and
            null space are exact, only the vectors carry float32 error (see
            :mod:`bayescurv.engine.dtypes`).
        max_memory: Bytes the result and the pulled-back columns may take,
            checked before allocating; ``None``: 80% of the available memory (see
            :mod:`bayescurv.engine.memory`).

    Returns:
        ``[P, P]`` (and the output ``[N, ...]`` if ``return_output``).

    Raises:
        MemoryBudgetError: If the estimate exceeds ``max_memory``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(6, 3), torch.randn(6, 1)
        >>> G = engine.ggn_matrix(model, nn.MSELoss(reduction="sum"), x, y)
        >>> torch.allclose(G, 2 * x.T @ x, atol=1e-5)  # linear model, MSE (sum)
        True
    """
    selected = select_parameters(model, params)
    check_parameters(selected)
    args = model_args(inputs)
    check_targets(targets)
    layers = find_layers(model, selected)
    rule = loss_rule(loss_func)
    output, records = recorded_forward(model, layers, args, cache_budget=memory_budget)
    output = model_output(output)
    rule.check(loss_func, output, targets)
    assign_folds(records, output.shape[0], model)
    if not separable_by_construction(
        model, records
    ):  # NOTE [Chains that need no probe]
        check_separable(output, records, model)  # NOTE [The sample-separability probe]
    size = sum(p.numel() for p in selected.values())
    dtype = accumulation_dtype(dtype, "ggn_matrix")
    check_estimates(
        _estimates(size, dtype, out, output, records, rule.num_gram_columns(output)),
        max_memory,
        output.device,
    )
    out = _result(out, size, output, dtype)
    # the GGN is S S^T-only: the fewest columns serve (NOTE [Fewest columns])
    columns = rule.gram_columns(
        loss_func, output.detach(), targets, 0, rule.num_gram_columns(output)
    )
    pulled = batched_grad([output], [rec.output for rec in records], [columns])
    build = _kronecker_ggn if _kronecker_structured(records) else _generic_ggn
    build(records, pulled, out, _offsets(list(selected.values())), memory_budget)
    return (out, output.detach()) if return_output else out


def _estimates(
    size: int,
    dtype: torch.dtype | None,
    out: Tensor | None,
    output: Tensor,
    records: list[Record],
    columns: int,
) -> list[Estimate]:
    """The ``[P, P]`` result (unless ``out`` is given) and the pulled-back columns."""
    dtype = dtype or (output.dtype if out is None else out.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    dense = Estimate(
        f"ggn_matrix: the GGN [P, P] with P={size}",
        0 if out is not None else size * size * itemsize,
        "DiagGGNExact (P entries) or KFLR (Kronecker factors) approximate it; "
        "GGNOperator multiplies with it matrix-free (eigsh, cg); params= selects "
        "fewer parameters.",
    )
    width = sum(rec.output.numel() for rec in records) * output.element_size()
    pulled = Estimate(
        f"ggn_matrix: {columns} loss-Hessian square-root columns per sample pulled "
        "back to every layer output",
        columns * width,
        "Use smaller batches (ggn_matrix(..., out=total) accumulates over them).",
    )
    return [dense, pulled]


def _result(
    out: Tensor | None, size: int, output: Tensor, dtype: torch.dtype | None
) -> Tensor:
    """The ``[P, P]`` matrix to add the GGN to, in the accumulation dtype."""
    if out is None:
        return output.new_zeros(size, size, dtype=dtype or output.dtype)
    if out.shape != (size, size):
        raise ValueError(
            f"out must have shape [{size}, {size}], got {list(out.shape)}."
        )
    if dtype is not None and out.dtype != dtype:
        raise ValueError(
            f"ggn_matrix: out has dtype {out.dtype} but dtype={dtype} was requested; "
            "pass one of them (out's dtype is the accumulation dtype)."
        )
    return out


def _kronecker_structured(records: list[Record]) -> bool:
    """Every recorded call is an ``nn.Linear`` on ``[N, in]``."""
    return all(
        type(rec.module) is nn.Linear and rec.inputs[0].ndim == 2 and rec.fold == 1
        for rec in records
    )


def _offsets(params: list[Tensor]) -> dict[Tensor, int]:
    offsets, start = {}, 0
    for p in params:
        offsets[p] = start
        start += p.numel()
    return offsets


def _parts(rec: Record, offsets: dict[Tensor, int]) -> list[tuple[slice, slice]]:
    """(columns of the augmented input, range in the flat vector) per parameter."""
    width = rec.inputs[0].shape[1]
    parts = []
    if "weight" in rec.params:
        p = rec.params["weight"]
        parts.append((slice(0, width), slice(offsets[p], offsets[p] + p.numel())))
    if "bias" in rec.params:
        p = rec.params["bias"]
        start = width if "weight" in rec.params else 0
        parts.append(
            (slice(start, start + 1), slice(offsets[p], offsets[p] + p.numel()))
        )
    return parts


def _augmented(rec: Record) -> Tensor:
    """The input columns of a Linear call: ``x`` (weight) and ``1`` (bias)."""
    x = rec.inputs[0]
    parts = [x] if "weight" in rec.params else []
    if "bias" in rec.params:
        parts.append(x.new_ones(x.shape[0], 1))
    return torch.cat(parts, dim=1)


# NOTE [Kronecker blocks straight into the flat layout]
# Each block (l, m) is computed once for l <= m as [out_l, in_l, out_m, in_m] and its
# (weight | bias) x (weight | bias) sub-blocks are added to their ranges of the flat
# parameter vector, the transpose to the mirrored ranges: no full-matrix reordering or
# symmetrization pass. Adding (instead of assigning) also makes tied weights and
# layers called several times exact: G sums the blocks of all pairs of calls.
def _kronecker_ggn(
    records: list[Record],
    pulled: list[Tensor],
    dense: Tensor,
    offsets: dict[Tensor, int],
    budget: int,
) -> None:
    """Add the GGN of the recorded Linear calls to ``dense`` (see the module doc)."""
    inputs = [_augmented(rec) for rec in records]
    parts = [_parts(rec, offsets) for rec in records]
    num = inputs[0].shape[0]
    widest = (
        max(g.shape[-1] for g in pulled) ** 2 + max(x.shape[1] for x in inputs) ** 2
    )
    step = max(1, budget // (widest * dense.element_size()))
    for lo in range(0, num, step):
        hi = min(lo + step, num)
        for i in range(len(records)):
            for j in range(i, len(records)):
                block = _block(
                    pulled[i][:, lo:hi].to(dense.dtype),
                    inputs[i][lo:hi].to(dense.dtype),
                    pulled[j][:, lo:hi].to(dense.dtype),
                    inputs[j][lo:hi].to(dense.dtype),
                )
                out_i, out_j = block.shape[0], block.shape[2]
                for cols_i, rows in parts[i]:
                    for cols_j, cols in parts[j]:
                        sub = block[:, cols_i, :, cols_j]
                        shape = (out_i, sub.shape[1], out_j, sub.shape[3])
                        # strided views: no copy of the sub-block
                        dense[rows, cols].view(shape).add_(sub)
                        if i != j:
                            dense[cols, rows].view(shape[2:] + shape[:2]).add_(
                                sub.permute(2, 3, 0, 1)
                            )


def _block(g_i: Tensor, x_i: Tensor, g_j: Tensor, x_j: Tensor) -> Tensor:
    r""":math:`\sum_n (\sum_c g_{i,cn} g_{j,cn}^\top) \otimes x_{i,n} x_{j,n}^\top`.

    Returns:
        ``[out_i, in_i, out_j, in_j]``.
    """
    num = x_i.shape[0]
    out_i, out_j = g_i.shape[-1], g_j.shape[-1]
    in_i, in_j = x_i.shape[1], x_j.shape[1]
    middle = torch.einsum("cna,cnb->nab", g_i, g_j).reshape(num, out_i * out_j)
    outer = (x_i[:, :, None] * x_j[:, None, :]).reshape(num, in_i * in_j)
    block = (middle.mT @ outer).reshape(out_i, out_j, in_i, in_j)
    return block.permute(0, 2, 1, 3)


def _generic_ggn(
    records: list[Record],
    pulled: list[Tensor],
    dense: Tensor,
    offsets: dict[Tensor, int],
    budget: int,
) -> None:
    r""":math:`V^\top V` from the rules' per-sample vectors, in column chunks.

    Chunks run over the loss-Hessian columns, never over samples, so every rule sees
    the layer call exactly as recorded (keyword arguments, several outputs, batch
    axes). A parameter used in several calls gets the sum of its per-sample vectors
    over the calls before the product (see the NOTE on weight sharing in backprop).
    """
    size = dense.shape[0]
    columns, rows = pulled[0].shape[:2]
    num = rows // records[0].fold  # samples
    step = max(1, budget // (num * size * dense.element_size()))
    for lo in range(0, columns, step):
        hi = min(lo + step, columns)
        # vectors in the model dtype, upcast to the accumulation dtype on addition
        vectors = pulled[0].new_zeros(hi - lo, num, size, dtype=dense.dtype)
        for rec, g in zip(records, pulled, strict=True):
            per_sample = rec.per_sample(g[lo:hi])
            for local, value in per_sample.items():
                p = rec.params.get(local)
                if p is None:  # a frozen parameter of a recorded layer
                    continue
                where = slice(offsets[p], offsets[p] + p.numel())
                vectors[:, :, where] += value.reshape(hi - lo, num, -1)
        flat = vectors.reshape(-1, size)
        dense.addmm_(flat.mT, flat)
