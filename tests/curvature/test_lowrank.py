"""LowRankPlusDiag: the conformance suite on both code paths, and input checks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayescurv.curvature import LowRankPlusDiag, PriorStructure
from tests.curvature.conformance import CurvatureConformance

P, RANK = 10, 3


def eigenpairs(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    basis, _ = torch.linalg.qr(
        torch.randn(P, RANK, generator=generator, dtype=torch.float64)
    )
    return basis, 3 * torch.rand(RANK, generator=generator, dtype=torch.float64)


def reference(obj: LowRankPlusDiag) -> Tensor:
    u, s = obj.eigenvectors, obj.eigenvalues
    return u @ torch.diag(s) @ u.mT + torch.diag(obj.diag.expand(P))


class TestLowRankIsotropic(CurvatureConformance):
    """``d = 0``: a scalar prior uses the eigenvalues only, no factorization."""

    def make(self, generator: torch.Generator) -> LowRankPlusDiag:
        return LowRankPlusDiag(*eigenpairs(generator), block_sizes=[4, 6])

    def dense(self, obj: LowRankPlusDiag) -> Tensor:
        return reference(obj)

    def make_with_nan(self) -> LowRankPlusDiag:
        return LowRankPlusDiag(torch.eye(3, 1), torch.tensor([float("nan")]))

    def make_singular(self) -> LowRankPlusDiag:
        return LowRankPlusDiag(
            torch.eye(3, 1, dtype=torch.float64), torch.ones(1).double()
        )


class TestLowRankWoodbury(CurvatureConformance):
    has_data_eigenvalues = False  # a non-constant diagonal has no simple spectrum
    """``d`` per parameter: Woodbury with a ``[k, k]`` capacitance per new prior."""

    cheap_prior_kinds = tuple(PriorStructure)
    allowed_refactor_size = RANK

    def make(self, generator: torch.Generator) -> LowRankPlusDiag:
        diag = torch.rand(P, generator=generator, dtype=torch.float64)
        return LowRankPlusDiag(*eigenpairs(generator), diag, block_sizes=[4, 6])

    def dense(self, obj: LowRankPlusDiag) -> Tensor:
        return reference(obj)

    def make_with_nan(self) -> LowRankPlusDiag:
        return LowRankPlusDiag(
            torch.eye(2, 1), torch.ones(1), torch.tensor([1.0, torch.inf])
        )

    def make_singular(self) -> LowRankPlusDiag:
        diag = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
        return LowRankPlusDiag(
            torch.eye(3, 1, dtype=torch.float64), torch.ones(1).double(), diag
        )


def test_invalid_eigenpairs_raise():
    with pytest.raises(ValueError, match="orthonormal columns"):
        LowRankPlusDiag(torch.ones(3, 2), torch.ones(2))
    with pytest.raises(
        ValueError, match=r"expected eigenvalues of shape \[2\], got \[3\]"
    ):
        LowRankPlusDiag(torch.eye(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="eigenvalues must be non-negative"):
        LowRankPlusDiag(torch.eye(3, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"k <= P"):
        LowRankPlusDiag(torch.eye(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"diag to be a scalar or of shape \[3\]"):
        LowRankPlusDiag(torch.eye(3, 2), torch.ones(2), torch.ones(2))
