r"""Diagonal SWAG: marginal weight variances from SGD iterates (Maddox et al., 2019).

Running SGD with a large constant learning rate from the trained weights, the
iterates :math:`\theta_1, \dots, \theta_S` taken every ``snapshot_freq`` epochs
scatter around the optimum; their per-entry variance

.. math::
    \sigma^2_i = \frac{1}{S} \sum_s (\theta_{s,i} - \bar\theta_i)^2

is a cheap estimate of the posterior's marginal variances, used to pick a subnetwork
(:class:`~bayescurv.laplace.subnetwork.LargestVarianceSWAGSubnetMask`).

Reference: W. Maddox, T. Garipov, P. Izmailov, D. Vetrov, A. G. Wilson, "A Simple
Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from bayescurv.laplace.data import BatchReader, call_model

__all__ = ["fit_diagonal_swag_var"]


def _flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def fit_diagonal_swag_var(
    model: nn.Module,
    train_loader: Iterable,
    criterion: nn.Module,
    n_snapshots_total: int = 40,
    snapshot_freq: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    min_var: float = 1e-30,
) -> Tensor:
    """Per-entry variances of SGD iterates of the trainable weights.

    The model is copied; its own weights are not changed.

    Args:
        model: The trained model.
        train_loader: ``(inputs, targets)`` batches.
        criterion: The training loss, e.g. ``nn.CrossEntropyLoss()``.
        n_snapshots_total: Number of iterates ``S`` collected.
        snapshot_freq: Epochs between iterates.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        min_var: Lower bound of the variances.

    Returns:
        ``[P]`` over the trainable parameters in ``named_parameters()`` order (the
        indexing of every subnetwork mask).

    Raises:
        ValueError: For non-positive counts, or a model without trainable weights.
    """
    if n_snapshots_total < 1 or snapshot_freq < 1:
        raise ValueError(
            "fit_diagonal_swag_var: n_snapshots_total and snapshot_freq must be "
            f"positive, got {n_snapshots_total} and {snapshot_freq}."
        )
    copied = copy.deepcopy(model).train()
    params = [p for p in copied.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit_diagonal_swag_var: the model has no trainable weights.")
    reader = BatchReader("input_ids", "labels", params[0].device)
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    # Welford's running mean and sum of squared deviations (no cancellation)
    mean, squares = torch.zeros_like(_flat(params)), torch.zeros_like(_flat(params))
    for epoch in range(n_snapshots_total * snapshot_freq):
        for inputs, targets in reader.batches(train_loader):
            optimizer.zero_grad()
            criterion(call_model(copied, inputs), targets).backward()
            optimizer.step()
        if (epoch + 1) % snapshot_freq == 0:
            count = (epoch + 1) // snapshot_freq
            theta = _flat(params)
            delta = theta - mean
            mean += delta / count
            squares += delta * (theta - mean)
    return (squares / n_snapshots_total).clamp(min=min_var)
