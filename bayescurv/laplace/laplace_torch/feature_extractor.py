r"""A model wrapper that returns the last layer's input features with the output.

laplace-torch's ``FeatureExtractor``: ``forward_with_features(x)`` returns the model
output and the input :math:`\phi` of the last ``nn.Linear`` layer, found on the first
forward pass (the last trainable ``nn.Linear`` the model calls, see
:func:`~bayescurv.laplace.sources.last_layer.find_last_layer`) or given by name.
Features ``[N, *T, d]`` (a layer applied per token or position) can be reduced to
``[N, d]`` (:func:`~bayescurv.laplace.sources.last_layer.reduce_features`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> extractor = FeatureExtractor(model)
    >>> x = torch.randn(5, 3)
    >>> out, phi = extractor.forward_with_features(x)
    >>> extractor.last_layer_name, phi.shape
    ('2', torch.Size([5, 4]))
    >>> torch.equal(extractor.last_layer(phi), out)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bayescurv.laplace.data import call_model
from bayescurv.laplace.enums import FeatureReduction, parse
from bayescurv.laplace.sources.last_layer import (
    Reduction,
    find_last_layer,
    reduce_features,
)

__all__ = ["FeatureExtractor", "FeatureReduction"]


class FeatureExtractor(nn.Module):
    """Wraps a model; its forward pass also records the last layer's input.

    Args:
        model: The model; its output must be the output of its last ``nn.Linear``
            (checked when the layer is found automatically).
        last_layer_name: The last layer's name in ``model.named_modules()``; found
            on the first forward pass if ``None``.
        enable_backprop: Keep the features in the autograd graph (e.g. for
            gradients w.r.t. the inputs); detached otherwise.
        feature_reduction: How features ``[N, *T, d]`` become ``[N, d]``:
            ``"pick_first"``, ``"pick_last"``, ``"average"`` or a function
            ``(features, inputs) -> [N, d]``; ``None`` keeps them as they are.

    Attributes:
        model: The wrapped model.
        last_layer: The last ``nn.Linear`` (``None`` until known). Not registered
            as a submodule: its parameters belong to ``model`` only.
        last_layer_name: Its name in ``model`` (``None`` until known).

    Raises:
        ValueError: For an unknown ``feature_reduction`` or a named layer that is not
            an ``nn.Linear``.
        KeyError: For an unknown ``last_layer_name``.
    """

    def __init__(
        self,
        model: nn.Module,
        last_layer_name: str | None = None,
        enable_backprop: bool = False,
        feature_reduction: Reduction = None,
    ) -> None:
        super().__init__()
        if feature_reduction is not None and not callable(feature_reduction):
            feature_reduction = parse(
                FeatureReduction, feature_reduction, "feature_reduction"
            )
        self.model = model
        self.enable_backprop = enable_backprop
        self.feature_reduction = feature_reduction
        # plain attributes: the layer already is a submodule of ``model``
        object.__setattr__(self, "last_layer", None)
        self.last_layer_name: str | None = None
        self._features: Tensor | None = None
        self._handle: RemovableHandle | None = None
        if last_layer_name is not None:
            self.set_last_layer(last_layer_name)

    def forward(self, x: Any) -> Any:
        """The model output; finds the last layer on the first call."""
        if self.last_layer is None:
            return self.find_last_layer(x)
        return call_model(self.model, x)

    def forward_with_features(self, x: Any) -> tuple[Any, Tensor]:
        """The model output and the last layer's input features.

        Returns:
            The output and the features ``[N, d]`` (or ``[N, *T, d]`` if there is no
            ``feature_reduction``).
        """
        out = self.forward(x)
        features = self._features
        if features.ndim > 2 and self.feature_reduction is not None:
            features = reduce_features(features, self.feature_reduction, x)
        return out, features

    def set_last_layer(self, last_layer_name: str) -> None:
        """Use the named module as the last layer and record its input from now on.

        Raises:
            KeyError: If the model has no module of that name.
            ValueError: If the module is not an ``nn.Linear``.
        """
        modules = dict(self.model.named_modules())
        if last_layer_name not in modules:  # KeyError, as laplace-torch's lookup
            raise KeyError(
                f"FeatureExtractor: the model has no module {last_layer_name!r}."
            )
        layer = modules[last_layer_name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"FeatureExtractor: the last layer {last_layer_name!r} is a "
                f"{type(layer).__name__}; use a model with a linear last layer."
            )
        if self._handle is not None:
            self._handle.remove()
        object.__setattr__(self, "last_layer", layer)
        self.last_layer_name = last_layer_name
        self._handle = layer.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        features = args[0]
        self._features = features if self.enable_backprop else features.detach()

    def find_last_layer(self, x: Any) -> Any:
        """Find the last layer with a forward pass on ``x``; return the output.

        The last trainable ``nn.Linear`` called is the last layer; the model output
        must be its output (up to a reshape). This costs one extra forward pass
        (without gradients) on the first call only.

        Raises:
            ValueError: If the last layer is known already, the model calls no
                trainable ``nn.Linear``, or its output is not the model output.
        """
        if self.last_layer is not None:
            raise ValueError("FeatureExtractor: the last layer is already known.")
        name = find_last_layer(self.model, x)
        self.set_last_layer(name)
        seen: dict[str, Tensor] = {}
        probe = self.last_layer.register_forward_hook(
            lambda m, a, o: seen.__setitem__("out", o)
        )
        try:
            out = call_model(self.model, x)
        finally:
            probe.remove()
        if isinstance(out, Tensor) and not _same_values(out, seen["out"]):
            raise ValueError(
                f"FeatureExtractor: the model output is not the output of its last "
                f"nn.Linear {name!r}; pass last_layer_name=... for a model whose "
                "output comes from a linear layer."
            )
        return out


def _same_values(out: Tensor, layer_out: Tensor) -> bool:
    return out.numel() == layer_out.numel() and torch.equal(
        out.reshape(-1), layer_out.reshape(-1)
    )
