r"""The fitted state and the hyperparameters: everything a posterior is a function of.

``fit`` produces one immutable :class:`FittedState` (where the curvature came from, the
curvature itself, the MAP, the loss, the data and output counts, the likelihood, the
noise at fit). The hyperparameters (prior precision and mean, noise, temperature) are
a second immutable object, :class:`Hyperparameters`. The posterior precision

.. math::
    \Lambda = \frac{1}{T \sigma_1^2} H + \operatorname{diag}(\pi)

(:func:`posterior_precision`), the evidence (:mod:`bayescurv.laplace.tune`), the
predictive (:mod:`bayescurv.laplace.predict`) and the saved state
(:mod:`bayescurv.laplace.serialization`) are functions of the pair. A posterior object
(:class:`~bayescurv.laplace.posterior.BaseLaplace`) holds one reference to each and
replaces them, never edits them: a failed or interrupted ``fit`` leaves the previous
state untouched.

This module is a leaf of the Laplace layer: it imports only the curvature layer (the
other Laplace types appear in annotations only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bayescurv.curvature import CurvatureMatrix

if TYPE_CHECKING:
    from bayescurv.laplace.likelihoods import LikelihoodModel
    from bayescurv.laplace.sources.base import CurvatureSource


@dataclass(frozen=True)
class Hyperparameters:
    r"""Prior, noise and temperature (validated tensors; see :mod:`.hyper`).

    Attributes:
        prior_precision: :math:`\pi`: 0-d, ``[B]`` (per parameter tensor) or ``[P]``.
        prior_mean: :math:`\mu_0`: 0-d or ``[P]``.
        sigma_noise: :math:`\sigma`: 0-d or ``[K]`` (1 unless regression).
        temperature: :math:`T > 0`.
    """

    prior_precision: Tensor
    prior_mean: Tensor
    sigma_noise: Tensor
    temperature: float

    def with_(self, **changes: Any) -> Hyperparameters:
        """A copy with some fields replaced (the fields must be valid already)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class FittedState:
    r"""What ``fit`` produced; never modified after creation.

    Attributes:
        source: Where the curvature of the weight subset comes from (the subset's
            parameters, Jacobians for the predictive).
        curvature: The data term :math:`H` (unit scale, no prior) as a
            :mod:`bayescurv.curvature` structure.
        sums: The accumulated per-batch sums that ``fit(override=False)`` adds to
            (private copies), or ``None`` if the structure cannot be extended.
        mean: The MAP :math:`\theta_*` of the subset, ``[P]``.
        loss: The summed unit loss at the MAP (regression: squared errors per output
            ``[K]``).
        n_data: Number of training points ``N``.
        n_outputs: Outputs per point ``K`` (``C``; ``C T`` for ``[N, C, *T]``).
        output_shape: The model output's shape per point, e.g. ``(C,)``.
        likelihood: The likelihood, with a per-output noise baked in at fit.
        sigma_fit: The noise :math:`\sigma` at fit (its per-output ratios are part of
            the curvature).
    """

    source: CurvatureSource
    curvature: CurvatureMatrix
    sums: dict[str, Any] | None
    mean: Tensor
    loss: Tensor
    n_data: int
    n_outputs: int
    output_shape: tuple[int, ...]
    likelihood: LikelihoodModel
    sigma_fit: Tensor

    @property
    def num_params(self) -> int:
        """``P``, the number of weights with a posterior."""
        return self.curvature.num_params

    @property
    def block_sizes(self) -> list[int]:
        """Weights per block (parameter tensor), in order."""
        return list(self.curvature.block_sizes)


def check_noise_ratio(state: FittedState, sigma: Tensor) -> None:
    """A per-output noise may differ from the one at fit by a common factor only.

    Raises:
        ValueError: If the ratios between the outputs' noises changed.
    """
    fit, new = state.sigma_fit.detach(), sigma.detach()
    if fit.ndim == 0 and new.ndim == 0:
        return
    ratio = new.expand(state.n_outputs) / fit.expand(state.n_outputs)
    if not torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5):
        raise ValueError(
            "a per-output sigma_noise enters the curvature at fit(); after it, "
            "sigma_noise may only change by a common factor (refit for other noise "
            "ratios)."
        )


def data_scale(state: FittedState, sigma: Tensor, temperature: float) -> Tensor:
    r"""The scale :math:`1 / (T \sigma_1^2)` of the data term (see likelihoods).

    Classification and binary: :math:`1 / T`. Differentiable in ``sigma``.
    """
    if not state.likelihood.has_noise:
        return state.mean.new_tensor(1.0 / temperature)
    check_noise_ratio(state, sigma)
    first = sigma if sigma.ndim == 0 else sigma[0]
    return 1.0 / (temperature * first.square())


def posterior_precision(state: FittedState, hyper: Hyperparameters) -> CurvatureMatrix:
    r""":math:`\Lambda = s H + \operatorname{diag}(\pi)` as a curvature structure.

    Shares the decomposition of :math:`H` with every other call; differentiable in
    the prior precision and the noise.
    """
    scale = data_scale(state, hyper.sigma_noise, hyper.temperature)
    return state.curvature.scaled(scale).add_prior(hyper.prior_precision)
