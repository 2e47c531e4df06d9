"""Saving and restoring a fitted Laplace approximation (plain tensors and strings).

The state holds the configuration (class, likelihood, structure), the subset (names,
indices, last layer), the hyperparameters, the MAP, the loss and the curvature object
with its computed decompositions, so a restored posterior neither refits nor
decomposes again. It loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bayescurv.curvature import structure_from_state_dict
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.structures import make_builder

if TYPE_CHECKING:
    from bayescurv.laplace.posterior import BaseLaplace

VERSION = 1


def state_dict(la: BaseLaplace) -> dict[str, Any]:
    """The state of a fitted posterior; see the module doc."""
    la._check_fitted("state_dict")
    return {
        "version": VERSION,
        "cls_name": type(la).__name__,
        "likelihood": la.likelihood.value,
        "hessian_structure": la.hessian_structure.value,
        "source": la.source.state(),
        "mean": la.mean,
        "loss": la.loss,
        "n_data": la.n_data,
        "n_outputs": la.n_outputs,
        "prior_precision": la.prior_precision,
        "prior_mean": la.prior_mean,
        "sigma_noise": la.sigma_noise,
        "sigma_fit": la._sigma_fit,
        "noise_weights": la._lik.noise_weights,
        "temperature": la.temperature,
        "builder": la._builder.state_dict(),
        "curvature": la._H.state_dict(),
    }


def load_state_dict(la: BaseLaplace, state: dict[str, Any]) -> None:
    """Restore a state saved by :func:`state_dict` into a matching posterior.

    Raises:
        ValueError: If the state belongs to another class, likelihood, structure or
            weight subset.
    """
    for key, here in (
        ("cls_name", type(la).__name__),
        ("likelihood", la.likelihood.value),
        ("hessian_structure", la.hessian_structure.value),
    ):
        if state.get(key) != here:
            raise ValueError(
                f"the state was saved with {key}={state.get(key)!r}, this "
                f"approximation has {key}={here!r}."
            )
    la.source.load_state(state["source"])
    la._lik = LikelihoodModel(la.likelihood, state["noise_weights"])
    la.source.likelihood = la._lik
    builder = make_builder(la.hessian_structure, la.source, la.rank)
    builder.load_state_dict(state["builder"])
    la._builder = builder
    la._H = structure_from_state_dict(state["curvature"])
    la.mean, la.loss = state["mean"], state["loss"]
    la.n_data, la.n_outputs = state["n_data"], state["n_outputs"]
    la.temperature = state["temperature"]
    la._sigma_fit = None
    la.sigma_noise = state["sigma_noise"]
    la._sigma_fit = state["sigma_fit"]
    la.prior_precision = state["prior_precision"]
    la.prior_mean = state["prior_mean"]
    la._posterior = None
