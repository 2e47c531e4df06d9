"""Kron and KronDecomposed against dense Kronecker products in float64."""

from __future__ import annotations

from functools import reduce

import pytest
import torch
from torch import Tensor, nn

from bayescurv.curvature import KronBlocks
from bayescurv.laplace.laplace_torch.matrix import Kron, KronDecomposed
from tests.conftest import assert_close

F64 = torch.float64
# blocks like a Linear(3, 4) weight and bias, a Linear(4, 2) weight with a diagonal
# input factor, and a three-factor block
SIZES = [[4, 3], [4], [2, 4], [2, 2, 3]]
DIAGONAL = {(2, 1)}  # (block, factor) stored as a 1-D diagonal


def spd(n: int, gen: torch.Generator) -> Tensor:
    x = torch.randn(n, 2 * n, generator=gen, dtype=F64)
    return x @ x.T / (2 * n) + 0.1 * torch.eye(n, dtype=F64)


def make_factors(seed: int = 0) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.rand(n, generator=gen, dtype=F64) + 0.5
            if (b, i) in DIAGONAL
            else spd(n, gen)
            for i, n in enumerate(sizes)
        ]
        for b, sizes in enumerate(SIZES)
    ]


def dense_of(factors: list[list[Tensor]], shift: Tensor | None = None) -> Tensor:
    """The block-diagonal matrix, each block ``kron(...) + shift_b I``."""
    blocks = []
    for b, fs in enumerate(factors):
        block = reduce(torch.kron, [f if f.ndim == 2 else torch.diag(f) for f in fs])
        if shift is not None:
            block = block + shift[b] * torch.eye(len(block), dtype=F64)
        blocks.append(block)
    return torch.block_diag(*blocks)


def matrix_power(matrix: Tensor, exponent: float) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.pow(exponent)) @ vectors.T


P = sum(reduce(int.__mul__, s) for s in SIZES)


@pytest.fixture
def factors() -> list[list[Tensor]]:
    return make_factors()


def test_kron_dense_forms(factors):
    kron = Kron(factors)
    dense = dense_of(factors)
    assert len(kron) == 4
    assert kron.num_params == P
    assert_close(kron.to_matrix(), dense, "to_matrix")
    assert_close(kron.diag(), dense.diagonal(), "diag")
    assert_close(kron.logdet(), torch.logdet(dense), "logdet")


@pytest.mark.parametrize("shape", [(P,), (5, P), (5, 3, P)], ids=["1d", "2d", "3d"])
def test_kron_bmm(factors, shape):
    W = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = Kron(factors).bmm(W)
    assert out.shape == W.shape
    assert_close(out, W @ dense_of(factors), "W H")
    with pytest.raises(ValueError, match="only exponent=1"):
        Kron(factors).bmm(W, exponent=-1)
    with pytest.raises(ValueError, match="last axis"):
        Kron(factors).bmm(W[..., :-1])


def test_kron_addition_sums_factors_not_products(factors):
    other = make_factors(seed=1)
    total = Kron(factors) + Kron(other)
    summed = [
        [a + b for a, b in zip(x, y, strict=True)]
        for x, y in zip(factors, other, strict=True)
    ]
    assert_close(total.to_matrix(), dense_of(summed), "sum of factors")
    assert_close(
        sum([Kron(factors), Kron(other)]).to_matrix(), total.to_matrix(), "sum()"
    )
    with pytest.raises(ValueError, match="Can only add Kron to Kron"):
        Kron(factors) + torch.tensor(1.0)
    with pytest.raises(ValueError, match="cannot add factors of shapes"):
        Kron(factors) + Kron(factors[:2])


@pytest.mark.parametrize("scalar", [2.5, -1.5, torch.tensor(0.3), torch.tensor([4.0])])
def test_kron_scalar_multiplication(factors, scalar):
    scaled = Kron(factors) * scalar
    value = float(scalar) if not isinstance(scalar, Tensor) else scalar.item()
    assert_close(scaled.to_matrix(), value * dense_of(factors), "s H")
    assert_close((scalar * Kron(factors)).to_matrix(), scaled.to_matrix(), "rmul")
    with pytest.raises(ValueError, match="can only multiply by a scalar"):
        Kron(factors) * torch.ones(2)


def test_kron_scalar_keeps_gradient(factors):
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)
    (Kron(factors) * s).diag().sum().backward()
    assert_close(s.grad, dense_of(factors).diagonal().sum(), "d trace(sH) / ds")


def test_init_from_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv2d(4, 2, 3), nn.Embedding(5, 6))
    kron = Kron.init_from_model(model, "cpu", F64)
    shapes = [[tuple(f.shape) for f in fs] for fs in kron.kfacs]
    assert shapes == [
        [(4, 4), (3, 3)],
        [(4, 4)],
        [(2, 2), (36, 36)],
        [(2, 2)],
        [(5, 5), (6, 6)],
    ]
    assert all(bool((f == 0).all()) and f.dtype == F64 for fs in kron.kfacs for f in fs)
    from_iterable = Kron.init_from_model(model.parameters(), "cpu", F64)
    assert [[f.shape for f in fs] for fs in from_iterable.kfacs] == [
        [f.shape for f in fs] for fs in kron.kfacs
    ]


def test_invalid_factors():
    with pytest.raises(ValueError, match="block 0 must be a non-empty list"):
        Kron([[]])
    with pytest.raises(ValueError, match="block 1 must be a non-empty list"):
        Kron([[torch.eye(2)], [torch.zeros(2, 2, 2)]])


@pytest.mark.parametrize("damping", [False, True])
def test_decomposed_powers(factors, damping):
    shift = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=F64)
    decomposed = Kron(factors).decompose(damping=damping) + shift
    if damping:  # the shift split over the factors: kron(F_i + shift^(1/m) I)
        damped = [
            [
                (f if f.ndim == 2 else torch.diag(f))
                + shift[b] ** (1 / len(fs)) * torch.eye(len(f), dtype=F64)
                for f in fs
            ]
            if len(fs) > 1
            else [fs[0] + shift[b] * torch.eye(len(fs[0]), dtype=F64)]
            for b, fs in enumerate(factors)
        ]
        dense = dense_of(damped)
    else:
        dense = dense_of(factors, shift)
    W = torch.randn(4, 2, P, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert_close(decomposed.logdet(), torch.logdet(dense), "logdet")
    for exponent in (1, -1, -0.5):
        power = matrix_power(dense, exponent)
        assert_close(decomposed.to_matrix(exponent), power, f"to_matrix^{exponent}")
        assert_close(decomposed.diag(exponent), power.diagonal(), f"diag^{exponent}")
        assert_close(decomposed.bmm(W, exponent), W @ power, f"bmm^{exponent}")
    expected = W @ torch.linalg.inv(dense) @ W.mT
    assert_close(decomposed.inv_square_form(W), expected, "W S^-1 W^T")
    assert_close(
        decomposed.inv_square_form(W[:, 0]), expected[:, :1, :1], "[B, P] as K = 1"
    )


def test_decomposed_shift_and_scale(factors):
    decomposed = Kron(factors).decompose()
    assert_close(decomposed.deltas, torch.zeros(4, dtype=F64), "default shift")
    shifted = (decomposed + torch.tensor([1.5])) * 2.0 + 0.5
    assert_close(shifted.deltas, torch.full((4,), 2.0, dtype=F64), "shifts add")
    assert_close(
        shifted.to_matrix(),
        dense_of(factors, torch.full((4,), 0.0)) * 2.0 + 2.0 * torch.eye(P, dtype=F64),
        "2 H + 2 I (the scale leaves the shift alone)",
    )
    with pytest.raises(ValueError, match=r"scalar, \[1\] or per block \[4\]"):
        decomposed + torch.ones(3)
    with pytest.raises(ValueError, match=r"Can only add a number or a torch\.Tensor"):
        decomposed + "1"


def test_decomposed_diagonal_factors_are_exact(factors):
    decomposed = Kron(factors).decompose()
    assert decomposed.eigenvalues[2][1] is factors[2][1]
    assert_close(decomposed.eigenvectors[2][1], torch.eye(4, dtype=F64), "identity")
    assert_close(decomposed.to_matrix(), dense_of(factors), "dense")


def test_decomposed_detach_and_gradient(factors):
    prior = torch.tensor(0.7, dtype=F64, requires_grad=True)
    decomposed = Kron(factors).decompose() + prior
    decomposed.logdet().backward()
    expected = torch.linalg.inv(dense_of(factors, torch.full((4,), 0.7))).trace()
    assert_close(prior.grad, expected, "d logdet / d prior = trace(inverse)")
    detached = decomposed.detach()
    assert not detached.deltas.requires_grad
    assert_close(detached.to_matrix(), decomposed.to_matrix().detach(), "same matrix")


def blocks_of(factors: list[list[Tensor]]) -> KronBlocks:
    dense = [[f if f.ndim == 2 else torch.diag(f) for f in fs] for fs in factors]
    return KronBlocks({f"block{b}": fs for b, fs in enumerate(dense)})


def test_from_blocks(factors):
    blocks = blocks_of(factors)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)
    assert_close(Kron.from_blocks(blocks).to_matrix(), blocks.dense(), "data term")
    scaled = blocks.scaled(scale)
    assert_close(Kron.from_blocks(scaled).to_matrix(), scaled.dense(), "scaled")
    with pytest.raises(ValueError, match=r"use KronDecomposed\.from_blocks"):
        Kron.from_blocks(blocks.add_prior(1.0))
    posterior = scaled.add_prior(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    decomposed = KronDecomposed.from_blocks(posterior)
    assert_close(decomposed.to_matrix(), posterior.dense(), "posterior")
    assert_close(decomposed.logdet(), posterior.logdet(), "logdet")
    # the structure's own eigenbases, not a second decomposition
    basis = blocks.eigenbases()[0]
    assert decomposed.eigenvectors[0][0] is basis.factor_eigenvectors[0]


def test_from_blocks_is_differentiable_in_prior_and_scale(factors):
    prior = torch.tensor(0.3, dtype=F64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
    blocks = blocks_of(factors).scaled(scale).add_prior(prior)
    KronDecomposed.from_blocks(blocks).logdet().backward()
    dense = dense_of(factors)
    inverse = torch.linalg.inv(2.0 * dense + 0.3 * torch.eye(P, dtype=F64))
    assert_close(prior.grad, inverse.trace(), "d/d prior")
    assert_close(scale.grad, (inverse @ dense).trace(), "d/d scale")
