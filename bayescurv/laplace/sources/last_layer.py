r"""The last layer: features from a forward hook, closed-form GGN and Jacobians.

For the last ``nn.Linear`` layer :math:`f = W \phi + b` with features
:math:`\phi_n \in \mathbb{R}^d` and per-sample output Hessians
:math:`\Lambda_n = \nabla_f^2 \ell_n \in \mathbb{R}^{C \times C}`, the Jacobian
w.r.t. the row-major weight and the bias is :math:`J_n = [I_C \otimes \phi_n^\top,
I_C]`, so with :math:`\tilde\phi_n = (\phi_n, 1)` every quantity has a closed form
and no Jacobian is ever formed:

.. math::
    G_{(c,i),(c',j)} = \sum_n \Lambda_{n,cc'}\, \tilde\phi_{n,i} \tilde\phi_{n,j},
    \qquad
    \operatorname{diag} G_{(c,i)} = \sum_n \Lambda_{n,cc}\, \tilde\phi_{n,i}^2,
    \qquad
    G_W \approx \Big(\sum_n \Lambda_n\Big) \otimes
    \Big(\frac1N \sum_n \phi_n \phi_n^\top\Big).

The dense form is one matrix product ``[C², N] @ [N, (d+1)²]`` (cost
:math:`N C^2 (d+1)^2`, a factor :math:`C` below the square-root form).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bayescurv.engine.boundary import model_output
from bayescurv.laplace.data import call_model, first_example
from bayescurv.laplace.enums import CurvatureType, FeatureReduction, parse
from bayescurv.laplace.likelihoods import LikelihoodModel
from bayescurv.laplace.sources.base import (
    CurvatureSource,
    KronFactors,
    Quantity,
    SourceOptions,
)
from bayescurv.laplace.sources.jacobians import SegmentedJacobian

Reduction = FeatureReduction | str | Callable[[Tensor, Any], Tensor] | None
"""A feature reduction: a :class:`FeatureReduction`, its value, or a function
``(features [N, *T, d], inputs) -> [N, d]``."""


def reduce_features(
    features: Tensor, reduction: Reduction, inputs: Any = None
) -> Tensor:
    """Features ``[N, *T, d]`` reduced to ``[N, d]`` over the middle positions.

    Args:
        features: The last layer's input.
        reduction: ``"pick_first"``, ``"pick_last"``, ``"average"`` or a function
            ``(features, inputs) -> [N, d]``.
        inputs: The model inputs (passed to a function).

    Returns:
        ``[N, d]``.

    Raises:
        ValueError: For an unknown reduction or a function returning another shape.

    Example:
        >>> import torch
        >>> x = torch.arange(12.0).reshape(2, 3, 2)  # [N, T, d]
        >>> reduce_features(x, "pick_last")
        tensor([[ 4.,  5.],
                [10., 11.]])
    """
    if callable(reduction) and not isinstance(reduction, str):
        reduced = reduction(features, inputs)
        expected = (features.shape[0], features.shape[-1])
        if not isinstance(reduced, Tensor) or reduced.shape != expected:
            shape = getattr(reduced, "shape", type(reduced).__name__)
            raise ValueError(
                f"feature_reduction must return features of shape {list(expected)}, "
                f"got {shape}."
            )
        return reduced
    kind = parse(FeatureReduction, reduction, "feature_reduction")
    flat = features.reshape(features.shape[0], -1, features.shape[-1])
    if kind is FeatureReduction.PICK_FIRST:
        return flat[:, 0]
    if kind is FeatureReduction.PICK_LAST:
        return flat[:, -1]
    return flat.mean(1)


class LastLayerSource(CurvatureSource):
    """Curvature of the last ``nn.Linear`` layer from its input features.

    Args:
        model: The model; its output must be the last Linear layer's output (up to
            a reshape, e.g. ``squeeze(-1)``).
        likelihood: The likelihood.
        options: Engine options (unused: everything is closed form).
        last_layer_name: The layer's module name (see :func:`find_last_layer`).
        feature_reduction: How features ``[N, *T, d]`` become ``[N, d]`` (see
            :func:`reduce_features`); ``None`` requires ``[N, d]`` features.
    """

    supports_backprop = True
    needs_grad = False

    def __init__(
        self,
        model: nn.Module,
        likelihood: LikelihoodModel,
        options: SourceOptions,
        last_layer_name: str,
        feature_reduction: Reduction = None,
    ) -> None:
        super().__init__(model, likelihood, options)
        self.layer_name = last_layer_name
        self.layer = last_layer(model, last_layer_name)
        self.feature_reduction = feature_reduction

    @property
    def parameters(self) -> dict[str, nn.Parameter]:  # noqa: D102
        params = {f"{self.layer_name}.weight": self.layer.weight}
        if self.layer.bias is not None and self.layer.bias.requires_grad:
            params[f"{self.layer_name}.bias"] = self.layer.bias
        return params

    @property
    def has_bias(self) -> bool:
        """Whether the bias is part of the subset."""
        return len(self.parameters) == 2

    def features(self, inputs: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Model output, last-layer output ``[N, C]`` and features ``[N, d]``.

        Features ``[N, *T, d]`` (a layer applied per token) are reduced to ``[N, d]``
        with ``feature_reduction`` first; the last-layer output is then recomputed
        from the reduced features and must match the model output.

        Raises:
            ValueError: If the model output is not the last layer's output, or the
                layer sees ``[N, *T, d]`` inputs and no ``feature_reduction`` is set.
        """
        seen: dict[str, Tensor] = {}

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen["phi"], seen["f"] = args[0], output

        handle = self.layer.register_forward_hook(hook)
        try:
            output = model_output(call_model(self.model, inputs))
        finally:
            handle.remove()
        if "phi" not in seen:
            raise ValueError(
                f"the last layer {self.layer_name!r} was not called in the model's "
                "forward pass."
            )
        phi, f = seen["phi"], seen["f"]
        if phi.ndim != 2:
            phi, f = self._reduced(phi, inputs)
        if output.numel() != f.numel() or not torch.allclose(
            output.reshape(-1), f.reshape(-1), rtol=1e-5, atol=1e-6
        ):
            raise ValueError(self._mismatch_message())
        return output, f, phi

    def _reduced(self, phi: Tensor, inputs: Any) -> tuple[Tensor, Tensor]:
        """Reduced features ``[N, d]`` and the layer output on them."""
        if self.feature_reduction is None:
            raise ValueError(
                f"the last layer {self.layer_name!r} got input of shape "
                f"{list(phi.shape)}; the last-layer Laplace needs [N, d] features: "
                "pass feature_reduction='pick_first', 'pick_last', 'average' or a "
                "function (features, inputs) -> [N, d] saying how the model reduces "
                "the positions."
            )
        phi = reduce_features(phi, self.feature_reduction, inputs)
        return phi, self.layer(phi)

    def _mismatch_message(self) -> str:
        reduction = self.feature_reduction
        if reduction is not None:
            shown = (
                reduction.value
                if isinstance(reduction, FeatureReduction)
                else (getattr(reduction, "__name__", repr(reduction)))
            )
            return (
                f"with feature_reduction={shown!r} the last layer "
                f"{self.layer_name!r} on the reduced features does not give the "
                "model output: the model reduces the positions differently (e.g. "
                "it picks the last non-padding token). Pass a function (features, "
                "inputs) -> [N, d] that selects as the model does."
            )
        return (
            f"the model output is not the output of its last nn.Linear layer "
            f"{self.layer_name!r}: the last-layer Laplace linearizes that layer only, "
            "so nothing may follow it (pass last_layer_name=... or use "
            "subset_of_weights='all')."
        )

    # --------------------------------------------------------- curvature
    def batch(
        self, quantity: Quantity, inputs: Any, targets: Tensor
    ) -> tuple[Tensor, Tensor | KronFactors]:
        """See :meth:`CurvatureSource.batch` (closed forms of the module doc)."""
        output, f, phi = self._checked_features(inputs, targets)
        if quantity is Quantity.DIAG:
            return output, self._diagonal(f, phi, targets)
        hessians = self._output_curvature(f, targets)
        if quantity is Quantity.KRON:
            total = hessians.sum(0)
            factors = [[total, phi.mT @ phi]]
            return output, factors + ([[total.clone()]] if self.has_bias else [])
        return output, self._add_dense(hessians, phi, None)

    def accumulate_dense(
        self, inputs: Any, targets: Tensor, total: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """See :meth:`CurvatureSource.accumulate_dense`: added in place, no copy."""
        output, f, phi = self._checked_features(inputs, targets)
        hessians = self._output_curvature(f, targets)
        return output, self._add_dense(hessians, phi, total)

    def _checked_features(
        self, inputs: Any, targets: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Model output, and last-layer output and features in the curvature dtype."""
        with torch.no_grad():
            output, f, phi = self.features(inputs)
        self.likelihood.check(output, targets)
        # closed forms: exact rank
        return output, f.to(self.dtype), phi.to(self.dtype)

    def _augmented(self, phi: Tensor) -> Tensor:
        if not self.has_bias:
            return phi
        return torch.cat([phi, phi.new_ones(phi.shape[0], 1)], dim=1)

    # NOTE [Curvature types of the last layer]
    # The last layer's output f = W phi + b is linear in its weights, so the Hessian
    # of the loss w.r.t. them is exactly the GGN (curvature='hessian' gives the GGN's
    # closed forms), and the empirical Fisher has the same form with the output
    # Hessian Lambda_n replaced by r_n r_n^T, r_n the loss gradient w.r.t. f_n.
    def _output_curvature(self, f: Tensor, targets: Tensor) -> Tensor:
        """Per-sample output curvature ``[N, C, C]`` (see the NOTE)."""
        if self.options.curvature is CurvatureType.EF:
            grads = self.likelihood.output_gradient(f, targets)
            return grads[:, :, None] * grads[:, None, :]
        return self.likelihood.output_hessian(f)

    def _output_diagonal(self, f: Tensor, targets: Tensor) -> Tensor:
        """Its diagonal ``[N, C]``."""
        if self.options.curvature is CurvatureType.EF:
            return self.likelihood.output_gradient(f, targets).square()
        return self.likelihood.output_hessian_diagonal(f)

    def _diagonal(self, f: Tensor, phi: Tensor, targets: Tensor) -> Tensor:
        diag = self._output_diagonal(f, targets)  # [N, C]
        weight = diag.mT @ phi.square()
        parts = [weight.flatten()] + ([diag.sum(0)] if self.has_bias else [])
        return torch.cat(parts)

    # NOTE [The last layer's dense GGN, block by block]
    # G = sum_n Lambda_n (x) phi_n phi_n^T in the structure's order (the weight
    # row-major, (c, i), then the bias). Row block c of its weight part is one
    # product, Phi^T [Lambda_n[c, e] phi_n[j]]_{n, (e, j)}, written straight into
    # total's rows (c, :) (addmm_ into the strided view), and the bias rows and
    # columns are [C, d] and [C, C] sums. The previous form, one [C^2, d'^2]
    # product over the samples and then a permuted copy and a row and column
    # reordering of the [P, P] result per batch, was memory-bound: a ResNet-18's
    # last layer (P = 5,130) took 0.54 s per batch of 32 there, 0.04 s here.
    def _add_dense(self, hessians: Tensor, phi: Tensor, total: Tensor | None) -> Tensor:
        """``total`` (zeros if ``None``) plus the batch's GGN, in place.

        See NOTE [The last layer's dense GGN, block by block].
        """
        num, classes = hessians.shape[:2]
        features = phi.shape[1]
        weights = classes * features
        if total is None:
            size = weights + (classes if self.has_bias else 0)
            total = phi.new_zeros(size, size)
        for c in range(classes):
            scaled = hessians[:, c, :, None] * phi[:, None, :]  # [N, C, d]
            rows = total[c * features : (c + 1) * features, :weights]
            rows.addmm_(phi.mT, scaled.reshape(num, weights))
        if self.has_bias:
            cross = torch.einsum("nce,ni->cie", hessians, phi)  # [C, d, C]
            total[:weights, weights:].view(classes, features, classes).add_(cross)
            total[weights:, :weights].view(classes, classes, features).add_(
                cross.permute(2, 0, 1)
            )
            total[weights:, weights:].add_(hessians.sum(0))
        return total

    def curvature_matmul(
        self, data: Iterable[tuple[Any, Tensor]]
    ) -> Callable[[Tensor], Tensor]:
        r"""Products with the last-layer GGN from the features, one pass per product.

        With :math:`V_k` the ``k``-th column as a ``[C, d+1]`` matrix (bias last),
        :math:`G V_k = \sum_n (\Lambda_n V_k \tilde\phi_n) \otimes
        \tilde\phi_n`: :math:`O(N C d k)` per product, no ``[P, P]`` matrix.
        """

        def matmul(block: Tensor) -> Tensor:
            total = torch.zeros_like(block)
            for inputs, targets in data:
                with torch.no_grad():
                    _, f, phi = self.features(inputs)
                f, phi = f.to(block.dtype), phi.to(block.dtype)
                aug = self._augmented(phi)  # [N, d']
                classes, width = f.shape[1], aug.shape[1]
                matrices = self._to_matrices(block, classes, width)  # [k, C, d']
                projected = torch.einsum("kcd,nd->nkc", matrices, aug)
                hessians = self._output_curvature(f, targets)  # [N, C, C]
                weighted = torch.einsum("nce,nke->nkc", hessians, projected)
                update = torch.einsum("nkc,nd->kcd", weighted, aug)
                total += self._from_matrices(update)
            return total

        return matmul

    def _to_matrices(self, block: Tensor, classes: int, width: int) -> Tensor:
        """Columns ``[P, k]`` (weight row-major, then bias) as ``[k, C, d']``."""
        cols = block.mT
        weight = cols[:, : classes * (width - self.has_bias)].reshape(
            -1, classes, width - self.has_bias
        )
        if not self.has_bias:
            return weight
        return torch.cat([weight, cols[:, -classes:, None]], dim=2)

    def _from_matrices(self, matrices: Tensor) -> Tensor:
        """Inverse of :meth:`_to_matrices`: ``[k, C, d']`` to ``[P, k]``."""
        if not self.has_bias:
            return matrices.flatten(1).mT
        weight, bias = matrices[..., :-1], matrices[..., -1]
        return torch.cat([weight.flatten(1), bias], dim=1).mT

    # ----------------------------------------------------------- predictive
    def jacobians(self, inputs: Any) -> tuple[Tensor, Tensor]:
        r"""Output ``[N, C]`` and :math:`J_n = [I_C \otimes \phi_n^\top, I_C]`."""
        _, f, phi = self.features(inputs)
        num, classes = f.shape
        eye = torch.eye(classes, dtype=phi.dtype, device=phi.device)
        weight = (eye[None, :, :, None] * phi[:, None, None, :]).reshape(
            num, classes, -1
        )
        parts = [weight] + (
            [eye.expand(num, classes, classes)] if self.has_bias else []
        )
        return f, torch.cat(parts, dim=2)

    def jacobian_segments(
        self, inputs: Any, differentiable: bool = False
    ) -> Iterator[tuple[Tensor, SegmentedJacobian]]:
        r"""Chunks of :math:`[I_C \otimes \phi_n^\top, I_C]` from one forward pass.

        The Jacobian stays factored (the features), so the functional variance has
        closed forms (:mod:`bayescurv.laplace.predict.variance`); chunks of samples
        bound the memory of what a structure expands (e.g. ``full``'s ``J R``).
        """
        del differentiable  # the features carry the graph if it is enabled
        _, f, phi = self.features(inputs)
        jacobian = SegmentedJacobian.last_layer(phi, f.shape[1], self.has_bias)
        per_sample = f.shape[1] * jacobian.num_params * phi.element_size()
        step = max(1, self.options.memory_budget // max(per_sample, 1))
        for start in range(0, len(f), step):
            yield f[start : start + step], jacobian.rows(start, start + step)

    def output(self, inputs: Any) -> Tensor:  # noqa: D102
        return self.features(inputs)[1]

    def state(self) -> dict[str, Any]:  # noqa: D102
        return {"last_layer_name": self.layer_name, **super().state()}


def last_layer(model: nn.Module, name: str) -> nn.Linear:
    """The module ``name`` of ``model``, checked to be a trainable ``nn.Linear``.

    Raises:
        ValueError: If there is no such module, it is not an ``nn.Linear`` or its
            weight is frozen.
    """
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"last_layer_name={name!r} is not a module of the model.")
    layer = modules[name]
    if type(layer) is not nn.Linear:
        raise ValueError(
            f"the last layer {name!r} is a {type(layer).__name__}; the last-layer "
            "Laplace needs an nn.Linear."
        )
    if not layer.weight.requires_grad:
        raise ValueError(f"the last layer {name!r} has a frozen weight.")
    _check_untied(model, name, layer)
    return layer


def _check_untied(model: nn.Module, name: str, layer: nn.Linear) -> None:
    """Raise if the layer's parameters are used by another module (tied weights).

    The closed forms assume the output depends on them through this layer only.
    """
    own = {id(p) for p in layer.parameters(recurse=False)}
    for other_name, module in model.named_modules():
        if module is layer:
            continue
        shared = [
            local for local, p in module.named_parameters(recurse=False) if id(p) in own
        ]
        if shared:
            raise ValueError(
                f"the last layer {name!r} shares its parameters with {other_name!r} "
                f"({shared}, tied weights): its closed forms would miss the other use. "
                "Use subset_of_weights='subnetwork' with "
                f"ParamNameSubnetMask(model, ['{name}.weight']) (the engine sums the "
                "contributions of every use) or subset_of_weights='all'."
            )


def find_last_layer(model: nn.Module, inputs: Any) -> str:
    """The name of the last trainable ``nn.Linear`` called on ``inputs``.

    Raises:
        ValueError: If the forward pass calls no trainable ``nn.Linear``, or the
            last ``nn.Linear`` it calls is frozen.
    """
    calls: list[str] = []
    names = {
        module: name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
    }
    hooks = [
        module.register_forward_hook(lambda m, a, o: calls.append(names[m]))
        for module in names
    ]
    try:
        with torch.no_grad():  # one example names the layer as well as a batch
            try:
                call_model(model, first_example(inputs))
            except Exception:  # raise the error of the whole batch, naming its shape
                calls.clear()
                call_model(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    by_name = {name: module for module, name in names.items()}
    trainable = [n for n in calls if by_name[n].weight.requires_grad]
    if calls and calls[-1] not in trainable:
        raise ValueError(
            f"the last nn.Linear layer called, {calls[-1]!r}, has a frozen weight; "
            "the last-layer Laplace needs the output layer trainable (set "
            "requires_grad=True on it, or use subset_of_weights='all' or "
            "'subnetwork' for the trainable weights)."
        )
    if not trainable:
        raise ValueError(
            "subset_of_weights='last_layer' found no trainable nn.Linear layer called "
            "in the model's forward pass."
        )
    return trainable[-1]
