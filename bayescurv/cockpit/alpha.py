r"""Alpha: the local step quality from a noise-aware 1-D quadratic fit.

Schneider, Dangel & Hennig, "Cockpit: A Practical Debugging Tool for the Training of
Deep Neural Networks" (NeurIPS 2021), Section 3 and Appendix C.

Along the update direction :math:`d = \theta_{t+1} - \theta_t` (step length
:math:`\tau = \|d\|`), the loss is observed at both ends on each end's own
mini-batch: values :math:`f_0, f_\tau` (means of the individual losses) and slopes
:math:`f'_0, f'_\tau` (means of the individual gradients projected on
:math:`d/\|d\|`), each with the variance of its mean. A quadratic
:math:`q(s) = c + b s + a s^2` is fitted to the four observations by weighted least
squares (weights: inverse variances), and

.. math:: \alpha = \frac{2\tau}{\bar s} - 1 = -\frac{2 \tau a}{b} - 1,
    \qquad \bar s = -b/a,

places the step on the fitted parabola: -1 is no move, 0 the minimum, 1 the point
of equal height on the far side (values above 1 overshoot, below -1 step uphill).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bayescurv import engine
from bayescurv.cockpit.instrument import Instrument, StepData, norm
from bayescurv.cockpit.schedules import Schedule

# Variances below this fraction of the largest of the four are floored to it.
_RELATIVE_VARIANCE_FLOOR = 1e-12


@dataclass(frozen=True)
class _Observation:
    """Mean and variance of the mean of value and slope at one end of a step."""

    value: float
    value_var: float
    slope: float
    slope_var: float


def observe(losses: Tensor, projections: Tensor) -> _Observation:
    r"""Value and slope observations from individual losses and projected gradients.

    Args:
        losses: Individual losses :math:`\ell_n`, ``[N]``.
        projections: :math:`\langle \nabla \ell_n, d / \|d\| \rangle`, ``[N]``.
    """
    n = losses.shape[0]

    def var_of_mean(x: Tensor) -> float:
        return x.var().item() / n if n > 1 else 0.0

    return _Observation(
        losses.mean().item(),
        var_of_mean(losses),
        projections.mean().item(),
        var_of_mean(projections),
    )


def fit_quadratic(tau: float, start: _Observation, end: _Observation) -> Tensor:
    """Weighted least-squares coefficients ``(c, b, a)`` of ``c + b s + a s²``.

    # NOTE [Noise-free observations]
    # Each observation is weighted by its inverse variance. A variance of zero (one
    # sample, or identical samples) would get infinite weight, so variances are
    # floored at 1e-12 of the largest one; if all are zero the fit is unweighted.
    """
    phi = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, tau, tau**2], [0.0, 1.0, 0.0], [0.0, 1.0, 2 * tau]],
        dtype=torch.float64,
    )
    obs = torch.tensor(
        [start.value, end.value, start.slope, end.slope], dtype=torch.float64
    )
    var = torch.tensor(
        [start.value_var, end.value_var, start.slope_var, end.slope_var],
        dtype=torch.float64,
    )
    if var.max() > 0:
        var = var.clamp(min=_RELATIVE_VARIANCE_FLOOR * var.max())
    else:
        var = torch.ones_like(var)
    sqrt_w = var.rsqrt()
    solution = torch.linalg.lstsq(sqrt_w.unsqueeze(1) * phi, sqrt_w * obs).solution
    return solution


def alpha_from_fit(tau: float, coefficients: Tensor) -> float:
    r"""The step's position :math:`\alpha` on the fitted parabola.

    # NOTE [Non-convex fits]
    # If the fit is not convex (a <= 0) the loss still decreases at the step's end,
    # as far as the fit can tell; following the Cockpit paper's implementation this
    # is reported as -1 ("as good as no move"), marking a step that was too short.
    """
    _, b, a = coefficients.tolist()
    if a <= 0:
        return -1.0
    if b == 0:
        return math.inf
    return -2 * tau * a / b - 1


@dataclass
class _Start:
    step: int
    tau: float
    direction: dict[str, Tensor]
    observation: _Observation


class Alpha(Instrument):
    r"""Local step quality :math:`\alpha` of the update at each scheduled step.

    Needs ``BatchGrad`` at the scheduled step and at the next one (the fit's end
    point is observed on the next mini-batch, at the start of the next step), so
    :math:`\alpha` of step ``t`` is recorded once step ``t + 1`` ran. Works with any
    optimizer: the direction is the update actually taken. An update of size zero
    records NaN.

    Args:
        schedule: Steps whose update is assessed (default: every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from bayescurv import cockpit as ck
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.zero_()
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        >>> pit = ck.Cockpit(model, nn.MSELoss(reduction="sum"), [ck.Alpha()])
        >>> for _ in range(2):  # loss (w - 1)^2: lr 1/2 steps from 0 to the minimum
        ...     with pit.step(torch.ones(1, 1), torch.ones(1, 1)):
        ...         optimizer.step()
        >>> abs(pit.history["alpha"].values[0]) < 1e-9
        True
    """

    name = "alpha"
    title = r"Local step quality $\alpha$"
    unit = r"$\alpha$ (-1: no move, 0: minimum, 1: across)"

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__(schedule)
        self._start: _Start | None = None  # a fit waiting for its end point
        self._measuring = False  # this step's update is being assessed

    def extensions(self, step: int) -> Sequence[engine.Extension]:
        """``BatchGrad`` at scheduled steps and at the step after one."""
        if self.schedule(step) or self._start is not None:
            return (engine.BatchGrad(),)
        return ()

    def on_backward(self, data: StepData) -> None:
        """Complete a pending fit with this batch; start one if scheduled."""
        if self._start is not None:
            start, self._start = self._start, None
            projections = data.project_individual_gradients(start.direction)
            end = observe(data.individual_losses(), projections)
            coefficients = fit_quadratic(start.tau, start.observation, end)
            self.values[start.step] = alpha_from_fit(start.tau, coefficients)
        self._measuring = bool(self.schedule(data.step))
        if self._measuring:
            data.snapshot()

    def on_update(self, data: StepData) -> None:
        """Observe the step's start point along the update just taken."""
        if not self._measuring:
            return
        self._measuring = False
        update = data.update()
        tau = norm(update).item()
        if tau == 0:
            self.values[data.step] = math.nan
            return
        direction = {n: u / tau for n, u in update.items()}
        observation = observe(
            data.individual_losses(), data.project_individual_gradients(direction)
        )
        self._start = _Start(data.step, tau, direction, observation)

    def on_abort(self) -> None:
        """Forget a fit in progress."""
        self._start, self._measuring = None, False
