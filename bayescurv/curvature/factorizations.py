r"""Factorizations of one positive definite diagonal block :math:`M` of a precision.

A structure splits its precision into independent diagonal blocks (one for dense and
low-rank structures, one per layer for Kronecker blocks) and hands each to a
:class:`Factorization`; :class:`~bayescurv.curvature.base.CurvatureMatrix` then
implements ``logdet``, ``solve``, ``inverse``, ``inverse_diagonal``, ``sample`` and
``inv_quad_form_batch`` once for all structures by looping over the blocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from bayescurv.curvature.linalg import check_positive, cholesky
from bayescurv.curvature.spectral import KronEigenbasis


class Factorization(ABC):
    r"""Inverse-side operations on a positive definite ``[n, n]`` matrix :math:`M`.

    Attributes:
        size: ``n``.
        noise_dim: Standard normal draws per sample consumed by
            :meth:`sample_transform` (``n`` unless the factorization needs more).
    """

    size: int
    noise_dim: int

    @abstractmethod
    def logdet(self) -> Tensor:
        r""":math:`\log\det M`, a 0-d tensor."""

    @abstractmethod
    def solve(self, x: Tensor) -> Tensor:
        r""":math:`M^{-1} x` for ``x: [n, K]``, ``[n, K]``."""

    @abstractmethod
    def inverse_diagonal(self) -> Tensor:
        r"""Diagonal of :math:`M^{-1}`, ``[n]``."""

    @abstractmethod
    def sample_transform(self, z: Tensor) -> Tensor:
        r"""Map standard normals to draws from :math:`\mathcal{N}(0, M^{-1})`.

        Args:
            z: ``[noise_dim, S]`` i.i.d. standard normal columns.

        Returns:
            ``[n, S]`` columns with covariance :math:`M^{-1}`.
        """

    @abstractmethod
    def inv_quad_batch(self, jac: Tensor) -> Tensor:
        r""":math:`J_i M^{-1} J_i^\top` for ``jac: [N, C, n]``, ``[N, C, C]``."""

    def inverse(self) -> Tensor:
        r""":math:`M^{-1}`, ``[n, n]``."""
        eye = torch.eye(self.size, dtype=self._dtype, device=self._device)
        return self.solve(eye)

    @property
    @abstractmethod
    def _dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def _device(self) -> torch.device: ...


class DiagonalFactorization(Factorization):
    r""":math:`M = \operatorname{diag}(d)`.

    Args:
        entries: ``[n]``, all positive.
        owner: Name of the structure, used in error messages.
    """

    def __init__(self, entries: Tensor, owner: str) -> None:
        check_positive(entries, owner)
        self.entries = entries
        self.size = self.noise_dim = entries.shape[0]

    def logdet(self) -> Tensor:  # noqa: D102
        return self.entries.log().sum()

    def solve(self, x: Tensor) -> Tensor:  # noqa: D102
        return x / self.entries[:, None]

    def inverse_diagonal(self) -> Tensor:  # noqa: D102
        return self.entries.reciprocal()

    def sample_transform(self, z: Tensor) -> Tensor:  # noqa: D102
        return z * self.entries.rsqrt()[:, None]

    def inv_quad_batch(self, jac: Tensor) -> Tensor:
        """See :meth:`Factorization.inv_quad_batch`; in the Jacobian's dtype.

        A diagonal has no rotation to lose accuracy in: each entry of the result is a
        sum of products of ``jac`` with positive weights, exact to ``jac``'s rounding.
        """
        weights = self.entries.reciprocal().to(jac.dtype)
        return torch.einsum("ncp,p,ndp->ncd", jac, weights, jac)

    @property
    def _dtype(self) -> torch.dtype:
        return self.entries.dtype

    @property
    def _device(self) -> torch.device:
        return self.entries.device


class SpectralFactorization(Factorization):
    r""":math:`M = Q \operatorname{diag}(e) Q^\top`, :math:`Q` a Kronecker eigenbasis.

    All operations are :math:`f(M) = Q \operatorname{diag}(f(e)) Q^\top`; sampling uses
    the square root :math:`Q \operatorname{diag}(e^{-1/2})` of :math:`M^{-1}`.

    Args:
        basis: The shared eigenbasis :math:`Q`.
        eigenvalues: ``e``, ``[n]``, all positive.
        owner: Name of the structure, used in error messages.
    """

    def __init__(self, basis: KronEigenbasis, eigenvalues: Tensor, owner: str) -> None:
        check_positive(eigenvalues, owner)
        self.basis = basis
        self.eigenvalues = eigenvalues
        self.size = self.noise_dim = eigenvalues.shape[0]
        self._inverse: Tensor | None = None

    @property
    def inverse_eigenvalues(self) -> Tensor:
        """``1 / e``, kept after the first use unless ``e`` carries a graph.

        Every predictive call reads it (11.2M entries for a ResNet-18's KFAC).
        """
        if self.eigenvalues.requires_grad:
            return self.eigenvalues.reciprocal()
        if self._inverse is None:
            self._inverse = self.eigenvalues.reciprocal()
        return self._inverse

    def logdet(self) -> Tensor:  # noqa: D102
        return self.eigenvalues.log().sum()

    def solve(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.basis.apply(self.inverse_eigenvalues, x)

    def inverse_diagonal(self) -> Tensor:  # noqa: D102
        return self.basis.diagonal(self.inverse_eigenvalues)

    def sample_transform(self, z: Tensor) -> Tensor:  # noqa: D102
        return self.basis.unrotate(self.eigenvalues.rsqrt()[:, None] * z)

    def inv_quad_batch(self, jac: Tensor) -> Tensor:  # noqa: D102
        num, out, size = jac.shape
        rotated = self.basis.rotate_rows(jac.reshape(num * out, size))
        whitened = (rotated * self.eigenvalues.rsqrt()).reshape(num, out, size)
        return whitened @ whitened.mT

    @property
    def _dtype(self) -> torch.dtype:
        return self.eigenvalues.dtype

    @property
    def _device(self) -> torch.device:
        return self.eigenvalues.device


class CholeskyFactorization(Factorization):
    r""":math:`M = L L^\top`.

    Sampling uses :math:`x = L^{-\top} z`, whose covariance is
    :math:`L^{-\top} L^{-1} = (L L^\top)^{-1}` (not :math:`L^{-1} z`, whose covariance
    :math:`L^{-1} L^{-\top}` is a different matrix).

    Args:
        matrix: Symmetric positive definite ``[n, n]``.
        owner: Name of the structure, used in error messages.
    """

    def __init__(self, matrix: Tensor, owner: str) -> None:
        self.factor = cholesky(matrix, owner)
        self.size = self.noise_dim = matrix.shape[0]

    def logdet(self) -> Tensor:  # noqa: D102
        return 2 * self.factor.diagonal().log().sum()

    def solve(self, x: Tensor) -> Tensor:  # noqa: D102
        return torch.cholesky_solve(x, self.factor)

    def inverse(self) -> Tensor:  # noqa: D102
        return torch.cholesky_inverse(self.factor)

    def inverse_diagonal(self) -> Tensor:  # noqa: D102
        eye = torch.eye(self.size, dtype=self._dtype, device=self._device)
        return self._whiten(eye).square().sum(0)

    def sample_transform(self, z: Tensor) -> Tensor:  # noqa: D102
        return torch.linalg.solve_triangular(self.factor.mT, z, upper=True)

    def inv_quad_batch(self, jac: Tensor) -> Tensor:  # noqa: D102
        # one triangular solve with N*C right-hand sides, not N small ones
        num, out, size = jac.shape
        whitened = self._whiten(jac.reshape(num * out, size).mT)  # [n, N*C]
        rows = whitened.mT.reshape(num, out, size)
        return rows @ rows.mT

    def _whiten(self, x: Tensor) -> Tensor:
        r""":math:`L^{-1} x` for ``x: [..., n, K]``."""
        return torch.linalg.solve_triangular(self.factor, x, upper=False)

    @property
    def _dtype(self) -> torch.dtype:
        return self.factor.dtype

    @property
    def _device(self) -> torch.device:
        return self.factor.device
