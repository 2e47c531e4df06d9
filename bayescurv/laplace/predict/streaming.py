r"""Memory up front for the predictive: estimate, refuse, stream over test inputs.

Every predictive path estimates its bytes from shapes before it allocates anything:

* results that grow with the test set (``[N, C, C]`` GLM covariances, ``[S, N, C]``
  samples) and cannot be avoided by streaming: the result itself;
* results that cannot be split by input: the joint GLM covariance ``[N C, N C]``
  and the sampled weights ``[S, P]`` of ``pred_type="nn"``;
* per chunk of test inputs: the temporaries of one chunk (the link's ``[S, N_b, C]``
  Monte Carlo draws, the sampled networks' outputs).

Above the posterior's ``max_memory`` the call raises
:class:`~bayescurv.engine.memory.MemoryBudgetError` naming the path, the size and a
cheaper alternative, before allocating
(:func:`~bayescurv.engine.memory.check_estimates`).

Where each input's result is independent of the others (everything but ``joint``),
the inputs are processed in chunks of at most ``memory_budget`` bytes of such
temporaries (at least one input) and the results concatenated; the model's forward
pass and the Jacobians then see one chunk at a time as well. A test set that fits
in one chunk (the common case: ``memory_budget`` defaults to 256 MiB) runs exactly
as before.

# NOTE [Streaming and random draws]
# Deterministic predictives (GLM moments, probit, bridge, regression) give the same
# numbers chunked or not. The Monte Carlo ones draw per chunk from the same
# generator: with several chunks the draws are others than one chunk's (the same
# distribution). Weights of pred_type="nn" are drawn once for all chunks, so every
# input sees the same sampled networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from bayescurv.engine.memory import Estimate, check_estimates
from bayescurv.laplace.data import batch_size

Result = TypeVar("Result", Tensor, tuple[Tensor, ...])

FLOAT64 = 8
"""Bytes per entry of the float64 contractions of the predictive."""


def split_inputs(inputs: Any, size: int, dict_key_x: str) -> Iterator[Any]:
    """Chunks of at most ``size`` inputs (tensor, tuple/list of tensors or dict).

    Tensors whose leading dimension is the number of inputs are split; other
    entries of a tuple or dict (flags, shared masks) go to every chunk unchanged.
    """
    count = batch_size(inputs, dict_key_x)
    for start in range(0, count, size):
        yield _slice(inputs, slice(start, start + size), count)


def _slice(inputs: Any, rows: slice, count: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[rows] if inputs.ndim > 0 and len(inputs) == count else inputs
    if isinstance(inputs, Mapping):
        return {key: _slice(value, rows, count) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_slice(value, rows, count) for value in inputs)
    return inputs


def stream(
    compute: Callable[[Any], Result],
    inputs: Any,
    size: int,
    dict_key_x: str,
    dim: int = 0,
) -> Result:
    """``compute`` per chunk of ``size`` inputs, concatenated along ``dim``.

    Args:
        compute: Maps a chunk of inputs to a tensor or a tuple of tensors whose
            axis ``dim`` runs over the chunk's inputs (sample-major rows).
        inputs: All test inputs.
        size: Inputs per chunk.
        dict_key_x: Input key of dict inputs (counts them).
        dim: The axis of the inputs in the results.

    Returns:
        What ``compute`` returns for all inputs at once.
    """
    if batch_size(inputs, dict_key_x) <= size:
        return compute(inputs)
    parts = [compute(chunk) for chunk in split_inputs(inputs, size, dict_key_x)]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts, dim)
    return tuple(torch.cat(column, dim) for column in zip(*parts, strict=True))


def chunk_size(per_input: int, memory_budget: int) -> int:
    """Inputs per chunk: as many as ``memory_budget`` bytes hold, at least one."""
    return max(1, memory_budget // max(per_input, 1))


def check(
    what: str,
    result: int,
    per_input: int,
    chunk: int,
    alternative: str,
    max_memory: int | None,
    device: torch.device,
) -> None:
    """Refuse a predictive whose result plus one chunk exceeds ``max_memory``.

    Args:
        what: The path and its shapes, e.g. ``"joint GLM covariance [N C, N C] =
            [4000, 4000]"``.
        result: Bytes of the result(s) for all inputs (allocated whatever the
            chunking).
        per_input: Bytes of the temporaries per input.
        chunk: Inputs per chunk.
        alternative: What to do instead.
        max_memory: The posterior's budget (``None``: the engine's default).
        device: Where it would be allocated.

    Raises:
        MemoryBudgetError: Naming ``what``, the size and ``alternative``.
    """
    estimate = Estimate(what, result + per_input * chunk, alternative)
    check_estimates([estimate], max_memory, device)
