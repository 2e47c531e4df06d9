r"""The engine's entry point: :func:`backprop`.

One forward pass records every call of every parameterized layer; the loss gradient and
the loss-Hessian square-root columns are then pulled back to all recorded outputs with
batched autograd (:func:`torch.autograd.grad` with ``is_grads_batched=True``), and each
layer's rule turns (input, pulled-back columns) into the requested quantities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from bayescurv.engine.extensions import (
    BatchGrad,
    BatchL2Grad,
    Columns,
    Extension,
    Reduction,
    Variance,
)
from bayescurv.engine.hessian import diag_hessian
from bayescurv.engine.kron import KFRA
from bayescurv.engine.kron_backprop import KronFactors
from bayescurv.engine.losses import LossRule, check_finite, loss_rule
from bayescurv.engine.recording import (
    Layer,
    Record,
    check_batch_first,
    check_uncalled,
    find_layers,
    record_calls,
    zeros_like_columns,
)
from bayescurv.engine.rules import reduce_per_sample

DEFAULT_MEMORY_BUDGET = 2**30
"""Default bytes for one chunk of pulled-back exact square-root columns."""


@dataclass
class BackpropResult:
    """What :func:`backprop` returns.

    Attributes:
        loss: The loss value (detached).
        output: The model output (detached).
        quantities: ``savefield -> parameter name -> tensor`` (a list of Kronecker
            factors for KFAC/KFLR/KFRA).
    """

    loss: Tensor
    output: Tensor
    quantities: dict[str, dict[str, Tensor | list[Tensor]]] = field(
        default_factory=dict
    )

    def __getitem__(self, savefield: str) -> dict[str, Tensor | list[Tensor]]:
        try:
            return self.quantities[savefield]
        except KeyError:
            raise KeyError(
                f"No quantity '{savefield}' was computed; available: "
                f"{sorted(self.quantities)}."
            ) from None

    def __contains__(self, savefield: object) -> bool:
        return savefield in self.quantities

    def keys(self) -> list[str]:
        """The computed savefields."""
        return list(self.quantities)

    def __repr__(self) -> str:
        # NOTE [Summaries, not tensors]
        # A result holds per-sample tensors of the size of the model times the
        # batch; printing them floods a notebook. The repr lists what was computed
        # and the shapes, which is what one checks when reading it.
        lines = [
            f"BackpropResult(loss={self.loss.item():.6g}, "
            f"output={_shape(self.output)}, quantities={{"
        ]
        for savefield, by_param in self.quantities.items():
            lines.append(f"  {savefield!r}: {{")
            lines += [
                f"    {name!r}: {_shape(value)}," for name, value in by_param.items()
            ]
            lines.append("  },")
        return "\n".join([*lines, "})"]) if self.quantities else lines[0] + "})"


def _shape(value: Tensor | list[Tensor]) -> str:
    """``[N, C]`` for a tensor, ``[[B, B], [A, A]]`` for a list of factors."""
    if isinstance(value, Tensor):
        return "[" + ", ".join(map(str, value.shape)) + "]"
    return "[" + ", ".join(_shape(v) for v in value) + "]"


# (column source, mc_samples) identifies one set of pulled-back columns
_Source = tuple[Columns, int]


def backprop(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    extensions: Sequence[Extension],
    *,
    generator: torch.Generator | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_size: int | None = None,
) -> BackpropResult:
    """Compute the loss, its gradient (into ``.grad``) and the requested quantities.

    Args:
        model: Any ``nn.Module``; residual connections, branches, functional ops
            and repeated calls are supported. Parameterized layers without a
            registered rule use the generic ``torch.func`` rule (with a warning).
            Samples must not interact (e.g. BatchNorm must be in eval mode).
        loss_func: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
            with reduction ``"mean"`` or ``"sum"``.
        inputs: Model input ``[N, ...]`` (a tuple is unpacked into ``model(*inputs)``).
        targets: Targets matching the loss.
        extensions: Extension instances; all share one forward and one backward sweep.
        generator: Random generator for Monte Carlo extensions (default: the global
            one).
        memory_budget: Bytes allowed for one chunk of exact square-root columns;
            larger problems are processed in chunks of columns.
        chunk_size: Exact columns per chunk (overrides ``memory_budget``).

    Returns:
        The :class:`BackpropResult`; ``res[savefield][param_name]``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()])
        >>> # closed form for MSE with sum reduction: 2 * sum_n x_n^2 per output row
        >>> torch.allclose(res["diag_ggn_exact"]["weight"][0], 2 * (x**2).sum(0))
        True
    """
    extensions = _check_extensions(extensions)
    layers = find_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters.")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    for i, arg in enumerate(args):
        check_finite(f"inputs[{i}]" if len(args) > 1 else "inputs", arg)
    check_finite("targets", targets)
    rule = loss_rule(loss_func)

    output, records = _forward(model, layers, args)
    check_finite("The model output", output)
    rule.check(loss_func, output, targets)
    batch_size = output.shape[0]
    check_batch_first(records, batch_size)
    check_uncalled(layers, records, output)
    loss = loss_func(output, targets)
    kron = KronFactors(
        extensions, layers, records, (model, loss_func, rule, output, targets, args)
    )

    sources = _sources(extensions)
    grad_source = (Columns.GRADIENT, 0)
    first_order = sources.pop(grad_source, None)
    grad_output = None
    if first_order is not None:
        # see NOTE [The gradient from the rules]
        (grad_output,) = torch.autograd.grad(loss, output, retain_graph=True)
    reduced: dict[_Source, dict[Reduction, dict[nn.Parameter, Tensor]]] = {}
    num_cols: dict[_Source, int] = {grad_source: 1}
    for source, reductions in sources.items():
        if source[0] == Columns.HESSIAN:  # see bayescurv/engine/hessian
            reduced[source] = diag_hessian(
                model,
                layers,
                args,
                loss_func,
                output,
                targets,
                records,
                reductions,
                memory_budget,
            )
            num_cols[source] = 1
            continue
        total, make = _columns(rule, loss_func, output, targets, source, generator)
        num_cols[source] = total
        size = chunk_size or _chunk_size(records, memory_budget)
        reduced[source] = _pull_back_chunks(
            output,
            records,
            total,
            make,
            reductions,
            size,
            memory_budget,
            kron.consumer(source),
        )

    # a parameter tied across layers is listed once (its .grad accumulated once)
    params = list(dict.fromkeys(p for layer in layers for p in layer.params.values()))
    if first_order is None:
        param_grads = list(torch.autograd.grad(loss, params, allow_unused=True))
    else:
        reduced[grad_source] = _first_order(
            output, grad_output, records, first_order, memory_budget
        )
        sums = reduced[grad_source][Reduction.SUM]
        param_grads = [sums.get(p) for p in params]
    for p, g in zip(params, param_grads, strict=True):
        _accumulate_grad(p, g)

    names = _parameter_names(model)
    result = BackpropResult(loss.detach(), output.detach())
    for ext in extensions:
        if kron.handles(ext):
            result.quantities[ext.savefield] = kron.result(ext, names)
            continue
        source = (ext.columns, ext.mc_samples)
        result.quantities[ext.savefield] = {
            names[p]: _finalize(
                ext, reduced[source], p, g, num_cols[source], batch_size
            )
            for p, g in zip(params, param_grads, strict=True)
        }
    return result


def _check_extensions(extensions: Sequence[Extension]) -> list[Extension]:
    extensions = list(extensions)
    for ext in extensions:
        if not isinstance(ext, Extension):
            raise TypeError(
                f"extensions must be engine Extension instances, got {ext!r} "
                "(did you pass the class instead of an instance?)."
            )
    savefields = [ext.savefield for ext in extensions]
    duplicates = {s for s in savefields if savefields.count(s) > 1}
    if duplicates:
        raise ValueError(f"Extensions requested twice: {sorted(duplicates)}.")
    return extensions


def _forward(
    model: nn.Module, layers: list[Layer], args: tuple[Tensor, ...]
) -> tuple[Tensor, list[Record]]:
    with record_calls(layers, safe=False) as records:
        output = model(*args)
    if any(rec.modified_in_place() for rec in records):
        # see NOTE [In-place ops after a recorded layer]
        with record_calls(layers, safe=True) as records:
            output = model(*args)
    if not isinstance(output, Tensor):
        raise TypeError(
            f"The model returned {type(output).__name__}; the engine needs one tensor."
        )
    return output, records


def _sources(extensions: list[Extension]) -> dict[_Source, set[Reduction]]:
    sources: dict[_Source, set[Reduction]] = {}
    for ext in extensions:
        if isinstance(ext, KFRA):  # no columns: see kron_backprop
            continue
        sources.setdefault((ext.columns, ext.mc_samples), set()).update(ext.reductions)
    return sources


def _columns(
    rule: LossRule,
    loss_func: nn.Module,
    output: Tensor,
    targets: Tensor,
    source: _Source,
    generator: torch.Generator | None,
) -> tuple[int, Callable[[int, int], Tensor]]:
    """Number of columns and a function returning columns ``[start, stop)``.

    Exact columns are built chunk by chunk; sampled columns are drawn once.
    """
    out = output.detach()
    if source[0] == Columns.MC:
        sampled = rule.mc_columns(loss_func, out, targets, source[1], generator)
        return sampled.shape[0], lambda start, stop: sampled[start:stop]
    return rule.num_columns(out), lambda start, stop: rule.exact_columns(
        loss_func, out, targets, start, stop
    )


def _chunk_size(records: list[Record], budget: int) -> int:
    """Columns per chunk so that the columns pulled back to all layers fit.

    Per-sample parameter vectors that a rule builds transiently are chunked again,
    per layer, in :func:`_reduce_call`.
    """
    out_numel = sum(rec.output.numel() for rec in records)
    itemsize = records[0].output.element_size() if records else 4
    return max(1, budget // max(out_numel * itemsize, 1))


def _pull_back_chunks(
    output: Tensor,
    records: list[Record],
    total: int,
    make: Callable[[int, int], Tensor],
    reductions: set[Reduction],
    chunk: int,
    budget: int,
    on_chunk: Callable[[list[Tensor | None]], None] | None = None,
) -> dict[Reduction, dict[nn.Parameter, Tensor]]:
    """Pull back all columns chunk by chunk; ``on_chunk`` also sees every chunk."""
    pieces = []
    for start in range(0, total, chunk):
        cols = make(start, min(start + chunk, total))
        pulled = _vjp_batched(output, [rec.output for rec in records], cols)
        if on_chunk is not None:
            on_chunk(pulled)
        if reductions:
            pieces.append(_reduce_records(records, pulled, reductions, budget))
    return _merge_chunks(pieces) if pieces else {}


def _first_order(
    output: Tensor,
    grad_output: Tensor,
    records: list[Record],
    reductions: set[Reduction],
    budget: int,
) -> dict[Reduction, dict[nn.Parameter, Tensor]]:
    """Pull the loss gradient back to the recorded outputs and reduce it.

    # NOTE [The gradient from the rules]
    # Autograd is asked for gradients w.r.t. the recorded layer outputs only, never
    # w.r.t. the parameters, so it skips every weight-gradient kernel. The rules compute
    # the gradient (``Reduction.SUM``) from the same input and column they use for the
    # requested first-order quantities, usually as a by-product of them.
    """
    pulled = torch.autograd.grad(
        output,
        [rec.output for rec in records],
        grad_outputs=grad_output,
        allow_unused=True,
    )
    columns = [None if g is None else g.unsqueeze(0) for g in pulled]
    return _reduce_records(records, columns, reductions | {Reduction.SUM}, budget)


def _vjp_batched(
    output: Tensor, recorded: list[Tensor], columns: Tensor
) -> list[Tensor | None]:
    """Pull ``columns: [V, *output.shape]`` back to every recorded tensor at once."""
    if columns.shape[0] == 1:  # plain autograd: no vmap overhead for one column
        pulled = torch.autograd.grad(
            output,
            recorded,
            grad_outputs=columns[0],
            retain_graph=True,
            allow_unused=True,
        )
        return [None if g is None else g.unsqueeze(0) for g in pulled]
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


def _reduce_records(
    records: list[Record],
    pulled: list[Tensor | None],
    reductions: set[Reduction],
    budget: int,
) -> dict[Reduction, dict[nn.Parameter, Tensor]]:
    """Reduce one chunk of pulled-back columns into per-parameter quantities.

    # NOTE [Weight sharing sums before squaring]
    # A parameter used in k calls has per-sample vector J_n = sum_k J_n^(k). Squares and
    # norms must be taken of that sum, not summed over calls, so such parameters get
    # their per-sample vectors accumulated first and are reduced afterwards.
    """
    calls: dict[nn.Parameter, int] = {}
    for rec in records:
        for p in rec.params.values():
            calls[p] = calls.get(p, 0) + 1
    num_columns = next((g.shape[0] for g in pulled if g is not None), 1)
    out: dict[Reduction, dict[nn.Parameter, Tensor]] = {red: {} for red in reductions}
    shared: dict[nn.Parameter, Tensor] = {}
    for rec, pulled_g in zip(records, pulled, strict=True):
        g = zeros_like_columns(num_columns, rec) if pulled_g is None else pulled_g
        params = rec.params
        if any(calls[p] > 1 for p in params.values()):
            per_sample = rec.rule.per_sample(rec.module, rec.inputs, g)
            for local, p in params.items():
                shared[p] = (
                    shared[p] + per_sample[local] if p in shared else per_sample[local]
                )
            continue
        values = _reduce_call(rec, g, reductions, budget)
        for red, by_name in values.items():
            for local, p in params.items():
                out[red][p] = by_name[local]
    for p, per_sample in shared.items():
        for red in reductions:
            out[red][p] = reduce_per_sample(per_sample, red)
    return out


def _reduce_call(
    rec: Record, g: Tensor, reductions: set[Reduction], budget: int
) -> dict[Reduction, dict[str, Tensor]]:
    """One layer call's reductions, feeding materializing rules chunks of columns."""
    module, inputs = rec.module, rec.inputs
    if Reduction.PER_SAMPLE in reductions or not rec.rule.materializes(
        module, inputs, reductions
    ):
        return rec.rule.reduce(module, inputs, g, reductions)
    numel = sum(p.numel() for p in rec.params.values())
    step = max(1, budget // max(g.shape[1] * numel * g.element_size(), 1))
    if step >= g.shape[0]:
        return rec.rule.reduce(module, inputs, g, reductions)
    pieces = [
        rec.rule.reduce(module, inputs, g[start : start + step], reductions)
        for start in range(0, g.shape[0], step)
    ]
    return _merge_chunks(pieces)


_Key = TypeVar("_Key")


def _merge_chunks(
    pieces: list[dict[Reduction, dict[_Key, Tensor]]],
) -> dict[Reduction, dict[_Key, Tensor]]:
    """Combine reductions of consecutive column chunks (concatenate or add)."""
    if len(pieces) == 1:
        return pieces[0]
    merged: dict[Reduction, dict[_Key, Tensor]] = {}
    for red, first in pieces[0].items():
        merged[red] = {}
        for key in first:
            parts = [piece[red][key] for piece in pieces]
            if red in (Reduction.PER_SAMPLE, Reduction.L2):
                merged[red][key] = torch.cat(parts)
            else:
                total = parts[0].clone()
                for part in parts[1:]:
                    total += part
                merged[red][key] = total
    return merged


def _accumulate_grad(p: nn.Parameter, g: Tensor | None) -> None:
    if g is None:
        g = torch.zeros_like(p)
    p.grad = g.detach() if p.grad is None else p.grad + g.detach()


def _parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: name for name, p in model.named_parameters()}


def _finalize(
    ext: Extension,
    reduced: dict[Reduction, dict[nn.Parameter, Tensor]],
    p: nn.Parameter,
    grad: Tensor | None,
    num_columns: int,
    batch_size: int,
) -> Tensor:
    """Turn the reductions of one parameter into the extension's documented result."""
    red = ext.reductions[0]
    value = reduced[red].get(p)
    if value is None:  # layer never called in this forward pass
        value = _zero_reduction(red, p, num_columns, batch_size)
    if isinstance(ext, (BatchGrad, BatchL2Grad)):
        return value[0]  # the single gradient column
    if isinstance(ext, Variance):
        g = torch.zeros_like(p) if grad is None else grad
        return value / batch_size - (g / batch_size).square()
    return value


def _zero_reduction(
    red: Reduction, p: nn.Parameter, num_columns: int, batch_size: int
) -> Tensor:
    """Quantities of a parameter whose layer was not called in this forward pass."""
    shapes = {
        Reduction.PER_SAMPLE: (num_columns, batch_size, *p.shape),
        Reduction.SUM: tuple(p.shape),
        Reduction.SUM_SQUARED: tuple(p.shape),
        Reduction.BATCH_SQUARED: (batch_size, *p.shape),
        Reduction.L2: (num_columns, batch_size),
        Reduction.DOT: (batch_size, batch_size),
    }
    return torch.zeros(shapes[red], dtype=p.dtype, device=p.device)
