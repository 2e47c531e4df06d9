"""Diagonal: the conformance suite and named blocks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from bayescurv.curvature import Diagonal, PriorStructure
from tests.conftest import assert_close
from tests.curvature.conformance import CurvatureConformance

BLOCK_SIZES = (3, 2, 4)


class TestDiagonal(CurvatureConformance):
    cheap_prior_kinds = tuple(PriorStructure)

    def make(self, generator: torch.Generator) -> Diagonal:
        entries = torch.rand(sum(BLOCK_SIZES), generator=generator, dtype=torch.float64)
        entries[[1, 5]] = 0.0  # a positive semi-definite data term
        return Diagonal(entries, block_sizes=BLOCK_SIZES)

    def dense(self, obj: Diagonal) -> Tensor:
        return torch.diag(obj.entries)

    def make_with_nan(self) -> Diagonal:
        return Diagonal(torch.tensor([1.0, float("nan")]))

    def make_singular(self) -> Diagonal:
        return Diagonal(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))


def test_from_blocks_flattens_in_order():
    blocks = {
        "0.weight": torch.arange(6.0, dtype=torch.float64).reshape(3, 2),
        "0.bias": torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64),
    }
    diag = Diagonal.from_blocks(blocks, prior_precision=torch.tensor([1.0, 2.0]))
    assert diag.block_names == ("0.weight", "0.bias")
    assert diag.block_sizes == (6, 3)
    expected = torch.tensor([1.0, 2, 3, 4, 5, 6, 9, 10, 11], dtype=torch.float64)
    assert_close(diag.diagonal(), expected, "diagonal")


def test_block_sizes_must_sum_to_p():
    with pytest.raises(ValueError, match=r"summing to P=3, got \[1, 1\]"):
        Diagonal(torch.ones(3), block_sizes=[1, 1])
    with pytest.raises(ValueError, match="expected 2 block names, got 1"):
        Diagonal(torch.ones(3), block_sizes=[1, 2], block_names=["a"])
