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
from bayescurv.curvature.linalg import check_symmetric
from bayescurv.curvature.prior import PrecisionLike, PriorStructure
from bayescurv.curvature.spectral import LazyEigenbasis

_OWNER = "Dense"


class Dense(CurvatureMatrix):
    r"""A dense precision :math:`\Lambda = s H + \operatorname{diag}(\pi)`.

    With a scalar prior, :math:`\Lambda = Q \operatorname{diag}(s \lambda + \pi) Q^\top`
    uses the eigendecomposition :math:`H = Q \operatorname{diag}(\lambda) Q^\top`,
    computed once and shared by every object derived with ``add_prior`` / ``scaled``:
    a new scalar prior or scale costs :math:`O(P)` for the log determinant. Per-block
    and per-parameter priors break the eigenbasis; they use a Cholesky factorization
    of :math:`\Lambda` (:math:`O(P^3)`, once per object).

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

    def _mvp(self, x: Tensor) -> Tensor:
        prior = priors.per_parameter(self._prior, self.block_sizes)
        return self._scale * (self.matrix @ x) + prior[:, None] * x

    def _factorize(self) -> Pieces:
        block = slice(0, self.num_params)
        if self.prior_structure is PriorStructure.SCALAR:
            basis = self._basis.get()
            eigenvalues = self._scale * basis.eigenvalues() + self._prior
            return [(block, SpectralFactorization(basis, eigenvalues, _OWNER))]
        return [(block, CholeskyFactorization(self.dense(), _OWNER))]

    def _data_state(self) -> dict[str, Any]:
        return {"matrix": self.matrix, "eigenbasis": self._basis.state_dict()}

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
        return new

    def _map_data(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.matrix = fn(self.matrix)
        self._basis = self._basis.map(fn)
