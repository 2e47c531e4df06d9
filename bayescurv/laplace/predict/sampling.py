r"""The sampling (``pred_type="nn"``) predictive: networks drawn from the posterior.

For weights :math:`\theta_s \sim \mathcal{N}(\theta_*, \Lambda^{-1})`,
:math:`s = 1, \dots, S` (:meth:`~bayescurv.laplace.posterior.BaseLaplace.sample`),
the predictive averages the link over the sampled networks' outputs
:math:`f(x; \theta_s)`. Only the subset's weights are sampled; the others keep the
model's values. Unlike the GLM predictive this evaluates the network itself, not its
linearization; for a model linear in its parameters both coincide in expectation.

# NOTE [The model is never modified]
# laplace-torch writes each sample into the parameters and the MAP back afterwards,
# which an exception in between skips. Here every sampled network is evaluated with
# torch.func.functional_call, which swaps the parameters for that call only (and
# restores them even on error), so the model's weights are never written. The last
# layer needs no network call per sample at all: with the features phi of one
# forward pass, f_s = W_s phi + b_s for all samples in one product.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from bayescurv.laplace.data import model_errors
from bayescurv.laplace.sources.base import CurvatureSource
from bayescurv.laplace.sources.last_layer import LastLayerSource


def network_outputs(
    source: CurvatureSource,
    weights: Tensor,
    inputs: Any,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """The outputs of the networks with sampled subset weights.

    Args:
        source: The subset's curvature source.
        weights: Sampled subset vectors ``[S, P]``.
        inputs: A batch of inputs (tensor, tuple or dict).
        model_kwargs: Keyword arguments of the model call.

    Returns:
        ``[S, N, C]``, the outputs flattened per sample.
    """
    if isinstance(source, LastLayerSource) and not model_kwargs:
        return _last_layer_outputs(source, weights, inputs)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    outputs = []
    for theta in weights:
        params = source.parameter_tensors(theta)
        with model_errors(inputs):
            output = functional_call(source.model, params, args, model_kwargs or {})
        outputs.append(output.reshape(output.shape[0], -1))
    return torch.stack(outputs)


def _last_layer_outputs(
    source: LastLayerSource, weights: Tensor, inputs: Any
) -> Tensor:
    r""":math:`f_s = W_s \phi + b_s` for all samples, ``[S, N, C]``."""
    _, f, phi = source.features(inputs)
    classes, width = f.shape[1], phi.shape[1]
    matrices = weights[:, : classes * width].reshape(-1, classes, width)
    outputs = torch.einsum("nd,scd->snc", phi, matrices)
    if source.has_bias:
        outputs = outputs + weights[:, classes * width :, None].mT
    elif source.layer.bias is not None:  # a frozen bias stays at its value
        outputs = outputs + source.layer.bias
    return outputs
