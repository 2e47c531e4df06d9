r"""Regression part of the Laplace study: the 1-D gap toy and diabetes.

MAP is the MSE fit of ``study_map_baseline`` with a homoscedastic Gaussian
predictive whose noise is the training residuals' standard deviation. A Laplace
approximation of the same network is fitted with ``likelihood="regression"`` and
tunes its prior precision and ``sigma_noise`` jointly on the evidence
(``optimize_prior_precision(tune_sigma_noise=True)``); its predictive of targets is
the GLM's

.. math::
    y \mid x \sim \mathcal{N}\big(f_*(x),\; J(x) \Lambda^{-1} J(x)^\top
    + \sigma^2\big)

(``la(x, noise=True)``), so the mean is MAP's and only the error bars differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayescurv.laplace import BaseLaplace, Laplace
from experiments import data, models
from experiments.evaluation import gaussian_nll
from experiments.study_map_baseline import fit_regression

REGRESSION_METHODS: dict[str, tuple[str, str] | None] = {
    "MAP": None,
    "LA last-layer kron": ("last_layer", "kron"),
    "LA last-layer full": ("last_layer", "full"),
    "LA all diag": ("all", "diag"),
    "LA all kron": ("all", "kron"),
    "LA all full": ("all", "full"),
}
"""Method name -> ``(subset_of_weights, hessian_structure)`` (``None``: MAP)."""
REGIONS = ("data", "gap", "outside")


@dataclass
class Band:
    """A predictive of targets on the toy grid: mean and std ``[G, 1]``."""

    mean: Tensor
    std: Tensor


def laplace_regression(
    model: nn.Module, loader, subset: str, structure: str
) -> BaseLaplace:
    """Fit a Laplace approximation and tune prior precision and noise jointly."""
    la = Laplace(
        model, "regression", subset_of_weights=subset, hessian_structure=structure
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", tune_sigma_noise=True)
    return la


def predictive(
    model: nn.Module, la: BaseLaplace | None, sigma_map: float, x: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and std ``[N, 1]`` of the predictive of targets (MAP if ``la`` is None)."""
    if la is None:
        with torch.no_grad():
            mean = model(x)
        return mean, torch.full_like(mean, sigma_map)
    f_mu, f_var = la(x, noise=True, diagonal_output=True)
    return f_mu, f_var.sqrt()


def toy_run(seed: int, epochs: int) -> tuple[dict[str, float], dict[str, Band]]:
    """Every method on the gap toy: RMSE and NLL per region, and the bands."""
    toy = data.gap_toy(seed=0)
    loader = toy.loader(batch_size=150)
    net, sigma = fit_regression(
        models.mlp(1, 50, 50, 1, seed=seed), loader, 15 * epochs, seed, lr=1e-2
    )
    result, bands = {}, {}
    regions = toy.regions()
    for method, options in REGRESSION_METHODS.items():
        la = None if options is None else laplace_regression(net, loader, *options)
        mean, std = predictive(net, la, sigma, toy.x_grid)
        bands[method] = Band(mean, std)
        for region in REGIONS:
            mask = regions[region]
            error = (mean[mask] - toy.f_grid[mask]).square().mean().sqrt().item()
            result[f"{method}/toy/{region}/RMSE"] = error
            result[f"{method}/toy/{region}/NLL"] = gaussian_nll(
                mean[mask], toy.y_grid[mask], std[mask]
            )
    return result, bands


def diabetes_run(seed: int, epochs: int) -> dict[str, float]:
    """Every method on diabetes: test RMSE and NLL in original units."""
    loaders = data.diabetes_loaders(seed=0)
    net, sigma = fit_regression(
        models.mlp(10, 50, 1, seed=seed), loaders.train, epochs, seed,
        weight_decay=1e-3,
    )  # fmt: skip
    x_test, y_test = loaders.test.dataset.tensors
    result = {}
    for method, options in REGRESSION_METHODS.items():
        la = (
            None
            if options is None
            else laplace_regression(net, loaders.train, *options)
        )
        mean, std = predictive(net, la, sigma, x_test)
        rmse = (mean - y_test).square().mean().sqrt().item()
        result[f"{method}/diabetes/RMSE"] = rmse * loaders.y_std
        # NLL in original units: standardized NLL + log(y_std)
        nll = gaussian_nll(mean, y_test, std) + math.log(loaders.y_std)
        result[f"{method}/diabetes/NLL"] = nll
    return result


def regression_run(seed: int, epochs: int) -> tuple[dict[str, float], dict]:
    """The toy and diabetes for one training seed."""
    toy, bands = toy_run(seed, epochs)
    return toy | diabetes_run(seed, epochs), bands
