r"""ViViT: the GGN's top eigenpairs and curvature noise from its low-rank structure.

Dangel, Tatzel & Hennig, "ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure" (TMLR 2022).

The GGN of a batch is a sum of outer products of its square-root columns,

.. math::
    G = V V^\top, \qquad V = [v_{cn}] \in \mathbb{R}^{P \times C N}, \qquad
    v_{cn} = J_n^\top s_{cn},

(``engine.SqrtGGNExact(fewest=True)``: :math:`C` columns per sample, :math:`C - 1`
for cross-entropy, whose loss Hessian has that rank; ``engine.SqrtGGNMC``: ``M``
sampled columns with :math:`\mathbb{E}[V V^\top] = G`). Its non-zero eigenpairs follow
from the small Gram matrix :math:`M = V^\top V \in \mathbb{R}^{CN \times CN}`: if
:math:`M u_k = \lambda_k u_k` then

.. math:: G e_k = \lambda_k e_k, \qquad e_k = V u_k / \sqrt{\lambda_k},

and the :math:`e_k` are orthonormal over all parameters. Along them, each sample's
first- and second-order directional derivatives are

.. math::
    \gamma_{nk} = N \langle \nabla_\theta L_n, e_k \rangle, \qquad
    \lambda_{nk} = N\, e_k^\top G_n e_k
    = N \sum_c (v_{cn}^\top e_k)^2 = N \lambda_k \sum_c u_{k,cn}^2,

where :math:`L_n` and :math:`G_n` are sample ``n``'s contributions to the batch loss
and GGN as reduced. For ``reduction="mean"`` these are the per-sample loss's
derivatives; for ``"sum"`` they are ``N`` times them. Either way their means over the
samples are the batch loss's derivatives :math:`\langle g, e_k \rangle` and
:math:`e_k^\top G e_k = \lambda_k`, and their variances measure gradient and curvature
noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bayescurv import engine

__all__ = [
    "DirectionalDerivatives",
    "GGNEigen",
    "directional_derivatives",
    "ggn_eigen",
    "newton_step",
]

Inputs = Tensor | Sequence[Tensor]


class GGNEigen(NamedTuple):
    """Top eigenpairs of the GGN (a named pair: ``values, vectors = ggn_eigen(...)``).

    Attributes:
        eigenvalues: ``[k]``, descending and positive.
        eigenvectors: Parameter name -> ``[k, *param.shape]``; the ``k`` vectors are
            orthonormal over all trainable parameters.
    """

    eigenvalues: Tensor
    eigenvectors: dict[str, Tensor]


@dataclass(frozen=True)
class DirectionalDerivatives:
    r"""Per-sample directional derivatives along the GGN's top eigenvectors.

    Attributes:
        eigenvalues: ``[k]`` (as in :class:`GGNEigen`).
        eigenvectors: Parameter name -> ``[k, *p]``.
        gammas: :math:`\gamma_{nk}`, ``[N, k]``: first-order directional derivatives,
            one row per sample of the batch.
        lambdas: :math:`\lambda_{nk}`, ``[S, k]``: second-order directional
            derivatives (curvatures), one row per sample that entered the GGN (all
            ``N``, or the ``subsampling`` indices in their order).
    """

    eigenvalues: Tensor
    eigenvectors: dict[str, Tensor]
    gammas: Tensor
    lambdas: Tensor

    @property
    def gamma_mean(self) -> Tensor:
        r""":math:`\gamma_k = \langle g, e_k \rangle`, the batch slopes, ``[k]``."""
        return self.gammas.mean(0)

    @property
    def gamma_variance(self) -> Tensor:
        """Unbiased sample variance of the slopes over the samples, ``[k]``."""
        return _sample_variance(self.gammas)

    @property
    def lambda_mean(self) -> Tensor:
        r""":math:`\lambda_k = e_k^\top G e_k`, equal to the eigenvalues, ``[k]``."""
        return self.lambdas.mean(0)

    @property
    def lambda_variance(self) -> Tensor:
        """Unbiased sample variance of the curvatures (curvature noise), ``[k]``."""
        return _sample_variance(self.lambdas)


def ggn_eigen(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    k: int | None = None,
    mc_samples: int = 0,
    subsampling: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> GGNEigen:
    r"""The GGN's top eigenpairs on a batch, from the Gram matrix of its square root.

    Costs one engine sweep for the square root (``SqrtGGNExact`` or ``SqrtGGNMC``)
    plus a ``[D, D]`` eigendecomposition, ``D = C |S|`` (``(C - 1) |S|`` for
    cross-entropy, whose loss Hessian has rank ``C - 1``; or ``mc_samples * |S|``).
    Parameters' ``.grad`` are left as they were.

    # NOTE [Subsampling the GGN]
    # With ``subsampling = S`` only the samples in S enter the Gram matrix: the square
    # root is computed by one engine sweep on the sub-batch, whose loss estimates the
    # batch loss (mean: L ≈ L_S; sum: L ≈ (N/|S|) L_S). The estimate is therefore
    # G ≈ (N/|S|) Σ_{n∈S} G_n, unbiased for uniformly drawn S (for mean reduction
    # with class weights the sub-batch's own weight sum normalizes).

    # NOTE [Which eigenvalues count as zero]
    # ``torch.linalg.eigh`` of the Gram matrix is accurate to about eps·‖M‖ per
    # eigenvalue, so eigenvalues at or below ``λ_max · D · eps(dtype)`` (numpy's
    # matrix-rank tolerance) are numerically zero and dropped, as are negative ones:
    # their eigenvectors V u / √λ would be noise.

    Args:
        model: Model whose parameterized layers have engine rules.
        loss_func: An engine-supported loss (``reduction`` ``"mean"`` or ``"sum"``).
        inputs: Model input ``[N, ...]`` (a tuple is unpacked into ``model(*inputs)``).
        targets: Targets ``[N, ...]``.
        k: Number of leading eigenpairs; ``None`` for all numerically non-zero ones.
            Fewer are returned if the GGN's numerical rank is below ``k``.
        mc_samples: 0 for the exact square root; otherwise the number of Monte Carlo
            columns per sample (``SqrtGGNMC``), an unbiased estimate of ``G``.
        subsampling: Indices of the samples that enter the Gram matrix (see the
            NOTE above); ``None`` for all.
        generator: Random generator for the Monte Carlo columns.

    Returns:
        :class:`GGNEigen` with eigenvalues ``[k]`` (descending) and eigenvectors
        ``name -> [k, *p]``.

    Raises:
        ValueError: If ``k``, ``mc_samples`` or ``subsampling`` is invalid.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.vivit import ggn_eigen
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, 1)
        >>> values, vectors = ggn_eigen(model.double(), nn.MSELoss(reduction="sum"),
        ...                             x, y.double())
        >>> # closed form for MSE with sum reduction: G = 2 xᵀx
        >>> torch.allclose(values, torch.linalg.eigvalsh(2 * x.T @ x).flip(0))
        True
    """
    _check_options(k, mc_samples)
    with _grads_untouched(model):
        columns, _ = _square_root(
            model, loss_func, inputs, targets, mc_samples, subsampling, generator
        )
    eigenvalues, coefficients = _gram_eigen(columns, k)
    return GGNEigen(eigenvalues, _eigenvectors(columns, eigenvalues, coefficients))


def directional_derivatives(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    k: int | None = None,
    mc_samples: int = 0,
    subsampling: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DirectionalDerivatives:
    r"""The GGN's top eigenpairs and each sample's derivatives along them.

    Arguments as in :func:`ggn_eigen`. The slopes :math:`\gamma_{nk}` use the
    individual gradients of the whole batch (``engine.BatchGrad``, in the same sweep
    as the square root unless ``subsampling`` is given, which needs a second sweep on
    the sub-batch); the curvatures :math:`\lambda_{nk}` come for free from the Gram
    matrix's eigenvectors, for the samples that entered it. With Monte Carlo columns
    they are the curvatures of the sampled GGN. ``.grad`` is left as it was.

    Returns:
        :class:`DirectionalDerivatives` (``gammas [N, k]``, ``lambdas [S, k]``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.vivit import directional_derivatives
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x, y = torch.randn(5, 2).double(), torch.randn(5, 1).double()
        >>> dd = directional_derivatives(model, nn.MSELoss(), x, y)
        >>> # the mean curvatures along the eigenvectors are the eigenvalues
        >>> torch.allclose(dd.lambda_mean, dd.eigenvalues)
        True
    """
    _check_options(k, mc_samples)
    with _grads_untouched(model):
        columns, grad_batch = _square_root(
            model,
            loss_func,
            inputs,
            targets,
            mc_samples,
            subsampling,
            generator,
            with_grad_batch=True,
        )
    eigenvalues, coefficients = _gram_eigen(columns, k)
    eigenvectors = _eigenvectors(columns, eigenvalues, coefficients)
    assert grad_batch is not None
    batch_size = next(iter(grad_batch.values())).shape[0]
    gammas = batch_size * sum(
        g.flatten(1) @ eigenvectors[name].flatten(1).T for name, g in grad_batch.items()
    )
    num_columns, sub_size = next(iter(columns.values())).shape[:2]
    weights = coefficients.reshape(-1, num_columns, sub_size).square().sum(1)
    lambdas = sub_size * (eigenvalues.unsqueeze(1) * weights).T
    return DirectionalDerivatives(eigenvalues, eigenvectors, gammas, lambdas)


def newton_step(
    derivatives: DirectionalDerivatives, damping: float | Tensor
) -> dict[str, Tensor]:
    r"""A damped Newton step in the GGN's top eigenspace.

    .. math:: \Delta\theta = -\sum_k \frac{\gamma_k}{\lambda_k + \delta_k}\, e_k

    with the batch slope :math:`\gamma_k` and curvature :math:`\lambda_k` along
    :math:`e_k` (the means in ``derivatives``). This is the minimizer of the damped
    quadratic model :math:`L + g^\top \Delta + \frac12 \Delta^\top (G + \delta I)
    \Delta` restricted to the span of the :math:`e_k`; the gradient component outside
    that span is not stepped along.

    Variants, all expressed through the arguments:

    * constant damping (Levenberg-Marquardt): ``damping`` a float :math:`\delta`;
    * per-direction damping: ``damping`` a ``[k]`` tensor, e.g. growing with the
      curvature noise, :math:`\delta_k = c \sqrt{\mathrm{Var}_n[\lambda_{nk}] / N}`
      (``c * (derivatives.lambda_variance / N).sqrt()``), which shrinks steps along
      directions whose curvature the batch estimates poorly;
    * the eigenspace: exact or Monte Carlo GGN, from all samples or a subsample, and
      its size ``k`` are chosen in :func:`directional_derivatives`; the slopes
      always come from the whole batch.

    Args:
        derivatives: From :func:`directional_derivatives`.
        damping: :math:`\delta \ge 0`, a float or a ``[k]`` tensor.

    Returns:
        Parameter name -> update ``[*p]`` (add it to the parameters).

    Raises:
        ValueError: If ``damping`` is negative, not finite or of the wrong shape.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv.vivit import directional_derivatives, newton_step
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x, y = torch.randn(8, 2).double(), torch.randn(8, 1).double()
        >>> step = newton_step(directional_derivatives(model, nn.MSELoss(), x, y), 0.)
        >>> # a linear least-squares problem is solved by one undamped Newton step
        >>> w = model.weight.detach() + step["weight"]
        >>> torch.allclose(w.T, torch.linalg.lstsq(x, y).solution)
        True
    """
    delta = _check_damping(damping, derivatives.eigenvalues)
    coefficients = -derivatives.gamma_mean / (derivatives.lambda_mean + delta)
    return {
        name: torch.einsum("k,k...->...", coefficients, vectors)
        for name, vectors in derivatives.eigenvectors.items()
    }


def _check_options(k: int | None, mc_samples: int) -> None:
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}.")
    if (
        not isinstance(mc_samples, int)
        or isinstance(mc_samples, bool)
        or mc_samples < 0
    ):
        raise ValueError(
            f"mc_samples must be a non-negative integer (0: exact), got {mc_samples!r}."
        )


def _check_subsampling(subsampling: Sequence[int] | Tensor, batch_size: int) -> Tensor:
    index = torch.as_tensor(subsampling)
    if index.ndim != 1 or index.numel() == 0 or index.is_floating_point():
        raise ValueError(
            "subsampling must be a non-empty 1-D sequence of integer sample indices, "
            f"got {subsampling!r}."
        )
    if index.min() < 0 or index.max() >= batch_size:
        raise ValueError(
            f"subsampling indices must lie in [0, {batch_size}) for a batch of "
            f"{batch_size} samples, got {index.tolist()}."
        )
    if index.unique().numel() != index.numel():
        raise ValueError(f"subsampling contains duplicate indices: {index.tolist()}.")
    return index


def _check_damping(damping: float | Tensor, eigenvalues: Tensor) -> Tensor:
    delta = torch.as_tensor(damping, dtype=eigenvalues.dtype, device=eigenvalues.device)
    if delta.ndim > 1 or (delta.ndim == 1 and delta.shape != eigenvalues.shape):
        raise ValueError(
            f"damping must be a float or a tensor of shape {tuple(eigenvalues.shape)} "
            f"(one value per direction), got shape {tuple(delta.shape)}."
        )
    if not torch.isfinite(delta).all() or (delta < 0).any():
        raise ValueError(f"damping must be finite and non-negative, got {damping!r}.")
    return delta


@contextmanager
def _grads_untouched(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` that an engine call accumulates into."""
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, grad in saved:
            p.grad = grad


def _square_root(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    mc_samples: int,
    subsampling: Sequence[int] | Tensor | None,
    generator: torch.Generator | None,
    with_grad_batch: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """GGN square-root columns ``name -> [C, S, *p]`` scaled so that ``G ≈ V Vᵀ``.

    Also returns the whole batch's ``grad_batch`` if asked for.
    """
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    sqrt_ext = (
        engine.SqrtGGNMC(mc_samples)
        if mc_samples
        else engine.SqrtGGNExact(fewest=True)  # NOTE [Fewest columns]
    )
    grad_ext = [engine.BatchGrad()] if with_grad_batch else []
    if subsampling is None:
        res = engine.backprop(
            model, loss_func, args, targets, [sqrt_ext, *grad_ext], generator=generator
        )
        grad_batch = res["grad_batch"] if with_grad_batch else None
        return res[sqrt_ext.savefield], grad_batch
    batch_size = args[0].shape[0]
    index = _check_subsampling(subsampling, batch_size)
    grad_batch = None
    if with_grad_batch:
        grad_batch = engine.backprop(model, loss_func, args, targets, grad_ext)[
            "grad_batch"
        ]
    sub_args = tuple(a[index.to(a.device)] for a in args)
    res = engine.backprop(
        model,
        loss_func,
        sub_args,
        targets[index.to(targets.device)],
        [sqrt_ext],
        generator=generator,
    )
    columns = res[sqrt_ext.savefield]
    if loss_func.reduction == "sum":  # see NOTE [Subsampling the GGN]
        scale = (batch_size / index.numel()) ** 0.5
        columns = {name: scale * c for name, c in columns.items()}
    return columns, grad_batch


def _gram_eigen(columns: dict[str, Tensor], k: int | None) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``[k]`` (descending) and Gram eigenvectors ``[k, D]`` of ``VᵀV``."""
    flat = [c.flatten(2).flatten(0, 1) for c in columns.values()]  # [D, p]
    gram = sum(f @ f.T for f in flat)
    assert isinstance(gram, Tensor)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    # see NOTE [Which eigenvalues count as zero]
    size = gram.shape[0]
    tolerance = values[0].clamp(min=0) * size * torch.finfo(gram.dtype).eps
    keep = int((values > tolerance).sum()) if values[0] > 0 else 0
    if k is not None:
        keep = min(keep, k)
    return values[:keep], vectors[:, :keep].T


def _eigenvectors(
    columns: dict[str, Tensor], eigenvalues: Tensor, coefficients: Tensor
) -> dict[str, Tensor]:
    """``e_k = V u_k / sqrt(λ_k)`` per parameter, ``name -> [k, *p]``."""
    scaled = coefficients / eigenvalues.sqrt().unsqueeze(1)  # [k, D]
    return {
        name: (scaled @ c.flatten(2).flatten(0, 1)).reshape(-1, *c.shape[2:])
        for name, c in columns.items()
    }


def _sample_variance(values: Tensor) -> Tensor:
    """Unbiased variance over the leading axis; NaN for fewer than two samples."""
    n = values.shape[0]
    if n < 2:
        return torch.full(values.shape[1:], float("nan"), dtype=values.dtype)
    return (values - values.mean(0)).square().sum(0) / (n - 1)
