"""Cockpit: training diagnostics from one engine sweep per step.

Schneider, Dangel & Hennig, "Cockpit: A Practical Debugging Tool for the Training of
Deep Neural Networks" (NeurIPS 2021). See :class:`Cockpit` for the training loop and
``docs/cockpit.md`` for what the dashboard shows.
"""

from bayescurv.cockpit import schedules
from bayescurv.cockpit.alpha import Alpha
from bayescurv.cockpit.basic import Distance, GradNorm, Loss, UpdateSize
from bayescurv.cockpit.cockpit import Cockpit
from bayescurv.cockpit.curvature import (
    TIC,
    HessMaxEV,
    HessTrace,
    TICApproximation,
    TICCurvature,
    TraceMethod,
)
from bayescurv.cockpit.dashboard import dashboard
from bayescurv.cockpit.gradient_noise import CABS, EarlyStopping, MeanGSNR
from bayescurv.cockpit.gradient_tests import (
    InnerProductTest,
    NormTest,
    OrthogonalityTest,
)
from bayescurv.cockpit.histograms import (
    GradHist1d,
    GradHist2d,
    Histogram1d,
    Histogram2d,
)
from bayescurv.cockpit.instrument import Instrument, StepData, Track
from bayescurv.cockpit.presets import Preset, preset_instruments

__all__ = [
    "CABS",
    "TIC",
    "Alpha",
    "Cockpit",
    "Distance",
    "EarlyStopping",
    "GradHist1d",
    "GradHist2d",
    "GradNorm",
    "HessMaxEV",
    "HessTrace",
    "Histogram1d",
    "Histogram2d",
    "InnerProductTest",
    "Instrument",
    "Loss",
    "MeanGSNR",
    "NormTest",
    "OrthogonalityTest",
    "Preset",
    "StepData",
    "TICApproximation",
    "TICCurvature",
    "TraceMethod",
    "Track",
    "UpdateSize",
    "dashboard",
    "preset_instruments",
    "schedules",
]
