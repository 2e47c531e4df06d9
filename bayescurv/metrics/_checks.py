"""Input validation shared by the metrics: one clear error per kind of bad input.

Every public metric validates its inputs here before computing anything, so a bad
input raises a ``TypeError`` or ``ValueError`` that names the argument and the
problem (wrong type, empty, wrong shape, NaN, probabilities that do not sum to 1,
targets out of range) instead of a shape error deep inside or a silently wrong
number.
"""

from __future__ import annotations

import torch
from torch import Tensor

# NOTE [probability tolerance]
# Softmax outputs in float32 sum to 1 up to ~1e-6; averages of many such vectors
# (Monte Carlo predictives) and renormalized probit-type approximations stay within
# ~1e-5. 1e-4 accepts those and still rejects logits, unnormalized scores and the
# probabilities of a single class passed by mistake.
PROB_SUM_ATOL = 1e-4
"""Largest accepted ``|sum_c p_nc - 1|`` for a row of class probabilities."""


def _check_tensor(value: object, name: str) -> Tensor:
    """Raise unless ``value`` is a non-empty tensor without NaN."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(value.shape)}).")
    if value.is_floating_point() and torch.isnan(value).any():
        count = int(torch.isnan(value).sum())
        raise ValueError(f"{name} contains NaN ({count} entries).")
    return value


def as_class_probs(probs: object, name: str = "probs") -> Tensor:
    """Validate class probabilities; binary ``[N]`` becomes ``[N, 2]``.

    Args:
        probs: ``[N, C]`` class probabilities with ``C >= 2`` (rows sum to 1 within
            :data:`PROB_SUM_ATOL`), or ``[N]`` probabilities of class 1 of a binary
            problem.
        name: The argument's name, used in error messages.

    Returns:
        ``[N, C]`` probabilities; for binary input the columns ``[1 - p, p]``.

    Raises:
        TypeError: If ``probs`` is not a floating-point tensor.
        ValueError: If it is empty, not 1-d or 2-d, has a single column, contains
            NaN or infinite values, has entries outside ``[0, 1]``, or rows that do
            not sum to 1.
    """
    probs = _check_tensor(probs, name)
    if not probs.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of probabilities, "
            f"got dtype {probs.dtype}."
        )
    if probs.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape [N, C] (class probabilities) or [N] "
            f"(binary: probability of class 1), got shape {list(probs.shape)}."
        )
    if probs.ndim == 2 and probs.shape[1] < 2:
        raise ValueError(
            f"{name} has shape {list(probs.shape)} with a single class column; "
            "pass binary probabilities of class 1 with shape [N]."
        )
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains infinite values.")
    if probs.min() < 0 or probs.max() > 1 + PROB_SUM_ATOL:
        raise ValueError(
            f"{name} has entries outside [0, 1] (min {probs.min().item():.4g}, "
            f"max {probs.max().item():.4g}); pass probabilities, not logits."
        )
    if probs.ndim == 1:
        probs = probs.clamp(max=1.0)
        return torch.stack([1 - probs, probs], dim=1)
    error = (probs.sum(dim=1) - 1).abs()
    if error.max() > PROB_SUM_ATOL:
        row = int(error.argmax())
        raise ValueError(
            f"{name} rows must sum to 1 within {PROB_SUM_ATOL:g}; row {row} sums to "
            f"{probs[row].sum().item():.6g}. Apply softmax to logits first."
        )
    return probs


def as_class_targets(targets: object, probs: Tensor, name: str = "targets") -> Tensor:
    """Validate class-index targets against ``[N, C]`` probabilities.

    Args:
        targets: ``[N]`` class indices in ``{0, ..., C - 1}``: an integer or boolean
            tensor, or a floating-point tensor holding whole numbers (as used with
            ``nn.BCEWithLogitsLoss``).
        probs: The validated ``[N, C]`` probabilities they belong to.
        name: The argument's name, used in error messages.

    Returns:
        ``[N]`` ``int64`` class indices on ``probs.device``.

    Raises:
        TypeError: If ``targets`` is not a tensor.
        ValueError: If it is empty, not ``[N]`` with ``probs``' ``N``, contains NaN
            or non-integer values, or an index outside ``{0, ..., C - 1}``.
    """
    targets = _check_tensor(targets, name)
    n, n_classes = probs.shape
    if targets.shape != (n,):
        hint = ""
        if targets.ndim == 2 and targets.shape[1] == 1:
            hint = " (pass targets.squeeze(1))"
        elif targets.ndim == 2:
            hint = " (one-hot? pass targets.argmax(-1))"
        raise ValueError(
            f"{name} must be class indices of shape [N] = [{n}] matching probs, got "
            f"shape {list(targets.shape)}{hint}."
        )
    if targets.is_floating_point() or targets.is_complex():
        if targets.is_complex() or (targets != targets.round()).any():
            raise ValueError(
                f"{name} must hold integer class indices; found non-integer values."
            )
    targets = targets.to(device=probs.device, dtype=torch.int64)
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} out of range: found class index {bad}, expected indices in "
            f"[0, {n_classes - 1}] for {n_classes} classes."
        )
    return targets


def as_scores(scores: object, name: str) -> Tensor:
    """Validate a ``[N]`` tensor of real-valued OOD scores.

    Args:
        scores: ``[N]`` scores, higher meaning more in-distribution; integer or
            floating point, ``±inf`` allowed.
        name: The argument's name, used in error messages.

    Returns:
        The scores as ``float64``.

    Raises:
        TypeError: If ``scores`` is not a real tensor.
        ValueError: If it is empty, not 1-d, or contains NaN.
    """
    scores = _check_tensor(scores, name)
    if scores.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {scores.dtype}.")
    if scores.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-d tensor of per-sample scores [N], got shape "
            f"{list(scores.shape)}."
        )
    return scores.to(torch.float64)


def check_n_bins(n_bins: object) -> int:
    """Raise unless ``n_bins`` is a positive integer; return it."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return n_bins
