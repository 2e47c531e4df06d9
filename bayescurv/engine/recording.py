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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bayescurv.engine.rules import LayerRule, get_rule, registered_layers


@dataclass
class Record:
    """One call of a parameterized layer."""

    module: nn.Module
    rule: LayerRule
    params: dict[str, nn.Parameter]
    inputs: tuple[Tensor, ...]
    output: Tensor
    versions: tuple[int, ...] = field(default_factory=tuple)

    def modified_in_place(self) -> bool:
        """Whether the input or output was overwritten after the hook ran."""
        current = tuple(t._version for t in (*self.inputs, self.output))
        return current != self.versions


@dataclass
class Layer:
    """A parameterized layer of the model and its trainable parameters."""

    module: nn.Module
    rule: LayerRule
    params: dict[str, nn.Parameter]


def find_layers(model: nn.Module) -> list[Layer]:
    """All modules that own trainable parameters, each with its rule.

    Raises:
        NotImplementedError: If such a module has no registered rule; the message names
            the layer class and its parameters.
    """
    layers = []
    for name, module in model.named_modules():
        params = {
            local: p
            for local, p in module.named_parameters(recurse=False)
            if p.requires_grad
        }
        if not params:
            continue
        rule = get_rule(module)
        if rule is None:
            where = f" at '{name}'" if name else " (the model itself)"
            supported = ", ".join(sorted(cls.__name__ for cls in registered_layers()))
            raise NotImplementedError(
                f"Layer {type(module).__name__}{where} holds trainable parameters "
                f"{sorted(params)} but has no rule. Register one with "
                "bayescurv.engine.register_rule(LayerClass, rule), freeze the "
                "parameters "
                f"(requires_grad=False), or use a supported layer ({supported})."
            )
        rule.check(module)
        layers.append(Layer(module, rule, params))
    return layers


@contextmanager
def record_calls(layers: list[Layer], safe: bool) -> Iterator[list[Record]]:
    """Record every call of the given layers while the context is active."""
    records: list[Record] = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise NotImplementedError(
                f"{type(module).__name__} returned {type(output).__name__}; the engine "
                "records layers that return a single tensor."
            )
        inputs = tuple(a.detach() for a in args if isinstance(a, Tensor))
        if safe:
            inputs = tuple(a.clone() for a in inputs)
        versions = tuple(t._version for t in (*inputs, output))
        layer = by_module[module]
        records.append(
            Record(module, layer.rule, layer.params, inputs, output, versions)
        )
        return output.clone() if safe else None

    by_module = {layer.module: layer for layer in layers}
    handles = [layer.module.register_forward_hook(hook) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def check_batch_first(records: list[Record], batch_size: int) -> None:
    """Every recorded output must carry the batch on its leading axis."""
    for rec in records:
        if rec.output.dim() == 0 or rec.output.shape[0] != batch_size:
            raise ValueError(
                f"{type(rec.module).__name__} produced an output of shape "
                f"{tuple(rec.output.shape)}, but the model output has batch size "
                f"{batch_size}: the engine needs the batch on the leading axis of "
                "every parameterized layer's input and output."
            )


def zeros_like_columns(num_columns: int, rec: Record) -> Tensor:
    """Columns of zeros for a recorded output the loss does not depend on."""
    return torch.zeros(
        num_columns, *rec.output.shape, dtype=rec.output.dtype, device=rec.output.device
    )
