r"""Layer rules and their registry.

A :class:`LayerRule` says how one parameterized layer turns its recorded input and the
columns pulled back to its output into per-parameter quantities. The only required
method is :meth:`LayerRule.per_sample`; rules may override :meth:`LayerRule.reduce`
with faster formulas that never materialize ``[V, N, *p]`` (e.g. for ``nn.Linear``,
:math:`\sum_{v,n} (g_{vn} x_n^\top)^{\odot 2} = (g^{\odot 2})^\top x^{\odot 2}`).
Rules that support the Kronecker extensions (KFAC, KFLR) also implement
:meth:`LayerRule.kron_input` and :meth:`LayerRule.kron_output`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from bayescurv.engine.extensions import Reduction
from bayescurv.engine.pool import pooled_empty
from bayescurv.engine.rules.call import LayerCall
from bayescurv.engine.rules.kron_stats import InputStats, KFACApprox

_Key = TypeVar("_Key")


def reduce_per_sample(per_sample: Tensor, reduction: Reduction) -> Tensor:
    """Apply a :class:`Reduction` to per-sample vectors ``[V, N, *p]``."""
    if reduction == Reduction.PER_SAMPLE:
        return per_sample
    if reduction == Reduction.SUM:
        return per_sample.sum((0, 1))
    if reduction == Reduction.SUM_SQUARED:
        return per_sample.square().sum((0, 1))
    if reduction == Reduction.BATCH_SQUARED:
        return per_sample.square().sum(0)
    flat = per_sample.flatten(start_dim=2)
    if reduction == Reduction.L2:
        return flat.square().sum(-1)
    if reduction == Reduction.DOT:
        return torch.einsum("vnp,vmp->nm", flat, flat)
    raise ValueError(f"Unknown reduction {reduction!r}.")


class LayerRule:
    """How a parameterized layer maps (input, output-side columns) to quantities.

    Subclasses implement :meth:`per_sample` and may override :meth:`reduce`.
    ``inputs`` is the tuple of positional tensors the layer was called with (a
    :class:`~bayescurv.engine.rules.call.LayerCall` that also holds keyword arguments
    and the recorded output), ``grad_output`` has shape ``[V, N, *out]`` (``V``
    columns per sample), always batch-first.

    Attributes:
        linear_in_params: Whether the layer's output is linear (affine) in its
            parameters for a fixed input, as for ``nn.Linear``, convolutions, the
            affine parameters of normalization layers and ``nn.Embedding``. Exact
            Hessian diagonals then follow from the Hessian w.r.t. the layer's output
            (see :mod:`bayescurv.engine.hessian`); other layers get slower
            Hessian-vector products w.r.t. their parameters. Default ``False`` (safe).
        owns_submodules: Whether the rule computes the quantities of the parameters
            of the layer's submodules too (e.g. ``nn.MultiheadAttention`` uses
            ``out_proj.weight`` without calling ``out_proj``); those submodules are
            then not recorded on their own. By default a rule covers the layer's own
            parameters (``named_parameters(recurse=False)``).
        differentiable: Whether the rule's results keep the autograd graph of its
            recorded inputs, columns and parameters (``backprop(...,
            create_graph=True)``): true for rules written in differentiable torch
            ops; rules that detach (e.g. to re-run a layer step by step) set it to
            ``False`` and the engine then raises for ``create_graph=True``.
    """

    linear_in_params: ClassVar[bool] = False
    owns_submodules: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True

    def check(self, module: nn.Module) -> None:
        """Raise if the layer is in a state the rule cannot handle (default: none)."""

    def output_batch_axes(
        self, module: nn.Module, call: LayerCall, outputs: list[Any]
    ) -> list[int | None]:
        """The batch axis of each leaf of the layer's flattened output.

        Called while recording. ``None`` leaves an output out (it then gets no
        columns). The default records every tensor with the batch on axis 0; rules
        for layers with ``batch_first=False`` or tuple outputs override it.

        Args:
            module: The layer.
            call: Its arguments.
            outputs: The leaves of its (possibly nested) output.
        """
        return [0 if isinstance(out, Tensor) else None for out in outputs]

    def graph_output(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict, output: Any
    ) -> Any:
        """The output to record and hand downstream (default: the layer's own).

        Called while recording, with the layer's live arguments. A rule may return a
        tensor of the same values whose backward is cheaper; columns are then pulled
        back through it (see NOTE [Taps that read only padding]).
        """
        return output

    def per_sample(
        self, module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
    ) -> dict[str, Tensor]:
        """Per-sample, per-column parameter vectors, ``name -> [V, N, *p]``.

        Keys are the parameter names local to the module (``"weight"``, ``"bias"``).
        """
        raise NotImplementedError

    def materializes(
        self,
        module: nn.Module,
        inputs: tuple[Tensor, ...],
        reductions: Iterable[Reduction],
    ) -> bool:
        """Whether :meth:`reduce` builds ``[V, N, *p]`` per-sample vectors.

        The engine then feeds it columns in chunks that fit its memory budget.
        """
        return True

    def reduce(
        self,
        module: nn.Module,
        inputs: tuple[Tensor, ...],
        grad_output: Tensor,
        reductions: Iterable[Reduction],
    ) -> dict[Reduction, dict[str, Tensor]]:
        """All requested reductions of the per-sample vectors of one layer call.

        The default materializes :meth:`per_sample` once and reduces it.
        """
        per_sample = self.per_sample(module, inputs, grad_output)
        reductions = tuple(reductions)
        result: dict[Reduction, dict[str, Tensor]] = {red: {} for red in reductions}
        for name, val in per_sample.items():
            owned = _owned(val, (*inputs, grad_output))
            for red, value in _reduce_all(val, reductions, owned).items():
                result[red][name] = value
        return result

    def kron_input(
        self, module: nn.Module, inputs: tuple[Tensor, ...], approx: KFACApprox
    ) -> dict[str, InputStats]:
        """Input-side statistics of the parameters that have an input factor ``A``.

        Called once per layer call (never per column); parameters missing from the
        result (biases, normalization parameters) get a single full factor ``[B]``.
        Build the result with :func:`~bayescurv.engine.rules.kron_stats.input_stats`.
        """
        raise NotImplementedError(self._no_kron(module))

    def kron_output(
        self, module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor
    ) -> dict[str, Tensor]:
        r"""Output-side vectors :math:`c_{vnr}` of every parameter, ``[V, N, R, d]``.

        For a parameter with an input factor, ``R`` are its weight-sharing positions
        (as in :meth:`kron_input`) and ``d`` its output dimension. For one without,
        ``R = 1`` and ``d = numel``: the per-sample vectors, whose outer products
        summed over columns and samples give the exact GGN block.
        """
        raise NotImplementedError(self._no_kron(module))

    def kron_shapes(
        self, module: nn.Module, name: str, approx: KFACApprox
    ) -> list[tuple[int, ...]]:
        """Shapes of the Kronecker factors of parameter ``name`` (nothing allocated).

        The default is ``[B, A]`` over the leading axis and the rest for parameters
        with two or more axes, ``[B]`` otherwise. The engine uses them for memory
        estimates and for the zero factors of a layer that was not called.
        """
        p = module.get_parameter(name)  # dotted for owned submodules
        sizes = [p.numel()] if p.dim() < 2 else [p.shape[0], p[0].numel()]
        return [(s, s) for s in sizes]

    def kron_zeros(
        self, module: nn.Module, name: str, approx: KFACApprox
    ) -> list[Tensor]:
        """Zero factors of a parameter whose layer was not called (see kron_shapes)."""
        p = module.get_parameter(name)
        return [p.new_zeros(shape) for shape in self.kron_shapes(module, name, approx)]

    def _no_kron(self, module: nn.Module) -> str:
        return (
            f"{type(self).__name__} (the rule of {type(module).__name__}) does not "
            "provide Kronecker factors: implement LayerRule.kron_input and "
            "LayerRule.kron_output to use KFAC/KFLR on this layer."
        )


def merge_chunks(
    pieces: Iterable[dict[Reduction, dict[_Key, Tensor]]],
) -> dict[Reduction, dict[_Key, Tensor]]:
    """Reductions of consecutive column chunks combined (concatenated or added).

    Per-sample vectors and squared norms (``[V, ...]``) are concatenated along the
    columns; every other reduction is a sum over columns and is added. ``pieces`` may
    be an iterator: sums are then accumulated as the chunks come (one ``[N, *p]``
    accumulator for ``BATCH_SQUARED``, not one per chunk), into a copy of the first
    chunk's value, so no rule's tensor is modified. One chunk is returned as it is;
    none gives ``{}``.
    """
    chunks = iter(pieces)
    first = next(chunks, None)
    second = next(chunks, None)
    if second is None:
        return {} if first is None else first
    merged: dict[Reduction, dict[_Key, Tensor]] = {}
    parts: dict[Reduction, dict[_Key, list[Tensor]]] = {}
    for red, values in first.items():
        if red in CONCATENATED:
            parts[red] = {key: [value] for key, value in values.items()}
        else:
            merged[red] = {key: _copy(value) for key, value in values.items()}
    for piece in itertools.chain([second], chunks):
        for red, values in piece.items():
            for key, value in values.items():
                if red in CONCATENATED:
                    parts[red][key].append(value)
                else:
                    merged[red][key] += value
    for red, values in parts.items():
        merged[red] = {key: torch.cat(chunk) for key, chunk in values.items()}
    return merged


CONCATENATED = frozenset({Reduction.PER_SAMPLE, Reduction.L2})
"""Reductions whose column chunks are concatenated (every other one is summed)."""


def _copy(tensor: Tensor) -> Tensor:
    """A contiguous copy (in pooled memory, see NOTE [Reusing result memory])."""
    if tensor.requires_grad:
        return tensor.clone()
    return pooled_empty(tensor.shape, like=tensor).copy_(tensor)


def _column_sum(tensor: Tensor) -> Tensor:
    """Sum over the leading (column) axis (pooled, see NOTE [Reusing result memory])."""
    if tensor.requires_grad:
        return tensor.sum(0)
    return torch.sum(tensor, 0, out=pooled_empty(tensor.shape[1:], like=tensor))


def _owned(tensor: Tensor, sources: tuple[Tensor, ...]) -> bool:
    """Whether ``tensor`` shares no memory with ``sources`` (so it may be reused)."""
    ptr = tensor.untyped_storage().data_ptr()
    return all(ptr != s.untyped_storage().data_ptr() for s in sources)


def _reduce_all(
    per_sample: Tensor, reductions: tuple[Reduction, ...], owned: bool
) -> dict[Reduction, Tensor]:
    """All reductions of one ``[V, N, *p]`` tensor with as few large temporaries.

    # NOTE [Squaring in place]
    # Per-sample tensors are the largest objects the engine builds, and on CPU every
    # fresh allocation of that size costs page faults comparable to the arithmetic.
    # Squares are therefore taken in place when the tensor is a temporary of the rule
    # (shares no memory with the layer input or the columns) and nothing else needs
    # the unsquared values; one column's per-sample squares are returned as a view.
    """
    out = {
        red: reduce_per_sample(per_sample, red)
        for red in reductions
        if red not in (Reduction.SUM_SQUARED, Reduction.BATCH_SQUARED)
    }
    squared = [
        red
        for red in reductions
        if red in (Reduction.SUM_SQUARED, Reduction.BATCH_SQUARED)
    ]
    if squared:
        in_place = (
            owned
            and Reduction.PER_SAMPLE not in reductions
            and not per_sample.requires_grad  # create_graph: autograd needs it
        )
        sq = per_sample.square_() if in_place else per_sample.square()
        for red in squared:
            if red == Reduction.SUM_SQUARED:
                out[red] = sq.sum((0, 1))
            else:
                out[red] = sq[0] if sq.shape[0] == 1 else _column_sum(sq)
    return out


# NOTE [Exact-type registry]
# Rules are looked up by the layer's exact class. A subclass of nn.Linear may override
# ``forward``, so silently applying the parent's rule could produce wrong numbers; users
# register subclasses explicitly (often with the parent's rule object).
_RULES: dict[type[nn.Module], LayerRule] = {}


def register_rule(
    layer_cls: type[nn.Module], rule: LayerRule, overwrite: bool = False
) -> None:
    """Register ``rule`` for layers of exactly the class ``layer_cls``.

    Args:
        layer_cls: The layer class (exact type; subclasses need their own entry).
        rule: The rule instance.
        overwrite: Replace an existing rule instead of raising.

    Raises:
        ValueError: If a rule exists and ``overwrite`` is false.
        TypeError: If the arguments have the wrong types.
    """
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, nn.Module)):
        raise TypeError(f"layer_cls must be an nn.Module subclass, got {layer_cls!r}.")
    if not isinstance(rule, LayerRule):
        raise TypeError(
            f"rule must be a LayerRule instance, got {type(rule).__name__}."
        )
    if layer_cls in _RULES and not overwrite:
        raise ValueError(
            f"A rule for {layer_cls.__name__} is already registered; pass "
            "overwrite=True to replace it."
        )
    _RULES[layer_cls] = rule


def get_rule(layer: nn.Module | type[nn.Module]) -> LayerRule | None:
    """The rule registered for a layer (or a layer class), or ``None``."""
    return _RULES.get(layer if isinstance(layer, type) else type(layer))


def registered_layers() -> tuple[type[nn.Module], ...]:
    """The layer classes that currently have a rule."""
    return tuple(_RULES)
