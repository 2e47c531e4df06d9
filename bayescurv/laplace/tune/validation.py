r"""Scoring a posterior's predictive on validation data (laplace-torch's ``validate``).

A validation loss is either a function of the whole validation set's predictions,
``loss(probs, targets)`` or, for regression, ``loss(f_mu, f_var, targets)``, or a
running metric object with ``update``, ``compute`` and ``reset`` (torchmetrics'
protocol; :class:`RunningNLLMetric` is one without the torchmetrics dependency) that
sees one batch at a time. Both kinds are also accepted by
``optimize_prior_precision(method="gridsearch", loss=...)``.

Example:
    >>> import torch
    >>> metric = RunningNLLMetric()
    >>> metric.update(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([0, 0]))
    >>> metric.update(torch.tensor([[0.2, 0.8]]), torch.tensor([1]))
    >>> expected = -torch.tensor([0.5, 0.9, 0.8], dtype=torch.float64).log().mean()
    >>> bool(torch.isclose(metric.compute(), expected))
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from bayescurv.laplace.data import BatchReader
from bayescurv.laplace.enums import LinkApprox, PredType

__all__ = ["Metric", "RunningNLLMetric", "get_nll", "validate"]


class Metric(Protocol):
    """A running metric: ``update`` per batch, ``compute`` at the end, ``reset``."""

    def update(self, *args: Any) -> None:
        """Add one batch (predictions, then targets)."""

    def compute(self) -> Tensor:
        """The metric over everything added since the last reset."""

    def reset(self) -> None:
        """Forget everything added."""


def get_nll(out_dist: Tensor, targets: Tensor) -> Tensor:
    """The mean negative log likelihood of class probabilities.

    Args:
        out_dist: Probabilities ``[N, C]``.
        targets: Class indices ``[N]``.
    """
    return F.nll_loss(out_dist.log(), targets)


class RunningNLLMetric:
    """The negative log likelihood of class probabilities, accumulated over batches.

    The mean over all targets seen (positions of sequence outputs included), except
    those equal to ``ignore_index``.

    Args:
        ignore_index: A target value that is skipped (e.g. padding tokens).
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        self.nll_sum = torch.tensor(0.0, dtype=torch.float64)
        self.n_valid_labels = torch.tensor(0)

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            probs: ``[..., C]`` probabilities.
            targets: ``[...]`` class indices.

        Raises:
            ValueError: If the shapes do not match.
        """
        if probs.shape[:-1] != targets.shape:
            raise ValueError(
                f"RunningNLLMetric: probs {list(probs.shape)} must be targets' shape "
                f"{list(targets.shape)} plus a class axis."
            )
        flat = probs.reshape(-1, probs.shape[-1]).log()
        labels = targets.reshape(-1)
        nll = F.nll_loss(flat, labels, ignore_index=self.ignore_index, reduction="sum")
        self.nll_sum = self.nll_sum.to(nll.device) + nll.detach().double()
        valid = (labels != self.ignore_index).sum()
        self.n_valid_labels = self.n_valid_labels.to(valid.device) + valid

    def compute(self) -> Tensor:
        """The mean NLL over the valid targets seen (0-d, float64).

        Raises:
            ValueError: If no valid target was added.
        """
        if int(self.n_valid_labels) == 0:
            raise ValueError("RunningNLLMetric.compute: no valid targets were added.")
        return self.nll_sum / self.n_valid_labels

    def reset(self) -> None:
        """Forget all batches."""
        self.nll_sum = torch.zeros_like(self.nll_sum)
        self.n_valid_labels = torch.zeros_like(self.n_valid_labels)


Loss = Metric | Callable[..., Tensor]
"""A running :class:`Metric` or an offline ``loss(*predictions, targets)``."""


@torch.no_grad()
def validate(
    laplace: Any,
    val_loader: Iterable,
    loss: Loss,
    pred_type: PredType | str = PredType.GLM,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    dict_key_y: str = "labels",
) -> float:
    """The validation loss of a fitted posterior's predictive.

    Args:
        laplace: A fitted Laplace approximation (``la(x, ...)`` gives predictions).
        val_loader: ``(inputs, targets)`` or dict batches.
        loss: A running metric (``update(*prediction, targets)``, falling back to
            ``update(prediction[0], targets)`` for a metric of the mean only) or a
            function of all predictions and targets concatenated.
        pred_type: ``"glm"`` or ``"nn"``.
        link_approx: Link approximation of classification predictions.
        n_samples: Draws for ``"mc"`` and ``"nn"``.
        dict_key_y: Key of the targets in dict batches.

    Returns:
        The loss (for a metric: ``compute()`` summed over its entries, as
        laplace-torch does for per-output metrics).

    Raises:
        ValueError: If ``loss`` is neither a metric nor callable, or the loader is
            empty.
    """
    metric = all(hasattr(loss, m) for m in ("update", "compute"))
    if not metric and not callable(loss):
        raise ValueError(
            "validate: loss must be callable or a metric with update and compute."
        )
    device = next(laplace.model.parameters()).device
    reader = BatchReader(
        getattr(laplace, "dict_key_x", "input_ids"), dict_key_y, device
    )
    predictions: list[tuple[Tensor, ...]] = []
    targets: list[Tensor] = []
    for inputs, y in reader.batches(val_loader):
        out = laplace(
            inputs,
            pred_type=pred_type,
            link_approx=link_approx,
            n_samples=n_samples,
            fitting=True,
        )
        out = out if isinstance(out, tuple) else (out,)
        if metric:
            _update(loss, out, y)
        else:
            predictions.append(out)
            targets.append(y)
    if metric:
        return float(loss.compute().sum())
    if not targets:
        raise ValueError("validate: val_loader yielded no batches.")
    columns = [torch.cat(parts) for parts in zip(*predictions, strict=True)]
    return float(loss(*columns, torch.cat(targets)))


def _update(metric: Metric, prediction: tuple[Tensor, ...], targets: Tensor) -> None:
    """``update(*prediction, targets)``, or with the mean only if it takes two."""
    args = (*prediction, targets)
    if len(prediction) > 1:
        try:
            inspect.signature(metric.update).bind(*args)
        except TypeError:  # e.g. a metric of the mean only: update(preds, targets)
            args = (prediction[0], targets)
    metric.update(*args)
