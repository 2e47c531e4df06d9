r"""Extensions: which quantities :func:`~bayescurv.engine.backprop` computes.

Every extension names a *savefield* (the key in the result) and is built from two
ingredients:

* a **column source**: the vectors that are pulled back from the model output to every
  parameter. First-order extensions use the loss gradient :math:`\nabla_f \ell`
  (one column); GGN extensions use the columns :math:`S` of a symmetric factorization
  of the loss Hessian, :math:`\nabla_f^2 \ell = S S^\top` (exact: :math:`C` columns per
  sample; Monte Carlo: ``mc_samples`` sampled columns);
* a **reduction** of the per-sample, per-column parameter vectors
  :math:`J_{vn} = (\partial f_n / \partial \theta)^\top s_{vn}` (shape ``[V, N, *p]``).

Scaling follows BackPACK: for ``reduction="mean"`` losses the ``1/N`` factor is inside
every quantity, so ``grad_batch.sum(0)`` equals ``.grad`` and
``diag_ggn_exact`` is the diagonal of the GGN of the loss as reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar


class Columns(str, Enum):
    """Where the pulled-back columns come from."""

    GRADIENT = "gradient"
    """The loss gradient w.r.t. the model output (first-order quantities)."""
    EXACT = "exact"
    """The exact symmetric factorization of the loss Hessian w.r.t. the output."""
    MC = "mc"
    """Monte Carlo columns sampled from the model's predictive distribution."""
    IDENTITY = "identity"
    """The unit vectors of the output entries: pulled back, the rows of the
    per-sample Jacobians of the model output (no loss needed)."""
    HESSIAN = "hessian"
    """Signed square roots of the Hessian w.r.t. each layer output (including the
    non-linearities' second-order terms), see :mod:`bayescurv.engine.hessian`."""


class Reduction(str, Enum):
    """How per-sample, per-column parameter vectors ``J: [V, N, *p]`` are reduced."""

    PER_SAMPLE = "per_sample"
    """``J`` itself, ``[V, N, *p]``."""
    SUM = "sum"
    """:math:`\\sum_{v,n} J_{vn}`, ``[*p]`` (for the gradient column: the gradient)."""
    SUM_SQUARED = "sum_squared"
    """:math:`\\sum_{v,n} J_{vn}^2`, ``[*p]``."""
    BATCH_SQUARED = "batch_squared"
    """:math:`\\sum_v J_{vn}^2`, ``[N, *p]``."""
    L2 = "l2"
    """:math:`\\|J_{vn}\\|^2`, ``[V, N]``."""
    DOT = "dot"
    """:math:`\\sum_v \\langle J_{vn}, J_{vm} \\rangle`, ``[N, N]``."""


@dataclass(frozen=True)
class Extension:
    """Base class of all extensions.

    Attributes:
        savefield: Key of the extension's result in :class:`BackpropResult`.
        columns: Which columns are pulled back.
        reductions: Which reductions of the pulled-back vectors it needs.
        gram_only: The result depends on the exact columns ``S`` only through
            ``S S^T`` per sample, so any exact factorization of the loss Hessian
            serves; when every exact-column extension of a call says so, the
            engine pulls back the fewest columns (cross-entropy: ``C - 1`` per
            position, see :meth:`~bayescurv.engine.losses.LossRule.gram_columns`).
    """

    savefield: ClassVar[str] = ""
    columns: ClassVar[Columns] = Columns.GRADIENT
    reductions: ClassVar[tuple[Reduction, ...]] = ()
    gram_only: ClassVar[bool] = False

    @property
    def mc_samples(self) -> int:
        """Number of Monte Carlo columns (0 for non-MC extensions)."""
        return 0


@dataclass(frozen=True)
class _MCExtension(Extension):
    mc_samples: int = 1  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(
                f"{type(self).__name__}: mc_samples must be a positive integer, "
                f"got {self.mc_samples!r}."
            )


@dataclass(frozen=True)
class BatchGrad(Extension):
    r"""Individual gradients ``grad_batch`` of shape ``[N, *p]``.

    .. math:: \text{grad\_batch}_n = \rho\, \nabla_\theta \ell_n,

    with :math:`\rho = 1/N` for mean reduction and 1 for sum, so the sum over ``n``
    is the mini-batch gradient.
    """

    savefield = "grad_batch"
    reductions = (Reduction.PER_SAMPLE,)


@dataclass(frozen=True)
class BatchL2Grad(Extension):
    r"""Squared L2 norms of the individual gradients, ``batch_l2`` of shape ``[N]``.

    .. math:: \text{batch\_l2}_n = \|\rho\, \nabla_\theta \ell_n\|^2
    """

    savefield = "batch_l2"
    reductions = (Reduction.L2,)


@dataclass(frozen=True)
class SumGradSquared(Extension):
    r"""Sum of squared individual gradients, ``sum_grad_squared`` of shape ``[*p]``.

    .. math:: \text{sum\_grad\_squared} = \sum_n (\rho\, \nabla_\theta \ell_n)^{\odot 2}
    """

    savefield = "sum_grad_squared"
    reductions = (Reduction.SUM_SQUARED,)


@dataclass(frozen=True)
class Variance(Extension):
    r"""Element-wise variance of the individual gradients, ``variance``, ``[*p]``.

    With :math:`g_n` the entries of ``grad_batch``:

    .. math:: \text{variance} = \frac{1}{N}\sum_n g_n^{\odot 2}
        - \Big(\frac{1}{N}\sum_n g_n\Big)^{\odot 2}
    """

    savefield = "variance"
    reductions = (Reduction.SUM_SQUARED,)


@dataclass(frozen=True)
class BatchDotGrad(Extension):
    r"""Pairwise dot products of individual gradients, ``batch_dot``, ``[N, N]``.

    .. math:: \text{batch\_dot}_{nm} = \rho^2 \langle \nabla_\theta \ell_n,
        \nabla_\theta \ell_m \rangle
    """

    savefield = "batch_dot"
    reductions = (Reduction.DOT,)


@dataclass(frozen=True)
class DiagGGNExact(Extension):
    r"""Diagonal of the generalized Gauss-Newton matrix, ``diag_ggn_exact``, ``[*p]``.

    .. math:: \text{diag}\Big(\sum_n J_n^\top (\nabla^2_{f_n}\ell)\, J_n\Big)
        = \sum_{c,n} \big(J_n^\top s_{cn}\big)^{\odot 2}

    with :math:`J_n = \partial f_n / \partial \theta` and :math:`s_{cn}` the exact
    Hessian square-root columns.
    """

    savefield = "diag_ggn_exact"
    columns = Columns.EXACT
    reductions = (Reduction.SUM_SQUARED,)
    gram_only = True


@dataclass(frozen=True)
class BatchDiagGGNExact(Extension):
    r"""Per-sample GGN diagonals, ``diag_ggn_exact_batch``, ``[N, *p]``.

    .. math:: \text{diag}\big(J_n^\top (\nabla^2_{f_n}\ell)\, J_n\big)

    Their sum over ``n`` is ``diag_ggn_exact``.
    """

    savefield = "diag_ggn_exact_batch"
    columns = Columns.EXACT
    reductions = (Reduction.BATCH_SQUARED,)
    gram_only = True


@dataclass(frozen=True)
class SqrtGGNExact(Extension):
    r"""Symmetric factorization of the GGN, ``sqrt_ggn_exact``, ``[C, N, *p]``.

    .. math:: G = \sum_{c,n} v_{cn} v_{cn}^\top, \quad v_{cn} = J_n^\top s_{cn}

    ``C`` is the number of Hessian square-root columns per sample (classes for
    cross-entropy, output entries for MSE/BCE).

    Args:
        fewest: Factor the loss Hessian with the fewest columns instead
            (:meth:`~bayescurv.engine.losses.LossRule.gram_columns`): ``C - 1`` per
            position for cross-entropy, whose Hessian has that rank, the same
            ``G = V V^T`` from fewer pull-backs. Default ``False``: the ``C``
            columns ``sqrt(p_c) (e_c - p)`` per position, as BackPACK.
    """

    savefield = "sqrt_ggn_exact"
    columns = Columns.EXACT
    reductions = (Reduction.PER_SAMPLE,)
    fewest: bool = False

    @property
    def gram_only(self) -> bool:  # type: ignore[override]
        """Whether the fewest columns serve (``fewest``)."""
        return self.fewest


@dataclass(frozen=True)
class DiagGGNMC(_MCExtension):
    r"""Monte Carlo estimate of the GGN diagonal (the Fisher's), ``diag_ggn_mc``.

    .. math:: \frac{1}{M}\sum_{m,n} \big(J_n^\top \tilde s_{mn}\big)^{\odot 2},
        \quad \mathbb{E}[\tilde s \tilde s^\top] = \nabla^2_{f_n}\ell

    where the columns are gradients of the loss at targets sampled from the model's
    predictive distribution. Unbiased for ``diag_ggn_exact``.
    """

    savefield = "diag_ggn_mc"
    columns = Columns.MC
    reductions = (Reduction.SUM_SQUARED,)


@dataclass(frozen=True)
class BatchDiagGGNMC(_MCExtension):
    """Per-sample Monte Carlo GGN diagonals, ``diag_ggn_mc_batch``, ``[N, *p]``."""

    savefield = "diag_ggn_mc_batch"
    columns = Columns.MC
    reductions = (Reduction.BATCH_SQUARED,)


@dataclass(frozen=True)
class SqrtGGNMC(_MCExtension):
    r"""Monte Carlo factorization of the GGN, ``sqrt_ggn_mc``, ``[M, N, *p]``.

    :math:`\sum_{m,n} v_{mn} v_{mn}^\top` is an unbiased estimate of the GGN.
    """

    savefield = "sqrt_ggn_mc"
    columns = Columns.MC
    reductions = (Reduction.PER_SAMPLE,)


@dataclass(frozen=True)
class DiagHessian(Extension):
    r"""Diagonal of the Hessian of the loss, ``diag_h``, ``[*p]``.

    .. math:: \text{diag\_h} = \operatorname{diag}\big(\nabla_\theta^2 \ell\big)

    Exact, including the second-order terms of the non-linearities that the GGN
    drops: for a layer that is linear in its parameters with output :math:`z`,
    :math:`\partial^2 \ell / \partial \theta_i^2 = \sum_n e_i^\top J_n^\top
    (\nabla^2_{z_n} \ell) J_n e_i` with the full Hessian w.r.t. the layer output.
    See :mod:`bayescurv.engine.hessian` for how it is computed on chains and on
    general graphs. Entries can be negative.

    Example:
        >>> import math
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Sequential(
        ...     nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, 1, bias=False))
        >>> x, y = torch.tensor([[0.7]]), torch.tensor([[0.2]])
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.DiagHessian(), engine.DiagGGNExact()])
        >>> # loss (w2 tanh(w1 x) - y)^2: the GGN term plus the tanh'' residual
        >>> w1, w2 = model[0].weight.item(), model[2].weight.item()
        >>> t = math.tanh(w1 * 0.7)
        >>> ggn = 2 * (w2 * 0.7 * (1 - t**2)) ** 2
        >>> residual = 2 * (w2 * t - 0.2) * w2 * 0.7**2 * (-2 * t * (1 - t**2))
        >>> math.isclose(res["diag_h"]["0.weight"].item(), ggn + residual, rel_tol=1e-5)
        True
        >>> math.isclose(res["diag_ggn_exact"]["0.weight"].item(), ggn, rel_tol=1e-5)
        True
    """

    savefield = "diag_h"
    columns = Columns.HESSIAN
    reductions = (Reduction.SUM_SQUARED,)
    gram_only = True


@dataclass(frozen=True)
class BatchDiagHessian(Extension):
    r"""Per-sample Hessian diagonals, ``diag_h_batch``, ``[N, *p]``.

    .. math:: \text{diag\_h\_batch}_n = \operatorname{diag}\big(
        \nabla_\theta^2 \rho\, \ell_n\big); \text{ the sum over } n
        \text{ is } \text{diag\_h}.

    With :math:`\rho` the reduction factor as for :class:`BatchGrad`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import engine
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
        >>> res = engine.backprop(model, nn.MSELoss(reduction="sum"), x, y,
        ...                       [engine.BatchDiagHessian()])
        >>> # linear model, squared error: d^2/dW_oi^2 of (W x_n + b - y_n)^2 = 2 x_ni^2
        >>> h = res["diag_h_batch"]
        >>> torch.allclose(h["weight"], 2 * x.unsqueeze(1).square().expand(5, 2, 3))
        True
        >>> torch.allclose(h["bias"], torch.full((5, 2), 2.0))
        True
    """

    savefield = "diag_h_batch"
    columns = Columns.HESSIAN
    reductions = (Reduction.BATCH_SQUARED,)
    gram_only = True
