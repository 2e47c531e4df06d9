"""Low-rank plus diagonal curvature (top eigenpairs of the GGN, e.g. from ViViT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bayescurv.curvature import prior as priors
from bayescurv.curvature.base import CurvatureMatrix, Pieces
from bayescurv.curvature.linalg import check_tensor
from bayescurv.curvature.prior import PrecisionLike
from bayescurv.curvature.woodbury import (
    IsotropicLowRankFactorization,
    WoodburyFactorization,
)

_OWNER = "LowRankPlusDiag"


def orthonormality_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted ``max|UᵀU - I|``: ``100 * sqrt(eps)`` of the dtype."""
    return 100 * torch.finfo(dtype).eps ** 0.5


class LowRankPlusDiag(CurvatureMatrix):
    r"""A low-rank plus diagonal precision.

    .. math::
        \Lambda = s\,\big(U \operatorname{diag}(\sigma) U^\top
        + \operatorname{diag}(d)\big) + \operatorname{diag}(\pi)

    Never forms a ``[P, P]`` matrix except in :meth:`dense` and :meth:`inverse`. With
    :math:`s d + \pi` a scalar :math:`c` (constant ``d`` and a scalar prior),
    :math:`\Lambda` has eigenvalues :math:`s \sigma + c` on the span of :math:`U` and
    :math:`c` elsewhere: every operation is spectral, with no factorization, and the log
    determinant of a new prior costs :math:`O(k)`. Otherwise the Woodbury identity and
    the matrix determinant lemma need a ``[k, k]`` Cholesky factorization and
    :math:`O(P k^2)` per new prior.

    Args:
        eigenvectors: ``U``, ``[P, k]`` with orthonormal columns.
        eigenvalues: :math:`\sigma`, ``[k]``, non-negative.
        diag: ``d``: a non-negative scalar or ``[P]`` (default 0).
        block_sizes: Parameters per block; ``None`` for one block.
        block_names: One name per block.
        scale: Data-term scale, a scalar.
        prior_precision: A scalar, ``[B]`` or ``[P]``.

    Example:
        >>> import math, torch
        >>> U = torch.eye(3, 1, dtype=torch.float64)
        >>> L = LowRankPlusDiag(U, torch.tensor([3.0], dtype=torch.float64))
        >>> math.isclose(L.add_prior(2.0).logdet().item(), math.log(5 * 2 * 2))
        True
    """

    def __init__(
        self,
        eigenvectors: Tensor,
        eigenvalues: Tensor,
        diag: PrecisionLike = 0.0,
        *,
        block_sizes: Sequence[int] | None = None,
        block_names: Sequence[str] | None = None,
        scale: PrecisionLike = 1.0,
        prior_precision: PrecisionLike = 0.0,
    ) -> None:
        self.eigenvectors = check_tensor(eigenvectors, _OWNER, "eigenvectors", ndim=2)
        self.eigenvalues = check_tensor(eigenvalues, _OWNER, "eigenvalues", ndim=1)
        num_params, rank = self.eigenvectors.shape
        self._check_eigenpairs(num_params, rank)
        super().__init__(
            block_sizes=block_sizes,
            block_names=block_names,
            scale=scale,
            prior_precision=prior_precision,
            num_params=num_params,
            like=self.eigenvectors,
        )
        self.diag = self._check_diag(diag, num_params)

    def _check_eigenpairs(self, num_params: int, rank: int) -> None:
        if rank > num_params:
            raise ValueError(
                f"{_OWNER}: expected eigenvectors [P, k] with k <= P, got "
                f"{list(self.eigenvectors.shape)}."
            )
        if self.eigenvalues.shape != (rank,):
            raise ValueError(
                f"{_OWNER}: expected eigenvalues of shape [{rank}], got "
                f"{list(self.eigenvalues.shape)}."
            )
        if (self.eigenvalues < 0).any():
            raise ValueError(f"{_OWNER}: eigenvalues must be non-negative.")
        gram = self.eigenvectors.mT @ self.eigenvectors
        error = (gram - torch.eye(rank, dtype=gram.dtype, device=gram.device)).abs()
        if rank and error.max() > orthonormality_tolerance(gram.dtype):
            raise ValueError(
                f"{_OWNER}: eigenvectors must have orthonormal columns, got "
                f"max|U^T U - I| = {error.max().item():.3g}."
            )

    def _check_diag(self, diag: PrecisionLike, num_params: int) -> Tensor:
        like = self.eigenvectors
        if isinstance(diag, Tensor):
            tensor = diag.detach().to(dtype=like.dtype, device=like.device)
        else:
            tensor = torch.as_tensor(diag, dtype=like.dtype, device=like.device)
        if tensor.ndim != 0 and tensor.shape != (num_params,):
            raise ValueError(
                f"{_OWNER}: expected diag to be a scalar or of shape [{num_params}], "
                f"got {list(tensor.shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{_OWNER}: diag contains NaN or inf.")
        if (tensor < 0).any():
            raise ValueError(f"{_OWNER}: diag must be non-negative.")
        return tensor

    def _shift(self) -> Tensor:
        r""":math:`s d + \pi`: 0-d if ``d`` and the prior are scalars, else ``[P]``."""
        prior = priors.expand(self._prior, self.block_sizes)
        shift = self._scale * self.diag + prior
        return shift if shift.ndim == 0 else shift.expand(self.num_params)

    def dense(self) -> Tensor:  # noqa: D102
        low_rank = (self.eigenvectors * (self._scale * self.eigenvalues)) @ (
            self.eigenvectors.mT
        )
        return low_rank + torch.diag(self._shift().expand(self.num_params))

    def diagonal(self) -> Tensor:  # noqa: D102
        low_rank = self.eigenvectors.square() @ (self._scale * self.eigenvalues)
        return low_rank + self._shift()

    def data_eigenvalues(self) -> Tensor | None:  # noqa: D102
        if self._scale.ndim != 0 or self.diag.ndim != 0:
            return None
        scale, rank = self._scale.detach(), self.eigenvalues.shape[0]
        shift = self.diag.expand(self.num_params - rank)
        return scale * torch.cat([self.eigenvalues + self.diag, shift])

    def _mvp(self, x: Tensor) -> Tensor:
        shift = self._shift()
        projected = (self._scale * self.eigenvalues)[:, None] * (
            self.eigenvectors.mT @ x
        )
        diagonal = shift * x if shift.ndim == 0 else shift[:, None] * x
        return self.eigenvectors @ projected + diagonal

    def _factorize(self) -> Pieces:
        block, shift = slice(0, self.num_params), self._shift()
        if shift.ndim == 0:
            eigenvalues = self._scale * self.eigenvalues
            factorization = IsotropicLowRankFactorization(
                shift, self.eigenvectors, eigenvalues, _OWNER
            )
            return [(block, factorization)]
        # sqrt(s) * sqrt(sigma), not sqrt(s * sigma): finite gradient at sigma = 0
        root = self.eigenvectors * (self._scale.sqrt() * self.eigenvalues.sqrt())
        return [(block, WoodburyFactorization(shift, root, _OWNER))]

    def _data_state(self) -> dict[str, Any]:
        return {
            "eigenvectors": self.eigenvectors,
            "eigenvalues": self.eigenvalues,
            "diag": self.diag,
        }

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> LowRankPlusDiag:
        return cls(
            state["eigenvectors"],
            state["eigenvalues"],
            state["diag"],
            block_sizes=state["block_sizes"],
            block_names=state["block_names"],
            scale=state["scale"],
            prior_precision=state["prior_precision"],
        )

    def _map_data(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.eigenvectors = fn(self.eigenvectors)
        self.eigenvalues = fn(self.eigenvalues)
        self.diag = fn(self.diag)
