r"""The GLM predictive: from the linearized network's Gaussian to predictions.

The posterior supplies the mean and covariance of the linearized network's output
:math:`f(x) \approx f_{\theta_*}(x) + J(x)(\theta - \theta_*)`,

.. math::
    f \sim \mathcal{N}\big(f_\mu,\; J \Lambda^{-1} J^\top\big)

(:meth:`~bayescurv.laplace.posterior.BaseLaplace.functional_variance`); this module
turns :math:`(f_\mu, f_{\mathrm{var}})` into predictions:

* ``regression``: :math:`(f_\mu, f_{\mathrm{var}})` itself (add
  :math:`\sigma^2` for the noisy predictive);
* ``classification`` / ``binary`` with ``link_approx="probit"``: the probit
  approximation :math:`\operatorname{softmax}(\kappa \odot f_\mu)` (sigmoid for
  binary) with :math:`\kappa_c = (1 + \tfrac{\pi}{8} f_{\mathrm{var},cc})^{-1/2}`;
* ``link_approx="mc"``: the mean of the link over ``n_samples`` draws of
  :math:`f`.

Example:
    >>> import torch
    >>> f_mu, f_var = torch.zeros(1, 2), torch.eye(2)[None]
    >>> probs = glm_link(Likelihood.CLASSIFICATION, f_mu, f_var, LinkApprox.PROBIT)
    >>> probs  # symmetric logits stay uniform
    tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bayescurv.laplace.enums import Likelihood, LinkApprox, PredType, parse

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import BaseLaplace

ISSUE_6 = "is not available yet (the full predictive is tracked in issue 6)"


def probit_scale(f_var: Tensor) -> Tensor:
    r"""The probit scale.

    .. math:: \kappa = (1 + \tfrac{\pi}{8}\operatorname{diag} f_{\mathrm{var}})^{-1/2}

    Args:
        f_var: ``[N, C, C]``.

    Returns:
        ``[N, C]``.
    """
    variance = f_var.diagonal(dim1=-2, dim2=-1)
    return (1 + math.pi / 8 * variance).rsqrt()


def sample_outputs(
    f_mu: Tensor, f_var: Tensor, n_samples: int, generator: torch.Generator | None
) -> Tensor:
    r"""Draws from :math:`\mathcal{N}(f_\mu, f_{\mathrm{var}})`, ``[S, N, C]``."""
    # a symmetric square root: f_var may be singular (e.g. softmax invariance)
    values, vectors = torch.linalg.eigh(f_var)
    root = vectors * values.clamp(min=0).sqrt()[..., None, :]
    noise = torch.randn(
        n_samples,
        *f_mu.shape,
        1,
        generator=generator,
        dtype=f_mu.dtype,
        device=f_mu.device,
    )
    return f_mu + (root @ noise).squeeze(-1)


def glm_link(
    likelihood: Likelihood,
    f_mu: Tensor,
    f_var: Tensor,
    link_approx: LinkApprox,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class probabilities from the Gaussian over logits.

    Args:
        likelihood: ``CLASSIFICATION`` (softmax) or ``BINARY`` (sigmoid per output).
        f_mu: ``[N, C]``.
        f_var: ``[N, C, C]``.
        link_approx: ``PROBIT`` or ``MC``.
        n_samples: Draws for ``MC``.
        generator: Randomness for ``MC``.

    Returns:
        ``[N, C]`` probabilities.

    Raises:
        NotImplementedError: For the Laplace bridge approximations.
    """
    link = torch.sigmoid if likelihood is Likelihood.BINARY else _softmax
    if link_approx is LinkApprox.PROBIT:
        return link(probit_scale(f_var) * f_mu)
    if link_approx is LinkApprox.MC:
        return link(sample_outputs(f_mu, f_var, n_samples, generator)).mean(0)
    raise NotImplementedError(f"link_approx='{link_approx.value}' {ISSUE_6}.")


def _softmax(logits: Tensor) -> Tensor:
    return logits.softmax(-1)


def glm_moments(la: BaseLaplace, x: Any, joint: bool) -> tuple[Tensor, Tensor]:
    """See :meth:`BaseLaplace.glm_moments`."""
    la._check_fitted("__call__")
    if la.enable_backprop and not la.source.supports_backprop:
        raise ValueError(
            f"enable_backprop=True is supported for subset_of_weights="
            f"'last_layer' only, not '{la.subset.value}'."
        )
    inputs = la._reader.inputs(x)
    with torch.set_grad_enabled(la.enable_backprop or la.source.needs_grad):
        f_mu, jacobians = la.source.jacobians(inputs)
    if joint:
        f_var = la.functional_covariance(jacobians)
    else:
        f_var = la.functional_variance(jacobians)
    if not la.enable_backprop:
        f_mu, f_var = f_mu.detach(), f_var.detach()
    return f_mu, f_var


def predict(
    la: BaseLaplace,
    x: Any,
    pred_type: PredType | str,
    joint: bool,
    link_approx: LinkApprox | str,
    n_samples: int,
    diagonal_output: bool,
    generator: torch.Generator | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """See :meth:`BaseLaplace.__call__`."""
    pred_type = parse(PredType, pred_type, "pred_type")
    link_approx = parse(LinkApprox, link_approx, "link_approx")
    if pred_type is not PredType.GLM:
        raise NotImplementedError(f"pred_type='{pred_type.value}' {ISSUE_6}.")
    regression = la.likelihood is Likelihood.REGRESSION
    f_mu, f_var = glm_moments(la, x, joint=joint and regression)
    if regression:
        if diagonal_output and not joint:
            f_var = f_var.diagonal(dim1=-2, dim2=-1)
        return f_mu, f_var
    return glm_link(la.likelihood, f_mu, f_var, link_approx, n_samples, generator)
