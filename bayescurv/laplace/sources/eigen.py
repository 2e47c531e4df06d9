r"""Top eigenpairs of a symmetric PSD operator from block products only.

Randomized block subspace iteration (Halko, Martinsson & Tropp, 2011, Alg. 4.4/5.3):
with a random start :math:`\Omega \in \mathbb{R}^{P \times (k + p)}`,

.. math::
    Q_0 = \operatorname{orth}(\Omega), \quad
    Q_{i+1} = \operatorname{orth}(G Q_i), \quad
    G \approx Q\, (Q^\top G Q)\, Q^\top,

and the top ``k`` eigenpairs of the small matrix :math:`Q^\top G Q` lifted by
:math:`Q`. Each product with :math:`G` is one pass over the data (every column of
the block in that pass). With :math:`k + p \ge P` the subspace is everything and the
result is exact after one product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DEFAULT_ITERATIONS = 4
r"""Power iterations :math:`q`; errors decay like
:math:`(\lambda_{k+p+1}/\lambda_k)^{2q+1}`."""
DEFAULT_OVERSAMPLING = 10
"""Extra columns :math:`p` of the block."""


def top_eigenpairs(
    matmul: Callable[[Tensor], Tensor],
    size: int,
    rank: int,
    like: Tensor,
    generator: torch.Generator | None = None,
    n_iter: int = DEFAULT_ITERATIONS,
    oversampling: int = DEFAULT_OVERSAMPLING,
) -> tuple[Tensor, Tensor]:
    r"""The ``rank`` largest eigenpairs of a symmetric PSD ``[size, size]`` operator.

    Args:
        matmul: :math:`V \mapsto G V` for blocks ``[size, K]``.
        size: ``P``.
        rank: ``k <= P``.
        like: Tensor giving dtype and device.
        generator: Randomness of the start block (CPU generator).
        n_iter: Power iterations ``q``.
        oversampling: Extra block columns ``p``.

    Returns:
        Eigenvalues ``[k]`` (descending) and orthonormal eigenvectors ``[P, k]``.

    Example:
        >>> import torch
        >>> G = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
        >>> values, vectors = top_eigenpairs(lambda v: G @ v, 6, 2, G)
        >>> values
        tensor([6., 5.], dtype=torch.float64)
    """
    width = min(size, rank + oversampling)
    if width == size:
        basis = torch.eye(size, dtype=like.dtype, device=like.device)
        n_iter = 0
    else:
        start = torch.randn(size, width, generator=generator, dtype=like.dtype)
        basis = torch.linalg.qr(start.to(like.device)).Q
    for _ in range(n_iter):
        basis = torch.linalg.qr(matmul(basis)).Q
    projected = basis.mT @ matmul(basis)
    values, small = torch.linalg.eigh((projected + projected.mT) / 2)
    order = values.argsort(descending=True)[:rank]
    return values[order], basis @ small[:, order]
