"""Rotations x Q that skip exact unit eigenvectors equal the dense product."""

from __future__ import annotations

import pytest
import torch

from bayescurv.curvature.linalg import eigh_with_rotation, symmetric_eigh
from bayescurv.curvature.rotation import Rotation
from tests.conftest import assert_close


def _padded_gram(kept: list[int], size: int, seed: int) -> torch.Tensor:
    """A PSD ``[size, size]`` matrix whose rows outside ``kept`` are exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    root = torch.zeros(size, 2 * size, dtype=torch.float64)
    root[kept] = torch.randn(len(kept), 2 * size, generator=gen, dtype=torch.float64)
    return root @ root.T


@pytest.mark.parametrize("kept", [[1, 4, 5], [0, 7], list(range(6))])
def test_eigenbasis_of_zero_rows_is_split(kept):
    _, vectors = symmetric_eigh(_padded_gram(kept, 8, seed=0), "test")
    rotation = Rotation.of(vectors)
    assert rotation.rows is not None
    assert rotation.rows.tolist() == kept
    assert sorted(rotation.unit_rows.tolist()) == sorted(set(range(8)) - set(kept))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert_close(rotation.apply(x), x @ vectors, "split x Q")


def test_unit_coordinates_are_copied_exactly():
    """Coordinates on unit eigenvectors are copies (with sign), not sums."""
    q = torch.tensor([[0.0, -1.0, 0.0], [0.6, 0.0, 0.8], [0.8, 0.0, -0.6]])
    rotation = Rotation.of(q)
    x = torch.tensor([[1e-30, 2.0, 3.0], [7.0, 1e-3, 1e20]])
    rotated = rotation.apply(x)
    assert torch.equal(rotated[:, 1], -x[:, 0])
    torch.testing.assert_close(rotated, x @ q)


def test_float32_inputs_meet_a_float64_basis_in_float64():
    _, vectors = symmetric_eigh(_padded_gram([2, 3], 6, seed=1), "test")
    x = torch.randn(4, 6)
    rotated = Rotation.of(vectors).apply(x)
    assert rotated.dtype == torch.float64
    assert_close(rotated, x.double() @ vectors, "promoted x Q")


@pytest.mark.parametrize(
    "matrix",
    [
        torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0],  # no unit column
        torch.tensor([[1.0, 0.5], [0.0, 1.0]]),  # the unit column's row has more
        torch.eye(9)[torch.randperm(9)],  # a permutation: all units
    ],
    ids=["dense", "row-not-unit", "permutation"],
)
def test_split_only_where_exact(matrix):
    rotation = Rotation.of(matrix)
    x = torch.randn(5, matrix.shape[0], dtype=matrix.dtype)
    if rotation.rows is not None:  # only the permutation splits (all copied)
        assert len(rotation.rows) == 0
    assert_close(rotation.apply(x), x @ matrix, "x Q")


def test_few_unit_columns_stay_dense():
    matrix = torch.eye(16, dtype=torch.float64)
    matrix[1:, 1:] = torch.linalg.qr(torch.randn(15, 15, dtype=torch.float64))[0]
    assert Rotation.of(matrix).rows is None  # 1 of 16 < MIN_UNIT_FRACTION
    matrix[2:, 2:] = torch.linalg.qr(torch.randn(14, 14, dtype=torch.float64))[0]
    matrix[1, 1:] = 0.0
    matrix[1:, 1] = 0.0
    matrix[1, 1] = 1.0
    assert Rotation.of(matrix).rows is not None  # 2 of 16


@pytest.mark.parametrize(("zero_rows", "split"), [(1, False), (2, True), (15, True)])
def test_decomposition_records_the_split(zero_rows, split):
    """The decomposition hands over its split (few zero rows: a dense product)."""
    matrix = _padded_gram(list(range(zero_rows, 16)), 16, seed=2)
    values, vectors, rotation = eigh_with_rotation(matrix, "test")
    assert torch.equal(rotation.matrix, vectors)
    assert (rotation.rows is not None) == split
    assert_close(vectors @ torch.diag(values) @ vectors.T, matrix, "Q diag(λ) Qᵀ")
    x = torch.randn(7, 16, dtype=torch.float64)
    assert_close(rotation.apply(x), x @ vectors, "recorded x Q")
