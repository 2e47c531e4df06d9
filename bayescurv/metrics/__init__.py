r"""Metrics for predictive distributions: accuracy, scoring rules, calibration, OOD.

Classification metrics take ``probs`` ``[N, C]`` (rows sum to 1) or, for a binary
problem, ``[N]`` probabilities of class 1 (read as the columns ``[1 - p, p]``), and
``targets`` ``[N]`` class indices; they return a Python ``float``. OOD scores map
``probs`` to ``[N]`` tensors with *higher = more in-distribution* (except
:func:`predictive_entropy`, an uncertainty), and :func:`auroc` /
:func:`fpr_at_95_tpr` compare the scores of in- and out-of-distribution samples.
Everything works on any device; definitions are in each docstring and in
``docs/metrics.md``.

Bad input raises a ``TypeError`` or ``ValueError`` naming the argument and the
problem: not a tensor, empty, wrong shape or shape mismatch, NaN or infinite values,
probabilities outside ``[0, 1]`` or rows not summing to 1 (within
:data:`PROB_SUM_ATOL`), non-integer targets or targets out of range.

Example:
    >>> import torch
    >>> from bayescurv import metrics
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    >>> targets = torch.tensor([0, 1, 1, 0])
    >>> metrics.accuracy(probs, targets)  # row 3 wrong; row 4's tie -> class 0
    0.75
    >>> round(metrics.brier_score(probs, targets), 6)  # (.02 + .08 + .72 + .5) / 4
    0.33
    >>> metrics.auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.8, 0.1]))  # 3.5 / 4
    0.875
"""

from bayescurv.metrics._checks import PROB_SUM_ATOL
from bayescurv.metrics.calibration import (
    CalibrationBins,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
)
from bayescurv.metrics.classification import accuracy, brier_score, nll
from bayescurv.metrics.ood import (
    auroc,
    fpr_at_95_tpr,
    max_probability,
    negative_entropy,
    predictive_entropy,
)
from bayescurv.metrics.reliability import reliability_diagram

__all__ = [
    "PROB_SUM_ATOL",
    "CalibrationBins",
    "accuracy",
    "auroc",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "fpr_at_95_tpr",
    "max_probability",
    "maximum_calibration_error",
    "negative_entropy",
    "nll",
    "predictive_entropy",
    "reliability_diagram",
]
