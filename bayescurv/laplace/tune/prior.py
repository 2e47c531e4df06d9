r"""Tuning the prior precision (and the regression noise) on the evidence.

``marglik`` maximizes the Laplace evidence (:mod:`.evidence`) with Adam on
:math:`\log\pi` (and :math:`\log\sigma` with ``tune_sigma_noise=True``). The
structure is decomposed once; every step then costs :math:`O(P)` (eigenvalues of
``kron`` and of ``full`` with a scalar prior, ``diag`` always; a ``[k, k]`` Cholesky
per step for ``lowrank``; a Cholesky per step for ``full`` with a diagonal prior,
or a layerwise one whose smaller blocks hold more than a quarter of the weights).
With a scalar prior and a structure that knows the spectrum of its data term, or a
layerwise prior and a structure decomposed block by block (``kron``, ``diag``), each
step evaluates :class:`~.spectral.SpectralEvidence` directly, building no posterior
object; ``full`` with a layerwise prior and one dominant block (a last layer's
weight beside its bias) takes one ``eigh`` and then :math:`O(r^2 P)` per step
(:class:`~.spectral.DominantBlockEvidence`).

# NOTE [Tuning a per-output noise]
# A per-output sigma_noise is baked into the curvature at fit() (its ratios weight
# the outputs), so joint tuning optimizes one common factor c in sigma = c * sigma_fit;
# a scalar sigma_noise is tuned freely.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from tqdm.auto import trange

from bayescurv.laplace.enums import PriorStructure
from bayescurv.laplace.state import FittedState, Hyperparameters
from bayescurv.laplace.tune.evidence import log_marginal_likelihood
from bayescurv.laplace.tune.spectral import DominantBlockEvidence, SpectralEvidence

EIGH_STEPS = 3
"""Steps from which a ``full`` posterior's layerwise tuning takes one ``eigh``
instead of a Cholesky per step (NOTE [A dominant block under a per-block prior]:
the ``eigh`` of a ResNet-18's last layer cost 2.4 steps)."""


def initial_prior(
    init_prior_prec: float | Tensor,
    structure: PriorStructure,
    block_sizes: list[int],
    like: Tensor,
) -> Tensor:
    """The starting prior precision in the requested structure (not validated).

    A single value is broadcast to the structure; a tensor with more entries keeps
    its own (``[B]`` or ``[P]``).
    """
    value = torch.as_tensor(init_prior_prec).to(dtype=like.dtype, device=like.device)
    if value.numel() != 1:
        return value
    shapes = {
        PriorStructure.SCALAR: (),
        PriorStructure.LAYERWISE: (len(block_sizes),),
        PriorStructure.DIAG: (sum(block_sizes),),
    }
    return value.reshape(()).expand(shapes[structure]).clone()


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
    state: FittedState,
    hyper: Hyperparameters,
    n_steps: int,
    lr: float,
    tune_sigma_noise: bool,
    progress_bar: bool = False,
) -> tuple[Hyperparameters, list[float]]:
    """Adam on the negative evidence, starting at ``hyper``.

    Args:
        state: The fitted state.
        hyper: The start (its prior precision fixes the prior structure).
        n_steps: Adam steps.
        lr: Adam learning rate on the log hyperparameters.
        tune_sigma_noise: Tune the noise too (regression; see the module NOTE).
        progress_bar: Show a tqdm bar.

    Returns:
        The tuned hyperparameters and the negative evidence per step.
    """
    log_prior = hyper.prior_precision.detach().log().clone().requires_grad_(True)
    sigma_base = hyper.sigma_noise.detach()
    log_factor = torch.zeros_like(log_prior.reshape(-1)[0])
    params = [log_prior] + (
        [log_factor.requires_grad_(True)] if tune_sigma_noise else []
    )
    optimizer = Adam(params, lr)
    steps = trange(n_steps, disable=not progress_bar, desc="marglik")
    spectral = None
    if log_prior.ndim == 0 or len(log_prior) == state.curvature.num_blocks:
        per_block = log_prior.ndim == 1
        spectral = SpectralEvidence.of(
            state, hyper.prior_mean, hyper.temperature, per_block
        )
        if spectral is None and per_block and n_steps >= EIGH_STEPS:
            spectral = DominantBlockEvidence.of(
                state, hyper.prior_mean, hyper.temperature
            )
    history: list[float] = []
    if spectral is not None and log_prior.ndim == 0 and not tune_sigma_noise:
        objective = spectral.prior_objective(sigma_base)
        with torch.no_grad():
            for _ in steps:
                neg, grad = objective(log_prior)
                optimizer.step([grad])
                history.append(neg.item())
        return hyper.with_(prior_precision=log_prior.detach().exp()), history
    if spectral is not None:
        evidence = spectral
    else:
        evidence = functools.partial(_evidence, state, hyper)
    for _ in steps:
        sigma = sigma_base * log_factor.exp() if tune_sigma_noise else sigma_base
        # exp() keeps the hyperparameters valid: no re-validation per step
        neg = -evidence(log_prior.exp(), sigma)
        optimizer.step(list(torch.autograd.grad(neg, params)))
        history.append(neg.item())
    tuned = hyper.with_(prior_precision=log_prior.detach().exp())
    if tune_sigma_noise:
        tuned = tuned.with_(sigma_noise=sigma_base * log_factor.detach().exp())
    return tuned, history


def _evidence(
    state: FittedState, hyper: Hyperparameters, prior: Tensor, sigma: Tensor
) -> Tensor:
    return log_marginal_likelihood(
        state, hyper.with_(prior_precision=prior, sigma_noise=sigma)
    )
