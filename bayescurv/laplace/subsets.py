"""One posterior per weight subset; each takes any Hessian structure.

The classes differ only in their curvature source: the engine over all trainable
weights, the closed-form last layer, or the engine restricted to a subnetwork.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.laplace.engine_source import EngineSource
from bayescurv.laplace.enums import HessianStructure, SubsetOfWeights
from bayescurv.laplace.last_layer import LastLayerSource
from bayescurv.laplace.posterior import BaseLaplace
from bayescurv.laplace.sources import CurvatureSource


class AllWeightsLaplace(BaseLaplace):
    """Laplace over every trainable parameter (``subset_of_weights="all"``).

    Args:
        model: Any model the engine supports.
        likelihood: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        hessian_structure: ``"full"``, ``"kron"``, ``"diag"`` or ``"lowrank"``.
        **kwargs: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> la = AllWeightsLaplace(model, "regression", "full", prior_precision=1.0)
        >>> la.fit([(x, model(x).detach())])
        >>> # (X^T X + I)^{-1} = I / 2
        >>> torch.allclose(la.posterior_covariance, torch.eye(2).double() / 2)
        True
    """

    subset = SubsetOfWeights.ALL

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, likelihood, hessian_structure, **kwargs)

    def _make_source(self) -> CurvatureSource:
        return EngineSource(self.model, self._lik, self.options)


class LastLayerLaplace(BaseLaplace):
    """Laplace over the last ``nn.Linear`` layer (``subset_of_weights="last_layer"``).

    The layer is found at the first ``fit`` batch (the last ``nn.Linear`` called),
    or named with ``last_layer_name``. Every quantity is a closed form of the
    layer's input features (:mod:`bayescurv.laplace.last_layer`).

    Args:
        model: A model whose output is the last Linear layer's output.
        likelihood: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        hessian_structure: ``"full"``, ``"kron"``, ``"diag"`` or ``"lowrank"``.
        last_layer_name: The layer's module name (default: found automatically).
        **kwargs: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Tanh(), nn.Linear(2, 1, bias=False)).double()
        >>> x = (0.5 * torch.eye(2, dtype=torch.float64)).atanh()
        >>> la = LastLayerLaplace(model, "regression", "diag", prior_precision=2.0)
        >>> la.fit([(x, model(x).detach())])
        >>> la.posterior_variance  # 1 / (phi_i^2 + 2) with phi = tanh(x) = I / 2
        tensor([0.4444, 0.4444], dtype=torch.float64)
    """

    subset = SubsetOfWeights.LAST_LAYER

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        last_layer_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._last_layer_name = last_layer_name
        super().__init__(model, likelihood, hessian_structure, **kwargs)

    def _make_source(self) -> CurvatureSource:
        return LastLayerSource(
            self.model, self._lik, self.options, self._last_layer_name
        )

    def _prepare(self, inputs: Any) -> None:
        self.source.find(inputs)

    @property
    def last_layer(self) -> nn.Linear | None:
        """The last layer (``None`` before the first fit)."""
        return self.source.layer


class SubnetLaplace(BaseLaplace):
    """Laplace over selected weights (``subset_of_weights="subnetwork"``).

    Args:
        model: Any model the engine supports.
        likelihood: See :class:`~bayescurv.laplace.posterior.BaseLaplace`.
        hessian_structure: ``"full"``, ``"diag"``, ``"lowrank"``, or ``"kron"`` if
            the indices select whole parameter tensors.
        subnetwork_indices: Indices into the trainable parameters flattened and
            concatenated in ``named_parameters()`` order (frozen parameters are not
            counted); e.g. from :mod:`bayescurv.laplace.subnetwork`.
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
        hessian_structure: HessianStructure | str = HessianStructure.FULL,
        subnetwork_indices: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        self._names, self._local = _split_indices(model, subnetwork_indices)
        super().__init__(model, likelihood, hessian_structure, **kwargs)
        if self.hessian_structure is HessianStructure.KRON and self._local is not None:
            raise ValueError(
                "hessian_structure='kron' needs subnetwork_indices that select whole "
                "parameter tensors (e.g. ParamNameSubnetMask or ModuleNameSubnetMask)."
            )
        self.subnetwork_indices = subnetwork_indices

    def _make_source(self) -> CurvatureSource:
        return EngineSource(
            self.model, self._lik, self.options, self._names, self._local
        )


def _split_indices(
    model: nn.Module, indices: Tensor | None
) -> tuple[list[str], Tensor | None]:
    """Parameter tensors holding the indices, and the indices within them.

    Returns:
        The tensor names and the local indices (``None`` if whole tensors).
    """
    if indices is None:
        raise ValueError("subset_of_weights='subnetwork' needs subnetwork_indices.")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
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
