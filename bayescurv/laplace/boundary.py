"""What users pass to a Laplace approximation, checked once where it comes in.

``fit`` checks every batch of ``train_loader`` and the predictive checks ``x`` here
(through :class:`~bayescurv.laplace.data.BatchReader`), before any model call, so a
bad input raises an error that names the argument, what was expected, what was
received and what to do, instead of a crash deep inside or a silently wrong number:

* inputs: tensors (a tuple of tensors, or a dict whose tensor entries are checked)
  with data (not on the meta device), at least one sample, finite floating values;
* targets: a tensor with one entry per sample, finite, of the likelihood's dtype;
  binary targets in ``[0, 1]``; class targets in ``[0, C)`` or ``-100``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bayescurv.engine.boundary import check_finite
from bayescurv.laplace.enums import Likelihood

# NOTE [ignore_index]
# -100 is torch's ``ignore_index`` (``nn.CrossEntropyLoss``), routine in Hugging Face
# batches (padding, prompt tokens). With likelihood='classification' such targets
# are skipped consistently: a sample whose target is -100 ([N] targets) is removed
# from its batch before anything else, so curvature, loss and ``n_data`` are those
# of the data without it, for every subset and structure. Per-position targets
# ([N, *T], e.g. token classification) keep their samples; the positions marked
# -100 contribute nothing to the loss and to the GGN (the engine's
# ``CrossEntropyLoss`` rule weighs them by 0), and ``n_data`` counts the samples.
IGNORE_INDEX = -100
"""Class targets equal to this are skipped (torch's ``ignore_index``)."""


class InputTypeError(TypeError, ValueError):
    """An input of the wrong type (a NumPy array, a list, an int for a tensor).

    A ``TypeError``, and a ``ValueError`` like every other bad input.
    """


_CLASS_DTYPES = (torch.int64, torch.uint8)  # what F.cross_entropy accepts


def check_inputs(
    inputs: Any,
    name: str,
    empty_ok: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Raise unless ``inputs`` is a tensor, tuple of tensors or dict with data.

    Args:
        inputs: A tensor ``[N, ...]``, a tuple/list of tensors (``model(*inputs)``)
            or a dict (``model(inputs)``; its tensor entries are checked).
        name: How the error names the argument (e.g. ``"x"``).
        empty_ok: Accept a batch without samples (``fit`` skips it).
        dtype: The model's floating dtype: floating inputs must have it.

    Raises:
        InputTypeError: For NumPy arrays, Python lists of numbers and other non-tensors,
            and floating inputs of another dtype than ``dtype``.
        ValueError: For meta tensors, an empty batch, NaN or inf.
    """
    if isinstance(inputs, Mapping):
        for key, value in inputs.items():
            if _is_array(value):
                raise InputTypeError(_not_a_tensor(f"{name}[{key!r}]", value))
            if isinstance(value, Tensor):
                _check_input(f"{name}[{key!r}]", value, empty_ok, dtype)
        return
    if isinstance(inputs, Tensor):
        _check_input(name, inputs, empty_ok, dtype)
        return
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise InputTypeError(_not_a_tensor(name, inputs))
    for i, value in enumerate(inputs):
        if not isinstance(value, Tensor):
            raise InputTypeError(_not_a_tensor(f"{name}[{i}]", value))
        _check_input(f"{name}[{i}]", value, empty_ok, dtype)


def check_targets(targets: Any, likelihood: Likelihood, name: str) -> None:
    """Raise unless ``targets`` fit the likelihood (dtype, values).

    Args:
        targets: ``[N]`` or ``[N, *T]`` class indices (classification), floating
            targets like the output (regression, binary).
        likelihood: The likelihood of the fit.
        name: How the error names the argument.

    Raises:
        InputTypeError: For non-tensors.
        ValueError: For meta tensors, NaN or inf, a dtype the likelihood cannot use,
            binary targets outside ``[0, 1]``, negative class targets other than
            -100 (ignore_index).
    """
    if not isinstance(targets, Tensor):
        raise InputTypeError(_not_a_tensor(name, targets))
    _check_tensor(name, targets, empty_ok=True)
    kind = likelihood.value
    if likelihood in (Likelihood.CLASSIFICATION, Likelihood.REWARD_MODELING):
        if targets.dtype not in _CLASS_DTYPES:
            raise ValueError(
                f"{name}: likelihood='{kind}' needs integer class targets "
                f"(torch.long) of shape [N] or [N, *T], got {targets.dtype}; convert "
                "them with targets.long()."
            )
        bad = (targets < 0) & (targets != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"{name}: class targets must lie in [0, C) or equal {IGNORE_INDEX} "
                f"(ignore_index, skipped); got {int(targets[bad][0])} at index "
                f"{_first(bad)}."
            )
        return
    if not targets.is_floating_point():
        raise ValueError(
            f"{name}: likelihood='{kind}' needs floating-point targets, got "
            f"{targets.dtype}; convert them with targets.float() (or to the model's "
            "dtype)."
        )
    if likelihood is Likelihood.BINARY:
        bad = (targets < 0) | (targets > 1)
        if bad.any():
            raise ValueError(
                f"{name}: likelihood='binary' needs targets in [0, 1] (labels or "
                f"probabilities), got {float(targets[bad][0])} at index {_first(bad)}."
            )


def check_lengths(n_inputs: int, targets: Tensor, name: str) -> None:
    """Inputs and targets must hold the same number of samples.

    Raises:
        ValueError: Naming both counts.
    """
    if targets.dim() == 0 or len(targets) != n_inputs:
        shape = list(targets.shape)
        raise ValueError(
            f"{name}: the inputs hold {n_inputs} samples, the targets have shape "
            f"{shape}; the targets need one entry per sample on their leading axis."
        )


def drop_ignored(inputs: Any, targets: Tensor) -> tuple[Any, Tensor]:
    """Remove the samples whose class target is -100 (see the NOTE on ignore_index).

    Only ``[N]`` targets are filtered; per-position targets are returned as they
    are. Dict entries and tuple elements that hold one row per sample are sliced.
    """
    if targets.dim() != 1:
        return inputs, targets
    keep = targets != IGNORE_INDEX
    if bool(keep.all()):
        return inputs, targets
    return _rows(inputs, keep, len(targets)), targets[keep]


def as_generator(generator: Any, device: torch.device) -> torch.Generator | None:
    """A ``torch.Generator`` from ``None``, a generator or an int seed.

    Raises:
        InputTypeError: For anything else.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device).manual_seed(generator)
    raise InputTypeError(
        f"generator must be a torch.Generator, an int seed or None, got "
        f"{type(generator).__name__} {generator!r}."
    )


# ------------------------------------------------------------------ helpers
def _check_input(
    name: str, tensor: Tensor, empty_ok: bool, dtype: torch.dtype | None
) -> None:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        raise InputTypeError(
            f"{name} is {tensor.dtype}, the model's weights are {dtype}; convert the "
            f"inputs with .to({dtype})."
        )
    _check_tensor(name, tensor, empty_ok)


def _check_tensor(name: str, tensor: Tensor, empty_ok: bool = False) -> None:
    if tensor.is_meta:
        raise ValueError(
            f"{name} is a meta tensor (shape {list(tensor.shape)}, no values); pass a "
            "tensor with data."
        )
    if not empty_ok and tensor.dim() > 0 and tensor.shape[0] == 0:
        raise ValueError(
            f"{name} has no samples (shape {list(tensor.shape)}); pass at least one."
        )
    check_finite(
        name, tensor, " Remove or impute these entries before calling Laplace."
    )


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "shape")


def _not_a_tensor(name: str, value: Any) -> str:
    return (
        f"{name} must be a torch.Tensor with the samples on its leading axis (or a "
        f"tuple of them), got {type(value).__name__}; convert it with "
        "torch.as_tensor(...)."
    )


def _first(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _rows(value: Any, keep: Tensor, size: int) -> Any:
    """``value`` with the rows ``keep`` of every tensor holding ``size`` rows."""
    if isinstance(value, Tensor):
        if value.dim() and len(value) == size:
            return value[keep.to(value.device)]
        return value
    if isinstance(value, Mapping):
        return {k: _rows(v, keep, size) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, keep, size) for v in value)
    return value
