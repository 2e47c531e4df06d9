r"""Scores against NUTS, the markdown report and the plots of the gold-standard study.

Per test point, against the NUTS predictive (the reference):

* classification: :math:`\mathrm{KL}(p_{\mathrm{NUTS}} \,\|\, p)` of the class
  probabilities;
* regression: the Wasserstein-2 distance between the Gaussians with the predictive
  mean and variance of :math:`f` (:math:`\sqrt{(m - m')^2 + (s - s')^2}`);

and the predictive negative log likelihood of the test targets (regression: of
:math:`y = f + \varepsilon`, the mixture over draws for sampling methods).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from experiments.gold_methods import Prediction
from experiments.report import markdown_table

REFERENCE = "NUTS"
"""The reference row: NUTS's own predictive (distance 0, its NLL)."""
FLOOR = "NUTS half vs half (noise floor)"
"""The row of the distance between the predictives of two halves of the chains."""
PROB_FLOOR = 1e-12
"""Probabilities are clamped to this before logarithms (a MAP can round to 0)."""


def nll(pred: Prediction, y: Tensor, sigma: float) -> Tensor:
    """Negative log predictive density of each target, ``[M]``."""
    if pred.probs is not None:
        return -pred.probs.gather(1, y[:, None])[:, 0].clamp_min(PROB_FLOOR).log()
    y = y[:, 0]
    if pred.f_samples is not None:
        components = torch.distributions.Normal(pred.f_samples, sigma).log_prob(y)
        return -(components.logsumexp(0) - math.log(len(pred.f_samples)))
    scale = (pred.f_var + sigma**2).sqrt()
    return -torch.distributions.Normal(pred.f_mean, scale).log_prob(y)


def distance(pred: Prediction, reference: Prediction) -> Tensor:
    """KL from the reference (classification) or W2 (regression), per point ``[M]``."""
    if reference.probs is not None:
        ref = reference.probs.clamp_min(PROB_FLOOR)
        return (ref * (ref.log() - pred.probs.clamp_min(PROB_FLOOR).log())).sum(-1)
    scale, ref_scale = pred.f_var.sqrt(), reference.f_var.sqrt()
    return (
        (pred.f_mean - reference.f_mean).square() + (scale - ref_scale).square()
    ).sqrt()


def distance_name(likelihood: str) -> str:
    """``KL`` or ``W2``."""
    return "KL" if likelihood == "classification" else "W2"


def closest(scores: Mapping[str, Mapping[str, float]], key: str, k: int) -> list[str]:
    """The ``k`` methods with the smallest ``scores[method][key]``."""
    return sorted(scores, key=lambda name: scores[name][key])[:k]


TIE_RTOL = 1e-8
"""Scores this close (relatively) tie: one method computed two ways, e.g. the GP on
all data and the weight-space ``full`` Laplace, differ by round-off only."""


def rank_of(scores: Mapping[str, Mapping[str, float]], key: str, name: str) -> int:
    """1-based rank of ``name`` by ``key`` (1 = closest; ties share the best rank).

    Scores within :data:`TIE_RTOL` of ``name``'s tie with it.
    """
    mine = scores[name][key]
    below = mine - TIE_RTOL * abs(mine)
    return 1 + sum(scores[n][key] < below for n in scores)


def score_table(
    scores: Mapping[str, Mapping[str, float]], columns: Sequence[str], sort_key: str
) -> str:
    """Methods as rows (sorted by ``sort_key``), ``columns`` as columns.

    A method without a score of a column gets a blank cell.
    """
    rows = [
        [
            name,
            *(f"{scores[name][c]:.4g}" if c in scores[name] else "" for c in columns),
        ]
        for name in sorted(scores, key=lambda n: scores[n][sort_key])
    ]
    return markdown_table(["method", *columns], rows)


def _panels(count: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure with ``count`` axes side by side."""
    fig = Figure(figsize=(width * count, height), layout="constrained")
    return fig, list(fig.subplots(1, count, squeeze=False)[0])


def plot_distances(
    panels: Mapping[str, tuple[Mapping[str, float], float, str]],
    path: Path,
    top: int = 15,
) -> None:
    """Horizontal bars of the ``top`` closest methods, one panel per problem.

    Args:
        panels: Per problem: distance per method, NUTS's noise floor, axis label.
        path: The PNG to write.
        top: Methods per panel.
    """
    fig, axes = _panels(len(panels), 6.0, 0.32 * top + 1.2)
    for ax, (title, (values, floor, label)) in zip(axes, panels.items(), strict=True):
        names = sorted(values, key=values.get)[:top][::-1]
        ax.barh(range(len(names)), [values[n] for n in names], color="tab:blue")
        ax.axvline(floor, color="k", ls="--", lw=0.8, label="NUTS noise floor")
        ax.legend(fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(label, fontsize=8)
    fig.savefig(path, dpi=110)


def plot_regression(
    x_train: Tensor,
    y_train: Tensor,
    grid: Tensor,
    bands: Mapping[str, Prediction],
    reference: Prediction,
    path: Path,
) -> None:
    """Mean +- 2 std of f per method, with the NUTS band dashed in every panel."""
    fig, axes = _panels(len(bands), 3.4, 3.0)
    x = grid[:, 0]
    ref_std = reference.f_var.sqrt()
    for ax, (title, pred) in zip(axes, bands.items(), strict=True):
        std = pred.f_var.sqrt()
        ax.fill_between(x, pred.f_mean - 2 * std, pred.f_mean + 2 * std, alpha=0.3)
        ax.plot(x, pred.f_mean, lw=1)
        for sign in (-2, 2):
            ax.plot(x, reference.f_mean + sign * ref_std, "k--", lw=0.8)
        ax.scatter(x_train[:, 0], y_train[:, 0], s=3, c="k")
        ax.set_ylim(-3, 3)
        ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=110)


def plot_moons(
    x_train: Tensor,
    y_train: Tensor,
    grid: Tensor,
    probs: Mapping[str, Tensor],
    path: Path,
) -> None:
    """Predicted probability of class 1 on the grid, per method."""
    fig, axes = _panels(len(probs), 3.2, 2.9)
    xs, ys = grid[:, 0].unique(), grid[:, 1].unique()
    for ax, (title, p) in zip(axes, probs.items(), strict=True):
        image = p[:, 1].reshape(len(xs), len(ys)).T
        ax.contourf(xs, ys, image, levels=torch.linspace(0, 1, 11), cmap="RdBu_r")
        ax.scatter(x_train[:, 0], x_train[:, 1], c=y_train, s=3, cmap="RdBu_r")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=110)
