"""Prior precision structures and the state-dict registry."""

from __future__ import annotations

import pytest
import torch

from bayescurv.curvature import Diagonal, PriorStructure, structure_from_state_dict
from bayescurv.curvature import prior as priors
from tests.conftest import assert_close

BLOCK_SIZES = (2, 1, 3)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((), PriorStructure.SCALAR),
        ((3,), PriorStructure.LAYERWISE),
        ((6,), PriorStructure.DIAG),
    ],
    ids=["scalar", "layerwise", "diag"],
)
def test_structure_of(shape, expected):
    assert priors.structure_of(torch.ones(shape), BLOCK_SIZES) == expected


def test_combine_uses_the_finer_structure():
    layerwise = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    diag = torch.arange(6.0, dtype=torch.float64)
    total = priors.combine(layerwise, diag, BLOCK_SIZES, torch.add)
    expected = torch.tensor([1.0, 2.0, 4.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    assert_close(total, expected, "layerwise + diag")
    scalar = torch.tensor(0.5, dtype=torch.float64)
    assert priors.combine(scalar, layerwise, BLOCK_SIZES, torch.mul).shape == (3,)


def test_one_parameter_per_block_reads_both_ways():
    """With ``B == P``, ``[B]`` and ``[P]`` are the same diagonal."""
    diag = Diagonal(torch.ones(3, dtype=torch.float64), block_sizes=[1, 1, 1])
    posterior = diag.add_prior(torch.tensor([1.0, 2.0, 3.0]))
    assert posterior.prior_structure is PriorStructure.LAYERWISE
    assert_close(posterior.diagonal(), torch.tensor([2.0, 3.0, 4.0]).double(), "diag")


def test_python_floats_are_exact_in_float64():
    diag = Diagonal(torch.zeros(1, dtype=torch.float64)).add_prior(1.7)
    assert diag.prior_precision.item() == 1.7


def test_unknown_structure_raises():
    with pytest.raises(ValueError, match="unknown curvature structure 'Banded'"):
        structure_from_state_dict({"structure": "Banded"})
