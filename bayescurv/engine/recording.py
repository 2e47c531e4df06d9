"""Forward hooks that record every call of every parameterized layer.

# NOTE [Recording instead of converting]
# The engine never rewrites the model. Forward hooks record, for each call of a layer
# that owns trainable parameters, its positional inputs (values) and its output (a node
# in the autograd graph). Columns are later pulled back from the model output to all
# recorded outputs at once, so residual connections, branches, functional ops and
# repeated calls need no special handling.
#
# NOTE [In-place ops after a recorded layer]
# ``nn.ReLU(inplace=True)`` after a Linear overwrites the recorded output, and a
# gradient taken w.r.t. the overwritten tensor would silently be the gradient w.r.t.
# the *activation*. Each record keeps the tensor versions seen at hook time; if any
# changed during the forward pass, the forward is re-run in "safe" mode, where the
# hook hands a clone downstream and keeps the original (never modified) for autograd.
# A model that needed it once starts in safe mode on later calls
# (``recorded_forward``; remembered by its first parameterized layer, a weak
# reference like the per-column verdict of NOTE [Per-column pull-backs]).
# torchvision's ResNets overwrite every BatchNorm output (in-place ReLU,
# ``out += identity``), and each engine call ran their forward pass twice (a
# ResNet-18's Kronecker predictive: 0.19 s of 2.8 s for 64 test images). Safe mode
# copies the recorded tensors, which leaves the numbers unchanged, so a layer shared
# with a model that never writes in place costs speed only.
#
# NOTE [The generic fallback]
# A layer with trainable parameters and no registered rule gets the GenericRule
# (torch.func vjp of its forward under vmap over the samples) with a one-time warning
# per class: custom layers work out of the box, a hand-written rule is faster. The
# generic rule covers the layer's own parameters; its submodules are recorded on
# their own. A parent that uses a child's parameters without calling the child would
# leave them silently without quantities, so :func:`check_uncalled` raises then.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.engine.rules import GenericRule, LayerRule, get_rule
from bayescurv.engine.rules.call import (
    DerivedCache,
    LayerCall,
    flatten,
    map_tensors,
)

DERIVED_CACHE_BUDGET = 2**30
"""Default bytes of derived inputs (unfolded patches) kept for one sweep."""

_SAFE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""First parameterized layers of models that overwrote a recorded tensor."""


@dataclass
class Record:
    """One call of a parameterized layer.

    ``inputs`` is the :class:`LayerCall` handed to the rule; ``output`` is the graph
    node the columns are pulled back to (batch-first, see
    NOTE [Recorded outputs are batch-first]).
    """

    module: nn.Module
    rule: LayerRule
    params: dict[str, nn.Parameter]
    inputs: LayerCall
    output: Tensor
    versions: tuple[int, ...] = field(default_factory=tuple)
    fold: int = 1
    """Rows of ``output`` per sample: ``k > 1`` for a folded batch axis (see
    :mod:`bayescurv.engine.samples`), rows ``n k .. n k + k - 1`` of sample ``n``."""

    def tensors(self) -> list[Tensor]:
        """The recorded tensors whose values the rules read."""
        return [*self.inputs.tensors(), self.output]

    def per_sample(self, grad_output: Tensor) -> dict[str, Tensor]:
        """The rule's per-sample vectors ``[V, N, *p]`` of this call.

        For a folded batch axis (``fold = k``) the rule's per-row vectors
        ``[V, k N, *p]`` are summed over each sample's ``k`` rows.
        """
        vectors = self.rule.per_sample(self.module, self.inputs, grad_output)
        if self.fold == 1:
            return vectors
        return {
            name: v.reshape(v.shape[0], -1, self.fold, *v.shape[2:]).sum(2)
            for name, v in vectors.items()
        }

    def modified_in_place(self) -> bool:
        """Whether an input or the output was overwritten after the hook ran."""
        return tuple(t._version for t in self.tensors()) != self.versions


@dataclass
class Layer:
    """A parameterized layer of the model and its trainable parameters."""

    module: nn.Module
    rule: LayerRule
    params: dict[str, nn.Parameter]


_GENERIC = GenericRule()
_WARNED: set[type[nn.Module]] = set()


def find_layers(
    model: nn.Module, selected: dict[str, nn.Parameter] | None = None
) -> list[Layer]:
    """All modules that own selected trainable parameters, each with its rule.

    Layers without a registered rule get the generic rule (one warning per class).

    Args:
        model: The model.
        selected: The parameters to compute quantities for (from
            :func:`~bayescurv.engine.selection.select_parameters`); default: every
            trainable one. A layer holding none of them is left out (never
            recorded); a layer holding some lists only those.
    """
    wanted = None if selected is None else {id(p) for p in selected.values()}
    layers: list[Layer] = []
    owned_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in owned_prefixes):
            continue  # the parameters belong to an ancestor's rule
        rule = get_rule(module)
        recurse = rule is not None and rule.owns_submodules
        if recurse:
            owned_prefixes.append(f"{name}." if name else "")
        params = {
            local: p
            for local, p in module.named_parameters(recurse=recurse)
            if p.requires_grad and (wanted is None or id(p) in wanted)
        }
        if not params:
            continue
        if rule is None:
            rule = _fallback(module, name, params)
        rule.check(module)
        layers.append(Layer(module, rule, params))
    return layers


def _fallback(module: nn.Module, name: str, params: dict[str, Any]) -> LayerRule:
    cls = type(module)
    if cls not in _WARNED:
        _WARNED.add(cls)
        where = f" at '{name}'" if name else " (the model itself)"
        warnings.warn(
            f"Layer {cls.__name__}{where} holds trainable parameters "
            f"{sorted(params)} but has no hand-written rule; the engine uses the "
            "generic torch.func rule (a vjp of its forward under vmap over the "
            "samples). A hand-written rule registered with "
            f"bayescurv.engine.register_rule({cls.__name__}, rule) would be faster.",
            UserWarning,
            stacklevel=4,
        )
    return _GENERIC


@contextmanager
def record_calls(
    layers: list[Layer],
    safe: bool,
    keep_graph: bool = False,
    cache_budget: int = DERIVED_CACHE_BUDGET,
) -> Iterator[list[Record]]:
    """Record every call of the given layers while the context is active.

    Args:
        layers: The layers to record.
        safe: Keep copies of the recorded tensors that later in-place operations
            cannot modify (see NOTE [In-place ops after a recorded layer]).
        keep_graph: Record the inputs (and ``LayerCall.output``) with their autograd
            graph instead of detached, so that the rules' results stay
            differentiable (``create_graph=True``).
        cache_budget: Bytes of tensors the rules may derive from the recorded inputs
            and keep for the whole sweep (one :class:`DerivedCache` shared by the
            calls; see NOTE [Derived inputs are computed once per sweep]).
    """
    records: list[Record] = []
    copy = _copier(safe, keep_graph)
    cache = DerivedCache(cache_budget)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        layer = by_module[module]
        handed = layer.rule.graph_output(module, args, kwargs, output)
        call = LayerCall(map_tensors(args, copy), map_tensors(kwargs, copy))
        call.selected = frozenset(layer.params)
        call.cache = cache
        recorded, replaced = _route_output(module, layer.rule, call, handed, safe)
        call.output = recorded if keep_graph else recorded.detach()
        versions = tuple(t._version for t in (*call.tensors(), recorded))
        records.append(
            Record(module, layer.rule, layer.params, call, recorded, versions)
        )
        if replaced is None and handed is not output:  # the rule's own output
            return handed
        return replaced

    by_module = {layer.module: layer for layer in layers}
    handles = [
        layer.module.register_forward_hook(hook, with_kwargs=True) for layer in layers
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def recorded_forward(
    model: Callable[..., Any],
    layers: list[Layer],
    args: tuple[Tensor, ...],
    keep_graph: bool = False,
    cache_budget: int = DERIVED_CACHE_BUDGET,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Any, list[Record]]:
    """``model(*args)`` with every call of ``layers`` recorded, safe if need be.

    See NOTE [In-place ops after a recorded layer]: the pass is re-run in safe mode
    when a recorded tensor was overwritten, and models that needed it start there.
    ``context`` is entered around each pass.
    """
    key = layers[0].module if layers else None
    safe = key is not None and key in _SAFE
    with context(), record_calls(layers, safe, keep_graph, cache_budget) as records:
        output = model(*args)
    if not safe and any(rec.modified_in_place() for rec in records):
        _SAFE.add(key)
        with context(), record_calls(layers, True, keep_graph, cache_budget) as records:
            output = model(*args)
    return output, records


def _copier(safe: bool, keep_graph: bool) -> Callable[[Tensor], Tensor]:
    """How the hook keeps a recorded input: detached or not, copied or not."""
    if keep_graph:
        return (lambda t: t.clone()) if safe else (lambda t: t)
    return (lambda t: t.detach().clone()) if safe else (lambda t: t.detach())


def _route_output(
    module: nn.Module, rule: LayerRule, call: LayerCall, output: Any, safe: bool
) -> tuple[Tensor, Any]:
    """The tensor to record (batch-first) and the output to hand downstream.

    See NOTE [Recorded outputs are batch-first]. The output handed downstream is a
    function of the recorded tensor, so columns pulled back to it reach every output
    the model uses; ``None`` keeps the layer's output unchanged.
    """
    leaves, rebuild = flatten(output)
    axes = rule.output_batch_axes(module, call, leaves)
    axes = [
        ax if isinstance(x, Tensor) and x.requires_grad else None
        for x, ax in zip(leaves, axes, strict=True)
    ]
    chosen = [i for i, ax in enumerate(axes) if ax is not None]
    _check_output_axes(module, leaves, axes, chosen)
    call.output_axes = tuple(axes)
    moved = [
        leaves[i] if axes[i] == 0 else leaves[i].movedim(axes[i], 0) for i in chosen
    ]
    call.output_shapes = tuple(m.shape[1:] for m in moved)
    if len(chosen) == 1:
        recorded, (i,) = moved[0], chosen
        if axes[i] == 0 and not safe:
            return recorded, None
        new = recorded if axes[i] == 0 else recorded.movedim(0, axes[i])
        leaves[i] = new.clone() if safe else new
        return recorded, rebuild(leaves)
    n = moved[0].shape[0]
    recorded = torch.cat([m.reshape(n, -1) for m in moved], dim=1)
    for part, i, shape in zip(
        recorded.split([s.numel() for s in call.output_shapes], dim=1),
        chosen,
        call.output_shapes,
        strict=True,
    ):
        # a copy with the layer's own memory layout (downstream code may call .view)
        new = torch.empty_like(leaves[i])
        new.copy_(part.reshape(n, *shape).movedim(0, axes[i]))
        leaves[i] = new
    return recorded, rebuild(leaves)


def _check_output_axes(
    module: nn.Module, leaves: list[Any], axes: list[int | None], chosen: list[int]
) -> None:
    name = type(module).__name__
    if not chosen:
        raise ValueError(
            f"{name} returned no tensor that depends on its trainable parameters "
            "(was it called under torch.no_grad()?)."
        )
    sizes = set()
    for i in chosen:
        if leaves[i].dim() <= axes[i]:
            raise ValueError(
                f"{name} returned a tensor of shape {tuple(leaves[i].shape)} without "
                f"a batch axis {axes[i]}; the engine needs batched layer outputs."
            )
        sizes.add(leaves[i].shape[axes[i]])
    if len(sizes) > 1:
        raise ValueError(
            f"The outputs of {name} disagree on the batch size ({sorted(sizes)}) "
            f"along their batch axes {[axes[i] for i in chosen]}."
        )


def check_uncalled(layers: list[Layer], records: list[Record], output: Tensor) -> None:
    """Raise if a layer was never called but its parameters reach the output.

    That happens when a parent module uses a child's parameters directly (see
    NOTE [The generic fallback]); the child's quantities would silently be zero.
    """
    called = {id(rec.module) for rec in records}
    covered = {id(p) for rec in records for p in rec.params.values()}
    missing = [
        layer
        for layer in layers
        if id(layer.module) not in called
        and any(id(p) not in covered for p in layer.params.values())
    ]
    if not missing:
        return
    reachable = _graph_parameters(output)
    for layer in missing:
        used = sorted(n for n, p in layer.params.items() if id(p) in reachable)
        if used:
            raise ValueError(
                f"Parameters {used} of {type(layer.module).__name__} reach the model "
                "output, but the module itself was never called: another module uses "
                "them directly. Register a rule for that module with "
                "owns_submodules=True (see bayescurv.engine.LayerRule)."
            )


def _graph_parameters(output: Tensor) -> set[int]:
    """Ids of the leaf tensors the autograd graph of ``output`` accumulates into."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def zeros_like_columns(num_columns: int, rec: Record) -> Tensor:
    """Columns of zeros for a recorded output the loss does not depend on."""
    return torch.zeros(
        num_columns, *rec.output.shape, dtype=rec.output.dtype, device=rec.output.device
    )
