"""The options of the function-space posteriors as ``str`` enums."""

from __future__ import annotations

from enum import Enum


class FunctionalApproximation(str, Enum):
    """How the GP posterior of the linearized network is computed (laplace-torch's).

    Every option is exact in its limit (see ``docs/function_space.md``).
    """

    SOD = "sod"
    """The exact GP on ``n_subset`` random training points (all by default), each
    standing for ``N / n_subset`` points."""
    NYSTROM = "nystrom"
    """Nyström features from ``n_subset`` landmark points, one pass over all data
    (ELLA's features; exact when every point is a landmark)."""
    VARIATIONAL = "variational"
    """A sparse variational GP on ``n_subset`` inducing points through gpytorch's
    variational strategy, natural-gradient steps over one epoch (VaLLA-style)."""
