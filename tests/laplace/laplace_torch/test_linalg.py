"""Dense helpers: Kronecker and block-diagonal products, symeig, square roots, draws."""

from __future__ import annotations

import pytest
import torch

from bayescurv.curvature import NotPositiveDefiniteError
from bayescurv.laplace.laplace_torch.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    normal_samples,
    symeig,
)
from tests.conftest import assert_close

F64 = torch.float64


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_kron_and_block_diag(gen):
    a = torch.randn(2, 3, generator=gen, dtype=F64)
    b = torch.randn(4, 2, generator=gen, dtype=F64)
    product = kron(a, b)
    assert product.shape == (8, 6)
    assert_close(product[4:8, 2:4], a[1, 1] * b, "block (1, 1)")
    blocks = [torch.randn(2, 2, generator=gen, dtype=F64), torch.eye(3, dtype=F64)]
    dense = block_diag(blocks)
    assert_close(dense[:2, :2], blocks[0], "first block")
    assert_close(dense[2:, 2:], blocks[1], "second block")
    assert bool((dense[:2, 2:] == 0).all())
    with pytest.raises(ValueError, match="t2 must be a 2-D tensor"):
        kron(a, torch.ones(3))
    with pytest.raises(ValueError, match="block 0 must be square"):
        block_diag([a])
    with pytest.raises(ValueError, match="at least one block"):
        block_diag([])


def test_diagonal_add_scalar_is_differentiable(gen):
    x = torch.randn(4, 4, generator=gen, dtype=F64)
    value = torch.tensor(1.5, dtype=F64, requires_grad=True)
    shifted = diagonal_add_scalar(x, value)
    assert_close(shifted, x + 1.5 * torch.eye(4, dtype=F64), "X + v I")
    shifted.trace().backward()
    assert_close(value.grad, torch.tensor(4.0, dtype=F64), "d trace / d v")


def test_symeig(gen):
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    low_rank = x @ x.T  # rank 3: three eigenvalues are round-off around 0
    values, vectors = symeig(low_rank)
    expected_values, expected_vectors = torch.linalg.eigh(low_rank, UPLO="U")
    assert bool((values >= 0).all())
    assert_close(values, expected_values.clamp(min=0), "clamped eigenvalues")
    assert_close(vectors, expected_vectors, "eigenvectors")
    assert_close((vectors * values) @ vectors.T, low_rank, "reconstruction")


def test_invsqrt_precision(gen):
    x = torch.randn(5, 8, generator=gen, dtype=F64)
    precision = x @ x.T + 0.1 * torch.eye(5, dtype=F64)
    scale = invsqrt_precision(precision)
    assert torch.equal(scale, scale.tril())
    assert_close(scale @ scale.T, torch.linalg.inv(precision), "S S^T = M^-1")
    with pytest.raises(NotPositiveDefiniteError, match="invsqrt_precision"):
        invsqrt_precision(-precision)


def covariance(samples: torch.Tensor) -> torch.Tensor:
    """Per batch entry, the sample covariance of ``[S, B, D]`` draws: ``[B, D, D]``."""
    centered = samples - samples.mean(0)
    return torch.einsum("sbi,sbj->bij", centered, centered) / (len(samples) - 1)


@pytest.mark.parametrize(
    ("n_samples", "tolerance"),
    [
        pytest.param(20_000, 0.05, id="loose"),
        pytest.param(1_000_000, 0.005, id="tight", marks=pytest.mark.montecarlo),
    ],
)
def test_normal_samples_covariance(gen, n_samples, tolerance):
    mean = torch.randn(3, 2, generator=gen, dtype=F64)
    root = torch.randn(3, 2, 2, generator=gen, dtype=F64)
    full = root @ root.mT + 0.5 * torch.eye(2, dtype=F64)
    diagonal = full.diagonal(dim1=1, dim2=2)
    for var, expected in ((full, full), (diagonal, torch.diag_embed(diagonal))):
        samples = normal_samples(mean, var, n_samples, generator=gen)
        assert samples.shape == (n_samples, 3, 2)
        error = (covariance(samples) - expected).norm() / expected.norm()
        assert error < tolerance
        assert (samples.mean(0) - mean).norm() < 10 * tolerance
    # independent draws per batch entry: no correlation between entries 0 and 1
    samples = normal_samples(mean, diagonal, n_samples, generator=gen)
    corr = torch.corrcoef(torch.stack([samples[:, 0, 0], samples[:, 1, 0]]))[0, 1]
    assert abs(corr) < 10 * tolerance


def test_normal_samples_errors(gen):
    mean = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"var must be \[B, D\]"):
        normal_samples(mean, torch.ones(3, 3, dtype=F64), 4)
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        normal_samples(mean, torch.ones(3, 2, dtype=F64), 0)
    repeat = torch.Generator().manual_seed(5)
    first = normal_samples(mean, torch.ones(3, 2, dtype=F64), 4, generator=repeat)
    repeat.manual_seed(5)
    second = normal_samples(mean, torch.ones(3, 2, dtype=F64), 4, generator=repeat)
    assert torch.equal(first, second)
