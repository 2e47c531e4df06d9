"""Vectors over a model's trainable parameters, in the three accepted layouts.

A vector (or a block of ``K`` vectors) over the trainable parameters can be given as

* a ``dict`` ``name -> tensor`` keyed by ``model.named_parameters()`` names, each
  tensor shaped like its parameter ``[*p]`` (or ``[K, *p]`` for a block);
* a ``list``/``tuple`` of such tensors in ``named_parameters()`` order;
* a flat tensor ``[P]`` (or ``[K, P]``), the parameters flattened and concatenated in
  ``named_parameters()`` order.

Products return the layout they were given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

Vector = Mapping[str, Tensor] | Sequence[Tensor] | Tensor
"""A vector or block of vectors over the trainable parameters (see the module)."""


class Layout(str, Enum):
    """How a vector over the parameters is laid out."""

    DICT = "dict"
    """``name -> [*p]`` (or ``[K, *p]``)."""
    LIST = "list"
    """Tensors ``[*p]`` (or ``[K, *p]``) in ``named_parameters()`` order."""
    FLAT = "flat"
    """One tensor ``[P]`` (or ``[K, P]``)."""


@dataclass
class Block:
    """``K`` vectors over the parameters as one ``[K, *p]`` tensor per parameter.

    Attributes:
        columns: ``[K, *p]`` per trainable parameter, in ``named_parameters()`` order.
        layout: The layout the vectors were given in.
        batched: Whether a leading block axis was given (``False``: ``K == 1``).
        names: The trainable parameter names.
    """

    columns: list[Tensor]
    layout: Layout
    batched: bool
    names: list[str]

    @property
    def size(self) -> int:
        """The number of vectors ``K``."""
        return self.columns[0].shape[0]

    def wrap(self, columns: list[Tensor]) -> Vector:
        """Return ``columns`` (``[K, *p]`` per parameter) in this block's layout."""
        if not self.batched:
            columns = [c[0] for c in columns]
        if self.layout == Layout.DICT:
            return dict(zip(self.names, columns, strict=True))
        if self.layout == Layout.LIST:
            return columns
        start = 1 if self.batched else 0
        return torch.cat([c.flatten(start_dim=start) for c in columns], dim=start)


def as_block(params: dict[str, nn.Parameter], vector: Vector) -> Block:
    """Check a vector against the parameters and bring it into block form.

    Raises:
        ValueError: If names, count or shapes do not fit; the message names the
            parameter.
        TypeError: If the vector is not one of the accepted layouts or not floating.
    """
    names = list(params)
    if isinstance(vector, Tensor):
        return _from_flat(params, vector)
    if isinstance(vector, Mapping):
        missing = [n for n in names if n not in vector]
        unknown = [k for k in vector if k not in params]
        if missing or unknown:
            raise ValueError(
                f"vector keys do not match the trainable parameters: missing "
                f"{missing}, unknown or frozen {unknown}."
            )
        tensors, layout = [vector[n] for n in names], Layout.DICT
    elif isinstance(vector, Sequence) and not isinstance(vector, str):
        if len(vector) != len(names):
            raise ValueError(
                f"vector has {len(vector)} tensors; the model has {len(names)} "
                f"trainable parameters {names}."
            )
        tensors, layout = list(vector), Layout.LIST
    else:
        raise TypeError(
            "vector must be a dict name -> tensor, a list of tensors or a flat "
            f"tensor, got {type(vector).__name__}."
        )
    columns, batched = [], set()
    for name, t in zip(names, tensors, strict=True):
        p = params[name]
        _check_floating(f"vector['{name}']", t)
        if t.shape == p.shape:
            batched.add(False)
            column = t.unsqueeze(0)
        elif t.dim() == p.dim() + 1 and t.shape[1:] == p.shape:
            batched.add(True)
            column = t
        else:
            raise ValueError(
                f"vector['{name}'] has shape {tuple(t.shape)}; parameter '{name}' "
                f"needs {tuple(p.shape)} or [K, *{tuple(p.shape)}] for a block."
            )
        columns.append(column.to(dtype=p.dtype, device=p.device))
    if len(batched) > 1 or len({c.shape[0] for c in columns}) > 1:
        sizes = {n: tuple(t.shape) for n, t in zip(names, tensors, strict=True)}
        raise ValueError(
            f"vector mixes single vectors and blocks or block sizes: shapes {sizes}."
        )
    return Block(columns, layout, batched.pop(), names)


def _from_flat(params: dict[str, nn.Parameter], vector: Tensor) -> Block:
    _check_floating("vector", vector)
    total = sum(p.numel() for p in params.values())
    if vector.dim() not in (1, 2) or vector.shape[-1] != total:
        raise ValueError(
            f"flat vector has shape {tuple(vector.shape)}; expected [P] or [K, P] "
            f"with P = {total} trainable parameter entries."
        )
    batched = vector.dim() == 2
    flat = vector if batched else vector.unsqueeze(0)
    columns, start = [], 0
    for p in params.values():
        piece = flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape)
        columns.append(piece.to(dtype=p.dtype, device=p.device))
        start += p.numel()
    return Block(columns, Layout.FLAT, batched, list(params))


def _check_floating(what: str, tensor: object) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise TypeError(f"{what} must be floating-point, got dtype {tensor.dtype}.")
