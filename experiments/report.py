"""Helpers shared by the studies: seed summaries, markdown tables and plots.

Plots are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI
backend needed) and saved as PNG.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from bayescurv import metrics
from experiments import data
from experiments.evaluation import IN_METRICS, OOD_METRICS, POOLED

Summary = dict[str, tuple[float, float]]
"""``{key: (mean, std)}`` over seeds, as returned by :func:`summarize`."""


def summarize(runs: Sequence[Mapping[str, float]]) -> Summary:
    """Mean and standard deviation over runs (seeds) of every key.

    Args:
        runs: One ``{key: value}`` per seed, all with the same keys.

    Returns:
        ``{key: (mean, std)}``; the std is 0 for a single run.
    """
    summary = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = (statistics.fmean(values), spread)
    return summary


def fmt(value: tuple[float, float], digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` decimals."""
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def in_distribution_table(summaries: Mapping[str, Summary]) -> str:
    """Methods as rows, :data:`~experiments.evaluation.IN_METRICS` as columns."""
    rows = [
        [name, *(fmt(s[f"in/{m}"]) for m in IN_METRICS)]
        for name, s in summaries.items()
    ]
    return markdown_table(["method", *IN_METRICS], rows)


def rotation_table(summaries: Mapping[str, Summary], metric: str) -> str:
    """Angles as rows, methods as columns, for one shift metric."""
    rows = [
        [f"{angle}°", *(fmt(s[f"rot/{angle}/{metric}"], 2) for s in summaries.values())]
        for angle in data.ROTATION_ANGLES
    ]
    return markdown_table(["angle", *summaries], rows)


def ood_table(summary: Summary) -> str:
    """OOD sets as rows (their mean, then the pooled set), OOD metrics as columns."""
    names = data.OOD_SETS
    rows = [[n, *(fmt(summary[f"ood/{n}/{m}"]) for m in OOD_METRICS)] for n in names]
    means = [
        sum(summary[f"ood/{n}/{m}"][0] for n in names) / len(names) for m in OOD_METRICS
    ]
    rows.append(["**mean of the above**", *(f"**{v:.3f}**" for v in means)])
    pooled = [fmt(summary[f"ood/{POOLED}/{m}"]) for m in OOD_METRICS]
    rows.append([f"{POOLED} (pooled)", *pooled])
    return markdown_table(["OOD set", *OOD_METRICS], rows)


def _figure(n_panels: int, width: float = 4.0, height: float = 3.6):
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(width * n_panels, height), layout="constrained")
    return figure, figure.subplots(1, n_panels, squeeze=False)[0]


def plot_reliability(panels: Mapping[str, tuple[Tensor, Tensor]], path: Path) -> None:
    """One reliability diagram per ``{title: (probs, targets)}``, side by side."""
    figure, axes = _figure(len(panels), height=5.0)
    for ax, (title, (probs, targets)) in zip(axes, panels.items(), strict=True):
        metrics.reliability_diagram(probs, targets, ax=ax, title=title)
    figure.savefig(path, dpi=120)


def _legend_below(figure: Any, ax: Any, ncol: int | None = None) -> None:
    """One legend for the figure, below the panels: it never covers a curve."""
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="outside lower center", ncol=ncol or min(len(labels), 6),
        fontsize="small", frameon=False,
    )  # fmt: skip


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    x: Sequence[float],
    xlabel: str,
    path: Path,
) -> None:
    """Mean ± std curves: ``{panel ylabel: {label: [(mean, std) per x]}}``.

    Each panel is titled "<ylabel> vs. <xlabel>"; the lines share one legend below
    the panels.
    """
    figure, axes = _figure(len(curves), height=4.0)
    for ax, (ylabel, lines) in zip(axes, curves.items(), strict=True):
        for label, points in lines.items():
            mean = [m for m, _ in points]
            ax.errorbar(x, mean, yerr=[s for _, s in points], label=label, capsize=2)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(f"{ylabel} vs. {xlabel.split(' (', maxsplit=1)[0]}")
        ax.grid(alpha=0.3)
    _legend_below(figure, axes[0])
    figure.savefig(path, dpi=120)


def plot_regression_band(
    x_train: Tensor,
    y_train: Tensor,
    x_grid: Tensor,
    f_grid: Tensor,
    bands: Mapping[str, tuple[Tensor, Tensor]],
    path: Path,
) -> None:
    """Data, true function, and predictive mean ± 2 std per ``{label: (mean, std)}``."""
    figure, axes = _figure(1, width=6.0)
    ax = axes[0]
    x = x_grid.squeeze(1)
    ax.plot(x, f_grid.squeeze(1), color="black", linestyle="--", label="true function")
    ax.scatter(x_train.squeeze(1), y_train.squeeze(1), s=8, color="gray", label="data")
    for label, (band_mean, band_std) in bands.items():
        mean, std = band_mean.squeeze(-1), band_std.squeeze(-1)
        (line,) = ax.plot(x, mean, label=f"{label} mean")
        ax.fill_between(
            x, mean - 2 * std, mean + 2 * std, alpha=0.25, color=line.get_color(),
            label=f"{label} ± 2 std",
        )  # fmt: skip
    ax.set(xlabel="x", ylabel="y", title="Regression toy: predictive mean ± 2 std")
    _legend_below(figure, ax, ncol=3)
    figure.savefig(path, dpi=120)


def ood_comparison_table(summaries: Mapping[str, Summary], metric: str) -> str:
    """OOD sets as rows (then their mean and the pooled set), methods as columns."""
    names = data.OOD_SETS
    rows = [
        [n, *(fmt(s[f"ood/{n}/{metric}"]) for s in summaries.values())] for n in names
    ]
    means = [
        sum(s[f"ood/{n}/{metric}"][0] for n in names) / len(names)
        for s in summaries.values()
    ]
    rows.append(["**mean of the above**", *(f"**{v:.3f}**" for v in means)])
    pooled = [fmt(s[f"ood/{POOLED}/{metric}"]) for s in summaries.values()]
    rows.append([f"{POOLED} (pooled)", *pooled])
    return markdown_table(["OOD set", *summaries], rows)


def plot_regression_panels(
    x_train: Tensor,
    y_train: Tensor,
    x_grid: Tensor,
    f_grid: Tensor,
    bands: Mapping[str, tuple[Tensor, Tensor]],
    path: Path,
) -> None:
    """One panel per ``{title: (mean, std)}``: data, true function, mean ± 2 std."""
    figure, axes = _figure(len(bands), width=3.6, height=3.6)
    x = x_grid.squeeze(1)
    for ax, (title, (band_mean, band_std)) in zip(axes, bands.items(), strict=True):
        mean, std = band_mean.squeeze(-1), band_std.squeeze(-1)
        ax.plot(x, f_grid.squeeze(1), color="black", linestyle="--", linewidth=1,
                label="true function")  # fmt: skip
        ax.scatter(x_train.squeeze(1), y_train.squeeze(1), s=4, color="gray",
                   label="training data")  # fmt: skip
        ax.plot(x, mean, color="C0", label="predictive mean")
        ax.fill_between(x, mean - 2 * std, mean + 2 * std, alpha=0.3, color="C0",
                        label="mean ± 2 predictive std")  # fmt: skip
        ax.set(title=title, xlabel="x", ylim=(-3, 3))
    axes[0].set(ylabel="y")
    _legend_below(figure, axes[0], ncol=4)
    figure.savefig(path, dpi=120)
