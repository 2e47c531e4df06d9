"""The dashboard: one figure of all instruments over training, saved as PNG.

Needs matplotlib (the optional extra ``plot``: ``pip install 'bayescurv[plot]'``); it
is imported only when a dashboard is drawn. The figure is built without pyplot, so it
works in scripts, notebooks and headless machines alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from bayescurv.cockpit.histograms import Histogram1d, Histogram2d
from bayescurv.cockpit.instrument import Track

FAIL = "#d62728"  # red: failed tests, overshooting steps, "stop" signals
# Panels in dashboard order (step size, gradient noise, curvature); instruments in
# one group share a panel. Unknown instruments get scalar panels at the end.
_LAYOUT = (
    ("loss",),
    ("alpha",),
    ("distance", "update_size"),
    ("grad_norm",),
    ("norm_test", "inner_product_test", "orthogonality_test"),
    ("mean_gsnr",),
    ("grad_hist_1d",),
    ("grad_hist_2d",),
    ("cabs",),
    ("early_stopping",),
    ("hess_max_ev",),
    ("hess_trace",),
    ("tic",),
)
_COLUMNS = 4


def dashboard(
    history: Mapping[str, Track], path: str | Path, title: str | None = None
) -> Path:
    """Draw every recorded instrument and save the figure as PNG.

    Scalars are drawn over the training steps (log scale where all values are
    positive); the gradient tests share one panel with their thresholds, failures
    marked red; alpha is drawn against the bands -1/0/1, overshooting steps red;
    histograms show the last recorded step.

    Args:
        history: Instrument name -> :class:`Track` (``Cockpit.history``).
        path: Where to write the PNG.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ImportError: If matplotlib is not installed.
        ValueError: If nothing was recorded.
    """
    figure_cls = _matplotlib_figure()
    panels = _panels(history)
    if not panels:
        raise ValueError("Nothing to plot: no instrument has recorded a value yet.")
    rows = math.ceil(len(panels) / _COLUMNS)
    fig = figure_cls(figsize=(4.6 * _COLUMNS, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, _COLUMNS, squeeze=False).flatten()
    for ax, (draw, tracks) in zip(axes, panels, strict=False):
        draw(ax, tracks)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize="x-large", fontweight="bold")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _matplotlib_figure() -> Any:
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)
    except ImportError as error:
        raise ImportError(
            "The Cockpit dashboard needs matplotlib: pip install 'bayescurv[plot]' "
            "(or pip install matplotlib)."
        ) from error
    return Figure


_Draw = Callable[[Any, dict[str, Track]], None]


def _panels(history: Mapping[str, Track]) -> list[tuple[_Draw, dict[str, Track]]]:
    """Which panels to draw, in dashboard order, with their tracks."""
    recorded = {name: t for name, t in history.items() if t.values}
    groups = [*_LAYOUT]
    known = {name for group in _LAYOUT for name in group}
    groups += [(name,) for name in recorded if name not in known]
    panels: list[tuple[_Draw, dict[str, Track]]] = []
    for group in groups:
        tracks = {name: recorded[name] for name in group if name in recorded}
        if tracks:
            panels.append((_DRAWERS.get(group[0], _draw_scalar), tracks))
    return panels


def _finite(values: list[Any]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in map(float, values)]


def _decorate(ax: Any, title: str, unit: str) -> None:
    ax.set_title(title, fontweight="bold")
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)


def _log_if_positive(ax: Any, values: list[float]) -> None:
    finite = [v for v in values if not math.isnan(v)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        ax.set_yscale("log")


def _draw_scalar(ax: Any, tracks: dict[str, Track]) -> None:
    (track,) = tracks.values()
    steps, values = track.series()
    values = _finite(values)
    ax.plot(steps, values, marker="." if len(steps) < 50 else None, color="#1f77b4")
    _log_if_positive(ax, values)
    _decorate(ax, track.title, track.unit)


def _legend_below(ax: Any) -> None:
    """The panel's legend under its x-axis label: it never covers a curve."""
    ax.legend(
        fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
        frameon=False, handlelength=1.5, columnspacing=1.0,
    )  # fmt: skip


def _draw_distances(ax: Any, tracks: dict[str, Track]) -> None:
    plotted: list[float] = []
    for track in tracks.values():
        steps, values = track.series()
        values = _finite(values)
        plotted += values
        ax.plot(steps, values, label=track.title)
    _log_if_positive(ax, plotted)
    _legend_below(ax)
    _decorate(ax, "Distance and update size", "parameter-space distance")


def _draw_tests(ax: Any, tracks: dict[str, Track]) -> None:
    plotted: list[float] = []
    failed_any = False
    for color, track in zip(
        ("#1f77b4", "#2ca02c", "#9467bd"), tracks.values(), strict=False
    ):
        steps, values = track.series()
        values = _finite(values)
        plotted += values
        ax.plot(steps, values, color=color, label=track.title, linewidth=1.2)
        threshold = track.threshold
        if threshold is not None:
            ax.axhline(threshold, color=color, linestyle="--", linewidth=0.8)
            failed = [
                (s, v) for s, v in zip(steps, values, strict=True) if v > threshold
            ]
            if failed:
                failed_any = True
                fs, fv = zip(*failed, strict=True)
                ax.scatter(fs, fv, color=FAIL, marker="x", s=18, zorder=3)
    _log_if_positive(ax, plotted)
    if failed_any:
        ax.scatter([], [], color=FAIL, marker="x", label="failed (above threshold)")
    _legend_below(ax)
    _decorate(ax, "Gradient tests (pass below dashed)", "smallest passing parameter")


def _draw_alpha(ax: Any, tracks: dict[str, Track]) -> None:
    (track,) = tracks.values()
    steps, values = track.series()
    clip = 4.0
    shown = [max(-clip, min(clip, v)) for v in _finite(values)]
    colors = [FAIL if v > 1 else "#ff7f0e" if v < -1 else "#1f77b4" for v in shown]
    ax.axhspan(-1, 1, color="#2ca02c", alpha=0.08)
    for level in (-1, 0, 1):
        ax.axhline(level, color="gray", linewidth=0.8, linestyle=":" if level else "-")
    ax.scatter(steps, shown, c=colors, s=10)
    finite = [v for v in shown if not math.isnan(v)]
    if finite:
        ax.text(
            0.02,
            0.95,
            rf"median $\alpha$ = {sorted(finite)[len(finite) // 2]:.2f}",
            transform=ax.transAxes,
            va="top",
            fontsize="small",
        )
    reach = max([1.5, *(abs(v) for v in finite)])
    ax.set_ylim(-reach - 0.3, reach + 0.3)
    _decorate(ax, track.title + " (red: overshoot)", track.unit)


def _draw_early_stopping(ax: Any, tracks: dict[str, Track]) -> None:
    (track,) = tracks.values()
    steps, values = track.series()
    values = _finite(values)
    ax.plot(steps, values, color="#1f77b4")
    ax.axhline(0.0, color=FAIL, linestyle="--", linewidth=0.8)
    stop = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
    if stop:
        ss, sv = zip(*stop, strict=True)
        ax.scatter(ss, sv, color=FAIL, s=10, label="stop (> 0)", zorder=3)
        ax.legend(fontsize="small")
    _decorate(ax, track.title, track.unit)


def _last(track: Track) -> tuple[int, Any]:
    step = max(track.values)
    return step, track.values[step]


def _draw_hist_1d(ax: Any, tracks: dict[str, Track]) -> None:
    (track,) = tracks.values()
    step, hist = _last(track)
    assert isinstance(hist, Histogram1d)
    counts = hist.counts.to(torch.float64)
    ax.stairs(counts.numpy(), hist.edges.numpy(), fill=True, color="#1f77b4")
    if (counts > 0).any():
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
    ax.set_title(f"{track.title} (step {step})", fontweight="bold")
    ax.set_xlabel(r"individual gradient element $\nabla_j \ell_n$")
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)


def _draw_hist_2d(ax: Any, tracks: dict[str, Track]) -> None:
    from matplotlib.colors import LogNorm  # noqa: PLC0415 (optional dependency)

    (track,) = tracks.values()
    step, hist = _last(track)
    assert isinstance(hist, Histogram2d)
    counts = hist.counts.to(torch.float64).T.numpy()
    counts[counts == 0] = math.nan
    norm = LogNorm(vmin=1, vmax=max(float(hist.counts.max()), 2.0))
    mesh = ax.pcolormesh(
        hist.x_edges.numpy(), hist.y_edges.numpy(), counts, norm=norm, cmap="viridis"
    )
    ax.figure.colorbar(mesh, ax=ax, label="count")
    ax.set_title(f"{track.title} (step {step})", fontweight="bold")
    ax.set_xlabel(r"parameter value $\theta_j$")
    ax.set_ylabel(r"$\nabla_j \ell_n$")


_DRAWERS: dict[str, _Draw] = {
    "alpha": _draw_alpha,
    "distance": _draw_distances,
    "norm_test": _draw_tests,
    "early_stopping": _draw_early_stopping,
    "grad_hist_1d": _draw_hist_1d,
    "grad_hist_2d": _draw_hist_2d,
}
