"""Reliability diagram: per-bin accuracy against confidence (needs matplotlib).

matplotlib is an optional dependency (the ``plot`` extra) and imported only when a
diagram is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from bayescurv.metrics.calibration import calibration_bins

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_axes() -> Axes:
    """A fresh figure (no pyplot state, so no GUI backend is needed) and its axes."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "reliability_diagram needs matplotlib, an optional dependency of "
            "bayescurv: pip install 'bayescurv[plot]' (or pip install matplotlib)."
        ) from error
    figure = Figure(figsize=(4.5, 5.0), layout="constrained")
    return figure.subplots()


def reliability_diagram(
    probs: Tensor,
    targets: Tensor,
    n_bins: int = 15,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw per-bin accuracy against confidence, with the gap to the diagonal.

    Each equal-width confidence bin (see :mod:`bayescurv.metrics.calibration`) is a
    bar whose height is the bin's accuracy; a hatched bar spans from the accuracy
    to the bin's mean confidence (the calibration gap). The dashed diagonal is
    perfect calibration; bars below it are over-confident bins. Empty bins draw
    nothing. The legend, below the axes, gives the ECE and the number of samples.

    Args:
        probs: ``[N, C]`` class probabilities or binary ``[N]``.
        targets: ``[N]`` class indices.
        n_bins: Number of equal-width bins on ``[0, 1]``.
        ax: Axes to draw into (e.g. one panel of a larger figure). Default: a new
            figure, created without ``pyplot`` so no GUI backend is needed.
        title: Axes title. Default: none.

    Returns:
        The figure drawn into (``ax.figure`` when ``ax`` is given); save it with
        ``figure.savefig(path)``.

    Raises:
        ImportError: If matplotlib is not installed.
        TypeError, ValueError: On invalid input (see ``bayescurv.metrics``).
    """
    bins = calibration_bins(probs, targets, n_bins)
    if ax is None:
        ax = _new_axes()
    filled = (bins.counts > 0).cpu()
    edges = bins.edges.cpu()
    width = (edges[1] - edges[0]).item()
    left = edges[:-1][filled].tolist()
    accuracy = bins.accuracy.cpu()[filled].tolist()
    gap = (bins.confidence - bins.accuracy).cpu()[filled].tolist()
    ax.bar(
        left,
        accuracy,
        width=width,
        align="edge",
        color="tab:blue",
        edgecolor="white",
        label="accuracy",
    )
    ax.bar(
        left,
        gap,
        bottom=accuracy,
        width=width,
        align="edge",
        facecolor="none",  # hatch only: readable over a bar and over white
        edgecolor="tab:red",
        hatch="///",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    n = int(bins.counts.sum())
    # NOTE [Reliability legend below the axes]
    # Low-count bins can reach any height anywhere inside, so the legend goes below
    # the axes, in one row. The axes have no fixed aspect: a fixed aspect makes a
    # constrained layout push titles and such legends out of the figure.
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize="small",
        title=f"ECE = {bins.ece():.3f}, N = {n}", title_fontsize="small",
        handlelength=1.5, columnspacing=1.0,
    )  # fmt: skip
    if title is not None:
        ax.set_title(title)
    return ax.figure
