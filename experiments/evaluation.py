"""Evaluation protocol of the digits study, for any predictive (MAP, Laplace, ...).

A method is evaluated through a ``predict(x) -> probs`` function (``[N, C]``
probabilities), so MAP and every Laplace variant go through the same code:

* in-distribution test set: accuracy, NLL, ECE (15 bins), Brier score;
* test digits rotated by :data:`experiments.data.ROTATION_ANGLES`: accuracy, NLL,
  ECE per angle;
* each OOD set of :func:`experiments.data.ood_sets`, plus uniform noise and inverted
  digits pooled (:data:`POOLED`): AUROC and FPR@95 with the max-probability and
  negative-entropy scores (in-distribution test digits are the positives).

Results are flat ``{key: float}`` dicts with keys ``in/<metric>``,
``rot/<angle>/<metric>`` and ``ood/<set>/<metric> <score>``, summarized over
seeds by :func:`experiments.report.summarize`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bayescurv import metrics
from experiments import data

Predict = Callable[[Tensor], Tensor]
"""Maps inputs to ``[N, C]`` predictive probabilities."""

SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "MSP": metrics.max_probability,
    "-H": metrics.negative_entropy,
}
"""OOD scores (higher = more in-distribution) by their short names."""
IN_METRICS = ("accuracy", "NLL", "ECE", "Brier")
SHIFT_METRICS = ("accuracy", "NLL", "ECE")
OOD_METRICS = tuple(f"{m} {s}" for m in ("AUROC", "FPR@95") for s in SCORES)
POOLED = "noise+inverted"
"""Uniform noise and inverted digits pooled: the OOD set of issue 6's reference."""


class EvaluationSets(NamedTuple):
    """The test digits and the shifted and OOD inputs derived from them."""

    test: tuple[Tensor, Tensor]
    rotated: dict[int, Tensor]
    ood: dict[str, Tensor]


def evaluation_sets(loaders: data.Loaders, seed: int = 0) -> EvaluationSets:
    """Rotated and OOD sets from the test split of ``loaders`` (fixed by ``seed``)."""
    x, y = loaders.test.dataset.tensors
    rotated = {angle: data.rotate(x, angle) for angle in data.ROTATION_ANGLES}
    ood = data.ood_sets(x, seed=seed)
    ood[POOLED] = torch.cat([ood["noise"], ood["inverted"]])
    return EvaluationSets((x, y), rotated, ood)


def classification_metrics(probs: Tensor, targets: Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score."""
    return {
        "accuracy": metrics.accuracy(probs, targets),
        "NLL": metrics.nll(probs, targets),
        "ECE": metrics.expected_calibration_error(probs, targets),
        "Brier": metrics.brier_score(probs, targets),
    }


def evaluate_classifier(predict: Predict, sets: EvaluationSets) -> dict[str, float]:
    """All numbers of the protocol for one predictive, as a flat ``{key: value}``."""
    x, y = sets.test
    probs = predict(x)
    result = {f"in/{k}": v for k, v in classification_metrics(probs, y).items()}
    for angle, x_rot in sets.rotated.items():
        shifted = classification_metrics(predict(x_rot), y)
        result |= {f"rot/{angle}/{k}": shifted[k] for k in SHIFT_METRICS}
    for name, x_ood in sets.ood.items():
        probs_ood = predict(x_ood)
        for score_name, score in SCORES.items():
            s_in, s_out = score(probs), score(probs_ood)
            result[f"ood/{name}/AUROC {score_name}"] = metrics.auroc(s_in, s_out)
            fpr = metrics.fpr_at_95_tpr(s_in, s_out)
            result[f"ood/{name}/FPR@95 {score_name}"] = fpr
    return result


def gaussian_nll(mean: Tensor, target: Tensor, std: float | Tensor) -> float:
    """Mean negative log density of ``target`` under ``N(mean, std^2)``.

    ``std`` is a number or a tensor broadcasting against ``mean`` (a per-input
    predictive standard deviation).
    """
    std = torch.as_tensor(std, dtype=mean.dtype)
    z = (target - mean) / std
    log_norm = std.log() + 0.5 * math.log(2 * math.pi)
    return (0.5 * z.square() + log_norm).mean().item()
