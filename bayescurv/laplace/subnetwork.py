"""Subnetwork masks: which weights get a posterior (laplace-torch's mask classes).

Every mask's :meth:`SubnetMask.select` returns sorted indices into the trainable
parameters flattened and concatenated in ``named_parameters()`` order (parameters
with ``requires_grad=False`` are not counted), ready for
``Laplace(..., subset_of_weights="subnetwork", subnetwork_indices=...)``.

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


class SubnetMask(ABC):
    """Base class: selects entries of the flattened trainable parameters.

    Args:
        model: The model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters.")
        self.num_params = sum(p.numel() for p in self.params.values())

    def flat(self) -> Tensor:
        """The trainable parameters as one flat vector ``[P]`` (detached)."""
        return torch.cat([p.detach().flatten() for p in self.params.values()])

    @abstractmethod
    def select(self, train_loader: Iterable | None = None) -> Tensor:
        """Sorted ``int64`` indices of the selected entries."""


class _TopScoreMask(SubnetMask):
    """Selects the ``n_params_subnet`` entries with the largest score."""

    def __init__(self, model: nn.Module, n_params_subnet: int) -> None:
        super().__init__(model)
        if not isinstance(n_params_subnet, int) or not (
            0 < n_params_subnet <= self.num_params
        ):
            raise ValueError(
                f"n_params_subnet must be an int in [1, {self.num_params}], got "
                f"{n_params_subnet!r}."
            )
        self.n_params_subnet = n_params_subnet

    @abstractmethod
    def scores(self, train_loader: Iterable | None) -> Tensor:
        """A score per parameter, ``[P]``."""

    def select(self, train_loader: Iterable | None = None) -> Tensor:
        top = self.scores(train_loader).topk(self.n_params_subnet).indices
        return top.sort().values.cpu()


class LargestMagnitudeSubnetMask(_TopScoreMask):
    """The ``n_params_subnet`` weights of largest absolute value."""

    def scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        return self.flat().abs()


class RandomSubnetMask(_TopScoreMask):
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

    def scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
        return torch.rand(self.num_params, generator=self.generator)


class LargestVarianceDiagLaplaceSubnetMask(_TopScoreMask):
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

    def scores(self, train_loader: Iterable | None) -> Tensor:  # noqa: D102
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

    def select(self, train_loader: Iterable | None = None) -> Tensor:  # noqa: D102
        chosen, start = [], 0
        for name, p in self.params.items():
            if name in self.parameter_names:
                chosen.append(torch.arange(start, start + p.numel()))
            start += p.numel()
        return torch.cat(chosen)


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
