"""Dense: the conformance suite and the direction of the sampling square root."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayescurv.curvature import Dense
from tests.curvature.conformance import (
    LOOSE_SAMPLES,
    Z_MAX,
    CurvatureConformance,
    covariance_zscores,
)


class TestDense(CurvatureConformance):
    def make(self, generator: torch.Generator) -> Dense:
        root = torch.randn(8, 6, generator=generator, dtype=torch.float64)
        return Dense(root @ root.mT, block_sizes=[5, 3], block_names=["w", "b"])

    def dense(self, obj: Dense) -> Tensor:
        return obj.matrix

    def make_with_nan(self) -> Dense:
        return Dense(torch.full((2, 2), float("nan")))

    def make_singular(self) -> Dense:
        return Dense(torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)))


def test_covariance_check_detects_a_transposed_root():
    """``L^{-1} z`` (the transposed root) has covariance ``L^{-1} L^{-T} != Λ^{-1}``."""
    gen = torch.Generator().manual_seed(0)
    posterior = TestDense().make(gen).add_prior(torch.linspace(0.5, 1.5, 8).double())
    cov = posterior.inverse()
    factor = torch.linalg.cholesky(posterior.dense())
    z = torch.randn(8, LOOSE_SAMPLES, generator=gen, dtype=torch.float64)
    wrong = torch.linalg.solve_triangular(factor, z, upper=False).mT
    assert covariance_zscores(wrong, cov)[1] > 10 * Z_MAX
    right = posterior.sample(LOOSE_SAMPLES, generator=gen)
    assert covariance_zscores(right, cov)[1] < Z_MAX


def test_asymmetric_matrix_raises():
    with pytest.raises(ValueError, match=r"Dense: matrix must be symmetric"):
        Dense(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
