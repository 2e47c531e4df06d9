r"""A fitted Laplace approximation in Pyro: distribution, model, guide, warm start.

* :func:`posterior_distribution`: the posterior
  :math:`\mathcal{N}(\theta_*, \Lambda^{-1})` over the subset's flat weights as a
  :class:`~bayescurv.curvature.normal.StructuredNormal` that keeps the structure
  (diagonal, Kronecker, low rank, dense);
* :func:`bayesian_network`: the network as the Pyro model the Laplace fit
  approximates (:class:`~bayescurv.laplace.pyro_model.BayesianNetwork`: the same
  prior, likelihood, ``sigma_noise`` and temperature; weights outside the subset
  fixed at the MAP);
* :class:`LaplaceGuide`: a guide drawing the site ``"weights"`` from the posterior,
  so the Laplace posterior drops into ``pyro.infer.Predictive``, ``Importance``
  (model comparison) and ELBO evaluations;
* :func:`warm_start_guide`: a trainable ``AutoNormal`` or ``AutoMultivariateNormal``
  guide initialized at the Laplace posterior, for SVI.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pyro.infer import Predictive
    >>> from bayescurv import Laplace
    >>> from bayescurv.laplace.pyro import to_pyro
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(20, 2), torch.randint(0, 3, (20,))
    >>> la = Laplace(net, "classification", hessian_structure="diag")
    >>> la.fit([(x, y)])
    >>> model, guide = to_pyro(la)
    >>> draws = Predictive(model, guide=guide, num_samples=50)(x)
    >>> draws["f"].shape  # network outputs at 50 posterior draws
    torch.Size([50, 20, 3])
    >>> draws["weights"].shape  # last layer: 8 * 3 + 3 weights (Pyro pads a plate dim)
    torch.Size([50, 1, 27])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroModule
from torch import Tensor, nn

from bayescurv.curvature.normal import StructuredNormal
from bayescurv.laplace.pyro_model import WEIGHTS_SITE, BayesianNetwork

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import BaseLaplace
    from bayescurv.laplace.sources.base import CurvatureSource

__all__ = [
    "BayesianNetwork",
    "LaplaceGuide",
    "StructuredNormal",
    "bayesian_network",
    "posterior_distribution",
    "to_pyro",
    "warm_start_guide",
]

GUIDE_FAMILIES = ("normal", "multivariate")
"""Guides of :func:`warm_start_guide`: ``AutoNormal`` or ``AutoMultivariateNormal``."""


def posterior_distribution(la: BaseLaplace) -> StructuredNormal:
    r"""The Laplace posterior :math:`\mathcal{N}(\theta_*, \Lambda^{-1})` over ``[P]``.

    Args:
        la: A fitted Laplace approximation (any subset and structure).

    Returns:
        A :class:`StructuredNormal` over the subset's flat weights (the layout of
        ``la.state.mean``; for a subnetwork its entries only) with the current prior
        precision and noise, in the precision's dtype.

    Raises:
        NotFittedError: If ``la`` is not fitted.
    """
    precision = la.precision
    return StructuredNormal(la.state.mean.detach().to(precision.dtype), precision)


def bayesian_network(la: BaseLaplace) -> BayesianNetwork:
    """The Pyro model that ``la`` approximates: its network, prior and likelihood.

    Args:
        la: A fitted Laplace approximation whose model is still at the fitted MAP.

    Returns:
        A :class:`BayesianNetwork` whose site ``"weights"`` is ``la``'s subset (in
        ``la.state.mean``'s layout) with ``la``'s prior precision and mean; its other
        weights are fixed at their current (MAP) values.

    Raises:
        NotFittedError: If ``la`` is not fitted.
        ValueError: If the model's weights changed since ``fit``.
    """
    state = la.state
    model = BayesianNetwork(
        la.model,
        la.likelihood,
        prior_precision=la.prior_precision,
        prior_mean=la.prior_mean,
        sigma_noise=la.sigma_noise,
        temperature=la.temperature,
        parameters=_parameter_names(la.model, state.source),
        indices=state.source.indices,
    )
    current = model.map_weights()
    if not torch.allclose(current, state.mean.to(current), rtol=1e-5, atol=1e-7):
        raise ValueError(
            "bayesian_network: the model's weights differ from the fitted MAP "
            "(la.state.mean); the model changed since fit (refit, or restore its "
            "MAP weights)."
        )
    return model


def _parameter_names(model: nn.Module, source: CurvatureSource) -> list[str]:
    """The ``model.named_parameters()`` names of the subset's tensors, in order.

    Matched by identity: a last-layer source names its tensors after the layer,
    which for a root module is not ``named_parameters``' name.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in source.parameters.values()]


class LaplaceGuide(PyroModule):
    """A guide drawing the site ``"weights"`` from a fixed Laplace posterior.

    Pair it with the model of :func:`bayesian_network` (or any model with a site
    ``"weights"`` of shape ``[P]``); it takes and ignores the model's arguments.

    Args:
        posterior: The distribution of the weights (:func:`posterior_distribution`).
    """

    def __init__(self, posterior: StructuredNormal) -> None:
        super().__init__()
        self.posterior = posterior

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Sample the weights ``[P]`` (batched inside vectorized plates)."""
        del args, kwargs
        return pyro.sample(WEIGHTS_SITE, self.posterior)


def to_pyro(la: BaseLaplace) -> tuple[BayesianNetwork, LaplaceGuide]:
    """The model ``la`` approximates and a guide sampling its Laplace posterior.

    Args:
        la: A fitted Laplace approximation (model still at the MAP).

    Returns:
        ``(model, guide)``: ``model(x, y=None)`` and the guide for it.
    """
    return bayesian_network(la), LaplaceGuide(posterior_distribution(la))


def warm_start_guide(
    la: BaseLaplace, model: BayesianNetwork, *args: Any, family: str = "normal"
) -> autoguide.AutoGuide:
    r"""A trainable Pyro autoguide initialized at the Laplace posterior.

    ``"normal"``: ``AutoNormal`` with the posterior mean and marginal standard
    deviations :math:`\sqrt{\operatorname{diag}\Lambda^{-1}}` (no dense matrix).
    ``"multivariate"``: ``AutoMultivariateNormal`` with the full covariance, from
    the Cholesky factor of the dense :math:`\Lambda^{-1}` (``[P, P]``).

    Args:
        la: A fitted Laplace approximation.
        model: Its model, e.g. from :func:`bayesian_network`.
        *args: Model arguments (e.g. ``x, y``), run once to set the guide up.
        family: ``"normal"`` or ``"multivariate"``.

    Returns:
        The guide, ready for ``pyro.infer.SVI``.

    Raises:
        ValueError: For an unknown family.
    """
    if family not in GUIDE_FAMILIES:
        raise ValueError(
            f"warm_start_guide: family must be one of {GUIDE_FAMILIES}, got {family!r}."
        )
    posterior = posterior_distribution(la)
    init = init_to_value(values={WEIGHTS_SITE: posterior.mean})
    if family == "normal":
        guide = autoguide.AutoNormal(model, init_loc_fn=init)
        guide(*args)  # sets up the parameters
        guide.scales.weights = posterior.variance.sqrt()
        return guide
    guide = autoguide.AutoMultivariateNormal(model, init_loc_fn=init)
    guide(*args)
    factor = torch.linalg.cholesky(posterior.covariance_matrix)
    scale = factor.diagonal()
    guide.scale = scale
    guide.scale_tril = factor / scale[:, None]
    return guide
