r"""Hessian diagonals on any graph from batched Hessian-vector products.

* **Through layer outputs** (layers linear in their parameters, called once): with
  :math:`g = \nabla_z \ell` built with a graph, the product of the Hessian w.r.t. the
  recorded output :math:`z` with the unit vector of coordinate ``j`` placed in *every*
  sample is, sample by sample, column ``j`` of :math:`\nabla^2_{z_n}\ell` (samples do
  not interact). ``D`` such products (``D`` = output entries per sample) give all
  per-sample Hessians ``[N, D, D]``; their eigendecompositions
  :math:`\sum_k \lambda_{kn} q_{kn} q_{kn}^\top` give signed square-root columns
  :math:`\sqrt{|\lambda_{kn}|}\, q_{kn}` for the layer rule.
* **Directly on the parameter** (weight sharing, layers not linear in their
  parameters): ``P`` products with the parameter's unit vectors give the diagonal of
  its Hessian block, which includes the cross terms between calls. Per-sample
  diagonals re-run the model on each sample alone, with the other samples' outputs
  held fixed so that the reduction of the loss is unchanged.

Cost: a fresh forward pass (attention in its twice-differentiable form), one
backward pass with graph, and ``D`` (per layer) or ``P`` (per directly handled
parameter; ``N`` times for per-sample diagonals) Hessian-vector products in batches
that fit the memory budget; ``O(N D^2)`` memory per layer for the per-sample Hessians.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bayescurv.engine.autodiff import batched_grad, twice_differentiable
from bayescurv.engine.extensions import Reduction
from bayescurv.engine.hessian.accumulate import DiagAccumulator, split_parameters
from bayescurv.engine.recording import Layer, Record, record_calls


def graph_diag_hessian(
    model: nn.Module,
    layers: list[Layer],
    args: tuple[Tensor, ...],
    loss_func: nn.Module,
    targets: Tensor,
    acc: DiagAccumulator,
) -> None:
    """Hessian diagonals of all parameters of ``layers`` into ``acc``."""
    recording = record_calls(layers, safe=True, cache_budget=acc.budget)
    with twice_differentiable(), recording as records:
        output = model(*args)
    loss = loss_func(output, targets)
    simple, direct = split_parameters(records)
    if simple:
        grads = torch.autograd.grad(
            loss, [rec.output for rec in simple], create_graph=True, allow_unused=True
        )
        # per HVP column, autograd holds about one value per recorded output entry
        width = sum(rec.output.numel() for rec in records) * output.element_size()
        step = max(1, acc.budget // max(width, 1))
        for rec, grad in zip(simple, grads, strict=True):
            if grad is not None and grad.requires_grad:
                _through_output(rec, grad, acc, step)
    if direct:
        _direct(model, args, loss_func, output, targets, direct, acc)


def _through_output(rec: Record, grad: Tensor, acc: DiagAccumulator, step: int) -> None:
    n, size = rec.output.shape[0], rec.output[0].numel()
    needed = n * size * size * rec.output.element_size()
    if needed > acc.budget:
        raise ValueError(
            f"DiagHessian on this graph (not an nn.Sequential chain of supported "
            f"modules) needs the per-sample Hessians w.r.t. the output of "
            f"{type(rec.module).__name__} ([{n}, {size}, {size}], {needed / 2**30:.2f}"
            f" GiB), more than memory_budget={acc.budget} bytes. Raise memory_budget, "
            "use a smaller batch, or write the model as an nn.Sequential chain."
        )
    hess = per_sample_output_hessian(rec.output, grad, step)
    evals, evecs = torch.linalg.eigh(hess)
    shape = rec.output.shape
    for sign, cols in _signed_columns(evals, evecs):
        acc.add_columns(rec, cols.reshape(cols.shape[0], *shape), sign)


def per_sample_output_hessian(output: Tensor, grad: Tensor, step: int) -> Tensor:
    """Per-sample Hessians ``[N, D, D]`` w.r.t. ``output`` given its gradient.

    Args:
        output: A recorded layer output ``[N, *out]`` (``D`` entries per sample).
        grad: The loss gradient w.r.t. ``output``, built with a graph.
        step: Hessian-vector products per batched call.
    """
    n, size = output.shape[0], output[0].numel()
    hess = output.new_zeros(n, size, size)
    for start in range(0, size, step):
        k = min(step, size - start)
        unit = output.new_zeros(k, n, size)
        unit[torch.arange(k), :, start + torch.arange(k)] = 1
        (cols,) = batched_grad([grad], [output], [unit.reshape(k, *output.shape)])
        hess[:, :, start : start + k] = cols.reshape(k, n, size).permute(1, 2, 0)
    return (hess + hess.transpose(1, 2)) / 2


def _signed_columns(evals: Tensor, evecs: Tensor) -> list[tuple[float, Tensor]]:
    """``(+1, [k, N, D])`` and ``(-1, [k, N, D])`` square-root columns.

    Eigenvalues come in ascending order, so the largest ``k`` eigenpairs of every
    sample cover all its positive ones (zero weight where a sample has fewer).
    """
    out = []
    num_pos = int((evals > 0).sum(1).max())
    num_neg = int((evals < 0).sum(1).max())
    size = evals.shape[1]
    for sign, idx in ((1.0, range(size - num_pos, size)), (-1.0, range(num_neg))):
        if not idx:
            continue
        sel = torch.tensor(list(idx), device=evals.device)
        weights = (sign * evals[:, sel]).clamp(min=0).sqrt()  # [N, k]
        cols = evecs[:, :, sel] * weights.unsqueeze(1)  # [N, D, k]
        out.append((sign, cols.permute(2, 0, 1)))
    return out


def _direct(
    model: nn.Module,
    args: tuple[Tensor, ...],
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
    params: list[nn.Parameter],
    acc: DiagAccumulator,
) -> None:
    if Reduction.BATCH_SQUARED not in acc.reductions:
        diags = parameter_hessian_diagonal(
            loss_func(output, targets), params, acc.budget
        )
        for p, diag in zip(params, diags, strict=True):
            acc.add(Reduction.SUM_SQUARED, p, diag)
        return
    fixed = output.detach()
    per_sample = []
    for n in range(fixed.shape[0]):
        with twice_differentiable():
            out_n = model(*(a[n : n + 1] for a in args))
        batch = torch.cat([fixed[:n], out_n, fixed[n + 1 :]])
        loss_n = loss_func(batch, targets)
        per_sample.append(parameter_hessian_diagonal(loss_n, params, acc.budget))
    for i, p in enumerate(params):
        stacked = torch.stack([diags[i] for diags in per_sample])
        acc.add(Reduction.BATCH_SQUARED, p, stacked)
        if Reduction.SUM_SQUARED in acc.reductions:
            acc.add(Reduction.SUM_SQUARED, p, stacked.sum(0))


def parameter_hessian_diagonal(
    loss: Tensor, params: list[nn.Parameter], budget: int
) -> list[Tensor]:
    """Diagonals of the Hessian blocks of ``params`` from batched HVPs."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    out = []
    for p, grad in zip(params, grads, strict=True):
        if grad is None or not grad.requires_grad:
            out.append(torch.zeros_like(p))
            continue
        size = p.numel()
        diag = p.new_zeros(size)
        step = max(1, budget // max(size * p.element_size(), 1))
        for start in range(0, size, step):
            k = min(step, size - start)
            idx = start + torch.arange(k, device=p.device)
            unit = p.new_zeros(k, size)
            unit[torch.arange(k), idx] = 1
            (rows,) = batched_grad([grad], [p], [unit.reshape(k, *p.shape)])
            diag[start : start + k] = rows.reshape(k, size)[torch.arange(k), idx]
        out.append(diag.reshape(p.shape).detach())
    return out
