"""Every error path of bayescurv.metrics, with the message it must give."""

from __future__ import annotations

import pytest
import torch

from bayescurv import metrics
from tests.metrics.problems import PROBS, TARGETS

CLASSIFICATION_ERRORS = [
    ("not-a-tensor", PROBS.numpy(), TARGETS, TypeError, "probs must be a torch.Tensor"),
    ("empty", torch.empty(0, 3), TARGETS, ValueError, "probs is empty"),
    ("integer-probs", PROBS.long(), TARGETS, TypeError, "floating-point"),
    ("3d-probs", PROBS[None], TARGETS, ValueError, r"shape \[N, C\]"),
    ("one-column", PROBS[:, :1], TARGETS, ValueError, "single class column"),
    (
        "nan",
        torch.tensor([[0.5, float("nan")], [0.4, 0.6]]),
        TARGETS,
        ValueError,
        "probs contains NaN",
    ),
    ("inf", torch.tensor([0.5, float("inf")]), TARGETS, ValueError, "infinite"),
    (
        "logits",
        torch.tensor([[2.0, -1.0], [0.4, 0.6]]),
        TARGETS,
        ValueError,
        r"outside \[0, 1\]",
    ),
    (
        "binary-above-1",
        torch.tensor([0.5, 1.5]),
        TARGETS,
        ValueError,
        r"outside \[0, 1\]",
    ),
    (
        "not-normalized",
        torch.tensor([[0.5, 0.4], [0.4, 0.6]]),
        TARGETS,
        ValueError,
        r"row 0 sums to 0\.9",
    ),
    ("targets-not-tensor", PROBS, [0, 1], TypeError, "targets must be a torch.Tensor"),
    (
        "shape-mismatch",
        PROBS,
        torch.tensor([0, 1, 1]),
        ValueError,
        r"shape \[N\] = \[2\]",
    ),
    ("one-hot", PROBS, torch.eye(2), ValueError, "one-hot"),
    ("column-targets", PROBS, TARGETS[:, None], ValueError, r"targets\.squeeze\(1\)"),
    (
        "fractional-targets",
        PROBS,
        torch.tensor([0.0, 0.5]),
        ValueError,
        "integer class indices",
    ),
    (
        "out-of-range",
        PROBS,
        torch.tensor([0, 2]),
        ValueError,
        r"targets out of range: found class index 2, expected indices in \[0, 1\]",
    ),
    (
        "negative-target",
        PROBS,
        torch.tensor([-1, 0]),
        ValueError,
        "targets out of range: found class index -1",
    ),
    (
        "nan-targets",
        PROBS,
        torch.tensor([0.0, float("nan")]),
        ValueError,
        "targets contains NaN",
    ),
]
CLASSIFICATION_METRICS = [
    metrics.accuracy,
    metrics.nll,
    metrics.brier_score,
    metrics.expected_calibration_error,
    metrics.maximum_calibration_error,
]


@pytest.mark.parametrize("metric", CLASSIFICATION_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("probs", "targets", "error", "match"),
    [case[1:] for case in CLASSIFICATION_ERRORS],
    ids=[case[0] for case in CLASSIFICATION_ERRORS],
)
def test_classification_errors(metric, probs, targets, error, match):
    with pytest.raises(error, match=match):
        metric(probs, targets)


@pytest.mark.parametrize(
    "score",
    [metrics.max_probability, metrics.predictive_entropy, metrics.negative_entropy],
    ids=lambda f: f.__name__,
)
def test_ood_score_errors(score):
    with pytest.raises(ValueError, match=r"row 1 sums to 1\.1"):
        score(torch.tensor([[0.5, 0.5], [0.6, 0.5]]))
    with pytest.raises(ValueError, match="probs is empty"):
        score(torch.empty(0))


SCORE_ERRORS = [
    (
        "not-a-tensor",
        [1.0, 2.0],
        torch.ones(3),
        TypeError,
        "scores_in must be a torch.Tensor",
    ),
    ("empty", torch.ones(3), torch.empty(0), ValueError, "scores_out is empty"),
    ("2d", torch.ones(3, 1), torch.ones(3), ValueError, r"scores_in must be a 1-d"),
    (
        "nan",
        torch.ones(3),
        torch.tensor([0.0, float("nan")]),
        ValueError,
        "scores_out contains NaN",
    ),
    (
        "complex",
        torch.ones(3, dtype=torch.complex64),
        torch.ones(3),
        TypeError,
        "real-valued",
    ),
]


@pytest.mark.parametrize(
    "metric", [metrics.auroc, metrics.fpr_at_95_tpr], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    ("scores_in", "scores_out", "error", "match"),
    [case[1:] for case in SCORE_ERRORS],
    ids=[case[0] for case in SCORE_ERRORS],
)
def test_detection_errors(metric, scores_in, scores_out, error, match):
    with pytest.raises(error, match=match):
        metric(scores_in, scores_out)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_n_bins_must_be_a_positive_integer(n_bins):
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        metrics.expected_calibration_error(PROBS, TARGETS, n_bins=n_bins)


@pytest.mark.parametrize("eps", [0.0, 1.0, -1e-3])
def test_nll_eps_must_be_a_probability(eps):
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
        metrics.nll(PROBS, TARGETS, eps=eps)
