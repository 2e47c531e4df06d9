r"""BackPACK's extensions, computed by the bayescurv engine.

Drop-in replacements for ``backpack.extensions``: same class names, arguments and
savefields, same shapes and scaling (for ``reduction="mean"`` the ``1/N`` factor is
inside every quantity). Pass instances to :class:`~bayescurv.compat.backpack.backpack`;
after ``loss.backward()`` every trainable parameter ``p`` of the extended model holds
the result in ``p.<savefield>``.

=====================  =======================  ===================================
extension              savefield                value per parameter ``p``
=====================  =======================  ===================================
``BatchGrad``          ``grad_batch``           ``[N, *p]``
``BatchL2Grad``        ``batch_l2``             ``[N]``
``SumGradSquared``     ``sum_grad_squared``     ``[*p]``
``Variance``           ``variance``             ``[*p]``
``BatchDotGrad``       ``batch_dot``            ``[N, N]``
``DiagGGNExact``       ``diag_ggn_exact``       ``[*p]``
``DiagGGNMC``          ``diag_ggn_mc``          ``[*p]``
``BatchDiagGGNExact``  ``diag_ggn_exact_batch`` ``[N, *p]``
``BatchDiagGGNMC``     ``diag_ggn_mc_batch``    ``[N, *p]``
``DiagHessian``        ``diag_h``               ``[*p]``
``BatchDiagHessian``   ``diag_h_batch``         ``[N, *p]``
``SqrtGGNExact``       ``sqrt_ggn_exact``       ``[C, N, *p]``
``SqrtGGNMC``          ``sqrt_ggn_mc``          ``[M, N, *p]``
``KFAC``               ``kfac``                 ``[B, A]`` (weights), ``[B]`` (biases)
``KFLR``               ``kflr``                 as ``KFAC``
``KFRA``               ``kfra``                 as ``KFAC``
``GGNMP``              ``ggnmp``                ``V: [K, *p] -> [K, *p]``
``HMP``                ``hmp``                  ``V: [K, *p] -> [K, *p]``
``PCHMP``              ``pchmp``                ``V: [K, *p] -> [K, *p]``
=====================  =======================  ===================================

First-order extensions are the per-sample pieces of the gradient that reaches the
extended module's output (any scalar function of the output works, as in BackPACK);
the others need the loss: an extended ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or
``nn.BCEWithLogitsLoss`` applied directly to that output.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from enum import Enum
from typing import ClassVar

from torch import Tensor, nn

from bayescurv import engine


class Order(str, Enum):
    """What an extension needs from the backward pass."""

    FIRST = "first"
    """The gradient w.r.t. the module output (any scalar function of it)."""
    SECOND = "second"
    """The extended loss module (its Hessian w.r.t. the output)."""
    PRODUCT = "product"
    """The extended loss module; the result is a function (block products)."""


class BackpropExtension:
    """Base class of the extensions (BackPACK's ``BackpropExtension``).

    Args:
        savefield: The attribute of every parameter the result is stored in.
    """

    order: ClassVar[Order] = Order.SECOND

    def __init__(self, savefield: str) -> None:
        if not isinstance(savefield, str) or not savefield.isidentifier():
            raise ValueError(
                f"{type(self).__name__}: savefield must be a valid attribute name, "
                f"got {savefield!r}."
            )
        self.savefield = savefield

    def engine_extension(self) -> engine.Extension | None:
        """The engine extension that computes this quantity (``None`` for products)."""
        return None

    def select(self, value: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """The stored value from the engine's (default: unchanged)."""
        return value

    def set_module_extension(
        self, module: type[nn.Module], extension: object, overwrite: bool = False
    ) -> None:
        """BackPACK's hook for custom modules: not needed here, ignored with a warning.

        The engine computes every extension for a layer without a rule through its
        generic ``torch.func`` rule (exactly; Kronecker factors need a rule), so the
        BackPACK module extension is not used.
        """
        warnings.warn(
            f"{type(self).__name__}.set_module_extension({module.__name__}, ...) is "
            "ignored: bayescurv needs no per-extension module code. A layer with "
            "trainable parameters and no engine rule goes through the generic "
            "torch.func rule; for speed (and Kronecker factors) subclass "
            "bayescurv.engine.LayerRule and call "
            f"bayescurv.engine.register_rule({module.__name__}, MyRule()).",
            UserWarning,
            stacklevel=2,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(savefield={self.savefield!r})"


class _EngineBacked(BackpropExtension):
    """An extension computed by one engine extension of the same savefield."""

    def __init__(self, ext: engine.Extension) -> None:
        super().__init__(ext.savefield)
        self._ext = ext

    def engine_extension(self) -> engine.Extension:
        """The engine extension that computes this quantity."""
        return self._ext


class _Subsampled(_EngineBacked):
    """Results for the samples ``subsampling`` only (BackPACK's ``subsampling``).

    # NOTE [Subsampling]
    # BackPACK computes subsampled quantities for the active samples only, with the
    # scaling of the full batch (a mean-reduced loss keeps its 1/N). Selecting the
    # active samples of the full-batch result gives exactly those numbers.
    """

    sample_axis: ClassVar[int] = 0

    def __init__(
        self, ext: engine.Extension, subsampling: Sequence[int] | None
    ) -> None:
        super().__init__(ext)
        if subsampling is not None:
            subsampling = list(subsampling)
            if not subsampling or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in subsampling
            ):
                raise ValueError(
                    f"{type(self).__name__}: subsampling must be a non-empty list of "
                    f"sample indices or None, got {subsampling!r}."
                )
        self.subsampling = subsampling

    def select(self, value: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """The active samples of ``value`` (all of them without ``subsampling``).

        Raises:
            IndexError: If an index is outside the batch.
        """
        if self.subsampling is None or not isinstance(value, Tensor):
            return value
        size = value.shape[self.sample_axis]
        bad = [i for i in self.subsampling if not -size <= i < size]
        if bad:
            raise IndexError(
                f"{type(self).__name__}: subsampling indices {bad} are outside the "
                f"batch of {size} samples."
            )
        return value[(slice(None),) * self.sample_axis + (self.subsampling,)]


class BatchGrad(_Subsampled):
    """Individual gradients, ``grad_batch`` ``[N, *p]`` (``len(subsampling)`` rows).

    Args:
        subsampling: Indices of the samples to return (default: all).
    """

    order = Order.FIRST

    def __init__(self, subsampling: Sequence[int] | None = None) -> None:
        super().__init__(engine.BatchGrad(), subsampling)


class BatchL2Grad(_EngineBacked):
    """Squared norms of the individual gradients, ``batch_l2`` ``[N]``."""

    order = Order.FIRST

    def __init__(self) -> None:
        super().__init__(engine.BatchL2Grad())


class SumGradSquared(_EngineBacked):
    """Sum of the squared individual gradients, ``sum_grad_squared`` ``[*p]``."""

    order = Order.FIRST

    def __init__(self) -> None:
        super().__init__(engine.SumGradSquared())


class Variance(_EngineBacked):
    """Element-wise variance of the individual gradients, ``variance`` ``[*p]``."""

    order = Order.FIRST

    def __init__(self) -> None:
        super().__init__(engine.Variance())


class BatchDotGrad(_EngineBacked):
    """Pairwise dot products of individual gradients, ``batch_dot`` ``[N, N]``.

    Not part of backpack-for-pytorch 1.7.1's public extensions; provided for code
    written against BackPACK's development versions and Cockpit.
    """

    order = Order.FIRST

    def __init__(self) -> None:
        super().__init__(engine.BatchDotGrad())


class DiagGGNExact(_EngineBacked):
    """Diagonal of the GGN, ``diag_ggn_exact`` ``[*p]``."""

    def __init__(self) -> None:
        super().__init__(engine.DiagGGNExact())


class DiagGGNMC(_EngineBacked):
    """Monte Carlo GGN (Fisher) diagonal, ``diag_ggn_mc`` ``[*p]``.

    Args:
        mc_samples: Sampled loss-Hessian square-root columns per sample.
    """

    def __init__(self, mc_samples: int = 1) -> None:
        super().__init__(engine.DiagGGNMC(mc_samples=mc_samples))


class BatchDiagGGNExact(_EngineBacked):
    """Per-sample GGN diagonals, ``diag_ggn_exact_batch`` ``[N, *p]``."""

    def __init__(self) -> None:
        super().__init__(engine.BatchDiagGGNExact())


class BatchDiagGGNMC(_EngineBacked):
    """Per-sample Monte Carlo GGN diagonals, ``diag_ggn_mc_batch`` ``[N, *p]``.

    Args:
        mc_samples: Sampled loss-Hessian square-root columns per sample.
    """

    def __init__(self, mc_samples: int = 1) -> None:
        super().__init__(engine.BatchDiagGGNMC(mc_samples=mc_samples))


class DiagHessian(_EngineBacked):
    """Diagonal of the Hessian, ``diag_h`` ``[*p]``."""

    def __init__(self) -> None:
        super().__init__(engine.DiagHessian())


class BatchDiagHessian(_EngineBacked):
    """Per-sample Hessian diagonals, ``diag_h_batch`` ``[N, *p]``."""

    def __init__(self) -> None:
        super().__init__(engine.BatchDiagHessian())


class SqrtGGNExact(_Subsampled):
    """Symmetric factorization of the GGN, ``sqrt_ggn_exact`` ``[C, N, *p]``.

    Args:
        subsampling: Indices of the samples to return (default: all).
    """

    sample_axis = 1

    def __init__(self, subsampling: Sequence[int] | None = None) -> None:
        super().__init__(engine.SqrtGGNExact(), subsampling)


class SqrtGGNMC(_Subsampled):
    """Monte Carlo factorization of the GGN, ``sqrt_ggn_mc`` ``[M, N, *p]``.

    Args:
        mc_samples: Sampled loss-Hessian square-root columns per sample ``M``.
        subsampling: Indices of the samples to return (default: all).
    """

    sample_axis = 1

    def __init__(
        self, mc_samples: int = 1, subsampling: Sequence[int] | None = None
    ) -> None:
        super().__init__(engine.SqrtGGNMC(mc_samples=mc_samples), subsampling)


class KFAC(_EngineBacked):
    """Kronecker-factored Monte Carlo GGN, ``kfac``.

    Factors in BackPACK's convention: ``[B, A]`` for ``Linear`` weights as the
    engine's; for convolution weights ``[B_reduce, L * A_expand]`` (see
    ``docs/migrating_backpack.md``).

    Args:
        mc_samples: Sampled loss-Hessian square-root columns per sample.
    """

    def __init__(self, mc_samples: int = 1) -> None:
        super().__init__(engine.KFAC(mc_samples=mc_samples))


class KFLR(_EngineBacked):
    """Kronecker-factored exact GGN, ``kflr`` (convolutions as for :class:`KFAC`)."""

    def __init__(self) -> None:
        super().__init__(engine.KFLR())


class KFRA(_EngineBacked):
    """Kronecker-factored recursive approximation, ``kfra`` (chains of ``Linear``)."""

    def __init__(self) -> None:
        super().__init__(engine.KFRA())


class HBP(BackpropExtension):
    """BackPACK's general Hessian backpropagation; not provided, see the error.

    Raises:
        NotImplementedError: Always, naming the alternatives.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            "HBP with custom strategies is not provided by bayescurv.compat.backpack: "
            "use KFAC (sampled loss Hessian), KFLR (exact) or KFRA (batch-averaged), "
            "or bayescurv.engine.KFAC/KFLR(kfac_approx='expand'|'reduce')."
        )


class CurvatureMatrixProduct(BackpropExtension):
    """Base class of the block-diagonal curvature-matrix products.

    The savefield holds a function that multiplies ``K`` vectors ``[K, *p]`` with the
    parameter's diagonal block of the curvature matrix and returns ``[K, *p]``.
    """

    order = Order.PRODUCT


class GGNMP(CurvatureMatrixProduct):
    """Products with the parameter's block of the GGN, ``ggnmp``.

    Args:
        savefield: The attribute that holds the product function.
    """

    def __init__(self, savefield: str = "ggnmp") -> None:
        super().__init__(savefield)


class HMP(CurvatureMatrixProduct):
    """Products with the parameter's block of the Hessian, ``hmp``.

    Args:
        savefield: The attribute that holds the product function.
    """

    def __init__(self, savefield: str = "hmp") -> None:
        super().__init__(savefield)


class PCHMP(CurvatureMatrixProduct):
    r"""Products with the block of the positive-curvature Hessian, ``pchmp``.

    The Hessian with the second-order term :math:`r = \delta \odot \phi''(x)` of every
    element-wise activation (:math:`\delta` the loss gradient w.r.t. its output)
    replaced by :math:`\max(r, 0)` (``"clip"``) or :math:`|r|` (``"abs"``); Chen
    et al., "BDA-PCH" (2018).

    Args:
        savefield: The attribute that holds the product function.
        modify: ``"clip"`` or ``"abs"``.
    """

    MODIFICATIONS: ClassVar[tuple[str, ...]] = ("clip", "abs")

    def __init__(self, savefield: str = "pchmp", modify: str = "clip") -> None:
        super().__init__(savefield)
        if modify not in self.MODIFICATIONS:
            raise ValueError(
                f"PCHMP: modify must be one of {self.MODIFICATIONS}, got {modify!r}."
            )
        self.modify = modify

    def get_modification_mode(self) -> str:
        """The modification of negative residuals (BackPACK's accessor)."""
        return self.modify


__all__ = [
    "GGNMP",
    "HBP",
    "HMP",
    "KFAC",
    "KFLR",
    "KFRA",
    "PCHMP",
    "BackpropExtension",
    "BatchDiagGGNExact",
    "BatchDiagGGNMC",
    "BatchDiagHessian",
    "BatchDotGrad",
    "BatchGrad",
    "BatchL2Grad",
    "CurvatureMatrixProduct",
    "DiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "Order",
    "SqrtGGNExact",
    "SqrtGGNMC",
    "SumGradSquared",
    "Variance",
]
