"""Dense curvature: a full ``[P, P]`` matrix (full-network GGN, Hessian, Fisher)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import prior as priors
from bayescurv.curvature.base import CurvatureMatrix, Pieces
from bayescurv.curvature.factorizations import (
    CholeskyFactorization,
    SpectralFactorization,
)
from bayescurv.curvature.linalg import (
    NotPositiveDefiniteError,
    check_positive,
    check_symmetric,
    clamp_roundoff,
    symmetric_eigvalsh,
)
from bayescurv.curvature.prior import PrecisionLike, PriorStructure
from bayescurv.curvature.spectral import LazyEigenbasis

_OWNER = "Dense"


class _LazyEigenvalues:
    """Eigenvalues of the data term, computed once and shared by all copies."""

    def __init__(self, values: Tensor | None = None) -> None:
        self.values = values

    def get(self, matrix: Tensor, basis: LazyEigenbasis) -> Tensor:
        if self.values is None:
            self.values = (
                basis.get().eigenvalues()
                if basis.is_computed
                else clamp_roundoff(symmetric_eigvalsh(matrix, _OWNER))
            )
        return self.values

    def map(self, fn: Callable[[Tensor], Tensor]) -> _LazyEigenvalues:
        return _LazyEigenvalues(None if self.values is None else fn(self.values))


# NOTE [Eigenvalues for the evidence, Cholesky for the rest]
# With a scalar prior, log det(s H + pi I) = sum log(s lambda_i + pi) needs only the
# eigenvalues of H, computed once (eigvalsh, several times cheaper than a full eigh):
# every further prior or scale (e.g. each step of evidence tuning) costs O(P). The
# inverse-side operations (solve, sampling, J Σ Jᵀ) need one factorization of the
# final posterior; a Cholesky of Λ costs P³/3, far less than the eigenvectors
# (eigh), so they use it unless an eigenbasis is already at hand (e.g. restored).
class Dense(CurvatureMatrix):
    r"""A dense precision :math:`\Lambda = s H + \operatorname{diag}(\pi)`.

    With a scalar prior the log determinant uses the eigenvalues :math:`\lambda` of
    :math:`H`, computed once and shared by every object derived with ``add_prior`` /
    ``scaled``: :math:`\log\det\Lambda = \sum_i \log(s\lambda_i + \pi)` costs
    :math:`O(P)` for a new prior or scale. Solves, samples, the inverse and
    ``inv_quad_form_batch`` use one Cholesky factorization of :math:`\Lambda` per
    object (:math:`O(P^3)`, cached), or the eigenbasis if one was already computed.

    Args:
        matrix: The symmetric positive semi-definite data term ``H``, ``[P, P]``.
        block_sizes: Parameters per block; ``None`` for one block.
        block_names: One name per block.
        scale: Data-term scale, a scalar.
        prior_precision: A scalar, ``[B]`` or ``[P]``.

    Example:
        >>> import torch
        >>> H = Dense(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> x = H.add_prior(1.0).solve(torch.tensor([4.0, 4.0], dtype=torch.float64))
        >>> bool(torch.allclose(x, torch.ones(2, dtype=torch.float64)))
        True
    """

    def __init__(
        self,
        matrix: Tensor,
        *,
        block_sizes: Sequence[int] | None = None,
        block_names: Sequence[str] | None = None,
        scale: PrecisionLike = 1.0,
        prior_precision: PrecisionLike = 0.0,
    ) -> None:
        self.matrix = check_symmetric(matrix, _OWNER, "matrix")
        self._basis = LazyEigenbasis([self.matrix], _OWNER)
        self._eigenvalues = _LazyEigenvalues()
        super().__init__(
            block_sizes=block_sizes,
            block_names=block_names,
            scale=scale,
            prior_precision=prior_precision,
            num_params=self.matrix.shape[0],
            like=self.matrix,
        )

    def dense(self) -> Tensor:  # noqa: D102
        prior = priors.per_parameter(self._prior, self.block_sizes)
        return self._scale * self.matrix + torch.diag(prior)

    def diagonal(self) -> Tensor:  # noqa: D102
        prior = priors.expand(self._prior, self.block_sizes)
        return self._scale * self.matrix.diagonal() + prior

    def logdet(self) -> Tensor:
        r""":math:`\log\det\Lambda`; :math:`O(P)` per new scalar prior (see NOTE)."""
        if self.prior_structure is not PriorStructure.SCALAR:
            return super().logdet()
        values = self._eigenvalues.get(self.matrix, self._basis)
        eigenvalues = self._scale * values + self._prior
        check_positive(eigenvalues, _OWNER)
        return eigenvalues.log().sum()

    def data_eigenvalues(self) -> Tensor | None:  # noqa: D102
        if self._scale.ndim != 0:
            return None
        values = self._eigenvalues.get(self.matrix, self._basis)
        return self._scale.detach() * values

    def data_eigenbasis(self) -> tuple[Tensor, Tensor] | None:
        r"""Eigenvalues ``[P]`` and eigenvectors ``[P, P]`` of the scaled data term.

        From one ``eigh`` shared by every copy (``None`` for a per-block scale);
        the eigenvectors are columns. Several times the cost of
        :meth:`data_eigenvalues`; worth it where many evaluations need more than
        the eigenvalues (e.g. the evidence under a per-block prior,
        :mod:`bayescurv.laplace.tune.spectral`).
        """
        if self._scale.ndim != 0:
            return None
        basis = self._basis.get()
        scale = self._scale.detach()
        return scale * basis.eigenvalues(), basis.factor_eigenvectors[0].detach()

    def _mvp(self, x: Tensor) -> Tensor:
        prior = priors.per_parameter(self._prior, self.block_sizes)
        return self._scale * (self.matrix @ x) + prior[:, None] * x

    def _factorize(self) -> Pieces:
        block = slice(0, self.num_params)
        if self.prior_structure is PriorStructure.SCALAR and self._basis.is_computed:
            basis = self._basis.get()
            eigenvalues = self._scale * basis.eigenvalues() + self._prior
            return [(block, SpectralFactorization(basis, eigenvalues, _OWNER))]
        try:
            return [(block, CholeskyFactorization(self.dense(), _OWNER))]
        except NotPositiveDefiniteError:
            if self.prior_structure is not PriorStructure.SCALAR:
                raise
        # positive definite only up to round-off: the clamped eigenbasis decides
        basis = self._basis.get()
        eigenvalues = self._scale * basis.eigenvalues() + self._prior
        return [(block, SpectralFactorization(basis, eigenvalues, _OWNER))]

    def _data_state(self) -> dict[str, Any]:
        return {
            "matrix": self.matrix,
            "eigenbasis": self._basis.state_dict(),
            "eigenvalues": self._eigenvalues.values,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> Dense:
        new = cls(
            state["matrix"],
            block_sizes=state["block_sizes"],
            block_names=state["block_names"],
            scale=state["scale"],
            prior_precision=state["prior_precision"],
        )
        basis = LazyEigenbasis.basis_from_state(state["eigenbasis"])
        new._basis = LazyEigenbasis([new.matrix], _OWNER, basis)
        new._eigenvalues = _LazyEigenvalues(state.get("eigenvalues"))
        return new

    def _map_data(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.matrix = fn(self.matrix)
        self._basis = self._basis.map(fn)
        self._eigenvalues = self._eigenvalues.map(fn)
