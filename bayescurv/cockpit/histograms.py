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
_CHUNK_ELEMENTS = 2**18  # values binned at once (see NOTE [Chunked counting])


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


def _largest(tensors: Sequence[Tensor]) -> float:
    """The largest magnitude of all entries."""
    extremes = [torch.aminmax(t) for t in tensors]
    return max(max(-low.item(), high.item()) for low, high in extremes)


def _symmetric(largest: float) -> Range:
    """``(-largest, largest)``, or ``(-1, 1)`` if everything is zero."""
    return (-largest, largest) if largest > 0 else (-1.0, 1.0)


class _Binner:
    """Bin indices of chunks of values, written into reused buffers.

    # NOTE [Chunked counting]
    # Counting N·P elements with torch.histc or with one index tensor of N·P entries
    # costs more than a training step (histc is slow per element; a fresh N·P tensor
    # is expensive to allocate). Chunks of at most _CHUNK_ELEMENTS values are binned
    # into two preallocated buffers and counted with bincount. Values outside the
    # range are clamped into the edge bins.
    """

    def __init__(self, value_range: Range, bins: int, like: Tensor) -> None:
        self.low, high = value_range
        self.scale = bins / (high - self.low)
        self.bins = bins
        self._float = torch.empty(_CHUNK_ELEMENTS, dtype=like.dtype, device=like.device)
        self._long = torch.empty(_CHUNK_ELEMENTS, dtype=torch.int64, device=like.device)

    def index(self, values: Tensor) -> Tensor:
        """Bin indices of a 1-D chunk of at most ``_CHUNK_ELEMENTS`` values."""
        size = values.numel()
        buffer = self._float[:size]
        torch.sub(values, self.low, out=buffer)
        buffer.mul_(self.scale).clamp_(0, self.bins - 1)
        index = self._long[:size]
        index.copy_(buffer)  # truncation = floor for non-negative values
        return index


def _chunks(length: int) -> Iterator[slice]:
    for start in range(0, length, _CHUNK_ELEMENTS):
        yield slice(start, min(start + _CHUNK_ELEMENTS, length))


class GradHist1d(Instrument):
    """1-D histogram of the individual gradient elements.

    Args:
        bins: Number of bins.
        range: ``(low, high)``; ``None`` for the symmetric range of the step's
            largest magnitude (every step its own range).
        schedule: Steps at which it runs (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> instrument = ck.GradHist1d(bins=4)
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [instrument])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> hist = pit.history["grad_hist_1d"].values[0]
        >>> hist.counts.tolist(), hist.edges.tolist()
        ([1, 1, 0, 0], [-6.0, -3.0, 0.0, 3.0, 6.0])
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
        # grad_batch = rho ∇l_n: bin it over the range scaled by rho
        grads = list(data.quantity("grad_batch").values())
        value_range = self.range or _symmetric(_largest(grads) / data.rho)
        binner = _Binner(_scaled(value_range, data.rho), self.bins, grads[0])
        counts = torch.zeros(self.bins, dtype=torch.int64, device=grads[0].device)
        for g in grads:
            flat = g.reshape(-1)
            for part in _chunks(flat.numel()):
                counts += torch.bincount(binner.index(flat[part]), minlength=self.bins)
        edges = torch.linspace(*value_range, self.bins + 1, dtype=torch.float64)
        return Histogram1d(counts.cpu(), edges)


def _scaled(value_range: Range, factor: float) -> Range:
    return value_range[0] * factor, value_range[1] * factor


class GradHist2d(Instrument):
    """2-D histogram of (parameter value, individual gradient element) pairs.

    Args:
        bins: Bins along the parameter axis and the gradient axis.
        param_range: ``(low, high)`` of the parameter axis; ``None`` for the step's
            symmetric range.
        grad_range: ``(low, high)`` of the gradient axis; ``None`` likewise.
        schedule: Steps at which it runs (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> instrument = ck.GradHist2d(bins=(2, 2))
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [instrument])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> hist = pit.history["grad_hist_2d"].values[0]
        >>> # w = 0 in the upper of the bins (-1, 0), [0, 1); both gradients below 0
        >>> hist.counts.tolist()
        [[0, 0], [2, 0]]
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
        grads = data.quantity("grad_batch")
        params = {n: p.detach() for n, p in data.params.items()}
        x_range = self.param_range or _symmetric(_largest(list(params.values())))
        y_range = self.grad_range or _symmetric(
            _largest(list(grads.values())) / data.rho
        )
        x_bins, y_bins = self.bins
        first = next(iter(grads.values()))
        x_binner = _Binner(x_range, x_bins, first)
        y_binner = _Binner(_scaled(y_range, data.rho), y_bins, first)
        counts = torch.zeros(x_bins * y_bins, dtype=torch.int64, device=first.device)
        for name, g in grads.items():
            flat_params = params[name].reshape(-1)
            rows = g.reshape(g.shape[0], -1)
            for part in _chunks(flat_params.numel()):
                x_index = x_binner.index(flat_params[part]) * y_bins
                for row in rows:
                    index = x_index + y_binner.index(row[part])
                    counts += torch.bincount(index, minlength=counts.numel())
        return Histogram2d(
            counts.reshape(x_bins, y_bins).cpu(),
            torch.linspace(*x_range, x_bins + 1, dtype=torch.float64),
            torch.linspace(*y_range, y_bins + 1, dtype=torch.float64),
        )
