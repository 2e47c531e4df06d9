r"""Proper scoring rules and accuracy for class probabilities.

All functions take ``probs`` ``[N, C]`` (rows sum to 1) or, for a binary problem,
``[N]`` probabilities of class 1 (read as the two columns ``[1 - p, p]``), and
``targets`` ``[N]`` class indices. They return a Python ``float`` and work on any
device (``targets`` is moved to ``probs.device``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayescurv.metrics._checks import as_class_probs, as_class_targets


def accuracy(probs: Tensor, targets: Tensor) -> float:
    r"""Fraction of samples whose most probable class is the target.

    .. math::
        \operatorname{acc} = \frac{1}{N} \sum_{n=1}^N
            \mathbb{1}\left[\arg\max_c p_{nc} = y_n\right]

    Ties go to the lowest class index (``torch.argmax``); for binary ``[N]`` input
    the prediction is class 1 iff :math:`p_n > 1/2`.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``).
    """
    probs = as_class_probs(probs)
    targets = as_class_targets(targets, probs)
    return (probs.argmax(dim=1) == targets).double().mean().item()


def nll(probs: Tensor, targets: Tensor, eps: float | None = None) -> float:
    r"""Mean negative log-likelihood (log loss) of the targets, in nats.

    .. math::
        \operatorname{NLL} = -\frac{1}{N} \sum_{n=1}^N
            \log \max(p_{n y_n}, \varepsilon)

    A zero probability for the target would make the NLL infinite, so it is clamped
    at :math:`\varepsilon`, by default the machine epsilon of ``probs``' dtype: one
    sample contributes at most :math:`-\log \varepsilon` (15.9 in float32, 36.0 in
    float64).

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.
        eps: Smallest probability taken in the log, in ``(0, 1)``. Default
            ``torch.finfo(probs.dtype).eps``.

    Returns:
        The mean negative log-likelihood, ``>= 0``.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``), or if
            ``eps`` is not in ``(0, 1)``.
    """
    probs = as_class_probs(probs)
    targets = as_class_targets(targets, probs)
    # NOTE [clamped logs]
    # The default clamp is the one of scikit-learn's ``log_loss`` and of
    # ``torch.distributions.Categorical`` (laplace-torch's NLL), so numbers compare
    # with theirs. It depends on the dtype: pass ``eps`` to compare across dtypes.
    if eps is None:
        eps = torch.finfo(probs.dtype).eps
    elif not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}.")
    target_probs = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return -target_probs.double().clamp(min=eps).log().mean().item()


def brier_score(probs: Tensor, targets: Tensor) -> float:
    r"""Brier score: mean squared distance between probabilities and one-hot targets.

    For ``[N, C]`` probabilities, summed over classes and averaged over samples
    (Brier's original multi-class definition, range ``[0, 2]``):

    .. math::
        \operatorname{BS} = \frac{1}{N} \sum_{n=1}^N \sum_{c=1}^C
            \left(p_{nc} - \mathbb{1}[y_n = c]\right)^2 .

    For binary ``[N]`` probabilities of class 1, the usual binary Brier score
    (range ``[0, 1]``), as scikit-learn's ``brier_score_loss``:

    .. math::
        \operatorname{BS} = \frac{1}{N} \sum_{n=1}^N (p_n - y_n)^2 .

    The two-column form ``[1 - p, p]`` of the same predictions scores exactly twice
    the binary value.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.

    Returns:
        The Brier score.

    Raises:
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``).
    """
    binary = isinstance(probs, Tensor) and probs.ndim == 1
    probs = as_class_probs(probs)
    targets = as_class_targets(targets, probs)
    one_hot = torch.nn.functional.one_hot(targets, probs.shape[1])
    score = (probs.double() - one_hot).square().sum(dim=1).mean().item()
    return score / 2 if binary else score
