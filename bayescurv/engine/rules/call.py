r"""What the engine records about one call of a parameterized layer.

# NOTE [Layer calls are tuples]
# Rules receive ``inputs``: the positional tensors the layer was called with, so that
# ``inputs[0]`` is the input of a Linear or a convolution. It is a :class:`LayerCall`,
# a tuple that also carries the rest of the call (all positional and keyword arguments,
# nested containers such as an LSTM's ``(h_0, c_0)``) and how the layer's output was
# recorded. Rules that need more than the positional tensors (the generic rule,
# attention masks, recurrent states, layers returning tuples) read those attributes;
# simple rules index it like a tuple.
#
# NOTE [Recorded outputs are batch-first]
# The columns a rule receives are always batch-first, ``[V, N, *out]``. A layer whose
# output carries the batch on another axis (``batch_first=False``) or that returns
# several tensors (``nn.LSTM`` returns ``(output, (h_n, c_n))``) has its outputs moved
# to batch-first and, for several tensors, flattened and concatenated into one
# ``[N, total]`` tensor; :meth:`LayerCall.unpack` splits the columns back into one
# ``[V, N, *shape]`` tensor per output. Inputs are recorded as the layer received them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Rebuild = Callable[[list[Any]], Any]


def flatten(tree: Any) -> tuple[list[Any], Rebuild]:
    """Leaves of nested tuples, lists and dicts, and a function rebuilding the tree.

    Named tuples are leaves (e.g. ``PackedSequence``), so a rule sees them whole.
    """
    if isinstance(tree, Tensor):  # the common case, without recursion
        return [tree], _first
    if isinstance(tree, dict):
        keys = list(tree)
        flat = [flatten(tree[k]) for k in keys]
        return _join(flat, lambda parts: dict(zip(keys, parts, strict=True)))
    if type(tree) in (tuple, list):
        flat = [flatten(item) for item in tree]
        kind = type(tree)
        return _join(flat, kind)
    return [tree], _first


def _first(leaves: list[Any]) -> Any:
    return leaves[0]


def _join(
    flat: list[tuple[list[Any], Rebuild]], make: Callable[[list[Any]], Any]
) -> tuple[list[Any], Rebuild]:
    leaves = [leaf for sub, _ in flat for leaf in sub]
    sizes = [len(sub) for sub, _ in flat]

    def rebuild(new: list[Any]) -> Any:
        parts, start = [], 0
        for size, (_, sub_rebuild) in zip(sizes, flat, strict=True):
            parts.append(sub_rebuild(new[start : start + size]))
            start += size
        return make(parts)

    return leaves, rebuild


def map_tensors(tree: Any, fn: Callable[[Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor leaf of ``tree``, keep the other leaves."""
    if type(tree) is tuple and all(isinstance(x, Tensor) for x in tree):
        return tuple(fn(x) for x in tree)  # the common case, without recursion
    if type(tree) is dict and not tree:
        return {}
    leaves, rebuild = flatten(tree)
    return rebuild([fn(x) if isinstance(x, Tensor) else x for x in leaves])


class LayerCall(tuple):
    """The positional tensor inputs of one layer call, plus the whole call.

    Attributes:
        args: All positional arguments (tensors detached, containers kept).
        kwargs: All keyword arguments (tensors detached).
        output: The recorded output (detached), batch-first: ``[N, *out]`` for one
            output tensor, ``[N, total]`` for several (see :meth:`unpack`).
        output_axes: For each leaf of the flattened output, the axis of its batch or
            ``None`` if it is not recorded (not a tensor, no gradient).
        output_shapes: Per recorded output, its batch-first shape without the batch.
        selected: Local names of the parameters whose quantities the engine needs
            (``params=``), or ``None`` for all trainable ones. Rules may skip the
            others (see :func:`wants`); the engine ignores entries it did not ask for.
        cache: Where rules keep tensors derived from the call's inputs across the
            chunks of one backward sweep (see :func:`cached`); ``None`` (the default,
            e.g. a rule called directly) computes them every time.

    Example:
        >>> import torch
        >>> x, mask = torch.randn(2, 3), torch.ones(2, 3)
        >>> call = LayerCall((x, (x, x), 4), {"mask": mask})
        >>> len(call), call.args[2], len(call.tensors())  # (x,), 4, x x x mask
        (1, 4, 4)
        >>> call.output_shapes = (torch.Size([3]), torch.Size([5, 2]))
        >>> out, state = call.unpack(torch.zeros(7, 2, 13))  # V=7 columns, N=2
        >>> tuple(out.shape), tuple(state.shape)
        ((7, 2, 3), (7, 2, 5, 2))
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor | None
    output_axes: tuple[int | None, ...] | None
    output_shapes: tuple[torch.Size, ...]
    selected: frozenset[str] | None
    cache: DerivedCache | None

    def __new__(cls, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None):
        """Wrap a call's arguments; the tuple holds its top-level tensor arguments."""
        call = super().__new__(cls, tuple(a for a in args if isinstance(a, Tensor)))
        call.args = tuple(args)
        call.kwargs = dict(kwargs or {})
        call.output = None
        call.output_axes = None
        call.output_shapes = ()
        call.selected = None
        call.cache = None
        return call

    def tensors(self) -> list[Tensor]:
        """Every tensor among the arguments (nested ones included)."""
        if not self.kwargs and len(self) == len(self.args):
            return list(self)
        leaves, _ = flatten((self.args, self.kwargs))
        return [x for x in leaves if isinstance(x, Tensor)]

    def unpack(self, grad_output: Tensor) -> list[Tensor]:
        """Split columns ``[V, N, ...]`` into one ``[V, N, *shape]`` per output."""
        if len(self.output_shapes) <= 1:
            return [grad_output]
        v, n = grad_output.shape[:2]
        sizes = [math.prod(shape) for shape in self.output_shapes]
        parts = grad_output.reshape(v, n, -1).split(sizes, dim=-1)
        return [
            part.reshape(v, n, *shape)
            for part, shape in zip(parts, self.output_shapes, strict=True)
        ]


class DerivedCache:
    """Tensors derived from recorded layer inputs, kept within a byte budget.

    # NOTE [Derived inputs are computed once per sweep]
    # Columns are pulled back in chunks (exact square-root or Jacobian columns) and
    # materializing rules split each chunk again, so a rule that derives a tensor from
    # its layer's input (a convolution's unfolded patches) would recompute it once per
    # chunk: 66 im2col calls for the 20 convolutions of a ResNet-18. One cache is
    # shared by all recorded calls of a ``backprop`` sweep; it keeps a derived tensor
    # while the total stays under its budget and lets later ones be recomputed.

    Args:
        budget: Bytes the cached tensors may take together.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._store: dict[tuple[int, str], Tensor] = {}

    def get(self, owner: object, key: str, make: Callable[[], Tensor]) -> Tensor:
        """The tensor ``key`` of ``owner``: cached, or made (and cached if it fits)."""
        slot = (id(owner), key)
        found = self._store.get(slot)
        if found is not None:
            return found
        value = make()
        size = value.numel() * value.element_size()
        if self.used + size <= self.budget:
            self._store[slot] = value
            self.used += size
        return value


def cached(inputs: tuple[Tensor, ...], key: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()`` once per sweep for the call ``inputs`` (see :class:`DerivedCache`).

    A plain tuple, or a call without a cache, calls ``make`` every time.
    """
    cache = getattr(inputs, "cache", None)
    if cache is None:
        return make()
    return cache.get(inputs, key, make)


DEFAULT_RULE_BUDGET = 2**30
"""Bytes of temporaries for a rule called outside a ``backprop`` sweep."""

TRANSIENT_BYTES = 2**25
"""Bytes of per-sample vectors a materializing rule builds at a time where they are
only summed (see NOTE [Transient per-sample vectors in small chunks] in
``bayescurv/engine/backprop.py``)."""


def memory_budget(inputs: tuple[Tensor, ...]) -> int:
    """Bytes the temporaries a rule builds for one call may take.

    Within a sweep this is the budget the calls were recorded with (``backprop``'s
    ``memory_budget``); a plain tuple or a call without a cache gets
    ``DEFAULT_RULE_BUDGET``. Rules that report ``materializes() == False`` but build
    large temporaries for some inputs chunk them under it.
    """
    cache = getattr(inputs, "cache", None)
    return DEFAULT_RULE_BUDGET if cache is None else cache.budget


def wants(inputs: tuple[Tensor, ...], name: str) -> bool:
    """Whether the engine needs the quantities of the layer's parameter ``name``.

    ``inputs`` is what a rule receives; a plain tuple (a rule called directly) wants
    every parameter.
    """
    selected = getattr(inputs, "selected", None)
    return selected is None or name in selected


def as_call(inputs: tuple[Tensor, ...]) -> LayerCall:
    """``inputs`` as a :class:`LayerCall` (a plain tuple becomes positional args)."""
    return inputs if isinstance(inputs, LayerCall) else LayerCall(tuple(inputs))


def check_reproduced(
    module: torch.nn.Module, call: LayerCall, recomputed: Tensor
) -> None:
    """Raise if a rule's recomputation of a layer's output differs from the recorded.

    Rules that re-run a layer's forward (the generic rule, attention, recurrent layers)
    use this to turn options they do not model into an error instead of wrong numbers.

    Args:
        module: The layer.
        call: The recorded call (its ``output`` is the reference).
        recomputed: The recomputed outputs, batch-first, one row per sample.
    """
    if call.output is None:
        return
    expected = call.output.reshape(call.output.shape[0], -1)
    actual = recomputed.reshape(recomputed.shape[0], -1)
    tol = torch.finfo(expected.dtype).eps ** 0.5 if expected.is_floating_point() else 0
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    if actual.shape != expected.shape or not torch.allclose(
        actual.to(expected.dtype), expected, rtol=tol, atol=tol * scale, equal_nan=True
    ):
        raise ValueError(
            f"Recomputing the forward pass of {type(module).__name__} for its rule "
            "does not reproduce the output recorded in the model's forward pass. "
            "Per-sample quantities need a deterministic forward whose samples do not "
            "interact: no dropout in train mode (call model.eval()), no statistics "
            "over the batch, and every batched argument with the batch on the axis "
            "the rule expects."
        )
