"""Subnetwork masks: which weights get a posterior (laplace-torch's mask classes).

A mask's :meth:`SubnetMask.select` returns sorted indices into the trainable
parameters flattened and concatenated in ``named_parameters()`` order (parameters
with ``requires_grad=False`` are not counted), ready for
``Laplace(..., subset_of_weights="subnetwork", subnetwork_indices=...)``; afterwards
they are also :attr:`SubnetMask.indices`. A mask selects once (a second ``select``
raises, as in laplace-torch). Subclasses implement :meth:`SubnetMask.get_subnet_mask`
(a boolean vector ``[P]``), or, for top-``k`` selections,
:meth:`ScoreBasedSubnetMask.compute_param_scores` (a score per weight).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> ModuleNameSubnetMask(model, ["2"]).select()  # weight 3 + bias 1 of layer 2
    tensor([ 9, 10, 11, 12])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.laplace.enums import Likelihood, parse
from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor
from bayescurv.laplace.laplace_torch.swag import fit_diagonal_swag_var

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32)


class SubnetMask(ABC):
    """Base class: selects entries of the flattened trainable parameters.

    Args:
        model: The model.

    Attributes:
        model: The model.
        params: The trainable parameters by name.
        num_params: ``P``, the number of trainable entries.
        parameter_vector: The trainable entries at construction, ``[P]``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters.")
        self.num_params = sum(p.numel() for p in self.params.values())
        self.parameter_vector = self.flat()
        self._indices: Tensor | None = None
        self._n_params_subnet: int | None = None

    def flat(self) -> Tensor:
        """The trainable parameters as one flat vector ``[P]`` (detached)."""
        return torch.cat([p.detach().flatten() for p in self.params.values()])

    @property
    def indices(self) -> Tensor:
        """The selected indices (sorted ``int64``).

        Raises:
            AttributeError: Before :meth:`select`.
        """
        if self._indices is None:
            raise AttributeError(
                f"{type(self).__name__}: no subnetwork selected yet; call select()."
            )
        return self._indices

    @property
    def n_params_subnet(self) -> int:
        """The number of selected entries.

        Raises:
            AttributeError: Before :meth:`select`, for masks whose size is not fixed
                in advance.
        """
        if self._n_params_subnet is None:
            self._n_params_subnet = len(self.indices)
        return self._n_params_subnet

    @abstractmethod
    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:
        """A boolean (or 0/1) vector ``[P]``, true for the selected entries."""

    def convert_subnet_mask_to_indices(self, subnet_mask: Tensor) -> Tensor:
        """The sorted ``int64`` positions of the ones of a 0/1 mask ``[P]`` (on CPU).

        Raises:
            ValueError: Unless ``subnet_mask`` is a 1-D boolean or integer tensor of
                ``P`` zeros and ones.
        """
        if not isinstance(subnet_mask, Tensor):
            raise ValueError(
                "the subnetwork mask must be a torch.Tensor, got "
                f"{type(subnet_mask).__name__}."
            )
        if (
            subnet_mask.ndim != 1
            or subnet_mask.dtype not in (*_MASK_DTYPES, torch.int64)
            or len(subnet_mask) != self.num_params
            or not bool(((subnet_mask == 0) | (subnet_mask == 1)).all())
        ):
            raise ValueError(
                f"the subnetwork mask must be a 1-D boolean or integer tensor of "
                f"{self.num_params} zeros and ones (one per trainable entry), got "
                f"dtype {subnet_mask.dtype}, shape {list(subnet_mask.shape)}."
            )
        return subnet_mask.nonzero(as_tuple=True)[0].cpu()

    def select(self, train_loader: Iterable | None = None) -> Tensor:
        """Select the subnetwork (once); returns :attr:`indices`.

        Args:
            train_loader: Training data, for masks that need it.

        Raises:
            ValueError: If the subnetwork has been selected already (read
                :attr:`indices`), or from the mask (e.g. no ``train_loader``).
        """
        if self._indices is not None:
            raise ValueError(
                f"{type(self).__name__}: the subnetwork was selected already; read "
                ".indices (or create a new mask)."
            )
        self._indices = self.convert_subnet_mask_to_indices(
            self.get_subnet_mask(train_loader)
        )
        return self._indices

    def _mask_of(self, indices: Tensor) -> Tensor:
        mask = torch.zeros(self.num_params, dtype=torch.bool)
        mask[indices.cpu()] = True
        return mask


class ScoreBasedSubnetMask(SubnetMask):
    """Selects the ``n_params_subnet`` entries with the largest score.

    Args:
        model: The model.
        n_params_subnet: Number of selected entries, in ``[1, P]``.
    """

    def __init__(self, model: nn.Module, n_params_subnet: int) -> None:
        super().__init__(model)
        if (
            isinstance(n_params_subnet, bool)
            or not isinstance(n_params_subnet, int)
            or not (0 < n_params_subnet <= self.num_params)
        ):
            raise ValueError(
                f"n_params_subnet must be an int in [1, {self.num_params}], got "
                f"{n_params_subnet!r}."
            )
        self._n_params_subnet = n_params_subnet

    @abstractmethod
    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:
        """A score per trainable entry, ``[P]``."""

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        scores = self.compute_param_scores(train_loader)
        if scores.shape != (self.num_params,):
            raise ValueError(
                f"{type(self).__name__}: the scores must be [{self.num_params}] (one "
                f"per trainable entry), got {list(scores.shape)}."
            )
        return self._mask_of(scores.topk(self._n_params_subnet).indices)


class LargestMagnitudeSubnetMask(ScoreBasedSubnetMask):
    """The ``n_params_subnet`` weights of largest absolute value."""

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        return self.flat().abs()


class RandomSubnetMask(ScoreBasedSubnetMask):
    """``n_params_subnet`` weights uniformly at random (reproducible with a generator).

    Args:
        model: The model.
        n_params_subnet: Number of selected weights.
        generator: Source of randomness (default: torch's global generator).
    """

    def __init__(
        self,
        model: nn.Module,
        n_params_subnet: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, n_params_subnet)
        self.generator = generator

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        return torch.rand(self.num_params, generator=self.generator)


class LargestVarianceDiagLaplaceSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest marginal variance under a diagonal Laplace.

    Args:
        model: The model.
        n_params_subnet: Number of selected weights.
        diag_laplace_model: A ``subset_of_weights="all"`` Laplace of ``model``
            (``hessian_structure="diag"`` is the cheap choice); fitted on
            ``train_loader`` by :meth:`select` if not fitted yet.
    """

    def __init__(
        self, model: nn.Module, n_params_subnet: int, diag_laplace_model: Any
    ) -> None:
        super().__init__(model, n_params_subnet)
        self.diag_laplace_model = diag_laplace_model

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        la = self.diag_laplace_model
        if not la.is_fitted:
            if train_loader is None:
                raise ValueError(
                    "LargestVarianceDiagLaplaceSubnetMask.select needs train_loader "
                    "to fit its diagonal Laplace."
                )
            la.fit(train_loader)
        variance = la.posterior_variance
        if variance.numel() != self.num_params:
            raise ValueError(
                "diag_laplace_model must cover all trainable weights "
                f"({self.num_params}), it covers {variance.numel()}."
            )
        return variance


class LargestVarianceSWAGSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest marginal variance under diagonal SWAG.

    See :func:`~bayescurv.laplace.laplace_torch.swag.fit_diagonal_swag_var` (the model
    is copied, its weights are not changed).

    Args:
        model: The model.
        n_params_subnet: Number of selected weights.
        likelihood: ``"classification"`` (cross-entropy) or ``"regression"``
            (squared error): the loss of the SGD iterates.
        swag_n_snapshots: Number of iterates.
        swag_snapshot_freq: Epochs between iterates.
        swag_lr: SGD learning rate.
    """

    def __init__(
        self,
        model: nn.Module,
        n_params_subnet: int,
        likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
        swag_n_snapshots: int = 40,
        swag_snapshot_freq: int = 1,
        swag_lr: float = 0.01,
    ) -> None:
        kind = parse(Likelihood, likelihood, "likelihood")
        if kind not in (Likelihood.CLASSIFICATION, Likelihood.REGRESSION):
            raise ValueError(
                "LargestVarianceSWAGSubnetMask: likelihood must be 'classification' "
                f"or 'regression', got {kind.value!r}."
            )
        super().__init__(model, n_params_subnet)
        self.likelihood = kind
        self.swag_n_snapshots = swag_n_snapshots
        self.swag_snapshot_freq = swag_snapshot_freq
        self.swag_lr = swag_lr

    def compute_param_scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        if train_loader is None:
            raise ValueError(
                "LargestVarianceSWAGSubnetMask.select needs train_loader for SWAG."
            )
        criterion = (
            nn.CrossEntropyLoss()
            if self.likelihood is Likelihood.CLASSIFICATION
            else nn.MSELoss()
        )
        return fit_diagonal_swag_var(
            self.model,
            train_loader,
            criterion,
            n_snapshots_total=self.swag_n_snapshots,
            snapshot_freq=self.swag_snapshot_freq,
            lr=self.swag_lr,
        )


class ParamNameSubnetMask(SubnetMask):
    """Every entry of the named parameter tensors.

    Args:
        model: The model.
        parameter_names: Names as in ``model.named_parameters()``.
    """

    def __init__(self, model: nn.Module, parameter_names: Sequence[str]) -> None:
        super().__init__(model)
        unknown = sorted(set(parameter_names) - set(self.params))
        if unknown or not parameter_names:
            raise ValueError(
                f"unknown or frozen parameter names {unknown}; trainable: "
                f"{list(self.params)}."
            )
        self.parameter_names = set(parameter_names)

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        return torch.cat(
            [
                torch.full((p.numel(),), name in self.parameter_names)
                for name, p in self.params.items()
            ]
        )


class ModuleNameSubnetMask(ParamNameSubnetMask):
    """Every trainable parameter of the named modules (and their children).

    Args:
        model: The model.
        module_names: Names as in ``model.named_modules()``.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        unknown = sorted(set(module_names) - set(modules))
        if unknown or not module_names:
            raise ValueError(f"unknown module names {unknown}.")
        names = [
            f"{prefix}.{local}" if prefix else local
            for prefix in module_names
            for local, p in modules[prefix].named_parameters()
            if p.requires_grad
        ]
        if not names:
            raise ValueError(
                f"the modules {list(module_names)} hold no trainable weights."
            )
        super().__init__(model, names)


class LastLayerSubnetMask(SubnetMask):
    """The trainable weights of the last ``nn.Linear`` layer.

    Args:
        model: The model.
        last_layer_name: The layer's name; found with a forward pass on the first
            training batch by :meth:`select` if ``None``.

    Raises:
        KeyError: For an unknown ``last_layer_name``.
    """

    def __init__(self, model: nn.Module, last_layer_name: str | None = None) -> None:
        super().__init__(model)
        self._feature_extractor = FeatureExtractor(model, last_layer_name)

    def get_subnet_mask(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        extractor = self._feature_extractor
        if extractor.last_layer_name is None:
            if train_loader is None:
                raise ValueError(
                    "LastLayerSubnetMask.select needs train_loader to find the last "
                    "layer."
                )
            inputs = next(iter(train_loader))[0]
            device = next(iter(self.params.values())).device
            with torch.no_grad():
                extractor.find_last_layer(inputs[:1].to(device))
        names = ModuleNameSubnetMask(self.model, [extractor.last_layer_name])
        return names.get_subnet_mask(train_loader)
