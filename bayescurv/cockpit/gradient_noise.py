r"""Element-wise gradient noise: mean GSNR, CABS batch size, EB early stopping.

All three read the individual gradients' element-wise mean :math:`g_j` and unbiased
variance :math:`\sigma_j^2 = \frac{1}{B-1}\sum_n (\nabla_j \ell_n - g_j)^2` (from
``SumGradSquared``). Entries with :math:`\sigma_j^2 = 0` (dead units, or a batch of
one) carry no noise information; their signal-to-noise ratio is undefined and they are
left out of the GSNR and EB averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bayescurv import engine
from bayescurv.cockpit.instrument import Instrument, StepData
from bayescurv.cockpit.schedules import Schedule


def _moments(data: StepData) -> tuple[Tensor, Tensor]:
    """Flat element-wise mean and unbiased variance of the individual gradients."""
    names = list(data.params)
    mean = torch.cat([data.gradient_mean()[n].flatten() for n in names])
    second = torch.cat([data.second_moment()[n].flatten() for n in names])
    b = data.batch_size
    variance = (second - mean.square()).clamp(min=0) * (b / (b - 1) if b > 1 else 0.0)
    return mean, variance


def _mean_gsnr(data: StepData) -> float:
    mean, variance = _moments(data)
    # NOTE [Variances at round-off level]: E[g²] - E[g]² cancels; variances within
    # a few ulps of E[g²] are zero up to round-off and treated as zero.
    floor = 8 * torch.finfo(variance.dtype).eps * (mean.square() + variance)
    noisy = variance > floor
    if not noisy.any():
        return math.nan
    return (mean[noisy].square() / variance[noisy]).mean().item()


class MeanGSNR(Instrument):
    r"""Mean gradient signal-to-noise ratio (Liu et al., ICLR 2020).

    .. math:: \mathrm{GSNR} = \frac{1}{|J|}\sum_{j \in J} g_j^2 / \sigma_j^2,
        \qquad J = \{j : \sigma_j^2 > 0\}

    Large values: the individual gradients agree (the model fits shared structure);
    small values: the update is dominated by per-sample noise. NaN if no entry has
    noise (e.g. a batch of one).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.MeanGSNR()])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> pit.history["mean_gsnr"].values[0]  # 16 / ((4 + 4) / 1)
        2.0
    """

    name = "mean_gsnr"
    title = "Mean GSNR"
    unit = r"mean $g_j^2 / \sigma_j^2$"

    def required(self) -> Sequence[engine.Extension]:
        """Sums of squared individual gradients."""
        return (engine.SumGradSquared(),)

    def compute(self, data: StepData) -> float:
        """The mean GSNR over the noisy entries."""
        return _mean_gsnr(data)


class EarlyStopping(Instrument):
    r"""Evidence-based early-stopping criterion (Mahsereci et al., 2017, eq. 7).

    .. math:: \mathrm{EB} = 1 - \frac{B}{|J|} \sum_{j\in J} \frac{g_j^2}{\sigma_j^2}
        = 1 - B \cdot \mathrm{GSNR}

    Positive values mean the gradient is indistinguishable from noise of a zero
    gradient: training on this data has stopped making progress (stop). Derived for
    plain SGD.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> instruments = [ck.EarlyStopping()]
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), instruments)
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> pit.history["early_stopping"].values[0]  # 1 - 2 * GSNR, GSNR = 16 / 8
        -3.0
    """

    name = "early_stopping"
    title = "EB early-stopping criterion"
    unit = "EB (stop if > 0)"

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__(schedule)
        self.threshold = 0.0

    def required(self) -> Sequence[engine.Extension]:
        """Sums of squared individual gradients."""
        return (engine.SumGradSquared(),)

    def compute(self, data: StepData) -> float:
        """The EB criterion."""
        return 1.0 - data.batch_size * _mean_gsnr(data)


class CABS(Instrument):
    r"""CABS batch size, coupling batch size and learning rate (Balles et al., 2017).

    .. math:: B_\text{CABS} = \eta \, \frac{\sum_j \sigma_j^2}{\bar\ell},

    with learning rate :math:`\eta` and :math:`\bar\ell` the mean individual loss.
    It is the batch size that, for plain SGD with this learning rate, maximizes the
    expected loss decrease per sample.

    Args:
        lr: The learning rate :math:`\eta`; ``None`` reads the first parameter
            group's learning rate from the optimizer given to the Cockpit.
        schedule: Steps at which it runs (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.CABS(lr=0.5)])
        >>> with pit.step(torch.ones(2, 1), torch.tensor([[1.0], [3.0]])):
        ...     pass
        >>> # individual gradients 2 (w x - y) x: -2 and -6, mean -4
        >>> # variance (4 + 4) / 1, individual losses 1 and 9 (mean 5)
        >>> pit.history["cabs"].values[0]  # 0.5 * 8 / 5
        0.8
    """

    name = "cabs"
    title = "CABS batch size"
    unit = "suggested batch size"
    needs_learning_rate = True

    def __init__(
        self, lr: float | None = None, schedule: Schedule | None = None
    ) -> None:
        super().__init__(schedule)
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"CABS: lr must be a positive number, got {lr!r}.")
        self.lr = lr
        self.needs_learning_rate = lr is None

    def required(self) -> Sequence[engine.Extension]:
        """Sums of squared individual gradients."""
        return (engine.SumGradSquared(),)

    def compute(self, data: StepData) -> float:
        """The suggested batch size."""
        lr = self.lr if self.lr is not None else data.learning_rate
        if lr is None:
            raise ValueError(
                "CABS needs a learning rate: pass CABS(lr=...) or "
                "Cockpit(..., optimizer=...)."
            )
        _, variance = _moments(data)
        return lr * variance.sum().item() / data.individual_losses().mean().item()
