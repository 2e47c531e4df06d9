"""Model inputs as data: length, selection and concatenation of tensors, tuples, dicts.

The function-space posteriors keep the inputs of their anchor points (a subset of
the training data); a model input is a tensor, a tuple of tensors (``model(*x)``)
or a dict (passed whole, as laplace-torch does), and every entry that is a tensor
is split along its first axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def length(inputs: Any) -> int:
    """Number of samples (first axis of the first tensor entry).

    Raises:
        ValueError: If ``inputs`` holds no tensor.
    """
    for tensor in _tensors(inputs):
        return tensor.shape[0]
    raise ValueError(
        f"model inputs must be a tensor, a tuple of tensors or a dict holding "
        f"tensors, got {type(inputs).__name__}."
    )


def take(inputs: Any, index: Tensor) -> Any:
    """The samples ``index`` (a 1-D integer tensor) of every tensor entry."""
    if isinstance(inputs, Tensor):
        return inputs[index.to(inputs.device)]
    if isinstance(inputs, Mapping):
        return {
            k: take(v, index) if isinstance(v, Tensor) else v for k, v in inputs.items()
        }
    return type(inputs)(take(v, index) for v in inputs)


def concat(parts: Sequence[Any]) -> Any:
    """Inputs of several batches concatenated along the samples."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {
            k: concat([p[k] for p in parts]) if isinstance(v, Tensor) else v
            for k, v in first.items()
        }
    return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))


def _tensors(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [v for v in inputs if isinstance(v, Tensor)]
    return []
