r"""The Laplace evidence as a function of the fitted state and the hyperparameters.

With the data term :math:`H`, temperature :math:`T`, noise :math:`\sigma` and prior
:math:`\mathcal{N}(\mu_0, \operatorname{diag}(\pi)^{-1})`, the posterior precision is
:math:`\Lambda = \frac{1}{T\sigma_1^2} H + \operatorname{diag}(\pi)` and

.. math::
    \log p(\mathcal{D}) \approx \log p(\mathcal{D} \mid \theta_*)
    - \tfrac12 \big( \log\det\Lambda - \textstyle\sum_i \log \pi_i \big)
    - \tfrac12 (\theta_* - \mu_0)^\top \operatorname{diag}(\pi) (\theta_* - \mu_0).

Every function here is differentiable in the prior precision and the noise; none
changes its arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature import CurvatureMatrix
from bayescurv.laplace.state import FittedState, Hyperparameters, posterior_precision


def expand_prior(prior: Tensor, block_sizes: list[int]) -> Tensor:
    """A 0-d, per-block ``[B]`` or per-parameter ``[P]`` prior as ``[P]``."""
    size = sum(block_sizes)
    if prior.ndim == 0 or prior.numel() == 1:
        return prior.reshape(()).expand(size)
    if prior.shape[0] == size:
        return prior
    counts = torch.tensor(block_sizes, device=prior.device)
    return torch.repeat_interleave(prior, counts)


def log_prior_det(state: FittedState, prior: Tensor) -> Tensor:
    r""":math:`\sum_i \log \pi_i` over all ``P`` weights."""
    sizes = state.block_sizes
    if prior.ndim == 0:
        return sum(sizes) * prior.log()
    if prior.shape == (len(sizes),) and len(sizes) != sum(sizes):
        counts = torch.tensor(sizes, dtype=prior.dtype, device=prior.device)
        return (counts * prior.log()).sum()
    return prior.log().sum()


def scatter(state: FittedState, prior_mean: Tensor, prior: Tensor) -> Tensor:
    r""":math:`(\theta_* - \mu_0)^\top \operatorname{diag}(\pi)(\theta_* - \mu_0)`."""
    delta = (state.mean - prior_mean).square()
    return (delta * expand_prior(prior, state.block_sizes)).sum()


def log_likelihood(state: FittedState, sigma: Tensor, temperature: float) -> Tensor:
    r""":math:`\log p(\mathcal{D} \mid \theta_*)` (tempered, see likelihoods)."""
    return state.likelihood.log_likelihood(
        state.loss, state.n_data, state.n_outputs, sigma, temperature
    )


def log_det_ratio(
    state: FittedState,
    hyper: Hyperparameters,
    precision: CurvatureMatrix | None = None,
) -> Tensor:
    r""":math:`\log\det\Lambda - \sum_i \log \pi_i`.

    Args:
        state: The fitted state.
        hyper: The hyperparameters.
        precision: :math:`\Lambda` if already built for ``hyper`` (else built).
    """
    if precision is None:
        precision = posterior_precision(state, hyper)
    return precision.logdet() - log_prior_det(state, hyper.prior_precision)


def log_marginal_likelihood(
    state: FittedState,
    hyper: Hyperparameters,
    precision: CurvatureMatrix | None = None,
) -> Tensor:
    """The Laplace evidence of the module doc, a 0-d tensor.

    Args:
        state: The fitted state.
        hyper: The hyperparameters (may carry gradients).
        precision: The posterior precision for ``hyper`` if already built.
    """
    fit = log_likelihood(state, hyper.sigma_noise, hyper.temperature)
    ratio = log_det_ratio(state, hyper, precision)
    return fit - 0.5 * (ratio + scatter(state, hyper.prior_mean, hyper.prior_precision))
