r"""The GGN of a batch as a dense ``[P, P]`` matrix, without forming Jacobians.

With the exact loss-Hessian square-root columns :math:`s_{cn}` pulled back to every
parameterized layer output (as in :func:`~bayescurv.engine.backprop`), the GGN is

.. math::
    G = \sum_{n,c} v_{cn} v_{cn}^\top, \qquad v_{cn} = J_n^\top s_{cn} \in
    \mathbb{R}^P .

Generic path: the rules' per-sample vectors ``[C, N, P]`` for chunks of samples and
:math:`G \mathrel{+}= V^\top V`, costing :math:`N C P^2`.

Kronecker path (every layer an ``nn.Linear`` on ``[N, in]``, called once): the
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
from bayescurv.engine.losses import check_finite, loss_rule
from bayescurv.engine.recording import Record, find_layers, record_calls

DEFAULT_MEMORY_BUDGET = 2**28
"""Bytes of the per-chunk temporaries (per-sample vectors or Kronecker factors)."""


def ggn_matrix(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    return_output: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The exact GGN :math:`\sum_n J_n^\top (\nabla^2_{f_n}\ell) J_n` of a batch.

    Over the trainable parameters, flattened and concatenated in
    ``named_parameters()`` order; scaled as the loss is reduced (as
    ``DiagGGNExact``, whose result is its diagonal). ``.grad`` is not touched.

    Args:
        model: Any model the engine supports (samples must not interact).
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        inputs: Model input ``[N, ...]`` (a tuple is unpacked).
        targets: Targets matching the loss.
        memory_budget: Bytes for one chunk of temporaries.
        return_output: Also return the (detached) model output.

    Returns:
        ``[P, P]`` (and the output ``[N, ...]`` if ``return_output``).

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
    layers = find_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters.")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    for arg in args:
        check_finite("inputs", arg)
    rule = loss_rule(loss_func)
    with record_calls(layers, safe=False) as records:
        output = model(*args)
    if any(rec.modified_in_place() for rec in records):
        with record_calls(layers, safe=True) as records:
            output = model(*args)
    check_finite("The model output", output)
    rule.check(loss_func, output, targets)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    num = output.shape[0]
    columns = rule.exact_columns(
        loss_func, output.detach(), targets, 0, rule.num_columns(output)
    )
    pulled = batched_grad([output], [rec.output for rec in records], [columns])
    if _kronecker_structured(records):
        dense = _kronecker_ggn(records, pulled, params, num, memory_budget)
    else:
        dense = _generic_ggn(records, pulled, params, num, memory_budget)
    return (dense, output.detach()) if return_output else dense


def _kronecker_structured(records: list[Record]) -> bool:
    """Every call is an ``nn.Linear`` on ``[N, in]`` and no layer is called twice."""
    modules = [rec.module for rec in records]
    return len(set(map(id, modules))) == len(modules) and all(
        type(rec.module) is nn.Linear and rec.inputs[0].ndim == 2 for rec in records
    )


def _augmented(rec: Record) -> Tensor:
    """The input columns of a Linear call: ``x`` (weight) and ``1`` (bias)."""
    x = rec.inputs[0]
    parts = [x] if "weight" in rec.params else []
    if "bias" in rec.params:
        parts.append(x.new_ones(x.shape[0], 1))
    return torch.cat(parts, dim=1)


def _kronecker_ggn(
    records: list[Record],
    pulled: list[Tensor],
    params: list[Tensor],
    num: int,
    budget: int,
) -> Tensor:
    """See the module doc; blocks in (record, out, in) order, then reordered."""
    inputs = [_augmented(rec) for rec in records]
    sizes = [g.shape[-1] * x.shape[1] for g, x in zip(pulled, inputs, strict=True)]
    total = sum(sizes)
    dense = pulled[0].new_zeros(total, total)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    widest = (
        max(g.shape[-1] for g in pulled) ** 2 + max(x.shape[1] for x in inputs) ** 2
    )
    step = max(1, budget // (widest * pulled[0].element_size()))
    for lo in range(0, num, step):
        hi = min(lo + step, num)
        for i, (g_i, x_i) in enumerate(zip(pulled, inputs, strict=True)):
            for j in range(i, len(records)):
                g_j, x_j = pulled[j], inputs[j]
                block = _block(g_i[:, lo:hi], x_i[lo:hi], g_j[:, lo:hi], x_j[lo:hi])
                rows = slice(starts[i], starts[i] + sizes[i])
                cols = slice(starts[j], starts[j] + sizes[j])
                dense[rows, cols] += block
    upper = dense.triu(1)
    dense = dense.triu() + upper.mT
    order = torch.cat(
        [
            _param_order(rec, x.shape[1], g.shape[-1]) + start
            for rec, x, g, start in zip(records, inputs, pulled, starts, strict=True)
        ]
    )
    position = _positions(records, params)
    flat = torch.empty_like(order)
    flat[position] = order
    return dense[flat][:, flat]


def _block(g_i: Tensor, x_i: Tensor, g_j: Tensor, x_j: Tensor) -> Tensor:
    r""":math:`\sum_n (\sum_c g_{i,cn} g_{j,cn}^\top) \otimes x_{i,n} x_{j,n}^\top`."""
    num = x_i.shape[0]
    out_i, out_j = g_i.shape[-1], g_j.shape[-1]
    in_i, in_j = x_i.shape[1], x_j.shape[1]
    middle = torch.einsum("cna,cnb->nab", g_i, g_j).reshape(num, out_i * out_j)
    outer = (x_i[:, :, None] * x_j[:, None, :]).reshape(num, in_i * in_j)
    block = (middle.mT @ outer).reshape(out_i, out_j, in_i, in_j)
    return block.permute(0, 2, 1, 3).reshape(out_i * in_i, out_j * in_j)


def _param_order(rec: Record, width: int, out: int) -> Tensor:
    """Augmented (o, i) indices in the order weight (row-major), then bias."""
    grid = torch.arange(out * width).reshape(out, width)
    parts = []
    if "weight" in rec.params:
        parts.append(grid[:, : rec.inputs[0].shape[1]].flatten())
    if "bias" in rec.params:
        parts.append(grid[:, -1])
    return torch.cat(parts)


def _positions(records: list[Record], params: list[Tensor]) -> Tensor:
    """For each entry in record order, its position in the flat parameter vector."""
    offsets, start = {}, 0
    for p in params:
        offsets[p] = start
        start += p.numel()
    parts = []
    for rec in records:
        for name in ("weight", "bias"):
            if name in rec.params:
                p = rec.params[name]
                parts.append(torch.arange(offsets[p], offsets[p] + p.numel()))
    return torch.cat(parts)


def _generic_ggn(
    records: list[Record],
    pulled: list[Tensor],
    params: list[Tensor],
    num: int,
    budget: int,
) -> Tensor:
    """:math:`V^\\top V` from the rules' per-sample vectors, in sample chunks.

    A parameter used in several calls gets the sum of its per-sample vectors over
    the calls before the product (see the NOTE on weight sharing in backprop).
    """
    size = sum(p.numel() for p in params)
    offsets, start = {}, 0
    for p in params:
        offsets[p] = start
        start += p.numel()
    columns = pulled[0].shape[0]
    step = max(1, budget // (columns * size * pulled[0].element_size()))
    dense = pulled[0].new_zeros(size, size)
    for lo in range(0, num, step):
        hi = min(lo + step, num)
        vectors = pulled[0].new_zeros(columns, hi - lo, size)
        for rec, g in zip(records, pulled, strict=True):
            inputs = tuple(t[lo:hi] for t in rec.inputs)
            per_sample = rec.rule.per_sample(rec.module, inputs, g[:, lo:hi])
            for local, value in per_sample.items():
                p = rec.params.get(local)
                if p is None:  # a frozen parameter of a recorded layer
                    continue
                where = slice(offsets[p], offsets[p] + p.numel())
                vectors[:, :, where] += value.reshape(columns, hi - lo, -1)
        flat = vectors.reshape(-1, size)
        dense.addmm_(flat.mT, flat)
    return dense
