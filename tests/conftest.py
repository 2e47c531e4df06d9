"""Shared fixtures: the case table of ``tests/cases.py`` as parametrized problems."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.cases import CASE_IDS, CASES, Problem, make_problem

# NOTE [One thread in tests]
# The test problems are tiny float64 models; with several threads per process their
# convolutions spend most of the time synchronizing threads (50x slower on a loaded
# 2-core machine). One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

# Hypothesis settings of the property tests' default run: a bounded, derandomized set
# of examples (the same in every run); their slow variants raise max_examples.
PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Named tolerances for float64 comparisons against dense references.
RTOL = 1e-7
ATOL = 1e-10


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Compare with the named float64 tolerances and a readable message."""
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}"
    )


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def problem(request: pytest.FixtureRequest) -> Problem:
    """One (model, loss, reduction) problem in float64."""
    return make_problem(*request.param)
