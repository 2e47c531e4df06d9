r"""The evidence of a function-space posterior and tuning on it or on validation data.

The Laplace evidence of the linearized network at the MAP, in function space:

.. math::
    \log p(\mathcal D) \approx \log p(\mathcal D \mid \theta_*)
    - \tfrac12 \log\det(I + s R^\top K R)
    - \tfrac12 (\theta_* - \mu_0)^\top \Sigma_0^{-1} (\theta_* - \mu_0).

By Sylvester's identity :math:`\det(I + s R^\top J \Sigma_0 J^\top R) =
\det(I + s \Sigma_0 J^\top W J) = \det\Lambda / \det\Sigma_0^{-1}`, so with all data
this *is* the weight-space Laplace evidence, for every prior and noise (not only
at the MAP). The log determinant costs :math:`O(r)` per evaluation
(:meth:`~.spectral.SpectralGP.log_det`), so ``marglik`` tuning never touches the
kernel again. The scatter is the prior's, a closed form in the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm, trange

from bayescurv.laplace.enums import Likelihood, LinkApprox
from bayescurv.laplace.function_space.state import FunctionSpaceState, hyper_map
from bayescurv.laplace.predict.links import glm_link
from bayescurv.laplace.state import Hyperparameters
from bayescurv.laplace.tune import evidence
from bayescurv.laplace.tune.gridsearch import Loss
from bayescurv.laplace.tune.prior import Adam


def log_marginal_likelihood(
    state: FunctionSpaceState, hyper: Hyperparameters
) -> Tensor:
    """The evidence of the module doc (0-d, differentiable in prior and noise)."""
    _, ratio = hyper_map(state, hyper)
    fit = evidence.log_likelihood(state, hyper.sigma_noise, hyper.temperature)  # type: ignore[arg-type]
    scatter = evidence.scatter(state, hyper.prior_mean, hyper.prior_precision)  # type: ignore[arg-type]
    log_det = state.posterior.log_det(ratio).to(state.mean.dtype)
    return fit - 0.5 * (log_det + scatter)


def optimize_marglik(
    state: FunctionSpaceState,
    hyper: Hyperparameters,
    n_steps: int,
    lr: float,
    tune_sigma_noise: bool,
    progress_bar: bool = False,
) -> tuple[Hyperparameters, list[float]]:
    """Adam on the negative evidence in the log prior factor (and log noise).

    Args:
        state: The fitted state.
        hyper: The start (its prior a common factor times the fit's).
        n_steps: Adam steps.
        lr: Adam learning rate.
        tune_sigma_noise: Tune a common factor of the noise too (regression).
        progress_bar: Show a tqdm bar.

    Returns:
        The tuned hyperparameters and the negative evidence per step.
    """
    base = hyper.prior_precision.detach()
    log_factor = torch.zeros_like(base.reshape(-1)[0]).requires_grad_(True)
    log_noise = torch.zeros_like(log_factor).requires_grad_(tune_sigma_noise)
    params = [log_factor] + ([log_noise] if tune_sigma_noise else [])
    optimizer = Adam(params, lr)
    sigma = hyper.sigma_noise.detach()
    history = []
    for _ in trange(n_steps, disable=not progress_bar, desc="marglik"):
        values = hyper.with_(
            prior_precision=base * log_factor.exp(), sigma_noise=sigma * log_noise.exp()
        )
        neg = -log_marginal_likelihood(state, values)
        optimizer.step(list(torch.autograd.grad(neg, params)))
        history.append(neg.item())
    tuned = hyper.with_(prior_precision=(base * log_factor.exp()).detach())
    if tune_sigma_noise:
        tuned = tuned.with_(sigma_noise=(sigma * log_noise.exp()).detach())
    return tuned, history


def gridsearch(
    state: FunctionSpaceState,
    hyper: Hyperparameters,
    candidates: Sequence[Tensor],
    batches: Iterable[tuple[Any, Tensor]],
    loss: Loss,
    likelihood: Likelihood,
    link_approx: LinkApprox,
    n_samples: int,
    progress_bar: bool = False,
) -> Tensor:
    """The candidate prior with the smallest mean validation loss.

    The validation kernels are computed and whitened once
    (:meth:`~.spectral.SpectralGP.project`, after
    :meth:`~.spectral.SpectralGP.decompose`); every candidate only rescales them.

    Raises:
        ValueError: If ``batches`` is empty.
    """
    gp, cached = state.posterior, []
    gp.decompose()  # one eigendecomposition instead of a factor per candidate
    for inputs, targets in batches:
        with torch.set_grad_enabled(state.source.needs_grad):
            chunks = list(state.source.jacobian_segments(inputs))
        with torch.no_grad():
            f_mu = torch.cat([mu for mu, _ in chunks]).detach()
            projected = [gp.project(jac) for _, jac in chunks]
        cached.append((f_mu, projected, targets))
    if not cached:
        raise ValueError("gridsearch: val_loader yielded no batches.")
    scores = []
    for prior in tqdm(candidates, disable=not progress_bar, desc="gridsearch"):
        factor, ratio = hyper_map(state, hyper.with_(prior_precision=prior))
        metric = hasattr(loss, "update") and hasattr(loss, "compute")
        if metric:
            loss.reset()
        total, count = 0.0, 0
        for f_mu, projected, targets in cached:
            f_var = torch.cat([gp.covariance(p, factor, ratio) for p in projected])
            prediction: Any = (f_mu, f_var)
            if likelihood is not Likelihood.REGRESSION:
                prediction = glm_link(likelihood, f_mu, f_var, link_approx, n_samples)
            if metric:
                loss.update(prediction, targets)
                continue
            total += float(loss(prediction, targets)) * len(targets)
            count += len(targets)
        score = float(loss.compute()) if metric else total / count
        scores.append(score if math.isfinite(score) else math.inf)
    return candidates[min(range(len(scores)), key=scores.__getitem__)]
