r"""Histograms of the individual gradients' elements.

The 1-D histogram counts all :math:`N \cdot P` elements :math:`\nabla_j \ell_n`; its
width shows the gradient noise, its mass near zero how many parameters receive
(almost) no signal. The 2-D histogram counts the pairs (parameter value
:math:`\theta_j`, element :math:`\nabla_j \ell_n`) and shows which parameters (small,
large) receive which gradients. Values outside a given range are counted in the edge
bins, so counts always sum to :math:`N P`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv import engine
from bayescurv.cockpit.instrument import Instrument, StepData
from bayescurv.cockpit.schedules import Schedule

Range = tuple[float, float]
_CHUNK_ELEMENTS = 2**22  # elements bucketed at once (bounds temporary memory)


@dataclass(frozen=True)
class Histogram1d:
    """Counts ``[bins]`` (int64) and bin edges ``[bins + 1]``."""

    counts: Tensor
    edges: Tensor


@dataclass(frozen=True)
class Histogram2d:
    """Counts ``[x_bins, y_bins]`` (int64) and edges of both axes."""

    counts: Tensor
    x_edges: Tensor
    y_edges: Tensor


def _check_bins(owner: str, bins: int) -> int:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"{owner}: bins must be a positive integer, got {bins!r}.")
    return bins


def _check_range(owner: str, name: str, value: Range | None) -> Range | None:
    if value is None:
        return None
    low, high = value
    if not low < high:
        raise ValueError(
            f"{owner}: {name} must be (low, high) with low < high, got {value!r}."
        )
    return float(low), float(high)


def _symmetric(tensors: Sequence[Tensor]) -> Range:
    """``(-m, m)`` with ``m`` the largest magnitude (``(-1, 1)`` if all are zero)."""
    largest = max(t.abs().max().item() for t in tensors)
    return (-largest, largest) if largest > 0 else (-1.0, 1.0)


def _bucket(x: Tensor, value_range: Range, bins: int) -> Tensor:
    """Bin index of every element; outside values go to the edge bins."""
    low, high = value_range
    index = ((x - low) * (bins / (high - low))).floor().clamp_(0, bins - 1)
    return index.long()


def _row_chunks(x: Tensor) -> Iterator[slice]:
    """Slices of rows of ``x: [N, ...]`` with at most ~``_CHUNK_ELEMENTS`` elements."""
    per_row = max(x[0].numel(), 1) if x.shape[0] else 1
    rows = max(1, _CHUNK_ELEMENTS // per_row)
    for start in range(0, x.shape[0], rows):
        yield slice(start, start + rows)


class GradHist1d(Instrument):
    """1-D histogram of the individual gradient elements.

    Args:
        bins: Number of bins.
        range: ``(low, high)``; ``None`` for the symmetric range of the step's
            largest magnitude (every step its own range).
        schedule: Steps at which it runs (default: every step).
    """

    name = "grad_hist_1d"
    title = "Individual gradient elements"
    unit = "count"

    def __init__(
        self,
        bins: int = 64,
        range: Range | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(schedule)
        self.bins = _check_bins("GradHist1d", bins)
        self.range = _check_range("GradHist1d", "range", range)

    def required(self) -> Sequence[engine.Extension]:
        """Individual gradients."""
        return (engine.BatchGrad(),)

    def compute(self, data: StepData) -> Histogram1d:
        """The histogram at this step."""
        grads = list(data.individual_gradients().values())
        low, high = value_range = self.range or _symmetric(grads)
        counts = torch.zeros(self.bins, dtype=torch.int64)
        for g in grads:
            flat = g.flatten()
            for rows in _row_chunks(flat.unsqueeze(1)):
                chunk = flat[rows]
                # chunks stay below 2^24 elements: float32 counts are exact
                counts += torch.histc(chunk, self.bins, low, high).long().cpu()
                if self.range is not None:  # outside values go to the edge bins
                    counts[0] += int((chunk < low).sum())
                    counts[-1] += int((chunk > high).sum())
        edges = torch.linspace(*value_range, self.bins + 1, dtype=torch.float64)
        return Histogram1d(counts, edges)


class GradHist2d(Instrument):
    """2-D histogram of (parameter value, individual gradient element) pairs.

    Args:
        bins: Bins along the parameter axis and the gradient axis.
        param_range: ``(low, high)`` of the parameter axis; ``None`` for the step's
            symmetric range.
        grad_range: ``(low, high)`` of the gradient axis; ``None`` likewise.
        schedule: Steps at which it runs (default: every step).
    """

    name = "grad_hist_2d"
    title = "Parameters vs individual gradients"
    unit = "individual gradient element"

    def __init__(
        self,
        bins: tuple[int, int] = (40, 40),
        param_range: Range | None = None,
        grad_range: Range | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(schedule)
        self.bins = (
            _check_bins("GradHist2d", bins[0]),
            _check_bins("GradHist2d", bins[1]),
        )
        self.param_range = _check_range("GradHist2d", "param_range", param_range)
        self.grad_range = _check_range("GradHist2d", "grad_range", grad_range)

    def required(self) -> Sequence[engine.Extension]:
        """Individual gradients."""
        return (engine.BatchGrad(),)

    def compute(self, data: StepData) -> Histogram2d:
        """The histogram at this step."""
        grads = data.individual_gradients()
        params = {n: p.detach() for n, p in data.params.items()}
        x_range = self.param_range or _symmetric(list(params.values()))
        y_range = self.grad_range or _symmetric(list(grads.values()))
        x_bins, y_bins = self.bins
        counts = torch.zeros(x_bins * y_bins, dtype=torch.int64)
        for name, g in grads.items():
            x_index = _bucket(params[name].flatten(), x_range, x_bins) * y_bins
            flat = g.flatten(1)
            for rows in _row_chunks(flat):
                index = x_index + _bucket(flat[rows], y_range, y_bins)
                counts += torch.bincount(
                    index.flatten(), minlength=counts.numel()
                ).cpu()
        return Histogram2d(
            counts.reshape(x_bins, y_bins),
            torch.linspace(*x_range, x_bins + 1, dtype=torch.float64),
            torch.linspace(*y_range, y_bins + 1, dtype=torch.float64),
        )
