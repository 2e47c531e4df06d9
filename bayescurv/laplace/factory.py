"""``Laplace(...)``: laplace-torch's factory, so switching is one import line."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from bayescurv.laplace.enums import (
    HessianStructure,
    Likelihood,
    SubsetOfWeights,
    parse,
)
from bayescurv.laplace.function_space import FunctionalLaplace, FunctionalLLLaplace
from bayescurv.laplace.posterior import BaseLaplace
from bayescurv.laplace.subsets import AllWeightsLaplace, LastLayerLaplace, SubnetLaplace

POSTERIORS: dict[SubsetOfWeights, type[BaseLaplace]] = {
    SubsetOfWeights.ALL: AllWeightsLaplace,
    SubsetOfWeights.LAST_LAYER: LastLayerLaplace,
    SubsetOfWeights.SUBNETWORK: SubnetLaplace,
}
"""The posterior class of every weight subset."""

FUNCTION_SPACE: dict[SubsetOfWeights, type[BaseLaplace]] = {
    SubsetOfWeights.ALL: FunctionalLaplace,
    SubsetOfWeights.LAST_LAYER: FunctionalLLLaplace,
}
"""The function-space posterior (``hessian_structure="gp"``) of every weight subset."""


def _options(cls: type[BaseLaplace]) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if issubclass(klass, BaseLaplace) and "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters)
    return names - {
        "self",
        "args",
        "kwargs",
        "model",
        "likelihood",
        "hessian_structure",
    }


def Laplace(
    model: nn.Module,
    likelihood: Likelihood | str,
    subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    sigma_noise: float = 1.0,
    prior_precision: float = 1.0,
    prior_mean: float = 0.0,
    temperature: float = 1.0,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    **kwargs: Any,
) -> BaseLaplace:
    """A Laplace approximation of ``model`` (not fitted yet).

    Args:
        model: A trained model at the MAP.
        likelihood: ``"classification"``, ``"regression"`` or ``"binary"``.
        subset_of_weights: ``"last_layer"``, ``"all"`` or ``"subnetwork"``.
        hessian_structure: ``"kron"``, ``"full"``, ``"diag"``, ``"lowrank"`` or
            ``"gp"`` (the function-space posterior, all weights or last layer).
        sigma_noise: Regression noise (scalar or per output).
        prior_precision: Scalar, per parameter tensor ``[B]`` or per weight ``[P]``.
        prior_mean: Scalar or ``[P]``.
        temperature: Posterior temperature.
        enable_backprop: Predictions differentiable w.r.t. the inputs.
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.
        **kwargs: Options of the subset's class: ``last_layer_name``,
            ``subnetwork_indices``, ``stochastic``, ``mc_samples``, ``rank``,
            ``generator``, ``memory_budget``, ``backend``, ``backend_kwargs``;
            for ``"gp"``: ``n_subset``, ``functional_approximation``,
            ``independent_outputs``, ``seed``, ... (see
            :class:`~bayescurv.laplace.FunctionalLaplace`).

    Returns:
        An :class:`~bayescurv.laplace.AllWeightsLaplace`,
        :class:`~bayescurv.laplace.LastLayerLaplace` or
        :class:`~bayescurv.laplace.SubnetLaplace`; for ``"gp"``
        :class:`~bayescurv.laplace.FunctionalLaplace` or
        :class:`~bayescurv.laplace.FunctionalLLLaplace`.

    Raises:
        ValueError: For an unknown option value (listing the valid ones), or
            ``"gp"`` with ``subset_of_weights="subnetwork"``.
        TypeError: For an unknown keyword argument (listing the valid ones).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> la = Laplace(model, "classification", hessian_structure="diag")
        >>> la.fit([(x, y)])
        >>> la(x).sum(-1).allclose(torch.ones(8))  # probit probabilities
        True
    """
    subset = parse(SubsetOfWeights, subset_of_weights, "subset_of_weights")
    cls = POSTERIORS[subset]
    if parse(HessianStructure, hessian_structure, "hessian_structure") is (
        HessianStructure.GP
    ):
        if subset not in FUNCTION_SPACE:
            raise ValueError(
                "hessian_structure='gp' exists for subset_of_weights='all' and "
                f"'last_layer', not '{subset.value}'."
            )
        cls = FUNCTION_SPACE[subset]
    unknown = set(kwargs) - _options(cls)
    if unknown:
        raise TypeError(
            f"unknown options {sorted(unknown)} for subset_of_weights="
            f"'{subset.value}'; valid: {sorted(_options(cls))}."
        )
    return cls(
        model,
        likelihood,
        hessian_structure=hessian_structure,
        sigma_noise=sigma_noise,
        prior_precision=prior_precision,
        prior_mean=prior_mean,
        temperature=temperature,
        enable_backprop=enable_backprop,
        dict_key_x=dict_key_x,
        dict_key_y=dict_key_y,
        **kwargs,
    )
