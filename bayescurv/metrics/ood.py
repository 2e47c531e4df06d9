r"""Out-of-distribution (OOD) detection: per-sample scores and detection metrics.

Convention: a **higher score means more in-distribution**. In-distribution samples
are the positives of the detection problem, OOD samples the negatives. Scores from
predictive probabilities:

* :func:`max_probability` :math:`\max_c p_{nc}` (the maximum softmax probability
  baseline of Hendrycks & Gimpel, 2017);
* :func:`negative_entropy` :math:`-\mathbb{H}[p_n] = \sum_c p_{nc} \log p_{nc}`;
* :func:`predictive_entropy` :math:`\mathbb{H}[p_n]` itself is an *uncertainty*
  (higher = more OOD): negate it, or use :func:`negative_entropy`, before passing it
  to :func:`auroc` or :func:`fpr_at_95_tpr`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.metrics._checks import as_class_probs, as_scores


def max_probability(probs: Tensor) -> Tensor:
    r"""Confidence score :math:`\max_c p_{nc}` (higher = more in-distribution).

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.

    Returns:
        ``[N]`` scores in ``[1/C, 1]``, dtype and device of ``probs``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``).
    """
    return as_class_probs(probs).max(dim=1).values


def predictive_entropy(probs: Tensor) -> Tensor:
    r"""Entropy of the predictive distribution, in nats (higher = more uncertain).

    .. math::
        \mathbb{H}[p_n] = -\sum_{c=1}^C p_{nc} \log p_{nc}, \qquad 0 \log 0 = 0 .

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.

    Returns:
        ``[N]`` entropies in ``[0, log C]``, dtype and device of ``probs``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``).
    """
    probs = as_class_probs(probs)
    return torch.special.entr(probs).sum(dim=1)  # entr(p) = -p log p, entr(0) = 0


def negative_entropy(probs: Tensor) -> Tensor:
    r"""OOD score :math:`-\mathbb{H}[p_n]` (higher = more in-distribution).

    The sign is flipped from :func:`predictive_entropy` so that it follows the
    convention of :func:`auroc` and :func:`fpr_at_95_tpr`.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.

    Returns:
        ``[N]`` scores in ``[-log C, 0]``, dtype and device of ``probs``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``).
    """
    return -predictive_entropy(probs)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` ``[N]``, ties sharing their average rank."""
    sorted_values, order = torch.sort(values)
    _, group, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    last_rank = counts.cumsum(0).to(torch.float64)
    group_rank = last_rank - (counts - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = group_rank[group]
    return ranks


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    r"""Area under the ROC curve of separating in- from out-of-distribution samples.

    The probability that a random in-distribution sample scores higher than a
    random OOD sample, ties counting one half (the Mann-Whitney statistic; equal to
    the trapezoidal area under scikit-learn's ``roc_curve``):

    .. math::
        \operatorname{AUROC} = \frac{1}{N_\text{in} N_\text{out}}
            \sum_{i, j} \left( \mathbb{1}[s^\text{in}_i > s^\text{out}_j]
            + \tfrac12 \mathbb{1}[s^\text{in}_i = s^\text{out}_j] \right) .

    0.5 is chance, 1 a perfect separation, below 0.5 a score with the wrong sign.

    Args:
        scores_in: ``[N_in]`` scores of in-distribution samples (higher = more
            in-distribution).
        scores_out: ``[N_out]`` scores of OOD samples.

    Returns:
        The AUROC in ``[0, 1]``.

    Raises:
        TypeError, ValueError: If a score tensor is not a real 1-d tensor, is empty
            or contains NaN.
    """
    scores_in = as_scores(scores_in, "scores_in")
    scores_out = as_scores(scores_out, "scores_out").to(scores_in.device)
    n_in, n_out = len(scores_in), len(scores_out)
    ranks = _average_ranks(torch.cat([scores_in, scores_out]))
    u_statistic = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return (u_statistic / (n_in * n_out)).item()


def fpr_at_95_tpr(scores_in: Tensor, scores_out: Tensor) -> float:
    r"""False positive rate at the largest threshold with at least 95% TPR.

    A sample is declared in-distribution if its score is ``>=`` the threshold
    :math:`t`. With :math:`k = \lceil 0.95 N_\text{in} \rceil`, :math:`t` is the
    :math:`k`-th largest in-distribution score, the largest threshold that keeps at
    least 95% of the in-distribution samples, and

    .. math::
        \operatorname{FPR@95} = \frac{1}{N_\text{out}} \sum_j
            \mathbb{1}[s^\text{out}_j \ge t] .

    Ties: OOD samples scoring exactly :math:`t` count as false positives, and
    in-distribution samples tied at :math:`t` are all kept (so the TPR may exceed
    95%). This is the first point with TPR ``>= 0.95`` on scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``. Lower is better.

    Args:
        scores_in: ``[N_in]`` scores of in-distribution samples (higher = more
            in-distribution).
        scores_out: ``[N_out]`` scores of OOD samples.

    Returns:
        The FPR in ``[0, 1]``.

    Raises:
        TypeError, ValueError: If a score tensor is not a real 1-d tensor, is empty
            or contains NaN.
    """
    scores_in = as_scores(scores_in, "scores_in")
    scores_out = as_scores(scores_out, "scores_out").to(scores_in.device)
    # ceil(0.95 n) in integer arithmetic: no float rounding at exact multiples.
    k = -(-95 * len(scores_in) // 100)
    threshold = torch.topk(scores_in, k).values[-1]
    return (scores_out >= threshold).double().mean().item()
