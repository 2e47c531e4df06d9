"""Presets: the Cockpit paper's instrument configurations.

* ``economy``: loss, gradient norm, distance, update size, alpha, the three
  gradient tests and the 1-D gradient histogram, all from first-order quantities;
* ``business``: economy plus the TIC (GGN diagonal) and the Hessian trace;
* ``full``: business plus the largest Hessian eigenvalue and the 2-D histogram, and
  the gradient-noise instruments the paper describes outside its configurations
  (mean GSNR, CABS batch size, EB early stopping; all cheap).

# NOTE [Preset schedules]
# With no ``schedule``, the instruments that cost extra passes (the Hessian's
# trace and top eigenvalue, the TIC's GGN diagonal) and the 2-D histogram run every
# ``CURVATURE_INTERVAL`` steps and all others every step; a given ``schedule`` applies
# to all instruments, as in the paper.
"""

from __future__ import annotations

from enum import Enum

from bayescurv.cockpit.alpha import Alpha
from bayescurv.cockpit.basic import Distance, GradNorm, Loss, UpdateSize
from bayescurv.cockpit.curvature import TIC, HessMaxEV, HessTrace
from bayescurv.cockpit.gradient_noise import CABS, EarlyStopping, MeanGSNR
from bayescurv.cockpit.gradient_tests import (
    InnerProductTest,
    NormTest,
    OrthogonalityTest,
)
from bayescurv.cockpit.histograms import GradHist1d, GradHist2d
from bayescurv.cockpit.instrument import Instrument
from bayescurv.cockpit.schedules import Schedule, every

CURVATURE_INTERVAL = 10
"""Default step interval of the expensive instruments in presets."""


class Preset(str, Enum):
    """Instrument configurations, from cheapest to most complete."""

    ECONOMY = "economy"
    """First-order instruments only (one engine sweep for individual gradients)."""
    BUSINESS = "business"
    """Economy plus the TIC and the Hessian trace."""
    FULL = "full"
    """Business plus the top Hessian eigenvalue, 2-D histogram, GSNR, CABS and EB."""


def preset_instruments(
    preset: Preset | str, schedule: Schedule | None = None
) -> list[Instrument]:
    """Fresh instruments of a preset.

    Args:
        preset: ``"economy"``, ``"business"`` or ``"full"``.
        schedule: One schedule for all instruments; ``None`` for the defaults of the
            NOTE above.

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
    costly = schedule if schedule is not None else every(CURVATURE_INTERVAL)
    instruments: list[Instrument] = [
        Loss(cheap),
        GradNorm(cheap),
        Distance(cheap),
        UpdateSize(cheap),
        Alpha(cheap),
        NormTest(schedule=cheap),
        InnerProductTest(schedule=cheap),
        OrthogonalityTest(schedule=cheap),
        GradHist1d(schedule=cheap),
    ]
    if preset in (Preset.BUSINESS, Preset.FULL):
        instruments += [TIC(schedule=costly), HessTrace(schedule=costly)]
    if preset == Preset.FULL:
        instruments += [
            HessMaxEV(schedule=costly),
            GradHist2d(schedule=costly),
            MeanGSNR(cheap),
            CABS(schedule=cheap),
            EarlyStopping(cheap),
        ]
    return instruments
