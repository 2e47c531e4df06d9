r"""The Kronecker-factored extensions :class:`KFAC`, :class:`KFLR` and :class:`KFRA`.

Results are lists of factors per parameter whose Kronecker product, in list order,
approximates the parameter's GGN block in the row-major flattening of the parameter:

* a weight ``[out, in, ...]`` (``Linear``, ``Conv{1,2,3}d``) gets ``[B, A]`` with
  ``B: [out, out]`` and ``A: [in * ..., in * ...]``;
* an ``Embedding`` weight ``[num_embeddings, dim]`` gets ``[A, B]`` (its leading axis is
  the input side); with ``kfac_approx="expand"`` its ``A`` is diagonal and stored as the
  1-D tensor of its diagonal (see :class:`~bayescurv.engine.rules.EmbeddingRule`);
* a bias, and the affine parameters of ``BatchNorm``/``LayerNorm``/``GroupNorm``, get
  ``[B]``: the exact GGN block (KFLR, KFRA for biases) or its Monte Carlo estimate
  (KFAC), ``[numel, numel]``.

Scaling as BackPACK: ``A`` is a mean over samples (and, see :class:`KFACApprox`,
positions), ``B`` a sum over samples and columns that contains the loss scaling
(``1/N`` for ``reduction="mean"``). Use :func:`kron_dense` to form a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import ClassVar

import torch
from torch import Tensor

from bayescurv.engine.dtypes import accumulation_dtype
from bayescurv.engine.extensions import Columns, Extension, Reduction, _MCExtension
from bayescurv.engine.rules.kron_stats import KFACApprox, as_approx


def kron_dense(factors: list[Tensor]) -> Tensor:
    """The dense block ``kron(factors[0], factors[1], ...)``.

    A 1-D factor stands for the diagonal matrix with that diagonal. Factors
    ``[G, d, d]`` (a grouped convolution's weight) give the block-diagonal matrix of
    the ``G`` per-group Kronecker products.
    """
    if factors[0].dim() == 3:
        return torch.block_diag(
            *(kron_dense(list(fs)) for fs in zip(*factors, strict=True))
        )
    return reduce(torch.kron, [f if f.dim() == 2 else torch.diag(f) for f in factors])


@dataclass(frozen=True)
class KFAC(_MCExtension):
    r"""Kronecker-factored Monte Carlo GGN (Martens & Grosse, 2015), ``kfac``.

    With ``M = mc_samples`` sampled loss-Hessian square-root columns
    :math:`\tilde s_{mn}` (:math:`\mathbb{E}[\tilde s \tilde s^\top] =
    \nabla^2_{f_n}\ell`) pulled back to the layer output, :math:`c_{mnr}` at position
    ``r``, and layer inputs :math:`x_{nr}`, a weight gets ``[B, A]`` with (``expand``)

    .. math::
        B = \frac{1}{M} \sum_{m,n,r} c_{mnr} c_{mnr}^\top, \qquad
        A = \frac{1}{NR} \sum_{n,r} x_{nr} x_{nr}^\top

    (``reduce``: see :class:`KFACApprox`). :math:`\mathbb{E}[B]` is the ``B`` of
    :class:`KFLR`. Shares the sampled columns with ``DiagGGNMC`` & co. of the same
    ``mc_samples`` in one :func:`~bayescurv.engine.backprop` call.

    Args:
        mc_samples: Number of sampled columns per sample ``M``.
        kfac_approx: ``"expand"`` (default) or ``"reduce"``, see :class:`KFACApprox`.
        dtype: Accumulation dtype of the factors (``None``: the model's). With
            ``torch.float64`` on a float32 model the outer products are formed from
            the float32 vectors upcast to float64, so rank-deficient factors keep
            their exact null space (see :mod:`bayescurv.engine.dtypes`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> gen = torch.Generator().manual_seed(0)
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.KFAC(mc_samples=20_000)], generator=gen)
        >>> B, A = res["kfac"]["weight"]
        >>> torch.allclose(A, x.T @ x / 5)  # exact: inputs are not sampled
        True
        >>> # MSE with sum reduction: E[B] = 2 N I
        >>> torch.allclose(B, 10 * torch.eye(2), atol=0.3)
        True
    """

    savefield: ClassVar[str] = "kfac"
    columns: ClassVar[Columns] = Columns.MC
    reductions: ClassVar[tuple[Reduction, ...]] = ()
    kfac_approx: KFACApprox = KFACApprox.EXPAND
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_kron_options(self)


@dataclass(frozen=True)
class KFLR(Extension):
    r"""Kronecker-factored exact GGN (Botev et al., 2017), ``kflr``.

    As :class:`KFAC` with the exact loss-Hessian square-root columns :math:`s_{cn}`
    (:math:`\sum_c s_{cn} s_{cn}^\top = \nabla^2_{f_n}\ell`) instead of samples:

    .. math::
        B = \sum_{c,n,r} c_{cnr} c_{cnr}^\top, \qquad
        A = \frac{1}{NR} \sum_{n,r} x_{nr} x_{nr}^\top \quad (\text{expand}).

    For a layer called once on one datum at one position (``Linear`` on ``[1, in]``,
    a convolution with one output location) ``kron(B, A)`` is the exact GGN block.
    Shares the exact columns with ``DiagGGNExact`` & co. in one call.

    Args:
        kfac_approx: ``"expand"`` (default) or ``"reduce"``, see :class:`KFACApprox`.
        dtype: Accumulation dtype of the factors (``None``: the model's), as for
            :class:`KFAC`: ``KFLR(dtype=torch.float64)`` on a float32 model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.KFLR()])
        >>> B, A = res["kflr"]["weight"]
        >>> # MSE with sum reduction: B = 2 N I, A = x^T x / N
        >>> torch.allclose(B, 10 * torch.eye(2)), torch.allclose(A, x.T @ x / 5)
        (True, True)
        >>> # the exact GGN block of a linear model: 2 kron(I, x^T x)
        >>> ggn = 2 * torch.kron(torch.eye(2), x.T @ x)
        >>> torch.allclose(engine.kron_dense([B, A]), ggn)
        True
    """

    savefield: ClassVar[str] = "kflr"
    columns: ClassVar[Columns] = Columns.EXACT
    reductions: ClassVar[tuple[Reduction, ...]] = ()
    gram_only: ClassVar[bool] = True
    kfac_approx: KFACApprox = KFACApprox.EXPAND
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        _check_kron_options(self)


@dataclass(frozen=True)
class KFRA(Extension):
    r"""Kronecker-factored recursive approximation (Botev et al., 2017), ``kfra``.

    Backpropagates the batch-averaged GGN w.r.t. each layer's output through a chain
    (``nn.Sequential`` of ``Linear`` layers, element-wise activations, ``Flatten``,
    ``Identity`` and eval-mode ``Dropout``), starting from
    :math:`\bar G_L = \sum_n \nabla^2_{f_n}\ell` and applying, module by module,

    .. math::
        \text{Linear } z = W a + b: \quad \bar G_a = W^\top \bar G_z W, \qquad
        \text{activation } a = \phi(h): \quad
        \bar G_h = \bar G_a \odot \frac{1}{N}\sum_n \phi'(h_n) \phi'(h_n)^\top

    (the GGN drops the activations' second-derivative terms). A ``Linear`` layer with
    output GGN :math:`\bar G_z` gets ``[B, A]`` with :math:`B = \bar G_z`,
    :math:`A = \frac1N \sum_n a_n a_n^\top` for its weight and ``[B]`` for its bias.
    For one datum this is :class:`KFLR`. Other graphs or modules raise
    ``NotImplementedError`` naming them.

    Args:
        dtype: Accumulation dtype (``None``: the model's): the recursion runs in it,
            from the model-dtype inputs, weights and derivatives upcast.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.KFRA()])
        >>> B, A = res["kfra"]["0.weight"]
        >>> torch.allclose(B, 10 * torch.eye(2)), torch.allclose(A, x.T @ x / 5)
        (True, True)
    """

    savefield: ClassVar[str] = "kfra"
    columns: ClassVar[Columns] = Columns.GRADIENT
    reductions: ClassVar[tuple[Reduction, ...]] = ()
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "dtype", accumulation_dtype(self.dtype, type(self).__name__)
        )


def _check_kron_options(ext: KFAC | KFLR) -> None:
    owner = type(ext).__name__
    object.__setattr__(ext, "kfac_approx", as_approx(ext.kfac_approx, owner))
    object.__setattr__(ext, "dtype", accumulation_dtype(ext.dtype, owner))


__all__ = ["KFAC", "KFLR", "KFRA", "KFACApprox", "kron_dense"]
