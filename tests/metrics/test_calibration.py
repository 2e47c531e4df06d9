"""ECE, MCE and calibration bins: hand-computed values and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bayescurv import metrics
from tests.metrics.problems import (
    CALIBRATED_ECE_TOL,
    HYPOTHESIS,
    N_CALIBRATED,
    calibrated_problem,
    random_problem,
)


def test_ece_and_mce_by_hand_with_empty_bins():
    # 5 bins of width 0.2; confidences 0.3 (bin 1), 0.5, 0.55 (bin 2), 0.95 (bin 4);
    # bins 0 and 3 are empty.
    probs = torch.tensor(
        [
            [0.3, 0.3, 0.3, 0.1],
            [0.5, 0.2, 0.2, 0.1],
            [0.1, 0.55, 0.25, 0.1],
            [0.95, 0.05, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 0, 2, 0])  # correct: yes (tie -> 0), yes, no, yes
    bins = metrics.calibration_bins(probs, targets, n_bins=5)
    assert bins.counts.tolist() == [0, 1, 2, 0, 1]
    torch.testing.assert_close(
        bins.accuracy[[1, 2, 4]], torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)
    )
    assert bins.accuracy[[0, 3]].isnan().all()
    gaps = [abs(1 - 0.3), abs(0.5 - 0.525), abs(1 - 0.95)]
    expected_ece = (gaps[0] + 2 * gaps[1] + gaps[2]) / 4
    assert metrics.expected_calibration_error(
        probs, targets, n_bins=5
    ) == pytest.approx(expected_ece)
    assert metrics.maximum_calibration_error(probs, targets, 5) == pytest.approx(0.7)


def test_confidence_on_a_bin_edge_joins_the_lower_bin():
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    bins = metrics.calibration_bins(probs, torch.tensor([0, 0, 0]), n_bins=5)
    # (0.4, 0.6] holds 0.5 and 0.6; (0.8, 1.0] holds 1.0
    assert bins.counts.tolist() == [0, 0, 2, 0, 1]


def test_ece_binary_is_top_label():
    p1 = torch.tensor([0.1, 0.8, 0.5], dtype=torch.float64)  # conf 0.9, 0.8, 0.5
    targets = torch.tensor([0, 0, 0])  # predictions 0, 1, 0 -> correct, wrong, correct
    ece = metrics.expected_calibration_error(p1, targets, n_bins=2)
    # bin (0, 0.5]: {0.5, correct}; bin (0.5, 1]: {0.9 correct, 0.8 wrong}
    assert ece == pytest.approx((abs(1 - 0.5) + 2 * abs(0.5 - 0.85)) / 3)


@HYPOTHESIS
@given(
    n=st.integers(1, 60),
    n_classes=st.integers(2, 6),
    n_bins=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_calibration_error_properties(n, n_classes, n_bins, seed):
    probs, targets = random_problem(n, n_classes, seed)
    ece = metrics.expected_calibration_error(probs, targets, n_bins)
    mce = metrics.maximum_calibration_error(probs, targets, n_bins)
    assert 0 <= ece <= mce <= 1
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    permuted = metrics.expected_calibration_error(
        probs[permutation], targets[permutation], n_bins
    )
    assert permuted == pytest.approx(ece)
    if n_bins == 1:  # one bin: |accuracy - mean confidence|
        mean_confidence = probs.max(dim=1).values.mean().item()
        assert ece == pytest.approx(
            abs(metrics.accuracy(probs, targets) - mean_confidence)
        )


@pytest.mark.parametrize("n_classes", [2, 10])
def test_calibrated_data_has_small_ece(n_classes):
    probs, targets = calibrated_problem(N_CALIBRATED, n_classes, seed=n_classes)
    assert metrics.expected_calibration_error(probs, targets) < CALIBRATED_ECE_TOL
    # the same probabilities, made over-confident, are detected
    sharp = (3 * probs.log()).softmax(dim=1)
    assert metrics.expected_calibration_error(sharp, targets) > 5 * CALIBRATED_ECE_TOL
