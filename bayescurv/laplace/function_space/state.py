r"""The fitted state of a function-space posterior, and its hyperparameter map.

Like the weight-space :class:`~bayescurv.laplace.state.FittedState`, a
:class:`FunctionSpaceState` is produced by ``fit`` and never modified; it holds the
GP posterior (:class:`~.spectral.SpectralGP`) at the prior precision of the fit
:math:`\pi_{\mathrm{fit}}` and at unit data scale. The current hyperparameters
enter through two numbers (see :mod:`.spectral`):

* :math:`c = \pi / \pi_{\mathrm{fit}}`, a common factor of the prior precision
  (the kernel is :math:`K_{\mathrm{fit}} / c`; other changes of a per-tensor prior
  need a refit, as per-output noise ratios do in weight space);
* :math:`\rho = s / c` with the data scale :math:`s = 1/(T\sigma_1^2)`
  (:func:`~bayescurv.laplace.state.data_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bayescurv.laplace.function_space.options import FunctionalApproximation
from bayescurv.laplace.function_space.spectral import SpectralGP
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources import CurvatureSource
from bayescurv.laplace.state import Hyperparameters, data_scale


@dataclass(frozen=True)
class FunctionSpaceState:
    r"""What a function-space ``fit`` produced; never modified after creation.

    Attributes:
        source: The weight subset's curvature source (Jacobians).
        posterior: The GP posterior at the fit's prior, unit data scale.
        approximation: How it was built.
        prior_fit: :math:`\pi_{\mathrm{fit}}`, 0-d or ``[B]``.
        mean: The MAP :math:`\theta_*` of the subset, ``[P]``.
        loss: The summed unit loss of *all* training data at the MAP.
        n_data: ``N``.
        n_outputs: ``C``.
        output_shape: The model output's shape per point.
        likelihood: The likelihood (per-output noise weights baked in).
        sigma_fit: The noise at fit.
        anchor_targets: The targets of the anchor points (``M`` training points).
        n_subset: ``M``, the training points the posterior was built on.
    """

    source: CurvatureSource
    posterior: SpectralGP
    approximation: FunctionalApproximation
    prior_fit: Tensor
    mean: Tensor
    loss: Tensor
    n_data: int
    n_outputs: int
    output_shape: tuple[int, ...]
    likelihood: LikelihoodModel
    sigma_fit: Tensor
    anchor_targets: Tensor
    n_subset: int

    @property
    def block_sizes(self) -> list[int]:
        """Weights per parameter tensor."""
        return self.posterior.block_sizes

    @property
    def num_params(self) -> int:
        """``P``."""
        return sum(self.block_sizes)

    @property
    def anchor_inputs(self) -> Any:
        """The inputs of the anchor points."""
        return self.posterior.anchors.inputs


class PriorChangeError(ValueError):
    """A prior precision that is not a common factor times the fit's."""


def prior_factor(state: FunctionSpaceState, prior: Tensor) -> Tensor:
    r""":math:`c = \pi / \pi_{\mathrm{fit}}` (0-d, differentiable in ``prior``).

    Raises:
        PriorChangeError: If ``prior`` is not a common factor times the fit's.
    """
    fit = state.prior_fit
    if prior.ndim == 0 and fit.ndim == 0:
        return prior / fit
    sizes = len(state.block_sizes)
    ratio = prior.expand(sizes) / fit.expand(sizes)
    first = ratio[0]
    if not torch.allclose(ratio.detach(), first.detach().expand(sizes), rtol=1e-5):
        raise PriorChangeError(
            "hessian_structure='gp' builds its kernel with the prior precision of "
            f"fit() ({_show(fit)}); afterwards the prior may only change by a common "
            f"factor, got {_show(prior)}. Refit with the new prior_precision."
        )
    return first


def hyper_map(
    state: FunctionSpaceState, hyper: Hyperparameters
) -> tuple[Tensor, Tensor]:
    r"""The prior factor :math:`c` and :math:`\rho = s / c` of the hyperparameters."""
    factor = prior_factor(state, hyper.prior_precision)
    scale = data_scale(state, hyper.sigma_noise, hyper.temperature)  # type: ignore[arg-type]
    return factor, scale / factor


def _show(prior: Tensor) -> str:
    values = prior.detach().reshape(-1)
    return f"{values.item():.4g}" if values.numel() == 1 else str(values.tolist())
