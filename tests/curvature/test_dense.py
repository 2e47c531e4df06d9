"""Dense: the conformance suite and the direction of the sampling square root."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayescurv.curvature import Dense, linalg
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


def test_symmetrized_matrix_is_the_mean_with_its_transpose():
    matrix = torch.tensor([[2.0, 1.0], [1.0 + 1e-6, 3.0]], dtype=torch.float64)
    expected = torch.tensor([[2.0, 1.0 + 5e-7], [1.0 + 5e-7, 3.0]], dtype=torch.float64)
    assert torch.equal(Dense(matrix).matrix, expected)


def test_eigendecompositions_run_with_limited_threads(monkeypatch):
    """Large decompositions use EIGEN_THREADS; torch's setting is restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    eigvalsh = torch.linalg.eigvalsh

    def spy(matrix: Tensor) -> Tensor:
        seen.append(torch.get_num_threads())
        return eigvalsh(matrix)

    monkeypatch.setattr(linalg, "EIGEN_THREADS_MIN_SIZE", 3)
    monkeypatch.setattr(torch.linalg, "eigvalsh", spy)
    try:
        for size in (2, 3):
            Dense(torch.eye(size, dtype=torch.float64)).add_prior(1.0).logdet()
        assert seen == [2, linalg.EIGEN_THREADS]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
