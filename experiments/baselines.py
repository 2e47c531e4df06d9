"""The methods the recipe study compares, each as a predictive ``x -> prediction``.

A predictive returns ``[N, C]`` probabilities (classification) or the mean and
variance ``[N, 1]`` each of the targets (regression). Given trained networks:

* :func:`map_predictive`: the MAP network (regression: Gaussian with the training
  residuals' standard deviation);
* :func:`temperature_scaled`: the MAP with one scalar fitted on the validation split
  by its NLL: the logit temperature (Guo et al., 2017) or, for regression, the noise
  standard deviation;
* :func:`ensemble`: a deep ensemble, the equally weighted mixture of its members
  (Lakshminarayanan et al., 2017);
* :func:`library_defaults`: ``Laplace(model, likelihood)``, ``fit``,
  ``optimize_prior_precision()`` and ``la(x)`` with no other arguments (regression:
  ``la(x, noise=True)``, the predictive of targets);
* :func:`recipe`: :func:`bayescurv.recipes.calibrated`;
* :func:`laplace_predictive`: the predictive of a Laplace approximation fitted
  elsewhere (marglik training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bayescurv import Laplace, recipes
from bayescurv.laplace import BaseLaplace

Prediction = Tensor | tuple[Tensor, Tensor]
Predict = Callable[[Tensor], Prediction]
"""Inputs ``[N, ...]`` to probabilities ``[N, C]`` or ``(mean, var)`` ``[N, 1]``."""
LOG_SCALE_GRID = torch.linspace(-4.0, 4.0, 801)
"""Log temperatures searched by :func:`temperature_scaled` (steps of 0.01)."""


def _tensors(loader: DataLoader) -> tuple[Tensor, Tensor]:
    return loader.dataset.tensors


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return model(x)


def residual_std(model: nn.Module, loader: DataLoader) -> float:
    """Root mean squared residual of a regression model on a loader's data."""
    x, y = _tensors(loader)
    return (_outputs(model, x) - y).square().mean().sqrt().item()


def map_predictive(model: nn.Module, task: str, sigma: float = 1.0) -> Predict:
    """Softmax of the MAP, or ``N(model(x), sigma^2)`` for regression."""

    def predict(x: Tensor) -> Prediction:
        out = _outputs(model, x)
        if task == "regression":
            return out, torch.full_like(out, sigma**2)
        return out.softmax(-1)

    return predict


def temperature_scaled(
    model: nn.Module, val_loader: DataLoader, task: str
) -> tuple[Predict, float]:
    """The MAP with its temperature (or noise std) fitted on the validation NLL.

    Classification: the logit temperature ``t`` minimizing the validation NLL of
    ``softmax(f / t)`` on a log grid (:data:`LOG_SCALE_GRID`). Regression: the noise
    standard deviation minimizing the validation Gaussian NLL, the root mean squared
    validation residual.

    Returns:
        The predictive and the fitted scalar.
    """
    x, y = _tensors(val_loader)
    logits = _outputs(model, x)
    if task == "regression":
        sigma = (logits - y).square().mean().sqrt().item()
        return map_predictive(model, task, sigma), sigma
    scales = LOG_SCALE_GRID.exp()
    losses = [nn.functional.cross_entropy(logits / t, y).item() for t in scales]
    temperature = scales[min(range(len(losses)), key=losses.__getitem__)].item()

    def predict(x_new: Tensor) -> Tensor:
        return (_outputs(model, x_new) / temperature).softmax(-1)

    return predict, temperature


def ensemble(
    members: Sequence[nn.Module], task: str, sigmas: Sequence[float] = ()
) -> Predict:
    """The mixture of the members' predictives (regression: its mean and variance)."""

    def predict(x: Tensor) -> Prediction:
        outs = torch.stack([_outputs(m, x) for m in members])
        if task != "regression":
            return outs.softmax(-1).mean(0)
        var = torch.tensor(sigmas, dtype=outs.dtype).square().reshape(-1, 1, 1)
        mean = outs.mean(0)
        return mean, (var + outs.square()).mean(0) - mean.square()

    return predict


def laplace_predictive(la: BaseLaplace, task: str) -> Predict:
    """``la(x)`` (probit GLM), or ``la(x, noise=True)`` as ``(mean, var)``."""

    def predict(x: Tensor) -> Prediction:
        if task == "regression":
            return la(x, noise=True, diagonal_output=True)
        return la(x)

    return predict


def library_defaults(model: nn.Module, train_loader: DataLoader, task: str) -> Predict:
    """The three lines of a user who takes every default of the library."""
    la = Laplace(model, task)
    la.fit(train_loader)
    la.optimize_prior_precision()
    return laplace_predictive(la, task)


def recipe(
    model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, task: str
) -> tuple[Predict, recipes.CalibratedLaplace]:
    """:func:`bayescurv.recipes.calibrated` with the validation split."""
    post = recipes.calibrated(model, train_loader, val_loader, task)
    return post, post


def chunked(predict: Predict, x: Tensor, size: int = 500) -> Prediction:
    """``predict`` on ``x`` in chunks of ``size`` inputs, concatenated."""
    parts: list[Any] = [predict(chunk) for chunk in torch.split(x, size)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return torch.cat(parts)
