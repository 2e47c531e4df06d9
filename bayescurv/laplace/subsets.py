"""One posterior per weight subset; each takes any Hessian structure.

The classes differ only in their curvature source: the engine over all trainable
weights, the closed-form last layer, or the engine restricted to a subnetwork. Their
positional arguments are laplace-torch's (``ParametricLaplace``, ``LLLaplace``,
``SubnetLaplace``); the structure is the keyword ``hessian_structure``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.laplace.enums import (
    FeatureReduction,
    HessianStructure,
    SubsetOfWeights,
    parse,
)
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.posterior import BaseLaplace
from bayescurv.laplace.sources import (
    CurvatureSource,
    EngineSource,
    LastLayerSource,
    find_last_layer,
    last_layer,
)


class AllWeightsLaplace(BaseLaplace):
    """Laplace over every trainable parameter (``subset_of_weights="all"``).

    Takes the arguments of :class:`~bayescurv.laplace.posterior.BaseLaplace`; the
    model may be any model the engine supports.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> la = AllWeightsLaplace(model, "regression", hessian_structure="full")
        >>> la.fit([(x, model(x).detach())])
        >>> # (X^T X + I)^{-1} = I / 2
        >>> torch.allclose(la.posterior_covariance, torch.eye(2).double() / 2)
        True
    """

    subset = SubsetOfWeights.ALL

    def _make_source(self, likelihood: LikelihoodModel, inputs: Any) -> CurvatureSource:
        return EngineSource(self.model, likelihood, self.options)

    def _subset_parameters(self) -> dict[str, nn.Parameter]:
        return _trainable(self.model)


class LastLayerLaplace(BaseLaplace):
    """Laplace over the last ``nn.Linear`` layer (``subset_of_weights="last_layer"``).

    The layer is found at the first ``fit`` batch (the last ``nn.Linear`` called),
    or named with ``last_layer_name``. Every quantity is a closed form of the
    layer's input features (:mod:`bayescurv.laplace.sources.last_layer`).

    Args:
        model: A model whose output is the last Linear layer's output.
        likelihood: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        sigma_noise: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        prior_precision: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        prior_mean: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        temperature: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        enable_backprop: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        feature_reduction: For a last layer applied per position (features
            ``[N, *T, d]``, e.g. tokens of a language model): ``"pick_first"``,
            ``"pick_last"``, ``"average"`` or a function ``(features, inputs) ->
            [N, d]`` that reduces the positions as the model reduces its outputs
            (checked against the model output at every batch).
        dict_key_x: Input key of dict batches.
        dict_key_y: Target key of dict batches.
        backend: laplace-torch compatibility (see ``BaseLaplace``).
        last_layer_name: The layer's module name (default: found automatically).
        **kwargs: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Tanh(), nn.Linear(2, 1, bias=False)).double()
        >>> x = (0.5 * torch.eye(2, dtype=torch.float64)).atanh()
        >>> la = LastLayerLaplace(model, "regression", prior_precision=2.0,
        ...                       hessian_structure="diag")
        >>> la.fit([(x, model(x).detach())])
        >>> la.posterior_variance  # 1 / (phi_i^2 + 2) with phi = tanh(x) = I / 2
        tensor([0.4444, 0.4444], dtype=torch.float64)
    """

    subset = SubsetOfWeights.LAST_LAYER

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: Any = 1.0,
        prior_precision: Any = 1.0,
        prior_mean: Any = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: Any = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: Any = None,
        last_layer_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if feature_reduction is not None and not callable(feature_reduction):
            feature_reduction = parse(
                FeatureReduction, feature_reduction, "feature_reduction"
            )
        self.feature_reduction = feature_reduction
        self.last_layer_name = last_layer_name
        if last_layer_name is not None:
            last_layer(model, last_layer_name)  # a clear error now, not at fit
        super().__init__(
            model,
            likelihood,
            sigma_noise,
            prior_precision,
            prior_mean,
            temperature,
            enable_backprop,
            dict_key_x,
            dict_key_y,
            backend,
            **kwargs,
        )

    def _make_source(self, likelihood: LikelihoodModel, inputs: Any) -> CurvatureSource:
        name = self.last_layer_name
        if name is None:
            name = find_last_layer(self.model, inputs)
        return LastLayerSource(
            self.model, likelihood, self.options, name, self.feature_reduction
        )

    def _load_source(
        self, likelihood: LikelihoodModel, saved: dict[str, Any]
    ) -> CurvatureSource:
        name = saved.get("last_layer_name")
        if name is None:
            raise ValueError("the saved state names no last layer.")
        return LastLayerSource(
            self.model, likelihood, self.options, name, self.feature_reduction
        )

    def _subset_parameters(self) -> dict[str, nn.Parameter] | None:
        name = self.last_layer_name
        if self._state is not None:
            return self._state.source.parameters
        if name is None:
            return None
        layer = last_layer(self.model, name)
        params = {f"{name}.weight": layer.weight}
        if layer.bias is not None and layer.bias.requires_grad:
            params[f"{name}.bias"] = layer.bias
        return params

    @property
    def last_layer(self) -> nn.Linear | None:
        """The last layer (``None`` before the first fit unless named)."""
        if self._state is not None:
            return self._state.source.layer
        if self.last_layer_name is None:
            return None
        return last_layer(self.model, self.last_layer_name)


class SubnetLaplace(BaseLaplace):
    """Laplace over selected weights (``subset_of_weights="subnetwork"``).

    Args:
        model: Any model the engine supports.
        likelihood: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        subnetwork_indices: Indices into the trainable parameters flattened and
            concatenated in ``named_parameters()`` order (frozen parameters are not
            counted); e.g. from :mod:`bayescurv.laplace.subnetwork`.
        sigma_noise: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        prior_precision: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        prior_mean: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        temperature: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        backend: laplace-torch compatibility (see ``BaseLaplace``).
        backend_kwargs: laplace-torch compatibility (see ``BaseLaplace``).
        asdl_fisher_kwargs: laplace-torch compatibility (see ``BaseLaplace``).
        hessian_structure: ``"full"`` (default), ``"diag"``, ``"lowrank"``, or
            ``"kron"`` if the indices select whole parameter tensors.
        **kwargs: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.

    Raises:
        ValueError: For missing, empty, repeated or out-of-range indices, or
            ``"kron"`` with indices that split a parameter tensor.
    """

    subset = SubsetOfWeights.SUBNETWORK

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        subnetwork_indices: Tensor,
        sigma_noise: Any = 1.0,
        prior_precision: Any = 1.0,
        prior_mean: Any = 0.0,
        temperature: float = 1.0,
        backend: Any = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        hessian_structure: HessianStructure | str = HessianStructure.FULL,
        **kwargs: Any,
    ) -> None:
        self._names, self._local = _split_indices(model, subnetwork_indices)
        self.subnetwork_indices = subnetwork_indices
        super().__init__(
            model,
            likelihood,
            sigma_noise,
            prior_precision,
            prior_mean,
            temperature,
            backend=backend,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
            hessian_structure=hessian_structure,
            **kwargs,
        )
        if self.hessian_structure is HessianStructure.KRON and self._local is not None:
            raise ValueError(
                "hessian_structure='kron' needs subnetwork_indices that select whole "
                "parameter tensors (e.g. ParamNameSubnetMask or ModuleNameSubnetMask)."
            )

    def _make_source(self, likelihood: LikelihoodModel, inputs: Any) -> CurvatureSource:
        return EngineSource(
            self.model, likelihood, self.options, self._names, self._local
        )

    def _subset_parameters(self) -> dict[str, nn.Parameter]:
        trainable = _trainable(self.model)
        return {name: trainable[name] for name in self._names}

    def _block_sizes(self) -> list[int] | None:
        if self._state is not None or self._local is None:
            return super()._block_sizes()
        sizes = [p.numel() for p in self._subset_parameters().values()]
        bounds = torch.tensor([0, *sizes]).cumsum(0)
        counts = torch.bucketize(self._local, bounds[1:], right=True)
        return [int(c) for c in torch.bincount(counts, minlength=len(sizes))]

    @property
    def n_params_subnet(self) -> int:
        """Number of weights in the subnetwork (laplace-torch's name)."""
        return sum(self._block_sizes())

    @property
    def mean_subnet(self) -> Tensor:
        """The MAP of the subnetwork's weights, ``[P_subnet]`` (laplace-torch)."""
        return super().mean

    @property
    def mean(self) -> Tensor:
        """All trainable weights ``[P_all]``, the subnetwork's at the MAP.

        As in laplace-torch; :attr:`mean_subnet` is the subnetwork's part.
        """
        full = torch.cat(
            [p.detach().flatten() for p in _trainable(self.model).values()]
        )
        if self._state is not None:
            full[self._all_indices.to(full.device)] = self._state.mean.to(full)
        return full

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws of all trainable weights ``[n, P_all]`` (laplace-torch's shape).

        The subnetwork's entries come from the posterior, the others stay at the
        MAP; ``sample_subnet`` draws the subnetwork's entries only.
        """
        draws = self.sample_subnet(n_samples, generator)
        full = self.mean.expand(n_samples, -1).clone()
        full[:, self._all_indices.to(full.device)] = draws.to(full)
        return full

    def sample_subnet(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draws of the subnetwork's weights ``[n, P_subnet]``."""
        return super().sample(n_samples, generator)

    @property
    def _all_indices(self) -> Tensor:
        """The subnetwork's positions among all trainable weights."""
        return self.subnetwork_indices.long().sort().values


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _split_indices(
    model: nn.Module, indices: Tensor
) -> tuple[list[str], Tensor | None]:
    """Parameter tensors holding the indices, and the indices within them.

    Returns:
        The tensor names and the local indices (``None`` if whole tensors).
    """
    trainable = _trainable(model)
    total = sum(p.numel() for p in trainable.values())
    if (
        not isinstance(indices, Tensor)
        or indices.ndim != 1
        or indices.is_floating_point()
        or indices.dtype == torch.bool
    ):
        raise ValueError("subnetwork_indices must be a 1-D integer tensor.")
    indices = indices.cpu().long()
    if indices.numel() == 0 or indices.unique().numel() != indices.numel():
        raise ValueError("subnetwork_indices must be non-empty and without repeats.")
    if indices.min() < 0 or indices.max() >= total:
        raise ValueError(
            f"subnetwork_indices must lie in [0, {total}) (the number of trainable "
            "parameters)."
        )
    indices = indices.sort().values
    names, offsets, start, kept = [], [], 0, 0
    for name, p in trainable.items():
        inside = ((indices >= start) & (indices < start + p.numel())).sum()
        if inside:
            names.append(name)
            offsets.append((start, kept))
            kept += p.numel()
        start += p.numel()
    local = indices.clone()
    bounds = torch.tensor([s for s, _ in offsets])
    slot = torch.bucketize(indices, bounds, right=True) - 1
    local -= bounds[slot] - torch.tensor([k for _, k in offsets])[slot]
    whole = local.numel() == kept
    return names, None if whole else local
