r"""The engine's entry point: :func:`backprop`.

One forward pass records every call of every parameterized layer that holds a selected
parameter (``params=``); the loss gradient, the loss-Hessian square-root columns and
(for :class:`~bayescurv.engine.Jacobian`) the unit vectors of the outputs are then
pulled back to all recorded outputs with batched autograd (:func:`torch.autograd.grad`
with ``is_grads_batched=True``), or one column at a time where batching would loop
anyway (:mod:`bayescurv.engine.pullback`), and each layer's rule turns (input,
pulled-back columns) into the requested quantities. The gradient w.r.t. the
parameters themselves is only computed for ``.grad`` (``accumulate_grad=True``) when
no first-order extension provides it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.engine import pool
from bayescurv.engine.autodiff import twice_differentiable
from bayescurv.engine.boundary import (
    check_generator,
    check_parameters,
    check_targets,
    model_args,
    model_output,
)
from bayescurv.engine.extensions import (
    BatchGrad,
    BatchL2Grad,
    Columns,
    Extension,
    Reduction,
    Variance,
)
from bayescurv.engine.hessian import diag_hessian, is_ggn
from bayescurv.engine.jacobian import FactoredLinear, Jacobian, identity_columns
from bayescurv.engine.kron import KFRA
from bayescurv.engine.kron_backprop import KronFactors
from bayescurv.engine.losses import LossRule, loss_rule
from bayescurv.engine.memory import backprop_estimates, check_estimates
from bayescurv.engine.pullback import PROBE_COLUMNS, per_column, probe, pull_back
from bayescurv.engine.recording import (
    Layer,
    Record,
    check_uncalled,
    find_layers,
    recorded_forward,
    zeros_like_columns,
)
from bayescurv.engine.rules import reduce_per_sample
from bayescurv.engine.rules.base import merge_chunks
from bayescurv.engine.rules.call import TRANSIENT_BYTES
from bayescurv.engine.samples import (
    assign_folds,
    check_separable,
    layer_name,
    pull_back_by_halves,
    separable_by_construction,
)
from bayescurv.engine.selection import ParamSelection, select_parameters

DEFAULT_MEMORY_BUDGET = 2**30
"""Default bytes for one chunk of pulled-back exact square-root columns."""


@dataclass
class BackpropResult:
    """What :func:`backprop` returns.

    Attributes:
        loss: The loss value (``None`` without a loss function); detached unless
            ``create_graph=True``.
        output: The model output; detached unless ``create_graph=True``.
        quantities: ``savefield -> parameter name -> value``: a tensor, a list of
            Kronecker factors (KFAC/KFLR/KFRA) or a
            :class:`~bayescurv.engine.LinearJacobian` (``Jacobian(factored=True)``).
    """

    loss: Tensor | None
    output: Tensor
    quantities: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, savefield: str) -> dict[str, Any]:
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
        loss = "None" if self.loss is None else f"{self.loss.item():.6g}"
        lines = [
            f"BackpropResult(loss={loss}, output={_shape(self.output)}, quantities={{"
        ]
        for savefield, by_param in self.quantities.items():
            lines.append(f"  {savefield!r}: {{")
            lines += [
                f"    {name!r}: {_shape(value)}," for name, value in by_param.items()
            ]
            lines.append("  },")
        return "\n".join([*lines, "})"]) if self.quantities else lines[0] + "})"


def _shape(value: Any) -> str:
    """``[N, C]`` for a tensor, ``[[B, B], [A, A]]`` for a list of factors.

    Other values (a factored ``LinearJacobian``) show their class and ``shape``.
    """
    if isinstance(value, Tensor):
        return "[" + ", ".join(map(str, value.shape)) + "]"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_shape(v) for v in value) + "]"
    shape = getattr(value, "shape", None)
    dims = "" if shape is None else "[" + ", ".join(map(str, shape)) + "]"
    return f"{type(value).__name__}{dims}"


# (column source, mc_samples) identifies one set of pulled-back columns
_Source = tuple[Columns, int]
_Reduced = dict[Reduction, dict[nn.Parameter, Tensor]]


@dataclass
class _Pass:
    """One forward pass and everything the backward sweeps need."""

    model: nn.Module
    loss_func: nn.Module | None
    rule: LossRule | None
    args: tuple[Tensor, ...]
    targets: Tensor | None
    layers: list[Layer]
    records: list[Record]
    output: Tensor
    loss: Tensor | None
    create_graph: bool
    memory_budget: int
    separable: bool = False
    """Rows belong to samples by construction (no probe needed)."""


def backprop(
    model: nn.Module,
    loss_func: nn.Module | None,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor | None,
    extensions: Sequence[Extension],
    *,
    params: ParamSelection = None,
    accumulate_grad: bool = True,
    create_graph: bool = False,
    generator: torch.Generator | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    check_samples: bool = True,
) -> BackpropResult:
    """Compute the loss and the requested quantities (and the gradient into ``.grad``).

    Args:
        model: Any ``nn.Module``; residual connections, branches, functional ops
            and repeated calls are supported. Parameterized layers without a
            registered rule use the generic ``torch.func`` rule (with a warning).
            Samples must not interact (e.g. BatchNorm must be in eval mode).
        loss_func: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss``
            with reduction ``"mean"`` or ``"sum"``; ``None`` if only
            :class:`~bayescurv.engine.Jacobian` is requested.
        inputs: Model input ``[N, ...]`` (a tuple is unpacked into ``model(*inputs)``).
        targets: Targets matching the loss (``None`` without a loss).
        extensions: Extension instances; all share one forward and one backward sweep.
        params: Which parameters get quantities: names (as in
            ``model.named_parameters()``) and/or the model's parameter tensors; default
            every parameter with ``requires_grad``. Results are keyed by the selected
            names only; layers holding none of them are not recorded. See
            :mod:`bayescurv.engine.selection`.
        accumulate_grad: Add the loss gradient to the selected parameters' ``.grad``
            as ``loss.backward()`` would. ``False``: no ``.grad`` is touched, and no
            gradient backward pass runs unless a first-order extension needs it.
        create_graph: Keep the autograd graph: the output, the loss and the results
            of the column-based extensions (first-order, GGN, Monte Carlo, Kronecker,
            Jacobian) stay differentiable w.r.t. the inputs and the parameters.
            ``.grad`` is always written detached.
        generator: Random generator for Monte Carlo extensions (default: the global
            one).
        memory_budget: Bytes allowed for the columns pulled back to all recorded
            layer outputs in one chunk; larger problems are processed in chunks of
            columns (same results).
        chunk_size: Exact (or Jacobian) columns per chunk (overrides
            ``memory_budget``).
        max_memory: Bytes the results may take (per-sample gradients, square
            roots, Jacobians, Kronecker factors, ``batch_dot``), estimated before
            anything is allocated; ``None``: 80% of the available memory. See
            :mod:`bayescurv.engine.memory`.
        check_samples: Check that every recorded row belongs to one sample and that
            samples do not interact (the probe of :mod:`bayescurv.engine.samples`,
            up to two extra backward passes to the layer outputs; skipped anyway
            for per-sample ``nn.Sequential`` chains). ``False`` skips it: only for
            callers that probed the same model in the same configuration before
            (the Laplace layer probes once per model configuration and input
            shape).

    Returns:
        The :class:`BackpropResult`; ``res[savefield][param_name]``. On CPU, large
        results are written into memory kept from earlier calls that nothing holds
        any more (never into a result still held; see
        :func:`~bayescurv.engine.set_pool_limit`).

    Raises:
        ValueError: For bad ``params`` (naming the entry), extensions that need a
            loss without one, a layer whose output rows depend on other samples
            (:mod:`bayescurv.engine.samples`), and the other input problems
            described in the docs (:mod:`bayescurv.engine.boundary`).
        TypeError: For inputs, outputs, ``generator`` or parameter dtypes the
            engine does not take (:mod:`bayescurv.engine.boundary`).
        MemoryBudgetError: If the results would exceed ``max_memory`` (a
            ``MemoryError``; the message gives the estimate and an alternative).
        NotImplementedError: For ``create_graph=True`` with ``DiagHessian``,
            ``BatchDiagHessian``, ``KFRA`` or a layer rule that is not
            differentiable (``LayerRule.differentiable``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagGGNExact()], params=["weight"],
        ...                       accumulate_grad=False)
        >>> # closed form for MSE with sum reduction: 2 * sum_n x_n^2 per output row
        >>> torch.allclose(res["diag_ggn_exact"]["weight"][0], 2 * (x**2).sum(0))
        True
        >>> list(res["diag_ggn_exact"]), model.weight.grad is None
        (['weight'], True)
    """
    # see NOTE [Reusing result memory]
    with pool.sweep():
        extensions = _check_extensions(extensions, loss_func, targets, create_graph)
        # first-order extensions alone: the probe splits the gradient pass (NOTE [The
        # sample-separability probe]); otherwise it pulls back random columns
        first_order_only = bool(extensions) and all(
            e.columns == Columns.GRADIENT and not isinstance(e, KFRA)
            for e in extensions
        )
        selected = select_parameters(model, params)
        check_parameters(selected)
        generator = check_generator(generator)
        run = _run_forward(
            model,
            loss_func,
            inputs,
            targets,
            selected,
            create_graph,
            memory_budget,
            probe=bool(extensions) and not first_order_only,
            check_samples=check_samples,
        )
        _check_folds(run.records, extensions, model)
        factored = _factored(extensions, run.records)
        check_estimates(
            backprop_estimates(
                extensions,
                run.layers,
                run.output.shape[0],
                _columns_per_sample(run, extensions),
                factored.sizes(),
            ),
            max_memory,
            run.output.device,
        )
        kron = KronFactors(
            extensions,
            run.layers,
            run.records,
            (model, loss_func, run.rule, run.output, targets, run.args),
        )
        sources = _sources(extensions)
        first_order = sources.pop((Columns.GRADIENT, 0), None)
        grad_output = None
        if first_order is not None:
            # see NOTE [The gradient from the rules]
            (grad_output,) = torch.autograd.grad(
                run.loss, run.output, retain_graph=True, create_graph=create_graph
            )
        reduced, num_cols = _column_quantities(
            run, sources, kron, factored, generator, chunk_size, _fewest(extensions)
        )
        grads = _gradient(
            run,
            selected,
            first_order,
            grad_output,
            reduced,
            accumulate_grad,
            first_order_only,
        )
        if accumulate_grad and run.loss is not None:
            for p in selected.values():
                _accumulate_grad(p, grads.get(p))
        return _collect(
            run, extensions, selected, reduced, num_cols, grads, kron, factored
        )


def _run_forward(
    model: nn.Module,
    loss_func: nn.Module | None,
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor | None,
    selected: dict[str, nn.Parameter],
    create_graph: bool,
    memory_budget: int,
    probe: bool,
    check_samples: bool = True,
) -> _Pass:
    """Check the inputs, run the recorded forward pass and the loss.

    ``probe``: check that every recorded row belongs to one sample (needed by every
    extension, not by ``.grad`` alone); ``check_samples=False``: the caller vouches
    for it (no probe, first-order quantities without the split gradient pass).
    """
    args = model_args(inputs)
    rule = None
    if loss_func is not None:
        check_targets(targets)
        rule = loss_rule(loss_func)
    layers = find_layers(model, selected)
    output, records = _forward(model, layers, args, create_graph, memory_budget)
    if rule is not None:
        rule.check(loss_func, output, targets)
    assign_folds(records, output.shape[0], model)
    check_uncalled(layers, records, output)
    # see NOTE [The sample-separability probe] and NOTE [Chains that need no probe]
    separable = not check_samples or separable_by_construction(model, records)
    if probe and not separable:
        check_separable(output, records, model)
    if create_graph:
        _check_differentiable(records)
    loss = None if loss_func is None else loss_func(output, targets)
    return _Pass(
        model,
        loss_func,
        rule,
        args,
        targets,
        layers,
        records,
        output,
        loss,
        create_graph,
        memory_budget,
        separable,
    )


def _check_extensions(
    extensions: Sequence[Extension],
    loss_func: nn.Module | None,
    targets: Tensor | None,
    create_graph: bool,
) -> list[Extension]:
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
    if loss_func is None:
        needs_loss = [type(e).__name__ for e in extensions if not _loss_free(e)]
        if needs_loss:
            raise ValueError(
                f"loss_func=None, but {needs_loss} need a loss; only Jacobian works "
                "without one."
            )
        if targets is not None:
            raise ValueError(
                "targets were given without a loss_func: pass both, or None for both."
            )
    elif targets is None:
        raise ValueError(f"{type(loss_func).__name__} needs targets, got None.")
    if create_graph:
        fixed = [
            type(e).__name__
            for e in extensions
            if isinstance(e, KFRA) or e.columns == Columns.HESSIAN
        ]
        if fixed:
            raise NotImplementedError(
                f"create_graph=True: {fixed} are computed from detached quantities "
                "and would not be differentiable. Request them in a call without "
                "create_graph."
            )
    return extensions


def _check_folds(
    records: list[Record], extensions: list[Extension], model: nn.Module
) -> None:
    """Hessian diagonals and KFRA need one row per sample in every layer."""
    folded = [rec for rec in records if rec.fold > 1]
    needs_rows = [
        type(e).__name__
        for e in extensions
        if isinstance(e, KFRA) or e.columns == Columns.HESSIAN
    ]
    if folded and needs_rows:
        raise NotImplementedError(
            f"{needs_rows} need one row per sample in every layer, but "
            f"{layer_name(folded[0].module, model)} sees {folded[0].fold} rows per "
            "sample (a folded batch axis). Use the GGN extensions (DiagGGNExact, "
            "KFLR, ...), which support folded axes."
        )


def _loss_free(ext: Extension) -> bool:
    return ext.columns == Columns.IDENTITY


def _check_differentiable(records: list[Record]) -> None:
    for rec in records:
        if not rec.rule.differentiable:
            raise NotImplementedError(
                f"create_graph=True: the rule of {type(rec.module).__name__} "
                f"({type(rec.rule).__name__}) works on detached tensors, so its "
                "results would not be differentiable. Leave its parameters out with "
                "params=, or use torch.func for this model."
            )


def _forward(
    model: nn.Module,
    layers: list[Layer],
    args: tuple[Tensor, ...],
    keep_graph: bool,
    budget: int,
) -> tuple[Tensor, list[Record]]:
    # results differentiated again need attention's composite kernel, see
    # NOTE [Twice-differentiable attention]
    context = twice_differentiable if keep_graph else contextlib.nullcontext
    output, records = recorded_forward(model, layers, args, keep_graph, budget, context)
    return model_output(output), records


def _fewest(extensions: list[Extension]) -> bool:
    """Whether the exact columns may be the fewest (NOTE [Fewest columns]).

    So when every extension that takes them depends on them through ``S S^T`` only.
    """
    return all(e.gram_only for e in extensions if e.columns == Columns.EXACT)


def _columns_per_sample(run: _Pass, extensions: list[Extension]) -> dict[str, int]:
    """Columns per sample of the column-based results (for memory estimates)."""
    columns = {"Jacobian": run.output[0].numel()}
    if run.rule is not None:
        columns["SqrtGGNExact"] = (
            run.rule.num_gram_columns(run.output)
            if _fewest(extensions)
            else run.rule.num_columns(run.output)
        )
    for ext in extensions:
        if ext.columns == Columns.MC:
            columns[type(ext).__name__] = ext.mc_samples
    return columns


def _sources(extensions: list[Extension]) -> dict[_Source, set[Reduction]]:
    sources: dict[_Source, set[Reduction]] = {}
    for ext in extensions:
        if isinstance(ext, KFRA):  # no columns: see kron_backprop
            continue
        sources.setdefault((ext.columns, ext.mc_samples), set()).update(ext.reductions)
    return sources


def _factored(extensions: list[Extension], records: list[Record]) -> FactoredLinear:
    """The linear layers whose Jacobians are returned factored (maybe none)."""
    wanted = any(isinstance(e, Jacobian) and e.factored for e in extensions)
    return FactoredLinear(records if wanted else [])


def _column_quantities(
    run: _Pass,
    sources: dict[_Source, set[Reduction]],
    kron: KronFactors,
    factored: FactoredLinear,
    generator: torch.Generator | None,
    chunk_size: int | None,
    fewest: bool,
) -> tuple[dict[_Source, _Reduced], dict[_Source, int]]:
    """Pull back every column source (but the gradient) and reduce it per layer.

    ``fewest``: the exact columns are the loss rule's fewest (every extension
    taking them is ``gram_only``); the GGN path of the Hessian diagonals always
    takes those.
    """
    reduced: dict[_Source, _Reduced] = {}
    num_cols: dict[_Source, int] = {(Columns.GRADIENT, 0): 1}
    for source, reductions in sources.items():
        if source[0] == Columns.HESSIAN and is_ggn(run.model, run.records):
            # see NOTE [Piecewise-linear chains]: the exact columns, unshared
            total, make = _columns(run, (Columns.EXACT, 0), generator, fewest=True)
            reduced[source] = _pull_back_chunks(
                run, total, make, reductions, chunk_size, [], set()
            )
            num_cols[source] = 1
            continue
        if source[0] == Columns.HESSIAN:  # see bayescurv/engine/hessian
            reduced[source] = diag_hessian(
                run.model,
                run.layers,
                run.args,
                run.loss_func,
                run.output,
                run.targets,
                run.records,
                reductions,
                run.memory_budget,
            )
            num_cols[source] = 1
            continue
        total, make = _columns(run, source, generator, fewest)
        num_cols[source] = total
        consumers = [kron.consumer(source)]
        skip: set[int] = set()
        if source[0] == Columns.IDENTITY:
            consumers.append(factored.add_chunk)
            skip = set(factored.indices)
        reduced[source] = _pull_back_chunks(
            run, total, make, reductions, chunk_size, consumers, skip
        )
    return reduced, num_cols


def _columns(
    run: _Pass,
    source: _Source,
    generator: torch.Generator | None,
    fewest: bool = False,
) -> tuple[int, Callable[[int, int], Tensor]]:
    """Number of columns and a function returning columns ``[start, stop)``.

    Exact columns are built chunk by chunk, the rule's fewest if ``fewest`` (NOTE
    [Fewest columns]); sampled columns are drawn once.
    """
    out = run.output if run.create_graph else run.output.detach()
    if source[0] == Columns.IDENTITY:
        return out[0].numel(), lambda start, stop: identity_columns(out, start, stop)
    rule, loss_func, targets = run.rule, run.loss_func, run.targets
    if source[0] == Columns.MC:
        sampled = rule.mc_columns(loss_func, out, targets, source[1], generator)
        return sampled.shape[0], lambda start, stop: sampled[start:stop]
    if fewest:
        return rule.num_gram_columns(out), lambda start, stop: rule.gram_columns(
            loss_func, out, targets, start, stop
        )
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


# Reductions whose results have the parameter's size and add up over columns
_ADDITIVE = frozenset({Reduction.SUM, Reduction.SUM_SQUARED})


def _next_chunk(
    run: _Pass, reductions: set[Reduction], chunk_size: int | None, left: int
) -> int:
    """Columns in the next chunk (at most ``left``).

    # NOTE [Chunks of a per-column pull-back]
    # Columns pulled back one at a time (NOTE [Per-column pull-backs]) are copied
    # into [V, ...] tensors for the rules, fresh allocations that page-fault like
    # the per-sample vectors of NOTE [Transient per-sample vectors in small chunks].
    # Where nothing gains from seeing all columns at once, chunks are therefore cut
    # so that their pulled-back columns fit TRANSIENT_BYTES: for Kronecker factors
    # alone (KFLR on 3C3D, 18 MB per column: 5.2 gradient steps with one column
    # per chunk, 6.1 with one chunk of 10), and for sums and sums of squares when
    # every layer call materializes per-sample vectors. A closed form sums over the
    # columns before its one large product (nn.Linear's squares, a convolution's
    # location pairs), so one column per chunk repeats that product: DiagGGNExact
    # on a ResNet-18 takes 1.8x the time, on a tanh MLP 2x. Per-sample results
    # (BATCH_SQUARED, PER_SAMPLE, ...) keep whole chunks too.
    """
    if chunk_size is not None:
        return min(chunk_size, left)
    budget = run.memory_budget
    if per_column(_graph_key(run)) and _reduced_per_column(run.records, reductions):
        budget = min(budget, TRANSIENT_BYTES)
    return min(_chunk_size(run.records, budget), left)


def _graph_key(run: _Pass) -> nn.Module:
    """What the per-column verdict is remembered by (NOTE [Per-column pull-backs]).

    The first recorded layer rather than the model: callers may wrap one model in a
    fresh adapter per call (the Laplace layer does), and a layer shared by two
    models with different ops costs speed, never accuracy (both paths give the same
    numbers).
    """
    return run.records[0].module if run.records else run.model


def _reduced_per_column(records: list[Record], reductions: set[Reduction]) -> bool:
    """Whether columns may be reduced in small chunks at no extra cost (see NOTE)."""
    if not reductions:
        return True
    return reductions <= _ADDITIVE and all(
        rec.rule.materializes(rec.module, rec.inputs, reductions) for rec in records
    )


def _pull_back_chunks(
    run: _Pass,
    total: int,
    make: Callable[[int, int], Tensor],
    reductions: set[Reduction],
    chunk_size: int | None,
    consumers: list[Callable[[list[Tensor]], None] | None],
    skip: set[int],
) -> _Reduced:
    """Pull back all columns chunk by chunk and reduce them per layer call.

    Every consumer also sees every chunk (columns at all recorded outputs, zeros
    for outputs the model does not use); the calls in ``skip`` are not reduced.
    Chunks have ``chunk_size`` columns, or as chosen by :func:`_next_chunk`; their
    reductions are combined as they come.
    """
    records = run.records
    recorded = [rec.output for rec in records]
    first = _next_chunk(run, reductions, chunk_size, total)
    if per_column(_graph_key(run)) is None and not run.create_graph and first > 1:
        # see NOTE [Per-column pull-backs]; chunks of one column are never batched
        columns = make(0, min(PROBE_COLUMNS, first))
        probe(_graph_key(run), run.output, recorded, columns)

    def chunks() -> Iterator[_Reduced]:
        start = 0
        while start < total:
            stop = start + _next_chunk(run, reductions, chunk_size, total - start)
            cols = make(start, stop)
            start = stop
            pulled = pull_back(
                _graph_key(run), run.output, recorded, cols, run.create_graph
            )
            pulled = [
                zeros_like_columns(cols.shape[0], rec) if g is None else g
                for rec, g in zip(records, pulled, strict=True)
            ]
            for consume in consumers:
                if consume is not None:
                    consume(pulled)
            if reductions:
                yield _reduce_records(
                    records, pulled, reductions, run.memory_budget, skip
                )

    return merge_chunks(chunks())


def _gradient(
    run: _Pass,
    selected: dict[str, nn.Parameter],
    first_order: set[Reduction] | None,
    grad_output: Tensor | None,
    reduced: dict[_Source, _Reduced],
    accumulate_grad: bool,
    probe: bool,
) -> dict[nn.Parameter, Tensor | None]:
    """The loss gradient per selected parameter (empty if nobody needs it).

    With first-order extensions it comes from the rules (see NOTE [The gradient from
    the rules]); for ``.grad`` alone from one plain backward pass; otherwise that pass
    is skipped.
    """
    params = list(selected.values())
    if first_order is not None:
        source = (Columns.GRADIENT, 0)
        probe = probe and not run.separable
        reduced[source] = _first_order(run, grad_output, first_order, probe)
        sums = reduced[source][Reduction.SUM]
        return {p: sums.get(p) for p in params}
    if accumulate_grad and run.loss is not None:
        grads = torch.autograd.grad(run.loss, params, allow_unused=True)
        return dict(zip(params, grads, strict=True))
    return {}


def _first_order(
    run: _Pass, grad_output: Tensor, reductions: set[Reduction], probe: bool
) -> _Reduced:
    """Pull the loss gradient back to the recorded outputs and reduce it.

    With ``probe`` the gradient is pulled back as its even and odd halves, checking
    that every row belongs to one sample (see :mod:`bayescurv.engine.samples`).

    # NOTE [The gradient from the rules]
    # Autograd is asked for gradients w.r.t. the recorded layer outputs only, never
    # w.r.t. the parameters, so it skips every weight-gradient kernel. The rules compute
    # the gradient (``Reduction.SUM``) from the same input and column they use for the
    # requested first-order quantities, usually as a by-product of them.
    """
    records = run.records
    if probe:
        pulled = pull_back_by_halves(
            run.output, records, grad_output, run.model, run.create_graph
        )
    else:
        pulled = torch.autograd.grad(
            run.output,
            [rec.output for rec in records],
            grad_outputs=grad_output,
            allow_unused=True,
            create_graph=run.create_graph,
        )
    columns = [None if g is None else g.unsqueeze(0) for g in pulled]
    return _reduce_records(
        records, columns, reductions | {Reduction.SUM}, run.memory_budget
    )


def _reduce_records(
    records: list[Record],
    pulled: list[Tensor | None],
    reductions: set[Reduction],
    budget: int,
    skip: set[int] | frozenset[int] = frozenset(),
) -> _Reduced:
    """Reduce one chunk of pulled-back columns into per-parameter quantities.

    # NOTE [Weight sharing sums before squaring]
    # A parameter used in k calls has per-sample vector J_n = sum_k J_n^(k). Squares and
    # norms must be taken of that sum, not summed over calls, so such parameters get
    # their per-sample vectors accumulated first and are reduced afterwards. A layer
    # seeing k rows per sample (a folded batch axis) is the same: its per-row vectors
    # are summed over each sample's rows before any square.
    """
    calls: dict[nn.Parameter, int] = {}
    for rec in records:
        for p in rec.params.values():
            calls[p] = calls.get(p, 0) + 1
    num_columns = next((g.shape[0] for g in pulled if g is not None), 1)
    out: dict[Reduction, dict[nn.Parameter, Tensor]] = {red: {} for red in reductions}
    shared: dict[nn.Parameter, Tensor] = {}
    for i, (rec, pulled_g) in enumerate(zip(records, pulled, strict=True)):
        if i in skip:
            continue
        g = zeros_like_columns(num_columns, rec) if pulled_g is None else pulled_g
        params = rec.params
        if rec.fold > 1 or any(calls[p] > 1 for p in params.values()):
            per_sample = rec.per_sample(g)
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
    """One layer call's reductions, feeding materializing rules chunks of columns.

    # NOTE [Transient per-sample vectors in small chunks]
    # A rule that materializes [V, N, *p] gets as many columns at a time as fit
    # TRANSIENT_BYTES (and the memory budget). glibc serves larger blocks as fresh
    # mappings whose every page faults on first write, which costs as much as the
    # matmul that fills them; blocks up to 32 MB are recycled from its heap. On
    # 3C3D's deepest convolution (28 MB per column, 10 columns) BatchDiagGGNExact
    # takes 0.7x the time one column at a time. The pieces are added up as they
    # come (one [N, *p] accumulator, not one per chunk).
    """
    module, inputs = rec.module, rec.inputs
    if Reduction.PER_SAMPLE in reductions or not rec.rule.materializes(
        module, inputs, reductions
    ):
        return rec.rule.reduce(module, inputs, g, reductions)
    numel = sum(p.numel() for p in rec.params.values())
    per_column = max(g.shape[1] * numel * g.element_size(), 1)
    step = max(1, min(budget, TRANSIENT_BYTES) // per_column)
    return merge_chunks(
        rec.rule.reduce(module, inputs, g[start : start + step], reductions)
        for start in range(0, g.shape[0], step)
    )


def _accumulate_grad(p: nn.Parameter, g: Tensor | None) -> None:
    if g is None:
        g = torch.zeros_like(p)
    p.grad = g.detach() if p.grad is None else p.grad + g.detach()


def _collect(
    run: _Pass,
    extensions: list[Extension],
    selected: dict[str, nn.Parameter],
    reduced: dict[_Source, _Reduced],
    num_cols: dict[_Source, int],
    grads: dict[nn.Parameter, Tensor | None],
    kron: KronFactors,
    factored: FactoredLinear,
) -> BackpropResult:
    """Every extension's documented result, keyed by the selected names."""
    keep = run.create_graph
    output = run.output if keep else run.output.detach()
    loss = run.loss if keep or run.loss is None else run.loss.detach()
    result = BackpropResult(loss, output)
    names = {p: name for name, p in selected.items()}
    linear = factored.result()
    batch_size = run.output.shape[0]
    for ext in extensions:
        if kron.handles(ext):
            result.quantities[ext.savefield] = kron.result(ext, names)
            continue
        source = (ext.columns, ext.mc_samples)
        values = {}
        for name, p in selected.items():
            if isinstance(ext, Jacobian) and p in linear:
                values[name] = linear[p]
                continue
            values[name] = _finalize(
                ext, reduced[source], p, grads.get(p), num_cols[source], batch_size
            )
        result.quantities[ext.savefield] = values
    return result


def _finalize(
    ext: Extension,
    reduced: _Reduced,
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
