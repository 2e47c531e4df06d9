"""Tuning the prior precision on a validation loss of the predictive (grid search).

Every grid value is scored by the mean validation loss of the predictive with that
prior. The GLM predictive reuses the validation Jacobians (computed once, factored
and chunked); the ``"nn"`` predictive samples networks anew for every grid value. A
value whose posterior precision is not positive definite scores infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayescurv.curvature import NotPositiveDefiniteError
from bayescurv.laplace.enums import Likelihood, LinkApprox, PredType
from bayescurv.laplace.predict import Context, predict
from bayescurv.laplace.predict.links import glm_link, variances
from bayescurv.laplace.predict.variance import functional_variance
from bayescurv.laplace.sources.jacobians import SegmentedJacobian

Loss = Callable[[Any, Tensor], Tensor | float]
"""``loss(prediction, targets)``: mean validation loss of one batch, or a
``torchmetrics``-style metric object with ``update``, ``compute`` and ``reset``."""


def default_loss(likelihood: Likelihood, sigma_noise: Tensor) -> Loss:
    """Mean negative log likelihood of the predictive on a validation batch."""
    if likelihood is Likelihood.CLASSIFICATION:
        return lambda probs, y: (
            -probs.gather(1, y[:, None]).clamp_min(1e-12).log().mean()
        )
    if likelihood is Likelihood.BINARY:
        return lambda probs, y: torch.nn.functional.binary_cross_entropy(
            probs.clamp(1e-12, 1 - 1e-12), y.reshape(probs.shape)
        )

    def gaussian_nll(pred: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        f_mu, f_var = pred
        variance = variances(f_var) + sigma_noise.square()
        error = (y.reshape(f_mu.shape) - f_mu).square()
        return 0.5 * (variance.log() + error / variance).sum(1).mean()

    return gaussian_nll


def gridsearch(
    make_context: Callable[[Tensor], Context],
    candidates: Sequence[Tensor],
    batches: Iterable[tuple[Any, Tensor]],
    loss: Loss,
    pred_type: PredType,
    link_approx: LinkApprox,
    n_samples: int,
    progress_bar: bool = False,
) -> Tensor:
    """The candidate prior precision with the smallest mean validation loss.

    Args:
        make_context: The fitted posterior's predictive context for a prior.
        candidates: Prior precisions to try (validated).
        batches: Validation ``(inputs, targets)`` on the device.
        loss: See :data:`Loss`.
        pred_type: ``"glm"`` or ``"nn"``.
        link_approx: Link approximation of the classification predictive.
        n_samples: Draws for ``"mc"`` and ``"nn"``.
        progress_bar: Show a tqdm bar.

    Raises:
        ValueError: If ``batches`` is empty.
    """
    context = make_context(candidates[0])
    cached = [_prepare(context, pred_type, x, y) for x, y in batches]
    if not cached:
        raise ValueError("gridsearch: val_loader yielded no batches.")
    scores = []
    for prior in tqdm(candidates, disable=not progress_bar, desc="gridsearch"):
        try:
            context = make_context(prior)
            scores.append(
                _score(context, cached, loss, pred_type, link_approx, n_samples)
            )
        except NotPositiveDefiniteError:
            scores.append(math.inf)
    return candidates[min(range(len(scores)), key=scores.__getitem__)]


def _prepare(ctx: Context, pred_type: PredType, inputs: Any, targets: Tensor) -> tuple:
    """``(inputs, None, targets)`` for ``"nn"``, ``(f_mu, jacobians, targets)`` else."""
    if pred_type is PredType.NN:
        return inputs, None, targets
    with torch.set_grad_enabled(ctx.source.needs_grad):
        chunks = list(ctx.source.jacobian_segments(inputs))
    f_mu = torch.cat([mu for mu, _ in chunks]).detach()
    jacobians: list[SegmentedJacobian] = [j for _, j in chunks]
    return f_mu, jacobians, targets


def _score(
    ctx: Context,
    cached: list[tuple],
    loss: Loss,
    pred_type: PredType,
    link_approx: LinkApprox,
    n_samples: int,
) -> float:
    """Mean validation loss of the predictive of ``ctx``."""
    metric = hasattr(loss, "update") and hasattr(loss, "compute")
    if metric:
        loss.reset()
    total, count = 0.0, 0
    for first, jacobians, targets in cached:
        if jacobians is None:  # first holds the inputs
            prediction = predict(
                ctx, first, PredType.NN, link_approx=link_approx, n_samples=n_samples
            )
        else:
            f_var = torch.cat(
                [
                    functional_variance(ctx.precision, j, dtype=ctx.precision.dtype)
                    for j in jacobians
                ]
            )
            f_var = f_var.to(first.dtype)
            prediction = (first, f_var)
            if ctx.likelihood is not Likelihood.REGRESSION:
                prediction = glm_link(
                    ctx.likelihood, first, f_var, link_approx, n_samples
                )
        if metric:
            loss.update(prediction, targets)
            continue
        total += float(loss(prediction, targets)) * len(targets)
        count += len(targets)
    return float(loss.compute()) if metric else total / count
