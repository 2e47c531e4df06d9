"""Saving and restoring a function-space posterior (plain tensors and strings).

The saved dict is flat (no nested dict as a value: laplace-torch's checkpoints are
not) and holds the configuration, what identifies the weights, the anchor
points' inputs and targets, the GP posterior's projections and spectra, the counts
and the hyperparameters. Loading recomputes the anchors' Jacobians on the given
model (one pass over the ``M`` anchor points), never the kernel matrix or its
decomposition. Every tensor is a copy; it loads with ``torch.load(...,
weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.function_space.anchors import AnchorRows
from bayescurv.laplace.function_space.components import component_from_state
from bayescurv.laplace.function_space.options import FunctionalApproximation
from bayescurv.laplace.function_space.spectral import SpectralGP
from bayescurv.laplace.function_space.state import FunctionSpaceState
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.serialization import copy_tree, warn_if_moved
from bayescurv.laplace.sources import CurvatureSource
from bayescurv.laplace.state import Hyperparameters

VERSION = 2
KIND = "function_space"
SOURCE = "source."
"""Prefix of the keys identifying the weights (flat: no nested dict at the top)."""

SourceLoader = Callable[[LikelihoodModel, dict[str, Any]], CurvatureSource]


def state_dict(
    config: dict[str, str],
    state: FunctionSpaceState,
    hyper: Hyperparameters,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The saved form of a fitted function-space posterior (module doc)."""
    gp = state.posterior
    return copy_tree(
        {
            "kind": KIND,
            "version": VERSION,
            **config,
            **options,
            **{SOURCE + key: value for key, value in state.source.state().items()},
            "anchor_inputs": state.anchor_inputs,
            "anchor_targets": state.anchor_targets,
            "components": [c.state() for c in gp.components],
            "variances": gp.variances,
            "trace_gap": gp.trace_gap,
            "rank_dropped": gp.rank_dropped,
            "prior_fit": state.prior_fit,
            "mean": state.mean,
            "loss": state.loss,
            "n_data": state.n_data,
            "n_outputs": state.n_outputs,
            "output_shape": list(state.output_shape),
            "noise_weights": state.likelihood.noise_weights,
            "sigma_fit": state.sigma_fit,
            "prior_precision": hyper.prior_precision,
            "prior_mean": hyper.prior_mean,
            "sigma_noise": hyper.sigma_noise,
            "temperature": hyper.temperature,
        }
    )


def load_state_dict(
    saved: dict[str, Any],
    config: dict[str, str],
    options: dict[str, Any],
    load_source: SourceLoader,
    memory_budget: int,
) -> tuple[FunctionSpaceState, Hyperparameters]:
    """The fitted state and hyperparameters of a saved posterior, on this model.

    Raises:
        ValueError: If the dict is not a saved function-space posterior, or was
            saved with another configuration, other weights or another model.
    """
    if (
        not isinstance(saved, dict)
        or saved.get("kind") != KIND
        or (saved.get("version") != VERSION)
    ):
        raise ValueError(
            "not a state of a function-space Laplace posterior of this bayescurv "
            f"version (expected a dict from state_dict() with version={VERSION})."
        )
    for key, here in {**config, **options}.items():
        if saved.get(key) != here:
            raise ValueError(
                f"the state was saved with {key}={saved.get(key)!r}, this "
                f"approximation has {key}={here!r}."
            )
    saved = copy_tree(saved)
    likelihood = LikelihoodModel(
        Likelihood(saved["likelihood"]), saved["noise_weights"]
    )
    identity = {
        key.removeprefix(SOURCE): value
        for key, value in saved.items()
        if key.startswith(SOURCE)
    }
    source = load_source(likelihood, identity)
    source.check_state(identity)
    mean = saved["mean"]
    if mean.shape != (source.num_params,):
        raise ValueError(
            f"the saved posterior has {mean.shape[0]} weights, the subset of this "
            f"model {source.num_params}."
        )
    warn_if_moved(source, mean)
    anchors = AnchorRows(
        source, saved["anchor_inputs"], source.block_sizes, memory_budget
    )
    components = [component_from_state(c) for c in saved["components"]]
    posterior = SpectralGP(
        anchors,
        components,
        saved["variances"],
        saved["independent_outputs"],
        saved["trace_gap"],
        saved["rank_dropped"],
    )
    state = FunctionSpaceState(
        source=source,
        posterior=posterior,
        approximation=FunctionalApproximation(saved["functional_approximation"]),
        prior_fit=saved["prior_fit"],
        mean=mean,
        loss=saved["loss"],
        n_data=saved["n_data"],
        n_outputs=saved["n_outputs"],
        output_shape=tuple(saved["output_shape"]),
        likelihood=likelihood,
        sigma_fit=saved["sigma_fit"],
        anchor_targets=saved["anchor_targets"],
        n_subset=anchors.num_points,
    )
    hyper = Hyperparameters(
        prior_precision=saved["prior_precision"],
        prior_mean=saved["prior_mean"],
        sigma_noise=saved["sigma_noise"],
        temperature=saved["temperature"],
    )
    return state, hyper
