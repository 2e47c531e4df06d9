r"""Module-wise Hessian backpropagation on chains (``nn.Sequential``).

Through a module :math:`y = m(x)` the Hessian of the loss w.r.t. its output maps to
the Hessian w.r.t. its input as

.. math::
    \nabla_x^2 \ell = J^\top \big(\nabla_y^2 \ell\big) J
        + \sum_k \frac{\partial \ell}{\partial y_k} \nabla_x^2 y_k,

with :math:`J = \partial y / \partial x`. For modules that are affine in their input
(linear layers, convolutions, eval-mode BatchNorm, pooling by averaging, reshapes) and
for piecewise-linear ones (ReLU, max-pooling) the second term vanishes; for
element-wise non-linearities it is the diagonal :math:`\operatorname{diag}(g \odot
\phi''(x))` with :math:`g = \partial\ell/\partial y`. Starting from the exact loss
Hessian square root at the output, the columns travel backwards by Jacobian-transpose
products (closed forms for ``nn.Linear`` and element-wise modules, batched autograd
otherwise); each residual :math:`r = g \odot \phi''(x)` starts new columns
:math:`\sqrt{r^\pm_j}\, e_j` (positive and negative parts, one per coordinate ``j``
that is non-zero in some sample) that travel on from the module's input. Every
recorded layer on the way reduces the columns that pass its output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from bayescurv.engine.activations import ACTIVATIONS, elementwise
from bayescurv.engine.autodiff import batched_grad
from bayescurv.engine.hessian.accumulate import DiagAccumulator, split_parameters
from bayescurv.engine.losses import loss_rule
from bayescurv.engine.recording import Record


class Kind(str, Enum):
    """How a chain module transforms the Hessian w.r.t. its output."""

    AFFINE = "affine"
    """Affine in its input: no residual term."""
    PIECEWISE = "piecewise"
    """Element-wise and piecewise linear: no residual term."""
    SMOOTH = "smooth"
    """Element-wise with a second derivative: a diagonal residual term."""


PADDING = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
"""Padding modules (affine in their input)."""
_AFFINE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Embedding,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,  # piecewise linear, not element-wise: treated as affine per piece
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    *PADDING,
)
CHAIN_MODULES: dict[type[nn.Module], Kind] = {
    **dict.fromkeys(_AFFINE, Kind.AFFINE),
    **{
        cls: Kind.PIECEWISE if entry.hessian_is_zero else Kind.SMOOTH
        for cls, entry in ACTIVATIONS.items()
    },
}
"""Module types (exact) allowed in a chain; other models use Hessian-vector products."""


@dataclass
class Stage:
    """One module of the chain, with its input value and (if any) its record."""

    module: nn.Module
    kind: Kind
    record: Record | None
    input: Tensor
    derivative: Tensor | None = None  # phi'(x) of element-wise modules

    @property
    def inplace(self) -> bool:
        """Whether the module overwrites its input."""
        return bool(getattr(self.module, "inplace", False))


def _leaves(model: nn.Module) -> list[nn.Module]:
    out = []
    for m in model:
        out.extend(_leaves(m) if isinstance(m, nn.Sequential) else [m])
    return out


def as_chain(model: nn.Module, records: list[Record]) -> list[Stage] | None:
    """The stages from the first recorded layer on, or ``None`` if not a chain."""
    if not isinstance(model, nn.Sequential) or not records:
        return None
    modules = _leaves(model)
    if any(type(m) not in CHAIN_MODULES for m in modules):
        return None
    by_module = {id(rec.module): rec for rec in records}
    in_order = [m for m in modules if id(m) in by_module]
    called_once = len(by_module) == len(records) == len(in_order)
    if not called_once or any(
        m is not rec.module for m, rec in zip(in_order, records, strict=True)
    ):
        return None
    if split_parameters(records)[1]:  # tied parameters or non-linear rules
        return None
    first = next(i for i, m in enumerate(modules) if id(m) in by_module)
    stages, x = [], records[0].inputs[0]
    for m in modules[first:]:
        rec = by_module.get(id(m))
        if rec is not None:
            x_in, y = rec.inputs[0], rec.output.detach()
        else:
            x_in = x
            y = _value(m, x_in)
        stages.append(Stage(m, CHAIN_MODULES[type(m)], rec, x_in))
        x = y
    return stages


def chain_diag_hessian(
    stages: list[Stage],
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
    acc: DiagAccumulator,
) -> None:
    """Backpropagate the loss Hessian's square root and all residuals."""
    rule = loss_rule(loss_func)
    f = output.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad_f,) = torch.autograd.grad(loss_func(f, targets), f)
    widest = max([output[0].numel()] + [s.input[0].numel() for s in stages])
    chunk = max(1, acc.budget // (output.shape[0] * widest * output.element_size()))
    pending: list[tuple[int, Tensor]] = []
    total = rule.num_gram_columns(output)  # squares only: NOTE [Fewest columns]
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        cols = rule.gram_columns(loss_func, output, targets, start, stop)
        if start == 0:  # the gradient travels along as column 0 of the first chunk
            cols = torch.cat([grad_f.unsqueeze(0), cols])
        _sweep(stages, len(stages) - 1, cols, 1.0, acc, pending if start == 0 else None)
    for index, residual in pending:
        for sign, cols in _residual_columns(residual, chunk):
            _sweep(stages, index, cols, sign, acc, None)


def _sweep(
    stages: list[Stage],
    start: int,
    cols: Tensor,
    sign: float,
    acc: DiagAccumulator,
    pending: list[tuple[int, Tensor]] | None,
) -> None:
    """Carry columns from the output of ``stages[start]`` down to the first layer.

    With ``pending`` (a list), ``cols[0]`` is the gradient: it is not reduced, and
    the residuals it creates are appended as ``(stage index, residual)``.
    """
    for i in range(start, -1, -1):
        stage = stages[i]
        if stage.record is not None:
            acc.add_columns(stage.record, cols if pending is None else cols[1:], sign)
        if i == 0:
            return
        if pending is not None and stage.kind == Kind.SMOOTH:
            residual = _residual(stage, cols[0])
            if residual is not None:
                pending.append((i - 1, residual))
        cols = _jac_t(stage, cols)


def _jac_t(stage: Stage, cols: Tensor) -> Tensor:
    """Columns ``[V, N, *out]`` at the module output -> ``[V, N, *in]`` at its input."""
    module = stage.module
    if type(module) is nn.Linear:
        return cols @ module.weight.detach()
    if stage.kind != Kind.AFFINE:
        return cols * _derivative(stage)
    x = stage.input.detach().requires_grad_(True)
    with torch.enable_grad():
        y = module(x.clone() if stage.inplace else x)
        return batched_grad([y], [x], [cols])[0]


def _value(module: nn.Module, x: Tensor) -> Tensor:
    """A parameter-free module's output (activations from the table, never in place)."""
    entry = elementwise(module)
    if entry is not None:
        return entry.value(module, x)
    with torch.no_grad():
        return module(x.clone() if getattr(module, "inplace", False) else x)


def _derivative(stage: Stage) -> Tensor:
    r""":math:`\phi'(x)` of an element-wise module, from the derivative table."""
    if stage.derivative is None:
        stage.derivative = ACTIVATIONS[type(stage.module)].df(stage.module, stage.input)
    return stage.derivative


def _residual(stage: Stage, grad_output: Tensor) -> Tensor | None:
    r"""The residual :math:`g \odot \phi''(x)` ``[N, *in]`` (``None`` if zero)."""
    d2f = ACTIVATIONS[type(stage.module)].d2f
    if d2f is None:
        return None
    r = grad_output * d2f(stage.module, stage.input)
    return r if r.any() else None


def _residual_columns(residual: Tensor, chunk: int) -> Iterator[tuple[float, Tensor]]:
    r"""Signed columns :math:`\sqrt{r^\pm_j} e_j` in chunks, ``[k, N, *in]`` each."""
    n = residual.shape[0]
    flat = residual.reshape(n, -1)
    for sign, part in ((1.0, flat.clamp(min=0)), (-1.0, (-flat).clamp(min=0))):
        coords = part.any(0).nonzero().squeeze(1)
        roots = part[:, coords].sqrt()  # [N, d]
        for start in range(0, coords.numel(), chunk):
            idx = coords[start : start + chunk]
            k = idx.numel()
            cols = flat.new_zeros(k, n, flat.shape[1])
            cols[torch.arange(k), :, idx] = roots[:, start : start + k].T
            yield sign, cols.reshape(k, *residual.shape)
