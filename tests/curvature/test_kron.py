"""KronBlocks: the conformance suite, exact damping and the one-time decomposition."""

from __future__ import annotations

from functools import reduce

import pytest
import torch
from torch import Tensor

from bayescurv.curvature import KronBlocks, PriorStructure
from tests.conftest import assert_close
from tests.curvature.conformance import CurvatureConformance


def random_psd(n: int, rank: int, generator: torch.Generator) -> Tensor:
    root = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    return root @ root.mT


def reference(obj: KronBlocks) -> Tensor:
    """Block-diagonal dense matrix; a grouped block is block-diagonal over groups."""
    blocks = []
    for fs in obj.factors:
        groups = list(zip(*fs, strict=True)) if fs[0].dim() == 3 else [fs]
        blocks += [reduce(torch.kron, group) for group in groups]
    return torch.block_diag(*blocks)


class TestKronBlocks(CurvatureConformance):
    prior_kinds = (PriorStructure.SCALAR, PriorStructure.LAYERWISE)
    cheap_prior_kinds = prior_kinds

    def make(self, generator: torch.Generator) -> KronBlocks:
        weight = [random_psd(3, 3, generator), random_psd(2, 1, generator)]
        bias = [random_psd(3, 2, generator)]  # rank-deficient factors
        return KronBlocks({"layer.weight": weight, "layer.bias": bias})

    def dense(self, obj: KronBlocks) -> Tensor:
        return reference(obj)

    def make_with_nan(self) -> KronBlocks:
        return KronBlocks([[torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])]])

    def make_singular(self) -> KronBlocks:
        factor = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
        return KronBlocks([[torch.eye(2, dtype=torch.float64), factor]])


class TestGroupedKronBlocks(TestKronBlocks):
    """A grouped convolution's weight: one Kronecker product per group."""

    def make(self, generator: torch.Generator) -> KronBlocks:
        b = torch.stack([random_psd(2, 2, generator), random_psd(2, 1, generator)])
        a = torch.stack([random_psd(3, 2, generator), random_psd(3, 3, generator)])
        bias = [random_psd(4, 4, generator)]
        return KronBlocks({"conv.weight": [b, a], "conv.bias": bias})


def test_grouped_factors_need_equal_groups():
    with pytest.raises(ValueError, match="same number of groups"):
        KronBlocks({"w": [torch.eye(2).expand(3, 2, 2), torch.eye(2).expand(2, 2, 2)]})
    with pytest.raises(ValueError, match="must have 3 dimension"):
        KronBlocks({"w": [torch.eye(2).expand(3, 2, 2), torch.eye(2)]})


@pytest.mark.parametrize("damping", [1e-3, 0.5, 10.0])
def test_exact_damping_matches_dense_kron(damping: float):
    gen = torch.Generator().manual_seed(0)
    b, a = random_psd(3, 2, gen), random_psd(4, 4, gen)
    kron = KronBlocks([[b, a]]).add_prior(damping)
    expected = torch.kron(b, a) + damping * torch.eye(12, dtype=torch.float64)
    assert_close(kron.dense(), expected, "dense")
    assert_close(kron.logdet(), torch.logdet(expected), "logdet")
    assert_close(kron.inverse(), torch.linalg.inv(expected), "inverse")
    # damping each factor instead would not be exact
    root = damping**0.5
    eye3, eye4 = torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    factor_damped = torch.kron(b + root * eye3, a + root * eye4)
    assert not torch.allclose(torch.logdet(factor_damped), kron.logdet())


def test_three_factors_and_per_block_scale():
    gen = torch.Generator().manual_seed(1)
    factors = [random_psd(2, 2, gen) for _ in range(3)]
    bias = [random_psd(2, 2, gen)]
    scale = torch.tensor([3.0, 0.5], dtype=torch.float64)
    kron = KronBlocks([factors, bias], scale=scale, prior_precision=0.2)
    assert kron.block_sizes == (8, 2)
    expected = torch.block_diag(3.0 * reduce(torch.kron, factors), 0.5 * bias[0])
    expected = expected + 0.2 * torch.eye(10, dtype=torch.float64)
    v = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    assert_close(kron.mvp(v), expected @ v, "mvp")
    assert_close(kron.solve(v), torch.linalg.solve(expected, v), "solve")
    assert_close(kron.logdet(), torch.logdet(expected), "logdet")


def test_every_factor_is_decomposed_once(decomposition_sizes: list[int]):
    gen = torch.Generator().manual_seed(2)
    eye = torch.eye(3, dtype=torch.float64)
    kron = KronBlocks([[random_psd(3, 3, gen), random_psd(2, 2, gen)], [eye]])
    for prior in [0.1, 1.0, torch.tensor([2.0, 3.0])]:
        posterior = kron.scaled(torch.tensor([1.0, 4.0])).add_prior(prior)
        posterior.logdet()
        posterior.sample(3)
        posterior.inverse_diagonal()
        posterior.inv_quad_form_batch(torch.ones(2, 1, 9, dtype=torch.float64))
    assert sorted(decomposition_sizes) == [2, 3, 3]


def test_diagonal_prior_is_rejected():
    kron = KronBlocks([[torch.eye(2), torch.eye(3)], [torch.eye(2)]])
    with pytest.raises(ValueError, match="cannot be applied exactly through the Kron"):
        kron.add_prior(torch.ones(8))
    with pytest.raises(ValueError, match="per-param scale is not supported"):
        kron.scaled(torch.ones(8))


def test_invalid_factors_raise():
    with pytest.raises(ValueError, match="factor 0 of block 'w' must be symmetric"):
        KronBlocks({"w": [torch.tensor([[1.0, 2.0], [0.0, 1.0]])]})
    with pytest.raises(ValueError, match=r"must be square, got shape \[2, 3\]"):
        KronBlocks([[torch.ones(2, 3)]])
    with pytest.raises(ValueError, match="at least one factor"):
        KronBlocks({"w": []})
    with pytest.raises(ValueError, match="same dtype"):
        KronBlocks([[torch.eye(2)], [torch.eye(2, dtype=torch.float64)]])


def test_rank_deficient_factors_stay_positive_definite_under_a_tiny_prior():
    # float32 Gram factors of rank 1: eigh returns their zero eigenvalues as
    # +-1e-7 relative noise, which the other factor's large eigenvalue amplifies
    # into a negative precision eigenvalue unless the factors' are clamped
    gen = torch.Generator().manual_seed(0)
    b = (1e4 * random_psd(30, 1, gen)).float()
    a = (1e4 * random_psd(40, 1, gen)).float()
    kron = KronBlocks([[b, a]]).add_prior(1e-6)
    assert torch.isfinite(kron.logdet())
    assert torch.isfinite(kron.inverse_diagonal()).all()


@pytest.mark.parametrize("tracked", [False, True])
def test_inverse_eigenvalues_kept_only_without_a_graph(tracked):
    """1/e is kept for later calls, unless e carries a graph (a tuned prior)."""
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    prior = torch.tensor(0.5, dtype=torch.float64, requires_grad=tracked)
    structure = KronBlocks([[root @ root.T, torch.eye(2, dtype=torch.float64)]])
    ((_, factorization),) = structure.add_prior(prior).factorized_blocks()
    first = factorization.inverse_eigenvalues
    assert_close(first, factorization.eigenvalues.reciprocal(), "1 / e")
    assert (first is factorization.inverse_eigenvalues) is not tracked
    if tracked:  # each call has its own graph back to the prior
        first.sum().backward()
        factorization.inverse_eigenvalues.sum().backward()
        assert prior.grad is not None
