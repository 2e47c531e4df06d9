"""Saving and restoring a fitted posterior (plain tensors and strings).

The saved dict holds the configuration (weight subset, likelihood, structure), what
identifies the weights (parameter names and shapes, subnetwork indices, last layer),
the fitted state (curvature with its computed decompositions, MAP, loss, counts,
likelihood noise) and the hyperparameters, so a restored posterior neither refits nor
decomposes again. Every tensor is a copy: a later ``fit(override=False)`` of the
posterior it came from cannot change it. It loads with
``torch.load(..., weights_only=True)``.

The dict is flat, as laplace-torch's: nested parts are stored under ``/``-joined
keys (``"curvature/eigenvalues"``; a ``/`` or ``%`` inside a name is escaped as
``%2F`` / ``%25``), so every value is a tensor, a number, a string, a list or ``None``.
Nested dicts (as saved before) load too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import structure_from_state_dict
from bayescurv.laplace.enums import Likelihood
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources import CurvatureSource
from bayescurv.laplace.state import FittedState, Hyperparameters

VERSION = 2

SourceLoader = Callable[[LikelihoodModel, dict[str, Any]], CurvatureSource]
"""``load_source(likelihood, saved_source)``: the subset's source on this model."""


def state_dict(
    config: dict[str, str], state: FittedState, hyper: Hyperparameters
) -> dict[str, Any]:
    """The saved form of a fitted posterior; see the module doc.

    Args:
        config: ``subset``, ``likelihood`` and ``hessian_structure`` values.
        state: The fitted state.
        hyper: The hyperparameters.
    """
    sums = None if state.sums is None else copy_tree(state.sums)
    return flatten(
        {
            "version": VERSION,
            **config,
            "source": copy_tree(state.source.state()),
            "curvature": copy_tree(state.curvature.state_dict()),
            "sums": sums,
            "mean": state.mean.clone(),
            "loss": state.loss.clone(),
            "n_data": state.n_data,
            "n_outputs": state.n_outputs,
            "output_shape": list(state.output_shape),
            "noise_weights": copy_tree(state.likelihood.noise_weights),
            "sigma_fit": state.sigma_fit.clone(),
            "prior_precision": hyper.prior_precision.clone(),
            "prior_mean": hyper.prior_mean.clone(),
            "sigma_noise": hyper.sigma_noise.clone(),
            "temperature": hyper.temperature,
        }
    )


def load_state_dict(
    saved: dict[str, Any], config: dict[str, str], load_source: SourceLoader
) -> tuple[FittedState, Hyperparameters]:
    """The fitted state and hyperparameters of a saved posterior, on this model.

    Raises:
        ValueError: If the dict is not a saved posterior, or was saved with another
            configuration, other weights or another model (names and shapes).
    """
    if isinstance(saved, dict):
        saved = unflatten(saved)
    if not isinstance(saved, dict) or saved.get("version") != VERSION:
        raise ValueError(
            "not a state of this bayescurv version's Laplace posterior (expected a "
            f"dict from state_dict() with version={VERSION})."
        )
    for key, here in config.items():
        if saved.get(key) != here:
            raise ValueError(
                f"the state was saved with {key}={saved.get(key)!r}, this "
                f"approximation has {key}={here!r}."
            )
    likelihood = LikelihoodModel(
        Likelihood(saved["likelihood"]), saved["noise_weights"]
    )
    source = load_source(likelihood, saved["source"])
    source.check_state(saved["source"])
    curvature = structure_from_state_dict(copy_tree(saved["curvature"]))
    mean = saved["mean"].clone()
    if curvature.num_params != source.num_params or mean.shape != (source.num_params,):
        raise ValueError(
            f"the saved posterior has {curvature.num_params} weights, the subset of "
            f"this model {source.num_params}."
        )
    warn_if_moved(source, mean)
    state = FittedState(
        source=source,
        curvature=curvature,
        sums=None if saved["sums"] is None else copy_tree(saved["sums"]),
        mean=mean,
        loss=saved["loss"].clone(),
        n_data=saved["n_data"],
        n_outputs=saved["n_outputs"],
        output_shape=tuple(saved["output_shape"]),
        likelihood=likelihood,
        sigma_fit=saved["sigma_fit"].clone(),
    )
    hyper = Hyperparameters(
        prior_precision=saved["prior_precision"].clone(),
        prior_mean=saved["prior_mean"].clone(),
        sigma_noise=saved["sigma_noise"].clone(),
        temperature=saved["temperature"],
    )
    return state, hyper


def warn_if_moved(source: CurvatureSource, mean: Tensor) -> None:
    """Warn if the model's weights are not the MAP the posterior was fitted at."""
    current = source.parameter_vector().to(mean)
    if not torch.allclose(current, mean, rtol=1e-5, atol=1e-7):
        warnings.warn(
            "the model's weights differ from the MAP of the loaded posterior: the GLM "
            "predictive linearizes the model at its current weights. Load the "
            "model's state_dict from the fit first.",
            UserWarning,
            stacklevel=3,
        )


def copy_tree(value: Any) -> Any:
    """A deep copy of nested dicts, lists and tensors (tensors cloned)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: copy_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_tree(v) for v in value)
    return value


_SEPARATOR = "/"
_ESCAPES = (("%", "%25"), ("/", "%2F"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with ``/``-joined, escaped keys (module doc).

    An empty nested dict is kept as ``{prefix/name/: None}``.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = prefix + _escape(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + _SEPARATOR))
        elif isinstance(value, dict):
            flat[name + _SEPARATOR] = None
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of :func:`flatten` (a nested dict is returned as it is)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or _SEPARATOR not in key:
            tree[_unescape(key) if isinstance(key, str) else key] = value
            continue
        *parents, last = key.split(_SEPARATOR)
        node = tree
        for parent in parents:
            node = node.setdefault(_unescape(parent), {})
        if last:
            node[_unescape(last)] = value
    return tree


def _escape(key: str) -> str:
    for char, code in _ESCAPES:
        key = key.replace(char, code)
    return key


def _unescape(key: str) -> str:
    for char, code in reversed(_ESCAPES):
        key = key.replace(code, char)
    return key
