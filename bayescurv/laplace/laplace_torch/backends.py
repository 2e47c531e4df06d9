r"""laplace-torch's curvature backends, every one computed by bayescurv's engine.

laplace-torch computes curvature through interchangeable third-party backends
(BackPACK, ASDL, curvlinops, asdfghjkl). Here the backend is collapsed to
:mod:`bayescurv.engine`: all classes of one curvature type compute the same matrix,
and the class names only say *which* curvature a Laplace fit uses
(:attr:`CurvatureInterface.curvature`):

* ``"ggn"`` (:class:`GGNInterface`, ``BackPackGGN``, ``AsdlGGN``, ...): the
  generalized Gauss-Newton matrix, or with ``stochastic=True`` its Monte Carlo
  estimate (the Fisher);
* ``"ef"`` (:class:`EFInterface`, ``BackPackEF``, ...): the empirical Fisher
  :math:`\sum_n g_n g_n^\top` of the individual loss gradients;
* ``"hessian"`` (:class:`HessianInterface`, ``AsdlHessian``, ...): the Hessian of
  the loss.

Conventions (laplace-torch's): the loss is ``lossfunc`` with ``reduction="sum"``
(``MSELoss`` for regression, ``CrossEntropyLoss`` for classification) times
``factor`` (:math:`\tfrac12` for regression, turning the squared error into the unit
Gaussian's negative log likelihood, 1 otherwise); every method returns ``(factor *
loss, factor * curvature)`` over the weights of the interface — all trainable
weights, the last layer (``last_layer=True``, ``model`` a
:class:`~bayescurv.laplace.laplace_torch.feature_extractor.FeatureExtractor`) or the
entries
``subnetwork_indices`` of them — flattened in ``named_parameters()`` order. The
empirical Fisher uses the gradients of ``lossfunc`` itself, so for regression it is
:math:`\tfrac12 \sum_n (2 r_n)(2 r_n)^\top` with the residual gradient :math:`r_n`,
as in every laplace-torch backend. ``kron`` returns a
:class:`~bayescurv.laplace.laplace_torch.matrix.Kron` whose input-side factors are
averaged over the ``N`` data points of the whole data set (the batch contributes
``len(y) / N``), so the factors of all batches add up
(:meth:`~bayescurv.laplace.laplace_torch.matrix.Kron.__add__`).

Engine quantities (on the interface's weights via ``params=``, with no ``.grad`` side
effect): the ``Jacobian`` extension; ``DiagGGNExact``/``DiagGGNMC``, ``KFLR``/``KFAC``,
:func:`~bayescurv.engine.ggn_matrix` and ``SqrtGGNExact``/``SqrtGGNMC`` (GGN);
``BatchGrad``, ``SumGradSquared`` and ``KFLR`` of a projected output (empirical
Fisher, see the NOTE in :class:`EFInterface`); ``DiagHessian`` and
:func:`~bayescurv.engine.hessian_vector_product` (Hessian).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    >>> backend = BackPackGGN(model, "classification")
    >>> loss, diagonal = backend.diag(x, y)
    >>> _, dense = backend.full(x, y)
    >>> backend.curvature, torch.allclose(dense.diagonal(), diagonal, atol=1e-6)
    ('ggn', True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bayescurv import engine
from bayescurv.laplace.data import ProjectedOutput, engine_call
from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor
from bayescurv.laplace.laplace_torch.matrix import Kron
from bayescurv.laplace.sources.last_layer import Reduction

__all__ = [
    "AsdfghjklEF",
    "AsdfghjklGGN",
    "AsdfghjklHessian",
    "AsdfghjklInterface",
    "AsdlEF",
    "AsdlGGN",
    "AsdlHessian",
    "AsdlInterface",
    "BackPackEF",
    "BackPackGGN",
    "BackPackInterface",
    "CurvatureInterface",
    "CurvlinopsEF",
    "CurvlinopsGGN",
    "CurvlinopsHessian",
    "CurvlinopsInterface",
    "EFInterface",
    "GGNInterface",
    "HessianInterface",
]

_LOSSES: dict[str, tuple[type[nn.Module], float]] = {
    "regression": (nn.MSELoss, 0.5),
    "classification": (nn.CrossEntropyLoss, 1.0),
    "reward_modeling": (nn.CrossEntropyLoss, 1.0),
    "binary": (nn.BCEWithLogitsLoss, 1.0),
}


def _loss_of(likelihood: Any) -> tuple[str, nn.Module, float]:
    """The likelihood's name, its sum-reduced torch loss and laplace-torch's factor.

    Raises:
        ValueError: For an unknown likelihood.
    """
    name = getattr(likelihood, "value", likelihood)
    if name not in _LOSSES:
        raise ValueError(
            f"unknown likelihood {likelihood!r}; valid values: "
            f"{', '.join(map(repr, _LOSSES))}."
        )
    loss_class, factor = _LOSSES[name]
    return name, loss_class(reduction="sum"), factor


def _check_options(kwargs: dict[str, Any], allowed: set[str], method: str) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"{method}() got unsupported keyword arguments {unknown}; supported: "
            f"{sorted(allowed)}."
        )


class CurvatureInterface:
    r"""Jacobians and individual gradients of a model; the base of every backend.

    ``full``, ``kron`` and ``diag`` are implemented by the curvature types
    (:class:`GGNInterface`, :class:`EFInterface`, :class:`HessianInterface`).

    Args:
        model: The model; for ``last_layer=True`` a ``FeatureExtractor``
            (:mod:`bayescurv.laplace.laplace_torch.feature_extractor`) with a known
            last layer, or see ``last_layer_name``.
        likelihood: ``"classification"``, ``"regression"`` (also ``"binary"``
            and ``"reward_modeling"``, the latter with the classification loss).
        last_layer: Only the last layer's weights.
        subnetwork_indices: Only these entries of the flattened trainable weights
            (``[k]`` integer indices).
        dict_key_x: Key of the inputs in dict batches.
        dict_key_y: Key of the targets in dict batches.
        generator: Randomness of Monte Carlo quantities (default: torch's global
            generator).
        last_layer_name: With ``last_layer=True`` and a plain model (or a
            ``FeatureExtractor`` that has not found its layer yet): the last layer's
            name; the model is then wrapped in a ``FeatureExtractor``.
        feature_reduction: The wrapping ``FeatureExtractor``'s ``feature_reduction``.

    Attributes:
        curvature: ``"ggn"``, ``"ef"`` or ``"hessian"`` for the curvature types,
            ``None`` here.
        stochastic: Whether the curvature is a Monte Carlo estimate.
        lossfunc: The sum-reduced torch loss.
        factor: From ``lossfunc`` to the likelihood's negative log likelihood.
        params: The interface's weights (trainable tensors of ``_model``).

    Raises:
        ValueError: For an unknown likelihood, ``last_layer=True`` without a known
            last layer, no trainable weights, or invalid ``subnetwork_indices``.
    """

    curvature: ClassVar[str | None] = None
    stochastic: bool = False

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        *,
        generator: torch.Generator | None = None,
        last_layer_name: str | None = None,
        feature_reduction: Reduction = None,
    ) -> None:
        self.likelihood, self.lossfunc, self.factor = _loss_of(likelihood)
        self.last_layer = last_layer
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self.generator = generator
        if last_layer and getattr(model, "last_layer", None) is None:
            if last_layer_name is None:
                raise ValueError(
                    "last_layer=True needs a FeatureExtractor whose last layer is "
                    "known, or last_layer_name=..."
                )
            if not isinstance(model, FeatureExtractor):
                model = FeatureExtractor(model, feature_reduction=feature_reduction)
            model.set_last_layer(last_layer_name)
        self.model = model
        self.params_dict = {
            n: p for n, p in self._model.named_parameters() if p.requires_grad
        }
        self.params = list(self.params_dict.values())
        if not self.params:
            raise ValueError(f"{type(self).__name__}: no trainable weights.")
        self.buffers_dict = dict(self.model.named_buffers())
        self.subnetwork_indices = self._checked_indices(subnetwork_indices)

    @property
    def _model(self) -> nn.Module:
        return self.model.last_layer if self.last_layer else self.model

    @property
    def num_params(self) -> int:
        """The number of entries the curvature is over (after subnetwork selection)."""
        if self.subnetwork_indices is not None:
            return len(self.subnetwork_indices)
        return sum(p.numel() for p in self.params)

    def _checked_indices(self, indices: Tensor | None) -> Tensor | None:
        if indices is None:
            return None
        size = sum(p.numel() for p in self.params)
        if (
            not isinstance(indices, Tensor)
            or indices.ndim != 1
            or indices.is_floating_point()
            or len(indices) == 0
            or indices.min() < 0
            or indices.max() >= size
        ):
            raise ValueError(
                f"subnetwork_indices must be a non-empty 1-D integer tensor of "
                f"indices in [0, {size}) (the flattened trainable weights)."
            )
        return indices

    # ---------------------------------------------------------------- engine
    def _engine(
        self,
        x: Any,
        y: Tensor | None,
        extensions: list[engine.Extension],
        loss: nn.Module | None,
        *,
        wrap: type[nn.Module] | None = None,
        create_graph: bool = False,
    ) -> tuple[engine.BackpropResult, list[str]]:
        """One engine call on the interface's weights and their result names.

        ``.grad`` is not touched; ``wrap(adapter)``, if given, replaces the model the
        engine sees.
        """
        adapter, args = engine_call(self.model, x)
        module = adapter if wrap is None else wrap(adapter)
        names = {id(p): n for n, p in module.named_parameters()}
        res = engine.backprop(
            module,
            loss,
            args,
            y,
            extensions,
            params=self.params,
            accumulate_grad=False,
            create_graph=create_graph,
            generator=self.generator,
        )
        return res, [names[id(p)] for p in self.params]

    def _select(self, flat: Tensor, dims: Sequence[int] = (-1,)) -> Tensor:
        """Restrict the weight axes ``dims`` of a tensor to the subnetwork."""
        if self.subnetwork_indices is None:
            return flat
        index = self.subnetwork_indices.to(flat.device)
        for dim in dims:
            flat = flat.index_select(dim, index)
        return flat

    def _flat(self, values: dict[str, Tensor], names: list[str], lead: int) -> Tensor:
        """``[*lead_shape, P]`` from per-parameter ``[*lead_shape, *p]`` results."""
        flat = torch.cat([values[n].flatten(start_dim=lead) for n in names], lead)
        return self._select(flat)

    # ------------------------------------------------------------- Jacobians
    def jacobians(self, x: Any, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        r"""Per-sample Jacobians of the model output w.r.t. the interface's weights.

        The engine's :class:`~bayescurv.engine.Jacobian` extension (one batched
        backward pass, chunked under the engine's memory budget).

        Args:
            x: Inputs ``[N, ...]`` (tensor, tuple or dict).
            enable_backprop: Keep the autograd graph (w.r.t. ``x`` and the weights).

        Returns:
            ``Js`` ``[N, C, P]`` and the output ``f`` ``[N, C]``.
        """
        res, names = self._engine(
            x, None, [engine.Jacobian()], None, create_graph=enable_backprop
        )
        js = self._flat(res["jacobian"], names, 2).movedim(0, 1)  # [N, C, P]
        f = res.output.reshape(len(js), -1)
        return (js, f) if enable_backprop else (js.detach(), f.detach())

    functorch_jacobians = jacobians

    def last_layer_jacobians(
        self, x: Any, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        r"""Jacobians w.r.t. the last layer, in closed form from its features.

        For :math:`f = W \phi + b`: :math:`J_n = [I_C \otimes \phi_n^\top, I_C]`
        (bias columns only if the bias is trainable).

        Args:
            x: Inputs; ``model`` must be a ``FeatureExtractor`` whose features are
                ``[N, d]`` (set its ``feature_reduction`` for ``[N, *T, d]``).
            enable_backprop: Keep the autograd graph.

        Returns:
            ``Js`` ``[N, C, P_last]`` and ``f`` ``[N, C]``.
        """
        f, phi = self.model.forward_with_features(x)
        if phi.ndim != 2:
            raise ValueError(
                f"last_layer_jacobians needs [N, d] features, got {list(phi.shape)};"
                " set the FeatureExtractor's feature_reduction."
            )
        f = f.reshape(len(phi), -1)
        eye = torch.eye(f.shape[1], dtype=phi.dtype, device=phi.device)
        layer = self.model.last_layer
        parts = []
        if layer.weight.requires_grad:
            parts.append(torch.einsum("cd,np->ncdp", eye, phi).flatten(2))
        if layer.bias is not None and layer.bias.requires_grad:
            parts.append(eye.expand(len(phi), -1, -1))
        js = torch.cat(parts, dim=2)
        return (js, f) if enable_backprop else (js.detach(), f.detach())

    def gradients(self, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        """Individual gradients of ``lossfunc`` (engine ``BatchGrad``).

        Returns:
            ``Gs`` ``[N, P]`` and the summed loss (no ``factor``).
        """
        res, names = self._engine(x, y, [engine.BatchGrad()], self.lossfunc)
        return self._flat(res["grad_batch"], names, 1), res.loss

    # -------------------------------------------------------------- curvature
    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The dense curvature ``[P, P]`` and the loss (curvature types only)."""
        raise NotImplementedError(self._missing("full"))

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """Kronecker factors of the curvature and the loss (curvature types only)."""
        raise NotImplementedError(self._missing("kron"))

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The curvature's diagonal ``[P]`` and the loss (curvature types only)."""
        raise NotImplementedError(self._missing("diag"))

    def _missing(self, method: str) -> str:
        return (
            f"{type(self).__name__} defines no curvature; use a GGN, EF or Hessian "
            f"interface for {method}()."
        )

    # ------------------------------------------------------- Kronecker helpers
    def _check_kron(self, N: int) -> None:
        if self.subnetwork_indices is not None:
            raise ValueError(
                "kron: a subnetwork of entries has no Kronecker structure; use full "
                "or diag."
            )
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"kron: N must be a positive int, got {N!r}.")

    def _as_kron(
        self, values: dict[str, list[Tensor]], names: list[str], batch: int, N: int
    ) -> Kron:
        """The engine's factors with the input side rescaled to a mean over ``N``."""
        embeddings = {
            id(p)
            for m in self.model.modules()
            if isinstance(m, nn.Embedding)
            for p in m.parameters(recurse=False)
        }
        kfacs = []
        for p, name in zip(self.params, names, strict=True):
            factors = values[name]
            side = None if len(factors) < 2 else (0 if id(p) in embeddings else 1)
            kfacs.append(
                [f * (batch / N) if i == side else f for i, f in enumerate(factors)]
            )
        return Kron(kfacs) * self.factor


class GGNInterface(CurvatureInterface):
    """The generalized Gauss-Newton matrix (or its Monte Carlo estimate).

    Args:
        model: See :class:`CurvatureInterface`.
        likelihood: See :class:`CurvatureInterface`.
        last_layer: See :class:`CurvatureInterface`.
        subnetwork_indices: See :class:`CurvatureInterface`.
        dict_key_x: See :class:`CurvatureInterface`.
        dict_key_y: See :class:`CurvatureInterface`.
        stochastic: Monte Carlo GGN (the Fisher) instead of the exact GGN.
        num_samples: Monte Carlo samples per data point (``mc_samples=`` of a call
            overrides it).
        **options: Keyword options of :class:`CurvatureInterface` (``generator``,
            ``last_layer_name``, ``feature_reduction``).
    """

    curvature: ClassVar[str] = "ggn"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **options,
        )
        self.stochastic = stochastic
        self.num_samples = num_samples

    def _samples(self, kwargs: dict[str, Any]) -> int:
        return kwargs.get("mc_samples", self.num_samples)

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The dense GGN ``[P, P]`` and the loss (``mc_samples=`` if stochastic)."""
        _check_options(kwargs, {"N", "mc_samples"}, "full")
        if not self.stochastic and self.subnetwork_indices is None:
            adapter, args = engine_call(self.model, x)
            dense, output = engine.ggn_matrix(
                adapter, self.lossfunc, args, y, params=self.params, return_output=True
            )
            loss = self.lossfunc(output, y)
            return self.factor * loss, self.factor * dense
        ext = (
            engine.SqrtGGNMC(mc_samples=self._samples(kwargs))
            if self.stochastic
            else engine.SqrtGGNExact(fewest=True)  # only root^T root is used
        )
        res, names = self._engine(x, y, [ext], self.lossfunc)
        root = self._flat(res[ext.savefield], names, 2).flatten(end_dim=1)
        return self.factor * res.loss, self.factor * (root.mT @ root)

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The GGN diagonal ``[P]`` and the loss (``mc_samples=`` if stochastic)."""
        _check_options(kwargs, {"N", "mc_samples"}, "diag")
        ext = (
            engine.DiagGGNMC(mc_samples=self._samples(kwargs))
            if self.stochastic
            else engine.DiagGGNExact()
        )
        res, names = self._engine(x, y, [ext], self.lossfunc)
        return self.factor * res.loss, self.factor * self._flat(
            res[ext.savefield], names, 0
        )

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """KFLR (KFAC if stochastic) factors and the loss.

        Args:
            x: Inputs of the batch.
            y: Targets of the batch.
            N: Size of the whole data set.
            **kwargs: ``mc_samples`` (stochastic) and ``kfac_approx``
                (``"expand"`` or ``"reduce"``, see :class:`~bayescurv.engine.KFAC`).
        """
        _check_options(kwargs, {"mc_samples", "kfac_approx"}, "kron")
        self._check_kron(N)
        approx = kwargs.get("kfac_approx", "expand")
        ext = (
            engine.KFAC(mc_samples=self._samples(kwargs), kfac_approx=approx)
            if self.stochastic
            else engine.KFLR(kfac_approx=approx)
        )
        res, names = self._engine(x, y, [ext], self.lossfunc)
        kron = self._as_kron(res[ext.savefield], names, len(y), N)
        return self.factor * res.loss, kron


class EFInterface(CurvatureInterface):
    r"""The empirical Fisher :math:`\text{factor} \cdot \sum_n g_n g_n^\top`.

    :math:`g_n` are the individual gradients of ``lossfunc``.

    # NOTE [The empirical Fisher's Kronecker factors]
    # With r_n = d lossfunc / d f_n fixed at the current weights, the projected output
    # h_n = <r_n, f_n> has Jacobian r_n^T J_n, so the GGN of sum_n (h_n - t_n)^2 is
    # 2 sum_n J_n^T r_n r_n^T J_n = 2 EF. KFLR on that projected model gives B factors
    # built from the backpropagated gradients at every layer output, exactly the
    # empirical-Fisher KFAC (B = sum of gradient outer products, A = mean input outer
    # products); the factor 2 is divided out. One engine pass, no per-layer code.
    """

    curvature: ClassVar[str] = "ef"

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The dense empirical Fisher ``[P, P]`` and the loss."""
        _check_options(kwargs, {"N"}, "full")
        grads, loss = self.gradients(x, y)
        return self.factor * loss, self.factor * (grads.mT @ grads)

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The empirical Fisher's diagonal ``[P]`` (``SumGradSquared``) and the loss."""
        _check_options(kwargs, {"N"}, "diag")
        res, names = self._engine(x, y, [engine.SumGradSquared()], self.lossfunc)
        return self.factor * res.loss, self.factor * self._flat(
            res["sum_grad_squared"], names, 0
        )

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """Empirical-Fisher KFAC factors (see the class NOTE) and the loss.

        Args:
            x: Inputs of the batch.
            y: Targets of the batch.
            N: Size of the whole data set.
            **kwargs: ``kfac_approx`` (``"expand"`` or ``"reduce"``).
        """
        _check_options(kwargs, {"kfac_approx"}, "kron")
        self._check_kron(N)
        adapter, args = engine_call(self.model, x)
        with torch.enable_grad():
            output = adapter(*args)
            loss = self.lossfunc(output, y)
            (residuals,) = torch.autograd.grad(loss, output)
        ext = engine.KFLR(kfac_approx=kwargs.get("kfac_approx", "expand"))
        res, names = self._engine(
            x,
            torch.zeros(len(output), 1, dtype=output.dtype, device=output.device),
            [ext],
            nn.MSELoss(reduction="sum"),
            wrap=lambda module: ProjectedOutput(module, residuals.detach()),
        )
        kron = self._as_kron(res[ext.savefield], names, len(y), N) * 0.5
        return self.factor * loss.detach(), kron


class HessianInterface(CurvatureInterface):
    """The Hessian of ``factor * lossfunc`` w.r.t. the interface's weights."""

    curvature: ClassVar[str] = "hessian"

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The dense Hessian ``[P, P]`` (one Hessian-vector product per column)."""
        _check_options(kwargs, {"N"}, "full")
        adapter, args = engine_call(self.model, x)
        size = sum(p.numel() for p in self.params)
        like = self.params[0]
        eye = torch.eye(size, dtype=like.dtype, device=like.device)
        columns = self._select(eye, dims=(0,))  # [k, P]: unit vectors of the subset
        products = engine.hessian_vector_product(
            adapter, self.lossfunc, args, y, columns, params=self.params
        )
        with torch.no_grad():
            loss = self.lossfunc(adapter(*args), y)
        return self.factor * loss, self.factor * self._select(products)

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The Hessian's diagonal ``[P]`` (engine ``DiagHessian``) and the loss."""
        _check_options(kwargs, {"N"}, "diag")
        res, names = self._engine(x, y, [engine.DiagHessian()], self.lossfunc)
        return self.factor * res.loss, self.factor * self._flat(res["diag_h"], names, 0)

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """Not available: the Hessian has no Kronecker factorization here."""
        raise NotImplementedError(
            f"{type(self).__name__}: the Hessian has no Kronecker factors; use a GGN "
            "or EF backend for hessian_structure='kron'."
        )


# ----------------------------------------------------- laplace-torch's names
# The GGN and Curvlinops classes keep GGNInterface's signature (laplace-torch's
# positional arguments, plus num_samples and generator); ASDL's and asdfghjkl's EF and
# Hessian classes take no subnetwork_indices there, so their positions differ.
def _without_subnetwork(
    self: CurvatureInterface,
    model: nn.Module,
    likelihood: Any,
    last_layer: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    **options: Any,
) -> None:
    """``__init__`` of the backends without ``subnetwork_indices`` in laplace-torch.

    ``options``: the keyword options of :class:`CurvatureInterface`.
    """
    CurvatureInterface.__init__(
        self, model, likelihood, last_layer, None, dict_key_x, dict_key_y, **options
    )


class BackPackInterface(CurvatureInterface):
    """laplace-torch's BackPACK backend, computed by the engine."""


class BackPackGGN(BackPackInterface, GGNInterface):
    """laplace-torch's ``BackPackGGN``: the (Monte Carlo) GGN."""


class BackPackEF(BackPackInterface, EFInterface):
    """laplace-torch's ``BackPackEF``: the empirical Fisher (with ``kron`` here)."""


class AsdlInterface(CurvatureInterface):
    """laplace-torch's ASDL backend, computed by the engine."""


class AsdlGGN(AsdlInterface, GGNInterface):
    """laplace-torch's ``AsdlGGN``: the (Monte Carlo) GGN."""


class AsdlEF(AsdlInterface, EFInterface):
    """laplace-torch's ``AsdlEF``: the empirical Fisher (no subnetworks there)."""

    __init__ = _without_subnetwork


class AsdlHessian(AsdlInterface, HessianInterface):
    """laplace-torch's ``AsdlHessian``: the Hessian (``diag`` too here)."""

    __init__ = _without_subnetwork


class CurvlinopsInterface(CurvatureInterface):
    """laplace-torch's curvlinops backend, computed by the engine."""


class CurvlinopsGGN(CurvlinopsInterface, GGNInterface):
    """laplace-torch's ``CurvlinopsGGN``: the (Monte Carlo) GGN."""


class CurvlinopsEF(CurvlinopsInterface, EFInterface):
    """laplace-torch's ``CurvlinopsEF``: the empirical Fisher."""


class CurvlinopsHessian(CurvlinopsInterface, HessianInterface):
    """laplace-torch's ``CurvlinopsHessian``: the Hessian (``diag`` too here)."""


class AsdfghjklInterface(CurvatureInterface):
    """laplace-torch's asdfghjkl backend, computed by the engine."""


class AsdfghjklGGN(AsdfghjklInterface, GGNInterface):
    """laplace-torch's ``AsdfghjklGGN`` (every likelihood here)."""


class AsdfghjklEF(AsdfghjklInterface, EFInterface):
    """laplace-torch's ``AsdfghjklEF`` (every likelihood here)."""

    __init__ = _without_subnetwork


class AsdfghjklHessian(AsdfghjklInterface, HessianInterface):
    """laplace-torch's ``AsdfghjklHessian`` (``full`` and ``diag``).

    Args:
        model: See :class:`CurvatureInterface`.
        likelihood: See :class:`CurvatureInterface`.
        last_layer: See :class:`CurvatureInterface`.
        dict_key_x: See :class:`CurvatureInterface`.
        dict_key_y: See :class:`CurvatureInterface`.
        low_rank: Kept for laplace-torch's signature (its ``eig_lowrank``; use
            ``hessian_structure="lowrank"`` for a low-rank posterior).
        **options: Keyword options of :class:`CurvatureInterface`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        low_rank: int = 10,
        **options: Any,
    ) -> None:
        _without_subnetwork(
            self, model, likelihood, last_layer, dict_key_x, dict_key_y, **options
        )
        self.low_rank = low_rank
