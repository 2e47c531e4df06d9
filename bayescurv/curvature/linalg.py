"""Checked dense linear algebra: input validation, decompositions, mode products.

Every decomposition of the package goes through :func:`symmetric_eigh` and
:func:`cholesky`, so failures surface as one error type with the structure's name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature.rotation import MIN_UNIT_FRACTION, Rotation
from bayescurv.engine.boundary import all_finite

SYMMETRY_RTOL = 1e-4
"""Largest accepted ``max|M - Mᵀ|`` relative to ``max|M|`` for a symmetric input."""


EIGEN_THREADS = 1
"""Most threads a symmetric eigendecomposition of a large matrix may use (see NOTE)."""
EIGEN_THREADS_MIN_SIZE = 64
"""Matrices of this order and larger are decomposed with :data:`EIGEN_THREADS`."""


class NotPositiveDefiniteError(ValueError):
    """A precision that must be positive definite is not (numerically)."""


def check_tensor(value: object, owner: str, what: str, ndim: int) -> Tensor:
    """Check that ``value`` is a finite floating-point tensor with ``ndim`` dims.

    Args:
        value: The input to check.
        owner: Name of the structure, used in error messages.
        what: Name of the input, used in error messages.
        ndim: Expected number of dimensions.

    Returns:
        ``value``, detached: curvature inputs are constants; only the prior precision
        and the scale carry gradients.

    Raises:
        TypeError: If ``value`` is not a floating-point tensor.
        ValueError: If it has the wrong number of dimensions or non-finite entries.
    """
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{owner}: {what} must be a floating-point tensor.")
    if value.ndim != ndim:
        raise ValueError(
            f"{owner}: {what} must have {ndim} dimension(s), got shape "
            f"{list(value.shape)}."
        )
    if not all_finite(value):
        raise ValueError(f"{owner}: {what} contains NaN or inf.")
    return value.detach()


def check_symmetric(
    matrix: Tensor, owner: str, what: str, batched: bool = False
) -> Tensor:
    r"""Check that a finite matrix is square and symmetric; return it symmetrized.

    Args:
        matrix: ``[n, n]``, or ``[G, n, n]`` with ``batched``.
        owner: Name of the structure, used in error messages.
        what: Name of the input, used in error messages.
        batched: Whether ``matrix`` is a stack of ``G`` matrices.

    Returns:
        :math:`(M + M^\top) / 2`, detached, of ``matrix``'s shape.

    Raises:
        ValueError: If ``matrix`` is not square, not finite, or not symmetric up to
            :data:`SYMMETRY_RTOL`.
    """
    matrix = check_tensor(matrix, owner, what, ndim=3 if batched else 2)
    if matrix.shape[-2] != matrix.shape[-1]:
        raise ValueError(
            f"{owner}: {what} must be square, got shape {list(matrix.shape)}."
        )
    # NOTE [Symmetrizing through one transposed copy]
    # Elementwise ops with a transposed operand (M + M^T, dist(M, M^T)) are not
    # vectorized on CPU (~180 ms for a 4,608 x 4,608 factor); copying M^T into a
    # fresh buffer is a blocked transpose (~28 ms), after which the difference, its
    # extremes (aminmax) and the symmetrization are contiguous in-place passes.
    with torch.no_grad():
        symmetric = torch.empty_like(matrix).copy_(matrix.mT)
        symmetric.sub_(matrix)  # M^T - M
        asymmetry = _max_abs(symmetric)
        if asymmetry > SYMMETRY_RTOL * _max_abs(matrix):
            raise ValueError(
                f"{owner}: {what} must be symmetric, got max|M - M^T| = "
                f"{asymmetry.item():.3g}."
            )
        return symmetric.mul_(0.5).add_(matrix)  # (M + M^T) / 2


def _max_abs(tensor: Tensor) -> Tensor:
    """``max |t|`` of a non-empty tensor (``0`` if empty), from one min/max pass."""
    if tensor.numel() == 0:
        return tensor.new_zeros(())
    low, high = torch.aminmax(tensor)
    return torch.maximum(-low, high)


# NOTE [Round-off negative eigenvalues of a PSD matrix]
# A backward-stable symmetric eigensolver returns the eigenvalues of a PSD matrix
# up to about n * eps * ||M||; in float32 a nearly singular GGN (e.g. the all-weights
# GGN of a small regression MLP) then shows eigenvalues like -5e-3 next to 1e4, and
# a small prior precision (as evidence tuning finds) would turn the precision
# "indefinite". Negative eigenvalues within that bound are zeroed (laplace-torch
# clamps every negative one); larger negative ones are kept, so a truly indefinite
# matrix still raises NotPositiveDefiniteError.
def clamp_roundoff(eigenvalues: Tensor) -> Tensor:
    r"""Zero negative eigenvalues within round-off of a PSD matrix's, ``[n]``.

    The bound is :math:`n \varepsilon \max_i |\lambda_i|` (``eps`` of the dtype).

    Example:
        >>> import torch
        >>> clamp_roundoff(torch.tensor([-1e-9, -1.0, 2.0]))
        tensor([ 0., -1.,  2.])
    """
    if eigenvalues.numel() == 0:
        return eigenvalues
    eps = torch.finfo(eigenvalues.dtype).eps
    # per matrix of a batch [G, n] (one bound for a single [n])
    bound = eigenvalues.shape[-1] * eps * eigenvalues.abs().amax(-1, keepdim=True)
    roundoff = (eigenvalues < 0) & (eigenvalues >= -bound)
    return eigenvalues.masked_fill(roundoff, 0.0)


def check_positive(eigenvalues: Tensor, owner: str) -> None:
    """Raise if a precision's eigenvalues (or pivots) are not all positive.

    Raises:
        NotPositiveDefiniteError: Naming ``owner`` and the smallest value.
    """
    if eigenvalues.numel() and not (eigenvalues > 0).all():
        raise NotPositiveDefiniteError(
            f"{owner}: the precision is not positive definite (smallest eigenvalue "
            f"{eigenvalues.min().item():.3g}). Add a positive prior precision with "
            "add_prior(...) or check the curvature."
        )


# NOTE [Symmetric eigendecompositions run single-threaded]
# LAPACK's symmetric eigensolvers (MKL ?syevd) spend most of their time in the
# Householder tridiagonalization (?sytrd), half of it matrix-vector products: memory
# bound, with a thread barrier per column. Measured on 2 cores shared with other
# jobs (torch 2.13 CPU, MKL, n = 3,760, float32): eigvalsh 1.5 s CPU with one
# thread, 5-9 s CPU (and 2.5-8x the wall-clock time) with two; eigh 7 s vs 17-45 s.
# A spare core helps Cholesky and matrix products, not this reduction, so large
# decompositions run with at most EIGEN_THREADS threads (torch's setting is
# restored afterwards). Set EIGEN_THREADS = 0 to keep torch's thread count.
@contextmanager
def eigen_threads(size: int) -> Iterator[None]:
    """Limit torch's threads to :data:`EIGEN_THREADS` for an order-``size`` problem."""
    previous = torch.get_num_threads()
    if EIGEN_THREADS < 1 or size < EIGEN_THREADS_MIN_SIZE or previous <= EIGEN_THREADS:
        yield
        return
    torch.set_num_threads(EIGEN_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def symmetric_eigh(matrix: Tensor, owner: str) -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition :math:`M = Q \operatorname{diag}(\lambda) Q^\top`.

    Args:
        matrix: Symmetric ``[n, n]``.
        owner: Name of the structure, used in error messages.

    Returns:
        Eigenvalues ``[n]`` (ascending) and orthonormal eigenvectors ``[n, n]``.

    Large matrices are decomposed single-threaded (see :func:`eigen_threads`); rows
    and columns that are exactly zero are split off first (see NOTE [Zero rows split
    off before a decomposition]).

    Raises:
        NotPositiveDefiniteError: If the decomposition does not converge.
    """
    values, vectors, _ = eigh_with_rotation(matrix, owner)
    return values, vectors


def eigh_with_rotation(matrix: Tensor, owner: str) -> tuple[Tensor, Tensor, Rotation]:
    r""":func:`symmetric_eigh` and the product :math:`x \mapsto x Q` it allows.

    Where zero rows were split off, the rotation multiplies the kept block only and
    copies the coordinates of the unit eigenvectors (NOTE [Rotations that skip exact
    unit eigenvectors] in :mod:`bayescurv.curvature.rotation`).

    Raises:
        NotPositiveDefiniteError: If the decomposition does not converge.
    """
    kept = _nonzero_rows(matrix)
    if kept is None:
        values, vectors = _decomposed(
            torch.linalg.eigh, matrix, owner, "eigendecomposition"
        )
        return values, vectors, Rotation(vectors)
    sub = matrix[kept][:, kept]
    values, vectors = _decomposed(torch.linalg.eigh, sub, owner, "eigendecomposition")
    size, rank = matrix.shape[-1], len(kept)
    zero = torch.ones(size, dtype=torch.bool, device=matrix.device)
    zero[kept] = False
    zero_rows = zero.nonzero().squeeze(1)
    full = torch.zeros(size, size, dtype=vectors.dtype, device=vectors.device)
    full[kept, :rank] = vectors  # the eigenvectors of the kept block
    full[zero_rows, torch.arange(rank, size)] = 1.0  # unit vectors
    all_values = torch.cat([values, values.new_zeros(size - rank)])
    order = torch.argsort(all_values, stable=True)
    if size - rank < MIN_UNIT_FRACTION * size:  # copies would cost more than saved
        vectors = full[:, order]
        return all_values[order], vectors, Rotation(vectors)
    position = torch.empty_like(order)
    position[order] = torch.arange(size, device=order.device)  # column -> position
    rotation = Rotation(
        full[:, order],
        rows=kept,
        cols=position[:rank],
        block=vectors,
        unit_rows=zero_rows,
        unit_cols=position[rank:],
        signs=None,
    )
    return all_values[order], rotation.matrix, rotation


# NOTE [Zero rows split off before a decomposition]
# A symmetric matrix whose row i (and column i) is exactly zero has the unit vector
# e_i as an eigenvector with eigenvalue 0, and its other eigenpairs are those of the
# principal submatrix without row and column i, padded with a zero. Kronecker input
# factors of 3x3 convolutions on the 1x1 maps of a ResNet's last stage are such
# matrices (8 of 9 kernel taps only ever see zero padding: 4,096 of 4,608 rows), so
# decomposing the 512 rows that are not zero costs (1/9)^3 of the whole and is exact;
# it also keeps the zero rows out of the eigensolver, where they made float32 fail to
# converge. Eigenvalues stay ascending. Matrices without zero rows (or all zero)
# are decomposed as they are.
def _nonzero_rows(matrix: Tensor) -> Tensor | None:
    """Indices of the rows that are not exactly zero, ``None`` if all or none are."""
    if matrix.dim() != 2 or matrix.shape[0] < 2:
        return None
    nonzero = matrix != 0
    kept = (nonzero.any(dim=0) | nonzero.any(dim=1)).nonzero().squeeze(1)
    if len(kept) in (0, matrix.shape[0]):
        return None
    return kept


def symmetric_eigvalsh(matrix: Tensor, owner: str) -> Tensor:
    r"""Eigenvalues of a symmetric matrix (no eigenvectors: several times cheaper).

    Raises:
        NotPositiveDefiniteError: If the decomposition does not converge.
    """
    kept = _nonzero_rows(matrix)
    if kept is None:
        return _decomposed(
            torch.linalg.eigvalsh, matrix, owner, "eigenvalue computation"
        )
    sub = matrix[kept][:, kept]
    values = _decomposed(torch.linalg.eigvalsh, sub, owner, "eigenvalue computation")
    zeros = values.new_zeros(matrix.shape[-1] - len(kept))
    return torch.cat([values, zeros]).sort().values


# NOTE [When a symmetric eigensolver does not converge]
# LAPACK's ?syevd can fail to converge in float32 on matrices that are exactly PSD but
# badly structured, e.g. Kronecker factors of 3x3 convolutions on 2x2 or 1x1 maps in a
# ResNet's last stages, where most rows are exactly zero padding. Such a failure is a
# numerical accident, not a property of the curvature, so it is retried: first in
# float64 (results cast back), then with a jitter of n * eps * max|M| on the diagonal
# (far below round-off of any eigenvalue that matters), with a warning naming the
# structure. Only when that fails too does NotPositiveDefiniteError reach the caller.
def _decomposed(
    decompose: Callable[[Tensor], Any], matrix: Tensor, owner: str, what: str
) -> Any:
    """``decompose(matrix)`` under :func:`eigen_threads`; see the NOTE on failures."""
    attempts = [matrix]
    if matrix.dtype != torch.float64:
        attempts.append(matrix.double())
    error: torch.linalg.LinAlgError | None = None
    for candidate in attempts:
        try:
            with eigen_threads(candidate.shape[-1]):
                return _cast(decompose(candidate), matrix.dtype)
        except torch.linalg.LinAlgError as failure:
            error = failure
    wide = attempts[-1]
    scale = wide.abs().max().clamp_min(torch.finfo(wide.dtype).tiny)
    jitter = wide.shape[-1] * torch.finfo(wide.dtype).eps * scale
    try:
        with eigen_threads(wide.shape[-1]):
            result = decompose(wide + jitter * torch.eye(*wide.shape[-2:]).to(wide))
    except torch.linalg.LinAlgError as failure:
        raise NotPositiveDefiniteError(
            f"{owner}: the symmetric {what} failed in {matrix.dtype}, in float64 and "
            f"with a jitter of {jitter.item():.3g} ({failure})."
        ) from error
    warnings.warn(
        f"{owner}: the symmetric {what} did not converge ({error}); it succeeded "
        f"with a diagonal jitter of {jitter.item():.3g} (eigenvalues shifted by it).",
        UserWarning,
        stacklevel=3,
    )
    return _cast(result, matrix.dtype)


def _cast(result: Any, dtype: torch.dtype) -> Any:
    """A tensor or a tuple of tensors in ``dtype``."""
    if isinstance(result, Tensor):
        return result.to(dtype)
    return tuple(t.to(dtype) for t in result)


def cholesky(matrix: Tensor, owner: str) -> Tensor:
    r"""Lower Cholesky factor :math:`L` with :math:`M = L L^\top`.

    Args:
        matrix: Symmetric positive definite ``[n, n]``.
        owner: Name of the structure, used in error messages.

    Returns:
        ``[n, n]`` lower triangular (differentiable).

    Raises:
        NotPositiveDefiniteError: If ``matrix`` is not numerically positive definite.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        raise NotPositiveDefiniteError(
            f"{owner}: the precision is not positive definite (Cholesky failed at "
            f"pivot {info.item()}). Add a positive prior precision with "
            "add_prior(...) or check the curvature."
        )
    return factor


def mode_products(
    tensor: Tensor, matrices: Sequence[Tensor], grouped: bool = False
) -> Tensor:
    r"""Multiply mode ``i`` of a tensor by ``matrices[i]``, for every ``i``.

    For a row-major flattened ``x = vec(X)`` with ``X: [n_1, n_2]`` this computes
    :math:`\operatorname{vec}(M_1 X M_2^\top) = (M_1 \otimes M_2) x`; in general it
    applies :math:`M_1 \otimes \dots \otimes M_m` without forming it.

    Args:
        tensor: ``[n_1, ..., n_m, *rest]``, or ``[G, n_1, ..., n_m, *rest]`` with
            ``grouped``.
        matrices: ``m`` matrices, ``matrices[i]: [r_i, n_i]``, or stacks
            ``[G, r_i, n_i]`` with ``grouped`` (group ``g`` of the tensor is multiplied
            by the ``g``-th matrices: a block-diagonal matrix of ``G`` Kronecker
            products).
        grouped: Whether the tensor and the matrices carry a leading group axis.

    Returns:
        ``[r_1, ..., r_m, *rest]`` (``[G, r_1, ..., r_m, *rest]`` with ``grouped``).
    """
    if grouped:
        for mode, matrix in enumerate(matrices, start=1):
            moved = torch.movedim(tensor, mode, 1)
            rest = moved.shape[2:]
            product = torch.bmm(matrix, moved.reshape(*moved.shape[:2], -1))
            tensor = torch.movedim(product.reshape(*product.shape[:2], *rest), 1, mode)
        return tensor
    for mode, matrix in enumerate(matrices):
        tensor = torch.tensordot(matrix, tensor, dims=([1], [mode]))
        tensor = torch.movedim(tensor, 0, mode)
    return tensor
