"""Presets: the Cockpit paper's instrument configurations.

* ``economy``: loss, gradient norm, distance, update size, alpha, the three
  gradient tests and the 1-D gradient histogram, all from first-order quantities;
* ``business``: economy plus the TIC (GGN diagonal) and the Hessian trace;
* ``full``: business plus the largest Hessian eigenvalue and the 2-D histogram, and
  the gradient-noise instruments the paper describes outside its configurations
  (mean GSNR, CABS batch size, EB early stopping; all cheap).

# NOTE [Preset schedules]
# With no ``schedule`` the presets run each instrument as often as its cost allows:
# loss, gradient norm, distance and update size (no engine quantity) every step; the
# instruments that need individual gradients (about 2.5 training steps for the
# engine's ``BatchGrad`` on a CNN, plus the histogram) every ``FIRST_ORDER_INTERVAL``
# steps (alpha also needs them at the step after); and those that need curvature
# (Hessian-vector products, a GGN diagonal; tens of training steps) and the 2-D
# histogram every ``CURVATURE_INTERVAL`` steps. A given ``schedule`` applies to all
# instruments, as in the Cockpit paper. The TIC divides by the exact GGN diagonal
# (a Monte Carlo diagonal from one column is cheaper but its near-zero entries make
# the ratio erratic) and the Hessian trace sums the exact diagonal (DiagHessian),
# both computed in the step's engine sweep, as in the paper.
"""

from __future__ import annotations

from enum import Enum

from bayescurv.cockpit.alpha import Alpha
from bayescurv.cockpit.basic import Distance, GradNorm, Loss, UpdateSize
from bayescurv.cockpit.curvature import (
    TIC,
    HessMaxEV,
    HessTrace,
    TICCurvature,
    TraceMethod,
)
from bayescurv.cockpit.gradient_noise import CABS, EarlyStopping, MeanGSNR
from bayescurv.cockpit.gradient_tests import (
    InnerProductTest,
    NormTest,
    OrthogonalityTest,
)
from bayescurv.cockpit.histograms import GradHist1d, GradHist2d
from bayescurv.cockpit.instrument import Instrument
from bayescurv.cockpit.schedules import Schedule, every

FIRST_ORDER_INTERVAL = 25
"""Default step interval of the preset instruments that need individual gradients."""
CURVATURE_INTERVAL = 50
"""Default step interval of the preset curvature instruments and the 2-D histogram."""


class Preset(str, Enum):
    """Instrument configurations, from cheapest to most complete."""

    ECONOMY = "economy"
    """First-order instruments only (one engine sweep for individual gradients)."""
    BUSINESS = "business"
    """Economy plus the TIC and the Hessian trace (exact diagonals)."""
    FULL = "full"
    """Business plus the top Hessian eigenvalue, 2-D histogram, GSNR, CABS and EB."""


def preset_instruments(
    preset: Preset | str,
    schedule: Schedule | None = None,
    *,
    first_order_interval: int = FIRST_ORDER_INTERVAL,
    curvature_interval: int = CURVATURE_INTERVAL,
) -> list[Instrument]:
    """Fresh instruments of a preset.

    Args:
        preset: ``"economy"``, ``"business"`` or ``"full"``.
        schedule: One schedule for all instruments; ``None`` for the defaults of the
            NOTE above.
        first_order_interval: Step interval of the instruments that need individual
            gradients (without ``schedule``).
        curvature_interval: Step interval of the curvature instruments and the 2-D
            histogram (without ``schedule``).

    Returns:
        The instruments, in dashboard order.

    Raises:
        ValueError: For an unknown preset.
    """
    try:
        preset = Preset(preset)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in Preset)
        raise ValueError(
            f"Unknown preset {preset!r}; choose one of {choices}."
        ) from None
    cheap = schedule
    first = schedule if schedule is not None else every(first_order_interval)
    costly = schedule if schedule is not None else every(curvature_interval)
    instruments: list[Instrument] = [
        Loss(cheap),
        GradNorm(cheap),
        Distance(cheap),
        UpdateSize(cheap),
        Alpha(first),
        NormTest(schedule=first),
        InnerProductTest(schedule=first),
        OrthogonalityTest(schedule=first),
        GradHist1d(schedule=first),
    ]
    if preset in (Preset.BUSINESS, Preset.FULL):
        instruments += [
            TIC(TICCurvature.GGN_EXACT, schedule=costly),
            HessTrace(TraceMethod.EXACT, schedule=costly),
        ]
    if preset == Preset.FULL:
        instruments += [
            HessMaxEV(schedule=costly),
            GradHist2d(schedule=costly),
            MeanGSNR(first),
            CABS(schedule=first),
            EarlyStopping(first),
        ]
    return instruments
