r"""The GLM's Gaussian over the outputs, :math:`(f_\mu, J \Lambda^{-1} J^\top)`.

* Last layer: closed forms from the features, no Jacobian
  (:mod:`bayescurv.laplace.last_layer_variance`).
* All weights and subnetworks: the Jacobian of a chunk of samples from the engine,
  reduced at once by the posterior's factorization
  (:meth:`~bayescurv.curvature.CurvatureMatrix.inv_quad_form_batch`).
* ``joint``: the covariance over all ``N C`` outputs of the batch from
  :math:`J_a \Lambda^{-1} J_b^\top` for every pair of chunks ``(a, b)``.

# NOTE [Bounded memory for the all-weights predictive]
# The per-sample Jacobian J_n [C, P] is what the functional variance needs (every
# structure's J Σ Jᵀ contracts it with its factorization: eigenbases for kron,
# Cholesky for full, Woodbury for lowrank). The engine computes it for a chunk of
# samples in one batched backward pass (the C output columns pulled back at once),
# and the chunk is reduced to [N_b, C, C] before the next one is computed, so the
# peak memory is the chunk's Jacobian (memory_budget bytes, at least one sample),
# independent of N; an [N C, P] Jacobian never exists. The alternatives cost more
# here: P Jacobian-vector products with the columns of a square root of Σ (one
# forward pass each) are P / C times the C vector-Jacobian products, and Monte Carlo
# estimates of J Σ Jᵀ from sampled weights are not exact. For the joint covariance
# the chunks of a row are recomputed per column chunk (or kept if there is only one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import CurvatureMatrix
from bayescurv.laplace.last_layer import LastLayerSource
from bayescurv.laplace.last_layer_variance import (
    LastLayerJacobian,
    last_layer_variance,
)
from bayescurv.laplace.sources import CurvatureSource

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
    if isinstance(source, LastLayerSource):
        f_mu, jac = _last_layer_jacobian(source, inputs)
        if not joint:
            return f_mu, last_layer_variance(precision, jac, diagonal)
        step = _chunk_size(source, jac.classes * jac.num_params, f_mu)
        rows = range(0, len(f_mu), step)
        return f_mu.flatten(), joint_covariance(
            precision, lambda: (jac.rows(i, i + step).dense() for i in rows)
        )
    if joint:
        chunks = source.jacobian_chunks(inputs, differentiable)
        f_mu = torch.cat([mu for mu, _ in chunks])
        return f_mu.flatten(), joint_covariance(
            precision,
            lambda: (j for _, j in source.jacobian_chunks(inputs, differentiable)),
        )
    means, variances = [], []
    for f_mu, jac in source.jacobian_chunks(inputs, differentiable):
        f_var = precision.inv_quad_form_batch(jac)
        means.append(f_mu)
        variances.append(f_var.diagonal(dim1=-2, dim2=-1) if diagonal else f_var)
    return torch.cat(means), torch.cat(variances)


def _last_layer_jacobian(
    source: LastLayerSource, inputs: Any
) -> tuple[Tensor, LastLayerJacobian]:
    _, f, phi = source.features(inputs)
    return f, LastLayerJacobian(phi, f.shape[1], source.has_bias)


def _chunk_size(source: CurvatureSource, per_sample: int, like: Tensor) -> int:
    """Samples per chunk of ``per_sample`` entries within the memory budget."""
    bytes_per_sample = per_sample * like.element_size()
    return max(1, source.options.memory_budget // max(bytes_per_sample, 1))


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
