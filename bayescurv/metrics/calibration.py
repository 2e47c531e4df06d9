r"""Calibration errors over equal-width confidence bins (Guo et al., 2017).

The confidence of sample :math:`n` is its largest class probability
:math:`\hat p_n = \max_c p_{nc}` and its prediction :math:`\hat y_n = \arg\max_c
p_{nc}`. The unit interval is split into :math:`M` bins
:math:`B_m = \{n : \hat p_n \in ((m-1)/M, m/M]\}` (a confidence of exactly 0 joins
the first bin). With per-bin accuracy and mean confidence

.. math::
    \operatorname{acc}(B_m) = \frac{1}{|B_m|} \sum_{n \in B_m}
        \mathbb{1}[\hat y_n = y_n], \qquad
    \operatorname{conf}(B_m) = \frac{1}{|B_m|} \sum_{n \in B_m} \hat p_n ,

the expected and maximum calibration errors are

.. math::
    \operatorname{ECE} = \sum_{m=1}^M \frac{|B_m|}{N}
        \left|\operatorname{acc}(B_m) - \operatorname{conf}(B_m)\right|, \qquad
    \operatorname{MCE} = \max_{m : |B_m| > 0}
        \left|\operatorname{acc}(B_m) - \operatorname{conf}(B_m)\right| .

Binary ``[N]`` probabilities of class 1 are read as ``[1 - p, p]``, so the
confidence is :math:`\max(p, 1 - p) \ge 1/2` (top-label calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv.metrics._checks import as_class_probs, as_class_targets, check_n_bins


@dataclass(frozen=True)
class CalibrationBins:
    r"""Per-bin statistics of equal-width confidence bins.

    All tensors are ``float64`` (``counts``: ``int64``) on the device of the
    probabilities they were computed from.

    Attributes:
        edges: ``[M + 1]`` bin edges ``m / M``; bin ``m`` is ``(edges[m],
            edges[m + 1]]``.
        counts: ``[M]`` number of samples per bin.
        accuracy: ``[M]`` fraction of correct predictions per bin, NaN where empty.
        confidence: ``[M]`` mean confidence per bin, NaN where empty.

    Example:
        >>> import torch
        >>> from bayescurv.metrics import calibration_bins
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> bins = calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> bins.counts.tolist(), bins.accuracy.tolist()
        ([0, 3], [nan, 0.6666666666666666])
        >>> round(bins.ece(), 6)  # |2/3 - (0.9 + 0.8 + 0.7) / 3| = 0.8 - 2/3
        0.133333
    """

    edges: Tensor
    counts: Tensor
    accuracy: Tensor
    confidence: Tensor

    @property
    def gaps(self) -> Tensor:
        """``[M]`` absolute gaps ``|accuracy - confidence|``, NaN where empty."""
        return (self.accuracy - self.confidence).abs()

    def ece(self) -> float:
        """Expected calibration error: gaps weighted by the fraction of samples."""
        filled = self.counts > 0
        weights = self.counts[filled].double() / self.counts.sum()
        return (weights * self.gaps[filled]).sum().item()

    def mce(self) -> float:
        """Maximum calibration error: the largest gap over non-empty bins."""
        return self.gaps[self.counts > 0].max().item()


def calibration_bins(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> CalibrationBins:
    """Sort samples into equal-width confidence bins and summarize each bin.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.
        n_bins: Number of equal-width bins ``M`` on ``[0, 1]``.

    Returns:
        The per-bin counts, accuracies and mean confidences.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``) or if
            ``n_bins`` is not a positive integer.
    """
    n_bins = check_n_bins(n_bins)
    probs = as_class_probs(probs)
    targets = as_class_targets(targets, probs)
    probs = probs.double()
    confidence, prediction = probs.max(dim=1).values, probs.argmax(dim=1)
    correct = (prediction == targets).double()
    # Exact edges m / M (``linspace`` may round differently), right-closed bins.
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=probs.device) / n_bins
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(min=0)
    index = index.clamp(max=n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins)
    sum_correct = torch.zeros_like(edges[:-1]).index_add_(0, index, correct)
    sum_confidence = torch.zeros_like(edges[:-1]).index_add_(0, index, confidence)
    # Empty bins: 0 / 0 = NaN on purpose, they have no accuracy or confidence.
    return CalibrationBins(
        edges=edges,
        counts=counts,
        accuracy=sum_correct / counts.double(),
        confidence=sum_confidence / counts.double(),
    )


def expected_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Expected calibration error (ECE) over equal-width confidence bins.

    See the module docstring for the definition. Lower is better; 0 for a model
    whose accuracy matches its mean confidence in every bin.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.
        n_bins: Number of equal-width bins on ``[0, 1]``.

    Returns:
        The ECE in ``[0, 1]``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``) or if
            ``n_bins`` is not a positive integer.
    """
    return calibration_bins(probs, targets, n_bins).ece()


def maximum_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Maximum calibration error (MCE): the largest gap over non-empty bins.

    See the module docstring for the definition. Sensitive to sparsely filled
    bins: one sample in a bin makes its gap ``|0 or 1 - confidence|``.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.
        n_bins: Number of equal-width bins on ``[0, 1]``.

    Returns:
        The MCE in ``[0, 1]``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``) or if
            ``n_bins`` is not a positive integer.
    """
    return calibration_bins(probs, targets, n_bins).mce()
