"""Validation of the hyperparameters: prior precision, prior mean, noise, temperature.

laplace-torch accepts a prior precision as a number, a 0-d or ``[1]`` tensor (one
value), ``[B]`` (one value per parameter tensor, "layerwise") or ``[P]`` (one per
parameter, "diag"); the same holds here. ``sigma_noise`` is a number, ``[1]`` or, for
regression with ``K`` outputs, ``[K]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

Number = float | int | Tensor


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type.

    A ``TypeError``, and a ``ValueError`` as laplace-torch raises for it.
    """


def as_tensor(value: Number, name: str, like: Tensor) -> Tensor:
    """``value`` as a tensor of ``like``'s dtype and device; ``[1]`` becomes 0-d.

    Gradients are kept (a tensor that requires grad stays in the graph).

    Raises:
        TypeError: If ``value`` is neither a number nor a tensor.
    """
    if isinstance(value, bool) or not isinstance(value, (float, int, Tensor)):
        raise HyperparameterTypeError(
            f"{name} must be a number or a tensor, got {type(value).__name__}."
        )
    if isinstance(value, Tensor):
        tensor = value.to(dtype=like.dtype, device=like.device)
    else:
        tensor = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    return tensor.reshape(()) if tensor.shape == (1,) else tensor


def check_positive(tensor: Tensor, name: str) -> None:
    """Raise a ``ValueError`` unless every entry is finite and positive."""
    values = tensor.detach()
    if not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"{name} must be finite and positive, got {_show(values)}.")


def prior_precision(value: Number, like: Tensor, sizes: list[int] | None) -> Tensor:
    """A validated prior precision: 0-d, ``[B]`` or ``[P]``.

    Args:
        value: The prior precision.
        like: Tensor giving dtype and device.
        sizes: Parameters per block, or ``None`` if not known yet (before ``fit`` of
            a last-layer Laplace); then only the sign is checked.

    Raises:
        ValueError: For a shape other than scalar, ``[B]`` and ``[P]``, or a
            non-positive entry.
    """
    tensor = as_tensor(value, "prior_precision", like)
    check_positive(tensor, "prior_precision")
    if sizes is not None and tensor.ndim != 0:
        allowed = {(len(sizes),), (sum(sizes),)}
        if tensor.shape not in allowed:
            raise ValueError(
                "prior_precision must be a scalar, [1], per parameter tensor "
                f"[{len(sizes)}] or per parameter [{sum(sizes)}]; got shape "
                f"{list(tensor.shape)}."
            )
    elif tensor.ndim > 1:
        raise ValueError(
            f"prior_precision must be a scalar or 1-D, got shape {list(tensor.shape)}."
        )
    return tensor


def prior_mean(value: Number, like: Tensor, num_params: int | None) -> Tensor:
    """A validated prior mean: 0-d or ``[P]``.

    Raises:
        ValueError: For another shape or non-finite entries.
    """
    tensor = as_tensor(value, "prior_mean", like)
    if not torch.isfinite(tensor).all():
        raise ValueError("prior_mean contains NaN or inf.")
    if tensor.ndim != 0 and (
        tensor.ndim != 1 or (num_params is not None and tensor.numel() != num_params)
    ):
        expected = "[P]" if num_params is None else f"[{num_params}]"
        raise ValueError(
            f"prior_mean must be a scalar or of shape {expected}, got "
            f"{list(tensor.shape)}."
        )
    return tensor


def sigma_noise(value: Number, like: Tensor, n_outputs: int | None) -> Tensor:
    """A validated observation noise: 0-d or ``[K]``.

    Raises:
        ValueError: For another shape or a non-positive entry.
    """
    tensor = as_tensor(value, "sigma_noise", like)
    check_positive(tensor, "sigma_noise")
    if tensor.ndim > 1 or (
        tensor.ndim == 1 and n_outputs is not None and tensor.numel() != n_outputs
    ):
        raise ValueError(
            f"sigma_noise must be a scalar or per output [{n_outputs or 'K'}], got "
            f"shape {list(tensor.shape)}."
        )
    return tensor


def temperature(value: float) -> float:
    """A validated temperature (a positive number)."""
    if isinstance(value, bool) or not isinstance(value, (float, int)) or value <= 0:
        raise ValueError(f"temperature must be a positive number, got {value!r}.")
    return float(value)


def _show(values: Tensor) -> str:
    return f"{values.item():.4g}" if values.numel() == 1 else f"min {values.min():.4g}"
