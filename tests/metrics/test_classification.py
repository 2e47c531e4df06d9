"""accuracy, NLL and Brier score: scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn import metrics as skm

from bayescurv import metrics
from tests.metrics.problems import (
    CLASSIFICATION_CASES,
    CLASSIFICATION_IDS,
    PROBS,
    SKLEARN_TOL,
    TARGETS,
    random_problem,
)


@pytest.mark.parametrize(
    ("n", "n_classes", "seed"), CLASSIFICATION_CASES, ids=CLASSIFICATION_IDS
)
def test_multiclass_against_sklearn(n, n_classes, seed):
    probs, targets = random_problem(n, n_classes, seed)
    p, y, labels = probs.numpy(), targets.numpy(), list(range(n_classes))
    expected = {
        "accuracy": skm.accuracy_score(y, p.argmax(1)),
        "nll": skm.log_loss(y, p, labels=labels),
        "brier": skm.brier_score_loss(y, p, labels=labels, scale_by_half=False),
    }
    actual = {
        "accuracy": metrics.accuracy(probs, targets),
        "nll": metrics.nll(probs, targets),
        "brier": metrics.brier_score(probs, targets),
    }
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, abs=SKLEARN_TOL), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_against_sklearn(seed):
    probs, targets = random_problem(150, 2, seed)
    p1, y = probs[:, 1], targets
    assert metrics.accuracy(p1, y) == skm.accuracy_score(y, p1 > 0.5)
    assert metrics.nll(p1, y) == pytest.approx(
        skm.log_loss(y, p1.numpy(), labels=[0, 1]), abs=SKLEARN_TOL
    )
    assert metrics.brier_score(p1, y) == pytest.approx(
        skm.brier_score_loss(y, p1.numpy()), abs=SKLEARN_TOL
    )
    # The two-column form of the same predictions: same accuracy/NLL/ECE, 2x Brier.
    assert metrics.accuracy(probs, y) == metrics.accuracy(p1, y)
    assert metrics.nll(probs, y) == pytest.approx(metrics.nll(p1, y))
    assert metrics.brier_score(probs, y) == pytest.approx(
        2 * metrics.brier_score(p1, y)
    )
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(
        metrics.expected_calibration_error(p1, y)
    )


def test_nll_clamps_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    eps64 = torch.finfo(torch.float64).eps
    assert metrics.nll(probs, targets) == pytest.approx(
        (-math.log(eps64) + math.log(2)) / 2
    )
    assert metrics.nll(probs.float(), targets) == pytest.approx(
        (-math.log(torch.finfo(torch.float32).eps) + math.log(2)) / 2
    )
    assert metrics.nll(probs, targets, eps=1e-3) == pytest.approx(
        (-math.log(1e-3) + math.log(2)) / 2
    )


def test_float_targets_holding_whole_numbers_are_accepted():
    assert metrics.accuracy(PROBS, TARGETS.double()) == metrics.accuracy(PROBS, TARGETS)
    assert metrics.accuracy(PROBS[:, 1], TARGETS.bool()) == 1.0
