r"""Prior precisions and data-term scales over a block-structured parameter vector.

A flat parameter vector of size :math:`P` is split into :math:`B` consecutive blocks
(one per parameter tensor or layer) of sizes ``block_sizes`` with
``sum(block_sizes) == P``. A prior precision (and a data-term scale) is one of

* a scalar (0-d tensor) shared by all parameters,
* a per-block tensor ``[B]``, entry ``b`` for all parameters of block ``b``,
* a per-parameter tensor ``[P]``.

Shapes are unambiguous: ``[B]`` and ``[P]`` coincide only if every block has one
parameter, and then both readings are the same matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum

import torch
from torch import Tensor

PrecisionLike = float | Tensor
"""A scalar (``float`` or 0-d tensor), a per-block ``[B]`` or per-parameter ``[P]``."""


class PriorStructure(str, Enum):
    """How a prior precision (or a scale) is shared across parameters."""

    SCALAR = "scalar"
    """One value for all parameters (a 0-d tensor)."""
    LAYERWISE = "layerwise"
    """One value per block, ``[B]``, in the order of ``block_sizes``."""
    DIAG = "diag"
    """One value per parameter, ``[P]``."""


def structure_of(value: Tensor, block_sizes: Sequence[int]) -> PriorStructure:
    """The structure of an already validated precision or scale.

    Args:
        value: A 0-d, ``[B]`` or ``[P]`` tensor.
        block_sizes: Parameters per block, ``B`` entries.

    Returns:
        ``SCALAR`` for 0-d, ``LAYERWISE`` for ``[B]`` (also when ``B == P``),
        ``DIAG`` otherwise.
    """
    if value.ndim == 0:
        return PriorStructure.SCALAR
    if value.shape == (len(block_sizes),):
        return PriorStructure.LAYERWISE
    return PriorStructure.DIAG


def as_precision(
    value: PrecisionLike,
    block_sizes: Sequence[int],
    *,
    like: Tensor,
    owner: str,
    what: str = "prior precision",
) -> Tensor:
    """Validate a scalar, per-block or per-parameter precision and convert it.

    Gradients are kept: a tensor with ``requires_grad`` stays in the graph.

    Args:
        value: The precision (or scale). Python numbers become 0-d tensors.
        block_sizes: Parameters per block.
        like: Tensor whose dtype and device the result takes.
        owner: Name of the structure, used in error messages.
        what: Name of the quantity, used in error messages.

    Returns:
        A 0-d, ``[B]`` or ``[P]`` tensor with ``like``'s dtype and device.

    Raises:
        ValueError: If the shape is none of the three, or an entry is negative, NaN
            or infinite.
    """
    # NOTE: Python numbers go straight to like's dtype (via float32 1.7 != 1.7)
    if isinstance(value, Tensor):
        tensor = value.to(dtype=like.dtype, device=like.device)
    else:
        tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    num_blocks, num_params = len(block_sizes), sum(block_sizes)
    if tensor.ndim != 0 and tensor.shape not in {(num_blocks,), (num_params,)}:
        raise ValueError(
            f"{owner}: {what} must be a scalar, a per-block tensor of shape "
            f"[{num_blocks}] or a per-parameter tensor of shape [{num_params}]; "
            f"got shape {list(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{owner}: {what} contains NaN or inf.")
    if (tensor < 0).any():
        raise ValueError(
            f"{owner}: {what} must be non-negative, got minimum "
            f"{tensor.min().item():.3g}."
        )
    return tensor


def expand(value: Tensor, block_sizes: Sequence[int]) -> Tensor:
    """Expand a per-block tensor to per-parameter; 0-d and ``[P]`` pass through.

    Args:
        value: A 0-d, ``[B]`` or ``[P]`` tensor.
        block_sizes: Parameters per block.

    Returns:
        ``value`` itself if 0-d or ``[P]``; else ``[P]`` with entry ``b`` repeated
        ``block_sizes[b]`` times (differentiable).
    """
    if structure_of(value, block_sizes) is not PriorStructure.LAYERWISE:
        return value
    repeats = torch.as_tensor(block_sizes, device=value.device)
    return torch.repeat_interleave(value, repeats)


def per_parameter(value: Tensor, block_sizes: Sequence[int]) -> Tensor:
    """The per-parameter vector ``[P]`` of a 0-d, ``[B]`` or ``[P]`` tensor."""
    return expand(value, block_sizes).expand(sum(block_sizes))


def per_block(value: Tensor, block_sizes: Sequence[int]) -> Tensor:
    """The per-block vector ``[B]`` of a 0-d or ``[B]`` tensor.

    Raises:
        ValueError: For a per-parameter tensor (it has no per-block form).
    """
    if structure_of(value, block_sizes) is PriorStructure.DIAG:
        raise ValueError("a per-parameter tensor has no per-block form")
    return value.expand(len(block_sizes))


def combine(
    first: Tensor,
    second: Tensor,
    block_sizes: Sequence[int],
    op: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """Combine two precisions entrywise in the finer of their two structures.

    Args:
        first: A 0-d, ``[B]`` or ``[P]`` tensor.
        second: A 0-d, ``[B]`` or ``[P]`` tensor.
        block_sizes: Parameters per block.
        op: Entrywise operation, e.g. ``torch.add`` or ``torch.mul``.

    Returns:
        ``op(first, second)`` as 0-d if both are scalars, ``[B]`` if the finer one is
        per-block, ``[P]`` otherwise.
    """
    if first.ndim == 0 or second.ndim == 0 or first.shape == second.shape:
        return op(first, second)
    return op(expand(first, block_sizes), expand(second, block_sizes))
