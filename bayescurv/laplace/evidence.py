r"""Tuning the prior precision (and the regression noise) after ``fit``.

``marglik`` maximizes the Laplace evidence
:meth:`~bayescurv.laplace.posterior.BaseLaplace.log_marginal_likelihood` with Adam
on :math:`\log\pi` (and :math:`\log\sigma` with ``tune_sigma_noise=True``). The
structure is decomposed once; every step then costs :math:`O(P)` (eigenvalues of
``kron`` and of ``full`` with a scalar prior, ``diag`` always; a ``[k, k]`` Cholesky
per step for ``lowrank``; a Cholesky per step for ``full`` with a layerwise or
diagonal prior). With a scalar prior and a structure that knows the spectrum of its
data term (:meth:`~bayescurv.curvature.CurvatureMatrix.data_eigenvalues`: ``diag``,
``kron``, ``full``, ``lowrank`` without a diagonal remainder) each step evaluates
:class:`SpectralEvidence` directly, building no posterior object. ``gridsearch``
picks the prior on a log grid that minimizes a validation loss of the GLM
predictive; the validation Jacobians are computed once.

# NOTE [Tuning a per-output noise]
# A per-output sigma_noise is baked into the curvature at fit() (its ratios weight
# the outputs), so joint tuning optimizes one common factor c in sigma = c * sigma_fit;
# a scalar sigma_noise is tuned freely.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import trange

from bayescurv.laplace import hyper
from bayescurv.laplace.enums import (
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    TuningMethod,
    parse,
)
from bayescurv.laplace.jacobian import SegmentedJacobian
from bayescurv.laplace.predictive import glm_link, variances
from bayescurv.laplace.spectral_evidence import SpectralEvidence
from bayescurv.laplace.variance_forms import functional_variance

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import BaseLaplace

Loss = Callable[[Any, Tensor], Tensor | float]
"""``loss(prediction, targets)``: mean validation loss of one batch."""


def log_prior_det(la: BaseLaplace, prior: Tensor) -> Tensor:
    r""":math:`\sum_i \log \pi_i` over all ``P`` parameters."""
    sizes = la._H.block_sizes
    if prior.ndim == 0:
        return sum(sizes) * prior.log()
    if prior.shape == (len(sizes),):
        counts = torch.tensor(sizes, dtype=prior.dtype, device=prior.device)
        return (counts * prior.log()).sum()
    return prior.log().sum()


def scatter(la: BaseLaplace, prior: Tensor) -> Tensor:
    r""":math:`(\theta_* - \mu_0)^\top \operatorname{diag}(\pi)(\theta_* - \mu_0)`."""
    delta = (la.mean - la.prior_mean).square()
    if prior.ndim == 1 and prior.shape[0] != delta.shape[0]:  # per block
        sizes = torch.tensor(la._H.block_sizes, device=prior.device)
        prior = torch.repeat_interleave(prior, sizes)
    return (delta * prior).sum()


def log_marginal_likelihood(
    la: BaseLaplace, prior_precision: Any, sigma_noise: Any
) -> Tensor:
    """See :meth:`BaseLaplace.log_marginal_likelihood`."""
    la._check_fitted("log_marginal_likelihood")
    prior, sigma = la.prior_precision, la.sigma_noise
    if prior_precision is not None:
        prior = hyper.prior_precision(
            prior_precision, la._like, list(la._H.block_sizes)
        )
        la.prior_precision = prior
    if sigma_noise is not None:
        sigma = hyper.sigma_noise(sigma_noise, la._like, la.n_outputs)
        la.sigma_noise = sigma
    return evidence_of(la, prior, sigma)


def evidence_of(la: BaseLaplace, prior: Tensor, sigma: Tensor) -> Tensor:
    """The evidence at already validated hyperparameters (no state changes)."""
    precision = la._precision(prior, sigma)
    log_det_ratio = precision.logdet() - log_prior_det(la, prior)
    log_lik = la._lik.log_likelihood(
        la.loss, la.n_data, la.n_outputs, sigma, la.temperature
    )
    return log_lik - 0.5 * (log_det_ratio + scatter(la, prior))


def initial_prior(
    la: BaseLaplace, init_prior_prec: float | Tensor, structure: PriorStructure
) -> Tensor:
    """The starting prior precision in the requested structure.

    A scalar ``init_prior_prec`` is broadcast to the structure; a tensor keeps its
    own (``[B]`` or ``[P]``).
    """
    value = torch.as_tensor(init_prior_prec, dtype=la.mean.dtype, device=la.mean.device)
    if value.numel() == 1:
        value = value.reshape(())
        shapes = {
            PriorStructure.SCALAR: (),
            PriorStructure.LAYERWISE: (len(la._H.block_sizes),),
            PriorStructure.DIAG: (la.num_params,),
        }
        value = value.expand(shapes[structure]).clone()
    la.prior_precision = value  # validates the shape and sign
    return la.prior_precision


class Adam:
    """Adam (Kingma & Ba, 2015) on a few hyperparameter tensors.

    The update of ``torch.optim.Adam`` (default betas and eps); hand-written because
    the first ``torch.optim`` step imports ``torch._dynamo`` (seconds), which would
    dominate a 100-step evidence tuning.

    Args:
        params: Leaf tensors to optimize in place.
        lr: Learning rate.
    """

    def __init__(
        self, params: list[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)
    ) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, 1e-8
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        """One update with the gradients of the objective to minimize."""
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1**self.steps
        correction2 = 1 - beta2**self.steps
        for p, g, (first, second) in zip(self.params, grads, self.moments, strict=True):
            first.mul_(beta1).add_(g, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (second.sqrt() / correction2**0.5).add_(self.eps)
            p.addcdiv_(first, denom, value=-self.lr / correction1)


def optimize_marglik(
    la: BaseLaplace,
    init: Tensor,
    n_steps: int,
    lr: float,
    tune_sigma_noise: bool,
    progress_bar: bool,
) -> list[float]:
    """Adam on the negative evidence; returns its value per step."""
    log_prior = init.log().clone().requires_grad_(True)
    params = [log_prior]
    sigma_base = la.sigma_noise
    log_factor = torch.zeros((), dtype=init.dtype, device=init.device)
    if tune_sigma_noise:
        if la.likelihood is not Likelihood.REGRESSION:
            raise ValueError(
                "tune_sigma_noise=True needs likelihood='regression', not "
                f"'{la.likelihood.value}'."
            )
        log_factor.requires_grad_(True)
        params.append(log_factor)
    optimizer = Adam(params, lr)
    evidence = SpectralEvidence.of(la) if init.ndim == 0 else None
    history = []
    if evidence is not None and not tune_sigma_noise:
        objective = evidence.prior_objective(sigma_base)
        with torch.no_grad():
            for _ in trange(n_steps, disable=not progress_bar, desc="marglik"):
                neg, grad = objective(log_prior)
                optimizer.step([grad])
                history.append(neg.item())
        la.prior_precision = log_prior.detach().exp()
        return history
    if evidence is None:
        evidence = functools.partial(evidence_of, la)
    for _ in trange(n_steps, disable=not progress_bar, desc="marglik"):
        sigma = sigma_base * log_factor.exp() if tune_sigma_noise else sigma_base
        # exp() keeps the hyperparameters valid: no re-validation per step
        neg = -evidence(log_prior.exp(), sigma)
        optimizer.step(list(torch.autograd.grad(neg, params)))
        history.append(neg.item())
    la.prior_precision = log_prior.detach().exp()
    if tune_sigma_noise:
        la.sigma_noise = sigma_base * log_factor.detach().exp()
    return history


def default_loss(la: BaseLaplace) -> Loss:
    """Mean negative log likelihood of the predictive on a validation batch."""
    if la.likelihood is Likelihood.CLASSIFICATION:
        return lambda probs, y: (
            -probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean()
        )
    if la.likelihood is Likelihood.BINARY:
        return lambda probs, y: torch.nn.functional.binary_cross_entropy(
            probs.clamp(1e-12, 1 - 1e-12), y.reshape(probs.shape)
        )

    def gaussian_nll(pred: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        f_mu, f_var = pred
        variance = variances(f_var) + la.sigma_noise.square()
        error = (y.reshape(f_mu.shape) - f_mu).square()
        return 0.5 * (variance.log() + error / variance).sum(1).mean()

    return gaussian_nll


def gridsearch(
    la: BaseLaplace,
    val_loader: Iterable,
    grid: Tensor,
    structure: PriorStructure,
    loss: Loss,
    link_approx: LinkApprox,
    n_samples: int,
    progress_bar: bool,
    pred_type: PredType = PredType.GLM,
) -> Tensor:
    """The grid value (in ``structure``) with the smallest mean validation loss.

    The GLM predictive reuses the validation Jacobians of the first grid point; the
    ``"nn"`` predictive samples networks anew for every grid point.
    """
    cached = []
    for inputs, targets in la._reader.batches(val_loader):
        if pred_type is PredType.NN:
            cached.append((inputs, None, targets))
            continue
        f_mu, jacobians = _jacobians(la, inputs)
        cached.append((f_mu, jacobians, targets))
    if not cached:
        raise ValueError("gridsearch: val_loader yielded no batches.")
    best, best_loss = None, float("inf")
    for value in grid if not progress_bar else _bar(grid):
        prior = initial_prior(la, float(value), structure)
        total, count = 0.0, 0
        for f_mu, jacobians, targets in cached:
            if jacobians is None:  # f_mu holds the inputs
                prediction: Any = la(
                    f_mu, PredType.NN, link_approx=link_approx, n_samples=n_samples
                )
                total += float(loss(prediction, targets)) * len(targets)
                count += len(targets)
                continue
            precision = la.posterior_precision
            f_var = torch.cat([functional_variance(precision, j) for j in jacobians])
            if la.likelihood is Likelihood.REGRESSION:
                prediction = (f_mu, f_var)
            else:
                prediction = glm_link(
                    la.likelihood, f_mu, f_var, link_approx, n_samples
                )
            total += float(loss(prediction, targets)) * len(targets)
            count += len(targets)
        if total / count < best_loss:
            best, best_loss = prior, total / count
    return best


def _jacobians(la: BaseLaplace, inputs: Any) -> tuple[Tensor, list[SegmentedJacobian]]:
    """Outputs and the (factored, chunked) Jacobians of a validation batch."""
    with torch.set_grad_enabled(la.source.needs_grad):
        chunks = list(la.source.jacobian_segments(inputs))
    return torch.cat([f_mu for f_mu, _ in chunks]).detach(), [j for _, j in chunks]


def _bar(grid: Tensor) -> Iterable:
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(grid, desc="gridsearch")


def optimize_prior_precision(
    la: BaseLaplace,
    pred_type: PredType | str = PredType.GLM,
    method: TuningMethod | str = TuningMethod.MARGLIK,
    n_steps: int = 100,
    lr: float = 1e-1,
    init_prior_prec: float | Tensor = 1.0,
    prior_structure: PriorStructure | str = PriorStructure.SCALAR,
    val_loader: Iterable | None = None,
    loss: Loss | None = None,
    log_prior_prec_min: float = -4,
    log_prior_prec_max: float = 4,
    grid_size: int = 100,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    verbose: bool = False,
    progress_bar: bool = False,
    log_prior_prec_base: float = 10.0,
    tune_sigma_noise: bool = False,
) -> list[float] | None:
    """See :meth:`BaseLaplace.optimize_prior_precision`."""
    la._check_fitted("optimize_prior_precision")
    method = parse(TuningMethod, method, "method")
    structure = parse(PriorStructure, prior_structure, "prior_structure")
    pred_type = parse(PredType, pred_type, "pred_type")
    link_approx = parse(LinkApprox, link_approx, "link_approx")
    history = None
    if method is TuningMethod.MARGLIK:
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}.")
        init = initial_prior(la, init_prior_prec, structure)
        history = optimize_marglik(
            la, init, n_steps, lr, tune_sigma_noise, progress_bar
        )
    else:
        if val_loader is None:
            raise ValueError("method='gridsearch' needs a val_loader.")
        if tune_sigma_noise:
            raise ValueError("tune_sigma_noise=True needs method='marglik'.")
        grid = torch.logspace(
            log_prior_prec_min, log_prior_prec_max, grid_size, base=log_prior_prec_base
        )
        la.prior_precision = gridsearch(
            la,
            val_loader,
            grid,
            structure,
            loss or default_loss(la),
            link_approx,
            n_samples,
            progress_bar,
            pred_type,
        )
    if verbose:
        print(f"Optimized prior precision: {la.prior_precision}.")
    return history
