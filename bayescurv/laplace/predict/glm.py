r"""The GLM's Gaussian over the outputs, :math:`(f_\mu, J \Lambda^{-1} J^\top)`.

The source yields chunks of samples with their per-sample Jacobians as segments
(:meth:`~bayescurv.laplace.sources.CurvatureSource.jacobian_segments`): the last
layer's :math:`[I_C \otimes \phi_n^\top, I_C]` from its features, every linear
layer's :math:`[G_n \otimes a_n^\top, G_n]` from one batched backward pass, and
explicit engine Jacobians for other layers. Each chunk is reduced at once by the
posterior's factorization (:mod:`bayescurv.laplace.predict.variance`). ``joint``
gives the covariance over all ``N C`` outputs from :math:`J_a \Lambda^{-1}
J_b^\top` for every pair of chunks ``(a, b)``.

# NOTE [Bounded memory for the all-weights predictive]
# The functional variance contracts the per-sample Jacobian J_n [C, P] with the
# posterior's factorization. Linear layers never expand it: with a_n the layer input
# and G_n = df_n/dz_n [C, out] from one vector-Jacobian product of the C output
# columns, J_n = G_n ⊗ a_nᵀ, and diagonal and Kronecker posteriors have closed forms
# in (a, G) (a kron layer costs in² + C out² + out in per sample instead of
# C out in (out + in) for rotating explicit rows). Other layers get explicit rows from
# the engine (one batched backward pass per chunk). Chunks of samples are reduced to
# [N_b, C, C] before the next is computed, so the peak memory is a chunk's explicit
# part (memory_budget bytes, at least one sample), independent of N; an [N C, P]
# Jacobian never exists. Alternatives cost more: P Jacobian-vector products with the
# columns of a root of Σ (one forward pass each) are P / C times the C vector-Jacobian
# products, and Monte Carlo estimates from sampled weights are not exact. For the
# joint covariance the chunks of a row are recomputed per column chunk (or kept if
# there is only one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import CurvatureMatrix, Diagonal
from bayescurv.laplace.predict.variance import functional_variance
from bayescurv.laplace.sources.base import CurvatureSource

Chunks = Callable[[], Iterator[Tensor]]
"""Re-creates the Jacobian chunks ``[N_b, C, P]`` of a batch, in sample order."""


def glm_moments(
    source: CurvatureSource,
    precision: CurvatureMatrix,
    inputs: Any,
    joint: bool = False,
    diagonal: bool = False,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Mean and covariance of the linearized network's output.

    Args:
        source: The subset's curvature source.
        precision: The posterior precision :math:`\Lambda`.
        inputs: A batch of inputs.
        joint: Covariance over all ``N C`` outputs.
        diagonal: Only the variances (ignored if ``joint``).
        differentiable: Keep the autograd graph w.r.t. the inputs.

    Returns:
        :math:`f_\mu` ``[N, C]`` and :math:`f_{\mathrm{var}}` ``[N, C, C]``
        (``[N, C]`` if ``diagonal``), or, if ``joint``, ``[N C]`` and
        ``[N C, N C]``.
    """
    if joint:
        means = [mu for mu, _ in source.jacobian_segments(inputs, differentiable)]

        def chunks() -> Iterator[Tensor]:
            for _, jac in source.jacobian_segments(inputs, differentiable):
                yield jac.dense().to(precision.dtype)

        f_mu = torch.cat(means).flatten()
        return f_mu, joint_covariance(precision, chunks).to(f_mu.dtype)
    means, variances = [], []
    for f_mu, jac in source.jacobian_segments(inputs, differentiable):
        means.append(f_mu)
        variances.append(_variance(precision, jac, diagonal).to(f_mu.dtype))
    return torch.cat(means), torch.cat(variances)


# NOTE [Predictions against a float64 posterior]
# The curvature is accumulated and decomposed in float64 by default (see
# BaseLaplace's curvature_dtype): its null space is exact, so a tiny prior precision
# gives the right (huge) variance along it. The Jacobians come from the model in its
# own dtype; they are cast up before they meet the factorization (contractions with
# eigenbases of a float64 precision lose nothing more than the Jacobians' own
# rounding), and the variances are cast back to the model's dtype. A diagonal
# posterior is the exception: J diag(1/d) J^T has no rotation to lose accuracy in
# (its diagonal is a sum of nonnegative terms, each exact to the Jacobian's own
# rounding), so the inverse entries are cast down instead and the contraction, which
# costs about C weight-gradient passes, runs in the model's dtype (ResNet-18 GLM
# predictive: 20.6 -> 9.8 forward + backward passes per test batch). A Kronecker
# posterior keeps its rotations in float64 and contracts positions in the model's
# dtype after them (NOTE [Positional contractions in the model's dtype]).
def _variance(precision: CurvatureMatrix, jac: Any, diagonal: bool) -> Tensor:
    """:func:`functional_variance` with the Jacobian in the precision's dtype."""
    if isinstance(precision, Diagonal):  # see NOTE [Predictions against a ...]
        return functional_variance(precision, jac, diagonal)
    return functional_variance(precision, jac, diagonal, dtype=precision.dtype)


def positionwise_moments(
    source: CurvatureSource,
    precision: CurvatureMatrix,
    inputs: Any,
    classes: int,
    diagonal: bool = False,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Moments per position of outputs ``[N, C, *T]`` (classification per position).

    Args:
        source: The subset's curvature source.
        precision: The posterior precision.
        inputs: A batch of inputs.
        classes: ``C``.
        diagonal: Only the variances.
        differentiable: Keep the autograd graph w.r.t. the inputs.

    Returns:
        :math:`f_\mu` ``[N T, C]`` and :math:`f_{\mathrm{var}}` ``[N T, C, C]``
        (``[N T, C]`` if ``diagonal``), sample-major.
    """
    means, variances = [], []
    for f_mu, jac in source.jacobian_segments(inputs, differentiable):
        per_position = jac.per_position(classes)
        means.append(f_mu.reshape(len(f_mu), classes, -1).transpose(1, 2))
        variances.append(_variance(precision, per_position, diagonal).to(f_mu.dtype))
    return torch.cat(means).reshape(-1, classes), torch.cat(variances)


def joint_covariance(precision: CurvatureMatrix, chunks: Chunks) -> Tensor:
    r"""The joint :math:`J \Lambda^{-1} J^\top` over all outputs, ``[N C, N C]``.

    Args:
        precision: The posterior precision.
        chunks: Re-creates the Jacobian chunks (see the module NOTE).

    Returns:
        The symmetric covariance, outputs flattened sample-major.
    """
    iterator = chunks()
    head = list(itertools.islice(iterator, 2))
    if len(head) == 1:
        flat = head[0].reshape(-1, head[0].shape[-1])
        return _symmetric(flat @ precision.solve(flat.mT))
    columns = []
    for right in itertools.chain(head, iterator):
        flat = right.reshape(-1, right.shape[-1])
        solved = precision.solve(flat.mT)  # [P, N_b C]
        column = [left.reshape(-1, left.shape[-1]) @ solved for left in chunks()]
        columns.append(torch.cat(column))
    return _symmetric(torch.cat(columns, dim=1))


def _symmetric(matrix: Tensor) -> Tensor:
    return (matrix + matrix.mT) / 2
