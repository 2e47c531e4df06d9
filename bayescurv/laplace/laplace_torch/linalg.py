r"""Dense linear-algebra helpers with laplace-torch's names and conventions.

Small functions on explicit matrices that laplace-torch exports from
``laplace.utils``: Kronecker and block-diagonal products, a diagonal shift, a
symmetric eigendecomposition that clamps round-off, the lower-triangular square root
of a covariance given by its precision, and draws from a batch of Gaussians. The
structured curvature objects of :mod:`bayescurv.curvature` never form these
matrices; the helpers are for users and for tests.

Example:
    >>> import torch
    >>> M = torch.tensor([[4.0, 0.0], [0.0, 9.0]])
    >>> L = invsqrt_precision(M)  # L L^T = M^{-1}
    >>> torch.allclose(L @ L.T, torch.diag(torch.tensor([1 / 4, 1 / 9])))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.curvature.linalg import cholesky, eigen_threads

__all__ = [
    "block_diag",
    "diagonal_add_scalar",
    "invsqrt_precision",
    "kron",
    "normal_samples",
    "symeig",
]


def _check_matrix(value: object, name: str, square: bool = False) -> Tensor:
    """Raise unless ``value`` is a 2-D (square) tensor."""
    if not isinstance(value, Tensor) or value.ndim != 2:
        got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {got}.")
    if square and value.shape[0] != value.shape[1]:
        raise ValueError(f"{name} must be square, got shape {list(value.shape)}.")
    return value


def kron(t1: Tensor, t2: Tensor) -> Tensor:
    r"""The Kronecker product :math:`T_1 \otimes T_2` of two matrices.

    Args:
        t1: ``[a, b]``.
        t2: ``[c, d]``.

    Returns:
        ``[a c, b d]``.

    Raises:
        ValueError: If an argument is not a matrix.
    """
    return torch.kron(_check_matrix(t1, "t1"), _check_matrix(t2, "t2"))


def block_diag(blocks: list[Tensor]) -> Tensor:
    """The block-diagonal matrix of square blocks, ``[sum n_i, sum n_i]``.

    Raises:
        ValueError: If ``blocks`` is empty or a block is not a square matrix.
    """
    if len(blocks) == 0:
        raise ValueError("block_diag needs at least one block.")
    checked = [
        _check_matrix(b, f"block {i}", square=True) for i, b in enumerate(blocks)
    ]
    return torch.block_diag(*checked)


def diagonal_add_scalar(X: Tensor, value: float | Tensor) -> Tensor:
    r""":math:`X + v I` as a new tensor (differentiable in ``X`` and ``v``).

    Args:
        X: Square ``[n, n]``.
        value: A number or a 0-d tensor.
    """
    out = _check_matrix(X, "X", square=True).clone()
    out.diagonal().add_(value)
    return out


def symeig(M: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition of a symmetric PSD matrix with eigenvalues clamped at 0.

    :math:`M = W \operatorname{diag}(L) W^\top`, LAPACK's ``syevd`` on the upper
    triangle (as ``torch.linalg.eigh(M, UPLO="U")``). If it does not converge, it is
    retried on :math:`M + I` (same eigenvectors, eigenvalues shifted back). Negative
    eigenvalues (round-off of a PSD matrix) are set to 0.

    Args:
        M: Symmetric ``[n, n]``.

    Returns:
        Eigenvalues ``[n]`` (ascending, non-negative) and eigenvectors ``[n, n]``.

    Raises:
        torch.linalg.LinAlgError: If the decomposition fails also on the shifted
            matrix (the message names the matrix's size and largest entry).
    """
    _check_matrix(M, "M", square=True)
    with eigen_threads(M.shape[0]):
        try:
            values, vectors = torch.linalg.eigh(M, UPLO="U")
        except torch.linalg.LinAlgError:
            eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
            try:
                values, vectors = torch.linalg.eigh(M + eye, UPLO="U")
            except torch.linalg.LinAlgError as error:
                raise torch.linalg.LinAlgError(
                    f"symeig: the eigendecomposition of a [{M.shape[0]}, "
                    f"{M.shape[0]}] matrix failed, also with unit jitter (largest "
                    f"absolute entry {M.abs().max().item():.3g}; check for NaN or "
                    "inf)."
                ) from error
            values = values - 1.0
    return values.clamp(min=0.0), vectors


def invsqrt_precision(M: Tensor) -> Tensor:
    r"""Lower-triangular :math:`S` with :math:`S S^\top = M^{-1}` for a precision ``M``.

    With the reversal permutation :math:`P` and the Cholesky factor
    :math:`P M P = L L^\top`, :math:`S = P L^{-\top} P` is lower triangular and
    :math:`S S^\top = P L^{-\top} L^{-1} P = M^{-1}` (no inverse of ``M`` is formed).

    Args:
        M: Symmetric positive definite ``[n, n]``.

    Returns:
        ``[n, n]`` lower triangular (a ``scale_tril`` of :math:`\mathcal{N}(0,
        M^{-1})`).

    Raises:
        NotPositiveDefiniteError: If ``M`` is not numerically positive definite.
    """
    _check_matrix(M, "M", square=True)
    factor = cholesky(M.flip(0, 1), "invsqrt_precision")
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)  # L^{-1}
    return inverse.mT.flip(0, 1).tril()


def normal_samples(
    mean: Tensor,
    var: Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draws from a batch of Gaussians :math:`\mathcal{N}(\mu_b, \Sigma_b)`.

    Every batch entry gets its own standard normal draws (laplace-torch shares one
    draw across the batch, which makes the samples of different inputs move
    together); the marginal of each entry is the same.

    Args:
        mean: ``[B, D]``.
        var: Variances ``[B, D]`` (diagonal covariances) or covariances
            ``[B, D, D]``.
        n_samples: Number of draws ``S``.
        generator: Source of randomness (default: torch's global generator).

    Returns:
        ``[S, B, D]``.

    Raises:
        ValueError: For other shapes or a non-positive ``n_samples``.
    """
    if not isinstance(mean, Tensor) or mean.ndim != 2:
        raise ValueError("normal_samples: mean must be a [B, D] tensor.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    noise = torch.randn(
        (n_samples, *mean.shape),
        dtype=mean.dtype,
        device=mean.device,
        generator=generator,
    )
    if var.shape == mean.shape:
        return mean + var.sqrt() * noise
    if var.shape == (*mean.shape, mean.shape[1]):
        scale = torch.linalg.cholesky(var)  # [B, D, D]
        return mean + (scale @ noise.unsqueeze(-1)).squeeze(-1)
    raise ValueError(
        f"normal_samples: var must be [B, D] = {list(mean.shape)} or [B, D, D]; "
        f"got {list(var.shape)}."
    )
