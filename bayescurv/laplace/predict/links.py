r"""Link approximations: from the linearized network's Gaussian to predictions.

The posterior supplies the mean and covariance of the linearized network's output
:math:`f(x) \approx f_{\theta_*}(x) + J(x)(\theta - \theta_*)`,

.. math::
    f \sim \mathcal{N}\big(f_\mu,\; f_{\mathrm{var}} = J \Lambda^{-1} J^\top\big)

(:meth:`~bayescurv.laplace.posterior.BaseLaplace.functional_variance`); this module
turns :math:`(f_\mu, f_{\mathrm{var}})` into class probabilities. ``f_var`` is the
per-sample covariance ``[N, C, C]`` or, with ``diagonal_output``, its diagonal
``[N, C]``.

* ``probit``: :math:`\operatorname{softmax}(\kappa \odot f_\mu)` (sigmoid for
  ``binary``) with :math:`\kappa_c = (1 + \tfrac{\pi}{8} f_{\mathrm{var},cc})^{-1/2}`
  (MacKay 1992; exact in expectation for one sigmoid up to the probit-to-logistic
  fit);
* ``bridge``: the Laplace bridge (Hobbhahn et al., 2022) maps the Gaussian to a
  Dirichlet and returns its mean, see :func:`laplace_bridge`;
* ``bridge_norm``: the same after laplace-torch's variance normalization;
* ``mc``: the mean of the link over ``n_samples`` draws of :math:`f`, with the
  covariance over classes (or the diagonal only, ``diagonal_output``).

Example:
    >>> import torch
    >>> f_mu, f_var = torch.zeros(1, 2), torch.eye(2)[None]
    >>> probs = glm_link(Likelihood.CLASSIFICATION, f_mu, f_var, LinkApprox.PROBIT)
    >>> probs  # symmetric logits stay uniform
    tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from bayescurv.laplace.enums import Likelihood, LinkApprox

Link = Callable[[Tensor], Tensor]

BINARY_LINKS = (LinkApprox.PROBIT, LinkApprox.MC)
"""The link approximations of ``likelihood="binary"`` (the bridge needs classes)."""


def link_function(likelihood: Likelihood) -> Link:
    """Softmax (classification), sigmoid (binary) or the identity (regression)."""
    if likelihood is Likelihood.CLASSIFICATION:
        return _softmax
    if likelihood is Likelihood.BINARY:
        return torch.sigmoid
    return _identity


def variances(f_var: Tensor) -> Tensor:
    """The output variances ``[N, C]`` of a covariance ``[N, C, C]`` (or ``[N, C]``)."""
    return f_var if f_var.ndim == 2 else f_var.diagonal(dim1=-2, dim2=-1)


def probit_scale(f_var: Tensor) -> Tensor:
    r"""The probit scale.

    .. math:: \kappa = (1 + \tfrac{\pi}{8}\operatorname{diag} f_{\mathrm{var}})^{-1/2}

    Args:
        f_var: ``[N, C, C]`` or the variances ``[N, C]``.

    Returns:
        ``[N, C]``.
    """
    return (1 + math.pi / 8 * variances(f_var)).rsqrt()


def laplace_bridge(f_mu: Tensor, f_var: Tensor, normalized: bool = False) -> Tensor:
    r"""Mean of the Laplace bridge's Dirichlet (Hobbhahn et al., 2022).

    The Gaussian is first conditioned on :math:`\mathbf{1}^\top f = 0` (softmax is
    invariant to shifts of the logits; :math:`s = \Sigma \mathbf{1}`)

    .. math::
        \mu' = \mu - s \frac{\mathbf{1}^\top \mu}{\mathbf{1}^\top s}, \qquad
        \Sigma' = \Sigma - \frac{s s^\top}{\mathbf{1}^\top s},

    then mapped to the Dirichlet parameters

    .. math::
        \alpha_k = \frac{1}{\Sigma'_{kk}} \Big( 1 - \frac{2}{K}
        + \frac{e^{\mu'_k}}{K^2} \sum_l e^{-\mu'_l} \Big),

    whose mean :math:`\alpha / \sum_k \alpha_k` is returned. ``normalized``
    (laplace-torch's ``bridge_norm``) first rescales with
    :math:`m = \operatorname{mean}_k \Sigma'_{kk} / \sqrt{K/2}`:
    :math:`\mu' \to \mu' / \sqrt{m}`, :math:`\Sigma'_{kk} \to \Sigma'_{kk} / m`.

    The Dirichlet mean is computed from :math:`\log\alpha` (no overflow for large
    logits). If :math:`\mathbf{1}^\top \Sigma \mathbf{1} = 0` (the Gaussian already
    lives on shifts of the plane) the conditioning is replaced by centering
    :math:`\mu`; zero variances are clamped to the smallest positive number.

    Args:
        f_mu: ``[N, K]`` with ``K >= 2``.
        f_var: ``[N, K, K]`` or the variances ``[N, K]`` (a diagonal covariance).
        normalized: Apply the variance normalization.

    Returns:
        Probabilities ``[N, K]``.

    Raises:
        ValueError: For fewer than two classes.
    """
    classes = f_mu.shape[-1]
    if classes < 2:
        raise ValueError(
            f"the Laplace bridge needs at least 2 classes, got {classes}; use "
            "link_approx='probit' or 'mc'."
        )
    mu, var = _sum_zero(f_mu, f_var)
    tiny = torch.finfo(var.dtype).tiny
    var = var.clamp_min(tiny)
    if normalized:
        scale = (var.mean(-1, keepdim=True) / math.sqrt(classes / 2)).clamp_min(tiny)
        mu, var = mu / scale.sqrt(), var / scale
    exponent = mu + torch.logsumexp(-mu, -1, keepdim=True) - 2 * math.log(classes)
    constant = 1 - 2 / classes
    if constant > 0:
        log_alpha = torch.logaddexp(exponent, exponent.new_tensor(math.log(constant)))
    else:  # K = 2
        log_alpha = exponent
    return (log_alpha - var.log()).softmax(-1)


def _sum_zero(f_mu: Tensor, f_var: Tensor) -> tuple[Tensor, Tensor]:
    r"""Condition on :math:`\mathbf{1}^\top f = 0`; the mean and the variances."""
    row = f_var if f_var.ndim == 2 else f_var.sum(-1)  # Sigma 1, [N, K]
    total = row.sum(-1, keepdim=True)  # 1^T Sigma 1, [N, 1]
    degenerate = total <= torch.finfo(total.dtype).tiny
    safe = torch.where(degenerate, torch.ones_like(total), total)
    mu = f_mu - row * f_mu.sum(-1, keepdim=True) / safe
    mu = torch.where(degenerate, f_mu - f_mu.mean(-1, keepdim=True), mu)
    new_var = variances(f_var) - row.square() / safe
    var = torch.where(degenerate, variances(f_var), new_var)
    return mu, var


def sample_outputs(
    f_mu: Tensor,
    f_var: Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draws from :math:`\mathcal{N}(f_\mu, f_{\mathrm{var}})` per sample.

    Args:
        f_mu: ``[N, C]``.
        f_var: ``[N, C, C]`` (correlated outputs) or the variances ``[N, C]``
            (independent outputs).
        n_samples: Draws ``S``.
        generator: Source of randomness (default: torch's global generator).

    Returns:
        ``[S, N, C]``.
    """
    noise = torch.randn(
        n_samples,
        *f_mu.shape,
        generator=generator,
        dtype=f_mu.dtype,
        device=f_mu.device,
    )
    if f_var.ndim == 2:
        return f_mu + f_var.clamp_min(0).sqrt() * noise
    root = covariance_root(f_var)
    return f_mu + (root @ noise[..., None]).squeeze(-1)


def covariance_root(cov: Tensor) -> Tensor:
    r"""A square root :math:`R R^\top = \Sigma` of PSD matrices ``[..., C, C]``.

    # NOTE [Cholesky with an eigen fallback]
    # The Cholesky factor is exact and has well-defined gradients (enable_backprop);
    # singular covariances (e.g. the softmax's shift invariance with a frozen bias)
    # make it fail, and those matrices get Q diag(sqrt(max(lambda, 0))) instead.
    """
    factor, info = torch.linalg.cholesky_ex(cov)
    failed = info != 0
    if not bool(failed.any()):
        return factor
    values, vectors = torch.linalg.eigh(cov[failed])
    factor = factor.clone()
    factor[failed] = vectors * values.clamp_min(0).sqrt()[..., None, :]
    return factor


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
        f_var: ``[N, C, C]`` or the variances ``[N, C]``.
        link_approx: ``PROBIT``, ``BRIDGE``, ``BRIDGE_NORM`` or ``MC``.
        n_samples: Draws for ``MC``.
        generator: Randomness for ``MC``.

    Returns:
        ``[N, C]`` probabilities.

    Raises:
        ValueError: For a bridge with ``likelihood="binary"``.
    """
    link = link_function(likelihood)
    if link_approx is LinkApprox.PROBIT:
        return link(probit_scale(f_var) * f_mu)
    if link_approx is LinkApprox.MC:
        return link(sample_outputs(f_mu, f_var, n_samples, generator)).mean(0)
    if likelihood is Likelihood.BINARY:
        valid = ", ".join(repr(m.value) for m in BINARY_LINKS)
        raise ValueError(
            f"link_approx='{link_approx.value}' needs likelihood='classification' "
            f"(a Dirichlet over classes); for 'binary' use one of {valid}."
        )
    return laplace_bridge(f_mu, f_var, normalized=link_approx is LinkApprox.BRIDGE_NORM)


def add_observation_noise(f_var: Tensor, sigma_noise: Tensor, joint: bool) -> Tensor:
    r"""The predictive covariance of regression targets, with observation noise.

    Args:
        f_var: ``[N, K, K]``, the variances ``[N, K]``, or (``joint``) ``[NK, NK]``.
        sigma_noise: 0-d or ``[K]``.
        joint: Whether ``f_var`` is the joint covariance over the flattened outputs.

    Returns:
        ``f_var`` with :math:`\sigma_k^2` added to the variance of every output ``k``.
    """
    noise = sigma_noise.square().to(f_var)
    if joint:
        outputs = 1 if noise.ndim == 0 else noise.numel()
        noise = noise.expand(outputs).repeat(f_var.shape[-1] // outputs)
        return f_var + torch.diag_embed(noise)
    if f_var.ndim == 2:
        return f_var + noise
    return f_var + torch.diag_embed(noise.expand(f_var.shape[-1]))


def _softmax(logits: Tensor) -> Tensor:
    return logits.softmax(-1)


def _identity(outputs: Tensor) -> Tensor:
    return outputs
