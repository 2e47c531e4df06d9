"""Closed-form functional variances against a dense J Σ Jᵀ, for every factorization."""

from __future__ import annotations

import pytest
import torch

from bayescurv.curvature import Dense, Diagonal, KronBlocks, LowRankPlusDiag
from bayescurv.laplace.predict.variance import functional_variance
from bayescurv.laplace.sources import jacobians
from bayescurv.laplace.sources.jacobians import (
    DenseSegment,
    LinearSegment,
    SegmentedJacobian,
)
from tests.conftest import assert_close

N, C = 6, 2
OUT, IN, EXTRA = 3, 4, 5  # a linear layer [3, 4] with bias, and a 5-entry tensor
SIZES = [OUT * IN, OUT, EXTRA]
P = sum(SIZES)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _spd(size: int, seed: int) -> torch.Tensor:
    root = _randn(size, size + 2, seed=seed)
    return root @ root.T / size


def mixed_jacobian(num: int = N, positions: int = 0) -> SegmentedJacobian:
    """A linear layer (factored, random G) and an explicit segment.

    With ``positions`` the layer is applied at that many positions (a sequence or
    convolution patches): inputs ``[N, T, in]``, columns ``[N, C, T, out]``.
    """
    if positions:
        inputs = _randn(num, positions, IN, seed=1)
        grads = _randn(num, C, positions, OUT, seed=2)
        bias_grads = grads.sum(2)
    else:
        inputs, grads = _randn(num, IN, seed=1), _randn(num, C, OUT, seed=2)
        bias_grads = grads
    return SegmentedJacobian(
        [
            LinearSegment(inputs, grads, OUT, num),
            LinearSegment(None, bias_grads, OUT, num),
            DenseSegment(_randn(num, C, EXTRA, seed=3)),
        ],
        num,
    )


def _padded(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """``matrix`` in the trailing corner of a ``[size, size]`` zero matrix."""
    padded = matrix.new_zeros(size, size)
    padded[-len(matrix) :, -len(matrix) :] = matrix
    return padded


def _orthonormal(rank: int) -> torch.Tensor:
    return torch.linalg.qr(_randn(P, rank, seed=4))[0]


def _spectral_dense() -> Dense:
    """A Dense precision whose inverse side uses its eigenbasis (a restored state)."""
    state = Dense(_spd(P, 5), block_sizes=SIZES).state_dict()
    values, vectors = torch.linalg.eigh(state["matrix"])
    state["eigenbasis"] = {"eigenvalues": [values], "eigenvectors": [vectors]}
    return Dense.from_state_dict(state)


PRECISIONS = {
    "diag": lambda: Diagonal(_randn(P, seed=6).exp(), block_sizes=SIZES),
    "kron": lambda: KronBlocks(
        [[_spd(OUT, 7), _spd(IN, 8)], [_spd(OUT, 9)], [_spd(EXTRA, 10)]]
    ),
    "kron_zero_rows": lambda: KronBlocks(  # unit eigenvectors: split rotations
        [[_spd(OUT, 7), _padded(_spd(2, 8), IN)], [_spd(OUT, 9)], [_spd(EXTRA, 10)]]
    ),
    "kron_split": lambda: KronBlocks(  # blocks that split the Jacobian's segments
        [[_spd(2, 11), _spd(2, 12)], [_spd(4, 13), _spd(4, 14)]]
    ),
    "full_cholesky": lambda: Dense(_spd(P, 15), block_sizes=SIZES),
    "full_eigenbasis": _spectral_dense,
    "lowrank_woodbury": lambda: LowRankPlusDiag(
        _orthonormal(3), _randn(3, seed=16).exp(), _randn(P, seed=17).exp()
    ),
    "lowrank_isotropic": lambda: LowRankPlusDiag(
        _orthonormal(3), _randn(3, seed=18).exp()
    ),
}


def dense_variance(precision, jacobian: torch.Tensor) -> torch.Tensor:
    covariance = torch.linalg.inv(precision.dense())
    return jacobian @ covariance @ jacobian.mT


# positions: 0 (one call on [N, in]), 2 or 7 at positions, contracted through
# position pairs or rows (ROWS_ENTRY_COST forces the choice)
@pytest.mark.parametrize(
    ("positions", "form"),
    [(0, None), (2, "pairs"), (2, "rows"), (7, "pairs"), (7, "rows")],
)
@pytest.mark.parametrize("name", list(PRECISIONS))
@pytest.mark.parametrize("prior", [0.7, "per_block"])
def test_functional_variance_matches_dense(name, prior, positions, form, monkeypatch):
    if form is not None:
        cost = 1e9 if form == "pairs" else 0.0
        monkeypatch.setattr(jacobians, "ROWS_ENTRY_COST", cost)
    precision = PRECISIONS[name]()
    if prior == "per_block":  # Cholesky / Woodbury instead of eigenbases
        prior = torch.linspace(0.5, 1.5, precision.num_blocks, dtype=torch.float64)
    precision = precision.scaled(1.3).add_prior(prior)
    jac = mixed_jacobian(positions=positions)
    expected = dense_variance(precision, jac.dense())
    assert_close(functional_variance(precision, jac), expected, f"{name} f_var")
    assert_close(
        functional_variance(precision, jac, diagonal=True),
        expected.diagonal(dim1=1, dim2=2),
        f"{name} variances",
    )


def test_zero_rows_give_split_rotations():
    """The input factor's zero rows are exact unit eigenvectors, rotated by copies."""
    precision = PRECISIONS["kron_zero_rows"]().add_prior(0.7)
    rotations = precision.eigenbases()[0].factor_rotations()
    assert rotations[0].rows is None  # the output factor is dense
    assert rotations[1].rows is not None
    assert len(rotations[1].rows) == 2


@pytest.mark.parametrize("cost", [0.0, 1e9])  # rows, pairs
def test_positional_chunks_equal_one_pass(monkeypatch, cost):
    """Samples contracted in chunks give the one-pass variances (rows and pairs)."""
    precision = PRECISIONS["kron"]().add_prior(0.7)
    for positions in (2, 7):
        jac = mixed_jacobian(positions=positions)
        monkeypatch.setattr(jacobians, "ROWS_ENTRY_COST", cost)
        whole = functional_variance(precision, jac)
        monkeypatch.setattr(jacobians, "CHUNK_BYTES", 1)  # one sample per chunk
        assert_close(functional_variance(precision, jac), whole, "chunked")
        monkeypatch.undo()


@pytest.mark.parametrize("positions", [1, 2, 3, 6])
@pytest.mark.parametrize("diagonal", [True, False])
def test_position_pairs_and_rows_match_the_sum(positions, diagonal):
    """Both contractions equal sum_oi w_oi M_coi M_doi, M_c = sum_t h_ct b_t^T.

    The pairs fill both triangles of the symmetric K from one product per offset.
    """
    inputs = _randn(3, positions, 5, seed=20)
    grads = _randn(3, 4, positions, 2, seed=21)
    weights = _randn(2, 5, seed=22).exp()
    rows = torch.einsum("ncto,nti->ncoi", grads, inputs)
    expected = torch.einsum("ncoi,oi,ndoi->ncd", rows, weights, rows)
    if diagonal:
        expected = expected.diagonal(dim1=1, dim2=2)
    for contract in (jacobians._paired, jacobians._rows):
        result = contract(inputs, grads, weights, diagonal)
        assert_close(result, expected, contract.__name__)


@pytest.mark.parametrize("num", [2, 3 * P])
def test_cholesky_variance_both_whitenings(num):
    """Fewer rows N*C than P whiten J; more whiten the identity (see the NOTE)."""
    precision = Dense(_spd(P, 15), block_sizes=SIZES).add_prior(
        torch.linspace(0.5, 1.5, 3, dtype=torch.float64)
    )
    jac = mixed_jacobian(num)
    assert (num * C < P) == (num == 2)
    expected = dense_variance(precision, jac.dense())
    assert_close(functional_variance(precision, jac), expected, f"N={num} f_var")
    assert_close(
        functional_variance(precision, jac, diagonal=True),
        expected.diagonal(dim1=1, dim2=2),
        f"N={num} variances",
    )


@pytest.mark.parametrize("name", ["diag", "full_cholesky", "lowrank_woodbury"])
def test_last_layer_closed_forms(name):
    classes, width = 3, 4
    sizes = [classes * width, classes]
    structures = {
        "diag": Diagonal(_randn(15, seed=20).exp(), block_sizes=sizes),
        "full_cholesky": Dense(_spd(15, 21), block_sizes=sizes),
        "lowrank_woodbury": LowRankPlusDiag(
            torch.linalg.qr(_randn(15, 2, seed=22))[0],
            _randn(2, seed=23).exp(),
            _randn(15, seed=24).exp(),
        ),
    }
    precision = structures[name].add_prior(0.5)
    jac = SegmentedJacobian.last_layer(_randn(N, width, seed=25), classes, True)
    expected = dense_variance(precision, jac.dense())
    assert_close(functional_variance(precision, jac), expected, name)


def test_last_layer_kron_without_bias():
    classes, width = 3, 4
    precision = KronBlocks([[_spd(classes, 26), _spd(width, 27)]]).add_prior(0.3)
    jac = SegmentedJacobian.last_layer(_randn(N, width, seed=28), classes, False)
    expected = dense_variance(precision, jac.dense())
    assert_close(functional_variance(precision, jac), expected, "kron, no bias")


def test_linear_segment_is_the_outer_product():
    inputs, grads = _randn(N, IN, seed=30), _randn(N, C, OUT, seed=31)
    weight = LinearSegment(inputs, grads, OUT, N)
    expected = torch.einsum("nco,ni->ncoi", grads, inputs).reshape(N, C, -1)
    assert_close(weight.dense(), expected, "G ⊗ aᵀ")
    matrix = _randn(OUT * IN, 7, seed=32)
    assert_close(weight.matmul(matrix), expected @ matrix, "J M")
    weights = _randn(OUT * IN, seed=33).exp()
    assert_close(
        weight.gram(weights, diagonal=False),
        (expected * weights) @ expected.mT,
        "J diag(w) Jᵀ",
    )
    identity = LinearSegment(None, None, OUT, N, like=inputs)
    eye = torch.eye(OUT, dtype=torch.float64)
    assert_close(identity.dense(), eye.expand(N, -1, -1), "I")


def test_positional_segment_is_the_sum_over_positions():
    positions = 3
    inputs = _randn(N, positions, IN, seed=34)
    grads = _randn(N, C, positions, OUT, seed=35)
    weight = LinearSegment(inputs, grads, OUT, N)
    expected = torch.einsum("ncto,nti->ncoi", grads, inputs).reshape(N, C, -1)
    assert weight.positional
    assert weight.size == OUT * IN
    assert weight.num_outputs == C
    assert_close(weight.dense(), expected, "sum_t G_t ⊗ a_tᵀ")
    matrix = _randn(OUT * IN, 7, seed=36)
    assert_close(weight.matmul(matrix), expected @ matrix, "J M")
    weights = _randn(OUT * IN, seed=37).exp()
    assert_close(
        weight.gram(weights, diagonal=True),
        ((expected * weights) * expected).sum(-1),
        "diag of J diag(w) Jᵀ",
    )
    assert_close(weight.rows(1, 4).dense(), expected[1:4], "rows")


def test_rows_and_parts():
    jac = mixed_jacobian()
    assert_close(jac.rows(2, 5).dense(), jac.dense()[2:5], "rows")
    assert jac.parts(slice(0, 5)) is None  # splits the weight segment
    assert jac.single(slice(OUT * IN, OUT * IN + OUT)) is jac.segments[1]
    assert jac.is_dense(slice(OUT * IN + OUT, P))
    assert not jac.is_dense(slice(0, P))


@pytest.mark.parametrize(
    "block",
    [slice(0, P), slice(0, OUT * IN), slice(OUT * IN, P), slice(2, 13), slice(5, 7)],
)
def test_a_block_of_rows_is_cut_from_the_segments_it_touches(block):
    """``block`` keeps the touched segments (cast) and re-bases the rows."""
    jac = mixed_jacobian(positions=2).to(torch.float32)
    sub, local = jac.block(block, torch.float64)
    assert sub.dtype == torch.float64
    assert len(sub.segments) <= len(jac.segments)
    expected = jac.to(torch.float64).dense(block)
    assert_close(sub.dense(local), expected, "rows of the block")


def test_variance_casts_one_block_at_a_time():
    """``dtype=`` gives the variances of the Jacobian cast as a whole."""
    precision = PRECISIONS["kron"]().add_prior(0.7)
    jac = mixed_jacobian(positions=7).to(torch.float32)
    whole = functional_variance(precision, jac.to(torch.float64))
    blockwise = functional_variance(precision, jac, dtype=torch.float64)
    assert blockwise.dtype == torch.float64
    assert torch.equal(blockwise, whole)
